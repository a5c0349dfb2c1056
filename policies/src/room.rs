//! Dispatch room: how many more requests a pool may take now, from its pods' load.
//!
//! Gating dispatch in weir (instead of sending everything and letting vLLM's FIFO queue it) is what makes tier
//! priorities and fair queuing take effect: a request held here can still be overtaken by a more important one, a
//! request in vLLM's waiting queue cannot. Per pod (qos-and-security.md §3, routing-and-scheduling.md §4), a pod is
//! **saturated** and has no room when:
//!
//! - it has no fresh metrics, or is unavailable (breaker open): fail closed, as GIE's utilization detector does;
//! - its KV cache use is at or above `kv_limit` (0.9): more work would preempt;
//! - its engine queue (scraped `waiting`) is at or above `max_waiting` (2): a new request would wait in vLLM's FIFO,
//!   where nothing can overtake it;
//! - its prefill backlog (uncached prompt tokens this router sent that have not reached their first token) is at or
//!   above `max_prefill_tokens`: a new prompt would wait behind it anyway.
//!
//! An unsaturated pod takes up to `burst` requests per room computation (the caller recomputes every few
//! milliseconds, and every request that ends returns its slot at once), never more than `max_in_flight`
//! outstanding. Scrapes are up to one interval old, so what bounds a burst between scrapes are the router's own
//! fresh counts: requests in flight and the prefill backlog, both updated at every pick. A pod whose requests
//! finish in microseconds (`waiting` 0 at every scrape) is never held back: gating costs nothing until a pod
//! saturates.
//!
//! The pool's room is the sum over its pods. Pure: the caller passes the load snapshot.

use crate::endpoint::EndpointView;

/// Thresholds of the room function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoomConfig {
    /// Engine queue depth (requests waiting in vLLM) at which a pod takes nothing more.
    pub max_waiting: u32,
    /// KV cache use (0..=1) at which a pod takes nothing more.
    pub kv_limit: f64,
    /// Prefill backlog (tokens) at which a pod takes nothing more.
    pub max_prefill_tokens: u64,
    /// Scrapes older than this (milliseconds) are stale.
    pub max_age_ms: u64,
    /// Requests an unsaturated pod may take per room computation.
    pub burst: u32,
    /// Requests outstanding on a pod (the larger of the scrape's running + waiting and this router's in-flight
    /// count) beyond which it takes nothing more (vLLM's default `max_num_seqs` is 256).
    pub max_in_flight: u32,
    /// Requests outstanding on a pod beyond which batch takes nothing more (48): a decode step's time grows with
    /// the batch, and every interactive token waits for those steps.
    pub batch_max_in_flight: u32,
    /// Batch sees a pod saturated this much KV use earlier (0.15: at 0.75 with `kv_limit` 0.9) and with any request
    /// in its engine queue, so a pool that batch keeps full still has room for an interactive or standard arrival.
    pub batch_kv_headroom: f64,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            max_waiting: 2,
            kv_limit: 0.9,
            max_prefill_tokens: 16_384,
            max_age_ms: 1_000,
            burst: 8,
            max_in_flight: 256,
            batch_max_in_flight: 48,
            batch_kv_headroom: 0.15,
        }
    }
}

/// One pod's load, as the room function needs it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PodLoad {
    /// Whether the pod may receive requests (breaker closed) and has fresh metrics.
    pub fresh: bool,
    /// Requests waiting in the engine queue (scraped).
    pub waiting: u32,
    /// Requests outstanding: the larger of the scrape's running + waiting and this router's in-flight count.
    pub outstanding: u32,
    /// KV cache use, 0..=1.
    pub kv_usage: f64,
    /// Uncached prompt tokens sent and not yet at first token.
    pub prefill_backlog_tokens: u64,
    /// KV use the pod's in-flight requests will reach: their prompt + expected output tokens (this router's
    /// count, fresh at every pick) over the pod's KV capacity; 0 when the capacity is unknown. A scrape shows only
    /// what requests hold now, and decoding requests keep growing: gating on it alone lets a pool fill to
    /// preemption.
    pub projected_kv: f64,
}

impl PodLoad {
    /// From the router's endpoint view and the pod's KV capacity in tokens (0 = unknown): scraped queue and KV
    /// use, the router's own in-flight count, tokens and prefill backlog; stale or unavailable endpoints are not
    /// fresh.
    pub fn from_view(v: &EndpointView, kv_capacity_tokens: u64, cfg: &RoomConfig) -> Self {
        match v.scraped {
            Some(s) if v.available && s.age_ms <= cfg.max_age_ms => Self {
                fresh: true,
                waiting: s.waiting,
                outstanding: u32::try_from(v.outstanding()).unwrap_or(u32::MAX),
                kv_usage: s.kv_usage,
                prefill_backlog_tokens: v.prefill_tokens,
                projected_kv: if kv_capacity_tokens == 0 {
                    0.0
                } else {
                    v.in_flight_tokens as f64 / kv_capacity_tokens as f64
                },
            },
            _ => Self::default(),
        }
    }

