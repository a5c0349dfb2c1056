//! The metrics adapter in the `weir` binary (the API itself is the `metrics-adapter` crate):
//!
//! - `weir serve` / `weir demo` with `--metrics-adapter-listen` serve it from the router's own live samples
//!   ([`router::pods::PodsHandle`]: the scraper's numbers and the router's in-flight counts as the picker sees them,
//!   no second scrape);
//! - `weir metrics-adapter --router URL..` serves it standalone, reading router replicas' `GET /debug/pods`;
//! - `weir metrics-adapter --prometheus URL` serves it standalone from Prometheus ([`metrics_adapter::prometheus`]).
//!
//! Either way the metrics APIs are HTTPS ([`super::tls`]): a given PEM certificate and key, or a self-signed one made
//! at start. `--keda-scaler-listen` adds KEDA's external scaler ([`metrics_adapter::keda`], plaintext gRPC) on its
//! own listener, over the same samples. In the router, with admission on, both also serve admission's queue depth
//! and oldest wait per pool × tier (`weir_tier_queue_depth`, `weir_tier_queue_wait_seconds`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use metrics_adapter::api::{AdapterConfig, AdapterState};
use metrics_adapter::catalog::{TierQueue, TierQueues};
use metrics_adapter::prometheus::{PrometheusConfig, PrometheusSource};
use metrics_adapter::source::{RouterFeed, RouterSource, Source};
use serde_json::{Map, Value};

use super::tls::{self, TlsListener};

/// Flags that turn the adapter on inside `weir serve` and `weir demo`.
#[derive(Args, Debug, Clone, Default)]
pub struct AdapterArgs {
    /// Serve the metrics adapter (custom.metrics.k8s.io v1beta2/v1beta1 and `/metrics-api/pools`) over HTTPS on
    /// this address, from this router's live pod samples (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub metrics_adapter_listen: Option<String>,
    /// Also serve external.metrics.k8s.io/v1beta1 (only one backend may own it per cluster).
    #[arg(long, requires = "metrics_adapter_listen")]
    pub metrics_adapter_external: bool,
    /// PEM certificate chain for the adapter's HTTPS (with --metrics-adapter-tls-key); without it a self-signed
    /// certificate is made at start.
    #[arg(long, requires_all = ["metrics_adapter_listen", "metrics_adapter_tls_key"], value_name = "FILE")]
    pub metrics_adapter_tls_cert: Option<PathBuf>,
    /// PEM private key of --metrics-adapter-tls-cert.
    #[arg(long, requires = "metrics_adapter_tls_cert", value_name = "FILE")]
    pub metrics_adapter_tls_key: Option<PathBuf>,
    /// The namespace the pods live in: other namespaces then have no pods (default: every namespace sees them).
    #[arg(long, requires = "metrics_adapter_listen", value_name = "NS")]
    pub metrics_adapter_namespace: Option<String>,
    /// Serve KEDA's external scaler (gRPC: IsActive, StreamIsActive, GetMetricSpec, GetMetrics) on this address,
    /// from this router's live pod samples (trigger metadata: see `metrics_adapter::keda`).
    #[arg(long, value_name = "ADDR")]
    pub keda_scaler_listen: Option<String>,
}

/// How often an open `StreamIsActive` re-reads the samples (a pod's engine queue filling reaches KEDA within this;
/// a change of admission's queues, such as the first request held for a pool at zero, is pushed at once).
const KEDA_POLL: Duration = Duration::from_millis(200);

/// Binds `listen` and serves KEDA's external scaler over `source` in a background task; the bound address.
async fn serve_keda(listen: &str, source: Arc<dyn Source>) -> anyhow::Result<std::net::SocketAddr> {
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the KEDA scaler on {listen}"))?;
    let addr = tcp.local_addr()?;
    let scaler = metrics_adapter::keda::Scaler::new(source, KEDA_POLL);
    tokio::spawn(async move {
        if let Err(e) = metrics_adapter::keda::serve(tcp, scaler, std::future::pending()).await {
            tracing::error!(error = %e, "KEDA scaler stopped");
        }
    });
    tracing::info!(%addr, "KEDA external scaler listening (grpc)");
    Ok(addr)
}

