//! `weir plan`: replay a trace (a JSONL file as `weir bench --trace` reads it, or the built-in 24 h diurnal + burst
//! day) through the simulator's elastic fleet in virtual time under each scaling policy (static peak, HPA, KEDA,
//! weir, perfect-foresight oracle); print the comparison table, the measured pool capacities and the wall time, and
//! write SVG plots of replicas, cost and latency over time. `--what-if` instead runs weir's planner with each GPU type
//! alone and with all of them, and names the cheapest fleet that meets the SLO.

use std::path::PathBuf;

use anyhow::{Context, bail};
use autoscaler::capacity::SweepConfig;
use autoscaler::evaluate::{self, Policy, PoolChoice, Row, Setup};
use autoscaler::svg::{self, Line};
use autoscaler::trace::DiurnalSpec;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use policies::tokens::{ByteTokenizer, Tokenizer};
use sim::elastic::{ElasticReport, Slo};
use sim::engine::Role;
use sim::workload::{TraceRequest, Workload};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// JSONL trace (`{"t":s,"prompt_tokens":n,"output_tokens":m,"prefix_group":g}` per line, as `weir bench --trace`
    /// reads). Default: the built-in diurnal + burst day.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Built-in day: length in seconds of virtual time.
    #[arg(long, default_value_t = 86_400.0)]
    pub duration: f64,
    /// Built-in day: length of one day cycle in seconds (shorter compresses the diurnal shape for quick runs; the
    /// bursts stay at their absolute times).
    #[arg(long, default_value_t = 86_400.0)]
    pub day_length: f64,
    /// Built-in day: no bursts, the diurnal shape alone.
    #[arg(long)]
    pub no_bursts: bool,
    /// Built-in day: request rate at the busiest hour (the quietest is a tenth of it), req/s.
    #[arg(long, default_value_t = 20.0)]
    pub peak_rate: f64,
    /// Built-in day: request lengths, `workload[:share],...` (e.g. `azure-conv:3,long-prompt:1`).
    #[arg(long, default_value = "azure-conv")]
    pub mix: String,
    #[arg(long, default_value = "llama-3.1-8b")]
    pub model: String,
    /// GPU types to build aggregated pools of.
    #[arg(long, default_value = "h100,a100-80gb,a100-40gb,l4")]
    pub gpus: String,
    /// Also offer prefill and decode pools of every GPU type.
    #[arg(long)]
    pub pd: bool,
    /// Replica cap per pool (also capped by the GPU type's `available_gpus`).
    #[arg(long, default_value_t = 64)]
    pub max_replicas: u32,
    /// p95 TTFT objective, milliseconds.
    #[arg(long, default_value_t = 2000.0)]
    pub ttft_slo_ms: f64,
    /// p95 time-per-output-token objective, milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub tpot_slo_ms: f64,
    /// Fraction of measured capacity the capacity-based policies plan to use.
    #[arg(long, default_value_t = 0.85)]
    pub utilization: f64,
    /// Policies to compare, comma-separated.
    #[arg(long, default_value = "static-peak,hpa,keda,weir,oracle")]
    pub policies: String,
    /// Controller tick, seconds of virtual time.
    #[arg(long, default_value_t = 5.0)]
    pub tick: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Runs in parallel (threads).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Directory for plan.md, plan.json and the SVG plots.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Cheapest fleet for the trace and SLO: weir with each GPU type alone, and with all of them.
    #[arg(long)]
    pub what_if: bool,
    /// Minimum share of requests within the SLO for `--what-if` to accept a fleet, percent.
    #[arg(long, default_value_t = 99.0)]
    pub min_slo_pct: f64,
}

fn parse_mix(s: &str) -> anyhow::Result<Vec<(Workload, f64)>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (w, share) = match p.split_once(':') {
                Some((w, x)) => (
                    w,
                    x.parse::<f64>()
                        .with_context(|| format!("--mix share `{x}`"))?,
                ),
                None => (p, 1.0),
            };
            if !(share.is_finite() && share > 0.0) {
                bail!("--mix share must be > 0, got {share}");
            }
            Ok((
                w.trim().parse::<Workload>().map_err(anyhow::Error::msg)?,
                share,
            ))
        })
        .collect()
}

