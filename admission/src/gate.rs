//! The admission shell: tenant table, per-pool schedulers, waiters and permits. Decisions are
//! [`policies::fair::Scheduler`]'s; this file only holds locks, wakes waiters, reads the tokio clock for metrics and
//! records outcomes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use policies::fair::{Grant, Removed, Request, RequestId, Scheduler, Shed};
use policies::tenant::{ApiKeyHash, TenantPolicySpec, TenantRules, Tier};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use crate::ledger::{Key, Ledger, UsageRow};
use crate::limits::{Limiter, Reservation};
use crate::metrics::{DecisionLabels, Metrics, PoolTierLabels, TierLabels};
use crate::tenants::{Identity, Tenant, TenantTable};
use crate::{AdmissionConfig, Reject, RejectReason, Result};

mod permit;
pub use permit::Permit;

/// What the router asks admission for.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmitRequest {
    /// Model name from the request body.
    pub model: String,
    /// Pool that will serve it (dispatch room is per pool).
    pub pool: String,
    /// Prompt tokens (counted or estimated).
    pub prompt_tokens: u64,
    /// `max_tokens` / `max_completion_tokens` if the client sent one.
    pub max_tokens: Option<u64>,
    /// Client's deadline for dispatch, if any (the tenant's maximum wait applies too).
    pub deadline: Option<Instant>,
}

/// Real usage of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// GPU-seconds attributed to the request by the caller (e.g. its time in flight divided by the pod's batch size).
    pub gpu_seconds: f64,
}

/// How a permit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// One pool's scheduler and the waiters it will wake.
#[derive(Debug)]
struct Pool {
    /// Pool name.
    name: Arc<str>,
    /// Scheduler and waiters, under one short lock.
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    /// Decisions.
    sched: Scheduler,
    /// Wake-ups of queued `admit` futures, by request id.
    waiters: HashMap<RequestId, Arc<Notify>>,
}

