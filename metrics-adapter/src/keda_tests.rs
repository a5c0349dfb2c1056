//! The KEDA scaler's trigger metadata, values and activation, and `StreamIsActive` pushes over a source at zero pods.

use std::collections::BTreeMap;

use policies::pool::PoolKey;

use super::*;

fn meta(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(name: &str, pool: &str, role: &str, gpu: &str, value: f64) -> PodValue {
    PodValue {
        pod: name.into(),
        pool: pool.into(),
        key: PoolKey {
            model: "llama".into(),
            role: role.into(),
            gpu: gpu.into(),
        },
        labels: BTreeMap::new(),
        value,
    }
}

#[test]
fn metadata_names_metric_selection_and_targets() {
    let t = Trigger::from_metadata(&meta(&[
        ("scalerAddress", "x:9100"),
        ("metric", "kv_cache_utilization"),
        ("pool", "llama"),
        ("role", "decode"),
        ("targetValue", "0.7"),
        ("activationTargetValue", "0.1"),
    ]))
    .unwrap();
    assert_eq!(t.metric.name(), "weir_kv_cache_utilization");
    assert_eq!((t.target, t.activation), (Some(0.7), 0.1));
    let d = Trigger::from_metadata(&meta(&[])).unwrap();
    assert_eq!(
        (d.metric.name(), d.target, d.activation),
        (DEFAULT_METRIC, None, 0.0)
    );
}

#[test]
fn bad_metadata_is_invalid_argument() {
    for bad in [
        &[("metric", "nope")][..],
        &[("targetValue", "x")],
        &[("targetValue", "0")],
        &[("activationTargetValue", "NaN")],
    ] {
        let e = Trigger::from_metadata(&meta(bad)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
    }
}

#[test]
fn value_sums_the_selected_pods_and_activation_is_strict() {
    let pods = [
        pod("a", "llama", "decode", "h100", 3.0),
        pod("b", "llama", "decode", "h100", 2.0),
        pod("c", "llama", "prefill", "l4", 7.0),
        pod("d", "other", "decode", "h100", 100.0),
    ];
    let t = |kv: &[(&str, &str)]| Trigger::from_metadata(&meta(kv)).unwrap();
    assert_eq!(
        t(&[("pool", "llama"), ("role", "decode")]).value(&pods),
        5.0
    );
    assert_eq!(t(&[("pool", "llama")]).value(&pods), 12.0);
    assert_eq!(t(&[("pool", "llama/prefill/l4")]).value(&pods), 7.0);
    assert_eq!(t(&[("gpu", "H100")]).value(&pods), 105.0);
    assert_eq!(t(&[("pool", "none")]).value(&pods), 0.0);
    let a = t(&[("activationTargetValue", "5")]);
    assert!(!a.active(5.0));
    assert!(a.active(5.5));
}

#[test]
fn tier_metrics_fold_the_selected_queues() {
    let q = |pool: &str, tier: &str, queued: u64, wait: f64| TierQueue {
        pool: pool.into(),
        tier: tier.into(),
        queued,
        oldest_wait_seconds: wait,
    };
    let queues = [
        q("llama", "interactive", 2, 0.5),
        q("llama", "batch", 5, 9.0),
        q("other", "batch", 100, 60.0),
    ];
    let t = |kv: &[(&str, &str)]| Trigger::from_metadata(&meta(kv)).unwrap();
    let value = |kv: &[(&str, &str)]| {
        let t = t(kv);
        let TriggerMetric::Tier(m) = t.metric else {
            panic!("{kv:?}: not a tier metric");
        };
        t.tier_value(m, &queues)
    };
    let depth = ("metric", "tier_queue_depth");
    let wait = ("metric", "weir_tier_queue_wait_seconds");
    assert_eq!(value(&[depth, ("pool", "llama")]), 7.0);
    assert_eq!(value(&[depth, ("pool", "llama"), ("tier", "Batch")]), 5.0);
    assert_eq!(value(&[depth]), 107.0);
    assert_eq!(value(&[wait, ("pool", "llama")]), 9.0);
    assert_eq!(value(&[wait, ("pool", "none")]), 0.0);
}

/// A source with no pods (a pool at zero) and admission queues the test fills, announcing each change.
struct AtZero {
    queues: parking_lot::Mutex<Vec<TierQueue>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl AtZero {
    fn hold(&self, pool: &str, queued: u64) {
        *self.queues.lock() = vec![TierQueue {
            pool: pool.into(),
            tier: "standard".into(),
            queued,
            oldest_wait_seconds: 0.0,
        }];
        self.changes.send_modify(|n| *n += 1);
    }
}

impl Source for AtZero {
    fn name(&self) -> &str {
        "at zero"
    }
    fn metrics(&self) -> Vec<&'static Metric> {
        catalog::METRICS.iter().collect()
    }
    fn values<'a>(
        &'a self,
        _: &'static Metric,
    ) -> futures::future::BoxFuture<'a, crate::Result<Vec<PodValue>>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn tier_queues(&self) -> Option<Vec<TierQueue>> {
        Some(self.queues.lock().clone())
    }
    fn tier_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }
}

