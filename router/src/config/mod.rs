//! Router configuration: one YAML schema (`deny_unknown_fields`) parsed into raw types, then validated into typed
//! [`Config`]; nothing after start-up sees an unvalidated value. Flags and env (`--backend model=url,url`) build the
//! same raw types, so there is one validation path.
//!
//! ```yaml
//! listen: 127.0.0.1:8080
//! pools:
//!   - name: llama-8b                 # pool name; also the served model name unless `model` is set
//!     model: meta-llama/Llama-3.1-8B-Instruct
//!     endpoints: [http://10.0.0.1:8000, http://10.0.0.2:8000]
//!     policy: {kind: round-robin}    # round-robin | random | least-requests | power-of-two | pipeline
//!                                    # | cache-aware | precise-prefix (see below)
//!   - name: llama-pd                 # cache-aware with P/D: endpoints carry roles and KV-event addresses
//!     endpoints:
//!       - {url: http://10.0.0.3:8000, role: prefill, kv_events: tcp://10.0.0.3:5557, kv_replay: tcp://10.0.0.3:5558}
//!       - {url: http://10.0.0.4:8000, role: decode}
//!     policy:
//!       kind: precise-prefix         # cache-aware = approximate index from routing history; precise = KV events
//!       weights: {prefix: 3, queue: 2, kv: 2, token_load: 0, active_request: 0, session: 0, prefill_backlog: 2}
//!                                    # aggregated pools pick by predicted TTFT (policies::pick::predicted_ttft)
//!                                    # unless weights or session affinity are set (then weighted scorers)
//!       load_gate: {margin: 100ms, prefill_tokens_per_s: 15928}   # or `load_gate: off`
//!       session_affinity: true       # x-session-id keeps a conversation on its pod (session weight 1 if unset)
//!       pd: {non_cached_tokens: 512, min_prompt_tokens: 0, ttft_margin: 500ms, colocate_on_prefill: true}
//!                                    # non_cached_tokens 0 = no P/D; see policies::pick::pd for each knob
//!       tokenizer: byte              # tokenizer + Llama-3 chat template the pods use; or {hf: /path/tokenizer.json}
//!       block_size: 16               # tokens per hashed block (the engine's block size for precise-prefix)
//!     api_key: "<key>"               # the key the pods expect (vLLM --api-key), sent as Bearer; clients' own
//!                                    # Authorization / x-api-key are never forwarded
//! decisions: {size: 1024}            # decision-record ring for /debug/decisions
//! models:                            # optional: client-facing names, aliases and weighted splits
//!   - name: llama
//!     aliases: [llama3]
//!     targets: [{pool: llama-8b, weight: 90}, {pool: llama-8b-canary, weight: 10}]
//! timeouts: {connect: 1s, first_byte: 300s, idle: 120s}
//! retry: {max_attempts: 3, budget_ratio: 0.2, budget_min: 3}
//! breaker: {failure_threshold: 5, base_ejection: 5s, max_ejection: 120s}
//! scrape: {interval: 100ms, timeout: 1s, stale_after: 1s}
//! max_body_bytes: 8388608
//! drain_timeout: 30s
//! front_door: {header_read_timeout: 10s, body_read_timeout: 30s, max_connections: 65536, max_messages: 2048}
//! tenants:                           # TenantPolicy specs (camelCase, as the CRD); none: one implicit tenant
//!   - tenant: acme
//!     tier: interactive              # interactive | standard | batch
//!     weight: 2
//!     models: [llama]
//!     queue: {maxQueued: 1000, maxWaitMs: 30000}
//!     identity: {apiKeys: [{sha256: "<64 hex digits of the key's SHA-256>"}]}
//! admission:                         # see config::admission; all optional
//!   {enabled: true, ledger: /var/lib/weir/usage.redb, ledger_flush: 500ms, admin_keys: ["<sha256>"],
//!    gate: true, max_waiting: 2, kv_limit: 0.9, max_prefill_tokens: 16384, burst: 8, max_in_flight: 256,
//!    refresh: 10ms, max_queued_per_tier: 5000, drain_cancelled_streams: true, watch_namespace: tenants,
//!    redis: redis://127.0.0.1:6379}   # RPM / TPM shared by replicas (fail open to local limits)
//!                                    # watch_namespace: TenantPolicy objects there replace `tenants` once listed
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use hyper::header::HeaderValue;
use policies::endpoint::Role;
use policies::pick::breaker::BreakerConfig;
use policies::pick::budget::RetryBudget;
use policies::pick::load_gate::{CostModel, LoadGate};
use policies::pick::pd::PdConfig;
use policies::pick::profile::Weights;
use policies::pick::{Picker, Pipeline, Policy, Weighted, scorers};
use serde::Deserialize;

use crate::Error;

mod admission;
mod front_door;

pub use self::admission::{AdmissionSettings, RawAdmission, validate_tenants};
pub use self::front_door::{FrontDoorConfig, RawFrontDoor};

/// Top-level YAML document.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address to listen on (`host:port`).
    #[serde(default)]
    pub listen: Option<String>,
    /// Pools of endpoints serving one upstream model.
    #[serde(default)]
    pub pools: Vec<RawPool>,
    /// Client-facing model names with aliases and weighted splits over pools.
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// Upstream connect / first-byte / idle timeouts.
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// Attempts per request and the retry budget.
    #[serde(default)]
    pub retry: RawRetry,
    /// Per-endpoint circuit breaker thresholds.
    #[serde(default)]
    pub breaker: RawBreaker,
    /// `/metrics` scraping of endpoints.
    #[serde(default)]
    pub scrape: RawScrape,
    /// Largest accepted request body.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// How long SIGTERM waits for in-flight requests before closing them.
    #[serde(default)]
    pub drain_timeout: Option<String>,
    /// Decision-record ring (`/debug/decisions`).
    #[serde(default)]
    pub decisions: RawDecisions,
    /// Tenants: `TenantPolicy` specs. None: every request is the implicit tenant `default`.
    #[serde(default)]
    pub tenants: Vec<policies::tenant::TenantPolicySpec>,
    /// Admission: ledger, admin keys, dispatch gating.
    #[serde(default)]
    pub admission: RawAdmission,
    /// Client connection limits: header/body read timeouts, connection cap.
    #[serde(default)]
    pub front_door: RawFrontDoor,
}

