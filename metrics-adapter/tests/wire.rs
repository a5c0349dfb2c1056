//! Wire shapes of the custom and external metrics APIs against the reference (`autoscaling-and-metrics-apis.md`
//! §1–§2), through `app(state).oneshot(..)` with the router source fed in process.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{APIResourceList, Status};
use metrics_adapter::api::{AdapterConfig, AdapterState, app};
use metrics_adapter::catalog::{METRICS, TIER_METRICS, TierQueue, TierQueues};
use metrics_adapter::source::{RouterFeed, RouterSource};
use policies::pool::{PodSample, ScrapedSample};
use serde_json::{Value, json};
use tower::ServiceExt;

/// 2026-11-24T10:00:00Z, the reference's example instant.
const NOW: u64 = 1_795_514_400;

fn pod(name: &str, pool: &str, role: &str, gpu: &str, waiting: Option<u32>, kv: f64) -> PodSample {
    PodSample {
        id: format!("{name}:8000"),
        pod: name.into(),
        pool: pool.into(),
        model: "llama".into(),
        role: role.into(),
        gpu: Some(gpu.into()),
        labels: BTreeMap::from([
            ("app".to_string(), "vllm".to_string()),
            ("llm-d.ai/role".to_string(), role.to_string()),
        ]),
        scraped: waiting.map(|waiting| ScrapedSample {
            waiting,
            running: 4,
            kv_usage: kv,
            age_ms: 30,
        }),
        in_flight: 6,
        in_flight_tokens: 6000,
        prefill_tokens: 1500,
    }
}

fn fleet() -> Vec<PodSample> {
    vec![
        pod(
            "llama-7f9c-abcde",
            "llama-decode",
            "decode",
            "H100",
            Some(2),
            0.5,
        ),
        pod(
            "llama-7f9c-fghij",
            "llama-decode",
            "decode",
            "H100",
            Some(3),
            0.25,
        ),
        // Still loading: never scraped, so left out rather than counted as idle.
        pod(
            "llama-7f9c-loading",
            "llama-decode",
            "decode",
            "H100",
            None,
            0.0,
        ),
        pod("llama-pf-1", "llama-prefill", "prefill", "L4", Some(0), 0.0),
    ]
}

fn state(pods: Vec<PodSample>, external: bool) -> Arc<AdapterState> {
    let pods = Arc::new(pods);
    Arc::new(AdapterState {
        source: Arc::new(RouterSource::new(RouterFeed::InProcess(Arc::new(
            move || (*pods).clone(),
        )))),
        config: AdapterConfig {
            external,
            ..AdapterConfig::default()
        },
        clock: Arc::new(|| NOW),
    })
}

async fn get(s: &Arc<AdapterState>, uri: &str) -> (StatusCode, Value) {
    let r = app(s.clone())
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

const V2: &str = "/apis/custom.metrics.k8s.io/v1beta2";

#[tokio::test]
async fn discovery_lists_every_served_metric_for_pods_objects_and_namespaces() {
    let s = state(fleet(), false);
    for version in ["v1beta2", "v1beta1"] {
        let (code, v) = get(&s, &format!("/apis/custom.metrics.k8s.io/{version}")).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            (v["kind"].as_str(), v["apiVersion"].as_str()),
            (Some("APIResourceList"), Some("v1"))
        );
        let list: APIResourceList = serde_json::from_value(v).unwrap();
        assert_eq!(
            list.group_version,
            format!("custom.metrics.k8s.io/{version}")
        );
        for m in METRICS {
            for res in [
                "pods",
                "inferencepools.inference.networking.k8s.io",
                "deployments.apps",
                "leaderworkersets.leaderworkerset.x-k8s.io",
            ] {
                let r = list
                    .resources
                    .iter()
                    .find(|r| r.name == format!("{res}/{}", m.name))
                    .unwrap_or_else(|| panic!("{res}/{} missing", m.name));
                assert!(r.namespaced);
                assert_eq!(r.kind, "MetricValueList");
                assert_eq!(r.verbs, ["get"]);
                assert_eq!(r.singular_name, "");
            }
            let ns = list
                .resources
                .iter()
                .find(|r| r.name == format!("namespaces/{}", m.name))
                .unwrap();
            assert!(!ns.namespaced, "root-scoped entries are not namespaced");
        }
    }
}

