//! `predicted-ttft` picker: send each request to the pod where its first token is predicted to come soonest.
//!
//! Weighted scorers add normalised scores (prefix as a matched *ratio*), so a long matched prefix on a long prompt is
//! worth little against a small queue difference, and a cold miss follows whichever pod looked least loaded at the
//! last scrape (weir issue 27). This picker predicts each candidate's TTFT in seconds and takes the least:
//!
//! ```text
//! queue_s(p)  = max(backlog(p) * per_token_s,  waiting(p) * queued_request_s)
//! own_s(p)    = per_token_s * q  +  per_pair_s * q * (c + q/2)        q = prompt - matched(p), c = matched(p)
//! steps(p)    = ceil((backlog(p) + q) / step_tokens)
//! decode_s(p) = steps(p) * running(p) * per_running_step_s
//! ttft(p)     = scale * (fixed_s + queue_s(p) + own_s(p) + decode_s(p))
//! ```
//!
//! - `backlog(p)` is weir's own prefill backlog on the pod ([`EndpointView::prefill_tokens`]: uncached prompt tokens
//!   of its requests still before their first token, counted at pick time, so a burst of misses sees each other);
//!   `waiting(p)` is the scraped engine queue, which also sees other routers' requests but is up to one scrape old.
//!   Both measure the same queue when one router feeds the pod, so the larger is taken rather than their sum.
//! - `matched(p)` is the pod's prefix match in *tokens* (blocks x block size, from the approximate index or, for
//!   `precise-prefix`, the pods' own KV events), so reusing 12k tokens of a 13k prompt is worth its 12k tokens of
//!   prefill, not a ratio.
//! - `own_s` is the timing model's prefill (vllm-server-contract.md §7): linear layers per new token plus attention
//!   per (new token x attended token); `decode_s` is what the pod's running decodes add to each step the prefill
//!   shares with them (their KV reads), so a pod busy decoding is not mistaken for an idle one.
//! - `scale` is learned online ([`Calibration`]): an exponentially time-weighted geometric mean of measured / predicted
//!   TTFT over recent requests (the router feeds each measured first token back), so a pool whose GPUs differ from
//!   the configured [`PrefillModel`] converges on its own seconds. 1 until [`Calibration::MIN_SAMPLES`] samples.
//!
//! Herding protection: the load gate ([`LoadGate`]) runs first, as in the scorer profiles; a hit holder far out of
//! balance with the least-loaded candidate loses its hit (its match is zeroed before the prediction), because the
//! prefill backlog does not see a pile of short-suffix hits that all join its decode batch. Candidates predicted
//! within `tie_s` (default 2 ms) of the best are a tie broken uniformly with the RNG, so identical idle pods share
//! cold misses instead of the lowest index taking them all. A hot prefix gets a second replica the same way a
//! scorer profile gives it one: once its holder's backlog makes another pod's full prefill the faster start, the
//! request goes there and the router records that pod in the prefix index, so the next requests choose between two
//! holders by their queues.
//!
//! Defaults ([`PrefillModel::H100_LLAMA_8B`]): Llama-3.1-8B on one H100 from the simulator's timing model (W 15 GB,
//! P 6.98e9, F_lin 620 TF, F_attn 400 TF, t_fixed 1.5 ms, 8,192 tokens per step): 22.5 us per new token, 1.31 ns per
//! (new x attended) token pair, 10 ms fixed (a step's weight read and the HTTP hop), 0.25 ms per running decode per
//! step (its KV read at ~5k tokens of context at 2.6 TB/s), 50 ms per scraped queued request. Pure: `now` and the RNG
//! are arguments; the calibration's atomics are the only state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand_core::RngCore;

use super::load_gate::LoadGate;
use super::prefix::RequestFacts;
use super::{Choice, RequestView, uniform};
use crate::endpoint::EndpointView;