fn object(kv: &[(&str, &str)]) -> Request<ScaledObjectRef> {
    Request::new(ScaledObjectRef {
        name: "llama".into(),
        namespace: "default".into(),
        scaler_metadata: meta(kv),
    })
}

#[tokio::test(start_paused = true)]
async fn a_request_held_for_a_pool_at_zero_is_pushed_at_once_not_at_the_next_poll() {
    use futures::StreamExt;
    let src = Arc::new(AtZero {
        queues: parking_lot::Mutex::new(Vec::new()),
        changes: tokio::sync::watch::Sender::new(0),
    });
    // An hour between polls: only the change signal can deliver the push in time.
    let scaler = Scaler::new(src.clone(), Duration::from_secs(3600));
    let trigger = [("pool", "llama"), ("metric", "num_requests_waiting")];
    let mut stream = scaler
        .stream_is_active(object(&trigger))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.result);
    // Another pool's request does not wake this pool.
    src.hold("other", 1);
    let quiet = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
    assert!(quiet.is_err(), "{quiet:?}");
    let at = tokio::time::Instant::now();
    src.hold("llama", 1);
    let pushed = tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .expect("a push within 1 s of the held request")
        .unwrap()
        .unwrap();
    assert!(pushed.result);
    assert!(
        at.elapsed() < Duration::from_millis(10),
        "{:?}",
        at.elapsed()
    );
    let active = scaler.is_active(object(&trigger)).await.unwrap();
    assert!(active.into_inner().result);
    // The per-pod value is still the pods' sum: none.
    let m = scaler
        .get_metrics(Request::new(GetMetricsRequest {
            scaled_object_ref: Some(object(&trigger).into_inner()),
            metric_name: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.metric_values[0].metric_value, 0);
    // Served: inactive again, pushed as well.
    src.hold("llama", 0);
    let back = tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .expect("an inactive push")
        .unwrap()
        .unwrap();
    assert!(!back.result);
}

#[test]
fn held_selects_the_triggers_pool_and_tier() {
    let q = |pool: &str, tier: &str, queued: u64| TierQueue {
        pool: pool.into(),
        tier: tier.into(),
        queued,
        oldest_wait_seconds: 0.0,
    };
    let queues = [q("llama", "batch", 2), q("llama", "interactive", 0)];
    let t = |kv: &[(&str, &str)]| Trigger::from_metadata(&meta(kv)).unwrap();
    assert!(t(&[("pool", "Llama")]).held(&queues));
    assert!(t(&[]).held(&queues));
    assert!(!t(&[("pool", "other")]).held(&queues));
    assert!(!t(&[("pool", "llama"), ("tier", "interactive")]).held(&queues));
}

#[test]
fn int_values_round_up_and_never_go_negative() {
    assert_eq!(int_value(0.2), 1);
    assert_eq!(int_value(3.0), 3);
    assert_eq!(int_value(0.0), 0);
    assert_eq!(int_value(-2.0), 0);
    assert_eq!(int_value(f64::NAN), 0);
}
