//! vLLM's OpenAI-compatible HTTP surface for one simulated pod.
//!
//! [`app`] builds the axum router from a [`PodState`] (engine driver, metrics, faults, configuration) without
//! binding anything, so handlers are tested with `tower::ServiceExt::oneshot`; [`serve`] runs it on a bound
//! listener until shutdown. Endpoints, JSON shapes, SSE framing and error bodies follow vLLM (contract §1–§3);
//! `/sim/*` endpoints are simulator-only hooks (P/D block release, cached-block inspection).

mod generate;
mod text;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use policies::errors::ApiError;
use policies::openai::{DetokenizeRequest, TokenizeRequest, parse_body};
use policies::tokens::{ByteTokenizer, Tokenizer};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::time::Instant;

use crate::driver::{Driver, unix_now};
use crate::engine::{Event, Role};
use crate::faults::Faults;
use crate::metrics::Metrics;

/// Static settings of one pod's HTTP surface.
#[derive(Debug, Clone)]
pub struct PodConfig {
    /// Names the pod answers to (`--served-model-name`); the first is the metrics `model_name`.
    pub served_model_names: Vec<String>,
    /// `root` in `/v1/models` (the model path / HF name).
    pub model_root: String,
    /// Longest prompt + output.
    pub max_model_len: u32,
    /// Guard `/v1/*` with this bearer key.
    pub api_key: Option<String>,
    /// Report `prompt_tokens_details.cached_tokens` in usage.
    pub enable_prompt_tokens_details: bool,
    /// Largest accepted request body; larger -> 413.
    pub max_body_bytes: usize,
    /// P/D role (informational: every pod serves plain requests too).
    pub role: Role,
    /// Host other pods use to reach this one (P/D `remote_host`).
    pub advertise_host: String,
    /// The bound HTTP port (P/D `remote_port`).
    pub http_port: u16,
    /// Tensor-parallel size (P/D `tp_size`).
    pub tp: u32,
    /// Real seconds after start before `/health` is 200.
    pub startup_delay: Duration,
    /// `--min-latency`: hold every generation response until this long after its request arrived (a floor on the
    /// time to the first byte; zero = none). For measuring what a proxy adds against a backend that takes time
    /// without taking CPU, as the llm-d simulator's fixed time-to-first-token does.
    pub min_latency: Duration,
    /// Seed for response ids.
    pub seed: u64,
}

struct Inner {
    cfg: PodConfig,
    driver: Driver,
    metrics: Arc<Mutex<Metrics>>,
    faults: Faults,
    /// Turns prompts into ids and generated ids into text; `ByteTokenizer` unless a tokenizer file was given.
    tokenizer: Arc<dyn Tokenizer>,
    ready_at: Instant,
    created: u64,
    ids: Mutex<SmallRng>,
}

/// Shared state of one pod's handlers.
#[derive(Clone)]
pub struct PodState(Arc<Inner>);

impl PodState {
    /// State for a pod whose driver is already running. Readiness counts from now.
    pub fn new(
        cfg: PodConfig,
        driver: Driver,
        metrics: Arc<Mutex<Metrics>>,
        faults: Faults,
    ) -> Self {
        Self::with_tokenizer(cfg, driver, metrics, faults, Arc::new(ByteTokenizer))
    }

    /// Like [`PodState::new`], tokenizing with `tokenizer` (e.g. an HF `tokenizer.json`).
    pub fn with_tokenizer(
        cfg: PodConfig,
        driver: Driver,
        metrics: Arc<Mutex<Metrics>>,
        faults: Faults,
        tokenizer: Arc<dyn Tokenizer>,
    ) -> Self {
        let ready_at = Instant::now() + cfg.startup_delay;
        let ids = Mutex::new(SmallRng::seed_from_u64(cfg.seed ^ 0x1d5));
        PodState(Arc::new(Inner {
            cfg,
            driver,
            metrics,
            faults,
            tokenizer,
            ready_at,
            created: unix_now() as u64,
            ids,
        }))
    }

    fn ready(&self) -> bool {
        Instant::now() >= self.0.ready_at
    }

    fn hex_id(&self) -> String {
        let mut r = self.0.ids.lock();
        format!("{:016x}{:016x}", r.random::<u64>(), r.random::<u64>())
    }

