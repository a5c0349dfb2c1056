//! GPU x model profiles: the data (`profiles/profiles.toml`) and the arithmetic that turns it into vLLM's scheduler
//! limits, KV-block count, start-up delay and per-step time (vllm-server-contract.md §5, §7).
//!
//! Everything here is data-driven: a new GPU or model is a TOML entry, never a code branch. [`FleetSpec`] is the one
//! parser of fleet strings such as `4xh100:llama-3.1-8b,2xl4:llama-3.1-8b` shared by `weir sim --fleet` and
//! `weir replay --fleet`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// The profile data, compiled in so the binary needs no files at run time.
const PROFILES_TOML: &str = include_str!("../profiles/profiles.toml");

/// vLLM's default `gpu_memory_utilization`.
pub const GPU_MEMORY_UTILIZATION: f64 = 0.90;
/// vLLM's default (and the simulator's fixed) KV block size in tokens.
pub const BLOCK_SIZE: u32 = 16;
/// `max_model_len` when memory allows it (Llama-3.1's context length).
pub const DEFAULT_MAX_MODEL_LEN: u32 = 131_072;

/// Why a profile or fleet string could not be resolved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown GPU `{0}` (known: {1})")]
    UnknownGpu(String, String),
    #[error("unknown model `{0}` (known: {1})")]
    UnknownModel(String, String),
    #[error("{model} does not fit on {tp} x {gpu} (no memory left for KV blocks)")]
    DoesNotFit { gpu: String, model: String, tp: u32 },
    #[error("invalid tensor-parallel size {0} (1..=16)")]
    InvalidTp(u32),
    #[error("invalid fleet spec `{spec}`: {reason}")]
    InvalidFleet { spec: String, reason: String },
    #[error("profile data is invalid: {0}")]
    Data(String),
}

/// One GPU type's timing constants and scheduler defaults (a `[[gpu]]` entry).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Canonical lookup key (`h100`).
    pub key: String,
    /// Display name (`H100-80GB`).
    pub name: String,
    /// Other accepted spellings.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Provenance of the numbers ("est." marks estimates).
    #[serde(default)]
    pub note: String,
    /// Device memory as the driver reports it, GiB.
    pub mem_gib: f64,
    /// Effective dense bf16 throughput for the linear layers, FLOP/s.
    pub f_lin: f64,
    /// Effective bandwidth streaming weights, bytes/s.
    pub bw_w: f64,
    /// Effective bandwidth reading the KV cache during decode, bytes/s.
    pub bw_kv: f64,
    /// Effective attention throughput during prefill, FLOP/s.
    pub f_attn: f64,
    /// Per-step fixed cost (scheduling, launch, sampling), seconds.
    pub t_fixed: f64,
    /// Per all-reduce latency, seconds (TP > 1 only).
    pub a_ar: f64,
    /// All-reduce bus bandwidth, bytes/s (TP > 1 only).
    pub b_ar: f64,
    /// Memory vLLM cannot give to the KV cache regardless of batch size (CUDA context, NCCL, graph pool), GB.
    pub base_overhead_gb: f64,
    /// vLLM's default token budget per step on this GPU.
    pub max_num_batched_tokens: u32,
    /// vLLM's default cap on running sequences on this GPU.
    pub max_num_seqs: u32,
    /// On-demand price of one GPU, USD per hour (what a pod of TP `n` costs is `n` times this).
    pub price_per_gpu_hour: f64,
    /// Where `price_per_gpu_hour` comes from (provider, region, instance), so a report can name it.
    pub price_source: String,
    /// Board power limit, watts: energy estimates multiply it by GPU-hours.
    pub power_w: f64,
    /// GPUs of this type a planner may assume it can obtain on demand (a quota; est.).
    pub available_gpus: u32,
}

/// One model's shape (a `[[model]]` entry).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Canonical lookup key (`llama-3.1-8b`).
    pub key: String,
    /// Hugging Face name, what `/v1/models` reports as `root`.
    pub name: String,
    /// bf16 weights, GB (whole model, before TP).
    pub weights_gb: f64,
    /// Non-embedding parameters (whole model).
    pub params: f64,
    /// Transformer layers.
    pub layers: u32,
    /// Hidden size.
    pub d_model: u32,
    /// Query heads.
    pub heads_q: u32,
    /// KV heads (GQA).
    pub heads_kv: u32,
    /// Head dimension.
    pub head_dim: u32,
    /// Peak activation memory per batched token per GPU, bytes (vLLM's profiling run).
    pub act_bytes_per_token: f64,
    /// Model-server start-up before `/health` answers 200, seconds (real time; the server scales it).
    pub startup_s: f64,
    /// Default tensor-parallel size per GPU key.
    pub tp: BTreeMap<String, u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileData {
    gpu: Vec<GpuSpec>,
    model: Vec<ModelSpec>,
}

