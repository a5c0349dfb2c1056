//! Synthetic request traces (vllm-server-contract.md §8): Azure-2023 conversation and code, shared-prefix groups
//! (inference-perf and the llm-d headline preset) and a long-prompt mix, plus deterministic materialisation of each
//! request's prompt as token ids (for the engine) or text (for an HTTP benchmark).
//!
//! Pure: every generator takes a seeded `&mut impl Rng`. Lengths are lognormal fits to the published mean/p50/p90
//! (truncated when the three cannot be met at once); inter-arrival times are gamma-distributed with the published
//! coefficient of variation. Shared-prefix requests share their leading token ids (and leading text) exactly.

use rand::Rng;
use rand_distr::{Distribution, Exp, Gamma, StandardNormal};
use serde::Serialize;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceRequest {
    /// Seconds from the start of the trace.
    pub arrival_s: f64,
    /// Shared-prefix group, when the prompt starts with a group's system prompt.
    pub prefix_group: Option<u32>,
    /// Length of the shared prefix (0 without a group).
    pub prefix_tokens: u32,
    /// Tokens after the prefix, unique to `unique_seed`.
    pub unique_tokens: u32,
    /// Output length the request asks for (`max_tokens` with `ignore_eos`).
    pub output_tokens: u32,
    /// Identity of the unique part: equal seeds give equal unique tokens (the same question asked again).
    pub unique_seed: u64,
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Ordinary token ids live below this (Llama-3 specials above).
const ORDINARY: u64 = 128_000;
const PREFIX_DOMAIN: u64 = 0x5052_4546;
const UNIQUE_DOMAIN: u64 = 0x554E_4951;

impl TraceRequest {
    /// Total prompt length.
    pub fn prompt_len(&self) -> u32 {
        self.prefix_tokens + self.unique_tokens
    }

    fn piece(&self, trace_seed: u64, k: u32) -> u64 {
        match self.prefix_group {
            Some(g) if k < self.prefix_tokens => {
                mix(mix(trace_seed ^ PREFIX_DOMAIN, u64::from(g)), u64::from(k))
            }
            _ => mix(
                mix(trace_seed ^ UNIQUE_DOMAIN, self.unique_seed),
                u64::from(k),
            ),
        }
    }

    /// Prompt token ids: the group's prefix ids, then ids unique to `unique_seed`. Deterministic in `trace_seed`.
    pub fn prompt_tokens(&self, trace_seed: u64) -> Vec<u32> {
        (0..self.prompt_len())
            .map(|k| (self.piece(trace_seed, k) % ORDINARY) as u32)
            .collect()
    }

    /// Prompt text: one 4-byte word (three letters and a space) per token, so `ByteTokenizer` encodes it to exactly
    /// `prompt_len()` ids, and requests of a group share their leading text (hence their leading ids).
    pub fn prompt_text(&self, trace_seed: u64) -> String {
        let mut s = String::with_capacity(self.prompt_len() as usize * 4);
        for k in 0..self.prompt_len() {
            let h = self.piece(trace_seed, k);
            for i in 0..3 {
                s.push(char::from(b'a' + ((h >> (8 * i)) % 26) as u8));
            }
            s.push(' ');
        }
        s
    }
}

fn normal_cdf(z: f64) -> f64 {
    // Abramowitz-Stegun 7.1.26 on erf; |error| < 1.5e-7.
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// A lognormal length distribution, optionally truncated (by rejection) at `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LengthDist {
    /// ln of the median.
    pub mu: f64,
    pub sigma: f64,
    /// Samples above this are redrawn.
    pub cap: f64,
}

impl LengthDist {
    /// Fit median = `p50`; sigma from `p90` if given, else from the mean. If the untruncated mean then exceeds
    /// `mean`, truncate at the cap that restores it.
    pub fn fit(mean: f64, p50: f64, p90: Option<f64>) -> Self {
        let mu = p50.max(1.0).ln();
        let sigma = match p90 {
            Some(p90) if p90 > p50 => (p90 / p50).ln() / 1.281_551_565_5,
            _ => (2.0 * (mean / p50).max(1.0).ln()).sqrt(),
        };
        let d = LengthDist {
            mu,
            sigma,
            cap: f64::INFINITY,
        };
        if d.mean() <= mean {
            return d;
        }
        let (mut lo, mut hi) = (p50, p50 * 1e4);
        for _ in 0..100 {
            let mid = (lo + hi) / 2.0;
            if (LengthDist { cap: mid, ..d }).mean() > mean {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        LengthDist { cap: lo, ..d }
    }

    /// Mean of the (truncated) distribution.
    pub fn mean(&self) -> f64 {
        let m = (self.mu + self.sigma * self.sigma / 2.0).exp();
        if !self.cap.is_finite() {
            return m;
        }
        let z = (self.cap.ln() - self.mu) / self.sigma;
        m * normal_cdf(z - self.sigma) / normal_cdf(z).max(1e-12)
    }

    /// One length >= 1.
    pub fn sample(&self, rng: &mut impl Rng) -> u32 {
        for _ in 0..1000 {
            let z: f64 = StandardNormal.sample(rng);
            let x = (self.mu + self.sigma * z).exp();
            if x <= self.cap {
                return x.round().clamp(1.0, f64::from(u32::MAX / 4)) as u32;
            }
        }
        self.cap.round().max(1.0) as u32
    }
}

/// Inter-arrival process: gamma with mean `1/rate` and coefficient of variation `cv` (cv 1 = Poisson).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Arrivals {
    pub rate: f64,
    pub cv: f64,
}

impl Arrivals {
    /// Arrival times in `[0, duration_s)`.
    pub fn times(&self, duration_s: f64, rng: &mut impl Rng) -> Vec<f64> {
        let mut out = Vec::with_capacity((self.rate * duration_s * 1.1) as usize + 1);
        if self.rate <= 0.0 || duration_s <= 0.0 {
            return out;
        }
        let mean = 1.0 / self.rate;
        let mut t = 0.0;
        if (self.cv - 1.0).abs() < 1e-9 {
            let Ok(exp) = Exp::new(self.rate) else {
                return out;
            };
            loop {
                t += exp.sample(rng);
                if t >= duration_s {
                    return out;
                }
                out.push(t);
            }
        }
        let shape = 1.0 / (self.cv * self.cv).max(1e-6);
        let Ok(g) = Gamma::new(shape, mean / shape) else {
            return out;
        };
        loop {
            t += g.sample(rng);
            if t >= duration_s {
                return out;
            }
            out.push(t);
        }
    }
}

/// Shared-prefix workload shape (inference-perf): `groups` x `prompts_per_group` questions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SharedPrefixSpec {
    pub groups: u32,
    pub prompts_per_group: u32,
    /// System prompt tokens shared by a group.
    pub system_tokens: u32,
    /// Question tokens unique per prompt.
    pub question_tokens: u32,
    pub output_tokens: u32,
}

impl SharedPrefixSpec {
    /// inference-perf defaults: 10 x 10, system 100, question 50, output 50.
    pub const INFERENCE_PERF: SharedPrefixSpec = SharedPrefixSpec {
        groups: 10,
        prompts_per_group: 10,
        system_tokens: 100,
        question_tokens: 50,
        output_tokens: 50,
    };
    /// llm-d headline: 150 x 5, system 6000, question 1200, output 1000.
    pub const LLM_D: SharedPrefixSpec = SharedPrefixSpec {
        groups: 150,
        prompts_per_group: 5,
        system_tokens: 6000,
        question_tokens: 1200,
        output_tokens: 1000,
    };
}

/// A named workload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Workload {
    /// Azure LLM inference 2023, conversation: 5.5 req/s, CV 1.09, in 1155/1020/2734, out 211/129/424.
    AzureConv,
    /// Azure 2023, code: 2.6 req/s, CV 13, in 2048/1469/5188, out 28/13.
    AzureCode,
    /// Shared-prefix groups at a Poisson rate (default 10 req/s).
    SharedPrefix(SharedPrefixSpec),
    /// ISL 8192 / OSL 512 at a Poisson rate (default 1 req/s).
    LongPrompt,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "azure-conv" => Ok(Workload::AzureConv),
            "azure-code" => Ok(Workload::AzureCode),
            "shared-prefix" => Ok(Workload::SharedPrefix(SharedPrefixSpec::INFERENCE_PERF)),
            "llmd-shared-prefix" => Ok(Workload::SharedPrefix(SharedPrefixSpec::LLM_D)),
            "long-prompt" => Ok(Workload::LongPrompt),
            _ => Err(format!(
                "unknown workload `{s}` (azure-conv, azure-code, shared-prefix, llmd-shared-prefix, long-prompt)"
            )),
        }
    }
}

