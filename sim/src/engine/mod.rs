//! The simulated vLLM v1 engine: continuous batching, chunked prefill, paged KV cache with automatic prefix
//! caching, preemption by recompute, priority scheduling, P/D KV transfer, and per-step timing from a GPU profile.
//!
//! Pure and deterministic: no tokio, no clock, no I/O. Time is `f64` seconds of *model time* passed in as `now`;
//! the only randomness (step jitter) comes from a `SmallRng` seeded from [`EngineConfig::seed`]. The server drives it
//! in real time, the discrete-event runner ([`crate::des`]) in virtual time.
//!
//! Notes on the contract (deviations and precisions, kept additive):
//! - [`EngineError`] has two extra variants, `EmptyPrompt` and `ZeroMaxTokens`, so bad input never panics.
//! - [`EngineConfig::emit_kv_events`] (default true) lets the virtual-time runner skip building KV event payloads.
//! - A natural (EOS) finish emits the EOS id (`request::EOS_TOKEN`, 128009) as its last `Token`; the server must not
//!   render it as text (vLLM skips special tokens) but it counts in `completion_tokens`.
//! - `reset_prefix_cache` queues `AllBlocksCleared` for the next `step` (call `step(now)` even when idle; it then
//!   returns duration 0 and the event). [`Engine::drain_kv_events`] takes pending KV events without stepping.
//! - When a step schedules nothing (duration 0), `has_work()` turns false until something changes (a request is
//!   added or aborted, a transfer released, a pin expired, a pull completed); wait for that or `next_wakeup()`.
//! - `speedup` divides both step time and KV-transfer time (the simulated pod is uniformly faster).
//! - The prefill side's `remote_request_id` is the decimal [`ReqId`].

pub mod calibrate;
mod kv;
mod request;
mod scheduler;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use crate::profile::Profile;
use kv::KvPool;
use policies::blocks::VllmBlockHasher;
pub use request::{EOS_TOKEN, natural_output_len, output_token};
use request::{Pull, Req, State};

/// An engine-local request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReqId(pub u64);

impl std::fmt::Display for ReqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a pod does in P/D disaggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Prefill,
    Decode,
    #[default]
    Both,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both => "both",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            "both" => Ok(Role::Both),
            _ => Err(format!("unknown role `{s}` (prefill, decode, both)")),
        }
    }
}

/// Order of the waiting queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    /// First come, first served; preemption evicts the newest admitted.
    #[default]
    Fcfs,
    /// Lower `priority` first, then arrival; preemption evicts the lowest priority (highest value), latest arrival.
    Priority,
}

impl std::str::FromStr for SchedulingPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "fcfs" => Ok(SchedulingPolicy::Fcfs),
            "priority" => Ok(SchedulingPolicy::Priority),
            _ => Err(format!("unknown scheduling policy `{s}` (fcfs, priority)")),
        }
    }
}

/// Decode-side KV pull time: `base_s + per_token_s * pulled_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TransferModel {
    /// Fixed cost of a pull (handshake, descriptor exchange), seconds.
    pub base_s: f64,
    /// Cost per pulled token, seconds.
    pub per_token_s: f64,
}

impl Default for TransferModel {
    fn default() -> Self {
        TransferModel {
            base_s: 0.026,
            per_token_s: 4.25e-6,
        }
    }
}

impl TransferModel {
    pub fn time(&self, tokens: u32) -> f64 {
        self.base_s + self.per_token_s * f64::from(tokens)
    }
}

/// Everything that shapes one engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Resolved GPU x model: timing, block count, scheduler limits.
    pub profile: Profile,
    /// vLLM automatic prefix caching (default on).
    pub enable_prefix_caching: bool,
    /// Waiting-queue order.
    pub scheduling: SchedulingPolicy,
    /// Seed of the step-jitter RNG.
    pub seed: u64,
    /// PYTHONHASHSEED for `sha256_cbor` NONE_HASH ("0").
    pub hash_seed: String,
    /// Lognormal sigma of per-step jitter (0.05 = about ±5%); 0 disables.
    pub jitter: f64,
    /// Divides step (and transfer) time; 1.0 = real GPU speed.
    pub speedup: f64,
    /// P/D role (informational for the engine; the request's `kv` decides behaviour).
    pub role: Role,
    /// NIXL engine id reported in `kv_transfer_params`.
    pub engine_id: String,
    /// Decode-side pull time model.
    pub transfer: TransferModel,
    /// Prefill side frees unread pinned blocks after this many seconds.
    pub pinned_timeout_s: f64,
    /// Mean of the deterministic natural (EOS) output length.
    pub natural_output_mean: f64,
    /// Build KV events (BlockStored/BlockRemoved payloads). The virtual-time runner turns it off to save work.
    pub emit_kv_events: bool,
}

