//! Forwarding one request: pick an endpoint through the pool's pipeline, send with connect / first-byte / idle
//! timeouts, retry on another endpoint before the first byte (under the retry budget), feed the circuit breakers,
//! and turn every failure into an OpenAI-shaped error. Streaming bodies go through [`crate::sse`].

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use policies::endpoint::EndpointView;
use policies::errors::ApiError;
use policies::pick::RequestView;
use serde::Deserialize;

use crate::app::{AppState, error_response, with_rng};
use crate::metrics::{EndpointLabel, ModelSeries, RetryReason, StreamOutcome};
use crate::route::{CacheView, PdLabel, Prepared};
use crate::snapshot::{EndpointSnapshot, Pool};
use crate::sse::{SseScanner, StreamCtx, Usage, proxy_stream};
use crate::state::{EndpointState, PrefillClaim};

/// The pooled upstream client (HTTP/1.1, keep-alive).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled client with the given connect timeout. Reads are exactly 1 KiB (SSE events are ~250 bytes): measured
/// ~4.5 KB less resident memory per open stream than hyper's adaptive 8 KiB buffer.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_connect_timeout(Some(connect_timeout));
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(4096)
        .http1_read_buf_exact_size(1024)
        .build(c)
}

/// Which OpenAI API a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }

    /// [`Api::path`] as a request URI, parsed once (cloning it copies no bytes).
    pub fn uri(self) -> hyper::Uri {
        static URIS: std::sync::LazyLock<[hyper::Uri; 2]> = std::sync::LazyLock::new(|| {
            [
                hyper::Uri::from_static(Api::Chat.path()),
                hyper::Uri::from_static(Api::Completions.path()),
            ]
        });
        URIS[self as usize].clone()
    }
}

/// The fields the router reads from a request body; everything else passes through untouched.
#[derive(Debug, Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptionsPeek>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    messages: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    prompt: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    suffix: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
struct StreamOptionsPeek {
    #[serde(default)]
    include_usage: Option<bool>,
}

fn bad_request(message: impl Into<String>, param: Option<&str>, code: &str) -> ApiError {
    let e = ApiError::new(400, "invalid_request_error", message).with_code(code);
    match param {
        Some(p) => e.with_param(p),
        None => e,
    }
}

/// A validated view of the request.
#[derive(Debug)]
pub struct Parsed {
    /// Client-facing model name (route or alias).
    pub model: String,
    /// SSE response requested.
    pub stream: bool,
    /// The client set `stream_options.include_usage`, so the usage chunk is theirs to see.
    pub client_wants_usage: bool,
    /// `stream_options` is present (the byte splice cannot add a second one).
    pub has_stream_options: bool,
    /// `max_completion_tokens` or `max_tokens`, for the in-flight token estimate.
    pub max_tokens: Option<u32>,
}

/// Checks the body is a JSON object with what `api` needs; errors are OpenAI-shaped 400s.
pub fn parse_request(api: Api, body: &[u8]) -> Result<Parsed, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(bad_request(
            "Request body is not valid UTF-8.",
            None,
            "invalid_json",
        ));
    }
    let p: Peek<'_> = serde_json::from_slice(body).map_err(|e| {
        let msg = if e.is_data() {
            format!("Invalid request body: {e}")
        } else {
            format!("We could not parse the JSON body of your request: {e}")
        };
        bad_request(msg, None, "invalid_json")
    })?;
    let model = match p.model {
        Some(m) if !m.is_empty() => m.into_owned(),
        _ => {
            return Err(bad_request(
                "You must provide a model parameter.",
                Some("model"),
                "missing_required_parameter",
            ));
        }
    };
    match api {
        Api::Chat if p.messages.is_none() => {
            return Err(bad_request(
                "Missing required parameter: 'messages'.",
                Some("messages"),
                "missing_required_parameter",
            ));
        }
        Api::Chat if p.messages.as_ref().is_some_and(Vec::is_empty) => {
            return Err(bad_request(
                "'messages' must not be empty.",
                Some("messages"),
                "invalid_value",
            ));
        }
        Api::Completions if p.prompt.is_none() => {
            return Err(bad_request(
                "Missing required parameter: 'prompt'.",
                Some("prompt"),
                "missing_required_parameter",
            ));
        }
        Api::Completions if p.suffix.is_some() => {
            return Err(bad_request(
                "suffix is not currently supported",
                Some("suffix"),
                "unsupported_parameter",
            ));
        }
        _ => {}
    }
    let stream = p.stream.unwrap_or(false);
    if p.stream_options.is_some() && !stream {
        return Err(bad_request(
            "Stream options can only be defined when `stream=True`.",
            Some("stream_options"),
            "invalid_value",
        ));
    }
    Ok(Parsed {
        model,
        stream,
        client_wants_usage: p
            .stream_options
            .as_ref()
            .and_then(|s| s.include_usage)
            .unwrap_or(false),
        has_stream_options: p.stream_options.is_some(),
        max_tokens: p.max_completion_tokens.or(p.max_tokens),
    })
}

