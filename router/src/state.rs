//! Live per-endpoint state shared between the request path, the scraper and discovery rebuilds: the router's own
//! in-flight counts (updated at pick time, so fresher than any scrape), the last scraped engine load, and the
//! circuit breaker. All fields are atomics except the breaker's short critical section.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use policies::endpoint::{EndpointView, Role, ScrapedLoad};
use policies::pick::breaker::{BreakerConfig, BreakerState, CircuitBreaker};

/// One endpoint's live state.
#[derive(Debug)]
pub struct EndpointState {
    /// Requests this router has in flight to the endpoint.
    pub in_flight: AtomicU32,
    /// Estimated tokens (prompt + max output) of those requests.
    pub in_flight_tokens: AtomicU64,
    /// Uncached prompt tokens of those requests still waiting for their first token (see [`PrefillClaim`]).
    pub prefill_tokens: AtomicU64,
    /// Scraped `num_requests_waiting`.
    waiting: AtomicU32,
    /// Scraped `num_requests_running`.
    running: AtomicU32,
    /// Scraped KV usage, as `f64` bits.
    kv_usage_bits: AtomicU64,
    /// When the last successful scrape finished, in ms since the router's epoch plus one (0 = never).
    scraped_at_ms: AtomicU64,
    /// `block_size` from `vllm:cache_config_info` (0 = unknown), for the prefix index to come.
    pub block_size: AtomicU32,
    /// `num_gpu_blocks` from `vllm:cache_config_info` (0 = unknown).
    pub num_gpu_blocks: AtomicU64,
    /// Consecutive scrape failures, for the health gauge.
    pub scrape_failures: AtomicU32,
    /// Circuit breaker over request outcomes.
    breaker: Mutex<CircuitBreaker>,
    /// Backend-429 cooldown: not picked until this many ms since the router's epoch (0 = never cooled). A 429 is
    /// capacity, not failure, so it never touches the breaker.
    cooled_until_ms: AtomicU64,
    /// GPU type from the pod's `weir_gpu_info` series (used when discovery gave no `weir.dev/gpu` label).
    pub scraped_gpu: Mutex<Option<std::sync::Arc<str>>>,
}

/// Scraped values to store.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scrape {
    pub waiting: u32,
    pub running: u32,
    pub kv_usage: f64,
    pub block_size: Option<u32>,
    pub num_gpu_blocks: Option<u64>,
}

impl EndpointState {
    pub fn new(breaker: BreakerConfig) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            in_flight_tokens: AtomicU64::new(0),
            prefill_tokens: AtomicU64::new(0),
            waiting: AtomicU32::new(0),
            running: AtomicU32::new(0),
            kv_usage_bits: AtomicU64::new(0f64.to_bits()),
            scraped_at_ms: AtomicU64::new(0),
            block_size: AtomicU32::new(0),
            num_gpu_blocks: AtomicU64::new(0),
            scrape_failures: AtomicU32::new(0),
            breaker: Mutex::new(CircuitBreaker::new(breaker)),
            cooled_until_ms: AtomicU64::new(0),
            scraped_gpu: Mutex::new(None),
        }
    }

    /// Records a successful scrape finishing at `since_epoch`.
    pub fn record_scrape(&self, s: &Scrape, since_epoch: Duration) {
        self.waiting.store(s.waiting, Ordering::Relaxed);
        self.running.store(s.running, Ordering::Relaxed);
        self.kv_usage_bits
            .store(s.kv_usage.to_bits(), Ordering::Relaxed);
        if let Some(b) = s.block_size {
            self.block_size.store(b, Ordering::Relaxed);
        }
        if let Some(n) = s.num_gpu_blocks {
            self.num_gpu_blocks.store(n, Ordering::Relaxed);
        }
        self.scrape_failures.store(0, Ordering::Relaxed);
        self.scraped_at_ms
            .store(since_epoch.as_millis() as u64 + 1, Ordering::Relaxed);
    }

    pub fn record_scrape_failure(&self) {
        self.scrape_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a scrape ever succeeded (a pod without `/metrics` never is, and is not gated by admission).
    pub fn ever_scraped(&self) -> bool {
        self.scraped_at_ms.load(Ordering::Relaxed) != 0
    }

    /// Last scrape if it is at most `stale_after` old at `since_epoch`.
    pub fn scraped(&self, since_epoch: Duration, stale_after: Duration) -> Option<ScrapedLoad> {
        let at = self.scraped_at_ms.load(Ordering::Relaxed);
        if at == 0 {
            return None;
        }
        let age_ms = (since_epoch.as_millis() as u64).saturating_sub(at - 1);
        if age_ms > stale_after.as_millis() as u64 {
            return None;
        }
        Some(ScrapedLoad {
            waiting: self.waiting.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            kv_usage: f64::from_bits(self.kv_usage_bits.load(Ordering::Relaxed)),
            age_ms,
        })
    }

    /// The picker's view of this endpoint.
    pub fn view(
        &self,
        index: usize,
        role: Role,
        now: Instant,
        since_epoch: Duration,
        stale: Duration,
    ) -> EndpointView {
        EndpointView {
            index,
            role,
            available: !self.cooling(since_epoch) && self.breaker.lock().is_available(now),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            in_flight_tokens: self.in_flight_tokens.load(Ordering::Relaxed),
            prefill_tokens: self.prefill_tokens.load(Ordering::Relaxed),
            scraped: self.scraped(since_epoch, stale),
        }
    }

    /// Keeps the endpoint out of picks for `d` after `since_epoch` (a backend 429's `Retry-After`); never shortens a
    /// cooldown already running.
    pub fn cool(&self, since_epoch: Duration, d: Duration) {
        let until = u64::try_from(since_epoch.saturating_add(d).as_millis()).unwrap_or(u64::MAX);
        self.cooled_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// Whether a backend-429 cooldown is running at `since_epoch`.
    pub fn cooling(&self, since_epoch: Duration) -> bool {
        u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
            < self.cooled_until_ms.load(Ordering::Relaxed)
    }

    /// Claims a request slot through the breaker (takes the half-open probe if that is the state).
    pub fn try_acquire(&self, now: Instant) -> bool {
        self.breaker.lock().try_acquire(now)
    }

    pub fn on_success(&self) {
        self.breaker.lock().on_success();
    }

    /// Returns true when this failure opened the breaker.
    pub fn on_failure(&self, now: Instant) -> bool {
        self.breaker.lock().on_failure(now)
    }

    pub fn on_abandoned(&self) {
        self.breaker.lock().on_abandoned();
    }

    /// Time left in the breaker's ejection, if open.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        self.breaker.lock().retry_after(now)
    }

    pub fn breaker_state(&self, now: Instant) -> BreakerState {
        self.breaker.lock().state(now)
    }
}