impl EngineConfig {
    /// The documented defaults on `profile`.
    pub fn new(profile: Profile) -> Self {
        EngineConfig {
            profile,
            enable_prefix_caching: true,
            scheduling: SchedulingPolicy::Fcfs,
            seed: 0,
            hash_seed: "0".to_string(),
            jitter: 0.05,
            speedup: 1.0,
            role: Role::Both,
            engine_id: "sim-engine-0".to_string(),
            transfer: TransferModel::default(),
            pinned_timeout_s: 480.0,
            natural_output_mean: 200.0,
            emit_kv_events: true,
        }
    }
}

/// P/D role of a single request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KvTransfer {
    #[default]
    None,
    /// Prefill leg (`do_remote_decode: true`): on finish keep the prompt's blocks pinned for a remote reader.
    RemoteDecode,
    /// Decode leg (`do_remote_prefill: true`): pull `remote_block_ids` from the prefill engine instead of computing.
    RemotePrefill {
        remote_engine_id: String,
        remote_block_ids: Vec<u32>,
        remote_host: String,
        remote_port: u16,
        remote_request_id: Option<String>,
    },
}

/// A request as the engine sees it (already tokenized and validated by the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineRequest {
    pub id: ReqId,
    /// Token ids (already chat-templated).
    pub prompt: Vec<u32>,
    /// >= 1; prompt + max_tokens <= max_model_len.
    pub max_tokens: u32,
    pub min_tokens: u32,
    pub ignore_eos: bool,
    pub priority: i32,
    pub cache_salt: Option<String>,
    pub lora: Option<String>,
    /// Output tokens are a pure function of (gen_seed, index).
    pub gen_seed: u64,
    pub stop_token_ids: Vec<u32>,
    pub kv: KvTransfer,
}

impl EngineRequest {
    /// A plain request with defaults (min_tokens 0, no EOS override, priority 0, no salt/LoRA/stop ids, no P/D).
    pub fn new(id: ReqId, prompt: Vec<u32>, max_tokens: u32, gen_seed: u64) -> Self {
        EngineRequest {
            id,
            prompt,
            max_tokens,
            min_tokens: 0,
            ignore_eos: false,
            priority: 0,
            cache_salt: None,
            lora: None,
            gen_seed,
            stop_token_ids: Vec::new(),
            kv: KvTransfer::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Local prefix hits + external (pulled) tokens.
    pub cached_tokens: u32,
}

/// Lifecycle timestamps in model time (NaN where it never happened, e.g. first_token of an abort while queued).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RequestTimes {
    pub arrival: f64,
    pub first_scheduled: f64,
    pub first_token: f64,
    pub finished: f64,
}

/// Prefill-side result of a RemoteDecode request (the server adds host/port/tp_size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub remote_engine_id: String,
    pub remote_block_ids: Vec<u32>,
    pub remote_request_id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token, visible at the end of the step that produced it.
    Token { id: ReqId, token: u32, index: u32 },
    /// Request finished (last Token for it precedes this in the same step). `stop_token` = the EOS/stop id hit.
    Finished {
        id: ReqId,
        reason: FinishReason,
        stop_token: Option<u32>,
        usage: Usage,
        times: RequestTimes,
        handoff: Option<Handoff>,
    },
    /// Decode side finished pulling blocks from a prefill engine: the server tells that pod to unpin them.
    TransferDone {
        remote_engine_id: String,
        remote_host: String,
        remote_port: u16,
        remote_block_ids: Vec<u32>,
        remote_request_id: Option<String>,
    },
}

/// vLLM KV events (one batch per step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// `block_hashes` = low64 of the sha256_cbor chain; `token_ids` = all blocks' tokens concatenated.
    BlockStored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        lora_name: Option<String>,
    },
    BlockRemoved {
        block_hashes: Vec<u64>,
    },
    AllBlocksCleared,
}

