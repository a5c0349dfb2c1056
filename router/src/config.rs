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
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use policies::pick::breaker::BreakerConfig;
use policies::pick::budget::RetryBudget;
use policies::pick::{Picker, Pipeline, Policy, Weighted, scorers};
use serde::Deserialize;

use crate::Error;

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
    /// Static endpoint base URLs (`http://host:port`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Scheduling policy (default round-robin).
    #[serde(default)]
    pub policy: Option<RawPolicy>,
}

/// Scheduling policy in YAML, tagged by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RawPolicy {
    RoundRobin,
    Random,
    LeastRequests,
    PowerOfTwo,
    /// A custom filter -> score -> pick pipeline.
    Pipeline {
        #[serde(default)]
        filters: Vec<String>,
        #[serde(default)]
        scorers: Vec<RawScorer>,
        #[serde(default)]
        picker: Option<String>,
    },
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
}

/// A validated pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    /// Model name sent upstream.
    pub model: String,
    /// Static endpoint base URLs, validated as `http://host:port`.
    pub endpoints: Vec<String>,
    pub policy: PolicyConfig,
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

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
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
        let urls: Vec<String> = urls
            .split(',')
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(p) = self.pools.iter_mut().find(|p| p.name == model) {
            p.endpoints.extend(urls);
        } else {
            self.pools.push(RawPool {
                name: model.to_string(),
                model: None,
                endpoints: urls,
                policy: None,
            });
        }
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
            for (j, u) in p.endpoints.iter().enumerate() {
                endpoints.push(validate_url(&format!("{f}.endpoints[{j}]"), u)?);
            }
            let policy = match p.policy {
                None => PolicyConfig::default(),
                Some(RawPolicy::RoundRobin) => PolicyConfig::Baseline(Policy::RoundRobin),
                Some(RawPolicy::Random) => PolicyConfig::Baseline(Policy::Random),
                Some(RawPolicy::LeastRequests) => PolicyConfig::Baseline(Policy::LeastRequests),
                Some(RawPolicy::PowerOfTwo) => PolicyConfig::Baseline(Policy::PowerOfTwo),
                Some(RawPolicy::Pipeline {
                    filters,
                    scorers: ss,
                    picker,
                }) => {
                    for fl in &filters {
                        if scorers::filter_by_name(fl).is_none() {
                            return Err(invalid(
                                format!("{f}.policy.filters"),
                                format!("unknown filter `{fl}`"),
                            ));
                        }
                    }
                    let mut out = Vec::new();
                    for s in ss {
                        if scorers::scorer_by_name(&s.name).is_none() {
                            return Err(invalid(
                                format!("{f}.policy.scorers"),
                                format!("unknown scorer `{}`", s.name),
                            ));
                        }
                        if !s.weight.is_finite() || s.weight < 0.0 {
                            return Err(invalid(
                                format!("{f}.policy.scorers"),
                                "weight must be >= 0",
                            ));
                        }
                        out.push((s.name, s.weight));
                    }
                    let picker = picker.unwrap_or_else(|| "max-score".to_string());
                    if picker_by_name(&picker).is_none() {
                        return Err(invalid(
                            format!("{f}.policy.picker"),
                            format!("unknown picker `{picker}`"),
                        ));
                    }
                    PolicyConfig::Pipeline {
                        filters,
                        scorers: out,
                        picker,
                    }
                }
            };
            pools.push(PoolConfig {
                model: p.model.unwrap_or_else(|| p.name.clone()),
                name: p.name,
                endpoints,
                policy,
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
        assert_eq!(
            c.pools[0].endpoints,
            vec!["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
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
}
