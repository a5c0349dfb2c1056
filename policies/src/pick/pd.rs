//! P/D decider: serve a request colocated, or disaggregated (prefill pod -> KV transfer -> decode pod).
//!
//! Decode-first, as llm-d's `disagg-profile-handler`: the decode profile ([`Profile::decode`]: prefix, kv,
//! active-request) picks the decode pod; then the base rule of llm-d's `prefix-based-pd-decider` reads that pod's
//! prefix match and goes on only if the **uncached suffix >= `non_cached_tokens`** (0 disables P/D) and the prompt has
//! at least `min_prompt_tokens`. The prefill profile ([`Profile::prefill`], prefix + token-load, gated against
//! herding) then picks a prefill pod, and a TTFT model compares the two paths:
//!
//! ```text
//! colocated     = wait(decode) + prefill(prompt - matched(decode))
//! disaggregated = wait(prefill) + prefill(prompt - matched(prefill)) + transfer(prompt - matched(decode)) + decode_step
//! transfer(n)   = 26 ms + 4.25 us x n       (the sim's NIXL peer-pull model, fit to llm-d's timings)
//! ```
//!
//! with `wait`/`prefill` from the shared [`CostModel`] (the router swaps in the prefill rate it measures on its own
//! prefill legs, [`PdRouter::with_prefill_rate`], so these are the pods' seconds, not a configured guess; `wait` is a
//! pod's prefill backlog, the uncached prompt tokens of requests still before their first token). The decode pod
//! pulls only the blocks it lacks (vLLM's NIXL connector reads remote blocks after its local prefix hits), hence
//! `prompt - matched(decode)`. P/D is declined when `disaggregated > colocated + ttft_margin_s`: the margin is the
//! TTFT weir pays to keep a long prefill off a decode pod, where it would stall every running decode for the whole
//! prefill (an 8k-token prompt on an H100 8B pod: a ~230 ms step instead of a ~15-25 ms one). The default, 0.5 s, is
//! about two such prefills: P/D is kept while the prefill pool has a short queue, and declined once that queue holds
//! more than that, so an overloaded prefill pool falls back to colocated serving instead of queueing without bound.
//!
//! `non_cached_tokens` defaults to 512, not llm-d's sample value 16: a prefill of fewer uncached tokens costs the
//! decode pod's batch about one decode step (512 tokens on an H100 8B pod add ~7-12 ms to a ~15-25 ms step), while
//! P/D would add a second HTTP leg and a KV pull of at least 26 ms to the request's TTFT. Follow-up turns whose
//! history the decode pod already caches therefore stay colocated there.
//!
//! **Where a declined request runs.** On the decode pod, unless a prefill pod predicts a TTFT better by more than
//! one decode step (`decode_step_s`): prefill pods are vLLM engines that serve plain requests too, and a P/D pool
//! that kept every declined request on its decode pods would serve a short-prompt load with half its pods, so its
//! TTFT would trail a colocated fleet of the same size. A busy prefill pod (queued prefill legs) predicts a long
//! wait and is not chosen; an idle one that holds the prompt's prefix is. `colocate_on_prefill: false` keeps every
//! request on the decode pod (llm-d's behaviour).

use std::time::Instant;

use rand_core::RngCore;

use super::load_gate::{CostModel, LoadGate};
use super::prefix::RequestFacts;
use super::profile::{Profile, Routed};
use super::{NoEligibleEndpoint, RequestView};
use crate::endpoint::{EndpointView, Role};

/// P/D knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PdConfig {
    /// llm-d's `nonCachedTokens`: minimum uncached suffix on the decode pod for P/D; 0 disables P/D.
    pub non_cached_tokens: u32,
    /// Minimum prompt length for P/D.
    pub min_prompt_tokens: u32,
    /// How much worse predicted TTFT P/D may be than colocated, seconds.
    pub ttft_margin_s: f64,
    /// Fixed KV pull cost, seconds.
    pub transfer_base_s: f64,
    /// KV pull cost per prompt token, seconds.
    pub transfer_per_token_s: f64,
    /// One decode step on the decode pod after the pull (the first token), seconds; also the TTFT a prefill pod must
    /// save over the decode pod before a declined request is served there.
    pub decode_step_s: f64,
    /// Whether a declined request may be served on a prefill pod that predicts a better TTFT (see the module docs).
    pub colocate_on_prefill: bool,
    pub cost: CostModel,
}

