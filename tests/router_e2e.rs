//! End-to-end: the real `weir serve` binary in front of real `weir sim` processes on loopback — both APIs streaming
//! and not, usage stripping, cancellation reaching the engine, every fault hook, breaker opening and closing, drain on SIGTERM.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{
    Weir, endpoint_id, eventually, get_text, metric_sum, post_json_full, prefix_blocks, run_weir,
    scrape, send_json, sse_data,
};
use futures::StreamExt;
use serde_json::{Value, json};

/// A sim serving model `m` (the name every route here uses) at time-scale 50; ready.
async fn sim(extra: &[&str]) -> Weir {
    sim_at("50", extra).await
}

/// A sim at `scale` model-seconds per real second (1 = real GPU speed, for tests that need long streams); ready.
async fn sim_at(scale: &str, extra: &[&str]) -> Weir {
    let mut args = vec!["--served-model-name", "m"];
    args.extend_from_slice(extra);
    Weir::sim_at(scale, &args).await
}

/// `weir serve` with one pool `m` over `backends`, scraping every 50 ms, `extra` flags appended; ready.
async fn serve(backends: &[&Weir], extra: &[&str]) -> Weir {
    let urls: Vec<&str> = backends.iter().map(|p| p.url()).collect();
    let backend = format!("m={}", urls.join(","));
    let mut args = vec!["--backend", &backend, "--scrape-interval", "50ms"];
    args.extend_from_slice(extra);
    Weir::serve(&args).await
}

#[tokio::test]
async fn both_apis_stream_and_not_with_usage_stripped_unless_asked() {
    let a = sim(&[]).await;
    let b = sim(&[]).await;
    let r = serve(&[&a, &b], &[]).await;
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5,
        "ignore_eos": true});
    let comp = json!({"model": "m", "prompt": "hello there", "max_tokens": 5, "ignore_eos": true});
    for (path, body) in [("/v1/chat/completions", &chat), ("/v1/completions", &comp)] {
        let (st, h, text) = post_json_full(
            &format!("{}{path}", r.url()),
            body,
            &[("x-request-id", "req-1")],
        )
        .await;
        assert_eq!(st, 200, "{text}");
        assert_eq!(h["x-request-id"], "req-1");
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["usage"]["completion_tokens"], 5, "{text}");

        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        let (st, h, text) = post_json_full(&format!("{}{path}", r.url()), &streaming, &[]).await;
        assert_eq!(st, 200);
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let evs = sse_data(&text);
        assert_eq!(evs.last(), Some(&"[DONE]"), "{text}");
        assert!(
            !text.contains("\"usage\":{"),
            "usage leaked to a client that did not ask: {text}"
        );

        streaming["stream_options"] = json!({"include_usage": true});
        let (_, _, text) = post_json_full(&format!("{}{path}", r.url()), &streaming, &[]).await;
        let with_usage = sse_data(&text)
            .iter()
            .filter(|e| e.contains("\"usage\":{"))
            .count();
        assert_eq!(with_usage, 1, "{text}");
    }
    let m = get_text(&format!("{}/metrics", r.url())).await;
    assert!(
        metric_sum(&m, "weir_tokens_total", "Completion") >= 30.0,
        "{m}"
    );
    assert!(metric_sum(&m, "weir_endpoint_picks_total", "pool=\"m\"") >= 6.0);
    let models: Value =
        serde_json::from_str(&get_text(&format!("{}/v1/models", r.url())).await).unwrap();
    assert_eq!(models["data"][0]["id"], "m");
}

#[tokio::test]
async fn client_disconnect_aborts_the_request_on_the_engine() {
    let s = sim_at("1", &[]).await;
    let r = serve(&[&s], &[]).await;
    let body = json!({"model": "m", "prompt": "tell me a long story", "max_tokens": 2000, "ignore_eos": true,
        "stream": true});
    let res = send_json(&format!("{}/v1/completions", r.url()), &body).await;
    let mut stream = res.bytes_stream();
    let first = stream.next().await.expect("a chunk").expect("bytes");
    assert!(!first.is_empty());
    drop(stream);
    let metrics = format!("{}/metrics", s.url());
    eventually(
        Duration::from_secs(10),
        "the sim to count an abort",
        async || {
            let m = get_text(&metrics).await;
            metric_sum(
                &m,
                "vllm:request_success_total",
                "finished_reason=\"abort\"",
            ) >= 1.0
                && metric_sum(&m, "vllm:num_requests_running", "model_name") == 0.0
        },
    )
    .await;
    let rm = format!("{}/metrics", r.url());
    eventually(
        Duration::from_secs(5),
        "the router to count the cancelled stream",
        async || {
            metric_sum(
                &get_text(&rm).await,
                "weir_stream_outcomes_total",
                "Cancelled",
            ) >= 1.0
        },
    )
    .await;
}

