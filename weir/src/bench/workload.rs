//! Workload presets and trace replay: what each benchmark request asks for (prompt text, output length, arrival
//! time), drawn from an RNG the caller passes in, so a seed fixes the whole request sequence.
//!
//! Prompts are random text built to hit a token count under `policies::tokens::ByteTokenizer` (4 ASCII bytes per
//! token, so `n` tokens = `4n` bytes). Shared prefixes share their leading text byte for byte, so any prefix cache
//! (the simulator's, vLLM's, a router's index) sees the same leading tokens.
//!
//! Length distributions (lognormal fitted to median and p90 of the published traces, clamped):
//! - `tiny`: 8 tokens in, 1 out (proxy overhead).
//! - `chat`: Azure 2023 conversation; input median 1020, p90 2734 (sigma 0.77, clamp 4..16384); output median 129,
//!   p90 424 (sigma 0.93, clamp 1..2048).
//! - `code-completion`: Azure 2023 code; input median 1469, p90 5188 (sigma 0.99, clamp 4..16384); output median 13,
//!   mean 28 (sigma 1.24, clamp 1..512).
//! - `long-context-rag`: Mooncake-like long inputs; input median 6909, mean ~12k (sigma 1.05, clamp 1024..30000);
//!   output median 343 (sigma 0.5, clamp 16..1024).
//! - `batch`: offline summarisation; input median 1500 (sigma 0.6, clamp 64..8192), output median 600 (sigma 0.4,
//!   clamp 64..2048).
//! - `long-prompt-mix`: ISL 8192, OSL 512 (fixed).
//! - `shared-prefix`: G groups x P prompts, system S tokens shared per group + question Q tokens unique per prompt,
//!   output O; each request picks a (group, prompt) uniformly. inference-perf defaults 10x10, S 100, Q 50, O 50;
//!   `shared-prefix-llm-d` is llm-d's headline 150x5, S 6000, Q 1200, O 1000.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use serde::Deserialize;

/// One request the load generator will send.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// Shared leading text (a system prompt or a trace's prefix group), `None` when the prompt is all unique.
    pub system: Option<Arc<str>>,
    /// The per-request text (user question or whole prompt).
    pub user: String,
    /// Literal prompt token count targeted (shared + unique); `None` for literal trace prompts.
    pub prompt_tokens: Option<u32>,
    /// `max_tokens` to send; exact output length when `ignore_eos` is on.
    pub max_tokens: u32,
    /// Arrival offset in seconds from the start, for trace replay; presets leave arrivals to the runner.
    pub at: Option<f64>,
}

/// Shape of a shared-prefix workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedPrefix {
    /// Number of distinct system prompts (G).
    pub groups: u32,
    /// Distinct questions per group (P).
    pub prompts_per_group: u32,
    /// System prompt tokens shared within a group (S).
    pub system_tokens: u32,
    /// Question tokens unique per prompt (Q).
    pub question_tokens: u32,
    /// Output tokens per request (O).
    pub output_tokens: u32,
}

impl SharedPrefix {
    /// inference-perf's defaults: 10 x 10, S 100, Q 50, O 50.
    pub const INFERENCE_PERF: Self = Self {
        groups: 10,
        prompts_per_group: 10,
        system_tokens: 100,
        question_tokens: 50,
        output_tokens: 50,
    };
    /// llm-d's headline benchmark: 150 x 5, S 6000, Q 1200, O 1000.
    pub const LLM_D: Self = Self {
        groups: 150,
        prompts_per_group: 5,
        system_tokens: 6000,
        question_tokens: 1200,
        output_tokens: 1000,
    };
}

/// A named preset, parsed from `--workload`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preset {
    Tiny,
    Chat,
    SharedPrefix(SharedPrefix),
    LongContextRag,
    CodeCompletion,
    Batch,
    LongPromptMix,
}

/// Lognormal length with clamps, parameterised by median and sigma.
#[derive(Debug, Clone, Copy)]
struct Lengths {
    /// The distribution (mu = ln median).
    dist: LogNormal<f64>,
    /// Smallest length drawn.
    min: u32,
    /// Largest length drawn.
    max: u32,
}

impl Lengths {
    /// Start-up only, with the constant parameters above (a finite positive sigma cannot fail).
    fn new(median: f64, sigma: f64, min: u32, max: u32) -> Self {
        #[allow(clippy::expect_used)]
        let dist = LogNormal::new(median.ln(), sigma).expect("finite positive sigma");
        Self { dist, min, max }
    }

