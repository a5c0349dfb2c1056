//! Logs and traces of the `weir` binary.
//!
//! Logs: text or JSON lines on stderr, filtered by `WEIR_LOG` (default `info`).
//!
//! Traces (`weir serve` and `weir demo`): when an OTLP endpoint is configured (`--otlp-endpoint`, else the standard
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`; `OTEL_SDK_DISABLED=true` turns it off), the
//! router's request spans (`router::telemetry` describes them) are exported over OTLP/gRPC (tonic) by the SDK's batch
//! span processor, which Jaeger and the OpenTelemetry Collector ingest. The service name is `OTEL_SERVICE_NAME` (or
//! `service.name` in `OTEL_RESOURCE_ATTRIBUTES`), else `weir`. Sampling is parent-based: `--otlp-sample-ratio R`
//! keeps R of the new traces and follows a caller's sampled flag; without it the SDK reads `OTEL_TRACES_SAMPLER` /
//! `OTEL_TRACES_SAMPLER_ARG` (default: every trace). The other `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*` variables
//! (headers, timeout, batch delay and size) apply as the SDK documents them.
//!
//! The log filter and the trace filter are separate per-layer filters: the request spans are debug-level, so with
//! export off they are disabled outright at the default filter (nothing is built per request), and with export on
//! they reach the exporter without being printed. [`Telemetry::shutdown`] flushes what is queued; `main` calls it
//! after the command returns, which `weir serve` does after SIGTERM or Ctrl-C and its drain.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Metadata;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// OTLP trace export (used by `weir serve` and `weir demo`).
#[derive(Args, Debug, Clone, Default)]
pub struct OtlpArgs {
    /// OTLP/gRPC collector for `weir serve`'s request spans, e.g. http://127.0.0.1:4317 (Jaeger, the OpenTelemetry
    /// Collector). Default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT; no export when none
    /// is set.
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces to export (0 to 1); parent-based, so a caller's sampled flag is always followed.
    /// Default: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, else every trace.
    #[arg(long, global = true, value_name = "RATIO", value_parser = parse_ratio)]
    pub otlp_sample_ratio: Option<f64>,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a ratio between 0 and 1")),
    }
}

/// The exporter's pieces; dropping them without [`Telemetry::shutdown`] loses queued spans.
pub struct Telemetry {
    otlp: Option<Otlp>,
}

struct Otlp {
    provider: SdkTracerProvider,
    /// Drives the gRPC channel: a small runtime of its own, so export works whatever runtime (if any) the command
    /// builds, and keeps running while the command's runtime shuts down.
    runtime: tokio::runtime::Runtime,
}

/// How long shutdown waits for the last batch to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

impl Telemetry {
    /// Exports what is queued (bounded by [`FLUSH_TIMEOUT`]) and stops the exporter.
    pub fn shutdown(self) {
        if let Some(o) = self.otlp {
            if let Err(e) = o.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
                tracing::warn!(error = %e, "flushing the OTLP span exporter failed");
            }
            o.runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// The OTLP endpoint in effect, if export is on.
fn endpoint(args: &OtlpArgs) -> Option<String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    args.otlp_endpoint
        .clone()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// The resource: detected attributes (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, SDK facts), with `weir` as
/// the service name when none was given, and the binary's version.
fn resource() -> Resource {
    let version = KeyValue::new("service.version", env!("CARGO_PKG_VERSION"));
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        // The SDK's fallback is `unknown_service:<executable>`.
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let b = Resource::builder().with_attribute(version);
    if named {
        b.build()
    } else {
        b.with_service_name("weir").build()
    }
}

fn start_otlp(args: &OtlpArgs, endpoint: String) -> anyhow::Result<Otlp> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("weir-otlp")
        .enable_all()
        .build()
        .context("starting the OTLP exporter's runtime")?;
    // tonic's channel spawns its worker on the current runtime.
    let _entered = runtime.enter();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    // An explicit flag wins; otherwise the builder resolves the standard variables itself (signal-specific first).
    if args.otlp_endpoint.is_some() {
        exporter = exporter.with_endpoint(endpoint.clone());
    }
    let exporter = exporter
        .build()
        .with_context(|| format!("OTLP exporter for `{endpoint}` (plaintext gRPC only)"))?;
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource());
    if let Some(r) = args.otlp_sample_ratio {
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(r),
        )));
    }
    Ok(Otlp {
        provider: provider.build(),
        runtime,
    })
}

/// What the trace layer sees: the router's spans, and its warnings and errors as span events.
fn traced(m: &Metadata<'_>) -> bool {
    let t = m.target();
    (t == "router" || t.starts_with("router::"))
        && (m.is_span() || *m.level() <= tracing::Level::WARN)
}

/// Installs the global subscriber: logs always, OTLP export when `export` (the command routes requests) and an
/// endpoint is configured.
pub fn init(json: bool, args: &OtlpArgs, export: bool) -> anyhow::Result<Telemetry> {
    let otlp = match endpoint(args).filter(|_| export) {
        Some(ep) => Some(start_otlp(args, ep)?),
        None => None,
    };
    let filter = EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let trace_layer = otlp.as_ref().map(|o| {
        tracing_opentelemetry::layer()
            .with_tracer(o.provider.tracer("weir"))
            // Only what a trace viewer needs: no per-enter context activation, busy/idle timers, thread or
            // source-location attributes.
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_filter(tracing_subscriber::filter::filter_fn(traced))
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(trace_layer)
        .try_init()
        .context("installing the log subscriber")?;
    if let Some(ep) = otlp.as_ref().and(endpoint(args)) {
        tracing::info!(endpoint = %ep, "exporting request spans over OTLP");
    }
    Ok(Telemetry { otlp })
}
