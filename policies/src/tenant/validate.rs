//! Raw [`TenantPolicySpec`] -> typed [`TenantRules`], with errors naming the field.

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{TenantPolicySpec, Tier};

/// Default per-tenant queue depth (SGLang's 128).
pub const DEFAULT_MAX_QUEUED: u32 = 128;
/// Default longest wait for dispatch (GIE's queue TTL, 60 s).
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(60);

/// A policy that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tenant policy `{tenant}`: {field} = {value}: {reason}")]
pub struct InvalidPolicy {
    /// Tenant name as written (may itself be the invalid value).
    pub tenant: String,
    /// Field path, e.g. `spec.queue.maxWaitMs`.
    pub field: String,
    /// The offending value, rendered.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Which models a tenant may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelAccess {
    /// Every model.
    All,
    /// Only these: exact names and prefixes (entries written with a trailing `*`).
    Only {
        /// Exact model names.
        exact: Vec<String>,
        /// Allowed name prefixes.
        prefixes: Vec<String>,
    },
}

impl ModelAccess {
    /// Whether `model` may be called.
    pub fn allows(&self, model: &str) -> bool {
        match self {
            ModelAccess::All => true,
            ModelAccess::Only { exact, prefixes } => {
                exact.iter().any(|m| m == model)
                    || prefixes.iter().any(|p| model.starts_with(p.as_str()))
            }
        }
    }
}

/// Validated limits; `None` = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<NonZeroU32>,
    /// Tokens per minute.
    pub tpm: Option<NonZeroU64>,
    /// Requests in flight.
    pub concurrency: Option<NonZeroU32>,
}

/// Validated queue bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRules {
    /// Requests of the tenant waiting at once.
    pub max_queued: NonZeroU32,
    /// Longest wait for dispatch.
    pub max_wait: Duration,
}

/// Validated latency objectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SloTargets {
    /// Time to first token.
    pub ttft: Option<Duration>,
    /// Time per output token.
    pub tpot: Option<Duration>,
}

/// SHA-256 of an API key. Keys are only ever held as hashes; comparison is constant-time.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApiKeyHash(pub [u8; 32]);

impl std::fmt::Debug for ApiKeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Enough to tell keys apart in logs, not enough to help an attacker.
        write!(f, "ApiKeyHash({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

impl ApiKeyHash {
    /// Hash of a key presented in clear.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// The 64 lowercase hex digits (what a config's `sha256:` holds).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Self(out))
    }

    /// Constant-time equality: every byte is examined whatever the first difference. Hand-written (eight lines)
    /// rather than pulling in `subtle` for one comparison.
    pub fn ct_eq(&self, other: &ApiKeyHash) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }
}

/// A Secret key holding an API key in clear (resolved by the Kubernetes adapter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

/// JWT claims identifying a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtRule {
    /// Required issuer.
    pub issuer: String,
    /// Claims that must equal these values.
    pub claims: Vec<(String, String)>,
}

/// A tenant policy after validation: typed, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRules {
    /// Tenant name.
    pub tenant: Arc<str>,
    /// Tier.
    pub tier: Tier,
    /// Fair-queuing weight, finite and in (0, 1000].
    pub weight: f64,
    /// Allowed models.
    pub models: ModelAccess,
    /// Limits for the rate-limit layer.
    pub limits: Limits,
    /// Queue bounds.
    pub queue: QueueRules,
    /// Latency objectives.
    pub slo: SloTargets,
    /// Inline API-key hashes.
    pub api_keys: Vec<ApiKeyHash>,
    /// API keys held in Secrets (to be read and hashed by the Kubernetes adapter).
    pub secret_keys: Vec<SecretKeyRef>,
    /// JWT claim match.
    pub jwt: Option<JwtRule>,
}

impl TenantPolicySpec {
    /// A policy with only a tenant and a tier: default weight, every model, no limits, queue or SLO overrides, no
    /// identity.
    pub fn new(tenant: impl Into<String>, tier: Tier) -> Self {
        Self {
            tenant: tenant.into(),
            tier,
            weight: None,
            models: vec![],
            limits: None,
            queue: None,
            slo: None,
            identity: None,
        }
    }