/// The `weir bench --trace` file as simulator requests (its parser, its grouping rule: a group's shared prefix is
/// `prefix_tokens`, default half the prompt; literal prompts are counted with the byte tokenizer).
fn read_trace(path: &PathBuf) -> anyhow::Result<Vec<TraceRequest>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let entries = crate::bench::workload::parse_trace(&text)
        .map_err(|e| anyhow::anyhow!("{}: line {}: {}", path.display(), e.line, e.reason))?;
    if entries.is_empty() {
        bail!("{}: trace has no requests", path.display());
    }
    Ok(entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let total = match &e.prompt {
                Some(p) => ByteTokenizer.encode(p).len() as u32,
                None => e.prompt_tokens.unwrap_or(1),
            }
            .max(1);
            let shared = match e.prefix_group {
                Some(_) => e.prefix_tokens.unwrap_or(total / 2).min(total),
                None => 0,
            };
            TraceRequest {
                arrival_s: e.t,
                prefix_group: e.prefix_group,
                prefix_tokens: shared,
                unique_tokens: total - shared,
                output_tokens: e.output_tokens,
                unique_seed: i as u64,
                session: None,
            }
        })
        .collect())
}

fn choices(args: &PlanArgs, gpus: &[&str]) -> Vec<PoolChoice> {
    let mut out = Vec::new();
    for role in [Role::Both, Role::Prefill, Role::Decode] {
        if role != Role::Both && !args.pd {
            continue;
        }
        for g in gpus {
            out.push(PoolChoice {
                gpu: g.to_string(),
                role,
                min: 0,
                max: args.max_replicas,
            });
        }
    }
    out
}

fn bar(total: u64) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {percent}% virtual time {msg}")
    {
        b.set_style(style.progress_chars("=> "));
    }
    b
}

/// Run `jobs` of (label, policy, pools) on up to `threads` threads; the bar advances in virtual seconds.
fn run_all(
    setup: &Setup,
    trace: &[TraceRequest],
    runs: Vec<(String, Policy, Vec<autoscaler::mix::PoolOption>)>,
    threads: usize,
) -> anyhow::Result<Vec<(String, ElasticReport, f64)>> {
    let pb = bar((setup.horizon_s * runs.len() as f64) as u64);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = parking_lot::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(runs.len()) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((label, policy, pools)) = runs.get(k) else {
                        break;
                    };
                    // Wall time of this run (printed; never a decision input).
                    #[allow(clippy::disallowed_methods)]
                    let started = std::time::Instant::now();
                    let mut last = 0.0;
                    let mut tick = |now: f64| {
                        pb.inc((now - last).max(0.0) as u64);
                        last = now;
                    };
                    let r = evaluate::run_policy(*policy, setup, pools, trace, &mut tick);
                    let wall = started.elapsed().as_secs_f64();
                    results.lock().push((k, label.clone(), r, wall));
                }
            });
        }
    });
    pb.finish_and_clear();
    let mut v = results.into_inner();
    v.sort_by_key(|r| r.0);
    v.into_iter().map(|(_, l, r, w)| Ok((l, r?, w))).collect()
}

/// Points of one series, one per minute (the maximum of the minute), hours on x.
fn per_minute(rep: &ElasticReport, f: impl Fn(&sim::elastic::Sample) -> f64) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for s in &rep.series {
        let m = (s.t / 60.0).floor();
        let y = f(s);
        match out.last_mut() {
            Some(last) if last.0 == m => {
                if y > last.1 || !last.1.is_finite() {
                    last.1 = y;
                }
            }
            _ => out.push((m, y)),
        }
    }
    out.into_iter().map(|(m, y)| (m / 60.0, y)).collect()
}

