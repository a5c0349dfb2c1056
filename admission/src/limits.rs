//! Per-tenant velocity and concurrency limits, in process: RPM and TPM by GCRA ([`policies::gcra`], the decisions),
//! concurrency by a counter. A request reserves one request, `prompt + max_tokens` tokens and one in-flight place at
//! once, or nothing (all-or-nothing); the [`Reservation`] it gets is settled with the real usage (the unused tokens
//! are refunded, an overrun is charged), and dropped unsettled (the request never ran) it refunds everything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use policies::gcra::{self, Rate, Verdict};
use policies::tenant::Limits;

use crate::shared::{Decision, Shared};
use crate::{Reject, RejectReason};

fn too_large(tenant: &str, tokens: u64, limit: u64) -> Reject {
    Reject::new(
        RejectReason::TooManyTokens,
        None,
        format!(
            "This request needs {tokens} tokens (prompt + max_tokens), more than tenant `{tenant}`'s limit of \
             {limit} tokens per minute."
        ),
    )
}

fn denied(tenant: &str, requests: bool, limit: u64, need: u64, retry: Duration) -> Reject {
    let (kind, reason) = if requests {
        ("requests", RejectReason::RequestLimit)
    } else {
        ("tokens", RejectReason::TokenLimit)
    };
    Reject::new(
        reason,
        Some(retry),
        format!(
            "Rate limit reached for tenant `{tenant}` on {kind} per min (RPM/TPM): Limit {limit}, Requested {need}. \
             Please try again in {}ms.",
            retry.as_millis()
        ),
    )
}

/// One tenant's limiter state.
#[derive(Debug, Default, Clone, Copy)]
struct KeyState {
    /// Theoretical arrival time of the RPM limit.
    rpm: Option<Duration>,
    /// Theoretical arrival time of the TPM limit.
    tpm: Option<Duration>,
    /// Requests holding a reservation.
    in_flight: u32,
}

/// One limit's state as OpenAI reports it in `x-ratelimit-*-requests` / `-tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    /// The limit per minute.
    pub limit: u64,
    /// What may still be spent now.
    pub remaining: u64,
    /// Until the limit is fully replenished.
    pub reset: Duration,
}

/// The request and token limit states after a decision (`None`: that limit is not set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    /// RPM.
    pub requests: Option<LimitState>,
    /// TPM.
    pub tokens: Option<LimitState>,
}

/// The in-process limiter of every tenant.
#[derive(Debug)]
pub struct Limiter {
    /// Origin of the GCRA clock.
    epoch: Instant,
    keys: Mutex<HashMap<Arc<str>, KeyState>>,
}

