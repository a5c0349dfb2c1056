//! One tier's band: Virtual Token Counter (VTC) fair queuing between tenants.
//!
//! Algorithm (qos-and-security.md §2): one counter per tenant; dispatch pops the head of the backlogged tenant with
//! the smallest counter (ties broken by tenant name, never by hash order) and adds the request's estimated cost
//! divided by the tenant's weight; settlement with real usage adds the difference. When a tenant's queue goes from
//! empty to non-empty its counter is lifted to the smallest counter among backlogged tenants, so an idle tenant
//! cannot monopolise the band on return and is not punished either. Counters are `f64`: at 1e6 tokens per second
//! for a year they stay below 2^53, so no renormalisation is needed in practice.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::Request;

/// One tenant's state in a band.
#[derive(Debug, Default)]
pub(super) struct Flow {
    /// Virtual token counter: weighted service received (estimated, then settled).
    pub(super) counter: f64,
    /// Weight of the tenant's latest request (live policy changes apply from the next request on).
    pub(super) weight: f64,
    /// Waiting requests, oldest first.
    pub(super) queue: VecDeque<Request>,
}

/// The tenants of one tier.
#[derive(Debug, Default)]
pub(super) struct Band {
    /// Flows by tenant name (BTreeMap: deterministic tie-breaks).
    pub(super) flows: BTreeMap<Arc<str>, Flow>,
    /// Requests queued across flows.
    pub(super) queued: usize,
}

impl Band {
    /// Smallest counter among backlogged flows.
    fn min_backlogged(&self) -> Option<f64> {
        self.flows
            .values()
            .filter(|f| !f.queue.is_empty())
            .map(|f| f.counter)
            .min_by(f64::total_cmp)
    }

    /// Requests queued for `tenant`.
    pub(super) fn queued_for(&self, tenant: &str) -> usize {
        self.flows.get(tenant).map_or(0, |f| f.queue.len())
    }

    /// Appends a new arrival, lifting an idle tenant's counter.
    pub(super) fn push_back(&mut self, req: Request) {
        let min = self.min_backlogged();
        let flow = self.flows.entry(req.tenant.clone()).or_default();
        if let (true, Some(m)) = (flow.queue.is_empty(), min) {
            flow.counter = flow.counter.max(m);
        }
        flow.weight = req.weight;
        flow.queue.push_back(req);
        self.queued += 1;
    }

    /// Puts a displaced request back at the head of its tenant's queue (no lift: its charge was refunded).
    pub(super) fn push_front(&mut self, req: Request) {
        let flow = self.flows.entry(req.tenant.clone()).or_default();
        flow.queue.push_front(req);
        self.queued += 1;
    }

    /// Pops the head of the backlogged flow with the smallest counter, charging `cost / weight`.
    pub(super) fn pop(&mut self, cost: impl Fn(&Request) -> f64) -> Option<Request> {
        let (_, flow) = self
            .flows
            .iter_mut()
            .filter(|(_, f)| !f.queue.is_empty())
            .min_by(|a, b| a.1.counter.total_cmp(&b.1.counter))?;
        let req = flow.queue.pop_front()?;
        flow.counter += cost(&req) / req.weight;
        self.queued -= 1;
        Some(req)
    }

    /// Adds `delta` (cost units, unweighted) to `tenant`'s counter: a refund (negative) or a settlement.
    pub(super) fn adjust(&mut self, tenant: &str, weight: f64, delta: f64) {
        if let Some(f) = self.flows.get_mut(tenant) {
            f.counter += delta / weight;
        }
    }

    /// Removes a queued request wherever it is.
    pub(super) fn remove(&mut self, tenant: &str, id: u64) -> Option<Request> {
        let flow = self.flows.get_mut(tenant)?;
        let at = flow.queue.iter().position(|r| r.id == id)?;
        let req = flow.queue.remove(at)?;
        self.queued -= 1;
        Some(req)
    }
}
