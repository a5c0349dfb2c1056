//! The planner: from the demand history, choose replica counts per pool. Pure: `now` and every observation are
//! arguments; no clock, no I/O.
//!
//! Per call:
//! 1. Metrics older than `stale_after_s` (or none yet): hold the fleet, never scale down (conservative).
//! 2. Demand = mean arrival rate over the stable window (60 s) times the request lengths (tokens per request over
//!    the longest window kept), raised by the upward trend of the last `trend_s`
//!    extrapolated over the cold start plus half the window (a pod asked for now serves only after it starts) when
//!    that trend is significant (two standard errors, over at least half the window), plus
//!    queued prompt tokens spread over `queue_drain_s`.
//! 3. Panic (Knative KPA): when the short window's demand is `panic_threshold` times what the ready pods sustain, the
//!    short window counts too and nothing scales down until a stable window passes without such a crossing.
//! 4. Headroom: plan for demand / `target_utilization`.
//! 5. Scale up at once (to the demand plus half the hysteresis band), keeping every current pod and adding the
//!    cheapest pods that cover the gap, or the best fleet's pods when that fleet is cheaper than the topped-up one by
//!    more than the hysteresis band (a pod being
//!    replaced would leave a hole during the newcomer's cold start). Scale down (or change the mix) only to the plan
//!    for the highest demand of the last `scale_down_delay_s` (HPA-style stabilization), only when it saves more
//!    than `hysteresis` of the current cost, and remove pods only once no pod of the plan is still starting.

use std::collections::VecDeque;

use serde::Serialize;

use crate::crd::PlannerConfig;
use crate::mix::{self, Demand, Mix, PoolOption};

/// Demand measured over one interval ending at `t`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct DemandSample {
    pub t: f64,
    /// Requests arriving per second (0 when the caller counts only tokens).
    pub arrivals_per_s: f64,
    pub prompt_tok_s: f64,
    pub output_tok_s: f64,
    /// Prompt tokens waiting (held by the router or queued in engines).
    pub queued_prompt_tokens: f64,
}

/// Why the planner chose what it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No fresh metrics: the fleet is held (never scaled down).
    Stale,
    /// Demand exceeds the current pods: cheapest pods added.
    ScaleUp,
    /// The stabilized demand allows a cheaper fleet.
    ScaleDown,
    /// A cheaper fleet is planned; removals wait for its new pods to be ready.
    Replacing,
    /// The current fleet covers the demand and no cheaper plan saves enough.
    Steady,
    /// Even every pool at its maximum cannot cover the demand.
    AtMax,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendation {
    pub replicas: Vec<u32>,
    pub reason: Reason,
    pub panic: bool,
    /// The demand (with headroom) the counts were sized for.
    pub planned: Demand,
    pub cost_per_hour: f64,
}

/// Per-pool plan state: the pools, their settings and the recent history.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: PlannerConfig,
    pools: Vec<PoolOption>,
    /// Cold start of a new pod, seconds.
    startup_s: f64,
    history: VecDeque<DemandSample>,
    /// Planned demands (headroom included) of the scale-down window.
    recent: VecDeque<(f64, Demand)>,
    /// Last time the short window crossed the panic threshold, while in panic.
    panic_crossed: Option<f64>,
    /// Since when some pod has been starting (None while every pod is ready): how much cold start remains.
    starting_since: Option<f64>,
}

/// Tokens per request over the samples: (prompt, output), `None` without arrivals counted.
fn lengths(it: impl Iterator<Item = DemandSample>) -> Option<(f64, f64)> {
    let (mut n, mut p, mut o) = (0.0, 0.0, 0.0);
    for s in it {
        n += s.arrivals_per_s;
        p += s.prompt_tok_s;
        o += s.output_tok_s;
    }
    (n >= 1.0).then(|| (p / n, o / n))
}

