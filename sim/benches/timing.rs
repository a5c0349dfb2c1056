//! The simulator's two timing claims, measured rather than asserted in unit tests (a loaded 2-core host breaks any
//! fixed real-clock bound at random). Each is reported against tokio's own timer as the baseline, in one run:
//!
//! 1. `precise::sleep_until` (a timerfd) wakes within microseconds of its deadline, where tokio's timer wakes on its
//!    next 1 ms tick (median lateness ~500 µs). Needed by `weir sim --min-latency`.
//! 2. The engine driver does not wait for a timer tick when a step's end has already passed (`--time-scale 1e6`
//!    proxy benchmarks): a one-token request at time-scale 1e9 finishes in tens of microseconds, where a sleep to an
//!    already-passed deadline costs up to a tick.
//!
//! `cargo bench -p sim --bench timing` (a plain `harness = false` program: no criterion, the numbers are
//! distributions of lateness, not throughput).

#![allow(clippy::unwrap_used)] // a bench: a failed unwrap is a failed run
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sim::driver::{Driver, DriverOptions};
use sim::engine::{Engine, EngineConfig, EngineRequest};
use sim::metrics::{Metrics, MetricsConfig};
use sim::profile::Profile;
use tokio::time::Instant;

const N: usize = 200;

fn summary(mut xs: Vec<Duration>) -> (Duration, Duration) {
    xs.sort();
    (xs[xs.len() / 2], xs[xs.len() * 99 / 100])
}

async fn lateness<F: Future<Output = ()>>(sleep: impl Fn(Instant) -> F) -> (Duration, Duration) {
    let mut late = Vec::with_capacity(N);
    for i in 0..N as u64 {
        let d = Instant::now() + Duration::from_micros(1_300 + 37 * (i % 27));
        sleep(d).await;
        late.push(Instant::now().saturating_duration_since(d));
    }
    summary(late)
}

async fn one_token_requests() -> (Duration, Duration, usize) {
    let p = Profile::resolve("h100", "llama-3.1-8b").unwrap();
    let mut cfg = EngineConfig::new(p);
    cfg.jitter = 0.0;
    let metrics = Arc::new(Mutex::new(Metrics::new(MetricsConfig {
        model_name: "m".into(),
        legacy: false,
        max_model_len: 1000,
        cache_config: vec![],
        created_unix: 0.0,
        gpu: None,
    })));
    let d = Driver::spawn(
        Engine::new(cfg),
        DriverOptions {
            time_scale: 1e9,
            metrics,
            kv: None,
            transfers: None,
        },
    );
    let mut took = Vec::with_capacity(N);
    for i in 0..N as u64 {
        let req = EngineRequest::new(d.next_id(), (0..8).collect(), 1, i);
        let t0 = Instant::now();
        let mut h = d.submit(req, 1);
        while h.next().await.is_some() {}
        took.push(t0.elapsed());
    }
    let fast = took
        .iter()
        .filter(|t| **t < Duration::from_micros(200))
        .count();
    let (p50, p99) = summary(took);
    (p50, p99, fast)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (t50, t99) = lateness(tokio::time::sleep_until).await;
        let (p50, p99) = lateness(sim::precise::sleep_until).await;
        println!("sleep lateness over {N} sleeps of 1.3-2.3 ms (median / p99):");
        println!("  tokio::time::sleep_until  {t50:>10.1?} / {t99:>10.1?}   (baseline)");
        println!(
            "  precise::sleep_until      {p50:>10.1?} / {p99:>10.1?}   median {:.3}x the baseline",
            p50.as_secs_f64() / t50.as_secs_f64().max(1e-9)
        );
        let mut passed = Vec::with_capacity(N);
        for _ in 0..N {
            let t0 = Instant::now();
            tokio::time::sleep_until(t0).await;
            passed.push(t0.elapsed());
        }
        let (b50, b99) = summary(passed);
        let (r50, r99, fast) = one_token_requests().await;
        println!("one-token requests through the engine driver at time-scale 1e9 (median / p99):");
        println!("  tokio sleep to a passed deadline  {b50:>10.1?} / {b99:>10.1?}   (baseline: a timer tick)");
        println!(
            "  request submit -> finished         {r50:>10.1?} / {r99:>10.1?}   {fast} of {N} within 200 us; median {:.3}x the baseline",
            r50.as_secs_f64() / b50.as_secs_f64().max(1e-9)
        );
    });
}
