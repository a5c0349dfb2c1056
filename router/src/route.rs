//! Cache-aware routing shell: per-pool prefix indexes (approximate, or precise from KV events), the session table,
//! the cache-aware profile or P/D router, and the decision-record ring. The arithmetic is `policies::pick` and
//! `policies::prefix`; this file owns the state around it and keeps it in step with discovery.
//!
//! Per request ([`CacheView::prepare`]): tokenize the prompt (rendered once by the request view) with the pool's tokenizer and chat template (as the pod
//! does), hash full blocks with [`PrefixHasher`], look the hashes up in the pool's index and turn the per-pod matches
//! into [`RequestFacts`] aligned with the snapshot's pool indices. [`CacheView::decide`] picks with
//! [`Profile::decide`] (aggregated pools) or [`PdRouter::route`] (pools with prefill-role pods);
//! [`CacheView::commit`] records the pick in the index (approximate: the chosen and prefill pods now "hold" the
//! blocks; precise: speculative entries until the pod's own events arrive) and the session table.
//!
//! Decision records are lazy: the ring stores the decision's inputs (views, facts, the pick) and runs
//! [`Profile::explain`] only when `/debug/decisions` reads the record, so the request path pays a copy of the
//! candidate views, not a second scoring pass.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use policies::blocks::PrefixHasher;
use policies::decision::{DecisionRecord, DecisionRing, Keyed, PdRecord};
use policies::endpoint::{EndpointId, EndpointView, Role};
use policies::openai::RequestView as OpenAiView;
use policies::pick::pd::{PdChoice, PdRouted, PdRouter};
use policies::pick::predicted_ttft::{PrefillModel, TtftOutcome};
use policies::pick::prefix::RequestFacts;
use policies::pick::profile::{Profile, Routed, Weights};
use policies::pick::session::SessionTable;
use policies::pick::{NoEligibleEndpoint, RequestView};
use policies::prefix::{ApproxIndex, PodSlot, PreciseIndex, PrefixMatches};
use policies::tokens::Tokenizer;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rand_core::RngCore;

use crate::config::{CacheAwareConfig, IndexKind};
use crate::kv_index::{KvIndexer, KvIndexerConfig, KvMetrics, PodEvents};

/// `{result}` of a prefix lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabel {
    /// `hit` (some pod holds block 0 onwards) or `miss`.
    pub result: &'static str,
}

/// `{decision}` of a P/D pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PdLabel {
    /// `colocated`, `disaggregated` or `fallback` (prefill leg failed, served colocated).
    pub decision: &'static str,
}

/// `{reason, on}` of a declined P/D decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeclinedLabel {
    /// [`policies::pick::pd::PdReason`]: `short-prompt`, `short-uncached`, `no-prefill-pod`, `ttft-worse`, `disabled`.
    pub reason: &'static str,
    /// Role of the pod that served it: `decode`, or `prefill` (an idle prefill pod with a better predicted TTFT).
    pub on: &'static str,
}

/// Cache-aware routing metrics.
#[derive(Clone, Debug, Default)]
pub struct CacheMetrics {
    /// `weir_prefix_lookups_total{result}`.
    pub lookups: Family<LookupLabel, Counter>,
    /// `weir_prefix_matched_blocks_total`: blocks matched on the chosen pod.
    pub matched_blocks: Counter,
    /// `weir_pd_decisions_total{decision}`.
    pub pd: Family<PdLabel, Counter>,
    /// `weir_pd_declined_total{reason,on}`: why requests of P/D pools were served colocated, and where.
    pub pd_declined: Family<DeclinedLabel, Counter>,
    /// `weir_kv_events_*` and `weir_kv_index_*` of precise pools, read at scrape time; pools join as they are created.
    pub kv: KvMetrics,
}

