//! Handler tests through `app(state).oneshot(..)`.

use super::*;
use crate::driver::DriverOptions;
use crate::engine::{Engine, EngineConfig};
use crate::faults::FaultConfig;
use crate::metrics::MetricsConfig;
use crate::profile::Profile;
use axum::http::Request;
use tower::ServiceExt;

fn state_with(f: impl FnOnce(&mut PodConfig)) -> PodState {
    let p = Profile::resolve("h100", "llama-3.1-8b").unwrap();
    let mut cfg = EngineConfig::new(p.clone());
    cfg.jitter = 0.0;
    let metrics = Arc::new(Mutex::new(Metrics::new(MetricsConfig {
        model_name: "m".into(),
        legacy: false,
        max_model_len: 4096,
        cache_config: vec![],
        created_unix: 0.0,
        gpu: None,
    })));
    let driver = Driver::spawn(
        Engine::new(cfg),
        DriverOptions {
            time_scale: 100.0,
            metrics: Arc::clone(&metrics),
            kv: None,
            transfers: None,
        },
    );
    let mut pc = PodConfig {
        served_model_names: vec!["m".into()],
        model_root: p.model_name().into(),
        max_model_len: 4096,
        api_key: None,
        enable_prompt_tokens_details: true,
        max_body_bytes: 4096,
        role: Role::Both,
        advertise_host: "127.0.0.1".into(),
        http_port: 1,
        tp: 1,
        startup_delay: Duration::ZERO,
        min_latency: Duration::ZERO,
        seed: 1,
    };
    f(&mut pc);
    PodState::new(pc, driver, metrics, Faults::new(FaultConfig::default()))
}

async fn call(
    s: &PodState,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String, HeaderMap) {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let res = app(s.clone())
        .oneshot(b.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        String::from_utf8_lossy(&bytes).into_owned(),
        headers,
    )
}

const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":5,"ignore_eos":true}"#;

#[tokio::test]
async fn chat_non_stream_shape() {
    let s = state_with(|_| {});
    let (st, body, h) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        CHAT,
        &[("x-request-id", "abc")],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(h.get("x-request-id").unwrap(), "abc");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], "chatcmpl-abc");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert!(v["kv_transfer_params"].is_null());
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
}

use serde_json::Value;

#[tokio::test]
async fn streaming_chat_framing() {
    let s = state_with(|_| {});
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"ignore_eos":true,
        "stream":true,"stream_options":{"include_usage":true}}"#;
    let (st, text, h) = call(&s, "POST", "/v1/chat/completions", body, &[]).await;
    assert_eq!(st, 200);
    assert!(
        h.get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(events.len(), 1 + 3 + 1 + 1, "{text}");
    let parse = |e: &str| serde_json::from_str::<Value>(e.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(parse(events[0])["choices"][0]["delta"]["role"], "assistant");
    assert!(parse(events[1])["choices"][0]["finish_reason"].is_null());
    assert_eq!(parse(events[3])["choices"][0]["finish_reason"], "length");
    let usage = parse(events[4]);
    assert_eq!(usage["choices"], serde_json::json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    let ids: Vec<Value> = events[..5].iter().map(|e| parse(e)["id"].clone()).collect();
    assert!(ids.iter().all(|i| *i == ids[0]));
}

#[tokio::test]
async fn completion_with_stop_string() {
    let s = state_with(|_| {});
    // Find the text first, then stop on a word inside it.
    let base = r#"{"model":"m","prompt":"abcdefgh","max_tokens":12,"ignore_eos":true,"seed":5}"#;
    let (_, body, _) = call(&s, "POST", "/v1/completions", base, &[]).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    let stop = words[3].trim().to_string();
    let cut = text.find(&stop).unwrap();
    let req = format!(
        r#"{{"model":"m","prompt":"abcdefgh","max_tokens":12,"ignore_eos":true,"seed":5,"stop":["{stop}"]}}"#
    );
    let (st, body, _) = call(&s, "POST", "/v1/completions", &req, &[]).await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], stop.as_str());
    assert_eq!(v["choices"][0]["text"], &text[..cut]);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
}

#[tokio::test]
async fn bad_inputs_get_vllm_errors() {
    let s = state_with(|_| {});
    let cases: &[(&str, u16, &str)] = &[
        ("{not json", 400, "BadRequestError"),
        (r#"{"model":"m","messages":"x"}"#, 400, "BadRequestError"),
        (
            r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
            404,
            "NotFoundError",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
            400,
            "BadRequestError",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":5000}"#,
            400,
            "BadRequestError",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
            400,
            "BadRequestError",
        ),
    ];
    for (body, status, kind) in cases {
        let (st, text, _) = call(&s, "POST", "/v1/chat/completions", body, &[]).await;
        assert_eq!(st, *status, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], *kind);
        assert_eq!(v["error"]["code"], *status);
    }
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "a".repeat(5000));
    let (st, text, _) = call(&s, "POST", "/v1/completions", &big, &[]).await;
    assert_eq!(st, 413);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["code"],
        413
    );
    let (st, _, _) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        CHAT,
        &[("x-return-error", "429")],
    )
    .await;
    assert_eq!(st, 429);
}

