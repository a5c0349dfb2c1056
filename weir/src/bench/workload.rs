//! Workload presets and trace replay for `weir bench`: what each benchmark request asks for (prompt text, output
//! length, arrival time). Presets are the simulator's seeded generators ([`sim::workload`]), drawn one request at a
//! time, so `weir bench` against a live server and `weir replay` in virtual time run the same workloads; this module
//! only maps bench's preset names onto them and turns each drawn request into text.
//!
//! Prompts are text built to hit a token count under `policies::tokens::ByteTokenizer` (one 4-byte word per token,
//! so `n` tokens = `4n` bytes), derived from a text seed the caller's RNG fixes. Shared prefixes share their leading
//! text byte for byte, so any prefix cache (the simulator's, vLLM's, a router's index) sees the same leading tokens.
//!
//! Presets (lengths and fits documented on [`sim::workload::Workload`]):
//! - `tiny`: 8 tokens in, 1 out (proxy overhead).
//! - `chat`: Azure 2023 conversation (`azure-conv`); `code-completion`: Azure 2023 code (`azure-code`).
//! - `long-context-rag`: Mooncake-like long inputs; `batch`: offline summarisation; `long-prompt-mix`: ISL 8192,
//!   OSL 512 (`long-prompt`).
//! - `shared-prefix`: G groups x P prompts, system S tokens shared per group + question Q tokens unique per prompt,
//!   output O; each request picks a (group, prompt) uniformly. inference-perf defaults 10x10, S 100, Q 50, O 50;
//!   `shared-prefix-llm-d` is llm-d's headline 150x5, S 6000, Q 1200, O 1000.
//! - `multi-turn`: chat sessions whose every turn resends the conversation ([`sim::workload::MultiTurnSpec`]). A
//!   session's turns depend on each other's times, so the whole run is drawn up front ([`Sessions`]) and replayed at
//!   its own arrival times, with the infinite-cache hit rate of its measured window as the bound to read the pods'
//!   hit rate against.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;
use serde::Deserialize;
use sim::workload::{Sampler, TraceRequest, Workload};

/// Shape of a shared-prefix workload (G, P, S, Q, O): the simulator's type.
pub use sim::workload::SharedPrefixSpec as SharedPrefix;

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

impl RequestSpec {
    /// The text of a simulator request: its group's prefix as `system`, the rest as `user`.
    fn from_trace(r: &TraceRequest, text_seed: u64, at: Option<f64>) -> Self {
        Self {
            system: r.prefix_group.map(|_| Arc::from(r.prefix_text(text_seed))),
            user: r.unique_text(text_seed),
            prompt_tokens: Some(r.prompt_len()),
            max_tokens: r.output_tokens,
            at,
        }
    }
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

impl Preset {
    /// The simulator workload this preset draws from.
    pub fn workload(self) -> Workload {
        match self {
            Preset::Tiny => Workload::Tiny,
            Preset::Chat => Workload::AzureConv,
            Preset::SharedPrefix(spec) => Workload::SharedPrefix(spec),
            Preset::LongContextRag => Workload::LongContextRag,
            Preset::CodeCompletion => Workload::AzureCode,
            Preset::Batch => Workload::Batch,
            Preset::LongPromptMix => Workload::LongPrompt,
        }
    }
}

/// Draws request specs for a preset, one at a time, from the simulator's sampler.
#[derive(Debug)]
pub struct Generator {
    /// The preset's lengths and prefix structure.
    sampler: Sampler,
    /// Seed of every prompt's text, drawn at construction so the run's seed fixes it.
    text_seed: u64,
    /// Requests drawn so far; the next one's identity, so all-unique prompts never repeat within a run.
    drawn: AtomicU64,
}

impl Generator {
    /// Build a generator; the text seed is drawn from `rng` here.
    pub fn new(preset: Preset, rng: &mut impl Rng) -> Self {
        Self {
            sampler: preset.workload().sampler(),
            text_seed: rng.random(),
            drawn: AtomicU64::new(0),
        }
    }

