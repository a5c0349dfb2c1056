//! `weir serve`: the OpenAI-compatible router in front of vLLM-compatible model servers.
//!
//! Configuration comes from a YAML file (`--config`, schema in `router::config`) and/or flags; flags override the
//! file. On start it prints one JSON line to stdout, `{"listen":"http://127.0.0.1:PORT"}`, so scripts and tests can
//! bind port 0 and find the router. SIGTERM or Ctrl-C drains: `/health` goes 503, new connections are refused, and
//! in-flight streams get until `drain_timeout` to finish.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use router::config::{RawCacheAware, RawConfig, RawPolicy};
use router::discovery::Discovery;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// YAML config file (see `router::config` for the schema).
    #[arg(long, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, e.g. 0.0.0.0:8080 (port 0 picks a free port).
    #[arg(long, env = "WEIR_LISTEN")]
    listen: Option<String>,
    /// A pool of static backends: `model=http://host:port[,http://host:port..]`. Repeatable.
    #[arg(long = "backend")]
    backends: Vec<String>,
    /// Policy for pools that do not set one: round-robin, random, least-requests, power-of-two, cache-aware
    /// (approximate prefix index), precise-prefix (index fed by the pods' KV events, see --kv-events).
    #[arg(long)]
    policy: Option<String>,
    /// KV-event addresses of a --backend endpoint: `http://host:port=tcp://host:5557[,tcp://host:5558]` (publisher,
    /// then the replay socket). Repeatable.
    #[arg(long = "kv-events")]
    kv_events: Vec<String>,
    /// P/D role of a --backend endpoint: `http://host:port=prefill|decode|both`. Repeatable.
    #[arg(long = "role")]
    roles: Vec<String>,
    /// Upstream connect timeout (e.g. 1s).
    #[arg(long)]
    connect_timeout: Option<String>,
    /// Time allowed until the upstream response head (e.g. 300s).
    #[arg(long)]
    first_byte_timeout: Option<String>,
    /// Longest silence allowed between upstream body chunks (e.g. 120s).
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Attempts per request including the first (1 disables retries).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Consecutive failures that open an endpoint's circuit breaker.
    #[arg(long)]
    breaker_threshold: Option<u32>,
    /// First ejection of an open breaker (doubles per failed probe).
    #[arg(long)]
    breaker_base_ejection: Option<String>,
    /// Metrics scrape interval (e.g. 100ms).
    #[arg(long)]
    scrape_interval: Option<String>,
    /// How long SIGTERM waits for in-flight requests.
    #[arg(long)]
    drain_timeout: Option<String>,
    /// Largest request body in bytes.
    #[arg(long)]
    max_body_bytes: Option<u64>,
    /// Seed for pick randomness (default: from the clock; logged).
    #[arg(long)]
    seed: Option<u64>,
    /// Kubernetes API base URL to discover endpoints from (e.g. a `kubectl proxy` sidecar). Without it,
    /// `--k8s-inference-pool`/`--k8s-selector` use the in-cluster service account or the local kubeconfig.
    #[arg(long, env = "WEIR_K8S_API")]
    k8s_api: Option<String>,
    /// Namespace of the model-server pods.
    #[arg(long, env = "WEIR_K8S_NAMESPACE", default_value = "default")]
    k8s_namespace: String,
    /// Discover the pods and ports of this InferencePool (pool name = InferencePool name).
    #[arg(long)]
    k8s_inference_pool: Option<String>,
    /// Or: discover pods carrying these labels (`k=v,k=v`) ...
    #[arg(long)]
    k8s_selector: Option<String>,
    /// ... on these ports (`8000,8001`) ...
    #[arg(long)]
    k8s_ports: Option<String>,
    /// ... reported as this pool (served model name unless config names the pool).
    #[arg(long)]
    k8s_pool: Option<String>,
    /// Admission off: no tenants, tier queues, dispatch gating or usage ledger (plain routing; the config's
    /// `admission: {enabled: false}`).
    #[arg(long)]
    no_admission: bool,
    /// Worker threads (default: number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The metrics adapter beside the router (`--metrics-adapter-*`).
    #[command(flatten)]
    adapter: super::metrics_adapter::AdapterArgs,
    /// Also serve as a Gateway API Inference Extension endpoint picker: Envoy ext_proc (gRPC over TLS, ALPN h2) on
    /// this address (the InferencePool's `endpointPickerRef`, port 9002 by convention; port 0 picks a free port).
    #[arg(long, env = "WEIR_EXT_PROC_LISTEN", value_name = "ADDR")]
    ext_proc_listen: Option<String>,
    /// PEM certificate chain for the endpoint picker's TLS (with --ext-proc-tls-key, e.g. a cert-manager Secret);
    /// without it a self-signed certificate is made at start.
    #[arg(
        long,
        requires_all = ["ext_proc_listen", "ext_proc_tls_key"],
        conflicts_with = "ext_proc_plaintext",
        value_name = "FILE"
    )]
    ext_proc_tls_cert: Option<PathBuf>,
    /// PEM private key of --ext-proc-tls-cert.
    #[arg(long, requires = "ext_proc_tls_cert", value_name = "FILE")]
    ext_proc_tls_key: Option<PathBuf>,
    /// Serve the endpoint picker as plaintext gRPC (h2c) instead of TLS: behind a mesh that encrypts, or in local
    /// tests. Envoy AI Gateway dials pickers over TLS, so it cannot use a plaintext one.
    #[arg(long, requires = "ext_proc_listen")]
    ext_proc_plaintext: bool,
    /// When the endpoint picker finds no eligible endpoint: `fail-close` answers 503, `fail-open` sends the request
    /// to a random endpoint of the pool.
    #[arg(long, default_value = "fail-close", requires = "ext_proc_listen")]
    ext_proc_failure_mode: router::ext_proc::FailureMode,
    /// The gateway's ext_proc message timeout (how long it waits for each answer; Envoy AI Gateway sets 300s on an
    /// InferencePool's filter). A request still queued in admission shortly before it is refused with 429
    /// `queue_timeout` instead of timing out at the gateway.
    #[arg(long, value_parser = super::bench::parse_duration, default_value = "300s", requires = "ext_proc_listen")]
    ext_proc_message_timeout: std::time::Duration,
}

