//! Scale from zero end to end (a module of the metrics-adapter test binary): `weir serve` with a Kubernetes pool
//! that has no pod (a fake API server whose pod list the test changes), KEDA's `StreamIsActive` open over gRPC, one
//! completion held in admission's queue, the push within 1 s, then a `weir sim` pod started and reported Ready, and
//! the held request served by it and counted once.

use std::time::Duration;

use bytes::Bytes;
use metrics_adapter::keda::proto::GetMetricsRequest;
use metrics_adapter::keda::proto::external_scaler_client::ExternalScalerClient;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::common::*;

/// A Kubernetes API whose namespace `default` has no pod until [`FakeKube::add_ready_pod`]: lists answer the
/// current pods, watches stay open and deliver the pod as an `ADDED` event once it is there (the watch a
/// Deployment's first pod turning Ready would wake).
struct FakeKube {
    url: String,
    pod: watch::Sender<Option<Value>>,
}

impl FakeKube {
    async fn start() -> FakeKube {
        let (pod, rx) = watch::channel(None::<Value>);
        let pods = move |uri: axum::http::Uri| {
            let rx = rx.clone();
            async move {
                use axum::response::IntoResponse;
                if uri.query().unwrap_or("").contains("watch=true") {
                    // One ADDED event when the pod exists, then silence (the watch stays open).
                    let events =
                        futures::stream::unfold((rx, false), |(mut rx, sent)| async move {
                            if sent {
                                std::future::pending::<()>().await;
                            }
                            let pod = rx.wait_for(Option::is_some).await.ok()?.clone()?;
                            let ev = json!({"type": "ADDED", "object": pod});
                            Some((
                                Ok::<_, std::io::Error>(Bytes::from(format!("{ev}\n"))),
                                (rx, true),
                            ))
                        });
                    return axum::body::Body::from_stream(events).into_response();
                }
                let items: Vec<Value> = rx.borrow().iter().cloned().collect();
                let rv = if items.is_empty() { "1" } else { "2" };
                axum::Json(json!({"apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": rv}, "items": items}))
                .into_response()
            }
        };
        let app =
            axum::Router::new().route("/api/v1/namespaces/default/pods", axum::routing::get(pods));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.ok() });
        FakeKube { url, pod }
    }

    /// Pod `vllm-0` (IP 127.0.0.1, label `app: vllm`) exists and is Ready.
    fn add_ready_pod(&self) {
        self.pod.send_replace(Some(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "vllm-0", "namespace": "default", "resourceVersion": "2",
                         "labels": {"app": "vllm"}},
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
        })));
    }
}

