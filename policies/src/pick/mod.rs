//! Endpoint selection as a pure pipeline: filter -> score -> pick.
//!
//! Each stage is a small plugin over a borrowed slice of [`EndpointView`]s: [`Filter`]s drop candidates that must not
//! be used, [`Scorer`]s give each survivor a score in `[0, 1]` (total = sum of weight x score, llm-d's convention), and
//! a [`Picker`] chooses one. Nothing here reads a clock or global randomness: `now` and the RNG are arguments, so a
//! seeded RNG replays a decision exactly. The returned [`Choice`] carries every scorer's score for the chosen endpoint
//! so the router can write decision records. Cache-aware scorers and P/D filters plug in by implementing the traits.
//!
//! Baseline policies (see [`Policy`]): round-robin, random, least-requests (router in-flight, min-max scored),
//! power-of-two-choices (two distinct random candidates, the one with fewer outstanding requests wins).

pub mod active_request;
pub mod breaker;
pub mod budget;
pub mod load_gate;
pub mod pd;
pub mod predicted_ttft;
pub mod prefix;
pub mod profile;
#[cfg(test)]
mod reference;
pub mod scorers;
pub mod session;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rand_core::RngCore;

use crate::endpoint::EndpointView;

/// What a request needs from an endpoint, as far as scheduling cares.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RequestView {
    /// Estimated prompt tokens (weir's byte-based estimate), for token-load scorers.
    pub prompt_tokens: u32,
    /// Requested output cap, when the client gave one.
    pub max_tokens: Option<u32>,
}

/// A hard constraint: candidates for which `keep` is false are never picked.
pub trait Filter: Send + Sync + fmt::Debug {
    fn name(&self) -> &'static str;
    fn keep(&self, req: &RequestView, ep: &EndpointView) -> bool;
}

/// A soft preference: writes one score in `[0, 1]` per candidate into `out` (same length and order as `eps`).
pub trait Scorer: Send + Sync + fmt::Debug {
    fn name(&self) -> &'static str;
    fn score(&self, req: &RequestView, eps: &[EndpointView], now: Instant, out: &mut [f64]);
}

impl<S: Scorer + ?Sized> Scorer for &S {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn score(&self, req: &RequestView, eps: &[EndpointView], now: Instant, out: &mut [f64]) {
        (**self).score(req, eps, now, out);
    }
}

/// How the final endpoint is chosen among filtered candidates.
#[derive(Debug)]
pub enum Picker {
    /// Highest total score; ties broken uniformly at random (llm-d's `max-score`).
    MaxScore,
    /// Uniform over candidates, scores ignored.
    Random,
    /// A-Res reservoir on total score (key `u^(1/score)`); all-zero scores fall back to uniform.
    WeightedRandom,
    /// Next candidate in turn; the cursor survives snapshot swaps because the pipeline is shared by `Arc`.
    RoundRobin(AtomicU64),
    /// Two distinct random candidates; fewer [`EndpointView::outstanding`] wins, then higher score, then the first.
    PowerOfTwo,
}

/// The baseline policies by name, as config spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    RoundRobin,
    Random,
    LeastRequests,
    PowerOfTwo,
}

impl Policy {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "round-robin" | "round_robin" => Some(Self::RoundRobin),
            "random" => Some(Self::Random),
            "least-requests" | "least_requests" => Some(Self::LeastRequests),
            "power-of-two" | "power_of_two" => Some(Self::PowerOfTwo),
            _ => None,
        }
    }
}

/// A scorer with its weight in the total.
#[derive(Debug)]
pub struct Weighted {
    pub scorer: Box<dyn Scorer>,
    pub weight: f64,
}

/// The result of a selection: which endpoint, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// [`EndpointView::index`] of the chosen endpoint.
    pub index: usize,
    /// Weighted total score of the chosen endpoint (0 when no scorers ran).
    pub total: f64,
    /// Each scorer's raw score for the chosen endpoint, in pipeline order, for decision records.
    pub scores: Vec<(&'static str, f64)>,
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoEligibleEndpoint {
    /// The pool has no endpoints at all.
    Empty,
    /// Every endpoint was removed by the named filter (the first filter that emptied the set).
    Filtered { by: &'static str },
}

impl fmt::Display for NoEligibleEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("no endpoints in pool"),
            Self::Filtered { by } => write!(f, "no endpoint passed filter `{by}`"),
        }
    }
}

impl std::error::Error for NoEligibleEndpoint {}

/// Filter -> score -> pick. Shared (`&self`) across requests; only the round-robin cursor mutates, atomically.
#[derive(Debug)]
pub struct Pipeline {
    filters: Vec<Box<dyn Filter>>,
    scorers: Vec<Weighted>,
    picker: Picker,
}

