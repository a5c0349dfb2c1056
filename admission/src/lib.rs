//! Tenant admission: who a request belongs to, whether it may run, when it may dispatch, and what it used.
//!
//! The router's `identify -> resolve -> route -> admit -> proxy -> account` phases call this crate at `identify`
//! and `admit`, and settle the [`Permit`] at `account`. Decisions (tier priority, weighted fair queuing, room) are the pure
//! [`policies::fair`] / [`policies::room`] functions; this crate is the thin stateful shell around them: locks,
//! wake-ups, the durable usage ledger ([`ledger`]), metrics, and the Kubernetes policy watcher. It must not depend
//! on the router.
//!
//! # API (the contract with the router)
//!
//! ```text
//! Admission::from_policies(Vec<TenantPolicySpec>, AdmissionConfig) -> Result<Admission, Error>   // Clone = Arc
//! Admission::identify(api_key: Option<&str>) -> Result<Identity, Reject>
//!     keys are held only as SHA-256 hashes, compared in constant time; with no policies, every caller is the
//!     implicit tenant `default` (tier standard)
//! async Admission::admit(&Identity, AdmitRequest { model, pool, prompt_tokens, max_tokens, deadline }, now)
//!     -> Result<Permit, Reject>
//!     model access check, enqueue in the tenant's tier, resolve when the pool has room; cancel-safe (dropping the
//!     future while queued frees the place at once and counts it as `abandoned`)
//! Admission::set_room(pool, room)          // from policies::room::pool_room over the pool's endpoint snapshot;
//!                                          // a pool never given room is not gated
//! Permit { tenant, tier, model, pool, request_id, queued_for, .. }
//!     .complete(Usage) / .fail(Usage) / .cancel(Usage); Drop unsettled = cancelled (no token counts);
//!     every end returns the slot and dispatches the next waiter
//! Reject { reason: RejectReason, retry_after: Option<Duration>, message }   // reason.status(), reason.code()
//! Admission::replace_policies(Vec<TenantPolicySpec>) -> Result<(), Error>   // live, keeps queued requests
//! Admission::usage(tenant) / usage_all() -> Vec<UsageRow>; is_admin(api_key); register_metrics(&mut Registry)
//! Admission::tier_queues(now) -> Vec<TierQueue { pool, tier, queued, oldest_wait }>   // for the metrics adapter
//! Admission::queue_changes() -> watch::Receiver<u64>   // changes with any queue's depth (KEDA pushes on it)
//! ```
//!
//! Ledger invariant, per tenant x model x tier: `admitted = completed + failed + cancelled` once every permit is
//! settled; requests that never got a permit are `rejected` (model not allowed, queue full, deadline passed) or
//! `abandoned` (client gone while queued).

mod gate;
pub mod ledger;
pub mod limits;
mod metrics;
pub mod shared;
mod tenants;
#[cfg(test)]
mod tests;
pub mod watcher;

use std::time::Duration;

use policies::fair::FairConfig;
use policies::tenant::{ApiKeyHash, InvalidPolicy};

pub use gate::{Admission, AdmitRequest, Permit, TierQueue, Usage};
pub use ledger::{Counters, LedgerConfig, UsageRow};
pub use limits::{LimitState, RateHeaders};
pub use tenants::{DEFAULT_TENANT, Identity, OTHER_LABEL};
pub use watcher::PolicyWatcher;