    fn sample(&self, rng: &mut impl Rng) -> u32 {
        let x = self.dist.sample(rng).round();
        (x.clamp(f64::from(self.min), f64::from(self.max))) as u32
    }
}

/// Draws request specs for a preset. Shared text (system prompts, questions) is built once at construction.
#[derive(Debug)]
pub struct Generator {
    /// What to draw.
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Fixed {
        input: u32,
        output: u32,
    },
    Random {
        input: Lengths,
        output: Lengths,
    },
    Shared {
        spec: SharedPrefix,
        systems: Vec<Arc<str>>,
        questions: Vec<String>,
    },
}

impl Generator {
    /// Build a generator; shared-prefix text is drawn from `rng` here.
    pub fn new(preset: Preset, rng: &mut impl Rng) -> Self {
        let kind = match preset {
            Preset::Tiny => Kind::Fixed {
                input: 8,
                output: 1,
            },
            Preset::LongPromptMix => Kind::Fixed {
                input: 8192,
                output: 512,
            },
            Preset::Chat => Kind::Random {
                input: Lengths::new(1020.0, 0.77, 4, 16_384),
                output: Lengths::new(129.0, 0.93, 1, 2048),
            },
            Preset::CodeCompletion => Kind::Random {
                input: Lengths::new(1469.0, 0.99, 4, 16_384),
                output: Lengths::new(13.0, 1.24, 1, 512),
            },
            Preset::LongContextRag => Kind::Random {
                input: Lengths::new(6909.0, 1.05, 1024, 30_000),
                output: Lengths::new(343.0, 0.5, 16, 1024),
            },
            Preset::Batch => Kind::Random {
                input: Lengths::new(1500.0, 0.6, 64, 8192),
                output: Lengths::new(600.0, 0.4, 64, 2048),
            },
            Preset::SharedPrefix(spec) => {
                let systems = (0..spec.groups)
                    .map(|_| Arc::from(text(rng, spec.system_tokens)))
                    .collect();
                let questions = (0..spec.groups * spec.prompts_per_group)
                    .map(|_| text(rng, spec.question_tokens))
                    .collect();
                Kind::Shared {
                    spec,
                    systems,
                    questions,
                }
            }
        };
        Self { kind }
    }

    /// The next request.
    pub fn next_spec(&self, rng: &mut impl Rng) -> RequestSpec {
        match &self.kind {
            Kind::Fixed { input, output } => RequestSpec {
                system: None,
                user: text(rng, *input),
                prompt_tokens: Some(*input),
                max_tokens: *output,
                at: None,
            },
            Kind::Random { input, output } => {
                let (i, o) = (input.sample(rng), output.sample(rng));
                RequestSpec {
                    system: None,
                    user: text(rng, i),
                    prompt_tokens: Some(i),
                    max_tokens: o,
                    at: None,
                }
            }
            Kind::Shared {
                spec,
                systems,
                questions,
            } => {
                let g = rng.random_range(0..spec.groups.max(1)) as usize;
                let p = rng.random_range(0..spec.prompts_per_group.max(1)) as usize;
                let q = g * spec.prompts_per_group as usize + p;
                RequestSpec {
                    system: systems.get(g).cloned(),
                    user: questions.get(q).cloned().unwrap_or_default(),
                    prompt_tokens: Some(spec.system_tokens + spec.question_tokens),
                    max_tokens: spec.output_tokens,
                    at: None,
                }
            }
        }
    }
}

/// Random lowercase text of exactly `tokens` ByteTokenizer tokens: `tokens` chunks of three letters and a space.
pub fn text(rng: &mut impl Rng, tokens: u32) -> String {
    let mut s = String::with_capacity(tokens as usize * 4);
    for _ in 0..tokens {
        for _ in 0..3 {
            s.push(char::from(b'a' + rng.random_range(0..26u8)));
        }
        s.push(' ');
    }
    s
}

/// One line of a `--trace` JSONL file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TraceEntry {
    /// Arrival time in seconds from the start of the trace.
    pub t: f64,
    /// Prompt length in tokens (ignored when `prompt` is given).
    #[serde(default)]
    pub prompt_tokens: Option<u32>,
    /// Literal prompt text, sent as is.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Output tokens requested.
    pub output_tokens: u32,
    /// Requests with the same group share a leading prefix.
    #[serde(default)]
    pub prefix_group: Option<u64>,
    /// Length of the shared prefix in tokens; defaults to half of `prompt_tokens`.
    #[serde(default)]
    pub prefix_tokens: Option<u32>,
}

