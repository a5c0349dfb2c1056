//! `weir bench` against the real simulator process (`weir sim --port 0 --time-scale 50 --startup-delay 0`): exact
//! closed-loop counts checked against the sim's own `vllm:request_success_total`, streaming TTFT/ITL, the sim's
//! token-lateness histogram scraped over the run, and injected 503s counted by status.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running `weir sim`, killed on drop.
struct Sim {
    child: Child,
    url: String,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start the sim on an ephemeral port and wait (bounded) for the endpoints line it prints once bound.
async fn sim() -> Sim {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args([
            "sim",
            "--port",
            "0",
            "--time-scale",
            "50",
            "--startup-delay",
            "0",
            "--seed",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        }),
    )
    .await
    .expect("sim printed its endpoints in time")
    .unwrap()
    .unwrap();
    let v: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("endpoints line {line:?}: {e}"));
    let url = v["endpoints"][0]["url"].as_str().unwrap().to_string();
    Sim { child, url }
}

/// Run `weir bench` to completion (bounded) and return its JSON report.
async fn bench(args: &[&str]) -> Value {
    let path = std::env::temp_dir().join(format!(
        "weir-bench-sim-{}-{}.json",
        std::process::id(),
        args.join("_").len()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&path)
        .arg("--no-progress")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = tokio::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("weir bench did not stop by itself");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = child.wait_with_output().unwrap();
    assert!(
        status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    report
}

/// Sum of `vllm:request_success_total` over its label sets.
async fn successes(url: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("vllm:request_success_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_against_the_sim_is_exact_and_streams() {
    let s = sim().await;
    let before = successes(&s.url).await;
    let r = bench(&[
        "--url",
        &s.url,
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
        successes(&s.url).await - before,
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
        &s.url,
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
        &s.url,
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
