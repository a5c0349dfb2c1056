//! Admission inside the router (settings: [`crate::config::AdmissionSettings`]): building the [`admission::Admission`], the feed
//! of each pool's dispatch room from the live endpoint state, and the settling of a proxied request's [`Permit`] from
//! how it ended.
//!
//! Room ([`policies::room`]) is what makes priorities take effect in weir rather than in vLLM's FIFO: a request
//! waits in weir's tier queues until its pool has room, so a later interactive request can still go first. A pool
//! none of whose pods was ever scraped (backends without `/metrics`) is not gated: there is nothing to gate on. A
//! pool with no pod at all (scaled to zero, or none discovered yet) has no room: its requests are held in their tier
//! queues (bounded by the tenant's queue size and maximum wait) until discovery adds a pod, which is how a pool scales
//! from zero without losing its first requests.

use std::sync::Arc;
use std::time::Duration;

use admission::{Admission, Permit, Usage};
use arc_swap::ArcSwap;
use policies::endpoint::Role;
use policies::room::{PodLoad, RoomConfig, pool_room_reserved};
use policies::tenant::TenantPolicySpec;

use crate::config::AdmissionSettings;
use crate::snapshot::{EndpointSnapshot, Pool};

/// The admission of a router with these settings, `None` when admission is off. With a ledger file this must run
/// inside a tokio runtime (it starts the ledger's flush task).
pub fn build(
    settings: &AdmissionSettings,
    tenants: &[TenantPolicySpec],
) -> Result<Option<Admission>, admission::Error> {
    if !settings.enabled {
        return Ok(None);
    }
    Admission::from_policies(tenants.to_vec(), settings.config.clone()).map(Some)
}

/// The room of `pool` now and the part of it reserved from batch, `None` when the pool is not gated (it has pods,
/// none of them ever scraped). A pool without pods has no room (`(0, 0)`): its requests wait for one.
pub fn room_of(
    pool: &Pool,
    cfg: &RoomConfig,
    now: std::time::Instant,
    since_epoch: Duration,
    stale_after: Duration,
) -> Option<(u32, u32)> {
    if pool.endpoints.is_empty() {
        return Some((0, 0));
    }
    if !pool.endpoints.iter().any(|e| e.state.ever_scraped()) {
        return None;
    }
    let loads: Vec<PodLoad> = crate::plan::candidates(pool, &[], now, since_epoch, stale_after)
        .iter()
        // Requests are dispatched to decode-capable pods; a prefill pod's work is the decode pod's prefill leg.
        .filter(|v| v.role != Role::Prefill)
        .map(|v| {
            let st = &pool.endpoints[v.index].state;
            let blocks = st.num_gpu_blocks.load(std::sync::atomic::Ordering::Relaxed);
            let block = u64::from(st.block_size.load(std::sync::atomic::Ordering::Relaxed));
            PodLoad::from_view(v, blocks.saturating_mul(block), cfg)
        })
        .collect();
    Some(pool_room_reserved(&loads, cfg))
}

/// Hands every pool's room now to admission. The router calls it once before it serves, so a pool at zero holds
/// even the first request, then [`feed_room`] keeps it current.
pub fn feed_room_once(
    adm: &Admission,
    snap: &EndpointSnapshot,
    cfg: &RoomConfig,
    epoch: tokio::time::Instant,
    stale_after: Duration,
) {
    let now = tokio::time::Instant::now();
    for pool in &snap.pools {
        let room = room_of(
            pool,
            cfg,
            now.into_std(),
            now.duration_since(epoch),
            stale_after,
        );
        let (room, reserve) = room.unwrap_or((u32::MAX, 0));
        adm.set_room_reserved(&pool.name, room, reserve);
    }
}

/// Recomputes every pool's room each `every` and hands it to admission, until the task is dropped.
pub async fn feed_room(
    adm: Admission,
    snapshot: Arc<ArcSwap<EndpointSnapshot>>,
    cfg: RoomConfig,
    every: Duration,
    epoch: tokio::time::Instant,
    stale_after: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        feed_room_once(&adm, &snapshot.load(), &cfg, epoch, stale_after);
    }
}

