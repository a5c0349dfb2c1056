//! Tiered weighted-fair scheduling of waiting requests: which request may dispatch next.
//!
//! - **Between tiers**: strict priority (interactive, then standard, then batch) with a guaranteed minimum share:
//!   a backlogged tier whose share of recently dispatched token cost is below its floor (default standard 20%,
//!   batch 5%) goes first, so no tier starves (qos-and-security.md §3). "Recently" is an exponentially decayed sum
//!   over dispatches (factor [`FairConfig::share_decay`] per dispatch), so it needs no clock.
//! - **Within a tier**: Virtual Token Counter fair queuing by token cost with per-tenant weights ([`band`]). Cost is
//!   `w_in * prompt + w_out * expected output` (1 and 2), charged at dispatch and settled with real usage.
//! - **Room**: the shell says how many requests the pool may take now ([`Scheduler::set_room`], computed by
//!   [`crate::room`]); [`Scheduler::dispatch`] grants that many. A grant is held until the shell [`Scheduler::start`]s
//!   it. **Displacement**: while no room is left, an arrival of a higher tier revokes the newest grant of a lower
//!   tier that has not started yet; the revoked request goes back to the head of its tenant's queue with its charge
//!   refunded (requeued, never dropped) and its slot goes to the higher tier.
//! - **Bounds**: per tier and per tenant queue limits, and per-request deadlines ([`Scheduler::expire`]), shed with a
//!   retry-after.
//!
//! No clock, no I/O: `now` comes in as an argument; every decision is a function of the calls made.

mod band;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use band::Band;

use crate::tenant::Tier;

/// A request's id, unique per scheduler (assigned by the shell, increasing).
pub type RequestId = u64;

/// A waiting request as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Unique id.
    pub id: RequestId,
    /// Tenant name.
    pub tenant: Arc<str>,
    /// Tenant's tier.
    pub tier: Tier,
    /// Tenant's weight (> 0).
    pub weight: f64,
    /// Prompt tokens (estimated or counted).
    pub prompt_tokens: u64,
    /// Expected output tokens (max_tokens, capped; settled later with real usage).
    pub expected_output: u64,
    /// When it was enqueued.
    pub enqueued_at: Instant,
    /// Latest time it may still be dispatched.
    pub deadline: Instant,
}

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FairConfig {
    /// Cost weight of a prompt token (1).
    pub w_in: f64,
    /// Cost weight of an output token (2).
    pub w_out: f64,
    /// Minimum share of dispatched cost per tier while backlogged, by [`Tier::rank`] (0, 0.2, 0.05).
    pub min_share: [f64; 3],
    /// Decay of the per-tier dispatched-cost sums at each dispatch (0.99: about the last 100 dispatches count).
    pub share_decay: f64,
    /// Requests waiting per tier before arrivals of that tier are shed.
    pub max_queued_per_tier: [usize; 3],
    /// Retry-after given with a queue-full rejection.
    pub retry_after: Duration,
}

impl Default for FairConfig {
    fn default() -> Self {
        Self {
            w_in: 1.0,
            w_out: 2.0,
            min_share: [0.0, 0.20, 0.05],
            share_decay: 0.99,
            max_queued_per_tier: [5000; 3],
            retry_after: Duration::from_secs(1),
        }
    }
}

/// Why an arrival was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shed {
    /// The tier's queue is full.
    TierFull {
        /// Which tier.
        tier: Tier,
        /// When to try again.
        retry_after: Duration,
    },
    /// The tenant already has its maximum of waiting requests.
    TenantFull {
        /// When to try again.
        retry_after: Duration,
    },
}

/// A request allowed to dispatch, held until started (or revoked / cancelled).
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// The request.
    pub request: Request,
    /// Cost charged at dispatch (unweighted): settle against it.
    pub charged: f64,
}

/// What [`Scheduler::cancel`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Removed {
    /// It was waiting; it is gone, uncharged.
    Queued(Request),
    /// It was granted but not started; its charge is refunded and its slot returned.
    Granted(Grant),
    /// Not known (already started, expired or cancelled).
    Unknown,
}