#[tokio::test]
async fn hung_backend_is_a_504_in_openai_shape() {
    let s = sim(&["--hang-rate", "100"]).await;
    let r = serve(&[&s], &["--first-byte-timeout", "300ms"]).await;
    let (st, h, text) = post_json_full(
        &format!("{}/v1/completions", r.url()),
        &json!({"model": "m", "prompt": "x"}),
        &[],
    )
    .await;
    assert_eq!(st, 504, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "gateway_timeout");
    assert!(h.contains_key("x-request-id"));
}

#[tokio::test]
async fn midstream_error_and_crash_end_with_error_then_done() {
    let body =
        json!({"model": "m", "prompt": "x", "max_tokens": 50, "ignore_eos": true, "stream": true});
    // Both faults strike once the pod has sent its response head (the crash after exactly 5 tokens; the error at a
    // token drawn from the pod's seeded fault RNG), so the head has reached the client: the router must end the
    // stream with an error event and [DONE], never turn it into an error status.
    for (flag, tokens) in [
        (["--crash-after-tokens", "5"], Some(5)),
        (["--midstream-error-rate", "100"], None),
    ] {
        let s = sim(&[flag[0], flag[1], "--seed", "7"]).await;
        let r = serve(&[&s], &[]).await;
        let (st, h, text) =
            post_json_full(&format!("{}/v1/completions", r.url()), &body, &[]).await;
        assert_eq!(st, 200, "{flag:?}: {text}");
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream"),
            "{flag:?}: {h:?}"
        );
        let evs = sse_data(&text);
        let n = evs.len();
        assert!(n >= 2, "{flag:?}: {text}");
        assert_eq!(evs[n - 1], "[DONE]", "{flag:?}: {text}");
        assert!(evs[n - 2].starts_with("{\"error\""), "{flag:?}: {text}");
        let sent = evs[..n - 2]
            .iter()
            .filter(|e| e.contains("\"text\""))
            .count();
        if let Some(tokens) = tokens {
            assert_eq!(sent, tokens, "{flag:?}: tokens before the error: {text}");
        }
    }
}

#[tokio::test]
async fn injected_errors_keep_status_in_openai_shape() {
    let s = sim(&[]).await;
    let r = serve(&[&s], &[]).await;
    let body = json!({"model": "m", "prompt": "x"});
    // 429 last: a backend 429 cools its (only) pod for its Retry-After, so later requests would find no pod.
    for (status, code) in [
        ("503", "service_unavailable"),
        ("400", "invalid_value"),
        ("429", "rate_limit_exceeded"),
    ] {
        let (st, h, text) = post_json_full(
            &format!("{}/v1/completions", r.url()),
            &body,
            &[("X-Return-Error", status)],
        )
        .await;
        assert_eq!(st.to_string(), status, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], code, "{text}");
        if status != "400" {
            assert!(h.contains_key("retry-after"), "{status}");
        }
    }
    let (st, _, text) = post_json_full(
        &format!("{}/v1/completions", r.url()),
        &json!({"model": "zzz", "prompt": "x"}),
        &[],
    )
    .await;
    assert_eq!(st, 404);
    assert!(text.contains("model_not_found"));
}

#[tokio::test]
async fn failing_pod_is_ejected_and_traffic_flows_to_the_healthy_one() {
    let good = sim(&[]).await;
    let bad = sim(&["--error-rate", "100", "--error-kinds", "server_error"]).await;
    let r = serve(
        &[&good, &bad],
        &["--breaker-threshold", "2", "--breaker-base-ejection", "30s"],
    )
    .await;
    let body = json!({"model": "m", "prompt": "x", "max_tokens": 2});
    for _ in 0..10 {
        let (st, _, text) =
            post_json_full(&format!("{}/v1/completions", r.url()), &body, &[]).await;
        assert_eq!(st, 200, "{text}");
    }
    let m = format!("{}/metrics", r.url());
    let bad_id = endpoint_id(bad.url());
    eventually(
        Duration::from_secs(5),
        "the bad pod's breaker to show open",
        async || {
            let t = get_text(&m).await;
            metric_sum(
                &t,
                "weir_endpoint_breaker_state",
                &format!("endpoint=\"{bad_id}\""),
            ) == 1.0
        },
    )
    .await;
    let t = get_text(&m).await;
    assert_eq!(
        metric_sum(
            &t,
            "weir_endpoint_picks_total",
            &format!("endpoint=\"{bad_id}\"")
        ),
        2.0,
        "{t}"
    );
}

