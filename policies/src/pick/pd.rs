//! P/D decider: serve a request colocated on its decode pod, or disaggregated (prefill pod -> KV transfer -> decode).
//!
//! Decode-first, as llm-d's `disagg-profile-handler`: the decode profile ([`Profile::decode`], kv + active-request)
//! picks the decode pod; then the base rule of llm-d's `prefix-based-pd-decider` reads that pod's prefix match and
//! goes on only if the **uncached suffix >= `non_cached_tokens`** (0 disables P/D; llm-d's samples use 16 or 8) and the
//! prompt has at least `min_prompt_tokens`. The prefill profile ([`Profile::prefill`], prefix + queue + token-load,
//! gated against herding) then picks a prefill pod, and a TTFT model compares the two paths:
//!
//! ```text
//! colocated    = wait(decode) + prefill(prompt - matched(decode))
//! disaggregated = wait(prefill) + prefill(prompt - matched(prefill)) + transfer(prompt) + decode_step
//! transfer(n)  = 26 ms + 4.25 us x n       (the sim's NIXL peer-pull model, fit to llm-d's timings)
//! ```
//!
//! with `wait`/`prefill` from the shared [`CostModel`]. P/D is never chosen when `disaggregated > colocated +
//! ttft_margin_s` (default 100 ms: the TTFT weir will trade for keeping long prefills off decode pods; llm-d accepts
//! "slightly higher TTFT" for the same reason). An overloaded prefill pool therefore falls back to colocated.

use std::time::Instant;

use rand_core::RngCore;

use super::load_gate::{CostModel, LoadGate};
use super::prefix::RequestFacts;
use super::profile::{Profile, Routed};
use super::{NoEligibleEndpoint, RequestView};
use crate::endpoint::EndpointView;

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
    /// One decode step on the decode pod after the pull (the first token), seconds.
    pub decode_step_s: f64,
    pub cost: CostModel,
}

impl Default for PdConfig {
    fn default() -> Self {
        Self {
            non_cached_tokens: 16,
            min_prompt_tokens: 0,
            ttft_margin_s: 0.1,
            transfer_base_s: 0.026,
            transfer_per_token_s: 4.25e-6,
            decode_step_s: 0.015,
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
}

impl PdDecision {
    /// Predicted TTFT of the chosen path.
    pub fn predicted_ttft_s(&self) -> f64 {
        match self.choice {
            PdChoice::Colocated => self.colocated_ttft_s,
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
        };
        if let Some(r) = self.precheck(prompt_tokens, decode_matched_tokens) {
            return colo(r, None);
        }
        let Some((p, p_matched)) = prefill else {
            return colo(PdReason::NoPrefillPod, None);
        };
        let disagg = self.cost.ttft_s(p, prompt_tokens, p_matched)
            + self.transfer_s(prompt_tokens)
            + self.decode_step_s;
        if disagg > colocated + self.ttft_margin_s {
            return colo(PdReason::TtftWorse, Some(disagg));
        }
        PdDecision {
            choice: PdChoice::Disaggregated { prefill: p.index },
            reason: PdReason::Disaggregate,
            colocated_ttft_s: colocated,
            disaggregated_ttft_s: Some(disagg),
        }
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
    /// The decode pod (the request's destination either way).
    pub decode: Routed,
    /// The prefill pick, when the prefill profile ran.
    pub prefill: Option<Routed>,
    pub decision: PdDecision,
}

impl PdRouter {
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
            let decision = self.cfg.decide(prompt, &d_view, d_matched, None);
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
        let decision = self.cfg.decide(
            prompt,
            &d_view,
            d_matched,
            p_view.map(|p| (p, facts.matched_tokens(p.index, prompt))),
        );
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

    fn ep(index: usize, role: Role, in_flight_tokens: u64) -> EndpointView {
        EndpointView {
            index,
            role,
            available: true,
            in_flight: 0,
            in_flight_tokens,
            prefill_tokens: in_flight_tokens,
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
}
