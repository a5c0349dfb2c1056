//! The `weir` binary: a thin shell over the library crates. Each subcommand lives in `cmd/`.

mod bench;
mod cmd;
mod telemetry;

use clap::{Parser, Subcommand};

/// jemalloc instead of glibc malloc: measured router RSS at 9,000 open streams 268 -> 247 MB and router CPU per tiny
/// request 48.5 -> 45.9 us (glibc's malloc/free/consolidate were ~10% of the router's profile). Runtime tuning
/// (`narenas:1,tcache:false`, `background_thread`, `dirty_decay_ms:1000`) measured no further change.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// weir: an OpenAI-compatible control plane for LLM inference on Kubernetes.
#[derive(Parser, Debug)]
// `--version` names the commit the binary was built from (weir/build.rs), e.g. `weir 0.1.0 (abc1234)`.
#[command(
    name = "weir",
    version = env!("WEIR_VERSION"),
    about,
    propagate_version = true
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "WEIR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(flatten)]
    otlp: telemetry::OtlpArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Everything in one process: a simulated GPU fleet behind the weir router, with commands to try.
    Demo(cmd::demo::DemoArgs),
    /// Run a simulated vLLM server, or a fleet of them.
    Sim(cmd::sim::SimArgs),
    /// Run the OpenAI-compatible router in front of model servers.
    Serve(Box<cmd::serve::ServeArgs>),
    /// Load-test any OpenAI-compatible server or router (open or closed loop) and report latency percentiles.
    Bench(cmd::bench::BenchArgs),
    /// Print the simulator's timing model against the reference measurements, per GPU profile.
    Calibrate(cmd::calibrate::CalibrateArgs),
    /// Write the CustomResourceDefinitions generated from the Rust types to deploy/crds/ (or check them).
    Crdgen(cmd::crdgen::CrdgenArgs),
    /// Play a synthetic trace through a simulated fleet in virtual time and report latencies.
    Replay(cmd::replay::ReplayArgs),
    /// Replay a trace through an elastic simulated fleet under each scaling policy (static peak, HPA, KEDA, weir,
    /// oracle) and compare cost and SLO attainment; `--what-if` names the cheapest GPU mix.
    Plan(cmd::plan::PlanArgs),
    /// Serve KV-cache and queue metrics to the HPA (custom/external metrics APIs) from router replicas'
    /// `GET /debug/pods` (`weir serve --metrics-adapter-listen` serves the same from inside the router).
    MetricsAdapter(cmd::metrics_adapter::MetricsAdapterArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Only the commands that route requests have spans to export.
    let routes = matches!(cli.command, Command::Serve(_) | Command::Demo(_));
    let json = matches!(cli.log_format, LogFormat::Json);
    let telemetry = telemetry::init(json, &cli.otlp, routes)?;
    let result = match cli.command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Sim(args) => cmd::sim::run(args),
        Command::Serve(args) => cmd::serve::run(*args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Calibrate(args) => cmd::calibrate::run(args),
        Command::Replay(args) => cmd::replay::run(args),
        Command::Crdgen(args) => cmd::crdgen::run(args),
        Command::Plan(args) => cmd::plan::run(args),
        Command::MetricsAdapter(args) => cmd::metrics_adapter::run(args),
    };
    telemetry.shutdown();
    result
}