    fn model_ok(&self, model: &str) -> Result<(), ApiError> {
        if self.0.cfg.served_model_names.iter().any(|m| m == model) {
            Ok(())
        } else {
            Err(
                ApiError::not_found(format!("The model `{model}` does not exist."))
                    .with_param("model"),
            )
        }
    }
}

/// An error reply in vLLM's shape.
pub struct Fail(pub ApiError);

impl From<ApiError> for Fail {
    fn from(e: ApiError) -> Self {
        Fail(e)
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            self.0.vllm_json(),
        )
            .into_response()
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `/v1/*` guard: 401 `{"error":"Unauthorized"}` (vLLM's own shape for this case) on a bad bearer key.
#[allow(clippy::result_large_err)] // the error is the reply itself, returned at once
fn check_auth(s: &PodState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(key) = &s.0.cfg.api_key else {
        return Ok(());
    };
    let ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|v| v == key);
    if ok {
        Ok(())
    } else {
        Err(json_response(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"Unauthorized"}"#.into(),
        ))
    }
}

#[allow(clippy::result_large_err)] // the error is the reply itself, returned at once
fn check_ready(s: &PodState) -> Result<(), Response> {
    if s.ready() {
        Ok(())
    } else {
        Err(Fail(ApiError::new(
            503,
            "ServiceUnavailableError",
            "The model server is still starting.",
        ))
        .into_response())
    }
}

/// Read a body up to the pod's limit; over it -> 413 in the error shape.
#[allow(clippy::result_large_err)] // the error is the reply itself, returned at once
async fn read_body(s: &PodState, body: Body) -> Result<bytes::Bytes, Response> {
    axum::body::to_bytes(body, s.0.cfg.max_body_bytes)
        .await
        .map_err(|_| {
            Fail(ApiError::new(
                413,
                "RequestEntityTooLargeError",
                format!(
                    "Request body exceeds the limit of {} bytes.",
                    s.0.cfg.max_body_bytes
                ),
            ))
            .into_response()
        })
}

