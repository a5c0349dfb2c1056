//! A virtual-time fleet that changes size during a run: the testbed of the autoscaler.
//!
//! [`crate::des::run`] plays a trace through a fixed list of pods. Here pods belong to *pools* (one GPU profile and one
//! P/D role each) whose replica counts a [`Controller`] sets every tick. A new pod pays its cold start (the profile's
//! `startup_s`, as a loading vLLM pod does) before it takes requests, and is billed from creation; a removed pod drains
//! its in-flight requests first. The dispatcher holds a request (bounded queue, timeout) while no pod can take it, as
//! an activator does in front of a pool scaled to zero. Prefill pods hand the prompt's KV blocks to decode pods through
//! the engine's own P/D path (`kv_transfer_params`), so disaggregated pools time like the HTTP fleet does.
//!
//! Pure and deterministic for a seed, like `des`: nothing reads a clock. One model per run (the pools' profiles
//! should share it; the trace carries no model field). The run loop is in [`run`]; this file holds the types.

mod run;

use serde::Serialize;

use crate::des::{DesConfig, Percentiles, RequestResult};
use crate::engine::Role;
use crate::profile::Profile;

pub use run::run;

/// One pool of interchangeable pods: a GPU profile (GPU x model x TP) in one P/D role.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    /// Display name (`h100/both`).
    pub name: String,
    pub profile: Profile,
    /// `Both` pods serve whole requests; `Prefill` pods run the prompt and hand its KV to a `Decode` pod.
    pub role: Role,
    /// Pods ready at t = 0 (no cold start for them).
    pub initial: u32,
    /// Relative capacity of one pod; the dispatcher balances outstanding requests divided by it, so a pod twice as
    /// fast gets twice the requests. 1.0 when all pools are alike.
    pub weight: f64,
}

impl PoolSpec {
    /// A pool named `<gpu>/<role>` with weight 1.
    pub fn new(profile: Profile, role: Role, initial: u32) -> Self {
        PoolSpec {
            name: format!("{}/{}", profile.gpu, role),
            profile,
            role,
            initial,
            weight: 1.0,
        }
    }
}

/// Latency objectives a request is judged against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Slo {
    /// Time to first token, seconds.
    pub ttft_s: f64,
    /// Mean time per output token after the first (TPOT), seconds.
    pub tpot_s: f64,
}

impl Slo {
    /// Whether one outcome met the objectives (a request that never finished did not; one with a single output
    /// token has no TPOT and meets that part).
    pub fn met(&self, r: &RequestResult) -> bool {
        r.e2e.is_finite()
            && r.ttft <= self.ttft_s
            && (r.mean_itl.is_nan() || r.mean_itl <= self.tpot_s)
    }
}

/// Knobs of an elastic run.
#[derive(Debug, Clone, PartialEq)]
pub struct ElasticConfig {
    /// Engine seeds, jitter, prefix caching, `ignore_eos` (pod `i`, in creation order, gets `seed + i`).
    pub des: DesConfig,
    /// Controller period, seconds of virtual time (also the time-series resolution).
    pub tick_s: f64,
    /// Requests the dispatcher may hold while no pod can take them; beyond it a request fails at once.
    pub hold_capacity: usize,
    /// A held request fails after this long.
    pub hold_timeout_s: f64,
    /// Cold start of a new pod; `None` = the profile's `startup_s`.
    pub startup_s: Option<f64>,
    /// A pod with this many outstanding requests takes no more (they are held instead); `None` = no cap.
    pub max_outstanding_per_pod: Option<u32>,
    /// Billing and ticking run at least to here (seconds); `None` = the last arrival.
    pub horizon_s: Option<f64>,
    /// What "within SLO" means in the report.
    pub slo: Slo,
}

impl Default for ElasticConfig {
    fn default() -> Self {
        ElasticConfig {
            des: DesConfig::default(),
            tick_s: 5.0,
            hold_capacity: 10_000,
            hold_timeout_s: 600.0,
            startup_s: None,
            max_outstanding_per_pod: None,
            horizon_s: None,
            slo: Slo {
                ttft_s: 2.0,
                tpot_s: 0.1,
            },
        }
    }
}

