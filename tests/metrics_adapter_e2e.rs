//! The metrics adapter end to end: real `weir sim` pods behind a real `weir serve --metrics-adapter-listen`, the
//! custom metrics API read over HTTPS (the self-signed certificate the router made at start), each pod's value
//! checked against that pod's own `/metrics`, and the HPA's replica arithmetic on the served values.
//!
//! Why the pods are slow and small: one request on a default H100 profile (28,002 KV blocks) holds ~0.15% of the
//! cache, one or two steps of the API's milli-unit resolution, and a simulated request without `ignore_eos` ends at
//! its sampled EOS after ~130 tokens (~1.2 s at real speed), so an earlier version of this test had a ~1 s window in
//! which a pod was busy, while the KV value changed every ~100 ms. Here the pods have 201 blocks (one block = 0.5%),
//! requests set `ignore_eos`, and `--time-scale 0.05` makes a KV change (one per 16 decoded tokens) seconds apart; the
//! pods are read before and after the adapter, and a sample counts only when the two reads agree.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns: a failed unwrap is a failed test

mod common;
// Scale from zero: a pool with no pod holds its first request, KEDA is told at once, the pod serves it.
mod scale_from_zero;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use metrics_adapter::keda::proto::external_scaler_client::ExternalScalerClient;
use serde_json::{Value, json};

const V2: &str = "apis/custom.metrics.k8s.io/v1beta2";

/// An HTTPS client for the adapter's self-signed certificate (made at start, so there is no CA to pin).
fn https() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get_json(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A quantity string in milli-units (`"190m"` -> 190, `"2"` -> 2000).
fn milli(q: &str) -> i64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse().unwrap(),
        None => q.parse::<i64>().unwrap() * 1000,
    }
}

/// The pods list of `metric`: pod name -> value in milli-units.
async fn pods_metric(c: &reqwest::Client, adapter: &str, metric: &str) -> BTreeMap<String, i64> {
    let url = format!("{adapter}/{V2}/namespaces/default/pods/*/{metric}");
    let (status, list) = get_json(c, &url).await;
    assert_eq!(status, 200, "{url}: {list}");
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let name = i["describedObject"]["name"].as_str().unwrap().to_string();
            (name, milli(i["value"].as_str().unwrap()))
        })
        .collect()
}

/// Each pod's own `(vllm:kv_cache_usage_perc, vllm:num_requests_running)`.
async fn pods_own(urls: &[String]) -> BTreeMap<String, (f64, f64)> {
    let mut out = BTreeMap::new();
    for u in urls {
        let text = scrape(u).await;
        let kv = metric(&text, "vllm:kv_cache_usage_perc");
        let running = metric(&text, "vllm:num_requests_running");
        out.insert(endpoint_id(u), (kv, running));
    }
    out
}

/// The HPA v2 recommendation for a `Pods` metric with an `AverageValue` target (autoscaling-and-metrics-apis.md §5,
/// every pod reporting): keep `current` within the 10% tolerance, else `ceil(mean / target × ready)`.
fn hpa_desired(values_milli: &[i64], target_milli: i64, current: u32) -> u32 {
    let ready = values_milli.len() as f64;
    let mean = values_milli.iter().sum::<i64>() as f64 / ready;
    let ratio = mean / target_milli as f64;
    if (ratio - 1.0).abs() <= 0.1 {
        current
    } else {
        (ratio * ready).ceil() as u32
    }
}

