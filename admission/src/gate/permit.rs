//! The permit of an admitted request, and its settlement: the slot back to the pool, the limiter's reservation
//! settled with the real usage, the ledger and the end metrics, once.

use std::sync::Arc;
use std::time::Duration;

use policies::fair::{Grant, RequestId};
use policies::tenant::Tier;

use super::{Inner, Outcome, Pool, Usage};
use crate::ledger::Key;
use crate::limits::{RateHeaders, Reservation};
use crate::metrics::{EndLabels, TokenLabels};

/// Permission to dispatch one request. Settle it with [`Permit::complete`], [`Permit::fail`] or
/// [`Permit::cancel`]; dropping it unsettled counts as cancelled (with no token counts). Either way its slot goes
/// back to the pool and the next waiter is dispatched.
#[derive(Debug)]
pub struct Permit {
    /// Tenant.
    pub tenant: Arc<str>,
    /// Tier it was scheduled in.
    pub tier: Tier,
    /// Model.
    pub model: Arc<str>,
    /// Pool.
    pub pool: Arc<str>,
    /// Admission's id of the request.
    pub request_id: RequestId,
    /// Time spent queued.
    pub queued_for: Duration,
    /// The tenant's limit states after this request's reservation (`x-ratelimit-*` headers).
    pub rate: RateHeaders,
    /// Its share of the tenant's limits, settled with the real usage.
    pub(super) reservation: Option<Reservation>,
    pub(super) grant: Grant,
    pub(super) pool_ref: Arc<Pool>,
    pub(super) inner: Arc<Inner>,
    pub(super) key: Key,
    pub(super) label: String,
    pub(super) settled: bool,
}

impl Permit {
    /// The request completed with this usage.
    pub fn complete(mut self, usage: Usage) {
        self.settle(Outcome::Completed, Some(usage));
    }

    /// The request failed (upstream error) after using this much.
    pub fn fail(mut self, usage: Usage) {
        self.settle(Outcome::Failed, Some(usage));
    }

    /// The client went away; the pod reported this usage.
    pub fn cancel(mut self, usage: Usage) {
        self.settle(Outcome::Cancelled, Some(usage));
    }

    fn settle(&mut self, outcome: Outcome, usage: Option<Usage>) {
        if self.settled {
            return;
        }
        self.settled = true;
        {
            let mut st = self.pool_ref.state.lock();
            // Without real usage the estimated charge stands.
            if let Some(u) = usage {
                st.sched
                    .settle(&self.grant, u.prompt_tokens, u.completion_tokens);
            }
            st.sched.add_room(1);
            st.dispatch();
        }
        if let Some(r) = self.reservation.take() {
            // Without real usage the reservation stands.
            r.settle(
                usage.map(|u| u.prompt_tokens + u.completion_tokens),
                tokio::time::Instant::now().into_std(),
            );
        }
        let u = usage.unwrap_or_default();
        self.inner.ledger.record(&self.key, |c| {
            match outcome {
                Outcome::Completed => c.completed += 1,
                Outcome::Failed => c.failed += 1,
                Outcome::Cancelled => c.cancelled += 1,
            }
            c.prompt_tokens += u.prompt_tokens;
            c.cached_tokens += u.cached_tokens;
            c.completion_tokens += u.completion_tokens;
            c.gpu_seconds += u.gpu_seconds;
        });
        let m = &self.inner.metrics;
        let tier = self.tier.as_str();
        m.ended
            .get_or_create(&EndLabels {
                tenant: self.label.clone(),
                tier,
                outcome: outcome.as_str(),
            })
            .inc();
        for (kind, n) in [
            ("prompt", u.prompt_tokens),
            ("cached", u.cached_tokens),
            ("completion", u.completion_tokens),
        ] {
            m.tokens
                .get_or_create(&TokenLabels {
                    tenant: self.label.clone(),
                    tier,
                    kind,
                })
                .inc_by(n);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.settle(Outcome::Cancelled, None);
    }
}
