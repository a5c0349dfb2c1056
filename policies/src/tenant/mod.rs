//! Tenant policy: the `TenantPolicy` custom resource (`weir.dev/v1alpha1`) and its validated form.
//!
//! One schema serves both sources of tenants: the YAML config (the embedded default, a list of [`TenantPolicySpec`])
//! and a live watch of `TenantPolicy` objects in Kubernetes. Raw specs are never used directly: [`TenantPolicySpec::
//! validate`] turns one into a [`TenantRules`] (typed values, defaults applied) or an [`InvalidPolicy`] naming the
//! field, the value and the reason, so nothing after start-up (or after a watch event) sees an unvalidated value.
//!
//! Limits (RPM, TPM, concurrency) are parsed and validated here; enforcing them is the rate-limit layer's job.

mod validate;

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use validate::{
    ApiKeyHash, InvalidPolicy, JwtRule, Limits, ModelAccess, QueueRules, SecretKeyRef, SloTargets,
    TenantRules, validate_all,
};

/// Service tier: strict priority between tiers (interactive first), with a guaranteed minimum share for the lower
/// ones so batch never starves.
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Latency-sensitive chat; served first.
    Interactive,
    /// The default tier.
    #[default]
    Standard,
    /// Throughput work; sheddable, first displaced.
    Batch,
}

impl Tier {
    /// All tiers, highest priority first (the index is the tier's rank).
    pub const ALL: [Tier; 3] = [Tier::Interactive, Tier::Standard, Tier::Batch];

    /// 0 for interactive (highest priority) .. 2 for batch.
    pub fn rank(self) -> usize {
        self as usize
    }

    /// Lowercase name, as in the CRD and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Interactive => "interactive",
            Tier::Standard => "standard",
            Tier::Batch => "batch",
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tenant's policy: who it is, which tier and share it gets, what it may use.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "TenantPolicy",
    namespaced,
    status = "TenantPolicyStatus",
    shortname = "tp",
    printcolumn = r#"{"name":"Tenant","type":"string","jsonPath":".spec.tenant"}"#,
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Weight","type":"number","jsonPath":".spec.weight"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantPolicySpec {
    /// Tenant name: the ledger, metrics and `GET /v1/usage` key. Unique across policies; 1-63 characters of
    /// `[a-z0-9._-]`.
    pub tenant: String,
    /// Service tier (default `standard`).
    #[serde(default)]
    pub tier: Tier,
    /// Fair-queuing weight within the tier (default 1; a tenant of weight 2 gets about twice the token service of a
    /// weight-1 tenant while both are backlogged). 0 < weight <= 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Models the tenant may call: exact names, or a prefix ending in `*`. Empty or absent: every model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Rate and concurrency limits (enforced by the rate-limit layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// Queueing bounds for this tenant's waiting requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueSpec>,
    /// Latency objectives (reported against; the autoscaler sizes pools for them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloSpec>,
    /// How requests are attributed to this tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySpec>,
}

/// Velocity and concurrency limits; absent fields are unlimited.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsSpec {
    /// Requests per minute (>= 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    /// Tokens per minute, prompt + completion (>= 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests in flight at once (>= 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

/// Queue bounds for one tenant.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueSpec {
    /// Requests of this tenant waiting at once; more are shed with 429 (default 128, 1..=100000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u32>,
    /// Longest a request may wait for dispatch, in milliseconds, before it is shed with 429 (default 60000;
    /// 1..=3600000). A request's own deadline, when shorter, wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
}

/// Latency objectives.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SloSpec {
    /// Time to first token objective, milliseconds (p99).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    /// Time per output token objective, milliseconds (p99).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpot_ms: Option<u64>,
}

/// Identity: API keys (by Secret reference in Kubernetes, by SHA-256 hash inline in YAML) and JWT claim matches.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentitySpec {
    /// API keys of this tenant. Keys are never stored in clear: either a Secret holds them, or the hash is inline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKeySpec>,
    /// JWT bearer tokens whose claims match (validated by the JWT layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSpec>,
}

/// One API key: exactly one of `secretRef` or `sha256`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiKeySpec {
    /// A key in a Secret of the policy's namespace holding the API key in clear (hashed on load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeySpec>,
    /// Lowercase hex SHA-256 of the API key (`printf %s "$KEY" | sha256sum`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A key within a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeySpec {
    /// Secret name (same namespace as the policy).
    pub name: String,
    /// Key within the Secret's data.
    pub key: String,
}

/// JWT claims that identify this tenant.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtSpec {
    /// Required `iss` claim.
    pub issuer: String,
    /// Further claims that must all equal these values (e.g. `{"org": "acme"}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, String>,
}

/// What weir last observed and did with a `TenantPolicy`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantPolicyStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (True when the spec is valid and in effect; False with the reason when it is not, in which case
    /// the previous valid spec stays in effect).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PolicyCondition>,
    /// Usage counters from the ledger at the last status write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSummary>,
}

/// A status condition (the `metav1.Condition` shape).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// Condition type, e.g. `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason, e.g. `Valid`, `InvalidSpec`.
    pub reason: String,
    /// Human-readable detail (the validation error).
    pub message: String,
    /// Generation the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339 time of the last status change.
    pub last_transition_time: String,
}

/// Per-tenant totals summed over models and tiers.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageSummary {
    /// Requests admitted.
    pub admitted: u64,
    /// Admitted requests that completed.
    pub completed: u64,
    /// Admitted requests that failed.
    pub failed: u64,
    /// Admitted requests the client cancelled.
    pub cancelled: u64,
    /// Requests rejected before admission.
    pub rejected: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}
