//! Capacity per pool, measured rather than guessed: like Dynamo's pre-deployment profiler, sweep the request rate of
//! a representative request mix through one pod of the pool in the simulator (virtual time) and keep the highest
//! rate whose p95 TTFT and p95 TPOT stay within the SLO.
//!
//! A prefill pod is measured with ample decode pods behind it and a decode pod with ample prefill pods in front, both
//! through the elastic fleet's P/D path, so the KV pull is on the clock. The result is per pod: requests/s of the mix,
//! the prefill tokens/s and decode tokens/s that rate carries, and the mean requests in flight (Little's law).

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Exp};
use serde::Serialize;
use sim::elastic::{self, ElasticConfig, Fixed, PoolSpec, Slo};
use sim::engine::Role;
use sim::profile::Profile;
use sim::workload::TraceRequest;

/// What one pod sustains within the SLO.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Capacity {
    /// Requests per second of the profiled mix (0 = the SLO is out of reach even at a trickle).
    pub rate: f64,
    /// Prompt tokens per second at that rate (0 for a decode pod).
    pub prefill_tok_s: f64,
    /// Output tokens per second at that rate (0 for a prefill pod).
    pub decode_tok_s: f64,
    /// Mean requests in flight on the pod at that rate.
    pub concurrency: f64,
}

/// How hard to sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepConfig {
    /// Virtual seconds of load per probe.
    pub duration_s: f64,
    /// Requests arriving before this are not judged (the pod warms up).
    pub warmup_s: f64,
    /// Bisection steps after the rate is bracketed.
    pub bisections: u32,
    pub seed: u64,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            duration_s: 240.0,
            warmup_s: 40.0,
            bisections: 6,
            seed: 7,
        }
    }
}

/// A Poisson trace at `rate` whose requests cycle through `mix`'s lengths (prompts made unique by index).
fn probe_trace(mix: &[TraceRequest], rate: f64, duration_s: f64, seed: u64) -> Vec<TraceRequest> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let Ok(exp) = Exp::new(rate) else {
        return out;
    };
    let mut t = exp.sample(&mut rng);
    let mut k = 0usize;
    while t < duration_s && !mix.is_empty() {
        let m = &mix[k % mix.len()];
        out.push(TraceRequest {
            arrival_s: t,
            prefix_group: m.prefix_group,
            prefix_tokens: m.prefix_tokens,
            unique_tokens: m.unique_tokens,
            output_tokens: m.output_tokens,
            unique_seed: k as u64 ^ 0xCAFE_0000_0000,
            session: None,
        });
        k += 1;
        t += exp.sample(&mut rng);
    }
    out
}

/// The fleet a probe of `role` runs on: the pod under test plus ample helpers of the other leg (H100s).
fn probe_fleet(profile: &Profile, role: Role) -> Result<Vec<PoolSpec>, crate::Error> {
    let helper = || Profile::resolve("h100", &profile.model);
    Ok(match role {
        Role::Both => vec![PoolSpec::new(profile.clone(), Role::Both, 1)],
        Role::Prefill => vec![
            PoolSpec::new(profile.clone(), Role::Prefill, 1),
            PoolSpec::new(helper()?, Role::Decode, 4),
        ],
        Role::Decode => vec![
            PoolSpec::new(helper()?, Role::Prefill, 4),
            PoolSpec::new(profile.clone(), Role::Decode, 1),
        ],
    })
}

/// `x <= bound`, or no value at all (no request produced two tokens: nothing to judge).
fn nan_or_le(x: f64, bound: f64) -> bool {
    x.is_nan() || x <= bound
}

