//! The HTTP side of the load generator: a pooled HTTP/1.1 client, the OpenAI request body for a [`RequestSpec`], and
//! one timed request that reads the SSE stream as it arrives. Nothing here is weir-specific: any OpenAI-compatible
//! server or router (vLLM, vllm-router, sglang-router, weir) is measured the same way.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::report::RequestRecord;
use super::sse::{self, Payload, SseParser};
use super::workload::RequestSpec;

/// Which OpenAI endpoint to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    Chat,
    Completions,
}

/// Everything constant across requests.
#[derive(Debug, Clone)]
pub struct Target {
    /// Full URL of the endpoint (`<base>/v1/chat/completions` or `<base>/v1/completions`).
    pub uri: Uri,
    /// Model name sent in every body.
    pub model: String,
    pub api: Api,
    /// Ask for an SSE stream (with `stream_options.include_usage`).
    pub stream: bool,
    /// Send `ignore_eos: true` so outputs are exactly `max_tokens` long (vLLM extension).
    pub ignore_eos: bool,
    /// Extra headers (e.g. `Authorization`), sent as is.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Per-request limit, connect to end of body.
    pub timeout: Duration,
}

/// The pooled client type.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The client of the measured requests: the router's own lean HTTP/1.1 client ([`router::upstream`]), pooled, as
/// many connections as requests in flight. On a shared machine the load generator's CPU per request competes with
/// the server under test; this one costs about half of hyper's pooled client per tiny request.
pub type LoadClient = router::upstream::Upstream;

/// See [`LoadClient`].
pub fn load_client(connect_timeout: Duration) -> LoadClient {
    router::upstream::Upstream::new(connect_timeout)
}

/// A pooled HTTP/1 client that opens as many connections as there are requests in flight (metrics scrapes, model
/// discovery).
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(conn)
}

/// A chat message of the request body.
#[derive(serde::Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

/// `stream_options` of a streaming request body.
#[derive(serde::Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// The request body, serialized straight from borrowed fields (the load generator's own CPU per request competes
/// with the server under test on a shared machine, so it is kept small).
#[derive(serde::Serialize)]
struct BodyOut<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<Message<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<std::borrow::Cow<'a, str>>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ignore_eos: bool,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

/// The JSON body for one request.
pub fn body(t: &Target, spec: &RequestSpec) -> Vec<u8> {
    let (messages, prompt) = match t.api {
        Api::Chat => {
            let mut msgs = Vec::with_capacity(2);
            if let Some(sys) = &spec.system {
                msgs.push(Message {
                    role: "system",
                    content: sys,
                });
            }
            msgs.push(Message {
                role: "user",
                content: &spec.user,
            });
            (Some(msgs), None)
        }
        Api::Completions => {
            let prompt = match &spec.system {
                Some(sys) => std::borrow::Cow::Owned(format!("{sys}{}", spec.user)),
                None => std::borrow::Cow::Borrowed(spec.user.as_str()),
            };
            (None, Some(prompt))
        }
    };
    let b = BodyOut {
        model: &t.model,
        messages,
        prompt,
        max_tokens: spec.max_tokens,
        ignore_eos: t.ignore_eos,
        stream: t.stream,
        stream_options: t.stream.then_some(StreamOptions {
            include_usage: true,
        }),
    };
    serde_json::to_vec(&b).unwrap_or_default()
}

/// What the load generator reads from a non-streaming response.
#[derive(serde::Deserialize)]
struct Answer {
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    usage: Option<sse::Usage>,
}

/// Send one request and measure it; `start` is its offset from the start of the run. Never fails: errors are
/// recorded by kind.
/// `prompt_tokens` is the workload's count, used when the server reports no usage.
pub async fn send(
    client: &LoadClient,
    t: &Target,
    body: Vec<u8>,
    start: f64,
    prompt_tokens: Option<u32>,
) -> RequestRecord {
    let sent = Instant::now();
    let mut rec = RequestRecord {
        start,
        ..Default::default()
    };
    let outcome = tokio::time::timeout(t.timeout, exchange(client, t, body, sent, &mut rec)).await;
    rec.e2e = sent.elapsed().as_secs_f64();
    if rec.prompt_tokens == 0 {
        rec.prompt_tokens = prompt_tokens.map_or(0, u64::from);
    }
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(kind)) => rec.error = Some(kind),
        Err(_) => rec.error = Some("timeout".into()),
    }
    rec
}

async fn exchange(
    client: &LoadClient,
    t: &Target,
    body: Vec<u8>,
    sent: Instant,
    rec: &mut RequestRecord,
) -> Result<(), String> {
    // Plain HTTP/1.1 only (no TLS), like every server this measures on loopback or in-cluster.
    let authority = match (t.uri.scheme_str(), t.uri.authority()) {
        (Some("http") | None, Some(a)) => a.as_str(),
        _ => return Err("unsupported_url".into()),
    };
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(t.uri.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(body))
        .map_err(|_| "bad_request".to_string())?;
    for (k, v) in &t.headers {
        req.headers_mut().append(k.clone(), v.clone());
    }
    let resp = client.send(authority, req).await.map_err(|e| {
        if e.is_connect() {
            "connect".to_string()
        } else {
            "transport".to_string()
        }
    })?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        // Drain so the connection can be reused; the status is the error.
        while let Some(f) = body.frame().await {
            if f.is_err() {
                break;
            }
        }
        return Err(format!("http_{}", status.as_u16()));
    }
    if !t.stream {
        let bytes = body
            .collect()
            .await
            .map_err(|_| "transport".to_string())?
            .to_bytes();
        let at = sent.elapsed().as_secs_f64();
        let a: Answer = serde_json::from_slice(&bytes).map_err(|_| "bad_response".to_string())?;
        if let Some(e) = &a.error {
            tracing::debug!(error = %sse::error_message(e), "error body with 2xx status");
            return Err("response_error".into());
        }
        let usage = a.usage;
        rec.ttft = Some(at);
        rec.output_tokens = usage.map_or(0, |u| u.completion_tokens);
        rec.prompt_tokens = usage.map_or(0, |u| u.prompt_tokens);
        return Ok(());
    }
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut last_content: Option<f64> = None;
    let mut chunks = 0u64;
    let mut usage = None;
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| "transport".to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = sent.elapsed().as_secs_f64();
        parser.push(&data, &mut events);
        for ev in events.drain(..) {
            match sse::classify(&ev) {
                Payload::Done => done = true,
                Payload::Chunk { content, usage: u } => {
                    if content {
                        chunks += 1;
                        match last_content {
                            None => rec.ttft = Some(now),
                            Some(prev) => rec.itl.push(now - prev),
                        }
                        last_content = Some(now);
                    }
                    if u.is_some() {
                        usage = u;
                    }
                }
                Payload::Error(msg) => {
                    tracing::debug!(error = %msg, "error event in stream");
                    return Err("stream_error".into());
                }
                Payload::Malformed => return Err("bad_response".into()),
            }
        }
    }
    if !done {
        tracing::debug!(pending = parser.pending(), "stream ended without [DONE]");
        return Err("incomplete".into());
    }
    rec.output_tokens = usage.map_or(chunks, |u| u.completion_tokens);
    rec.prompt_tokens = usage.map_or(0, |u| u.prompt_tokens);
    Ok(())
}
