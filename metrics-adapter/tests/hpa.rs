//! HPA v2 replica arithmetic (autoscaling-and-metrics-apis.md §5: tolerance 0.1, missing pods, scale-up rate
//! policies, 300 s scale-down stabilization) driven by the values the adapter serves for a scripted load: the
//! replica counts must follow the expected scale-up and delayed scale-down.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use metrics_adapter::api::{AdapterConfig, AdapterState, app};
use metrics_adapter::source::{RouterFeed, RouterSource};
use parking_lot::Mutex;
use policies::pool::{PodSample, ScrapedSample};
use tower::ServiceExt;

/// A quantity string back to a number (`"4200m"` -> 4.2).
fn parse_quantity(q: &str) -> f64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse::<f64>().unwrap() / 1000.0,
        None => q.parse().unwrap(),
    }
}

/// The HPA controller for one `Pods` metric with an `AverageValue` target.
struct Hpa {
    target: f64,
    tolerance: f64,
    min: u32,
    max: u32,
    down_window_s: u64,
    /// (time, recommendation) within the scale-down window.
    recs: Vec<(u64, u32)>,
}

impl Hpa {
    /// One sync at `now_s`: `values` are the adapter's per-pod values, `pods` the pods the HPA selects.
    fn sync(
        &mut self,
        now_s: u64,
        current: u32,
        pods: &[String],
        values: &BTreeMap<String, f64>,
    ) -> u32 {
        let reported: Vec<f64> = pods.iter().filter_map(|p| values.get(p).copied()).collect();
        let missing = pods.len() - reported.len();
        let ready = reported.len() as f64;
        let mut ratio = reported.iter().sum::<f64>() / ready / self.target;
        let mut recommend = if (ratio - 1.0).abs() <= self.tolerance {
            current
        } else {
            (ratio * ready).ceil() as u32
        };
        if missing > 0 && recommend != current {
            // Missing pods: 0 on scale-up, exactly on target on scale-down; recompute over all selected pods.
            let fill = if recommend > current {
                0.0
            } else {
                self.target
            };
            let total = reported.iter().sum::<f64>() + fill * missing as f64;
            ratio = total / pods.len() as f64 / self.target;
            let again = (ratio * pods.len() as f64).ceil() as u32;
            // A reversed direction, or a ratio now within tolerance, means no change.
            recommend = if (ratio - 1.0).abs() <= self.tolerance
                || (again > current) != (recommend > current)
            {
                current
            } else {
                again
            };
        }
        // Scale-down stabilization: the highest recommendation of the window; scale-up takes the newest.
        self.recs.retain(|(t, _)| now_s - t < self.down_window_s);
        self.recs.push((now_s, recommend));
        let stabilized = if recommend < current {
            self.recs
                .iter()
                .map(|(_, r)| *r)
                .max()
                .unwrap_or(recommend)
                .min(current)
        } else {
            recommend
        };
        // Default scale-up policies: max(+4 pods, +100 %) per 15 s period.
        let up_cap = (current + 4).max(current * 2);
        stabilized.min(up_cap).clamp(self.min, self.max)
    }
}

fn pod(i: u32, waiting: Option<u32>) -> PodSample {
    PodSample {
        id: format!("decode-{i}:8000"),
        pod: format!("decode-{i}"),
        pool: "llama-decode".into(),
        model: "llama".into(),
        role: "decode".into(),
        gpu: Some("H100".into()),
        labels: BTreeMap::from([("app".to_string(), "llama-decode".to_string())]),
        scraped: waiting.map(|waiting| ScrapedSample {
            waiting,
            running: 8,
            kv_usage: 0.5,
            age_ms: 10,
        }),
        in_flight: 0,
        in_flight_tokens: 0,
        prefill_tokens: 0,
    }
}

#[tokio::test]
async fn hpa_follows_the_adapters_values_up_and_stabilizes_down() {
    let fleet: Arc<Mutex<Vec<PodSample>>> = Arc::new(Mutex::new(Vec::new()));
    let feed = fleet.clone();
    let state = Arc::new(AdapterState {
        source: Arc::new(RouterSource::new(RouterFeed::InProcess(Arc::new(
            move || feed.lock().clone(),
        )))),
        config: AdapterConfig::default(),
        clock: Arc::new(|| 0),
    });
    let mut hpa = Hpa {
        target: 4.0,
        tolerance: 0.1,
        min: 1,
        max: 16,
        down_window_s: 300,
        recs: Vec::new(),
    };
    // Total queued requests across the pool at each 15 s sync.
    let script: Vec<u32> = [8, 40, 40, 40, 42, 8]
        .into_iter()
        .chain(std::iter::repeat_n(8, 22))
        .collect();
    let mut replicas = 2u32;
    // Replicas at the previous sync: pods added since are still loading (never scraped).
    let mut previous = replicas;
    let mut history = Vec::new();
    for (step, total) in script.into_iter().enumerate() {
        let now_s = step as u64 * 15;
        let serving = replicas.min(previous);
        *fleet.lock() = (0..replicas)
            .map(|i| {
                pod(
                    i,
                    (i < serving).then(|| total / serving + u32::from(i < total % serving)),
                )
            })
            .collect();
        let r = app(state.clone())
            .oneshot(
                Request::get("/apis/custom.metrics.k8s.io/v1beta2/namespaces/llm/pods/*/weir_num_requests_waiting?labelSelector=app%3Dllama-decode")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let values: BTreeMap<String, f64> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["describedObject"]["name"].as_str().unwrap().to_string(),
                    parse_quantity(i["value"].as_str().unwrap()),
                )
            })
            .collect();
        assert_eq!(
            values.len() as u32,
            serving,
            "loading pods are missing, not zero"
        );
        let pods: Vec<String> = (0..replicas).map(|i| format!("decode-{i}")).collect();
        previous = replicas;
        replicas = hpa.sync(now_s, replicas, &pods, &values);
        history.push(replicas);
    }
    // 8 over 2 pods is on target; 40 jumps to the +4 cap (6); with 4 pods still loading (counted as 0 on scale-up)
    // ceil(40 / 4) = 10; a 5 % rise is within tolerance; the drop to 8 at t = 75 s waits until the last
    // recommendation of 10 (t = 60 s) leaves the 300 s window, then shrinks to 2.
    assert_eq!(&history[..6], &[2, 6, 10, 10, 10, 10], "{history:?}");
    let first_down = 5 + history[5..].iter().position(|&r| r < 10).unwrap();
    assert_eq!(first_down as u64 * 15, 60 + 300, "{history:?}");
    assert_eq!(*history.last().unwrap(), 2, "{history:?}");
}