#[tokio::test]
async fn pods_list_matches_the_reference_shape_in_both_versions() {
    let s = state(fleet(), false);
    let (code, v) = get(
        &s,
        &format!("{V2}/namespaces/llm/pods/*/weir_num_requests_waiting?labelSelector=app%3Dvllm,llm-d.ai%2Frole%3Ddecode"),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        v,
        json!({"kind":"MetricValueList","apiVersion":"custom.metrics.k8s.io/v1beta2","metadata":{},
          "items":[
            {"describedObject":{"kind":"Pod","namespace":"llm","name":"llama-7f9c-abcde","apiVersion":"/v1"},
             "metric":{"name":"weir_num_requests_waiting","selector":null},
             "timestamp":"2026-11-24T10:00:00Z","windowSeconds":1,"value":"2"},
            {"describedObject":{"kind":"Pod","namespace":"llm","name":"llama-7f9c-fghij","apiVersion":"/v1"},
             "metric":{"name":"weir_num_requests_waiting","selector":null},
             "timestamp":"2026-11-24T10:00:00Z","windowSeconds":1,"value":"3"}]})
    );
    let (_, v1) = get(
        &s,
        "/apis/custom.metrics.k8s.io/v1beta1/namespaces/llm/pods/*/weir_kv_cache_utilization?labelSelector=llm-d.ai/role%3Ddecode",
    )
    .await;
    assert_eq!(v1["apiVersion"], "custom.metrics.k8s.io/v1beta1");
    assert_eq!(
        v1["items"][0],
        json!({"describedObject":{"kind":"Pod","namespace":"llm","name":"llama-7f9c-abcde","apiVersion":"/v1"},
          "metricName":"weir_kv_cache_utilization","selector":null,
          "timestamp":"2026-11-24T10:00:00Z","window":1,"value":"500m"})
    );
    assert_eq!(v1["items"][1]["value"], "250m");
    assert_eq!(
        v1["items"].as_array().unwrap().len(),
        2,
        "the loading pod is missing, not 0"
    );
    // fieldSelector narrows to one pod; a named pod works too.
    let (_, one) = get(&s, &format!("{V2}/namespaces/llm/pods/*/weir_num_requests_waiting?fieldSelector=metadata.name%3Dllama-7f9c-fghij")).await;
    assert_eq!(one["items"].as_array().unwrap().len(), 1);
    let (_, named) = get(
        &s,
        &format!("{V2}/namespaces/llm/pods/llama-pf-1/weir_queued_prompt_tokens"),
    )
    .await;
    assert_eq!(named["items"][0]["value"], "1500");
}

#[tokio::test]
async fn objects_answer_exactly_one_item_and_zero_when_there_is_no_data() {
    let s = state(fleet(), false);
    let (code, v) = get(&s, &format!("{V2}/namespaces/llm/inferencepools.inference.networking.k8s.io/llama-decode/weir_kv_cache_utilization")).await;
    assert_eq!(code, StatusCode::OK);
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0]["describedObject"],
        json!({"kind":"InferencePool","namespace":"llm","name":"llama-decode","apiVersion":"inference.networking.k8s.io/v1"})
    );
    assert_eq!(
        items[0]["value"], "375m",
        "mean of 0.5 and 0.25 over scraped pods"
    );
    let (_, d) = get(
        &s,
        &format!("{V2}/namespaces/llm/deployments.apps/llama-decode/weir_num_requests_waiting"),
    )
    .await;
    assert_eq!(d["items"][0]["value"], "5");
    assert_eq!(d["items"][0]["describedObject"]["kind"], "Deployment");
    // A known metric for an object with no pods reporting: one "0" item, never an empty list.
    let (code, z) = get(&s, &format!("{V2}/namespaces/llm/leaderworkersets.leaderworkerset.x-k8s.io/idle-pool/weir_num_requests_waiting")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(z["items"].as_array().unwrap().len(), 1);
    assert_eq!(z["items"][0]["value"], "0");
    let (_, n) = get(
        &s,
        &format!("{V2}/namespaces/llm/metrics/weir_in_flight_requests"),
    )
    .await;
    assert_eq!(n["items"][0]["value"], "18", "three scraped pods x 6");
    assert_eq!(n["items"][0]["describedObject"]["kind"], "Namespace");
}

