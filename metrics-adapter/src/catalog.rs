//! The metrics the adapter serves: one [`Metric`] per name, with how a pod's value is read from a router
//! [`PodSample`] and how per-pod values fold into a pool or object value.

use policies::pool::PodSample;

/// How per-pod values combine into one value for a pool or an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// Counts (queues, tokens): the pool's total.
    Sum,
    /// Ratios (KV utilization): the mean over pods.
    Mean,
    /// Ages (oldest wait): the largest.
    Max,
}

/// One served metric.
#[derive(Debug)]
pub struct Metric {
    /// Name in the metrics APIs (`pods/<name>`, external `weir_pool_<name>`), and in the JSON endpoint.
    pub name: &'static str,
    pub help: &'static str,
    pub fold: Fold,
    /// The value from a router sample; `None` when the pod has no fresh scrape (still loading, or its scrapes are
    /// failing): such a pod is left out, never reported as 0 (the HPA would count it as idle capacity).
    pub from_sample: fn(&PodSample) -> Option<f64>,
}

/// Every metric the router snapshot can answer.
pub static METRICS: &[Metric] = &[
    Metric {
        name: "weir_kv_cache_utilization",
        help: "vllm:kv_cache_usage_perc, 0..1: share of the pod's KV-cache blocks in use",
        fold: Fold::Mean,
        from_sample: |s| s.scraped.map(|c| c.kv_usage),
    },
    Metric {
        name: "weir_num_requests_waiting",
        help: "vllm:num_requests_waiting: requests queued in the engine",
        fold: Fold::Sum,
        from_sample: |s| s.scraped.map(|c| f64::from(c.waiting)),
    },
    Metric {
        name: "weir_num_requests_running",
        help: "vllm:num_requests_running: requests in the engine's batch",
        fold: Fold::Sum,
        from_sample: |s| s.scraped.map(|c| f64::from(c.running)),
    },
    Metric {
        name: "weir_in_flight_requests",
        help: "requests the router replicas have in flight to the pod",
        fold: Fold::Sum,
        from_sample: |s| s.scraped.map(|_| f64::from(s.in_flight)),
    },
    Metric {
        name: "weir_in_flight_tokens",
        help: "prompt + expected output tokens of the routers' in-flight requests",
        fold: Fold::Sum,
        from_sample: |s| s.scraped.map(|_| s.in_flight_tokens as f64),
    },
    Metric {
        name: "weir_queued_prompt_tokens",
        help: "uncached prompt tokens of in-flight requests still before their first token (prefill backlog)",
        fold: Fold::Sum,
        from_sample: |s| s.scraped.map(|_| s.prefill_tokens as f64),
    },
];

/// The metric called `name`.
pub fn find(name: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.name == name)
}

/// Folds values with `fold`; `None` for no values.
pub fn fold(fold: Fold, values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (mut n, mut sum, mut max) = (0u32, 0.0, f64::NEG_INFINITY);
    for v in values {
        n += 1;
        sum += v;
        max = max.max(v);
    }
    (n > 0).then(|| match fold {
        Fold::Sum => sum,
        Fold::Mean => sum / f64::from(n),
        Fold::Max => max,
    })
}

/// One admission queue: a pool's requests of one tier waiting for dispatch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TierQueue {
    /// Router pool the queue admits into.
    pub pool: String,
    /// `interactive`, `standard` or `batch`.
    pub tier: String,
    /// Requests waiting.
    pub queued: u64,
    /// How long the oldest of them has waited (0 for an empty queue).
    pub oldest_wait_seconds: f64,
}

/// Admission's queues per pool × tier, as the `weir` binary reads them from the router's admission.
pub trait TierQueues: Send + Sync {
    fn tier_queues(&self) -> Vec<TierQueue>;
    /// A receiver that changes whenever a queue's depth does (`None`: read on a poll only).
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// One metric over admission's queues (external metrics with labels `pool` and `tier`, and the KEDA scaler).
#[derive(Debug)]
pub struct TierMetric {
    pub name: &'static str,
    pub help: &'static str,
    /// How several queues (a pool's tiers, several pools) combine.
    pub fold: Fold,
    pub from_queue: fn(&TierQueue) -> f64,
}

/// Every tier-queue metric.
pub static TIER_METRICS: &[TierMetric] = &[
    TierMetric {
        name: "weir_tier_queue_depth",
        help: "requests admission holds for the pool in the tier's queue (admission_queued)",
        fold: Fold::Sum,
        from_queue: |q| q.queued as f64,
    },
    TierMetric {
        name: "weir_tier_queue_wait_seconds",
        help: "how long the oldest request in the pool's tier queue has waited",
        fold: Fold::Max,
        from_queue: |q| q.oldest_wait_seconds,
    },
];

/// The tier-queue metric called `name`.
pub fn find_tier(name: &str) -> Option<&'static TierMetric> {
    TIER_METRICS.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_folds_behave() {
        let mut names: Vec<_> = METRICS.iter().map(|m| m.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), METRICS.len());
        assert_eq!(fold(Fold::Sum, [1.0, 2.0]), Some(3.0));
        assert_eq!(fold(Fold::Mean, [1.0, 2.0]), Some(1.5));
        assert_eq!(fold(Fold::Mean, []), None);
        assert_eq!(fold(Fold::Max, [1.0, 3.0, 2.0]), Some(3.0));
        let mut tier: Vec<_> = TIER_METRICS.iter().map(|m| m.name).collect();
        tier.retain(|t| find(t).is_none());
        assert_eq!(tier.len(), TIER_METRICS.len());
    }
}
