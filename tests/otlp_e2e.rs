//! OTLP trace export end to end: a fake OTLP/gRPC collector (tonic's server with the generated
//! `opentelemetry.proto.collector.trace.v1.TraceService`) runs in this test; `weir serve` is started with the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_SERVICE_NAME` pointing at it, in front of a `weir sim`. Between the router and
//! the sim sits a recording pass-through ("tap") that keeps the `traceparent` each completion request carried, so the
//! test sees what the model server received.
//!
//! The batch processor's delay is set to a minute, so spans can only reach the collector through the flush on
//! SIGTERM. The sample ratio is 0: parent-based sampling must still export the trace of a caller that sampled it, and
//! nothing else.

#![allow(clippy::unwrap_used)] // the collector and tap below: a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::{MODEL, Weir, client, eventually};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use parking_lot::Mutex;
use serde_json::json;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const UNSAMPLED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// The fake collector: keeps every export request.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Binds 127.0.0.1:0 and serves until the test ends; the collector's `http://` URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    /// Every exported span with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut out = Vec::new();
        for req in self.0.lock().iter() {
            for rs in &req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| str_attr(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push((service.clone(), s.clone()));
                    }
                }
            }
        }
        out
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Any> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn str_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        Any::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key)? {
        Any::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A pass-through in front of the sim that records the `traceparent` of each completion request.
#[derive(Clone)]
struct Tap {
    upstream: String,
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

async fn tap(
    State(t): State<Tap>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    if path.starts_with("/v1/") && method == Method::POST {
        let tp = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        t.seen.lock().push(tp);
    }
    let mut req = client().request(method, format!("{}{path}", t.upstream));
    if let Some(ct) = headers.get("content-type") {
        req = req.header("content-type", ct.clone());
    }
    let resp = req.body(body).send().await.unwrap();
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let bytes = resp.bytes().await.unwrap_or_default();
    (status, [("content-type", ct)], bytes).into_response()
}

async fn start_tap(upstream: &str) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let state = Tap {
        upstream: upstream.to_string(),
        seen: seen.clone(),
    };
    let app = axum::Router::new().fallback(tap).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn request_spans_reach_the_collector_linked_to_caller_and_backend() {
    let collector = Collector::default();
    let otlp = collector.start().await;
    let sim = Weir::sim(&[]).await;
    let (tap_url, seen) = start_tap(sim.url()).await;
    let backend = format!("{MODEL}={tap_url}");
    let mut serve = Weir::start_env(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &backend,
            "--otlp-sample-ratio",
            "0",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
            ("OTEL_SERVICE_NAME", "weir-e2e"),
            ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
        ],
    )
    .ready()
    .await;
    let chat = format!("{}/v1/chat/completions", serve.url());

    // 1. A sampled caller, streaming: exported.
    let resp = client()
        .post(&chat)
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .json(
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 4, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let endpoint = resp.headers()["x-weir-endpoint"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.text().await.unwrap();
    assert!(body.contains("[DONE]"), "{body}");

    // 2. No caller trace, and ratio 0: a new trace, not sampled, not exported.
    let resp = client()
        .post(&chat)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();

    // 3. A caller that did not sample: followed, not exported.
    let resp = client()
        .post(&chat)
        .header("traceparent", format!("00-{UNSAMPLED_TRACE}-{PARENT}-00"))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Hey"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();

    // Nothing is exported before the flush on SIGTERM (the batch delay is a minute).
    assert!(collector.spans().is_empty());
    serve.terminate();
    let status = serve.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "weir serve exited with {status}");
    eventually(
        Duration::from_secs(5),
        "spans at the collector",
        async || !collector.spans().is_empty(),
    )
    .await;

    let spans = collector.spans();
    for (service, s) in &spans {
        assert_eq!(service, "weir-e2e");
        assert_eq!(hex(&s.trace_id), TRACE, "only the sampled trace: {s:?}");
    }
    let named = |name: &str| -> Vec<&Span> {
        spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.name == name)
            .collect()
    };
    let server = named("POST /v1/chat/completions");
    assert_eq!(server.len(), 1, "{spans:?}");
    let server = server[0];
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(hex(&server.parent_span_id), PARENT);
    let a = &server.attributes;
    assert_eq!(str_attr(a, "gen_ai.request.model").as_deref(), Some(MODEL));
    assert_eq!(int_attr(a, "http.response.status_code"), Some(200), "{a:?}");
    assert_eq!(attr(a, "weir.stream"), Some(&Any::BoolValue(true)));
    assert_eq!(
        str_attr(a, "weir.endpoint").as_deref(),
        Some(endpoint.as_str())
    );
    assert!(str_attr(a, "weir.request_id").is_some_and(|r| !r.is_empty()));
    match attr(a, "weir.ttft_ms") {
        Some(Any::DoubleValue(ms)) => assert!(*ms > 0.0, "ttft {ms}"),
        other => panic!("weir.ttft_ms: {other:?}"),
    }
    // The server span lasts until the stream ended, so it covers its children.
    let pick = named("pick");
    assert_eq!(pick.len(), 1, "{spans:?}");
    assert_eq!(pick[0].parent_span_id, server.span_id);
    assert_eq!(
        str_attr(&pick[0].attributes, "weir.endpoint").as_deref(),
        Some(endpoint.as_str())
    );
    let upstream = named("upstream");
    assert_eq!(upstream.len(), 1, "{spans:?}");
    let upstream = upstream[0];
    assert_eq!(upstream.kind, SpanKind::Client as i32);
    assert_eq!(upstream.parent_span_id, server.span_id);
    assert_eq!(
        int_attr(&upstream.attributes, "http.response.status_code"),
        Some(200)
    );
    assert_eq!(int_attr(&upstream.attributes, "attempt"), Some(0));
    assert_eq!(
        str_attr(&upstream.attributes, "weir.stream_outcome").as_deref(),
        Some("Complete")
    );
    assert!(server.start_time_unix_nano <= upstream.start_time_unix_nano);
    assert!(
        upstream.end_time_unix_nano <= server.end_time_unix_nano,
        "{server:?} {upstream:?}"
    );

    // What the model server received: the sampled trace with the upstream attempt span as parent, and for the other
    // two requests an unsampled traceparent (a fresh trace id for the second, the caller's for the third).
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        seen[0].as_deref(),
        Some(format!("00-{TRACE}-{}-01", hex(&upstream.span_id)).as_str())
    );
    let second: Vec<&str> = seen[1].as_deref().unwrap().split('-').collect();
    assert_eq!(
        (second.len(), second[1].len(), second[3]),
        (4, 32, "00"),
        "{seen:?}"
    );
    assert_ne!(second[1], TRACE);
    let third: Vec<&str> = seen[2].as_deref().unwrap().split('-').collect();
    assert_eq!((third[1], third[3]), (UNSAMPLED_TRACE, "00"), "{seen:?}");
    assert_ne!(third[2], PARENT);
}