#[tokio::test]
async fn a_pod_that_recovers_is_probed_and_its_breaker_closes() {
    let good = sim(&[]).await;
    let mut bad = sim(&["--error-rate", "100", "--error-kinds", "server_error"]).await;
    let port = port_of(bad.url()).to_string();
    let r = serve(
        &[&good, &bad],
        &[
            "--breaker-threshold",
            "2",
            "--breaker-base-ejection",
            "300ms",
        ],
    )
    .await;
    let body = json!({"model": "m", "prompt": "x", "max_tokens": 2});
    let completions = format!("{}/v1/completions", r.url());
    let m = format!("{}/metrics", r.url());
    let bad_label = format!("endpoint=\"{}\"", endpoint_id(bad.url()));
    let breaker = |t: &str| metric_sum(t, "weir_endpoint_breaker_state", &bad_label);
    let picks = |t: &str| metric_sum(t, "weir_endpoint_picks_total", &bad_label);
    for _ in 0..6 {
        let (st, _, text) = post_json_full(&completions, &body, &[]).await;
        assert_eq!(st, 200, "{text}");
    }
    eventually(
        Duration::from_secs(5),
        "the bad pod's breaker to open",
        async || breaker(&get_text(&m).await) == 1.0,
    )
    .await;
    // The pod is replaced by a healthy one on the same address (a restarted container keeps its pod IP).
    bad.terminate();
    bad.wait_exit(Duration::from_secs(10)).await;
    let _healed = Weir::sim_on(&port, "50", &["--served-model-name", "m"]).await;
    let before = picks(&get_text(&m).await);
    // Once its ejection ends, one request probes the pod; its success closes the breaker and traffic returns.
    eventually(
        Duration::from_secs(10),
        "the recovered pod's breaker to close and take traffic again",
        async || {
            let (st, _, text) = post_json_full(&completions, &body, &[]).await;
            assert_eq!(st, 200, "{text}");
            let t = get_text(&m).await;
            picks(&t) >= before + 3.0 && breaker(&t) == 0.0
        },
    )
    .await;
}

#[tokio::test]
async fn all_pods_down_is_503_with_retry_after() {
    let s = sim(&[]).await;
    let r = serve(&[&s], &[]).await;
    drop(s);
    let (st, h, text) = post_json_full(
        &format!("{}/v1/completions", r.url()),
        &json!({"model": "m", "prompt": "x"}),
        &[],
    )
    .await;
    assert_eq!(st, 503, "{text}");
    assert!(h.contains_key("retry-after"));
    assert!(text.contains("service_unavailable"));
}