pub(crate) fn raw_policy(name: &str) -> anyhow::Result<RawPolicy> {
    Ok(match name {
        "round-robin" => RawPolicy::RoundRobin {},
        "random" => RawPolicy::Random {},
        "least-requests" => RawPolicy::LeastRequests {},
        "power-of-two" => RawPolicy::PowerOfTwo {},
        "cache-aware" => RawPolicy::CacheAware(RawCacheAware::default()),
        "precise-prefix" => RawPolicy::PrecisePrefix(RawCacheAware::default()),
        other => anyhow::bail!(
            "unknown --policy `{other}` (round-robin, random, least-requests, power-of-two, cache-aware, \
             precise-prefix)"
        ),
    })
}

/// The one wall-clock read of this command: Unix seconds for `/v1/models` and the default seed.
#[allow(clippy::disallowed_methods)]
pub(crate) fn wall_clock() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

fn build_config(args: &ServeArgs) -> anyhow::Result<router::config::Config> {
    let mut raw = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            RawConfig::from_yaml(&text)?
        }
        None => RawConfig::default(),
    };
    for b in &args.backends {
        raw.add_backend_flag(b)?;
    }
    for k in &args.kv_events {
        raw.add_kv_events_flag(k)?;
    }
    for r in &args.roles {
        raw.add_role_flag(r)?;
    }
    // A Kubernetes pool exists before any pod of it does: its model is routed at zero pods, and its requests wait in
    // admission for a pod instead of answering 404.
    let k8s_pool = args.k8s_inference_pool.as_ref().or(args.k8s_pool.as_ref());
    if let Some(name) = k8s_pool.filter(|_| wants_kubernetes(args))
        && !raw.pools.iter().any(|p| &p.name == name)
    {
        raw.pools.push(router::config::RawPool {
            name: name.clone(),
            ..Default::default()
        });
    }
    if let Some(p) = &args.policy {
        let pol = raw_policy(p)?;
        for pool in raw.pools.iter_mut().filter(|p| p.policy.is_none()) {
            pool.policy = Some(pol.clone());
        }
    }
    if args.listen.is_some() {
        raw.listen.clone_from(&args.listen);
    }
    if args.no_admission {
        raw.admission.enabled = Some(false);
    }
    let set = |dst: &mut Option<String>, src: &Option<String>| {
        if src.is_some() {
            dst.clone_from(src);
        }
    };
    set(&mut raw.timeouts.connect, &args.connect_timeout);
    set(&mut raw.timeouts.first_byte, &args.first_byte_timeout);
    set(&mut raw.timeouts.idle, &args.idle_timeout);
    set(&mut raw.breaker.base_ejection, &args.breaker_base_ejection);
    set(&mut raw.scrape.interval, &args.scrape_interval);
    set(&mut raw.drain_timeout, &args.drain_timeout);
    if args.max_attempts.is_some() {
        raw.retry.max_attempts = args.max_attempts;
    }
    if args.breaker_threshold.is_some() {
        raw.breaker.failure_threshold = args.breaker_threshold;
    }
    if args.max_body_bytes.is_some() {
        raw.max_body_bytes = args.max_body_bytes;
    }
    Ok(raw.validate()?)
}

