//! `weir bench`: an open-loop (Poisson arrivals, or a trace's own times) and closed-loop (fixed concurrency) load
//! generator for any OpenAI-compatible server or router, measuring TTFT, ITL, e2e, throughput and goodput from the
//! client side.
//!
//! Seams: [`workload`] (pure, seeded request specs), [`sse`] (pure stream parsing), [`report`] (pure statistics),
//! [`prom`] (pure histogram maths), [`client`] (HTTP). This module is the shell that owns time: it schedules
//! arrivals, caps in-flight requests, collects records and scrapes server histograms before and after.

pub mod client;
pub mod prom;
pub mod qos;
pub mod report;
pub mod sse;
pub mod tenants;
pub mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use client::{HttpClient, LoadClient, Target};
use report::{Report, RequestRecord, ServerHistogram, Slo};
use workload::{Generator, RequestSpec, Sessions, TraceBuilder, TraceEntry};

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Poisson arrivals at this many requests per second (infinite: all at once).
    Open { rate: f64 },
    /// A fixed number of workers, each sending its next request when the previous one ends.
    Closed { concurrency: usize },
    /// Arrivals at the trace's `t` values (divided by `speed`).
    Trace { speed: f64 },
}

/// Where request specs come from.
#[derive(Debug)]
pub enum Source {
    Preset(Generator),
    Trace(Vec<TraceEntry>),
    /// Multi-turn sessions drawn up front, replayed at their own times (`Mode::Trace`).
    Sessions(Sessions),
}

/// A validated benchmark run.
#[derive(Debug)]
pub struct Plan {
    pub target: Target,
    pub mode: Mode,
    pub source: Source,
    /// Stop sending after this much measured time (warm-up excluded).
    pub duration: Option<Duration>,
    /// Stop after this many measured requests.
    pub requests: Option<u64>,
    /// Requests sent during this first stretch are not measured.
    pub warmup: Duration,
    /// Cap on requests in flight (arrivals wait for a slot in open loop).
    pub max_in_flight: usize,
    pub seed: u64,
    pub slo: Slo,
    /// `/metrics` URLs to scrape before and after for server-side histograms.
    pub scrape: Vec<hyper::Uri>,
    /// Show a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
    /// Echoed into the JSON report.
    pub config_echo: serde_json::Value,
}

/// Server-side histograms reported when a scraped target exposes them.
pub const SERVER_HISTOGRAMS: &[&str] = &["weir_sim_token_lateness_seconds"];

/// The shared request source: specs drawn in order from one seeded RNG.
struct Specs {
    source: Source,
    rng: SmallRng,
    trace: TraceBuilder,
    /// Next trace entry.
    next: usize,
}

impl Specs {
    fn next_spec(&mut self) -> Option<RequestSpec> {
        match &self.source {
            Source::Preset(g) => Some(g.next_spec(&mut self.rng)),
            Source::Trace(entries) => {
                let e = entries.get(self.next)?;
                self.next += 1;
                Some(self.trace.spec(e, &mut self.rng))
            }
            Source::Sessions(s) => {
                let spec = s.specs.get(self.next)?.clone();
                self.next += 1;
                Some(spec)
            }
        }
    }
}

/// Shared state of a running benchmark.
struct Run {
    client: LoadClient,
    target: Target,
    specs: Mutex<Specs>,
    /// Index of the tenant this load belongs to (0 in single-tenant runs), sent with each record.
    tenant: usize,
    records: mpsc::UnboundedSender<(usize, RequestRecord)>,
    /// Start of the run (warm-up included).
    t0: Instant,
}