fn data() -> Result<&'static ProfileData, ProfileError> {
    static DATA: OnceLock<Result<ProfileData, String>> = OnceLock::new();
    DATA.get_or_init(|| toml::from_str(PROFILES_TOML).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| ProfileError::Data(e.clone()))
}

/// Every GPU key and every model key in the data, for listings and the calibration table.
pub fn known() -> Result<(Vec<&'static GpuSpec>, Vec<&'static ModelSpec>), ProfileError> {
    let d = data()?;
    Ok((d.gpu.iter().collect(), d.model.iter().collect()))
}

/// The aggregate shape of one engine step, accumulated without allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchShape {
    /// `N`: tokens computed this step (prefill chunk tokens + one per decode).
    pub num_tokens: u64,
    /// `sum_j q_j * (c_j + q_j / 2)` over prefill chunks: the attention work of prefill.
    pub prefill_attn: f64,
    /// `sum_i ctx_i` over decoding sequences: KV bytes read scale with it.
    pub decode_ctx: u64,
}

impl BatchShape {
    /// A prefill chunk of `q` new tokens on top of `c` already computed (or cached) tokens.
    pub fn add_prefill(&mut self, q: u32, c: u32) {
        self.num_tokens += u64::from(q);
        self.prefill_attn += f64::from(q) * (f64::from(c) + f64::from(q) / 2.0);
    }

    /// One decoding sequence whose context (tokens attended, the new one included) is `ctx`.
    pub fn add_decode(&mut self, ctx: u32) {
        self.num_tokens += 1;
        self.decode_ctx += u64::from(ctx);
    }

    pub fn is_empty(&self) -> bool {
        self.num_tokens == 0
    }
}

/// A resolved GPU x model x TP: everything the engine needs to behave and time like that vLLM pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// GPU key (`h100`).
    pub gpu: String,
    /// Model key (`llama-3.1-8b`).
    pub model: String,
    /// Tensor-parallel size (GPUs per pod).
    pub tp: u32,
    /// KV blocks per GPU, block 0 (the null block) included, as vLLM logs `num_gpu_blocks`.
    pub num_gpu_blocks: u32,
    /// Tokens per KV block (16).
    pub block_size: u32,
    /// Cap on running sequences.
    pub max_num_seqs: u32,
    /// Token budget per step.
    pub max_num_batched_tokens: u32,
    /// Longest prompt + output accepted (131072 capped to what the KV cache holds).
    pub max_model_len: u32,
    /// Start-up delay before `/health` is 200, seconds (real time, before `--time-scale`).
    pub startup_s: f64,
    /// The GPU constants used by [`Profile::step_time`].
    pub gpu_spec: GpuSpec,
    /// The model shape used by [`Profile::step_time`].
    pub model_spec: ModelSpec,
}

