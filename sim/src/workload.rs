//! Synthetic request traces (vllm-server-contract.md §8), the one workload model every weir load source draws from:
//! Azure-2023 conversation and code, shared-prefix groups (inference-perf and the llm-d headline preset), a
//! long-prompt mix, Mooncake-like long-context RAG, offline batch and a tiny proxy-overhead probe; plus the
//! deterministic materialisation of each request's prompt as token ids (for the engine) or text (for an HTTP
//! benchmark such as `weir bench`).
//!
//! Pure: every generator takes a seeded `&mut impl Rng`. A [`Sampler`] draws one request at a time (what an
//! online load generator needs); [`Workload::generate`] draws a whole trace up front (arrival times first, then
//! each request from the sampler). Lengths are lognormal fits to the published mean/p50/p90 (truncated when the
//! three cannot be met at once); inter-arrival times are gamma-distributed with the published coefficient of
//! variation. Shared-prefix requests share their leading token ids (and leading text) exactly.

use rand::Rng;
use rand_distr::{Distribution, Exp, Gamma, StandardNormal};
use serde::Serialize;

mod sessions;

pub use sessions::{ANSWER_S_PER_TOKEN, MultiTurnSpec, cache_bound};

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceRequest {
    /// Seconds from the start of the trace.
    pub arrival_s: f64,
    /// Shared-prefix group, when the prompt starts with a group's system prompt.
    pub prefix_group: Option<u64>,
    /// Length of the shared prefix (0 without a group).
    pub prefix_tokens: u32,
    /// Tokens after the prefix, unique to `unique_seed`.
    pub unique_tokens: u32,
    /// Output length the request asks for (`max_tokens` with `ignore_eos`).
    pub output_tokens: u32,
    /// Identity of the unique part: equal seeds give equal unique tokens (the same question asked again).
    pub unique_seed: u64,
    /// Multi-turn session ([`sessions`]): the tokens after the group prefix are the first `unique_tokens` of the
    /// session's own token stream instead of `unique_seed`'s, so a longer turn of a session starts with every
    /// shorter one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
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
const SESSION_DOMAIN: u64 = 0x5345_5353;

impl TraceRequest {
    /// Total prompt length.
    pub fn prompt_len(&self) -> u32 {
        self.prefix_tokens + self.unique_tokens
    }

    fn piece(&self, trace_seed: u64, k: u32) -> u64 {
        match (self.prefix_group, self.session) {
            (Some(g), _) if k < self.prefix_tokens => {
                mix(mix(trace_seed ^ PREFIX_DOMAIN, g), u64::from(k))
            }
            (_, Some(s)) => mix(mix(trace_seed ^ SESSION_DOMAIN, s), u64::from(k)),
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
    /// `prompt_len()` ids, and requests of a group share their leading text (hence their leading ids). Equal to
    /// [`prefix_text`](Self::prefix_text) followed by [`unique_text`](Self::unique_text).
    pub fn prompt_text(&self, trace_seed: u64) -> String {
        self.text(trace_seed, 0..self.prompt_len())
    }

    /// The shared part of [`prompt_text`](Self::prompt_text): `prefix_tokens` words, the same for every request of
    /// the group (a longer prefix of a group extends a shorter one). Empty without a group.
    pub fn prefix_text(&self, trace_seed: u64) -> String {
        let n = if self.prefix_group.is_some() {
            self.prefix_tokens
        } else {
            0
        };
        self.text(trace_seed, 0..n)
    }

    /// The part of [`prompt_text`](Self::prompt_text) after [`prefix_text`](Self::prefix_text).
    pub fn unique_text(&self, trace_seed: u64) -> String {
        let start = if self.prefix_group.is_some() {
            self.prefix_tokens
        } else {
            0
        };
        self.text(trace_seed, start..self.prompt_len())
    }

    fn text(&self, trace_seed: u64, tokens: std::ops::Range<u32>) -> String {
        let mut s = String::with_capacity(tokens.len() * 4);
        for k in tokens {
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
    if z.is_infinite() {
        return if z > 0.0 { 1.0 } else { 0.0 };
    }
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

/// A lognormal length distribution, optionally truncated (by rejection) to `[floor, cap]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LengthDist {
    /// ln of the median.
    pub mu: f64,
    pub sigma: f64,
    /// Samples below this are redrawn (0 = no lower bound); keeps e.g. RAG prompts long.
    pub floor: f64,
    /// Samples above this are redrawn; restores a published mean, or keeps prompts inside a context window.
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
            floor: 0.0,
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

    /// A lognormal with this median and sigma, redrawn outside `[floor, cap]`.
    pub fn bounded(median: f64, sigma: f64, floor: f64, cap: f64) -> Self {
        LengthDist {
            mu: median.max(1.0).ln(),
            sigma,
            floor,
            cap,
        }
    }

    /// Mean of the (truncated) distribution.
    pub fn mean(&self) -> f64 {
        let m = (self.mu + self.sigma * self.sigma / 2.0).exp();
        if !self.cap.is_finite() && self.floor <= 0.0 {
            return m;
        }
        let z = |x: f64| {
            if x <= 0.0 {
                f64::NEG_INFINITY
            } else {
                (x.ln() - self.mu) / self.sigma
            }
        };
        let (za, zb) = (z(self.floor), z(self.cap));
        let s = self.sigma;
        m * (normal_cdf(zb - s) - normal_cdf(za - s)) / (normal_cdf(zb) - normal_cdf(za)).max(1e-12)
    }

    /// One length >= 1.
    pub fn sample(&self, rng: &mut impl Rng) -> u32 {
        let mut x = self.mu.exp();
        for _ in 0..1000 {
            let z: f64 = StandardNormal.sample(rng);
            x = (self.mu + self.sigma * z).exp();
            if x >= self.floor && x <= self.cap {
                break;
            }
        }
        x.clamp(self.floor, self.cap)
            .round()
            .clamp(1.0, f64::from(u32::MAX / 4)) as u32
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
        if self.rate <= 0.0 || duration_s <= 0.0 {
            return Vec::new();
        }
        if (self.cv - 1.0).abs() < 1e-9 {
            return match Exp::new(self.rate) {
                Ok(exp) => self.accumulate(duration_s, || exp.sample(rng)),
                Err(_) => Vec::new(),
            };
        }
        let shape = 1.0 / (self.cv * self.cv).max(1e-6);
        match Gamma::new(shape, 1.0 / self.rate / shape) {
            Ok(g) => self.accumulate(duration_s, || g.sample(rng)),
            Err(_) => Vec::new(),
        }
    }

    /// Running sums of `gap()` while below `duration_s`.
    fn accumulate(&self, duration_s: f64, mut gap: impl FnMut() -> f64) -> Vec<f64> {
        let mut out = Vec::with_capacity((self.rate * duration_s * 1.1) as usize + 1);
        let mut t = gap();
        while t < duration_s {
            out.push(t);
            t += gap();
        }
        out
    }
}

/// Shared-prefix workload shape (inference-perf): `groups` x `prompts_per_group` questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SharedPrefixSpec {
    /// Number of distinct system prompts (G).
    pub groups: u32,
    /// Distinct questions per group (P).
    pub prompts_per_group: u32,
    /// System prompt tokens shared by a group (S).
    pub system_tokens: u32,
    /// Question tokens unique per prompt (Q).
    pub question_tokens: u32,
    /// Output tokens per request (O).
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
    /// Proxy-overhead probe: 8 tokens in, 1 out, Poisson (default 10 req/s; no published rate).
    Tiny,
    /// Mooncake-like long-context RAG: input median 6909 and sigma 1.05 (the Mooncake mean/p50), kept within
    /// 1024..30000 tokens so it fits a 32k context; output median 343, sigma 0.5, within 16..1024. Poisson at
    /// Mooncake's 12,031 req / 59 min.
    LongContextRag,
    /// Offline batch summarisation: input median 1500 (sigma 0.6, 64..8192), output median 600 (sigma 0.4,
    /// 64..2048), Poisson (default 1 req/s; no published rate).
    Batch,
    /// Multi-turn chat sessions ([`MultiTurnSpec`]): every turn resends the conversation; default 20 req/s.
    MultiTurn(MultiTurnSpec),
}

/// Canonical names, then the aliases `weir bench` uses for the same workloads.
const NAMES: &str = "azure-conv (chat), azure-code (code-completion), shared-prefix, llmd-shared-prefix \
                     (shared-prefix-llm-d), long-prompt (long-prompt-mix), tiny, long-context-rag, batch, multi-turn";

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "azure-conv" | "chat" => Ok(Workload::AzureConv),
            "azure-code" | "code-completion" => Ok(Workload::AzureCode),
            "shared-prefix" => Ok(Workload::SharedPrefix(SharedPrefixSpec::INFERENCE_PERF)),
            "llmd-shared-prefix" | "shared-prefix-llm-d" => {
                Ok(Workload::SharedPrefix(SharedPrefixSpec::LLM_D))
            }
            "long-prompt" | "long-prompt-mix" => Ok(Workload::LongPrompt),
            "tiny" => Ok(Workload::Tiny),
            "long-context-rag" => Ok(Workload::LongContextRag),
            "batch" => Ok(Workload::Batch),
            "multi-turn" => Ok(Workload::MultiTurn(MultiTurnSpec::DEFAULT)),
            _ => Err(format!("unknown workload `{s}` ({NAMES})")),
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
            Workload::Tiny => "tiny",
            Workload::LongContextRag => "long-context-rag",
            Workload::Batch => "batch",
            Workload::MultiTurn(_) => "multi-turn",
        }
    }

    /// The workload's published (or default) request rate, req/s.
    pub fn default_rate(&self) -> f64 {
        match self {
            Workload::AzureConv => 19_366.0 / 3600.0,
            Workload::AzureCode => 8_819.0 / 3600.0,
            Workload::SharedPrefix(_) | Workload::Tiny => 10.0,
            Workload::LongPrompt | Workload::Batch => 1.0,
            Workload::LongContextRag => 12_031.0 / (59.0 * 60.0),
            Workload::MultiTurn(_) => 20.0,
        }
    }

    /// The arrival process at `rate` req/s: the published inter-arrival CV, else Poisson.
    pub fn arrivals(&self, rate: f64) -> Arrivals {
        let cv = match self {
            Workload::AzureConv => 1.09,
            Workload::AzureCode => 13.0,
            _ => 1.0,
        };
        Arrivals { rate, cv }
    }

    /// A one-request-at-a-time sampler of this workload's lengths and prefixes.
    pub fn sampler(&self) -> Sampler {
        let shape = match self {
            Workload::AzureConv => Shape::Lengths {
                input: LengthDist::fit(1155.0, 1020.0, Some(2734.0)),
                output: LengthDist::fit(211.0, 129.0, Some(424.0)),
            },
            Workload::AzureCode => Shape::Lengths {
                input: LengthDist::fit(2048.0, 1469.0, Some(5188.0)),
                output: LengthDist::fit(28.0, 13.0, None),
            },
            Workload::LongContextRag => Shape::Lengths {
                input: LengthDist::bounded(6909.0, 1.05, 1024.0, 30_000.0),
                output: LengthDist::bounded(343.0, 0.5, 16.0, 1024.0),
            },
            Workload::Batch => Shape::Lengths {
                input: LengthDist::bounded(1500.0, 0.6, 64.0, 8192.0),
                output: LengthDist::bounded(600.0, 0.4, 64.0, 2048.0),
            },
            Workload::SharedPrefix(spec) => Shape::Shared(*spec),
            Workload::MultiTurn(spec) => Shape::FirstTurn(*spec),
            Workload::LongPrompt => Shape::Fixed {
                input: 8192,
                output: 512,
            },
            Workload::Tiny => Shape::Fixed {
                input: 8,
                output: 1,
            },
        };
        Sampler { shape }
    }

    /// A trace of `duration_s` seconds at `rate` req/s (None = the default rate): all arrival times are drawn
    /// first, then each request from [`sampler`](Self::sampler) in arrival order with its index as `index`.
    /// Multi-turn sessions are drawn session by session instead ([`MultiTurnSpec::generate`]).
    pub fn generate(
        &self,
        duration_s: f64,
        rate: Option<f64>,
        rng: &mut impl Rng,
    ) -> Vec<TraceRequest> {
        let rate = rate.unwrap_or_else(|| self.default_rate());
        if let Workload::MultiTurn(spec) = self {
            return spec.generate(rate, duration_s, rng);
        }
        let times = self.arrivals(rate).times(duration_s, rng);
        let sampler = self.sampler();
        times
            .into_iter()
            .enumerate()
            .map(|(i, t)| sampler.draw(i as u64, t, rng))
            .collect()
    }
}

/// What a [`Sampler`] draws from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// Every request the same lengths, all unique tokens.
    Fixed { input: u32, output: u32 },
    /// Independent input and output lengths, all unique tokens.
    Lengths {
        input: LengthDist,
        output: LengthDist,
    },
    /// One of the G x P shared-prefix questions, uniformly.
    Shared(SharedPrefixSpec),
    /// The first turn of a new multi-turn session (one request at a time cannot continue a session; whole sessions
    /// come from [`Workload::generate`]).
    FirstTurn(MultiTurnSpec),
}

