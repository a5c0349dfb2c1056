//! Turning per-request measurements into the benchmark report: latency percentiles, throughput, goodput at an SLO,
//! error counts; rendered as a table for people and as JSON for scripts. Pure: no clock, no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// What one request measured, from the client's side. Times are seconds.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    /// Send time relative to the start of the run (decides whether it falls in the warm-up).
    pub start: f64,
    /// Send to first content token (whole response for non-streaming requests).
    pub ttft: Option<f64>,
    /// Gaps between consecutive content chunks.
    pub itl: Vec<f64>,
    /// Send to end of body.
    pub e2e: f64,
    /// Generated tokens: `usage.completion_tokens`, else the number of content chunks.
    pub output_tokens: u64,
    /// Prompt tokens from `usage`, else the workload's target count (0 for literal prompts without usage).
    pub prompt_tokens: u64,
    /// `None` on success; otherwise the error kind (`http_503`, `connect`, `timeout`, `stream_error`, ..).
    pub error: Option<String>,
}

/// Mean and percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// Summarise samples given in seconds, reported in milliseconds (linear-interpolated percentiles, like numpy).
    pub fn of_seconds(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable_by(f64::total_cmp);
        let ms = |x: f64| x * 1000.0;
        Self {
            count: samples.len(),
            mean: ms(samples.iter().sum::<f64>() / samples.len() as f64),
            p50: ms(percentile(samples, 50.0)),
            p90: ms(percentile(samples, 90.0)),
            p95: ms(percentile(samples, 95.0)),
            p99: ms(percentile(samples, 99.0)),
            max: ms(samples[samples.len() - 1]),
        }
    }
}

/// Percentile `p` (0-100) of sorted samples, linear interpolation between closest ranks.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = p / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// Latency targets for goodput. A request meets the SLO when it succeeded, its TTFT is within `ttft_ms`, and its
/// mean inter-token latency (TPOT, as vLLM's goodput uses) is within `itl_ms`; an unset target always passes.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub itl_ms: Option<f64>,
}

/// Goodput: requests meeting the SLO.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Goodput {
    pub slo: Slo,
    /// Successful requests meeting every set target.
    pub requests: u64,
    /// Those per second of measured time.
    pub requests_per_s: f64,
    /// Share of measured requests (failures included) meeting the SLO.
    pub fraction: f64,
}

/// p50/p99 of a server-side histogram over the run (e.g. `weir_sim_token_lateness_seconds`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerHistogram {
    /// Metric name.
    pub name: String,
    /// Observations during the run.
    pub count: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Prefix-cache counters (`vllm:prefix_cache_{hits,queries}_total`) summed over the scraped targets, from the end of
/// the warm-up to the end of the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerPrefixCache {
    /// Prompt tokens served from the prefix cache.
    pub hits: f64,
    /// Prompt tokens looked up.
    pub queries: f64,
    /// `hits / queries`.
    pub hit_rate: f64,
}

/// The whole report, as written to `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Echo of the configuration that produced it.
    pub config: serde_json::Value,
    /// Measured wall time: end of warm-up to the last measured completion.
    pub duration_s: f64,
    /// Requests sent in the measured window.
    pub requests: u64,
    pub successful: u64,
    pub failed: u64,
    /// Failures by kind, e.g. `{"http_503": 3, "connect": 1}`.
    pub errors: BTreeMap<String, u64>,
    /// Requests sent during the warm-up (not in any statistic).
    pub warmup_requests: u64,
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    pub total_output_tokens: u64,
    pub total_prompt_tokens: u64,
    pub ttft_ms: Summary,
    pub itl_ms: Summary,
    /// Per-request mean inter-token latency.
    pub tpot_ms: Summary,
    pub e2e_ms: Summary,
    pub goodput: Option<Goodput>,
    /// Server-side histograms scraped before and after the run.
    pub server: Vec<ServerHistogram>,
    /// Server-side prefix-cache hit rate over the measured window, when the scraped targets are vLLM-like.
    pub server_prefix_cache: Option<ServerPrefixCache>,
    /// The workload's infinite-cache hit rate over the measured window (multi-turn): the most any router and fleet
    /// could reuse, to read `server_prefix_cache` against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_bound: Option<f64>,
}

