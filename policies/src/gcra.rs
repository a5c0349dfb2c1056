//! GCRA, the generic cell rate algorithm: one timestamp per limited key (its theoretical arrival time, TAT), exact
//! and smooth, for request (RPM) and token (TPM) limits. A limit of `r` per period `P` has emission interval
//! `T = P / r`; a burst capacity of `C` (cost admitted back-to-back from idle) gives tolerance `tau = C * T`.
//! For a cost `n`:
//!
//! ```text
//! tat = max(stored or now, now);  new_tat = tat + n*T
//! new_tat - now <= tau: admit, store new_tat;  remaining = floor((tau - (new_tat - now)) / T);  reset = new_tat - now
//! otherwise: deny, nothing stored;  retry_after = new_tat - tau - now
//! n*T > tau: the cost can never pass (too large, not retryable)
//! ```
//!
//! Settling a reservation refunds the unused part: `tat -= unused * T`, never below `now`.
//!
//! Hand-written rather than `governor`: the same arithmetic has to run in a Redis script for limits shared between
//! replicas (see `admission`), reservations are refunded on settlement, and time is an argument here (a `Duration`
//! since the caller's epoch; Redis passes its own `TIME`), none of which `governor`'s cell-state API offers.

use std::time::Duration;

/// A validated limit: emission interval and tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// `T`: time one unit of cost occupies.
    pub interval: Duration,
    /// `tau = C * T`: how far ahead of `now` the TAT may run.
    pub tolerance: Duration,
    /// The limit per period, for `x-ratelimit-limit-*`.
    pub limit: u64,
}

impl Rate {
    /// `limit` per `period`, `burst` units admitted back-to-back from idle. `None` if any is zero or the interval
    /// would be below one nanosecond.
    pub fn new(limit: u64, period: Duration, burst: u64) -> Option<Self> {
        if limit == 0 || burst == 0 {
            return None;
        }
        let interval =
            Duration::from_nanos(u64::try_from(period.as_nanos() / u128::from(limit)).ok()?);
        if interval.is_zero() {
            return None;
        }
        Some(Self {
            interval,
            tolerance: times(interval, burst),
            limit,
        })
    }

    /// `limit` per minute with a burst of one minute's worth (OpenAI's RPM / TPM semantics: a fresh key may spend
    /// its whole limit at once, then refills smoothly).
    pub fn per_minute(limit: u64) -> Option<Self> {
        Self::new(limit, Duration::from_secs(60), limit)
    }
}

/// What [`check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted: store `tat`.
    Allow {
        /// The new TAT to store.
        tat: Duration,
        /// Units still admissible now.
        remaining: u64,
        /// Until the key is back to its full burst.
        reset_after: Duration,
    },
    /// Denied; nothing changes.
    Deny {
        /// The earliest moment the same cost would pass.
        retry_after: Duration,
        /// Until the key is back to its full burst.
        reset_after: Duration,
    },
    /// The cost exceeds the burst: it can never pass.
    TooLarge,
}

/// `d * n`, saturating.
fn times(d: Duration, n: u64) -> Duration {
    let nanos = d.as_nanos().saturating_mul(u128::from(n));
    u64::try_from(nanos).map_or(Duration::MAX, Duration::from_nanos)
}

/// Decides a request of `cost` units at `now` against the stored TAT.
pub fn check(rate: &Rate, stored: Option<Duration>, now: Duration, cost: u64) -> Verdict {
    let inc = times(rate.interval, cost);
    if inc > rate.tolerance {
        return Verdict::TooLarge;
    }
    let tat = stored.map_or(now, |t| t.max(now));
    let new_tat = tat.saturating_add(inc);
    let ahead = new_tat - now;
    if ahead <= rate.tolerance {
        let left = rate.tolerance - ahead;
        Verdict::Allow {
            tat: new_tat,
            remaining: u64::try_from(left.as_nanos() / rate.interval.as_nanos())
                .unwrap_or(u64::MAX),
            reset_after: ahead,
        }
    } else {
        Verdict::Deny {
            retry_after: ahead - rate.tolerance,
            reset_after: tat - now,
        }
    }
}

/// Units admissible at `now` without changing anything (for `x-ratelimit-remaining-*` on other responses).
pub fn remaining(rate: &Rate, stored: Option<Duration>, now: Duration) -> u64 {
    let ahead = stored.map_or(Duration::ZERO, |t| t.saturating_sub(now));
    let left = rate.tolerance.saturating_sub(ahead);
    u64::try_from(left.as_nanos() / rate.interval.as_nanos()).unwrap_or(u64::MAX)
}

