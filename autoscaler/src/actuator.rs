//! The Kubernetes actuator: applies a pool's replica count through the `scale` subresource of its workload object
//! (a Deployment, the usual backing of an InferencePool's pods, or a LeaderWorkerSet `leaderworkerset.x-k8s.io/v1`
//! for multi-host pods), as `kubectl scale` and the HPA do, so whatever the workload controller does next (rolling
//! pods, LWS groups) stays its own business. The planner stays pure; [`changes`] (which pools to touch) is pure too,
//! and this is the only place the autoscaler talks to the API server.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v1::Scale;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};

use crate::crd::ScaleTarget;

/// Why a scale call failed.
#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    /// The target's kind has no scale subresource this actuator knows.
    #[error("unsupported scale target kind `{0}` (Deployment, LeaderWorkerSet)")]
    Kind(String),
    /// The API server refused or could not be reached.
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

impl ActuatorError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ActuatorError::Kind(_) => "unsupported_kind",
            ActuatorError::Api(_) => "api",
        }
    }
}

/// The pools whose count changes and has a target to scale: `(pool index, new count)`, in pool order. Pools without
/// a target (simulated or unmanaged) and unchanged counts are skipped, so a steady plan makes no API calls.
pub fn changes(
    targets: &[Option<ScaleTarget>],
    current: &[u32],
    desired: &[u32],
) -> Vec<(usize, u32)> {
    targets
        .iter()
        .zip(current.iter().zip(desired))
        .enumerate()
        .filter(|(_, (t, (c, d)))| t.is_some() && c != d)
        .map(|(i, (_, (_, &d)))| (i, d))
        .collect()
}

/// Scales workload objects in one namespace.
#[derive(Clone)]
pub struct KubeActuator {
    client: Client,
    namespace: String,
}

fn lws() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet"),
        "leaderworkersets",
    )
}

fn replicas_of(scale: &Scale) -> u32 {
    scale
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .map_or(0, |r| u32::try_from(r).unwrap_or(0))
}

impl KubeActuator {
    pub fn new(client: Client, namespace: &str) -> Self {
        KubeActuator {
            client,
            namespace: namespace.to_string(),
        }
    }

    /// Set `spec.replicas` of the target's scale subresource (a JSON merge patch); returns the count as stored.
    pub async fn scale(&self, target: &ScaleTarget, replicas: u32) -> Result<u32, ActuatorError> {
        let body = serde_json::json!({ "spec": { "replicas": replicas } });
        let pp = PatchParams::default();
        let patch = Patch::Merge(&body);
        let scale = match target.kind.as_str() {
            "Deployment" => {
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
                api.patch_scale(&target.name, &pp, &patch).await?
            }
            "LeaderWorkerSet" => {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &self.namespace, &lws());
                api.patch_scale(&target.name, &pp, &patch).await?
            }
            other => return Err(ActuatorError::Kind(other.to_string())),
        };
        Ok(replicas_of(&scale))
    }

    /// The target's current `spec.replicas` (0 when unset).
    pub async fn replicas(&self, target: &ScaleTarget) -> Result<u32, ActuatorError> {
        let scale = match target.kind.as_str() {
            "Deployment" => {
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
                api.get_scale(&target.name).await?
            }
            "LeaderWorkerSet" => {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &self.namespace, &lws());
                api.get_scale(&target.name).await?
            }
            other => return Err(ActuatorError::Kind(other.to_string())),
        };
        Ok(replicas_of(&scale))
    }

    /// Apply a plan: scale every pool of [`changes`], one call each, in pool order. Returns each call's outcome
    /// (a failed call does not stop the others: the next tick retries from the counts then observed).
    pub async fn apply(
        &self,
        targets: &[Option<ScaleTarget>],
        current: &[u32],
        desired: &[u32],
    ) -> Vec<(usize, Result<u32, ActuatorError>)> {
        let mut out = Vec::new();
        for (i, n) in changes(targets, current, desired) {
            if let Some(t) = &targets[i] {
                out.push((i, self.scale(t, n).await));
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "actuator_tests.rs"]
mod tests;