impl Pipeline {
    /// A pipeline with the [`scorers::Available`] filter first (circuit breaker), then the given stages.
    pub fn new(filters: Vec<Box<dyn Filter>>, scorers: Vec<Weighted>, picker: Picker) -> Self {
        let mut all: Vec<Box<dyn Filter>> = vec![Box::new(scorers::Available)];
        all.extend(filters);
        Self {
            filters: all,
            scorers,
            picker,
        }
    }

    /// The pipeline for a baseline policy.
    pub fn baseline(policy: Policy) -> Self {
        // Every baseline serves whole requests, so prefill-only pods are never candidates (a P/D pool routed by a
        // baseline policy sends everything to its decode-capable pods).
        let f = || -> Vec<Box<dyn Filter>> { vec![Box::new(scorers::DecodeCapable)] };
        match policy {
            Policy::RoundRobin => Self::new(f(), vec![], Picker::RoundRobin(AtomicU64::new(0))),
            Policy::Random => Self::new(f(), vec![], Picker::Random),
            Policy::LeastRequests => Self::new(
                f(),
                vec![Weighted {
                    scorer: Box::new(scorers::LeastRequests),
                    weight: 1.0,
                }],
                Picker::MaxScore,
            ),
            Policy::PowerOfTwo => Self::new(f(), vec![], Picker::PowerOfTwo),
        }
    }

    /// Names of the stages, for `/debug/routes`.
    pub fn describe(&self) -> String {
        let f: Vec<&str> = self.filters.iter().map(|f| f.name()).collect();
        let s: Vec<String> = self
            .scorers
            .iter()
            .map(|w| format!("{}x{}", w.scorer.name(), w.weight))
            .collect();
        let p = match self.picker {
            Picker::MaxScore => "max-score",
            Picker::Random => "random",
            Picker::WeightedRandom => "weighted-random",
            Picker::RoundRobin(_) => "round-robin",
            Picker::PowerOfTwo => "power-of-two",
        };
        format!(
            "filters=[{}] scorers=[{}] picker={p}",
            f.join(","),
            s.join(",")
        )
    }

    /// Chooses one endpoint from `eps`. Deterministic for a given RNG state, `now` and round-robin cursor.
    pub fn select(
        &self,
        req: &RequestView,
        eps: &[EndpointView],
        now: Instant,
        rng: &mut dyn RngCore,
    ) -> Result<Choice, NoEligibleEndpoint> {
        if eps.is_empty() {
            return Err(NoEligibleEndpoint::Empty);
        }
        // Usually every endpoint passes: score the caller's slice instead of a filtered copy.
        let all = eps
            .iter()
            .all(|e| self.filters.iter().all(|f| f.keep(req, e)));
        let owned: Vec<EndpointView>;
        let cands = if all {
            eps
        } else {
            let mut c = eps.to_vec();
            for f in &self.filters {
                c.retain(|e| f.keep(req, e));
                if c.is_empty() {
                    return Err(NoEligibleEndpoint::Filtered { by: f.name() });
                }
            }
            owned = c;
            &owned
        };
        let scorers = self.scorers.iter().map(|w| (&*w.scorer, w.weight));
        Ok(score_and_pick(scorers, &self.picker, req, cands, now, rng))
    }
}