/// Draws single requests of a workload (no arrival process): for load generators that decide arrivals themselves
/// (closed loop, their own Poisson clock) and need one request at a time. Stateless, so it can be shared; the
/// caller numbers the requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Lengths and prefix structure (fitted once, at construction).
    shape: Shape,
}

impl Sampler {
    /// Request number `index` (its identity when the prompt is all unique: distinct indexes give distinct prompts),
    /// arriving at `arrival_s`. Shared-prefix requests take their identity from the question drawn instead.
    pub fn draw(&self, index: u64, arrival_s: f64, rng: &mut impl Rng) -> TraceRequest {
        let unique = |unique_tokens, output_tokens| TraceRequest {
            arrival_s,
            prefix_group: None,
            prefix_tokens: 0,
            unique_tokens,
            output_tokens,
            unique_seed: index,
            session: None,
        };
        match &self.shape {
            Shape::Fixed { input, output } => unique(*input, *output),
            Shape::Lengths { input, output } => {
                let i = input.sample(rng);
                unique(i, output.sample(rng))
            }
            Shape::Shared(spec) => {
                let per_group = u64::from(spec.prompts_per_group.max(1));
                let total = u64::from(spec.groups.max(1)) * per_group;
                let q = rng.random_range(0..total);
                TraceRequest {
                    arrival_s,
                    prefix_group: Some(q / per_group),
                    prefix_tokens: spec.system_tokens,
                    unique_tokens: spec.question_tokens,
                    output_tokens: spec.output_tokens,
                    unique_seed: q,
                    session: None,
                }
            }
            Shape::FirstTurn(spec) => {
                let prompt =
                    (spec.system_tokens + spec.context.sample(rng) + spec.message.sample(rng))
                        .min(spec.max_prompt_tokens.max(spec.system_tokens + 1));
                TraceRequest {
                    arrival_s,
                    prefix_group: Some(0),
                    prefix_tokens: spec.system_tokens,
                    unique_tokens: prompt - spec.system_tokens,
                    output_tokens: spec.answer.sample(rng),
                    unique_seed: index,
                    session: Some(index),
                }
            }
        }
    }
}

