//! The axum front door: `app(state) -> Router` (tested with `oneshot`) and `serve(listener, ..)` with graceful drain.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` (aggregated over routes),
//! `GET /health` (503 while draining), `GET /metrics`, `GET /debug/routes` (routes, weights and shares, pools,
//! endpoint state), `GET /debug/pods` (per-pod load samples, [`crate::pods`]). Every response carries `x-request-id`; every error is OpenAI-shaped.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::StatusCode;
use hyper::header::{self, HeaderName, HeaderValue};
use policies::errors::ApiError;
use policies::pick::budget::RetryBudget;
use prometheus_client::registry::Registry;
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::config::Config;
use crate::metrics::{Metrics, ModelRetry, ModelStatus, RetryReason};
use crate::proxy::{Api, Forward, HttpClient, forward, parse_request};
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
    ) -> Arc<Self> {
        SEED.store(seed, Ordering::Relaxed);
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

static SEED: AtomicU64 = AtomicU64::new(0x5EED);
static THREADS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::seed_from_u64(
        SEED.load(Ordering::Relaxed) ^ THREADS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
}

/// Runs `f` with this thread's seeded RNG (picks, weighted splits, ids). Never held across an `.await`.
pub fn with_rng<R>(f: impl FnOnce(&mut SmallRng) -> R) -> R {
    RNG.with(|r| f(&mut r.borrow_mut()))
}

/// An OpenAI-shaped error response with `x-request-id` and, for 429/503, `retry-after`.
pub fn error_response(
    e: &ApiError,
    request_id: &HeaderValue,
    retry_after: Option<u64>,
) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = Response::new(Body::from(e.openai_json()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(HeaderName::from_static("x-request-id"), request_id.clone());
    let ra = retry_after.or((e.status == 429 || e.status == 503).then_some(1));
    if let Some(s) = ra {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

fn request_id(req: &Request) -> HeaderValue {
    if let Some(v) = req.headers().get("x-request-id")
        && !v.is_empty()
        && v.len() <= 128
        && v.to_str().is_ok()
    {
        return v.clone();
    }
    let (a, b) = with_rng(|r| {
        use rand_core::RngCore;
        (r.next_u64(), r.next_u32())
    });
    // `weir-` + 24 hex digits, built in place (once per request).
    let mut id = *b"weir-000000000000000000000000";
    hex_into(a, &mut id[5..21]);
    hex_into(u64::from(b), &mut id[21..29]);
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("weir-0"))
}

/// Writes the low `out.len()` hex digits of `v` (lowercase, zero-padded) into `out`.
pub(crate) fn hex_into(mut v: u64, out: &mut [u8]) {
    for o in out.iter_mut().rev() {
        *o = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        413,
        "invalid_request_error",
        format!("Request body is larger than the {limit}-byte limit."),
    )
    .with_code("request_too_large")
}

async fn completions(app: Arc<AppState>, api: Api, req: Request) -> Response {
    let start = tokio::time::Instant::now();
    let rid = request_id(&req);
    let limit = app.proxy.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        app.count(&app.unknown_model, 413);
        return error_response(&too_large(limit), &rid, None);
    }
    let (parts, body) = req.into_parts();
    // The server span of the trace (`crate::telemetry`). Debug level: at the default `info` filter, without OTLP, the
    // span is disabled, so nothing is built or formatted per request.
    let span = tracing::debug_span!(
        "request",
        otel.name = match api {
            Api::Chat => "POST /v1/chat/completions",
            Api::Completions => "POST /v1/completions",
        },
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        "http.request.method" = "POST",
        "url.path" = api.path(),
        "weir.request_id" = rid.to_str().unwrap_or_default(),
        "gen_ai.request.model" = tracing::field::Empty,
        "weir.stream" = tracing::field::Empty,
        "http.response.status_code" = tracing::field::Empty,
        "weir.endpoint" = tracing::field::Empty,
        "weir.decision_id" = tracing::field::Empty,
        "weir.ttft_ms" = tracing::field::Empty,
    );
    crate::telemetry::set_remote_parent(&span, &parts.headers);
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            let err = if over {
                too_large(limit)
            } else {
                ApiError::new(
                    400,
                    "invalid_request_error",
                    format!("Could not read the request body: {e}"),
                )
                .with_code("invalid_body")
            };
            app.count(&app.unknown_model, err.status);
            return answered(&span, error_response(&err, &rid, None));
        }
    };
    let parsed = match parse_request(api, &bytes) {
        Ok(p) => p,
        Err(e) => {
            app.count(&app.unknown_model, e.status);
            return answered(&span, error_response(&e, &rid, None));
        }
    };
    span.record("gen_ai.request.model", parsed.model.as_str());
    span.record("weir.stream", parsed.stream);
    let snap = app.snapshot.load_full();
    let fwd = Forward {
        api,
        headers: parts.headers,
        body: bytes,
        parsed,
        request_id: rid,
        start,
        span: span.clone(),
    };
    let resp = tracing::Instrument::instrument(forward(app.clone(), snap, fwd), span.clone()).await;
    answered(&span, resp)
}