/// Errors of the admission crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tenant policy is invalid (names the field).
    #[error(transparent)]
    InvalidPolicy(#[from] InvalidPolicy),
    /// The ledger store failed.
    #[error("usage ledger: {0}")]
    Ledger(#[source] redb::Error),
    /// The shared limiter's Redis URL is invalid.
    #[error("admission.redis: {0}")]
    Redis(#[source] redis::RedisError),
}

impl Error {
    /// Short stable name for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidPolicy(_) => "invalid_policy",
            Error::Ledger(_) => "ledger",
            Error::Redis(_) => "redis",
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of admission.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// Scheduler settings (cost weights, tier floors, per-tier queue bounds, retry-after).
    pub fair: FairConfig,
    /// Ledger file and flush interval.
    pub ledger: LedgerConfig,
    /// Tenants (by name) that get their own metric label; the rest share `other`.
    pub max_tenant_labels: usize,
    /// Output tokens assumed when a request sets no `max_tokens` (llm-d's 128).
    pub default_output_tokens: u64,
    /// Cap on the output estimate charged at dispatch (a huge `max_tokens` is rarely used in full).
    pub max_output_estimate: u64,
    /// Hashes of admin keys (may read every tenant's usage).
    pub admin_keys: Vec<ApiKeyHash>,
    /// `redis://host:port` of the RPM / TPM limits shared by replicas ([`shared`]); `None`: in process only.
    pub redis: Option<String>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            fair: FairConfig::default(),
            ledger: LedgerConfig::default(),
            max_tenant_labels: 50,
            default_output_tokens: 128,
            max_output_estimate: 2048,
            admin_keys: Vec::new(),
            redis: None,
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// No API key while tenants are configured (401).
    MissingApiKey,
    /// The key matches no tenant (401).
    InvalidApiKey,
    /// The tenant may not use the model (403).
    ModelNotAllowed,
    /// The tier's queue of the pool is full (429).
    QueueFull,
    /// The tenant has its maximum of waiting requests (429).
    TenantQueueFull,
    /// The request's deadline passed while it waited (429).
    DeadlineExceeded,
    /// The tenant's requests-per-minute limit (429).
    RequestLimit,
    /// The tenant's tokens-per-minute limit (429).
    TokenLimit,
    /// The tenant's in-flight limit (429).
    ConcurrencyLimit,
    /// `prompt + max_tokens` above the tenant's whole TPM: can never pass (413, not retryable).
    TooManyTokens,
}

impl RejectReason {
    /// HTTP status to answer with.
    pub fn status(self) -> u16 {
        match self {
            RejectReason::MissingApiKey | RejectReason::InvalidApiKey => 401,
            RejectReason::ModelNotAllowed => 403,
            RejectReason::QueueFull
            | RejectReason::TenantQueueFull
            | RejectReason::DeadlineExceeded
            | RejectReason::RequestLimit
            | RejectReason::TokenLimit
            | RejectReason::ConcurrencyLimit => 429,
            RejectReason::TooManyTokens => 413,
        }
    }

    /// OpenAI error `code` (and metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MissingApiKey => "missing_api_key",
            RejectReason::InvalidApiKey => "invalid_api_key",
            RejectReason::ModelNotAllowed => "model_not_allowed",
            RejectReason::QueueFull => "queue_full",
            RejectReason::TenantQueueFull => "tenant_queue_full",
            RejectReason::DeadlineExceeded => "queue_timeout",
            RejectReason::RequestLimit | RejectReason::TokenLimit => "rate_limit_exceeded",
            RejectReason::ConcurrencyLimit => "concurrency_limit_exceeded",
            RejectReason::TooManyTokens => "request_too_large",
        }
    }

    /// OpenAI error `type`.
    pub fn error_type(self) -> &'static str {
        match self {
            RejectReason::MissingApiKey | RejectReason::InvalidApiKey => "authentication_error",
            RejectReason::ModelNotAllowed => "permission_error",
            // OpenAI's types for RPM / TPM denials.
            RejectReason::RequestLimit => "requests",
            RejectReason::TokenLimit => "tokens",
            RejectReason::TooManyTokens => "invalid_request_error",
            _ => "rate_limit_error",
        }
    }
}

/// A rejection, for the router to render as an OpenAI error (with `Retry-After` when set).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Reject {
    /// Why.
    pub reason: RejectReason,
    /// When the client may retry (429s).
    pub retry_after: Option<Duration>,
    /// Message safe to show the client.
    pub message: String,
    /// The tenant's limit states when a limit was checked (for `x-ratelimit-*` headers).
    pub rate: Option<RateHeaders>,
}

impl Reject {
    /// A rejection.
    pub fn new(
        reason: RejectReason,
        retry_after: Option<Duration>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            reason,
            retry_after,
            message: message.into(),
            rate: None,
        }
    }

    /// With the tenant's limit states.
    pub fn with_rate(mut self, rate: RateHeaders) -> Self {
        self.rate = Some(rate);
        self
    }

    /// The OpenAI-shaped error (status, type, code) with [`Reject::retry_after`] as its `Retry-After`, in whole
    /// seconds rounded up (a client that waits the header's time finds room).
    pub fn to_api_error(&self) -> policies::errors::ApiError {
        let e = policies::errors::ApiError::new(
            self.reason.status(),
            self.reason.error_type(),
            self.message.clone(),
        )
        .with_code(self.reason.as_str());
        match self.retry_after {
            Some(d) => e.with_retry_after(d.as_millis().div_ceil(1000).max(1) as u64),
            None => e,
        }
    }
}