/// The adapter's state over `source`, with the wall clock for timestamps.
fn adapter_state(
    source: Arc<dyn Source>,
    external: bool,
    namespace: Option<String>,
    window: Duration,
) -> Arc<AdapterState> {
    Arc::new(AdapterState {
        source,
        config: AdapterConfig {
            external,
            namespace,
            // The span one value summarizes: the scrape interval, in whole seconds (at least 1).
            window_seconds: window.as_secs_f64().ceil().max(1.0) as u64,
        },
        clock: Arc::new(|| super::serve::wall_clock().as_secs()),
    })
}

/// Binds `listen` and serves the adapter over HTTPS in a background task; the bound address.
async fn serve_https(
    listen: &str,
    tls: rustls::ServerConfig,
    state: Arc<AdapterState>,
) -> anyhow::Result<std::net::SocketAddr> {
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the metrics adapter on {listen}"))?;
    let listener = TlsListener::new(tcp, tls)?;
    let addr = axum::serve::Listener::local_addr(&listener)?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, metrics_adapter::api::app(state)).await {
            tracing::error!(error = %e, "metrics adapter stopped");
        }
    });
    Ok(addr)
}

/// The router's admission queues as the adapter's tier queues.
struct AdmissionQueues(admission::Admission);

impl TierQueues for AdmissionQueues {
    fn tier_queues(&self) -> Vec<TierQueue> {
        self.0
            .tier_queues(tokio::time::Instant::now().into_std())
            .into_iter()
            .map(|q| TierQueue {
                pool: q.pool,
                tier: q.tier.as_str().to_string(),
                queued: q.queued,
                oldest_wait_seconds: q.oldest_wait.as_secs_f64(),
            })
            .collect()
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.0.queue_changes())
    }
}

/// Starts what `args` asks for beside the router `router`; the fields to add to the command's first stdout line
/// (`"metrics_adapter": "https://127.0.0.1:PORT"`, `"keda_scaler": "127.0.0.1:PORT"`), none when nothing is asked.
pub async fn start(
    args: &AdapterArgs,
    router: &router::shared::AppState,
    config: &router::config::Config,
) -> anyhow::Result<Map<String, Value>> {
    let mut out = Map::new();
    let pods = router::pods::PodsHandle::from_state(router);
    let mut source = RouterSource::new(RouterFeed::InProcess(Arc::new(move || pods.samples())));
    if let Some(adm) = &router.admission {
        source = source.with_tier_queues(Arc::new(AdmissionQueues(adm.clone())));
    }
    let source: Arc<dyn Source> = Arc::new(source);
    if let Some(listen) = &args.keda_scaler_listen {
        let addr = serve_keda(listen, source.clone()).await?;
        out.insert("keda_scaler".into(), addr.to_string().into());
    }
    let Some(listen) = &args.metrics_adapter_listen else {
        return Ok(out);
    };
    let state = adapter_state(
        source,
        args.metrics_adapter_external,
        args.metrics_adapter_namespace.clone(),
        config.scrape.interval,
    );
    let tls = tls::config_for(
        args.metrics_adapter_tls_cert.as_deref(),
        args.metrics_adapter_tls_key.as_deref(),
        listen,
        tls::ALPN_HTTP1,
    )?;
    let addr = serve_https(listen, tls, state).await?;
    tracing::info!(%addr, external = args.metrics_adapter_external, "metrics adapter listening (https)");
    out.insert("metrics_adapter".into(), format!("https://{addr}").into());
    Ok(out)
}

