//! Handler tests: `app(state).oneshot(..)` against in-process fake vLLM backends bound on loopback port 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, StatusCode};
use parking_lot::Mutex;
use tower::ServiceExt;

use crate::app::app;
use crate::config::RawConfig;
use crate::discovery::Discovery;
use crate::shared::AppState;

pub(crate) const OK: u8 = 0;
pub(crate) const FAIL_503: u8 = 1;
const HANG: u8 = 2;
const BREAK: u8 = 3;
pub(crate) const SLOW: u8 = 4;

/// A fake vLLM server whose behaviour can be switched at run time.
pub(crate) struct Fake {
    pub(crate) mode: AtomicU8,
    /// Completion requests received.
    pub(crate) hits: AtomicUsize,
    /// Bodies and traceparent headers received.
    pub(crate) seen: Mutex<Vec<(serde_json::Value, Option<String>)>>,
    /// Slow streams whose body was dropped before finishing (client cancellation reached the backend).
    pub(crate) cancelled: AtomicUsize,
    /// `vllm:num_requests_waiting` its `/metrics` reports.
    pub(crate) waiting: AtomicU8,
}

struct CancelProbe(Arc<Fake>, bool);
impl CancelProbe {
    /// The stream finished (or failed) on its own: not a cancellation.
    fn disarm(mut self) {
        self.1 = true;
    }
}
impl Drop for CancelProbe {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn chunk(text: &str, finish: Option<&str>) -> String {
    let c = serde_json::json!({"id":"cmpl-1","object":"text_completion","created":1,"model":"m",
        "choices":[{"index":0,"text":text,"logprobs":null,"finish_reason":finish}]});
    format!("data: {c}\n\n")
}

async fn completion(State(f): State<Arc<Fake>>, req: Request<Body>) -> Response {
    f.hits.fetch_add(1, Ordering::SeqCst);
    let tp = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    f.seen.lock().push((v.clone(), tp));
    let stream = v["stream"].as_bool().unwrap_or(false);
    let usage_wanted = v["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    match f.mode.load(Ordering::SeqCst) {
        FAIL_503 => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "application/json")],
            r#"{"error":{"message":"engine sleeping","type":"ServiceUnavailableError","param":null,"code":503}}"#,
        )
            .into_response(),
        HANG => {
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        mode if stream => {
            let n = if mode == SLOW { 10_000 } else { 3 };
            // Pauses let the response head reach the router before the body breaks, as with a real engine.
            let delay = if mode == SLOW || mode == BREAK { Duration::from_millis(20) } else { Duration::ZERO };
            let probe = CancelProbe(f.clone(), false);
            let s = futures::stream::unfold((0usize, probe), move |(i, mut probe)| async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if mode == BREAK && i == 2 {
                    probe.1 = true;
                    return Some((Err(std::io::Error::other("engine died")), (i + 1, probe)));
                }
                let ev = match i {
                    _ if i < n => chunk("tok", (i + 1 == n).then_some("length")),
                    _ if i == n && usage_wanted => "data: {\"id\":\"cmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":3,\"total_tokens\":7}}\n\n".to_string(),
                    _ if i <= n + 1 => "data: [DONE]\n\n".to_string(),
                    _ => {
                        probe.disarm();
                        return None;
                    }
                };
                let next = if i == n && !usage_wanted { i + 2 } else { i + 1 };
                Some((Ok::<_, std::io::Error>(Bytes::from(ev)), (next, probe)))
            });
            ([("content-type", "text/event-stream")], Body::from_stream(s)).into_response()
        }
        _ => axum::Json(serde_json::json!({"id":"cmpl-1","object":"text_completion","model":v["model"],
            "choices":[{"index":0,"text":"hi","finish_reason":"length"}],
            "usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}))
        .into_response(),
    }
}

async fn metrics(State(f): State<Arc<Fake>>) -> String {
    let waiting = f.waiting.load(Ordering::SeqCst);
    format!(
        "vllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} 1\nvllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} {waiting}\nvllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"m\"}} 0.5\nweir_gpu_info{{gpu=\"A100-80\"}} 1\n"
    )
}

pub(crate) async fn fake(mode: u8) -> (Arc<Fake>, String) {
    let f = Arc::new(Fake {
        mode: AtomicU8::new(mode),
        hits: AtomicUsize::new(0),
        seen: Mutex::new(vec![]),
        cancelled: AtomicUsize::new(0),
        waiting: AtomicU8::new(1),
    });
    let r = axum::Router::new()
        .route("/v1/completions", axum::routing::post(completion))
        .route("/v1/chat/completions", axum::routing::post(completion))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(f.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, r).await.ok() });
    (f, url)
}