impl CacheMetrics {
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            kv: KvMetrics::register(reg),
            ..Self::default()
        };
        let r = reg.sub_registry_with_prefix("weir");
        r.register(
            "prefix_lookups",
            "Prefix-index lookups of cache-aware pools, by whether any pod held the first block",
            m.lookups.clone(),
        );
        r.register(
            "prefix_matched_blocks",
            "Prompt blocks already cached on the pod each request was sent to (per the index)",
            m.matched_blocks.clone(),
        );
        r.register(
            "pd_decisions",
            "P/D decisions: colocated, disaggregated, or fallback to colocated after a failed prefill leg",
            m.pd.clone(),
        );
        r.register(
            "pd_declined",
            "Requests of P/D pools the decider served colocated, by reason and by the role of the pod that served them",
            m.pd_declined.clone(),
        );
        m
    }
}

/// Process-wide routing state shared by every snapshot: the decision ring and metrics.
#[derive(Debug)]
pub struct Routing {
    /// Newest decisions, explained on read.
    pub ring: Mutex<DecisionRing<LazyDecision>>,
    pub metrics: CacheMetrics,
    /// Unix milliseconds at `epoch`, so records carry wall-clock times without reading the wall clock per request.
    pub unix_ms_at_epoch: u64,
    /// Monotonic origin for `unix_ms_at_epoch`.
    pub epoch: Instant,
}

impl Routing {
    pub fn new(ring_size: usize, metrics: CacheMetrics, unix_ms_at_epoch: u64) -> Self {
        Self {
            ring: Mutex::new(DecisionRing::new(ring_size)),
            metrics,
            unix_ms_at_epoch,
            epoch: tokio::time::Instant::now().into_std(),
        }
    }

    /// Wall-clock milliseconds at monotonic `now`.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        self.unix_ms_at_epoch + now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Fills in measured TTFT of `request_id`'s newest record.
    pub fn measured_ttft(&self, request_id: &str, ms: f64) {
        self.ring.lock().set_measured_ttft(request_id, ms);
    }
}

impl Default for Routing {
    fn default() -> Self {
        Self::new(1024, CacheMetrics::default(), 0)
    }
}

/// A cache-aware pool's long-lived state (survives snapshot rebuilds).
pub struct CachePool {
    pub cfg: CacheAwareConfig,
    /// Upstream model name: seeds block 0's hash (as the precise index does for the pods' events).
    model: Arc<str>,
    tokenizer: Arc<dyn Tokenizer>,
    hasher: PrefixHasher,
    /// Routing-history index (approximate mode).
    approx: RwLock<ApproxIndex>,
    /// KV-event index (precise mode), shared with the subscription tasks.
    precise: Arc<RwLock<PreciseIndex>>,
    /// Subscriptions feeding `precise` (precise mode, inside a runtime); shared (weakly) with [`KvMetrics`].
    kv: Option<Arc<KvIndexer>>,
    sessions: Mutex<SessionTable>,
    /// Aggregated profile.
    profile: Profile,
    /// P/D router, used when the pool has prefill-role pods.
    pd: PdRouter,
    /// Prefill throughput learned from this pool's P/D prefill legs (replaces the configured rate once known).
    pub prefill_rate: crate::pd::PrefillRate,
    /// Endpoint ids currently registered in the index, to remove those that leave.
    members: Mutex<BTreeSet<EndpointId>>,
}

impl std::fmt::Debug for CachePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachePool")
            .field("model", &self.model)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// One endpoint as the cache pool needs it at a discovery change.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: EndpointId,
    pub kv_events: Option<String>,
    pub kv_replay: Option<String>,
}