impl Workload {
    /// The name [`FromStr`](std::str::FromStr) accepts for this workload (`shared-prefix` for custom shapes).
    pub fn name(&self) -> &'static str {
        match self {
            Workload::AzureConv => "azure-conv",
            Workload::AzureCode => "azure-code",
            Workload::SharedPrefix(s) if *s == SharedPrefixSpec::LLM_D => "llmd-shared-prefix",
            Workload::SharedPrefix(_) => "shared-prefix",
            Workload::LongPrompt => "long-prompt",
        }
    }

    /// The workload's published (or default) request rate, req/s.
    pub fn default_rate(&self) -> f64 {
        match self {
            Workload::AzureConv => 19_366.0 / 3600.0,
            Workload::AzureCode => 8_819.0 / 3600.0,
            Workload::SharedPrefix(_) => 10.0,
            Workload::LongPrompt => 1.0,
        }
    }

    /// A trace of `duration_s` seconds at `rate` req/s (None = the default rate).
    pub fn generate(
        &self,
        duration_s: f64,
        rate: Option<f64>,
        rng: &mut impl Rng,
    ) -> Vec<TraceRequest> {
        let rate = rate.unwrap_or_else(|| self.default_rate());
        match self {
            Workload::AzureConv => lengths_trace(
                Arrivals { rate, cv: 1.09 },
                LengthDist::fit(1155.0, 1020.0, Some(2734.0)),
                LengthDist::fit(211.0, 129.0, Some(424.0)),
                duration_s,
                rng,
            ),
            Workload::AzureCode => lengths_trace(
                Arrivals { rate, cv: 13.0 },
                LengthDist::fit(2048.0, 1469.0, Some(5188.0)),
                LengthDist::fit(28.0, 13.0, None),
                duration_s,
                rng,
            ),
            Workload::SharedPrefix(spec) => {
                shared_prefix(spec, Arrivals { rate, cv: 1.0 }, duration_s, rng)
            }
            Workload::LongPrompt => Arrivals { rate, cv: 1.0 }
                .times(duration_s, rng)
                .into_iter()
                .enumerate()
                .map(|(i, t)| TraceRequest {
                    arrival_s: t,
                    prefix_group: None,
                    prefix_tokens: 0,
                    unique_tokens: 8192,
                    output_tokens: 512,
                    unique_seed: i as u64,
                })
                .collect(),
        }
    }
}

