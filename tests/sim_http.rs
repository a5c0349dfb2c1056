//! End-to-end: the real `weir sim` binary over HTTP — SSE framing, both APIs, prefix-cache metrics, bad inputs,
//! fault hooks.

mod common;

use common::{
    MODEL, Weir, client, get_status, metric, post_json as post, scrape, send_json, sse_json,
};
use serde_json::{Value, json};

/// A `weir sim` at time-scale 50 without step jitter, `extra` flags appended; ready.
async fn sim(extra: &[&str]) -> Weir {
    let mut args = vec!["--jitter", "0"];
    args.extend_from_slice(extra);
    Weir::sim(&args).await
}

#[tokio::test]
async fn streaming_chat_ends_with_usage_then_done() {
    let sim = sim(&[]).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me about GPUs"}],
        "max_tokens": 8, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let res = send_json(&format!("{}/v1/chat/completions", sim.url()), &body).await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = res.text().await.unwrap();
    // Byte framing: every event is `data: <payload>\n\n`, nothing else.
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert!(
        events
            .iter()
            .all(|e| e.starts_with("data: ") && !e.contains('\n')),
        "{text}"
    );
    assert_eq!(events.len(), 1 + 8 + 1 + 1);
    let evs = sse_json(&text);
    let j = |i: usize| evs[i].clone();
    assert_eq!(
        j(0)["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    for i in 1..8 {
        assert!(j(i)["choices"][0]["finish_reason"].is_null());
        assert!(j(i).get("usage").is_none());
    }
    assert_eq!(j(8)["choices"][0]["finish_reason"], "length");
    let u = j(9);
    assert_eq!(u["choices"], json!([]));
    assert_eq!(u["usage"]["completion_tokens"], 8);
    assert_eq!(
        u["usage"]["total_tokens"],
        u["usage"]["prompt_tokens"].as_u64().unwrap() + 8
    );
}

#[tokio::test]
async fn non_stream_both_apis() {
    let sim = sim(&["--enable-prompt-tokens-details"]).await;
    let (st, b) = post(
        &format!("{}/v1/completions", sim.url()),
        &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "ignore_eos": true}),
        &[("x-request-id", "req-1")],
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["id"], "cmpl-req-1");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    // Deterministic: the same request gives the same text.
    let (_, b2) = post(
        &format!("{}/v1/completions", sim.url()),
        &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "ignore_eos": true}),
        &[],
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&b2).unwrap()["choices"][0]["text"],
        text.as_str()
    );
    let (st, b) = post(
        &format!("{}/v1/chat/completions", sim.url()),
        &json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "max_completion_tokens": 3, "max_tokens": 100, "ignore_eos": true}),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["usage"]["completion_tokens"], 3,
        "max_completion_tokens wins"
    );
}

#[tokio::test]
async fn repeated_long_prompt_hits_prefix_cache() {
    let sim = sim(&[]).await;
    let prompt =
        "You are a careful assistant that explains Kubernetes scheduling in depth. ".repeat(40);
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "ignore_eos": true});
    let url = format!("{}/v1/completions", sim.url());
    let (_, first) = post(&url, &body, &[]).await;
    let prompt_tokens = serde_json::from_str::<Value>(&first).unwrap()["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap();
    let m = |t: String| metric(&t, "vllm:prefix_cache_hits_total");
    let before = m(scrape(sim.url()).await);
    let (st, _) = post(&url, &body, &[]).await;
    assert_eq!(st, 200);
    let after = m(scrape(sim.url()).await);
    let cached_blocks = (prompt_tokens - 1) / 16;
    assert!(
        after - before >= (cached_blocks * 16) as f64,
        "hits {before} -> {after}, prompt {prompt_tokens}"
    );
}

