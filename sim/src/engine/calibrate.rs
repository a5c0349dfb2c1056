//! Calibration of the timing model against the reference table of vllm-server-contract.md §7: for every profile in
//! the data, TTFT of a lone 512/2048/8192-token prompt (run through a real [`Engine`], so chunked prefill is
//! included) and the decode step time (ITL) at 1k context for batch 1/32/128, each next to its reference and ratio.

use serde::Serialize;

use super::{Engine, EngineConfig, EngineRequest, Event, ReqId};
use crate::profile::{BatchShape, Profile, ProfileError, known};

/// Measured points, in the column order of the reference table.
pub const POINTS: [&str; 6] = [
    "ttft@512",
    "ttft@2048",
    "ttft@8192",
    "itl@b1",
    "itl@b32",
    "itl@b128",
];

/// Reference values (seconds) from §7, keyed by (gpu, model, tp).
const REFERENCE: &[(&str, &str, u32, [f64; 6])] = &[
    (
        "h100",
        "llama-3.1-8b",
        1,
        [0.015, 0.051, 0.230, 0.0078, 0.0094, 0.0150],
    ),
    (
        "a100-80gb",
        "llama-3.1-8b",
        1,
        [0.037, 0.143, 0.642, 0.0116, 0.0144, 0.0254],
    ),
    (
        "l4",
        "llama-3.1-8b",
        1,
        [0.124, 0.435, 1.957, 0.066, 0.084, 0.144],
    ),
    (
        "h100",
        "llama-3.1-70b",
        4,
        [0.044, 0.150, 0.621, 0.0202, 0.0218, 0.0276],
    ),
    (
        "a100-80gb",
        "llama-3.1-70b",
        4,
        [0.104, 0.393, 1.648, 0.0284, 0.0314, 0.0461],
    ),
];

/// One measured point.
#[derive(Debug, Clone, Serialize)]
pub struct CalPoint {
    /// `ttft@<prompt tokens>` or `itl@b<batch>`.
    pub metric: &'static str,
    /// The simulator's value, seconds.
    pub sim_s: f64,
    /// The reference value, seconds, where one exists.
    pub reference_s: Option<f64>,
    /// sim / reference.
    pub ratio: Option<f64>,
}

/// All points of one profile.
#[derive(Debug, Clone, Serialize)]
pub struct CalRow {
    /// `gpu:model[:tpN]`.
    pub profile: String,
    /// Whether the GPU constants are estimates.
    pub estimated: bool,
    pub points: Vec<CalPoint>,
}

/// TTFT of one prompt alone on an idle engine (no jitter).
pub fn ttft_alone(profile: &Profile, prompt_tokens: u32) -> f64 {
    let mut cfg = EngineConfig::new(profile.clone());
    cfg.jitter = 0.0;
    cfg.emit_kv_events = false;
    let mut e = Engine::new(cfg);
    let prompt: Vec<u32> = (0..prompt_tokens).map(|i| i % 100_000).collect();
    if e.add_request(EngineRequest::new(ReqId(1), prompt, 1, 1), 0.0)
        .is_err()
    {
        return f64::NAN;
    }
    let mut now = 0.0;
    while e.has_work() {
        let out = e.step(now);
        now += out.duration;
        for ev in out.events {
            if let Event::Token { index: 0, .. } = ev {
                return now;
            }
        }
    }
    f64::NAN
}

/// Decode step time with `batch` sequences at 1k context (no jitter).
pub fn itl_at(profile: &Profile, batch: u32, ctx: u32) -> f64 {
    let mut shape = BatchShape::default();
    for _ in 0..batch {
        shape.add_decode(ctx);
    }
    profile.step_time(&shape)
}

/// The calibration table for every GPU x model with its default TP.
pub fn calibration() -> Result<Vec<CalRow>, ProfileError> {
    let (gpus, models) = known()?;
    let mut rows = Vec::new();
    for m in &models {
        for g in &gpus {
            let p = match Profile::resolve(&g.key, &m.key) {
                Ok(p) => p,
                Err(ProfileError::DoesNotFit { .. }) => continue,
                Err(e) => return Err(e),
            };
            let reference = REFERENCE
                .iter()
                .find(|(rg, rm, tp, _)| *rg == p.gpu && *rm == p.model && *tp == p.tp);
            let sims = [
                ttft_alone(&p, 512),
                ttft_alone(&p, 2048),
                ttft_alone(&p, 8192),
                itl_at(&p, 1, 1024),
                itl_at(&p, 32, 1024),
                itl_at(&p, 128, 1024),
            ];
            let points = POINTS
                .iter()
                .zip(sims)
                .enumerate()
                .map(|(k, (metric, sim_s))| {
                    let reference_s = reference.map(|r| r.3[k]);
                    CalPoint {
                        metric,
                        sim_s,
                        reference_s,
                        ratio: reference_s.map(|r| sim_s / r),
                    }
                })
                .collect();
            rows.push(CalRow {
                profile: p.label(),
                estimated: g.note.contains("est."),
                points,
            });
        }
    }
    Ok(rows)
}

/// The table as Markdown (ms; `sim (ref, ratio)` or `sim (no reference)`).
pub fn render_markdown(rows: &[CalRow]) -> String {
    let mut s = String::from(
        "| profile | TTFT 512 | TTFT 2048 | TTFT 8192 | ITL b1 @1k | ITL b32 @1k | ITL b128 @1k |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {}{} |",
            r.profile,
            if r.estimated { " (est.)" } else { "" }
        ));
        for p in &r.points {
            match (p.reference_s, p.ratio) {
                (Some(rf), Some(ratio)) => s.push_str(&format!(
                    " {:.1} ms (ref {:.1}, x{:.2}) |",
                    p.sim_s * 1e3,
                    rf * 1e3,
                    ratio
                )),
                _ => s.push_str(&format!(" {:.1} ms (no reference) |", p.sim_s * 1e3)),
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_referenced_point_is_within_20_percent() {
        let rows = calibration().unwrap();
        let mut checked = 0;
        for r in &rows {
            for p in &r.points {
                assert!(
                    p.sim_s.is_finite() && p.sim_s > 0.0,
                    "{} {}",
                    r.profile,
                    p.metric
                );
                if let Some(ratio) = p.ratio {
                    assert!(
                        (0.8..=1.2).contains(&ratio),
                        "{} {}: ratio {ratio}",
                        r.profile,
                        p.metric
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(
            checked,
            REFERENCE.len() * POINTS.len(),
            "every reference row matched a profile"
        );
        assert!(rows.len() >= 8, "all GPU x model combinations that fit");
        let md = render_markdown(&rows);
        assert!(md.contains("h100:llama-3.1-8b") && md.contains("no reference"));
    }
}
