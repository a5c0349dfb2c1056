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
//! [`Scaler::poll`] and at once whenever admission's queues change ([`Source::tier_changes`]), and sends each change.
//! `StreamMetricSpec` answers `UNIMPLEMENTED` (KEDA then keeps polling `GetMetricSpec`, whose answer depends on the
//! metadata only).
//!
//! Scale from zero: a pool with no pods has no samples, so a per-pod metric's value is 0; but the router holds the
//! pool's requests in admission's queues until a pod is ready, and a per-pod trigger is also active while any request
//! is held for its pool ([`Trigger::held`]; queues are per router pool, so `model`, `role` and `gpu` do not narrow
//! it). The first held request is pushed to an open `StreamIsActive` as soon as
//! it is queued; `GetMetrics` still answers the pods' sum (0), KEDA's HPA taking over once a pod runs.

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
        pool_ok
            && wanted(&self.model, &v.key.model)
            && wanted(&self.role, &v.key.role)
            && wanted(&self.gpu, &v.key.gpu)
    }

    /// Whether the trigger selects admission's queue `q` (its pool and tier, each any when not given).
    fn selects_queue(&self, q: &TierQueue) -> bool {
        wanted(&self.pool, &q.pool) && wanted(&self.tier, &q.tier)
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
        catalog::fold(
            m.fold,
            queues
                .iter()
                .filter(|q| self.selects_queue(q))
                .map(m.from_queue),
        )
        .unwrap_or(0.0)
    }

    /// Active: the value strictly above `activationTargetValue`.
    pub fn active(&self, value: f64) -> bool {
        value > self.activation
    }

    /// Whether admission holds a request for the selected pool (any pool without one) in the selected tier (any),
    /// which makes a per-pod trigger active: a pool at zero has no pod to report a value, yet needs one.
    pub fn held(&self, queues: &[TierQueue]) -> bool {
        queues.iter().any(|q| q.queued > 0 && self.selects_queue(q))
    }
}

/// A metadata selector against a value: any when not given, else equal ignoring ASCII case.
fn wanted(want: &Option<String>, have: &str) -> bool {
    want.as_deref().is_none_or(|w| w.eq_ignore_ascii_case(have))
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

    /// Whether the trigger is active now: its value above the activation, or (per-pod metrics) a request held for
    /// its pool.
    async fn is_active_now(&self, t: &Trigger) -> Result<bool, Status> {
        let v = self.current(t).await?;
        let held = matches!(t.metric, TriggerMetric::Pods(_))
            && self.source.tier_queues().is_some_and(|q| t.held(&q));
        Ok(t.active(v) || held)
    }
}

/// Resolves at the next poll tick, or as soon as `changes` (admission's queues) changes; a closed channel falls back
/// to the tick alone.
async fn next_look(
    tick: &mut tokio::time::Interval,
    changes: &mut Option<tokio::sync::watch::Receiver<u64>>,
) {
    let closed = match changes {
        Some(rx) => tokio::select! {
            _ = tick.tick() => false,
            r = rx.changed() => r.is_err(),
        },
        None => {
            tick.tick().await;
            false
        }
    };
    if closed {
        *changes = None;
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
        Ok(Response::new(IsActiveResponse {
            result: self.is_active_now(&t).await?,
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
        let changes = self.source.tier_changes();
        // State: the last state sent (None before the first send). The interval's first tick is immediate: the
        // stream opens with the current state.
        let stream = futures::stream::unfold(
            (scaler, t, tick, changes, None::<bool>),
            |(scaler, t, mut tick, mut changes, last)| async move {
                loop {
                    next_look(&mut tick, &mut changes).await;
                    match scaler.is_active_now(&t).await {
                        Ok(now) => {
                            if last != Some(now) {
                                let item = Ok(IsActiveResponse { result: now });
                                return Some((item, (scaler, t, tick, changes, Some(now))));
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
#[path = "keda_tests.rs"]
mod tests;
