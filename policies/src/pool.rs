//! Pool identity and the per-pod load sample that leaves the router: what `metrics-adapter` and `autoscaler` read.
//!
//! A pool, for scaling, is model × role × GPU type ([`PoolKey`]): prefill and decode pods of one model on H100s
//! scale apart from the same model's pods on L4s. The router turns its live endpoint state into one [`PodSample`]
//! per pod (served as JSON on `GET /debug/pods`, or read in process), and [`aggregate`] folds samples into per-pool
//! figures. Everything here is pure: no clock, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::endpoint::Role;

/// Pod label (and static-config key) carrying the GPU type, e.g. `H100`, `A100-80`, `L4`.
pub const GPU_LABEL: &str = "weir.dev/gpu";

/// Info series `weir sim` prints with its GPU type, in the style of `vllm:cache_config_info` (value 1, the facts in
/// labels): `weir_gpu_info{gpu="H100"} 1.0`. The router reads it when an endpoint carries no GPU label.
pub const GPU_INFO_SERIES: &str = "weir_gpu_info";

/// One pod's load as one router replica saw it at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodSample {
    /// Endpoint id in the router (`pod:port` for Kubernetes pods, `host:port` for static endpoints).
    pub id: String,
    /// The pod name the Kubernetes metrics APIs key by (`describedObject.name`): the pod's name for discovered
    /// pods, the endpoint id for static ones.
    pub pod: String,
    /// Router pool (InferencePool or config pool) the pod serves in.
    pub pool: String,
    /// Model the pool serves.
    pub model: String,
    /// P/D role, as its label value (`prefill`, `decode`, `prefill-decode`).
    pub role: String,
    /// GPU type from the `weir.dev/gpu` label, config, or the pod's `weir_gpu_info` series; `None` when unknown.
    pub gpu: Option<String>,
    /// Pod labels (Kubernetes) or config labels, for label selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Engine-reported load; `None` when never scraped or the last scrapes failed (stale).
    pub scraped: Option<ScrapedSample>,
    /// Requests this router replica has in flight to the pod.
    pub in_flight: u32,
    /// Prompt + expected output tokens of those requests.
    pub in_flight_tokens: u64,
    /// Uncached prompt tokens of those requests still waiting for their first token (queued prefill work).
    pub prefill_tokens: u64,
}