/// A disaggregated request: the prefill leg is its own `prefill` span beside the decode leg's `upstream` span, and
/// each pod's `traceparent` names its leg's span. Prefill and decode pods are separate `weir sim` processes behind
/// taps (the KV handshake between them goes direct); the trace reaches the collector through the default batch delay
/// this time (no SIGTERM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_legs_are_spans_and_each_pod_gets_its_legs_traceparent() {
    let collector = Collector::default();
    let otlp = collector.start().await;
    let prefill = Weir::sim_at("10", &["--jitter", "0", "--role", "prefill"]).await;
    let decode = Weir::sim_at("10", &["--jitter", "0", "--role", "decode"]).await;
    let (p_url, p_seen) = start_tap(prefill.url()).await;
    let (d_url, d_seen) = start_tap(decode.url()).await;
    let backend = format!("{MODEL}={p_url},{d_url}");
    let (rp, rd) = (format!("{p_url}=prefill"), format!("{d_url}=decode"));
    let serve = Weir::start_env(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &backend,
            "--policy",
            "cache-aware",
            "--role",
            &rp,
            "--role",
            &rd,
        ],
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .ready()
    .await;
    let prompt =
        "Summarise the history of distributed inference systems in great detail. ".repeat(450);
    let resp = client()
        .post(format!("{}/v1/completions", serve.url()))
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 16, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 16, "{body}");

    let names = ["POST /v1/completions", "pick", "prefill", "upstream"];
    eventually(
        Duration::from_secs(20),
        "the P/D trace at the collector",
        async || {
            let spans = collector.spans();
            names
                .iter()
                .all(|n| spans.iter().any(|(_, s)| s.name == *n))
        },
    )
    .await;
    let spans: Vec<Span> = collector
        .spans()
        .into_iter()
        .map(|(svc, s)| {
            assert_eq!(svc, "weir", "default service name");
            s
        })
        .collect();
    let one = |name: &str| -> &Span {
        let v: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(v.len(), 1, "{name}: {spans:?}");
        v[0]
    };
    let (server, pick, pre, up) = (one(names[0]), one(names[1]), one(names[2]), one(names[3]));
    let (p_id, d_id) = (
        p_url.trim_start_matches("http://"),
        d_url.trim_start_matches("http://"),
    );
    assert_eq!(hex(&server.parent_span_id), PARENT);
    for child in [pick, pre, up] {
        assert_eq!(hex(&child.trace_id), TRACE);
        assert_eq!(child.parent_span_id, server.span_id, "{child:?}");
    }
    assert_eq!(
        str_attr(&pick.attributes, "weir.prefill_endpoint").as_deref(),
        Some(p_id)
    );
    assert_eq!(
        str_attr(&pick.attributes, "weir.endpoint").as_deref(),
        Some(d_id)
    );
    assert_eq!(
        str_attr(&pre.attributes, "weir.endpoint").as_deref(),
        Some(p_id)
    );
    assert_eq!(pre.kind, SpanKind::Client as i32);
    assert_eq!(
        str_attr(&up.attributes, "weir.endpoint").as_deref(),
        Some(d_id)
    );
    assert_eq!(
        str_attr(&server.attributes, "weir.decision_id"),
        str_attr(&server.attributes, "weir.request_id")
    );
    assert!(
        pre.end_time_unix_nano <= up.start_time_unix_nano,
        "decode after prefill"
    );

    let p_seen = p_seen.lock().clone();
    let d_seen = d_seen.lock().clone();
    assert_eq!(
        p_seen,
        vec![Some(format!("00-{TRACE}-{}-01", hex(&pre.span_id)))]
    );
    assert_eq!(
        d_seen,
        vec![Some(format!("00-{TRACE}-{}-01", hex(&up.span_id)))]
    );
}