/// Tiered weighted-fair scheduler for one pool.
#[derive(Debug)]
pub struct Scheduler {
    /// Settings.
    cfg: FairConfig,
    /// One band per tier, by rank.
    bands: [Band; 3],
    /// Decayed dispatched cost per tier (starvation guard).
    served: [f64; 3],
    /// Dispatch slots left until the next [`Scheduler::set_room`].
    available: u32,
    /// Of those, slots batch may not take (headroom kept for interactive and standard; [`Scheduler::set_room_reserved`]).
    reserve: u32,
    /// Granted, not yet started.
    granted: BTreeMap<RequestId, Grant>,
}

impl Scheduler {
    /// An empty scheduler with no room.
    pub fn new(cfg: FairConfig) -> Self {
        Self {
            cfg,
            bands: Default::default(),
            served: [0.0; 3],
            available: 0,
            reserve: 0,
            granted: BTreeMap::new(),
        }
    }

    /// Settings.
    pub fn config(&self) -> &FairConfig {
        &self.cfg
    }

    /// Cost of a request (unweighted).
    pub fn cost(&self, prompt_tokens: u64, output_tokens: u64) -> f64 {
        self.cfg.w_in * prompt_tokens as f64 + self.cfg.w_out * output_tokens as f64
    }

    /// Queues an arrival (no more than `tenant_max_queued` waiting for its tenant). If no room is left and a lower
    /// tier holds an unstarted grant, the newest such grant is revoked and requeued; its id is returned.
    pub fn enqueue(
        &mut self,
        req: Request,
        tenant_max_queued: usize,
    ) -> Result<Option<RequestId>, Shed> {
        let rank = req.tier.rank();
        let band = &self.bands[rank];
        if band.queued >= self.cfg.max_queued_per_tier[rank] {
            return Err(Shed::TierFull {
                tier: req.tier,
                retry_after: self.cfg.retry_after,
            });
        }
        if band.queued_for(&req.tenant) >= tenant_max_queued {
            return Err(Shed::TenantFull {
                retry_after: self.cfg.retry_after,
            });
        }
        self.bands[rank].push_back(req);
        if self.available > 0 {
            return Ok(None);
        }
        // Lowest tier first, newest first within it.
        let victim = self
            .granted
            .iter()
            .filter(|(_, g)| g.request.tier.rank() > rank)
            .max_by_key(|(id, g)| (g.request.tier.rank(), **id))
            .map(|(id, _)| *id);
        let Some(id) = victim else { return Ok(None) };
        if let Some(g) = self.granted.remove(&id) {
            self.unwind(&g);
            self.bands[g.request.tier.rank()].push_front(g.request);
            self.available += 1;
        }
        Ok(Some(id))
    }

    /// Undoes a grant's charge and share accounting.
    fn unwind(&mut self, g: &Grant) {
        let rank = g.request.tier.rank();
        self.bands[rank].adjust(&g.request.tenant, g.request.weight, -g.charged);
        self.served[rank] = (self.served[rank] - g.charged).max(0.0);
    }

    /// Sets the number of requests the pool may take now (from [`crate::room`]); unstarted grants count against it.
    pub fn set_room(&mut self, room: u32) {
        self.set_room_reserved(room, 0);
    }

    /// [`Scheduler::set_room`], keeping `reserve` of the slots from the batch tier: batch dispatches only while more
    /// than `reserve` slots are left, so a pool that batch has filled to its (stricter) limit still has room for an
    /// interactive or standard arrival. Slots freed by ending requests ([`Scheduler::add_room`]) go to batch once
    /// the reserve is whole, so batch keeps the pace of completions and never starves.
    pub fn set_room_reserved(&mut self, room: u32, reserve: u32) {
        self.available = room.saturating_sub(u32::try_from(self.granted.len()).unwrap_or(u32::MAX));
        self.reserve = reserve;
    }

    /// Whether tier `rank` may take a slot now.
    fn may_dispatch(&self, rank: usize) -> bool {
        self.available > 0 && (rank != Tier::Batch.rank() || self.available > self.reserve)
    }

    /// One more request may go (a dispatched request ended).
    pub fn add_room(&mut self, n: u32) {
        self.available = self.available.saturating_add(n);
    }

    /// Slots left.
    pub fn available(&self) -> u32 {
        self.available
    }

    /// Which tier dispatches next: the highest-priority backlogged tier below its floor, else the highest backlogged
    /// (among tiers that may take a slot now).
    fn next_tier(&self) -> Option<usize> {
        let total: f64 = self.served.iter().sum();
        let backlogged = (0..3).filter(|&t| self.bands[t].queued > 0 && self.may_dispatch(t));
        backlogged
            .clone()
            .find(|&t| {
                self.cfg.min_share[t] > 0.0 && self.served[t] < self.cfg.min_share[t] * total
            })
            .or_else(|| backlogged.clone().next())
    }

