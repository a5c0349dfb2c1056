//! The event loop of the elastic fleet: arrivals, pod steps, pods becoming ready, controller ticks.
//!
//! Events are ordered by (virtual time, sequence number) in one binary heap merged with the time-sorted arrivals;
//! at equal times an arrival goes first, as in `des::run`, so a fleet that never changes replays `des` exactly.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use super::{
    Controller, ElasticConfig, ElasticReport, Observation, PoolObservation, PoolReport, PoolSpec,
    Sample, quantile,
};
use crate::des::{Percentiles, RequestResult};
use crate::engine::{Engine, EngineConfig, EngineRequest, Event, Handoff, KvTransfer, ReqId, Role};
use crate::workload::TraceRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Step(usize),
    Ready(usize),
    Tick,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Due {
    t: f64,
    seq: u64,
    kind: Kind,
}

impl Eq for Due {}

impl Ord for Due {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (t, seq).
        o.t.total_cmp(&self.t).then(o.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodState {
    Starting,
    Ready,
    Draining,
    Removed,
}

struct Pod {
    pool: usize,
    state: PodState,
    /// `None` once removed (frees the KV model's memory).
    engine: Option<Engine>,
    created: f64,
    removed: f64,
    outstanding: u32,
    busy_until: f64,
    scheduled: Option<(f64, u64)>,
    requests: u64,
}

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotArrived,
    Held,
    /// On a `Both` pod.
    Whole(usize),
    /// Prefill leg on a `Prefill` pod.
    Prefill(usize),
    /// Decode leg on a `Decode` pod (pulling, then generating).
    Decode(usize),
    Done,
}

#[derive(Clone, Copy)]
struct Track {
    phase: Phase,
    first_token: f64,
    last_token: f64,
    tokens: u32,
}

struct Fleet<'a> {
    pools: &'a [PoolSpec],
    cfg: &'a ElasticConfig,
    pods: Vec<Pod>,
    heap: BinaryHeap<Due>,
    seq: u64,
}

