//! Load gate against herding: stop a hot prefix from piling every request onto the one pod that caches it.
//!
//! Cache-aware scoring alone sends every request sharing a prefix to the pod holding it, however long that pod's
//! backlog grows (sglang/vllm-router pin shared-prefix traffic to one worker below their imbalance threshold; llm-d
//! added an affinity "unstick" rule). The gate compares predicted time-to-first-token per candidate:
//!
//! ```text
//! wait_s(p)  = in_flight_tokens(p) / prefill_tokens_per_s  +  waiting(p) * queued_request_s
//! ttft_s(p)  = wait_s(p) + (prompt_tokens - matched_tokens(p)) / prefill_tokens_per_s
//! ```
//!
//! i.e. a pod's backlog (router-tracked in-flight tokens, an upper bound on its outstanding uncached prefill work,
//! plus its scraped queue) against its cache saving (matched tokens x per-token prefill cost). Any pod with a prefix
//! hit whose `ttft_s` exceeds the best candidate's by more than `margin_s` is scored as if it had no hit (its match is
//! zeroed before the `prefix-cache` scorer is built), so load scorers decide and the request lands elsewhere. The
//! router then records the new pod in the prefix index too: the hot prefix is replicated to a second pod, and the
//! following requests choose between the replicas by load. With an idle fleet every backlog is 0 and the hit holder
//! has the lowest `ttft_s`, so affinity is kept.
//!
//! Defaults: `prefill_tokens_per_s` 15,928 (llm-d's token-aware estimate), `queued_request_s` 10 ms (about one engine
//! step per queued request), `margin_s` 0.1 s (llm-d's unstick threshold is 18 s, which lets queues grow far longer).
//! Pure and deterministic: no clock, no randomness.

use super::RequestView;
use super::prefix::RequestFacts;
use crate::endpoint::EndpointView;

/// Cost model shared by the gate and the P/D decider.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Prefill throughput estimate of one pod, tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Extra wait per request in the engine's queue, seconds.
    pub queued_request_s: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            prefill_tokens_per_s: 15_928.0,
            queued_request_s: 0.010,
        }
    }
}

impl CostModel {
    /// Predicted wait before a new request's prefill starts on `ep`.
    pub fn wait_s(&self, ep: &EndpointView) -> f64 {
        ep.in_flight_tokens as f64 / self.prefill_tokens_per_s.max(1.0)
            + ep.queue() as f64 * self.queued_request_s
    }

    /// Prefill time of `tokens` uncached tokens.
    pub fn prefill_s(&self, tokens: u32) -> f64 {
        f64::from(tokens) / self.prefill_tokens_per_s.max(1.0)
    }

    /// Predicted TTFT on `ep` for a prompt of which `matched_tokens` are cached there.
    pub fn ttft_s(&self, ep: &EndpointView, prompt_tokens: u32, matched_tokens: u32) -> f64 {
        self.wait_s(ep) + self.prefill_s(prompt_tokens.saturating_sub(matched_tokens))
    }
}

/// Gate knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadGate {
    pub cost: CostModel,
    /// How much worse (seconds of predicted TTFT) a cache hit may be than the best candidate before it is ignored.
    pub margin_s: f64,
}

impl Default for LoadGate {
    fn default() -> Self {
        Self {
            cost: CostModel::default(),
            margin_s: 0.1,
        }
    }
}

/// What the gate did, for decision records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateOutcome {
    /// Pool indices whose prefix hit was dropped, with the blocks they had matched.
    pub gated: Vec<(usize, u32)>,
    /// Lowest predicted TTFT among candidates, seconds.
    pub best_ttft_s: f64,
}

impl LoadGate {
    /// The prompt length the cost model uses: the router's estimate, but never less than the hashed full blocks.
    pub fn prompt_tokens(req: &RequestView, facts: &RequestFacts) -> u32 {
        req.prompt_tokens
            .max(facts.total_blocks.saturating_mul(facts.block_size))
    }

    /// Zeroes the prefix match of every hit holder whose predicted TTFT is more than `margin_s` worse than the best
    /// available candidate's. Unavailable endpoints are ignored.
    pub fn apply(
        &self,
        req: &RequestView,
        eps: &[EndpointView],
        facts: &mut RequestFacts,
    ) -> GateOutcome {
        let prompt = Self::prompt_tokens(req, facts);
        let ttft = |e: &EndpointView| {
            self.cost
                .ttft_s(e, prompt, facts.matched_tokens(e.index, prompt))
        };
        let best = eps
            .iter()
            .filter(|e| e.available)
            .map(ttft)
            .fold(f64::INFINITY, f64::min);
        let mut out = GateOutcome {
            gated: Vec::new(),
            best_ttft_s: if best.is_finite() { best } else { 0.0 },
        };
        if !best.is_finite() {
            return out;
        }
        let over: Vec<usize> = eps
            .iter()
            .filter(|e| e.available && facts.matched(e.index) > 0 && ttft(e) > best + self.margin_s)
            .map(|e| e.index)
            .collect();
        for i in over {
            out.gated.push((i, facts.matched(i)));
            if let Some(m) = facts.matched.get_mut(i) {
                *m = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Role;

    fn ep(index: usize, in_flight_tokens: u64) -> EndpointView {
        EndpointView {
            index,
            role: Role::Both,
            available: true,
            in_flight: 0,
            in_flight_tokens,
            scraped: None,
        }
    }

    fn facts(matched: Vec<u32>) -> RequestFacts {
        RequestFacts {
            matched,
            total_blocks: 256,
            block_size: 16,
            session_pod: None,
        }
    }

    #[test]
    fn idle_holder_keeps_its_hit() {
        let mut f = facts(vec![256, 0, 0]);
        let req = RequestView {
            prompt_tokens: 4096,
            max_tokens: None,
        };
        let g = LoadGate::default().apply(&req, &[ep(0, 0), ep(1, 0), ep(2, 0)], &mut f);
        assert!(g.gated.is_empty());
        assert_eq!(f.matched[0], 256);
    }

    #[test]
    fn overloaded_holder_loses_its_hit_when_backlog_exceeds_the_saving() {
        let req = RequestView {
            prompt_tokens: 4096,
            max_tokens: None,
        };
        // Backlog 40k tokens vs a 4k-token saving: ~2.3 s worse.
        let mut f = facts(vec![256, 0]);
        let g = LoadGate::default().apply(&req, &[ep(0, 40_000), ep(1, 0)], &mut f);
        assert_eq!(g.gated, vec![(0, 256)]);
        assert_eq!(f.matched[0], 0);
        // Backlog 4.5k tokens vs a 4k saving: within the 0.1 s margin, affinity kept.
        let mut f = facts(vec![256, 0]);
        let g = LoadGate::default().apply(&req, &[ep(0, 4_500), ep(1, 0)], &mut f);
        assert!(g.gated.is_empty());
    }
}
