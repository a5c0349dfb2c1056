//! Multi-tenant load for `weir bench --tenants FILE` / `--preset qos`: who sends what. Per tenant its API key (sent
//! as `Authorization: Bearer <key>`), tier and weight (echoed into the report, so shares are judged against them;
//! the server learns them from its own tenant policies, never from the client), and its load: a workload preset,
//! Poisson rate or closed-loop concurrency, streaming or not. Pure: parsing, validation and the built-in preset.
//!
//! File format (YAML or JSON):
//! ```yaml
//! tenants:
//!   - name: alice            # report key; unique
//!     key: sk-alice          # API key; unique
//!     tier: interactive      # interactive | standard | batch
//!     weight: 1              # fair-queuing weight within the tier (default 1)
//!     workload: chat         # a `--workload` preset (not multi-turn)
//!     rate: 5                # Poisson req/s ... or
//!     # concurrency: 16      # ... closed loop
//!     stream: true           # default true
//!     maxInFlight: 2000      # cap on this tenant's requests in flight (default 10000)
//! ```

use policies::tenant::Tier;
use serde::{Deserialize, Serialize};

use super::Mode;
use super::workload::{Preset, SharedPrefix};

/// One tenant's identity and load.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantLoad {
    /// Name in the report (and, by convention, the server's tenant name).
    pub name: String,
    /// API key sent as a bearer token.
    pub key: String,
    /// The tier the server's policy gives this tenant.
    pub tier: Tier,
    /// The weight the server's policy gives this tenant within its tier.
    #[serde(default = "one")]
    pub weight: f64,
    /// Workload preset name (`chat`, `batch`, `tiny`, ...).
    pub workload: String,
    /// Open loop: Poisson arrivals per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Closed loop: requests always in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Ask for SSE streams (TTFT measured at the first content chunk).
    #[serde(default = "yes")]
    pub stream: bool,
    /// Cap on this tenant's requests in flight; open-loop arrivals wait for a slot.
    #[serde(default = "max_in_flight")]
    pub max_in_flight: usize,
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn max_in_flight() -> usize {
    10_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    tenants: Vec<TenantLoad>,
}

impl TenantLoad {
    /// The workload preset (validated by [`validate`]).
    pub fn preset(&self) -> Option<Preset> {
        Preset::by_name(&self.workload)
    }

    /// How this tenant's requests arrive (validated by [`validate`]).
    pub fn mode(&self) -> Mode {
        match (self.rate, self.concurrency) {
            (Some(rate), _) => Mode::Open { rate },
            (None, c) => Mode::Closed {
                concurrency: c.unwrap_or(1),
            },
        }
    }

    /// `poisson 5.2/s` or `closed 16`, for the report.
    pub fn load_label(&self) -> String {
        match self.mode() {
            Mode::Open { rate } => format!("poisson {rate:.3}/s"),
            Mode::Closed { concurrency } => format!("closed {concurrency}"),
            Mode::Trace { .. } => "trace".into(),
        }
    }
}

/// Parse a tenants file (YAML, of which JSON is a subset) and validate it.
pub fn parse(text: &str) -> Result<Vec<TenantLoad>, String> {
    let f: TenantsFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    validate(&f.tenants)?;
    Ok(f.tenants)
}

/// Every tenant well-formed; names and keys unique.
pub fn validate(tenants: &[TenantLoad]) -> Result<(), String> {
    if tenants.is_empty() {
        return Err("no tenants".into());
    }
    for (i, t) in tenants.iter().enumerate() {
        let at = format!("tenants[{i}] ({:?})", t.name);
        if t.name.is_empty() || t.key.is_empty() {
            return Err(format!("{at}: name and key must be non-empty"));
        }
        if tenants[..i].iter().any(|o| o.name == t.name) {
            return Err(format!("{at}: duplicate name"));
        }
        if tenants[..i].iter().any(|o| o.key == t.key) {
            return Err(format!("{at}: duplicate key"));
        }
        if !(t.weight.is_finite() && t.weight > 0.0 && t.weight <= 1000.0) {
            return Err(format!(
                "{at}: weight must be in (0, 1000], got {}",
                t.weight
            ));
        }
        if t.preset().is_none() {
            return Err(format!(
                "{at}: unknown workload {:?} (one of {})",
                t.workload,
                Preset::NAMES.join(", ")
            ));
        }
        match (t.rate, t.concurrency) {
            (Some(r), None) if r.is_finite() && r > 0.0 => {}
            (Some(r), None) => return Err(format!("{at}: rate must be > 0, got {r}")),
            (None, Some(c)) if c >= 1 => {}
            (None, Some(_)) => return Err(format!("{at}: concurrency must be >= 1")),
            _ => return Err(format!("{at}: give exactly one of rate and concurrency")),
        }
        if t.max_in_flight == 0 {
            return Err(format!("{at}: maxInFlight must be >= 1"));
        }
    }
    Ok(())
}

