//! weir as a Gateway API Inference Extension endpoint picker: an Envoy `ext_proc` server
//! (`envoy.service.ext_proc.v3.ExternalProcessor`, gRPC) that a gateway consults for each request of an
//! InferencePool (`weir serve --ext-proc-listen`; the InferencePool's `endpointPickerRef` names it). [`serve`] takes
//! its connections from the caller: `weir serve` hands it TLS connections by default, plaintext (h2c) ones with
//! `--ext-proc-plaintext`.
//!
//! One ext_proc stream is one HTTP request. Envoy sends the request headers, then the body in chunks (the protocol's
//! `FULL_DUPLEX_STREAMED` body mode); at the body's end weir runs the request phases of `weir serve` up to the pick
//! ([`pick::route_request`]: the same identify, admission and scheduler over the same live state) and answers with
//! the request-headers response (the destination in the `x-gateway-destination-endpoint` header and in the dynamic
//! metadata `envoy.lb`, credentials swapped for the pool's, the new `Content-Length`) followed by the body (rewritten
//! when the pool's model name differs). A refusal is an `ImmediateResponse` with weir's OpenAI-shaped error. Then
//! Envoy reports the response: its headers (the status gives the endpoint's breaker its verdict) and body chunks,
//! passed through unchanged while the usage is read from them with `weir serve`'s own readers ([`SseScanner`] for a
//! stream, [`crate::execute::usage_of`] for a JSON body). The response's end of stream (a body chunk, or headers,
//! with `end_of_stream`) is the account phase: the answer and its tokens are counted and the admission permit settled,
//! once. An exchange that ends before the response does (the client left, the gateway gave up) is settled then, as
//! cancelled, with whatever usage was seen.
//!
//! weir sends no `mode_override`: the gateway's filter must send the response headers and body (Envoy AI Gateway's
//! InferencePool filter does: `SEND` and `FULL_DUPLEX_STREAMED`), or no usage is read.
//!
//! When the picker finds no eligible endpoint, [`FailureMode`] decides: `fail-close` answers 503, `fail-open` sends
//! the request to a random endpoint of the pool. The gateway's own `failureMode` covers weir not answering at all.

mod pick;
pub mod wire;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    ProcessingRequest, ProcessingResponse, processing_request::Request as Msg,
};
use futures::Stream;
use hyper::header::{self, HeaderMap};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

pub use self::pick::{FailureMode, GatewayRequest, Refusal, Report, Routed, route_request};
use crate::shared::AppState;
use crate::sse::{SseScanner, Usage};

/// Largest non-streaming response body read for its usage (a longer one is passed on, its usage not read).
const USAGE_READ_LIMIT: usize = 1 << 20;

/// The ext_proc service over one router's state.
#[derive(Clone)]
pub struct Picker {
    app: Arc<AppState>,
    mode: FailureMode,
    /// How long the gateway waits for each answer (its filter's `message_timeout`).
    message_timeout: Duration,
}

impl Picker {
    pub fn new(app: Arc<AppState>, mode: FailureMode, message_timeout: Duration) -> Self {
        Self {
            app,
            mode,
            message_timeout,
        }
    }

    /// The tonic service.
    pub fn service(self) -> ExternalProcessorServer<Self> {
        ExternalProcessorServer::new(self)
    }
}

