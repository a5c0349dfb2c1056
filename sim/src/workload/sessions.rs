//! Multi-turn chat sessions (weir issue 27), and the infinite-cache prefix hit rate of any trace.
//!
//! Most traffic to a cache-aware router is multi-turn: every turn resends the whole conversation (the previous
//! prompt, the answer to it, one new message), prompts run to many thousands of tokens, and sessions come back after
//! a think time. [`MultiTurnSpec::generate`] draws such a trace:
//!
//! - new sessions arrive throughout (Poisson at `rate / mean turns`); the trace starts in steady state, with sessions
//!   already under way at time 0 (drawn from before 0; their earlier turns are not in the trace, so a router sees
//!   their next turn cold, as after its own restart);
//! - a session belongs to one of `apps` system prompts, drawn Zipf(`app_skew`), so a few shared prefixes are hot;
//! - session popularity is skewed: turns per session are Zipf(`turns_skew`) over `1..=max_turns` (with the defaults a
//!   fifth of the sessions carry over half the requests);
//! - the first turn carries a long context (a document, pasted code: lognormal, default median 6,000 tokens), every
//!   turn a new user message, every answer is `output_tokens`; the next turn arrives after the answer (timed at
//!   [`ANSWER_S_PER_TOKEN`]) plus a think time (lognormal, default median 10 s); a session ends at its turn count or
//!   before its prompt would pass `max_prompt_tokens`.
//!
//! Tokens: turn k's prompt is the app's system prompt (the shared-prefix group's text) followed by the first
//! `prompt_len - system` tokens of the session's own token stream ([`super::TraceRequest::session`]), so every turn
//! starts with the whole previous turn's prompt, and the answer a client resends is the stream's next tokens. The sim
//! generates its own answer tokens, so a pod never holds the resent answer: the reachable reuse is the previous
//! prompt, which is what [`cache_bound`] counts. With the defaults prompts average ~12-13k tokens (the held-out trace
//! of issue 27 averaged 13.7k) and the bound is ~0.85.

use rand::Rng;
use rand_distr::{Distribution, LogNormal};
use serde::Serialize;

use super::{Arrivals, LengthDist, TraceRequest};

/// Seconds a pod takes per answer token, for timing the next turn after the answer (about one decode step of a
/// busy 8B pod on an H100). The think time is added on top.
pub const ANSWER_S_PER_TOKEN: f64 = 0.02;

/// Shape of a multi-turn session workload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MultiTurnSpec {
    /// Distinct system prompts; each session uses one.
    pub apps: u32,
    /// Zipf exponent of app popularity (0 = uniform).
    pub app_skew: f64,
    /// Tokens of every system prompt.
    pub system_tokens: u32,
    /// The first turn's context (document, code) after the system prompt.
    pub context: LengthDist,
    /// Each turn's new user message.
    pub message: LengthDist,
    /// Each answer (the request's output tokens), resent in the next turn's prompt.
    pub answer: LengthDist,
    /// Most turns a session can have.
    pub max_turns: u32,
    /// Zipf exponent of turns per session over `1..=max_turns`.
    pub turns_skew: f64,
    /// Median think time between an answer and the next turn, seconds.
    pub think_median_s: f64,
    /// Lognormal sigma of the think time.
    pub think_sigma: f64,
    /// A session ends before a turn's prompt would exceed this (prompt plus answer must fit a 32k context).
    pub max_prompt_tokens: u32,
}

impl MultiTurnSpec {
    /// The defaults: 16 apps (Zipf 1.0) with 2,000-token system prompts; first-turn context median 6,000 (sigma 0.6,
    /// 1,000..20,000); messages median 200 (sigma 0.8, 16..2,000); answers median 300 (sigma 0.5, 32..1,000); 1..24
    /// turns, Zipf 1.0 (mean ~6.4); think median 10 s (sigma 0.6); prompts up to 30,000 tokens.
    pub const DEFAULT: MultiTurnSpec = MultiTurnSpec {
        apps: 16,
        app_skew: 1.0,
        system_tokens: 2_000,
        context: LengthDist {
            mu: 8.699_514_748_210_191, // ln 6000
            sigma: 0.6,
            floor: 1_000.0,
            cap: 20_000.0,
        },
        message: LengthDist {
            mu: 5.298_317_366_548_036, // ln 200
            sigma: 0.8,
            floor: 16.0,
            cap: 2_000.0,
        },
        answer: LengthDist {
            mu: 5.703_782_474_656_201, // ln 300
            sigma: 0.5,
            floor: 32.0,
            cap: 1_000.0,
        },
        max_turns: 24,
        turns_skew: 1.0,
        think_median_s: 10.0,
        think_sigma: 0.6,
        max_prompt_tokens: 30_000,
    };

