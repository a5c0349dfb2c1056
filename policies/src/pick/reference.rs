//! The selection code as it was before the decision path lost its copies, boxes and indirect calls (filter by
//! `to_vec` + `retain`, boxed per-request scorers, the gate zeroing a cloned [`RequestFacts`]), kept for tests only:
//! property tests check that [`super::Pipeline::select`] and [`super::profile::Profile::decide`] still decide exactly
//! as this does, RNG draws included.

use std::time::Instant;

use rand_core::RngCore;

use super::active_request::ActiveRequest;
use super::load_gate::{GateOutcome, LoadGate};
use super::prefix::RequestFacts;
use super::profile::{PrefillOnly, Profile, RoleFilter, Routed};
use super::scorers::{
    Available, DecodeCapable, KvCacheUtilization, PrefillBacklog, Queue, TokenLoad,
};
use super::session::SessionAffinity;
use super::{
    Choice, Filter, NoEligibleEndpoint, Picker, RequestView, Scorer, Weighted, max_score, uniform,
    weighted_random,
};
use crate::endpoint::EndpointView;

/// `Pipeline::select` before: `filters` must start with `available`, as `Pipeline::new` puts it.
pub fn select(
    filters: &[Box<dyn Filter>],
    scorers: &[Weighted],
    picker: &Picker,
    req: &RequestView,
    eps: &[EndpointView],
    now: Instant,
    rng: &mut dyn RngCore,
) -> Result<Choice, NoEligibleEndpoint> {
    if eps.is_empty() {
        return Err(NoEligibleEndpoint::Empty);
    }
    let mut cands: Vec<EndpointView> = eps.to_vec();
    for f in filters {
        cands.retain(|e| f.keep(req, e));
        if cands.is_empty() {
            return Err(NoEligibleEndpoint::Filtered { by: f.name() });
        }
    }
    let n = cands.len();
    let mut raw = vec![0.0; scorers.len() * n];
    let mut totals = vec![0.0; n];
    for (s, w) in scorers.iter().enumerate() {
        let out = &mut raw[s * n..(s + 1) * n];
        w.scorer.score(req, &cands, now, out);
        for (i, v) in out.iter_mut().enumerate() {
            *v = if v.is_finite() {
                v.clamp(0.0, 1.0)
            } else {
                0.0
            };
            totals[i] += w.weight * *v;
        }
    }
    let pos = match picker {
        Picker::RoundRobin(cursor) => {
            (cursor.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n as u64) as usize
        }
        Picker::Random => uniform(rng, n),
        Picker::MaxScore => max_score(&totals, rng),
        Picker::WeightedRandom => weighted_random(&totals, rng),
        Picker::PowerOfTwo => {
            if n == 1 {
                0
            } else {
                let a = uniform(rng, n);
                let mut b = uniform(rng, n - 1);
                if b >= a {
                    b += 1;
                }
                let (oa, ob) = (cands[a].outstanding(), cands[b].outstanding());
                if ob < oa || (ob == oa && totals[b] > totals[a]) {
                    b
                } else {
                    a
                }
            }
        }
    };
    Ok(Choice {
        index: cands[pos].index,
        total: totals[pos],
        scores: scorers
            .iter()
            .enumerate()
            .map(|(s, w)| (w.scorer.name(), raw[s * n + pos]))
            .collect(),
    })
}

/// `LoadGate::apply` before.
pub fn gate_apply(
    g: &LoadGate,
    req: &RequestView,
    eps: &[EndpointView],
    facts: &mut RequestFacts,
) -> GateOutcome {
    let prompt = LoadGate::prompt_tokens(req, facts);
    let ttft = |e: &EndpointView| {
        g.cost
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
    let least = eps
        .iter()
        .filter(|e| e.available)
        .map(EndpointView::outstanding)
        .min()
        .unwrap_or(0);
    let imbalanced = |e: &EndpointView| {
        let load = e.outstanding();
        load.saturating_sub(least) > LoadGate::IMBALANCE_ABS
            && load as f64 > LoadGate::IMBALANCE_REL * least as f64
    };
    let overloaded =
        |e: &EndpointView| e.outstanding().saturating_sub(least) > LoadGate::OVERLOAD_ABS;
    let over: Vec<usize> = eps
        .iter()
        .filter(|e| {
            e.available
                && facts.matched(e.index) > 0
                && imbalanced(e)
                && (ttft(e) > best + g.margin_s || overloaded(e))
        })
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

/// The `prefix-cache` scorer before: it owned a copy of the matches.
#[derive(Debug)]
struct OwnedPrefixCache {
    matched: Vec<u32>,
    total: u32,
}

impl Scorer for OwnedPrefixCache {
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

fn role_filter(p: &Profile) -> Option<Box<dyn Filter>> {
    match p.role {
        RoleFilter::Any => None,
        RoleFilter::DecodeCapable => Some(Box::new(DecodeCapable)),
        RoleFilter::PrefillOnly => Some(Box::new(PrefillOnly)),
    }
}

fn scorers(p: &Profile, matched: Vec<u32>, facts: &RequestFacts) -> Vec<Weighted> {
    let w = &p.weights;
    let mut v: Vec<Weighted> = Vec::with_capacity(6);
    let mut push = |weight: f64, scorer: Box<dyn Scorer>| {
        if weight > 0.0 {
            v.push(Weighted { scorer, weight });
        }
    };
    push(
        w.prefix,
        Box::new(OwnedPrefixCache {
            matched,
            total: facts.total_blocks,
        }),
    );
    push(w.queue, Box::new(Queue));
    push(w.kv, Box::new(KvCacheUtilization));
    push(w.token_load, Box::new(TokenLoad));
    push(w.prefill_backlog, Box::new(PrefillBacklog));
    push(w.active_request, Box::new(ActiveRequest));
    push(
        w.session,
        Box::new(SessionAffinity {
            pod: facts.session_pod,
        }),
    );
    v
}

/// `Profile::decide` before.
pub fn decide(
    p: &Profile,
    req: &RequestView,
    eps: &[EndpointView],
    facts: &RequestFacts,
    now: Instant,
    rng: &mut dyn RngCore,
) -> Result<Routed, NoEligibleEndpoint> {
    let (matched, gate) = match &p.gate {
        Some(g) if p.weights.prefix > 0.0 => {
            let mut f = facts.clone();
            let out = match role_filter(p) {
                Some(r) if !eps.iter().all(|e| r.keep(req, e)) => {
                    let mine: Vec<EndpointView> =
                        eps.iter().filter(|e| r.keep(req, e)).copied().collect();
                    gate_apply(g, req, &mine, &mut f)
                }
                _ => gate_apply(g, req, eps, &mut f),
            };
            (f.matched, out)
        }
        _ => (facts.matched.clone(), GateOutcome::default()),
    };
    let mut filters: Vec<Box<dyn Filter>> = vec![Box::new(Available)];
    filters.extend(role_filter(p));
    let choice = select(
        &filters,
        &scorers(p, matched, facts),
        &Picker::MaxScore,
        req,
        eps,
        now,
        rng,
    )?;
    Ok(Routed {
        choice,
        gate,
        predicted: None,
    })
}