/// Prefill timing of one pod type, from its GPU profile or config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillModel {
    /// Seconds per new prompt token in the linear layers (`2 x params / effective FLOP/s`).
    pub per_token_s: f64,
    /// Seconds per (new token x attended token) pair in attention (`4 L H_q d_h / effective attention FLOP/s`).
    pub per_pair_s: f64,
    /// Seconds every request pays: one engine step's floor and the HTTP/tokenize hop.
    pub fixed_s: f64,
    /// Tokens per engine step (`max_num_batched_tokens`): how many steps a prefill backlog takes.
    pub step_tokens: u32,
    /// Seconds one running decode adds to every step (its KV read).
    pub per_running_step_s: f64,
    /// Seconds per request in the scraped engine queue (when weir's own backlog is smaller).
    pub queued_request_s: f64,
}

impl PrefillModel {
    /// Llama-3.1-8B on one H100 (see the module docs for the derivation).
    pub const H100_LLAMA_8B: PrefillModel = PrefillModel {
        per_token_s: 2.0 * 6.98e9 / 620e12,
        per_pair_s: 4.0 * 32.0 * 32.0 * 128.0 / 400e12,
        fixed_s: 0.010,
        step_tokens: 8192,
        per_running_step_s: 0.000_25,
        queued_request_s: 0.050,
    };

    /// A purely linear model at `tokens_per_s` (a configured prefill rate, e.g. the load gate's), other terms as the
    /// H100 default scaled by the same factor.
    pub fn from_rate(tokens_per_s: f64) -> Self {
        let d = Self::H100_LLAMA_8B;
        let k = (1.0 / tokens_per_s.max(1.0)) / d.per_token_s;
        Self {
            per_token_s: d.per_token_s * k,
            per_pair_s: d.per_pair_s * k,
            fixed_s: d.fixed_s,
            step_tokens: d.step_tokens,
            per_running_step_s: d.per_running_step_s * k,
            queued_request_s: d.queued_request_s * k,
        }
    }

    /// Prefill seconds of `new` tokens after `cached` tokens of context.
    pub fn prefill_s(&self, new: u32, cached: u32) -> f64 {
        let (q, c) = (f64::from(new), f64::from(cached));
        q * self.per_token_s + self.per_pair_s * q * (c + q / 2.0)
    }
}

impl Default for PrefillModel {
    fn default() -> Self {
        Self::H100_LLAMA_8B
    }
}

/// One candidate's prediction (unscaled parts and the scaled total), for decisions and records.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Pool index.
    pub index: usize,
    /// Predicted wait before this request's prefill starts (queue), seconds, scaled.
    pub wait_s: f64,
    /// Predicted TTFT, seconds, scaled.
    pub ttft_s: f64,
    /// Predicted TTFT before calibration, seconds (what [`Calibration::observe`] compares with the measurement).
    pub raw_s: f64,
}

/// A measured first token against its prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TtftOutcome {
    /// [`Prediction::raw_s`] of the pod the request went to.
    pub predicted_raw_s: f64,
    /// Measured TTFT, seconds.
    pub measured_s: f64,
}

/// Online correction of a pool's predictions: `scale = exp(EWMA(ln(measured / raw predicted)))`, each sample weighted
/// `1 - exp(-dt / TAU)` by the time since the previous one (at least [`Self::MIN_WEIGHT`]), so it tracks the last
/// few seconds of traffic whatever the request rate. Samples are clamped to [1/8, 8] so one stalled request does not
/// swing it. Lock-free; concurrent samples may overwrite each other, which only drops a sample.
#[derive(Debug)]
pub struct Calibration {
    /// Time origin of `last_ns`.
    origin: Instant,
    /// EWMA of ln(measured / predicted), as `f64` bits.
    log_bits: AtomicU64,
    /// Nanoseconds after `origin` of the latest sample.
    last_ns: AtomicU64,
    samples: AtomicU32,
}

