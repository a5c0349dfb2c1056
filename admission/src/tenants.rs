//! The tenant table: validated policies, API-key lookup, and the metric label of each tenant.

use std::sync::Arc;

use policies::tenant::{ApiKeyHash, InvalidPolicy, QueueSpec, TenantPolicySpec, TenantRules, Tier};

/// Name of the implicit tenant used when no policies are configured.
pub const DEFAULT_TENANT: &str = "default";
/// The implicit tenant's queue limit: the largest a policy may set, so only the tier's cap bounds it.
const IMPLICIT_MAX_QUEUED: u32 = 100_000;
/// Metric label value that tenants beyond the label cap fold into.
pub const OTHER_LABEL: &str = "other";

/// Who a request belongs to, as [`crate::Admission::identify`] found it.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// Tenant name.
    pub tenant: Arc<str>,
    /// Tenant's tier at identification time.
    pub tier: Tier,
}

/// A tenant as admission uses it.
#[derive(Debug, Clone)]
pub(crate) struct Tenant {
    /// Validated policy.
    pub(crate) rules: TenantRules,
    /// Value of the `tenant` metric label (its name, or [`OTHER_LABEL`] past the cap).
    pub(crate) label: Arc<str>,
}

/// All tenants; replaced as a whole on policy changes.
#[derive(Debug, Default)]
pub(crate) struct TenantTable {
    /// Sorted by name.
    pub(crate) tenants: Vec<Tenant>,
    /// No policies configured: every request is the implicit default tenant.
    pub(crate) implicit: bool,
}

impl TenantTable {
    /// Validates `specs`; the first `max_labels` tenants (by name) keep their name as metric label.
    pub(crate) fn build(
        specs: &[TenantPolicySpec],
        max_labels: usize,
    ) -> Result<Self, InvalidPolicy> {
        let mut rules = policies::tenant::validate_all(specs)?;
        rules.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        let implicit = rules.is_empty();
        if implicit {
            // Without tenants there is no tenant to protect from another: the implicit tenant's queue is bounded
            // only by the tier's cap (`admission.max_queued_per_tier`), not by a per-tenant default of 128 that
            // would shed a single client's 256 concurrent requests while a pod is briefly saturated.
            let mut spec = TenantPolicySpec::new(DEFAULT_TENANT, Tier::Standard);
            spec.queue = Some(QueueSpec {
                max_queued: Some(IMPLICIT_MAX_QUEUED),
                max_wait_ms: None,
            });
            rules.push(spec.validate()?);
        }
        let tenants = rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Tenant {
                label: if i < max_labels {
                    r.tenant.clone()
                } else {
                    Arc::from(OTHER_LABEL)
                },
                rules: r,
            })
            .collect();
        Ok(Self { tenants, implicit })
    }

    /// The tenant named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Tenant> {
        self.tenants
            .binary_search_by(|t| (*t.rules.tenant).cmp(name))
            .ok()
            .map(|i| &self.tenants[i])
    }

    /// The tenant holding `key`, comparing the key's hash against every stored hash in constant time (no early
    /// exit, so the time taken does not tell which tenant or byte matched).
    pub(crate) fn by_key(&self, key: &str) -> Option<&Tenant> {
        let hash = ApiKeyHash::of(key);
        let mut found = None;
        for t in &self.tenants {
            for k in &t.rules.api_keys {
                if k.ct_eq(&hash) {
                    found = Some(t);
                }
            }
        }
        found
    }
}