/// The TAT after refunding `unused` units of a reservation at `now` (never earlier than `now`).
pub fn refund(rate: &Rate, tat: Duration, now: Duration, unused: u64) -> Duration {
    tat.saturating_sub(times(rate.interval, unused)).max(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_fresh_key_spends_its_burst_then_waits_one_interval() {
        let r = Rate::per_minute(60).unwrap(); // T = 1s, burst 60
        let mut tat = None;
        for i in 0..60 {
            match check(&r, tat, Duration::ZERO, 1) {
                Verdict::Allow {
                    tat: t,
                    remaining,
                    reset_after,
                } => {
                    assert_eq!(remaining, 59 - i);
                    assert_eq!(reset_after, S * (i as u32 + 1));
                    tat = Some(t);
                }
                v => panic!("request {i}: {v:?}"),
            }
        }
        assert_eq!(
            check(&r, tat, Duration::ZERO, 1),
            Verdict::Deny {
                retry_after: S,
                reset_after: 60 * S
            }
        );
        // One interval later one more passes.
        assert!(matches!(
            check(&r, tat, S, 1),
            Verdict::Allow { remaining: 0, .. }
        ));
    }

    #[test]
    fn a_cost_above_the_burst_is_too_large_not_retryable() {
        let r = Rate::per_minute(1000).unwrap();
        assert_eq!(check(&r, None, Duration::ZERO, 1001), Verdict::TooLarge);
        assert!(matches!(
            check(&r, None, Duration::ZERO, 1000),
            Verdict::Allow { remaining: 0, .. }
        ));
    }

    #[test]
    fn a_denial_names_when_the_cost_fits() {
        let r = Rate::per_minute(600).unwrap(); // T = 100ms
        let Verdict::Allow { tat, .. } = check(&r, None, Duration::ZERO, 600) else {
            panic!()
        };
        let Verdict::Deny { retry_after, .. } = check(&r, Some(tat), Duration::ZERO, 50) else {
            panic!()
        };
        assert_eq!(retry_after, 5 * S);
        assert!(matches!(
            check(&r, Some(tat), retry_after, 50),
            Verdict::Allow { .. }
        ));
        assert!(matches!(
            check(&r, Some(tat), retry_after - Duration::from_millis(1), 50),
            Verdict::Deny { .. }
        ));
    }

    #[test]
    fn refunds_return_unused_reservation_but_not_past_now() {
        let r = Rate::per_minute(600).unwrap();
        let Verdict::Allow { tat, .. } = check(&r, None, Duration::ZERO, 500) else {
            panic!()
        };
        assert_eq!(remaining(&r, Some(tat), Duration::ZERO), 100);
        let tat = refund(&r, tat, Duration::ZERO, 300); // used 200 of 500
        assert_eq!(remaining(&r, Some(tat), Duration::ZERO), 400);
        assert_eq!(refund(&r, tat, 10 * S, 10_000), 10 * S);
        assert_eq!(remaining(&r, None, Duration::ZERO), 600);
    }

    #[test]
    fn zero_limits_are_invalid() {
        assert_eq!(Rate::per_minute(0), None);
        assert_eq!(Rate::new(5, S, 0), None);
        assert_eq!(Rate::new(u64::MAX, Duration::from_nanos(1), 1), None);
    }

    proptest! {
        /// GCRA never admits more than the burst plus elapsed / T.
        #[test]
        fn never_admits_more_than_burst_plus_elapsed(
            limit in 1u64..5_000,
            events in proptest::collection::vec((0u64..2_000, 1u64..200), 1..300),
        ) {
            let r = Rate::per_minute(limit).unwrap();
            let (mut now, mut tat, mut admitted) = (Duration::ZERO, None, 0u128);
            for (dt_ms, cost) in events {
                now += Duration::from_millis(dt_ms);
                if let Verdict::Allow { tat: t, .. } = check(&r, tat, now, cost) {
                    tat = Some(t);
                    admitted += u128::from(cost);
                }
                let bound = u128::from(limit) + now.as_nanos() / r.interval.as_nanos();
                prop_assert!(admitted <= bound, "{admitted} > {bound}");
            }
        }
    }
}
