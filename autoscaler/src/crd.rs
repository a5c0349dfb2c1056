//! The `ScalingPolicy` custom resource (`weir.dev/v1alpha1`): which pools (model x role x GPU type) exist, their
//! replica bounds and prices, the latency objectives, and the planner's windows. [`PlannerConfig::try_from`] turns a
//! spec into validated values; nothing downstream sees an unvalidated one.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Desired state of one model's autoscaling.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "ScalingPolicy",
    namespaced,
    shortname = "wsp"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingPolicySpec {
    /// Model key as the simulator profiles name it (`llama-3.1-8b`).
    pub model: String,
    /// Latency objectives every pool is sized against.
    pub slo: SloSpec,
    /// Pools the planner may use; at least one.
    pub pools: Vec<PoolSpec>,
    /// Fraction of a pod's measured SLO capacity the plan may use (headroom = 1 - this). Default 0.85.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_utilization: Option<f64>,
    /// Planner windows; defaults as in the Knative KPA and HPA references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<WindowsSpec>,
}

/// Latency objectives.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SloSpec {
    /// p95 time to first token, milliseconds.
    pub ttft_ms: f64,
    /// p95 mean time per output token, milliseconds.
    pub tpot_ms: f64,
}

/// P/D role of a pool.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolRole {
    /// Whole requests (aggregated serving).
    #[default]
    Both,
    /// Prefill leg of disaggregated serving.
    Prefill,
    /// Decode leg of disaggregated serving.
    Decode,
}

/// What the actuator scales.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleTarget {
    /// `Deployment` or `LeaderWorkerSet`.
    pub kind: String,
    /// Object name in the policy's namespace.
    pub name: String,
}

/// One pool: model x role x GPU type.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSpec {
    /// Unique within the policy.
    pub name: String,
    /// GPU type key: `h100`, `a100-80gb`, `a100-40gb` or `l4`.
    pub gpu: String,
    #[serde(default)]
    pub role: PoolRole,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// USD per pod-hour; default: the profile's on-demand price times the pod's GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_hour: Option<f64>,
    /// The workload object whose `scale` subresource this pool drives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ScaleTarget>,
}

/// Planner windows, seconds.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowsSpec {
    /// Demand averaged over this window in normal mode (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_seconds: Option<f64>,
    /// Short window for bursts (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_seconds: Option<f64>,
    /// Panic when the short window's demand is this multiple of ready capacity (default 2.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<f64>,
    /// Scale down only to the highest recommendation of this window (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_delay_seconds: Option<f64>,
    /// Metrics older than this are stale: hold the fleet, never scale down (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after_seconds: Option<f64>,
}

/// Validated planner settings (from a [`ScalingPolicySpec`] or built in code).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerConfig {
    pub model: String,
    pub ttft_s: f64,
    pub tpot_s: f64,
    pub target_utilization: f64,
    pub stable_s: f64,
    pub panic_s: f64,
    pub panic_threshold: f64,
    pub scale_down_delay_s: f64,
    pub stale_after_s: f64,
    /// Keep the current mix when it covers the demand and costs at most this fraction more than the best plan.
    pub hysteresis: f64,
    /// Queued prompt tokens are planned to drain within this time.
    pub queue_drain_s: f64,
    /// Demand trend is fitted over this window and extrapolated over the cold start.
    pub trend_s: f64,
}

impl PlannerConfig {
    /// The defaults for `model` at an SLO.
    pub fn new(model: &str, ttft_s: f64, tpot_s: f64) -> Self {
        PlannerConfig {
            model: model.to_string(),
            ttft_s,
            tpot_s,
            target_utilization: 0.85,
            stable_s: 60.0,
            panic_s: 10.0,
            panic_threshold: 2.0,
            scale_down_delay_s: 300.0,
            stale_after_s: 30.0,
            hysteresis: 0.1,
            queue_drain_s: 30.0,
            trend_s: 300.0,
        }
    }
}

fn positive(field: &str, v: f64) -> Result<f64, Error> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(Error::InvalidConfig {
            field: field.to_string(),
            reason: format!("must be a positive number, got {v}"),
        })
    }
}

impl TryFrom<&ScalingPolicySpec> for PlannerConfig {
    type Error = Error;