/// Records the answer's status on the request span (a 5xx marks the server span failed).
fn answered(span: &tracing::Span, resp: Response) -> Response {
    let status = resp.status();
    if !span.is_disabled() {
        span.record("http.response.status_code", i64::from(status.as_u16()));
        if status.is_server_error() {
            span.record("otel.status_code", "error");
        }
    }
    span.in_scope(|| tracing::debug!(status = status.as_u16(), "answered"));
    resp
}

async fn chat(State(app): State<Arc<AppState>>, req: Request) -> Response {
    completions(app, Api::Chat, req).await
}

async fn legacy(State(app): State<Arc<AppState>>, req: Request) -> Response {
    completions(app, Api::Completions, req).await
}

async fn models(State(app): State<Arc<AppState>>) -> Response {
    let snap = app.snapshot.load();
    let mut data = Vec::new();
    for r in &snap.routes {
        let root = r
            .targets
            .first()
            .map(|t| snap.pools[t.pool].model.to_string());
        for name in std::iter::once(&r.name).chain(&r.aliases) {
            data.push(serde_json::json!({
                "id": &**name, "object": "model", "created": app.created_unix, "owned_by": "weir",
                "root": root, "parent": null,
            }));
        }
    }
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    if app.draining.load(Ordering::Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
    .into_response()
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &app.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn debug_routes(State(app): State<Arc<AppState>>) -> Response {
    let snap = app.snapshot.load();
    let now = tokio::time::Instant::now();
    let since = now.duration_since(app.epoch);
    let routes: Vec<_> = snap
        .routes
        .iter()
        .map(|r| {
            let targets: Vec<_> = r
                .targets
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "pool": &*snap.pools[t.pool].name,
                        "weight": t.weight,
                        "share": f64::from(t.weight) / r.total_weight as f64,
                    })
                })
                .collect();
            serde_json::json!({"name": &*r.name, "aliases": r.aliases.iter().map(|a| &**a).collect::<Vec<_>>(), "targets": targets})
        })
        .collect();
    let pools: Vec<_> = snap
        .pools
        .iter()
        .map(|p| {
            let eps: Vec<_> = p
                .endpoints
                .iter()
                .map(|e| {
                    let s = e.state.scraped(since, app.proxy.stale_after);
                    serde_json::json!({
                        "id": e.id.as_str(), "url": &*e.url, "role": e.role.as_str(),
                        "in_flight": e.state.in_flight.load(Ordering::Relaxed),
                        "breaker": e.state.breaker_state(now.into_std()).as_gauge(),
                        "scraped": s.map(|s| serde_json::json!({
                            "waiting": s.waiting, "running": s.running, "kv_usage": s.kv_usage, "age_ms": s.age_ms})),
                    })
                })
                .collect();
            serde_json::json!({"name": &*p.name, "model": &*p.model, "policy": p.pipeline.describe(), "endpoints": eps})
        })
        .collect();
    axum::Json(serde_json::json!({"version": snap.version, "routes": routes, "pools": pools}))
        .into_response()
}

