//! One request's life inside the engine: its tokens (prompt + generated), the deterministic output stream, block
//! table, computed-token count and hash chain.
//!
//! Output tokens are a pure function of `(gen_seed, index)` ([`output_token`]) and the natural end (EOS) position a
//! pure function of `gen_seed` ([`natural_output_len`]), so a prefill/decode pair emits exactly what one `both` pod
//! would, and a preempted request recomputes rather than regenerates.

use policies::blocks::{BlockHash, ExtraKey, VllmBlockHasher};

use super::{EngineRequest, KvTransfer};

/// Llama-3's `<|eot_id|>`: the token a natural (EOS) finish ends with.
pub const EOS_TOKEN: u32 = 128_009;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `index`-th generated token of a request with `gen_seed` (an id in `0..generation_vocab()`, so it decodes to
/// a word). The EOS token, when the request ends naturally, replaces the last one.
pub fn output_token(gen_seed: u64, index: u32) -> u32 {
    let h = splitmix64(gen_seed ^ splitmix64(u64::from(index).wrapping_add(0x5157_4C4D)));
    (h % u64::from(policies::tokens::generation_vocab().max(1))) as u32
}

/// The natural output length (EOS position, >= 1) of a request with `gen_seed`: geometric with mean `mean`.
pub fn natural_output_len(gen_seed: u64, mean: f64) -> u32 {
    let mean = mean.max(1.0);
    if mean <= 1.0 {
        return 1;
    }
    // u in (0, 1]
    let u = ((splitmix64(gen_seed ^ 0xE05_u64.rotate_left(40)) >> 11) as f64 + 1.0)
        / (1u64 << 53) as f64;
    let p = 1.0 / mean;
    let k = (u.ln() / (1.0 - p).ln()).ceil();
    if k.is_finite() {
        k.clamp(1.0, f64::from(u32::MAX / 2)) as u32
    } else {
        1
    }
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Waiting,
    /// Decode leg pulling KV from a prefill pod; runnable at `ready_at`.
    Pulling,
    Running,
}

/// Progress of the decode-side KV pull of a RemotePrefill request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pull {
    /// No pull needed (not a decode leg, or already done).
    None,
    NotStarted,
    InFlight,
}

#[derive(Debug)]
pub(crate) struct Req {
    /// The request as submitted.
    pub(crate) req: EngineRequest,
    /// Tokens generated so far (kept across preemption; recomputed, never re-emitted).
    pub(crate) output: Vec<u32>,
    /// Output count at which the EOS token is produced (`None` with `ignore_eos`).
    pub(crate) eos_at: Option<u32>,
    /// Hashes of the full blocks of prompt + output, computed once each, grown lazily.
    pub(crate) hashes: Vec<BlockHash>,
    /// Block table.
    pub(crate) blocks: Vec<u32>,
    /// Tokens whose KV is computed (or hit / pulled).
    pub(crate) num_computed: u32,
    /// Leading blocks of `blocks` already registered in the prefix index.
    pub(crate) num_cached_blocks: u32,
    pub(crate) state: State,
    pub(crate) pull: Pull,
    /// When an in-flight pull completes (model time).
    pub(crate) ready_at: f64,
    /// Tokens the pull brings (external hits).
    pub(crate) pulled_tokens: u32,
    /// Local prefix-hit tokens found when the pull started.
    pub(crate) pull_local_hit: u32,
    /// Waiting-queue key: (priority or 0, sequence).
    pub(crate) queue_key: (i32, i64),
    /// Arrival order, the tie-break of priority scheduling.
    pub(crate) arrival_seq: i64,
    pub(crate) arrival: f64,
    pub(crate) first_scheduled: Option<f64>,
    pub(crate) first_token: Option<f64>,
    /// `usage.cached_tokens`: hits (local + external) at first scheduling.
    pub(crate) cached_tokens: Option<u32>,
    /// Extra hash keys of block 0 (LoRA, then `cache_salt`) and of later blocks (LoRA).
    extra0: Vec<ExtraKey>,
    extra: Vec<ExtraKey>,
}