/// Facts of one step, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepStats {
    pub num_scheduled_tokens: u32,
    pub num_prefill_tokens: u32,
    pub num_decode_seqs: u32,
    /// Prompt tokens (the whole prompt, cached part included) of requests that produced their first token in this
    /// step: vLLM v1's `vllm:prompt_tokens_total` increment (`IterationStats.update_from_output`).
    pub num_prompt_tokens: u32,
    /// Tokens produced in this step, first tokens included: vLLM v1's `vllm:generation_tokens_total` increment.
    pub num_generation_tokens: u32,
    /// Prompt tokens looked up / hit, per newly scheduled request (vLLM semantics).
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    /// Decode-side pulled tokens.
    pub external_queries: u64,
    pub external_hits: u64,
    pub preemptions: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepOutput {
    pub start: f64,
    pub duration: f64,
    pub events: Vec<Event>,
    pub kv_events: Vec<KvEvent>,
    pub stats: StepStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Gauges {
    pub running: u32,
    /// Waiting (preempted and pulling included).
    pub waiting: u32,
    /// `1 - free/(num_gpu_blocks-1)`.
    pub kv_usage: f64,
    pub num_gpu_blocks: u32,
    pub free_blocks: u32,
    pub pinned_blocks: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
        u64::from(*prompt_tokens) + u64::from(*max_tokens)
    )]
    PromptTooLong {
        prompt_tokens: u32,
        max_tokens: u32,
        max_model_len: u32,
    },
    #[error("request needs {needed} KV blocks but the cache has only {available}")]
    TooManyBlocks { needed: u32, available: u32 },
    #[error("request id {0} is already in use")]
    DuplicateId(ReqId),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1, got 0")]
    ZeroMaxTokens,
}

/// A prefill-side pin: blocks kept for a remote decode reader.
#[derive(Debug, Clone)]
struct Pin {
    blocks: Vec<u32>,
    expires: f64,
}

