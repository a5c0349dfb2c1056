//! Adapter query latency with 1,000 pods in 12 scaling pools (issue 22: p99 ≤ 5 ms), in process: the axum app
//! through `oneshot` (routing, selector parsing, folding, JSON) and the KEDA service's `GetMetrics` called directly
//! (no socket, no TLS: those cost the same whatever the fleet size). The source is the router's in-process feed,
//! which clones the 1,000 samples on every read, as `PodsHandle::samples` does in `weir serve`.
//!
//! Criterion prints its own mean/median; each case also records every iteration's time and prints p50/p99/max,
//! the numbers the target is about.
#![allow(clippy::unwrap_used)] // bench setup: a failed unwrap is a failed bench

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use metrics_adapter::api::{AdapterConfig, AdapterState, app};
use metrics_adapter::keda::Scaler;
use metrics_adapter::keda::proto::external_scaler_server::ExternalScaler;
use metrics_adapter::keda::proto::{GetMetricsRequest, ScaledObjectRef};
use metrics_adapter::source::{RouterFeed, RouterSource, Source};
use parking_lot::Mutex;
use policies::pool::{PodSample, ScrapedSample};
use tower::ServiceExt;

const PODS: usize = 1000;
const MODELS: [&str; 3] = ["llama-8b", "llama-70b", "qwen-32b"];
const ROLES: [&str; 2] = ["prefill", "decode"];
const GPUS: [&str; 2] = ["H100", "L4"];

/// 1,000 pods spread over 3 models × 2 roles × 2 GPUs = 12 scaling pools (3 router pools, one per model).
fn fleet() -> Vec<PodSample> {
    (0..PODS)
        .map(|i| {
            let (model, role, gpu) = (MODELS[i % 3], ROLES[(i / 3) % 2], GPUS[(i / 6) % 2]);
            let deployment = format!("{model}-{role}-{}", gpu.to_lowercase());
            PodSample {
                id: format!("10.0.{}.{}:8000", i / 250, i % 250),
                pod: format!("{deployment}-{i:04}"),
                pool: model.into(),
                model: model.into(),
                role: role.into(),
                gpu: Some(gpu.into()),
                labels: BTreeMap::from([
                    ("app".to_string(), deployment.clone()),
                    ("weir.dev/pool".to_string(), deployment),
                    ("llm-d.ai/role".to_string(), role.to_string()),
                    ("pod-template-hash".to_string(), format!("{:x}", i * 7919)),
                ]),
                scraped: Some(ScrapedSample {
                    waiting: (i % 5) as u32,
                    running: (i % 17) as u32,
                    kv_usage: (i % 100) as f64 / 100.0,
                    age_ms: 40,
                }),
                in_flight: (i % 9) as u32,
                in_flight_tokens: (i * 131 % 20_000) as u64,
                prefill_tokens: (i * 37 % 4_000) as u64,
            }
        })
        .collect()
}

/// Runs `f` for every iteration criterion asks, timing each; the times go to `samples`.
#[allow(clippy::disallowed_methods)] // a bench shell: timing iterations is its job
fn timed<F: FnMut()>(samples: &Mutex<Vec<Duration>>, iters: u64, mut f: F) -> Duration {
    let mut total = Duration::ZERO;
    let mut local = Vec::with_capacity(iters as usize);
    for _ in 0..iters {
        let t = std::time::Instant::now();
        f();
        let d = t.elapsed();
        total += d;
        local.push(d);
    }
    samples.lock().extend(local);
    total
}

fn report(name: &str, samples: &Mutex<Vec<Duration>>) {
    let mut s = samples.lock().clone();
    s.sort();
    let q = |p: f64| s[((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1];
    println!(
        "{name}: n={} p50={:?} p99={:?} max={:?} (p99 target 5 ms: {})",
        s.len(),
        q(0.50),
        q(0.99),
        s[s.len() - 1],
        if q(0.99) <= Duration::from_millis(5) {
            "met"
        } else {
            "MISSED"
        }
    );
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pods = Arc::new(fleet());
    let source: Arc<dyn Source> = Arc::new(RouterSource::new(RouterFeed::InProcess(Arc::new(
        move || (*pods).clone(),
    ))));
    let state = Arc::new(AdapterState {
        source: source.clone(),
        config: AdapterConfig {
            external: true,
            ..AdapterConfig::default()
        },
        clock: Arc::new(|| 1_795_514_400),
    });
    let router = app(state);
    let get = |uri: &str| {
        let router = router.clone();
        let req = Request::get(uri).body(Body::empty()).unwrap();
        rt.block_on(async move {
            let r = router.oneshot(req).await.unwrap();
            assert!(r.status().is_success(), "{uri}: {}", r.status());
            r.into_body().collect().await.unwrap().to_bytes()
        })
    };

    // The HPA's Pods query for one Deployment (labelSelector = its pod selector): 1,000 pods scanned, 84 listed.
    let pods_uri = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/llm/pods/*/weir_kv_cache_utilization\
                    ?labelSelector=app%3Dllama-8b-decode-h100";
    let body: serde_json::Value = serde_json::from_slice(&get(pods_uri)).unwrap();
    assert!(body["items"].as_array().unwrap().len() >= 40, "{body}");
    // The HPA's External query for one scaling pool.
    let ext_uri = "/apis/external.metrics.k8s.io/v1beta1/namespaces/llm/weir_pool_num_requests_waiting\
                   ?labelSelector=model%3Dllama-70b,role%3Ddecode,gpu%3DL4";
    let body: serde_json::Value = serde_json::from_slice(&get(ext_uri)).unwrap();
    assert_eq!(body["items"].as_array().unwrap().len(), 1, "{body}");

    let mut g = c.benchmark_group("adapter_1000_pods");
    g.sample_size(100).measurement_time(Duration::from_secs(5));
    for (name, uri) in [
        ("custom_pods_label_selector", pods_uri),
        ("external_per_pool", ext_uri),
    ] {
        let samples = Mutex::new(Vec::new());
        g.bench_function(name, |b| {
            b.iter_custom(|iters| timed(&samples, iters, || drop(get(uri))))
        });
        report(name, &samples);
    }

    // KEDA GetMetrics for one pool's waiting requests, called on the service.
    let scaler = Scaler::new(source, Duration::from_millis(200));
    let request = || {
        tonic::Request::new(GetMetricsRequest {
            scaled_object_ref: Some(ScaledObjectRef {
                name: "qwen-32b-decode-h100".into(),
                namespace: "llm".into(),
                scaler_metadata: [
                    ("pool", "qwen-32b"),
                    ("role", "decode"),
                    ("gpu", "H100"),
                    ("metric", "num_requests_waiting"),
                    ("targetValue", "4"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            }),
            metric_name: "weir_num_requests_waiting".into(),
        })
    };
    let got = rt
        .block_on(scaler.get_metrics(request()))
        .unwrap()
        .into_inner();
    assert!(got.metric_values[0].metric_value > 0, "{got:?}");
    let samples = Mutex::new(Vec::new());
    g.bench_function("keda_get_metrics", |b| {
        b.iter_custom(|iters| {
            timed(&samples, iters, || {
                drop(rt.block_on(scaler.get_metrics(request())).unwrap())
            })
        })
    });
    report("keda_get_metrics", &samples);
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