    fn try_from(s: &ScalingPolicySpec) -> Result<Self, Error> {
        let mut c = PlannerConfig::new(
            &s.model,
            positive("slo.ttftMs", s.slo.ttft_ms)? / 1e3,
            positive("slo.tpotMs", s.slo.tpot_ms)? / 1e3,
        );
        if let Some(u) = s.target_utilization {
            if !(u > 0.0 && u <= 1.0) {
                return Err(Error::InvalidConfig {
                    field: "targetUtilization".into(),
                    reason: format!("must be in (0, 1], got {u}"),
                });
            }
            c.target_utilization = u;
        }
        let w = s.windows.unwrap_or_default();
        if let Some(v) = w.stable_seconds {
            c.stable_s = positive("windows.stableSeconds", v)?;
        }
        if let Some(v) = w.panic_seconds {
            c.panic_s = positive("windows.panicSeconds", v)?;
        }
        if let Some(v) = w.panic_threshold {
            c.panic_threshold = positive("windows.panicThreshold", v)?;
        }
        if let Some(v) = w.scale_down_delay_seconds {
            c.scale_down_delay_s = positive("windows.scaleDownDelaySeconds", v)?;
        }
        if let Some(v) = w.stale_after_seconds {
            c.stale_after_s = positive("windows.staleAfterSeconds", v)?;
        }
        if s.pools.is_empty() {
            return Err(Error::InvalidConfig {
                field: "pools".into(),
                reason: "needs at least one pool".into(),
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in s.pools.iter().enumerate() {
            if !names.insert(p.name.as_str()) {
                return Err(Error::InvalidConfig {
                    field: format!("pools[{i}].name"),
                    reason: format!("duplicate pool name `{}`", p.name),
                });
            }
            if p.min_replicas > p.max_replicas {
                return Err(Error::InvalidConfig {
                    field: format!("pools[{i}].minReplicas"),
                    reason: format!("{} is above maxReplicas {}", p.min_replicas, p.max_replicas),
                });
            }
            if let Some(v) = p.price_per_hour {
                positive(&format!("pools[{i}].pricePerHour"), v)?;
            }
            if let Some(t) = &p.target
                && t.kind != "Deployment"
                && t.kind != "LeaderWorkerSet"
            {
                return Err(Error::InvalidConfig {
                    field: format!("pools[{i}].target.kind"),
                    reason: format!("`{}` is not Deployment or LeaderWorkerSet", t.kind),
                });
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ScalingPolicySpec {
        serde_yaml::from_str(
            r#"
model: llama-3.1-8b
slo: { ttftMs: 2000, tpotMs: 100 }
pools:
  - { name: h100, gpu: h100, minReplicas: 0, maxReplicas: 8, target: { kind: Deployment, name: vllm-h100 } }
  - { name: l4-prefill, gpu: l4, role: prefill, minReplicas: 1, maxReplicas: 32 }
windows: { scaleDownDelaySeconds: 600 }
"#,
        )
        .unwrap()
    }

    #[test]
    fn a_spec_validates_into_planner_settings() {
        let c = PlannerConfig::try_from(&spec()).unwrap();
        assert_eq!((c.ttft_s, c.tpot_s), (2.0, 0.1));
        assert_eq!(c.scale_down_delay_s, 600.0);
        assert_eq!(c.stable_s, 60.0);
        assert_eq!(spec().pools[1].role, PoolRole::Prefill);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let field = |s: &ScalingPolicySpec| match PlannerConfig::try_from(s) {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut s = spec();
        s.pools[0].min_replicas = 9;
        assert_eq!(field(&s), "pools[0].minReplicas");
        let mut s = spec();
        s.pools[1].name = "h100".into();
        assert_eq!(field(&s), "pools[1].name");
        let mut s = spec();
        s.slo.ttft_ms = -1.0;
        assert_eq!(field(&s), "slo.ttftMs");
        let mut s = spec();
        s.target_utilization = Some(1.5);
        assert_eq!(field(&s), "targetUtilization");
        let mut s = spec();
        s.pools[0].target = Some(ScaleTarget {
            kind: "StatefulSet".into(),
            name: "x".into(),
        });
        assert_eq!(field(&s), "pools[0].target.kind");
        let unknown: Result<ScalingPolicySpec, _> =
            serde_yaml::from_str("model: m\nslo: {ttftMs: 1, tpotMs: 1}\npools: []\nfoo: 1\n");
        assert!(unknown.is_err(), "unknown fields are refused");
    }

    /// The committed YAML is what `crds()` generates. Regenerate with `weir crdgen`, or
    /// `WEIR_UPDATE_CRDS=1 cargo test -p autoscaler --lib committed_crd`.
    #[test]
    fn committed_crd_yaml_matches_the_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/crds/scalingpolicy.yaml"
        );
        let got = crate::crd_yaml();
        if std::env::var_os("WEIR_UPDATE_CRDS").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            got, want,
            "deploy/crds/scalingpolicy.yaml is stale: regenerate it from autoscaler::crds()"
        );
    }
}