fn lengths_trace(
    arrivals: Arrivals,
    input: LengthDist,
    output: LengthDist,
    duration_s: f64,
    rng: &mut impl Rng,
) -> Vec<TraceRequest> {
    let times = arrivals.times(duration_s, rng);
    times
        .into_iter()
        .enumerate()
        .map(|(i, t)| TraceRequest {
            arrival_s: t,
            prefix_group: None,
            prefix_tokens: 0,
            unique_tokens: input.sample(rng),
            output_tokens: output.sample(rng),
            unique_seed: i as u64,
        })
        .collect()
}

/// Shared-prefix trace: each arrival asks one of the `groups x prompts_per_group` questions uniformly at random.
pub fn shared_prefix(
    spec: &SharedPrefixSpec,
    arrivals: Arrivals,
    duration_s: f64,
    rng: &mut impl Rng,
) -> Vec<TraceRequest> {
    let total = u64::from(spec.groups.max(1)) * u64::from(spec.prompts_per_group.max(1));
    arrivals
        .times(duration_s, rng)
        .into_iter()
        .map(|t| {
            let q = rng.random_range(0..total);
            let g = (q / u64::from(spec.prompts_per_group.max(1))) as u32;
            TraceRequest {
                arrival_s: t,
                prefix_group: Some(g),
                prefix_tokens: spec.system_tokens,
                unique_tokens: spec.question_tokens,
                output_tokens: spec.output_tokens,
                unique_seed: q,
            }
        })
        .collect()
}