impl CachePool {
    pub fn new(cfg: &CacheAwareConfig, model: &str) -> Self {
        let precise = Arc::new(RwLock::new(PreciseIndex::default()));
        let kv = (cfg.index == IndexKind::Precise && tokio::runtime::Handle::try_current().is_ok())
            .then(|| {
                let k = KvIndexer::new(precise.clone(), KvIndexerConfig::default());
                // The expiry task lives as long as the runtime; the indexer itself is never dropped while serving.
                drop(k.spawn_expiry(std::time::Duration::from_secs(1)));
                Arc::new(k)
            });
        let w = cfg.weights;
        // Aggregated pools pick by predicted TTFT (issue 27; its calibration learns from this pool's first tokens),
        // unless the config asks for scorers: weights of its own, or session affinity (a scorer).
        let base = if uses_predicted_ttft(cfg) {
            Profile::predicted_ttft(
                PrefillModel::default(),
                tokio::time::Instant::now().into_std(),
            )
        } else {
            Profile::cache_aware()
        };
        let profile = Profile {
            weights: w,
            gate: cfg.gate,
            ..base
        };
        let mut pd = PdRouter {
            cfg: cfg.pd,
            ..PdRouter::default()
        };
        pd.prefill.weights.prefix = w.prefix;
        pd.prefill.gate = cfg.gate;
        pd.decode.weights.prefix = w.prefix;
        pd.decode.weights.session = w.session;
        pd.decode.gate = cfg.gate;
        Self {
            cfg: cfg.clone(),
            model: Arc::from(model),
            tokenizer: cfg.tokenizer.build(),
            hasher: PrefixHasher::new(model, None, cfg.block_size as usize),
            approx: RwLock::new(ApproxIndex::default()),
            precise,
            kv,
            sessions: Mutex::new(SessionTable::default()),
            profile,
            pd,
            prefill_rate: crate::pd::PrefillRate::default(),
            members: Mutex::new(BTreeSet::new()),
        }
    }

    /// Brings the index, subscriptions and sessions in step with the pool's endpoints; returns each endpoint's slot.
    pub fn sync(&self, members: &[Member]) -> Vec<Option<PodSlot>> {
        let now_ids: BTreeSet<EndpointId> = members.iter().map(|m| m.id.clone()).collect();
        let mut known = self.members.lock();
        for gone in known.difference(&now_ids) {
            self.approx.write().remove_pod(gone);
            self.precise.write().remove_pod(gone);
            self.sessions.lock().remove_pod(gone);
        }
        if let Some(kv) = &self.kv {
            let pods: Vec<PodEvents> = members
                .iter()
                .filter_map(|m| {
                    m.kv_events.as_ref().map(|p| PodEvents {
                        id: m.id.clone(),
                        model: self.model.to_string(),
                        publisher: p.clone(),
                        replay: m.kv_replay.clone(),
                    })
                })
                .collect();
            kv.sync(&pods);
        }
        let slots = match self.cfg.index {
            IndexKind::Approximate => {
                let mut ix = self.approx.write();
                members.iter().map(|m| Some(ix.add_pod(&m.id))).collect()
            }
            IndexKind::Precise => {
                let mut ix = self.precise.write();
                // Pods without KV events still get a slot, for speculative entries.
                members
                    .iter()
                    .map(|m| Some(ix.add_pod(&m.id, &self.model)))
                    .collect()
            }
        };
        *known = now_ids;
        slots
    }

    /// The precise index (tests and debug).
    pub fn precise(&self) -> &Arc<RwLock<PreciseIndex>> {
        &self.precise
    }

    /// The KV-event subscriptions feeding the precise index, if this pool has them.
    pub fn kv_indexer(&self) -> Option<&Arc<KvIndexer>> {
        self.kv.as_ref()
    }

    /// Blocks the index believes `slot` holds (precise: from its KV events, speculative entries excluded).
    pub fn held_blocks(&self, slot: PodSlot) -> usize {
        match self.cfg.index {
            IndexKind::Approximate => self.approx.read().pod_blocks(slot) as usize,
            IndexKind::Precise => self.precise.read().engine_hashes(slot).len(),
        }
    }
}

/// A snapshot's view of a cache-aware pool: the long-lived state plus slots aligned with the pool's endpoints.
#[derive(Debug, Clone)]
pub struct CacheView {
    pub pool: Arc<CachePool>,
    /// Index slot of pool endpoint `i`.
    pub slots: Vec<Option<PodSlot>>,
    /// Id of pool endpoint `i`.
    pub ids: Arc<[EndpointId]>,
    /// The pool has prefill-role pods, so requests go through the P/D router.
    pub pd: bool,
}

/// What the router learned about a request before picking.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Full-block hashes of the prompt.
    pub hashes: Vec<u64>,
    /// Prompt tokens (the pod's tokenizer), or the byte estimate when the body did not tokenize.
    pub prompt_tokens: u32,
    pub facts: RequestFacts,
    /// `x-session-id`, when affinity is on.
    pub session: Option<String>,
}