/// Decision-record settings in YAML.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDecisions {
    /// Records kept (default 1024).
    pub size: Option<usize>,
}

/// One endpoint in YAML: a bare base URL, or a detailed entry with a P/D role and KV-event addresses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RawEndpoint {
    Url(String),
    Detailed(RawEndpointDetail),
}

/// A detailed endpoint entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpointDetail {
    /// Base URL (`http://host:port`).
    pub url: String,
    /// P/D role: `prefill`, `decode`, `both`/`prefill-decode` (default both).
    #[serde(default)]
    pub role: Option<String>,
    /// vLLM KV-event PUB address (`tcp://host:port`), for `precise-prefix` pools.
    #[serde(default)]
    pub kv_events: Option<String>,
    /// vLLM KV-event replay ROUTER address, to fill sequence gaps.
    #[serde(default)]
    pub kv_replay: Option<String>,
    /// GPU type (`H100`, `A100-80`, `L4`, ..): the endpoint's `weir.dev/gpu` label, for per-pool metrics and
    /// autoscaling. Overrides the pool's `gpu`.
    #[serde(default)]
    pub gpu: Option<String>,
}

impl RawEndpoint {
    fn url(&self) -> &str {
        match self {
            Self::Url(u) => u,
            Self::Detailed(d) => &d.url,
        }
    }

    /// The detailed form (a bare URL becomes a detail with only the URL), for flags that add fields.
    fn detail_mut(&mut self) -> &mut RawEndpointDetail {
        if let Self::Url(u) = self {
            *self = Self::Detailed(RawEndpointDetail {
                url: std::mem::take(u),
                ..RawEndpointDetail::default()
            });
        }
        match self {
            Self::Detailed(d) => d,
            // Just converted above.
            Self::Url(_) => unreachable!("converted to Detailed above"),
        }
    }
}

/// One pool in YAML.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Pool name (metric label, route target).
    pub name: String,
    /// Model name the endpoints serve (sent upstream); defaults to the pool name.
    #[serde(default)]
    pub model: Option<String>,
    /// Static endpoints: base URLs (`http://host:port`) or detailed entries.
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
    /// Scheduling policy (default round-robin).
    #[serde(default)]
    pub policy: Option<RawPolicy>,
    /// GPU type of every endpoint in the pool that does not name its own.
    #[serde(default)]
    pub gpu: Option<String>,
    /// The API key the pool's pods expect (vLLM `--api-key`), sent upstream as `Authorization: Bearer <key>`.
    #[serde(default)]
    pub api_key: Option<String>,
}

/// Scheduling policy in YAML, tagged by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RawPolicy {
    // Empty struct variants, not unit variants: serde ignores extra keys next to the tag of an internally tagged
    // unit variant, so `{kind: round-robin, weights: ..}` would be accepted silently.
    RoundRobin {},
    Random {},
    LeastRequests {},
    PowerOfTwo {},
    /// A custom filter -> score -> pick pipeline.
    Pipeline {
        #[serde(default)]
        filters: Vec<String>,
        #[serde(default)]
        scorers: Vec<RawScorer>,
        #[serde(default)]
        picker: Option<String>,
    },
    /// Cache-aware scoring over an approximate prefix index built from routing history.
    CacheAware(RawCacheAware),
    /// Cache-aware scoring over the precise index fed by the pods' KV events.
    PrecisePrefix(RawCacheAware),
}

/// Settings shared by the `cache-aware` and `precise-prefix` policies (they differ only in the index they read).
///
/// A newtype variant of the internally tagged [`RawPolicy`] rather than `#[serde(flatten)]`: serde removes the
/// `kind` tag before deserializing the variant's content, so `deny_unknown_fields` here still rejects a misspelt key
/// and names it, which it cannot do through `flatten`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheAware {
    #[serde(default)]
    pub weights: Option<RawWeights>,
    #[serde(default)]
    pub load_gate: Option<RawGate>,
    #[serde(default)]
    pub session_affinity: Option<bool>,
    #[serde(default)]
    pub pd: Option<RawPd>,
    #[serde(default)]
    pub tokenizer: Option<RawTokenizer>,
    #[serde(default)]
    pub block_size: Option<u32>,
}

/// Scorer weights of a cache-aware policy (defaults: llm-d's chart, queue 2, kv 2, prefix 3).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeights {
    pub prefix: Option<f64>,
    pub queue: Option<f64>,
    pub kv: Option<f64>,
    pub token_load: Option<f64>,
    pub active_request: Option<f64>,
    pub session: Option<f64>,
    pub prefill_backlog: Option<f64>,
}

/// The anti-herding load gate: `off`, or thresholds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawGate {
    /// `off` / `on`.
    Switch(String),
    Thresholds(RawGateThresholds),
}

/// Load-gate thresholds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateThresholds {
    /// How much worse predicted TTFT a cache hit may be than the best pod before it is ignored (default 100ms).
    pub margin: Option<String>,
    /// Prefill throughput estimate per pod (default 15,928 tokens/s).
    pub prefill_tokens_per_s: Option<f64>,
    /// Wait per queued request (default 10ms).
    pub queued_request: Option<String>,
}

/// P/D decision knobs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPd {
    /// Minimum uncached suffix on the decode pod for P/D (default 512; 0 disables P/D).
    pub non_cached_tokens: Option<u32>,
    /// Minimum prompt length for P/D (default 0).
    pub min_prompt_tokens: Option<u32>,
    /// How much worse P/D's predicted TTFT may be than colocated (default 500ms).
    pub ttft_margin: Option<String>,
    /// Whether a declined request may run on a prefill pod that predicts a better TTFT (default true).
    pub colocate_on_prefill: Option<bool>,
}

