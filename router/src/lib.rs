//! weir's data plane: an OpenAI-compatible streaming proxy in front of vLLM-compatible model servers.
//!
//! Seams: [`discovery`] sources publish endpoint sets which become immutable [`snapshot::EndpointSnapshot`]s swapped
//! atomically; endpoint selection is the pure `policies::pick` pipeline over `policies::endpoint::EndpointView`s built
//! from [`state`]; the [`scrape`] loop fills engine load from each pod's `/metrics`; [`proxy`] forwards requests with
//! retries, timeouts and circuit breaking; [`app`] is the axum front door. This crate must not depend on the
//! simulator, the autoscaler or the metrics adapter.

pub mod config;
pub mod discovery;
pub mod snapshot;
pub mod state;

/// Errors of the router crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value failed validation.
    #[error("invalid config at `{field}`: {reason}")]
    InvalidConfig { field: String, reason: String },
    /// Could not bind or serve.
    #[error("server I/O: {0}")]
    Io(#[source] std::io::Error),
}

impl Error {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidConfig { .. } => "invalid_config",
            Self::Io(_) => "io",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