impl Calibration {
    /// Samples before [`Self::scale`] departs from 1.
    pub const MIN_SAMPLES: u32 = 8;
    /// Time constant of the EWMA.
    pub const TAU: Duration = Duration::from_secs(5);
    /// Least weight of a sample (many samples at once still move the average).
    pub const MIN_WEIGHT: f64 = 0.01;

    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            log_bits: AtomicU64::new(0f64.to_bits()),
            last_ns: AtomicU64::new(0),
            samples: AtomicU32::new(0),
        }
    }

    /// Folds in one measured TTFT at `now`.
    pub fn observe(&self, o: TtftOutcome, now: Instant) {
        if !(o.predicted_raw_s.is_finite()
            && o.predicted_raw_s > 0.0
            && o.measured_s.is_finite()
            && o.measured_s > 0.0)
        {
            return;
        }
        let x = (o.measured_s / o.predicted_raw_s).clamp(0.125, 8.0).ln();
        let ns = now.saturating_duration_since(self.origin).as_nanos() as u64;
        let n = self.samples.load(Ordering::Relaxed);
        let old = f64::from_bits(self.log_bits.load(Ordering::Relaxed));
        let w = if n < Self::MIN_SAMPLES {
            // Plain mean until there are enough samples to weight by time.
            1.0 / f64::from(n + 1)
        } else {
            let dt = ns.saturating_sub(self.last_ns.load(Ordering::Relaxed)) as f64 / 1e9;
            (1.0 - (-dt / Self::TAU.as_secs_f64()).exp()).max(Self::MIN_WEIGHT)
        };
        self.log_bits
            .store((old + w * (x - old)).to_bits(), Ordering::Relaxed);
        self.last_ns.fetch_max(ns, Ordering::Relaxed);
        self.samples.store(n.saturating_add(1), Ordering::Relaxed);
    }

    /// The factor applied to raw predictions.
    pub fn scale(&self) -> f64 {
        if self.samples.load(Ordering::Relaxed) < Self::MIN_SAMPLES {
            return 1.0;
        }
        f64::from_bits(self.log_bits.load(Ordering::Relaxed)).exp()
    }

    /// Samples folded in so far.
    pub fn samples(&self) -> u32 {
        self.samples.load(Ordering::Relaxed)
    }
}

/// The picker: a timing model, its pool's calibration, and the tie width.
#[derive(Debug, Clone)]
pub struct PredictedTtft {
    pub model: PrefillModel,
    /// Shared by every decision of one pool (and the router's feedback of measured TTFTs).
    pub calibration: Arc<Calibration>,
    /// Candidates within this many seconds (unscaled) of the best prediction tie.
    pub tie_s: f64,
}

impl PartialEq for PredictedTtft {
    fn eq(&self, o: &Self) -> bool {
        self.model == o.model
            && self.tie_s == o.tie_s
            && Arc::ptr_eq(&self.calibration, &o.calibration)
    }
}

impl PredictedTtft {
    /// Default tie width.
    pub const TIE_S: f64 = 0.002;

    /// A picker with `model` and a fresh calibration whose clock starts at `origin`.
    pub fn new(model: PrefillModel, origin: Instant) -> Self {
        Self {
            model,
            calibration: Arc::new(Calibration::new(origin)),
            tie_s: Self::TIE_S,
        }
    }

    /// Prediction for one candidate with `matched` tokens of the prompt cached, at calibration `scale`.
    pub fn predict(&self, ep: &EndpointView, prompt: u32, matched: u32, scale: f64) -> Prediction {
        let m = &self.model;
        let matched = matched.min(prompt.saturating_sub(1));
        let q = prompt - matched;
        let backlog = ep.prefill_tokens;
        let queue_s = (backlog as f64 * m.per_token_s).max(ep.queue() as f64 * m.queued_request_s);
        let steps = (backlog + u64::from(q))
            .div_ceil(u64::from(m.step_tokens.max(1)))
            .max(1);
        let running = ep
            .scraped
            .map_or(u64::from(ep.in_flight), |s| u64::from(s.running));
        let decode_s = steps as f64 * running as f64 * m.per_running_step_s;
        let raw = m.fixed_s + queue_s + m.prefill_s(q, matched) + decode_s;
        Prediction {
            index: ep.index,
            wait_s: queue_s * scale,
            ttft_s: raw * scale,
            raw_s: raw,
        }
    }