/// Whether one pod meets the SLO at `rate`; with the outcome's mean in-flight count.
fn probe(
    pools: &[PoolSpec],
    mix: &[TraceRequest],
    rate: f64,
    slo: Slo,
    cfg: &SweepConfig,
) -> (bool, f64) {
    let trace = probe_trace(mix, rate, cfg.duration_s, cfg.seed);
    let ecfg = ElasticConfig {
        slo,
        hold_timeout_s: cfg.duration_s,
        ..ElasticConfig::default()
    };
    let rep = elastic::run(pools, &trace, &mut Fixed, &ecfg);
    let judged: Vec<_> = rep
        .per_request
        .iter()
        .filter(|r| r.arrival >= cfg.warmup_s)
        .collect();
    if judged.is_empty() || rep.completed < trace.len() {
        return (false, 0.0);
    }
    let mut ttft: Vec<f64> = judged.iter().map(|r| r.ttft).collect();
    let mut tpot: Vec<f64> = judged
        .iter()
        .map(|r| r.mean_itl)
        .filter(|x| x.is_finite())
        .collect();
    let ok = elastic::quantile(&mut ttft, 0.95) <= slo.ttft_s
        && nan_or_le(elastic::quantile(&mut tpot, 0.95), slo.tpot_s);
    let e2e = judged.iter().map(|r| r.e2e).sum::<f64>() / judged.len() as f64;
    (ok, rate * e2e)
}

/// Sweep one pod of `profile` in `role` over the rate of `mix` and return its SLO capacity.
pub fn measure(
    profile: &Profile,
    role: Role,
    mix: &[TraceRequest],
    slo: Slo,
    cfg: &SweepConfig,
) -> Result<Capacity, crate::Error> {
    let pools = probe_fleet(profile, role)?;
    if mix.is_empty() {
        return Ok(Capacity::default());
    }
    let n = mix.len() as f64;
    let mean_prompt = mix.iter().map(|r| f64::from(r.prompt_len())).sum::<f64>() / n;
    let mean_output = mix.iter().map(|r| f64::from(r.output_tokens)).sum::<f64>() / n;
    // Bracket: the lowest probe rate sends ~20 requests per probe.
    let floor = 20.0 / (cfg.duration_s - cfg.warmup_s).max(1.0);
    let (ok, mut conc) = probe(&pools, mix, floor, slo, cfg);
    if !ok {
        return Ok(Capacity::default());
    }
    let (mut lo, mut hi) = (floor, floor * 2.0);
    for _ in 0..12 {
        let (ok, c) = probe(&pools, mix, hi, slo, cfg);
        if !ok {
            break;
        }
        (lo, conc) = (hi, c);
        hi *= 2.0;
    }
    for _ in 0..cfg.bisections {
        let mid = (lo + hi) / 2.0;
        let (ok, c) = probe(&pools, mix, mid, slo, cfg);
        if ok {
            (lo, conc) = (mid, c);
        } else {
            hi = mid;
        }
    }
    Ok(Capacity {
        rate: lo,
        prefill_tok_s: if role == Role::Decode {
            0.0
        } else {
            lo * mean_prompt
        },
        decode_tok_s: if role == Role::Prefill {
            0.0
        } else {
            lo * mean_output
        },
        concurrency: conc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::workload::Workload;

    fn mix() -> Vec<TraceRequest> {
        Workload::AzureConv.generate(200.0, Some(1.0), &mut SmallRng::seed_from_u64(1))
    }

    fn quick() -> SweepConfig {
        SweepConfig {
            duration_s: 120.0,
            warmup_s: 20.0,
            bisections: 3,
            seed: 1,
        }
    }

    #[test]
    fn an_h100_sustains_more_than_an_l4_and_a_tight_slo_lowers_capacity() {
        let slo = Slo {
            ttft_s: 2.0,
            tpot_s: 0.1,
        };
        let p = |g: &str| Profile::resolve(g, "llama-3.1-8b").unwrap();
        let h = measure(&p("h100"), Role::Both, &mix(), slo, &quick()).unwrap();
        let l = measure(&p("l4"), Role::Both, &mix(), slo, &quick()).unwrap();
        assert!(h.rate > 2.0 * l.rate && l.rate > 0.0, "{h:?} {l:?}");
        assert!(h.prefill_tok_s > 0.0 && h.decode_tok_s > 0.0 && h.concurrency > 0.0);
        // An L4 step at batch 1 is ~66 ms: a 50 ms TPOT objective is out of reach at any load.
        let tight = Slo {
            ttft_s: 2.0,
            tpot_s: 0.05,
        };
        assert_eq!(
            measure(&p("l4"), Role::Both, &mix(), tight, &quick())
                .unwrap()
                .rate,
            0.0
        );
    }
}