    /// Zipf weights `k^-s` for `k` in `1..=n`, cumulative and normalised.
    fn zipf_cdf(n: u32, s: f64) -> Vec<f64> {
        let w: Vec<f64> = (1..=n.max(1)).map(|k| f64::from(k).powf(-s)).collect();
        let total: f64 = w.iter().sum();
        w.iter()
            .scan(0.0, |acc, x| {
                *acc += x / total;
                Some(*acc)
            })
            .collect()
    }

    fn zipf_draw(cdf: &[f64], rng: &mut impl Rng) -> u32 {
        let u: f64 = rng.random();
        cdf.partition_point(|&c| c < u).min(cdf.len() - 1) as u32
    }

    /// Mean turns per session before the context cap ends any (the Zipf mean).
    pub fn mean_turns(&self) -> f64 {
        let cdf = Self::zipf_cdf(self.max_turns, self.turns_skew);
        let mut prev = 0.0;
        let mut mean = 0.0;
        for (k, c) in cdf.iter().enumerate() {
            mean += (k + 1) as f64 * (c - prev);
            prev = *c;
        }
        mean
    }

    /// Mean seconds between a session's turns.
    fn mean_gap_s(&self) -> f64 {
        self.think_median_s * (self.think_sigma * self.think_sigma / 2.0).exp()
            + self.answer.mean() * ANSWER_S_PER_TOKEN
    }

    /// A trace of `duration_s` seconds at about `rate` requests per second (sessions arrive at `rate / mean turns`;
    /// sessions cut short by the context cap make it slightly lower). Sorted by arrival; `unique_seed` and
    /// `session` are the session's number.
    pub fn generate(&self, rate: f64, duration_s: f64, rng: &mut impl Rng) -> Vec<TraceRequest> {
        let session_rate = rate / self.mean_turns().max(1.0);
        // Sessions started this long before 0 are mostly over by then: the trace starts in steady state.
        let lead = 2.0 * self.mean_turns() * self.mean_gap_s();
        let starts = Arrivals {
            rate: session_rate,
            cv: 1.0,
        }
        .times(lead + duration_s, rng);
        let apps = Self::zipf_cdf(self.apps, self.app_skew);
        let turns = Self::zipf_cdf(self.max_turns, self.turns_skew);
        let think = LogNormal::new(
            self.think_median_s.max(1e-3).ln(),
            self.think_sigma.max(0.0),
        )
        .ok();
        let mut out = Vec::new();
        for (n, start) in starts.into_iter().enumerate() {
            let session = n as u64;
            let app = u64::from(Self::zipf_draw(&apps, rng));
            let n_turns = Self::zipf_draw(&turns, rng) + 1;
            let mut history = self.system_tokens + self.context.sample(rng);
            let mut t = start - lead;
            for _ in 0..n_turns {
                let prompt = history + self.message.sample(rng);
                let answer = self.answer.sample(rng);
                if prompt > self.max_prompt_tokens || t >= duration_s {
                    break;
                }
                if t >= 0.0 {
                    out.push(TraceRequest {
                        arrival_s: t,
                        prefix_group: Some(app),
                        prefix_tokens: self.system_tokens,
                        unique_tokens: prompt - self.system_tokens,
                        output_tokens: answer,
                        unique_seed: session,
                        session: Some(session),
                    });
                }
                history = prompt + answer;
                let think_s = think.map_or(self.think_median_s, |d| d.sample(rng));
                t += f64::from(answer) * ANSWER_S_PER_TOKEN + think_s;
            }
        }
        out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        out
    }
}

