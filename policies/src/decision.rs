//! Decision records: why the router sent a request where it did, kept in a bounded ring for `/debug/decisions`.
//!
//! A [`DecisionRecord`] holds the candidates (which filter dropped each, every scorer's raw and weighted score, the
//! prefix match and whether the load gate ignored it), the pick, the P/D choice, predicted TTFT and, filled in when
//! the first token arrives, measured TTFT. [`DecisionRing`] keeps the newest `capacity` records, finds one by request
//! id and lists newest first. Pure data: the router serves it as JSON (`GET /debug/decisions?limit=N`,
//! `/debug/decisions/{request_id}`).

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

/// One scorer's opinion of one candidate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreRecord {
    pub scorer: &'static str,
    /// In `[0, 1]`.
    pub raw: f64,
    pub weight: f64,
    /// `raw * weight`.
    pub weighted: f64,
}

/// One candidate endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandidateRecord {
    /// Endpoint id (pod name or `host:port`).
    pub endpoint: String,
    /// Pool index at decision time.
    pub index: usize,
    /// The filter that removed it, if any (then `scores` is empty).
    pub filtered_by: Option<&'static str>,
    /// Consecutive prefix blocks it holds per the index (before the gate).
    pub prefix_blocks: u32,
    /// The load gate ignored its prefix hit.
    pub gated: bool,
    pub scores: Vec<ScoreRecord>,
    /// Weighted total.
    pub total: f64,
    /// Predicted wait before its prefill would start, when the profile picks by predicted TTFT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_wait_ms: Option<f64>,
    /// Predicted TTFT there (the picker takes the least), when the profile picks by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_ttft_ms: Option<f64>,
}

/// The P/D part of a decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PdRecord {
    /// `colocated` or `disaggregated`.
    pub decision: &'static str,
    /// Why (`short-uncached`, `ttft-worse`, `disaggregate`, ..).
    pub reason: &'static str,
    /// Prefill endpoint when disaggregated.
    pub prefill: Option<String>,
    /// When declined: the idle prefill pod that served the request whole instead of the decode pod (`picked`).
    pub on_prefill_pod: Option<String>,
    /// Prefill-profile candidates, when that profile ran.
    pub prefill_candidates: Vec<CandidateRecord>,
    pub predicted_colocated_ttft_ms: f64,
    pub predicted_disaggregated_ttft_ms: Option<f64>,
}

/// Everything about one routing decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionRecord {
    pub request_id: String,
    pub model: String,
    /// Profile that picked the destination (`default`, `decode`, or a baseline policy name).
    pub profile: &'static str,
    /// Prompt tokens (estimate) and full blocks hashed.
    pub prompt_tokens: u32,
    pub total_blocks: u32,
    pub candidates: Vec<CandidateRecord>,
    /// The destination endpoint, or `None` when nothing was eligible.
    pub picked: Option<String>,
    /// Why nothing was picked.
    pub error: Option<String>,
    pub pd: Option<PdRecord>,
    pub predicted_ttft_ms: Option<f64>,
    /// Filled in when the first token arrives.
    pub measured_ttft_ms: Option<f64>,
    /// Milliseconds since the Unix epoch at decision time (passed in by the shell).
    pub at_unix_ms: u64,
}

/// What the ring needs from a stored record: its request id, and a place for the measured TTFT. Implemented by
/// [`DecisionRecord`] and by the router's lazily explained records (which keep the inputs and build the
/// [`DecisionRecord`] only when someone reads it, so the request path never pays for `explain`).
pub trait Keyed {
    fn request_id(&self) -> &str;
    fn set_measured_ttft(&mut self, ms: f64);
}

impl Keyed for DecisionRecord {
    fn request_id(&self) -> &str {
        &self.request_id
    }
    fn set_measured_ttft(&mut self, ms: f64) {
        self.measured_ttft_ms = Some(ms);
    }
}