impl Limiter {
    /// A limiter whose clock starts at `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn since(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.epoch)
    }

    /// Reserves one request and `tokens` for `tenant` under `limits` at `now`, or rejects (429 with the wait; a
    /// token cost above the whole TPM is `request_too_large`). The rejection carries the limit states too.
    pub fn reserve(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        limits: &Limits,
        tokens: u64,
        now: Instant,
    ) -> Result<Reservation, Reject> {
        let t = self.since(now);
        let rpm = limits
            .rpm
            .and_then(|r| Rate::per_minute(u64::from(r.get())));
        let tpm = limits.tpm.and_then(|r| Rate::per_minute(r.get()));
        let mut keys = self.keys.lock();
        let st = keys.entry(tenant.clone()).or_default();
        let rv = rpm.map(|r| (r, gcra::check(&r, st.rpm, t, 1)));
        let tv = tpm.map(|r| (r, gcra::check(&r, st.tpm, t, tokens)));
        let state = |rate: &Rate, stored: Option<Duration>| LimitState {
            limit: rate.limit,
            remaining: gcra::remaining(rate, stored, t),
            reset: stored.map_or(Duration::ZERO, |s| s.saturating_sub(t)),
        };
        let current = RateHeaders {
            requests: rpm.map(|r| state(&r, st.rpm)),
            tokens: tpm.map(|r| state(&r, st.tpm)),
        };
        if let Some((r, Verdict::TooLarge)) = tv {
            return Err(too_large(tenant, tokens, r.limit).with_rate(current));
        }
        if let Some((r, Verdict::Deny { retry_after, .. })) = rv {
            return Err(denied(tenant, true, r.limit, 1, retry_after).with_rate(current));
        }
        if let Some((r, Verdict::Deny { retry_after, .. })) = tv {
            return Err(denied(tenant, false, r.limit, tokens, retry_after).with_rate(current));
        }
        if let Some(c) = limits.concurrency
            && st.in_flight >= c.get()
        {
            let reject = Reject::new(
                RejectReason::ConcurrencyLimit,
                Some(Duration::from_secs(1)),
                format!(
                    "Tenant `{tenant}` has {} requests in flight, its limit.",
                    c.get()
                ),
            );
            return Err(reject.with_rate(current));
        }
        let mut headers = RateHeaders::default();
        if let Some((
            r,
            Verdict::Allow {
                tat,
                remaining,
                reset_after,
            },
        )) = rv
        {
            st.rpm = Some(tat);
            headers.requests = Some(LimitState {
                limit: r.limit,
                remaining,
                reset: reset_after,
            });
        }
        if let Some((
            r,
            Verdict::Allow {
                tat,
                remaining,
                reset_after,
            },
        )) = tv
        {
            st.tpm = Some(tat);
            headers.tokens = Some(LimitState {
                limit: r.limit,
                remaining,
                reset: reset_after,
            });
        }
        st.in_flight += 1;
        Ok(Reservation {
            limiter: self.clone(),
            tenant: tenant.clone(),
            rpm,
            tpm,
            tokens,
            headers,
            shared: None,
            settled: false,
        })
    }

    /// [`Self::reserve`], with RPM and TPM decided by the shared limiter when there is one and it answers (the
    /// concurrency limit stays local); otherwise (fail open) by this local one, counted in `fail_open` and logged.
    pub async fn reserve_any(
        self: &Arc<Self>,
        shared: Option<&Arc<Shared>>,
        fail_open: &prometheus_client::metrics::counter::Counter,
        tenant: &Arc<str>,
        limits: &Limits,
        tokens: u64,
        now: Instant,
    ) -> Result<Reservation, Reject> {
        let (Some(sh), true) = (shared, limits.rpm.is_some() || limits.tpm.is_some()) else {
            return self.reserve(tenant, limits, tokens, now);
        };
        if !sh.usable(now) {
            fail_open.inc();
            return self.reserve(tenant, limits, tokens, now);
        }
        let rpm = limits
            .rpm
            .and_then(|r| Rate::per_minute(u64::from(r.get())));
        let tpm = limits.tpm.and_then(|r| Rate::per_minute(r.get()));
        let decision = match sh
            .reserve(tenant, rpm.as_ref(), tpm.as_ref(), tokens, now)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                fail_open.inc();
                tracing::warn!(%tenant, error = %e, "shared rate limits unavailable; using local limits");
                return self.reserve(tenant, limits, tokens, now);
            }
        };
        match decision {
            Decision::Allowed(rate) => {
                let local = Limits {
                    rpm: None,
                    tpm: None,
                    concurrency: limits.concurrency,
                };
                match self.reserve(tenant, &local, tokens, now) {
                    Ok(mut r) => {
                        r.headers = rate;
                        r.shared = Some(SharedPart {
                            shared: sh.clone(),
                            rpm,
                            tpm,
                        });
                        Ok(r)
                    }
                    Err(reject) => {
                        // Over the concurrency limit: give the shared charge back.
                        if let Some(r) = rpm {
                            sh.settle(tenant.clone(), "rpm", r, 1);
                        }
                        if let Some(r) = tpm {
                            sh.settle(
                                tenant.clone(),
                                "tpm",
                                r,
                                i64::try_from(tokens).unwrap_or(i64::MAX),
                            );
                        }
                        Err(reject.with_rate(rate))
                    }
                }
            }
            Decision::Denied {
                requests,
                retry_after,
                rate,
            } => {
                let (limit, need) = if requests {
                    (rpm.map_or(0, |r| r.limit), 1)
                } else {
                    (tpm.map_or(0, |r| r.limit), tokens)
                };
                Err(denied(tenant, requests, limit, need, retry_after).with_rate(rate))
            }
            Decision::TooLarge(rate) => {
                Err(too_large(tenant, tokens, tpm.map_or(0, |r| r.limit)).with_rate(rate))
            }
        }
    }

    /// Requests of `tenant` holding a reservation.
    pub fn in_flight(&self, tenant: &str) -> u32 {
        self.keys.lock().get(tenant).map_or(0, |s| s.in_flight)
    }

    /// Tokens `tenant` may still spend at `now` under a TPM of `tpm` per minute.
    pub fn remaining_tokens(&self, tenant: &str, tpm: u64, now: Instant) -> u64 {
        let Some(rate) = Rate::per_minute(tpm) else {
            return 0;
        };
        let stored = self.keys.lock().get(tenant).and_then(|s| s.tpm);
        gcra::remaining(&rate, stored, self.since(now))
    }
}

/// One request's share of its tenant's limits; see the module doc.
#[derive(Debug)]
pub struct Reservation {
    limiter: Arc<Limiter>,
    tenant: Arc<str>,
    rpm: Option<Rate>,
    tpm: Option<Rate>,
    /// Tokens reserved.
    tokens: u64,
    /// Limit states right after the reservation (response headers).
    pub headers: RateHeaders,
    /// The shared limiter that charged RPM / TPM, if it did.
    shared: Option<SharedPart>,
    settled: bool,
}

