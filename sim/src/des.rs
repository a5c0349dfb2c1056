//! Virtual-time discrete-event runner: plays a trace through a fleet of simulated engines (mixed profiles allowed)
//! as fast as the CPU allows, with a pluggable dispatcher, and reports latency percentiles, throughput, prefix-cache
//! hit rate, preemptions and per-pod utilisation.
//!
//! Pure and deterministic for a seed: events are ordered by (virtual time, sequence number) in a binary heap of pod
//! step ends and wake-ups, merged with the time-sorted arrivals. Nothing here reads a clock.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use serde::Serialize;

use crate::engine::{Engine, EngineConfig, EngineRequest, Event, Gauges, ReqId};
use crate::profile::Profile;
use crate::workload::TraceRequest;

/// What a dispatcher sees of one pod at decision time.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    pub index: usize,
    pub profile: &'a Profile,
    /// Requests dispatched to the pod and not yet finished.
    pub outstanding: u32,
    pub gauges: Gauges,
}

/// Chooses a pod for each arriving request.
pub trait Dispatcher {
    /// Index into `pods` (out-of-range values are wrapped).
    fn pick(&mut self, req: &TraceRequest, prompt: &[u32], pods: &[PodView<'_>]) -> usize;
    fn name(&self) -> String;
}

/// Pods in turn.
#[derive(Debug, Clone, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Dispatcher for RoundRobin {
    fn pick(&mut self, _: &TraceRequest, _: &[u32], pods: &[PodView<'_>]) -> usize {
        let i = self.next % pods.len().max(1);
        self.next = self.next.wrapping_add(1);
        i
    }
    fn name(&self) -> String {
        "round-robin".into()
    }
}

/// The pod with the fewest outstanding requests (lowest index on ties).
#[derive(Debug, Clone, Default)]
pub struct LeastOutstanding;

impl Dispatcher for LeastOutstanding {
    fn pick(&mut self, _: &TraceRequest, _: &[u32], pods: &[PodView<'_>]) -> usize {
        pods.iter()
            .min_by_key(|p| (p.outstanding, p.index))
            .map_or(0, |p| p.index)
    }
    fn name(&self) -> String {
        "least-outstanding".into()
    }
}

/// A closure as a dispatcher.
pub struct FnDispatcher<F>(pub String, pub F);

impl<F: FnMut(&TraceRequest, &[u32], &[PodView<'_>]) -> usize> Dispatcher for FnDispatcher<F> {
    fn pick(&mut self, req: &TraceRequest, prompt: &[u32], pods: &[PodView<'_>]) -> usize {
        (self.1)(req, prompt, pods)
    }
    fn name(&self) -> String {
        self.0.clone()
    }
}

/// Knobs of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct DesConfig {
    /// Seeds the per-pod jitter RNGs (pod i gets `seed + i`).
    pub seed: u64,
    /// Seeds prompt materialisation.
    pub trace_seed: u64,
    /// Step jitter sigma.
    pub jitter: f64,
    /// Prefix caching on the pods.
    pub enable_prefix_caching: bool,
    /// Requests run with `ignore_eos` and `max_tokens = output_tokens` (the trace's lengths are exact).
    pub ignore_eos: bool,
}

impl Default for DesConfig {
    fn default() -> Self {
        DesConfig {
            seed: 0,
            trace_seed: 0,
            jitter: 0.05,
            enable_prefix_caching: true,
            ignore_eos: true,
        }
    }
}

/// Summary of a distribution.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_unstable_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Percentiles {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// One request's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RequestResult {
    pub arrival: f64,
    pub pod: usize,
    /// NaN when rejected.
    pub ttft: f64,
    /// Mean inter-token latency (NaN with fewer than two tokens).
    pub mean_itl: f64,
    pub e2e: f64,
    pub output_tokens: u32,
    pub cached_tokens: u32,
}

/// One pod's totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodReport {
    pub profile: String,
    pub requests: u64,
    /// Fraction of the run the pod spent in steps.
    pub utilisation: f64,
    pub steps: u64,
    pub preemptions: u64,
    pub prefix_hit_rate: f64,
    /// Mean tokens per non-empty step.
    pub mean_step_tokens: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub dispatcher: String,
    pub requests: usize,
    pub completed: usize,
    /// Requests a pod refused (too long for its `max_model_len`).
    pub rejected: usize,
    /// Virtual seconds from 0 to the last finish.
    pub makespan_s: f64,
    pub ttft: Percentiles,
    pub itl: Percentiles,
    pub e2e: Percentiles,
    pub throughput_rps: f64,
    pub output_tokens_per_s: f64,
    pub prefix_hit_rate: f64,
    pub preemptions: u64,
    pub steps: u64,
    pub pods: Vec<PodReport>,
    /// Per-request outcomes in trace order (not serialised: large).
    #[serde(skip)]
    pub per_request: Vec<RequestResult>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Due {
    t: f64,
    seq: u64,
    pod: usize,
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

struct Pod {
    engine: Engine,
    outstanding: u32,
    busy_until: f64,
    /// Earliest scheduled poke (stale heap entries carry other seqs).
    scheduled: Option<(f64, u64)>,
    busy: f64,
    steps: u64,
    preemptions: u64,
    queries: u64,
    hits: u64,
    tokens: u64,
    requests: u64,
}

#[derive(Clone, Copy)]
struct Track {
    pod: usize,
    last_token: f64,
    first_token: f64,
    tokens: u32,
}

/// Play `trace` (sorted by arrival) through `fleet`.
pub fn run(
    fleet: &[Profile],
    trace: &[TraceRequest],
    dispatcher: &mut dyn Dispatcher,
    cfg: &DesConfig,
) -> Report {
    let mut pods: Vec<Pod> = fleet
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut c = EngineConfig::new(p.clone());
            c.seed = cfg.seed.wrapping_add(i as u64);
            c.jitter = cfg.jitter;
            c.enable_prefix_caching = cfg.enable_prefix_caching;
            c.emit_kv_events = false;
            c.engine_id = format!("pod-{i}");
            Pod {
                engine: Engine::new(c),
                outstanding: 0,
                busy_until: 0.0,
                scheduled: None,
                busy: 0.0,
                steps: 0,
                preemptions: 0,
                queries: 0,
                hits: 0,
                tokens: 0,
                requests: 0,
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..trace.len()).collect();
    order.sort_by(|&a, &b| {
        trace[a]
            .arrival_s
            .total_cmp(&trace[b].arrival_s)
            .then(a.cmp(&b))
    });
    let mut results: Vec<RequestResult> = trace
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
        .collect();
    let mut track: Vec<Track> = vec![
        Track {
            pod: 0,
            last_token: f64::NAN,
            first_token: f64::NAN,
            tokens: 0
        };
        trace.len()
    ];
    let mut itls: Vec<f64> =
        Vec::with_capacity(trace.iter().map(|r| r.output_tokens as usize).sum());
    let mut heap: BinaryHeap<Due> = BinaryHeap::new();
    let mut seq: u64 = 0;
    let mut rejected = 0;
    let mut completed = 0;
    let mut makespan: f64 = 0.0;
    let mut next = 0;
    if fleet.is_empty() {
        return summarise(
            dispatcher.name(),
            pods,
            fleet,
            results,
            itls,
            0,
            0,
            0.0,
            trace.len(),
        );
    }

    let mut schedule = |pod: &mut Pod, pi: usize, t: f64, heap: &mut BinaryHeap<Due>| {
        if pod.scheduled.is_some_and(|(at, _)| at <= t) {
            return;
        }
        seq += 1;
        pod.scheduled = Some((t, seq));
        heap.push(Due { t, seq, pod: pi });
    };

    loop {
        let arrival_t = order.get(next).map(|&i| trace[i].arrival_s);
        let pod_t = heap.peek().map(|d| d.t);
        let take_arrival = match (arrival_t, pod_t) {
            (None, None) => break,
            (Some(a), Some(p)) => a <= p,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if take_arrival {
            let i = order[next];
            next += 1;
            let r = &trace[i];
            let t = r.arrival_s;
            let prompt = r.prompt_tokens(cfg.trace_seed);
            let views: Vec<PodView<'_>> = pods
                .iter()
                .enumerate()
                .map(|(k, p)| PodView {
                    index: k,
                    profile: &fleet[k],
                    outstanding: p.outstanding,
                    gauges: p.engine.gauges(),
                })
                .collect();
            let pi = dispatcher.pick(r, &prompt, &views) % pods.len();
            drop(views);
            let pod = &mut pods[pi];
            let max_len = pod.engine.config().profile.max_model_len;
            let plen = prompt.len() as u32;
            let max_tokens = r.output_tokens.max(1).min(max_len.saturating_sub(plen));
            let mut req =
                EngineRequest::new(ReqId(i as u64), prompt, max_tokens.max(1), r.unique_seed);
            req.ignore_eos = cfg.ignore_eos;
            results[i].pod = pi;
            match pod.engine.add_request(req, t) {
                Ok(()) => {
                    pod.outstanding += 1;
                    pod.requests += 1;
                    track[i].pod = pi;
                    if pod.busy_until <= t {
                        schedule(pod, pi, t, &mut heap);
                    }
                }
                Err(_) => rejected += 1,
            }
            continue;
        }
        let Some(due) = heap.pop() else { break };
        let pod = &mut pods[due.pod];
        if pod.scheduled.map(|(_, s)| s) != Some(due.seq) {
            continue; // stale
        }
        pod.scheduled = None;
        let t = due.t;
        let out = pod.engine.step(t);
        let end = t + out.duration;
        pod.busy_until = end;
        if out.duration > 0.0 {
            pod.busy += out.duration;
            pod.steps += 1;
            pod.tokens += u64::from(out.stats.num_scheduled_tokens);
        }
        pod.preemptions += u64::from(out.stats.preemptions);
        pod.queries += out.stats.prefix_queries;
        pod.hits += out.stats.prefix_hits;
        for ev in out.events {
            match ev {
                Event::Token { id, .. } => {
                    let tr = &mut track[id.0 as usize];
                    if tr.tokens == 0 {
                        tr.first_token = end;
                    } else {
                        itls.push(end - tr.last_token);
                    }
                    tr.last_token = end;
                    tr.tokens += 1;
                }
                Event::Finished {
                    id, usage, times, ..
                } => {
                    let i = id.0 as usize;
                    let tr = track[i];
                    let res = &mut results[i];
                    res.ttft = tr.first_token - times.arrival;
                    res.e2e = times.finished - times.arrival;
                    res.output_tokens = usage.completion_tokens;
                    res.cached_tokens = usage.cached_tokens;
                    if tr.tokens >= 2 {
                        res.mean_itl = (tr.last_token - tr.first_token) / f64::from(tr.tokens - 1);
                    }
                    pods[tr.pod].outstanding -= 1;
                    completed += 1;
                    makespan = makespan.max(times.finished);
                }
                Event::TransferDone { .. } => {}
            }
        }
        let pod = &mut pods[due.pod];
        if out.duration > 0.0 {
            schedule(pod, due.pod, end, &mut heap);
        } else if let Some(w) = pod.engine.next_wakeup() {
            schedule(pod, due.pod, w.max(t), &mut heap);
        }
    }
    summarise(
        dispatcher.name(),
        pods,
        fleet,
        results,
        itls,
        completed,
        rejected,
        makespan,
        trace.len(),
    )
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    dispatcher: String,
    pods: Vec<Pod>,
    fleet: &[Profile],
    results: Vec<RequestResult>,
    itls: Vec<f64>,
    completed: usize,
    rejected: usize,
    makespan: f64,
    requests: usize,
) -> Report {
    let done = || results.iter().filter(|r| r.e2e.is_finite());
    let ttft = Percentiles::of(done().map(|r| r.ttft).collect());
    let e2e = Percentiles::of(done().map(|r| r.e2e).collect());
    let out_tokens: u64 = done().map(|r| u64::from(r.output_tokens)).sum();
    let (q, h) = pods
        .iter()
        .fold((0u64, 0u64), |(q, h), p| (q + p.queries, h + p.hits));
    let span = makespan.max(1e-9);
    Report {
        dispatcher,
        requests,
        completed,
        rejected,
        makespan_s: makespan,
        ttft,
        itl: Percentiles::of(itls),
        e2e,
        throughput_rps: completed as f64 / span,
        output_tokens_per_s: out_tokens as f64 / span,
        prefix_hit_rate: if q == 0 { 0.0 } else { h as f64 / q as f64 },
        preemptions: pods.iter().map(|p| p.preemptions).sum(),
        steps: pods.iter().map(|p| p.steps).sum(),
        pods: pods
            .iter()
            .zip(fleet)
            .map(|(p, f)| PodReport {
                profile: f.label(),
                requests: p.requests,
                utilisation: p.busy / span,
                steps: p.steps,
                preemptions: p.preemptions,
                prefix_hit_rate: if p.queries == 0 {
                    0.0
                } else {
                    p.hits as f64 / p.queries as f64
                },
                mean_step_tokens: if p.steps == 0 {
                    0.0
                } else {
                    p.tokens as f64 / p.steps as f64
                },
            })
            .collect(),
        per_request: results,
    }
}

impl Report {
    /// Human-readable Markdown.
    pub fn to_markdown(&self) -> String {
        let ms = |p: &Percentiles| {
            format!(
                "{:.1} | {:.1} | {:.1} | {:.1} | {:.1}",
                p.mean * 1e3,
                p.p50 * 1e3,
                p.p90 * 1e3,
                p.p99 * 1e3,
                p.max * 1e3
            )
        };
        let mut s = format!(
            "dispatcher: {}; requests: {} (completed {}, rejected {}); makespan {:.1} s; {:.2} req/s; {:.0} output tok/s; \
             prefix hit rate {:.1}%; preemptions {}; steps {}\n\n",
            self.dispatcher,
            self.requests,
            self.completed,
            self.rejected,
            self.makespan_s,
            self.throughput_rps,
            self.output_tokens_per_s,
            self.prefix_hit_rate * 100.0,
            self.preemptions,
            self.steps
        );
        s.push_str("| metric (ms) | mean | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|\n");
        s.push_str(&format!(
            "| TTFT | {} |\n| ITL | {} |\n| e2e | {} |\n\n",
            ms(&self.ttft),
            ms(&self.itl),
            ms(&self.e2e)
        ));
        s.push_str("| pod | profile | requests | utilisation | steps | tokens/step | preemptions | hit rate |\n");
        s.push_str("|---|---|---|---|---|---|---|---|\n");
        for (i, p) in self.pods.iter().enumerate() {
            s.push_str(&format!(
                "| {i} | {} | {} | {:.1}% | {} | {:.1} | {} | {:.1}% |\n",
                p.profile,
                p.requests,
                p.utilisation * 100.0,
                p.steps,
                p.mean_step_tokens,
                p.preemptions,
                p.prefix_hit_rate * 100.0
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::FleetSpec;
    use crate::workload::{Arrivals, SharedPrefixSpec, Workload, shared_prefix};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn conv(secs: f64, seed: u64) -> Vec<TraceRequest> {
        Workload::AzureConv.generate(secs, None, &mut SmallRng::seed_from_u64(seed))
    }

    #[test]
    fn deterministic_for_a_seed_and_completes_everything() {
        let fleet = FleetSpec::parse("2xh100:llama-3.1-8b,l4:llama-3.1-8b")
            .unwrap()
            .pods();
        let trace = conv(60.0, 1);
        let cfg = DesConfig {
            seed: 5,
            ..Default::default()
        };
        let a = run(&fleet, &trace, &mut LeastOutstanding, &cfg);
        let b = run(&fleet, &trace, &mut LeastOutstanding, &cfg);
        assert_eq!(a, b);
        assert_eq!(a.completed + a.rejected, trace.len());
        assert!(a.completed > 200);
        assert!(a.ttft.p50 > 0.0 && a.itl.p50 > 0.005 && a.e2e.p50 > a.ttft.p50);
        let c = run(
            &fleet,
            &trace,
            &mut LeastOutstanding,
            &DesConfig {
                seed: 6,
                ..Default::default()
            },
        );
        assert_ne!(a.ttft, c.ttft, "jitter seed changes timings");
        let total: u64 = a.pods.iter().map(|p| p.requests).sum();
        assert_eq!(total as usize, trace.len() - a.rejected);
        assert!(
            a.pods
                .iter()
                .all(|p| p.utilisation > 0.0 && p.utilisation <= 1.0)
        );
        // Output tokens are exact with ignore_eos.
        for (r, t) in a.per_request.iter().zip(&trace) {
            assert_eq!(r.output_tokens, t.output_tokens);
        }
    }

    #[test]
    fn round_robin_spreads_and_shared_prefixes_hit() {
        let fleet = FleetSpec::parse("2xh100:llama-3.1-8b").unwrap().pods();
        let trace = shared_prefix(
            &SharedPrefixSpec::INFERENCE_PERF,
            Arrivals {
                rate: 20.0,
                cv: 1.0,
            },
            30.0,
            &mut SmallRng::seed_from_u64(2),
        );
        let rep = run(
            &fleet,
            &trace,
            &mut RoundRobin::default(),
            &DesConfig::default(),
        );
        assert_eq!(rep.completed, trace.len());
        let diff = rep.pods[0].requests.abs_diff(rep.pods[1].requests);
        assert!(diff <= 1);
        // system 100 of 150 tokens shared: 96 cacheable; questions repeat too (100 distinct prompts).
        assert!(rep.prefix_hit_rate > 0.5, "{}", rep.prefix_hit_rate);
        let md = rep.to_markdown();
        assert!(md.contains("TTFT") && md.contains("round-robin"));
    }

    #[test]
    fn closure_dispatcher_and_overload_preempts() {
        let fleet = FleetSpec::parse("2xl4:llama-3.1-8b").unwrap().pods();
        let trace: Vec<TraceRequest> =
            Workload::LongPrompt.generate(60.0, Some(1.0), &mut SmallRng::seed_from_u64(3));
        let mut all_on_zero = FnDispatcher(
            "pod0".to_string(),
            |_: &TraceRequest, _: &[u32], _: &[PodView<'_>]| 0,
        );
        let rep = run(&fleet, &trace, &mut all_on_zero, &DesConfig::default());
        assert_eq!(rep.pods[1].requests, 0);
        assert_eq!(rep.completed, trace.len());
        assert!(
            rep.preemptions > 0,
            "8k prompts overflow an L4's ~31k-token cache"
        );
    }
}