/// Bounded ring of the newest decisions, searchable by request id.
#[derive(Debug)]
pub struct DecisionRing<T = DecisionRecord> {
    capacity: usize,
    records: VecDeque<T>,
    /// Sequence number of `records[0]`.
    first_seq: u64,
    /// Request id -> sequence number of its newest record.
    by_id: HashMap<String, u64>,
}

impl<T: Keyed> DecisionRing<T> {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            records: VecDeque::with_capacity(capacity.min(4096)),
            first_seq: 0,
            by_id: HashMap::new(),
        }
    }

    /// Adds a record, evicting the oldest when full.
    pub fn push(&mut self, rec: T) {
        if self.records.len() == self.capacity
            && let Some(old) = self.records.pop_front()
        {
            if self.by_id.get(old.request_id()) == Some(&self.first_seq) {
                self.by_id.remove(old.request_id());
            }
            self.first_seq += 1;
        }
        let seq = self.first_seq + self.records.len() as u64;
        self.by_id.insert(rec.request_id().to_string(), seq);
        self.records.push_back(rec);
    }

    fn position(&self, request_id: &str) -> Option<usize> {
        let seq = *self.by_id.get(request_id)?;
        usize::try_from(seq.checked_sub(self.first_seq)?).ok()
    }

    /// The newest record for `request_id`.
    pub fn get(&self, request_id: &str) -> Option<&T> {
        self.records.get(self.position(request_id)?)
    }

    /// Fills in measured TTFT; false when the record has already left the ring.
    pub fn set_measured_ttft(&mut self, request_id: &str, ms: f64) -> bool {
        match self
            .position(request_id)
            .and_then(|p| self.records.get_mut(p))
        {
            Some(r) => {
                r.set_measured_ttft(ms);
                true
            }
            None => false,
        }
    }

    /// Up to `limit` records, newest first.
    pub fn newest(&self, limit: usize) -> impl Iterator<Item = &T> {
        self.records.iter().rev().take(limit)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> DecisionRecord {
        DecisionRecord {
            request_id: id.into(),
            model: "m".into(),
            profile: "default",
            prompt_tokens: 10,
            total_blocks: 0,
            candidates: vec![],
            picked: Some("pod-0".into()),
            error: None,
            pd: None,
            predicted_ttft_ms: Some(5.0),
            measured_ttft_ms: None,
            at_unix_ms: 0,
        }
    }

    #[test]
    fn ring_is_bounded_found_by_id_and_lists_newest_first() {
        let mut r: DecisionRing = DecisionRing::new(3);
        for i in 0..5 {
            r.push(rec(&format!("r{i}")));
        }
        assert_eq!(r.len(), 3);
        assert!(r.get("r0").is_none() && r.get("r1").is_none());
        assert_eq!(r.get("r3").map(|d| d.request_id.as_str()), Some("r3"));
        let ids: Vec<&str> = r.newest(2).map(|d| d.request_id.as_str()).collect();
        assert_eq!(ids, vec!["r4", "r3"]);
        assert!(r.set_measured_ttft("r2", 12.5));
        assert_eq!(r.get("r2").and_then(|d| d.measured_ttft_ms), Some(12.5));
        assert!(!r.set_measured_ttft("r0", 1.0));
        assert!(r.by_id.len() <= 3);
    }

    #[test]
    fn a_repeated_request_id_finds_the_newest_and_survives_the_old_ones_eviction() {
        let mut r: DecisionRing = DecisionRing::new(2);
        r.push(rec("a"));
        let mut again = rec("a");
        again.model = "second".into();
        r.push(again);
        r.push(rec("b")); // evicts the first "a"
        assert_eq!(r.get("a").map(|d| d.model.as_str()), Some("second"));
        let json = serde_json::to_string(r.get("b").unwrap()).unwrap();
        assert!(json.contains("\"request_id\":\"b\""));
    }
}