/// A loopback port free now (the pod binds it later: the router must know it before the pod exists).
fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_at_zero_holds_its_first_request_pushes_keda_and_serves_it_once_a_pod_is_ready() {
    let kube = FakeKube::start().await;
    let port = free_port();
    // A tenant whose requests may wait a minute: long enough for a pod to start.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("weir.yaml");
    let key_hash = policies::tenant::ApiKeyHash::of("sk-z").to_hex();
    std::fs::write(
        &cfg,
        format!(
            "tenants:\n  - {{tenant: z, queue: {{maxWaitMs: 60000}}, \
             identity: {{apiKeys: [{{sha256: '{key_hash}'}}]}}}}\n"
        ),
    )
    .unwrap();
    // The pool `m` is known from the flags alone: its route exists before any pod does.
    let router = Weir::serve(&[
        "--config",
        cfg.to_str().unwrap(),
        "--k8s-api",
        &kube.url,
        "--k8s-selector",
        "app=vllm",
        "--k8s-ports",
        &port,
        "--k8s-pool",
        "m",
        "--scrape-interval",
        "50ms",
        "--keda-scaler-listen",
        "127.0.0.1:0",
    ])
    .await;
    let addr = router.json()["keda_scaler"].as_str().unwrap().to_string();
    let mut keda = super::keda_client(&addr).await;
    // The usual trigger of a pool: its pods' engine queues. At zero there are no pods to report one.
    let meta = [
        ("pool", "m"),
        ("metric", "num_requests_waiting"),
        ("targetValue", "2"),
    ];
    let active = async |keda: &mut ExternalScalerClient<tonic::transport::Channel>| {
        keda.is_active(super::trigger(&meta))
            .await
            .unwrap()
            .into_inner()
            .result
    };
    assert!(!active(&mut keda).await);
    let mut stream = keda
        .stream_is_active(super::trigger(&meta))
        .await
        .unwrap()
        .into_inner();
    let first = super::next_push(
        &mut stream,
        Duration::from_secs(5),
        "the stream's first state",
    )
    .await;
    assert!(!first.result);

    // One completion for the pool at zero: held, and pushed to KEDA within 1 s.
    let url = format!("{}/v1/completions", router.url());
    let body =
        json!({"model": "m", "prompt": "hello from zero", "max_tokens": 8, "ignore_eos": true});
    let sent_at = tokio::time::Instant::now();
    let req = tokio::spawn(async move {
        let r = client()
            .post(url)
            .bearer_auth("sk-z")
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, h) = (r.status().as_u16(), r.headers().clone());
        (status, h, r.text().await.unwrap())
    });
    let pushed = super::next_push(
        &mut stream,
        Duration::from_secs(5),
        "a StreamIsActive push for the held request",
    )
    .await;
    let after = sent_at.elapsed();
    assert!(pushed.result, "{pushed:?}");
    assert!(
        after <= Duration::from_secs(1),
        "the push came {after:?} after the request"
    );
    assert!(active(&mut keda).await);
    // Held in the tier queue: KEDA's queue depth and the router's own gauge say 1.
    let depth = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(super::trigger(&[
                ("pool", "m"),
                ("metric", "tier_queue_depth"),
            ])),
            metric_name: "weir_tier_queue_depth".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(depth.metric_values[0].metric_value, 1, "{depth:?}");
    let queued = metric_sum(
        &scrape(router.url()).await,
        "admission_queued",
        r#"pool="m""#,
    );
    assert_eq!(queued, 1.0);
    assert!(!req.is_finished(), "answered while the pool had no pod");

    // The pod starts, passes its readiness and is reported Ready: the held request goes to it.
    let pod = Weir::sim_on(&port, "50", &["--served-model-name", "m"]).await;
    kube.add_ready_pod();
    let (status, h, text) = tokio::time::timeout(Duration::from_secs(30), req)
        .await
        .expect("the held request served once the pod was ready")
        .unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(h["x-weir-endpoint"], format!("vllm-0:{port}").as_str());
    let v: Value = serde_json::from_str(&text).unwrap();
    let (prompt, completion) = (
        v["usage"]["prompt_tokens"].as_f64().unwrap(),
        v["usage"]["completion_tokens"].as_f64().unwrap(),
    );
    assert_eq!(completion, 8.0, "{v}");

    // Counted once: the router's token counters, the tenant's ledger row and the pod's own counters all equal the
    // answer's usage.
    let m = scrape(router.url()).await;
    assert_eq!(metric_sum(&m, "weir_tokens_total", "Prompt"), prompt, "{m}");
    assert_eq!(
        metric_sum(&m, "weir_tokens_total", "Completion"),
        completion
    );
    let usage: Value = client()
        .get(format!("{}/v1/usage", router.url()))
        .bearer_auth("sk-z")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row = &usage["data"][0];
    assert_eq!(usage["data"].as_array().unwrap().len(), 1, "{usage}");
    assert_eq!(
        (
            row["admitted"].as_f64(),
            row["completed"].as_f64(),
            row["prompt_tokens"].as_f64(),
            row["completion_tokens"].as_f64()
        ),
        (Some(1.0), Some(1.0), Some(prompt), Some(completion)),
        "{row}"
    );
    let own = scrape(pod.url()).await;
    assert_eq!(metric_sum(&own, "vllm:prompt_tokens_total", ""), prompt);
    assert_eq!(
        metric_sum(&own, "vllm:generation_tokens_total", ""),
        completion
    );

    // Nothing held any more, no pod queue: the stream says inactive.
    let back = super::next_push(
        &mut stream,
        Duration::from_secs(10),
        "an inactive push once served",
    )
    .await;
    assert!(!back.result);
}