impl Default for PdConfig {
    fn default() -> Self {
        Self {
            non_cached_tokens: 512,
            min_prompt_tokens: 0,
            ttft_margin_s: 0.5,
            transfer_base_s: 0.026,
            transfer_per_token_s: 4.25e-6,
            decode_step_s: 0.015,
            colocate_on_prefill: true,
            cost: CostModel::default(),
        }
    }
}

/// Where the request is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdChoice {
    /// The decode pod prefills and decodes.
    Colocated,
    /// Prefill on pool index `prefill`, then decode on the decode pod (`x-prefiller-host-port`).
    Disaggregated { prefill: usize },
}

/// Why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdReason {
    /// `non_cached_tokens` is 0.
    Disabled,
    /// Prompt shorter than `min_prompt_tokens`.
    ShortPrompt,
    /// Uncached suffix on the decode pod below `non_cached_tokens`.
    ShortUncached,
    /// No prefill pod passed the prefill profile.
    NoPrefillPod,
    /// P/D's predicted TTFT is worse than colocated by more than the margin.
    TtftWorse,
    /// P/D chosen.
    Disaggregate,
}

impl PdReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::ShortPrompt => "short-prompt",
            Self::ShortUncached => "short-uncached",
            Self::NoPrefillPod => "no-prefill-pod",
            Self::TtftWorse => "ttft-worse",
            Self::Disaggregate => "disaggregate",
        }
    }
}

/// The decision and its predictions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PdDecision {
    pub choice: PdChoice,
    pub reason: PdReason,
    /// Predicted TTFT served colocated on the decode pod, seconds.
    pub colocated_ttft_s: f64,
    /// Predicted TTFT through the prefill pod, when one was considered.
    pub disaggregated_ttft_s: Option<f64>,
    /// Declined and served whole on this prefill pod instead of the decode pod, with its predicted TTFT.
    pub on_prefill_pod: Option<(usize, f64)>,
}

impl PdDecision {
    /// Predicted TTFT of the chosen path.
    pub fn predicted_ttft_s(&self) -> f64 {
        match self.choice {
            PdChoice::Colocated => self
                .on_prefill_pod
                .map_or(self.colocated_ttft_s, |(_, t)| t),
            PdChoice::Disaggregated { .. } => {
                self.disaggregated_ttft_s.unwrap_or(self.colocated_ttft_s)
            }
        }
    }
}

impl PdConfig {
    /// Predicted KV pull time for `tokens`.
    pub fn transfer_s(&self, tokens: u32) -> f64 {
        self.transfer_base_s + self.transfer_per_token_s * f64::from(tokens)
    }

    /// llm-d's base rule on the decode pod's match; `Some(reason)` means colocated without looking further.
    pub fn precheck(&self, prompt_tokens: u32, decode_matched_tokens: u32) -> Option<PdReason> {
        if self.non_cached_tokens == 0 {
            Some(PdReason::Disabled)
        } else if prompt_tokens < self.min_prompt_tokens {
            Some(PdReason::ShortPrompt)
        } else if prompt_tokens.saturating_sub(decode_matched_tokens) < self.non_cached_tokens {
            Some(PdReason::ShortUncached)
        } else {
            None
        }
    }

    /// Full decision for a chosen decode pod and an optional prefill candidate (`(endpoint, matched tokens)`).
    pub fn decide(
        &self,
        prompt_tokens: u32,
        decode: &EndpointView,
        decode_matched_tokens: u32,
        prefill: Option<(&EndpointView, u32)>,
    ) -> PdDecision {
        let colocated = self
            .cost
            .ttft_s(decode, prompt_tokens, decode_matched_tokens);
        let colo = |reason, disagg| PdDecision {
            choice: PdChoice::Colocated,
            reason,
            colocated_ttft_s: colocated,
            disaggregated_ttft_s: disagg,
            on_prefill_pod: None,
        };
        if let Some(r) = self.precheck(prompt_tokens, decode_matched_tokens) {
            return colo(r, None);
        }
        let Some((p, p_matched)) = prefill else {
            return colo(PdReason::NoPrefillPod, None);
        };
        let disagg = self.cost.ttft_s(p, prompt_tokens, p_matched)
            + self.transfer_s(prompt_tokens.saturating_sub(decode_matched_tokens))
            + self.decode_step_s;
        if disagg > colocated + self.ttft_margin_s {
            return colo(PdReason::TtftWorse, Some(disagg));
        }
        PdDecision {
            choice: PdChoice::Disaggregated { prefill: p.index },
            reason: PdReason::Disaggregate,
            colocated_ttft_s: colocated,
            disaggregated_ttft_s: Some(disagg),
            on_prefill_pod: None,
        }
    }