impl Fleet<'_> {
    fn push(&mut self, t: f64, kind: Kind) {
        self.seq += 1;
        self.heap.push(Due {
            t,
            seq: self.seq,
            kind,
        });
    }

    /// Make sure pod `pi` steps at `t` (or earlier if already scheduled earlier).
    fn schedule(&mut self, pi: usize, t: f64) {
        if self.pods[pi].scheduled.is_some_and(|(at, _)| at <= t) {
            return;
        }
        self.seq += 1;
        self.pods[pi].scheduled = Some((t, self.seq));
        self.heap.push(Due {
            t,
            seq: self.seq,
            kind: Kind::Step(pi),
        });
    }

    fn add_pod(&mut self, pool: usize, now: f64, ready: bool) {
        let i = self.pods.len();
        let spec = &self.pools[pool];
        let mut c = EngineConfig::new(spec.profile.clone());
        c.seed = self.cfg.des.seed.wrapping_add(i as u64);
        c.jitter = self.cfg.des.jitter;
        c.enable_prefix_caching = self.cfg.des.enable_prefix_caching;
        c.emit_kv_events = false;
        c.engine_id = format!("pod-{i}");
        c.role = spec.role;
        self.pods.push(Pod {
            pool,
            state: if ready {
                PodState::Ready
            } else {
                PodState::Starting
            },
            engine: Some(Engine::new(c)),
            created: now,
            removed: f64::NAN,
            outstanding: 0,
            busy_until: 0.0,
            scheduled: None,
            requests: 0,
        });
        if !ready {
            let startup = self.cfg.startup_s.unwrap_or(spec.profile.startup_s);
            self.push(now + startup.max(0.0), Kind::Ready(i));
        }
    }

    fn remove(&mut self, pi: usize, now: f64) {
        let p = &mut self.pods[pi];
        p.state = PodState::Removed;
        p.removed = now;
        p.engine = None;
        p.scheduled = None;
    }

    /// The least loaded (outstanding / weight, then index) pod of a role that can take one more request.
    fn pick(&self, role: Role, allow_draining: bool) -> Option<usize> {
        let cap = self.cfg.max_outstanding_per_pod.unwrap_or(u32::MAX);
        self.pods
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                (p.state == PodState::Ready || (allow_draining && p.state == PodState::Draining))
                    && self.pools[p.pool].role == role
                    && p.outstanding < cap
            })
            .min_by(|(ia, a), (ib, b)| {
                let la = f64::from(a.outstanding) / self.pools[a.pool].weight.max(1e-9);
                let lb = f64::from(b.outstanding) / self.pools[b.pool].weight.max(1e-9);
                la.total_cmp(&lb).then(ia.cmp(ib))
            })
            .map(|(i, _)| i)
    }

    /// Where a new request can go now: a `Both` pod, or a `Prefill` pod when some decode pod is ready.
    fn target(&self) -> Option<(usize, Role)> {
        let both = self.pick(Role::Both, false);
        let prefill = self
            .pick(Role::Prefill, false)
            .filter(|_| self.pick(Role::Decode, false).is_some());
        let load = |i: usize| {
            f64::from(self.pods[i].outstanding) / self.pools[self.pods[i].pool].weight.max(1e-9)
        };
        match (both, prefill) {
            (Some(b), Some(p)) if load(p) < load(b) => Some((p, Role::Prefill)),
            (Some(b), _) => Some((b, Role::Both)),
            (None, Some(p)) => Some((p, Role::Prefill)),
            (None, None) => None,
        }
    }

    fn pool_observations(&self) -> Vec<PoolObservation> {
        let mut obs = vec![PoolObservation::default(); self.pools.len()];
        let mut kv_n = vec![0u32; self.pools.len()];
        for p in &self.pods {
            let o = &mut obs[p.pool];
            match p.state {
                PodState::Starting => o.starting += 1,
                PodState::Ready => o.ready += 1,
                PodState::Draining => o.draining += 1,
                PodState::Removed => continue,
            }
            o.outstanding += p.outstanding;
            if let Some(e) = &p.engine
                && p.state != PodState::Starting
            {
                let g = e.gauges();
                o.running += g.running;
                o.waiting += g.waiting;
                if p.state == PodState::Ready {
                    o.kv_usage += g.kv_usage;
                    kv_n[p.pool] += 1;
                }
            }
        }
        for (o, n) in obs.iter_mut().zip(kv_n) {
            if n > 0 {
                o.kv_usage /= f64::from(n);
            }
        }
        obs
    }

    /// Move each pool towards `desired`: re-activate draining pods, then start new ones; or cancel starting pods
    /// (newest first), then drain the least loaded ready ones.
    fn apply(&mut self, desired: &[u32], now: f64) {
        for (pool, &want) in desired.iter().enumerate().take(self.pools.len()) {
            let active = |f: &Fleet<'_>, s: PodState| -> Vec<usize> {
                (0..f.pods.len())
                    .filter(|&i| f.pods[i].pool == pool && f.pods[i].state == s)
                    .collect()
            };
            let starting = active(self, PodState::Starting);
            let ready = active(self, PodState::Ready);
            let have = (starting.len() + ready.len()) as u32;
            if want > have {
                let mut need = want - have;
                for i in active(self, PodState::Draining) {
                    if need == 0 {
                        break;
                    }
                    self.pods[i].state = PodState::Ready;
                    need -= 1;
                }
                for _ in 0..need {
                    self.add_pod(pool, now, false);
                }
            } else if want < have {
                let mut extra = have - want;
                for &i in starting.iter().rev() {
                    if extra == 0 {
                        break;
                    }
                    self.remove(i, now);
                    extra -= 1;
                }
                let mut ready = ready;
                ready.sort_by_key(|&i| (self.pods[i].outstanding, std::cmp::Reverse(i)));
                for i in ready.into_iter().take(extra as usize) {
                    if self.pods[i].outstanding == 0 {
                        self.remove(i, now);
                    } else {
                        self.pods[i].state = PodState::Draining;
                    }
                }
            }
        }
    }

    fn cost_per_hour(&self) -> f64 {
        self.pods
            .iter()
            .filter(|p| p.state != PodState::Removed)
            .map(|p| self.pools[p.pool].profile.price_per_hour())
            .sum()
    }
}

