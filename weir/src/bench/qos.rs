//! The multi-tenant report: per tenant and per tier, completed and rejected requests (by status), TTFT percentiles,
//! throughput; served token cost per tenant, each tier's share of it against its guaranteed minimum, each tenant's
//! share within its tier against its weight share, and Jain's index among the equal-weight tenants of a tier
//! (qos-and-security.md §2-§3). Pure: no clock, no I/O; rendered as markdown and serialized as JSON.
//!
//! Served cost is the scheduler's own measure (`policies::fair`): `w_in * prompt + w_out * completion` tokens of the
//! requests that completed in the measured window, w_in 1 and w_out 2 ([`FairConfig::default`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use policies::fair::FairConfig;
use policies::tenant::Tier;
use serde::Serialize;

use super::report::{self, RequestRecord, Slo, Summary};
use super::tenants::TenantLoad;

/// One tenant's results.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TenantRow {
    pub tenant: String,
    pub tier: Tier,
    pub weight: f64,
    /// `poisson R/s` or `closed N`.
    pub load: String,
    /// Requests sent in the measured window.
    pub requests: u64,
    pub completed: u64,
    /// Rejections by HTTP status (4xx answers: `"429": 12`).
    pub rejected: BTreeMap<String, u64>,
    /// Other failures by kind (`http_503`, `timeout`, `stream_error`, ..).
    pub errors: BTreeMap<String, u64>,
    /// TTFT of completed requests, plus requests that timed out (at their first token if they had one, else at the
    /// timeout: a lower bound), so a queue that holds requests past the timeout cannot flatter the percentiles.
    pub ttft_ms: Summary,
    /// Completed requests per second of measured time.
    pub request_throughput: f64,
    /// Output tokens of completed requests per second of measured time.
    pub output_token_throughput: f64,
    /// `w_in * prompt + w_out * completion` tokens of completed requests.
    pub served_cost: f64,
    /// This tenant's share of its tier's served cost.
    pub tier_share: f64,
    /// Its weight over the sum of its tier's weights: the share weighted fair queuing aims at while every tenant of
    /// the tier is backlogged.
    pub weight_share: f64,
}

/// Jain's index over the weighted service of tenants of the same tier and weight.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JainGroup {
    pub weight: f64,
    pub tenants: Vec<String>,
    /// `(sum x)^2 / (n * sum x^2)` over served cost; `None` when none was served.
    pub index: Option<f64>,
}

/// One tier's results (its tenants' requests pooled).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TierRow {
    pub tier: Tier,
    pub tenants: usize,
    pub requests: u64,
    pub completed: u64,
    pub rejected: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub ttft_ms: Summary,
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    pub served_cost: f64,
    /// The tier's share of all served cost.
    pub cost_share: f64,
    /// The share the scheduler guarantees the tier while it is backlogged ([`FairConfig::min_share`]).
    pub min_share: f64,
    /// Jain's index per group of equal-weight tenants (groups of two or more).
    pub jain: Vec<JainGroup>,
}

/// The whole multi-tenant report, as written to `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct QosReport {
    /// Echo of the configuration that produced it.
    pub config: serde_json::Value,
    /// Measured wall time: end of warm-up to the last measured completion.
    pub duration_s: f64,
    /// Requests sent during the warm-up (not in any statistic).
    pub warmup_requests: u64,
    /// Cost weights of served tokens (prompt, completion).
    pub cost_weights: [f64; 2],
    pub tenants: Vec<TenantRow>,
    pub tiers: Vec<TierRow>,
}