impl PoolState {
    /// Grants what the room allows and wakes those waiters.
    fn dispatch(&mut self) {
        for id in self.sched.dispatch() {
            if let Some(n) = self.waiters.get(&id) {
                n.notify_one();
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    cfg: AdmissionConfig,
    tenants: RwLock<Arc<TenantTable>>,
    pools: Mutex<HashMap<Arc<str>, Arc<Pool>>>,
    next_id: AtomicU64,
    ledger: Ledger,
    metrics: Metrics,
    /// RPM / TPM / concurrency per tenant (in process).
    limiter: Arc<Limiter>,
    /// RPM / TPM shared by replicas in Redis, when configured.
    shared: Option<Arc<crate::shared::Shared>>,
    /// Bumped whenever a queue's depth changes, so watchers (KEDA's `StreamIsActive`) push at once, not on a poll.
    queue_changes: tokio::sync::watch::Sender<u64>,
}

/// Tenant admission. Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

impl Admission {
    /// Validates the policies (no policies: one implicit `default` tenant that every request belongs to), opens the
    /// ledger and, when it has a file, starts its flush task (so with a ledger path this must run inside a tokio
    /// runtime).
    pub fn from_policies(specs: Vec<TenantPolicySpec>, cfg: AdmissionConfig) -> Result<Admission> {
        let table = TenantTable::build(&specs, cfg.max_tenant_labels)?;
        let ledger = Ledger::open(&cfg.ledger)?;
        let shared = match &cfg.redis {
            Some(url) => Some(crate::shared::Shared::new(url).map_err(crate::Error::Redis)?),
            None => None,
        };
        if cfg.ledger.path.is_some() {
            ledger.spawn_flusher(cfg.ledger.flush_interval);
        }
        Ok(Admission {
            inner: Arc::new(Inner {
                cfg,
                tenants: RwLock::new(Arc::new(table)),
                pools: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                ledger,
                metrics: Metrics::default(),
                limiter: Arc::new(Limiter::new(tokio::time::Instant::now().into_std())),
                shared,
                queue_changes: tokio::sync::watch::Sender::new(0),
            }),
        })
    }

    /// Swaps in a new policy set (live updates). Queued and in-flight requests are kept: they finish under the
    /// tier and weight they were queued with; new requests see the new policies. On error nothing changes.
    pub fn replace_policies(&self, specs: Vec<TenantPolicySpec>) -> Result<()> {
        let table = TenantTable::build(&specs, self.inner.cfg.max_tenant_labels)?;
        *self.inner.tenants.write() = Arc::new(table);
        Ok(())
    }

    /// Registers admission's metrics on `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.metrics.register(registry);
    }

    /// The usage ledger (queries, flush).
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// Usage rows of one tenant.
    pub fn usage(&self, tenant: &str) -> Vec<UsageRow> {
        self.inner.ledger.usage(tenant)
    }

    /// Usage rows of every tenant.
    pub fn usage_all(&self) -> Vec<UsageRow> {
        self.inner.ledger.usage_all()
    }

    /// Whether `api_key` is an admin key (may read every tenant's usage). Constant-time over all admin keys.
    pub fn is_admin(&self, api_key: Option<&str>) -> bool {
        let Some(key) = api_key else { return false };
        let hash = ApiKeyHash::of(key);
        self.inner
            .cfg
            .admin_keys
            .iter()
            .fold(false, |hit, k| k.ct_eq(&hash) | hit)
    }

    /// The tenant an API key belongs to. With no policies configured every caller is the implicit default tenant.
    pub fn identify(&self, api_key: Option<&str>) -> Result<Identity, Reject> {
        let table = self.inner.tenants.read().clone();
        let ident = |t: &Tenant| Identity {
            tenant: t.rules.tenant.clone(),
            tier: t.rules.tier,
        };
        if table.implicit {
            return Ok(table
                .tenants
                .first()
                .map(ident)
                .unwrap_or_else(|| Identity {
                    tenant: Arc::from(crate::tenants::DEFAULT_TENANT),
                    tier: Tier::Standard,
                }));
        }
        let Some(key) = api_key else {
            return Err(Reject::new(
                RejectReason::MissingApiKey,
                None,
                "This request needs an API key (Authorization: Bearer ...).",
            ));
        };
        table.by_key(key).map(ident).ok_or_else(|| {
            Reject::new(
                RejectReason::InvalidApiKey,
                None,
                "Incorrect API key provided.",
            )
        })
    }

    fn pool(&self, name: &str) -> Arc<Pool> {
        let mut pools = self.inner.pools.lock();
        if let Some(p) = pools.get(name) {
            return p.clone();
        }
        let mut sched = Scheduler::new(self.inner.cfg.fair.clone());
        // Until the router reports room for the pool, dispatch is not gated.
        sched.set_room(u32::MAX);
        let p = Arc::new(Pool {
            name: Arc::from(name),
            state: Mutex::new(PoolState {
                sched,
                waiters: HashMap::new(),
            }),
        });
        pools.insert(p.name.clone(), p.clone());
        p
    }

    /// Sets how many requests `pool` may take now (from [`policies::room::pool_room`] over its endpoint snapshot)
    /// and dispatches waiters accordingly. A pool never given room is not gated.
    pub fn set_room(&self, pool: &str, room: u32) {
        self.set_room_reserved(pool, room, 0);
    }

    /// [`Admission::set_room`] with `reserve` of the slots kept from the batch tier
    /// ([`policies::room::pool_room_reserved`]).
    pub fn set_room_reserved(&self, pool: &str, room: u32, reserve: u32) {
        let p = self.pool(pool);
        let mut st = p.state.lock();
        st.sched.set_room_reserved(room, reserve);
        st.dispatch();
    }

    fn count_decision(
        &self,
        label: &str,
        tier: Tier,
        decision: &'static str,
        reason: &'static str,
    ) {
        self.inner
            .metrics
            .decisions
            .get_or_create(&DecisionLabels {
                tenant: label.to_string(),
                tier: tier.as_str(),
                decision,
                reason,
            })
            .inc();
    }

    /// Every pool's queue per tier now: depth and how long its oldest request has waited (for the metrics
    /// adapter's tier-queue metrics), sorted by pool then tier rank. Pools that never queued are not listed.
    pub fn tier_queues(&self, now: Instant) -> Vec<TierQueue> {
        let pools: Vec<Arc<Pool>> = self.inner.pools.lock().values().cloned().collect();
        let mut out = Vec::with_capacity(pools.len() * Tier::ALL.len());
        for p in pools {
            let st = p.state.lock();
            for tier in Tier::ALL {
                out.push(TierQueue {
                    pool: p.name.to_string(),
                    tier,
                    queued: st.sched.queued(tier) as u64,
                    oldest_wait: st
                        .sched
                        .oldest_enqueued(tier)
                        .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
                });
            }
        }
        out.sort_by(|a, b| (&a.pool, a.tier.rank()).cmp(&(&b.pool, b.tier.rank())));
        out
    }

    /// Changes whenever a queue's depth does (a counter; read [`Admission::tier_queues`] for the depths).
    pub fn queue_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.queue_changes.subscribe()
    }

    fn set_queued_gauge(&self, pool: &Pool, st: &PoolState) {
        self.inner
            .queue_changes
            .send_modify(|n| *n = n.wrapping_add(1));
        for tier in Tier::ALL {
            let n = i64::try_from(st.sched.queued(tier)).unwrap_or(i64::MAX);
            self.inner
                .metrics
                .queued
                .get_or_create(&PoolTierLabels {
                    pool: pool.name.to_string(),
                    tier: tier.as_str(),
                })
                .set(n);
        }
    }

    /// Checks model access, queues the request in its tenant's tier and waits until the pool has room for it (or
    /// its deadline passes). Cancel-safe: dropping the future while it waits removes the request from the queue at
    /// once (counted as `abandoned`) and hands any slot it held to the next waiter. `now` is the arrival time
    /// (`tokio::time::Instant::now().into_std()`).
    pub async fn admit(
        &self,
        who: &Identity,
        req: AdmitRequest,
        now: Instant,
    ) -> Result<Permit, Reject> {
        let table = self.inner.tenants.read().clone();
        let Some(t) = table.get(&who.tenant) else {
            return Err(Reject::new(
                RejectReason::InvalidApiKey,
                None,
                "The tenant of this API key no longer exists.",
            ));
        };
        let rules = &t.rules;
        let label = t.label.to_string();
        self.check_model(rules, &label, &req.model)?;
        let key: Key = (
            rules.tenant.clone(),
            Arc::from(req.model.as_str()),
            rules.tier,
        );
        let reservation = self.reserve(rules, &label, &key, &req, now).await?;
        let cfg = &self.inner.cfg;
        let max_wait_deadline = now + rules.queue.max_wait;
        let deadline = req
            .deadline
            .map_or(max_wait_deadline, |d| d.min(max_wait_deadline));
        let queued = Request {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            tenant: rules.tenant.clone(),
            tier: rules.tier,
            weight: rules.weight,
            prompt_tokens: req.prompt_tokens,
            expected_output: req
                .max_tokens
                .unwrap_or(cfg.default_output_tokens)
                .min(cfg.max_output_estimate),
            enqueued_at: now,
            deadline,
        };
        let id = queued.id;
        let pool = self.pool(&req.pool);
        let notify = self.enqueue(&pool, queued, rules, &label, &key)?;
        let waiting = Waiting {
            adm: self,
            pool,
            id,
            tenant: rules.tenant.clone(),
            tier: rules.tier,
            key,
            label,
            done: false,
        };
        waiting.wait(&notify, now, deadline, reservation).await
    }

    /// Refuses (and counts) a model the tenant may not use.
    fn check_model(&self, rules: &TenantRules, label: &str, model: &str) -> Result<(), Reject> {
        if rules.models.allows(model) {
            return Ok(());
        }
        // Rows keyed by a model the tenant may not use would let a client grow the ledger without bound.
        let key: Key = (rules.tenant.clone(), Arc::from("-"), rules.tier);
        self.inner.ledger.record(&key, |c| c.rejected += 1);
        self.count_decision(
            label,
            rules.tier,
            "rejected",
            RejectReason::ModelNotAllowed.as_str(),
        );
        Err(Reject::new(
            RejectReason::ModelNotAllowed,
            None,
            format!("Tenant `{}` may not use the model `{model}`.", rules.tenant),
        ))
    }

    /// Limits before queuing: a request over its tenant's RPM / TPM / concurrency costs no queue place. Dropped
    /// before dispatch (shed, expired, client gone), the reservation refunds itself.
    async fn reserve(
        &self,
        rules: &TenantRules,
        label: &str,
        key: &Key,
        req: &AdmitRequest,
        now: Instant,
    ) -> Result<Reservation, Reject> {
        let reserve_tokens = req.prompt_tokens
            + req
                .max_tokens
                .unwrap_or(self.inner.cfg.default_output_tokens);
        self.inner
            .limiter
            .reserve_any(
                self.inner.shared.as_ref(),
                &self.inner.metrics.fail_open,
                &rules.tenant,
                &rules.limits,
                reserve_tokens,
                now,
            )
            .await
            .inspect_err(|reject| {
                self.inner.ledger.record(key, |c| c.rejected += 1);
                self.count_decision(label, rules.tier, "rejected", reject.reason.as_str());
            })
    }

    /// Queues `queued` in `pool`'s scheduler and dispatches what the room allows, or sheds it (counted; the client's
    /// error). The returned [`Notify`] wakes the request's waiter when it may start.
    fn enqueue(
        &self,
        pool: &Pool,
        queued: Request,
        rules: &TenantRules,
        label: &str,
        key: &Key,
    ) -> Result<Arc<Notify>, Reject> {
        let id = queued.id;
        let notify = Arc::new(Notify::new());
        let mut st = pool.state.lock();
        match st
            .sched
            .enqueue(queued, rules.queue.max_queued.get() as usize)
        {
            Err(shed) => {
                drop(st);
                let (reason, retry_after, msg) = match shed {
                    Shed::TierFull { retry_after, .. } => (
                        RejectReason::QueueFull,
                        retry_after,
                        format!(
                            "The {} queue of pool `{}` is full; retry later.",
                            rules.tier, pool.name
                        ),
                    ),
                    Shed::TenantFull { retry_after } => (
                        RejectReason::TenantQueueFull,
                        retry_after,
                        format!(
                            "Tenant `{}` already has {} requests waiting; retry later.",
                            rules.tenant, rules.queue.max_queued
                        ),
                    ),
                };
                self.inner.ledger.record(key, |c| c.rejected += 1);
                self.count_decision(label, rules.tier, "rejected", reason.as_str());
                return Err(Reject::new(reason, Some(retry_after), msg));
            }
            Ok(Some(displaced)) => {
                tracing::debug!(pool = %pool.name, displaced, by = id, "unstarted lower-tier grant requeued");
                self.inner
                    .metrics
                    .displaced
                    .get_or_create(&PoolTierLabels {
                        pool: pool.name.to_string(),
                        tier: rules.tier.as_str(),
                    })
                    .inc();
            }
            Ok(None) => {}
        }
        st.waiters.insert(id, notify.clone());
        st.dispatch();
        self.set_queued_gauge(pool, &st);
        Ok(notify)
    }
}

/// One pool's queue of one tier, as [`Admission::tier_queues`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct TierQueue {
    /// Pool name.
    pub pool: String,
    pub tier: Tier,
    /// Requests waiting.
    pub queued: u64,
    /// How long the oldest of them has waited (zero for an empty queue).
    pub oldest_wait: Duration,
}