/// A pick.
#[derive(Debug, Clone)]
pub struct Decided {
    /// Destination pool index (the decode pod under P/D).
    pub index: usize,
    /// Prefill pool index when disaggregated.
    pub prefill: Option<usize>,
    /// The aggregated profile's pick, or the P/D router's.
    pub how: How,
}

/// Which decider ran.
#[derive(Debug, Clone)]
pub enum How {
    Profile(Routed),
    Pd(Box<PdRouted>),
}

impl CacheView {
    /// Tokenizes, hashes and looks up the prompt. Never fails: a body the tokenizer cannot read has no blocks.
    pub fn prepare<B: AsRef<[u8]>>(
        &self,
        view: &OpenAiView<B>,
        session: Option<&str>,
        now: Instant,
        metrics: &CacheMetrics,
    ) -> Prepared {
        let p = &self.pool;
        let (hashes, prompt_tokens) = match view.prompt_ids(p.tokenizer.as_ref()) {
            Ok(t) => (p.hasher.block_hashes(&t), t.len() as u32),
            Err(_) => (Vec::new(), view.estimated_prompt_tokens()),
        };
        let mut m = PrefixMatches::default();
        match p.cfg.index {
            IndexKind::Approximate => p.approx.read().lookup(&hashes, &mut m),
            IndexKind::Precise => p.precise.read().lookup(&hashes, now, &mut m),
        }
        let matched: Vec<u32> = self.slots.iter().map(|s| m.get(*s)).collect();
        let hit = matched.iter().any(|&b| b > 0);
        metrics
            .lookups
            .get_or_create(&LookupLabel {
                result: if hit { "hit" } else { "miss" },
            })
            .inc();
        let session = session
            .filter(|_| p.cfg.session_affinity)
            .map(str::to_string);
        let session_pod = session.as_deref().and_then(|s| {
            let sessions = p.sessions.lock();
            let id = sessions.get(s, now)?;
            self.ids.iter().position(|x| x == id)
        });
        Prepared {
            facts: RequestFacts {
                matched,
                total_blocks: hashes.len() as u32,
                block_size: p.cfg.block_size,
                session_pod,
            },
            hashes,
            prompt_tokens,
            session,
        }
    }

