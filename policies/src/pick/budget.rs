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