    /// Validates into typed rules; the first problem found is returned, naming its field.
    pub fn validate(&self) -> Result<TenantRules, InvalidPolicy> {
        let err = |field: &str, value: &dyn std::fmt::Display, reason: &str| InvalidPolicy {
            tenant: self.tenant.clone(),
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let name_ok = !self.tenant.is_empty()
            && self.tenant.len() <= 63
            && self
                .tenant
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !name_ok {
            return Err(err(
                "spec.tenant",
                &format!("{:?}", self.tenant),
                "must be 1-63 characters of [a-z0-9._-]",
            ));
        }
        let weight = self.weight.unwrap_or(1.0);
        if !(weight.is_finite() && weight > 0.0 && weight <= 1000.0) {
            return Err(err("spec.weight", &weight, "must be > 0 and <= 1000"));
        }
        let mut exact = Vec::new();
        let mut prefixes = Vec::new();
        for (i, m) in self.models.iter().enumerate() {
            let field = format!("spec.models[{i}]");
            match m.strip_suffix('*') {
                Some(p) if p.contains('*') => {
                    return Err(err(
                        &field,
                        &format!("{m:?}"),
                        "only a trailing `*` is allowed",
                    ));
                }
                Some(p) => prefixes.push(p.to_string()),
                None if m.is_empty() => return Err(err(&field, &"\"\"", "must not be empty")),
                None if m.contains('*') => {
                    return Err(err(
                        &field,
                        &format!("{m:?}"),
                        "only a trailing `*` is allowed",
                    ));
                }
                None => exact.push(m.clone()),
            }
        }
        let models = if self.models.is_empty() || prefixes.iter().any(String::is_empty) {
            ModelAccess::All
        } else {
            ModelAccess::Only { exact, prefixes }
        };
        let l = self.limits.clone().unwrap_or_default();
        let limits = Limits {
            rpm: nonzero32(l.rpm).map_err(|v| err("spec.limits.rpm", &v, "must be >= 1"))?,
            tpm: match l.tpm {
                None => None,
                Some(v) => Some(
                    NonZeroU64::new(v).ok_or_else(|| err("spec.limits.tpm", &v, "must be >= 1"))?,
                ),
            },
            concurrency: nonzero32(l.concurrency)
                .map_err(|v| err("spec.limits.concurrency", &v, "must be >= 1"))?,
        };
        let q = self.queue.clone().unwrap_or_default();
        let max_queued = q.max_queued.unwrap_or(DEFAULT_MAX_QUEUED);
        let max_queued = NonZeroU32::new(max_queued)
            .filter(|n| n.get() <= 100_000)
            .ok_or_else(|| err("spec.queue.maxQueued", &max_queued, "must be in 1..=100000"))?;
        let max_wait = match q.max_wait_ms {
            None => DEFAULT_MAX_WAIT,
            Some(ms) if (1..=3_600_000).contains(&ms) => Duration::from_millis(ms),
            Some(ms) => return Err(err("spec.queue.maxWaitMs", &ms, "must be in 1..=3600000")),
        };
        let s = self.slo.clone().unwrap_or_default();
        let slo_ms = |field: &str, v: Option<u64>| match v {
            None => Ok(None),
            Some(ms) if (1..=3_600_000).contains(&ms) => Ok(Some(Duration::from_millis(ms))),
            Some(ms) => Err(err(field, &ms, "must be in 1..=3600000")),
        };
        let slo = SloTargets {
            ttft: slo_ms("spec.slo.ttftMs", s.ttft_ms)?,
            tpot: slo_ms("spec.slo.tpotMs", s.tpot_ms)?,
        };
        let ident = self.identity.clone().unwrap_or_default();
        let mut api_keys = Vec::new();
        let mut secret_keys = Vec::new();
        for (i, k) in ident.api_keys.iter().enumerate() {
            let field = format!("spec.identity.apiKeys[{i}]");
            match (&k.secret_ref, &k.sha256) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(err(
                        &field,
                        &"{..}",
                        "needs exactly one of secretRef or sha256",
                    ));
                }
                (None, Some(hex)) => api_keys.push(ApiKeyHash::from_hex(hex).ok_or_else(|| {
                    err(
                        &format!("{field}.sha256"),
                        &format!("{hex:?}"),
                        "must be 64 hex digits",
                    )
                })?),
                (Some(s), None) => {
                    if s.name.is_empty() || s.key.is_empty() {
                        return Err(err(
                            &format!("{field}.secretRef"),
                            &format!("{}/{}", s.name, s.key),
                            "name and key must not be empty",
                        ));
                    }
                    secret_keys.push(SecretKeyRef {
                        name: s.name.clone(),
                        key: s.key.clone(),
                    });
                }
            }
        }
        let jwt = match ident.jwt {
            None => None,
            Some(j) if j.issuer.is_empty() => {
                return Err(err(
                    "spec.identity.jwt.issuer",
                    &"\"\"",
                    "must not be empty",
                ));
            }
            Some(j) => Some(JwtRule {
                issuer: j.issuer,
                claims: j.claims.into_iter().collect(),
            }),
        };
        Ok(TenantRules {
            tenant: Arc::from(self.tenant.as_str()),
            tier: self.tier,
            weight,
            models,
            limits,
            queue: QueueRules {
                max_queued,
                max_wait,
            },
            slo,
            api_keys,
            secret_keys,
            jwt,
        })
    }
}

fn nonzero32(v: Option<u32>) -> Result<Option<NonZeroU32>, u32> {
    match v {
        None => Ok(None),
        Some(n) => NonZeroU32::new(n).map(Some).ok_or(n),
    }
}

