//! The router's Prometheus metrics (`weir_` prefix), registered on a registry passed down from `main`; no globals.
//! Label values are bounded: models and pools come from config or discovery (unknown client model names are folded
//! into `other`), endpoints from discovery; never request ids.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A shared string label value (model, pool, endpoint), cheap to clone on the hot path.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

impl From<Arc<str>> for Name {
    fn from(s: Arc<str>) -> Self {
        Self(s)
    }
}

/// `{model, status}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelStatus {
    pub model: Name,
    pub status: u16,
}

/// `{model}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: Name,
}

/// `{pool, endpoint}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub pool: Name,
    pub endpoint: Name,
}

/// How a streamed response ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum StreamOutcome {
    Complete,
    Cancelled,
    UpstreamError,
    IdleTimeout,
    Truncated,
}

/// `{model, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOutcome {
    pub model: Name,
    pub outcome: StreamOutcome,
}

/// Why a request was retried.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RetryReason {
    Connect,
    Timeout,
    Status5xx,
    Status429,
    BrokenBody,
}

/// `{model, reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelRetry {
    pub model: Name,
    pub reason: RetryReason,
}

/// Token kind for `weir_tokens_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum TokenKind {
    Prompt,
    Completion,
}

/// `{model, kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelTokens {
    pub model: Name,
    pub kind: TokenKind,
}

/// `{route, pool}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: Name,
    pub pool: Name,
}

/// All router metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub requests: Family<ModelStatus, Counter>,
    pub in_flight: Family<ModelLabel, Gauge>,
    pub ttft: Hist<ModelLabel>,
    pub itl: Hist<ModelLabel>,
    pub e2e: Hist<ModelLabel>,
    pub stream_outcomes: Family<ModelOutcome, Counter>,
    pub retries: Family<ModelRetry, Counter>,
    pub tokens: Family<ModelTokens, Counter>,
    pub picks: Family<EndpointLabel, Counter>,
    pub endpoint_healthy: Family<EndpointLabel, Gauge>,
    pub endpoint_breaker: Family<EndpointLabel, Gauge>,
    pub endpoint_in_flight: Family<EndpointLabel, Gauge>,
    pub route_share: Family<RouteLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub retry_budget_exhausted: Counter,
    /// Per-model handles of the series every request touches ([`Metrics::model`]).
    per_model: Arc<parking_lot::RwLock<Vec<Arc<ModelSeries>>>>,
}

/// The series of one client model that every request updates, resolved once: a request then bumps shared atomics
/// instead of hashing a label set and locking a family per update (seven times per request).
#[derive(Debug)]
pub struct ModelSeries {
    pub model: Arc<str>,
    pub in_flight: Gauge,
    pub e2e: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
    /// `requests{status="200"}`.
    pub ok: Counter,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
}

/// A histogram family with fixed buckets.
pub type Hist<L> = Family<L, Histogram, fn() -> Histogram>;

fn ttft_hist() -> Histogram {
    Histogram::new(TTFT.iter().copied())
}
fn itl_hist() -> Histogram {
    Histogram::new(ITL.iter().copied())
}
fn e2e_hist() -> Histogram {
    Histogram::new(E2E.iter().copied())
}

const TTFT: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
    40.0,
];
const ITL: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];
const E2E: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 480.0,
];

impl Metrics {
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            in_flight: Family::default(),
            ttft: Family::new_with_constructor(ttft_hist as fn() -> Histogram),
            itl: Family::new_with_constructor(itl_hist as fn() -> Histogram),
            e2e: Family::new_with_constructor(e2e_hist as fn() -> Histogram),
            stream_outcomes: Family::default(),
            retries: Family::default(),
            tokens: Family::default(),
            picks: Family::default(),
            endpoint_healthy: Family::default(),
            endpoint_breaker: Family::default(),
            endpoint_in_flight: Family::default(),
            route_share: Family::default(),
            retry_budget_exhausted: Counter::default(),
            per_model: Arc::default(),
        };
        let r = reg.sub_registry_with_prefix("weir");
        r.register(
            "requests",
            "Requests answered, by client model and HTTP status",
            m.requests.clone(),
        );
        r.register(
            "requests_in_flight",
            "Requests being served",
            m.in_flight.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time to the first streamed event",
            m.ttft.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Gap between streamed events",
            m.itl.clone(),
        );
        r.register(
            "request_duration_seconds",
            "End-to-end request time",
            m.e2e.clone(),
        );
        r.register(
            "stream_outcomes",
            "How streamed responses ended",
            m.stream_outcomes.clone(),
        );
        r.register(
            "upstream_retries",
            "Retries to another endpoint, by reason",
            m.retries.clone(),
        );
        r.register(
            "tokens",
            "Tokens reported in upstream usage",
            m.tokens.clone(),
        );
        r.register(
            "endpoint_picks",
            "Requests sent to each endpoint",
            m.picks.clone(),
        );
        r.register(
            "endpoint_healthy",
            "1 when the endpoint's last metrics scrape is fresh",
            m.endpoint_healthy.clone(),
        );
        r.register(
            "endpoint_breaker_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open",
            m.endpoint_breaker.clone(),
        );
        r.register(
            "endpoint_in_flight",
            "Requests this router has in flight per endpoint",
            m.endpoint_in_flight.clone(),
        );
        r.register(
            "route_share_ratio",
            "Configured traffic share of each route target",
            m.route_share.clone(),
        );
        r.register(
            "retry_budget_exhausted",
            "Retries skipped because the retry budget was spent",
            m.retry_budget_exhausted.clone(),
        );
        m
    }

    /// The per-request series of `model` (a route name or the `other` bucket: a bounded set), created on first use.
    pub fn model(&self, model: &Arc<str>) -> Arc<ModelSeries> {
        let find = |v: &[Arc<ModelSeries>]| {
            v.iter()
                .find(|m| Arc::ptr_eq(&m.model, model) || m.model == *model)
                .cloned()
        };
        if let Some(m) = find(&self.per_model.read()) {
            return m;
        }
        let mut w = self.per_model.write();
        if let Some(m) = find(&w) {
            return m;
        }
        let label = ModelLabel {
            model: model.clone().into(),
        };
        let tokens = |kind| {
            self.tokens
                .get_or_create(&ModelTokens {
                    model: model.clone().into(),
                    kind,
                })
                .clone()
        };
        let m = Arc::new(ModelSeries {
            model: model.clone(),
            in_flight: self.in_flight.get_or_create(&label).clone(),
            e2e: self.e2e.get_or_create(&label).clone(),
            ttft: self.ttft.get_or_create(&label).clone(),
            itl: self.itl.get_or_create(&label).clone(),
            ok: self
                .requests
                .get_or_create(&ModelStatus {
                    model: model.clone().into(),
                    status: 200,
                })
                .clone(),
            prompt_tokens: tokens(TokenKind::Prompt),
            completion_tokens: tokens(TokenKind::Completion),
        });
        w.push(m.clone());
        m
    }
}
