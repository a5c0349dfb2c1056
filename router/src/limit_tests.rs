//! Tenant rate limits through the router's real front door (`app(state).oneshot(..)`) against a fake vLLM: RPM and
//! TPM 429s in the OpenAI shape with `Retry-After` and `x-ratelimit-*` headers, and a burst of concurrent requests
//! that never spends more tokens than the TPM limit.

use hyper::StatusCode;
use policies::tenant::ApiKeyHash;

use crate::handler_tests::{OK, PROMPT, fake, post, send, state};

fn with_key(mut r: hyper::Request<axum::body::Body>) -> hyper::Request<axum::body::Body> {
    r.headers_mut()
        .insert("authorization", "Bearer sk-alice".parse().unwrap());
    r
}

fn config(url: &str, limits: &str) -> String {
    format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\n\
         tenants: [{{tenant: alice, limits: {limits}, identity: {{apiKeys: [{{sha256: '{}'}}]}}}}]\n\
         admission: {{gate: false}}",
        ApiKeyHash::of("sk-alice").to_hex()
    )
}

#[tokio::test]
async fn rpm_limit_answers_429_with_openai_headers() {
    let (_f, url) = fake(OK).await;
    let s = state(&config(&url, "{rpm: 2}"));
    let (st, h, body) = send(&s, with_key(post("/v1/completions", PROMPT))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-reset-requests"], "30s");
    assert!(!h.contains_key("x-ratelimit-limit-tokens"), "no TPM set");
    let (st, _, _) = send(&s, with_key(post("/v1/completions", PROMPT))).await;
    assert_eq!(st, StatusCode::OK);
    let (st, h, body) = send(&s, with_key(post("/v1/completions", PROMPT))).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert_eq!(e["error"]["type"], "requests");
    assert_eq!(h["retry-after"], "30");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
}

#[tokio::test]
async fn fifty_concurrent_requests_never_exceed_a_small_tpm_limit() {
    let (f, url) = fake(OK).await;
    // PROMPT is 46 bytes: an estimated 11 prompt tokens + max_tokens 3 = 14 reserved; the fake uses 5.
    let s = state(&config(&url, "{tpm: 140}"));
    let t0 = tokio::time::Instant::now();
    let answers = futures::future::join_all(
        (0..50).map(|_| send(&s, with_key(post("/v1/completions", PROMPT)))),
    )
    .await;
    let elapsed = t0.elapsed();
    let ok = answers.iter().filter(|a| a.0 == StatusCode::OK).count() as u64;
    for (st, h, body) in &answers {
        if *st != StatusCode::OK {
            assert_eq!(*st, StatusCode::TOO_MANY_REQUESTS, "{body}");
            let e: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                (e["error"]["type"].as_str(), e["error"]["code"].as_str()),
                (Some("tokens"), Some("rate_limit_exceeded"))
            );
            assert!(h.contains_key("retry-after"));
            assert_eq!(h["x-ratelimit-limit-tokens"], "140");
        }
    }
    // Refill is 140 tokens a minute: at most a few tokens during the test.
    let refill = (elapsed.as_secs_f64() * 140.0 / 60.0).ceil() as u64;
    assert!(ok >= 1, "nothing admitted");
    assert!(
        ok * 5 <= 140 + refill,
        "{ok} requests spent {} tokens",
        ok * 5
    );
    assert_eq!(
        f.hits.load(std::sync::atomic::Ordering::SeqCst) as u64,
        ok,
        "a denied request never reached the pod"
    );
    // After settlement only real usage counts: the next request sees 140 - 5*ok - its own 14 remaining.
    let (st, h, body) = send(&s, with_key(post("/v1/completions", PROMPT))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let remaining: u64 = h["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let want = 140 - 5 * ok - 14;
    let refill = (t0.elapsed().as_secs_f64() * 140.0 / 60.0).ceil() as u64;
    assert!(
        (want..=want + refill).contains(&remaining),
        "remaining {remaining}, expected {want} (+ up to {refill} refilled)"
    );
}