/// A named scorer with its weight.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScorer {
    /// Scorer name (`queue`, `kv-cache-utilization`, ...).
    pub name: String,
    /// Weight in the total score (default 1).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// A client-facing model in YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Served name clients send as `model`.
    pub name: String,
    /// Other names for the same route.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Pools and their traffic weights.
    pub targets: Vec<RawTarget>,
}

/// One weighted target of a client-facing model (GIE `targetModels`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    /// Pool name.
    pub pool: String,
    /// Relative weight, 1..=1,000,000 (default 100).
    #[serde(default = "hundred")]
    pub weight: u32,
}

fn hundred() -> u32 {
    100
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// TCP connect (default 1s).
    pub connect: Option<String>,
    /// Request sent -> response head (default 300s; non-streaming covers the whole generation).
    pub first_byte: Option<String>,
    /// Longest gap between body chunks (default 120s).
    pub idle: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Attempts including the first (default 3; 1 disables retries).
    pub max_attempts: Option<u32>,
    /// Retries allowed as a fraction of active requests (default 0.2).
    pub budget_ratio: Option<f64>,
    /// Concurrent retries always allowed (default 3).
    pub budget_min: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    /// Consecutive failures that open the breaker (default 5).
    pub failure_threshold: Option<u32>,
    /// First ejection, doubled per failed probe (default 5s).
    pub base_ejection: Option<String>,
    /// Longest ejection (default 120s).
    pub max_ejection: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScrape {
    /// Scrape period (default 100ms).
    pub interval: Option<String>,
    /// Per-scrape timeout (default 1s).
    pub timeout: Option<String>,
    /// Age after which scraped numbers are ignored (default 1s).
    pub stale_after: Option<String>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Pools, sorted by name.
    pub pools: Vec<PoolConfig>,
    /// Client-facing routes (explicit `models` plus one implicit route per pool not already named).
    pub routes: Vec<RouteConfig>,
    pub timeouts: Timeouts,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    pub scrape: ScrapeConfig,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Drain deadline after SIGTERM.
    pub drain_timeout: Duration,
    /// Decision records kept for `/debug/decisions`.
    pub decisions_size: usize,
    /// Tenants (validated at start; kept as specs, the admission crate's input).
    pub tenants: Vec<policies::tenant::TenantPolicySpec>,
    /// Admission settings.
    pub admission: AdmissionSettings,
    /// Client connection limits.
    pub front_door: FrontDoorConfig,
}

/// A validated static endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// Base URL, `http://host:port`.
    pub url: String,
    /// P/D role.
    pub role: Role,
    /// KV-event PUB address (`tcp://..`).
    pub kv_events: Option<String>,
    /// KV-event replay address (`tcp://..`).
    pub kv_replay: Option<String>,
    /// GPU type (endpoint's, else the pool's), published as the `weir.dev/gpu` label.
    pub gpu: Option<String>,
}

/// Which prefix index a cache-aware pool reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    /// Routing history (the router's guesses).
    Approximate,
    /// The pods' KV events.
    Precise,
}

/// `tokenizer:` of a cache-aware policy as written: a name (`byte`) or `{hf: <path to tokenizer.json>}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawTokenizer {
    /// A built-in tokenizer by name.
    Name(String),
    /// An HF `tokenizer.json` (needs the `hf` cargo feature).
    Hf {
        /// Local path of the file.
        hf: String,
    },
}

/// Tokenizer (and chat template) a pool's pods use; the prefix index hashes its ids.
#[derive(Clone)]
pub enum TokenizerKind {
    /// weir's ~4-bytes-per-token tokenizer with the Llama-3 chat template (what `weir sim` runs).
    Byte,
    /// An HF `tokenizer.json`, loaded once at validation so a bad file is a config error.
    Hf {
        /// The file it was loaded from (identity for equality and debug output).
        path: String,
        /// The loaded tokenizer, shared by the pool.
        tokenizer: std::sync::Arc<dyn policies::tokens::Tokenizer>,
    },
}

impl std::fmt::Debug for TokenizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Byte => f.write_str("Byte"),
            Self::Hf { path, .. } => f.debug_struct("Hf").field("path", path).finish(),
        }
    }
}

impl PartialEq for TokenizerKind {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Byte, Self::Byte) => true,
            (Self::Hf { path: a, .. }, Self::Hf { path: b, .. }) => a == b,
            _ => false,
        }
    }
}

impl TokenizerKind {
    pub fn build(&self) -> std::sync::Arc<dyn policies::tokens::Tokenizer> {
        match self {
            Self::Byte => std::sync::Arc::new(policies::tokens::ByteTokenizer),
            Self::Hf { tokenizer, .. } => std::sync::Arc::clone(tokenizer),
        }
    }
}

/// A validated cache-aware policy.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheAwareConfig {
    pub index: IndexKind,
    /// Scorer weights of the aggregated profile (P/D pools use the prefill/decode presets with this prefix weight).
    pub weights: Weights,
    /// Anti-herding gate; `None` trusts prefix hits blindly.
    pub gate: Option<LoadGate>,
    /// Record `x-session-id` -> pod and score that pod.
    pub session_affinity: bool,
    /// P/D decision knobs (used when the pool has prefill-role endpoints).
    pub pd: PdConfig,
    pub tokenizer: TokenizerKind,
    /// Tokens per hashed block.
    pub block_size: u32,
}

/// A validated pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    /// Model name sent upstream.
    pub model: String,
    /// Static endpoints, URLs validated as `http://host:port`.
    pub endpoints: Vec<EndpointConfig>,
    pub policy: PolicyConfig,
    /// `Bearer <api_key>` for the pods (marked sensitive: `Debug` does not print it); `None`: no `Authorization`.
    pub upstream_auth: Option<HeaderValue>,
}

