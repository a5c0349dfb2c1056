//! Prometheus series of admission, registered on a registry passed in. The `tenant` label is capped: tenants past
//! [`crate::AdmissionConfig::max_tenant_labels`] (by name) share the value `other`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `admission_decisions_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DecisionLabels {
    /// Tenant (capped).
    pub(crate) tenant: String,
    /// Tier.
    pub(crate) tier: &'static str,
    /// `admitted`, `rejected` or `abandoned`.
    pub(crate) decision: &'static str,
    /// Reject reason, or `none`.
    pub(crate) reason: &'static str,
}

/// `admission_requests_ended_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EndLabels {
    /// Tenant (capped).
    pub(crate) tenant: String,
    /// Tier.
    pub(crate) tier: &'static str,
    /// `completed`, `failed` or `cancelled`.
    pub(crate) outcome: &'static str,
}

/// `admission_tokens_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TokenLabels {
    /// Tenant (capped).
    pub(crate) tenant: String,
    /// Tier.
    pub(crate) tier: &'static str,
    /// `prompt`, `cached` or `completion`.
    pub(crate) kind: &'static str,
}

/// Pool x tier labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PoolTierLabels {
    /// Pool name.
    pub(crate) pool: String,
    /// Tier.
    pub(crate) tier: &'static str,
}

/// Tier label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TierLabels {
    /// Tier.
    pub(crate) tier: &'static str,
}

/// Admission's metric handles (cheap clones of shared series).
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    pub(crate) decisions: Family<DecisionLabels, Counter>,
    pub(crate) ended: Family<EndLabels, Counter>,
    pub(crate) tokens: Family<TokenLabels, Counter>,
    pub(crate) queued: Family<PoolTierLabels, Gauge>,
    pub(crate) displaced: Family<PoolTierLabels, Counter>,
    pub(crate) wait: Family<TierLabels, Histogram>,
    /// Limit checks decided locally because the shared (Redis) limiter was unreachable or slow.
    pub(crate) fail_open: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            decisions: Family::default(),
            ended: Family::default(),
            tokens: Family::default(),
            queued: Family::default(),
            displaced: Family::default(),
            fail_open: Counter::default(),
            wait: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            }),
        }
    }
}

impl Metrics {
    /// Registers every series under `registry` (prefix `admission_`).
    pub(crate) fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("admission");
        r.register(
            "decisions",
            "Admission decisions by tenant, tier, decision and reason",
            self.decisions.clone(),
        );
        r.register(
            "requests_ended",
            "Admitted requests by how they ended",
            self.ended.clone(),
        );
        r.register(
            "tokens",
            "Tokens of settled requests by kind",
            self.tokens.clone(),
        );
        r.register(
            "queued",
            "Requests waiting for dispatch",
            self.queued.clone(),
        );
        r.register(
            "limit_fail_open",
            "Rate-limit checks decided by the local limiter because Redis was unreachable or slow",
            self.fail_open.clone(),
        );
        r.register(
            "displaced",
            "Unstarted grants revoked for a higher tier and requeued",
            self.displaced.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time from arrival to dispatch",
            self.wait.clone(),
        );
    }
}
