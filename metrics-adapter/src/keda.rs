//! KEDA external scaler over gRPC (`externalscaler.proto`, autoscaling-and-metrics-apis.md §4) on the same pool
//! samples as the metrics APIs, for `ScaledObject` triggers of type `external` (polled) and `external-push`
//! (`StreamIsActive`).
//!
//! Trigger metadata (`scalerMetadata`, passed through verbatim by KEDA):
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `metric` | a served metric, with or without its `weir_` prefix (`num_requests_waiting`, `kv_cache_utilization`, `in_flight_requests`, `in_flight_tokens`, `queued_prompt_tokens`, `num_requests_running`, `tier_queue_depth`, `tier_queue_wait_seconds`) | `num_requests_waiting` |
//! | `pool` | the pods of a router pool (InferencePool name), of a `weir.dev/pool` label, or of a scaling pool `model/role/gpu` | every pod |
//! | `model`, `role`, `gpu` | narrow to that scaling-pool model, role (`prefill`, `decode`, `prefill-decode`) or GPU | any |
//! | `tier` | tier-queue metrics (`tier_queue_depth`, `tier_queue_wait_seconds`: admission's queues, when the adapter runs in the router with admission on): only this tier's queue of `pool` | every tier |
//! | `targetValue` | the per-replica target (> 0) of the HPA KEDA generates (`AverageValue`: replicas = ceil(value / target)) | required for `GetMetricSpec` |
//! | `activationTargetValue` | active (scale 0 -> 1) when the value is strictly above this | `0` |
//!
//! The value is the selected pods' **sum** of the metric, also for ratios: KEDA's default `AverageValue` target
//! divides it by `targetValue`, so a per-pod target of 0.7 KV utilization over pods summing to 2.8 asks for 4
//! replicas. `GetMetricSpec` names the metric by its full name (`weir_num_requests_waiting`); `GetMetrics` answers
//! for the metadata's metric whatever name KEDA asks with. Numbers fill both the int64 (rounded up, so a fractional
//! value never reads as 0) and the double field.
//!
//! `StreamIsActive` sends the current state when the stream opens, then re-reads the source every
//! [`Scaler::poll`] and sends each change. `StreamMetricSpec` answers `UNIMPLEMENTED` (KEDA then keeps polling
//! `GetMetricSpec`, whose answer depends on the metadata only).
//!
//! A pool with no pods has no samples, so its value is 0 and it is inactive: scaling a pool up from zero on requests
//! held for it needs the router to hold them, which it does not do yet.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};

use crate::catalog::{self, Metric, TierMetric, TierQueue};
use crate::source::{PodValue, Source};

/// The generated protocol: messages, the server trait and service, and a client (no transport: bring a channel).
#[allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
pub mod proto {
    tonic::include_proto!("externalscaler");
}

use proto::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};

/// The metric used when the metadata names none.
pub const DEFAULT_METRIC: &str = "weir_num_requests_waiting";

/// A trigger's metric: per pod (summed over the selected pods) or over admission's tier queues.
#[derive(Debug, Clone, Copy)]
pub enum TriggerMetric {
    Pods(&'static Metric),
    Tier(&'static TierMetric),
}

impl TriggerMetric {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pods(m) => m.name,
            Self::Tier(m) => m.name,
        }
    }

    /// A served metric by name, with or without its `weir_` prefix.
    fn find(name: &str) -> Option<Self> {
        let full = format!("weir_{name}");
        catalog::find(name)
            .or_else(|| catalog::find(&full))
            .map(Self::Pods)
            .or_else(|| {
                catalog::find_tier(name)
                    .or_else(|| catalog::find_tier(&full))
                    .map(Self::Tier)
            })
    }
}

/// What one trigger's metadata asks for, validated.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub metric: TriggerMetric,
    pub pool: Option<String>,
    /// Tier-queue metrics: only this tier's queues (`interactive`, `standard`, `batch`); every tier when unset.
    pub tier: Option<String>,
    pub model: Option<String>,
    pub role: Option<String>,
    pub gpu: Option<String>,
    /// `targetValue`, when given.
    pub target: Option<f64>,
    /// `activationTargetValue`.
    pub activation: f64,
}

/// A metadata value as a finite number.
fn number(meta: &HashMap<String, String>, key: &str) -> Result<Option<f64>, Status> {
    meta.get(key)
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| {
                    Status::invalid_argument(format!("metadata `{key}`: `{v}` is not a number"))
                })
        })
        .transpose()
}

impl Trigger {
    /// Parses a trigger's `scalerMetadata`; unknown keys (KEDA's own `scalerAddress`, …) are ignored.
    pub fn from_metadata(meta: &HashMap<String, String>) -> Result<Self, Status> {
        let name = meta.get("metric").map_or(DEFAULT_METRIC, String::as_str);
        let metric = TriggerMetric::find(name).ok_or_else(|| {
            let known: Vec<&str> = catalog::METRICS
                .iter()
                .map(|m| m.name)
                .chain(catalog::TIER_METRICS.iter().map(|m| m.name))
                .collect();
            Status::invalid_argument(format!(
                "metadata `metric`: `{name}` is not served (one of {})",
                known.join(", ")
            ))
        })?;
        let target = number(meta, "targetValue")?;
        if let Some(t) = target
            && t <= 0.0
        {
            return Err(Status::invalid_argument(format!(
                "metadata `targetValue`: must be > 0, got {t}"
            )));
        }
        let text = |k: &str| meta.get(k).filter(|v| !v.is_empty()).cloned();
        Ok(Self {
            metric,
            pool: text("pool"),
            tier: text("tier"),
            model: text("model"),
            role: text("role"),
            gpu: text("gpu"),
            target,
            activation: number(meta, "activationTargetValue")?.unwrap_or(0.0),
        })
    }

