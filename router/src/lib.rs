//! weir's data plane: an OpenAI-compatible streaming proxy in front of vLLM-compatible model servers.
//!
//! Seams: [`discovery`] sources publish endpoint sets which become immutable [`snapshot::EndpointSnapshot`]s swapped
//! atomically; endpoint selection is the pure `policies::pick` pipeline over `policies::endpoint::EndpointView`s built
//! from [`state`]; the [`scrape`] loop fills engine load from each pod's `/metrics`. A request goes through [`app`]
//! (the one service stack) into [`pipeline`] (identify → resolve → route → admit → proxy → account over a
//! [`ctx::Ctx`]): [`plan`] decides without I/O, [`gate`] holds it in admission's tier queues until its pool has room,
//! [`execute`] sends with retries, timeouts and circuit breaking. This crate must not depend on the simulator, the
//! autoscaler or the metrics adapter.

// Layers, bottom up (a module uses only modules of its own or lower layers):
// 1. ids, error, config, metrics, state, sse, client, upstream, telemetry, kv_index, pd, discovery
// 2. route (cache-aware routing shell), snapshot (built from discovery), scrape
// 3. gate (admission: room feed, permits), shared (one router's state), decisions and usage (its views)
// 4. ctx (per-request context), plan (pure decisions of the proxy step)
// 5. execute (the proxy step's I/O)
// 6. pipeline (the phases), app (the service stack and the server)
// 7. ext_proc (the phases behind a gateway: weir as its endpoint picker)
pub mod app;
pub mod client;
pub mod config;
pub mod ctx;
pub mod decisions;
pub mod discovery;
pub mod error;
pub mod execute;
pub mod ext_proc;
#[cfg(test)]
mod front_door_tests;
pub mod gate;
#[cfg(test)]
mod gate_tests;
#[cfg(test)]
mod handler_tests;
pub mod ids;
pub mod kv_index;
#[cfg(test)]
mod limit_tests;
pub mod metrics;
pub mod pd;
pub mod pipeline;
pub mod plan;
pub mod pods;
pub mod route;
pub mod scrape;
pub mod shared;
pub mod snapshot;
pub mod sse;
pub mod state;
pub mod telemetry;
pub mod upstream;
pub mod usage;

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::discovery::Discovery;
use crate::shared::AppState;
use crate::snapshot::SnapshotBuilder;

/// Builds the router: the first snapshot from `discovery`'s current sets (so the first request already routes),
/// admission (tenants, ledger), then spawns the discovery, scrape and room-feed loops on the current tokio runtime.
/// `registry` may already hold other components' metrics; it is frozen for `/metrics` here. Fails only when the
/// usage ledger cannot be opened.
pub fn start(
    config: &Config,
    mut discovery: Discovery,
    mut registry: Registry,
    created_unix: u64,
    seed: u64,
) -> Result<Arc<AppState>> {
    let admission = gate::build(&config.admission, &config.tenants).map_err(Error::Admission)?;
    if let Some(a) = &admission {
        a.register_metrics(&mut registry);
    }
    let routing = Arc::new(route::Routing::new(
        config.decisions_size,
        route::CacheMetrics::register(&mut registry),
        created_unix.saturating_mul(1000),
    ));
    let mut builder = SnapshotBuilder::new(config).with_routing(routing);
    let first = builder.build(&discovery.current());
    let shared = Arc::new(ArcSwap::from_pointee(first));
    let client = client::http_client(config.timeouts.connect);
    let state = AppState::new(
        config,
        shared.clone(),
        client.clone(),
        registry,
        created_unix,
        seed,
        admission.clone(),
    );
    if let (Some(adm), Some(room)) = (admission, config.admission.room) {
        gate::feed_room_once(
            &adm,
            &shared.load(),
            &room,
            state.epoch,
            config.scrape.stale_after,
        );
        tokio::spawn(gate::feed_room(
            adm,
            shared.clone(),
            room,
            config.admission.refresh,
            state.epoch,
            config.scrape.stale_after,
        ));
    }
    tokio::spawn(snapshot::follow(discovery, builder, shared.clone()));
    tokio::spawn(scrape::run(
        client,
        shared,
        config.scrape,
        state.metrics.clone(),
        state.epoch,
    ));
    Ok(state)
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
    /// Admission could not start (the usage ledger).
    #[error("admission: {0}")]
    Admission(#[source] admission::Error),
}

impl Error {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidConfig { .. } => "invalid_config",
            Self::Io(_) => "io",
            Self::Admission(e) => e.kind(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
