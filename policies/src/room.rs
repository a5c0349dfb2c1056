//! Dispatch room: how many more requests a pool may take now, from its pods' load.
//!
//! Gating dispatch in weir (instead of sending everything and letting vLLM's FIFO queue it) is what makes tier
//! priorities and fair queuing take effect: a request held here can still be overtaken by a more important one, a
//! request in vLLM's waiting queue cannot. Per pod (qos-and-security.md §3, routing-and-scheduling.md §4):
//!
//! - a pod without fresh metrics, or unavailable (breaker open), has no room: fail closed, as GIE's
//!   utilization detector does;
//! - a pod whose KV cache use is at or above `kv_limit` (0.9) has no room: more work would preempt;
//! - a pod whose prefill backlog (uncached prompt tokens sent and not yet at first token) is at or above
//!   `max_prefill_tokens` has no room: a new prompt would wait behind it anyway;
//! - otherwise the room is `max_waiting - waiting`: a short engine queue (2) is kept so the batch stays full between
//!   scrapes, without a long FIFO that would undo the scheduling.
//!
//! The pool's room is the sum over its pods. Pure: the caller passes the load snapshot.

use crate::endpoint::EndpointView;

/// Thresholds of the room function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoomConfig {
    /// Engine queue depth allowed per pod (requests waiting in vLLM).
    pub max_waiting: u32,
    /// KV cache use (0..=1) at which a pod takes nothing more.
    pub kv_limit: f64,
    /// Prefill backlog (tokens) at which a pod takes nothing more.
    pub max_prefill_tokens: u64,
    /// Scrapes older than this (milliseconds) are stale.
    pub max_age_ms: u64,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            max_waiting: 2,
            kv_limit: 0.9,
            max_prefill_tokens: 16_384,
            max_age_ms: 1_000,
        }
    }
}

/// One pod's load, as the room function needs it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PodLoad {
    /// Whether the pod may receive requests (breaker closed) and has fresh metrics.
    pub fresh: bool,
    /// Requests waiting: the larger of the engine's queue and what this router knows it sent beyond the batch.
    pub waiting: u32,
    /// Requests running in the engine's batch.
    pub running: u32,
    /// KV cache use, 0..=1.
    pub kv_usage: f64,
    /// Uncached prompt tokens sent and not yet at first token.
    pub prefill_backlog_tokens: u64,
}

impl PodLoad {
    /// From the router's endpoint view: scraped queue and KV use, the router's own prefill backlog; stale or
    /// unavailable endpoints are not fresh.
    pub fn from_view(v: &EndpointView, cfg: &RoomConfig) -> Self {
        match v.scraped {
            Some(s) if v.available && s.age_ms <= cfg.max_age_ms => {
                // Requests this router sent since the scrape are not in `waiting` yet: count what exceeds the
                // scraped total as waiting.
                let since = u64::from(v.in_flight)
                    .saturating_sub(u64::from(s.waiting) + u64::from(s.running));
                Self {
                    fresh: true,
                    waiting: s
                        .waiting
                        .saturating_add(u32::try_from(since).unwrap_or(u32::MAX)),
                    running: s.running,
                    kv_usage: s.kv_usage,
                    prefill_backlog_tokens: v.prefill_tokens,
                }
            }
            _ => Self::default(),
        }
    }

    /// Requests this pod may take now.
    pub fn room(&self, cfg: &RoomConfig) -> u32 {
        if !self.fresh
            || self.kv_usage >= cfg.kv_limit
            || self.prefill_backlog_tokens >= cfg.max_prefill_tokens
        {
            return 0;
        }
        cfg.max_waiting.saturating_sub(self.waiting)
    }
}

/// Requests the pool may take now: the sum of its pods' room.
pub fn pool_room(pods: &[PodLoad], cfg: &RoomConfig) -> u32 {
    pods.iter()
        .fold(0u32, |acc, p| acc.saturating_add(p.room(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Role, ScrapedLoad};

    fn pod(waiting: u32, kv: f64, backlog: u64) -> PodLoad {
        PodLoad {
            fresh: true,
            waiting,
            running: 8,
            kv_usage: kv,
            prefill_backlog_tokens: backlog,
        }
    }

    #[test]
    fn room_is_the_free_engine_queue_of_unsaturated_pods() {
        let cfg = RoomConfig::default();
        assert_eq!(pod(0, 0.5, 0).room(&cfg), 2);
        assert_eq!(pod(1, 0.5, 0).room(&cfg), 1);
        assert_eq!(pod(5, 0.5, 0).room(&cfg), 0);
        assert_eq!(pod(0, 0.95, 0).room(&cfg), 0, "KV nearly full");
        assert_eq!(pod(0, 0.5, 20_000).room(&cfg), 0, "prefill backlog");
        assert_eq!(PodLoad::default().room(&cfg), 0, "stale fails closed");
        assert_eq!(
            pool_room(&[pod(0, 0.1, 0), pod(1, 0.1, 0), pod(0, 0.99, 0)], &cfg),
            3
        );
        assert_eq!(pool_room(&[], &cfg), 0);
    }

    #[test]
    fn views_count_requests_sent_since_the_scrape_as_waiting() {
        let cfg = RoomConfig::default();
        let mut v = EndpointView {
            index: 0,
            role: Role::Both,
            available: true,
            in_flight: 9,
            in_flight_tokens: 0,
            prefill_tokens: 100,
            scraped: Some(ScrapedLoad {
                waiting: 0,
                running: 8,
                kv_usage: 0.3,
                age_ms: 50,
            }),
        };
        let p = PodLoad::from_view(&v, &cfg);
        assert_eq!(
            (p.waiting, p.running, p.prefill_backlog_tokens),
            (1, 8, 100)
        );
        assert_eq!(p.room(&cfg), 1);
        v.available = false;
        assert!(!PodLoad::from_view(&v, &cfg).fresh);
        v.available = true;
        v.scraped = Some(ScrapedLoad {
            waiting: 0,
            running: 0,
            kv_usage: 0.0,
            age_ms: 5_000,
        });
        assert!(!PodLoad::from_view(&v, &cfg).fresh, "stale scrape");
    }
}