/// Requests per second of the `batch` workload that 8xH100 Llama-3.1-8B completes at saturation, measured in virtual
/// time: `weir replay --workload batch --rate R --duration 200 --jitter 0 --seed 1` gave 52.1, 52.8, 52.0 and 53.4
/// req/s at R = 60, 80, 100, 150 (makespan-based; 34k output tok/s), so ~52.
pub const QOS_CAPACITY_8XH100_8B: f64 = 52.0;

/// The `qos` preset for a fleet that completes `capacity` batch-workload requests per second (default
/// [`QOS_CAPACITY_8XH100_8B`]): seven tenants on three tiers, every tier with an equal-weight pair.
///
/// - interactive-1, interactive-2 (weight 1): chat, Poisson at 0.1 x capacity each (5.2 req/s on 8xH100: the two
///   together ~20% of the fleet's chat capacity), the steady load whose TTFT the flood must not hurt;
/// - standard-1, standard-2 (weight 1): chat, Poisson at 0.1 x capacity each, steady;
/// - batch-1, batch-2 (weight 1) and batch-3 (weight 2): the `batch` workload (1.5k in, 600 out), Poisson at 10/3 x
///   capacity each: together a flood at 10x what the fleet can serve.
///
/// The weight-2 tenant sits in the flooding tier on purpose: weights decide shares only among backlogged tenants,
/// and only the flood keeps its tier backlogged at the gate. In a tier whose load is below its service (the steady
/// standard tenants) shares follow demand whatever the weights, so a weight-2 standard tenant would measure nothing.
/// Equal rates within the flood mean any difference in served tokens comes from the scheduler, not from demand.
pub fn qos_preset(capacity: f64) -> Vec<TenantLoad> {
    let t = |name: &str, tier, weight, workload: &str, rate: f64, max_in_flight| TenantLoad {
        name: name.to_string(),
        key: format!("sk-weir-bench-{name}"),
        tier,
        weight,
        workload: workload.to_string(),
        rate: Some(rate),
        concurrency: None,
        stream: true,
        max_in_flight,
    };
    // A flooding tenant's in-flight cap bounds the client's sockets when nothing sheds it (admission off); a steady
    // tenant never comes near its cap.
    let (steady, flood) = (0.1 * capacity, 10.0 / 3.0 * capacity);
    vec![
        t(
            "interactive-1",
            Tier::Interactive,
            1.0,
            "chat",
            steady,
            1_000,
        ),
        t(
            "interactive-2",
            Tier::Interactive,
            1.0,
            "chat",
            steady,
            1_000,
        ),
        t("standard-1", Tier::Standard, 1.0, "chat", steady, 1_000),
        t("standard-2", Tier::Standard, 1.0, "chat", steady, 1_000),
        t("batch-1", Tier::Batch, 1.0, "batch", flood, 2_000),
        t("batch-2", Tier::Batch, 1.0, "batch", flood, 2_000),
        t("batch-3", Tier::Batch, 2.0, "batch", flood, 2_000),
    ]
}

/// A seed from a tenant's name, the same on every build and platform: 64-bit FNV-1a, written out (five lines)
/// because std's `DefaultHasher` may change between Rust releases and a run must stay reproducible.
pub fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Only the tenants of these tiers (`--only-tiers interactive`: the interactive tenants alone, the baseline).
pub fn only_tiers(tenants: Vec<TenantLoad>, tiers: &[Tier]) -> Vec<TenantLoad> {
    tenants
        .into_iter()
        .filter(|t| tiers.contains(&t.tier))
        .collect()
}

impl Preset {
    /// `--workload` names usable per tenant (multi-turn needs a whole-run schedule, so it is not one of them).
    pub const NAMES: [&'static str; 8] = [
        "tiny",
        "chat",
        "shared-prefix",
        "shared-prefix-llm-d",
        "long-context-rag",
        "code-completion",
        "batch",
        "long-prompt-mix",
    ];

    /// The preset of a `--workload` name (shared-prefix presets with their default shapes).
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "tiny" => Preset::Tiny,
            "chat" => Preset::Chat,
            "shared-prefix" => Preset::SharedPrefix(SharedPrefix::INFERENCE_PERF),
            "shared-prefix-llm-d" => Preset::SharedPrefix(SharedPrefix::LLM_D),
            "long-context-rag" => Preset::LongContextRag,
            "code-completion" => Preset::CodeCompletion,
            "batch" => Preset::Batch,
            "long-prompt-mix" => Preset::LongPromptMix,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_yaml_with_defaults_and_json() {
        let t = parse(
            "tenants:\n  - {name: a, key: ka, tier: interactive, workload: chat, rate: 2.5}\n  \
             - {name: b, key: kb, tier: batch, weight: 2, workload: batch, concurrency: 8, stream: false, maxInFlight: 9}\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].weight, t[0].stream, t[0].max_in_flight),
            (1.0, true, 10_000)
        );
        assert_eq!(t[0].mode(), Mode::Open { rate: 2.5 });
        assert_eq!(t[1].mode(), Mode::Closed { concurrency: 8 });
        assert_eq!(
            (t[1].tier, t[1].weight, t[1].stream),
            (Tier::Batch, 2.0, false)
        );
        assert_eq!(t[1].preset(), Some(Preset::Batch));
        let j = parse(
            r#"{"tenants":[{"name":"a","key":"k","tier":"standard","workload":"tiny","rate":1}]}"#,
        )
        .unwrap();
        assert_eq!(j[0].tier, Tier::Standard);
    }