/// The engine's own numbers from the last fresh `/metrics` scrape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScrapedSample {
    /// `vllm:num_requests_waiting`.
    pub waiting: u32,
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:kv_cache_usage_perc`, 0..=1.
    pub kv_usage: f64,
    /// Age of the scrape when the sample was taken, in ms.
    pub age_ms: u64,
}

impl PodSample {
    /// The scaling pool this pod belongs to.
    pub fn key(&self) -> PoolKey {
        PoolKey {
            model: self.model.clone(),
            role: self.role.clone(),
            gpu: self.gpu.clone().unwrap_or_else(|| "unknown".to_string()),
        }
    }

    /// Parsed role (unknown values read as `Both`).
    pub fn role(&self) -> Role {
        Role::from_label(&self.role).unwrap_or_default()
    }
}

/// Scaling-pool identity: model × role × GPU type. Its [`Display`](std::fmt::Display) form,
/// `<model>/<role>/<gpu>`, is the `pool` label of per-pool metrics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PoolKey {
    pub model: String,
    pub role: String,
    /// `unknown` when no source names the GPU.
    pub gpu: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.model, self.role, self.gpu)
    }
}

/// Per-pool sums and means over the pods of one [`PoolKey`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolAggregate {
    pub key: PoolKey,
    /// Pods in the pool.
    pub pods: u32,
    /// Pods with a fresh scrape; the engine figures below cover only these.
    pub scraped_pods: u32,
    /// Mean KV-cache utilization over scraped pods (0 when none).
    pub kv_usage_mean: f64,
    /// Highest KV-cache utilization over scraped pods.
    pub kv_usage_max: f64,
    /// Sum of engine queues.
    pub waiting: u64,
    /// Sum of engine batches.
    pub running: u64,
    /// Sum of router in-flight requests.
    pub in_flight: u64,
    /// Sum of router in-flight tokens.
    pub in_flight_tokens: u64,
    /// Sum of queued (pre-first-token) prompt tokens.
    pub prefill_tokens: u64,
}

/// Merges the views of several router replicas: per pod id, engine numbers from the freshest scrape, router-side
/// counts summed (each replica only knows its own in-flight requests). Output sorted by id.
pub fn merge_replicas(replicas: impl IntoIterator<Item = Vec<PodSample>>) -> Vec<PodSample> {
    let mut by_id: BTreeMap<String, PodSample> = BTreeMap::new();
    for sample in replicas.into_iter().flatten() {
        match by_id.get_mut(&sample.id) {
            None => {
                by_id.insert(sample.id.clone(), sample);
            }
            Some(m) => {
                m.in_flight = m.in_flight.saturating_add(sample.in_flight);
                m.in_flight_tokens = m.in_flight_tokens.saturating_add(sample.in_flight_tokens);
                m.prefill_tokens = m.prefill_tokens.saturating_add(sample.prefill_tokens);
                let fresher = match (m.scraped, sample.scraped) {
                    (None, Some(_)) => true,
                    (Some(a), Some(b)) => b.age_ms < a.age_ms,
                    _ => false,
                };
                if fresher {
                    m.scraped = sample.scraped;
                }
                if m.gpu.is_none() {
                    m.gpu = sample.gpu;
                }
            }
        }
    }
    by_id.into_values().collect()
}

/// Per-pool aggregates, sorted by key.
pub fn aggregate(samples: &[PodSample]) -> Vec<PoolAggregate> {
    let mut pools: BTreeMap<PoolKey, PoolAggregate> = BTreeMap::new();
    for s in samples {
        let key = s.key();
        let a = pools.entry(key.clone()).or_insert_with(|| PoolAggregate {
            key,
            pods: 0,
            scraped_pods: 0,
            kv_usage_mean: 0.0,
            kv_usage_max: 0.0,
            waiting: 0,
            running: 0,
            in_flight: 0,
            in_flight_tokens: 0,
            prefill_tokens: 0,
        });
        a.pods += 1;
        a.in_flight += u64::from(s.in_flight);
        a.in_flight_tokens += s.in_flight_tokens;
        a.prefill_tokens += s.prefill_tokens;
        if let Some(sc) = s.scraped {
            a.scraped_pods += 1;
            // Running sum for now; divided below.
            a.kv_usage_mean += sc.kv_usage;
            a.kv_usage_max = a.kv_usage_max.max(sc.kv_usage);
            a.waiting += u64::from(sc.waiting);
            a.running += u64::from(sc.running);
        }
    }
    pools
        .into_values()
        .map(|mut a| {
            if a.scraped_pods > 0 {
                a.kv_usage_mean /= f64::from(a.scraped_pods);
            }
            a
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(id: &str, role: &str, gpu: Option<&str>, kv: Option<f64>) -> PodSample {
        PodSample {
            id: id.into(),
            pod: id.into(),
            pool: "p".into(),
            model: "m".into(),
            role: role.into(),
            gpu: gpu.map(Into::into),
            labels: BTreeMap::new(),
            scraped: kv.map(|kv_usage| ScrapedSample {
                waiting: 2,
                running: 3,
                kv_usage,
                age_ms: 50,
            }),
            in_flight: 4,
            in_flight_tokens: 400,
            prefill_tokens: 100,
        }
    }

    #[test]
    fn aggregates_per_model_role_and_gpu() {
        let pods = vec![
            sample("a", "decode", Some("H100"), Some(0.2)),
            sample("b", "decode", Some("H100"), Some(0.6)),
            sample("c", "decode", Some("H100"), None),
            sample("d", "prefill", Some("H100"), Some(0.1)),
            sample("e", "decode", None, Some(0.9)),
        ];
        let pools = aggregate(&pods);
        let keys: Vec<String> = pools.iter().map(|p| p.key.to_string()).collect();
        assert_eq!(
            keys,
            ["m/decode/H100", "m/decode/unknown", "m/prefill/H100"]
        );
        let h = &pools[0];
        assert_eq!((h.pods, h.scraped_pods), (3, 2));
        assert!((h.kv_usage_mean - 0.4).abs() < 1e-12);
        assert_eq!(h.kv_usage_max, 0.6);
        assert_eq!((h.waiting, h.running), (4, 6));
        assert_eq!(
            (h.in_flight, h.in_flight_tokens, h.prefill_tokens),
            (12, 1200, 300)
        );
    }

    #[test]
    fn merging_replicas_sums_router_counts_and_keeps_the_freshest_scrape() {
        let a = sample("x", "decode", None, Some(0.2));
        let mut b = sample("x", "decode", Some("L4"), Some(0.7));
        b.scraped.as_mut().unwrap().age_ms = 10;
        let merged = merge_replicas([vec![a], vec![b, sample("y", "decode", None, None)]]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].in_flight, 8);
        assert_eq!(merged[0].scraped.unwrap().kv_usage, 0.7);
        assert_eq!(merged[0].gpu.as_deref(), Some("L4"));
    }

    #[test]
    fn samples_round_trip_through_json() {
        let s = sample("a", "prefill", Some("A100-80"), Some(0.5));
        let back: PodSample = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.role(), Role::Prefill);
    }
}
