//! `admission:` and `tenants:` in the YAML config: their raw form and validation.

use std::path::PathBuf;
use std::time::Duration;

use ::admission::{AdmissionConfig, LedgerConfig};
use policies::room::RoomConfig;
use policies::tenant::{ApiKeyHash, TenantPolicySpec};
use serde::Deserialize;

use super::{invalid, parse_duration};
use crate::Error;

/// `admission:` in the YAML config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmission {
    /// `false` turns admission off: no tenants, queues, gating or ledger (plain routing). Default on.
    pub enabled: Option<bool>,
    /// redb file of the usage ledger (default: in memory only).
    pub ledger: Option<PathBuf>,
    /// How often the ledger commits (default 500ms; the usage at risk on a crash).
    pub ledger_flush: Option<String>,
    /// SHA-256 (hex) of admin keys, which may read every tenant's usage.
    #[serde(default, alias = "adminKeys")]
    pub admin_keys: Vec<String>,
    /// Hold requests in weir until their pool has room (default on).
    pub gate: Option<bool>,
    /// Engine queue depth at which a pod takes nothing more (default 2).
    pub max_waiting: Option<u32>,
    /// KV cache use at which a pod takes nothing more (default 0.9).
    pub kv_limit: Option<f64>,
    /// A pod's prefill backlog (tokens) at which it takes nothing more (default 16384).
    pub max_prefill_tokens: Option<u64>,
    /// Requests an unsaturated pod may take per room computation (default 8).
    pub burst: Option<u32>,
    /// Requests outstanding on a pod beyond which it takes nothing more (default 256, vLLM's `max_num_seqs`).
    pub max_in_flight: Option<u32>,
    /// Requests outstanding on a pod beyond which batch takes nothing more (default 48).
    pub batch_max_in_flight: Option<u32>,
    /// Batch sees pods saturated at this much less KV use (default 0.15) and with any engine queue: the headroom
    /// kept for interactive and standard arrivals.
    pub batch_kv_headroom: Option<f64>,
    /// How often each pool's room is recomputed from the pods' state (default 10ms).
    pub refresh: Option<String>,
    /// Requests waiting per tier and pool before arrivals of that tier get 429 (default 5000).
    pub max_queued_per_tier: Option<usize>,
    /// When a client leaves mid-stream, read the pod's stream to its end so the ledger gets the pod's exact usage;
    /// off, the stream is closed at once and vLLM aborts the request (less GPU, usage unknown). Default: on when
    /// tenants are configured (usage is billed), off otherwise.
    pub drain_cancelled_streams: Option<bool>,
    /// Watch `TenantPolicy` objects in Kubernetes (in this namespace; `""` for all) besides the config's tenants.
    pub watch_namespace: Option<String>,
    /// `redis://host:port`: tenants' RPM / TPM limits shared by every replica through this Redis (fail open to
    /// per-replica limits while it is unreachable). Default: in process.
    pub redis: Option<String>,
}

/// Validated admission settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionSettings {
    /// Admission on.
    pub enabled: bool,
    /// The admission crate's settings.
    pub config: AdmissionConfig,
    /// Dispatch gating thresholds, `None` when gating is off.
    pub room: Option<RoomConfig>,
    /// Room recomputation period.
    pub refresh: Duration,
    /// Namespace to watch `TenantPolicy` objects in (`Some("")`: all namespaces).
    pub watch_namespace: Option<String>,
    /// Read cancelled streams to their end for their usage (`None`: when tenants are configured).
    pub drain_cancelled_streams: Option<bool>,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        RawAdmission::default()
            .validate()
            .expect("the defaults are valid")
    }
}

