//! Admission through the router's real front door (`app(state).oneshot(..)`) against in-process fake vLLM backends:
//! tenant keys, dispatch held while the pool has no room, tier priority when room opens, 429 with `Retry-After`,
//! permits settled by how requests end, and `GET /v1/usage`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;
use hyper::{Request, StatusCode};
use policies::tenant::ApiKeyHash;
use tower::ServiceExt;

use crate::app::app;
use crate::handler_tests::{Fake, OK, PROMPT, SLOW, STREAM, err_code, fake, post, send, state};
use crate::shared::AppState;

const ADMIN: &str = "sk-admin";

/// alice (interactive) and bob (batch), short maximum waits; one pool `m` on `url`.
fn tenants(url: &str) -> String {
    let h = |k: &str| ApiKeyHash::of(k).to_hex();
    format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\n\
         tenants:\n\
         - {{tenant: alice, tier: interactive, queue: {{maxWaitMs: 3000}}, identity: {{apiKeys: [{{sha256: '{}'}}]}}}}\n\
         - {{tenant: bob, tier: batch, queue: {{maxWaitMs: 300}}, identity: {{apiKeys: [{{sha256: '{}'}}]}}}}\n\
         admission: {{admin_keys: ['{}'], refresh: 5ms, burst: 1}}\n\
         scrape: {{interval: 20ms}}",
        h("sk-alice"),
        h("sk-bob"),
        h(ADMIN)
    )
}