/// The router for one pod.
pub fn app(state: PodState) -> Router {
    Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions/render", post(generate::render_completion))
        .route("/v1/chat/completions/render", post(generate::render_chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/version", get(version))
        .route("/ping", get(ping).post(ping))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/sim/kv_transfer/release", post(release_transfer))
        .route("/sim/debug/cached_blocks", get(cached_blocks))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn health(State(s): State<PodState>) -> StatusCode {
    if s.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn ping(State(s): State<PodState>) -> StatusCode {
    health(State(s)).await
}

async fn version() -> Response {
    json_response(StatusCode::OK, json!({"version": "0.11.0"}).to_string())
}

async fn metrics(State(s): State<PodState>) -> Response {
    // Rendered from a copy: the engine driver updates the series every step and must not wait out a render.
    let snapshot = s.0.metrics.lock().clone();
    let text = snapshot.render();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn models(State(s): State<PodState>, headers: HeaderMap) -> Response {
    if let Err(r) = check_auth(&s, &headers) {
        return r;
    }
    let c = &s.0.cfg;
    let data: Vec<_> = c
        .served_model_names
        .iter()
        .map(|name| {
            json!({
                "id": name, "object": "model", "created": s.0.created, "owned_by": "vllm", "root": c.model_root,
                "parent": null, "max_model_len": c.max_model_len,
                "permission": [{
                    "id": format!("modelperm-{}", s.hex_id()), "object": "model_permission", "created": s.0.created,
                    "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
                    "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
                    "organization": "*", "group": null, "is_blocking": false
                }]
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": data}).to_string(),
    )
}

async fn tokenize(State(s): State<PodState>, body: Body) -> Response {
    let run = async {
        let bytes = read_body(&s, body).await.map_err(Err)?;
        let req: TokenizeRequest = parse_body(&bytes).map_err(Ok)?;
        if let Some(m) = &req.model {
            s.model_ok(m).map_err(Ok)?;
        }
        let tokens = match (&req.prompt, &req.messages) {
            (Some(p), None) => s.0.tokenizer.encode(p),
            (None, Some(msgs)) => {
                let chat = policies::openai::ChatCompletionRequest {
                    messages: msgs.clone(),
                    max_completion_tokens: None,
                    common: Default::default(),
                    extra: Default::default(),
                };
                chat.prompt_ids(&*s.0.tokenizer).map_err(Ok)?
            }
            _ => {
                return Err(Ok(ApiError::bad_request(
                    "Exactly one of `prompt` or `messages` is required.",
                )));
            }
        };
        Ok(
            json!({"count": tokens.len(), "max_model_len": s.0.cfg.max_model_len, "tokens": tokens, "token_strs": null}),
        )
    };
    match run.await {
        Ok(v) => json_response(StatusCode::OK, v.to_string()),
        Err(Ok(e)) => Fail(e).into_response(),
        Err(Err(r)) => r,
    }
}

async fn detokenize(State(s): State<PodState>, body: Body) -> Response {
    let bytes = match read_body(&s, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req: DetokenizeRequest = match parse_body(&bytes) {
        Ok(r) => r,
        Err(e) => return Fail(e).into_response(),
    };
    if let Some(m) = &req.model
        && let Err(e) = s.model_ok(m)
    {
        return Fail(e).into_response();
    }
    let vocab = s.0.tokenizer.vocab_size();
    if let Some(t) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Fail(
            ApiError::bad_request(format!("Token id {t} is out of vocabulary."))
                .with_param("tokens"),
        )
        .into_response();
    }
    let text: String = req
        .tokens
        .iter()
        .map(|&t| s.0.tokenizer.decode_token(t))
        .collect();
    json_response(StatusCode::OK, json!({"prompt": text}).to_string())
}

async fn reset_prefix_cache(State(s): State<PodState>) -> StatusCode {
    if !s.0.driver.reset_prefix_cache().await {
        tracing::warn!("reset_prefix_cache refused: blocks are in use");
    }
    StatusCode::OK
}

async fn release_transfer(State(s): State<PodState>, body: Body) -> Response {
    let bytes = match read_body(&s, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let v: serde_json::Value = match parse_body(&bytes) {
        Ok(v) => v,
        Err(e) => return Fail(e).into_response(),
    };
    let Some(id) = v.get("remote_request_id").and_then(|x| x.as_str()) else {
        return Fail(
            ApiError::bad_request("`remote_request_id` is required.")
                .with_param("remote_request_id"),
        )
        .into_response();
    };
    let released = s.0.driver.release_transfer(id.to_string()).await;
    json_response(StatusCode::OK, json!({"released": released}).to_string())
}

async fn cached_blocks(State(s): State<PodState>) -> Response {
    let hashes: Vec<u64> = s.0.driver.cached_blocks().await.into_iter().collect();
    json_response(
        StatusCode::OK,
        json!({"count": hashes.len(), "hashes": hashes}).to_string(),
    )
}

/// Tell prefill pods to unpin blocks the decode side has finished reading (sim-only side channel): consumes the
/// driver's `TransferDone` events and POSTs `/sim/kv_transfer/release` to `remote_host:remote_port`.
pub async fn release_transfers(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) {
    while let Some(ev) = rx.recv().await {
        let Event::TransferDone {
            remote_host,
            remote_port,
            remote_request_id: Some(rid),
            ..
        } = ev
        else {
            continue;
        };
        tokio::spawn(async move {
            let body = json!({"remote_request_id": rid}).to_string();
            if let Err(e) =
                post_json(&remote_host, remote_port, "/sim/kv_transfer/release", &body).await
            {
                tracing::warn!(%remote_host, remote_port, error = %e, "kv transfer release failed");
            }
        });
    }
}

/// Minimal HTTP/1.1 POST (one request per connection), enough for the sim's side channel.
async fn post_json(host: &str, port: u16, path: &str, body: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))??;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timeout"))??;
    let head = String::from_utf8_lossy(&buf[..buf.len().min(32)]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status == 200 {
        Ok(status)
    } else {
        Err(std::io::Error::other(format!("status {status}")))
    }
}

/// The `X-Request-Id` value, if any.
fn request_id_header(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

fn with_request_id(mut res: Response, rid: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(rid) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// Serve `app` on a bound listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: PodState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(nodelay(listener), app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Accepted connections with Nagle's algorithm off, as vLLM's: Python's asyncio sets `TCP_NODELAY` on every TCP
/// transport, so each SSE chunk leaves when written instead of waiting for the previous one's ACK.
fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|s| {
        if let Err(e) = s.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    })
}

#[cfg(test)]
mod tests;