/// The Kubernetes client: `--k8s-api URL` talks to that URL (e.g. a `kubectl proxy` sidecar); otherwise
/// `kube::Client::try_default()` uses the in-cluster service account (or the local kubeconfig), over TLS.
async fn kubernetes_client(args: &ServeArgs) -> anyhow::Result<kube::Client> {
    match &args.k8s_api {
        Some(api) => {
            let url: hyper::Uri = api.parse().with_context(|| format!("--k8s-api `{api}`"))?;
            let mut cfg = kube::Config::new(url);
            cfg.default_namespace.clone_from(&args.k8s_namespace);
            kube::Client::try_from(cfg).context("building the Kubernetes client")
        }
        None => kube::Client::try_default()
            .await
            .context("no --k8s-api given and no in-cluster service account or kubeconfig found"),
    }
}

/// Kubernetes discovery is on when any of its selection flags (or `--k8s-api`) is given.
fn wants_kubernetes(args: &ServeArgs) -> bool {
    args.k8s_api.is_some() || args.k8s_inference_pool.is_some() || args.k8s_selector.is_some()
}

/// The Kubernetes discovery source from the `--k8s-*` flags (must run inside the tokio runtime).
async fn kubernetes_source(
    args: &ServeArgs,
) -> anyhow::Result<router::discovery::kubernetes::KubernetesDiscovery> {
    use router::discovery::kubernetes::{KubernetesDiscovery, Selection};
    let selection = match (&args.k8s_inference_pool, &args.k8s_selector) {
        (Some(pool), None) => Selection::InferencePool(pool.clone()),
        (None, Some(sel)) => {
            let mut match_labels = std::collections::BTreeMap::new();
            for kv in sel.split(',').filter(|s| !s.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--k8s-selector: `{kv}` is not k=v"))?;
                match_labels.insert(k.to_string(), v.to_string());
            }
            let ports = args
                .k8s_ports
                .as_deref()
                .unwrap_or("8000")
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse::<u16>()
                        .with_context(|| format!("--k8s-ports: `{p}`"))
                })
                .collect::<anyhow::Result<Vec<u16>>>()?;
            let pool = args
                .k8s_pool
                .clone()
                .context("--k8s-selector needs --k8s-pool")?;
            Selection::Labels {
                pool,
                match_labels,
                ports,
            }
        }
        _ => anyhow::bail!(
            "Kubernetes discovery needs exactly one of --k8s-inference-pool or --k8s-selector"
        ),
    };
    let client = kubernetes_client(args).await?;
    Ok(KubernetesDiscovery::new(
        client,
        &args.k8s_namespace,
        selection,
    )?)
}

pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}

/// Binds `listen` and serves the ext_proc endpoint picker over `state` in a background task, over TLS unless
/// `--ext-proc-plaintext`; the bound address.
///
/// TLS by default because that is how gateways dial a picker: upstream's endpoint picker (gateway-api-inference-
/// extension, cmd/epp) has `--secure-serving`, default true (`DefaultSecureServing = true` in pkg/epp/server), and
/// serves a self-signed certificate unless `--cert-path` names a mounted one; Envoy AI Gateway builds the
/// InferencePool's ext_proc cluster (internal/extensionserver/inferencepool.go) with an `UpstreamTlsContext` whose
/// validation context is empty ("Ensure Envoy accepts untrusted certificates") over HTTP/2.
async fn start_ext_proc(
    args: &ServeArgs,
    listen: &str,
    state: &std::sync::Arc<router::shared::AppState>,
) -> anyhow::Result<std::net::SocketAddr> {
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the ext_proc endpoint picker on {listen}"))?;
    let addr = tcp.local_addr()?;
    let picker = router::ext_proc::Picker::new(
        state.clone(),
        args.ext_proc_failure_mode,
        args.ext_proc_message_timeout,
    );
    type Served =
        std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let (served, transport): (Served, _) = if args.ext_proc_plaintext {
        let incoming = tonic::transport::server::TcpIncoming::from(tcp);
        (
            Box::pin(router::ext_proc::serve(incoming, picker, shutdown_signal())),
            "grpc",
        )
    } else {
        let cfg = super::tls::config_for(
            args.ext_proc_tls_cert.as_deref(),
            args.ext_proc_tls_key.as_deref(),
            listen,
            super::tls::ALPN_H2,
        )?;
        let incoming = super::tls::TlsListener::new(tcp, cfg)?.into_incoming();
        (
            Box::pin(router::ext_proc::serve(incoming, picker, shutdown_signal())),
            "grpc over tls",
        )
    };
    tokio::spawn(async move {
        if let Err(e) = served.await {
            tracing::error!(error = %e, "ext_proc endpoint picker stopped");
        }
    });
    tracing::info!(%addr, mode = ?args.ext_proc_failure_mode, transport, "ext_proc endpoint picker listening");
    Ok(addr)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = build_config(&args)?;
    super::raise_nofile_limit(None);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let now = wall_clock();
        let seed = args.seed.unwrap_or(now.as_nanos() as u64 ^ u64::from(std::process::id()));
        let mut discovery = Discovery::new();
        discovery.add_static(&config);
        if wants_kubernetes(&args) {
            let k8s = kubernetes_source(&args).await?;
            let tx = discovery.add_source("kubernetes");
            tokio::spawn(k8s.run(tx));
        }
        let registry = prometheus_client::registry::Registry::default();
        let state = router::start(&config, discovery, registry, now.as_secs(), seed)?;
        if let (Some(ns), Some(adm)) = (&config.admission.watch_namespace, &state.admission) {
            // TenantPolicy objects in the cluster replace the config's tenants once listed.
            let client = kubernetes_client(&args).await?;
            let ns = (!ns.is_empty()).then(|| ns.clone());
            tokio::spawn(admission::PolicyWatcher::new(client, ns, adm.clone()).run());
        }
        let mut start_line = super::metrics_adapter::start(&args.adapter, &state, &config).await?;
        if let Some(listen) = &args.ext_proc_listen {
            let addr = start_ext_proc(&args, listen, &state).await?;
            start_line.insert("ext_proc".into(), addr.to_string().into());
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, seed, pools = config.pools.len(), routes = config.routes.len(), "weir serve listening");
        {
            let mut out = std::io::stdout().lock();
            start_line.insert("listen".into(), format!("http://{addr}").into());
            writeln!(out, "{}", serde_json::Value::Object(start_line))?;
            out.flush()?;
        }
        router::app::serve(listener, state, shutdown_signal(), config.drain_timeout).await?;
        tracing::info!("weir serve stopped");
        Ok(())
    })
}