/// What a controller sees of one pool at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct PoolObservation {
    /// Pods taking requests.
    pub ready: u32,
    /// Pods in their cold start (billed, not serving).
    pub starting: u32,
    /// Pods finishing their in-flight requests before removal.
    pub draining: u32,
    /// Sums over ready and draining pods of the engine gauges.
    pub running: u32,
    pub waiting: u32,
    /// Requests dispatched to the pool's pods and not finished.
    pub outstanding: u32,
    /// Mean KV-cache use over ready pods (0 without any).
    pub kv_usage: f64,
}

/// Everything a controller sees at a tick: the pools (in [`PoolSpec`] order) and the demand since the last tick.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    /// Virtual time of the tick.
    pub now: f64,
    pub pools: Vec<PoolObservation>,
    /// Requests held by the dispatcher (no pod could take them).
    pub held: u32,
    /// Prompt tokens of the held requests.
    pub held_prompt_tokens: u64,
    /// Length of the window the demand counters cover (the tick).
    pub window_s: f64,
    /// Arrivals in the window.
    pub arrivals: u32,
    /// Their prompt tokens and requested output tokens.
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

/// Sets the replica count of every pool each tick. Implementations keep their own state (windows, cooldowns).
pub trait Controller {
    /// Desired replicas per pool, in [`PoolSpec`] order (missing entries keep their count).
    fn desired(&mut self, obs: &Observation) -> Vec<u32>;
    fn name(&self) -> String;
}

/// Never changes the fleet: the fixed-fleet baseline.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fixed;

impl Controller for Fixed {
    fn desired(&mut self, obs: &Observation) -> Vec<u32> {
        obs.pools.iter().map(|p| p.ready + p.starting).collect()
    }
    fn name(&self) -> String {
        "fixed".into()
    }
}

/// One point of the time series, taken at each tick after the controller acted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub t: f64,
    /// Pods per pool that are billed and not draining (ready + starting).
    pub replicas: Vec<u32>,
    /// Ready pods per pool.
    pub ready: Vec<u32>,
    pub held: u32,
    /// Engine queues summed over the fleet.
    pub waiting: u32,
    pub running: u32,
    /// Mean KV-cache use over ready pods.
    pub kv_usage: f64,
    /// Fleet price at this moment (every billed pod, draining included), USD per hour.
    pub cost_per_hour: f64,
    /// p95 TTFT of first tokens seen in the window (NaN without any).
    pub ttft_p95: f64,
    pub arrivals: u32,
}

/// Per-pool totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolReport {
    pub name: String,
    pub gpu: String,
    pub role: Role,
    /// Pod-hours billed (creation to removal).
    pub pod_hours: f64,
    /// GPU-hours billed (pod-hours x TP).
    pub gpu_hours: f64,
    pub cost_usd: f64,
    /// Board energy at full power over the billed time, kWh (an upper bound).
    pub energy_kwh: f64,
    pub pods_created: u32,
    pub max_replicas: u32,
    pub requests: u64,
}

/// Everything an elastic run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ElasticReport {
    pub controller: String,
    pub requests: usize,
    pub completed: usize,
    /// A pod refused the request (too long for its `max_model_len`).
    pub rejected: usize,
    /// Held past the timeout, or the hold queue was full.
    pub timed_out: usize,
    /// Completed within [`ElasticConfig::slo`].
    pub within_slo: usize,
    pub slo: Slo,
    pub ttft: Percentiles,
    pub ttft_p95: f64,
    /// Per-request mean inter-token time.
    pub tpot: Percentiles,
    pub tpot_p95: f64,
    pub e2e: Percentiles,
    /// Billing horizon, seconds.
    pub horizon_s: f64,
    pub cost_usd: f64,
    pub gpu_hours: f64,
    pub energy_kwh: f64,
    pub pools: Vec<PoolReport>,
    pub series: Vec<Sample>,
    /// Per-request outcomes in trace order (not serialised: large).
    #[serde(skip)]
    pub per_request: Vec<RequestResult>,
}

impl ElasticReport {
    /// Fraction of all requests completed within the SLO.
    pub fn slo_attainment(&self) -> f64 {
        if self.requests == 0 {
            1.0
        } else {
            self.within_slo as f64 / self.requests as f64
        }
    }
}

/// The `q` quantile (nearest rank) of `v`, NaN when empty.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[cfg(test)]
mod tests;