    #[test]
    fn rejects_bad_tenants_naming_them() {
        let bad = |s: &str| parse(s).unwrap_err();
        let base = "{name: a, key: k, tier: standard, workload: chat";
        assert!(bad(&format!("tenants: [{base}}}]")).contains("exactly one of rate"));
        assert!(
            bad(&format!("tenants: [{base}, rate: 1, concurrency: 2}}]")).contains("exactly one")
        );
        assert!(bad(&format!("tenants: [{base}, rate: 0}}]")).contains("rate must be > 0"));
        assert!(bad(&format!("tenants: [{base}, concurrency: 0}}]")).contains("concurrency"));
        assert!(bad(&format!("tenants: [{base}, rate: 1, weight: 0}}]")).contains("weight"));
        assert!(
            bad("tenants: [{name: a, key: k, tier: standard, workload: multi-turn, rate: 1}]")
                .contains("unknown workload")
        );
        assert!(
            bad(&format!("tenants: [{base}, rate: 1}}, {base}, rate: 1}}]"))
                .contains("duplicate name")
        );
        assert!(
            bad(&format!(
                "tenants: [{base}, rate: 1}}, {{name: b, key: k, tier: batch, workload: chat, rate: 1}}]"
            ))
            .contains("duplicate key")
        );
        assert!(
            bad(&format!("tenants: [{base}, rate: 1, color: red}}]")).contains("unknown field")
        );
        assert!(
            bad("tenants: [{name: a, key: k, tier: gold, workload: chat, rate: 1}]")
                .contains("gold")
        );
        assert!(bad("tenants: []").contains("no tenants"));
    }

    #[test]
    fn qos_preset_floods_at_ten_times_capacity_with_steady_upper_tiers() {
        let p = qos_preset(QOS_CAPACITY_8XH100_8B);
        validate(&p).unwrap();
        let rate = |tier| -> f64 {
            p.iter()
                .filter(|t| t.tier == tier)
                .filter_map(|t| t.rate)
                .sum()
        };
        assert!((rate(Tier::Batch) - 10.0 * QOS_CAPACITY_8XH100_8B).abs() < 1e-9);
        assert!((rate(Tier::Interactive) - 0.2 * QOS_CAPACITY_8XH100_8B).abs() < 1e-9);
        assert!((rate(Tier::Standard) - 0.2 * QOS_CAPACITY_8XH100_8B).abs() < 1e-9);
        // Every tier has an equal-weight pair (Jain), the flooding tier a weight-2 tenant (weighted shares).
        for tier in Tier::ALL {
            assert!(
                p.iter()
                    .filter(|t| t.tier == tier && t.weight == 1.0)
                    .count()
                    >= 2
            );
        }
        assert!(p.iter().any(|t| t.tier == Tier::Batch && t.weight == 2.0));
        assert!(p.iter().all(|t| t.stream && t.key.starts_with("sk-")));
        assert_eq!(p.iter().filter(|t| t.workload == "batch").count(), 3);
        // In-flight caps: the client's sockets stay under the usual 20,000 open-file limit.
        assert_eq!(p.iter().map(|t| t.max_in_flight).sum::<usize>(), 10_000);
        // The preset scales with the fleet.
        let small = qos_preset(1.0);
        assert!((small[4].rate.unwrap() - 10.0 / 3.0).abs() < 1e-12);
        let alone = only_tiers(p, &[Tier::Interactive]);
        assert_eq!(alone.len(), 2);
    }

    #[test]
    fn name_seeds_are_fnv1a_and_distinct() {
        // FNV-1a 64 reference values.
        assert_eq!(name_seed(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_seed("a"), 0xaf63_dc4c_8601_ec8c);
        let p = qos_preset(1.0);
        let mut seeds: Vec<u64> = p.iter().map(|t| name_seed(&t.name)).collect();
        seeds.sort_unstable();
        seeds.dedup();
        assert_eq!(seeds.len(), p.len());
    }

    #[test]
    fn every_name_is_a_preset() {
        for n in Preset::NAMES {
            assert!(Preset::by_name(n).is_some(), "{n}");
        }
        assert_eq!(Preset::by_name("multi-turn"), None);
    }
}