/// Validates a whole set: each policy, plus uniqueness of tenant names and of API keys across tenants.
pub fn validate_all(specs: &[TenantPolicySpec]) -> Result<Vec<TenantRules>, InvalidPolicy> {
    let mut out: Vec<TenantRules> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let rules = spec.validate()?;
        if out.iter().any(|r| r.tenant == rules.tenant) {
            return Err(InvalidPolicy {
                tenant: spec.tenant.clone(),
                field: format!("tenants[{i}].tenant"),
                value: spec.tenant.clone(),
                reason: "two policies name the same tenant".into(),
            });
        }
        for key in &rules.api_keys {
            if let Some(other) = out.iter().find(|r| r.api_keys.iter().any(|k| k.ct_eq(key))) {
                return Err(InvalidPolicy {
                    tenant: spec.tenant.clone(),
                    field: format!("tenants[{i}].identity.apiKeys"),
                    value: format!("{key:?}"),
                    reason: format!("the same key is already a key of tenant `{}`", other.tenant),
                });
            }
        }
        out.push(rules);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::{ApiKeySpec, IdentitySpec, QueueSpec};

    fn spec(tenant: &str) -> TenantPolicySpec {
        TenantPolicySpec::new(tenant, Tier::Standard)
    }

    #[test]
    fn yaml_policy_parses_and_validates_with_defaults() {
        let key_hash = format!("{:x}", Sha256::digest(b"sk-acme"));
        let yaml = format!(
            "tenant: acme\ntier: interactive\nweight: 2\nmodels: [llama-8b, 'qwen*']\n\
             limits: {{rpm: 600, tpm: 100000, concurrency: 8}}\nqueue: {{maxWaitMs: 5000}}\n\
             slo: {{ttftMs: 500}}\nidentity: {{apiKeys: [{{sha256: {key_hash}}}], jwt: {{issuer: https://id.example, claims: {{org: acme}}}}}}\n"
        );
        let spec: TenantPolicySpec = serde_yaml::from_str(&yaml).unwrap();
        let r = spec.validate().unwrap();
        assert_eq!(&*r.tenant, "acme");
        assert_eq!(r.tier, Tier::Interactive);
        assert_eq!(r.weight, 2.0);
        assert!(
            r.models.allows("llama-8b")
                && r.models.allows("qwen-7b")
                && !r.models.allows("llama-70b")
        );
        assert_eq!(r.limits.rpm.map(|n| n.get()), Some(600));
        assert_eq!(r.queue.max_queued.get(), DEFAULT_MAX_QUEUED);
        assert_eq!(r.queue.max_wait, Duration::from_secs(5));
        assert_eq!(r.slo.ttft, Some(Duration::from_millis(500)));
        assert!(r.api_keys[0].ct_eq(&ApiKeyHash::of("sk-acme")));
        assert!(!r.api_keys[0].ct_eq(&ApiKeyHash::of("sk-acme2")));
        assert_eq!(
            r.jwt.unwrap().claims,
            vec![("org".to_string(), "acme".to_string())]
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = serde_yaml::from_str::<TenantPolicySpec>("tenant: a\npriority: 3\n").unwrap_err();
        assert!(e.to_string().contains("priority"), "{e}");
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let mut s = spec("a");
        s.weight = Some(0.0);
        let e = s.validate().unwrap_err();
        assert_eq!((e.field.as_str(), e.value.as_str()), ("spec.weight", "0"));
        assert!(
            e.to_string().contains("tenant policy `a`: spec.weight = 0"),
            "{e}"
        );

        let mut s = spec("a");
        s.queue = Some(QueueSpec {
            max_queued: Some(0),
            max_wait_ms: None,
        });
        assert_eq!(s.validate().unwrap_err().field, "spec.queue.maxQueued");

        let mut s = spec("a");
        s.models = vec!["a*b".into()];
        assert_eq!(s.validate().unwrap_err().field, "spec.models[0]");

        let mut s = spec("a");
        s.identity = Some(IdentitySpec {
            api_keys: vec![ApiKeySpec {
                secret_ref: None,
                sha256: Some("xyz".into()),
            }],
            jwt: None,
        });
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.identity.apiKeys[0].sha256"
        );

        let mut s = spec("a");
        s.identity = Some(IdentitySpec {
            api_keys: vec![ApiKeySpec::default()],
            jwt: None,
        });
        assert_eq!(s.validate().unwrap_err().field, "spec.identity.apiKeys[0]");

        assert_eq!(
            spec("Bad Name").validate().unwrap_err().field,
            "spec.tenant"
        );
    }

    #[test]
    fn duplicate_tenants_and_shared_keys_are_rejected() {
        let e = validate_all(&[spec("a"), spec("a")]).unwrap_err();
        assert!(e.reason.contains("same tenant"), "{e}");
        let hex = format!("{:x}", Sha256::digest(b"k"));
        let keyed = |t: &str| {
            let mut s = spec(t);
            s.identity = Some(IdentitySpec {
                api_keys: vec![ApiKeySpec {
                    secret_ref: None,
                    sha256: Some(hex.clone()),
                }],
                jwt: None,
            });
            s
        };
        let e = validate_all(&[keyed("a"), keyed("b")]).unwrap_err();
        assert!(e.reason.contains("tenant `a`"), "{e}");
        assert_eq!(validate_all(&[keyed("a"), spec("b")]).unwrap().len(), 2);
    }

    #[test]
    fn wildcard_alone_allows_every_model() {
        let mut s = spec("a");
        s.models = vec!["*".into()];
        assert_eq!(s.validate().unwrap().models, ModelAccess::All);
    }
}