    /// Every candidate's prediction, in `cands` order; `matched` are the (gated) prefix matches in blocks by pool
    /// index.
    pub fn predict_all<'a>(
        &'a self,
        req: &'a RequestView,
        cands: &'a [EndpointView],
        matched: &'a [u32],
        facts: &'a RequestFacts,
    ) -> impl Iterator<Item = Prediction> + 'a {
        let prompt = LoadGate::prompt_tokens(req, facts);
        let scale = self.calibration.scale();
        cands.iter().map(move |e| {
            let m = matched
                .get(e.index)
                .copied()
                .unwrap_or(0)
                .saturating_mul(facts.block_size)
                .min(prompt);
            self.predict(e, prompt, m, scale)
        })
    }

    /// Picks the least predicted TTFT among `cands` (filtered, non-empty), ties within `tie_s` broken uniformly
    /// from `rng`. `matched` are the prefix matches after the gate.
    pub fn pick(
        &self,
        req: &RequestView,
        cands: &[EndpointView],
        matched: &[u32],
        facts: &RequestFacts,
        rng: &mut dyn RngCore,
    ) -> (Choice, Prediction) {
        let mut best: Option<Prediction> = None;
        let mut ties = 0usize;
        let mut min = f64::INFINITY;
        // One pass for the minimum, one to draw among the candidates within `tie_s` of it (reservoir). Compared
        // unscaled: the scale is the same for every candidate, and `tie_s` is in the model's seconds.
        for p in self.predict_all(req, cands, matched, facts) {
            min = min.min(p.raw_s);
        }
        for p in self.predict_all(req, cands, matched, facts) {
            if p.raw_s <= min + self.tie_s {
                ties += 1;
                if ties == 1 || uniform(rng, ties) == 0 {
                    best = Some(p);
                }
            }
        }
        let p = best.unwrap_or(Prediction {
            index: cands.first().map_or(0, |e| e.index),
            wait_s: 0.0,
            ttft_s: 0.0,
            raw_s: 0.0,
        });
        let choice = Choice {
            index: p.index,
            total: p.ttft_s,
            scores: vec![("predicted-ttft", p.ttft_s)],
        };
        (choice, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{EndpointId, Role, ScrapedLoad};
    use crate::pick::NoEligibleEndpoint;
    use crate::pick::profile::Profile;
    use crate::testkit::{Seeded, now};

    fn ep(index: usize, backlog: u64, running: u32) -> EndpointView {
        EndpointView {
            index,
            role: Role::Both,
            available: true,
            in_flight: running + u32::from(backlog > 0),
            in_flight_tokens: backlog,
            prefill_tokens: backlog,
            scraped: Some(ScrapedLoad {
                waiting: 0,
                running,
                kv_usage: 0.2,
                age_ms: 10,
            }),
        }
    }

    fn facts(matched: Vec<u32>, prompt: u32) -> RequestFacts {
        RequestFacts {
            matched,
            total_blocks: prompt / 16,
            block_size: 16,
            session_pod: None,
        }
    }

    fn req(prompt: u32) -> RequestView {
        RequestView {
            prompt_tokens: prompt,
            max_tokens: Some(300),
        }
    }

    fn profile() -> Profile {
        Profile::predicted_ttft(PrefillModel::default(), now())
    }

    #[test]
    fn an_idle_pod_predicts_the_timing_models_prefill() {
        let p = PredictedTtft::new(PrefillModel::H100_LLAMA_8B, now());
        // 8B on an H100: an 8,192-token prompt alone prefills in ~230 ms (vllm-server-contract.md §7).
        let t = p.predict(&ep(0, 0, 0), 8192, 0, 1.0);
        assert!((0.22..0.26).contains(&(t.ttft_s - 0.010)), "{t:?}");
        assert_eq!(t.wait_s, 0.0);
        // Cached tokens cost nothing but the attention over them.
        let hit = p.predict(&ep(0, 0, 0), 8192, 8192 - 192, 1.0);
        assert!(hit.ttft_s < 0.03, "{hit:?}");
    }

    #[test]
    fn prefers_a_long_matched_prefix_over_a_small_queue_difference() {
        // Pod 0 holds 12,000 of a 13,000-token conversation but has 2,000 tokens of backlog; pod 1 is idle.
        let eps = [ep(0, 2_000, 4), ep(1, 0, 3)];
        let f = facts(vec![750, 0], 13_000);
        for seed in 0..20 {
            let r = profile()
                .decide(&req(13_000), &eps, &f, now(), &mut Seeded(seed))
                .unwrap();
            assert_eq!(r.choice.index, 0, "{r:?}");
            let p = r.predicted.unwrap();
            assert!(p.ttft_s < 0.12, "{p:?}");
        }
    }

    #[test]
    fn prefers_an_idle_pod_when_nothing_matches_and_spreads_over_equal_ones() {
        let eps = [ep(0, 5_000, 2), ep(1, 0, 2), ep(2, 3_000, 2)];
        let f = facts(vec![], 2_000);
        for seed in 0..20 {
            let r = profile()
                .decide(&req(2_000), &eps, &f, now(), &mut Seeded(seed))
                .unwrap();
            assert_eq!(r.choice.index, 1);
        }
        // Identical idle pods: ties broken by the RNG, not by index.
        let idle = [ep(0, 0, 0), ep(1, 0, 0), ep(2, 0, 0), ep(3, 0, 0)];
        let mut seen = [0u32; 4];
        let p = profile();
        let mut rng = Seeded(3);
        for _ in 0..400 {
            seen[p
                .decide(&req(2_000), &idle, &f, now(), &mut rng)
                .unwrap()
                .choice
                .index] += 1;
        }
        assert!(seen.iter().all(|&n| n > 60), "{seen:?}");
    }

    #[test]
    fn running_decodes_count_against_a_pod() {
        let eps = [ep(0, 0, 120), ep(1, 0, 10)];
        let r = profile()
            .decide(
                &req(4_000),
                &eps,
                &facts(vec![], 4_000),
                now(),
                &mut Seeded(1),
            )
            .unwrap();
        assert_eq!(r.choice.index, 1);
    }

    #[test]
    fn the_gate_still_drops_an_overloaded_holders_hit() {
        // Pod 0 holds the prefix but has 20 requests outstanding, all short-suffix hits (tiny backlog); the gate's
        // overload rule drops its hit and the request goes to an idle pod.
        let mut hot = ep(0, 200, 0);
        hot.in_flight = 20;
        let eps = [hot, ep(1, 0, 0), ep(2, 0, 0)];
        let f = facts(vec![250, 0, 0], 4_096);
        let r = profile()
            .decide(&req(4_096), &eps, &f, now(), &mut Seeded(2))
            .unwrap();
        assert_eq!(r.gate.gated, vec![(0, 250)]);
        assert_ne!(r.choice.index, 0);
    }

    #[test]
    fn calibration_learns_the_pools_own_seconds() {
        let t0 = now();
        let c = Calibration::new(t0);
        let o = |m| TtftOutcome {
            predicted_raw_s: 0.1,
            measured_s: m,
        };
        for i in 0..Calibration::MIN_SAMPLES - 1 {
            c.observe(o(0.2), t0 + Duration::from_millis(u64::from(i) * 100));
        }
        assert_eq!(c.scale(), 1.0, "not enough samples yet");
        c.observe(o(0.2), t0 + Duration::from_secs(1));
        assert!((c.scale() - 2.0).abs() < 1e-9, "{}", c.scale());
        // Broken samples are ignored; an outlier moves it a bounded amount.
        c.observe(o(f64::NAN), t0 + Duration::from_secs(2));
        c.observe(o(0.0), t0 + Duration::from_secs(2));
        assert_eq!(c.samples(), Calibration::MIN_SAMPLES);
        // A slower pool: measured = 3x predicted for a while moves the scale to ~3.
        for i in 0..200 {
            c.observe(
                o(0.3),
                t0 + Duration::from_secs(3) + Duration::from_millis(i * 100),
            );
        }
        assert!((c.scale() - 3.0).abs() < 0.05, "{}", c.scale());
        // The picker applies it.
        let p = PredictedTtft {
            calibration: Arc::new(c),
            ..PredictedTtft::new(PrefillModel::default(), t0)
        };
        let f = facts(vec![], 1_000);
        let raw = p.predict(&ep(0, 0, 0), 1_000, 0, 1.0).ttft_s;
        let scaled = p
            .predict_all(&req(1_000), &[ep(0, 0, 0)], &[], &f)
            .next()
            .unwrap();
        assert!((scaled.ttft_s / raw - p.calibration.scale()).abs() < 1e-9);
        assert_eq!(scaled.raw_s, raw);
    }

    #[test]
    fn explain_shows_every_candidates_prediction_and_the_pick_is_the_least() {
        let mut eps = vec![ep(0, 4_000, 2), ep(1, 0, 1), ep(2, 9_000, 2), ep(3, 0, 1)];
        eps[3].available = false;
        let f = facts(vec![0, 0, 500, 0], 8_192);
        let ids: Vec<EndpointId> = (0..4).map(|i| EndpointId::new(format!("p{i}"))).collect();
        let p = profile();
        let r = p
            .decide(&req(8_192), &eps, &f, now(), &mut Seeded(5))
            .unwrap();
        let rows = p.explain(&req(8_192), &eps, &f, &r, &ids, now());
        assert_eq!(rows[3].filtered_by, Some("available"));
        assert_eq!(rows[3].predicted_ttft_ms, None);
        let best = rows
            .iter()
            .filter_map(|row| row.predicted_ttft_ms.map(|t| (row.index, t)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        assert_eq!(best.0, r.choice.index);
        assert!((best.1 - r.predicted.unwrap().ttft_s * 1000.0).abs() < 1e-9);
        assert!(rows[0].predicted_wait_ms.unwrap() > 50.0, "{:?}", rows[0]);
        assert_eq!(rows[1].predicted_wait_ms, Some(0.0));
    }

    proptest::proptest! {
        #[test]
        fn never_picks_an_ineligible_pod_and_is_deterministic_for_a_seed(
            eps in crate::testkit::arb_pool(14),
            matched in proptest::collection::vec(0u32..600, 0..16),
            prompt in 1u32..16_000,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let p = profile();
            let f = facts(matched, prompt);
            let a = p.decide(&req(prompt), &eps, &f, now(), &mut Seeded(seed));
            let b = p.decide(&req(prompt), &eps, &f, now(), &mut Seeded(seed));
            proptest::prop_assert_eq!(&a, &b);
            match a {
                Ok(r) => {
                    let e = eps.iter().find(|e| e.index == r.choice.index).unwrap();
                    proptest::prop_assert!(e.available && e.role.serves_decode());
                    // Nothing eligible predicts better than the pick by more than the tie width.
                    let t = r.predicted.unwrap().ttft_s;
                    let rows = p.explain(&req(prompt), &eps, &f, &r, &[], now());
                    // (Scale 1: nothing was observed.)
                    for row in rows.iter().filter(|r| r.filtered_by.is_none()) {
                        proptest::prop_assert!(row.predicted_ttft_ms.unwrap() / 1000.0 >= t - PredictedTtft::TIE_S - 1e-12);
                    }
                }
                Err(NoEligibleEndpoint::Empty) => proptest::prop_assert!(eps.is_empty()),
                Err(NoEligibleEndpoint::Filtered { .. }) => {
                    proptest::prop_assert!(!eps.iter().any(|e| e.available && e.role.serves_decode()));
                }
            }
        }
    }
}