/// Mean demand of the samples: the mean arrival rate times the request lengths `len` when known (the
/// arrival count of a window is far less noisy than its token sums, whose heavy-tailed lengths made each
/// component spike on its own: the componentwise maxima then planned for a request mix that never came), else the
/// mean token rates.
fn mean(it: impl Iterator<Item = DemandSample>, len: Option<(f64, f64)>) -> Option<Demand> {
    let (mut n, mut r, mut p, mut o) = (0.0, 0.0, 0.0, 0.0);
    for s in it {
        n += 1.0;
        r += s.arrivals_per_s;
        p += s.prompt_tok_s;
        o += s.output_tok_s;
    }
    (n > 0.0).then(|| match len {
        Some((lp, lo)) => Demand {
            prompt_tok_s: r / n * lp,
            output_tok_s: r / n * lo,
        },
        None => Demand {
            prompt_tok_s: p / n,
            output_tok_s: o / n,
        },
    })
}

/// Least-squares slope of `f` over the samples, kept only as far as it is a trend rather than noise: the samples must
/// span at least half of `window_s`, and the slope is shrunk toward zero by two standard errors (0 when it is within
/// them: a t-test at ~95%). Per-tick token rates are noisy (Poisson arrivals, heavy-tailed prompt lengths); a slope fitted on a
/// few of them and extrapolated over a cold start turns one long prompt into a phantom ramp (regression:
/// `a_few_noisy_samples_are_not_a_trend`).
fn trend(samples: &[DemandSample], window_s: f64, f: impl Fn(&DemandSample) -> f64) -> f64 {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return 0.0;
    };
    if samples.len() < 6 || last.t - first.t < window_s / 2.0 {
        return 0.0;
    }
    let n = samples.len() as f64;
    let mt = samples.iter().map(|s| s.t).sum::<f64>() / n;
    let my = samples.iter().map(&f).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.t - mt) * (f(s) - my);
        den += (s.t - mt) * (s.t - mt);
    }
    if den <= 0.0 {
        return 0.0;
    }
    let b = num / den;
    let resid: f64 = samples
        .iter()
        .map(|s| {
            let e = f(s) - my - b * (s.t - mt);
            e * e
        })
        .sum();
    let se = (resid / (n - 2.0) / den).sqrt();
    // Soft threshold: the slope's near edge of its two-standard-error band, not the slope itself. A hard threshold let
    // about one tick in twenty of a flat noisy load pass with a slope of two standard errors, whose extrapolation
    // over the cold start lifted the plan over the fleet's capacity: a pod added, removed after the scale-down delay,
    // added again (CI found level 1.6 req/s, 9% noise: cost moves +0.8, -0.8, +0.8 USD/h). A real ramp, many
    // standard errors from zero, loses almost nothing.
    (b.abs() - 2.0 * se).max(0.0) * b.signum()
}

impl Planner {
    pub fn new(cfg: PlannerConfig, pools: Vec<PoolOption>, startup_s: f64) -> Self {
        Planner {
            cfg,
            pools,
            startup_s,
            history: VecDeque::new(),
            recent: VecDeque::new(),
            panic_crossed: None,
            starting_since: None,
        }
    }

    pub fn pools(&self) -> &[PoolOption] {
        &self.pools
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.cfg
    }

    /// Record one interval's demand (out-of-order or non-finite samples are ignored).
    pub fn observe(&mut self, s: DemandSample) {
        let finite = s.t.is_finite()
            && s.prompt_tok_s.is_finite()
            && s.output_tok_s.is_finite()
            && s.queued_prompt_tokens.is_finite();
        if !finite || self.history.back().is_some_and(|l| l.t > s.t) {
            return;
        }
        self.history.push_back(s);
        let keep = self
            .cfg
            .stable_s
            .max(self.cfg.trend_s)
            .max(self.cfg.panic_s);
        while self.history.front().is_some_and(|f| f.t < s.t - keep) {
            self.history.pop_front();
        }
    }

    fn clamp(&self, counts: &[u32]) -> Vec<u32> {
        self.pools
            .iter()
            .enumerate()
            .map(|(i, p)| counts.get(i).copied().unwrap_or(p.min).clamp(p.min, p.max))
            .collect()
    }

