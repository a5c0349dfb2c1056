//! The state one router instance shares among its requests: the current snapshot, clients, validated proxy settings,
//! metrics and the counters the retry budget reads. Built once by [`crate::start`]; every request phase borrows it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use arc_swap::ArcSwap;
use policies::pick::budget::RetryBudget;
use prometheus_client::registry::Registry;

use crate::client::HttpClient;
use crate::config::Config;
use crate::metrics::{Metrics, ModelRetry, ModelStatus, RetryReason};
use crate::snapshot::EndpointSnapshot;

/// Proxy settings taken from validated config.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    pub retry_budget: RetryBudget,
    /// Request sent -> response head.
    pub first_byte: Duration,
    /// Longest gap between body chunks.
    pub idle: Duration,
    /// Scrapes older than this are ignored by pickers.
    pub stale_after: Duration,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Largest non-streaming response body buffered from a backend.
    pub max_response_bytes: usize,
    /// Cap on the `retry-after` weir computes from breaker ejections.
    pub max_retry_after_secs: u64,
    /// Read a stream whose client left to its end, for its usage ([`crate::sse::StreamCtx::drain_cancelled`]).
    pub drain_cancelled: bool,
}

impl ProxyConfig {
    pub fn from_config(c: &Config) -> Self {
        Self {
            max_attempts: c.retry.max_attempts,
            retry_budget: c.retry.budget,
            first_byte: c.timeouts.first_byte,
            idle: c.timeouts.idle,
            stale_after: c.scrape.stale_after,
            max_body_bytes: c.max_body_bytes,
            max_response_bytes: 64 << 20,
            max_retry_after_secs: 60,
            drain_cancelled: c.admission.enabled
                && c.admission
                    .drain_cancelled_streams
                    .unwrap_or(!c.tenants.is_empty()),
        }
    }
}

/// Shared state of one router instance.
pub struct AppState {
    /// Current routing snapshot; swapped by discovery, loaded per request.
    pub snapshot: Arc<ArcSwap<EndpointSnapshot>>,
    /// Pooled hyper client (metrics scrapes, P/D prefill legs).
    pub client: HttpClient,
    /// The proxy path's upstream client ([`crate::upstream`]).
    pub upstream: crate::upstream::Upstream,
    pub proxy: ProxyConfig,
    pub metrics: Metrics,
    /// The registry `/metrics` encodes (every component's metrics, registered before start).
    pub registry: Arc<Registry>,
    /// Origin for scrape ages.
    pub epoch: tokio::time::Instant,
    /// Requests being proxied (retry budget base).
    pub active_requests: AtomicU64,
    /// Retries in progress (retry budget use).
    pub active_retries: AtomicU64,
    /// Set on SIGTERM: `/health` answers 503 so load balancers stop sending.
    pub draining: AtomicBool,
    /// `created` for `/v1/models` cards (Unix seconds at start).
    pub created_unix: u64,
    /// Metric label for requests naming no known model.
    pub unknown_model: Arc<str>,
    /// Tenant admission (`None`: admission off, plain routing).
    pub admission: Option<admission::Admission>,
    /// Client connection limits ([`crate::app::serve`]; the body read timeout in [`crate::pipeline::identify`]).
    pub front_door: crate::config::FrontDoorConfig,
}

impl AppState {
    /// Registers the router's metrics on `registry`, then freezes it for `/metrics`. `seed` seeds the per-thread
    /// RNGs used for picks and ids (log it to replay decisions).
    pub fn new(
        config: &Config,
        snapshot: Arc<ArcSwap<EndpointSnapshot>>,
        client: HttpClient,
        mut registry: Registry,
        created_unix: u64,
        seed: u64,
        admission: Option<admission::Admission>,
    ) -> Arc<Self> {
        crate::ids::seed(seed);
        let metrics = Metrics::register(&mut registry);
        Arc::new(Self {
            snapshot,
            client,
            upstream: crate::upstream::Upstream::new(config.timeouts.connect),
            proxy: ProxyConfig::from_config(config),
            metrics,
            registry: Arc::new(registry),
            epoch: tokio::time::Instant::now(),
            active_requests: AtomicU64::new(0),
            active_retries: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            created_unix,
            unknown_model: Arc::from("other"),
            admission,
            front_door: config.front_door,
        })
    }

    /// Counts one answered request.
    pub fn count(&self, model: &Arc<str>, status: u16) {
        if status == 200 {
            self.metrics.model(model).ok.inc();
            return;
        }
        self.metrics
            .requests
            .get_or_create(&ModelStatus {
                model: model.clone().into(),
                status,
            })
            .inc();
    }

    /// Counts a retry when another attempt will follow.
    pub fn retried(&self, model: &Arc<str>, reason: RetryReason, attempt: u32, max_attempts: u32) {
        if attempt + 1 < max_attempts {
            self.metrics
                .retries
                .get_or_create(&ModelRetry {
                    model: model.clone().into(),
                    reason,
                })
                .inc();
        }
    }
}
