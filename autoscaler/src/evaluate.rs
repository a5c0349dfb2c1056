//! One trace through every policy on the same elastic fleet: what `weir plan` prints. Measures each pool's capacity
//! first (the profiler sweep), then replays the trace under static peak, HPA, KEDA, weir and the oracle.

use serde::Serialize;
use sim::elastic::{self, Controller, ElasticConfig, ElasticReport, PoolSpec, Slo};
use sim::engine::Role;
use sim::profile::Profile;
use sim::workload::TraceRequest;

use crate::baselines::{self, Hpa, HpaMetric, Oracle};
use crate::capacity::{self, SweepConfig};
use crate::control::{WeirController, WithProgress};
use crate::crd::PlannerConfig;
use crate::mix::{self, Demand, PoolOption};
use crate::planner::Planner;

/// One pool to consider: GPU type and role, with replica bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolChoice {
    pub gpu: String,
    pub role: Role,
    pub min: u32,
    pub max: u32,
}

/// Everything fixed across the policies of one comparison.
#[derive(Debug, Clone)]
pub struct Setup {
    pub model: String,
    pub slo: Slo,
    /// Headroom shared by every capacity-based policy.
    pub utilization: f64,
    pub tick_s: f64,
    pub seed: u64,
    pub sweep: SweepConfig,
    /// Demand buckets of the static and oracle policies, seconds.
    pub bucket_s: f64,
    pub horizon_s: f64,
}

/// The policies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    StaticPeak,
    Hpa,
    Keda,
    Weir,
    Oracle,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::StaticPeak,
        Policy::Hpa,
        Policy::Keda,
        Policy::Weir,
        Policy::Oracle,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Policy::StaticPeak => "static-peak",
            Policy::Hpa => "hpa",
            Policy::Keda => "keda",
            Policy::Weir => "weir",
            Policy::Oracle => "oracle",
        }
    }
}

/// Measure every pool's capacity with `sample` as the request mix.
pub fn measure_pools(
    setup: &Setup,
    choices: &[PoolChoice],
    sample: &[TraceRequest],
) -> crate::Result<Vec<PoolOption>> {
    choices
        .iter()
        .map(|c| {
            let profile = Profile::resolve(&c.gpu, &setup.model)?;
            let cap = capacity::measure(&profile, c.role, sample, setup.slo, &setup.sweep)?;
            let quota = profile.gpu_spec.available_gpus / profile.tp.max(1);
            Ok(PoolOption {
                name: format!("{}/{}", profile.gpu, c.role),
                gpu: profile.gpu.clone(),
                role: c.role,
                price_per_hour: profile.price_per_hour(),
                min: c.min,
                max: c.max.min(quota).max(c.min),
                capacity: cap,
            })
        })
        .collect()
}

/// The pool whose pods cost least per request/s of SLO capacity (aggregated pools only).
pub fn best_single(pools: &[PoolOption]) -> Option<usize> {
    (0..pools.len())
        .filter(|&i| pools[i].role == Role::Both && pools[i].capacity.rate > 0.0)
        .min_by(|&a, &b| {
            let per = |i: usize| pools[i].price_per_hour / pools[i].capacity.rate;
            per(a).total_cmp(&per(b)).then(a.cmp(&b))
        })
}

fn fleet(setup: &Setup, pools: &[PoolOption], initial: &[u32]) -> crate::Result<Vec<PoolSpec>> {
    pools
        .iter()
        .zip(initial)
        .map(|(p, &n)| {
            let profile = Profile::resolve(&p.gpu, &setup.model)?;
            let mut s = PoolSpec::new(profile, p.role, n);
            s.name = p.name.clone();
            s.weight = p.capacity.rate.max(1e-6);
            Ok(s)
        })
        .collect()
}