/// Validated scheduling policy; [`PolicyConfig::build`] makes the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyConfig {
    Baseline(Policy),
    Pipeline {
        filters: Vec<String>,
        scorers: Vec<(String, f64)>,
        picker: String,
    },
    /// Cache-aware (approximate or precise prefix index), optionally P/D.
    CacheAware(CacheAwareConfig),
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self::Baseline(Policy::RoundRobin)
    }
}

impl PolicyConfig {
    /// Builds the pure pipeline. Names were validated, so unknown names cannot occur here; they are skipped.
    pub fn build(&self) -> Pipeline {
        match self {
            Self::Baseline(p) => Pipeline::baseline(*p),
            // Cache-aware pools pick through `crate::route`; this pipeline only names the fallback in /debug/routes.
            Self::CacheAware(_) => Pipeline::baseline(Policy::LeastRequests),
            Self::Pipeline {
                filters,
                scorers: ss,
                picker,
            } => Pipeline::new(
                filters
                    .iter()
                    .filter_map(|f| scorers::filter_by_name(f))
                    .collect(),
                ss.iter()
                    .filter_map(|(n, w)| {
                        scorers::scorer_by_name(n).map(|s| Weighted {
                            scorer: s,
                            weight: *w,
                        })
                    })
                    .collect(),
                picker_by_name(picker).unwrap_or(Picker::MaxScore),
            ),
        }
    }
}

fn picker_by_name(name: &str) -> Option<Picker> {
    match name {
        "max-score" => Some(Picker::MaxScore),
        "random" => Some(Picker::Random),
        "weighted-random" => Some(Picker::WeightedRandom),
        "round-robin" => Some(Picker::RoundRobin(Default::default())),
        "power-of-two" => Some(Picker::PowerOfTwo),
        _ => None,
    }
}

/// A validated client-facing route: a served name (plus aliases) split over pools by weight.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    pub aliases: Vec<String>,
    /// (pool name, weight > 0).
    pub targets: Vec<(String, u32)>,
}

/// Upstream timeouts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// From sending the request to the response head (non-streaming: the whole generation).
    pub first_byte: Duration,
    /// Longest silence between body chunks.
    pub idle: Duration,
}

/// Retry policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryConfig {
    /// Attempts per request, the first included (1 = no retries).
    pub max_attempts: u32,
    pub budget: RetryBudget,
}

/// Metric scraping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScrapeConfig {
    pub interval: Duration,
    pub timeout: Duration,
    /// A scrape older than this marks the endpoint's metrics stale.
    pub stale_after: Duration,
}

pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses `100ms`, `1s`, `1.5s`, `2m`, `1h` (humantime-style, one unit).
pub fn parse_duration(field: &str, s: &str) -> Result<Duration, Error> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| invalid(field, format!("`{s}` is not a duration like 100ms or 5s")))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "us" => n / 1e6,
        u => return Err(invalid(field, format!("unknown unit `{u}` in `{s}`"))),
    };
    // Also rejects negatives, NaN and values too large for a Duration (which would otherwise panic).
    Duration::try_from_secs_f64(secs)
        .map_err(|_| invalid(field, format!("`{s}` is not a usable duration")))
}

/// `Bearer <key>` as a sensitive header value; the key must be non-empty visible ASCII without spaces.
fn bearer(field: &str, key: &str) -> Result<HeaderValue, Error> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            "must be non-empty visible ASCII without spaces",
        ));
    }
    let mut v = HeaderValue::from_str(&format!("Bearer {key}"))
        .map_err(|_| invalid(field, "not a valid header value"))?;
    v.set_sensitive(true);
    Ok(v)
}

fn dur(field: &str, v: &Option<String>, default: Duration) -> Result<Duration, Error> {
    v.as_deref()
        .map_or(Ok(default), |s| parse_duration(field, s))
}

/// Checks a base URL is `http://host:port` with no path, and normalises away a trailing `/`.
pub fn validate_url(field: &str, url: &str) -> Result<String, Error> {
    let u = url.trim_end_matches('/');
    let uri: hyper::Uri = u
        .parse()
        .map_err(|e| invalid(field, format!("`{url}` is not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid(
            field,
            format!("`{url}` must start with http:// (TLS upstreams are not supported)"),
        ));
    }
    if uri.authority().is_none() {
        return Err(invalid(field, format!("`{url}` has no host")));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid(
            field,
            format!("`{url}` must not have a path; give the server's base URL"),
        ));
    }
    Ok(u.to_string())
}

fn validate_tcp(field: &str, addr: &Option<String>) -> Result<Option<String>, Error> {
    match addr {
        None => Ok(None),
        Some(a) => {
            let rest = a.strip_prefix("tcp://").ok_or_else(|| {
                invalid(
                    field,
                    format!("`{a}` must be a ZeroMQ address like tcp://host:5557"),
                )
            })?;
            match rest.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => {
                    Ok(Some(a.clone()))
                }
                _ => Err(invalid(field, format!("`{a}` needs a host and a port"))),
            }
        }
    }
}

fn validate_endpoint(
    field: &str,
    e: &RawEndpoint,
    pool_gpu: &Option<String>,
) -> Result<EndpointConfig, Error> {
    match e {
        RawEndpoint::Url(u) => Ok(EndpointConfig {
            url: validate_url(field, u)?,
            role: Role::Both,
            kv_events: None,
            kv_replay: None,
            gpu: pool_gpu.clone(),
        }),
        RawEndpoint::Detailed(d) => {
            let role = match d.role.as_deref() {
                None => Role::Both,
                Some(r) => Role::from_label(r).ok_or_else(|| {
                    invalid(
                        format!("{field}.role"),
                        format!("unknown role `{r}` (prefill, decode, both)"),
                    )
                })?,
            };
            let kv_replay = validate_tcp(&format!("{field}.kv_replay"), &d.kv_replay)?;
            let kv_events = validate_tcp(&format!("{field}.kv_events"), &d.kv_events)?;
            if kv_replay.is_some() && kv_events.is_none() {
                return Err(invalid(
                    format!("{field}.kv_replay"),
                    "needs kv_events (replay only fills gaps in a subscription)",
                ));
            }
            Ok(EndpointConfig {
                url: validate_url(&format!("{field}.url"), &d.url)?,
                role,
                kv_events,
                kv_replay,
                gpu: d.gpu.clone().or_else(|| pool_gpu.clone()),
            })
        }
    }
}