/// Build the report from every record of the run.
pub fn build(
    records: &[RequestRecord],
    warmup_s: f64,
    measured_s: f64,
    slo: Slo,
    config: serde_json::Value,
    server: Vec<ServerHistogram>,
    server_prefix_cache: Option<ServerPrefixCache>,
) -> Report {
    let measured: Vec<&RequestRecord> = records.iter().filter(|r| r.start >= warmup_s).collect();
    let warmup_requests = (records.len() - measured.len()) as u64;
    let mut errors = BTreeMap::new();
    let (mut ttft, mut itl, mut tpot, mut e2e) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut out_tok, mut in_tok, mut ok, mut good) = (0u64, 0u64, 0u64, 0u64);
    for r in &measured {
        if let Some(kind) = &r.error {
            *errors.entry(kind.clone()).or_insert(0) += 1;
            continue;
        }
        ok += 1;
        out_tok += r.output_tokens;
        in_tok += r.prompt_tokens;
        e2e.push(r.e2e);
        if let Some(t) = r.ttft {
            ttft.push(t);
        }
        itl.extend_from_slice(&r.itl);
        let mean_itl = (!r.itl.is_empty()).then(|| r.itl.iter().sum::<f64>() / r.itl.len() as f64);
        if let Some(m) = mean_itl {
            tpot.push(m);
        }
        let ttft_ok = slo
            .ttft_ms
            .is_none_or(|lim| r.ttft.is_some_and(|t| t * 1000.0 <= lim));
        let itl_ok = slo
            .itl_ms
            .is_none_or(|lim| mean_itl.is_none_or(|m| m * 1000.0 <= lim));
        if ttft_ok && itl_ok {
            good += 1;
        }
    }
    let per_s = |x: f64| {
        if measured_s > 0.0 {
            x / measured_s
        } else {
            0.0
        }
    };
    let n = measured.len() as u64;
    let goodput = (slo.ttft_ms.is_some() || slo.itl_ms.is_some()).then(|| Goodput {
        slo,
        requests: good,
        requests_per_s: per_s(good as f64),
        fraction: if n == 0 { 0.0 } else { good as f64 / n as f64 },
    });
    Report {
        config,
        duration_s: measured_s,
        requests: n,
        successful: ok,
        failed: n - ok,
        errors,
        warmup_requests,
        request_throughput: per_s(ok as f64),
        output_token_throughput: per_s(out_tok as f64),
        total_output_tokens: out_tok,
        total_prompt_tokens: in_tok,
        ttft_ms: Summary::of_seconds(&mut ttft),
        itl_ms: Summary::of_seconds(&mut itl),
        tpot_ms: Summary::of_seconds(&mut tpot),
        e2e_ms: Summary::of_seconds(&mut e2e),
        goodput,
        server,
        server_prefix_cache,
        cache_bound: None,
    }
}