    /// Picks the destination (and prefill pod, when `allow_pd` and the P/D router disaggregates).
    pub fn decide(
        &self,
        req: &RequestView,
        eps: &[EndpointView],
        prep: &Prepared,
        allow_pd: bool,
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Result<Decided, NoEligibleEndpoint> {
        let p = &self.pool;
        if self.pd && allow_pd {
            let r = match p.prefill_rate.get() {
                Some(rate) => {
                    p.pd.with_prefill_rate(rate)
                        .route(req, eps, &prep.facts, now, rng)?
                }
                None => p.pd.route(req, eps, &prep.facts, now, rng)?,
            };
            let prefill = match r.decision.choice {
                PdChoice::Disaggregated { prefill } => Some(prefill),
                PdChoice::Colocated => None,
            };
            return Ok(Decided {
                index: r.destination(),
                prefill,
                how: How::Pd(Box::new(r)),
            });
        }
        let profile = if self.pd { &p.pd.decode } else { &p.profile };
        let r = profile.decide(req, eps, &prep.facts, now, rng)?;
        Ok(Decided {
            index: r.choice.index,
            prefill: None,
            how: How::Profile(r),
        })
    }

    /// Uncached prompt tokens on pool endpoint `index` (for in-flight token accounting).
    pub fn uncached(&self, prep: &Prepared, index: usize) -> u32 {
        prep.prompt_tokens
            .saturating_sub(prep.facts.matched_tokens(index, prep.prompt_tokens))
    }

    /// Records the pick: index entries for the chosen (and prefill) pod, the session, the matched-blocks counter.
    pub fn commit(&self, d: &Decided, prep: &Prepared, now: Instant, metrics: &CacheMetrics) {
        let p = &self.pool;
        metrics
            .matched_blocks
            .inc_by(u64::from(prep.facts.matched(d.index)));
        for i in std::iter::once(d.index).chain(d.prefill) {
            let Some(Some(slot)) = self.slots.get(i) else {
                continue;
            };
            if prep.hashes.is_empty() {
                continue;
            }
            match p.cfg.index {
                IndexKind::Approximate => p.approx.write().record(*slot, &prep.hashes),
                IndexKind::Precise => p.precise.write().speculate(*slot, &prep.hashes, now),
            }
        }
        if let (Some(s), Some(id)) = (&prep.session, self.ids.get(d.index)) {
            p.sessions.lock().record(s, id, now);
        }
        if let How::Pd(r) = &d.how
            && r.decision.choice == PdChoice::Colocated
        {
            metrics
                .pd_declined
                .get_or_create(&DeclinedLabel {
                    reason: r.decision.reason.as_str(),
                    on: if r.decision.on_prefill_pod.is_some() {
                        "prefill"
                    } else {
                        "decode"
                    },
                })
                .inc();
        }
    }

    /// The lazy decision record for this pick.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        request_id: &str,
        model: &Arc<str>,
        req: RequestView,
        eps: Vec<EndpointView>,
        prep: &Prepared,
        d: Decided,
        now: Instant,
        at_unix_ms: u64,
    ) -> LazyDecision {
        let profile = match &d.how {
            How::Pd(_) => self.pool.pd.decode.clone(),
            How::Profile(_) if self.pd => self.pool.pd.decode.clone(),
            How::Profile(_) => self.pool.profile.clone(),
        };
        LazyDecision {
            request_id: request_id.to_string(),
            model: model.clone(),
            profile,
            prefill_profile: self.pool.pd.prefill.clone(),
            req,
            eps,
            facts: prep.facts.clone(),
            ids: self.ids.clone(),
            decided: d,
            now,
            at_unix_ms,
            fallback: None,
            measured_ttft_ms: None,
        }
    }
}

/// A decision kept with its inputs; [`LazyDecision::explain`] builds the full [`DecisionRecord`] on read.
#[derive(Debug, Clone)]
pub struct LazyDecision {
    pub request_id: String,
    pub model: Arc<str>,
    /// The profile that picked the destination.
    profile: Profile,
    /// The P/D prefill profile (explained when it ran).
    prefill_profile: Profile,
    req: RequestView,
    /// Candidate views as the decider saw them.
    eps: Vec<EndpointView>,
    facts: RequestFacts,
    ids: Arc<[EndpointId]>,
    pub decided: Decided,
    now: Instant,
    at_unix_ms: u64,
    /// Why a disaggregated decision was served colocated after all (the prefill leg's failure).
    pub fallback: Option<String>,
    pub measured_ttft_ms: Option<f64>,
}

impl Keyed for LazyDecision {
    fn request_id(&self) -> &str {
        &self.request_id
    }
    /// Also feeds the predicted-TTFT picker's calibration with this first token.
    fn set_measured_ttft(&mut self, ms: f64) {
        self.measured_ttft_ms = Some(ms);
        if let (Some(t), How::Profile(r)) = (&self.profile.ttft, &self.decided.how)
            && let Some(p) = r.predicted
        {
            let secs = ms / 1000.0;
            let at = self.now + std::time::Duration::try_from_secs_f64(secs).unwrap_or_default();
            t.calibration.observe(
                TtftOutcome {
                    predicted_raw_s: p.raw_s,
                    measured_s: secs,
                },
                at,
            );
        }
    }
}

