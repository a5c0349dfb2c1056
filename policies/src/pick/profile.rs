//! Cache-aware scheduling profiles: which filters and weighted scorers run, built per request from its prefix facts.
//!
//! A [`Profile`] names a role filter, scorer weights and an optional [`LoadGate`]. Because prefix matches and the
//! session pod differ per request, the scorers that read them are built per request: [`Profile::decide`] asks the
//! gate which hits to drop (copying the prefix matches only when it drops one), filters, and runs the score and
//! max-score stages it shares with [`super::Pipeline`], its scorers dispatched statically (a decision over 64
//! endpoints takes about a microsecond, so per-request boxes, copies and indirect calls showed). [`Profile::explain`]
//! re-runs the same deterministic filters and scorers over every candidate to produce decision-record rows (raw and
//! weighted score per scorer, which filter dropped whom); it is separate so the hot path does not pay for it when
//! records are off.
//!
//! [`Profile::predicted_ttft`] replaces the weighted scorers and max-score with the [`PredictedTtft`] picker (the
//! least predicted time to first token, see [`super::predicted_ttft`]), keeping the role filter and the gate; its
//! [`Profile::explain`] rows carry each candidate's predicted wait and TTFT instead of scores. It is the `cache-aware`
//! and `precise-prefix` policies' picker for aggregated pools.
//!
//! Presets (weights configurable): [`Weights::weir`] (the default) prefix 3, queue 2, kv 2, prefill-backlog 2;
//! [`Weights::llm_d`] queue 2, kv 2, prefix 3 (GIE v1.5 / llm-d's chart);
//! [`Weights::prefill`] prefix 3, token-load 2; [`Weights::decode`] prefix 3, kv 1, active-request 1 (the
//! prefix term sends a follow-up turn to the decode pod that already holds its history, which the P/D decider then
//! serves colocated there). Zero-weight scorers are not run.

use std::time::Instant;

use rand_core::RngCore;

use super::active_request::ActiveRequest;
use super::load_gate::{GateOutcome, LoadGate};
use super::predicted_ttft::{PredictedTtft, Prediction, PrefillModel};
use super::prefix::{PrefixCache, RequestFacts};
use super::scorers::{
    Available, DecodeCapable, KvCacheUtilization, PrefillBacklog, Queue, TokenLoad,
};
use super::session::SessionAffinity;
use super::{Choice, Filter, NoEligibleEndpoint, Picker, RequestView, Scorer, score_and_pick};
use crate::decision::{CandidateRecord, ScoreRecord};
use crate::endpoint::{EndpointId, EndpointView, Role};

/// Scorer weights; 0 disables a scorer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// `prefix-cache`.
    pub prefix: f64,
    /// `queue` (scraped waiting, min-max).
    pub queue: f64,
    /// `kv-cache-utilization` (`1 - kv`).
    pub kv: f64,
    /// `token-load` (`1 - min(1, in-flight tokens / 4,194,304)`).
    pub token_load: f64,
    /// `active-request`.
    pub active_request: f64,
    /// `session-affinity`.
    pub session: f64,
    /// `prefill-backlog` (weir's own: fresh uncached-prompt backlog per pod).
    pub prefill_backlog: f64,
}

impl Weights {
    /// llm-d's chart / GIE v1.5 defaults.
    pub fn llm_d() -> Self {
        Self {
            prefix: 3.0,
            queue: 2.0,
            kv: 2.0,
            token_load: 0.0,
            active_request: 0.0,
            session: 0.0,
            prefill_backlog: 0.0,
        }
    }

    /// weir's default for aggregated serving: llm-d's weights plus `prefill-backlog` 2. llm-d's `queue` and
    /// `kv-cache-utilization` read scrapes up to one interval old, so every miss arriving within an interval scores
    /// the same pod best (llm-d lost to request-count balancing in bursts for this reason); the router's own backlog
    /// count moves at every pick.
    pub fn weir() -> Self {
        Self {
            prefill_backlog: 2.0,
            ..Self::llm_d()
        }
    }

    /// Prefill pool: cache hits, then the least in-flight prompt work. No scraped `queue`: a prefill leg is this
    /// router's own request until it answers, so its in-flight tokens are the pod's backlog, exact and fresh, while
    /// a scrape is up to one interval (100 ms) old; with 8k-token prompts at 12 req/s that is more than one arrival
    /// per interval, and a max-score pick on a stale queue sends each of them to the same pod.
    pub fn prefill() -> Self {
        Self {
            prefix: 3.0,
            queue: 0.0,
            kv: 0.0,
            token_load: 2.0,
            active_request: 0.0,
            session: 0.0,
            prefill_backlog: 0.0,
        }
    }

