//! weir's autoscaler: sizes prefill, decode and aggregated pools per GPU type (model x role x GPU) at the lowest cost
//! that meets the latency SLO.
//!
//! Seams: [`crd`] (the `ScalingPolicy` resource and its validation), [`capacity`] (what one pod of a pool sustains
//! within the SLO, measured by sweeping the simulator in virtual time), [`mix`] (the cheapest replica counts covering a
//! demand), [`planner`] (the pure decision: demand history, windows, forecast, hysteresis, stale metrics; `now` is an
//! argument), [`baselines`] (static peak, HPA v2, KEDA queue length, perfect-foresight oracle), [`control`] (the
//! planner and baselines as controllers of the simulator's elastic fleet), [`trace`] (the built-in diurnal + burst
//! load) and [`evaluate`] (one trace through every policy, for `weir plan`). Depends on `sim` for profiles and the
//! virtual-time fleet; never on the router. Kubernetes appears as CRD types and in [`actuator`] (the `scale`
//! subresource of a pool's Deployment or LeaderWorkerSet through kube-rs); [`sim_actuator`] starts and stops
//! simulated pods in-process. Those two are the crate's only I/O.

pub mod actuator;
pub mod baselines;
pub mod capacity;
pub mod control;
pub mod crd;
pub mod evaluate;
pub mod mix;
pub mod planner;
pub mod sim_actuator;
pub mod svg;
pub mod trace;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The crate's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value failed validation.
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    /// A GPU or model is not in the profile data.
    #[error(transparent)]
    Profile(#[from] sim::profile::ProfileError),
}

impl Error {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidConfig { .. } => "invalid_config",
            Error::Profile(_) => "profile",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The custom resource definitions this crate owns (for `weir crdgen`).
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![crd::ScalingPolicy::crd()]
}

/// `crds()` as the YAML committed in `deploy/crds/scalingpolicy.yaml`.
pub fn crd_yaml() -> String {
    crds()
        .iter()
        .map(|c| {
            let mut v = serde_json::to_value(c).unwrap_or_default();
            policies::crd::structural(&mut v);
            serde_yaml::to_string(&v).unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("---\n")
}