/// How a proxied request ended, for its permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client got its whole answer.
    Completed,
    /// An error answer, or a stream the model server broke.
    Failed,
    /// The client went away.
    Cancelled,
}

impl End {
    /// A non-streaming answer with this status.
    pub fn of_status(status: u16) -> Self {
        if (200..300).contains(&status) {
            End::Completed
        } else {
            End::Failed
        }
    }
}

/// Settles `permit` with the pod's usage.
pub fn settle(permit: Permit, end: End, usage: Option<crate::sse::Usage>) {
    let u = usage.map_or(Usage::default(), |u| Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        ..Usage::default()
    });
    match end {
        End::Completed => permit.complete(u),
        End::Failed => permit.fail(u),
        End::Cancelled => permit.cancel(u),
    }
}

/// The API key of a request: `Authorization: Bearer <key>` (the scheme case-insensitive, as RFC 9110 has it).
pub fn api_key(headers: &hyper::HeaderMap) -> Option<&str> {
    let v = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = v.trim().split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// A duration as OpenAI writes `x-ratelimit-reset-*`: `12ms`, `1.5s`, `6m0s`.
pub fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 60_000 {
        let s = format!("{:.3}", d.as_secs_f64());
        return format!("{}s", s.trim_end_matches('0').trim_end_matches('.'));
    }
    let secs = d.as_secs();
    if secs < 3600 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else {
        format!("{}h{}m{}s", secs / 3600, secs / 60 % 60, secs % 60)
    }
}

/// Sets `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the limits the tenant has.
pub fn rate_headers(h: &mut hyper::HeaderMap, rate: Option<&admission::RateHeaders>) {
    use hyper::header::{HeaderName, HeaderValue};
    const NAMES: [[&str; 3]; 2] = [
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    ];
    let Some(rate) = rate else { return };
    for (names, state) in NAMES.iter().zip([rate.requests, rate.tokens]) {
        let Some(s) = state else { continue };
        let values = [
            HeaderValue::from(s.limit),
            HeaderValue::from(s.remaining),
            HeaderValue::try_from(reset_text(s.reset)).unwrap_or(HeaderValue::from_static("0ms")),
        ];
        for (name, value) in names.iter().zip(values) {
            h.insert(HeaderName::from_static(name), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper::HeaderMap;
    use hyper::header::{AUTHORIZATION, HeaderValue};

    use super::*;

    #[test]
    fn the_api_key_is_the_bearer_token() {
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(AUTHORIZATION, HeaderValue::from_static(v));
            m
        };
        assert_eq!(api_key(&h("Bearer sk-1")), Some("sk-1"));
        assert_eq!(api_key(&h("bearer  sk-2 ")), Some("sk-2"));
        assert_eq!(api_key(&h("Basic dXNlcg==")), None);
        assert_eq!(api_key(&h("Bearer ")), None);
        assert_eq!(api_key(&HeaderMap::new()), None);
    }

    #[test]
    fn reset_durations_are_written_as_openai_does() {
        assert_eq!(reset_text(Duration::from_millis(12)), "12ms");
        assert_eq!(reset_text(Duration::from_secs(1)), "1s");
        assert_eq!(reset_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset_text(Duration::from_secs(3725)), "1h2m5s");
    }

    #[test]
    fn a_queue_full_rejection_is_a_429_with_retry_after_in_whole_seconds() {
        let r = admission::Reject::new(
            admission::RejectReason::QueueFull,
            Some(Duration::from_millis(1500)),
            "full",
        );
        let e = r.to_api_error();
        assert_eq!(
            (e.status, e.code.as_deref(), e.retry_after),
            (429, Some("queue_full"), Some(2))
        );
        let r = admission::Reject::new(admission::RejectReason::InvalidApiKey, None, "no");
        assert_eq!(
            (r.to_api_error().status, r.to_api_error().retry_after),
            (401, None)
        );
    }
}