    /// Decode pool: the prompt's cached prefix, free KV and few running decodes.
    pub fn decode() -> Self {
        Self {
            prefix: 3.0,
            queue: 0.0,
            kv: 1.0,
            token_load: 0.0,
            active_request: 1.0,
            session: 0.0,
            prefill_backlog: 0.0,
        }
    }
}

impl Default for Weights {
    fn default() -> Self {
        Self::weir()
    }
}

/// Hard role constraint of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleFilter {
    /// Every available endpoint.
    Any,
    /// `decode` and `prefill-decode` pods.
    DecodeCapable,
    /// `prefill` pods only.
    PrefillOnly,
}

impl RoleFilter {
    /// Whether `ep` passes this role constraint (statically dispatched on the decision path).
    fn keeps(self, req: &RequestView, ep: &EndpointView) -> bool {
        match self {
            Self::Any => true,
            Self::DecodeCapable => DecodeCapable.keep(req, ep),
            Self::PrefillOnly => PrefillOnly.keep(req, ep),
        }
    }

    /// The filter's name in errors and decision records.
    fn name(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::DecodeCapable => DecodeCapable.name(),
            Self::PrefillOnly => PrefillOnly.name(),
        }
    }
}

/// Keeps prefill-only pods.
#[derive(Debug, Clone, Copy)]
pub struct PrefillOnly;

impl Filter for PrefillOnly {
    fn name(&self) -> &'static str {
        "prefill-only"
    }
    fn keep(&self, _req: &RequestView, ep: &EndpointView) -> bool {
        ep.role == Role::Prefill
    }
}

/// One scheduling profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Name in decision records (`default`, `prefill`, `decode`).
    pub name: &'static str,
    pub role: RoleFilter,
    pub weights: Weights,
    /// Anti-herding gate on prefix hits; `None` trusts the prefix score blindly.
    pub gate: Option<LoadGate>,
    /// Pick by predicted TTFT instead of weighted scorers and max-score (`weights` then unused).
    pub ttft: Option<PredictedTtft>,
}

/// A profile's pick.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub choice: Choice,
    /// What the load gate changed.
    pub gate: GateOutcome,
    /// The chosen pod's predicted TTFT, when the profile picks by it.
    pub predicted: Option<Prediction>,
}

impl Profile {
    /// Aggregated serving: llm-d weights, gate on, any role that can decode.
    pub fn cache_aware() -> Self {
        Self {
            name: "default",
            role: RoleFilter::DecodeCapable,
            weights: Weights::weir(),
            gate: Some(LoadGate::default()),
            ttft: None,
        }
    }

    /// Aggregated serving by predicted TTFT ([`PredictedTtft`] with `model`; its calibration's clock starts at
    /// `origin`): role filter and gate as [`Self::cache_aware`].
    pub fn predicted_ttft(model: PrefillModel, origin: Instant) -> Self {
        Self {
            ttft: Some(PredictedTtft::new(model, origin)),
            ..Self::cache_aware()
        }
    }

    /// P/D prefill pool.
    pub fn prefill() -> Self {
        Self {
            name: "prefill",
            role: RoleFilter::PrefillOnly,
            weights: Weights::prefill(),
            gate: Some(LoadGate::default()),
            ttft: None,
        }
    }

    /// P/D decode pool (gated like the others, since it now scores prefix hits).
    pub fn decode() -> Self {
        Self {
            name: "decode",
            role: RoleFilter::DecodeCapable,
            weights: Weights::decode(),
            gate: Some(LoadGate::default()),
            ttft: None,
        }
    }

    fn role_filter(&self) -> Option<Box<dyn Filter>> {
        match self.role {
            RoleFilter::Any => None,
            RoleFilter::DecodeCapable => Some(Box::new(DecodeCapable)),
            RoleFilter::PrefillOnly => Some(Box::new(PrefillOnly)),
        }
    }