/// Per-run counters and per-request state.
struct Book<'a> {
    trace: &'a [TraceRequest],
    trace_seed: u64,
    ignore_eos: bool,
    results: Vec<RequestResult>,
    track: Vec<Track>,
    held: VecDeque<usize>,
    held_prompt_tokens: u64,
    rejected: usize,
    timed_out: usize,
    completed: usize,
    last_finish: f64,
    // Window counters, reset every tick.
    w_arrivals: u32,
    w_prompt: u64,
    w_output: u64,
    w_ttft: Vec<f64>,
}

impl Book<'_> {
    fn fail(&mut self, i: usize, timed_out: bool) {
        self.track[i].phase = Phase::Done;
        if timed_out {
            self.timed_out += 1;
        } else {
            self.rejected += 1;
        }
    }

    fn engine_request(
        &self,
        i: usize,
        pod: &Pod,
        kv: KvTransfer,
        decode_tokens: bool,
    ) -> EngineRequest {
        let r = &self.trace[i];
        let prompt = r.prompt_tokens(self.trace_seed);
        let max_len = pod
            .engine
            .as_ref()
            .map_or(u32::MAX, |e| e.config().profile.max_model_len);
        let plen = prompt.len() as u32;
        let max_tokens = if decode_tokens {
            r.output_tokens
                .max(1)
                .min(max_len.saturating_sub(plen))
                .max(1)
        } else {
            1
        };
        let mut req = EngineRequest::new(ReqId(i as u64), prompt, max_tokens, r.unique_seed);
        req.ignore_eos = self.ignore_eos;
        req.kv = kv;
        req
    }
}

/// Send request `i` to a pod now, or hold it. Returns false when it had to be held (or failed).
fn dispatch(fleet: &mut Fleet<'_>, book: &mut Book<'_>, i: usize, t: f64, may_hold: bool) -> bool {
    let Some((pi, role)) = fleet.target() else {
        if may_hold {
            if book.held.len() >= fleet.cfg.hold_capacity {
                book.fail(i, true);
            } else {
                book.track[i].phase = Phase::Held;
                book.held.push_back(i);
                book.held_prompt_tokens += u64::from(book.trace[i].prompt_len());
            }
        }
        return false;
    };
    let kv = if role == Role::Prefill {
        KvTransfer::RemoteDecode
    } else {
        KvTransfer::None
    };
    let req = book.engine_request(i, &fleet.pods[pi], kv, role == Role::Both);
    submit(fleet, book, i, pi, req, role, t);
    true
}

fn submit(
    fleet: &mut Fleet<'_>,
    book: &mut Book<'_>,
    i: usize,
    pi: usize,
    req: EngineRequest,
    role: Role,
    t: f64,
) {
    let pod = &mut fleet.pods[pi];
    let Some(engine) = pod.engine.as_mut() else {
        book.fail(i, false);
        return;
    };
    book.results[i].pod = pi;
    match engine.add_request(req, t) {
        Ok(()) => {
            pod.outstanding += 1;
            pod.requests += 1;
            book.track[i].phase = match role {
                Role::Both => Phase::Whole(pi),
                Role::Prefill => Phase::Prefill(pi),
                Role::Decode => Phase::Decode(pi),
            };
            if pod.busy_until <= t {
                fleet.schedule(pi, t);
            }
        }
        Err(_) => book.fail(i, false),
    }
}

/// Dispatch held requests in arrival order while pods can take them; fail those past the timeout.
fn drain_held(fleet: &mut Fleet<'_>, book: &mut Book<'_>, t: f64) {
    while let Some(&i) = book.held.front() {
        let arrival = book.trace[i].arrival_s;
        if t - arrival > fleet.cfg.hold_timeout_s {
            book.held.pop_front();
            book.held_prompt_tokens -= u64::from(book.trace[i].prompt_len());
            book.fail(i, true);
            continue;
        }
        if fleet.target().is_none() {
            break;
        }
        book.held.pop_front();
        book.held_prompt_tokens -= u64::from(book.trace[i].prompt_len());
        dispatch(fleet, book, i, t, false);
    }
}