fn weight(field: &str, v: Option<f64>, default: f64) -> Result<f64, Error> {
    let w = v.unwrap_or(default);
    if !w.is_finite() || !(0.0..=1000.0).contains(&w) {
        return Err(invalid(field, format!("{w} is not a weight in 0..=1000")));
    }
    Ok(w)
}

/// Validates a pool's `policy:` (`f` is its field path, `pools[i].policy`); none means round-robin.
fn validate_policy(f: &str, policy: Option<RawPolicy>) -> Result<PolicyConfig, Error> {
    Ok(match policy {
        None => PolicyConfig::default(),
        Some(RawPolicy::RoundRobin {}) => PolicyConfig::Baseline(Policy::RoundRobin),
        Some(RawPolicy::Random {}) => PolicyConfig::Baseline(Policy::Random),
        Some(RawPolicy::LeastRequests {}) => PolicyConfig::Baseline(Policy::LeastRequests),
        Some(RawPolicy::PowerOfTwo {}) => PolicyConfig::Baseline(Policy::PowerOfTwo),
        Some(RawPolicy::Pipeline {
            filters,
            scorers: ss,
            picker,
        }) => {
            for fl in &filters {
                if scorers::filter_by_name(fl).is_none() {
                    return Err(invalid(
                        format!("{f}.filters"),
                        format!("unknown filter `{fl}`"),
                    ));
                }
            }
            let mut out = Vec::new();
            for s in ss {
                if scorers::scorer_by_name(&s.name).is_none() {
                    return Err(invalid(
                        format!("{f}.scorers"),
                        format!("unknown scorer `{}`", s.name),
                    ));
                }
                if !s.weight.is_finite() || s.weight < 0.0 {
                    return Err(invalid(format!("{f}.scorers"), "weight must be >= 0"));
                }
                out.push((s.name, s.weight));
            }
            let picker = picker.unwrap_or_else(|| "max-score".to_string());
            if picker_by_name(&picker).is_none() {
                return Err(invalid(
                    format!("{f}.picker"),
                    format!("unknown picker `{picker}`"),
                ));
            }
            PolicyConfig::Pipeline {
                filters,
                scorers: out,
                picker,
            }
        }
        Some(RawPolicy::CacheAware(c)) => {
            PolicyConfig::CacheAware(validate_cache_aware(f, IndexKind::Approximate, c)?)
        }
        Some(RawPolicy::PrecisePrefix(c)) => {
            PolicyConfig::CacheAware(validate_cache_aware(f, IndexKind::Precise, c)?)
        }
    })
}

fn validate_cache_aware(
    f: &str,
    index: IndexKind,
    raw: RawCacheAware,
) -> Result<CacheAwareConfig, Error> {
    let RawCacheAware {
        weights,
        load_gate,
        session_affinity,
        pd,
        tokenizer,
        block_size,
    } = raw;
    let d = Weights::default();
    let w = weights.unwrap_or_default();
    let session_affinity = session_affinity.unwrap_or(false);
    let weights = Weights {
        prefix: weight(&format!("{f}.weights.prefix"), w.prefix, d.prefix)?,
        queue: weight(&format!("{f}.weights.queue"), w.queue, d.queue)?,
        kv: weight(&format!("{f}.weights.kv"), w.kv, d.kv)?,
        token_load: weight(
            &format!("{f}.weights.token_load"),
            w.token_load,
            d.token_load,
        )?,
        active_request: weight(
            &format!("{f}.weights.active_request"),
            w.active_request,
            d.active_request,
        )?,
        session: weight(
            &format!("{f}.weights.session"),
            w.session,
            if session_affinity { 1.0 } else { 0.0 },
        )?,
        prefill_backlog: weight(
            &format!("{f}.weights.prefill_backlog"),
            w.prefill_backlog,
            d.prefill_backlog,
        )?,
    };
    let gate = match load_gate {
        None => Some(LoadGate::default()),
        Some(RawGate::Switch(s)) => match s.as_str() {
            "off" | "false" => None,
            "on" | "true" => Some(LoadGate::default()),
            other => {
                return Err(invalid(
                    format!("{f}.load_gate"),
                    format!("`{other}` is not on, off or {{margin, ..}}"),
                ));
            }
        },
        Some(RawGate::Thresholds(t)) => {
            let dg = LoadGate::default();
            let tps = t
                .prefill_tokens_per_s
                .unwrap_or(dg.cost.prefill_tokens_per_s);
            if !tps.is_finite() || tps < 1.0 {
                return Err(invalid(
                    format!("{f}.load_gate.prefill_tokens_per_s"),
                    "must be >= 1",
                ));
            }
            Some(LoadGate {
                cost: CostModel {
                    prefill_tokens_per_s: tps,
                    queued_request_s: dur(
                        &format!("{f}.load_gate.queued_request"),
                        &t.queued_request,
                        Duration::from_secs_f64(dg.cost.queued_request_s),
                    )?
                    .as_secs_f64(),
                },
                margin_s: dur(
                    &format!("{f}.load_gate.margin"),
                    &t.margin,
                    Duration::from_secs_f64(dg.margin_s),
                )?
                .as_secs_f64(),
            })
        }
    };
    let p = pd.unwrap_or_default();
    let dp = PdConfig::default();
    let pd = PdConfig {
        non_cached_tokens: p.non_cached_tokens.unwrap_or(dp.non_cached_tokens),
        min_prompt_tokens: p.min_prompt_tokens.unwrap_or(dp.min_prompt_tokens),
        ttft_margin_s: dur(
            &format!("{f}.pd.ttft_margin"),
            &p.ttft_margin,
            Duration::from_secs_f64(dp.ttft_margin_s),
        )?
        .as_secs_f64(),
        colocate_on_prefill: p.colocate_on_prefill.unwrap_or(dp.colocate_on_prefill),
        cost: gate.map_or(dp.cost, |g| g.cost),
        ..dp
    };
    let tokenizer = match tokenizer {
        None => TokenizerKind::Byte,
        Some(RawTokenizer::Name(n)) if n == "byte" => TokenizerKind::Byte,
        Some(RawTokenizer::Name(other)) => {
            return Err(invalid(
                format!("{f}.tokenizer"),
                format!("unknown tokenizer `{other}` (byte or {{hf: <path>}})"),
            ));
        }
        Some(RawTokenizer::Hf { hf }) => {
            let tokenizer =
                policies::hf_tokenizer::load_tokenizer_file(std::path::Path::new(&hf), None)
                    .map_err(|e| invalid(format!("{f}.tokenizer.hf"), e.to_string()))?;
            TokenizerKind::Hf {
                path: hf,
                tokenizer,
            }
        }
    };
    let block_size = block_size.unwrap_or(16);
    if !(1..=1024).contains(&block_size) {
        return Err(invalid(format!("{f}.block_size"), "must be in 1..=1024"));
    }
    Ok(CacheAwareConfig {
        index,
        weights,
        gate,
        session_affinity,
        pd,
        tokenizer,
        block_size,
    })
}