/// The body to send upstream: the original bytes when nothing changes; a byte splice when only
/// `stream_options.include_usage` must be added; a re-serialisation when the model name changes too.
pub fn upstream_body(
    raw: &Bytes,
    parsed: &Parsed,
    upstream_model: &str,
    inject_usage: bool,
) -> Result<Bytes, ApiError> {
    let rename = parsed.model != upstream_model;
    if !rename && !inject_usage {
        return Ok(raw.clone());
    }
    if !rename && !parsed.has_stream_options {
        // `{` + `"stream_options":{"include_usage":true},` + rest; the object has at least `model`, so is not empty.
        if let Some(open) = raw.iter().position(|&b| b == b'{') {
            let mut out = Vec::with_capacity(raw.len() + 40);
            out.extend_from_slice(&raw[..=open]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
            out.extend_from_slice(&raw[open + 1..]);
            return Ok(Bytes::from(out));
        }
    }
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(raw)
        .map_err(|e| bad_request(format!("Invalid request body: {e}"), None, "invalid_json"))?;
    if rename {
        v.insert(
            "model".into(),
            serde_json::Value::String(upstream_model.to_string()),
        );
    }
    if inject_usage {
        let so = v
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(o) = so.as_object_mut() {
            o.insert("include_usage".into(), serde_json::Value::Bool(true));
        }
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| ApiError::new(500, "server_error", e.to_string()))
}

/// Hop-by-hop and framing headers never forwarded in either direction.
fn skip_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// A W3C `traceparent` for the upstream hop when OpenTelemetry does not track the request (no OTLP export): keeps
/// the caller's trace id (if the header is valid) with a new span id. Traced requests send their attempt span's id
/// instead ([`crate::telemetry::upstream_traceparent`]).
pub fn traceparent(incoming: Option<&HeaderValue>) -> HeaderValue {
    let (hi, lo, span) = with_rng(|r| {
        use rand_core::RngCore;
        (r.next_u64(), r.next_u64(), r.next_u64() | 1)
    });
    // `00-<trace id: 32 hex>-<span id: 16 hex>-<flags: 2 hex>`, built in place (this runs once per attempt).
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match incoming
        .map(HeaderValue::as_bytes)
        .filter(|b| valid_traceparent(b))
    {
        Some(b) => {
            out[3..35].copy_from_slice(&b[3..35]);
            out[53..55].copy_from_slice(&b[53..55]);
        }
        None => {
            crate::app::hex_into(hi, &mut out[3..19]);
            crate::app::hex_into(lo, &mut out[19..35]);
        }
    }
    crate::app::hex_into(span, &mut out[36..52]);
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static(
        "00-00000000000000000000000000000001-0000000000000001-01",
    ))
}

/// `version-traceid-parentid-flags` with the W3C lengths, hex digits, a version other than `ff` and a non-zero trace
/// id.
fn valid_traceparent(b: &[u8]) -> bool {
    b.len() == 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && &b[..2] != b"ff"
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 2 | 35 | 52) || c.is_ascii_hexdigit())
        && b[3..35].iter().any(|&c| c != b'0')
}

/// Releases the router's own counts for one endpoint attempt, and the breaker's half-open probe if no verdict came.
struct Attempt {
    state: Arc<EndpointState>,
    tokens: u64,
    verdict: bool,
}

impl Attempt {
    fn new(state: Arc<EndpointState>, tokens: u64) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
        Self {
            state,
            tokens,
            verdict: false,
        }
    }
    fn success(&mut self) {
        self.verdict = true;
        self.state.on_success();
    }
    fn failure(&mut self, now: std::time::Instant) {
        self.verdict = true;
        if self.state.on_failure(now) {
            tracing::warn!("circuit breaker opened");
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.state
            .in_flight_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
        if !self.verdict {
            self.state.on_abandoned();
        }
    }
}

/// Counts a request as active (retry budget, in-flight gauge) and observes its end-to-end time when dropped.
pub struct RequestGuard {
    app: Arc<AppState>,
    series: Arc<ModelSeries>,
    start: tokio::time::Instant,
}

impl RequestGuard {
    pub fn new(app: Arc<AppState>, series: Arc<ModelSeries>, start: tokio::time::Instant) -> Self {
        app.active_requests.fetch_add(1, Ordering::Relaxed);
        series.in_flight.inc();
        Self { app, series, start }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.app.active_requests.fetch_sub(1, Ordering::Relaxed);
        self.series.in_flight.dec();
        self.series.e2e.observe(self.start.elapsed().as_secs_f64());
    }
}

/// Counts one retry against the budget while it runs.
struct RetryGuard<'a>(&'a AppState);