impl Run {
    fn offset(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    async fn one(&self, spec: RequestSpec) {
        let body = client::body(&self.target, &spec);
        let rec = client::send(
            &self.client,
            &self.target,
            body,
            self.offset(),
            spec.prompt_tokens,
        )
        .await;
        // The receiver lives until every sender is gone; a send error means the run is being torn down.
        let _ = self.records.send((self.tenant, rec));
    }
}

/// Run the plan to completion and build the report.
pub async fn run(plan: Plan) -> Report {
    let scrape_client = client::http_client(Duration::from_secs(2));
    // Server counters and histograms cover the measured window: the "before" scrape is taken when the warm-up ends
    // (right away without a warm-up), concurrently with the load.
    let before = if plan.warmup.is_zero() {
        let b = scrape_all(&scrape_client, &plan.scrape).await;
        tokio::spawn(async move { b })
    } else {
        let (client, urls, warmup) = (scrape_client.clone(), plan.scrape.clone(), plan.warmup);
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            scrape_all(&client, &urls).await
        })
    };

    let rng = SmallRng::seed_from_u64(plan.seed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let run = Arc::new(Run {
        client: client::load_client(plan.target.timeout.min(Duration::from_secs(10))),
        target: plan.target.clone(),
        specs: Mutex::new(Specs {
            source: plan.source,
            rng,
            trace: TraceBuilder::new(plan.seed),
            next: 0,
        }),
        tenant: 0,
        records: tx,
        t0: Instant::now(),
    });
    let warmup = plan.warmup;
    let deadline = plan.duration.map(|d| run.t0 + warmup + d);
    let (total_known, cache_bound) = match (&run.specs.lock().source, plan.requests) {
        (Source::Sessions(s), n) => (n.or(Some(s.specs.len() as u64)), Some(s.bound)),
        (_, Some(n)) => (Some(n), None),
        (Source::Trace(e), None) => (Some(e.len() as u64), None),
        _ => (None, None),
    };
    let bar = progress_bar(
        plan.progress,
        total_known,
        plan.duration.map(|d| d + warmup),
    );

    let collector = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut recs = Vec::new();
            let mut errors = 0u64;
            while let Some((_, r)) = rx.recv().await {
                bar.inc(1);
                if r.error.is_some() {
                    errors += 1;
                    bar.set_message(format!("errors: {errors}"));
                }
                recs.push(r);
            }
            recs
        })
    };
    let limit = Limits {
        requests: plan.requests,
        deadline,
        warmup_end: run.t0 + warmup,
    };
    match plan.mode {
        Mode::Closed { concurrency } => {
            closed_loop(&run, concurrency.min(plan.max_in_flight), &limit).await
        }
        Mode::Open { rate } => {
            open_loop(&run, Arrivals::Poisson(rate), plan.max_in_flight, &limit).await
        }
        Mode::Trace { speed } => {
            open_loop(&run, Arrivals::Trace(speed), plan.max_in_flight, &limit).await
        }
    }
    let end = Instant::now();
    let t0 = run.t0;
    drop(run);
    let records = collector.await.unwrap_or_default();
    bar.finish_and_clear();

    let warmup_s = warmup.as_secs_f64();
    let measured = measured_s(&records, warmup_s, (end - t0).as_secs_f64());

    let after = scrape_all(&scrape_client, &plan.scrape).await;
    let before = before
        .await
        .unwrap_or_else(|_| vec![None; plan.scrape.len()]);
    let server = server_histograms(&before, &after);
    let prefix_cache = server_prefix_cache(&before, &after);
    let mut report = report::build(
        &records,
        warmup_s,
        measured,
        plan.slo,
        plan.config_echo,
        server,
        prefix_cache,
    );
    report.cache_bound = cache_bound;
    report
}

/// Measured time: end of the warm-up to the last measured completion, at most the run's wall time.
fn measured_s<'a>(
    records: impl IntoIterator<Item = &'a RequestRecord>,
    warmup_s: f64,
    elapsed_s: f64,
) -> f64 {
    let last_done = records
        .into_iter()
        .filter(|r| r.start >= warmup_s)
        .map(|r| r.start + r.e2e)
        .fold(warmup_s, f64::max);
    (last_done - warmup_s).max(0.0).min(elapsed_s)
}

/// A validated multi-tenant run: every tenant's load at once, on one clock.
#[derive(Debug)]
pub struct TenantsPlan {
    /// Endpoint, model, API, timeout and extra headers shared by every tenant (`stream` is set per tenant, and each
    /// tenant's key is added as `Authorization: Bearer`).
    pub target: Target,
    pub tenants: Vec<tenants::TenantLoad>,
    /// Stop sending after this much measured time (warm-up excluded).
    pub duration: Duration,
    /// Requests sent during this first stretch are not measured.
    pub warmup: Duration,
    pub seed: u64,
    /// Show a progress spinner on stderr (only when it is a terminal).
    pub progress: bool,
    /// Echoed into the JSON report.
    pub config_echo: serde_json::Value,
}