type Out = Result<ProcessingResponse, Status>;

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream = Pin<Box<dyn Stream<Item = Out> + Send>>;

    async fn process(
        &self,
        request: tonic::Request<Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, Status> {
        let (tx, rx) = mpsc::channel::<Out>(16);
        tokio::spawn(exchange(self.clone(), request.into_inner(), tx));
        let out =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

/// Serves the endpoint picker on the connections of `incoming` until `shutdown` resolves: a `TcpIncoming` for
/// plaintext h2c, or TLS connections accepted by the caller.
pub async fn serve<I, IO, IE>(
    incoming: I,
    picker: Picker,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tonic::transport::Server::builder()
        .add_service(picker.service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// How the response body's usage is read.
enum UsageRead {
    None,
    Sse(SseScanner),
    Json(BytesMut),
}

/// How long after the request headers weir may still dispatch the request: the gateway's message timeout less a
/// tenth of it (at most 1 s) of headroom for the pick and the answer to reach the gateway. A request still queued in
/// admission then is refused by weir (429 `queue_timeout`) before the gateway gives up on the exchange.
pub fn dispatch_budget(message_timeout: Duration) -> Duration {
    message_timeout - (message_timeout / 10).min(Duration::from_secs(1))
}

/// One request's state across its ext_proc messages.
struct State {
    app: Arc<AppState>,
    mode: FailureMode,
    message_timeout: Duration,
    /// The dispatch deadline ([`dispatch_budget`] after the request headers).
    deadline: Option<std::time::Instant>,
    head: Option<wire::Head>,
    subset: Option<Vec<String>>,
    body: BytesMut,
    held: Option<pick::Held>,
    status: Option<u16>,
    usage: UsageRead,
}

/// Runs one ext_proc stream to its end, then settles what the request held.
async fn exchange(
    picker: Picker,
    mut inbound: Streaming<ProcessingRequest>,
    tx: mpsc::Sender<Out>,
) {
    let mut st = State {
        app: picker.app,
        mode: picker.mode,
        message_timeout: picker.message_timeout,
        deadline: None,
        head: None,
        subset: None,
        body: BytesMut::new(),
        held: None,
        status: None,
        usage: UsageRead::None,
    };
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "ext_proc stream ended");
                break;
            }
        };
        let (out, done) = tokio::select! {
            r = st.on(msg) => r,
            // The gateway went away (e.g. while the request waited in admission): dropping `on` frees its place.
            _ = tx.closed() => break,
        };
        for r in out {
            if tx.send(Ok(r)).await.is_err() {
                break;
            }
        }
        if done {
            break;
        }
    }
    // Settled already when the response ended; otherwise the exchange ended first.
    st.settle(false);
}

impl State {
    /// The answers to one message, and whether the exchange is over (an immediate response was sent).
    async fn on(&mut self, msg: ProcessingRequest) -> (Vec<ProcessingResponse>, bool) {
        match msg.request {
            Some(Msg::RequestHeaders(h)) => {
                let now = tokio::time::Instant::now().into_std();
                self.deadline = Some(now + dispatch_budget(self.message_timeout));
                self.subset = wire::subset(msg.metadata_context.as_ref());
                self.head = Some(wire::head(&h));
                if h.end_of_stream {
                    return self.bodiless().await;
                }
                (Vec::new(), false)
            }
            Some(Msg::RequestBody(b)) => {
                self.body.extend_from_slice(&b.body);
                let limit = self.app.proxy.max_body_bytes;
                if self.body.len() > limit {
                    let r = Refusal {
                        error: crate::error::too_large(limit),
                        request_id: crate::ids::request_id(
                            &self.head.take().unwrap_or_default().headers,
                        ),
                        rate: None,
                    };
                    return (vec![refused(&r).await], true);
                }
                if !b.end_of_stream {
                    return (Vec::new(), false);
                }
                self.routed().await
            }
            Some(Msg::RequestTrailers(_)) => (vec![wire::pass_trailers(true)], false),
            Some(Msg::ResponseHeaders(h)) => {
                let status = wire::status(&h).unwrap_or(200);
                self.status = Some(status);
                self.usage = if wire::is_event_stream(&h) {
                    UsageRead::Sse(SseScanner::new(false))
                } else {
                    UsageRead::Json(BytesMut::new())
                };
                if let Some(held) = &mut self.held {
                    held.answered(status, wire::retry_after(&h).as_ref());
                }
                if h.end_of_stream {
                    self.settle(true);
                }
                (vec![wire::pass_response_headers()], false)
            }
            Some(Msg::ResponseBody(b)) => {
                let over = matches!(&self.usage, UsageRead::Json(buf) if buf.len() + b.body.len() > USAGE_READ_LIMIT);
                if over {
                    self.usage = UsageRead::None;
                }
                match &mut self.usage {
                    UsageRead::Sse(s) => {
                        let _ = s.push(&b.body);
                    }
                    UsageRead::Json(buf) => buf.extend_from_slice(&b.body),
                    UsageRead::None => {}
                }
                if b.end_of_stream {
                    self.settle(true);
                }
                (wire::body(&b.body, b.end_of_stream, false), false)
            }
            Some(Msg::ResponseTrailers(_)) => (vec![wire::pass_trailers(false)], false),
            None => (Vec::new(), false),
        }
    }