    /// The next request; lengths and the shared-prefix question are drawn from `rng`.
    pub fn next_spec(&self, rng: &mut impl Rng) -> RequestSpec {
        let index = self.drawn.fetch_add(1, Ordering::Relaxed);
        let r = self.sampler.draw(index, 0.0, rng);
        RequestSpec::from_trace(&r, self.text_seed, None)
    }
}

/// A multi-turn run drawn up front: request specs with their arrival times, and the bound on reuse.
#[derive(Debug)]
pub struct Sessions {
    /// In arrival order (`at` set).
    pub specs: Vec<RequestSpec>,
    /// Infinite-cache prefix hit rate of the requests arriving after the warm-up ([`sim::workload::cache_bound`]).
    pub bound: f64,
}

impl Sessions {
    /// Multi-turn sessions at about `rate` req/s for `span_s` seconds (warm-up included); the text seed and every
    /// length and time are drawn from `rng`.
    pub fn multi_turn(
        spec: &sim::workload::MultiTurnSpec,
        rate: f64,
        span_s: f64,
        warmup_s: f64,
        rng: &mut impl Rng,
    ) -> Self {
        let text_seed: u64 = rng.random();
        let trace = spec.generate(rate, span_s, rng);
        let bound = sim::workload::cache_bound(&trace, 16, text_seed, warmup_s);
        let specs = trace
            .iter()
            .map(|r| RequestSpec::from_trace(r, text_seed, Some(r.arrival_s)))
            .collect();
        Self { specs, bound }
    }
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
    /// Text seed: group `g`'s prefix text depends only on it and `g`.
    seed: u64,
}

impl TraceBuilder {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The spec for one entry: literal prompts as is; otherwise the group's first `prefix_tokens` tokens of shared
    /// text (default half the prompt) then unique text whose identity is drawn from `rng`.
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
        let shared = match e.prefix_group {
            Some(_) => e.prefix_tokens.unwrap_or(total / 2).min(total),
            None => 0,
        };
        let r = TraceRequest {
            arrival_s: e.t,
            prefix_group: e.prefix_group,
            prefix_tokens: shared,
            unique_tokens: total - shared,
            output_tokens: e.output_tokens,
            unique_seed: rng.random(),
            session: None,
        };
        RequestSpec::from_trace(&r, self.seed, Some(e.t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policies::tokens::{ByteTokenizer, Tokenizer};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    const ALL: [Preset; 8] = [
        Preset::Tiny,
        Preset::Chat,
        Preset::SharedPrefix(SharedPrefix::INFERENCE_PERF),
        Preset::SharedPrefix(SharedPrefix::LLM_D),
        Preset::LongContextRag,
        Preset::CodeCompletion,
        Preset::Batch,
        Preset::LongPromptMix,
    ];

    #[test]
    fn every_preset_hits_its_token_count_exactly() {
        for p in ALL {
            let g = Generator::new(p, &mut rng());
            let mut r = rng();
            for _ in 0..5 {
                let s = g.next_spec(&mut r);
                let full = format!("{}{}", s.system.as_deref().unwrap_or(""), s.user);
                let want = s.prompt_tokens.unwrap_or(0) as usize;
                assert!(want > 0, "{p:?}");
                assert_eq!(ByteTokenizer.encode(&full).len(), want, "{p:?}");
                assert!(s.max_tokens >= 1);
            }
        }
    }

    #[test]
    fn presets_draw_the_simulators_workloads() {
        let names: Vec<&str> = ALL.iter().map(|p| p.workload().name()).collect();
        assert_eq!(
            names,
            [
                "tiny",
                "azure-conv",
                "shared-prefix",
                "llmd-shared-prefix",
                "long-context-rag",
                "azure-code",
                "batch",
                "long-prompt"
            ]
        );
        // Lengths are exactly the sampler's draws from the same RNG stream.
        let g = Generator::new(Preset::CodeCompletion, &mut rng());
        let s = Workload::AzureCode.sampler();
        let (mut a, mut b) = (rng(), rng());
        for i in 0..50 {
            let spec = g.next_spec(&mut a);
            let r = s.draw(i, 0.0, &mut b);
            assert_eq!(
                (spec.prompt_tokens, spec.max_tokens),
                (Some(r.prompt_len()), r.output_tokens)
            );
        }
    }

    #[test]
    fn unique_prompts_do_not_repeat_and_the_seed_sets_the_text() {
        let g = Generator::new(Preset::Tiny, &mut rng());
        let mut r = rng();
        let mut users: Vec<String> = (0..500).map(|_| g.next_spec(&mut r).user).collect();
        users.sort_unstable();
        users.dedup();
        assert_eq!(users.len(), 500);
        let other = Generator::new(Preset::Tiny, &mut SmallRng::seed_from_u64(8));
        assert_ne!(
            other.next_spec(&mut rng()).user,
            Generator::new(Preset::Tiny, &mut rng())
                .next_spec(&mut rng())
                .user
        );
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
    fn multi_turn_turns_resend_the_conversation_as_text() {
        let s = Sessions::multi_turn(
            &sim::workload::MultiTurnSpec::DEFAULT,
            10.0,
            90.0,
            30.0,
            &mut rng(),
        );
        assert!(s.specs.len() > 400, "{}", s.specs.len());
        assert!((0.6..0.95).contains(&s.bound), "{}", s.bound);
        assert!(s.specs.windows(2).all(|w| w[0].at <= w[1].at));
        // Some later spec extends an earlier one's text whole: the next turn of its session. (Not necessarily the
        // first session's: a session may have one turn, or its next turn may fall after the window.)
        let (first, next) = s
            .specs
            .iter()
            .enumerate()
            .find_map(|(i, a)| {
                s.specs[i + 1..]
                    .iter()
                    .find(|b| b.user.len() > a.user.len() && b.user.starts_with(&a.user))
                    .map(|b| (a, b))
            })
            .expect("a later turn of some session");
        assert_eq!(next.system, first.system);
        assert!(next.user.len() > first.user.len() + 4 * 32);
        for x in [first, next] {
            let full = format!("{}{}", x.system.as_deref().unwrap_or(""), x.user);
            assert_eq!(
                ByteTokenizer.encode(&full).len(),
                x.prompt_tokens.unwrap_or(0) as usize
            );
        }
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