    /// The profile's scorers with a non-zero weight, in total-summing order (which fixes the float sums, so
    /// [`Self::decide`] and [`Self::explain`] both take them from here).
    fn terms<'a>(
        &self,
        matched: &'a [u32],
        facts: &RequestFacts,
    ) -> impl Iterator<Item = (Term<'a>, f64)> + Clone + use<'a> {
        let w = &self.weights;
        [
            (
                Term::Prefix(PrefixCache::new(matched, facts.total_blocks)),
                w.prefix,
            ),
            (Term::Queue, w.queue),
            (Term::Kv, w.kv),
            (Term::TokenLoad, w.token_load),
            (Term::PrefillBacklog, w.prefill_backlog),
            (Term::ActiveRequest, w.active_request),
            (
                Term::Session(SessionAffinity {
                    pod: facts.session_pod,
                }),
                w.session,
            ),
        ]
        .into_iter()
        .filter(|&(_, weight)| weight > 0.0)
    }

    /// Picks one endpoint (max-score, random tie-break from `rng`).
    ///
    /// The gate compares a holder with the candidates this profile may pick, not the whole pool: in a P/D pool an
    /// idle prefill pod holding the same prefix would otherwise make every decode holder look slow and imbalanced,
    /// and the decode profile would drop its hit.
    pub fn decide(
        &self,
        req: &RequestView,
        eps: &[EndpointView],
        facts: &RequestFacts,
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Result<Routed, NoEligibleEndpoint> {
        if eps.is_empty() {
            return Err(NoEligibleEndpoint::Empty);
        }
        let role = self.role;
        let gate = match &self.gate {
            Some(g) if self.weights.prefix > 0.0 => {
                g.assess(req, eps.iter().filter(|e| role.keeps(req, e)), facts)
            }
            _ => GateOutcome::default(),
        };
        let gated_matched: Vec<u32>;
        let matched: &[u32] = if gate.gated.is_empty() {
            &facts.matched
        } else {
            let mut m = facts.matched.clone();
            for &(i, _) in &gate.gated {
                if let Some(x) = m.get_mut(i) {
                    *x = 0;
                }
            }
            gated_matched = m;
            &gated_matched
        };
        // The pipeline's filters, `available` then the role, without copying when every endpoint passes.
        let keep = |e: &EndpointView| e.available && role.keeps(req, e);
        let filtered: Vec<EndpointView>;
        let cands: &[EndpointView] = if eps.iter().all(keep) {
            eps
        } else {
            filtered = eps.iter().copied().filter(keep).collect();
            if filtered.is_empty() {
                let by = if eps.iter().any(|e| e.available) {
                    role.name()
                } else {
                    Available.name()
                };
                return Err(NoEligibleEndpoint::Filtered { by });
            }
            &filtered
        };
        if let Some(t) = &self.ttft {
            let (choice, p) = t.pick(req, cands, matched, facts, rng);
            return Ok(Routed {
                choice,
                gate,
                predicted: Some(p),
            });
        }
        let choice = score_and_pick(
            self.terms(matched, facts),
            &Picker::MaxScore,
            req,
            cands,
            now,
            rng,
        );
        Ok(Routed {
            choice,
            gate,
            predicted: None,
        })
    }

    /// Decision-record rows for every endpoint in `eps`: the filter that dropped it, or each scorer's raw and
    /// weighted score. `ids[i]` names pool index `i`; `routed` is this profile's pick (for the gate's effect).
    pub fn explain(
        &self,
        req: &RequestView,
        eps: &[EndpointView],
        facts: &RequestFacts,
        routed: &Routed,
        ids: &[EndpointId],
        now: Instant,
    ) -> Vec<CandidateRecord> {
        let mut matched = facts.matched.clone();
        for &(i, _) in &routed.gate.gated {
            if let Some(m) = matched.get_mut(i) {
                *m = 0;
            }
        }
        let mut filters: Vec<Box<dyn Filter>> = vec![Box::new(Available)];
        filters.extend(self.role_filter());
        let mut rows: Vec<CandidateRecord> = eps
            .iter()
            .map(|e| CandidateRecord {
                endpoint: ids
                    .get(e.index)
                    .map_or_else(|| format!("#{}", e.index), |id| id.to_string()),
                index: e.index,
                filtered_by: filters.iter().find(|f| !f.keep(req, e)).map(|f| f.name()),
                prefix_blocks: facts.matched(e.index),
                gated: routed.gate.gated.iter().any(|&(i, _)| i == e.index),
                scores: Vec::new(),
                total: 0.0,
                predicted_wait_ms: None,
                predicted_ttft_ms: None,
            })
            .collect();
        let kept: Vec<EndpointView> = eps
            .iter()
            .zip(&rows)
            .filter(|(_, r)| r.filtered_by.is_none())
            .map(|(e, _)| *e)
            .collect();
        if let Some(t) = &self.ttft {
            let kept_rows = rows.iter_mut().filter(|r| r.filtered_by.is_none());
            for (row, p) in kept_rows.zip(t.predict_all(req, &kept, &matched, facts)) {
                row.predicted_wait_ms = Some(p.wait_s * 1000.0);
                row.predicted_ttft_ms = Some(p.ttft_s * 1000.0);
            }
            return rows;
        }
        let mut out = vec![0.0; kept.len()];
        for (scorer, weight) in self.terms(&matched, facts) {
            scorer.score(req, &kept, now, &mut out);
            let kept_rows = rows.iter_mut().filter(|r| r.filtered_by.is_none());
            for (row, &v) in kept_rows.zip(&out) {
                let raw = if v.is_finite() {
                    v.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                row.scores.push(ScoreRecord {
                    scorer: scorer.name(),
                    raw,
                    weight,
                    weighted: raw * weight,
                });
                row.total += raw * weight;
            }
        }
        rows
    }
}

/// One of a profile's scorers, dispatched statically: [`Profile::decide`] builds them per request (the prefix and
/// session scorers read per-request facts), and boxing each one per request was a measurable share of a decision.
#[derive(Debug, Clone, Copy)]
enum Term<'a> {
    Prefix(PrefixCache<'a>),
    Queue,
    Kv,
    TokenLoad,
    PrefillBacklog,
    ActiveRequest,
    Session(SessionAffinity),
}

impl Scorer for Term<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::Prefix(s) => s.name(),
            Self::Queue => Queue.name(),
            Self::Kv => KvCacheUtilization.name(),
            Self::TokenLoad => TokenLoad.name(),
            Self::PrefillBacklog => PrefillBacklog.name(),
            Self::ActiveRequest => ActiveRequest.name(),
            Self::Session(s) => s.name(),
        }
    }
    fn score(&self, req: &RequestView, eps: &[EndpointView], now: Instant, out: &mut [f64]) {
        match self {
            Self::Prefix(s) => s.score(req, eps, now, out),
            Self::Queue => Queue.score(req, eps, now, out),
            Self::Kv => KvCacheUtilization.score(req, eps, now, out),
            Self::TokenLoad => TokenLoad.score(req, eps, now, out),
            Self::PrefillBacklog => PrefillBacklog.score(req, eps, now, out),
            Self::ActiveRequest => ActiveRequest.score(req, eps, now, out),
            Self::Session(s) => s.score(req, eps, now, out),
        }
    }
}

