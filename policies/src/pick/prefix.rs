//! `prefix-cache` scorer: how much of the request's prompt a pod already holds in its KV cache.
//!
//! Score = `matched / total` full blocks, where `matched` is the pod's run of consecutive blocks from block 0 in a
//! prefix index (approximate or precise, see [`crate::prefix`]) and `total` the request's full blocks; 0 when the
//! prompt has no full block. llm-d's optional squared-token term (`w*min(1, tokens/8192)^2`) is not applied (its
//! default weight is 0). The matches are per request, so this scorer is built per request from [`RequestFacts`]
//! (see [`super::profile`]); the load gate ([`super::load_gate`]) may zero a pod's match before it is built.

use std::time::Instant;

use super::{RequestView, Scorer};
use crate::endpoint::EndpointView;

/// Per-request facts the cache-aware scorers read, aligned with [`EndpointView::index`] (the router's pool index).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFacts {
    /// `matched[i]` = blocks pool endpoint `i` holds consecutively from block 0 (missing entries count 0).
    pub matched: Vec<u32>,
    /// Full blocks in the request's prompt.
    pub total_blocks: u32,
    /// Tokens per block of the index that produced `matched`.
    pub block_size: u32,
    /// Pool index of the pod that served this request's session (`x-session-id`), if any and still present.
    pub session_pod: Option<usize>,
}

impl RequestFacts {
    /// Matched blocks of pool endpoint `index`.
    pub fn matched(&self, index: usize) -> u32 {
        self.matched.get(index).copied().unwrap_or(0)
    }

    /// Matched tokens of pool endpoint `index`, capped at the prompt length.
    pub fn matched_tokens(&self, index: usize, prompt_tokens: u32) -> u32 {
        (self.matched(index).saturating_mul(self.block_size)).min(prompt_tokens)
    }
}

/// Prefers pods holding more of the prompt's prefix.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrefixCache<'a> {
    /// Matched blocks by pool index, borrowed from the request's facts (or the gate's copy of them): the scorer lives
    /// for one decision, and copying 4 bytes per pool endpoint into it was a measurable share of a decision.
    matched: &'a [u32],
    /// Request's full blocks.
    total: u32,
}

impl<'a> PrefixCache<'a> {
    /// From per-pool-index matched blocks and the request's full-block count.
    pub fn new(matched: &'a [u32], total: u32) -> Self {
        Self { matched, total }
    }
}

impl Scorer for PrefixCache<'_> {
    fn name(&self) -> &'static str {
        "prefix-cache"
    }
    fn score(&self, _req: &RequestView, eps: &[EndpointView], _now: Instant, out: &mut [f64]) {
        for (slot, e) in out.iter_mut().zip(eps) {
            let m = self.matched.get(e.index).copied().unwrap_or(0);
            *slot = if self.total == 0 {
                0.0
            } else {
                (f64::from(m) / f64::from(self.total)).min(1.0)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Role;

    fn ep(index: usize) -> EndpointView {
        EndpointView {
            index,
            role: Role::Both,
            available: true,
            in_flight: 0,
            in_flight_tokens: 0,
            prefill_tokens: 0,
            scraped: None,
        }
    }

    #[test]
    fn scores_matched_over_total_by_pool_index() {
        let facts = RequestFacts {
            matched: vec![0, 4, 8],
            total_blocks: 8,
            block_size: 16,
            session_pod: None,
        };
        let s = PrefixCache::new(&facts.matched, facts.total_blocks);
        let mut out = [9.0; 4];
        let now = crate::testkit::now();
        s.score(
            &RequestView::default(),
            &[ep(2), ep(1), ep(0), ep(7)],
            now,
            &mut out,
        );
        assert_eq!(out, [1.0, 0.5, 0.0, 0.0]);
        let empty = PrefixCache::new(&[], 0);
        empty.score(&RequestView::default(), &[ep(0)], now, &mut out[..1]);
        assert_eq!(out[0], 0.0);
    }
}