fn with_key(mut r: Request<Body>, key: &str) -> Request<Body> {
    r.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

fn get(path: &str, key: Option<&str>) -> Request<Body> {
    let r = Request::get(path).body(Body::empty()).unwrap();
    match key {
        Some(k) => with_key(r, k),
        None => r,
    }
}

/// Waits until the router has scraped the fake once (from then on the pool is gated).
async fn scraped(s: &Arc<AppState>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !s.snapshot.load().pools[0].endpoints[0].state.ever_scraped() {
        assert!(tokio::time::Instant::now() < deadline, "never scraped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Usage rows of `tenant` as its own key reads them.
async fn usage(s: &Arc<AppState>, key: &str) -> serde_json::Value {
    let (st, _, body) = send(s, get("/v1/usage", Some(key))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn a_tenant_key_is_needed_and_checked() {
    let (_f, url) = fake(OK).await;
    let s = state(&tenants(&url));
    let (st, h, body) = send(&s, post("/v1/completions", PROMPT)).await;
    assert_eq!(
        (st, err_code(&body)),
        (StatusCode::UNAUTHORIZED, "missing_api_key".into())
    );
    assert!(h.contains_key("x-request-id"));
    let (st, _, body) = send(&s, with_key(post("/v1/completions", PROMPT), "sk-eve")).await;
    assert_eq!(
        (st, err_code(&body)),
        (StatusCode::UNAUTHORIZED, "invalid_api_key".into())
    );
    let (st, _, body) = send(&s, with_key(post("/v1/completions", PROMPT), "sk-alice")).await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_full_pool_holds_requests_then_sheds_them_with_retry_after() {
    let (f, url) = fake(OK).await;
    let s = state(&tenants(&url));
    f.waiting.store(2, Ordering::SeqCst); // the pod's queue is full: no room
    scraped(&s).await;
    let t0 = tokio::time::Instant::now();
    let (st, h, body) = send(&s, with_key(post("/v1/completions", PROMPT), "sk-bob")).await;
    assert_eq!(
        (st, err_code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "queue_timeout".into()),
        "{body}"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(h["retry-after"], "1");
    assert_eq!(
        f.hits.load(Ordering::SeqCst),
        0,
        "a held request never reached the pod"
    );
    // Room again: the next request goes through.
    f.waiting.store(0, Ordering::SeqCst);
    let (st, _, body) = send(&s, with_key(post("/v1/completions", PROMPT), "sk-bob")).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let u = usage(&s, "sk-bob").await;
    let row = &u["data"][0];
    assert_eq!(
        (
            row["tenant"].as_str(),
            row["tier"].as_str(),
            row["rejected"].as_u64(),
            row["admitted"].as_u64(),
            row["completed"].as_u64(),
            row["prompt_tokens"].as_u64(),
            row["completion_tokens"].as_u64()
        ),
        (
            Some("bob"),
            Some("batch"),
            Some(1),
            Some(1),
            Some(1),
            Some(4),
            Some(1)
        ),
        "{u}"
    );
}

#[tokio::test]
async fn when_room_opens_the_interactive_request_goes_before_the_earlier_batch_one() {
    let (f, url) = fake(OK).await;
    let s = state(&tenants(&url).replace("maxWaitMs: 300", "maxWaitMs: 3000"));
    f.waiting.store(2, Ordering::SeqCst);
    scraped(&s).await;
    let spawn = |prompt: &'static str, key: &'static str| {
        let s = s.clone();
        let body = format!(r#"{{"model":"m","prompt":"{prompt}","max_tokens":3}}"#);
        tokio::spawn(async move { send(&s, with_key(post("/v1/completions", &body), key)).await })
    };
    let batch = spawn("batch", "sk-bob");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let interactive = spawn("interactive", "sk-alice");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(f.hits.load(Ordering::SeqCst), 0);
    // Room again, one request per 5 ms computation (`burst: 1`): the interactive request goes first.
    f.waiting.store(0, Ordering::SeqCst);
    let (a, b) = (interactive.await.unwrap(), batch.await.unwrap());
    assert_eq!(
        (a.0, b.0),
        (StatusCode::OK, StatusCode::OK),
        "{} {}",
        a.2,
        b.2
    );
    let seen = f.seen.lock();
    assert_eq!(
        seen[0].0["prompt"],
        "interactive",
        "{:?}",
        seen.iter().map(|s| &s.0["prompt"]).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn batch_is_held_while_a_pod_has_a_queue_and_the_others_are_not() {
    let (f, url) = fake(OK).await;
    let s = state(&tenants(&url).replace("maxWaitMs: 300", "maxWaitMs: 3000"));
    f.waiting.store(1, Ordering::SeqCst); // one request in the engine queue: room for all tiers but batch
    scraped(&s).await;
    let (st, _, body) = send(&s, with_key(post("/v1/completions", PROMPT), "sk-alice")).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let batch = {
        let s = s.clone();
        tokio::spawn(
            async move { send(&s, with_key(post("/v1/completions", PROMPT), "sk-bob")).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.hits.load(Ordering::SeqCst), 1, "batch held");
    f.waiting.store(0, Ordering::SeqCst);
    let (st, _, body) = batch.await.unwrap();
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(f.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_stream_the_client_drops_is_settled_as_cancelled_once() {
    let (f, url) = fake(SLOW).await;
    // Not drained: the pod's stream is closed at once (the fake's slow stream would take minutes to read).
    let s = state(&tenants(&url).replace("burst: 1", "burst: 1, drain_cancelled_streams: false"));
    let r = app(s.clone())
        .oneshot(with_key(post("/v1/completions", STREAM), "sk-alice"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut body = r.into_body();
    assert!(body.frame().await.unwrap().unwrap().data_ref().is_some());
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while f.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never saw the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let u = usage(&s, "sk-alice").await;
    let row = &u["data"][0];
    assert_eq!(
        (
            row["admitted"].as_u64(),
            row["cancelled"].as_u64(),
            row["completed"].as_u64(),
            row["failed"].as_u64()
        ),
        (Some(1), Some(1), Some(0), Some(0)),
        "{u}"
    );
}

#[tokio::test]
async fn a_stream_the_client_drops_is_read_to_its_end_and_billed_the_pods_usage() {
    let (f, url) = fake(OK).await;
    let s = state(&tenants(&url));
    let r = app(s.clone())
        .oneshot(with_key(post("/v1/completions", STREAM), "sk-alice"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The client leaves before reading anything.
    drop(r);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let u = usage(&s, "sk-alice").await;
        let row = &u["data"][0];
        if row["cancelled"].as_u64() == Some(1) {
            // The fake's usage chunk: 4 prompt and 3 completion tokens.
            assert_eq!(
                (
                    row["admitted"].as_u64(),
                    row["prompt_tokens"].as_u64(),
                    row["completion_tokens"].as_u64()
                ),
                (Some(1), Some(4), Some(3)),
                "{u}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never settled: {u}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        f.cancelled.load(Ordering::SeqCst),
        0,
        "the pod's stream was read to its end"
    );
}

#[tokio::test]
async fn usage_is_a_tenants_own_unless_the_key_is_an_admin_one() {
    let (_f, url) = fake(OK).await;
    let s = state(&tenants(&url));
    for key in ["sk-alice", "sk-bob"] {
        let (st, _, _) = send(&s, with_key(post("/v1/completions", PROMPT), key)).await;
        assert_eq!(st, StatusCode::OK);
    }
    let mine = usage(&s, "sk-alice").await;
    let tenants: Vec<_> = mine["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["tenant"].clone())
        .collect();
    assert_eq!(tenants, ["alice"]);
    let (st, _, body) = send(&s, get("/v1/usage?tenant=bob", Some("sk-alice"))).await;
    assert_eq!(
        (st, err_code(&body)),
        (StatusCode::FORBIDDEN, "permission_denied".into())
    );
    let (st, _, body) = send(&s, get("/v1/usage", None)).await;
    assert_eq!(
        (st, err_code(&body)),
        (StatusCode::UNAUTHORIZED, "missing_api_key".into())
    );
    let all = usage(&s, ADMIN).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 2, "{all}");
    let (st, _, body) = send(&s, get("/v1/usage?tenant=bob", Some(ADMIN))).await;
    assert_eq!(st, StatusCode::OK);
    let bob: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows = bob["data"].as_array().unwrap();
    assert!(rows.len() == 1 && rows[0]["tenant"] == "bob", "{bob}");
}

#[tokio::test]
async fn with_admission_off_there_are_no_keys_queues_or_ledger() {
    let (_f, url): (Arc<Fake>, String) = fake(OK).await;
    let s = state(
        &format!("{}\n", tenants(&url)).replace("admission: {", "admission: {enabled: false, "),
    );
    assert!(s.admission.is_none());
    let (st, _, body) = send(&s, post("/v1/completions", PROMPT)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, _, body) = send(&s, get("/v1/usage", Some(ADMIN))).await;
    assert_eq!(
        (st, err_code(&body)),
        (StatusCode::NOT_FOUND, "usage_disabled".into())
    );
}

/// A router whose pool `m` has no static pod; its pods come from the returned discovery source (a pool at zero).
fn at_zero(
    yaml: &str,
) -> (
    Arc<AppState>,
    tokio::sync::watch::Sender<Vec<crate::discovery::DiscoveredEndpoint>>,
) {
    let cfg = crate::config::RawConfig::from_yaml(yaml)
        .unwrap()
        .validate()
        .unwrap();
    let mut d = crate::discovery::Discovery::new();
    d.add_static(&cfg);
    let pods = d.add_source("test");
    (
        crate::start(&cfg, d, Default::default(), 1_700_000_000, 7).unwrap(),
        pods,
    )
}

/// Requests admission holds for pool `m` now.
fn held(s: &AppState) -> u64 {
    let now = tokio::time::Instant::now().into_std();
    let q = s.admission.as_ref().unwrap().tier_queues(now);
    q.iter().filter(|q| q.pool == "m").map(|q| q.queued).sum()
}

#[tokio::test]
async fn a_request_for_a_pool_at_zero_is_held_until_a_pod_is_discovered_then_served_once() {
    let (f, url) = fake(OK).await;
    let (s, pods) =
        at_zero("pools: [{name: m}]\nadmission: {refresh: 5ms}\nscrape: {interval: 20ms}");
    let req = {
        let s = s.clone();
        tokio::spawn(async move { send(&s, post("/v1/completions", PROMPT)).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while held(&s) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Held, not answered: no pod to send it to, and none of the 503s of an empty pool.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!req.is_finished());
    assert_eq!(held(&s), 1);
    pods.send_replace(vec![crate::discovery::DiscoveredEndpoint::from_url(
        "m", &url,
    )]);
    let (st, _, body) = tokio::time::timeout(Duration::from_secs(5), req)
        .await
        .expect("served once the pod was discovered")
        .unwrap();
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(held(&s), 0);
    assert_eq!(f.hits.load(Ordering::SeqCst), 1);
    let rows = s.admission.as_ref().unwrap().usage("default");
    let c = rows[0].counters;
    assert_eq!(
        (
            c.admitted,
            c.completed,
            c.prompt_tokens,
            c.completion_tokens
        ),
        (1, 1, 4, 1),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_pool_still_at_zero_when_the_wait_ends_answers_503_with_retry_after() {
    let (_s, url) = fake(OK).await;
    let yaml = tenants(&url).replace(&format!("endpoints: ['{url}']"), "endpoints: []");
    let (s, _pods) = at_zero(&yaml);
    let t0 = tokio::time::Instant::now();
    let (st, h, body) = send(&s, with_key(post("/v1/completions", PROMPT), "sk-bob")).await;
    assert_eq!(
        (st, err_code(&body)),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable".into()
        ),
        "{body}"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(h["retry-after"], "1");
    let u = usage(&s, "sk-bob").await;
    let row = &u["data"][0];
    assert_eq!(
        (row["admitted"].as_u64(), row["rejected"].as_u64()),
        (Some(0), Some(1)),
        "{row}"
    );
}
