//! `weir sim`: run one simulated vLLM pod, or a fleet of them in one process, and print their endpoints as JSON on
//! stdout once every listener is bound (so callers can use `--port 0` and read the real ports).

use anyhow::{Context, bail};
use clap::Args;
use sim::engine::Role;
use sim::faults::{ErrorKind, FaultConfig};
use sim::fleet::{PodOptions, start_pod};
use sim::profile::{FleetSpec, Profile};
use sim::zmq::KvEventsConfig;

/// Flags of `weir sim`.
#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// GPU profile: h100, a100-80gb (a100), a100-40gb, l4.
    #[arg(long, default_value = "h100")]
    pub gpu: String,
    /// Model: llama-3.1-8b, llama-3.1-70b.
    #[arg(long, default_value = "llama-3.1-8b")]
    pub model: String,
    /// A fleet in one process: `4xh100:llama-3.1-8b,2xl4:llama-3.1-8b` (ports from --base-port).
    #[arg(long)]
    pub fleet: Option<String>,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port of a single pod (0 = ephemeral).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// First HTTP port of a fleet (0 = ephemeral for every pod).
    #[arg(long, default_value_t = 8001)]
    pub base_port: u16,
    /// P/D role: prefill, decode or both.
    #[arg(long, default_value = "both")]
    pub role: String,
    /// Model seconds per real second (50 = fifty times faster than the GPU).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Seed for step jitter, ids and faults.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-step timing jitter (lognormal sigma; 0 disables).
    #[arg(long, default_value_t = 0.05)]
    pub jitter: f64,
    /// Names the pod answers to (repeatable); default the model's HF name.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Override max_model_len.
    #[arg(long)]
    pub max_model_len: Option<u32>,
    /// Tensor-parallel size (default from the profile table).
    #[arg(long)]
    pub tp: Option<u32>,
    /// Override the number of KV blocks (tiny caches force evictions).
    #[arg(long)]
    pub num_gpu_blocks: Option<u32>,
    /// Disable automatic prefix caching.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Bearer key guarding /v1/*.
    #[arg(long, env = "VLLM_API_KEY")]
    pub api_key: Option<String>,
    /// Report prompt_tokens_details.cached_tokens in usage.
    #[arg(long)]
    pub enable_prompt_tokens_details: bool,
    /// Largest accepted request body, bytes.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// `legacy` also prints pre-V1 metric names.
    #[arg(long, default_value = "v1")]
    pub metrics_version: String,
    /// Real seconds before /health is 200 (default: the profile's start-up time / --time-scale).
    #[arg(long)]
    pub startup_delay: Option<f64>,
    /// vLLM's --kv-events-config JSON.
    #[arg(long)]
    pub kv_events_config: Option<String>,
    /// Convenience: enable KV events with PUB on this port (0 = ephemeral) and replay on the next (or ephemeral).
    #[arg(long)]
    pub kv_events_port: Option<u16>,
    /// Fleet: KV-event ports start here (PUB = base + 2i, replay = base + 2i + 1; 0 = ephemeral).
    #[arg(long)]
    pub kv_events_base_port: Option<u16>,
    /// Percentage of requests answered with an injected error.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Comma-separated kinds for --error-rate: rate_limit, invalid_api_key, context_length, invalid_request,
    /// model_not_found, server_error.
    #[arg(long)]
    pub error_kinds: Option<String>,
    /// Percentage of streams that send an error event then [DONE] part-way.
    #[arg(long, default_value_t = 0.0)]
    pub midstream_error_rate: f64,
    /// Percentage of requests whose connection is dropped part-way.
    #[arg(long, default_value_t = 0.0)]
    pub crash_rate: f64,
    /// Drop every response's connection after this many tokens.
    #[arg(long)]
    pub crash_after_tokens: Option<u32>,
    /// Percentage of requests accepted and never answered.
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Multiply step time (a slow pod).
    #[arg(long, default_value_t = 1.0)]
    pub slow_factor: f64,
    /// Hold every generation response until this long after its request arrived (e.g. `5ms`; a floor on time to
    /// first byte, timed to the microsecond). For measuring what a proxy adds against a backend that takes time
    /// without taking CPU; with the default `--time-scale 1` the engine's own timing usually exceeds it.
    #[arg(long, value_parser = crate::cmd::bench::parse_duration, default_value = "0s")]
    pub min_latency: std::time::Duration,
    /// Tokenize with this HF `tokenizer.json` instead of the byte tokenizer (needs the `hf` cargo feature).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<std::path::PathBuf>,
    /// End-of-sequence token of `--tokenizer` (default: the first of <|eot_id|>, </s>, <|endoftext|> it has).
    #[arg(long, value_name = "TOKEN", requires = "tokenizer")]
    pub tokenizer_eos: Option<String>,
}

fn rate(name: &str, v: f64) -> anyhow::Result<f64> {
    if !(0.0..=100.0).contains(&v) {
        bail!("{name} must be within 0-100, got {v}");
    }
    Ok(v)
}