    /// Grants as many waiting requests as there is room for, in scheduling order (work-conserving: stops only when
    /// the room or the queues are empty).
    pub fn dispatch(&mut self) -> Vec<RequestId> {
        let mut out = Vec::new();
        while self.available > 0 {
            let Some(rank) = self.next_tier() else { break };
            let (w_in, w_out) = (self.cfg.w_in, self.cfg.w_out);
            let cost =
                move |r: &Request| w_in * r.prompt_tokens as f64 + w_out * r.expected_output as f64;
            let Some(req) = self.bands[rank].pop(cost) else {
                break;
            };
            let charged = cost(&req);
            for s in &mut self.served {
                *s *= self.cfg.share_decay;
            }
            self.served[rank] += charged;
            self.available -= 1;
            out.push(req.id);
            self.granted.insert(
                req.id,
                Grant {
                    request: req,
                    charged,
                },
            );
        }
        out
    }

    /// Whether `id` holds a grant.
    pub fn is_granted(&self, id: RequestId) -> bool {
        self.granted.contains_key(&id)
    }

    /// Takes a grant: the request is now in flight (settle it later with [`Scheduler::settle`]). `None` when it is
    /// not granted (still queued, revoked back into the queue, or gone).
    pub fn start(&mut self, id: RequestId) -> Option<Grant> {
        self.granted.remove(&id)
    }

    /// Removes a request that is queued or granted (client gone, deadline passed).
    pub fn cancel(&mut self, id: RequestId, tenant: &str, tier: Tier) -> Removed {
        if let Some(g) = self.granted.remove(&id) {
            self.unwind(&g);
            self.available += 1;
            return Removed::Granted(g);
        }
        match self.bands[tier.rank()].remove(tenant, id) {
            Some(r) => Removed::Queued(r),
            None => Removed::Unknown,
        }
    }

    /// Settles a started request with its real token usage: its tenant's counter moves by the difference.
    pub fn settle(&mut self, grant: &Grant, prompt_tokens: u64, output_tokens: u64) {
        let actual = self.cost(prompt_tokens, output_tokens);
        let r = &grant.request;
        self.bands[r.tier.rank()].adjust(&r.tenant, r.weight, actual - grant.charged);
    }

    /// Removes and returns every queued request whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Request> {
        let mut out = Vec::new();
        for band in &mut self.bands {
            for flow in band.flows.values_mut() {
                let before = flow.queue.len();
                flow.queue.retain(|r| {
                    if r.deadline <= now {
                        out.push(r.clone());
                        false
                    } else {
                        true
                    }
                });
                band.queued -= before - flow.queue.len();
            }
        }
        out
    }

    /// Earliest deadline among queued requests.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.bands
            .iter()
            .flat_map(|b| b.flows.values())
            .flat_map(|f| f.queue.iter().map(|r| r.deadline))
            .min()
    }

    /// Requests waiting in `tier`.
    pub fn queued(&self, tier: Tier) -> usize {
        self.bands[tier.rank()].queued
    }

    /// When the longest-waiting request of `tier` was enqueued; `None` for an empty queue.
    pub fn oldest_enqueued(&self, tier: Tier) -> Option<Instant> {
        self.bands[tier.rank()]
            .flows
            .values()
            .flat_map(|f| f.queue.iter().map(|r| r.enqueued_at))
            .min()
    }

    /// Whether `id` is waiting (in `tenant`'s queue of `tier`).
    pub fn is_queued(&self, id: RequestId, tenant: &str, tier: Tier) -> bool {
        self.bands[tier.rank()]
            .flows
            .get(tenant)
            .is_some_and(|f| f.queue.iter().any(|r| r.id == id))
    }

    /// Virtual counter of `tenant` in `tier` (for tests and metrics).
    pub fn counter(&self, tenant: &str, tier: Tier) -> Option<f64> {
        self.bands[tier.rank()].flows.get(tenant).map(|f| f.counter)
    }
}

/// Jain's fairness index `(sum x)^2 / (n * sum x^2)`: 1 when all equal, 1/n when one takes all.
pub fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    if sq == 0.0 {
        1.0
    } else {
        sum * sum / (xs.len() as f64 * sq)
    }
}