fn write_plots(dir: &PathBuf, reports: &[(String, ElasticReport, f64)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let lines = |f: &dyn Fn(&sim::elastic::Sample) -> f64| -> Vec<Line<'_>> {
        reports
            .iter()
            .map(|(l, r, _)| Line {
                name: l,
                points: per_minute(r, f),
            })
            .collect()
    };
    let replicas = svg::chart(
        "Pods (ready + starting) over the day",
        "hour",
        "pods",
        &lines(&|s| f64::from(s.replicas.iter().sum::<u32>())),
    );
    let cost = svg::chart(
        "Fleet cost rate",
        "hour",
        "USD per hour",
        &lines(&|s| s.cost_per_hour),
    );
    let ttft = svg::chart(
        "p95 TTFT per 5 s window (max of the minute)",
        "hour",
        "seconds",
        &lines(&|s| s.ttft_p95.min(30.0)),
    );
    std::fs::write(dir.join("replicas.svg"), replicas)?;
    std::fs::write(dir.join("cost.svg"), cost)?;
    std::fs::write(dir.join("ttft.svg"), ttft)?;
    Ok(())
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    // The one wall-clock read of the command besides per-run timers: total elapsed time, printed.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    if !(args.utilization > 0.0 && args.utilization <= 1.0) {
        bail!("--utilization must be in (0, 1]");
    }
    if !(args.tick.is_finite() && args.tick > 0.0) {
        bail!("--tick must be > 0");
    }
    let (trace, source) = match &args.trace {
        Some(p) => (read_trace(p)?, format!("trace {}", p.display())),
        None => {
            if !(args.duration.is_finite() && args.duration > 0.0) {
                bail!("--duration must be > 0");
            }
            if !(args.day_length.is_finite() && args.day_length > 0.0) {
                bail!("--day-length must be > 0");
            }
            let mut spec = DiurnalSpec::day(args.peak_rate);
            spec.duration_s = args.duration;
            spec.period_s = args.day_length;
            if args.no_bursts {
                spec.bursts.clear();
            }
            spec.mix = parse_mix(&args.mix)?;
            if spec.mix.is_empty() {
                bail!("--mix is empty");
            }
            (
                spec.generate(args.seed),
                format!(
                    "built-in day: {} s, day length {} s, peak {} req/s (trough {}), mix {}, {}",
                    args.duration,
                    args.day_length,
                    args.peak_rate,
                    args.peak_rate / 10.0,
                    args.mix,
                    if args.no_bursts {
                        "no bursts"
                    } else {
                        "bursts x2 at 09:00 for 10 min, x1.5 at 13:30 for 20 min, x2.5 at 19:00 for 5 min (2 min ramps)"
                    }
                ),
            )
        }
    };
    let horizon = match &args.trace {
        Some(_) => trace.iter().map(|r| r.arrival_s).fold(0.0, f64::max),
        None => args.duration,
    };
    let setup = Setup {
        model: args.model.clone(),
        slo: Slo {
            ttft_s: args.ttft_slo_ms / 1e3,
            tpot_s: args.tpot_slo_ms / 1e3,
        },
        utilization: args.utilization,
        tick_s: args.tick,
        seed: args.seed,
        sweep: SweepConfig::default(),
        bucket_s: 60.0,
        horizon_s: horizon,
    };
    // Capacity mix: up to 2,000 requests spread evenly over the trace.
    let stride = (trace.len() / 2000).max(1);
    let sample: Vec<TraceRequest> = trace.iter().step_by(stride).cloned().collect();
    let gpus: Vec<&str> = args
        .gpus
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .collect();
    let all = choices(&args, &gpus);
    let pools = evaluate::measure_pools(&setup, &all, &sample)?;
    println!(
        "{source}; {} requests; model {}; SLO p95 TTFT {} ms, p95 TPOT {} ms; utilization target {}; seed {}\n",
        trace.len(),
        args.model,
        args.ttft_slo_ms,
        args.tpot_slo_ms,
        args.utilization,
        args.seed
    );
    println!(
        "Measured pod capacity (simulator sweep, virtual time):\n\n{}",
        evaluate::capacity_markdown(&pools)
    );
    let runs: Vec<(String, Policy, Vec<autoscaler::mix::PoolOption>)> = if args.what_if {
        let mut v = Vec::new();
        for g in &gpus {
            let only: Vec<_> = pools
                .iter()
                .filter(|p| p.gpu == *g || p.gpu.starts_with(g))
                .cloned()
                .collect();
            if only
                .iter()
                .any(|p| p.capacity.rate > 0.0 || p.role != Role::Both)
            {
                v.push((format!("weir, {g} only"), Policy::Weir, only));
            }
        }
        v.push((
            "weir, all GPU types".to_string(),
            Policy::Weir,
            pools.clone(),
        ));
        v
    } else {
        let mut v = Vec::new();
        for name in args
            .policies
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let p = Policy::ALL
                .into_iter()
                .find(|p| p.name() == name)
                .with_context(|| {
                    format!("unknown policy `{name}` (static-peak, hpa, keda, weir, oracle)")
                })?;
            v.push((p.name().to_string(), p, pools.clone()));
        }
        v
    };
    let reports = run_all(&setup, &trace, runs, args.jobs)?;
    let rows: Vec<Row> = reports
        .iter()
        .map(|(l, r, _)| {
            let mut row = Row::of(r);
            row.policy = l.clone();
            row
        })
        .collect();
    let mut md = evaluate::markdown(&rows);
    md.push('\n');
    for (l, r, wall) in &reports {
        let pools_used: Vec<String> = r
            .pools
            .iter()
            .filter(|p| p.pods_created > 0)
            .map(|p| {
                format!(
                    "{} (max {}, {:.1} pod-h)",
                    p.name, p.max_replicas, p.pod_hours
                )
            })
            .collect();
        md.push_str(&format!(
            "- {l}: wall time {wall:.1} s; pools used: {}\n",
            pools_used.join(", ")
        ));
    }
    let by = |name: &str| rows.iter().find(|r| r.policy == name);
    if let (Some(w), Some(s)) = (by("weir"), by("static-peak")) {
        md.push_str(&format!(
            "\nweir / static-peak cost: {:.3}\n",
            w.cost_usd / s.cost_usd
        ));
    }
    if let (Some(w), Some(h)) = (by("weir"), by("hpa")) {
        md.push_str(&format!(
            "weir / hpa cost: {:.3}\n",
            w.cost_usd / h.cost_usd
        ));
    }
    if let (Some(w), Some(k)) = (by("weir"), by("keda")) {
        md.push_str(&format!(
            "weir / keda cost: {:.3}\n",
            w.cost_usd / k.cost_usd
        ));
    }
    if let (Some(w), Some(o)) = (by("weir"), by("oracle")) {
        md.push_str(&format!(
            "weir / oracle cost: {:.3}\n",
            w.cost_usd / o.cost_usd
        ));
    }
    if args.what_if {
        let ok = |r: &&Row| r.within_slo_pct >= args.min_slo_pct;
        let best = rows
            .iter()
            .filter(ok)
            .min_by(|a, b| a.cost_usd.total_cmp(&b.cost_usd));
        let best_single = rows
            .iter()
            .filter(|r| r.policy.ends_with(" only"))
            .filter(ok)
            .min_by(|a, b| a.cost_usd.total_cmp(&b.cost_usd));
        match best {
            Some(b) => {
                let (_, rep, _) = reports
                    .iter()
                    .find(|(l, _, _)| *l == b.policy)
                    .context("report")?;
                let mix: Vec<String> = rep
                    .pools
                    .iter()
                    .filter(|p| p.pods_created > 0)
                    .map(|p| {
                        format!(
                            "{} {:.1} pod-h (max {})",
                            p.name, p.pod_hours, p.max_replicas
                        )
                    })
                    .collect();
                md.push_str(&format!(
                    "\ncheapest fleet with >= {}% within SLO: {} at {:.2} USD: {}\n",
                    args.min_slo_pct,
                    b.policy,
                    b.cost_usd,
                    mix.join(", ")
                ));
                if let Some(s) = best_single {
                    md.push_str(&format!(
                        "best single GPU type: {} at {:.2} USD; the mix saves {:.1}%\n",
                        s.policy,
                        s.cost_usd,
                        (1.0 - b.cost_usd / s.cost_usd) * 100.0
                    ));
                }
            }
            None => md.push_str(&format!(
                "\nno fleet reached {}% within SLO\n",
                args.min_slo_pct
            )),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    md.push_str(&format!(
        "\nelapsed (capacity sweep + all runs): {elapsed:.1} s\n"
    ));
    print!("{md}");
    if let Some(dir) = &args.out {
        write_plots(dir, &reports)?;
        std::fs::write(dir.join("plan.md"), &md)?;
        let json = serde_json::json!({
            "source": source, "requests": trace.len(), "model": args.model,
            "slo": setup.slo, "utilization": args.utilization, "seed": args.seed,
            "pools": pools, "rows": rows, "elapsed_s": elapsed,
        });
        std::fs::write(dir.join("plan.json"), serde_json::to_string_pretty(&json)?)?;
        println!(
            "wrote {}/{{plan.md,plan.json,replicas.svg,cost.svg,ttft.svg}}",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_strings_parse_with_shares_and_errors_name_the_problem() {
        let m = parse_mix("azure-conv:3,long-prompt").unwrap();
        assert_eq!(
            m,
            vec![(Workload::AzureConv, 3.0), (Workload::LongPrompt, 1.0)]
        );
        assert!(parse_mix("nope").is_err());
        assert!(
            parse_mix("azure-conv:-1")
                .unwrap_err()
                .to_string()
                .contains("> 0")
        );
    }

    #[test]
    fn bench_trace_files_become_simulator_requests() {
        let dir = std::env::temp_dir().join(format!("weir-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.jsonl");
        std::fs::write(
            &p,
            "{\"t\":1.5,\"prompt_tokens\":100,\"output_tokens\":10,\"prefix_group\":2}\n\
             {\"t\":0.5,\"prompt\":\"abcdefgh\",\"output_tokens\":3}\n",
        )
        .unwrap();
        let t = read_trace(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].arrival_s, t[0].prompt_len(), t[0].output_tokens),
            (0.5, 2, 3)
        );
        assert_eq!(
            (t[1].prefix_group, t[1].prefix_tokens, t[1].unique_tokens),
            (Some(2), 50, 50)
        );
        std::fs::write(&p, "{\"t\":1}\n").unwrap();
        assert!(read_trace(&p).unwrap_err().to_string().contains("line 1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