    /// Whether the pod takes nothing more now.
    pub fn saturated(&self, cfg: &RoomConfig) -> bool {
        !self.fresh
            || self.kv_usage >= cfg.kv_limit
            || self.projected_kv >= cfg.kv_limit
            || self.waiting >= cfg.max_waiting
            || self.prefill_backlog_tokens >= cfg.max_prefill_tokens
    }

    /// Requests this pod may take now.
    pub fn room(&self, cfg: &RoomConfig) -> u32 {
        if self.saturated(cfg) {
            return 0;
        }
        cfg.burst
            .min(cfg.max_in_flight.saturating_sub(self.outstanding))
    }
}

/// Requests the pool may take now: the sum of its pods' room.
pub fn pool_room(pods: &[PodLoad], cfg: &RoomConfig) -> u32 {
    pods.iter()
        .fold(0u32, |acc, p| acc.saturating_add(p.room(cfg)))
}

/// The thresholds batch sees: KV limit lowered by the headroom, no engine queue, fewer requests per pod.
pub fn batch_config(cfg: &RoomConfig) -> RoomConfig {
    RoomConfig {
        kv_limit: (cfg.kv_limit - cfg.batch_kv_headroom).max(0.0),
        max_waiting: 1,
        max_in_flight: cfg.batch_max_in_flight.min(cfg.max_in_flight),
        ..*cfg
    }
}

/// The pool's room and the part of it reserved from batch (for [`crate::fair::Scheduler::set_room_reserved`]).
pub fn pool_room_reserved(pods: &[PodLoad], cfg: &RoomConfig) -> (u32, u32) {
    let all = pool_room(pods, cfg);
    let batch = pool_room(pods, &batch_config(cfg));
    (all, all.saturating_sub(batch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Role, ScrapedLoad};

    fn pod(waiting: u32, kv: f64, backlog: u64) -> PodLoad {
        PodLoad {
            fresh: true,
            waiting,
            outstanding: 8 + waiting,
            kv_usage: kv,
            prefill_backlog_tokens: backlog,
            projected_kv: 0.0,
        }
    }

    #[test]
    fn unsaturated_pods_take_a_burst_and_saturated_ones_nothing() {
        let cfg = RoomConfig::default();
        assert_eq!(pod(0, 0.5, 0).room(&cfg), 8);
        assert_eq!(pod(1, 0.5, 0).room(&cfg), 8);
        assert_eq!(pod(2, 0.5, 0).room(&cfg), 0, "engine queue at the limit");
        assert_eq!(pod(0, 0.95, 0).room(&cfg), 0, "KV nearly full");
        assert_eq!(pod(0, 0.5, 20_000).room(&cfg), 0, "prefill backlog");
        assert_eq!(PodLoad::default().room(&cfg), 0, "stale fails closed");
        let full = PodLoad {
            outstanding: 252,
            ..pod(0, 0.1, 0)
        };
        assert_eq!(full.room(&cfg), 4, "never past max_in_flight");
        assert_eq!(
            pool_room(&[pod(0, 0.1, 0), pod(1, 0.1, 0), pod(0, 0.99, 0)], &cfg),
            16
        );
        assert_eq!(pool_room(&[], &cfg), 0);
    }

    #[test]
    fn batch_is_held_back_first_and_the_difference_is_reserved() {
        let cfg = RoomConfig::default();
        // KV 0.8: room for everyone but batch.
        assert_eq!(pool_room_reserved(&[pod(0, 0.8, 0)], &cfg), (8, 8));
        // A queued request in the engine: batch waits, the others may still add one more.
        assert_eq!(pool_room_reserved(&[pod(1, 0.3, 0)], &cfg), (8, 8));
        assert_eq!(
            pool_room_reserved(&[pod(0, 0.3, 0), pod(0, 0.95, 0)], &cfg),
            (8, 0)
        );
    }

    #[test]
    fn views_give_the_scrape_and_the_routers_own_fresh_counts() {
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
        let p = PodLoad::from_view(&v, 0, &cfg);
        assert_eq!(
            (p.waiting, p.outstanding, p.prefill_backlog_tokens),
            (0, 9, 100)
        );
        assert_eq!(p.room(&cfg), 8);
        // Sends since the scrape raise the prefill backlog at once: past the limit the pod is held back before
        // any scrape shows its queue.
        v.prefill_tokens = 16_384;
        assert_eq!(PodLoad::from_view(&v, 0, &cfg).room(&cfg), 0);
        v.available = false;
        assert!(!PodLoad::from_view(&v, 0, &cfg).fresh);
        v.available = true;
        v.scraped = Some(ScrapedLoad {
            waiting: 0,
            running: 0,
            kv_usage: 0.0,
            age_ms: 5_000,
        });
        assert!(!PodLoad::from_view(&v, 0, &cfg).fresh, "stale scrape");
    }
}