/// Shared-prefix trace: each arrival asks one of the `groups x prompts_per_group` questions uniformly at random.
pub fn shared_prefix(
    spec: &SharedPrefixSpec,
    arrivals: Arrivals,
    duration_s: f64,
    rng: &mut impl Rng,
) -> Vec<TraceRequest> {
    let sampler = Workload::SharedPrefix(*spec).sampler();
    arrivals
        .times(duration_s, rng)
        .into_iter()
        .enumerate()
        .map(|(i, t)| sampler.draw(i as u64, t, rng))
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
            "tiny",
            "long-context-rag",
            "batch",
            "multi-turn",
        ] {
            assert_eq!(n.parse::<Workload>().unwrap().name(), n);
        }
        assert!(
            matches!("llmd-shared-prefix".parse::<Workload>(), Ok(Workload::SharedPrefix(s)) if s.groups == 150)
        );
        // `weir bench`'s names for the same workloads.
        for (alias, name) in [
            ("chat", "azure-conv"),
            ("code-completion", "azure-code"),
            ("shared-prefix-llm-d", "llmd-shared-prefix"),
            ("long-prompt-mix", "long-prompt"),
        ] {
            assert_eq!(alias.parse::<Workload>().unwrap().name(), name);
        }
        let err = "nope".parse::<Workload>().unwrap_err();
        assert!(
            err.contains("long-context-rag") && err.contains("chat"),
            "{err}"
        );
    }

    #[test]
    fn sampler_draws_match_the_trace_generator() {
        for w in [
            Workload::AzureConv,
            Workload::SharedPrefix(SharedPrefixSpec::INFERENCE_PERF),
            Workload::LongContextRag,
        ] {
            let trace = w.generate(30.0, Some(5.0), &mut SmallRng::seed_from_u64(6));
            let mut rng = SmallRng::seed_from_u64(6);
            let times = w.arrivals(5.0).times(30.0, &mut rng);
            let s = w.sampler();
            let drawn: Vec<TraceRequest> = times
                .iter()
                .enumerate()
                .map(|(i, &t)| s.draw(i as u64, t, &mut rng))
                .collect();
            assert!(!drawn.is_empty());
            assert_eq!(drawn, trace, "{}", w.name());
        }
    }

    #[test]
    fn tiny_rag_and_batch_lengths() {
        let mut rng = SmallRng::seed_from_u64(7);
        let tiny = Workload::Tiny.sampler().draw(0, 0.0, &mut rng);
        assert_eq!((tiny.prompt_len(), tiny.output_tokens), (8, 1));
        let draw = |w: Workload, rng: &mut SmallRng| {
            let s = w.sampler();
            let t: Vec<TraceRequest> = (0..20_000).map(|i| s.draw(i, 0.0, rng)).collect();
            stats(&t, 1.0)
        };
        let rag = draw(Workload::LongContextRag, &mut rng);
        assert!(close(rag.input_p50, 6909.0, 0.10), "{rag:?}");
        assert!(close(rag.output_p50, 343.0, 0.10), "{rag:?}");
        let rag_trace: Vec<TraceRequest> = {
            let s = Workload::LongContextRag.sampler();
            (0..5000).map(|i| s.draw(i, 0.0, &mut rng)).collect()
        };
        assert!(
            rag_trace
                .iter()
                .all(|r| (1024..=30_000).contains(&r.prompt_len())
                    && (16..=1024).contains(&r.output_tokens))
        );
        let d = LengthDist::bounded(6909.0, 1.05, 1024.0, 30_000.0);
        assert!(
            close(rag.input_mean, d.mean(), 0.03),
            "{rag:?} vs {}",
            d.mean()
        );
        let batch = draw(Workload::Batch, &mut rng);
        assert!(close(batch.input_p50, 1500.0, 0.10), "{batch:?}");
        assert!(close(batch.output_p50, 600.0, 0.10), "{batch:?}");
        assert!(
            batch.output_mean > batch.input_mean * 0.3,
            "long outputs: {batch:?}"
        );
    }

    #[test]
    fn prefix_and_unique_text_split_the_prompt() {
        let mut rng = SmallRng::seed_from_u64(8);
        let s = Workload::SharedPrefix(SharedPrefixSpec {
            groups: 2,
            prompts_per_group: 3,
            system_tokens: 20,
            question_tokens: 7,
            output_tokens: 1,
        })
        .sampler();
        let reqs: Vec<TraceRequest> = (0..50).map(|i| s.draw(i, 0.0, &mut rng)).collect();
        for r in &reqs {
            let (p, u) = (r.prefix_text(11), r.unique_text(11));
            assert_eq!(format!("{p}{u}"), r.prompt_text(11));
            assert_eq!(ByteTokenizer.encode(&p).len(), 20);
            assert_eq!(ByteTokenizer.encode(&u).len(), 7);
        }
        let mut prefixes: Vec<String> = reqs.iter().map(|r| r.prefix_text(11)).collect();
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 2, "one system prompt per group");
        let mut questions: Vec<u64> = reqs.iter().map(|r| r.unique_seed).collect();
        questions.sort_unstable();
        questions.dedup();
        assert_eq!(questions.len(), 6, "G x P distinct questions");
        // A longer prefix of the same group extends a shorter one; no group means no prefix text.
        let short = TraceRequest {
            prefix_tokens: 5,
            ..reqs[0].clone()
        };
        assert!(reqs[0].prefix_text(11).starts_with(&short.prefix_text(11)));
        let plain = Workload::Tiny.sampler().draw(3, 0.0, &mut rng);
        assert_eq!(plain.prefix_text(11), "");
        assert_eq!(plain.unique_text(11), plain.prompt_text(11));
        assert_ne!(
            plain.unique_text(11),
            Workload::Tiny
                .sampler()
                .draw(4, 0.0, &mut rng)
                .unique_text(11),
            "distinct indexes give distinct prompts"
        );
    }

    #[test]
    fn truncated_mean_matches_samples_with_both_bounds() {
        let d = LengthDist::bounded(1500.0, 0.6, 64.0, 8192.0);
        let mut rng = SmallRng::seed_from_u64(9);
        let n = 50_000;
        let m = (0..n).map(|_| f64::from(d.sample(&mut rng))).sum::<f64>() / f64::from(n);
        assert!(close(m, d.mean(), 0.02), "{m} vs {}", d.mean());
        assert!(close(
            LengthDist::bounded(100.0, 0.5, 0.0, f64::INFINITY).mean(),
            100.0 * (0.125f64).exp(),
            1e-9
        ));
    }
}
