//! `weir demo`: everything in one process on one machine — a simulated GPU fleet (real-time, vLLM-compatible pods with
//! KV events) and the weir router in front of it — plus a printed set of commands to try.
//!
//! It is the README's first command, so it must work on a fresh machine with no flags: ports default to fixed
//! loopback ports for the router (8080, so the printed curls work) and ephemeral ports for the pods.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use router::config::RawConfig;
use router::discovery::Discovery;
use sim::fleet::{PodEndpoint, PodOptions, start_pod};
use sim::profile::FleetSpec;
use sim::zmq::KvEventsConfig;

/// Flags of `weir demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Router listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The simulated fleet.
    #[arg(long, default_value = "4xh100:llama-3.1-8b,2xl4:llama-3.1-8b")]
    fleet: String,
    /// Routing policy of the pool (see `weir serve --help`).
    #[arg(long, default_value = "precise-prefix")]
    policy: String,
    /// Model seconds per real second in the pods (1 = as fast as the GPUs would be).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Seed for the pods' jitter and the router's picks and request ids (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    // The router and every simulated pod share this process's descriptors.
    super::raise_nofile_limit(None);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: DemoArgs) -> anyhow::Result<()> {
    let now = super::serve::wall_clock();
    let seed = args
        .seed
        .unwrap_or(now.as_nanos() as u64 ^ u64::from(std::process::id()));
    let fleet = FleetSpec::parse(&args.fleet).map_err(|e| anyhow::anyhow!("--fleet: {e}"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut pods: Vec<PodEndpoint> = Vec::new();
    let mut tasks = Vec::new();
    for (i, profile) in fleet.pods().into_iter().enumerate() {
        let mut o = PodOptions::new(profile);
        o.time_scale = args.time_scale;
        o.seed = seed.wrapping_add(i as u64);
        o.startup_delay = Some(0.0);
        o.enable_prompt_tokens_details = true;
        o.kv_events = Some(KvEventsConfig {
            enable_kv_cache_events: true,
            endpoint: "tcp://*:0".into(),
            replay_endpoint: Some("tcp://*:0".into()),
            ..KvEventsConfig::default()
        });
        let (ep, task) = start_pod(o, stop_rx.clone())
            .await
            .map_err(|e| anyhow::anyhow!("starting pod {i}: {e}"))?;
        pods.push(ep);
        tasks.push(task);
    }

    // One pool per served model name, every pod of that model in it.
    let mut raw = RawConfig::default();
    let mut models: Vec<&str> = pods.iter().map(|p| p.model.as_str()).collect();
    models.sort_unstable();
    models.dedup();
    for m in &models {
        let urls: Vec<&str> = pods
            .iter()
            .filter(|p| p.model == *m)
            .map(|p| p.url.as_str())
            .collect();
        raw.add_backend_flag(&format!("{m}={}", urls.join(",")))?;
    }
    // Every pod publishes KV events; precise-prefix pools subscribe to them.
    for p in &pods {
        if let Some(pub_ep) = &p.kv_events {
            let replay = p
                .replay
                .as_deref()
                .map(|r| format!(",{r}"))
                .unwrap_or_default();
            raw.add_kv_events_flag(&format!("{}={pub_ep}{replay}", p.url))?;
        }
    }
    raw.listen = Some(args.listen.clone());
    let policy = super::serve::raw_policy(&args.policy)?;
    for pool in raw.pools.iter_mut() {
        pool.policy = Some(policy.clone());
    }
    let config = raw.validate()?;

    let mut discovery = Discovery::new();
    discovery.add_static(&config);
    let registry = prometheus_client::registry::Registry::default();
    let state = router::start(&config, discovery, registry, now.as_secs(), seed)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {} (pick another with --listen)", config.listen))?;
    let addr = listener.local_addr()?;
    print_banner(
        &addr.to_string(),
        &pods,
        models.first().copied().unwrap_or("model"),
        &args,
    )?;

    router::app::serve(
        listener,
        state,
        super::serve::shutdown_signal(),
        config.drain_timeout,
    )
    .await?;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

fn print_banner(
    addr: &str,
    pods: &[PodEndpoint],
    model: &str,
    args: &DemoArgs,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    // First line: machine-readable, like `weir serve` and `weir sim` (tests and scripts read it).
    writeln!(
        out,
        "{}",
        serde_json::json!({"listen": format!("http://{addr}"), "pods": pods})
    )?;
    writeln!(
        out,
        "weir demo: router on http://{addr} (policy {}) in front of {} simulated pods:",
        args.policy,
        pods.len()
    )?;
    for p in pods {
        writeln!(
            out,
            "  {:<24} {:<10} {:<6} kv-events {}",
            p.url,
            p.gpu,
            p.role,
            p.kv_events.as_deref().unwrap_or("-")
        )?;
    }
    writeln!(out, "\nTry:")?;
    writeln!(
        out,
        "  curl -sN http://{addr}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"max_tokens\":16,\"stream\":true}}'"
    )?;
    writeln!(out, "  curl -s http://{addr}/v1/models")?;
    writeln!(out, "  curl -s http://{addr}/metrics | grep ^weir_")?;
    writeln!(out, "  curl -s http://{addr}/debug/routes")?;
    writeln!(
        out,
        "  cargo run --release -p weir -- bench --url http://{addr} --workload shared-prefix --concurrency 32 --duration 30s"
    )?;
    writeln!(out, "\nCtrl-C stops everything.")?;
    out.flush()?;
    Ok(())
}