async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

pub(crate) fn state(yaml: &str) -> Arc<AppState> {
    let cfg = RawConfig::from_yaml(yaml).unwrap().validate().unwrap();
    let mut d = Discovery::new();
    d.add_static(&cfg);
    crate::start(&cfg, d, Default::default(), 1_700_000_000, 7).unwrap()
}

pub(crate) fn post(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

pub(crate) async fn send(
    s: &Arc<AppState>,
    req: Request<Body>,
) -> (StatusCode, hyper::HeaderMap, String) {
    let r = app(s.clone()).oneshot(req).await.unwrap();
    let (p, b) = r.into_parts();
    let bytes = b.collect().await.unwrap().to_bytes();
    (
        p.status,
        p.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

pub(crate) fn err_code(body: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["error"]["code"].clone()
}

pub(crate) const PROMPT: &str = r#"{"model":"m","prompt":"hello","max_tokens":3}"#;
pub(crate) const STREAM: &str = r#"{"model":"m","prompt":"hello","max_tokens":3,"stream":true}"#;

#[tokio::test]
async fn non_streaming_passes_through_with_request_id_and_traceparent() {
    let (f, url) = fake(OK).await;
    let s = state(&format!("pools: [{{name: m, endpoints: ['{url}']}}]"));
    let req = Request::post("/v1/completions")
        .header("x-request-id", "abc-1")
        .header("accept-encoding", "gzip")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Body::from(PROMPT))
        .unwrap();
    let (st, h, body) = send(&s, req).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(h["x-request-id"], "abc-1");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["total_tokens"], 5);
    let seen = f.seen.lock();
    assert_eq!(
        seen[0].0,
        serde_json::from_str::<serde_json::Value>(PROMPT).unwrap()
    );
    assert!(
        seen[0]
            .1
            .as_deref()
            .unwrap()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    );
}

#[tokio::test]
async fn streaming_without_usage_gets_it_injected_upstream_and_stripped() {
    let (f, url) = fake(OK).await;
    let s = state(&format!("pools: [{{name: m, endpoints: ['{url}']}}]"));
    let (st, h, body) = send(&s, post("/v1/completions", STREAM)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-type"], "text/event-stream");
    assert!(!body.contains("usage"), "{body}");
    assert_eq!(body.matches("data: ").count(), 4, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"));
    assert_eq!(f.seen.lock()[0].0["stream_options"]["include_usage"], true);
    let (_, _, metrics) = send(&s, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert!(
        metrics.contains("weir_tokens_total{model=\"m\",kind=\"Completion\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn streaming_with_usage_keeps_the_usage_chunk() {
    let (_f, url) = fake(OK).await;
    let s = state(&format!("pools: [{{name: m, endpoints: ['{url}']}}]"));
    let body =
        r#"{"model":"m","prompt":"x","stream":true,"stream_options":{"include_usage":true}}"#;
    let (_, _, out) = send(&s, post("/v1/completions", body)).await;
    assert!(out.contains("\"completion_tokens\":3"), "{out}");
}

#[tokio::test]
async fn client_errors_are_openai_shaped_with_request_ids() {
    let (f, url) = fake(OK).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\nmax_body_bytes: 200"
    ));
    let cases = [
        ("{bad", StatusCode::BAD_REQUEST, "invalid_json"),
        (
            r#"{"prompt":"x"}"#,
            StatusCode::BAD_REQUEST,
            "missing_required_parameter",
        ),
        (
            r#"{"model":"nope","prompt":"x"}"#,
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            r#"{"model":"m","prompt":"x","suffix":"s"}"#,
            StatusCode::BAD_REQUEST,
            "unsupported_parameter",
        ),
    ];
    for (body, status, code) in cases {
        let (st, h, out) = send(&s, post("/v1/completions", body)).await;
        assert_eq!(st, status, "{body}: {out}");
        assert_eq!(err_code(&out), code, "{body}");
        assert!(h.contains_key("x-request-id"));
    }
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(500));
    let (st, _, out) = send(&s, post("/v1/completions", &big)).await;
    assert_eq!(
        (st, err_code(&out)),
        (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large".into())
    );
    let chunked =
        Request::post("/v1/completions").body(Body::from_stream(futures::stream::iter(vec![
            Ok::<_, std::io::Error>(Bytes::from(big.clone())),
        ])));
    let (st, _, _) = send(&s, chunked.unwrap()).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    let bad_utf8 = Request::post("/v1/completions").body(Body::from(
        b"{\"model\":\"m\xff\",\"prompt\":\"x\"}".to_vec(),
    ));
    let (st, _, out) = send(&s, bad_utf8.unwrap()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{out}");
    assert_eq!(f.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn retries_a_failing_endpoint_on_another() {
    let (bad, bad_url) = fake(FAIL_503).await;
    let (good, good_url) = fake(OK).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{bad_url}', '{good_url}']}}]"
    ));
    for _ in 0..4 {
        let (st, _, body) = send(&s, post("/v1/completions", PROMPT)).await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    assert_eq!(good.hits.load(Ordering::SeqCst), 4);
    assert!(bad.hits.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn all_endpoints_down_is_503_with_retry_after() {
    let a = dead_url().await;
    let b = dead_url().await;
    let s = state(&format!("pools: [{{name: m, endpoints: ['{a}', '{b}']}}]"));
    let (st, h, out) = send(&s, post("/v1/completions", PROMPT)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{out}");
    assert_eq!(err_code(&out), "service_unavailable");
    assert!(h.contains_key("retry-after"));
}

#[tokio::test]
async fn hung_backend_is_504() {
    let (_f, url) = fake(HANG).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\ntimeouts: {{first_byte: 200ms}}"
    ));
    let (st, _, out) = send(&s, post("/v1/completions", PROMPT)).await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT, "{out}");
    assert_eq!(err_code(&out), "gateway_timeout");
}

#[tokio::test]
async fn backend_dying_mid_stream_ends_with_error_event_and_done() {
    let (_f, url) = fake(BREAK).await;
    let s = state(&format!("pools: [{{name: m, endpoints: ['{url}']}}]"));
    let (st, _, out) = send(&s, post("/v1/completions", STREAM)).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(out.matches("\"text\":\"tok\"").count(), 2, "{out}");
    assert!(out.contains("data: {\"error\""), "{out}");
    assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
}

#[tokio::test]
async fn breaker_opens_then_closes_after_a_good_probe() {
    let (f, url) = fake(FAIL_503).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\nbreaker: {{failure_threshold: 2, base_ejection: 300ms}}\nretry: {{max_attempts: 1}}"
    ));
    for _ in 0..2 {
        let (st, _, _) = send(&s, post("/v1/completions", PROMPT)).await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(f.hits.load(Ordering::SeqCst), 2);
    let (st, h, out) = send(&s, post("/v1/completions", PROMPT)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(out.contains("No model server is available"), "{out}");
    assert!(h.contains_key("retry-after"));
    assert_eq!(
        f.hits.load(Ordering::SeqCst),
        2,
        "an open breaker must not send traffic"
    );
    f.mode.store(OK, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (st, _, _) = send(&s, post("/v1/completions", PROMPT)).await;
        if st == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "breaker never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        assert_eq!(
            send(&s, post("/v1/completions", PROMPT)).await.0,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let (f, url) = fake(SLOW).await;
    let s = state(&format!("pools: [{{name: m, endpoints: ['{url}']}}]"));
    let r = app(s.clone())
        .oneshot(post("/v1/completions", STREAM))
        .await
        .unwrap();
    let mut body = r.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while f.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never saw the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.active_requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn weighted_split_and_aliases_follow_config() {
    let (a, a_url) = fake(OK).await;
    let (b, b_url) = fake(OK).await;
    let s = state(&format!(
        "pools: [{{name: pa, model: m, endpoints: ['{a_url}']}}, {{name: pb, model: m2, endpoints: ['{b_url}']}}]\n\
         models: [{{name: llama, aliases: [l3], targets: [{{pool: pa, weight: 3}}, {{pool: pb, weight: 1}}]}}]"
    ));
    for i in 0..400 {
        let name = if i % 2 == 0 { "llama" } else { "l3" };
        let (st, _, _) = send(
            &s,
            post(
                "/v1/completions",
                &format!(r#"{{"model":"{name}","prompt":"x"}}"#),
            ),
        )
        .await;
        assert_eq!(st, StatusCode::OK);
    }
    let to_a = a.hits.load(Ordering::SeqCst);
    assert!((250..350).contains(&to_a), "pool a got {to_a} of 400");
    assert_eq!(to_a + b.hits.load(Ordering::SeqCst), 400);
    // The body's model is rewritten to each pool's served name.
    assert_eq!(b.seen.lock()[0].0["model"], "m2");
    let (_, _, models) = send(&s, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    let v: serde_json::Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"llama") && ids.contains(&"l3") && ids.contains(&"m"),
        "{ids:?}"
    );
    let (_, _, routes) = send(
        &s,
        Request::get("/debug/routes").body(Body::empty()).unwrap(),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(v["routes"][0]["targets"][0]["share"], 0.75);
}

#[tokio::test]
async fn scraper_fills_endpoint_state() {
    let (_f, url) = fake(OK).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\nscrape: {{interval: 20ms}}"
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, _, routes) = send(
            &s,
            Request::get("/debug/routes").body(Body::empty()).unwrap(),
        )
        .await;
        let v: serde_json::Value = serde_json::from_str(&routes).unwrap();
        let sc = &v["pools"][0]["endpoints"][0]["scraped"];
        if !sc.is_null() {
            assert_eq!(
                (
                    sc["waiting"].as_u64(),
                    sc["running"].as_u64(),
                    sc["kv_usage"].as_f64()
                ),
                (Some(1), Some(1), Some(0.5))
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never scraped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, _, m) = send(&s, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert!(m.contains("weir_endpoint_healthy{pool=\"m\""), "{m}");
}

#[tokio::test]
async fn wrong_methods_and_unknown_paths_get_openai_errors() {
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{}']}}]",
        dead_url().await
    ));
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let (st, h, out) = send(&s, Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(err_code(&out), "method_not_allowed", "{out}");
        assert_eq!(h["allow"], "POST");
        assert_eq!(h["content-type"], "application/json");
        assert!(h.contains_key("x-request-id"));
    }
    let (st, h, out) = send(&s, post("/v1/models", "{}")).await;
    assert_eq!(
        (st, err_code(&out)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed".into())
    );
    assert_eq!(h["allow"], "GET");
    let (st, h, out) = send(&s, Request::get("/v2/nothing").body(Body::empty()).unwrap()).await;
    assert_eq!(
        (st, err_code(&out)),
        (StatusCode::NOT_FOUND, "not_found".into())
    );
    assert!(h.contains_key("x-request-id"));
    let req = Request::get("/v1/models")
        .header("x-request-id", "mine")
        .body(Body::empty())
        .unwrap();
    let (st, h, _) = send(&s, req).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["x-request-id"], "mine");
}

/// `serve` answers through the same stack as `app(state).oneshot`: a wrong method over a real connection gets the
/// OpenAI body too (it got an empty 405 from axum's router before).
#[tokio::test]
async fn the_server_answers_through_the_same_stack() {
    let (_f, url) = fake(OK).await;
    let s = state(&format!("pools: [{{name: m, endpoints: ['{url}']}}]"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::app::serve(
        listener,
        s.clone(),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    let client = crate::client::http_client(Duration::from_secs(1));
    let get = hyper::Request::get(format!("http://{addr}/v1/chat/completions"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let r = client.request(get).await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        err_code(&String::from_utf8_lossy(&body)),
        "method_not_allowed"
    );
    let post = hyper::Request::post(format!("http://{addr}/v1/completions"))
        .body(http_body_util::Full::new(Bytes::from_static(
            PROMPT.as_bytes(),
        )))
        .unwrap();
    let r = client.request(post).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("x-weir-endpoint"));
    drop(r);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn debug_pods_serves_policies_samples_with_gpu_from_config_or_scrape() {
    let (_f1, a) = fake(OK).await;
    let (_f2, b) = fake(OK).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{a}', {{url: '{b}', gpu: H100, role: decode}}]}}]\nscrape: {{interval: 20ms}}"
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (st, _, body) =
            send(&s, Request::get("/debug/pods").body(Body::empty()).unwrap()).await;
        assert_eq!(st, StatusCode::OK);
        let pods: Vec<policies::pool::PodSample> = serde_json::from_str(&body).unwrap();
        assert_eq!(pods.len(), 2);
        if pods.iter().all(|p| p.scraped.is_some() && p.gpu.is_some()) {
            let by = |url: &str| pods.iter().find(|p| url.ends_with(&p.id)).unwrap();
            assert_eq!(by(&a).gpu.as_deref(), Some("A100-80"), "from weir_gpu_info");
            assert_eq!(by(&b).gpu.as_deref(), Some("H100"), "config label wins");
            assert_eq!(by(&b).role, "decode");
            assert_eq!(by(&a).pod, by(&a).id, "static endpoints keep host:port");
            let sc = by(&a).scraped.unwrap();
            assert_eq!((sc.waiting, sc.running, sc.kv_usage), (1, 1, 0.5));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never scraped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn health_turns_503_while_draining() {
    let (_f, url) = fake(OK).await;
    let s = state(&format!("pools: [{{name: m, endpoints: ['{url}']}}]"));
    assert_eq!(
        send(&s, Request::get("/health").body(Body::empty()).unwrap())
            .await
            .0,
        StatusCode::OK
    );
    s.draining.store(true, Ordering::SeqCst);
    assert_eq!(
        send(&s, Request::get("/health").body(Body::empty()).unwrap())
            .await
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn silent_stream_is_closed_with_an_error_event_after_the_idle_timeout() {
    let (f, url) = fake(SLOW).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\ntimeouts: {{idle: 5ms}}"
    ));
    let (st, _, out) = send(&s, post("/v1/completions", STREAM)).await;
    assert_eq!(st, StatusCode::OK);
    assert!(out.contains("upstream_timeout"), "{out}");
    assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while f.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent upstream stream was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn pod_failing_mid_stream_every_time_is_ejected() {
    let (bad, bad_url) = fake(BREAK).await;
    let (good, good_url) = fake(OK).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{bad_url}', '{good_url}']}}]\nbreaker: {{failure_threshold: 2, base_ejection: 60s}}"
    ));
    for _ in 0..10 {
        let (st, _, _) = send(&s, post("/v1/completions", STREAM)).await;
        assert_eq!(st, StatusCode::OK);
    }
    assert_eq!(
        bad.hits.load(Ordering::SeqCst),
        2,
        "ejected after two broken streams"
    );
    assert_eq!(good.hits.load(Ordering::SeqCst), 8);
}