/// One simulated vLLM engine core.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    pool: KvPool,
    hasher: VllmBlockHasher,
    rng: SmallRng,
    /// Request slab; `index` maps ids to slots.
    reqs: Vec<Option<Req>>,
    free_slots: Vec<u32>,
    index: HashMap<ReqId, u32>,
    /// Running slots in admission order.
    running: Vec<u32>,
    /// Waiting slots by (priority or 0, sequence); preempted FCFS requests get negative sequences (front).
    waiting: BTreeMap<(i32, i64), u32>,
    /// Decode legs pulling KV.
    pulling: Vec<u32>,
    /// Prefill-side pins by remote_request_id.
    pins: BTreeMap<String, Pin>,
    pinned_blocks: u32,
    /// KV events produced outside a step (reset), delivered by the next step.
    pending_kv: Vec<KvEvent>,
    next_arrival_seq: i64,
    next_front_seq: i64,
    /// Nothing could be scheduled last step and nothing changed since.
    stalled: bool,
    /// Reused buffers (no per-step allocation proportional to the cache).
    scratch_tokens: Vec<u32>,
    scratch_blocks: Vec<u32>,
    scratch_evicted: Vec<u64>,
    scratch_sched: Vec<(u32, u32)>,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        let pool = KvPool::new(cfg.profile.num_gpu_blocks);
        let hasher = VllmBlockHasher::with_seed(&cfg.hash_seed);
        let rng = SmallRng::seed_from_u64(cfg.seed);
        Engine {
            pool,
            hasher,
            rng,
            reqs: Vec::new(),
            free_slots: Vec::new(),
            index: HashMap::new(),
            running: Vec::new(),
            waiting: BTreeMap::new(),
            pulling: Vec::new(),
            pins: BTreeMap::new(),
            pinned_blocks: 0,
            pending_kv: Vec::new(),
            next_arrival_seq: 1,
            next_front_seq: -1,
            stalled: false,
            scratch_tokens: Vec::with_capacity(64),
            scratch_blocks: Vec::new(),
            scratch_evicted: Vec::new(),
            scratch_sched: Vec::new(),
            cfg,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    fn block_size(&self) -> u32 {
        self.cfg.profile.block_size.max(1)
    }

    pub fn add_request(&mut self, req: EngineRequest, now: f64) -> Result<(), EngineError> {
        if self.index.contains_key(&req.id) {
            return Err(EngineError::DuplicateId(req.id));
        }
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if req.max_tokens == 0 {
            return Err(EngineError::ZeroMaxTokens);
        }
        let prompt_tokens = u32::try_from(req.prompt.len()).unwrap_or(u32::MAX);
        let max_model_len = self.cfg.profile.max_model_len;
        if u64::from(prompt_tokens) + u64::from(req.max_tokens) > u64::from(max_model_len) {
            return Err(EngineError::PromptTooLong {
                prompt_tokens,
                max_tokens: req.max_tokens,
                max_model_len,
            });
        }
        let needed = (prompt_tokens + req.max_tokens).div_ceil(self.block_size());
        if needed > self.pool.usable() {
            return Err(EngineError::TooManyBlocks {
                needed,
                available: self.pool.usable(),
            });
        }
        let seq = self.next_arrival_seq;
        self.next_arrival_seq += 1;
        let id = req.id;
        let mut r = Req::new(req, self.cfg.natural_output_mean, now, seq);
        r.queue_key = self.arrival_key(&r);
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.reqs.push(None);
                (self.reqs.len() - 1) as u32
            }
        };
        self.waiting.insert(r.queue_key, slot);
        self.reqs[slot as usize] = Some(r);
        self.index.insert(id, slot);
        self.stalled = false;
        Ok(())
    }

    fn arrival_key(&self, r: &Req) -> (i32, i64) {
        match self.cfg.scheduling {
            SchedulingPolicy::Fcfs => (0, r.arrival_seq),
            SchedulingPolicy::Priority => (r.req.priority, r.arrival_seq),
        }
    }

    /// Abort (client gone): frees its blocks, returns `Finished{Abort}` if it was live.
    pub fn abort(&mut self, id: ReqId, now: f64) -> Option<Event> {
        let slot = self.index.remove(&id)?;
        let mut r = self.reqs[slot as usize].take()?;
        self.free_slots.push(slot);
        match r.state {
            State::Waiting => {
                self.waiting.remove(&r.queue_key);
            }
            State::Running => self.running.retain(|&s| s != slot),
            State::Pulling => self.pulling.retain(|&s| s != slot),
        }
        for &b in r.blocks.iter().rev() {
            self.pool.release(b);
        }
        r.blocks.clear();
        self.stalled = false;
        Some(Event::Finished {
            id,
            reason: FinishReason::Abort,
            stop_token: None,
            usage: Usage {
                prompt_tokens: r.prompt_len(),
                completion_tokens: r.output.len() as u32,
                cached_tokens: r.cached_tokens.unwrap_or(0),
            },
            times: RequestTimes {
                arrival: r.arrival,
                first_scheduled: r.first_scheduled.unwrap_or(f64::NAN),
                first_token: r.first_token.unwrap_or(f64::NAN),
                finished: now,
            },
            handoff: None,
        })
    }

    /// Something is runnable now (running or waiting requests whose KV is ready).
    pub fn has_work(&self) -> bool {
        !self.running.is_empty()
            || (!self.waiting.is_empty() && !self.stalled)
            || !self.pending_kv.is_empty()
    }

    /// Earliest future time something becomes runnable (KV pulls completing; pinned-block expiry).
    pub fn next_wakeup(&self) -> Option<f64> {
        let pulls = self
            .pulling
            .iter()
            .filter_map(|&s| self.reqs[s as usize].as_ref().map(|r| r.ready_at));
        let pins = self.pins.values().map(|p| p.expires);
        pulls.chain(pins).min_by(f64::total_cmp)
    }

    pub fn gauges(&self) -> Gauges {
        let usable = self.pool.usable();
        let free = self.pool.free_count();
        Gauges {
            running: self.running.len() as u32,
            waiting: (self.waiting.len() + self.pulling.len()) as u32,
            kv_usage: if usable == 0 {
                0.0
            } else {
                1.0 - f64::from(free) / f64::from(usable)
            },
            num_gpu_blocks: self.cfg.profile.num_gpu_blocks,
            free_blocks: free,
            pinned_blocks: self.pinned_blocks,
        }
    }

    /// `/reset_prefix_cache`: drop all cached blocks' hashes; `AllBlocksCleared` comes with the next step output.
    /// Returns false (and changes nothing) while any block is in use, as vLLM does.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if !self.pool.reset() {
            return false;
        }
        if self.cfg.emit_kv_events && self.cfg.enable_prefix_caching {
            self.pending_kv.push(KvEvent::AllBlocksCleared);
        }
        self.stalled = false;
        true
    }

    /// KV events produced outside a step (e.g. by `reset_prefix_cache`), without stepping.
    pub fn drain_kv_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.pending_kv)
    }

    /// Prefill side: the decode pod has read these blocks; unpin them.
    pub fn release_transfer(&mut self, remote_request_id: &str) -> bool {
        match self.pins.remove(remote_request_id) {
            Some(pin) => {
                self.unpin(pin);
                true
            }
            None => false,
        }
    }

    fn unpin(&mut self, pin: Pin) {
        for &b in pin.blocks.iter().rev() {
            self.pool.release(b);
        }
        self.pinned_blocks -= pin.blocks.len() as u32;
        self.stalled = false;
    }

    fn expire_pins(&mut self, now: f64) {
        if self.pins.values().all(|p| p.expires > now) {
            return;
        }
        let expired: Vec<String> = self
            .pins
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(pin) = self.pins.remove(&k) {
                self.unpin(pin);
            }
        }
    }

    /// Test/inspection: low64 hashes of every block that currently has a hash and is findable by prefix lookup.
    pub fn cached_block_hashes(&self) -> BTreeSet<u64> {
        self.pool.cached_hashes()
    }

    /// Prefix-cache hit length (tokens) `prompt` would get right now (no side effects).
    pub fn peek_prefix_hit(
        &self,
        prompt: &[u32],
        cache_salt: Option<&str>,
        lora: Option<&str>,
    ) -> u32 {
        if !self.cfg.enable_prefix_caching || prompt.is_empty() {
            return 0;
        }
        let bs = self.block_size() as usize;
        let max_blocks = (prompt.len() - 1) / bs;
        let lora_key: Vec<policies::blocks::ExtraKey> = lora
            .iter()
            .map(|l| policies::blocks::ExtraKey::Str((*l).to_string()))
            .collect();
        let mut extra0 = lora_key.clone();
        if let Some(s) = cache_salt {
            extra0.push(policies::blocks::ExtraKey::Str(s.to_string()));
        }
        let mut parent: Option<policies::blocks::BlockHash> = None;
        let mut hit = 0;
        for i in 0..max_blocks {
            let extra = if i == 0 { &extra0 } else { &lora_key };
            let h = self
                .hasher
                .hash_block(parent.as_ref(), &prompt[i * bs..(i + 1) * bs], extra);
            if self.pool.lookup(&h).is_none() {
                break;
            }
            hit += bs as u32;
            parent = Some(h);
        }
        hit
    }

    /// Number of live (unfinished) requests.
    pub fn num_requests(&self) -> usize {
        self.index.len()
    }

    fn req(&self, slot: u32) -> &Req {
        self.reqs[slot as usize]
            .as_ref()
            .unwrap_or_else(|| unreachable!("slot {slot} is live"))
    }

    fn req_mut(&mut self, slot: u32) -> &mut Req {
        self.reqs[slot as usize]
            .as_mut()
            .unwrap_or_else(|| unreachable!("slot {slot} is live"))
    }
}

#[cfg(test)]
impl Engine {
    /// Every KV invariant: ref counts equal what requests and pins hold, free + used = total, no block twice.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let mut held: HashMap<u32, u32> = HashMap::new();
        for r in self.reqs.iter().flatten() {
            for &b in &r.blocks {
                *held.entry(b).or_default() += 1;
            }
            if r.state == State::Waiting && r.num_computed == 0 && !r.blocks.is_empty() {
                return Err(format!("waiting request {} holds blocks", r.req.id));
            }
        }
        for p in self.pins.values() {
            for &b in &p.blocks {
                *held.entry(b).or_default() += 1;
            }
        }
        let pinned: u32 = self.pins.values().map(|p| p.blocks.len() as u32).sum();
        if pinned != self.pinned_blocks {
            return Err(format!("pinned {pinned} vs gauge {}", self.pinned_blocks));
        }
        self.pool.check(&held)
    }
}