impl Req {
    pub(crate) fn new(
        req: EngineRequest,
        natural_mean: f64,
        arrival: f64,
        arrival_seq: i64,
    ) -> Self {
        let eos_at = if req.ignore_eos {
            None
        } else {
            Some(
                natural_output_len(req.gen_seed, natural_mean)
                    .max(req.min_tokens)
                    .max(1),
            )
        };
        let lora: Vec<ExtraKey> = req.lora.iter().map(|l| ExtraKey::Str(l.clone())).collect();
        let mut extra0 = lora.clone();
        if let Some(s) = &req.cache_salt {
            extra0.push(ExtraKey::Str(s.clone()));
        }
        let pull = if matches!(req.kv, KvTransfer::RemotePrefill { .. }) {
            Pull::NotStarted
        } else {
            Pull::None
        };
        Req {
            output: Vec::new(),
            eos_at,
            hashes: Vec::with_capacity(req.prompt.len() / 16 + 1),
            blocks: Vec::new(),
            num_computed: 0,
            num_cached_blocks: 0,
            state: State::Waiting,
            pull,
            ready_at: 0.0,
            pulled_tokens: 0,
            pull_local_hit: 0,
            queue_key: (0, arrival_seq),
            arrival_seq,
            arrival,
            first_scheduled: None,
            first_token: None,
            cached_tokens: None,
            extra0,
            extra: lora,
            req,
        }
    }

    /// Prompt + generated tokens.
    pub(crate) fn num_tokens(&self) -> u32 {
        (self.req.prompt.len() + self.output.len()) as u32
    }

    pub(crate) fn prompt_len(&self) -> u32 {
        self.req.prompt.len() as u32
    }

    /// Copy tokens `[start, start+len)` of prompt ++ output into `buf`.
    pub(crate) fn tokens_into(&self, start: usize, len: usize, buf: &mut Vec<u32>) {
        let p = self.req.prompt.len();
        let end = start + len;
        if end <= p {
            buf.extend_from_slice(&self.req.prompt[start..end]);
        } else if start >= p {
            buf.extend_from_slice(&self.output[start - p..end - p]);
        } else {
            buf.extend_from_slice(&self.req.prompt[start..]);
            buf.extend_from_slice(&self.output[..end - p]);
        }
    }

    /// Make sure hashes of the first `n` full blocks exist (bounded by the tokens known); returns how many exist.
    pub(crate) fn ensure_hashes(
        &mut self,
        hasher: &VllmBlockHasher,
        bs: usize,
        n: usize,
        scratch: &mut Vec<u32>,
    ) -> usize {
        let n = n.min(self.num_tokens() as usize / bs);
        while self.hashes.len() < n {
            let i = self.hashes.len();
            scratch.clear();
            self.tokens_into(i * bs, bs, scratch);
            let extra = if i == 0 { &self.extra0 } else { &self.extra };
            let h = hasher.hash_block(self.hashes.last(), scratch, extra);
            self.hashes.push(h);
        }
        self.hashes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_tokens_are_a_pure_function_of_seed_and_index() {
        let a: Vec<u32> = (0..50).map(|i| output_token(7, i)).collect();
        let b: Vec<u32> = (0..50).map(|i| output_token(7, i)).collect();
        let c: Vec<u32> = (0..50).map(|i| output_token(8, i)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&t| t < policies::tokens::generation_vocab()));
    }

    #[test]
    fn natural_length_has_the_requested_mean() {
        let n = 20_000u64;
        let sum: f64 = (0..n)
            .map(|s| f64::from(natural_output_len(s, 200.0)))
            .sum();
        let mean = sum / n as f64;
        assert!((mean - 200.0).abs() < 10.0, "{mean}");
        assert!((0..1000).all(|s| natural_output_len(s, 200.0) >= 1));
        assert_eq!(natural_output_len(3, 1.0), 1);
    }
}
