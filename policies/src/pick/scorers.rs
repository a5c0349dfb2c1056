//! Built-in filters and scorers, each in `[0, 1]`, plus lookup by the names config uses.
//!
//! - `available` (filter): drops endpoints the circuit breaker holds out.
//! - `decode-capable` (filter): keeps `decode` and `prefill-decode` pods (llm-d: unlabelled pods count as decode).
//! - `least-requests`: min-max over the router's own in-flight counts, `(max - x) / (max - min)`, all 1.0 when equal.
//! - `queue`: the same min-max over scraped `num_requests_waiting`; stale or missing metrics score 0 (fail closed).
//! - `running-requests`: min-max over scraped `num_requests_running`; stale scores 0.
//! - `kv-cache-utilization`: `1 - kv_usage`; stale scores 0.
//! - `token-load`: `1 - min(1, in_flight_tokens / 4,194,304)` (llm-d: 128 requests x 32K tokens).
//! - `prefill-backlog`: `1 / (1 + prefill_tokens / 8,192)`: the router's own count of uncached prompt tokens still
//!   before their first token on the pod. Fresh at pick time (a scrape is up to one interval old, and a burst of
//!   misses arriving within one interval would all see the same "idle" pod), and on a scale where one 8k-token
//!   prefill costs half the score, unlike `token-load`'s 4M-token cap.

use std::time::Instant;

use super::{Filter, RequestView, Scorer};
use crate::endpoint::EndpointView;

/// Keeps endpoints whose circuit breaker lets traffic through.
#[derive(Debug, Clone, Copy)]
pub struct Available;

impl Filter for Available {
    fn name(&self) -> &'static str {
        "available"
    }
    fn keep(&self, _req: &RequestView, ep: &EndpointView) -> bool {
        ep.available
    }
}

/// Keeps endpoints that can decode (serve a whole request).
#[derive(Debug, Clone, Copy)]
pub struct DecodeCapable;

impl Filter for DecodeCapable {
    fn name(&self) -> &'static str {
        "decode-capable"
    }
    fn keep(&self, _req: &RequestView, ep: &EndpointView) -> bool {
        ep.role.serves_decode()
    }
}

/// Min-max "lower is better" over one value per endpoint; `None` (unknown) scores 0.
fn min_max(values: impl Iterator<Item = Option<f64>> + Clone, out: &mut [f64]) {
    let known = values.clone().flatten();
    let (lo, hi) = known.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    for (slot, v) in out.iter_mut().zip(values) {
        *slot = match v {
            None => 0.0,
            Some(_) if hi <= lo => 1.0,
            Some(v) => (hi - v) / (hi - lo),
        };
    }
}

/// Prefers endpoints with fewer requests in flight from this router.
#[derive(Debug, Clone, Copy)]
pub struct LeastRequests;

impl Scorer for LeastRequests {
    fn name(&self) -> &'static str {
        "least-requests"
    }
    fn score(&self, _req: &RequestView, eps: &[EndpointView], _now: Instant, out: &mut [f64]) {
        min_max(eps.iter().map(|e| Some(f64::from(e.in_flight))), out);
    }
}

/// Prefers endpoints with a shorter engine queue (llm-d `queue`).
#[derive(Debug, Clone, Copy)]
pub struct Queue;

impl Scorer for Queue {
    fn name(&self) -> &'static str {
        "queue"
    }
    fn score(&self, _req: &RequestView, eps: &[EndpointView], _now: Instant, out: &mut [f64]) {
        min_max(
            eps.iter().map(|e| e.scraped.map(|s| f64::from(s.waiting))),
            out,
        );
    }
}

/// Prefers endpoints with a smaller running batch (llm-d `running-requests`).
#[derive(Debug, Clone, Copy)]
pub struct RunningRequests;

impl Scorer for RunningRequests {
    fn name(&self) -> &'static str {
        "running-requests"
    }
    fn score(&self, _req: &RequestView, eps: &[EndpointView], _now: Instant, out: &mut [f64]) {
        min_max(
            eps.iter().map(|e| e.scraped.map(|s| f64::from(s.running))),
            out,
        );
    }
}

/// Prefers endpoints with free KV cache (llm-d `kv-cache-utilization`).
#[derive(Debug, Clone, Copy)]
pub struct KvCacheUtilization;

impl Scorer for KvCacheUtilization {
    fn name(&self) -> &'static str {
        "kv-cache-utilization"
    }
    fn score(&self, _req: &RequestView, eps: &[EndpointView], _now: Instant, out: &mut [f64]) {
        for (slot, e) in out.iter_mut().zip(eps) {
            *slot = e.scraped.map_or(0.0, |s| 1.0 - s.kv_usage);
        }
    }
}

/// In-flight token count at which `token-load` reaches 0 (llm-d: 128 requests x 32K tokens).
pub const TOKEN_LOAD_CAP: f64 = 4_194_304.0;