/// The simulated fleet at zero: an in-process router whose pool `h100` has no pod, and the autoscaler's in-process
/// simulated-fleet actuator. Requests held for the pool make the controller step (here the test) ask for one pod;
/// discovery lists the pod only once its cold start is over ([`SimActuator::ready_endpoints`], as Kubernetes lists
/// Ready pods); every held request is then served by it, none lost (the implicit tenant waits up to 5 s; the cold
/// start is 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_pool_at_zero_holds_its_requests_through_the_cold_start_of_its_first_pod() {
    use autoscaler::sim_actuator::{SimActuator, SimPool};
    use router::discovery::{DiscoveredEndpoint, Discovery};

    let cfg = router::config::RawConfig::from_yaml(&format!(
        "pools: [{{name: h100, model: '{MODEL}'}}]\nscrape: {{interval: 50ms}}\n"
    ))
    .unwrap()
    .validate()
    .unwrap();
    let mut discovery = Discovery::new();
    discovery.add_static(&cfg);
    let pods_tx = discovery.add_source("simulated fleet");
    let state = router::start(&cfg, discovery, Default::default(), 0, 1).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/completions", listener.local_addr().unwrap());
    tokio::spawn(router::app::serve(
        listener,
        state.clone(),
        std::future::pending(),
        Duration::from_secs(1),
    ));
    let held = || {
        let now = tokio::time::Instant::now().into_std();
        let q = state.admission.as_ref().unwrap().tier_queues(now);
        q.iter()
            .filter(|q| q.pool == "h100")
            .map(|q| q.queued)
            .sum::<u64>()
    };
    let profile = sim::profile::Profile::resolve("h100", "llama-3.1-8b").unwrap();
    let mut template = sim::fleet::PodOptions::new(profile);
    template.time_scale = 50.0;
    template.startup_delay = Some(1.0);
    let mut fleet = SimActuator::new(vec![SimPool {
        name: "h100".into(),
        template,
    }]);

    let reqs: Vec<_> = (0..3)
        .map(|i| {
            let (url, body) = (
                url.clone(),
                json!({"model": MODEL, "prompt": format!("request {i}"),
                "max_tokens": 4, "ignore_eos": true}),
            );
            tokio::spawn(async move { post_json(&url, &body, &[]).await })
        })
        .collect();
    eventually(Duration::from_secs(10), "three requests held", async || {
        held() == 3
    })
    .await;
    // The controller's step: requests held for a pool at zero ask for its first pod.
    assert_eq!(fleet.scale(0, 1).await.unwrap(), 1);
    let asked = tokio::time::Instant::now();
    // Discovery follows the fleet's ready pods until every request is answered.
    let publish = |fleet: &SimActuator| {
        let now = tokio::time::Instant::now();
        let eps = fleet
            .ready_endpoints(now)
            .iter()
            .map(|(pool, e)| DiscoveredEndpoint::from_url(pool, &e.url))
            .collect();
        pods_tx.send_replace(eps);
    };
    publish(&fleet);
    assert!(pods_tx.borrow().is_empty(), "listed while still loading");
    while !reqs.iter().all(|r| r.is_finished()) {
        assert!(asked.elapsed() < Duration::from_secs(30), "not served");
        let next = fleet.next_ready(tokio::time::Instant::now());
        let wake = next.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_millis(20));
        tokio::time::sleep_until(wake).await;
        publish(&fleet);
    }
    let served_at = asked.elapsed();
    for r in reqs {
        let (status, text) = r.await.unwrap();
        assert_eq!(status, 200, "{text}");
    }
    assert!(
        served_at >= Duration::from_secs(1),
        "served before the pod was ready: {served_at:?}"
    );
    assert_eq!(held(), 0);
    let row = &state.admission.as_ref().unwrap().usage("default")[0];
    assert_eq!(
        (row.counters.admitted, row.counters.completed),
        (3, 3),
        "{row:?}"
    );
    let pod_url = fleet.ready_endpoints(tokio::time::Instant::now())[0]
        .1
        .url
        .clone();
    let own = scrape(&pod_url).await;
    assert_eq!(
        metric_sum(&own, "vllm:request_success_total", ""),
        3.0,
        "{own}"
    );
    fleet.shutdown().await;
}