/// Flags of `weir metrics-adapter`.
#[derive(Args, Debug)]
pub struct MetricsAdapterArgs {
    /// A router replica's base URL (`http://weir-router-0.weir:8080`). Repeatable; the replicas' views are merged.
    #[arg(
        long = "router",
        required_unless_present = "prometheus",
        conflicts_with = "prometheus"
    )]
    routers: Vec<String>,
    /// Read the metrics from this Prometheus (`http://prometheus.monitoring.svc:9090`) instead of router replicas:
    /// one PromQL per metric (defaults: vLLM's KV-cache usage, waiting and running requests; see
    /// `metrics_adapter::prometheus`).
    #[arg(long, value_name = "URL")]
    prometheus: Option<String>,
    /// A metric's PromQL, `METRIC=PROMQL` (`num_requests_waiting=sum by (pod) (vllm:num_requests_waiting)`);
    /// one series per pod. Repeatable.
    #[arg(long, requires = "prometheus", value_name = "METRIC=PROMQL")]
    prometheus_query: Vec<String>,
    /// A metric's sample-time PromQL, `METRIC=PROMQL` (default `timestamp(<its query>)`), for staleness.
    #[arg(long, requires = "prometheus", value_name = "METRIC=PROMQL")]
    prometheus_timestamp_query: Vec<String>,
    /// A sample older than this is not served (the pod is missing instead).
    #[arg(long, default_value = "45s")]
    prometheus_max_age: String,
    /// Which series label carries a pod field, `FIELD=LABEL` (fields: pod, pool, model, role, gpu; defaults
    /// pod=pod,instance pool=pool model=model_name role=role gpu=gpu). Repeatable.
    #[arg(long, requires = "prometheus", value_name = "FIELD=LABEL")]
    prometheus_label: Vec<String>,
    /// HTTPS listen address for the metrics APIs (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: String,
    /// Also serve external.metrics.k8s.io/v1beta1 (only one backend may own it per cluster).
    #[arg(long)]
    external: bool,
    /// The namespace the routers' pods live in (other namespaces then have no pods).
    #[arg(long)]
    namespace: Option<String>,
    /// How long one read of the replicas is reused (KEDA and the HPA poll the same snapshot); also the reported
    /// window.
    #[arg(long, default_value = "1s")]
    cache_ttl: String,
    /// Per-replica (or per-Prometheus-query) request timeout.
    #[arg(long, default_value = "2s")]
    timeout: String,
    /// PEM certificate chain (with --tls-key); without it a self-signed certificate is made at start.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Also serve KEDA's external scaler (gRPC) on this address.
    #[arg(long, value_name = "ADDR")]
    keda_scaler_listen: Option<String>,
}

/// The Prometheus source's settings from the flags, when `--prometheus` is given.
fn prometheus_config(
    args: &MetricsAdapterArgs,
    ttl: Duration,
    timeout: Duration,
) -> anyhow::Result<Option<PrometheusConfig>> {
    let Some(url) = &args.prometheus else {
        return Ok(None);
    };
    let mut c = PrometheusConfig::new(url);
    c.ttl = ttl;
    c.timeout = timeout;
    c.max_age = router::config::parse_duration("--prometheus-max-age", &args.prometheus_max_age)?;
    for q in &args.prometheus_query {
        c.set_query(q, false)
            .map_err(|e| anyhow::anyhow!("--prometheus-query {e}"))?;
    }
    for q in &args.prometheus_timestamp_query {
        c.set_query(q, true)
            .map_err(|e| anyhow::anyhow!("--prometheus-timestamp-query {e}"))?;
    }
    for l in &args.prometheus_label {
        c.labels
            .set(l)
            .map_err(|e| anyhow::anyhow!("--prometheus-label {e}"))?;
    }
    Ok(Some(c))
}

/// `weir metrics-adapter`: prints `{"listen":"https://ADDR"}` once bound, serves until SIGTERM or Ctrl-C.
pub fn run(args: MetricsAdapterArgs) -> anyhow::Result<()> {
    let ttl = router::config::parse_duration("--cache-ttl", &args.cache_ttl)?;
    let timeout = router::config::parse_duration("--timeout", &args.timeout)?;
    let tls = tls::config_for(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        &args.listen,
        tls::ALPN_HTTP1,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let prometheus = prometheus_config(&args, ttl, timeout)?;
    rt.block_on(async move {
        let source: Arc<dyn Source> = match prometheus {
            Some(c) => Arc::new(PrometheusSource::new(c)?),
            None => Arc::new(RouterSource::new(RouterFeed::Replicas {
                urls: args.routers.clone(),
                client: reqwest::Client::new(),
                timeout,
                ttl,
            })),
        };
        let mut line = Map::new();
        if let Some(listen) = &args.keda_scaler_listen {
            let addr = serve_keda(listen, source.clone()).await?;
            line.insert("keda_scaler".into(), addr.to_string().into());
        }
        let state = adapter_state(source, args.external, args.namespace.clone(), ttl);
        let addr = serve_https(&args.listen, tls, state).await?;
        tracing::info!(%addr, routers = ?args.routers, prometheus = ?args.prometheus, external = args.external,
            "weir metrics-adapter listening");
        line.insert("listen".into(), format!("https://{addr}").into());
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", Value::Object(line))?;
            out.flush()?;
        }
        super::serve::shutdown_signal().await;
        Ok(())
    })
}