impl Drop for RetryGuard<'_> {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks an attempt's span failed (a no-op when the span is disabled: nothing is formatted).
fn span_failed(span: &tracing::Span, kind: &str, why: &dyn std::fmt::Display) {
    span.record("error.type", kind);
    span.record("otel.status_code", "error");
    span.record("otel.status_description", tracing::field::display(why));
}

/// Keeps a span open while held and ends it when dropped: tracing-opentelemetry ends a span at its last exit, so the
/// server span of a stream is entered once more when the body is done, to cover the whole stream.
struct EndsOnDrop(tracing::Span);

impl Drop for EndsOnDrop {
    fn drop(&mut self) {
        let _end = self.0.enter();
    }
}

/// Base of the jittered backoff between attempts on different endpoints (Envoy's 25 ms).
const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(25);

/// Why the last attempt failed.
enum Failure {
    Timeout,
    Connect(String),
    Broken(String),
    Status(StatusCode, HeaderMap, Bytes),
}

/// Maps an upstream error body (vLLM nested or flat shape, integer code) to weir's OpenAI shape, keeping the status.
pub fn translate_upstream_error(status: StatusCode, body: &[u8]) -> ApiError {
    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        message: Option<String>,
    }
    #[derive(Deserialize)]
    struct Outer {
        #[serde(default)]
        error: Option<serde_json::Value>,
        #[serde(default)]
        message: Option<String>,
    }
    let message = serde_json::from_slice::<Outer>(body)
        .ok()
        .and_then(|o| match o.error {
            Some(serde_json::Value::Object(m)) => {
                serde_json::from_value::<Inner>(serde_json::Value::Object(m))
                    .ok()
                    .and_then(|i| i.message)
            }
            Some(serde_json::Value::String(s)) => Some(s),
            _ => o.message,
        })
        .unwrap_or_else(|| format!("The model server answered {status}."));
    let (kind, code) = match status.as_u16() {
        400 | 422 => ("invalid_request_error", Some("invalid_value")),
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => ("permission_error", Some("permission_denied")),
        404 => ("invalid_request_error", Some("model_not_found")),
        413 => ("invalid_request_error", Some("request_too_large")),
        429 => ("requests", Some("rate_limit_exceeded")),
        503 => ("server_error", Some("service_unavailable")),
        s if s >= 500 => ("server_error", None),
        _ => ("invalid_request_error", None),
    };
    let e = ApiError::new(status.as_u16(), kind, message);
    match code {
        Some(c) => e.with_code(c),
        None => e,
    }
}

async fn collect_limited<B>(body: B, limit: usize, idle: Duration) -> Result<Bytes, String>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout(idle, Limited::new(body, limit).collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out reading the response body".into()),
    }
}

fn usage_of(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct P {
        #[serde(default)]
        usage: Option<Usage>,
    }
    // Fast path: vLLM puts `usage` after `choices`, so its last `"usage":` is the top-level key (inside a JSON string
    // the quotes would be escaped); read just that object instead of the whole body.
    if let Some(at) =
        memchr::memrchr_iter(b'"', body).find(|&i| body[i..].starts_with(b"\"usage\":"))
    {
        let mut de = serde_json::Deserializer::from_slice(&body[at + 8..]);
        if let Ok(u) = Usage::deserialize(&mut de) {
            return Some(u);
        }
    }
    serde_json::from_slice::<P>(body).ok().and_then(|p| p.usage)
}

/// How long a backend 429 keeps its endpoint out of picks: its `Retry-After` seconds, 5 s when absent or not a number
/// of seconds, at most 60 s.
fn backend_cooldown(retry_after: Option<&HeaderValue>) -> Duration {
    let secs = retry_after
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(5)
        .min(60);
    Duration::from_secs(secs)
}