#[tokio::test]
async fn serve_answers_the_custom_metrics_api_over_https_with_each_pods_own_values() {
    let fleet = Weir::fleet(2, "0.05", &["--num-gpu-blocks", "201"]).await;
    let urls = fleet.urls();
    let backend = format!("{MODEL}={}", urls.join(","));
    let router = Weir::serve(&[
        "--backend",
        &backend,
        "--policy",
        "round-robin",
        "--scrape-interval",
        "50ms",
        "--metrics-adapter-listen",
        "127.0.0.1:0",
    ])
    .await;
    let adapter = router.json()["metrics_adapter"]
        .as_str()
        .unwrap_or_else(|| panic!("no metrics_adapter in {}", router.json()))
        .to_string();
    assert!(adapter.starts_with("https://"), "{adapter}");
    let c = https();

    // TLS for real: plain HTTP to the adapter's port gets no HTTP answer.
    let plain = adapter.replacen("https://", "http://", 1);
    assert!(
        client()
            .get(format!("{plain}/{V2}"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_err(),
        "the adapter answered plain HTTP"
    );

    // Discovery lists the pods metric; an unknown metric is a 404 Status.
    let (status, disc) = get_json(&c, &format!("{adapter}/{V2}")).await;
    assert_eq!(status, 200, "{disc}");
    assert!(
        disc["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "pods/weir_kv_cache_utilization"),
        "{disc}"
    );
    let (status, nf) = get_json(
        &c,
        &format!("{adapter}/{V2}/namespaces/default/pods/*/nope"),
    )
    .await;
    assert_eq!(
        (status, nf["reason"].as_str()),
        (404, Some("NotFound")),
        "{nf}"
    );

    // Both pods listed, with "0" while idle (a known metric with no load is 0, not missing).
    eventually(
        Duration::from_secs(10),
        "both pods listed at 0",
        async || {
            let kv = pods_metric(&c, &adapter, "weir_kv_cache_utilization").await;
            kv.len() == 2 && kv.values().all(|v| *v == 0)
        },
    )
    .await;

    // Two long requests of different prompt lengths; round-robin puts one on each pod.
    let mut held = Vec::new();
    for prompt in ["hello ".repeat(400), "world ".repeat(200)] {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1000, "ignore_eos": true,
            "stream": true});
        let req = client()
            .post(format!("{}/v1/completions", router.url()))
            .json(&body)
            .send();
        held.push(tokio::spawn(async move {
            let r = req.await.unwrap();
            assert_eq!(r.status(), 200);
            // Hold the stream open until the test ends.
            let mut r = r;
            while let Ok(Some(_)) = r.chunk().await {}
        }));
    }

    // A consistent sample: each pod's own numbers read before and after the adapter's, equal both times (the KV
    // moves one block per 16 decoded tokens, seconds apart here), both pods busy. Then the adapter's value of every
    // pod must be the pod's own, to the milli-unit.
    let mut sample = None;
    eventually(
        Duration::from_secs(30),
        "a consistent sample where the adapter's values are the pods' own",
        async || {
            let before = pods_own(&urls).await;
            let kv = pods_metric(&c, &adapter, "weir_kv_cache_utilization").await;
            let running = pods_metric(&c, &adapter, "weir_num_requests_running").await;
            let after = pods_own(&urls).await;
            if before != after || before.values().any(|(kv, r)| *kv == 0.0 || *r != 1.0) {
                return false;
            }
            let own_kv: BTreeMap<String, i64> = before
                .iter()
                .map(|(p, (kv, _))| (p.clone(), (kv * 1000.0).round() as i64))
                .collect();
            let own_running: BTreeMap<String, i64> = before
                .iter()
                .map(|(p, (_, r))| (p.clone(), (r * 1000.0).round() as i64))
                .collect();
            if kv == own_kv && running == own_running {
                sample = Some((kv, before));
                true
            } else {
                eprintln!("not yet: adapter kv {kv:?} running {running:?}, pods {before:?}");
                false
            }
        },
    )
    .await;
    let (kv, own) = sample.unwrap();
    // One block is 0.5% of these caches: the two prompts (600 and 300 tokens) hold distinct, visible shares.
    assert!(kv.values().all(|v| *v >= 50), "{kv:?} {own:?}");
    assert_ne!(kv.values().min(), kv.values().max(), "{kv:?}");

    // The HPA on a Pods metric, AverageValue 50m, 2 replicas: the adapter's values give the recommendation the pods'
    // own values (in the HPA's milli-units) give, and it is a scale-up.
    let served: Vec<i64> = kv.values().copied().collect();
    let own_milli: Vec<i64> = own
        .values()
        .map(|(kv, _)| (kv * 1000.0).round() as i64)
        .collect();
    let desired = hpa_desired(&served, 50, 2);
    assert_eq!(desired, hpa_desired(&own_milli, 50, 2));
    let mean = served.iter().sum::<i64>() as f64 / 2.0;
    assert_eq!(desired, (mean / 50.0 * 2.0).ceil() as u32, "{served:?}");
    assert!(desired > 2, "{served:?}: expected a scale-up");

    // Per pool object (the router pool is the InferencePool): one item, the pods' total of running requests.
    let pool = MODEL.replace('/', "%2F");
    let (status, obj) = get_json(
        &c,
        &format!(
            "{adapter}/{V2}/namespaces/default/inferencepools.inference.networking.k8s.io/{pool}/weir_num_requests_running"
        ),
    )
    .await;
    assert_eq!(status, 200, "{obj}");
    let items = obj["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{obj}");
    assert_eq!(
        items[0]["describedObject"]["kind"], "InferencePool",
        "{obj}"
    );
    assert_eq!(items[0]["value"], "2", "{obj}");

    // The router's own in-flight count, per namespace: both requests.
    let (_, ns) = get_json(
        &c,
        &format!("{adapter}/{V2}/namespaces/default/metrics/weir_in_flight_requests"),
    )
    .await;
    assert_eq!(ns["items"][0]["value"], "2", "{ns}");

    // `weir metrics-adapter` standalone reads the same router over its `GET /debug/pods`.
    let standalone = Weir::start(&[
        "metrics-adapter",
        "--router",
        router.url(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let base = standalone.json()["listen"].as_str().unwrap().to_string();
    assert!(base.starts_with("https://"), "{base}");
    let mut in_flight = BTreeMap::new();
    eventually(
        Duration::from_secs(10),
        "the standalone adapter answering",
        async || {
            in_flight = pods_metric(&c, &base, "weir_in_flight_requests").await;
            in_flight.len() == 2
        },
    )
    .await;
    assert!(in_flight.values().all(|v| *v == 1000), "{in_flight:?}");
    for h in held {
        h.abort();
    }
}

/// A KEDA trigger's metadata.
/// The next `StreamIsActive` state within `limit` (panics naming `what` when none comes or the stream fails).
async fn next_push(
    stream: &mut tonic::Streaming<metrics_adapter::keda::proto::IsActiveResponse>,
    limit: Duration,
    what: &str,
) -> metrics_adapter::keda::proto::IsActiveResponse {
    tokio::time::timeout(limit, stream.message())
        .await
        .expect(what)
        .unwrap()
        .unwrap()
}

/// A KEDA external-scaler client connected to `addr` (`host:port`, plaintext gRPC).
async fn keda_client(addr: &str) -> ExternalScalerClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ExternalScalerClient::new(channel)
}

fn trigger(kv: &[(&str, &str)]) -> metrics_adapter::keda::proto::ScaledObjectRef {
    metrics_adapter::keda::proto::ScaledObjectRef {
        name: "llama".into(),
        namespace: "default".into(),
        scaler_metadata: kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[tokio::test]
async fn keda_external_scaler_answers_over_grpc_from_the_routers_samples() {
    use metrics_adapter::keda::proto::GetMetricsRequest;

    // One slow pod with 41 KV blocks: two 200-word prompts fill it, so further requests wait in its engine queue.
    let fleet = Weir::fleet(1, "0.05", &["--num-gpu-blocks", "41"]).await;
    let urls = fleet.urls();
    let router = Weir::serve(&[
        "--backend",
        &format!("{MODEL}={}", urls[0]),
        "--scrape-interval",
        "50ms",
        "--keda-scaler-listen",
        "127.0.0.1:0",
    ])
    .await;
    let addr = router.json()["keda_scaler"]
        .as_str()
        .unwrap_or_else(|| panic!("no keda_scaler in {}", router.json()))
        .to_string();
    let mut keda = keda_client(&addr).await;
    let meta = [
        ("scalerAddress", addr.as_str()),
        ("pool", MODEL),
        ("metric", "num_requests_waiting"),
        ("targetValue", "2"),
        ("activationTargetValue", "0"),
    ];

    // The spec: the metric's full name and the per-replica target in both fields.
    let spec = keda
        .get_metric_spec(trigger(&meta))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1, "{spec:?}");
    let s = &spec.metric_specs[0];
    assert_eq!(
        (s.metric_name.as_str(), s.target_size, s.target_size_float),
        ("weir_num_requests_waiting", 2, 2.0)
    );
    // Bad metadata is INVALID_ARGUMENT; StreamMetricSpec is UNIMPLEMENTED (allowed: KEDA keeps polling the spec).
    let e = keda
        .is_active(trigger(&[("metric", "nope")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = keda.get_metric_spec(trigger(&[])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = keda.stream_metric_spec(trigger(&meta)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");

    // Idle: inactive, 0. The push stream opens with the current state.
    eventually(
        Duration::from_secs(10),
        "the pod scraped and idle",
        async || {
            !keda
                .clone()
                .is_active(trigger(&meta))
                .await
                .unwrap()
                .into_inner()
                .result
        },
    )
    .await;
    let mut stream = keda
        .stream_is_active(trigger(&meta))
        .await
        .unwrap()
        .into_inner();
    let first = next_push(
        &mut stream,
        Duration::from_secs(5),
        "the stream's first state",
    )
    .await;
    assert!(!first.result);
    let idle = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(trigger(&meta)),
            metric_name: "weir_num_requests_waiting".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(idle.metric_values.len(), 1, "{idle:?}");
    assert_eq!(
        (
            idle.metric_values[0].metric_value,
            idle.metric_values[0].metric_value_float
        ),
        (0, 0.0)
    );

    // Four long requests: two run, two wait in the engine.
    let mut held = Vec::new();
    for i in 0..4 {
        let body = json!({"model": MODEL, "prompt": format!("{i} {}", "hello ".repeat(200)),
            "max_tokens": 300, "ignore_eos": true, "stream": true});
        let req = client()
            .post(format!("{}/v1/completions", router.url()))
            .json(&body)
            .send();
        held.push(tokio::spawn(async move {
            let mut r = req.await.unwrap();
            while let Ok(Some(_)) = r.chunk().await {}
        }));
    }
    // The push arrives within 1 s of the pod's queue filling (timed from when this test first sees it on the pod's own
    // /metrics, at most one 20 ms poll after it happened).
    let own_waiting = async || metric(&scrape(&urls[0]).await, "vllm:num_requests_waiting");
    eventually(
        Duration::from_secs(20),
        "requests waiting in the pod",
        async || own_waiting().await > 0.0,
    )
    .await;
    let queued_at = tokio::time::Instant::now();
    let pushed = next_push(
        &mut stream,
        Duration::from_secs(5),
        "a StreamIsActive push after the queue filled",
    )
    .await;
    let after = queued_at.elapsed();
    assert!(pushed.result, "{pushed:?}");
    assert!(
        after <= Duration::from_secs(1),
        "the push came {after:?} after the queue filled"
    );
    assert!(
        keda.is_active(trigger(&meta))
            .await
            .unwrap()
            .into_inner()
            .result
    );

    // GetMetrics is the pod's own queue (read before and after, equal), in both fields.
    let mut got = None;
    eventually(
        Duration::from_secs(20),
        "GetMetrics equal to the pod's own queue",
        async || {
            let before = own_waiting().await;
            let m = keda
                .get_metrics(GetMetricsRequest {
                    scaled_object_ref: Some(trigger(&meta)),
                    metric_name: "weir_num_requests_waiting".into(),
                })
                .await
                .unwrap()
                .into_inner();
            let after = own_waiting().await;
            let v = &m.metric_values[0];
            let ok = before == after
                && before > 0.0
                && v.metric_value_float == before
                && v.metric_value as f64 == before;
            if ok {
                got = Some(v.clone());
            }
            ok
        },
    )
    .await;
    assert_eq!(got.unwrap().metric_name, "weir_num_requests_waiting");

    // The requests gone (client disconnects cancel them), the queue empties and the stream says so.
    for h in held {
        h.abort();
    }
    let back = next_push(
        &mut stream,
        Duration::from_secs(20),
        "an inactive push after the queue drained",
    )
    .await;
    assert!(!back.result);
}

#[tokio::test]
async fn serve_presents_the_given_certificate() {
    // A CA-less self-signed pair written as PEM files, as cert-manager's Secret would mount them.
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("weir-adapter-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&crt, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let router = Weir::serve(&[
        "--backend",
        &format!("{MODEL}=http://127.0.0.1:9"),
        "--metrics-adapter-listen",
        "127.0.0.1:0",
        "--metrics-adapter-tls-cert",
        crt.to_str().unwrap(),
        "--metrics-adapter-tls-key",
        key.to_str().unwrap(),
    ])
    .await;
    let adapter = router.json()["metrics_adapter"].as_str().unwrap();
    let url = format!("{}/{V2}", adapter.replacen("127.0.0.1", "localhost", 1));
    // Trusting that certificate (and nothing else), the chain and name verify.
    let trusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(made.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let (status, disc) = get_json(&trusting, &url).await;
    assert_eq!(status, 200, "{disc}");
    assert_eq!(disc["groupVersion"], "custom.metrics.k8s.io/v1beta2");
    // Without it, verification fails: the adapter really presents that certificate.
    let other = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    assert!(other.get(&url).send().await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `prometheus` server on loopback, killed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// `prometheus` (or `$WEIR_PROMETHEUS`) scraping `targets` (`{"targets": [..], "labels": {..}}` groups) every
    /// `interval`; ready. Panics when the binary is missing: this test never skips.
    async fn start(interval: &str, targets: Value) -> Prometheus {
        let bin = std::env::var("WEIR_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let found = std::process::Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "`{bin}` not found: install prometheus (scripts/test does) or set WEIR_PROMETHEUS"
        );
        let dir = std::env::temp_dir().join(format!("weir-adapter-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = json!({
            "global": {"scrape_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [{"job_name": "model-servers", "static_configs": targets}],
        });
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(&bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let ready = format!("{}/-/ready", p.url);
        eventually(Duration::from_secs(30), "prometheus ready", async || {
            client()
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        p
    }
}

/// A model server frozen in the past: its `/metrics` carries explicit sample timestamps `age` old (as a federated
/// or relayed exporter's would), so Prometheus keeps answering them as the latest samples, with no staleness marker.
async fn frozen_exporter(age: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            #[allow(clippy::disallowed_methods)]
            // the sample's wall-clock time is the point of this exporter
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .saturating_sub(age)
                .as_millis();
            let body = format!(
                "vllm:kv_cache_usage_perc{{model_name=\"{MODEL}\"}} 0.9 {ts}\n\
                 vllm:num_requests_waiting{{model_name=\"{MODEL}\"}} 7 {ts}\n"
            );
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        }
    });
    addr.to_string()
}

/// Each pod's own `vllm:kv_cache_usage_perc` in milli-units.
async fn pods_own_kv(urls: &[String]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for u in urls {
        let kv = metric(&scrape(u).await, "vllm:kv_cache_usage_perc");
        out.insert(endpoint_id(u), (kv * 1000.0).round() as i64);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_source_serves_each_pods_own_kv_within_one_scrape_interval() {
    const SCRAPE: Duration = Duration::from_secs(1);
    // Slow small pods (see the module docs): a KV change every few seconds, 0.5% per block.
    let fleet = Weir::fleet(2, "0.05", &["--num-gpu-blocks", "201"]).await;
    let urls = fleet.urls();
    let frozen = frozen_exporter(Duration::from_secs(120)).await;
    // Sorted, as the adapter's listing is compared with it (unsorted, the test passed only when the ports happened
    // to come in order).
    let mut live: Vec<String> = urls.iter().map(|u| endpoint_id(u)).collect();
    live.sort();
    let prom = Prometheus::start(
        "1s",
        json!([
            {"targets": live, "labels": {"pool": "llama", "gpu": "H100", "role": "decode"}},
            {"targets": [frozen], "labels": {"pool": "llama", "gpu": "H100", "role": "decode"}},
        ]),
    )
    .await;
    let adapter = Weir::start(&[
        "metrics-adapter",
        "--prometheus",
        &prom.url,
        "--listen",
        "127.0.0.1:0",
        "--external",
        "--cache-ttl",
        "100ms",
        "--prometheus-max-age",
        "10s",
    ]);
    let base = adapter.json()["listen"].as_str().unwrap().to_string();
    let c = https();

    // Discovery lists exactly the metrics the source has queries for.
    let (status, disc) = get_json(&c, &format!("{base}/{V2}")).await;
    assert_eq!(status, 200, "{disc}");
    let pods_metrics: Vec<&str> = disc["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str()?.strip_prefix("pods/"))
        .collect();
    assert_eq!(
        pods_metrics,
        [
            "weir_kv_cache_utilization",
            "weir_num_requests_waiting",
            "weir_num_requests_running"
        ],
        "{disc}"
    );

    // Both live pods at 0 once scraped; the frozen one (120 s old samples, max age 10 s) is left out and reported
    // once Prometheus has scraped it too (targets are scraped at offsets spread over the interval: waiting for the
    // live pods alone raced it).
    let mut pools = Value::Null;
    eventually(
        Duration::from_secs(30),
        "both live pods listed at 0 and the frozen one reported stale",
        async || {
            let kv = pods_metric(&c, &base, "weir_kv_cache_utilization").await;
            if kv.keys().cloned().collect::<Vec<_>>() != live || kv.values().any(|v| *v != 0) {
                return false;
            }
            let (status, p) = get_json(&c, &format!("{base}/metrics-api/pools")).await;
            pools = p;
            status == 200
                && pools["stale"].as_array().is_some_and(|stale| {
                    stale.iter().any(|s| {
                        s["pod"] == frozen
                            && s["metric"] == "weir_kv_cache_utilization"
                            && s["age_seconds"].as_f64().is_some_and(|a| a >= 110.0)
                    })
                })
        },
    )
    .await;
    let stale = pools["stale"].as_array().unwrap();
    assert!(stale.iter().all(|s| s["pod"] == frozen), "{pools}");
    assert_eq!(
        pools["pools"][0]["pool"],
        format!("{MODEL}/decode/H100"),
        "{pools}"
    );

    // Load: one long request on each pod, so each pod's KV moves one block per 16 tokens, seconds apart.
    let mut held = Vec::new();
    for (u, prompt) in urls
        .iter()
        .zip(["hello ".repeat(400), "world ".repeat(200)])
    {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2000, "ignore_eos": true,
            "stream": true});
        let req = client()
            .post(format!("{u}/v1/completions"))
            .json(&body)
            .send();
        held.push(tokio::spawn(async move {
            let mut r = req.await.unwrap();
            assert_eq!(r.status(), 200);
            while let Ok(Some(_)) = r.chunk().await {}
        }));
    }

    // Freshness: each time a pod's own value changes, time until the adapter serves the new values of both pods.
    // Bound: the median within one scrape interval (the next scrape comes on average half an interval after a change);
    // each one within the interval plus 500 ms for the adapter's 100 ms cache, this loop's polling and a loaded
    // machine (Prometheus's scrape timer and these processes share 2 cores with other work).
    let bound = SCRAPE + Duration::from_millis(500);
    let started = tokio::time::Instant::now();
    let mut last = pods_own_kv(&urls).await;
    let mut pending: Option<(tokio::time::Instant, BTreeMap<String, i64>)> = None;
    let mut lags = Vec::new();
    while lags.len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "only {} KV changes seen in 90 s: {lags:?}",
            lags.len()
        );
        let own = pods_own_kv(&urls).await;
        if own != last {
            pending = Some((tokio::time::Instant::now(), own.clone()));
            last = own;
        }
        if let Some((at, want)) = &pending {
            let served = pods_metric(&c, &base, "weir_kv_cache_utilization").await;
            if served == *want {
                lags.push(at.elapsed());
                pending = None;
            } else {
                assert!(
                    at.elapsed() < Duration::from_secs(5),
                    "the adapter still serves {served:?} 5 s after the pods reported {want:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!("adapter lag behind the pods' own KV values: {lags:?}");
    assert!(lags.iter().all(|l| *l <= bound), "{lags:?} > {bound:?}");
    let mut sorted = lags.clone();
    sorted.sort();
    assert!(
        sorted[sorted.len() / 2] <= SCRAPE,
        "median of {lags:?} > {SCRAPE:?}"
    );
    assert!(last.values().all(|v| *v > 0), "{last:?}");

    // The same values per pool through the external API (mean KV over the two live pods; the frozen one out).
    let (status, ext) = get_json(
        &c,
        &format!("{base}/apis/external.metrics.k8s.io/v1beta1/namespaces/default/weir_pool_num_requests_running?labelSelector=gpu%3DH100"),
    )
    .await;
    assert_eq!(status, 200, "{ext}");
    assert_eq!(ext["items"].as_array().unwrap().len(), 1, "{ext}");
    assert_eq!(ext["items"][0]["value"], "2", "{ext}");
    for h in held {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_tier_queues_are_served_per_pool_and_tier_and_to_keda() {
    use metrics_adapter::keda::proto::GetMetricsRequest;

    // One slow pod that takes one request at a time (admission.max_in_flight 1): further requests wait in weir's
    // tier queues, not in the engine.
    let pod = Weir::sim_at("0.05", &["--served-model-name", "m"]).await;
    let dir = tempfile::tempdir().unwrap();
    let key_hash = policies::tenant::ApiKeyHash::of("sk-ba").to_hex();
    let cfg = dir.path().join("weir.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools: [{{name: m, endpoints: [{}]}}]\nscrape: {{interval: 50ms}}\n\
             admission: {{max_in_flight: 1, burst: 1}}\n\
             tenants:\n  - {{tenant: ba, tier: batch, queue: {{maxQueued: 10, maxWaitMs: 60000}}, \
             identity: {{apiKeys: [{{sha256: '{key_hash}'}}]}}}}\n",
            pod.url()
        ),
    )
    .unwrap();
    let router = Weir::serve(&[
        "--config",
        cfg.to_str().unwrap(),
        "--metrics-adapter-listen",
        "127.0.0.1:0",
        "--metrics-adapter-external",
        "--keda-scaler-listen",
        "127.0.0.1:0",
    ])
    .await;
    let adapter = router.json()["metrics_adapter"]
        .as_str()
        .unwrap()
        .to_string();
    let keda_addr = router.json()["keda_scaler"].as_str().unwrap().to_string();
    let c = https();
    let ext = format!("{adapter}/apis/external.metrics.k8s.io/v1beta1");

    // Discovery lists both tier metrics; with nothing queued the depth is one "0" item.
    let (status, disc) = get_json(&c, &ext).await;
    assert_eq!(status, 200, "{disc}");
    for name in ["weir_tier_queue_depth", "weir_tier_queue_wait_seconds"] {
        assert!(
            disc["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == name),
            "{name} not in {disc}"
        );
    }
    let depth_url = format!(
        "{ext}/namespaces/default/weir_tier_queue_depth?labelSelector=pool%3Dm,tier%3Dbatch"
    );
    let (_, idle) = get_json(&c, &depth_url).await;
    assert_eq!(idle["items"][0]["value"], "0", "{idle}");

    // One long request occupies the pod; once the router has scraped it busy, three more queue in weir.
    let send = |i: usize| {
        let body = json!({"model": "m", "prompt": format!("request {i} "), "max_tokens": 1000,
            "ignore_eos": true, "stream": true});
        let req = client()
            .post(format!("{}/v1/completions", router.url()))
            .bearer_auth("sk-ba")
            .json(&body)
            .send();
        tokio::spawn(async move {
            let mut r = req.await.unwrap();
            assert_eq!(r.status(), 200);
            while let Ok(Some(_)) = r.chunk().await {}
        })
    };
    let mut held = vec![send(0)];
    eventually(Duration::from_secs(10), "the pod busy", async || {
        metric(&scrape(pod.url()).await, "vllm:num_requests_running") == 1.0
    })
    .await;
    for i in 1..=3 {
        held.push(send(i));
    }
    eventually(
        Duration::from_secs(10),
        "three requests queued in the batch tier",
        async || {
            let (_, v) = get_json(&c, &depth_url).await;
            v["items"][0]["value"] == "3"
        },
    )
    .await;
    let (_, depth) = get_json(&c, &depth_url).await;
    assert_eq!(depth["items"].as_array().unwrap().len(), 1, "{depth}");
    assert_eq!(
        depth["items"][0]["metricLabels"],
        json!({"pool": "m", "tier": "batch"}),
        "{depth}"
    );
    // Other tiers' queues of the pool are listed too, empty.
    let (_, all) = get_json(
        &c,
        &format!("{ext}/namespaces/default/weir_tier_queue_depth?labelSelector=pool%3Dm"),
    )
    .await;
    let values: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["value"].as_str().unwrap())
        .collect();
    assert_eq!(values.len(), 3, "{all}");
    assert_eq!(values.iter().filter(|v| **v == "3").count(), 1, "{all}");
    // The oldest of them has been waiting a while (and for no longer than since the test started them).
    eventually(Duration::from_secs(10), "a visible oldest wait", async || {
        let (_, w) = get_json(
            &c,
            &format!("{ext}/namespaces/default/weir_tier_queue_wait_seconds?labelSelector=tier%3Dbatch"),
        )
        .await;
        milli(w["items"][0]["value"].as_str().unwrap()) >= 200
    })
    .await;

    // KEDA: the pool's queue depth over gRPC, and active.
    let mut keda = keda_client(&keda_addr).await;
    let meta = [
        ("pool", "m"),
        ("metric", "tier_queue_depth"),
        ("tier", "batch"),
        ("targetValue", "2"),
    ];
    let got = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(trigger(&meta)),
            metric_name: "weir_tier_queue_depth".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metric_values[0].metric_value, 3, "{got:?}");
    assert_eq!(got.metric_values[0].metric_value_float, 3.0, "{got:?}");
    assert!(
        keda.is_active(trigger(&meta))
            .await
            .unwrap()
            .into_inner()
            .result
    );
    let other_tier = [
        ("pool", "m"),
        ("metric", "tier_queue_depth"),
        ("tier", "interactive"),
    ];
    assert!(
        !keda
            .is_active(trigger(&other_tier))
            .await
            .unwrap()
            .into_inner()
            .result
    );

    // The JSON endpoint carries the queues too.
    let (_, pools) = get_json(&c, &format!("{adapter}/metrics-api/pools")).await;
    assert!(
        pools["tier_queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["pool"] == "m" && q["tier"] == "batch" && q["queued"] == 3),
        "{pools}"
    );
    for h in held {
        h.abort();
    }
}
