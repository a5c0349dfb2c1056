//! `weir bench` end to end: the real binary against an in-process fake OpenAI server whose timing and failures the
//! test controls (fixed TTFT and inter-token gaps, `X-Return-Error`, a dead port), checking the JSON report.

#![allow(clippy::unwrap_used)] // the fake server below

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

/// How the fake server behaves and what it saw.
struct Fake {
    /// Delay before the first content token.
    ttft: Duration,
    /// Delay between content tokens.
    itl: Duration,
    /// Completion requests received.
    requests: AtomicU64,
    /// Most requests in flight at once.
    peak: AtomicU64,
    /// Requests in flight now.
    live: AtomicU64,
    /// Tokens streamed (feeds the fake lateness histogram).
    tokens: AtomicU64,
    /// Completion requests received per `Authorization` header value (`-` when absent).
    by_auth: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
}

/// The key the fake answers with 429 + `Retry-After`, as an admission layer sheds a full queue.
const SHED_KEY: &str = "sk-shed";

async fn completions(
    State(f): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    f.requests.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    *f.by_auth.lock().entry(auth.clone()).or_insert(0) += 1;
    if auth == format!("Bearer {SHED_KEY}") {
        let err = json!({"error":{"message":"queue full","type":"server_overloaded","param":null,"code":"capacity_exceeded"}});
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            Json(err),
        )
            .into_response();
    }
    if let Some(code) = headers
        .get("x-return-error")
        .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
    {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let err = json!({"error":{"message":"injected","type":"ServiceUnavailableError","param":null,"code":code}});
        return (status, Json(err)).into_response();
    }
    let chat = body.get("messages").is_some();
    let n = body["max_tokens"].as_u64().unwrap_or(16);
    let model = body["model"].as_str().unwrap_or("").to_string();
    if !body["stream"].as_bool().unwrap_or(false) {
        tokio::time::sleep(f.ttft + f.itl * (n.saturating_sub(1) as u32)).await;
        f.tokens.fetch_add(n, Ordering::SeqCst);
        let text = " the".repeat(n as usize);
        let choice = if chat {
            json!({"index":0,"message":{"role":"assistant","content":text},"finish_reason":"length"})
        } else {
            json!({"index":0,"text":text,"finish_reason":"length"})
        };
        return Json(
            json!({"id":"x","object":"chat.completion","model":model,"choices":[choice],
            "usage":{"prompt_tokens":7,"completion_tokens":n,"total_tokens":7+n}}),
        )
        .into_response();
    }
    let live = f.live.fetch_add(1, Ordering::SeqCst) + 1;
    f.peak.fetch_max(live, Ordering::SeqCst);
    let chunk = move |i: u64| -> String {
        let delta = if i == 0 {
            json!({"role":"assistant","content":""})
        } else {
            json!({"content":" the"})
        };
        let finish = if i == n { json!("length") } else { Value::Null };
        let choice = if chat {
            json!({"index":0,"delta":delta,"finish_reason":finish})
        } else {
            json!({"index":0,"text":if i == 0 {""} else {" the"},"finish_reason":finish})
        };
        format!(
            "data: {}\n\n",
            json!({"id":"x","object":"chat.completion.chunk","model":"m","choices":[choice]})
        )
    };
    let stream = futures::stream::unfold(0u64, move |i| {
        let f = f.clone();
        async move {
            if i > n + 1 {
                return None;
            }
            let text = if i == 0 {
                chunk(0)
            } else if i <= n {
                tokio::time::sleep(if i == 1 { f.ttft } else { f.itl }).await;
                f.tokens.fetch_add(1, Ordering::SeqCst);
                chunk(i)
            } else {
                f.live.fetch_sub(1, Ordering::SeqCst);
                let usage = json!({"id":"x","object":"chat.completion.chunk","model":"m","choices":[],
                    "usage":{"prompt_tokens":7,"completion_tokens":n,"total_tokens":7+n}});
                format!("data: {usage}\n\ndata: [DONE]\n\n")
            };
            Some((Ok::<_, std::convert::Infallible>(Bytes::from(text)), i + 1))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

async fn models() -> Json<Value> {
    Json(json!({"object":"list","data":[{"id":"fake-model","object":"model"}]}))
}

/// A lateness histogram whose `le="0.001"` bucket counts every streamed token, so the scraped delta is checkable.
async fn metrics(State(f): State<Arc<Fake>>) -> String {
    let t = f.tokens.load(Ordering::SeqCst);
    format!(
        "# TYPE weir_sim_token_lateness_seconds histogram\n\
         weir_sim_token_lateness_seconds_bucket{{model_name=\"fake-model\",le=\"0.001\"}} {t}\n\
         weir_sim_token_lateness_seconds_bucket{{model_name=\"fake-model\",le=\"0.01\"}} {t}\n\
         weir_sim_token_lateness_seconds_bucket{{model_name=\"fake-model\",le=\"+Inf\"}} {t}\n\
         weir_sim_token_lateness_seconds_count{{model_name=\"fake-model\"}} {t}\n"
    )
}

/// Start the fake on an ephemeral loopback port; returns its base URL.
async fn fake(ttft_ms: u64, itl_ms: u64) -> (String, Arc<Fake>) {
    let f = Arc::new(Fake {
        ttft: Duration::from_millis(ttft_ms),
        itl: Duration::from_millis(itl_ms),
        requests: AtomicU64::new(0),
        peak: AtomicU64::new(0),
        live: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        by_auth: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .with_state(f.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), f)
}

/// `weir bench --url <url> --model m <args>` (a fixed model name, no discovery): see [`bench`].
async fn bench_m(url: &str, args: &[&str], limit: Duration) -> (Value, Duration) {
    let mut full = vec!["--url", url, "--model", "m"];
    full.extend_from_slice(args);
    bench(&full, limit).await
}

/// Run `weir bench <args> --json <tmp>` to completion (killed after `limit`); returns the report and wall time.
async fn bench(args: &[&str], limit: Duration) -> (Value, Duration) {
    let run = common::run_bench(args, limit).await;
    assert!(
        run.stdout.contains("TTFT") && run.stdout.contains("request throughput"),
        "table on stdout: {}",
        run.stdout
    );
    (run.report, run.took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_sends_exactly_the_requested_count_and_caps_concurrency() {
    let (url, f) = fake(5, 2).await;
    let (r, _) = bench(
        &[
            "--url",
            &url,
            "--workload",
            "tiny",
            "--concurrency",
            "4",
            "--requests",
            "37",
            "--seed",
            "3",
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        f.requests.load(Ordering::SeqCst),
        37,
        "server saw exactly --requests"
    );
    assert_eq!(r["requests"], 37);
    assert_eq!(r["successful"], 37);
    assert_eq!(r["failed"], 0);
    assert_eq!(r["ttft_ms"]["count"], 37);
    assert_eq!(
        r["total_output_tokens"], 37,
        "tiny asks for one token each, counted from usage"
    );
    assert_eq!(
        r["config"]["model"], "fake-model",
        "model discovered from /v1/models"
    );
    assert!(
        f.peak.load(Ordering::SeqCst) <= 4,
        "never more than --concurrency in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_stops_at_duration() {
    let (url, f) = fake(5, 2).await;
    let (r, took) = bench_m(
        &url,
        &[
            "--workload",
            "tiny",
            "--rate",
            "40",
            "--duration",
            "1s",
            "--seed",
            "1",
        ],
        Duration::from_secs(30),
    )
    .await;
    let sent = f.requests.load(Ordering::SeqCst);
    // Poisson(40) over 1 s: P(N outside 15..=70) is negligible.
    assert!((15..=70).contains(&sent), "sent {sent}");
    assert_eq!(r["requests"].as_u64(), Some(sent));
    assert!(
        took < Duration::from_secs(10),
        "stopped by itself, took {took:?}"
    );
    let d = r["duration_s"].as_f64().unwrap();
    assert!(d > 0.5 && d < 2.0, "measured duration {d}");
    assert_eq!(r["config"]["mode"], "open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttft_and_itl_come_from_the_stream() {
    let (url, f) = fake(80, 25).await;
    let (r, _) = bench_m(
        &url,
        &[
            "--api",
            "completions",
            "--workload",
            "shared-prefix",
            "--groups",
            "2",
            "--prompts-per-group",
            "2",
            "--system-tokens",
            "20",
            "--question-tokens",
            "5",
            "--output-tokens",
            "6",
            "--concurrency",
            "2",
            "--requests",
            "6",
            "--slo-ttft-ms",
            "10000",
            "--slo-itl-ms",
            "1",
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(f.requests.load(Ordering::SeqCst), 6);
    let ttft = &r["ttft_ms"];
    assert_eq!(ttft["count"], 6);
    let p50 = ttft["p50"].as_f64().unwrap();
    assert!(
        (80.0..300.0).contains(&p50),
        "TTFT p50 {p50} ms for an 80 ms first token"
    );
    let itl = &r["itl_ms"];
    assert_eq!(
        itl["count"],
        6 * 5,
        "5 gaps between 6 content chunks per request"
    );
    let ip50 = itl["p50"].as_f64().unwrap();
    assert!(
        (20.0..150.0).contains(&ip50),
        "ITL p50 {ip50} ms for 25 ms gaps"
    );
    assert_eq!(r["total_output_tokens"], 36);
    // ITL SLO of 1 ms is unmeetable; the TTFT one is loose.
    assert_eq!(r["goodput"]["requests"], 0);
    let e2e = r["e2e_ms"]["p50"].as_f64().unwrap();
    assert!(
        e2e >= 80.0 + 5.0 * 25.0 - 5.0,
        "e2e {e2e} covers the whole stream"
    );
    let lateness = &r["server"][0];
    assert_eq!(lateness["name"], "weir_sim_token_lateness_seconds");
    assert_eq!(
        lateness["count"].as_f64(),
        Some(36.0),
        "histogram delta over the run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_requests_are_measured_end_to_end() {
    let (url, _f) = fake(30, 5).await;
    let (r, _) = bench_m(
        &url,
        &[
            "--no-stream",
            "--workload",
            "tiny",
            "--concurrency",
            "3",
            "--requests",
            "9",
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(r["successful"], 9);
    assert_eq!(r["itl_ms"]["count"], 0);
    assert!(r["ttft_ms"]["p50"].as_f64().unwrap() >= 30.0);
    assert_eq!(r["config"]["stream"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_http_errors_by_status() {
    let (url, f) = fake(1, 1).await;
    let (r, _) = bench_m(
        &url,
        &[
            "--workload",
            "tiny",
            "--concurrency",
            "2",
            "--requests",
            "10",
            "--header",
            "X-Return-Error: 503",
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(f.requests.load(Ordering::SeqCst), 10);
    assert_eq!(r["failed"], 10);
    assert_eq!(r["successful"], 0);
    assert_eq!(r["errors"]["http_503"], 10);
    assert_eq!(r["ttft_ms"]["count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_connection_errors_against_a_dead_port() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let (r, _) = bench_m(
        &url,
        &[
            "--workload",
            "tiny",
            "--concurrency",
            "2",
            "--requests",
            "5",
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(r["failed"], 5);
    assert_eq!(r["errors"]["connect"], 5);
    assert!(
        r["server"].as_array().unwrap().is_empty(),
        "no metrics from a dead port"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_replay_sends_every_line_at_its_time() {
    let (url, f) = fake(1, 1).await;
    let dir = std::env::temp_dir().join(format!("weir-bench-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("t.jsonl");
    std::fs::write(
        &trace,
        "{\"t\":0.0,\"prompt_tokens\":40,\"output_tokens\":3,\"prefix_group\":1}\n\
         {\"t\":0.2,\"prompt\":\"hello\",\"output_tokens\":2}\n\
         {\"t\":0.4,\"prompt_tokens\":40,\"output_tokens\":3,\"prefix_group\":1}\n",
    )
    .unwrap();
    let (r, took) = bench_m(
        &url,
        &["--trace", trace.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(f.requests.load(Ordering::SeqCst), 3);
    assert_eq!(r["total_output_tokens"], 8);
    assert_eq!(r["config"]["mode"], "trace");
    assert!(
        took >= Duration::from_millis(400),
        "arrivals follow the trace clock"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_file_sends_each_tenants_key_and_reports_per_tenant_and_tier() {
    let (url, f) = fake(2, 1).await;
    let path = std::env::temp_dir().join(format!("weir-bench-tenants-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "tenants:\n\
             - {{name: alice, key: sk-alice, tier: interactive, workload: tiny, concurrency: 2}}\n\
             - {{name: bob, key: sk-bob, tier: batch, weight: 2, workload: tiny, rate: 40}}\n\
             - {{name: shed, key: {SHED_KEY}, tier: batch, workload: tiny, concurrency: 1}}\n"
        ),
    )
    .unwrap();
    let run = common::run_bench(
        &[
            "--url",
            &url,
            "--model",
            "m",
            "--tenants",
            path.to_str().unwrap(),
            "--duration",
            "1s",
        ],
        Duration::from_secs(60),
    )
    .await;
    let r = run.report;
    let seen = f.by_auth.lock().clone();
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["Bearer sk-alice", "Bearer sk-bob", "Bearer sk-shed"],
        "every request carries its tenant's key, and only that: {seen:?}"
    );
    let t = |name: &str| {
        r["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tenant"] == name)
            .unwrap()
            .clone()
    };
    let (alice, bob, shed) = (t("alice"), t("bob"), t("shed"));
    // What the server answered each key is what the report counts for that tenant.
    assert_eq!(alice["requests"].as_u64(), Some(seen["Bearer sk-alice"]));
    assert_eq!(alice["completed"], alice["requests"]);
    assert!(alice["requests"].as_u64().unwrap() > 10, "{alice}");
    assert_eq!(alice["ttft_ms"]["count"], alice["requests"]);
    assert_eq!(bob["completed"].as_u64(), Some(seen["Bearer sk-bob"]));
    assert_eq!(shed["completed"], 0);
    assert_eq!(
        shed["rejected"]["429"].as_u64(),
        Some(seen["Bearer sk-shed"])
    );
    assert_eq!(shed["ttft_ms"]["count"], 0, "a rejection has no TTFT");
    assert_eq!(
        (bob["weight"].as_f64(), shed["weight"].as_f64()),
        (Some(2.0), Some(1.0))
    );
    // Batch tier: bob served everything, so his share of the tier is 1 against a weight share of 2/3.
    assert_eq!(bob["tier_share"].as_f64(), Some(1.0));
    assert!((bob["weight_share"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    let tiers: Vec<&str> = r["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tier"].as_str().unwrap())
        .collect();
    assert_eq!(tiers, ["interactive", "batch"]);
    let batch = &r["tiers"][1];
    assert_eq!(batch["rejected"]["429"], shed["rejected"]["429"]);
    assert_eq!(batch["min_share"].as_f64(), Some(0.05));
    assert!(
        run.stdout
            .contains("| alice | interactive | 1 | closed 2 |"),
        "{}",
        run.stdout
    );

    // --only-tiers: the interactive tenant alone.
    f.by_auth.lock().clear();
    let run = common::run_bench(
        &[
            "--url",
            &url,
            "--model",
            "m",
            "--tenants",
            path.to_str().unwrap(),
            "--duration",
            "500ms",
            "--only-tiers",
            "interactive",
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        f.by_auth.lock().keys().collect::<Vec<_>>(),
        ["Bearer sk-alice"]
    );
    assert_eq!(run.report["tenants"].as_array().unwrap().len(), 1);
    let _ = std::fs::remove_file(&path);
}