/// A bad trace line: 1-based line number and reason.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceError {
    /// 1-based line number in the file.
    pub line: usize,
    /// What was wrong with it.
    pub reason: String,
}

impl std::fmt::Display for TraceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "trace line {}: {}", self.line, self.reason)
    }
}

/// Parse a JSONL trace (blank lines and `#` comments skipped), sorted by arrival time.
pub fn parse_trace(src: &str) -> Result<Vec<TraceEntry>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in src.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let e: TraceEntry = serde_json::from_str(line).map_err(|err| TraceError {
            line: i + 1,
            reason: err.to_string(),
        })?;
        if !(e.t.is_finite() && e.t >= 0.0) {
            return Err(TraceError {
                line: i + 1,
                reason: format!("t must be a finite number >= 0, got {}", e.t),
            });
        }
        if e.prompt.is_none() && e.prompt_tokens.is_none() {
            return Err(TraceError {
                line: i + 1,
                reason: "needs `prompt_tokens` or `prompt`".into(),
            });
        }
        if e.output_tokens == 0 {
            return Err(TraceError {
                line: i + 1,
                reason: "output_tokens must be >= 1".into(),
            });
        }
        out.push(e);
    }
    out.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(out)
}

/// Turns trace entries into request specs; prefix groups get deterministic shared text derived from `seed`.
#[derive(Debug)]
pub struct TraceBuilder {
    /// Seed for per-group prefix text.
    seed: u64,
    /// Longest prefix text drawn so far per group (shorter prefixes are its leading bytes).
    groups: HashMap<u64, Arc<str>>,
}

