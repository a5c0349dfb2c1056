//! Starting simulated pods: one listener, engine driver, metrics and optional KV-event sockets per pod, many pods per
//! process. `weir sim` uses it for a single pod and for `--fleet`; tests use it to run pods in-process.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;

use crate::driver::{Driver, DriverOptions, unix_now};
use crate::engine::{Engine, EngineConfig, Role};
use crate::faults::{FaultConfig, Faults};
use crate::metrics::{Metrics, MetricsConfig};
use crate::profile::Profile;
use crate::server::{PodConfig, PodState, release_transfers, serve};
use crate::zmq::KvEventsConfig;

/// Why a pod could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The HTTP listener could not bind.
    #[error("bind {addr}: {source}")]
    Bind {
        /// Address tried.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A ZMQ socket could not bind or connect.
    #[error("kv events: {0}")]
    Zmq(String),
    /// A setting is invalid.
    #[error("invalid setting {field}: {reason}")]
    Config {
        /// The flag or field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Everything that makes one pod.
#[derive(Debug, Clone)]
pub struct PodOptions {
    /// GPU x model profile (TP already applied).
    pub profile: Profile,
    /// P/D role.
    pub role: Role,
    /// Listen address.
    pub host: String,
    /// Listen port (0 = ephemeral).
    pub port: u16,
    /// Names served (empty = the model's HF name).
    pub served_model_names: Vec<String>,
    /// Override of the profile's max_model_len.
    pub max_model_len: Option<u32>,
    /// Override of the profile's KV block count (tiny caches for eviction tests).
    pub num_gpu_blocks: Option<u32>,
    /// Model seconds per real second.
    pub time_scale: f64,
    /// Seed for jitter, ids and faults.
    pub seed: u64,
    /// Per-step jitter (lognormal sigma).
    pub jitter: f64,
    /// Multiplies step time (a slow pod).
    pub slow_factor: f64,
    /// Real seconds before `/health` is 200; `None` = the profile's start-up time / time-scale.
    pub startup_delay: Option<f64>,
    /// Hold every generation response until this long after its request arrived (see [`PodConfig::min_latency`]).
    pub min_latency: Duration,
    /// Bearer key guarding `/v1/*`.
    pub api_key: Option<String>,
    /// Report cached prompt tokens in usage.
    pub enable_prompt_tokens_details: bool,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Print legacy metric names too.
    pub metrics_legacy: bool,
    /// Automatic prefix caching.
    pub enable_prefix_caching: bool,
    /// KV events, if enabled.
    pub kv_events: Option<KvEventsConfig>,
    /// Fault injection.
    pub faults: FaultConfig,
    /// Tokenizer for prompts and generated text (`weir sim --tokenizer FILE`).
    pub tokenizer: PodTokenizer,
}

/// A shared tokenizer in [`PodOptions`]; [`ByteTokenizer`](policies::tokens::ByteTokenizer) by default.
#[derive(Clone)]
pub struct PodTokenizer(pub std::sync::Arc<dyn policies::tokens::Tokenizer>);

impl Default for PodTokenizer {
    fn default() -> Self {
        Self(std::sync::Arc::new(policies::tokens::ByteTokenizer))
    }
}

impl std::fmt::Debug for PodTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodTokenizer")
            .field("vocab_size", &self.0.vocab_size())
            .field("eos_token_id", &self.0.eos_token_id())
            .finish()
    }
}

impl PodOptions {
    /// Defaults for a profile: loopback, ephemeral port, real time, no faults.
    pub fn new(profile: Profile) -> Self {
        Self {
            profile,
            role: Role::Both,
            host: "127.0.0.1".into(),
            port: 0,
            served_model_names: Vec::new(),
            max_model_len: None,
            num_gpu_blocks: None,
            time_scale: 1.0,
            seed: 0,
            jitter: 0.05,
            slow_factor: 1.0,
            startup_delay: None,
            min_latency: Duration::ZERO,
            api_key: None,
            enable_prompt_tokens_details: false,
            max_body_bytes: 32 * 1024 * 1024,
            metrics_legacy: false,
            enable_prefix_caching: true,
            kv_events: None,
            faults: FaultConfig::default(),
            tokenizer: PodTokenizer::default(),
        }
    }

    /// Real seconds from the start until `/health` answers 200: [`PodOptions::startup_delay`], or the profile's
    /// start-up time over the time scale.
    pub fn startup_delay_s(&self) -> f64 {
        self.startup_delay
            .unwrap_or(self.profile.startup_s / self.time_scale)
            .max(0.0)
    }
}

/// A started pod, as printed by `weir sim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodEndpoint {
    /// `http://host:port`.
    pub url: String,
    /// GPU key.
    pub gpu: String,
    /// Served model name.
    pub model: String,
    /// P/D role.
    pub role: String,
    /// KV-event PUB endpoint, if enabled.
    pub kv_events: Option<String>,
    /// KV-event replay endpoint, if enabled.
    pub replay: Option<String>,
}

