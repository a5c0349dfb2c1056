//! weir's data plane: an OpenAI-compatible streaming proxy in front of vLLM-compatible model servers.
//!
//! Seams: [`discovery`] sources publish endpoint sets which become immutable [`snapshot::EndpointSnapshot`]s swapped
//! atomically; endpoint selection is the pure `policies::pick` pipeline over `policies::endpoint::EndpointView`s built
//! from [`state`]; the [`scrape`] loop fills engine load from each pod's `/metrics`; [`proxy`] forwards requests with
//! retries, timeouts and circuit breaking; [`app`] is the axum front door. This crate must not depend on the
//! simulator, the autoscaler or the metrics adapter.

pub mod app;
pub mod config;
pub mod decisions;
pub mod discovery;
#[cfg(test)]
mod handler_tests;
pub mod kv_index;
pub mod metrics;
pub mod pd;
pub mod pods;
pub mod proxy;
pub mod route;
pub mod scrape;
pub mod snapshot;
pub mod sse;
pub mod state;
pub mod telemetry;
pub mod upstream;

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;

use crate::app::AppState;
use crate::config::Config;
use crate::discovery::Discovery;
use crate::snapshot::SnapshotBuilder;

/// Builds the router: the first snapshot from `discovery`'s current sets (so the first request already routes),
/// then spawns the discovery and scrape loops on the current tokio runtime. `registry` may already hold other
/// components' metrics; it is frozen for `/metrics` here.
pub fn start(
    config: &Config,
    mut discovery: Discovery,
    mut registry: Registry,
    created_unix: u64,
    seed: u64,
) -> Arc<AppState> {
    let routing = Arc::new(route::Routing::new(
        config.decisions_size,
        route::CacheMetrics::register(&mut registry),
        created_unix.saturating_mul(1000),
    ));
    let mut builder = SnapshotBuilder::new(config).with_routing(routing);
    let first = builder.build(&discovery.current());
    let shared = Arc::new(ArcSwap::from_pointee(first));
    let client = proxy::http_client(config.timeouts.connect);
    let state = AppState::new(
        config,
        shared.clone(),
        client.clone(),
        registry,
        created_unix,
        seed,
    );
    tokio::spawn(discovery::run(discovery, builder, shared.clone()));
    tokio::spawn(scrape::run(
        client,
        shared,
        config.scrape,
        state.metrics.clone(),
        state.epoch,
    ));
    state
}

/// Errors of the router crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value failed validation.
    #[error("invalid config at `{field}`: {reason}")]
    InvalidConfig { field: String, reason: String },
    /// Could not bind or serve.
    #[error("server I/O: {0}")]
    Io(#[source] std::io::Error),
}

impl Error {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidConfig { .. } => "invalid_config",
            Self::Io(_) => "io",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