/// Time until the first breaker in the pool closes again, rounded up to whole seconds (at least 1).
fn retry_after_secs(app: &AppState, pool: &Pool, now: std::time::Instant) -> u64 {
    pool.endpoints
        .iter()
        .filter_map(|e| e.state.retry_after(now))
        .min()
        .map_or(1, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .max(1)
        .min(app.proxy.max_retry_after_secs)
}

/// Runs the prefill leg of a disaggregated request on pool endpoint `pi` (counting it in flight there) and returns
/// the decode leg's body, or why the request must be served colocated.
#[allow(clippy::too_many_arguments)]
async fn run_prefill_leg(
    app: &AppState,
    pool: &Pool,
    pi: usize,
    cache: &CacheView,
    prep: &Prepared,
    api: Api,
    up_body: &Bytes,
    headers: &HeaderMap,
    request_id: &HeaderValue,
) -> Result<Bytes, String> {
    let pep = pool.endpoints[pi].clone();
    let span = tracing::debug_span!(
        "prefill",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        "weir.endpoint" = pep.id.as_str(),
        "server.address" = pep.authority.as_str(),
        "error.type" = tracing::field::Empty,
    );
    let body = match crate::pd::prefill_body(up_body) {
        Ok(b) => b,
        Err(e) => {
            span_failed(&span, "prefill", &e);
            return Err(e);
        }
    };
    let uncached = cache.uncached(prep, pi);
    // A leg sent to a pod with no prefill backlog measures the pods' prefill throughput (see `crate::pd::PrefillRate`).
    let idle = pep.state.prefill_tokens.load(Ordering::Relaxed) == 0;
    let mut patt = Attempt::new(pep.state.clone(), u64::from(uncached) + 1);
    // The prompt is the prefill pod's backlog until the leg answers (its first and only token).
    let _backlog = PrefillClaim::new(pep.state.clone(), u64::from(uncached));
    let sent = tokio::time::Instant::now();
    let mut fwd = HeaderMap::with_capacity(headers.len());
    for (k, v) in headers {
        if !skip_header(k)
            && k != "traceparent"
            && k != "x-request-id"
            && k != header::ACCEPT_ENCODING
        {
            fwd.append(k.clone(), v.clone());
        }
    }
    // The prefill pod's parent span is this leg's (or, untraced, the caller's trace id with a new span id).
    fwd.insert(
        HeaderName::from_static("traceparent"),
        crate::telemetry::upstream_traceparent(&span, headers.get("traceparent")),
    );
    let kv = crate::pd::run_prefill(
        &app.client,
        pep.authority.as_str(),
        api,
        body,
        &fwd,
        request_id,
        app.proxy.first_byte,
        app.proxy.max_response_bytes,
    )
    .await;
    match kv {
        Ok(kv) => {
            patt.success();
            if idle {
                cache
                    .pool
                    .prefill_rate
                    .observe(uncached, sent.elapsed().as_secs_f64());
            }
            crate::pd::decode_body(up_body, kv)
        }
        Err(e) => {
            patt.failure(tokio::time::Instant::now().into_std());
            span_failed(&span, "prefill", &e);
            Err(e)
        }
    }
}

/// Everything the proxy needs from a handler.
pub struct Forward {
    /// Which upstream path to call.
    pub api: Api,
    /// Client headers, forwarded minus hop-by-hop ones.
    pub headers: HeaderMap,
    /// The original body, kept for retries and forwarded untouched when nothing changes.
    pub body: Bytes,
    /// What the router read from the body.
    pub parsed: Parsed,
    /// `x-request-id`, echoed to the client and sent upstream.
    pub request_id: HeaderValue,
    /// Arrival time, for TTFT and end-to-end latency.
    pub start: tokio::time::Instant,
    /// The request's server span (disabled unless traced or logged at debug; see [`crate::telemetry`]).
    pub span: tracing::Span,
}

/// Routes and forwards one validated request; never panics, always answers.
pub async fn forward(app: Arc<AppState>, snap: Arc<EndpointSnapshot>, fwd: Forward) -> Response {
    let Forward {
        api,
        headers,
        body,
        parsed,
        request_id,
        start,
        span: req_span,
    } = fwd;
    let Some(route) = snap.route(&parsed.model).cloned() else {
        app.count(&app.unknown_model, 404);
        let e = ApiError::new(
            404,
            "invalid_request_error",
            format!(
                "The model `{}` does not exist or you do not have access to it.",
                parsed.model
            ),
        )
        .with_param("model")
        .with_code("model_not_found");
        return error_response(&e, &request_id, None);
    };
    let model = route.name.clone();
    let series = app.metrics.model(&model);
    let guard = RequestGuard::new(app.clone(), series.clone(), start);
    let target = if route.targets.len() == 1 {
        route.targets[0]
    } else {
        route.pick_target(with_rng(|r| policies::pick::unit(r)))
    };
    let pool = &snap.pools[target.pool];
    let inject_usage = parsed.stream && !parsed.client_wants_usage;
    let up_body = match upstream_body(&body, &parsed, &pool.model, inject_usage) {
        Ok(b) => b,
        Err(e) => {
            app.count(&model, e.status);
            return error_response(&e, &request_id, None);
        }
    };
    let est_tokens = body.len() as u64 / 4 + u64::from(parsed.max_tokens.unwrap_or(0));
    let routing = snap.routing.clone();
    let cache = pool.cache.as_ref();
    // Cache-aware pools tokenize and look the prompt up once per request; other pools never pay for it.
    let prep = cache.map(|c| {
        let session = headers.get("x-session-id").and_then(|v| v.to_str().ok());
        c.prepare(
            api,
            &body,
            session,
            tokio::time::Instant::now().into_std(),
            &routing.metrics,
        )
    });
    let rv = RequestView {
        prompt_tokens: prep
            .as_ref()
            .map_or((body.len() / 4) as u32, |p| p.prompt_tokens),
        max_tokens: parsed.max_tokens,
    };
    let cfg = &app.proxy;
    let mut tried: Vec<usize> = Vec::with_capacity(2);
    let mut last: Option<Failure> = None;

    for attempt in 0..cfg.max_attempts {
        let _retry_guard = if attempt > 0 {
            let active = app.active_requests.load(Ordering::Relaxed);
            let retries = app.active_retries.load(Ordering::Relaxed);
            if !cfg.retry_budget.allows(active, retries) {
                app.metrics.retry_budget_exhausted.inc();
                break;
            }
            app.active_retries.fetch_add(1, Ordering::Relaxed);
            let guard = RetryGuard(&app);
            let u = with_rng(|r| policies::pick::unit(r));
            tokio::time::sleep(policies::pick::budget::backoff(
                attempt,
                RETRY_BACKOFF_BASE,
                u,
            ))
            .await;
            Some(guard)
        } else {
            None
        };
        let now = tokio::time::Instant::now();
        let now_std = now.into_std();
        let since = now.duration_since(app.epoch);
        let views: Vec<EndpointView> = pool
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut v = e.state.view(i, e.role, now_std, since, cfg.stale_after);
                if tried.contains(&i) {
                    v.available = false;
                }
                v
            })
            .collect();
        let pick_span = tracing::debug_span!(
            "pick",
            attempt = i64::from(attempt),
            "weir.pool" = &*pool.name,
            "weir.endpoint" = tracing::field::Empty,
            "weir.prefill_endpoint" = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        let picked = pick_span.in_scope(|| match (cache, &prep) {
            (Some(c), Some(p)) => with_rng(|r| c.decide(&rv, &views, p, attempt == 0, now_std, r))
                .map(|d| (d.index, Some(d))),
            _ => with_rng(|r| pool.pipeline.select(&rv, &views, now_std, r)).map(|c| {
                tracing::trace!(scores = ?c.scores, "scored");
                (c.index, None)
            }),
        });
        let (index, decided) = match picked {
            Ok(c) => c,
            Err(no) => {
                pick_span.record("otel.status_code", "error");
                pick_span.record("otel.status_description", tracing::field::display(&no));
                if last.is_some() {
                    break;
                }
                app.count(&model, 503);
                let e = ApiError::new(
                    503,
                    "server_error",
                    format!(
                        "No model server is available for `{}` ({no}).",
                        parsed.model
                    ),
                )
                .with_code("service_unavailable");
                return error_response(
                    &e,
                    &request_id,
                    Some(retry_after_secs(&app, pool, now_std)),
                );
            }
        };
        tried.push(index);
        let ep = pool.endpoints[index].clone();
        if !ep.state.try_acquire(now_std) {
            continue;
        }
        tracing::debug!(endpoint = %ep.id, attempt, "picked");
        pick_span.record("weir.endpoint", ep.id.as_str());
        if let Some(pi) = decided.as_ref().and_then(|d| d.prefill) {
            pick_span.record("weir.prefill_endpoint", pool.endpoints[pi].id.as_str());
        }
        drop(pick_span);
        req_span.record("weir.endpoint", ep.id.as_str());
        app.metrics
            .picks
            .get_or_create(&EndpointLabel {
                pool: pool.name.clone().into(),
                endpoint: ep.id.0.clone().into(),
            })
            .inc();
        // In-flight tokens: the prompt part the pod must still compute (cache-aware pools know it) plus the output.
        let att_tokens = match (cache, &prep) {
            (Some(c), Some(p)) => {
                u64::from(c.uncached(p, index)) + u64::from(parsed.max_tokens.unwrap_or(0))
            }
            _ => est_tokens,
        };
        let mut att = Attempt::new(ep.state.clone(), att_tokens);
        // The pod's prefill backlog until the first token: the uncached prompt (the byte estimate without a
        // cache-aware pool). A disaggregated request's prompt is computed on the prefill pod instead (its leg claims
        // it there), unless that leg fails (claimed here at the fallback below).
        let prefill_claim = match (cache, &prep, decided.as_ref()) {
            (Some(_), Some(_), Some(d)) if d.prefill.is_some() => 0,
            (Some(c), Some(p), _) => u64::from(c.uncached(p, index)),
            _ => est_tokens.saturating_sub(u64::from(parsed.max_tokens.unwrap_or(0))),
        };
        let mut first_token = PrefillClaim::new(ep.state.clone(), prefill_claim);
        let mut send_body = up_body.clone();
        let mut recorded: Option<String> = None;
        if let (Some(c), Some(p), Some(d)) = (cache, &prep, decided) {
            c.commit(&d, p, now_std, &routing.metrics);
            let prefill = d.prefill;
            let is_pd = matches!(d.how, crate::route::How::Pd(_));
            let rid = request_id.to_str().unwrap_or("").to_string();
            let mut lazy = c.record(
                &rid,
                &model,
                rv,
                views,
                p,
                d,
                now_std,
                routing.unix_ms(now_std),
            );
            if let Some(pi) = prefill {
                let outcome =
                    run_prefill_leg(&app, pool, pi, c, p, api, &up_body, &headers, &request_id)
                        .await;
                match outcome {
                    Ok(b) => {
                        send_body = b;
                        routing
                            .metrics
                            .pd
                            .get_or_create(&PdLabel {
                                decision: "disaggregated",
                            })
                            .inc();
                    }
                    Err(why) => {
                        tracing::warn!(prefill = %pool.endpoints[pi].id, reason = %why, "prefill leg failed; serving colocated");
                        routing
                            .metrics
                            .pd
                            .get_or_create(&PdLabel {
                                decision: "fallback",
                            })
                            .inc();
                        lazy.fallback = Some(why);
                        first_token =
                            PrefillClaim::new(ep.state.clone(), u64::from(c.uncached(p, index)));
                    }
                }
            } else if is_pd {
                routing
                    .metrics
                    .pd
                    .get_or_create(&PdLabel {
                        decision: "colocated",
                    })
                    .inc();
            }
            routing.ring.lock().push(lazy);
            req_span.record("weir.decision_id", rid.as_str());
            recorded = Some(rid);
        }
        // The upstream attempt (the decode leg of a disaggregated request); its id is the backend's parent span.
        let up_span = tracing::debug_span!(
            "upstream",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            attempt = i64::from(attempt),
            "weir.endpoint" = ep.id.as_str(),
            "server.address" = ep.authority.as_str(),
            "http.response.status_code" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
            "weir.stream_outcome" = tracing::field::Empty,
        );
        let trace = crate::telemetry::upstream_traceparent(&up_span, headers.get("traceparent"));

        let mut rb = Request::builder().method(Method::POST).uri(api.uri());
        if let Some(h) = rb.headers_mut() {
            h.reserve(headers.len() + 3);
            for (k, v) in &headers {
                // No accept-encoding: the SSE scanner must see plain bytes (usage accounting and stripping).
                if !skip_header(k)
                    && k != "traceparent"
                    && k != "x-request-id"
                    && k != header::ACCEPT_ENCODING
                {
                    h.append(k.clone(), v.clone());
                }
            }
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(HeaderName::from_static("x-request-id"), request_id.clone());
            h.insert(HeaderName::from_static("traceparent"), trace);
        }
        let req = match rb.body(send_body) {
            Ok(r) => r,
            Err(e) => {
                att.verdict = true;
                app.count(&model, 500);
                let e = ApiError::new(
                    500,
                    "server_error",
                    format!("could not build upstream request: {e}"),
                );
                return error_response(&e, &request_id, None);
            }
        };

        let sent = app.upstream.send(ep.authority.as_str(), req);
        let resp = match tokio::time::timeout(cfg.first_byte, sent).await {
            Err(_) => {
                att.failure(tokio::time::Instant::now().into_std());
                span_failed(&up_span, "timeout", &"no response head in time");
                app.retried(&model, RetryReason::Timeout, attempt, cfg.max_attempts);
                last = Some(Failure::Timeout);
                continue;
            }
            Ok(Err(e)) => {
                att.failure(tokio::time::Instant::now().into_std());
                let connect = e.is_connect();
                let msg = format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                );
                tracing::warn!(endpoint = %ep.id, error = %msg, "upstream request failed");
                span_failed(&up_span, if connect { "connect" } else { "broken" }, &msg);
                app.retried(
                    &model,
                    if connect {
                        RetryReason::Connect
                    } else {
                        RetryReason::BrokenBody
                    },
                    attempt,
                    cfg.max_attempts,
                );
                last = Some(if connect {
                    Failure::Connect(msg)
                } else {
                    Failure::Broken(msg)
                });
                continue;
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        up_span.record("http.response.status_code", i64::from(status.as_u16()));
        if status.is_client_error() || status.is_server_error() {
            span_failed(&up_span, status.as_str(), &status);
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            let d = backend_cooldown(resp.headers().get(header::RETRY_AFTER));
            ep.state
                .cool(tokio::time::Instant::now().duration_since(app.epoch), d);
            tracing::debug!(endpoint = %ep.id, cooldown_ms = d.as_millis() as u64, "backend 429; cooling the endpoint");
        }
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            if status.is_server_error() {
                att.failure(tokio::time::Instant::now().into_std());
            } else {
                att.success();
            }
            let (parts, b) = resp.into_parts();
            let bytes = collect_limited(b, 64 << 10, cfg.idle)
                .await
                .unwrap_or_default();
            app.retried(
                &model,
                if status.is_server_error() {
                    RetryReason::Status5xx
                } else {
                    RetryReason::Status429
                },
                attempt,
                cfg.max_attempts,
            );
            last = Some(Failure::Status(status, parts.headers, bytes));
            continue;
        }

        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let (parts, upstream) = resp.into_parts();
        let mut out = Response::builder().status(status);
        if let Some(h) = out.headers_mut() {
            for (k, v) in &parts.headers {
                if !skip_header(k) && k != "x-request-id" {
                    h.append(k.clone(), v.clone());
                }
            }
            h.insert(HeaderName::from_static("x-request-id"), request_id.clone());
            if let Ok(v) = HeaderValue::from_str(ep.id.as_str()) {
                h.insert(HeaderName::from_static("x-weir-endpoint"), v);
            }
            h.insert(
                HeaderName::from_static("x-weir-decision-id"),
                request_id.clone(),
            );
        }

        if is_sse && status.is_success() {
            app.count(&model, status.as_u16());
            let ctx = StreamCtx {
                scanner: SseScanner::new(inject_usage),
                idle: cfg.idle,
                series: series.clone(),
                outcomes: app.metrics.stream_outcomes.clone(),
                start,
                guards: Box::new(guard),
                // Holds the attempt span, which so covers the whole stream and closes when it ends.
                on_end: Some(Box::new(move |outcome| {
                    up_span.record("weir.stream_outcome", tracing::field::debug(outcome));
                    match outcome {
                        StreamOutcome::Complete => att.success(),
                        StreamOutcome::UpstreamError
                        | StreamOutcome::Truncated
                        | StreamOutcome::IdleTimeout => {
                            span_failed(&up_span, "stream", &format_args!("{outcome:?}"));
                            att.failure(tokio::time::Instant::now().into_std());
                        }
                        // The client left: no verdict on the endpoint; dropping `att` frees a half-open probe.
                        StreamOutcome::Cancelled => drop(att),
                    }
                })),
            };
            let stream = proxy_stream(upstream, ctx);
            // The first event ends the pod's prefill of this request (releases its prefill backlog) and is the
            // measured TTFT. The closure holds the server span, which so stays open until the stream ends.
            let measure = recorded.is_some() || !req_span.is_disabled();
            let routing = routing.clone();
            let req_span = EndsOnDrop(req_span);
            let mut first = true;
            let body = Body::from_stream(futures::StreamExt::map(stream, move |item| {
                if first {
                    first = false;
                    first_token.release();
                    if measure {
                        let ms = start.elapsed().as_secs_f64() * 1000.0;
                        if let Some(rid) = &recorded {
                            routing.measured_ttft(rid, ms);
                        }
                        req_span.0.record("weir.ttft_ms", ms);
                    }
                }
                item
            }));
            return out
                .body(body)
                .unwrap_or_else(|_| Response::new(Body::empty()));
        }

        let bytes = match collect_limited(upstream, app.proxy.max_response_bytes, cfg.idle).await {
            Ok(b) => b,
            Err(e) => {
                att.failure(tokio::time::Instant::now().into_std());
                span_failed(&up_span, "broken_body", &e);
                app.retried(&model, RetryReason::BrokenBody, attempt, cfg.max_attempts);
                last = Some(Failure::Broken(e));
                continue;
            }
        };
        att.success();
        if status.is_success() {
            if recorded.is_some() || !req_span.is_disabled() {
                let ms = start.elapsed().as_secs_f64() * 1000.0;
                if let Some(rid) = &recorded {
                    routing.measured_ttft(rid, ms);
                }
                req_span.record("weir.ttft_ms", ms);
            }
            if let Some(u) = usage_of(&bytes) {
                series.prompt_tokens.inc_by(u.prompt_tokens);
                series.completion_tokens.inc_by(u.completion_tokens);
            }
            app.count(&model, status.as_u16());
            return out
                .body(Body::from(bytes))
                .unwrap_or_else(|_| Response::new(Body::empty()));
        }
        // A 4xx from the model server: the endpoint is healthy, the request is not. Translate to OpenAI shape.
        let e = translate_upstream_error(status, &bytes);
        app.count(&model, e.status);
        return error_response(&e, &request_id, None);
    }

    drop(guard);
    let now_std = tokio::time::Instant::now().into_std();
    let (e, retry_after) = match last {
        Some(Failure::Timeout) => (
            ApiError::new(
                504,
                "server_error",
                "The model server did not answer in time.",
            )
            .with_code("gateway_timeout"),
            None,
        ),
        Some(Failure::Connect(m)) => (
            ApiError::new(
                503,
                "server_error",
                format!("No model server could be reached: {m}"),
            )
            .with_code("service_unavailable"),
            Some(retry_after_secs(&app, pool, now_std)),
        ),
        Some(Failure::Broken(m)) => (
            ApiError::new(502, "server_error", format!("The model server failed: {m}"))
                .with_code("bad_gateway"),
            None,
        ),
        Some(Failure::Status(s, h, b)) => {
            let ra =
                h.get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .or((s == StatusCode::TOO_MANY_REQUESTS
                        || s == StatusCode::SERVICE_UNAVAILABLE)
                        .then_some(1));
            (translate_upstream_error(s, &b), ra)
        }
        None => (
            ApiError::new(503, "server_error", "No model server is available.")
                .with_code("service_unavailable"),
            Some(retry_after_secs(&app, pool, now_std)),
        ),
    };
    app.count(&model, e.status);
    error_response(&e, &request_id, retry_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_bodies_with_openai_errors() {
        let e = parse_request(Api::Chat, b"{not json").unwrap_err();
        assert_eq!((e.status, e.code.as_deref()), (400, Some("invalid_json")));
        let e = parse_request(Api::Chat, b"[1,2]").unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_request(
            Api::Chat,
            br#"{"messages":[{"role":"user","content":"x"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = parse_request(Api::Chat, br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse_request(
            Api::Completions,
            br#"{"model":"m","prompt":"x","suffix":"y"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code.as_deref(), Some("unsupported_parameter"));
        let e = parse_request(
            Api::Completions,
            br#"{"model":"m","prompt":"x","stream_options":{}}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream_options"));
        let e =
            parse_request(Api::Completions, b"{\"model\":\"m\xff\",\"prompt\":\"x\"}").unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_request(Api::Completions, br#"{"model":7,"prompt":"x"}"#).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn body_is_forwarded_untouched_when_nothing_changes() {
        let raw = Bytes::from_static(br#"{"model":"m","prompt":"x","max_tokens":3}"#);
        let p = parse_request(Api::Completions, &raw).unwrap();
        assert_eq!(p.max_tokens, Some(3));
        let out = upstream_body(&raw, &p, "m", false).unwrap();
        assert_eq!(out.as_ptr(), raw.as_ptr());
    }

    #[test]
    fn usage_is_spliced_in_and_model_rewritten() {
        let raw = Bytes::from_static(br#" {"model":"m","prompt":"x","stream":true}"#);
        let p = parse_request(Api::Completions, &raw).unwrap();
        let out = upstream_body(&raw, &p, "m", true).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["prompt"], "x");
        let out = upstream_body(&raw, &p, "upstream-m", true).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (
                v["model"].as_str(),
                v["stream_options"]["include_usage"].as_bool()
            ),
            (Some("upstream-m"), Some(true))
        );
        let raw = Bytes::from_static(br#"{"model":"m","prompt":"x","stream":true,"stream_options":{"continuous_usage_stats":true}}"#);
        let p = parse_request(Api::Completions, &raw).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&upstream_body(&raw, &p, "m", true).unwrap()).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"continuous_usage_stats": true, "include_usage": true})
        );
    }

    #[test]
    fn vllm_errors_become_openai_errors() {
        let e = translate_upstream_error(
            StatusCode::NOT_FOUND,
            br#"{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}}"#,
        );
        let v: serde_json::Value = serde_json::from_str(&e.openai_json()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["message"], "The model `x` does not exist.");
        let e = translate_upstream_error(
            StatusCode::BAD_REQUEST,
            br#"{"object":"error","message":"flat","code":400}"#,
        );
        assert_eq!(e.message, "flat");
        let e = translate_upstream_error(StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(e.status, 502);
    }

    #[test]
    fn usage_is_read_from_the_top_level_key() {
        let body = br#"{"id":"c","choices":[{"index":0,"text":"say \"usage\":{\"prompt_tokens\":9}"}],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2,"prompt_tokens_details":null},"kv_transfer_params":null}"#;
        let want = Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
        });
        assert_eq!(usage_of(body), want);
        // A `usage` the fast path cannot read falls back to the whole-body parse.
        assert_eq!(
            usage_of(br#"{"choices":[],"usage" : {"prompt_tokens":3,"completion_tokens":2}}"#),
            want
        );
        assert_eq!(usage_of(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(usage_of(br#"{"choices":[]}"#), None);
        assert_eq!(usage_of(b"not json"), None);
    }

    #[test]
    fn traceparent_keeps_trace_id_or_makes_one() {
        let inc =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let out = traceparent(Some(&inc));
        let s = out.to_str().unwrap();
        assert!(s.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!s.contains("00f067aa0ba902b7"));
        assert!(s.ends_with("-01"));
        for bad in [
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-010",
        ] {
            let made = traceparent(Some(&HeaderValue::from_static(bad)));
            let s = made.to_str().unwrap();
            let parts: Vec<&str> = s.split('-').collect();
            assert_eq!(
                (
                    parts.len(),
                    parts[0],
                    parts[1].len(),
                    parts[2].len(),
                    parts[3]
                ),
                (4, "00", 32, 16, "01"),
                "{bad} -> {s}"
            );
            assert!(!bad.contains(parts[1]), "{bad} -> {s}");
            assert!(s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        }
    }
}