/// Bind and start one pod; it serves until `shutdown` turns true.
pub async fn start_pod(
    o: PodOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(PodEndpoint, tokio::task::JoinHandle<std::io::Result<()>>), FleetError> {
    if !(o.time_scale.is_finite() && o.time_scale > 0.0) {
        return Err(FleetError::Config {
            field: "--time-scale",
            reason: format!("must be > 0, got {}", o.time_scale),
        });
    }
    if !(o.slow_factor.is_finite() && o.slow_factor > 0.0) {
        return Err(FleetError::Config {
            field: "--slow-factor",
            reason: format!("must be > 0, got {}", o.slow_factor),
        });
    }
    let mut profile = o.profile.clone();
    if let Some(n) = o.num_gpu_blocks {
        if n < 2 {
            return Err(FleetError::Config {
                field: "--num-gpu-blocks",
                reason: format!("must be >= 2, got {n}"),
            });
        }
        profile.num_gpu_blocks = n;
        profile.max_model_len = profile.max_model_len.min((n - 1) * profile.block_size);
    }
    if let Some(m) = o.max_model_len {
        profile.max_model_len = m;
    }
    let addr = format!("{}:{}", o.host, o.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| FleetError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| FleetError::Bind { addr, source })?;
    let advertise = if local.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        local.ip().to_string()
    };
    let port = local.port();
    let names = if o.served_model_names.is_empty() {
        vec![profile.model_name().to_string()]
    } else {
        o.served_model_names.clone()
    };

    let mut cfg = EngineConfig::new(profile.clone());
    cfg.seed = o.seed;
    cfg.jitter = o.jitter;
    cfg.speedup = 1.0 / o.slow_factor;
    cfg.role = o.role;
    cfg.enable_prefix_caching = o.enable_prefix_caching;
    cfg.engine_id = format!("sim-{advertise}-{port}");
    cfg.emit_kv_events = o.kv_events.as_ref().is_some_and(KvEventsConfig::enabled);

    let mut cache_config = vec![
        ("block_size".to_string(), profile.block_size.to_string()),
        ("cache_dtype".to_string(), "auto".to_string()),
        (
            "enable_prefix_caching".to_string(),
            if o.enable_prefix_caching {
                "True"
            } else {
                "False"
            }
            .to_string(),
        ),
        ("gpu_memory_utilization".to_string(), "0.9".to_string()),
        ("num_cpu_blocks".to_string(), "None".to_string()),
        (
            "num_gpu_blocks".to_string(),
            profile.num_gpu_blocks.to_string(),
        ),
        (
            "num_gpu_blocks_override".to_string(),
            o.num_gpu_blocks
                .map_or("None".to_string(), |n| n.to_string()),
        ),
        (
            "prefix_caching_hash_algo".to_string(),
            "sha256_cbor".to_string(),
        ),
        ("sliding_window".to_string(), "None".to_string()),
        ("swap_space".to_string(), "4".to_string()),
    ];
    cache_config.sort();
    let metrics = Arc::new(Mutex::new(Metrics::new(MetricsConfig {
        model_name: names[0].clone(),
        legacy: o.metrics_legacy,
        max_model_len: profile.max_model_len,
        cache_config,
        created_unix: unix_now(),
        gpu: Some(profile.gpu.clone()),
    })));

    let (kv, kv_eps) = match &o.kv_events {
        Some(k) if k.enabled() => {
            let topic = if k.topic.is_empty() {
                format!("kv@{advertise}:{port}@{}", names[0])
            } else {
                k.topic.clone()
            };
            let (p, eps) = crate::zmq::start(k, topic)
                .await
                .map_err(|e| FleetError::Zmq(e.to_string()))?;
            (Some(p), Some(eps))
        }
        _ => (None, None),
    };
    let (ttx, trx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(release_transfers(trx));
    let driver = Driver::spawn(
        Engine::new(cfg),
        DriverOptions {
            time_scale: o.time_scale,
            metrics: Arc::clone(&metrics),
            kv,
            transfers: Some(ttx),
        },
    );
    let delay = o.startup_delay_s();
    let pod_cfg = PodConfig {
        served_model_names: names.clone(),
        model_root: profile.model_name().to_string(),
        max_model_len: profile.max_model_len,
        api_key: o.api_key.clone(),
        enable_prompt_tokens_details: o.enable_prompt_tokens_details,
        max_body_bytes: o.max_body_bytes,
        role: o.role,
        advertise_host: advertise.clone(),
        http_port: port,
        tp: profile.tp,
        startup_delay: Duration::from_secs_f64(delay),
        min_latency: o.min_latency,
        seed: o.seed,
    };
    let faults = Faults::new(FaultConfig {
        seed: o.seed ^ 0xfa17,
        ..o.faults.clone()
    });
    let state = PodState::with_tokenizer(pod_cfg, driver, metrics, faults, o.tokenizer.0.clone());
    let mut rx = shutdown;
    let task = tokio::spawn(serve(listener, state, async move {
        let _ = rx.wait_for(|v| *v).await;
    }));
    let ep = PodEndpoint {
        url: format!("http://{advertise}:{port}"),
        gpu: profile.gpu.clone(),
        model: names[0].clone(),
        role: o.role.as_str().to_string(),
        kv_events: kv_eps.as_ref().map(|e| e.publisher.clone()),
        replay: kv_eps.and_then(|e| e.replay),
    };
    Ok((ep, task))
}
