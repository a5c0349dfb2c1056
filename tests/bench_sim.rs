//! `weir bench` against the real simulator process (`weir sim --port 0 --time-scale 50 --startup-delay 0`): exact
//! closed-loop counts checked against the sim's own `vllm:request_success_total`, streaming TTFT/ITL, the sim's
//! token-lateness histogram scraped over the run, and injected 503s counted by status.

mod common;

use std::time::Duration;

use common::{Weir, metric_sum, run_bench, scrape};
use serde_json::Value;

/// A ready `weir sim` (time-scale 50, seed 1) on an ephemeral port.
async fn sim() -> Weir {
    Weir::sim(&["--seed", "1"]).await
}

/// Run `weir bench` to completion (bounded) and return its JSON report.
async fn bench(args: &[&str]) -> Value {
    run_bench(args, Duration::from_secs(120)).await.report
}

/// Sum of `vllm:request_success_total` over its label sets.
async fn successes(url: &str) -> f64 {
    metric_sum(&scrape(url).await, "vllm:request_success_total", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_against_the_sim_is_exact_and_streams() {
    let s = sim().await;
    let before = successes(s.url()).await;
    let r = bench(&[
        "--url",
        s.url(),
        "--workload",
        "shared-prefix",
        "--output-tokens",
        "20",
        "--concurrency",
        "8",
        "--requests",
        "40",
    ])
    .await;
    assert_eq!(r["successful"], 40, "{r}");
    assert_eq!(
        successes(s.url()).await - before,
        40.0,
        "the sim finished exactly --requests requests"
    );
    assert_eq!(
        r["total_output_tokens"],
        40 * 20,
        "ignore_eos + max_tokens give exact lengths"
    );
    assert_eq!(r["ttft_ms"]["count"], 40);
    assert!(r["ttft_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(r["itl_ms"]["count"].as_u64().unwrap() > 0);
    // inference-perf shape: system 100 + question 50 tokens, plus the chat template.
    let prompt_per_req = r["total_prompt_tokens"].as_u64().unwrap() / 40;
    assert!(
        (150..200).contains(&prompt_per_req),
        "prompt tokens per request {prompt_per_req}"
    );
    let lateness = r["server"].as_array().unwrap();
    assert_eq!(
        lateness.len(),
        1,
        "sim exposes weir_sim_token_lateness_seconds"
    );
    assert_eq!(
        lateness[0]["count"].as_f64(),
        Some(800.0),
        "one lateness observation per streamed token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_against_the_sim_stops_and_counts_injected_errors() {
    let s = sim().await;
    let r = bench(&[
        "--url",
        s.url(),
        "--api",
        "completions",
        "--workload",
        "tiny",
        "--rate",
        "50",
        "--duration",
        "1s",
    ])
    .await;
    let n = r["requests"].as_u64().unwrap();
    assert!((20..=90).contains(&n), "Poisson(50) over 1 s sent {n}");
    assert_eq!(r["failed"], 0);
    let r = bench(&[
        "--url",
        s.url(),
        "--workload",
        "tiny",
        "--concurrency",
        "3",
        "--requests",
        "12",
        "--header",
        "X-Return-Error: 503",
    ])
    .await;
    assert_eq!(r["errors"]["http_503"], 12, "{r}");
}