#[tokio::test]
async fn bad_inputs_get_status_and_body() {
    let sim = sim(&["--max-body-bytes", "20000", "--max-model-len", "2048"]).await;
    let chat = format!("{}/v1/chat/completions", sim.url());
    let msg = json!([{"role": "user", "content": "x"}]);
    let cases = vec![
        (
            json!({"model": "nope", "messages": msg}),
            404,
            "NotFoundError",
        ),
        (
            json!({"model": MODEL, "messages": "x"}),
            400,
            "BadRequestError",
        ),
        (
            json!({"model": MODEL, "messages": msg, "max_tokens": 0}),
            400,
            "BadRequestError",
        ),
        (
            json!({"model": MODEL, "messages": msg, "max_tokens": 4000}),
            400,
            "BadRequestError",
        ),
        (
            json!({"model": MODEL, "messages": msg, "n": 3}),
            400,
            "BadRequestError",
        ),
        (
            json!({"model": MODEL, "messages": msg, "temperature": -2}),
            400,
            "BadRequestError",
        ),
        (
            json!({"model": MODEL, "messages": msg, "stream_options": {"include_usage": true}}),
            400,
            "BadRequestError",
        ),
    ];
    for (body, status, kind) in cases {
        let (st, b) = post(&chat, &body, &[]).await;
        assert_eq!(st, status, "{body}: {b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["error"]["type"], kind, "{b}");
        assert_eq!(v["error"]["code"], status);
    }
    let (_, b) = post(
        &chat,
        &json!({"model": MODEL, "messages": msg, "max_tokens": 4000}),
        &[],
    )
    .await;
    assert!(
        b.contains("4000") && b.contains("2048"),
        "message gives both numbers: {b}"
    );
    let client = client();
    for raw in [b"{\"model\": ".to_vec(), vec![0xff, 0xfe, 0x00]] {
        let res = client
            .post(&chat)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], 400);
    }
    let big = json!({"model": MODEL, "prompt": "a".repeat(30000)});
    let (st, b) = post(&format!("{}/v1/completions", sim.url()), &big, &[]).await;
    assert_eq!(st, 413);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["code"],
        413
    );
    let (st, b) = post(
        &format!("{}/v1/completions", sim.url()),
        &json!({"model": MODEL, "prompt": ["a", "b"]}),
        &[],
    )
    .await;
    assert_eq!(st, 400, "{b}");
    // The server still serves after all that.
    let (st, _) = post(
        &chat,
        &json!({"model": MODEL, "messages": msg, "max_tokens": 2}),
        &[],
    )
    .await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn x_return_error_and_api_key() {
    let sim = sim(&["--api-key", "sekret"]).await;
    let chat = format!("{}/v1/chat/completions", sim.url());
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2});
    let (st, b) = post(&chat, &body, &[]).await;
    assert_eq!((st, b.as_str()), (401, r#"{"error":"Unauthorized"}"#));
    let auth = ("authorization", "Bearer sekret");
    let (st, b) = post(&chat, &body, &[auth, ("x-return-error", "503")]).await;
    assert_eq!(st, 503);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["code"],
        503
    );
    let (st, _) = post(&chat, &body, &[auth]).await;
    assert_eq!(st, 200);
    assert_eq!(get_status(&format!("{}/health", sim.url())).await, 200);
}

#[tokio::test]
async fn crash_drops_the_stream() {
    let sim = sim(&["--crash-after-tokens", "2"]).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10,
        "ignore_eos": true, "stream": true});
    let res = send_json(&format!("{}/v1/chat/completions", sim.url()), &body).await;
    assert_eq!(res.status(), 200);
    let r = res.text().await;
    assert!(r.is_err(), "the connection must break mid-stream: {r:?}");
}

#[tokio::test]
async fn min_latency_floors_every_completion() {
    let sim = Weir::sim_at("1000000", &["--jitter", "0", "--min-latency", "300ms"]).await;
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 2, "ignore_eos": true});
    for _ in 0..3 {
        let t = tokio::time::Instant::now();
        let (st, b) = post(&format!("{}/v1/completions", sim.url()), &body, &[]).await;
        assert_eq!(st, 200, "{b}");
        let took = t.elapsed();
        // Held to the floor, and not much past it: the engine's own time at this scale is microseconds.
        assert!(took >= std::time::Duration::from_millis(300), "{took:?}");
        assert!(took < std::time::Duration::from_millis(1300), "{took:?}");
    }
    let out = common::run_weir(
        &["sim", "--min-latency", "soon"],
        std::time::Duration::from_secs(20),
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--min-latency") && err.contains("bad duration"),
        "{err}"
    );
}

/// `--slow-factor 5` stretches every engine step 5x. Judged on the pods' own inter-token histograms (model time,
/// which real-clock lateness can only lengthen): on the slow pod no gap is under 25 ms (a decode step of the 8B model
/// on an H100 at batch 1 is ~7.5 ms, so every slowed step is >= ~37 ms whatever the host's load), while the normal
/// pod, same request, has gaps under 25 ms.
#[tokio::test]
async fn slow_factor_stretches_every_engine_step() {
    let normal = Weir::sim_at("1", &["--jitter", "0"]).await;
    let slow = Weir::sim_at("1", &["--jitter", "0", "--slow-factor", "5"]).await;
    let body = json!({"model": MODEL, "prompt": "Tell me about GPUs", "max_tokens": 20, "ignore_eos": true});
    let (normal_url, slow_url) = (
        format!("{}/v1/completions", normal.url()),
        format!("{}/v1/completions", slow.url()),
    );
    let (a, b) = tokio::join!(post(&normal_url, &body, &[]), post(&slow_url, &body, &[]));
    assert_eq!(a.0, 200, "{}", a.1);
    assert_eq!(b.0, 200, "{}", b.1);
    let under_25ms = |text: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("vllm:inter_token_latency_seconds_bucket{")
                    && l.contains("le=\"0.025\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no le=0.025 bucket:\n{text}"))
    };
    let (n, s) = (scrape(normal.url()).await, scrape(slow.url()).await);
    assert_eq!(metric(&s, "vllm:inter_token_latency_seconds_count"), 19.0);
    assert_eq!(under_25ms(&s), 0.0, "{s}");
    assert!(under_25ms(&n) >= 1.0, "{n}");
}