/// A request's uncached prompt tokens counted in [`EndpointState::prefill_tokens`] until its first token arrives
/// ([`PrefillClaim::release`]) or the attempt ends (drop), whichever comes first; released exactly once.
#[derive(Debug)]
pub struct PrefillClaim {
    state: Option<std::sync::Arc<EndpointState>>,
    tokens: u64,
}

impl PrefillClaim {
    pub fn new(state: std::sync::Arc<EndpointState>, tokens: u64) -> Self {
        state.prefill_tokens.fetch_add(tokens, Ordering::Relaxed);
        Self {
            state: Some(state),
            tokens,
        }
    }

    /// The first token arrived: the pod's prefill of this request is done.
    pub fn release(&mut self) {
        if let Some(s) = self.state.take() {
            s.prefill_tokens.fetch_sub(self.tokens, Ordering::Relaxed);
        }
    }
}

impl Drop for PrefillClaim {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_429_cools_for_its_retry_after_and_never_shortens() {
        let s = EndpointState::new(BreakerConfig::default());
        let now = tokio::time::Instant::now().into_std();
        let at = |ms| Duration::from_millis(ms);
        let avail = |ms| s.view(0, Role::Both, now, at(ms), at(1000)).available;
        assert!(avail(1000));
        s.cool(at(1000), Duration::from_secs(5));
        assert!(!avail(1000) && !avail(5999));
        s.cool(at(2000), Duration::from_secs(1));
        assert!(
            !avail(5999),
            "a shorter Retry-After must not end the running cooldown"
        );
        assert!(avail(6000));
    }

    #[test]
    fn prefill_claim_releases_once_at_first_token_or_drop() {
        let s = std::sync::Arc::new(EndpointState::new(BreakerConfig::default()));
        let now = tokio::time::Instant::now().into_std();
        let backlog = || {
            s.view(0, Role::Both, now, Duration::ZERO, Duration::ZERO)
                .prefill_tokens
        };
        let mut a = PrefillClaim::new(s.clone(), 1000);
        let b = PrefillClaim::new(s.clone(), 200);
        assert_eq!(backlog(), 1200);
        a.release();
        a.release();
        assert_eq!(backlog(), 200);
        drop(a);
        assert_eq!(backlog(), 200);
        drop(b);
        assert_eq!(backlog(), 0);
    }

    #[test]
    fn scrape_goes_stale() {
        let s = EndpointState::new(BreakerConfig::default());
        assert!(
            s.scraped(Duration::from_secs(1), Duration::from_secs(1))
                .is_none()
        );
        let sc = Scrape {
            waiting: 2,
            running: 3,
            kv_usage: 0.5,
            ..Default::default()
        };
        s.record_scrape(&sc, Duration::from_millis(1000));
        let got = s
            .scraped(Duration::from_millis(1200), Duration::from_secs(1))
            .unwrap();
        assert_eq!(
            (got.waiting, got.running, got.kv_usage, got.age_ms),
            (2, 3, 0.5, 200)
        );
        assert!(
            s.scraped(Duration::from_millis(2500), Duration::from_secs(1))
                .is_none()
        );
    }
}