impl Default for Profile {
    fn default() -> Self {
        Self::cache_aware()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::PrefixHasher;
    use crate::endpoint::ScrapedLoad;
    use crate::pick::load_gate::LoadGate;
    use crate::prefix::{ApproxIndex, PodSlot, PrefixMatches};
    use crate::testkit::{Seeded, now};

    fn pool(n: usize) -> Vec<EndpointView> {
        (0..n)
            .map(|index| EndpointView {
                index,
                role: Role::Both,
                available: true,
                in_flight: 0,
                in_flight_tokens: 0,
                prefill_tokens: 0,
                scraped: Some(ScrapedLoad {
                    waiting: 0,
                    running: 0,
                    kv_usage: 0.1,
                    age_ms: 10,
                }),
            })
            .collect()
    }

    /// Routes `n` requests sharing a 4,000-token prefix through `profile` with an approximate index. `busy` keeps
    /// every routed request in flight and still prefilling (a burst); otherwise each finishes before the next (a
    /// cold fleet).
    fn hot_prefix(profile: &Profile, n: usize, busy: bool) -> Vec<usize> {
        let hasher = PrefixHasher::new("m", None, 16);
        let mut ix = ApproxIndex::default();
        let mut eps = pool(8);
        let ids: Vec<EndpointId> = (0..8)
            .map(|i| EndpointId::new(format!("pod-{i}")))
            .collect();
        let slots: Vec<PodSlot> = ids.iter().map(|id| ix.add_pod(id)).collect();
        let mut rng = Seeded(7);
        let mut m = PrefixMatches::default();
        let mut picks = Vec::new();
        for r in 0..n as u32 {
            let tokens: Vec<u32> = (0..4000)
                .chain((0..96).map(|k| 100_000 + r * 96 + k))
                .collect();
            let hashes = hasher.block_hashes(&tokens);
            ix.lookup(&hashes, &mut m);
            let facts = RequestFacts {
                matched: slots.iter().map(|&s| m.get(Some(s))).collect(),
                total_blocks: hashes.len() as u32,
                block_size: 16,
                session_pod: None,
            };
            let req = RequestView {
                prompt_tokens: 4096,
                max_tokens: Some(100),
            };
            let routed = profile.decide(&req, &eps, &facts, now(), &mut rng).unwrap();
            let i = routed.choice.index;
            ix.record(slots[i], &hashes);
            if busy {
                eps[i].in_flight += 1;
                eps[i].in_flight_tokens += 4096 + 100;
                eps[i].prefill_tokens += u64::from(4096 - facts.matched_tokens(i, 4096));
            }
            picks.push(i);
        }
        picks
    }

    fn distinct(v: &[usize]) -> usize {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.dedup();
        v.len()
    }

    #[test]
    fn a_hot_prefix_under_load_spreads_while_a_cold_fleet_keeps_affinity() {
        let gated = Profile::cache_aware();
        let burst = hot_prefix(&gated, 64, true);
        assert!(
            distinct(&burst) > 1,
            "gate must spread a hot prefix: {burst:?}"
        );
        // The spread is bounded: the prefix is replicated, not scattered per request.
        assert!(distinct(&burst) < 64);
        let cold = hot_prefix(&gated, 64, false);
        assert_eq!(distinct(&cold), 1, "an idle fleet keeps affinity: {cold:?}");
        let ungated = Profile {
            gate: None,
            ..Profile::cache_aware()
        };
        let herd = hot_prefix(&ungated, 64, true);
        assert_eq!(
            distinct(&herd),
            1,
            "without the gate the prefix herds onto one pod"
        );
    }

    #[test]
    fn predicted_ttft_replicates_a_hot_prefix_under_load_and_keeps_affinity_when_idle() {
        let p = Profile::predicted_ttft(PrefillModel::default(), now());
        let burst = hot_prefix(&p, 64, true);
        assert!(
            distinct(&burst) > 1,
            "a hot prefix gets a replica: {burst:?}"
        );
        // Hits stay on the holder while its queue is shorter than a full prefill elsewhere (here 4 of them, as every
        // request of this burst stays queued), so each replica serves a run of hits rather than one request each.
        assert!(burst[..4].iter().all(|&i| i == burst[0]), "{burst:?}");
        assert!(distinct(&burst) <= 64 / 4, "{burst:?}");
        let cold = hot_prefix(&p, 64, false);
        assert_eq!(distinct(&cold), 1, "an idle fleet keeps affinity: {cold:?}");
    }

    /// weir issue 6: in a P/D pool the decode profile's gate saw the idle prefill pod that had prefilled a document
    /// (same prefix, no backlog, nothing outstanding) and dropped the decode pod's hit on every follow-up question,
    /// which then went to a decode pod without the document and was disaggregated again.
    #[test]
    fn the_gate_compares_a_holder_with_the_profiles_own_candidates() {
        let mut eps = pool(4);
        eps[0].role = Role::Prefill;
        for (i, e) in eps.iter_mut().enumerate().skip(1) {
            e.role = Role::Decode;
            e.in_flight = 12 + i as u32;
            e.scraped = Some(ScrapedLoad {
                waiting: 12,
                running: 12,
                kv_usage: 0.4,
                age_ms: 10,
            });
        }
        // Prefill pod 0 and decode pod 2 hold the 8,128-token document; the prompt adds 128 tokens.
        let facts = RequestFacts {
            matched: vec![508, 0, 508, 0],
            total_blocks: 516,
            block_size: 16,
            session_pod: None,
        };
        let req = RequestView {
            prompt_tokens: 8_256,
            max_tokens: Some(256),
        };
        let d = Profile::decode()
            .decide(&req, &eps, &facts, now(), &mut Seeded(4))
            .unwrap();
        assert_eq!(d.choice.index, 2, "{d:?}");
        assert!(d.gate.gated.is_empty(), "{:?}", d.gate);
    }

    #[test]
    fn explain_agrees_with_the_pick_and_names_filtered_endpoints() {
        let mut eps = pool(4);
        eps[1].available = false;
        eps[2].role = Role::Prefill;
        let facts = RequestFacts {
            matched: vec![0, 8, 8, 4],
            total_blocks: 8,
            block_size: 16,
            session_pod: None,
        };
        let ids: Vec<EndpointId> = (0..4).map(|i| EndpointId::new(format!("p{i}"))).collect();
        let p = Profile::cache_aware();
        let req = RequestView {
            prompt_tokens: 128,
            max_tokens: None,
        };
        let routed = p.decide(&req, &eps, &facts, now(), &mut Seeded(1)).unwrap();
        assert_eq!(routed.choice.index, 3, "best unfiltered prefix holder");
        let rows = p.explain(&req, &eps, &facts, &routed, &ids, now());
        assert_eq!(rows[1].filtered_by, Some("available"));
        assert_eq!(rows[2].filtered_by, Some("decode-capable"));
        let best = rows
            .iter()
            .filter(|r| r.filtered_by.is_none())
            .max_by(|a, b| a.total.total_cmp(&b.total))
            .unwrap();
        assert_eq!(best.index, routed.choice.index);
        assert!((best.total - routed.choice.total).abs() < 1e-12);
        let prefix = best
            .scores
            .iter()
            .find(|s| s.scorer == "prefix-cache")
            .unwrap();
        assert_eq!((prefix.raw, prefix.weighted), (0.5, 1.5));
    }

    proptest::proptest! {
        /// `decide` (gate assessed without copying the facts, filters and scorers dispatched statically, no copy of
        /// the candidates when all pass) picks exactly as the code before it did, for every preset and for gate-less,
        /// role-less and session-weighted profiles: same result, same gate outcome, same RNG draws. `apply` too.
        #[test]
        fn decide_decides_as_the_reference_implementation(
            eps in crate::testkit::arb_pool(14),
            matched in proptest::collection::vec(
                proptest::prop_oneof![proptest::strategy::Just(0u32), 0u32..300], 0..16),
            total_blocks in proptest::prop_oneof![proptest::strategy::Just(0u32), 0u32..300],
            prompt_tokens in 0u32..6_000,
            session_pod in proptest::option::of(0usize..16),
            profile in 0usize..6,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let profile = match profile {
                0 => Profile::cache_aware(),
                1 => Profile::prefill(),
                2 => Profile::decode(),
                3 => Profile { role: RoleFilter::Any, weights: Weights::llm_d(), ..Profile::cache_aware() },
                4 => Profile {
                    weights: Weights { session: 1.0, active_request: 0.5, token_load: 1.0, ..Weights::weir() },
                    ..Profile::cache_aware()
                },
                _ => Profile { gate: None, ..Profile::cache_aware() },
            };
            let facts = RequestFacts { matched, total_blocks, block_size: 16, session_pod };
            let req = RequestView { prompt_tokens, max_tokens: Some(128) };
            let (mut a, mut b) = (Seeded(seed), Seeded(seed));
            for _ in 0..3 {
                let new = profile.decide(&req, &eps, &facts, now(), &mut a);
                let old = crate::pick::reference::decide(&profile, &req, &eps, &facts, now(), &mut b);
                proptest::prop_assert_eq!(new, old);
                proptest::prop_assert_eq!(a.0, b.0);
            }
            let g = LoadGate::default();
            let (mut f_new, mut f_old) = (facts.clone(), facts.clone());
            let new = g.apply(&req, &eps, &mut f_new);
            let old = crate::pick::reference::gate_apply(&g, &req, &eps, &mut f_old);
            proptest::prop_assert_eq!((new, f_new), (old, f_old));
        }
    }

    #[test]
    fn session_affinity_pulls_toward_the_session_pod_when_weighted() {
        let eps = pool(3);
        let facts = RequestFacts {
            matched: vec![],
            total_blocks: 0,
            block_size: 16,
            session_pod: Some(2),
        };
        let p = Profile {
            weights: Weights {
                session: 1.0,
                ..Weights::llm_d()
            },
            ..Profile::cache_aware()
        };
        for seed in 0..20 {
            let r = p
                .decide(
                    &RequestView::default(),
                    &eps,
                    &facts,
                    now(),
                    &mut Seeded(seed),
                )
                .unwrap();
            assert_eq!(r.choice.index, 2);
        }
    }
}