impl LazyDecision {
    /// The full record: every candidate's filter outcome and scores, the pick, the P/D choice and TTFTs.
    pub fn explain(&self) -> DecisionRecord {
        let (routed, pd) = match &self.decided.how {
            How::Profile(r) => (r, None),
            How::Pd(p) => (&p.decode, Some(p.as_ref())),
        };
        let candidates = self.profile.explain(
            &self.req,
            &self.eps,
            &self.facts,
            routed,
            &self.ids,
            self.now,
        );
        let name = |i: usize| {
            self.ids
                .get(i)
                .map_or_else(|| format!("#{i}"), |id| id.to_string())
        };
        let pd_record = pd.map(|p| {
            let decision = match (&self.fallback, p.decision.choice) {
                (Some(_), _) => "fallback",
                (None, PdChoice::Disaggregated { .. }) => "disaggregated",
                (None, PdChoice::Colocated) => "colocated",
            };
            PdRecord {
                decision,
                reason: p.decision.reason.as_str(),
                prefill: match p.decision.choice {
                    PdChoice::Disaggregated { prefill } => Some(name(prefill)),
                    PdChoice::Colocated => None,
                },
                on_prefill_pod: p.decision.on_prefill_pod.map(|(i, _)| name(i)),
                prefill_candidates: p.prefill.as_ref().map_or_else(Vec::new, |r| {
                    self.prefill_profile.explain(
                        &self.req,
                        &self.eps,
                        &self.facts,
                        r,
                        &self.ids,
                        self.now,
                    )
                }),
                predicted_colocated_ttft_ms: p.decision.colocated_ttft_s * 1000.0,
                predicted_disaggregated_ttft_ms: p
                    .decision
                    .disaggregated_ttft_s
                    .map(|s| s * 1000.0),
            }
        });
        let predicted_ttft_ms = match pd {
            Some(p) if self.fallback.is_none() => p.decision.predicted_ttft_s() * 1000.0,
            Some(p) => p.decision.colocated_ttft_s * 1000.0,
            None if routed.predicted.is_some() => {
                routed.predicted.map_or(0.0, |p| p.ttft_s * 1000.0)
            }
            None => {
                let d = self.decided.index;
                let prompt =
                    policies::pick::load_gate::LoadGate::prompt_tokens(&self.req, &self.facts);
                let ep = self.eps.iter().find(|e| e.index == d);
                let cost = self.profile.gate.map(|g| g.cost).unwrap_or_default();
                ep.map_or(0.0, |e| {
                    cost.ttft_s(e, prompt, self.facts.matched_tokens(d, prompt)) * 1000.0
                })
            }
        };
        DecisionRecord {
            request_id: self.request_id.clone(),
            model: self.model.to_string(),
            profile: self.profile.name,
            prompt_tokens: self.req.prompt_tokens,
            total_blocks: self.facts.total_blocks,
            candidates,
            picked: Some(name(self.decided.index)),
            error: self.fallback.clone(),
            pd: pd_record,
            predicted_ttft_ms: Some(predicted_ttft_ms),
            measured_ttft_ms: self.measured_ttft_ms,
            at_unix_ms: self.at_unix_ms,
        }
    }
}

/// Whether any endpoint of `roles` is prefill-only (the pool then routes through the P/D router).
pub fn has_prefill(roles: impl IntoIterator<Item = Role>) -> bool {
    roles.into_iter().any(|r| r == Role::Prefill)
}

/// Whether a cache-aware pool's aggregated picks go by predicted TTFT: yes unless its config sets scorer weights of
/// its own or turns on session affinity (both only mean something to the weighted scorers).
pub fn uses_predicted_ttft(cfg: &CacheAwareConfig) -> bool {
    cfg.weights == Weights::default()
}

/// Weights shown in `/debug/routes` for a cache-aware pool.
pub fn describe(cfg: &CacheAwareConfig) -> String {
    let Weights {
        prefix,
        queue,
        kv,
        token_load,
        active_request,
        session,
        prefill_backlog,
    } = cfg.weights;
    format!(
        "{} picker={} prefix={prefix} queue={queue} kv={kv} \
         token_load={token_load} active_request={active_request} session={session} prefill_backlog={prefill_backlog} \
         gate={} pd_non_cached_tokens={}",
        match cfg.index {
            IndexKind::Approximate => "cache-aware",
            IndexKind::Precise => "precise-prefix",
        },
        if uses_predicted_ttft(cfg) {
            "predicted-ttft"
        } else {
            "max-score"
        },
        if cfg.gate.is_some() { "on" } else { "off" },
        cfg.pd.non_cached_tokens
    )
}