/// Run every tenant's load concurrently (each its own open or closed loop, request source and in-flight cap, all
/// from one start time) and build the per-tenant report.
pub async fn run_tenants(plan: TenantsPlan) -> qos::QosReport {
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, RequestRecord)>();
    let client = client::load_client(plan.target.timeout.min(Duration::from_secs(10)));
    let t0 = Instant::now();
    let limit = Limits {
        requests: None,
        deadline: Some(t0 + plan.warmup + plan.duration),
        warmup_end: t0 + plan.warmup,
    };
    let bar = progress_bar(plan.progress, None, Some(plan.duration + plan.warmup));
    let n = plan.tenants.len();
    let collector = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut recs: Vec<Vec<RequestRecord>> = vec![Vec::new(); n];
            while let Some((i, r)) = rx.recv().await {
                bar.inc(1);
                if let Some(v) = recs.get_mut(i) {
                    v.push(r);
                }
            }
            recs
        })
    };
    let mut loads = tokio::task::JoinSet::new();
    for (i, t) in plan.tenants.iter().enumerate() {
        let Some(preset) = t.preset() else {
            continue; // validated before: every tenant has a preset
        };
        // Each tenant draws from its own stream, seeded by its name: adding, removing or reordering tenants
        // (`--only-tiers interactive` for the baseline) leaves every other tenant's requests and times unchanged.
        let seed = plan.seed ^ tenants::name_seed(&t.name);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut target = plan.target.clone();
        target.stream = t.stream;
        if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("Bearer {}", t.key)) {
            target.headers.push((hyper::header::AUTHORIZATION, v));
        }
        let run = Arc::new(Run {
            client: client.clone(),
            target,
            specs: Mutex::new(Specs {
                source: Source::Preset(Generator::new(preset, &mut rng)),
                rng,
                trace: TraceBuilder::new(seed),
                next: 0,
            }),
            tenant: i,
            records: tx.clone(),
            t0,
        });
        let (mode, max_in_flight) = (t.mode(), t.max_in_flight);
        loads.spawn(async move {
            match mode {
                Mode::Closed { concurrency } => {
                    closed_loop(&run, concurrency.min(max_in_flight), &limit).await
                }
                Mode::Open { rate } => {
                    open_loop(&run, Arrivals::Poisson(rate), max_in_flight, &limit).await
                }
                Mode::Trace { speed } => {
                    open_loop(&run, Arrivals::Trace(speed), max_in_flight, &limit).await
                }
            }
        });
    }
    drop(tx);
    while loads.join_next().await.is_some() {}
    let elapsed = t0.elapsed().as_secs_f64();
    let records = collector.await.unwrap_or_default();
    bar.finish_and_clear();
    let warmup_s = plan.warmup.as_secs_f64();
    let measured = measured_s(records.iter().flatten(), warmup_s, elapsed);
    qos::build(
        &plan.tenants,
        &records,
        warmup_s,
        measured,
        plan.config_echo,
    )
}

/// vLLM's prefix-cache counters over the window, summed over targets that answered both scrapes.
fn server_prefix_cache(
    before: &[Option<String>],
    after: &[Option<String>],
) -> Option<report::ServerPrefixCache> {
    const HITS: &str = "vllm:prefix_cache_hits_total";
    const QUERIES: &str = "vllm:prefix_cache_queries_total";
    let (mut hits, mut queries, mut seen) = (0.0, 0.0, false);
    for (b, a) in before.iter().zip(after) {
        let (Some(b), Some(a)) = (b.as_deref(), a.as_deref()) else {
            continue;
        };
        let get = |t, n| prom::counter(t, n);
        if let (Some(hb), Some(ha), Some(qb), Some(qa)) =
            (get(b, HITS), get(a, HITS), get(b, QUERIES), get(a, QUERIES))
        {
            hits += (ha - hb).max(0.0);
            queries += (qa - qb).max(0.0);
            seen = true;
        }
    }
    (seen && queries > 0.0).then(|| report::ServerPrefixCache {
        hits,
        queries,
        hit_rate: hits / queries,
    })
}

/// When to stop issuing.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Measured requests to send.
    requests: Option<u64>,
    /// No new request after this instant.
    deadline: Option<Instant>,
    /// End of the warm-up; requests issued before it are extra.
    warmup_end: Instant,
}

/// Counts measured requests handed out so that `--requests` is exact under concurrency.
struct Tickets {
    measured: AtomicU64,
}

impl Tickets {
    /// Take a ticket for a request about to be sent now; false when the run is over.
    fn take(&self, limit: &Limits, now: Instant) -> bool {
        if limit.deadline.is_some_and(|d| now >= d) {
            return false;
        }
        if now < limit.warmup_end {
            return true;
        }
        match limit.requests {
            None => true,
            Some(n) => self.measured.fetch_add(1, Ordering::Relaxed) < n,
        }
    }
}