#[tokio::test]
async fn sigterm_drains_in_flight_streams_then_exits() {
    let s = sim_at("1", &[]).await;
    let mut r = serve(&[&s], &["--drain-timeout", "20s"]).await;
    let addr = r.url().trim_start_matches("http://").to_string();
    // Before the drain new connections are accepted, so a refusal below is the drain's doing.
    tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect before the drain");
    // 300 tokens at H100 speed (time-scale 1) take ~2.5 s: this stream keeps the process draining meanwhile.
    let body =
        json!({"model": "m", "prompt": "x", "max_tokens": 300, "ignore_eos": true, "stream": true});
    let res = send_json(&format!("{}/v1/completions", r.url()), &body).await;
    let mut stream = res.bytes_stream();
    let mut text =
        String::from_utf8(stream.next().await.expect("chunk").expect("bytes").to_vec()).unwrap();
    r.terminate();
    // New connections are refused while the process is still draining: observed with the stream still open and the
    // process still running (not a zombie), not only after it has exited.
    eventually(
        Duration::from_secs(10),
        "new connections to be refused while draining",
        async || tokio::net::TcpStream::connect(&addr).await.is_err(),
    )
    .await;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", r.pid())).unwrap();
    let state = stat.rsplit(") ").next().unwrap().chars().next().unwrap();
    assert_ne!(state, 'Z', "the router already exited: {stat}");
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("stream survives the drain"),
        ));
    }
    let evs = sse_data(&text);
    assert_eq!(evs.last(), Some(&"[DONE]"), "{text}");
    assert_eq!(evs.iter().filter(|e| e.contains("\"text\"")).count(), 300);
    // Then the process exits cleanly.
    let status = r.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn yaml_config_serves_aliases_and_weighted_splits_and_rejects_unknown_fields() {
    let a = sim(&[]).await;
    let b = sim(&[]).await;
    let dir = std::env::temp_dir().join(format!("weir-router-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let cfg = dir.join("weir.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:0\n\
             pools:\n\
             - {{name: pa, model: m, endpoints: ['{}'], policy: {{kind: least-requests}}}}\n\
             - {{name: pb, model: m, endpoints: ['{}'], policy: {{kind: power-of-two}}}}\n\
             models:\n\
             - {{name: llama, aliases: [l3], targets: [{{pool: pa, weight: 1}}, {{pool: pb, weight: 1}}]}}\n",
            a.url(), b.url()
        ),
    )
    .expect("write config");
    let cfg_path = cfg.to_str().expect("utf-8 path");
    let r = Weir::start(&["--log-format", "json", "serve", "--config", cfg_path])
        .ready()
        .await;
    let (mut to_a, mut to_b) = (0, 0);
    for _ in 0..40 {
        let body = json!({"model": "l3", "prompt": "x", "max_tokens": 1});
        let (st, h, text) =
            post_json_full(&format!("{}/v1/completions", r.url()), &body, &[]).await;
        assert_eq!(st, 200, "{text}");
        let ep = h["x-weir-endpoint"].to_str().unwrap().to_string();
        if a.url().ends_with(&ep) {
            to_a += 1;
        } else if b.url().ends_with(&ep) {
            to_b += 1;
        }
    }
    assert_eq!(to_a + to_b, 40);
    assert!(to_a >= 8 && to_b >= 8, "split {to_a}/{to_b}");
    let models: Value =
        serde_json::from_str(&get_text(&format!("{}/v1/models", r.url())).await).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["llama", "l3", "m"]);

    std::fs::write(
        &cfg,
        "pools: [{name: pa, endpoint: ['http://127.0.0.1:1']}]\n",
    )
    .expect("write config");
    let out = run_weir(&["serve", "--config", cfg_path], Duration::from_secs(30)).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `endpoint`"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A minimal Kubernetes API: lists one ready pod `vllm-0` (IP 127.0.0.1, labels `app: vllm`, these annotations) and
/// holds watches open without events.
async fn fake_kube_api(annotations: Value) -> String {
    let pod_list = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": [{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "vllm-0", "namespace": "default", "resourceVersion": "1",
                     "labels": {"app": "vllm", "llm-d.ai/role": "prefill-decode"}, "annotations": annotations},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
    }]});
    let pods = move |uri: axum::http::Uri| {
        let pod_list = pod_list.clone();
        async move {
            use axum::response::IntoResponse;
            if uri.query().unwrap_or("").contains("watch=true") {
                let never = futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
                return axum::body::Body::from_stream(never).into_response();
            }
            axum::Json(pod_list).into_response()
        }
    };
    let app =
        axum::Router::new().route("/api/v1/namespaces/default/pods", axum::routing::get(pods));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(l, app).await.ok() });
    url
}

/// `weir serve` (`extra` flags first) whose endpoints come from the Kubernetes API at `api`: the pods labelled
/// `app: vllm`, on `port`, as pool `m`; ready.
async fn serve_kubernetes(api: &str, port: &str, extra: &[&str]) -> Weir {
    let mut args = extra.to_vec();
    args.extend_from_slice(&[
        "--k8s-api",
        api,
        "--k8s-selector",
        "app=vllm",
        "--k8s-ports",
        port,
        "--k8s-pool",
        "m",
    ]);
    Weir::serve(&args).await
}

#[tokio::test]
async fn endpoints_discovered_from_kubernetes_receive_traffic() {
    let s = sim(&[]).await;
    let port = s.url().rsplit(':').next().expect("port").to_string();
    let api = fake_kube_api(json!({})).await;
    let r = serve_kubernetes(&api, &port, &[]).await;
    let url = format!("{}/v1/completions", r.url());
    let body = json!({"model": "m", "prompt": "x", "max_tokens": 1});
    eventually(
        Duration::from_secs(10),
        "the discovered pod to serve",
        async || post_json_full(&url, &body, &[]).await.0 == 200,
    )
    .await;
    let (_, h, _) = post_json_full(&url, &body, &[]).await;
    assert_eq!(h["x-weir-endpoint"], format!("vllm-0:{port}"));
}