/// Prefers endpoints with fewer in-flight tokens from this router (llm-d `token-load`).
#[derive(Debug, Clone, Copy)]
pub struct TokenLoad;

impl Scorer for TokenLoad {
    fn name(&self) -> &'static str {
        "token-load"
    }
    fn score(&self, _req: &RequestView, eps: &[EndpointView], _now: Instant, out: &mut [f64]) {
        for (slot, e) in out.iter_mut().zip(eps) {
            *slot = 1.0 - (e.in_flight_tokens as f64 / TOKEN_LOAD_CAP).min(1.0);
        }
    }
}

/// Backlog at which `prefill-backlog` scores 0.5: one step's worth of prefill at vLLM's default token budget.
pub const PREFILL_BACKLOG_SCALE: f64 = 8_192.0;

/// Prefers endpoints with less prefill work queued by this router (weir's own scorer).
#[derive(Debug, Clone, Copy)]
pub struct PrefillBacklog;

impl Scorer for PrefillBacklog {
    fn name(&self) -> &'static str {
        "prefill-backlog"
    }
    fn score(&self, _req: &RequestView, eps: &[EndpointView], _now: Instant, out: &mut [f64]) {
        for (slot, e) in out.iter_mut().zip(eps) {
            *slot = 1.0 / (1.0 + e.prefill_tokens as f64 / PREFILL_BACKLOG_SCALE);
        }
    }
}

/// A filter by its config name.
pub fn filter_by_name(name: &str) -> Option<Box<dyn Filter>> {
    match name {
        "available" => Some(Box::new(Available)),
        "decode-capable" => Some(Box::new(DecodeCapable)),
        _ => None,
    }
}

/// A scorer by its config name.
pub fn scorer_by_name(name: &str) -> Option<Box<dyn Scorer>> {
    match name {
        "least-requests" => Some(Box::new(LeastRequests)),
        "queue" => Some(Box::new(Queue)),
        "running-requests" => Some(Box::new(RunningRequests)),
        "kv-cache-utilization" => Some(Box::new(KvCacheUtilization)),
        "token-load" => Some(Box::new(TokenLoad)),
        "prefill-backlog" => Some(Box::new(PrefillBacklog)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Role, ScrapedLoad};
    use crate::testkit::now;

    fn ep(waiting: Option<u32>, kv: f64) -> EndpointView {
        EndpointView {
            index: 0,
            role: Role::Both,
            available: true,
            in_flight: 0,
            in_flight_tokens: 0,
            prefill_tokens: 0,
            scraped: waiting.map(|w| ScrapedLoad {
                waiting: w,
                running: 0,
                kv_usage: kv,
                age_ms: 0,
            }),
        }
    }

    #[test]
    fn queue_is_min_max_and_stale_scores_zero() {
        let eps = [
            ep(Some(0), 0.0),
            ep(Some(10), 0.0),
            ep(Some(5), 0.0),
            ep(None, 0.0),
        ];
        let mut out = [9.0; 4];
        Queue.score(&RequestView::default(), &eps, now(), &mut out);
        assert_eq!(out, [1.0, 0.0, 0.5, 0.0]);
    }

    #[test]
    fn equal_queues_all_score_one() {
        let eps = [ep(Some(3), 0.0), ep(Some(3), 0.0)];
        let mut out = [0.0; 2];
        Queue.score(&RequestView::default(), &eps, now(), &mut out);
        assert_eq!(out, [1.0, 1.0]);
    }

    #[test]
    fn kv_scorer_prefers_free_cache() {
        let eps = [ep(Some(0), 0.25), ep(None, 0.0)];
        let mut out = [0.0; 2];
        KvCacheUtilization.score(&RequestView::default(), &eps, now(), &mut out);
        assert_eq!(out, [0.75, 0.0]);
    }

    #[test]
    fn prefill_backlog_halves_at_one_budget_and_prefers_the_idle_pod() {
        let mut eps = [ep(Some(0), 0.0), ep(Some(0), 0.0), ep(Some(0), 0.0)];
        eps[1].prefill_tokens = 8_192;
        eps[2].prefill_tokens = 1_200;
        let mut out = [0.0; 3];
        PrefillBacklog.score(&RequestView::default(), &eps, now(), &mut out);
        assert_eq!(out[0], 1.0);
        assert_eq!(out[1], 0.5);
        assert!(out[2] < 1.0 && out[2] > 0.85, "{out:?}");
    }

    #[test]
    fn names_resolve() {
        for n in [
            "least-requests",
            "queue",
            "running-requests",
            "kv-cache-utilization",
            "token-load",
            "prefill-backlog",
        ] {
            assert_eq!(scorer_by_name(n).map(|s| s.name()), Some(n));
        }
        assert!(scorer_by_name("prefix-cache").is_none());
        assert_eq!(
            filter_by_name("decode-capable").map(|f| f.name()),
            Some("decode-capable")
        );
    }
}