/// Replay `trace` under `policy`; `on_tick(now)` is called every controller tick.
pub fn run_policy(
    policy: Policy,
    setup: &Setup,
    pools: &[PoolOption],
    trace: &[TraceRequest],
    on_tick: &mut dyn FnMut(f64),
) -> crate::Result<ElasticReport> {
    let buckets = baselines::demand_buckets(trace, setup.bucket_s, setup.horizon_s);
    let first = buckets.first().copied().unwrap_or_default();
    let warm = mix::cheapest(pools, first.scale(1.0 / setup.utilization)).replicas;
    let startup = pools
        .iter()
        .filter_map(|p| Profile::resolve(&p.gpu, &setup.model).ok())
        .map(|p| p.startup_s)
        .fold(0.0, f64::max);
    let single = best_single(pools);
    let single_warm = |pool: usize| -> Vec<u32> {
        let mut v = vec![0; pools.len()];
        let only = vec![pools[pool].clone()];
        v[pool] = mix::cheapest(&only, first.scale(1.0 / setup.utilization)).replicas[0].max(1);
        v
    };
    let (initial, mut controller): (Vec<u32>, Box<dyn Controller>) = match policy {
        Policy::StaticPeak => (
            baselines::static_peak(pools, &buckets, setup.utilization),
            Box::new(elastic::Fixed),
        ),
        Policy::Hpa | Policy::Keda => {
            let Some(k) = single else {
                return Err(crate::Error::InvalidConfig {
                    field: "pools".into(),
                    reason: "no aggregated pool meets the SLO: nothing for the HPA to scale".into(),
                });
            };
            let p = &pools[k];
            let h = if policy == Policy::Hpa {
                Hpa::new(
                    "hpa",
                    k,
                    HpaMetric::InFlightPerPod,
                    setup.utilization * p.capacity.concurrency.max(0.1),
                    p.min.max(1),
                    p.max,
                )
            } else {
                Hpa::keda(k, 5.0, p.min.max(1), p.max)
            };
            (single_warm(k), Box::new(h))
        }
        Policy::Weir => {
            let mut cfg = PlannerConfig::new(&setup.model, setup.slo.ttft_s, setup.slo.tpot_s);
            cfg.target_utilization = setup.utilization;
            let planner = Planner::new(cfg, pools.to_vec(), startup);
            (warm.clone(), Box::new(WeirController::new(planner)))
        }
        Policy::Oracle => (
            warm.clone(),
            Box::new(Oracle {
                pools: pools.to_vec(),
                buckets,
                window_s: setup.bucket_s,
                lead_s: startup + setup.tick_s,
                utilization: setup.utilization,
            }),
        ),
    };
    let specs = fleet(setup, pools, &initial)?;
    let cfg = ElasticConfig {
        tick_s: setup.tick_s,
        horizon_s: Some(setup.horizon_s),
        slo: setup.slo,
        des: sim::des::DesConfig {
            seed: setup.seed,
            trace_seed: setup.seed,
            ..Default::default()
        },
        ..ElasticConfig::default()
    };
    let mut ctl = WithProgress {
        inner: controller.as_mut(),
        on_tick,
    };
    let mut rep = elastic::run(&specs, trace, &mut ctl, &cfg);
    rep.controller = policy.name().to_string();
    Ok(rep)
}

/// One line of the comparison table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub policy: String,
    pub cost_usd: f64,
    pub within_slo_pct: f64,
    pub gpu_hours: f64,
    pub ttft_p95_s: f64,
    pub tpot_p95_s: f64,
    pub timed_out: usize,
    pub pods_created: u32,
    pub energy_kwh: f64,
}

impl Row {
    pub fn of(rep: &ElasticReport) -> Self {
        Row {
            policy: rep.controller.clone(),
            cost_usd: rep.cost_usd,
            within_slo_pct: rep.slo_attainment() * 100.0,
            gpu_hours: rep.gpu_hours,
            ttft_p95_s: rep.ttft_p95,
            tpot_p95_s: rep.tpot_p95,
            timed_out: rep.timed_out,
            pods_created: rep.pools.iter().map(|p| p.pods_created).sum(),
            energy_kwh: rep.energy_kwh,
        }
    }
}