fn find_gpu(d: &'static ProfileData, name: &str) -> Result<&'static GpuSpec, ProfileError> {
    let n = name.trim().to_ascii_lowercase();
    d.gpu
        .iter()
        .find(|g| g.key == n || g.name.to_ascii_lowercase() == n || g.aliases.contains(&n))
        .ok_or_else(|| {
            ProfileError::UnknownGpu(
                name.to_string(),
                d.gpu
                    .iter()
                    .map(|g| g.key.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
}

fn find_model(d: &'static ProfileData, name: &str) -> Result<&'static ModelSpec, ProfileError> {
    let n = name.trim().to_ascii_lowercase();
    d.model
        .iter()
        .find(|m| {
            m.key == n
                || m.name.to_ascii_lowercase() == n
                || m.name.to_ascii_lowercase().ends_with(&format!("/{n}"))
        })
        .ok_or_else(|| {
            let known = d
                .model
                .iter()
                .map(|m| m.key.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            ProfileError::UnknownModel(name.to_string(), known)
        })
}

impl Profile {
    /// Resolve a GPU name (`h100`, `a100-80gb`/`a100`, `a100-40gb`, `l4`) and model (`llama-3.1-8b`,
    /// `llama-3.1-70b`) with the data table's default TP.
    pub fn resolve(gpu: &str, model: &str) -> Result<Profile, ProfileError> {
        let d = data()?;
        let g = find_gpu(d, gpu)?;
        let m = find_model(d, model)?;
        let tp = m.tp.get(&g.key).copied().unwrap_or(1);
        Self::build(g, m, tp)
    }

    /// The same GPU and model at another tensor-parallel size (KV blocks and timing recomputed).
    pub fn with_tp(&self, tp: u32) -> Result<Profile, ProfileError> {
        Self::build(&self.gpu_spec, &self.model_spec, tp)
    }

    fn build(g: &GpuSpec, m: &ModelSpec, tp: u32) -> Result<Profile, ProfileError> {
        if !(1..=16).contains(&tp) {
            return Err(ProfileError::InvalidTp(tp));
        }
        let tpf = f64::from(tp);
        let mem = g.mem_gib * f64::from(1u32 << 30) * GPU_MEMORY_UTILIZATION;
        let overhead =
            g.base_overhead_gb * 1e9 + m.act_bytes_per_token * f64::from(g.max_num_batched_tokens);
        let kv_mem = mem - m.weights_gb * 1e9 / tpf - overhead;
        let block_bytes = f64::from(BLOCK_SIZE) * kv_bytes_per_token(m) / tpf;
        let blocks = (kv_mem / block_bytes).floor();
        if blocks < 2.0 {
            return Err(ProfileError::DoesNotFit {
                gpu: g.key.clone(),
                model: m.key.clone(),
                tp,
            });
        }
        let num_gpu_blocks = blocks.min(f64::from(u32::MAX / 2)) as u32;
        let fits = (num_gpu_blocks - 1).saturating_mul(BLOCK_SIZE);
        let max_model_len = if fits >= DEFAULT_MAX_MODEL_LEN {
            DEFAULT_MAX_MODEL_LEN
        } else {
            (fits / 1024 * 1024).max(fits.min(1024))
        };
        Ok(Profile {
            gpu: g.key.clone(),
            model: m.key.clone(),
            tp,
            num_gpu_blocks,
            block_size: BLOCK_SIZE,
            max_num_seqs: g.max_num_seqs,
            max_num_batched_tokens: g.max_num_batched_tokens,
            max_model_len,
            startup_s: m.startup_s,
            gpu_spec: g.clone(),
            model_spec: m.clone(),
        })
    }

    /// Human label `h100:llama-3.1-8b` (with `@tpN` when not the default... always shown when TP > 1).
    pub fn label(&self) -> String {
        if self.tp > 1 {
            format!("{}:{}:tp{}", self.gpu, self.model, self.tp)
        } else {
            format!("{}:{}", self.gpu, self.model)
        }
    }

    /// On-demand USD per hour of one pod (its TP GPUs), from the GPU's `price_per_gpu_hour`.
    pub fn price_per_hour(&self) -> f64 {
        f64::from(self.tp) * self.gpu_spec.price_per_gpu_hour
    }

    /// Board power of one pod (its TP GPUs), watts.
    pub fn power_w(&self) -> f64 {
        f64::from(self.tp) * self.gpu_spec.power_w
    }

    /// The model's Hugging Face name.
    pub fn model_name(&self) -> &str {
        &self.model_spec.name
    }

    /// KV bytes per token per GPU (`2*L*H_kv*d_h*2 / TP`).
    pub fn kv_bytes_per_token(&self) -> f64 {
        kv_bytes_per_token(&self.model_spec) / f64::from(self.tp)
    }

    /// Usable KV blocks (block 0 is the null block).
    pub fn usable_blocks(&self) -> u32 {
        self.num_gpu_blocks.saturating_sub(1)
    }

    /// Duration of one engine step of this shape, seconds, without jitter (contract §7).
    pub fn step_time(&self, b: &BatchShape) -> f64 {
        if b.is_empty() {
            return 0.0;
        }
        let g = &self.gpu_spec;
        let m = &self.model_spec;
        let tp = f64::from(self.tp);
        let n = b.num_tokens as f64;
        let w = m.weights_gb * 1e9 / tp / g.bw_w;
        let lin = 2.0 * m.params / tp * n / g.f_lin;
        let attn = 4.0 * f64::from(m.layers) * f64::from(m.heads_q) / tp
            * f64::from(m.head_dim)
            * b.prefill_attn
            / g.f_attn;
        let kv = kv_bytes_per_token(m) / tp * b.decode_ctx as f64 / g.bw_kv;
        let ar = if self.tp > 1 {
            2.0 * f64::from(m.layers) * (g.a_ar + n * f64::from(m.d_model) * 2.0 / g.b_ar)
        } else {
            0.0
        };
        g.t_fixed + (w * w + lin * lin).sqrt() + attn + kv + ar
    }
}

fn kv_bytes_per_token(m: &ModelSpec) -> f64 {
    2.0 * f64::from(m.layers) * f64::from(m.heads_kv) * f64::from(m.head_dim) * 2.0
}

/// `count` identical pods of one profile.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetGroup {
    /// How many pods.
    pub count: u32,
    /// What each pod is.
    pub profile: Profile,
}

/// A fleet: `4xh100:llama-3.1-8b,2xl4:llama-3.1-8b`; each item `[<count>x]<gpu>:<model>[:tp<N>]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    /// Groups in the order written.
    pub groups: Vec<FleetGroup>,
}

impl FleetSpec {
    /// Parse a fleet string (count defaults to 1; TP defaults to the data table's).
    pub fn parse(spec: &str) -> Result<FleetSpec, ProfileError> {
        let bad = |reason: String| ProfileError::InvalidFleet {
            spec: spec.to_string(),
            reason,
        };
        let mut groups = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let mut parts = item.split(':');
            let head = parts.next().unwrap_or_default();
            let model = parts
                .next()
                .ok_or_else(|| bad(format!("`{item}` lacks `:<model>`")))?;
            let tp = match parts.next() {
                None => None,
                Some(t) => {
                    let n = t
                        .strip_prefix("tp")
                        .ok_or_else(|| bad(format!("`{t}` is not `tp<N>`")))?;
                    Some(
                        n.parse::<u32>()
                            .map_err(|_| bad(format!("`{t}` is not `tp<N>`")))?,
                    )
                }
            };
            if parts.next().is_some() {
                return Err(bad(format!("`{item}` has too many `:` parts")));
            }
            let (count, gpu) = match head.split_once('x') {
                Some((n, g)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (
                    n.parse::<u32>()
                        .map_err(|_| bad(format!("bad count `{n}`")))?,
                    g,
                ),
                _ => (1, head),
            };
            if count == 0 {
                return Err(bad(format!("`{item}` has count 0")));
            }
            let mut profile = Profile::resolve(gpu, model)?;
            if let Some(tp) = tp {
                profile = profile.with_tp(tp)?;
            }
            groups.push(FleetGroup { count, profile });
        }
        if groups.is_empty() {
            return Err(bad("empty".to_string()));
        }
        Ok(FleetSpec { groups })
    }

    /// One profile per pod, groups expanded in order.
    pub fn pods(&self) -> Vec<Profile> {
        self.groups
            .iter()
            .flat_map(|g| std::iter::repeat_n(g.profile.clone(), g.count as usize))
            .collect()
    }

    /// Total pods.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.count as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(g: &str, m: &str) -> Profile {
        Profile::resolve(g, m).unwrap()
    }

    #[test]
    fn prices_power_and_availability_come_from_the_data_with_a_source() {
        let (gpus, _) = known().unwrap();
        for g in gpus {
            assert!(g.price_per_gpu_hour > 0.0, "{}", g.key);
            assert!(g.price_source.contains("AWS us-east-1"), "{}", g.key);
            assert!(g.power_w > 0.0 && g.available_gpus > 0, "{}", g.key);
        }
        // §7 of the autoscaling reference: $6.88 per H100-hour, $0.80 per L4-hour.
        assert_eq!(p("h100", "llama-3.1-8b").price_per_hour(), 6.88);
        assert_eq!(p("l4", "llama-3.1-8b").price_per_hour(), 0.80);
        // A TP4 pod pays for four GPUs and draws four boards' power.
        let big = p("h100", "llama-3.1-70b");
        assert_eq!(big.price_per_hour(), 4.0 * 6.88);
        assert_eq!(big.power_w(), 4.0 * 700.0);
    }

    #[test]
    fn kv_blocks_match_the_contract() {
        let within = |v: u32, target: f64, tol: f64| (f64::from(v) - target).abs() / target <= tol;
        let h = p("h100", "llama-3.1-8b");
        assert!(
            within(h.num_gpu_blocks, 28_000.0, 0.05),
            "{}",
            h.num_gpu_blocks
        );
        assert!(within(
            p("a100", "llama-3.1-8b").num_gpu_blocks,
            28_000.0,
            0.05
        ));
        let l4 = p("l4", "llama-3.1-8b");
        assert!(
            within(l4.num_gpu_blocks, 1_900.0, 0.08),
            "{}",
            l4.num_gpu_blocks
        );
        assert!(
            l4.max_model_len <= 31_000 && l4.max_model_len >= 24_000,
            "{}",
            l4.max_model_len
        );
        assert_eq!(h.max_model_len, DEFAULT_MAX_MODEL_LEN);
        let h70 = p("h100", "llama-3.1-70b");
        assert_eq!(h70.tp, 4);
        assert!(
            within(h70.num_gpu_blocks, 29_000.0, 0.05),
            "{}",
            h70.num_gpu_blocks
        );
        assert!(within(
            h70.with_tp(8).unwrap().num_gpu_blocks,
            85_000.0,
            0.05
        ));
        let l470 = p("l4", "llama-3.1-70b");
        assert_eq!(l470.tp, 8);
        assert!(
            (1_800..=4_000).contains(&l470.num_gpu_blocks),
            "{}",
            l470.num_gpu_blocks
        );
        assert_eq!(p("a100-40gb", "llama-3.1-70b").tp, 8);
    }

    #[test]
    fn scheduler_limits_follow_the_gpu() {
        let h = p("h100", "llama-3.1-8b");
        assert_eq!((h.max_num_batched_tokens, h.max_num_seqs), (8192, 1024));
        let a = p("a100-80gb", "llama-3.1-8b");
        assert_eq!((a.max_num_batched_tokens, a.max_num_seqs), (2048, 256));
        assert_eq!(p("l4", "llama-3.1-8b").max_num_seqs, 256);
        assert_eq!(p("h100", "llama-3.1-70b").startup_s, 300.0);
        assert_eq!(h.startup_s, 120.0);
    }

    #[test]
    fn step_time_anchors_8b_h100() {
        let h = p("h100", "llama-3.1-8b");
        let mut one = BatchShape::default();
        one.add_decode(1024);
        assert!(
            (h.step_time(&one) - 7.8e-3).abs() < 0.4e-3,
            "{}",
            h.step_time(&one)
        );
        let mut b128 = BatchShape::default();
        for _ in 0..128 {
            b128.add_decode(1024);
        }
        assert!((h.step_time(&b128) - 15.0e-3).abs() < 1.0e-3);
        let mut pf = BatchShape::default();
        pf.add_prefill(2048, 0);
        let t = h.step_time(&pf);
        assert!((0.045..0.060).contains(&t), "{t}");
        assert_eq!(h.step_time(&BatchShape::default()), 0.0);
    }

    #[test]
    fn rejects_unknown_names_and_bad_tp() {
        assert!(matches!(
            Profile::resolve("v100", "llama-3.1-8b"),
            Err(ProfileError::UnknownGpu(..))
        ));
        assert!(matches!(
            Profile::resolve("h100", "gpt-5"),
            Err(ProfileError::UnknownModel(..))
        ));
        assert!(matches!(
            p("h100", "llama-3.1-8b").with_tp(0),
            Err(ProfileError::InvalidTp(0))
        ));
        assert!(matches!(
            Profile::resolve("l4", "llama-3.1-70b").unwrap().with_tp(1),
            Err(ProfileError::DoesNotFit { .. })
        ));
    }

    #[test]
    fn parses_fleet_strings() {
        let f = FleetSpec::parse("4xh100:llama-3.1-8b, 2xl4:llama-3.1-8b,a100:llama-3.1-70b:tp8")
            .unwrap();
        assert_eq!(f.len(), 7);
        assert_eq!(f.groups[0].count, 4);
        assert_eq!(f.groups[1].profile.gpu, "l4");
        assert_eq!(f.groups[2].profile.gpu, "a100-80gb");
        assert_eq!(f.groups[2].profile.tp, 8);
        let pods = f.pods();
        assert_eq!(pods.len(), 7);
        assert_eq!(pods[5].gpu, "l4");
        for bad in [
            "",
            "0xh100:llama-3.1-8b",
            "h100",
            "4xh100:llama-3.1-8b:tpx",
            "4xh100:nope",
            "4xh100:llama-3.1-8b:tp2:x",
        ] {
            assert!(FleetSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
