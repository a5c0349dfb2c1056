//! The endpoint view that scheduling decisions read: one model-server pod's identity, role and load.
//!
//! The router builds one [`EndpointView`] per candidate from its own atomics (in-flight requests and tokens, updated
//! at pick time) and the last `/metrics` scrape (queue, running batch, KV use), then hands a slice of them to a pure
//! picker. `metrics-adapter` and `autoscaler` read the same type without depending on the router.

use std::fmt;
use std::sync::Arc;

/// Stable identity of an endpoint (a pod name, or `host:port` for static config). Sorting by it keeps decisions
/// independent of hash-map iteration order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(pub Arc<str>);

impl EndpointId {
    pub fn new(id: impl AsRef<str>) -> Self {
        Self(Arc::from(id.as_ref()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an endpoint does in prefill/decode disaggregation (llm-d's `llm-d.ai/role` pod label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Role {
    /// Serves both phases (`prefill-decode`); also what an unlabelled aggregated pod is.
    #[default]
    Both,
    /// Prefill only (`prefill`).
    Prefill,
    /// Decode only (`decode`).
    Decode,
}

impl Role {
    /// Parses the `llm-d.ai/role` label value; unknown values are `None` so config validation can name them.
    pub fn from_label(value: &str) -> Option<Self> {
        match value {
            "prefill" => Some(Self::Prefill),
            "decode" => Some(Self::Decode),
            "prefill-decode" | "both" => Some(Self::Both),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Both => "prefill-decode",
            Self::Prefill => "prefill",
            Self::Decode => "decode",
        }
    }

    /// Whether this endpoint can serve a whole request on its own (decode-capable).
    pub fn serves_decode(self) -> bool {
        matches!(self, Self::Both | Self::Decode)
    }
}

/// Engine-reported load from the last successful `/metrics` scrape.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ScrapedLoad {
    /// `vllm:num_requests_waiting`: the engine's queue (preempted included).
    pub waiting: u32,
    /// `vllm:num_requests_running`: the engine's batch.
    pub running: u32,
    /// `vllm:kv_cache_usage_perc` (or legacy `gpu_cache_usage_perc`), 0..=1.
    pub kv_usage: f64,
    /// Milliseconds since that scrape completed, at decision time; pickers may distrust old numbers.
    pub age_ms: u64,
}

/// One candidate endpoint as a picker sees it. Cheap to build (Copy), so the router makes a fresh slice per request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointView {
    /// Position of this endpoint in the router's pool (sorted by [`EndpointId`]); a [`crate::pick::Choice`] names it.
    pub index: usize,
    /// P/D role, for role filters.
    pub role: Role,
    /// False while the circuit breaker holds the endpoint out (open, or half-open with its probe already out).
    pub available: bool,
    /// Requests this router has sent and not yet seen finish: counted at pick time, so fresher than any scrape.
    pub in_flight: u32,
    /// Prompt + expected output tokens of those in-flight requests (weir's own estimate).
    pub in_flight_tokens: u64,
    /// Uncached prompt tokens of those in-flight requests that have not produced their first token yet: the pod's
    /// prefill backlog as far as this router knows (released at the first token, not at the end of the request, so
    /// requests already decoding do not count as queued prefill work).
    pub prefill_tokens: u64,
    /// Last scrape, or `None` when the endpoint was never scraped or its scrapes are failing (stale).
    pub scraped: Option<ScrapedLoad>,
}

impl EndpointView {
    /// Best estimate of requests outstanding on the pod: the router's own in-flight count is exact for this router
    /// but misses other replicas; the scrape sees everyone but is up to one interval old. Take the larger.
    pub fn outstanding(&self) -> u64 {
        let scraped = self
            .scraped
            .map_or(0, |s| u64::from(s.waiting) + u64::from(s.running));
        scraped.max(u64::from(self.in_flight))
    }

    /// Queue length for queue-based policies: scraped waiting when known, else requests beyond nothing (0).
    pub fn queue(&self) -> u64 {
        self.scraped.map_or(0, |s| u64::from(s.waiting))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(in_flight: u32, scraped: Option<ScrapedLoad>) -> EndpointView {
        EndpointView {
            index: 0,
            role: Role::Both,
            available: true,
            in_flight,
            in_flight_tokens: 0,
            prefill_tokens: 0,
            scraped,
        }
    }

    #[test]
    fn outstanding_takes_the_larger_of_own_count_and_scrape() {
        let s = ScrapedLoad {
            waiting: 3,
            running: 4,
            kv_usage: 0.1,
            age_ms: 10,
        };
        assert_eq!(view(2, Some(s)).outstanding(), 7);
        assert_eq!(view(9, Some(s)).outstanding(), 9);
        assert_eq!(view(5, None).outstanding(), 5);
    }

    #[test]
    fn role_labels_round_trip() {
        for r in [Role::Both, Role::Prefill, Role::Decode] {
            assert_eq!(Role::from_label(r.as_str()), Some(r));
        }
        assert_eq!(Role::from_label("encode"), None);
        assert!(!Role::Prefill.serves_decode());
    }
}
