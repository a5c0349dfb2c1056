//! weir's metrics adapter: serves what Kubernetes autoscalers cannot see on their own — KV-cache pressure, engine
//! queues, in-flight and queued prompt tokens per pod and per pool (model × role × GPU) — to the HPA through
//! `custom.metrics.k8s.io` (v1beta2 and v1beta1, on by default) and, opt-in, `external.metrics.k8s.io`, plus a JSON
//! endpoint for KEDA's `metrics-api` scaler and the dashboard, and KEDA's external scaler over gRPC ([`keda`]).
//!
//! Seams: a [`source::Source`] yields per-pod values of one [`catalog::Metric`] (the router's live snapshot, in
//! process or from router replicas' `GET /debug/pods`, or Prometheus: [`prometheus`]); [`api::app`] renders them in the wire shapes of
//! `autoscaling-and-metrics-apis.md` §1–§2. Values and selectors are pure ([`quantity`], [`selector`]).
//! Depends on `policies` only (the [`policies::pool::PodSample`] type), never on the router: the router exposes its
//! snapshot, the `weir` binary wires the two together.

pub mod api;
pub mod catalog;
pub mod keda;
pub mod prometheus;
pub mod quantity;
pub mod selector;
pub mod source;

/// Errors of the adapter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A source could not answer (router replica down, bad JSON).
    #[error("metrics source `{source_name}` failed: {reason}")]
    Source { source_name: String, reason: String },
    /// A malformed label selector in a query.
    #[error("invalid label selector `{selector}`: {reason}")]
    Selector { selector: String, reason: String },
}

impl Error {
    /// Metric label value for the error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Source { .. } => "source",
            Self::Selector { .. } => "selector",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