    /// A request without a body (`GET /v1/models` and the like) goes to an endpoint of the first pool that has one,
    /// as upstream's picker sends it to a random pod; nothing to admit or schedule.
    async fn bodiless(&mut self) -> (Vec<ProcessingResponse>, bool) {
        let snap = self.app.snapshot.load_full();
        let subset = self.subset.as_deref();
        match snap.pools.iter().find_map(|p| pick::fallback(p, subset)) {
            Some(dest) => (vec![wire::routed(&dest, &[], &[])], false),
            None => {
                let error = policies::errors::ApiError::new(
                    503,
                    "server_error",
                    "No model server is available.",
                )
                .with_code("service_unavailable");
                let head = self.head.take().unwrap_or_default();
                let request_id = crate::ids::request_id(&head.headers);
                let r = Refusal {
                    error,
                    request_id,
                    rate: None,
                };
                (vec![refused(&r).await], true)
            }
        }
    }

    /// The body is complete: route it; the header and body answers, or the refusal.
    async fn routed(&mut self) -> (Vec<ProcessingResponse>, bool) {
        let head = self.head.take().unwrap_or_default();
        let req = GatewayRequest {
            path: head.path,
            headers: head.headers,
            body: std::mem::take(&mut self.body).freeze(),
            subset: self.subset.take(),
            deadline: self.deadline,
        };
        match route_request(&self.app, self.mode, req).await {
            Err(refusal) => (vec![refused(&refusal).await], true),
            Ok(r) => {
                let dest = r.destinations.join(",");
                let length = r.body.len().to_string();
                let mut set: Vec<(&str, &[u8])> = vec![
                    ("content-length", length.as_bytes()),
                    ("x-request-id", r.request_id.as_bytes()),
                ];
                // The client's credentials stay at the gateway, as at weir's own front door.
                let mut remove = vec!["x-api-key", "cookie"];
                match &r.upstream_auth {
                    Some(a) => set.push(("authorization", a.as_bytes())),
                    None => remove.push("authorization"),
                }
                let mut out = vec![wire::routed(&dest, &set, &remove)];
                out.extend(wire::body(&r.body, true, true));
                self.held = Some(r.held);
                (out, false)
            }
        }
    }

    /// The account phase, once: at the response's end of stream (`complete`), or when the exchange ended first.
    fn settle(&mut self, complete: bool) {
        let Some(held) = self.held.take() else {
            return;
        };
        let usage: Option<Usage> = match &self.usage {
            UsageRead::Sse(s) => s.usage,
            UsageRead::Json(b) => crate::execute::usage_of(b),
            UsageRead::None => None,
        };
        let streaming = matches!(self.usage, UsageRead::Sse(_))
            && self.status.is_some_and(|s| (200..300).contains(&s));
        held.finish(Report {
            status: self.status,
            usage,
            streaming,
            complete,
        });
    }
}

/// The refusal as an immediate response: weir's one error rendering ([`crate::error::respond`]) with the tenant's
/// `x-ratelimit-*` headers, as the proxy path answers it.
async fn refused(r: &Refusal) -> ProcessingResponse {
    let mut resp = crate::error::respond(&r.error, &r.request_id);
    crate::gate::rate_headers(resp.headers_mut(), r.rate.as_ref());
    let (parts, body) = resp.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let mut headers = HeaderMap::new();
    for (k, v) in &parts.headers {
        if k != header::CONTENT_LENGTH {
            headers.append(k.clone(), v.clone());
        }
    }
    wire::immediate(parts.status.as_u16(), &headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dispatch_budget_leaves_headroom_before_the_gateway_gives_up() {
        let s = Duration::from_secs;
        assert_eq!(dispatch_budget(s(300)), s(299));
        assert_eq!(dispatch_budget(s(5)), Duration::from_millis(4500));
        // Envoy's default message timeout.
        assert_eq!(
            dispatch_budget(Duration::from_millis(200)),
            Duration::from_millis(180)
        );
        assert_eq!(dispatch_budget(Duration::ZERO), Duration::ZERO);
    }
}
