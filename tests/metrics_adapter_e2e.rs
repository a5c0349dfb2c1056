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

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
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
    use metrics_adapter::keda::proto::external_scaler_client::ExternalScalerClient;

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
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut keda = ExternalScalerClient::new(channel);
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
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream's first state")
        .unwrap()
        .unwrap();
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
    let pushed = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a StreamIsActive push after the queue filled")
        .unwrap()
        .unwrap();
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
    let back = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("an inactive push after the queue drained")
        .unwrap()
        .unwrap();
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