/// A request waiting in a pool's queue; dropping it un-queues the request.
struct Waiting<'a> {
    adm: &'a Admission,
    pool: Arc<Pool>,
    id: RequestId,
    tenant: Arc<str>,
    tier: Tier,
    key: Key,
    label: String,
    /// Set once the request left the queue (started or expired): drop has nothing to undo.
    done: bool,
}

impl Waiting<'_> {
    /// Waits until the scheduler grants the request (a permit) or `deadline` passes (expired, unless granted at that
    /// very moment). Cancel-safe through [`Waiting`]'s `Drop`.
    async fn wait(
        mut self,
        notify: &Notify,
        now: Instant,
        deadline: Instant,
        reservation: Reservation,
    ) -> Result<Permit, Reject> {
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
        tokio::pin!(sleep);
        let arrived = tokio::time::Instant::from_std(now);
        loop {
            tokio::select! {
                biased;
                () = notify.notified() => {
                    if let Some(grant) = self.try_start() {
                        return Ok(self.into_permit(grant, arrived, reservation));
                    }
                }
                () = &mut sleep => {
                    if let Some(grant) = self.try_start() {
                        return Ok(self.into_permit(grant, arrived, reservation));
                    }
                    return Err(self.expire(deadline.saturating_duration_since(now)));
                }
            }
        }
    }

    /// Takes the grant if the scheduler holds one for this request.
    fn try_start(&mut self) -> Option<Grant> {
        let mut st = self.pool.state.lock();
        let grant = st.sched.start(self.id)?;
        st.waiters.remove(&self.id);
        self.adm.set_queued_gauge(&self.pool, &st);
        self.done = true;
        Some(grant)
    }

    fn into_permit(
        self,
        grant: Grant,
        arrived: tokio::time::Instant,
        reservation: Reservation,
    ) -> Permit {
        let inner = &self.adm.inner;
        inner.ledger.record(&self.key, |c| c.admitted += 1);
        self.adm
            .count_decision(&self.label, self.tier, "admitted", "none");
        let waited = arrived.elapsed();
        inner
            .metrics
            .wait
            .get_or_create(&TierLabels {
                tier: self.tier.as_str(),
            })
            .observe(waited.as_secs_f64());
        Permit {
            tenant: self.tenant.clone(),
            tier: self.tier,
            model: self.key.1.clone(),
            pool: self.pool.name.clone(),
            request_id: self.id,
            queued_for: waited,
            grant,
            pool_ref: self.pool.clone(),
            inner: self.adm.inner.clone(),
            key: self.key.clone(),
            label: self.label.clone(),
            settled: false,
            rate: reservation.headers,
            reservation: Some(reservation),
        }
    }

    /// The deadline passed while queued: un-queue and reject.
    fn expire(&mut self, waited: Duration) -> Reject {
        self.unqueue();
        self.done = true;
        self.adm.inner.ledger.record(&self.key, |c| c.rejected += 1);
        self.adm.count_decision(
            &self.label,
            self.tier,
            "rejected",
            RejectReason::DeadlineExceeded.as_str(),
        );
        Reject::new(
            RejectReason::DeadlineExceeded,
            Some(self.adm.inner.cfg.fair.retry_after),
            format!(
                "The request waited {} ms for capacity and was not served in time; retry later.",
                waited.as_millis()
            ),
        )
    }

    fn unqueue(&self) {
        let mut st = self.pool.state.lock();
        st.waiters.remove(&self.id);
        if let Removed::Granted(_) = st.sched.cancel(self.id, &self.tenant, self.tier) {
            // Its slot goes to the next waiter.
            st.dispatch();
        }
        self.adm.set_queued_gauge(&self.pool, &st);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.unqueue();
        self.adm
            .inner
            .ledger
            .record(&self.key, |c| c.abandoned += 1);
        self.adm
            .count_decision(&self.label, self.tier, "abandoned", "client_gone");
    }
}