/// Summary of a trace (to check a generator against its published statistics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TraceStats {
    pub count: usize,
    pub rate: f64,
    pub input_mean: f64,
    pub input_p50: f64,
    pub input_p90: f64,
    pub output_mean: f64,
    pub output_p50: f64,
    pub output_p90: f64,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    f64::from(sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

/// Count, rate and length statistics of `trace` over `duration_s`.
pub fn stats(trace: &[TraceRequest], duration_s: f64) -> TraceStats {
    let mut inp: Vec<u32> = trace.iter().map(TraceRequest::prompt_len).collect();
    let mut out: Vec<u32> = trace.iter().map(|r| r.output_tokens).collect();
    inp.sort_unstable();
    out.sort_unstable();
    let mean = |v: &[u32]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64
        }
    };
    TraceStats {
        count: trace.len(),
        rate: trace.len() as f64 / duration_s.max(1e-9),
        input_mean: mean(&inp),
        input_p50: pct(&inp, 0.5),
        input_p90: pct(&inp, 0.9),
        output_mean: mean(&out),
        output_p50: pct(&out, 0.5),
        output_p90: pct(&out, 0.9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policies::tokens::{ByteTokenizer, Tokenizer};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn close(got: f64, want: f64, tol: f64) -> bool {
        (got - want).abs() / want <= tol
    }

    #[test]
    fn azure_conv_matches_published_statistics() {
        let mut rng = SmallRng::seed_from_u64(1);
        let t = Workload::AzureConv.generate(3600.0, None, &mut rng);
        let s = stats(&t, 3600.0);
        assert!(close(s.count as f64, 19_366.0, 0.05), "{s:?}");
        assert!(close(s.input_mean, 1155.0, 0.08), "{s:?}");
        assert!(close(s.input_p50, 1020.0, 0.10), "{s:?}");
        assert!(close(s.input_p90, 2734.0, 0.25), "{s:?}");
        assert!(close(s.output_mean, 211.0, 0.10), "{s:?}");
        assert!(close(s.output_p50, 129.0, 0.10), "{s:?}");
        assert!(close(s.output_p90, 424.0, 0.10), "{s:?}");
        // inter-arrival CV
        let gaps: Vec<f64> = t
            .windows(2)
            .map(|w| w[1].arrival_s - w[0].arrival_s)
            .collect();
        let m = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let sd = (gaps.iter().map(|g| (g - m) * (g - m)).sum::<f64>() / gaps.len() as f64).sqrt();
        assert!(close(sd / m, 1.09, 0.1), "cv {}", sd / m);
    }

    #[test]
    fn azure_code_matches_published_statistics() {
        let mut rng = SmallRng::seed_from_u64(2);
        let t = Workload::AzureCode.generate(4.0 * 3600.0, None, &mut rng);
        let s = stats(&t, 4.0 * 3600.0);
        assert!(close(s.rate, 2.45, 0.25), "{s:?}");
        assert!(close(s.input_mean, 2048.0, 0.08), "{s:?}");
        assert!(close(s.input_p50, 1469.0, 0.10), "{s:?}");
        assert!(close(s.output_mean, 28.0, 0.15), "{s:?}");
        assert!(close(s.output_p50, 13.0, 0.15), "{s:?}");
    }

    #[test]
    fn shared_prefix_groups_share_leading_tokens_and_text() {
        let mut rng = SmallRng::seed_from_u64(3);
        let t = shared_prefix(
            &SharedPrefixSpec::INFERENCE_PERF,
            Arrivals {
                rate: 50.0,
                cv: 1.0,
            },
            20.0,
            &mut rng,
        );
        assert!(close(t.len() as f64, 1000.0, 0.15));
        let a = t.iter().find(|r| r.prefix_group == Some(3)).unwrap();
        let b = t
            .iter()
            .find(|r| r.prefix_group == Some(3) && r.unique_seed != a.unique_seed)
            .unwrap();
        let c = t.iter().find(|r| r.prefix_group == Some(4)).unwrap();
        let (ta, tb, tc) = (a.prompt_tokens(9), b.prompt_tokens(9), c.prompt_tokens(9));
        assert_eq!(ta.len(), 150);
        assert_eq!(ta[..100], tb[..100]);
        assert_ne!(ta[100..], tb[100..]);
        assert_ne!(ta[..100], tc[..100]);
        assert_eq!(a.prompt_tokens(9), ta, "deterministic");
        assert_ne!(a.prompt_tokens(10), ta, "depends on the trace seed");
        let (xa, xb) = (a.prompt_text(9), b.prompt_text(9));
        assert_eq!(xa[..400], xb[..400]);
        let (ea, eb) = (ByteTokenizer.encode(&xa), ByteTokenizer.encode(&xb));
        assert_eq!(ea.len(), 150);
        assert_eq!(ea[..100], eb[..100]);
        assert!(ea.iter().all(|&id| id < 128_000));
    }

    #[test]
    fn lognormal_fit_reproduces_mean_when_truncated() {
        let d = LengthDist::fit(2048.0, 1469.0, Some(5188.0));
        assert!(d.cap.is_finite());
        assert!(close(d.mean(), 2048.0, 0.01));
        let mut rng = SmallRng::seed_from_u64(4);
        let n = 50_000;
        let m = (0..n).map(|_| f64::from(d.sample(&mut rng))).sum::<f64>() / f64::from(n);
        assert!(close(m, 2048.0, 0.03), "{m}");
        assert!((normal_cdf(1.281_551_565_5) - 0.9).abs() < 1e-6);
    }

    #[test]
    fn long_prompt_and_parsing() {
        let mut rng = SmallRng::seed_from_u64(5);
        let t = "long-prompt"
            .parse::<Workload>()
            .unwrap()
            .generate(100.0, Some(2.0), &mut rng);
        assert!(close(t.len() as f64, 200.0, 0.25));
        assert!(
            t.iter()
                .all(|r| r.prompt_len() == 8192 && r.output_tokens == 512)
        );
        assert!("nope".parse::<Workload>().is_err());
        for n in [
            "azure-conv",
            "azure-code",
            "shared-prefix",
            "llmd-shared-prefix",
            "long-prompt",
        ] {
            assert_eq!(n.parse::<Workload>().unwrap().name(), n);
        }
        assert!(
            matches!("llmd-shared-prefix".parse::<Workload>(), Ok(Workload::SharedPrefix(s)) if s.groups == 150)
        );
    }
}