/// The prefill leg of `i` finished on `from`: start its decode leg on a decode pod.
fn hand_off(fleet: &mut Fleet<'_>, book: &mut Book<'_>, i: usize, from: usize, h: Handoff, t: f64) {
    let Some(pi) = fleet
        .pick(Role::Decode, false)
        .or_else(|| fleet.pick(Role::Decode, true))
    else {
        if let Some(e) = fleet.pods[from].engine.as_mut() {
            e.release_transfer(&h.remote_request_id);
        }
        book.fail(i, false);
        return;
    };
    let kv = KvTransfer::RemotePrefill {
        remote_engine_id: h.remote_engine_id,
        remote_block_ids: h.remote_block_ids,
        remote_host: format!("pod-{from}"),
        remote_port: 0,
        remote_request_id: Some(h.remote_request_id),
    };
    let req = book.engine_request(i, &fleet.pods[pi], kv, true);
    submit(fleet, book, i, pi, req, Role::Decode, t);
}

/// Play `trace` through an elastic fleet of `pools` under `controller`.
pub fn run(
    pools: &[PoolSpec],
    trace: &[TraceRequest],
    controller: &mut dyn Controller,
    cfg: &ElasticConfig,
) -> ElasticReport {
    let mut order: Vec<usize> = (0..trace.len()).collect();
    order.sort_by(|&a, &b| {
        trace[a]
            .arrival_s
            .total_cmp(&trace[b].arrival_s)
            .then(a.cmp(&b))
    });
    let last_arrival = order.last().map_or(0.0, |&i| trace[i].arrival_s);
    let horizon = cfg.horizon_s.unwrap_or(last_arrival).max(last_arrival);
    let mut fleet = Fleet {
        pools,
        cfg,
        pods: Vec::new(),
        heap: BinaryHeap::new(),
        seq: 0,
    };
    for (k, p) in pools.iter().enumerate() {
        for _ in 0..p.initial {
            fleet.add_pod(k, 0.0, true);
        }
    }
    let mut book = Book {
        trace,
        trace_seed: cfg.des.trace_seed,
        ignore_eos: cfg.des.ignore_eos,
        results: trace
            .iter()
            .map(|r| RequestResult {
                arrival: r.arrival_s,
                pod: usize::MAX,
                ttft: f64::NAN,
                mean_itl: f64::NAN,
                e2e: f64::NAN,
                output_tokens: 0,
                cached_tokens: 0,
            })
            .collect(),
        track: vec![
            Track {
                phase: Phase::NotArrived,
                first_token: f64::NAN,
                last_token: f64::NAN,
                tokens: 0,
            };
            trace.len()
        ],
        held: VecDeque::new(),
        held_prompt_tokens: 0,
        rejected: 0,
        timed_out: 0,
        completed: 0,
        last_finish: 0.0,
        w_arrivals: 0,
        w_prompt: 0,
        w_output: 0,
        w_ttft: Vec::new(),
    };
    let tick = if cfg.tick_s.is_finite() && cfg.tick_s > 0.0 {
        cfg.tick_s
    } else {
        5.0
    };
    let mut series = Vec::new();
    let mut ticks: u64 = 1;
    fleet.push(tick, Kind::Tick);
    let mut next = 0;
    let mut end = horizon;

    loop {
        let arrival_t = order.get(next).map(|&i| trace[i].arrival_s);
        let event_t = fleet.heap.peek().map(|d| d.t);
        let take_arrival = match (arrival_t, event_t) {
            (None, None) => break,
            (Some(a), Some(e)) => a <= e,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if take_arrival {
            let i = order[next];
            next += 1;
            let r = &trace[i];
            book.w_arrivals += 1;
            book.w_prompt += u64::from(r.prompt_len());
            book.w_output += u64::from(r.output_tokens);
            if book.held.is_empty() {
                dispatch(&mut fleet, &mut book, i, r.arrival_s, true);
            } else {
                // Keep FIFO order behind requests already held.
                drain_held(&mut fleet, &mut book, r.arrival_s);
                if book.held.is_empty() {
                    dispatch(&mut fleet, &mut book, i, r.arrival_s, true);
                } else if book.held.len() >= cfg.hold_capacity {
                    book.fail(i, true);
                } else {
                    book.track[i].phase = Phase::Held;
                    book.held.push_back(i);
                    book.held_prompt_tokens += u64::from(r.prompt_len());
                }
            }
            continue;
        }
        let Some(due) = fleet.heap.pop() else { break };
        let t = due.t;
        match due.kind {
            Kind::Tick => {
                drain_held(&mut fleet, &mut book, t);
                let pools_obs = fleet.pool_observations();
                let obs = Observation {
                    now: t,
                    pools: pools_obs,
                    held: book.held.len() as u32,
                    held_prompt_tokens: book.held_prompt_tokens,
                    window_s: tick,
                    arrivals: book.w_arrivals,
                    prompt_tokens: book.w_prompt,
                    output_tokens: book.w_output,
                };
                let desired = controller.desired(&obs);
                fleet.apply(&desired, t);
                drain_held(&mut fleet, &mut book, t);
                let after = fleet.pool_observations();
                let ready_n: u32 = after.iter().map(|o| o.ready).sum();
                series.push(Sample {
                    t,
                    replicas: after.iter().map(|o| o.ready + o.starting).collect(),
                    ready: after.iter().map(|o| o.ready).collect(),
                    held: book.held.len() as u32,
                    waiting: after.iter().map(|o| o.waiting).sum(),
                    running: after.iter().map(|o| o.running).sum(),
                    kv_usage: if ready_n == 0 {
                        0.0
                    } else {
                        after
                            .iter()
                            .map(|o| o.kv_usage * f64::from(o.ready))
                            .sum::<f64>()
                            / f64::from(ready_n)
                    },
                    cost_per_hour: fleet.cost_per_hour(),
                    ttft_p95: quantile(&mut book.w_ttft, 0.95),
                    arrivals: book.w_arrivals,
                });
                book.w_arrivals = 0;
                book.w_prompt = 0;
                book.w_output = 0;
                book.w_ttft.clear();
                let busy = next < order.len()
                    || !book.held.is_empty()
                    || fleet.pods.iter().any(|p| p.outstanding > 0);
                ticks += 1;
                let nt = tick * ticks as f64;
                if nt <= horizon || busy {
                    fleet.push(nt, Kind::Tick);
                } else {
                    end = end.max(t);
                }
            }
            Kind::Ready(pi) => {
                if fleet.pods[pi].state == PodState::Starting {
                    fleet.pods[pi].state = PodState::Ready;
                    drain_held(&mut fleet, &mut book, t);
                }
            }
            Kind::Step(pi) => {
                if fleet.pods[pi].scheduled.map(|(_, s)| s) != Some(due.seq) {
                    continue; // stale
                }
                fleet.pods[pi].scheduled = None;
                let Some(engine) = fleet.pods[pi].engine.as_mut() else {
                    continue;
                };
                let out = engine.step(t);
                let step_end = t + out.duration;
                fleet.pods[pi].busy_until = step_end;
                let mut freed = false;
                for ev in out.events {
                    match ev {
                        Event::Token { id, .. } => {
                            let i = id.0 as usize;
                            let tr = &mut book.track[i];
                            if matches!(tr.phase, Phase::Prefill(_)) {
                                continue; // the prefill leg's token is not the client's
                            }
                            if tr.tokens == 0 {
                                tr.first_token = step_end;
                                book.w_ttft.push(step_end - trace[i].arrival_s);
                            }
                            tr.last_token = step_end;
                            tr.tokens += 1;
                        }
                        Event::Finished {
                            id,
                            usage,
                            times,
                            handoff,
                            ..
                        } => {
                            let i = id.0 as usize;
                            fleet.pods[pi].outstanding -= 1;
                            freed = true;
                            match (book.track[i].phase, handoff) {
                                (Phase::Prefill(_), Some(h)) => {
                                    hand_off(&mut fleet, &mut book, i, pi, h, step_end);
                                }
                                (Phase::Prefill(_), None) => book.fail(i, false),
                                _ => {
                                    let tr = book.track[i];
                                    let res = &mut book.results[i];
                                    res.ttft = tr.first_token - trace[i].arrival_s;
                                    res.e2e = times.finished - trace[i].arrival_s;
                                    res.output_tokens = usage.completion_tokens;
                                    res.cached_tokens = usage.cached_tokens;
                                    if tr.tokens >= 2 {
                                        res.mean_itl = (tr.last_token - tr.first_token)
                                            / f64::from(tr.tokens - 1);
                                    }
                                    book.track[i].phase = Phase::Done;
                                    book.completed += 1;
                                    book.last_finish = book.last_finish.max(times.finished);
                                }
                            }
                        }
                        Event::TransferDone {
                            remote_host,
                            remote_request_id,
                            ..
                        } => {
                            let from = remote_host
                                .strip_prefix("pod-")
                                .and_then(|s| s.parse::<usize>().ok());
                            if let (Some(from), Some(rid)) = (from, remote_request_id)
                                && let Some(e) =
                                    fleet.pods.get_mut(from).and_then(|p| p.engine.as_mut())
                            {
                                e.release_transfer(&rid);
                                if fleet.pods[from].busy_until <= step_end {
                                    fleet.schedule(from, step_end);
                                }
                            }
                        }
                    }
                }
                let pod = &fleet.pods[pi];
                if pod.state == PodState::Draining && pod.outstanding == 0 {
                    fleet.remove(pi, step_end);
                } else if let Some(engine) = fleet.pods[pi].engine.as_ref() {
                    if out.duration > 0.0 {
                        fleet.schedule(pi, step_end);
                    } else if let Some(w) = engine.next_wakeup() {
                        fleet.schedule(pi, w.max(t));
                    }
                }
                if freed && !book.held.is_empty() {
                    drain_held(&mut fleet, &mut book, step_end);
                }
            }
        }
    }
    end = end.max(book.last_finish).max(horizon);
    summarise(controller.name(), pools, fleet.pods, book, series, end, cfg)
}

fn summarise(
    controller: String,
    pools: &[PoolSpec],
    pods: Vec<Pod>,
    book: Book<'_>,
    series: Vec<Sample>,
    end: f64,
    cfg: &ElasticConfig,
) -> ElasticReport {
    let mut reports: Vec<PoolReport> = pools
        .iter()
        .map(|p| PoolReport {
            name: p.name.clone(),
            gpu: p.profile.gpu.clone(),
            role: p.role,
            pod_hours: 0.0,
            gpu_hours: 0.0,
            cost_usd: 0.0,
            energy_kwh: 0.0,
            pods_created: 0,
            max_replicas: p.initial,
            requests: 0,
        })
        .collect();
    for p in &pods {
        let spec = &pools[p.pool];
        let until = if p.removed.is_finite() {
            p.removed
        } else {
            end
        };
        let hours = (until - p.created).max(0.0) / 3600.0;
        let r = &mut reports[p.pool];
        r.pod_hours += hours;
        r.gpu_hours += hours * f64::from(spec.profile.tp);
        r.cost_usd += hours * spec.profile.price_per_hour();
        r.energy_kwh += hours * spec.profile.power_w() / 1000.0;
        r.pods_created += 1;
        r.requests += p.requests;
    }
    for s in &series {
        for (r, &n) in reports.iter_mut().zip(&s.replicas) {
            r.max_replicas = r.max_replicas.max(n);
        }
    }
    let done = || book.results.iter().filter(|r| r.e2e.is_finite());
    let mut ttfts: Vec<f64> = done().map(|r| r.ttft).collect();
    let mut tpots: Vec<f64> = done()
        .map(|r| r.mean_itl)
        .filter(|x| x.is_finite())
        .collect();
    let ttft_p95 = quantile(&mut ttfts, 0.95);
    let tpot_p95 = quantile(&mut tpots, 0.95);
    let within_slo = book.results.iter().filter(|r| cfg.slo.met(r)).count();
    ElasticReport {
        controller,
        requests: book.trace.len(),
        completed: book.completed,
        rejected: book.rejected,
        timed_out: book.timed_out,
        within_slo,
        slo: cfg.slo,
        ttft: Percentiles::of(ttfts),
        ttft_p95,
        tpot: Percentiles::of(tpots),
        tpot_p95,
        e2e: Percentiles::of(done().map(|r| r.e2e).collect()),
        horizon_s: end,
        cost_usd: reports.iter().map(|r| r.cost_usd).sum(),
        gpu_hours: reports.iter().map(|r| r.gpu_hours).sum(),
        energy_kwh: reports.iter().map(|r| r.energy_kwh).sum(),
        pools: reports,
        series,
        per_request: book.results,
    }
}