async fn closed_loop(run: &Arc<Run>, concurrency: usize, limit: &Limits) {
    let tickets = Arc::new(Tickets {
        measured: AtomicU64::new(0),
    });
    let mut workers = tokio::task::JoinSet::new();
    let limit = Arc::new(*limit);
    for _ in 0..concurrency.max(1) {
        let (run, tickets, limit) = (run.clone(), tickets.clone(), limit.clone());
        workers.spawn(async move {
            while tickets.take(&limit, Instant::now()) {
                let Some(spec) = run.specs.lock().next_spec() else {
                    break;
                };
                run.one(spec).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

enum Arrivals {
    Poisson(f64),
    Trace(f64),
}

async fn open_loop(run: &Arc<Run>, arrivals: Arrivals, max_in_flight: usize, limit: &Limits) {
    let slots = Arc::new(Semaphore::new(
        max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let tickets = Tickets {
        measured: AtomicU64::new(0),
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut gaps = SmallRng::seed_from_u64(run.specs.lock().rng.random());
    let mut next_at = run.t0;
    let mut delayed = 0u64;
    loop {
        let Some(spec) = run.specs.lock().next_spec() else {
            break;
        };
        next_at = match arrivals {
            Arrivals::Poisson(rate) if rate.is_finite() && rate > 0.0 => {
                let gap = Exp::new(rate).map_or(0.0, |e| e.sample(&mut gaps));
                next_at + Duration::from_secs_f64(gap)
            }
            Arrivals::Poisson(_) => next_at,
            Arrivals::Trace(speed) => {
                run.t0 + Duration::from_secs_f64(spec.at.unwrap_or(0.0) / speed.max(1e-9))
            }
        };
        if limit.deadline.is_some_and(|d| next_at >= d) {
            break;
        }
        tokio::time::sleep_until(next_at).await;
        if !tickets.take(limit, next_at) {
            break;
        }
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                delayed += 1;
                match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break,
                }
            }
        };
        let run = run.clone();
        tasks.spawn(async move {
            run.one(spec).await;
            drop(permit);
        });
        // Reap finished tasks so the set does not grow with the whole run.
        while tasks.try_join_next().is_some() {}
    }
    if delayed > 0 {
        tracing::warn!(
            delayed,
            max_in_flight,
            "arrivals waited for the --max-in-flight cap; the load was not fully open-loop"
        );
    }
    while tasks.join_next().await.is_some() {}
}

fn progress_bar(enabled: bool, total: Option<u64>, duration: Option<Duration>) -> ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let template = if total.is_some() {
        "{elapsed_precise} [{bar:40}] {pos}/{len} done {per_sec} {msg}"
    } else {
        "{elapsed_precise} {spinner} {pos} done {per_sec} {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    if let Some(d) = duration {
        bar.set_message(format!("(run {:.0}s)", d.as_secs_f64()));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// GET each URL; the body of each that answered 200.
async fn scrape_all(client: &HttpClient, urls: &[hyper::Uri]) -> Vec<Option<String>> {
    let mut out = Vec::with_capacity(urls.len());
    for u in urls {
        out.push(scrape(client, u).await);
    }
    out
}

async fn scrape(client: &HttpClient, url: &hyper::Uri) -> Option<String> {
    use http_body_util::{BodyExt, Full};
    let req = hyper::Request::get(url.clone())
        .body(Full::new(bytes::Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .ok()?
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .ok()?
        .ok()?;
    String::from_utf8(body.to_bytes().to_vec()).ok()
}

/// Each known histogram's delta over the run, summed across scraped targets.
fn server_histograms(before: &[Option<String>], after: &[Option<String>]) -> Vec<ServerHistogram> {
    let mut out = Vec::new();
    for name in SERVER_HISTOGRAMS {
        let mut total: Option<prom::Histogram> = None;
        for (b, a) in before.iter().zip(after) {
            let Some(a) = a.as_deref().and_then(|t| prom::Histogram::parse(t, name)) else {
                continue;
            };
            let b = b
                .as_deref()
                .and_then(|t| prom::Histogram::parse(t, name))
                .unwrap_or_default();
            let d = a.delta(&b);
            total = Some(match total {
                None => d,
                Some(t) => t.sum(&d),
            });
        }
        if let Some(h) = total {
            out.push(ServerHistogram {
                name: (*name).to_string(),
                count: h.count(),
                p50_ms: h.quantile(0.5) * 1000.0,
                p99_ms: h.quantile(0.99) * 1000.0,
            });
        }
    }
    out
}