impl TraceBuilder {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            groups: HashMap::new(),
        }
    }

    /// The spec for one entry; unique text is drawn from `rng`.
    pub fn spec(&mut self, e: &TraceEntry, rng: &mut impl Rng) -> RequestSpec {
        if let Some(p) = &e.prompt {
            return RequestSpec {
                system: None,
                user: p.clone(),
                prompt_tokens: None,
                max_tokens: e.output_tokens,
                at: Some(e.t),
            };
        }
        let total = e.prompt_tokens.unwrap_or(1);
        let (system, unique) = match e.prefix_group {
            Some(g) => {
                let shared = e.prefix_tokens.unwrap_or(total / 2).min(total);
                (Some(self.prefix(g, shared)), total - shared)
            }
            None => (None, total),
        };
        RequestSpec {
            system,
            user: text(rng, unique),
            prompt_tokens: Some(total),
            max_tokens: e.output_tokens,
            at: Some(e.t),
        }
    }

    /// The first `tokens` tokens of group `g`'s text (the same bytes every time).
    fn prefix(&mut self, g: u64, tokens: u32) -> Arc<str> {
        let bytes = tokens as usize * 4;
        let have = self.groups.get(&g).map_or(0, |s| s.len());
        if have < bytes {
            let mut rng =
                SmallRng::seed_from_u64(self.seed ^ g.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            self.groups.insert(g, Arc::from(text(&mut rng, tokens)));
        }
        match self.groups.get(&g) {
            Some(s) if s.len() == bytes => s.clone(),
            Some(s) => Arc::from(&s[..bytes]),
            None => Arc::from(""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policies::tokens::{ByteTokenizer, Tokenizer};

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    #[test]
    fn text_hits_the_token_count_exactly() {
        for n in [0, 1, 8, 1000] {
            let t = text(&mut rng(), n);
            assert_eq!(ByteTokenizer.encode(&t).len(), n as usize);
        }
    }

    #[test]
    fn same_seed_same_sequence() {
        let gen_a = Generator::new(Preset::Chat, &mut rng());
        let gen_b = Generator::new(Preset::Chat, &mut rng());
        let (mut ra, mut rb) = (rng(), rng());
        for _ in 0..20 {
            let (a, b) = (gen_a.next_spec(&mut ra), gen_b.next_spec(&mut rb));
            assert_eq!((a.user, a.max_tokens), (b.user, b.max_tokens));
        }
    }

    #[test]
    fn chat_lengths_follow_azure_medians() {
        let g = Generator::new(Preset::Chat, &mut rng());
        let mut r = rng();
        let mut ins: Vec<u32> = Vec::new();
        let mut outs: Vec<u32> = Vec::new();
        for _ in 0..4000 {
            let s = g.next_spec(&mut r);
            ins.push(s.prompt_tokens.unwrap_or(0));
            outs.push(s.max_tokens);
        }
        ins.sort_unstable();
        outs.sort_unstable();
        let (mi, mo) = (ins[2000], outs[2000]);
        assert!((900..1150).contains(&mi), "input median {mi}");
        assert!((110..150).contains(&mo), "output median {mo}");
    }

    #[test]
    fn shared_prefix_groups_share_system_text() {
        let spec = SharedPrefix {
            groups: 3,
            prompts_per_group: 4,
            system_tokens: 50,
            question_tokens: 10,
            output_tokens: 5,
        };
        let g = Generator::new(Preset::SharedPrefix(spec), &mut rng());
        let mut r = rng();
        let specs: Vec<_> = (0..200).map(|_| g.next_spec(&mut r)).collect();
        let mut systems: Vec<&str> = specs.iter().filter_map(|s| s.system.as_deref()).collect();
        systems.sort_unstable();
        systems.dedup();
        assert_eq!(systems.len(), 3, "exactly G distinct system prompts");
        let mut users: Vec<&str> = specs.iter().map(|s| s.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        assert_eq!(users.len(), 12, "exactly G x P distinct questions");
        assert!(
            specs
                .iter()
                .all(|s| s.max_tokens == 5 && s.prompt_tokens == Some(60))
        );
        let s0 = &specs[0];
        let full = format!("{}{}", s0.system.as_deref().unwrap_or(""), s0.user);
        assert_eq!(ByteTokenizer.encode(&full).len(), 60);
    }

    #[test]
    fn llm_d_preset_numbers() {
        assert_eq!(
            SharedPrefix::LLM_D,
            SharedPrefix {
                groups: 150,
                prompts_per_group: 5,
                system_tokens: 6000,
                question_tokens: 1200,
                output_tokens: 1000
            }
        );
    }

    #[test]
    fn trace_parses_both_shapes_and_sorts() {
        let src = r#"
# comment
{"t": 1.5, "prompt_tokens": 100, "output_tokens": 10, "prefix_group": 3}
{"t": 0.5, "prompt": "hello there", "output_tokens": 2}
"#;
        let t = parse_trace(src).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].prompt.as_deref(), Some("hello there"));
        assert_eq!(t[1].prefix_group, Some(3));
    }

    #[test]
    fn trace_rejects_bad_lines_with_line_numbers() {
        let err = parse_trace("{\"t\":0,\"prompt_tokens\":5,\"output_tokens\":1}\n{\"t\":1}\n")
            .unwrap_err();
        assert_eq!(err.line, 2);
        let err = parse_trace("{\"t\":-1,\"prompt_tokens\":5,\"output_tokens\":1}").unwrap_err();
        assert!(err.reason.contains("t must be"), "{}", err.reason);
        let err = parse_trace("{\"t\":1,\"output_tokens\":1}").unwrap_err();
        assert!(err.reason.contains("prompt_tokens"));
    }

    #[test]
    fn trace_prefix_groups_share_leading_text() {
        let entries = parse_trace(
            "{\"t\":0,\"prompt_tokens\":100,\"output_tokens\":1,\"prefix_group\":1,\"prefix_tokens\":40}\n\
             {\"t\":1,\"prompt_tokens\":300,\"output_tokens\":1,\"prefix_group\":1,\"prefix_tokens\":80}\n\
             {\"t\":2,\"prompt_tokens\":100,\"output_tokens\":1,\"prefix_group\":2}\n",
        )
        .unwrap();
        let mut b = TraceBuilder::new(1);
        let mut r = rng();
        let s: Vec<_> = entries.iter().map(|e| b.spec(e, &mut r)).collect();
        let p0 = s[0].system.as_deref().unwrap();
        let p1 = s[1].system.as_deref().unwrap();
        assert_eq!(p0.len(), 160);
        assert!(
            p1.starts_with(p0),
            "a longer prefix of the same group extends the shorter one"
        );
        assert_ne!(&s[2].system.as_deref().unwrap()[..160], p0, "groups differ");
        assert_eq!(
            s[2].system.as_deref().unwrap().len(),
            200,
            "default prefix is half the prompt"
        );
        assert_eq!(
            ByteTokenizer.encode(&format!("{}{}", p1, s[1].user)).len(),
            300
        );
    }
}