impl RawConfig {
    /// Parses YAML; unknown fields are errors.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        serde_yaml::from_str(text).map_err(|e| invalid("config", e.to_string()))
    }

    /// Adds pools from `--backend model=url,url` flags (a pool named after the model).
    pub fn add_backend_flag(&mut self, spec: &str) -> Result<(), Error> {
        let (model, urls) = spec
            .split_once('=')
            .ok_or_else(|| invalid("--backend", format!("`{spec}` is not model=url[,url..]")))?;
        let urls: Vec<RawEndpoint> = urls
            .split(',')
            .filter(|u| !u.is_empty())
            .map(|u| RawEndpoint::Url(u.to_string()))
            .collect();
        if let Some(p) = self.pools.iter_mut().find(|p| p.name == model) {
            p.endpoints.extend(urls);
        } else {
            self.pools.push(RawPool {
                name: model.to_string(),
                model: None,
                endpoints: urls,
                policy: None,
                gpu: None,
                api_key: None,
            });
        }
        Ok(())
    }

    fn endpoint_mut(&mut self, flag: &str, url: &str) -> Result<&mut RawEndpointDetail, Error> {
        let want = url.trim_end_matches('/');
        self.pools
            .iter_mut()
            .flat_map(|p| p.endpoints.iter_mut())
            .find(|e| e.url().trim_end_matches('/') == want)
            .map(RawEndpoint::detail_mut)
            .ok_or_else(|| invalid(flag, format!("no --backend endpoint `{url}`")))
    }

    /// `--kv-events http://host:port=tcp://host:5557[,tcp://host:5558]`: the KV-event publisher (and replay
    /// socket) of an endpoint already named by `--backend`.
    pub fn add_kv_events_flag(&mut self, spec: &str) -> Result<(), Error> {
        let (url, addrs) = spec.split_once('=').ok_or_else(|| {
            invalid(
                "--kv-events",
                format!("`{spec}` is not url=tcp://host:port[,tcp://host:port]"),
            )
        })?;
        let mut it = addrs.split(',').filter(|a| !a.is_empty());
        let publisher = it.next().map(str::to_string);
        let replay = it.next().map(str::to_string);
        let e = self.endpoint_mut("--kv-events", url)?;
        e.kv_events = publisher;
        e.kv_replay = replay;
        Ok(())
    }

    /// `--role http://host:port=prefill`: the P/D role of an endpoint already named by `--backend`.
    pub fn add_role_flag(&mut self, spec: &str) -> Result<(), Error> {
        let (url, role) = spec
            .split_once('=')
            .ok_or_else(|| invalid("--role", format!("`{spec}` is not url=prefill|decode|both")))?;
        self.endpoint_mut("--role", url)?.role = Some(role.to_string());
        Ok(())
    }

    /// Validates into [`Config`].
    pub fn validate(self) -> Result<Config, Error> {
        let listen: SocketAddr = self
            .listen
            .as_deref()
            .unwrap_or("127.0.0.1:8080")
            .parse()
            .map_err(|e| invalid("listen", format!("{e}")))?;
        let mut pools = Vec::new();
        let mut names = BTreeSet::new();
        for (i, p) in self.pools.into_iter().enumerate() {
            let f = format!("pools[{i}]");
            if p.name.is_empty() {
                return Err(invalid(format!("{f}.name"), "must not be empty"));
            }
            if !names.insert(p.name.clone()) {
                return Err(invalid(
                    format!("{f}.name"),
                    format!("duplicate pool `{}`", p.name),
                ));
            }
            let mut endpoints = Vec::new();
            for (j, e) in p.endpoints.iter().enumerate() {
                endpoints.push(validate_endpoint(
                    &format!("{f}.endpoints[{j}]"),
                    e,
                    &p.gpu,
                )?);
            }
            let policy = validate_policy(&format!("{f}.policy"), p.policy)?;
            let upstream_auth = p
                .api_key
                .as_deref()
                .map(|k| bearer(&format!("{f}.api_key"), k))
                .transpose()?;
            pools.push(PoolConfig {
                model: p.model.unwrap_or_else(|| p.name.clone()),
                name: p.name,
                endpoints,
                policy,
                upstream_auth,
            });
        }
        pools.sort_by(|a, b| a.name.cmp(&b.name));

        let mut routes = Vec::new();
        let mut served: BTreeMap<String, String> = BTreeMap::new();
        for (i, m) in self.models.into_iter().enumerate() {
            let f = format!("models[{i}]");
            if m.targets.is_empty() {
                return Err(invalid(format!("{f}.targets"), "needs at least one target"));
            }
            let mut targets = Vec::new();
            for (j, t) in m.targets.into_iter().enumerate() {
                if !names.contains(&t.pool) {
                    return Err(invalid(
                        format!("{f}.targets[{j}].pool"),
                        format!("no pool named `{}`", t.pool),
                    ));
                }
                if t.weight == 0 || t.weight > 1_000_000 {
                    return Err(invalid(
                        format!("{f}.targets[{j}].weight"),
                        "must be in 1..=1000000",
                    ));
                }
                targets.push((t.pool, t.weight));
            }
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                if let Some(prev) = served.insert(n.clone(), m.name.clone()) {
                    return Err(invalid(
                        f.clone(),
                        format!("name `{n}` is already served by `{prev}`"),
                    ));
                }
            }
            routes.push(RouteConfig {
                name: m.name,
                aliases: m.aliases,
                targets,
            });
        }
        // Every pool is also reachable by its served model name unless an explicit route took that name.
        for p in &pools {
            if !served.contains_key(&p.model) {
                served.insert(p.model.clone(), p.model.clone());
                routes.push(RouteConfig {
                    name: p.model.clone(),
                    aliases: vec![],
                    targets: vec![(p.name.clone(), 1)],
                });
            }
        }

        let t = self.timeouts;
        let timeouts = Timeouts {
            connect: dur("timeouts.connect", &t.connect, Duration::from_secs(1))?,
            first_byte: dur(
                "timeouts.first_byte",
                &t.first_byte,
                Duration::from_secs(300),
            )?,
            idle: dur("timeouts.idle", &t.idle, Duration::from_secs(120))?,
        };
        let r = self.retry;
        let max_attempts = r.max_attempts.unwrap_or(3);
        if max_attempts == 0 {
            return Err(invalid(
                "retry.max_attempts",
                "must be >= 1 (1 disables retries)",
            ));
        }
        let ratio = r.budget_ratio.unwrap_or(0.2);
        if !(0.0..=1.0).contains(&ratio) {
            return Err(invalid("retry.budget_ratio", "must be within 0..=1"));
        }
        let retry = RetryConfig {
            max_attempts,
            budget: RetryBudget {
                ratio,
                min_concurrent: r.budget_min.unwrap_or(3),
            },
        };
        let b = self.breaker;
        let d = BreakerConfig::default();
        let breaker = BreakerConfig {
            failure_threshold: b.failure_threshold.unwrap_or(d.failure_threshold).max(1),
            base_ejection: dur("breaker.base_ejection", &b.base_ejection, d.base_ejection)?,
            max_ejection: dur("breaker.max_ejection", &b.max_ejection, d.max_ejection)?,
        };
        let s = self.scrape;
        let scrape = ScrapeConfig {
            interval: dur("scrape.interval", &s.interval, Duration::from_millis(100))?,
            timeout: dur("scrape.timeout", &s.timeout, Duration::from_secs(1))?,
            stale_after: dur("scrape.stale_after", &s.stale_after, Duration::from_secs(1))?,
        };
        if scrape.interval.is_zero() {
            return Err(invalid("scrape.interval", "must be > 0"));
        }
        let max_body_bytes = usize::try_from(self.max_body_bytes.unwrap_or(8 << 20))
            .map_err(|_| invalid("max_body_bytes", "too large"))?;
        let drain_timeout = dur(
            "drain_timeout",
            &self.drain_timeout,
            Duration::from_secs(30),
        )?;
        let decisions_size = self.decisions.size.unwrap_or(1024);
        if decisions_size == 0 || decisions_size > 1_000_000 {
            return Err(invalid("decisions.size", "must be in 1..=1000000"));
        }
        validate_tenants(&self.tenants)?;
        let admission = self.admission.validate()?;
        let front_door = self.front_door.validate()?;
        Ok(Config {
            listen,
            pools,
            routes,
            timeouts,
            retry,
            breaker,
            scrape,
            max_body_bytes,
            drain_timeout,
            decisions_size,
            tenants: self.tenants,
            admission,
            front_door,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example_validates() {
        let raw = RawConfig::from_yaml(
            r#"
listen: 127.0.0.1:0
pools:
  - name: a
    model: m-a
    endpoints: [http://127.0.0.1:1/, http://127.0.0.1:2]
    policy: {kind: pipeline, scorers: [{name: queue, weight: 2}], picker: max-score}
  - name: b
    endpoints: [http://127.0.0.1:3]
    policy: {kind: power-of-two}
models:
  - name: llama
    aliases: [l3]
    targets: [{pool: a, weight: 90}, {pool: b, weight: 10}]
timeouts: {first_byte: 2s, idle: 500ms}
scrape: {interval: 50ms}
"#,
        )
        .unwrap();
        let c = raw.validate().unwrap();
        let urls: Vec<&str> = c.pools[0]
            .endpoints
            .iter()
            .map(|e| e.url.as_str())
            .collect();
        assert_eq!(urls, vec!["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        assert_eq!(c.timeouts.idle, Duration::from_millis(500));
        assert_eq!(c.scrape.interval, Duration::from_millis(50));
        assert_eq!(
            c.routes[0].targets,
            vec![("a".into(), 90), ("b".into(), 10)]
        );
        // Implicit routes for each pool's served model name.
        assert!(c.routes.iter().any(|r| r.name == "m-a"));
        assert!(c.routes.iter().any(|r| r.name == "b"));
    }

    #[test]
    fn unknown_fields_are_rejected_with_the_field_name() {
        let e = RawConfig::from_yaml("pools: [{name: a, endpoint: [x]}]").unwrap_err();
        assert!(e.to_string().contains("endpoint"), "{e}");
    }

    #[test]
    fn pd_knobs_default_and_override() {
        let pd_of = |yaml: &str| {
            let c = RawConfig::from_yaml(yaml).unwrap().validate().unwrap();
            let PolicyConfig::CacheAware(ca) = &c.pools[0].policy else {
                panic!("{:?}", c.pools[0].policy);
            };
            ca.pd
        };
        let d = pd_of(
            "pools: [{name: a, endpoints: [http://127.0.0.1:1], policy: {kind: cache-aware}}]",
        );
        assert_eq!(d, PdConfig::default());
        assert_eq!(
            (d.non_cached_tokens, d.ttft_margin_s, d.colocate_on_prefill),
            (512, 0.5, true)
        );
        let o = pd_of(
            "pools: [{name: a, endpoints: [http://127.0.0.1:1], policy: {kind: cache-aware, \
             load_gate: {prefill_tokens_per_s: 35000}, \
             pd: {non_cached_tokens: 1024, ttft_margin: 250ms, colocate_on_prefill: false}}}]",
        );
        assert_eq!(
            (o.non_cached_tokens, o.ttft_margin_s, o.colocate_on_prefill),
            (1024, 0.25, false)
        );
        assert_eq!(
            o.cost.prefill_tokens_per_s, 35_000.0,
            "the P/D decider uses the gate's rate"
        );
    }

    #[test]
    fn cache_aware_kinds_share_their_settings_and_reject_unknown_keys() {
        for (kind, index) in [
            ("cache-aware", IndexKind::Approximate),
            ("precise-prefix", IndexKind::Precise),
        ] {
            let c = RawConfig::from_yaml(&format!(
                "pools: [{{name: a, endpoints: [http://127.0.0.1:1], policy: {{kind: {kind}, \
                 weights: {{prefix: 5, prefill_backlog: 0.5}}, load_gate: off, session_affinity: true, pd: {{non_cached_tokens: 0}}, \
                 block_size: 32}}}}]"
            ))
            .unwrap()
            .validate()
            .unwrap();
            let PolicyConfig::CacheAware(ca) = &c.pools[0].policy else {
                panic!("{kind}: {:?}", c.pools[0].policy);
            };
            assert_eq!(ca.index, index, "{kind}");
            assert_eq!(ca.weights.prefix, 5.0, "{kind}");
            assert_eq!(ca.weights.prefill_backlog, 0.5, "{kind}");
            assert_eq!(
                ca.weights.queue,
                Weights::weir().queue,
                "{kind}: unset weights keep the default"
            );
            assert_eq!(
                ca.weights.session, 1.0,
                "{kind}: session_affinity sets weight 1"
            );
            assert_eq!(ca.gate, None, "{kind}");
            assert!(ca.session_affinity, "{kind}");
            assert_eq!(ca.pd.non_cached_tokens, 0, "{kind}");
            assert_eq!(ca.block_size, 32, "{kind}");

            let e = RawConfig::from_yaml(&format!(
                "pools: [{{name: a, policy: {{kind: {kind}, sesion_affinity: true}}}}]"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("unknown field `sesion_affinity`"), "{kind}: {e}");
            let e = RawConfig::from_yaml(&format!(
                "pools: [{{name: a, policy: {{kind: {kind}, pd: {{ttft: 1s}}}}}}]"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("unknown field `ttft`"), "{kind}: {e}");
        }
        let e =
            RawConfig::from_yaml("pools: [{name: a, policy: {kind: round-robin, weights: {}}}]")
                .unwrap_err()
                .to_string();
        assert!(e.contains("weights"), "{e}");
    }

    #[test]
    fn bad_values_name_field_and_reason() {
        let raw = RawConfig::from_yaml("pools: [{name: a, endpoints: ['https://x:1']}]").unwrap();
        let e = raw.validate().unwrap_err();
        assert!(e.to_string().contains("pools[0].endpoints[0]"), "{e}");
        let raw = RawConfig::from_yaml("models: [{name: x, targets: [{pool: nope}]}]").unwrap();
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("no pool named `nope`")
        );
        let raw = RawConfig::from_yaml("timeouts: {idle: 5 parsecs}").unwrap();
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("timeouts.idle")
        );
        let raw = RawConfig::from_yaml(
            "pools: [{name: a, policy: {kind: pipeline, scorers: [{name: vibes}]}}]",
        )
        .unwrap();
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("unknown scorer `vibes`")
        );
    }

    #[test]
    fn backend_flag_makes_a_pool_and_route() {
        let mut raw = RawConfig::default();
        raw.add_backend_flag("tiny=http://127.0.0.1:9,http://127.0.0.1:10")
            .unwrap();
        let c = raw.validate().unwrap();
        assert_eq!(c.pools[0].name, "tiny");
        assert_eq!(c.pools[0].endpoints.len(), 2);
        assert_eq!(c.routes[0].name, "tiny");
        assert!(RawConfig::default().add_backend_flag("nourls").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            parse_duration("x", "100ms").unwrap(),
            Duration::from_millis(100)
        );
        assert_eq!(
            parse_duration("x", "1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("x", "2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("x", "fast").is_err());
        assert!(parse_duration("x", "1e300h").is_err());
    }

    #[test]
    fn hf_tokenizer_file_is_loaded_at_validation() {
        let yaml = |tok: &str| {
            format!(
                "pools: [{{name: a, endpoints: [http://127.0.0.1:1], policy: {{kind: cache-aware, tokenizer: {tok}}}}}]"
            )
        };
        let ok = RawConfig::from_yaml(&yaml("byte")).unwrap().validate();
        assert!(ok.is_ok(), "{ok:?}");
        let e = RawConfig::from_yaml(&yaml("{hf: /nonexistent/tokenizer.json}"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.hf"), "{e}");
        assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
        #[cfg(not(feature = "hf"))]
        assert!(e.contains("`hf` cargo feature"), "{e}");
        let e = RawConfig::from_yaml(&yaml("sentencepiece"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown tokenizer `sentencepiece`"), "{e}");
    }
}