/// The score and pick stages over filtered, non-empty `cands`: each weighted scorer's raw scores (clamped to
/// `[0, 1]`, non-finite as 0) summed into totals in scorer order, then the picker. Shared by [`Pipeline::select`]
/// and [`profile::Profile::decide`], which builds its scorers per request without boxing them.
pub(crate) fn score_and_pick<S: Scorer>(
    scorers: impl Iterator<Item = (S, f64)> + Clone,
    picker: &Picker,
    req: &RequestView,
    cands: &[EndpointView],
    now: Instant,
    rng: &mut dyn RngCore,
) -> Choice {
    let n = cands.len();
    let k = scorers.clone().count();
    // Per-scorer raw scores, scorer-major (raw[s * n + i]), then the totals: one allocation.
    let mut buf = vec![0.0; (k + 1) * n];
    let (raw, totals) = buf.split_at_mut(k * n);
    for (s, (scorer, weight)) in scorers.clone().enumerate() {
        let out = &mut raw[s * n..(s + 1) * n];
        scorer.score(req, cands, now, out);
        for (v, t) in out.iter_mut().zip(totals.iter_mut()) {
            *v = if v.is_finite() {
                v.clamp(0.0, 1.0)
            } else {
                0.0
            };
            *t += weight * *v;
        }
    }
    let pos = match picker {
        Picker::RoundRobin(cursor) => (cursor.fetch_add(1, Ordering::Relaxed) % n as u64) as usize,
        Picker::Random => uniform(rng, n),
        Picker::MaxScore => max_score(totals, rng),
        Picker::WeightedRandom => weighted_random(totals, rng),
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
    Choice {
        index: cands[pos].index,
        total: totals[pos],
        scores: scorers
            .enumerate()
            .map(|(s, (scorer, _))| (scorer.name(), raw[s * n + pos]))
            .collect(),
    }
}

/// Uniform integer in `0..n` (n > 0) by multiply-shift; bias is below 2^-32 for any realistic pool.
pub fn uniform(rng: &mut dyn RngCore, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// Uniform float in `[0, 1)` with 53 random bits.
pub fn unit(rng: &mut dyn RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn max_score(totals: &[f64], rng: &mut dyn RngCore) -> usize {
    // Reservoir over the ties so each tied candidate is equally likely and only ties consume randomness.
    let mut best = 0;
    let mut ties = 1usize;
    for i in 1..totals.len() {
        if totals[i] > totals[best] {
            best = i;
            ties = 1;
        } else if totals[i] == totals[best] {
            ties += 1;
            if uniform(rng, ties) == 0 {
                best = i;
            }
        }
    }
    best
}

fn weighted_random(totals: &[f64], rng: &mut dyn RngCore) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, &s) in totals.iter().enumerate() {
        if s <= 0.0 {
            continue;
        }
        let key = unit(rng).powf(1.0 / s);
        if best.is_none_or(|(_, k)| key > k) {
            best = Some((i, key));
        }
    }
    match best {
        Some((i, _)) => i,
        None => uniform(rng, totals.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Role, ScrapedLoad};
    use crate::testkit::{Seeded, now};
    use proptest::prelude::*;

    fn ep(index: usize, in_flight: u32, available: bool) -> EndpointView {
        EndpointView {
            index,
            role: Role::Both,
            available,
            in_flight,
            in_flight_tokens: 0,
            prefill_tokens: 0,
            scraped: None,
        }
    }

    #[test]
    fn baselines_never_send_whole_requests_to_prefill_pods() {
        let mut eps: Vec<EndpointView> = (0..4).map(|i| ep(i, 0, true)).collect();
        eps[0].role = Role::Prefill;
        eps[2].role = Role::Prefill;
        eps[3].role = Role::Decode;
        let req = RequestView {
            prompt_tokens: 10,
            max_tokens: Some(4),
        };
        let mut rng = Seeded(7);
        for policy in [
            Policy::RoundRobin,
            Policy::Random,
            Policy::LeastRequests,
            Policy::PowerOfTwo,
        ] {
            let p = Pipeline::baseline(policy);
            for _ in 0..50 {
                let c = p
                    .select(&req, &eps, now(), &mut rng)
                    .expect("a decode-capable pod exists");
                assert!(
                    c.index == 1 || c.index == 3,
                    "{policy:?} picked prefill pod {}",
                    c.index
                );
            }
        }
        let only_prefill = vec![EndpointView {
            role: Role::Prefill,
            ..ep(0, 0, true)
        }];
        let p = Pipeline::baseline(Policy::RoundRobin);
        assert_eq!(
            p.select(&req, &only_prefill, now(), &mut rng).err(),
            Some(NoEligibleEndpoint::Filtered {
                by: "decode-capable"
            })
        );
    }

    #[test]
    fn round_robin_cycles_through_available_endpoints() {
        let p = Pipeline::baseline(Policy::RoundRobin);
        let eps = [ep(0, 0, true), ep(1, 0, false), ep(2, 0, true)];
        let mut rng = Seeded(1);
        let t = now();
        let picks: Vec<usize> = (0..4)
            .map(|_| {
                p.select(&RequestView::default(), &eps, t, &mut rng)
                    .unwrap()
                    .index
            })
            .collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
    }

    #[test]
    fn least_requests_picks_the_idlest() {
        let p = Pipeline::baseline(Policy::LeastRequests);
        let eps = [ep(0, 5, true), ep(1, 1, true), ep(2, 3, true)];
        let c = p
            .select(&RequestView::default(), &eps, now(), &mut Seeded(7))
            .unwrap();
        assert_eq!(c.index, 1);
        assert_eq!(c.scores, vec![("least-requests", 1.0)]);
    }

    #[test]
    fn power_of_two_never_picks_the_busiest_of_two() {
        let p = Pipeline::baseline(Policy::PowerOfTwo);
        let eps = [ep(0, 9, true), ep(1, 0, true)];
        for seed in 0..50 {
            assert_eq!(
                p.select(&RequestView::default(), &eps, now(), &mut Seeded(seed))
                    .unwrap()
                    .index,
                1
            );
        }
    }

    #[test]
    fn power_of_two_uses_scraped_queue_when_larger() {
        let p = Pipeline::baseline(Policy::PowerOfTwo);
        let busy = ScrapedLoad {
            waiting: 10,
            running: 20,
            kv_usage: 0.5,
            age_ms: 5,
        };
        let eps = [
            EndpointView {
                scraped: Some(busy),
                ..ep(0, 1, true)
            },
            ep(1, 2, true),
        ];
        assert_eq!(
            p.select(&RequestView::default(), &eps, now(), &mut Seeded(3))
                .unwrap()
                .index,
            1
        );
    }

    #[test]
    fn all_breakers_open_is_an_error_naming_the_filter() {
        let p = Pipeline::baseline(Policy::Random);
        let eps = [ep(0, 0, false), ep(1, 0, false)];
        let e = p
            .select(&RequestView::default(), &eps, now(), &mut Seeded(3))
            .unwrap_err();
        assert_eq!(e, NoEligibleEndpoint::Filtered { by: "available" });
        assert_eq!(
            p.select(&RequestView::default(), &[], now(), &mut Seeded(3)),
            Err(NoEligibleEndpoint::Empty)
        );
    }

    #[test]
    fn random_is_roughly_uniform() {
        let p = Pipeline::baseline(Policy::Random);
        let eps = [
            ep(0, 0, true),
            ep(1, 0, true),
            ep(2, 0, true),
            ep(3, 0, true),
        ];
        let mut counts = [0u32; 4];
        let mut rng = Seeded(42);
        let t = now();
        for _ in 0..8000 {
            counts[p
                .select(&RequestView::default(), &eps, t, &mut rng)
                .unwrap()
                .index] += 1;
        }
        for c in counts {
            assert!((1800..2200).contains(&c), "{counts:?}");
        }
    }

    proptest! {
        #[test]
        fn never_picks_an_unavailable_endpoint_and_is_stable_for_a_seed(
            avail in proptest::collection::vec((any::<bool>(), 0u32..50), 1..12),
            policy in 0usize..4,
            seed in any::<u64>(),
        ) {
            let policy = [Policy::RoundRobin, Policy::Random, Policy::LeastRequests, Policy::PowerOfTwo][policy];
            let eps: Vec<EndpointView> =
                avail.iter().enumerate().map(|(i, &(a, f))| ep(i, f, a)).collect();
            let t = now();
            let a = Pipeline::baseline(policy).select(&RequestView::default(), &eps, t, &mut Seeded(seed));
            let b = Pipeline::baseline(policy).select(&RequestView::default(), &eps, t, &mut Seeded(seed));
            prop_assert_eq!(&a, &b);
            match a {
                Ok(c) => prop_assert!(eps[c.index].available),
                Err(_) => prop_assert!(eps.iter().all(|e| !e.available)),
            }
        }

        /// `select` (no copy when every endpoint passes, one score buffer, scoring shared with the profiles) picks
        /// exactly as the code before it did: same result, same scores, same RNG draws.
        #[test]
        fn select_decides_as_the_reference_implementation(
            eps in crate::testkit::arb_pool(12),
            picker in 0usize..5,
            decode_only in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let picker = || match picker {
                0 => Picker::MaxScore,
                1 => Picker::Random,
                2 => Picker::WeightedRandom,
                3 => Picker::RoundRobin(AtomicU64::new(0)),
                _ => Picker::PowerOfTwo,
            };
            let filters = || -> Vec<Box<dyn Filter>> {
                if decode_only { vec![Box::new(scorers::DecodeCapable)] } else { vec![] }
            };
            let scorers = || -> Vec<Weighted> {
                ["least-requests", "queue", "kv-cache-utilization", "token-load", "prefill-backlog"]
                    .iter()
                    .zip([1.0, 2.0, 0.5, 1.5, 2.0])
                    .map(|(n, weight)| Weighted { scorer: scorers::scorer_by_name(n).unwrap(), weight })
                    .collect()
            };
            let p = Pipeline::new(filters(), scorers(), picker());
            let mut all: Vec<Box<dyn Filter>> = vec![Box::new(scorers::Available)];
            all.extend(filters());
            let (ref_scorers, ref_picker) = (scorers(), picker());
            let (mut a, mut b) = (Seeded(seed), Seeded(seed));
            let t = now();
            for _ in 0..3 {
                let new = p.select(&RequestView::default(), &eps, t, &mut a);
                let old = reference::select(
                    &all, &ref_scorers, &ref_picker, &RequestView::default(), &eps, t, &mut b);
                prop_assert_eq!(new, old);
                prop_assert_eq!(a.0, b.0);
            }
        }
    }
}