/// Build the report; `records[i]` are tenant `tenants[i]`'s records, over the whole run.
pub fn build(
    tenants: &[TenantLoad],
    records: &[Vec<RequestRecord>],
    warmup_s: f64,
    measured_s: f64,
    config: serde_json::Value,
) -> QosReport {
    let fair = FairConfig::default();
    let cost = |r: &RequestRecord| {
        fair.w_in * r.prompt_tokens as f64 + fair.w_out * r.output_tokens as f64
    };
    let empty = Vec::new();
    let mut rows = Vec::new();
    let mut warmup_requests = 0;
    for (i, t) in tenants.iter().enumerate() {
        let recs = records.get(i).unwrap_or(&empty);
        let (row, warm) = tenant_row(t, recs, warmup_s, measured_s, &cost);
        warmup_requests += warm;
        rows.push(row);
    }
    let total = sum(rows.iter().map(|r| r.served_cost));
    let mut tiers = Vec::new();
    for tier in Tier::ALL {
        let idx: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].tier == tier).collect();
        if idx.is_empty() {
            continue;
        }
        let tier_cost = sum(idx.iter().map(|&i| rows[i].served_cost));
        let weights: f64 = idx.iter().map(|&i| rows[i].weight).sum();
        for &i in &idx {
            rows[i].tier_share = ratio(rows[i].served_cost, tier_cost);
            rows[i].weight_share = rows[i].weight / weights;
        }
        let pooled: Vec<RequestRecord> = idx
            .iter()
            .flat_map(|&i| records.get(i).unwrap_or(&empty).iter().cloned())
            .collect();
        let (mut row, _) = counts(&pooled, warmup_s, measured_s);
        let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for &i in &idx {
            groups.entry(rows[i].weight.to_bits()).or_default().push(i);
        }
        let jain = groups
            .into_values()
            .filter(|g| g.len() >= 2)
            .map(|g| JainGroup {
                weight: rows[g[0]].weight,
                tenants: g.iter().map(|&i| rows[i].tenant.clone()).collect(),
                index: jain(&g.iter().map(|&i| rows[i].served_cost).collect::<Vec<_>>()),
            })
            .collect();
        row.tier = tier;
        row.tenants = idx.len();
        row.served_cost = tier_cost;
        row.cost_share = ratio(tier_cost, total);
        row.min_share = fair.min_share[tier.rank()];
        row.jain = jain;
        tiers.push(row);
    }
    QosReport {
        config,
        duration_s: measured_s,
        warmup_requests,
        cost_weights: [fair.w_in, fair.w_out],
        tenants: rows,
        tiers,
    }
}