impl RawAdmission {
    /// Validates the block (field names in errors are `admission.*`).
    pub fn validate(self) -> Result<AdmissionSettings, Error> {
        let mut config = AdmissionConfig::default();
        let flush = match &self.ledger_flush {
            Some(s) => parse_duration("admission.ledger_flush", s)?,
            None => LedgerConfig::default().flush_interval,
        };
        if flush.is_zero() || flush > Duration::from_secs(1) {
            return Err(invalid(
                "admission.ledger_flush",
                "must be more than 0 and at most 1s (the usage at risk on a crash)",
            ));
        }
        if let Some(url) = &self.redis {
            let ok = url
                .strip_prefix("redis://")
                .is_some_and(|rest| !rest.is_empty() && redis_url_ok(url));
            if !ok {
                return Err(invalid(
                    "admission.redis",
                    format!("`{url}` is not a redis://host:port URL"),
                ));
            }
            config.redis = Some(url.clone());
        }
        config.ledger = LedgerConfig {
            path: self.ledger,
            flush_interval: flush,
        };
        for (i, k) in self.admin_keys.iter().enumerate() {
            config
                .admin_keys
                .push(ApiKeyHash::from_hex(k).ok_or_else(|| {
                    invalid(
                        format!("admission.admin_keys[{i}]"),
                        "must be the 64 hex digits of the key's SHA-256",
                    )
                })?);
        }
        if let Some(n) = self.max_queued_per_tier {
            if n == 0 {
                return Err(invalid(
                    "admission.max_queued_per_tier",
                    "must be at least 1",
                ));
            }
            config.fair.max_queued_per_tier = [n; 3];
        }
        let defaults = RoomConfig::default();
        let kv_limit = self.kv_limit.unwrap_or(defaults.kv_limit);
        if !(kv_limit > 0.0 && kv_limit <= 1.0) {
            return Err(invalid("admission.kv_limit", "must be in (0, 1]"));
        }
        let refresh = match &self.refresh {
            Some(s) => parse_duration("admission.refresh", s)?,
            None => Duration::from_millis(10),
        };
        if refresh.is_zero() {
            return Err(invalid("admission.refresh", "must be more than 0"));
        }
        let room = self.gate.unwrap_or(true).then_some(RoomConfig {
            max_waiting: self.max_waiting.unwrap_or(defaults.max_waiting),
            kv_limit,
            max_prefill_tokens: self
                .max_prefill_tokens
                .unwrap_or(defaults.max_prefill_tokens),
            max_age_ms: defaults.max_age_ms,
            burst: self.burst.unwrap_or(defaults.burst).max(1),
            max_in_flight: self.max_in_flight.unwrap_or(defaults.max_in_flight),
            batch_max_in_flight: self
                .batch_max_in_flight
                .unwrap_or(defaults.batch_max_in_flight),
            batch_kv_headroom: self
                .batch_kv_headroom
                .unwrap_or(defaults.batch_kv_headroom)
                .clamp(0.0, 1.0),
        });
        Ok(AdmissionSettings {
            enabled: self.enabled.unwrap_or(true),
            config,
            room,
            refresh,
            watch_namespace: self.watch_namespace,
            drain_cancelled_streams: self.drain_cancelled_streams,
        })
    }
}

/// Whether `url` parses as a Redis connection URL (without connecting).
fn redis_url_ok(url: &str) -> bool {
    url.parse::<hyper::Uri>()
        .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()))
}

/// Checks the tenants of the config (field names in errors are `tenants[i].*`).
pub fn validate_tenants(tenants: &[TenantPolicySpec]) -> Result<(), Error> {
    policies::tenant::validate_all(tenants)
        .map(|_| ())
        .map_err(|e| invalid("tenants", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_to_gated_admission_with_an_in_memory_ledger() {
        let s = AdmissionSettings::default();
        assert!(s.enabled);
        assert_eq!(s.room, Some(RoomConfig::default()));
        assert_eq!(s.config.ledger.path, None);
        assert_eq!(s.refresh, Duration::from_millis(10));
    }

    #[test]
    fn bad_values_name_their_field() {
        let bad = |yaml: &str| {
            let raw: RawAdmission = serde_yaml::from_str(yaml).unwrap();
            raw.validate().unwrap_err().to_string()
        };
        assert!(bad("admin_keys: [abc]").contains("admission.admin_keys[0]"));
        assert!(bad("kv_limit: 1.5").contains("admission.kv_limit"));
        assert!(bad("ledger_flush: 5s").contains("admission.ledger_flush"));
        assert!(bad("max_queued_per_tier: 0").contains("admission.max_queued_per_tier"));
        assert!(bad("redis: http://127.0.0.1:6379").contains("admission.redis"));
        let raw: RawAdmission = serde_yaml::from_str("redis: redis://127.0.0.1:6379").unwrap();
        assert_eq!(
            raw.validate().unwrap().config.redis.as_deref(),
            Some("redis://127.0.0.1:6379")
        );
        let raw: RawAdmission =
            serde_yaml::from_str("{gate: false, enabled: false, adminKeys: []}").unwrap();
        let s = raw.validate().unwrap();
        assert_eq!((s.enabled, s.room), (false, None));
    }
}