    /// Where a declined request runs: the available prefill pod with the lowest predicted TTFT for the whole prompt,
    /// if that beats `colocated_ttft_s` (the decode pod's) by more than one decode step; `None` keeps it on the
    /// decode pod. Never for [`PdReason::Disabled`] (no P/D at all: the pool serves as llm-d's decode profile picks).
    pub fn place_declined(
        &self,
        decision: &PdDecision,
        prompt_tokens: u32,
        eps: &[EndpointView],
        facts: &RequestFacts,
    ) -> Option<(usize, f64)> {
        if !self.colocate_on_prefill
            || decision.choice != PdChoice::Colocated
            || decision.reason == PdReason::Disabled
        {
            return None;
        }
        eps.iter()
            .filter(|e| e.available && e.role == Role::Prefill)
            .map(|e| {
                let t = self.cost.ttft_s(
                    e,
                    prompt_tokens,
                    facts.matched_tokens(e.index, prompt_tokens),
                );
                (e.index, t)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|&(_, t)| t + self.decode_step_s < decision.colocated_ttft_s)
    }
}

/// Decode-first P/D routing over a pool with role-labelled pods.
#[derive(Debug, Clone, PartialEq)]
pub struct PdRouter {
    pub decode: Profile,
    pub prefill: Profile,
    pub cfg: PdConfig,
}

impl Default for PdRouter {
    fn default() -> Self {
        Self {
            decode: Profile::decode(),
            prefill: Profile::prefill(),
            cfg: PdConfig::default(),
        }
    }
}

/// Result of P/D routing.
#[derive(Debug, Clone, PartialEq)]
pub struct PdRouted {
    /// The decode profile's pick: the destination, unless a declined request was placed on a prefill pod.
    pub decode: Routed,
    /// The prefill pick, when the prefill profile ran.
    pub prefill: Option<Routed>,
    pub decision: PdDecision,
}

impl PdRouted {
    /// Pool index that serves the request (and streams its answer).
    pub fn destination(&self) -> usize {
        match (self.decision.choice, self.decision.on_prefill_pod) {
            (PdChoice::Colocated, Some((p, _))) => p,
            _ => self.decode.choice.index,
        }
    }
}

impl PdRouter {
    /// This router with the cost model's prefill throughput set to `tokens_per_s` (the decider's and both profiles'
    /// gates), e.g. the rate the router measured on its prefill legs.
    pub fn with_prefill_rate(&self, tokens_per_s: f64) -> Self {
        let mut r = self.clone();
        r.cfg.cost.prefill_tokens_per_s = tokens_per_s;
        for g in [&mut r.decode.gate, &mut r.prefill.gate]
            .into_iter()
            .flatten()
        {
            g.cost.prefill_tokens_per_s = tokens_per_s;
        }
        r
    }