/// The port of a `tcp://host:port` or `http://host:port` address.
fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

#[tokio::test]
async fn kv_event_publisher_announced_by_a_pod_annotation_feeds_the_precise_index() {
    let s = sim(&["--kv-events-port", "0"]).await;
    let (kv, replay) = (
        s.endpoint(0)["kv_events"].as_str().unwrap().to_string(),
        s.endpoint(0)["replay"].as_str().unwrap().to_string(),
    );
    let port = port_of(s.url()).to_string();
    let api = fake_kube_api(json!({
        "weir.dev/kv-events-port": port_of(&kv),
        "weir.dev/kv-replay-port": port_of(&replay),
    }))
    .await;
    // The pool's policy comes from the config; its endpoints only from Kubernetes.
    let cfg = std::env::temp_dir().join(format!("weir-k8s-kv-{}.yaml", std::process::id()));
    std::fs::write(&cfg, "pools: [{name: m, policy: {kind: precise-prefix}}]\n").unwrap();
    // Fill the pod's cache before the router exists (so before it can subscribe), around it: only the pod's KV events,
    // replayed when the router subscribes, can tell the router.
    let prompt = "The pod announced its publisher in an annotation. ".repeat(40);
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 1});
    let (st, _, text) = post_json_full(&format!("{}/v1/completions", s.url()), &body, &[]).await;
    assert_eq!(st, 200, "{text}");
    let r = serve_kubernetes(&api, &port, &["--config", cfg.to_str().unwrap()]).await;
    let id = format!("vllm-0:{port}");
    // The pod publishes nothing more: the router must index its cache from the replay it asks for on subscribing.
    eventually(
        Duration::from_secs(30),
        "the router's precise index to hold the pod's blocks",
        async || prefix_blocks(r.url(), &id).await > 20,
    )
    .await;
    // /metrics shows the subscription following the pod: connected, the replayed batches applied, the blocks held.
    let m = scrape(r.url()).await;
    let pod = format!(r#"endpoint="{id}""#);
    assert_eq!(metric_sum(&m, "weir_kv_events_connected", &pod), 1.0, "{m}");
    assert!(metric_sum(&m, "weir_kv_events_replayed_batches_total", &pod) > 0.0);
    assert!(
        metric_sum(&m, "weir_kv_events_batches_total", &pod)
            >= metric_sum(&m, "weir_kv_events_replayed_batches_total", &pod)
    );
    assert!(metric_sum(&m, "weir_kv_index_blocks", &pod) > 20.0);
    assert!(
        m.lines()
            .any(|l| l.starts_with("weir_kv_events_last_seq{") && l.contains(&pod)),
        "{m}"
    );
    assert!(metric_sum(&m, "weir_kv_index_memory_bytes", r#"pool="m""#) > 0.0);
    let _ = std::fs::remove_file(cfg);
}

/// A backend that answers every completion with 429 and `Retry-After: 30`, counting them; `/metrics` is empty.
async fn rate_limited_backend() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let busy = move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            (
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "30"), ("content-type", "application/json")],
                r#"{"error":{"message":"busy","type":"RateLimitError","param":null,"code":429}}"#,
            )
        }
    };
    let app = axum::Router::new()
        .route("/v1/completions", axum::routing::post(busy))
        .route("/metrics", axum::routing::get(|| async { "" }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(l, app).await.ok() });
    (url, hits)
}

#[tokio::test]
async fn backend_429_cools_the_endpoint_and_retries_elsewhere() {
    let s = sim(&[]).await;
    let (busy, hits) = rate_limited_backend().await;
    let backend = format!("m={busy},{}", s.url());
    let r = Weir::serve(&["--backend", &backend, "--policy", "round-robin"]).await;
    let url = format!("{}/v1/completions", r.url());
    let body = json!({"model": "m", "prompt": "x", "max_tokens": 1});
    for i in 0..10 {
        let (status, _, text) = post_json_full(&url, &body, &[]).await;
        assert_eq!(status, 200, "request {i} was not retried elsewhere: {text}");
    }
    // Round-robin alone would send half of them to the busy pod; its Retry-After (30 s) keeps it out after one 429.
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}