#[tokio::test]
async fn unknown_metrics_and_resources_are_404_statuses() {
    let s = state(fleet(), false);
    for uri in [
        format!("{V2}/namespaces/llm/pods/*/no_such_metric"),
        format!("{V2}/namespaces/llm/services/x/weir_num_requests_waiting"),
        format!("{V2}/nodes/n1/weir_num_requests_waiting"),
        "/apis/custom.metrics.k8s.io/v2/namespaces/llm/pods/*/weir_num_requests_waiting"
            .to_string(),
        // External metrics are opt-in.
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/llm/weir_pool_num_requests_waiting"
            .to_string(),
    ] {
        let (code, v) = get(&s, &uri).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{uri}");
        let st: Status = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(
            (st.code, st.reason.as_deref(), st.status.as_deref()),
            (Some(404), Some("NotFound"), Some("Failure")),
            "{uri}"
        );
        assert_eq!(v["kind"], "Status");
    }
    let (code, v) = get(
        &s,
        &format!("{V2}/namespaces/llm/pods/*/weir_num_requests_waiting?labelSelector=a%20in%20x"),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(v["reason"], "BadRequest");
}

#[tokio::test]
async fn external_metrics_are_per_pool_and_never_an_empty_list() {
    let s = state(fleet(), true);
    let (_, d) = get(&s, "/apis/external.metrics.k8s.io/v1beta1").await;
    let list: APIResourceList = serde_json::from_value(d).unwrap();
    assert_eq!(list.resources.len(), METRICS.len());
    assert!(list.resources.iter().all(|r| r.namespaced
        && r.kind == "ExternalMetricValueList"
        && r.name.starts_with("weir_pool_")));
    let (code, v) = get(
        &s,
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/llm/weir_pool_num_requests_waiting?labelSelector=role%3Ddecode,gpu%3DH100",
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        v,
        json!({"kind":"ExternalMetricValueList","apiVersion":"external.metrics.k8s.io/v1beta1","metadata":{},
          "items":[{"metricName":"weir_pool_num_requests_waiting",
            "metricLabels":{"gpu":"H100","model":"llama","pool":"llama/decode/H100","role":"decode"},
            "timestamp":"2026-11-24T10:00:00Z","window":1,"value":"5"}]})
    );
    let (_, z) = get(
        &s,
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/llm/weir_pool_num_requests_waiting?labelSelector=gpu%3DA100-80",
    )
    .await;
    assert_eq!(
        z["items"],
        json!([{"metricName":"weir_pool_num_requests_waiting","metricLabels":{"gpu":"A100-80"},
        "timestamp":"2026-11-24T10:00:00Z","window":1,"value":"0"}])
    );
}

/// Admission queues as the router's admission would report them.
struct Queues(Vec<TierQueue>);

impl TierQueues for Queues {
    fn tier_queues(&self) -> Vec<TierQueue> {
        self.0.clone()
    }
}

#[tokio::test]
async fn tier_queue_metrics_are_external_per_pool_and_tier_when_admission_is_known() {
    let q = |pool: &str, tier: &str, queued: u64, wait: f64| TierQueue {
        pool: pool.into(),
        tier: tier.into(),
        queued,
        oldest_wait_seconds: wait,
    };
    let pods = Arc::new(fleet());
    let s = Arc::new(AdapterState {
        source: Arc::new(
            RouterSource::new(RouterFeed::InProcess(Arc::new(move || (*pods).clone())))
                .with_tier_queues(Arc::new(Queues(vec![
                    q("llama-decode", "interactive", 0, 0.0),
                    q("llama-decode", "batch", 12, 4.25),
                ]))),
        ),
        config: AdapterConfig {
            external: true,
            ..AdapterConfig::default()
        },
        clock: Arc::new(|| NOW),
    });
    let (_, d) = get(&s, "/apis/external.metrics.k8s.io/v1beta1").await;
    let list: APIResourceList = serde_json::from_value(d).unwrap();
    assert_eq!(list.resources.len(), METRICS.len() + TIER_METRICS.len());
    let ext = "/apis/external.metrics.k8s.io/v1beta1/namespaces/llm";
    let (code, v) = get(
        &s,
        &format!("{ext}/weir_tier_queue_depth?labelSelector=tier%3Dbatch"),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        v["items"],
        json!([{"metricName":"weir_tier_queue_depth","metricLabels":{"pool":"llama-decode","tier":"batch"},
            "timestamp":"2026-11-24T10:00:00Z","window":1,"value":"12"}])
    );
    let (_, w) = get(
        &s,
        &format!("{ext}/weir_tier_queue_wait_seconds?labelSelector=pool%3Dllama-decode"),
    )
    .await;
    let values: Vec<&str> = w["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["0", "4250m"]);
    // No queue for the pool: one "0" item, never an empty list.
    let (_, z) = get(
        &s,
        &format!("{ext}/weir_tier_queue_depth?labelSelector=pool%3Dother"),
    )
    .await;
    assert_eq!(z["items"][0]["value"], "0");
    assert_eq!(z["items"][0]["metricLabels"], json!({"pool": "other"}));
    let (_, p) = get(&s, "/metrics-api/pools").await;
    assert_eq!(p["tier_queues"][1]["queued"], 12, "{p}");

    // Without admission (the plain router source) the tier metrics are not served.
    let plain = state(fleet(), true);
    let (code, _) = get(&plain, &format!("{ext}/weir_tier_queue_depth")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pools_json_serves_every_metric_per_scaling_pool() {
    let s = state(fleet(), false);
    let (code, v) = get(&s, "/metrics-api/pools?role=decode").await;
    assert_eq!(code, StatusCode::OK);
    let pools = v["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 1);
    let p = &pools[0];
    assert_eq!(p["pool"], "llama/decode/H100");
    assert_eq!(p["weir_num_requests_waiting"], 5.0);
    assert_eq!(p["weir_kv_cache_utilization"], 0.375);
    assert_eq!(p["weir_queued_prompt_tokens"], 3000.0);
    for m in METRICS {
        assert!(p.get(m.name).is_some(), "{} missing", m.name);
    }
}

#[tokio::test]
async fn replicas_that_do_not_answer_are_a_503_not_zeros() {
    let s = Arc::new(AdapterState {
        source: Arc::new(RouterSource::new(RouterFeed::Replicas {
            urls: vec!["http://127.0.0.1:1".into()],
            client: reqwest::Client::new(),
            timeout: std::time::Duration::from_millis(500),
            ttl: std::time::Duration::from_millis(100),
        })),
        config: AdapterConfig::default(),
        clock: Arc::new(|| NOW),
    });
    let (code, v) = get(
        &s,
        &format!("{V2}/namespaces/llm/pods/*/weir_num_requests_waiting"),
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["reason"], "ServiceUnavailable");
}
