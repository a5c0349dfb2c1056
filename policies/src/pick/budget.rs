//! Retry budget: retries may add at most a fraction of the active load, with a small floor (Envoy's retry budget:
//! 20% of active requests, minimum 3 concurrent retries), so a failing fleet is not hit by a retry storm.

/// Budget parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// Fraction of active requests that may be retries at once.
    pub ratio: f64,
    /// Concurrent retries always allowed, however little traffic there is.
    pub min_concurrent: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_concurrent: 3,
        }
    }
}

impl RetryBudget {
    /// Whether one more retry may start while `active_requests` are in flight and `active_retries` of them are
    /// already retrying.
    pub fn allows(&self, active_requests: u64, active_retries: u64) -> bool {
        let cap = (self.ratio * active_requests as f64)
            .floor()
            .max(f64::from(self.min_concurrent));
        (active_retries as f64) < cap
    }
}

/// Backoff before retry number `retry` (1 = first retry): full jitter over `base * 2^(retry-1)`, capped at
/// `10 * base` (Envoy: 25 ms base, 10x max). `u` is a uniform draw in `[0, 1)` passed in by the caller.
pub fn backoff(retry: u32, base: std::time::Duration, u: f64) -> std::time::Duration {
    let exp = 1u32 << retry.saturating_sub(1).min(16);
    let ceiling = base.saturating_mul(exp).min(base.saturating_mul(10));
    ceiling.mul_f64(u.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn floor_allows_three_retries_when_idle() {
        let b = RetryBudget::default();
        assert!(b.allows(1, 0));
        assert!(b.allows(1, 2));
        assert!(!b.allows(1, 3));
    }

    #[test]
    fn ratio_governs_under_load() {
        let b = RetryBudget::default();
        assert!(b.allows(100, 19));
        assert!(!b.allows(100, 20));
    }

    #[test]
    fn backoff_doubles_then_caps_at_ten_times_base() {
        let base = std::time::Duration::from_millis(25);
        let full: Vec<u128> = (1..=6).map(|r| backoff(r, base, 1.0).as_millis()).collect();
        assert_eq!(full, vec![25, 50, 100, 200, 250, 250]);
        assert_eq!(backoff(3, base, 0.0), std::time::Duration::ZERO);
    }

    proptest! {
        #[test]
        fn never_exceeds_the_larger_of_ratio_and_floor(active in 0u64..100_000, retries in 0u64..100_000) {
            let b = RetryBudget::default();
            if b.allows(active, retries) {
                prop_assert!(retries < 3 || (retries as f64) < 0.2 * active as f64);
            }
        }
    }
}