/// The report as a plain-text table.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:<28}{:>12.3}", "duration (s)", r.duration_s);
    let _ = writeln!(s, "{:<28}{:>12}", "requests (measured)", r.requests);
    let _ = writeln!(s, "{:<28}{:>12}", "successful", r.successful);
    let _ = writeln!(s, "{:<28}{:>12}", "failed", r.failed);
    for (k, v) in &r.errors {
        let _ = writeln!(s, "  {:<26}{:>12}", k, v);
    }
    if r.warmup_requests > 0 {
        let _ = writeln!(s, "{:<28}{:>12}", "warm-up requests", r.warmup_requests);
    }
    let _ = writeln!(
        s,
        "{:<28}{:>12.2}",
        "request throughput (req/s)", r.request_throughput
    );
    let _ = writeln!(
        s,
        "{:<28}{:>12.1}",
        "output throughput (tok/s)", r.output_token_throughput
    );
    let _ = writeln!(s, "{:<28}{:>12}", "output tokens", r.total_output_tokens);
    let _ = writeln!(s, "{:<28}{:>12}", "prompt tokens", r.total_prompt_tokens);
    if let Some(g) = &r.goodput {
        let lim = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v}"));
        let _ = writeln!(
            s,
            "{:<28}{:>12.2}  ({} req, {:.1}%; TTFT<={} ms, TPOT<={} ms)",
            "goodput (req/s)",
            g.requests_per_s,
            g.requests,
            g.fraction * 100.0,
            lim(g.slo.ttft_ms),
            lim(g.slo.itl_ms)
        );
    }
    let _ = writeln!(
        s,
        "\n{:<10}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "ms", "count", "mean", "p50", "p90", "p95", "p99", "max"
    );
    for (name, m) in [
        ("TTFT", &r.ttft_ms),
        ("ITL", &r.itl_ms),
        ("TPOT", &r.tpot_ms),
        ("E2E", &r.e2e_ms),
    ] {
        let _ = writeln!(
            s,
            "{:<10}{:>9}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
            name, m.count, m.mean, m.p50, m.p90, m.p95, m.p99, m.max
        );
    }
    if let Some(p) = &r.server_prefix_cache {
        let _ = writeln!(
            s,
            "\nserver prefix cache: hit rate {:.3} ({:.0} of {:.0} prompt tokens)",
            p.hit_rate, p.hits, p.queries
        );
    }
    if let Some(b) = r.cache_bound {
        let _ = writeln!(
            s,
            "{}workload's infinite-cache hit rate (bound): {b:.3}",
            if r.server_prefix_cache.is_some() {
                ""
            } else {
                "\n"
            }
        );
    }
    for h in &r.server {
        let _ = writeln!(
            s,
            "\nserver {}: {} observations, p50 {:.2} ms, p99 {:.2} ms",
            h.name, h.count, h.p50_ms, h.p99_ms
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(start: f64, ttft: f64, itl: &[f64], e2e: f64, out: u64) -> RequestRecord {
        RequestRecord {
            start,
            ttft: Some(ttft),
            itl: itl.to_vec(),
            e2e,
            output_tokens: out,
            prompt_tokens: 10,
            error: None,
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.5);
        assert!((percentile(&v, 90.0) - 9.1).abs() < 1e-12);
        assert_eq!(percentile(&v, 100.0), 10.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }

    #[test]
    fn report_counts_errors_throughput_and_goodput() {
        let recs = vec![
            ok(0.0, 0.5, &[], 0.5, 1),           // warm-up
            ok(1.0, 0.1, &[0.01, 0.03], 0.2, 3), // meets both
            ok(1.5, 0.3, &[0.01, 0.01], 0.4, 3), // TTFT too slow
            ok(2.0, 0.1, &[0.05, 0.05], 0.3, 3), // ITL too slow
            RequestRecord {
                start: 2.5,
                error: Some("http_503".into()),
                ..Default::default()
            },
            RequestRecord {
                start: 2.6,
                error: Some("http_503".into()),
                ..Default::default()
            },
            RequestRecord {
                start: 2.7,
                error: Some("connect".into()),
                ..Default::default()
            },
        ];
        let slo = Slo {
            ttft_ms: Some(200.0),
            itl_ms: Some(25.0),
        };
        let r = build(&recs, 1.0, 2.0, slo, serde_json::json!({}), vec![], None);
        assert_eq!(
            (r.requests, r.successful, r.failed, r.warmup_requests),
            (6, 3, 3, 1)
        );
        assert_eq!(r.errors.get("http_503"), Some(&2));
        assert_eq!(r.errors.get("connect"), Some(&1));
        assert_eq!(r.total_output_tokens, 9);
        assert!((r.request_throughput - 1.5).abs() < 1e-12);
        assert!((r.output_token_throughput - 4.5).abs() < 1e-12);
        let g = r.goodput.unwrap();
        assert_eq!(g.requests, 1);
        assert!((g.requests_per_s - 0.5).abs() < 1e-12);
        assert_eq!(r.ttft_ms.count, 3);
        assert_eq!(r.itl_ms.count, 6);
        assert!((r.ttft_ms.p50 - 100.0).abs() < 1e-9);
        assert!((r.tpot_ms.max - 50.0).abs() < 1e-9);
        let t = table(&r);
        assert!(
            t.contains("http_503") && t.contains("TTFT") && t.contains("goodput"),
            "{t}"
        );
    }

    #[test]
    fn no_slo_means_no_goodput_and_empty_runs_are_zero() {
        let r = build(
            &[],
            0.0,
            0.0,
            Slo::default(),
            serde_json::json!(null),
            vec![],
            None,
        );
        assert!(r.goodput.is_none());
        assert_eq!(r.request_throughput, 0.0);
        assert_eq!(r.ttft_ms, Summary::default());
    }
}
