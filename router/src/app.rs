//! The front door: one service stack every request goes through, and `serve(listener, ..)` with graceful drain.
//!
//! [`app`] builds the stack once ([`tower::ServiceBuilder`]): a request-id layer, then [`FrontDoor`], which sends
//! `/v1/chat/completions` and `/v1/completions` to the phased request path ([`crate::pipeline`]) and everything else
//! to the axum routes: `GET /v1/models` (aggregated over routes), `GET /health` (503 while draining), `GET /metrics`,
//! `GET /debug/routes` (routes, weights and shares, pools, endpoint state), `/debug/decisions`, `/debug/prefix`, `GET /debug/pods` (per-pod load samples, [`crate::pods`]), `GET /v1/usage` (the usage ledger, [`crate::usage`]).
//! Production connections ([`serve`]) and the handler tests (`app(state).oneshot(req)`) run the same stack. Every
//! response carries `x-request-id` and the [security headers](SECURITY_HEADERS); every error, wrong paths and
//! methods included, is OpenAI-shaped ([`crate::error::respond`]).
//!
//! Hostile clients ([`crate::config::FrontDoorConfig`]): a connection must send a whole request head within
//! `header_read_timeout` of opening or of its previous response (hyper closes it otherwise, which also bounds idle
//! keep-alive connections), its body within `body_read_timeout` (408), and at most `max_connections` are served at
//! once (the rest wait in the listen backlog).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use policies::errors::ApiError;
use policies::openai::Api;
use tower::util::MapRequest;
use tower::{Service, ServiceBuilder};

use crate::error::respond;
use crate::shared::AppState;

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

fn request_id_of(req: &Request) -> HeaderValue {
    crate::ids::request_id(req.headers())
}

async fn not_found(req: Request) -> Response {
    let e = ApiError::unknown_path(req.method().as_str(), req.uri().path());
    respond(&e, &request_id_of(&req))
}

/// 405 in the OpenAI shape with `Allow`.
fn wrong_method(req: &Request, allowed: &'static str) -> Response {
    let e = ApiError::method_not_allowed(req.method().as_str(), req.uri().path(), allowed);
    let mut r = respond(&e, &request_id_of(req));
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    r
}

async fn get_only(req: Request) -> Response {
    wrong_method(&req, "GET")
}

/// The routes besides completions (served by axum's router).
fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/debug/routes", get(debug_routes))
        .route("/debug/decisions", get(crate::decisions::list))
        .route("/debug/decisions/{request_id}", get(crate::decisions::one))
        .route("/debug/prefix", get(crate::decisions::prefix))
        .route("/debug/pods", get(crate::pods::debug_pods))
        .route("/v1/usage", get(crate::usage::usage))
        .method_not_allowed_fallback(get_only)
        .fallback(not_found)
        .with_state(state)
}

/// Gives the request an `x-request-id` (a new one unless the client sent a usable one); every later step and the
/// response echo it.
fn with_request_id(mut req: Request) -> Request {
    if crate::ids::client_request_id(req.headers()).is_none() {
        req.headers_mut().insert(
            HeaderName::from_static("x-request-id"),
            crate::ids::new_request_id(),
        );
    }
    req
}

/// Sent with every response: the API serves JSON and event streams only, never a page to sniff, frame or cache.
pub const SECURITY_HEADERS: [(HeaderName, HeaderValue); 4] = [
    (
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ),
    (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    (
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    ),
    (
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    ),
];

/// Adds [`SECURITY_HEADERS`], and `cache-control: no-store` unless the handler chose a caching policy.
fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        h.insert(name, value);
    }
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    r
}

/// The innermost service: completions to [`crate::pipeline`], other paths to the axum routes.
#[derive(Clone)]
pub struct FrontDoor {
    state: Arc<AppState>,
    routes: Router,
}

impl Service<Request> for FrontDoor {
    type Response = Response;
    type Error = Infallible;
    // Boxed: hyper keeps room for one service future per connection, for the connection's lifetime, and the
    // completions future is large.
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match Api::of_path(req.uri().path()) {
            Some(api) if req.method() == Method::POST => {
                let state = self.state.clone();
                Box::pin(
                    async move { Ok(secure(crate::pipeline::completions(state, api, req).await)) },
                )
            }
            Some(_) => {
                let r = wrong_method(&req, "POST");
                Box::pin(std::future::ready(Ok(secure(r))))
            }
            None => {
                let rid = request_id_of(&req);
                let fut = tower::ServiceExt::oneshot(self.routes.clone(), req);
                Box::pin(async move {
                    let mut r = fut.await?;
                    r.headers_mut()
                        .entry(HeaderName::from_static("x-request-id"))
                        .or_insert(rid);
                    Ok(secure(r))
                })
            }
        }
    }
}

/// The composed service every request passes through.
pub type Stack = MapRequest<FrontDoor, fn(Request) -> Request>;

/// The router's HTTP surface, built once per server (cloning it is two reference-count increments).
pub fn app(state: Arc<AppState>) -> Stack {
    ServiceBuilder::new()
        .map_request(with_request_id as fn(Request) -> Request)
        .service(FrontDoor {
            routes: routes(state.clone()),
            state,
        })
}

/// Connection settings of the front door (HTTP/1.1 only, like vLLM).
fn http1_builder(header_read_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        // Slow-loris bound: a client must send its request head within this of connecting or of its previous
        // response (hyper starts the timer whenever it waits for a head), then the connection is closed.
        .header_read_timeout(Some(header_read_timeout))
        .keep_alive(true)
        // Queue body chunks instead of copying them into the write buffer (SSE events pass through untouched).
        .writev(true);
    b
}

/// One client connection: HTTP/1 requests through `stack` until the peer closes or `stop` turns `true`, then a
/// graceful close (the current request or stream may finish).
fn connection(
    builder: &hyper::server::conn::http1::Builder,
    stream: tokio::net::TcpStream,
    stack: Stack,
    mut stop: tokio::sync::watch::Receiver<bool>,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        tower::ServiceExt::oneshot(stack.clone(), req.map(Body::new))
    });
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    async move {
        // Held until the connection is gone: frees its place under `max_connections`.
        let _slot = slot;
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
    let stack = app(state.clone());
    let builder = http1_builder(state.front_door.header_read_timeout);
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.front_door.max_connections,
    ));
    // Every connection task holds a receiver: `true` asks it to finish its current request and close; the sender
    // sees `closed()` once all connections are gone.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // At the cap, stop accepting: further connections wait in the kernel's backlog until one closes.
        let slot = tokio::select! {
            () = &mut shutdown => break,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break, // never closed
            },
        };
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
            stack.clone(),
            stop_rx.clone(),
            slot,
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
        let config = crate::config::RawConfig::default().validate().unwrap();
        let state = crate::start(
            &config,
            crate::discovery::Discovery::new(),
            prometheus_client::registry::Registry::default(),
            0,
            1,
        )
        .unwrap();
        let slot = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let fut = connection(
            &http1_builder(Duration::from_secs(10)),
            stream,
            app(state),
            rx,
            slot,
        );
        let size = std::mem::size_of_val(&fut);
        println!("connection task future: {size} bytes");
        assert!(size < 16 << 10, "{size} bytes");
    }
}