    /// The demand to plan for at `now` (before headroom), and whether the short window is in panic.
    fn demand(&mut self, now: f64, starting: bool, ready: &[u32]) -> Option<(Demand, bool)> {
        match (starting, self.starting_since) {
            (true, None) => self.starting_since = Some(now),
            (false, _) => self.starting_since = None,
            _ => {}
        }
        let last = self.history.back()?;
        if now - last.t > self.cfg.stale_after_s {
            return None;
        }
        let within = |w: f64| self.history.iter().copied().filter(move |s| s.t > now - w);
        let tw = self.cfg.trend_s;
        // Request lengths drift slowly: measured over the longest window kept.
        let len = lengths(self.history.iter().copied());
        let stable = mean(within(self.cfg.stable_s), len)?;
        let panic_d = mean(within(self.cfg.panic_s), len).unwrap_or(stable);
        let recent: Vec<DemandSample> = within(tw).collect();
        let lead = self.startup_s + self.cfg.stable_s / 2.0;
        let forecast = match len {
            Some((lp, lo)) => {
                let up = trend(&recent, tw, |s| s.arrivals_per_s).max(0.0) * lead;
                Demand {
                    prompt_tok_s: stable.prompt_tok_s + up * lp,
                    output_tok_s: stable.output_tok_s + up * lo,
                }
            }
            None => Demand {
                prompt_tok_s: stable.prompt_tok_s
                    + trend(&recent, tw, |s| s.prompt_tok_s).max(0.0) * lead,
                output_tok_s: stable.output_tok_s
                    + trend(&recent, tw, |s| s.output_tok_s).max(0.0) * lead,
            },
        };
        let mut d = stable.max(forecast);
        // The backlog when the pods asked for are ready: what is queued now plus what the ready pods fall short by
        // until then. Counting the queue alone would add pods every tick of a cold start for the same backlog
        // (it grows while they start), the overshoot of regression `a_backlog_during_a_cold_start_is_planned_once`.
        let ready_cov = mix::coverage(&self.pools, &self.clamp_ready(ready), d);
        let short = if ready_cov.is_finite() {
            (1.0 - ready_cov).max(0.0)
        } else {
            0.0
        };
        let remaining = match self.starting_since {
            Some(since) => (self.startup_s - (now - since)).max(0.0),
            None => self.startup_s,
        };
        let backlog = last.queued_prompt_tokens.max(0.0) + short * d.prompt_tok_s * remaining;
        d.prompt_tok_s += backlog / self.cfg.queue_drain_s;
        // Panic: the short window wants `panic_threshold` x what is ready.
        let ready_cov = mix::coverage(&self.pools, &self.clamp_ready(ready), panic_d);
        let crossing = ready_cov.is_finite() && ready_cov * self.cfg.panic_threshold <= 1.0;
        if crossing {
            self.panic_crossed = Some(now);
        } else if self
            .panic_crossed
            .is_some_and(|t| now - t >= self.cfg.stable_s)
        {
            self.panic_crossed = None;
        }
        let panic = self.panic_crossed.is_some();
        if panic {
            d = d.max(panic_d);
        }
        Some((d, panic))
    }

    fn clamp_ready(&self, ready: &[u32]) -> Vec<u32> {
        (0..self.pools.len())
            .map(|i| ready.get(i).copied().unwrap_or(0))
            .collect()
    }