async fn not_found(req: Request) -> Response {
    let rid = request_id(&req);
    let e = ApiError::new(
        404,
        "invalid_request_error",
        format!("Unknown path {} {}.", req.method(), req.uri().path()),
    )
    .with_code("not_found");
    error_response(&e, &rid, None)
}

/// The router's HTTP surface.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(legacy))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/debug/routes", get(debug_routes))
        .route("/debug/decisions", get(crate::decisions::list))
        .route("/debug/decisions/{request_id}", get(crate::decisions::one))
        .route("/debug/prefix", get(crate::decisions::prefix))
        .route("/debug/pods", get(crate::pods::debug_pods))
        .fallback(not_found)
        .with_state(state)
}

/// Connection settings of the front door (HTTP/1.1 only, like vLLM).
fn http1_builder() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        // Slow-loris bound: a client must send its request head within this.
        .header_read_timeout(Some(Duration::from_secs(30)))
        .keep_alive(true)
        // Queue body chunks instead of copying them into the write buffer (SSE events pass through untouched).
        .writev(true);
    b
}

/// The completions API a request is for, when it is one (the hot path, served without the router).
fn completions_api(req: &hyper::Request<hyper::body::Incoming>) -> Option<Api> {
    if req.method() != hyper::Method::POST {
        return None;
    }
    match req.uri().path() {
        "/v1/chat/completions" => Some(Api::Chat),
        "/v1/completions" => Some(Api::Completions),
        _ => None,
    }
}

/// One client connection: HTTP/1 requests through `router` until the peer closes or `stop` turns `true`, then a
/// graceful close (the current request or stream may finish). With `state`, completions requests go straight to
/// their handler: the same handler the router has for them, minus the router's per-request matching, extensions and
/// boxing (a few microseconds of CPU per tiny request).
fn connection(
    builder: &hyper::server::conn::http1::Builder,
    stream: tokio::net::TcpStream,
    router: Router,
    state: Option<Arc<AppState>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send + 'static {
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let direct = state
            .as_ref()
            .and_then(|s| completions_api(&req).map(|api| (s.clone(), api)));
        let router = router.clone();
        async move {
            match direct {
                // Boxed: hyper keeps room for one service future per connection, for the connection's lifetime.
                Some((state, api)) => Ok::<_, std::convert::Infallible>(
                    Box::pin(completions(state, api, req.map(Body::new))).await,
                ),
                None => tower::ServiceExt::oneshot(router, req).await,
            }
        }
    });
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    async move {
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|s| *s) => {}
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}

/// Serves until `shutdown` resolves, then drains: `/health` turns 503, no new connections are accepted, in-flight
/// requests and streams may finish until `drain_timeout`, after which the remaining ones are dropped.
///
/// Connections are served by hyper's HTTP/1 connection directly (no protocol sniffing, one task per connection):
/// measured less resident memory per open stream than `axum::serve`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_timeout: Duration,
) -> std::io::Result<()> {
    let router = app(state.clone());
    let builder = http1_builder();
    // Every connection task holds a receiver: `true` asks it to finish its current request and close; the sender
    // sees `closed()` once all connections are gone.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning; the listener stays up.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            &builder,
            stream,
            router.clone(),
            Some(state.clone()),
            stop_rx.clone(),
        ));
    }
    drop(listener);
    drop(stop_rx);
    state.draining.store(true, Ordering::Relaxed);
    tracing::info!(
        in_flight = state.active_requests.load(Ordering::Relaxed),
        "draining"
    );
    let _ = stop_tx.send(true);
    if tokio::time::timeout(drain_timeout, stop_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = state.active_requests.load(Ordering::Relaxed),
            "drain deadline passed; closing remaining requests"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection task is what every open stream keeps alive on the client side: keep its future small.
    #[tokio::test]
    async fn connection_task_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let fut = connection(&http1_builder(), stream, Router::new(), None, rx);
        let size = std::mem::size_of_val(&fut);
        println!("connection task future: {size} bytes");
        assert!(size < 16 << 10, "{size} bytes");
    }
}