/// What a reservation charged in Redis.
#[derive(Debug)]
struct SharedPart {
    shared: Arc<Shared>,
    rpm: Option<Rate>,
    tpm: Option<Rate>,
}

impl Reservation {
    /// The request ran and used `used` tokens (`None`: unknown, the reservation stands): refunds the unused
    /// tokens or charges the overrun, and frees the in-flight place.
    pub fn settle(mut self, used: Option<u64>, now: Instant) {
        self.release(used, false, now);
    }

    fn release(&mut self, used: Option<u64>, never_ran: bool, now: Instant) {
        if self.settled {
            return;
        }
        self.settled = true;
        if let Some(sp) = &self.shared {
            if never_ran && let Some(r) = sp.rpm {
                sp.shared.settle(self.tenant.clone(), "rpm", r, 1);
            }
            let used = if never_ran { Some(0) } else { used };
            if let (Some(r), Some(used)) = (sp.tpm, used) {
                let units = i128::from(self.tokens) - i128::from(used);
                let units =
                    i64::try_from(units).unwrap_or(if units > 0 { i64::MAX } else { i64::MIN });
                sp.shared.settle(self.tenant.clone(), "tpm", r, units);
            }
        }
        let t = self.limiter.since(now);
        let mut keys = self.limiter.keys.lock();
        let Some(st) = keys.get_mut(&self.tenant) else {
            return;
        };
        st.in_flight = st.in_flight.saturating_sub(1);
        if never_ran && let (Some(r), Some(tat)) = (self.rpm, st.rpm) {
            st.rpm = Some(gcra::refund(&r, tat, t, 1));
        }
        let used = if never_ran { Some(0) } else { used };
        if let (Some(r), Some(tat), Some(used)) = (self.tpm, st.tpm, used) {
            st.tpm = Some(if used <= self.tokens {
                gcra::refund(&r, tat, t, self.tokens - used)
            } else {
                // Post-charge what the reservation did not cover.
                tat.max(t)
                    + r.interval
                        .saturating_mul(u32::try_from(used - self.tokens).unwrap_or(u32::MAX))
            });
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Unsettled: the request was never dispatched (shed while queued, client gone): nothing was spent.
        self.release(None, true, tokio::time::Instant::now().into_std());
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroU64};

    use super::*;

    fn limits(rpm: Option<u32>, tpm: Option<u64>, conc: Option<u32>) -> Limits {
        Limits {
            rpm: rpm.and_then(NonZeroU32::new),
            tpm: tpm.and_then(NonZeroU64::new),
            concurrency: conc.and_then(NonZeroU32::new),
        }
    }

    #[test]
    fn tokens_are_reserved_then_settled_with_real_usage() {
        let t0 = tokio::time::Instant::now().into_std() + Duration::from_secs(1);
        let l = Arc::new(Limiter::new(t0));
        let a: Arc<str> = Arc::from("a");
        let lim = limits(None, Some(1000), None);
        let r = l.reserve(&a, &lim, 600, t0).unwrap();
        assert_eq!(r.headers.tokens.unwrap().remaining, 400);
        let rej = l.reserve(&a, &lim, 600, t0).unwrap_err();
        assert_eq!(rej.reason, RejectReason::TokenLimit);
        assert!(rej.retry_after.unwrap() > Duration::ZERO);
        r.settle(Some(100), t0);
        assert_eq!(l.remaining_tokens("a", 1000, t0), 900);
        let rej = l.reserve(&a, &lim, 1001, t0).unwrap_err();
        assert_eq!(
            (rej.reason, rej.retry_after),
            (RejectReason::TooManyTokens, None)
        );
    }

    #[test]
    fn rpm_and_concurrency_hold_and_a_dropped_reservation_refunds() {
        let t0 = tokio::time::Instant::now().into_std() + Duration::from_secs(1);
        let l = Arc::new(Limiter::new(t0));
        let a: Arc<str> = Arc::from("a");
        let lim = limits(Some(2), None, Some(1));
        let r1 = l.reserve(&a, &lim, 10, t0).unwrap();
        assert_eq!(r1.headers.requests.unwrap().remaining, 1);
        let rej = l.reserve(&a, &lim, 10, t0).unwrap_err();
        assert_eq!(rej.reason, RejectReason::ConcurrencyLimit);
        drop(r1); // never ran: the request and the place come back
        assert_eq!(l.in_flight("a"), 0);
        let r2 = l.reserve(&a, &lim, 10, t0).unwrap();
        r2.settle(None, t0);
        let r3 = l.reserve(&a, &lim, 10, t0).unwrap();
        r3.settle(None, t0);
        let rej = l.reserve(&a, &lim, 10, t0).unwrap_err();
        assert_eq!(rej.reason, RejectReason::RequestLimit);
        assert_eq!(rej.rate.unwrap().requests.unwrap().remaining, 0);
    }
}