    /// Picks the decode pod, then decides whether and where to prefill remotely.
    pub fn route(
        &self,
        req: &RequestView,
        eps: &[EndpointView],
        facts: &RequestFacts,
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Result<PdRouted, NoEligibleEndpoint> {
        let decode = self.decode.decide(req, eps, facts, now, rng)?;
        let prompt = LoadGate::prompt_tokens(req, facts);
        let d = decode.choice.index;
        let d_view = eps.iter().find(|e| e.index == d).copied().unwrap_or(eps[0]);
        let d_matched = facts.matched_tokens(d, prompt);
        if self.cfg.precheck(prompt, d_matched).is_some() {
            let mut decision = self.cfg.decide(prompt, &d_view, d_matched, None);
            decision.on_prefill_pod = self.cfg.place_declined(&decision, prompt, eps, facts);
            return Ok(PdRouted {
                decode,
                prefill: None,
                decision,
            });
        }
        let prefill = self.prefill.decide(req, eps, facts, now, rng).ok();
        let p_view = prefill
            .as_ref()
            .and_then(|r| eps.iter().find(|e| e.index == r.choice.index));
        let mut decision = self.cfg.decide(
            prompt,
            &d_view,
            d_matched,
            p_view.map(|p| (p, facts.matched_tokens(p.index, prompt))),
        );
        decision.on_prefill_pod = self.cfg.place_declined(&decision, prompt, eps, facts);
        Ok(PdRouted {
            decode,
            prefill,
            decision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Role, ScrapedLoad};
    use crate::testkit::{Seeded, now};

    /// An endpoint with `backlog` uncached prompt tokens in flight before their first token.
    fn ep(index: usize, role: Role, backlog: u64) -> EndpointView {
        EndpointView {
            index,
            role,
            available: true,
            in_flight: 0,
            in_flight_tokens: backlog,
            prefill_tokens: backlog,
            scraped: Some(ScrapedLoad {
                waiting: 0,
                running: 0,
                kv_usage: 0.2,
                age_ms: 5,
            }),
        }
    }

    fn facts(matched: Vec<u32>, blocks: u32) -> RequestFacts {
        RequestFacts {
            matched,
            total_blocks: blocks,
            block_size: 16,
            session_pod: None,
        }
    }

    #[test]
    fn long_uncached_prompt_on_idle_pools_is_disaggregated() {
        let eps = [
            ep(0, Role::Prefill, 0),
            ep(1, Role::Decode, 0),
            ep(2, Role::Decode, 0),
        ];
        let req = RequestView {
            prompt_tokens: 10_000,
            max_tokens: Some(1000),
        };
        let r = PdRouter::default()
            .route(&req, &eps, &facts(vec![], 625), now(), &mut Seeded(1))
            .unwrap();
        assert_eq!(r.decision.choice, PdChoice::Disaggregated { prefill: 0 });
        assert_ne!(r.decode.choice.index, 0, "the decode pod is decode-capable");
        let d = r.decision.disaggregated_ttft_s.unwrap();
        assert!(d > r.decision.colocated_ttft_s && d <= r.decision.colocated_ttft_s + 0.1);
    }

    #[test]
    fn declines_when_the_uncached_part_is_short() {
        let eps = [ep(0, Role::Prefill, 0), ep(1, Role::Decode, 0)];
        // 10,000-token prompt, all but 8 tokens cached on the decode pod.
        let req = RequestView {
            prompt_tokens: 10_008,
            max_tokens: None,
        };
        let r = PdRouter::default()
            .route(&req, &eps, &facts(vec![0, 625], 625), now(), &mut Seeded(1))
            .unwrap();
        assert_eq!(r.decision.choice, PdChoice::Colocated);
        assert_eq!(r.decision.reason, PdReason::ShortUncached);
        assert!(r.prefill.is_none(), "the prefill profile does not even run");
        let off = PdRouter {
            cfg: PdConfig {
                non_cached_tokens: 0,
                ..PdConfig::default()
            },
            ..PdRouter::default()
        };
        let r = off
            .route(&req, &eps, &facts(vec![], 625), now(), &mut Seeded(1))
            .unwrap();
        assert_eq!(r.decision.reason, PdReason::Disabled);
    }

    #[test]
    fn declines_when_the_prefill_pool_is_overloaded() {
        // Every prefill pod has ~30 s of queued prompt work.
        let eps = [
            ep(0, Role::Prefill, 500_000),
            ep(1, Role::Prefill, 480_000),
            ep(2, Role::Decode, 0),
        ];
        let req = RequestView {
            prompt_tokens: 10_000,
            max_tokens: None,
        };
        let r = PdRouter::default()
            .route(&req, &eps, &facts(vec![], 625), now(), &mut Seeded(1))
            .unwrap();
        assert_eq!(r.decision.choice, PdChoice::Colocated);
        assert_eq!(r.decision.reason, PdReason::TtftWorse);
        assert_eq!(
            r.prefill.as_ref().map(|p| p.choice.index),
            Some(1),
            "least-loaded prefill pod was considered"
        );
        // No prefill pods at all.
        let eps = [ep(0, Role::Decode, 0)];
        let r = PdRouter::default()
            .route(&req, &eps, &facts(vec![], 625), now(), &mut Seeded(1))
            .unwrap();
        assert_eq!(r.decision.reason, PdReason::NoPrefillPod);
    }

    #[test]
    fn the_kv_pull_covers_only_what_the_decode_pod_lacks() {
        let cfg = PdConfig::default();
        let (p, d) = (ep(0, Role::Prefill, 0), ep(1, Role::Decode, 0));
        // 8,192-token prompt, 6,144 tokens already cached on the decode pod (and on the prefill pod).
        let r = cfg.decide(8_192, &d, 6_144, Some((&p, 6_144)));
        assert_eq!(r.choice, PdChoice::Disaggregated { prefill: 0 });
        let expect = cfg.cost.prefill_s(2_048) + cfg.transfer_s(2_048) + cfg.decode_step_s;
        let got = r.disaggregated_ttft_s.unwrap();
        assert!((got - expect).abs() < 1e-9, "{got} vs {expect}");
        assert!(
            got < cfg.cost.prefill_s(2_048) + cfg.transfer_s(8_192) + cfg.decode_step_s,
            "the cached 6,144 tokens are not pulled again"
        );
    }

    #[test]
    fn the_margin_keeps_pd_through_a_short_prefill_queue_and_declines_a_long_one() {
        let req = RequestView {
            prompt_tokens: 8_192,
            max_tokens: Some(512),
        };
        let route = |prefill_backlog: u64| {
            let eps = [
                ep(0, Role::Prefill, prefill_backlog),
                ep(1, Role::Decode, 0),
            ];
            PdRouter::default()
                .route(&req, &eps, &facts(vec![], 512), now(), &mut Seeded(3))
                .unwrap()
                .decision
        };
        // One 4k-token prefill queued (~0.26 s at the default 15,928 tokens/s): still P/D.
        assert_eq!(route(4_096).reason, PdReason::Disaggregate);
        // Two 8k-token prefills queued (~1 s): P/D would cost more than the 0.5 s margin.
        let d = route(16_384);
        assert_eq!(d.reason, PdReason::TtftWorse);
        assert!(d.disaggregated_ttft_s.unwrap() > d.colocated_ttft_s + 0.5);
    }

    #[test]
    fn a_declined_request_may_run_on_an_idle_prefill_pod_that_holds_its_prefix() {
        let req = RequestView {
            prompt_tokens: 8_256,
            max_tokens: Some(256),
        };
        // A follow-up turn: its 8,192-token history is cached on decode pod 1 and prefill pod 0; 64 tokens are new.
        let f = facts(vec![512, 512, 0], 516);
        let route = |eps: &[EndpointView]| {
            PdRouter::default()
                .route(&req, eps, &f, now(), &mut Seeded(5))
                .unwrap()
        };
        // Both idle: served colocated on the decode pod (no TTFT gain from moving).
        let idle = [
            ep(0, Role::Prefill, 0),
            ep(1, Role::Decode, 0),
            ep(2, Role::Prefill, 0),
        ];
        let r = route(&idle);
        assert_eq!(r.decision.reason, PdReason::ShortUncached);
        assert_eq!(r.decision.on_prefill_pod, None);
        assert_eq!(r.destination(), 1);
        // The decode pod has 8k tokens of declined prefills queued: the idle prefill pod holding the prefix serves
        // it, not the idle one without it.
        let busy_decode = [
            ep(0, Role::Prefill, 0),
            ep(1, Role::Decode, 8_192),
            ep(2, Role::Prefill, 0),
        ];
        let r = route(&busy_decode);
        assert_eq!(r.decision.choice, PdChoice::Colocated);
        assert_eq!(r.destination(), 0, "{r:?}");
        let (_, t) = r.decision.on_prefill_pod.unwrap();
        assert!((r.decision.predicted_ttft_s() - t).abs() < 1e-12);
        // Unless the pool keeps declined requests on decode pods (llm-d's behaviour).
        let keep = PdRouter {
            cfg: PdConfig {
                colocate_on_prefill: false,
                ..PdConfig::default()
            },
            ..PdRouter::default()
        };
        let r = keep
            .route(&req, &busy_decode, &f, now(), &mut Seeded(5))
            .unwrap();
        assert_eq!((r.destination(), r.decision.on_prefill_pod), (1, None));
        // A prefill pod with its own queue is no better: the request stays on the decode pod.
        let busy_prefill = [
            ep(0, Role::Prefill, 16_384),
            ep(1, Role::Decode, 8_192),
            ep(2, Role::Prefill, 16_384),
        ];
        assert_eq!(route(&busy_prefill).destination(), 1);
    }

    #[test]
    fn the_measured_prefill_rate_sets_what_a_queued_prefill_costs() {
        let req = RequestView {
            prompt_tokens: 8_192,
            max_tokens: Some(512),
        };
        // One 8k-token prefill queued on the only prefill pod.
        let eps = [ep(0, Role::Prefill, 8_192), ep(1, Role::Decode, 0)];
        let f = facts(vec![], 512);
        let route = |r: &PdRouter| {
            r.route(&req, &eps, &f, now(), &mut Seeded(9))
                .unwrap()
                .decision
        };
        // At the configured 15,928 tokens/s the queued prefill reads as 0.51 s: past the margin.
        assert_eq!(route(&PdRouter::default()).reason, PdReason::TtftWorse);
        // At an H100's measured ~35,600 tokens/s it is 0.23 s: P/D.
        let h100 = PdRouter::default().with_prefill_rate(35_600.0);
        assert_eq!(route(&h100).reason, PdReason::Disaggregate);
        for g in [h100.decode.gate, h100.prefill.gate].into_iter().flatten() {
            assert_eq!(g.cost.prefill_tokens_per_s, 35_600.0);
        }
    }
}