/// Prefix-cache hit rate of `trace` on a fleet with an infinite cache and perfect routing: each request (in arrival
/// order) hits its longest run of full `block_size`-token blocks that any earlier request's prompt also started
/// with (at most `prompt_len - 1` tokens, as vLLM recomputes the last prompt token), over its prompt tokens. Only
/// requests arriving at or after `from_s` are counted (a bench's warm-up is excluded), though all of them fill the
/// cache. Prompt tokens as [`TraceRequest::prompt_tokens`] with `trace_seed` (the structure a server's tokenizer sees
/// of the text, up to a chat template's few tokens).
pub fn cache_bound(trace: &[TraceRequest], block_size: u32, trace_seed: u64, from_s: f64) -> f64 {
    let bs = block_size.max(1) as usize;
    let mut seen = std::collections::HashSet::new();
    let (mut hits, mut queries) = (0u64, 0u64);
    for r in trace {
        let tokens = r.prompt_tokens(trace_seed);
        // Chained block hashes (each full block's hash covers every token before it): a cheap mix rather than
        // vLLM's sha256, since only equality matters here and a long multi-turn trace has ~10^9 prompt tokens.
        let hashes: Vec<u64> = tokens
            .chunks_exact(bs)
            .scan(0u64, |h, block| {
                *h = block.iter().fold(*h, |h, &t| super::mix(h, u64::from(t)));
                Some(*h)
            })
            .collect();
        let run = hashes.iter().take_while(|h| seen.contains(*h)).count();
        if r.arrival_s >= from_s {
            let cap = tokens.len().saturating_sub(1);
            hits += (run * bs).min(cap) as u64;
            queries += tokens.len() as u64;
        }
        seen.extend(hashes);
    }
    if queries == 0 {
        0.0
    } else {
        hits as f64 / queries as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn every_turn_extends_the_previous_prompt_and_answer() {
        let t = MultiTurnSpec::DEFAULT.generate(20.0, 120.0, &mut SmallRng::seed_from_u64(1));
        let mut by_session: std::collections::BTreeMap<u64, Vec<&TraceRequest>> =
            Default::default();
        for r in &t {
            by_session.entry(r.session.unwrap()).or_default().push(r);
        }
        let multi = by_session.values().filter(|v| v.len() >= 3).count();
        assert!(multi > 20, "{multi} sessions with 3+ turns");
        for turns in by_session.values() {
            for w in turns.windows(2) {
                let (a, b) = (w[0], w[1]);
                assert!(b.arrival_s > a.arrival_s + 1.0, "think time between turns");
                assert!(b.prompt_len() > a.prompt_len() + a.output_tokens);
                let (ta, tb) = (a.prompt_tokens(5), b.prompt_tokens(5));
                assert_eq!(
                    ta[..],
                    tb[..ta.len()],
                    "the next turn resends the whole previous prompt"
                );
                assert_eq!(a.prefix_text(5), b.prefix_text(5));
                assert!(b.unique_text(5).starts_with(&a.unique_text(5)));
            }
        }
        // Different sessions of one app share the system prompt and nothing after it.
        let (a, b) = {
            let app0: Vec<&TraceRequest> = t.iter().filter(|r| r.prefix_group == Some(0)).collect();
            let b = app0
                .iter()
                .find(|r| r.session != app0[0].session)
                .copied()
                .unwrap();
            (app0[0], b)
        };
        let (ta, tb) = (a.prompt_tokens(5), b.prompt_tokens(5));
        assert_eq!(ta[..2_000], tb[..2_000]);
        assert_ne!(ta[2_000..2_016], tb[2_000..2_016]);
    }

    #[test]
    fn lengths_rate_and_skew_are_as_documented() {
        let s = MultiTurnSpec::DEFAULT;
        let dur = 600.0;
        let t = s.generate(20.0, dur, &mut SmallRng::seed_from_u64(2));
        let rate = t.len() as f64 / dur;
        assert!((16.0..=21.0).contains(&rate), "rate {rate}");
        assert!(t.first().unwrap().arrival_s < 2.0, "steady from the start");
        let mean = t.iter().map(|r| f64::from(r.prompt_len())).sum::<f64>() / t.len() as f64;
        assert!((8_000.0..=16_000.0).contains(&mean), "mean prompt {mean}");
        assert!(t.iter().all(|r| r.prompt_len() <= s.max_prompt_tokens));
        // Skewed apps: the most popular app's sessions outnumber the least popular's several times.
        let count = |g| t.iter().filter(|r| r.prefix_group == Some(g)).count();
        assert!(count(0) > 4 * count(15), "{} vs {}", count(0), count(15));
        assert!((6.0..6.8).contains(&s.mean_turns()), "{}", s.mean_turns());
        // Deterministic for a seed.
        assert_eq!(t, s.generate(20.0, dur, &mut SmallRng::seed_from_u64(2)));
    }

    #[test]
    fn the_bound_counts_earlier_prompts_in_whole_blocks() {
        let r = |t: f64, session: u64, len: u32| TraceRequest {
            arrival_s: t,
            prefix_group: Some(0),
            prefix_tokens: 32,
            unique_tokens: len - 32,
            output_tokens: 1,
            unique_seed: session,
            session: Some(session),
        };
        // First: a miss of 100 tokens. Second (same session, 200 tokens): the first's 6 full blocks (96 tokens).
        // Third (another session): the 2 system blocks (32 tokens).
        let trace = [r(0.0, 1, 100), r(1.0, 1, 200), r(2.0, 2, 100)];
        let b = cache_bound(&trace, 16, 3, 0.0);
        assert!((b - 128.0 / 400.0).abs() < 1e-12, "{b}");
        // Counting from t = 1 still lets the first request fill the cache.
        let b = cache_bound(&trace, 16, 3, 1.0);
        assert!((b - 128.0 / 300.0).abs() < 1e-12, "{b}");
        let t = MultiTurnSpec::DEFAULT.generate(20.0, 300.0, &mut SmallRng::seed_from_u64(4));
        let b = cache_bound(&t, 16, 0, 60.0);
        assert!((0.7..0.95).contains(&b), "bound {b}");
    }
}