fn kv_config(args: &SimArgs, pod: usize, fleet: bool) -> anyhow::Result<Option<KvEventsConfig>> {
    let mut cfg = match &args.kv_events_config {
        Some(j) => KvEventsConfig::parse(j).map_err(anyhow::Error::msg)?,
        None => KvEventsConfig::default(),
    };
    let ports = if fleet {
        args.kv_events_base_port.map(|b| {
            if b == 0 {
                (0, 0)
            } else {
                (b + 2 * pod as u16, b + 2 * pod as u16 + 1)
            }
        })
    } else {
        args.kv_events_port
            .map(|p| if p == 0 { (0, 0) } else { (p, p + 1) })
    };
    if let Some((p, r)) = ports {
        cfg.enable_kv_cache_events = true;
        cfg.endpoint = format!("tcp://*:{p}");
        cfg.replay_endpoint = Some(format!("tcp://*:{r}"));
    } else if fleet && cfg.enabled() && pod > 0 {
        bail!(
            "a fleet with KV events needs --kv-events-base-port (pods cannot share --kv-events-config ports)"
        );
    }
    Ok(cfg.enabled().then_some(cfg))
}

fn pod_options(
    args: &SimArgs,
    profile: Profile,
    port: u16,
    pod: usize,
    fleet: bool,
) -> anyhow::Result<PodOptions> {
    let role: Role = args
        .role
        .parse()
        .map_err(|e| anyhow::anyhow!("--role: {e:?}"))?;
    let kinds = match &args.error_kinds {
        Some(s) => s
            .split(',')
            .map(ErrorKind::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?,
        None => ErrorKind::ALL.to_vec(),
    };
    let mut o = PodOptions::new(profile);
    o.role = role;
    o.host = args.host.clone();
    o.port = port;
    o.served_model_names = args.served_model_name.clone();
    o.max_model_len = args.max_model_len;
    o.num_gpu_blocks = args.num_gpu_blocks;
    o.time_scale = args.time_scale;
    o.seed = args.seed.wrapping_add(pod as u64);
    o.jitter = args.jitter;
    o.slow_factor = args.slow_factor;
    o.startup_delay = args.startup_delay;
    o.min_latency = args.min_latency;
    o.api_key = args.api_key.clone();
    o.enable_prompt_tokens_details = args.enable_prompt_tokens_details;
    o.max_body_bytes = args.max_body_bytes;
    o.metrics_legacy = match args.metrics_version.as_str() {
        "legacy" => true,
        "v1" => false,
        other => bail!("--metrics-version must be v1 or legacy, got {other}"),
    };
    o.enable_prefix_caching = !args.no_enable_prefix_caching;
    o.kv_events = kv_config(args, pod, fleet)?;
    o.faults = FaultConfig {
        error_rate: rate("--error-rate", args.error_rate)?,
        error_kinds: kinds,
        midstream_error_rate: rate("--midstream-error-rate", args.midstream_error_rate)?,
        crash_rate: rate("--crash-rate", args.crash_rate)?,
        crash_after_tokens: args.crash_after_tokens,
        hang_rate: rate("--hang-rate", args.hang_rate)?,
        seed: o.seed,
    };
    Ok(o)
}

/// Run `weir sim` until SIGTERM or ctrl-c.
pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: SimArgs) -> anyhow::Result<()> {
    super::raise_nofile_limit(None);
    // Parsed once, shared by every pod of a fleet.
    let tokenizer = match &args.tokenizer {
        Some(path) => sim::fleet::PodTokenizer(
            policies::hf_tokenizer::load_tokenizer_file(path, args.tokenizer_eos.as_deref())
                .context("--tokenizer")?,
        ),
        None => sim::fleet::PodTokenizer::default(),
    };
    let mut pods = Vec::new();
    match &args.fleet {
        Some(spec) => {
            let fleet = FleetSpec::parse(spec).map_err(|e| anyhow::anyhow!("--fleet: {e}"))?;
            for (i, profile) in fleet.pods().into_iter().enumerate() {
                let port = if args.base_port == 0 {
                    0
                } else {
                    args.base_port + i as u16
                };
                pods.push(pod_options(&args, profile, port, i, true)?);
            }
        }
        None => {
            let mut profile =
                Profile::resolve(&args.gpu, &args.model).map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(tp) = args.tp {
                profile = profile
                    .with_tp(tp)
                    .map_err(|e| anyhow::anyhow!("--tp: {e}"))?;
            }
            pods.push(pod_options(&args, profile, args.port, 0, false)?);
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut endpoints = Vec::new();
    let mut tasks = Vec::new();
    for mut o in pods {
        o.tokenizer = tokenizer.clone();
        let (ep, task) = start_pod(o, stop_rx.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tracing::info!(url = %ep.url, gpu = %ep.gpu, model = %ep.model, role = %ep.role, "sim pod listening");
        endpoints.push(ep);
        tasks.push(task);
    }
    println!("{}", serde_json::json!({ "endpoints": endpoints }));
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