/// The comparison as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| policy | cost (USD) | within SLO | GPU-hours | p95 TTFT (s) | p95 TPOT (ms) | timed out | pods started | energy (kWh) |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.2} | {:.2}% | {:.1} | {:.3} | {:.1} | {} | {} | {:.1} |\n",
            r.policy,
            r.cost_usd,
            r.within_slo_pct,
            r.gpu_hours,
            r.ttft_p95_s,
            r.tpot_p95_s * 1e3,
            r.timed_out,
            r.pods_created,
            r.energy_kwh
        ));
    }
    s
}

/// Capacity table of the measured pools.
pub fn capacity_markdown(pools: &[PoolOption]) -> String {
    let mut s = String::from(
        "| pool | USD/pod-h | req/s within SLO | prefill tok/s | decode tok/s | USD per 1M output tok | max |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for p in pools {
        let per_m = if p.capacity.decode_tok_s > 0.0 {
            format!(
                "{:.3}",
                p.price_per_hour / (p.capacity.decode_tok_s * 3600.0) * 1e6
            )
        } else {
            "-".into()
        };
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {} |\n",
            p.name,
            p.price_per_hour,
            p.capacity.rate,
            p.capacity.prefill_tok_s,
            p.capacity.decode_tok_s,
            per_m,
            p.max
        ));
    }
    s
}

/// Demand helper for callers: mean token rates of a trace over `horizon_s`.
pub fn mean_demand(trace: &[TraceRequest], horizon_s: f64) -> Demand {
    let h = horizon_s.max(1e-9);
    Demand {
        prompt_tok_s: trace.iter().map(|r| f64::from(r.prompt_len())).sum::<f64>() / h,
        output_tok_s: trace
            .iter()
            .map(|r| f64::from(r.output_tokens))
            .sum::<f64>()
            / h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::{Capacity, SweepConfig};

    fn request(arrival_s: f64, seed: u64) -> TraceRequest {
        TraceRequest {
            arrival_s,
            prefix_group: None,
            prefix_tokens: 0,
            unique_tokens: 200,
            output_tokens: 50,
            unique_seed: seed,
            session: None,
        }
    }

    /// `weir plan`'s path at zero: the weir policy on one pool with min 0 and a trace whose first bucket is quiet,
    /// so the run starts with no pod. The first requests are held through the cold start of the pod the planner asks
    /// for, then served: none lost.
    #[test]
    fn from_zero_the_planner_starts_a_pod_for_the_first_request_which_is_held_then_served() {
        let setup = Setup {
            model: "llama-3.1-8b".into(),
            slo: Slo {
                ttft_s: 2.0,
                tpot_s: 0.1,
            },
            utilization: 0.85,
            tick_s: 5.0,
            seed: 0,
            sweep: SweepConfig {
                duration_s: 60.0,
                warmup_s: 10.0,
                bisections: 2,
                seed: 0,
            },
            bucket_s: 60.0,
            horizon_s: 900.0,
        };
        let pools = vec![PoolOption {
            name: "h100/both".into(),
            gpu: "h100".into(),
            role: Role::Both,
            price_per_hour: 6.88,
            min: 0,
            max: 4,
            capacity: Capacity {
                rate: 5.0,
                prefill_tok_s: 5000.0,
                decode_tok_s: 1000.0,
                concurrency: 8.0,
            },
        }];
        let trace = vec![request(90.0, 1), request(91.0, 2), request(97.0, 3)];
        let rep = run_policy(Policy::Weir, &setup, &pools, &trace, &mut |_| {}).unwrap();
        assert_eq!(rep.series[0].replicas, vec![0], "the run starts at zero");
        assert_eq!((rep.completed, rep.timed_out, rep.rejected), (3, 0, 0));
        assert!(rep.pools[0].pods_created >= 1);
        let startup = Profile::resolve("h100", "llama-3.1-8b").unwrap().startup_s;
        // Asked for at the first tick at or after the first arrival, ready a cold start later: every request waited
        // for it.
        for (r, t) in rep.per_request.iter().zip(&trace) {
            assert!(
                t.arrival_s + r.ttft >= trace[0].arrival_s + startup,
                "{r:?}"
            );
        }
        assert!(rep.series.iter().any(|s| s.held > 0 && s.ready == vec![0]));
    }
}