#[tokio::test]
async fn api_key_guards_only_v1() {
    let s = state_with(|c| c.api_key = Some("k".into()));
    let (st, body, _) = call(&s, "GET", "/v1/models", "", &[]).await;
    assert_eq!((st, body.as_str()), (401, r#"{"error":"Unauthorized"}"#));
    let (st, _, _) = call(
        &s,
        "GET",
        "/v1/models",
        "",
        &[("authorization", "Bearer k")],
    )
    .await;
    assert_eq!(st, 200);
    let (st, _, _) = call(&s, "GET", "/health", "", &[]).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn startup_delay_gates_health_and_v1() {
    let s = state_with(|c| c.startup_delay = Duration::from_secs(3600));
    assert_eq!(call(&s, "GET", "/health", "", &[]).await.0, 503);
    assert_eq!(
        call(&s, "POST", "/v1/chat/completions", CHAT, &[]).await.0,
        503
    );
}

#[tokio::test]
async fn tokenize_render_and_models() {
    let s = state_with(|_| {});
    let (st, body, _) = call(&s, "POST", "/tokenize", r#"{"prompt":"abcdefgh"}"#, &[]).await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["count"], 2);
    assert_eq!(v["max_model_len"], 4096);
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
    let (_, r1, _) = call(&s, "POST", "/v1/chat/completions/render", chat, &[]).await;
    let tk = r#"{"messages":[{"role":"user","content":"hello"}]}"#;
    let (_, r2, _) = call(&s, "POST", "/tokenize", tk, &[]).await;
    let a: Value = serde_json::from_str(&r1).unwrap();
    let b: Value = serde_json::from_str(&r2).unwrap();
    assert_eq!(a["token_ids"], b["tokens"]);
    let (_, m, _) = call(&s, "GET", "/v1/models", "", &[]).await;
    let v: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(v["data"][0]["id"], "m");
    assert_eq!(v["data"][0]["owned_by"], "vllm");
    let (st, d, _) = call(&s, "POST", "/detokenize", r#"{"tokens":[0,1]}"#, &[]).await;
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&d).unwrap()["prompt"],
        " the and"
    );
}

/// Connections the pod accepts have Nagle's algorithm off (vLLM's asyncio transports do), so a stream's chunks are not
/// held back waiting for ACKs.
#[tokio::test]
async fn accepted_connections_have_nodelay() {
    use axum::serve::Listener;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut l = nodelay(listener);
    let client = tokio::spawn(tokio::net::TcpStream::connect(addr));
    let (io, _) = l.accept().await;
    assert!(io.nodelay().unwrap());
    client.await.unwrap().unwrap();
}

#[tokio::test]
async fn min_latency_holds_every_generation_response() {
    use tokio::time::Instant;
    let stream = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"ignore_eos":true,
        "stream":true}"#;
    let bad = r#"{"model":"m","messages":"#;
    let bodies = [(CHAT, 200), (stream, 200), (bad, 400)];
    // Held responses are released, with their own status, never before the floor (a lower bound: no host is too
    // slow for it).
    let floor = Duration::from_millis(50);
    let held = state_with(|c| c.min_latency = floor);
    for (body, status) in bodies {
        let t = Instant::now();
        let (st, text, _) = call(&held, "POST", "/v1/chat/completions", body, &[]).await;
        assert_eq!(st, status, "{text}");
        assert!(t.elapsed() >= floor, "{:?} for {body}", t.elapsed());
    }
    // Held is told apart from unheld by order, not by a real-clock upper bound: with an hour's floor, a pod without it
    // answers the same request while the held pod is still holding it, and the held pod's health and metrics
    // (not generation responses) answer at once.
    let held = state_with(|c| c.min_latency = Duration::from_secs(3600));
    let fast = state_with(|_| {});
    for (body, status) in bodies {
        tokio::select! {
            biased;
            r = call(&held, "POST", "/v1/chat/completions", body, &[]) => {
                panic!("answered {} under an hour's floor: {body}", r.0)
            }
            r = call(&fast, "POST", "/v1/chat/completions", body, &[]) => assert_eq!(r.0, status, "{}", r.1),
        }
    }
    for path in ["/health", "/metrics"] {
        let r =
            tokio::time::timeout(Duration::from_secs(60), call(&held, "GET", path, "", &[])).await;
        assert_eq!(r.map(|r| r.0).ok(), Some(200), "{path} is never held");
    }
}