/// A sum that is +0 when empty (`Iterator::sum` of floats starts at -0, which prints as `-0.000`).
fn sum(xs: impl Iterator<Item = f64>) -> f64 {
    xs.fold(0.0, |a, b| a + b)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Jain's fairness index `(sum x)^2 / (n * sum x^2)`: 1 when all equal, 1/n when one takes everything.
pub fn jain(xs: &[f64]) -> Option<f64> {
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    if xs.is_empty() || sq <= 0.0 {
        return None;
    }
    let s: f64 = xs.iter().sum();
    Some(s * s / (xs.len() as f64 * sq))
}

/// Counts, TTFT and throughput of some records (the shared part of a tenant and a tier row), and the number of
/// warm-up requests among them.
fn counts(records: &[RequestRecord], warmup_s: f64, measured_s: f64) -> (TierRow, u64) {
    let base = report::build(
        records,
        warmup_s,
        measured_s,
        Slo::default(),
        serde_json::Value::Null,
        Vec::new(),
        None,
    );
    let (mut rejected, mut errors) = (BTreeMap::new(), BTreeMap::new());
    for (kind, n) in base.errors {
        match kind.strip_prefix("http_") {
            Some(code) if code.starts_with('4') => {
                rejected.insert(code.to_string(), n);
            }
            _ => {
                errors.insert(kind, n);
            }
        }
    }
    let mut ttft: Vec<f64> = records
        .iter()
        .filter(|r| r.start >= warmup_s)
        .filter_map(|r| match r.error.as_deref() {
            None => r.ttft,
            Some("timeout") => Some(r.ttft.unwrap_or(r.e2e)),
            Some(_) => None,
        })
        .collect();
    let row = TierRow {
        tier: Tier::Standard,
        tenants: 0,
        requests: base.requests,
        completed: base.successful,
        rejected,
        errors,
        ttft_ms: Summary::of_seconds(&mut ttft),
        request_throughput: base.request_throughput,
        output_token_throughput: base.output_token_throughput,
        served_cost: 0.0,
        cost_share: 0.0,
        min_share: 0.0,
        jain: Vec::new(),
    };
    (row, base.warmup_requests)
}

fn tenant_row(
    t: &TenantLoad,
    recs: &[RequestRecord],
    warmup_s: f64,
    measured_s: f64,
    cost: &impl Fn(&RequestRecord) -> f64,
) -> (TenantRow, u64) {
    let (c, warm) = counts(recs, warmup_s, measured_s);
    let served_cost = sum(recs
        .iter()
        .filter(|r| r.start >= warmup_s && r.error.is_none())
        .map(cost));
    let row = TenantRow {
        tenant: t.name.clone(),
        tier: t.tier,
        weight: t.weight,
        load: t.load_label(),
        requests: c.requests,
        completed: c.completed,
        rejected: c.rejected,
        errors: c.errors,
        ttft_ms: c.ttft_ms,
        request_throughput: c.request_throughput,
        output_token_throughput: c.output_token_throughput,
        served_cost,
        tier_share: 0.0,
        weight_share: 0.0,
    };
    (row, warm)
}

fn counts_cell(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "0".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as markdown tables.
pub fn markdown(r: &QosReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "measured {:.1} s ({} warm-up requests not counted); served cost = {} x prompt + {} x completion tokens of \
         completed requests\n",
        r.duration_s, r.warmup_requests, r.cost_weights[0], r.cost_weights[1]
    );
    let _ = writeln!(
        s,
        "| tenant | tier | weight | load | requests | completed | rejected | errors | TTFT p50 ms | TTFT p95 ms | \
         TTFT p99 ms | req/s | out tok/s | share of tier | weight share |"
    );
    let _ = writeln!(s, "|{}", "---|".repeat(15));
    for t in &r.tenants {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.3} | {:.3} |",
            t.tenant,
            t.tier,
            t.weight,
            t.load,
            t.requests,
            t.completed,
            counts_cell(&t.rejected),
            counts_cell(&t.errors),
            t.ttft_ms.p50,
            t.ttft_ms.p95,
            t.ttft_ms.p99,
            t.request_throughput,
            t.output_token_throughput,
            t.tier_share,
            t.weight_share
        );
    }
    let _ = writeln!(
        s,
        "\n| tier | tenants | requests | completed | rejected | errors | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | \
         req/s | out tok/s | share of served cost | guaranteed minimum | Jain (equal weights) |"
    );
    let _ = writeln!(s, "|{}", "---|".repeat(14));
    for t in &r.tiers {
        let jain = if t.jain.is_empty() {
            "-".to_string()
        } else {
            t.jain
                .iter()
                .map(|g| match g.index {
                    Some(j) => format!("{j:.4} (weight {}: {})", g.weight, g.tenants.join(", ")),
                    None => format!("- (weight {}: nothing served)", g.weight),
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.3} | {:.2} | {} |",
            t.tier,
            t.tenants,
            t.requests,
            t.completed,
            counts_cell(&t.rejected),
            counts_cell(&t.errors),
            t.ttft_ms.p50,
            t.ttft_ms.p95,
            t.ttft_ms.p99,
            t.request_throughput,
            t.output_token_throughput,
            t.cost_share,
            t.min_share,
            jain
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tenants::qos_preset;

    fn done(start: f64, ttft: f64, prompt: u64, out: u64) -> RequestRecord {
        RequestRecord {
            start,
            ttft: Some(ttft),
            e2e: ttft + 0.5,
            output_tokens: out,
            prompt_tokens: prompt,
            ..Default::default()
        }
    }

    fn failed(start: f64, kind: &str, ttft: Option<f64>, e2e: f64) -> RequestRecord {
        RequestRecord {
            start,
            ttft,
            e2e,
            error: Some(kind.into()),
            ..Default::default()
        }
    }

    #[test]
    fn jain_index_bounds() {
        assert_eq!(jain(&[3.0, 3.0, 3.0]), Some(1.0));
        assert!((jain(&[1.0, 0.0]).unwrap() - 0.5).abs() < 1e-12);
        assert!((jain(&[1.0, 2.0]).unwrap() - 0.9).abs() < 1e-12);
        assert_eq!(jain(&[0.0, 0.0]), None);
        assert_eq!(jain(&[]), None);
    }

    #[test]
    fn per_tenant_and_tier_counts_shares_and_fairness() {
        // Tenants: interactive-1, interactive-2, standard-1, standard-2, batch-1, batch-2, batch-3 (weight 2).
        let tenants = qos_preset(1.0);
        let mut recs: Vec<Vec<RequestRecord>> = vec![Vec::new(); tenants.len()];
        // Warm-up (start < 1): never counted.
        recs[0].push(done(0.5, 9.0, 1000, 1000));
        // interactive-1: two completed (TTFT 100 and 300 ms), one rejected 429, one timed out before any token (at
        // 2 s: counted in TTFT as a lower bound), one 503.
        recs[0].extend([
            done(1.0, 0.1, 10, 5),
            done(1.5, 0.3, 10, 5),
            failed(1.6, "http_429", None, 0.001),
            failed(1.7, "timeout", None, 2.0),
            failed(1.8, "http_503", None, 0.01),
        ]);
        recs[1].extend([done(1.0, 0.2, 10, 5), done(1.2, 0.2, 10, 5)]);
        recs[2].push(done(1.0, 0.1, 100, 50));
        // batch: served cost 1 x prompt + 2 x completion: 200, 200, 400 (batch-3 has weight 2 and twice the cost).
        recs[4].push(done(1.0, 1.0, 100, 50));
        recs[5].push(done(1.0, 1.0, 100, 50));
        recs[6].extend([done(1.0, 1.0, 100, 50), done(1.1, 1.0, 100, 50)]);
        recs[6].extend((0..3).map(|i| failed(1.2 + f64::from(i) / 10.0, "http_429", None, 0.001)));
        let r = build(
            &tenants,
            &recs,
            1.0,
            2.0,
            serde_json::json!({"preset": "qos"}),
        );
        assert_eq!(r.warmup_requests, 1);
        let i1 = &r.tenants[0];
        assert_eq!((i1.requests, i1.completed), (5, 2));
        assert_eq!(i1.rejected, BTreeMap::from([("429".to_string(), 1)]));
        assert_eq!(
            i1.errors,
            BTreeMap::from([("http_503".to_string(), 1), ("timeout".to_string(), 1)])
        );
        assert_eq!(i1.ttft_ms.count, 3, "completed + timed out");
        assert!((i1.ttft_ms.max - 2000.0).abs() < 1e-9);
        assert!((i1.ttft_ms.p50 - 300.0).abs() < 1e-9);
        assert!((i1.request_throughput - 1.0).abs() < 1e-12);
        assert!((i1.output_token_throughput - 5.0).abs() < 1e-12);
        assert_eq!(i1.served_cost, 40.0);
        // Interactive: 40 and 40 -> equal shares, Jain 1.
        let tier = |t: Tier| r.tiers.iter().find(|x| x.tier == t).unwrap();
        let it = tier(Tier::Interactive);
        assert_eq!((it.tenants, it.requests, it.completed), (2, 7, 4));
        assert_eq!(it.rejected.get("429"), Some(&1));
        assert_eq!(it.jain.len(), 1);
        assert_eq!(it.jain[0].index, Some(1.0));
        assert_eq!(it.min_share, 0.0);
        // Standard: one of two tenants served nothing -> Jain 1/2.
        let st = tier(Tier::Standard);
        assert!((st.jain[0].index.unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(st.min_share, 0.20);
        // Batch: served 200 / 200 / 400 of 800; weight shares 1/4, 1/4, 1/2 -> every tenant exactly on its weight.
        let b = tier(Tier::Batch);
        assert_eq!(b.served_cost, 800.0);
        assert_eq!(b.rejected.get("429"), Some(&3));
        assert_eq!(b.min_share, 0.05);
        assert_eq!(b.jain.len(), 1, "only the equal-weight pair");
        assert_eq!(b.jain[0].tenants, ["batch-1", "batch-2"]);
        assert_eq!(b.jain[0].index, Some(1.0));
        for t in &r.tenants[4..] {
            assert!((t.tier_share - t.weight_share).abs() < 1e-12, "{t:?}");
        }
        assert!((r.tenants[6].weight_share - 0.5).abs() < 1e-12);
        // Tier shares of all served cost: 80 + 200 + 800 (standard-1 100 + 2 x 50).
        let total = 80.0 + 200.0 + 800.0;
        assert!((b.cost_share - 800.0 / total).abs() < 1e-12);
        assert!((it.cost_share - 80.0 / total).abs() < 1e-12);
        let md = markdown(&r);
        assert!(
            md.contains("| interactive-1 | interactive | 1 | poisson 0.100/s | 5 | 2 | 429: 1 |"),
            "{md}"
        );
        assert!(
            md.contains("0.5000 (weight 1: standard-1, standard-2)"),
            "{md}"
        );
        let js = serde_json::to_value(&r).unwrap();
        assert_eq!(js["tiers"][2]["tier"], "batch");
        assert_eq!(js["tenants"][6]["weight"], 2.0);
    }
}
