//! Per-endpoint circuit breaker: a pure state machine with `now` passed in.
//!
//! Closed -> (N consecutive failures) -> Open for `base * 2^(ejections-1)` capped at `max` -> after that, the next
//! request is let through as the single half-open probe -> success closes (and resets the backoff), failure re-opens
//! with the next, doubled, ejection. Requests that end without a verdict (client gone) release the probe slot.
//! Thresholds follow Envoy's outlier detection (5 consecutive failures) with exponential rather than linear ejection.

use std::time::{Duration, Instant};

/// Breaker thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// First ejection length; each failed probe doubles it.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(120),
        }
    }
}

/// Externally visible state, for metrics (`0` closed, `1` open, `2` half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// One endpoint's breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    /// Thresholds.
    cfg: BreakerConfig,
    /// Failures since the last success, while closed.
    consecutive_failures: u32,
    /// Ejections since the breaker last closed; sets the backoff exponent.
    ejections: u32,
    /// End of the current ejection while open.
    open_until: Option<Instant>,
    /// True while half-open with the probe request outstanding.
    probe_out: bool,
    /// Current state.
    state: BreakerState,
}

impl CircuitBreaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            consecutive_failures: 0,
            ejections: 0,
            open_until: None,
            probe_out: false,
            state: BreakerState::Closed,
        }
    }

    /// State as of `now` (an expired ejection reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match (self.state, self.open_until) {
            (BreakerState::Open, Some(until)) if now >= until => BreakerState::HalfOpen,
            (s, _) => s,
        }
    }

    /// Whether a request could be sent now, without claiming anything (for building endpoint views).
    pub fn is_available(&self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => !self.probe_out,
        }
    }

    /// Claims the right to send one request now; in half-open this takes the single probe slot.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => {
                self.state = BreakerState::HalfOpen;
                self.open_until = None;
                if self.probe_out {
                    false
                } else {
                    self.probe_out = true;
                    true
                }
            }
        }
    }

    /// A request succeeded (the backend answered without a server-side failure).
    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        if self.state == BreakerState::HalfOpen {
            self.state = BreakerState::Closed;
            self.ejections = 0;
            self.probe_out = false;
        }
    }

    /// A request failed (connect error, timeout, 5xx, broken stream). Returns true if this opened the breaker.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => {
                self.consecutive_failures += 1;
                if self.consecutive_failures >= self.cfg.failure_threshold {
                    self.open(now);
                    return true;
                }
                false
            }
            BreakerState::HalfOpen => {
                self.open(now);
                true
            }
            BreakerState::Open => false,
        }
    }

    /// A request ended without a verdict (client went away): frees the half-open probe slot.
    pub fn on_abandoned(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probe_out = false;
        }
    }

    /// Time left in the current ejection, if open.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        match (self.state, self.open_until) {
            (BreakerState::Open, Some(until)) if now < until => Some(until - now),
            _ => None,
        }
    }

    /// Length of the ejection that the next opening would use.
    pub fn next_ejection(&self) -> Duration {
        let factor = 1u32.checked_shl(self.ejections.min(31)).unwrap_or(u32::MAX);
        self.cfg
            .base_ejection
            .saturating_mul(factor)
            .min(self.cfg.max_ejection)
    }

    fn open(&mut self, now: Instant) {
        // An ejection past the end of `Instant` (absurd config) saturates to one year rather than panicking.
        let until = now
            .checked_add(self.next_ejection())
            .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
            .unwrap_or(now);
        self.open_until = Some(until);
        self.ejections = self.ejections.saturating_add(1);
        self.state = BreakerState::Open;
        self.probe_out = false;
        self.consecutive_failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::now as t0;
    use proptest::prelude::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t = t0();
        let mut b = CircuitBreaker::new(cfg());
        b.on_failure(t);
        b.on_failure(t);
        b.on_success();
        b.on_failure(t);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Closed);
        assert!(b.on_failure(t));
        assert_eq!(b.state(t), BreakerState::Open);
        assert!(!b.try_acquire(t + Duration::from_millis(999)));
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through_and_success_closes() {
        let t = t0();
        let mut b = CircuitBreaker::new(cfg());
        for _ in 0..3 {
            b.on_failure(t);
        }
        let later = t + Duration::from_secs(1);
        assert!(b.is_available(later));
        assert!(b.try_acquire(later));
        assert!(!b.try_acquire(later));
        assert!(!b.is_available(later));
        b.on_success();
        assert_eq!(b.state(later), BreakerState::Closed);
        assert!(b.try_acquire(later));
    }

    #[test]
    fn failed_probes_back_off_exponentially_up_to_the_cap() {
        let mut t = t0();
        let mut b = CircuitBreaker::new(cfg());
        for _ in 0..3 {
            b.on_failure(t);
        }
        let mut seen = vec![];
        for _ in 0..5 {
            seen.push(b.next_ejection());
            // Wait out the current ejection, probe, fail.
            t += Duration::from_secs(10);
            assert!(b.try_acquire(t));
            b.on_failure(t);
        }
        let secs: Vec<u64> = seen.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![2, 4, 5, 5, 5]);
    }

    #[test]
    fn abandoned_probe_frees_the_slot() {
        let t = t0();
        let mut b = CircuitBreaker::new(cfg());
        for _ in 0..3 {
            b.on_failure(t);
        }
        let later = t + Duration::from_secs(2);
        assert!(b.try_acquire(later));
        b.on_abandoned();
        assert!(b.try_acquire(later));
    }

    proptest! {
        #[test]
        fn open_breaker_never_admits_before_its_ejection_ends(events in proptest::collection::vec(0u8..3, 0..60)) {
            let mut t = t0();
            let mut b = CircuitBreaker::new(cfg());
            for e in events {
                t += Duration::from_millis(300);
                let open_until = b.open_until.filter(|_| b.state == BreakerState::Open);
                let admitted = b.try_acquire(t);
                if open_until.is_some_and(|until| t < until) {
                    prop_assert!(!admitted);
                }
                if admitted {
                    match e {
                        0 => b.on_success(),
                        1 => { b.on_failure(t); }
                        _ => b.on_abandoned(),
                    }
                }
            }
        }
    }
}