    /// Whether the trigger selects pod value `v`.
    pub fn selects(&self, v: &PodValue) -> bool {
        let pool_ok = self.pool.as_deref().is_none_or(|p| {
            v.pool == p
                || v.labels.get("weir.dev/pool").is_some_and(|l| l == p)
                || v.key.to_string() == p
        });
        let eq = |want: &Option<String>, have: &str| {
            want.as_deref().is_none_or(|w| w.eq_ignore_ascii_case(have))
        };
        pool_ok
            && eq(&self.model, &v.key.model)
            && eq(&self.role, &v.key.role)
            && eq(&self.gpu, &v.key.gpu)
    }

    /// The trigger's value: the sum over the selected pods (0 for none).
    pub fn value(&self, values: &[PodValue]) -> f64 {
        values
            .iter()
            .filter(|v| self.selects(v))
            .map(|v| v.value)
            .sum()
    }

    /// The trigger's value over admission's queues: the selected pool's (every pool's) queues of the selected tier
    /// (every tier), folded with the metric's fold (depth summed, wait the longest); 0 for none.
    pub fn tier_value(&self, m: &TierMetric, queues: &[TierQueue]) -> f64 {
        let eq = |want: &Option<String>, have: &str| {
            want.as_deref().is_none_or(|w| w.eq_ignore_ascii_case(have))
        };
        catalog::fold(
            m.fold,
            queues
                .iter()
                .filter(|q| eq(&self.pool, &q.pool) && eq(&self.tier, &q.tier))
                .map(m.from_queue),
        )
        .unwrap_or(0.0)
    }

    /// Active: the value strictly above `activationTargetValue`.
    pub fn active(&self, value: f64) -> bool {
        value > self.activation
    }
}

/// A non-negative value as KEDA's int64 field: rounded up, so 0.2 queued reads as 1, not 0.
fn int_value(v: f64) -> i64 {
    if v.is_finite() && v > 0.0 {
        v.ceil().min(i64::MAX as f64) as i64
    } else {
        0
    }
}

/// The scaler service over a [`Source`].
#[derive(Clone)]
pub struct Scaler {
    source: Arc<dyn Source>,
    /// How often an open `StreamIsActive` re-reads the source.
    poll: Duration,
}

impl Scaler {
    pub fn new(source: Arc<dyn Source>, poll: Duration) -> Self {
        Self { source, poll }
    }

    /// The tonic service.
    pub fn service(self) -> ExternalScalerServer<Self> {
        ExternalScalerServer::new(self)
    }

    async fn current(&self, t: &Trigger) -> Result<f64, Status> {
        let m = match t.metric {
            TriggerMetric::Pods(m) => m,
            TriggerMetric::Tier(m) => {
                let queues = self.source.tier_queues().ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "`{}`: this adapter has no admission queues to read (admission off, or not in process)",
                        m.name
                    ))
                })?;
                return Ok(t.tier_value(m, &queues));
            }
        };
        let values = self.source.values(m).await.map_err(|e| {
            tracing::warn!(error = %e, "KEDA scaler: metrics source failed");
            Status::unavailable(e.to_string())
        })?;
        Ok(t.value(&values))
    }
}

fn trigger_of(r: &ScaledObjectRef) -> Result<Trigger, Status> {
    Trigger::from_metadata(&r.scaler_metadata)
}

type IsActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;
type MetricSpecStream = Pin<Box<dyn Stream<Item = Result<GetMetricSpecResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let t = trigger_of(request.get_ref())?;
        let v = self.current(&t).await?;
        Ok(Response::new(IsActiveResponse {
            result: t.active(v),
        }))
    }

    type StreamIsActiveStream = IsActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let t = trigger_of(request.get_ref())?;
        let scaler = self.clone();
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // State: the last state sent (None before the first send).
        let stream = futures::stream::unfold(
            (scaler, t, tick, None::<bool>),
            |(scaler, t, mut tick, last)| async move {
                loop {
                    tick.tick().await;
                    match scaler.current(&t).await {
                        Ok(v) => {
                            let now = t.active(v);
                            if last != Some(now) {
                                let item = Ok(IsActiveResponse { result: now });
                                return Some((item, (scaler, t, tick, Some(now))));
                            }
                        }
                        // A failing source sends nothing (KEDA keeps the last state); the next tick retries.
                        Err(_) => continue,
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let t = trigger_of(request.get_ref())?;
        let target = t.target.ok_or_else(|| {
            Status::invalid_argument("metadata `targetValue` is required (the per-replica target)")
        })?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: t.metric.name().to_string(),
                target_size: int_value(target),
                target_size_float: target,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let r = request.get_ref();
        let obj = r
            .scaled_object_ref
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        let t = trigger_of(obj)?;
        let v = self.current(&t).await?;
        let name = if r.metric_name.is_empty() {
            t.metric.name().to_string()
        } else {
            r.metric_name.clone()
        };
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: name,
                metric_value: int_value(v),
                metric_value_float: v,
            }],
        }))
    }

    type StreamMetricSpecStream = MetricSpecStream;

    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        Err(Status::unimplemented(
            "StreamMetricSpec: the spec depends on the trigger metadata only; poll GetMetricSpec",
        ))
    }
}

/// Serves the scaler on `listener` (plaintext gRPC over HTTP/2: KEDA's `enableTLS` defaults to false, and the
/// scaler carries no secrets) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    scaler: Scaler,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(scaler.service())
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn int_values_round_up_and_never_go_negative() {
        assert_eq!(int_value(0.2), 1);
        assert_eq!(int_value(3.0), 3);
        assert_eq!(int_value(0.0), 0);
        assert_eq!(int_value(-2.0), 0);
        assert_eq!(int_value(f64::NAN), 0);
    }
}
