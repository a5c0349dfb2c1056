//! Built-in load for `weir plan`: a day-shaped (diurnal) arrival rate with bursts, and request lengths from one or
//! more of the simulator's workloads. Arrivals are a non-homogeneous Poisson process drawn by thinning, so the trace
//! is a pure function of the spec and the seed.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp};
use sim::workload::{TraceRequest, Workload};

/// A burst: the rate is multiplied by `multiplier` between `start_s` and `start_s + duration_s`, reached linearly over
/// `ramp_s` at both ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    pub start_s: f64,
    pub duration_s: f64,
    pub multiplier: f64,
    pub ramp_s: f64,
}

/// The arrival-rate shape and the request mix.
#[derive(Debug, Clone, PartialEq)]
pub struct DiurnalSpec {
    pub duration_s: f64,
    /// Rate at the quietest hour, req/s.
    pub trough_rate: f64,
    /// Rate at the busiest hour, req/s.
    pub peak_rate: f64,
    /// Hour of the day (0-24) of the peak; the trough is half a day away.
    pub peak_hour: f64,
    /// Length of one "day" in seconds (86,400; shorter compresses the cycle for quick virtual-time tests, with
    /// `peak_hour` a fraction of 24 of it and the bursts at absolute times).
    pub period_s: f64,
    pub bursts: Vec<Burst>,
    /// Workloads whose lengths the requests take, with their shares (normalised).
    pub mix: Vec<(Workload, f64)>,
}

impl DiurnalSpec {
    /// 24 h of chat (Azure conversation lengths): 1 req/s at 02:00 to `peak` req/s at 14:00, with three bursts:
    /// 09:00 x2 for 10 min, 13:30 x1.5 for 20 min, 19:00 x2.5 for 5 min, each ramping up over 2 min.
    pub fn day(peak: f64) -> Self {
        let b = |h: f64, mins: f64, m: f64| Burst {
            start_s: h * 3600.0,
            duration_s: mins * 60.0,
            multiplier: m,
            ramp_s: 120.0,
        };
        DiurnalSpec {
            duration_s: 86_400.0,
            trough_rate: peak / 10.0,
            peak_rate: peak,
            peak_hour: 14.0,
            period_s: 86_400.0,
            bursts: vec![b(9.0, 10.0, 2.0), b(13.5, 20.0, 1.5), b(19.0, 5.0, 2.5)],
            mix: vec![(Workload::AzureConv, 1.0)],
        }
    }

    /// Arrival rate at `t`, req/s.
    pub fn rate(&self, t: f64) -> f64 {
        let hour = (t / self.period_s * 24.0).rem_euclid(24.0);
        let phase = (hour - self.peak_hour) / 24.0 * std::f64::consts::TAU;
        let day =
            self.trough_rate + (self.peak_rate - self.trough_rate) * (1.0 + phase.cos()) / 2.0;
        let mut m: f64 = 1.0;
        for b in &self.bursts {
            let into = t - b.start_s;
            let left = b.start_s + b.duration_s - t;
            if into < 0.0 || left < 0.0 {
                continue;
            }
            let ramp = if b.ramp_s > 0.0 {
                (into.min(left) / b.ramp_s).min(1.0)
            } else {
                1.0
            };
            m = m.max(1.0 + (b.multiplier - 1.0) * ramp);
        }
        day * m
    }

    fn max_rate(&self) -> f64 {
        let m = self
            .bursts
            .iter()
            .map(|b| b.multiplier)
            .fold(1.0f64, f64::max);
        self.peak_rate.max(self.trough_rate) * m
    }

    /// The trace for `seed`.
    pub fn generate(&self, seed: u64) -> Vec<TraceRequest> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let lmax = self.max_rate();
        let total: f64 = self.mix.iter().map(|(_, s)| s.max(0.0)).sum();
        let samplers: Vec<_> = self
            .mix
            .iter()
            .map(|(w, s)| (w.sampler(), s.max(0.0)))
            .collect();
        let mut out = Vec::new();
        let Ok(exp) = Exp::new(lmax) else {
            return out;
        };
        if total <= 0.0 {
            return out;
        }
        let mut t = exp.sample(&mut rng);
        while t < self.duration_s {
            if rng.random::<f64>() * lmax < self.rate(t) {
                let mut pick = rng.random::<f64>() * total;
                let mut chosen = &samplers[0].0;
                for (s, share) in &samplers {
                    chosen = s;
                    if pick < *share {
                        break;
                    }
                    pick -= share;
                }
                let i = out.len() as u64;
                out.push(chosen.draw(i, t, &mut rng));
            }
            t += exp.sample(&mut rng);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_day_peaks_at_its_hour_and_bursts_ramp() {
        let d = DiurnalSpec::day(10.0);
        assert!((d.rate(14.0 * 3600.0) - 10.0).abs() < 1e-9);
        assert!((d.rate(2.0 * 3600.0) - 1.0).abs() < 1e-9);
        let start = 19.0 * 3600.0;
        let mut calm = d.clone();
        calm.bursts.clear();
        let ratio = |t: f64| d.rate(t) / calm.rate(t);
        assert!(
            (ratio(start + 60.0) - 1.75).abs() < 1e-9,
            "half-way up the ramp"
        );
        assert!((ratio(start + 150.0) - 2.5).abs() < 1e-9);
        assert!((ratio(start + 301.0) - 1.0).abs() < 1e-9);
        // A day compressed into an hour peaks at 14/24 of it.
        let mut short = calm.clone();
        short.period_s = 3600.0;
        assert!((short.rate(14.0 * 150.0) - 10.0).abs() < 1e-9);
        assert!((short.rate(2.0 * 150.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn arrivals_follow_the_rate_and_are_deterministic() {
        let mut d = DiurnalSpec::day(10.0);
        d.duration_s = 4.0 * 3600.0;
        d.peak_hour = 2.0;
        let a = d.generate(3);
        assert_eq!(a, d.generate(3));
        let first_hour = a.iter().filter(|r| r.arrival_s < 3600.0).count() as f64;
        // Mean rate over 00:00-01:00 with the peak at 02:00.
        let want: f64 = (0..3600).map(|s| d.rate(f64::from(s))).sum();
        assert!(
            (first_hour - want).abs() < 4.0 * want.sqrt(),
            "{first_hour} vs {want}"
        );
        let mut m = d.clone();
        m.mix = vec![(Workload::AzureConv, 1.0), (Workload::LongPrompt, 1.0)];
        let long = m
            .generate(3)
            .iter()
            .filter(|r| r.prompt_len() == 8192)
            .count() as f64;
        assert!((long / m.generate(3).len() as f64 - 0.5).abs() < 0.05);
    }
}