    /// Replica counts per pool for `now`, given the current (ready + starting) and ready counts.
    pub fn recommend(&mut self, now: f64, current: &[u32], ready: &[u32]) -> Recommendation {
        let cur = self.clamp(current);
        let starting = cur.iter().zip(ready).any(|(c, r)| c > r);
        let Some((demand, panic)) = self.demand(now, starting, ready) else {
            return Recommendation {
                cost_per_hour: mix::cost(&self.pools, &cur),
                replicas: cur,
                reason: Reason::Stale,
                panic: self.panic_crossed.is_some(),
                planned: Demand::default(),
            };
        };
        let planned = demand.scale(1.0 / self.cfg.target_utilization);
        self.recent.push_back((now, planned));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| *t < now - self.cfg.scale_down_delay_s)
        {
            self.recent.pop_front();
        }
        let done = |replicas: Vec<u32>, reason| Recommendation {
            cost_per_hour: mix::cost(&self.pools, &replicas),
            replicas,
            reason,
            panic,
            planned,
        };
        if mix::coverage(&self.pools, &cur, planned) < 1.0 - 1e-9 {
            // Scale up: keep everything, add the cheapest cover for the gap.
            let mut floor = self.pools.clone();
            for (p, &n) in floor.iter_mut().zip(&cur) {
                p.min = n;
            }
            // A margin of half the hysteresis band, so noise just above the fleet does not add pods tick by tick.
            let target = planned.scale(1.0 + self.cfg.hysteresis / 2.0);
            let m: Mix = mix::cheapest(&floor, target);
            let reason = if m.covered {
                Reason::ScaleUp
            } else {
                Reason::AtMax
            };
            // When the best fleet for the demand is cheaper than topping up by more than the hysteresis band (small
            // pods added tick by tick on a rising load, that a later consolidation would replace by a large one),
            // start the best fleet's pods now instead, keeping the current ones until the scale-down removes them.
            let fresh = mix::cheapest(&self.pools, target);
            if m.covered
                && fresh.covered
                && fresh.cost_per_hour < m.cost_per_hour * (1.0 - self.cfg.hysteresis)
            {
                let out: Vec<u32> = fresh
                    .replicas
                    .iter()
                    .zip(&cur)
                    .map(|(&f, &c)| f.max(c))
                    .collect();
                return done(out, Reason::ScaleUp);
            }
            return done(m.replicas, reason);
        }
        if panic {
            return done(cur, Reason::Steady);
        }
        let highest = self.recent.iter().fold(planned, |acc, (_, d)| acc.max(*d));
        // The scale-up's margin: a fleet just shrunk covers what a scale-up for the same demand would add, so only a
        // new high of the window tops it up again. (A wider margin here stacked on the window's maximum and the
        // headroom: the fleet ran at ~0.7 of its measured capacity.)
        let best = mix::cheapest(&self.pools, highest.scale(1.0 + self.cfg.hysteresis / 2.0));
        let cur_cost = mix::cost(&self.pools, &cur);
        if best.cost_per_hour >= cur_cost * (1.0 - self.cfg.hysteresis) {
            return done(cur, Reason::Steady);
        }
        // Start the plan's new pods now; remove pods only when nothing is starting.
        let grows = best.replicas.iter().zip(&cur).any(|(b, c)| b > c);
        if grows || starting {
            let out: Vec<u32> = best
                .replicas
                .iter()
                .zip(&cur)
                .map(|(&b, &c)| b.max(c))
                .collect();
            return done(out, Reason::Replacing);
        }
        done(best.replicas, Reason::ScaleDown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::Capacity;
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use sim::engine::Role;

    fn pools() -> Vec<PoolOption> {
        let p = |name: &str, price: f64, rate: f64, max: u32| PoolOption {
            name: name.into(),
            gpu: name.into(),
            role: Role::Both,
            price_per_hour: price,
            min: 0,
            max,
            capacity: Capacity {
                rate,
                prefill_tok_s: rate * 1000.0,
                decode_tok_s: rate * 200.0,
                concurrency: rate,
            },
        };
        vec![p("h100", 6.88, 10.0, 20), p("l4", 0.80, 1.0, 40)]
    }

    fn at(rate: f64, t: f64) -> DemandSample {
        DemandSample {
            t,
            arrivals_per_s: rate,
            prompt_tok_s: rate * 1000.0,
            output_tok_s: rate * 200.0,
            queued_prompt_tokens: 0.0,
        }
    }

    fn planner() -> Planner {
        Planner::new(PlannerConfig::new("llama-3.1-8b", 2.0, 0.1), pools(), 120.0)
    }

    /// Drive the planner over `rates` (one per 5 s tick) with pods ready `startup` after being asked for.
    fn drive(p: &mut Planner, rates: &[f64], start: Vec<u32>) -> Vec<Recommendation> {
        let mut cur = start.clone();
        let mut ready = start;
        let mut pending: Vec<(f64, Vec<u32>)> = Vec::new();
        let mut out = Vec::new();
        for (k, &r) in rates.iter().enumerate() {
            let t = 5.0 * (k + 1) as f64;
            pending.retain(|(at, c)| {
                if *at <= t {
                    ready = c.clone();
                    false
                } else {
                    true
                }
            });
            p.observe(at(r, t));
            let rec = p.recommend(t, &cur, &ready);
            if rec.replicas != cur {
                let grow = rec.replicas.iter().zip(&cur).any(|(a, b)| a > b);
                if grow {
                    pending.push((t + 120.0, rec.replicas.clone()));
                }
                ready = ready
                    .iter()
                    .zip(&rec.replicas)
                    .map(|(&r, &n)| r.min(n))
                    .collect();
                cur = rec.replicas.clone();
            }
            out.push(rec);
        }
        out
    }

    #[test]
    fn stale_or_missing_metrics_hold_the_fleet() {
        let mut p = planner();
        let r = p.recommend(10.0, &[3, 1], &[3, 1]);
        assert_eq!((r.replicas, r.reason), (vec![3, 1], Reason::Stale));
        p.observe(at(0.0, 10.0));
        // 31 s later the sample is stale: no scale-down despite zero demand.
        let r = p.recommend(41.0, &[3, 1], &[3, 1]);
        assert_eq!((r.replicas, r.reason), (vec![3, 1], Reason::Stale));
        // Out-of-bounds current counts are clamped even then.
        let r = p.recommend(41.0, &[30, 1], &[30, 1]);
        assert_eq!(r.replicas, vec![20, 1]);
    }

    #[test]
    fn scales_up_at_once_and_down_only_after_the_delay() {
        let mut p = planner();
        let mut rates = vec![20.0; 60];
        rates.extend(vec![5.0; 120]);
        let recs = drive(&mut p, &rates, vec![0, 0]);
        assert_eq!(recs[0].reason, Reason::ScaleUp);
        let cap = |r: &Recommendation| r.replicas[0] as f64 * 10.0 + r.replicas[1] as f64;
        assert!(cap(&recs[0]) >= 20.0 / 0.85);
        // Load drops at tick 60 (300 s); nothing is removed during the next 300 s.
        for r in &recs[60..118] {
            assert!(cap(r) >= 20.0 / 0.85, "{r:?}");
        }
        let last = recs.last().unwrap();
        assert!(cap(last) < 20.0 && cap(last) >= 5.0 / 0.85, "{last:?}");
    }

    #[test]
    fn a_burst_enters_panic_and_a_rising_trend_is_anticipated() {
        let mut p = planner();
        let mut rates = vec![4.0; 30];
        rates.extend(vec![30.0; 4]);
        let recs = drive(&mut p, &rates, vec![1, 0]);
        assert!(recs.last().unwrap().panic);
        assert!(recs.last().unwrap().planned.prompt_tok_s >= 30_000.0);
        // A ramp of +0.02 req/s per second: the plan leads the current rate by the cold start.
        let mut p = planner();
        let ramp: Vec<f64> = (0..80).map(|k| 2.0 + 0.1 * k as f64).collect();
        let recs = drive(&mut p, &ramp, vec![1, 0]);
        let now_rate = ramp[79];
        assert!(
            recs[79].planned.prompt_tok_s / 1000.0 > now_rate + 0.02 * 120.0,
            "{:?}",
            recs[79].planned
        );
    }

    /// Regression: three 5 s samples, one with a long prompt, made a slope that extrapolated over the cold start
    /// planned 5x the demand and started an H100 beside a fleet of L4s (the 1 h `weir plan` smoke cost more than
    /// the static fleet).
    #[test]
    fn a_few_noisy_samples_are_not_a_trend() {
        let mut p = planner();
        let mut s = at(2.0, 5.0);
        p.observe(s);
        s.t = 10.0;
        s.prompt_tok_s = 2_500.0;
        p.observe(s);
        s.t = 15.0;
        s.prompt_tok_s = 9_000.0;
        p.observe(s);
        let r = p.recommend(15.0, &[0, 8], &[0, 8]);
        // Mean 4,500 prompt tok/s of 2 req/s-equivalents; no trend on 10 s of history.
        assert!(r.planned.prompt_tok_s < 2.0 * 4_500.0 / 0.85, "{r:?}");
        // A noisy flat rate over the whole trend window is not a trend either.
        let mut rng = SmallRng::seed_from_u64(3);
        let rates: Vec<f64> = (0..60).map(|_| 5.0 * (0.5 + rng.random::<f64>())).collect();
        let mut q = planner();
        let recs = drive(&mut q, &rates, vec![1, 0]);
        let last = recs.last().unwrap();
        assert!(last.planned.prompt_tok_s < 1.3 * 5_000.0 / 0.85, "{last:?}");
    }

    /// Regression: while pods started, the queue grew by the shortfall every tick and each tick added pods for it
    /// again (57 L4s started behind one H100 in a burst). The backlog expected when the starting pods are ready is
    /// planned once.
    #[test]
    fn a_backlog_during_a_cold_start_is_planned_once() {
        let mut p = planner();
        for k in 1..=12 {
            p.observe(at(10.0, 5.0 * f64::from(k)));
        }
        let _ = p.recommend(60.0, &[1, 0], &[1, 0]);
        // The load doubles: 20 req/s against one ready H100 (10).
        let mut queued = 0.0;
        let mut planned = Vec::new();
        let mut cur = vec![1, 0];
        for k in 13..=30 {
            let t = 5.0 * f64::from(k);
            let mut s = at(20.0, t);
            s.queued_prompt_tokens = queued;
            p.observe(s);
            let r = p.recommend(t, &cur, &[1, 0]);
            cur = r.replicas.clone();
            planned.push(r.planned.prompt_tok_s);
            // Nothing new is ready: the shortfall queues up.
            queued += 5.0 * 10_000.0;
        }
        // Once the windows hold the new rate, the plan stays put while the queue grows.
        let tail = &planned[12..];
        let (lo, hi) = tail
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(hi <= lo * 1.05, "{planned:?}");
    }

    proptest! {
        #[test]
        fn never_outside_bounds_for_any_history(
            rates in proptest::collection::vec(0.0f64..400.0, 1..80),
            cur in proptest::collection::vec(0u32..60, 2),
        ) {
            let mut p = planner();
            let recs = drive(&mut p, &rates, cur);
            for r in recs {
                prop_assert!(r.replicas[0] <= 20 && r.replicas[1] <= 40);
            }
        }

        #[test]
        fn no_oscillation_on_a_flat_noisy_load(level in 1.0f64..150.0, noise in 0.0f64..0.1, seed in 0u64..1000) {
            let mut rng = SmallRng::seed_from_u64(seed);
            let rates: Vec<f64> = (0..1440).map(|_| level * (1.0 + noise * (rng.random::<f64>() * 2.0 - 1.0))).collect();
            let mut p = planner();
            let recs = drive(&mut p, &rates, vec![0, 0]);
            // After the first 20 minutes (from zero the panic overshoot takes a cold start and two scale-down delays
            // to unwind: CI's level 8 req/s seed was still stepping down at 13.5 min), the fleet's cost turns back at
            // most once over the next 100 (one correction, such as a pod added on a noise peak and removed after the
            // scale-down delay: level 4.75, 8.6% noise, +0.8 then -0.8 USD/h), and never flip-flops (down-up-down or
            // up-down-up). CI found two seeds that flip-flopped (a flat 50 req/s with 10% noise: -68.8, -4.8, +3.2
            // USD/h; 1.6 req/s with 9%: +0.8, -0.8, +0.8): a noise slope that passed the trend's t-test was
            // extrapolated over the cold start. The trend is now shrunk by its two standard errors.
            let costs: Vec<f64> = recs[240..].iter().map(|r| r.cost_per_hour).collect();
            let moves: Vec<f64> = costs.windows(2).map(|w| w[1] - w[0]).filter(|d| d.abs() > 1e-9).collect();
            let reversals = moves.windows(2).filter(|m| m[0].signum() != m[1].signum()).count();
            prop_assert!(reversals <= 1, "cost moves {moves:?}");
        }

        #[test]
        fn monotone_in_load(a in 0.0f64..300.0, k in 1.0f64..3.0) {
            let mut lo = planner();
            let mut hi = planner();
            lo.observe(at(a, 5.0));
            hi.observe(at(a * k, 5.0));
            let rl = lo.recommend(5.0, &[0, 0], &[0, 0]);
            let rh = hi.recommend(5.0, &[0, 0], &[0, 0]);
            prop_assert!(rh.cost_per_hour >= rl.cost_per_hour - 1e-9);
        }
    }
}
