//! `weir replay`: play a synthetic trace through a simulated fleet in virtual time and print the latency,
//! throughput, cache and utilisation report, plus how long the simulation took in wall time.

use clap::{Args, ValueEnum};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use sim::des::{DesConfig, Dispatcher, LeastOutstanding, RoundRobin};
use sim::profile::FleetSpec;
use sim::workload::Workload;

use super::calibrate::Format;

/// Built-in dispatchers.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    RoundRobin,
    LeastOutstanding,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// azure-conv, azure-code, shared-prefix, llmd-shared-prefix, long-prompt, long-context-rag, batch, tiny,
    /// multi-turn.
    #[arg(long, default_value = "azure-conv")]
    pub workload: Workload,
    /// Trace length, seconds of virtual time.
    #[arg(long, default_value_t = 3600.0)]
    pub duration: f64,
    /// Request rate, req/s (default: the workload's published rate).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Fleet, e.g. `8xh100:llama-3.1-8b` or `4xh100:llama-3.1-8b,2xl4:llama-3.1-8b`.
    #[arg(long, default_value = "8xh100:llama-3.1-8b")]
    pub fleet: String,
    /// Seed of the trace and of the pods' step jitter.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "least-outstanding")]
    pub dispatch: Dispatch,
    /// Step jitter sigma (0 disables).
    #[arg(long, default_value_t = 0.05)]
    pub jitter: f64,
    #[arg(long, value_enum, default_value = "md")]
    pub format: Format,
}

pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    if !(args.duration.is_finite() && args.duration > 0.0) {
        anyhow::bail!("--duration must be a positive number of seconds");
    }
    let fleet = FleetSpec::parse(&args.fleet)?;
    // The one wall-clock read of this command: how long the virtual-time run took.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let trace = args.workload.generate(args.duration, args.rate, &mut rng);
    let mut dispatcher: Box<dyn Dispatcher> = match args.dispatch {
        Dispatch::RoundRobin => Box::new(RoundRobin::default()),
        Dispatch::LeastOutstanding => Box::new(LeastOutstanding),
    };
    let cfg = DesConfig {
        seed: args.seed,
        trace_seed: args.seed,
        jitter: args.jitter,
        ..DesConfig::default()
    };
    let report = sim::des::run(&fleet.pods(), &trace, dispatcher.as_mut(), &cfg);
    // What an infinite cache behind perfect routing would hit, to read the pods' hit rate against.
    let bound = sim::workload::cache_bound(&trace, 16, cfg.trace_seed, 0.0);
    let wall = started.elapsed().as_secs_f64();
    match args.format {
        Format::Md => {
            println!(
                "workload {}, {} s, fleet {}, seed {}\n",
                args.workload.name(),
                args.duration,
                args.fleet,
                args.seed
            );
            print!("{}", report.to_markdown());
            println!("\ninfinite-cache prefix hit rate (bound): {bound:.3}");
            println!("\nwall time: {wall:.2} s");
        }
        Format::Json => {
            let v = serde_json::json!({
                "workload": args.workload.name(),
                "duration_s": args.duration,
                "fleet": args.fleet,
                "seed": args.seed,
                "report": report,
                "cache_bound": bound,
                "wall_s": wall,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}
