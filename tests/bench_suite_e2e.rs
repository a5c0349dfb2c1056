//! End-to-end test of `scripts/bench-routers`, the router benchmark harness: its pure pieces (`--self-test`), and
//! one real proxy cell (direct-to-backend and weir round-robin at 32 concurrent) run with this build's `weir`
//! binary, checking the JSON it writes: the binary's `--version`, medians per setup, where the requests went (the
//! fleet pod's own finished-request counter), router CPU from /proc, and the issue-5 latency goal. A router that
//! sends every request to a pod outside the measured fleet must fail its cell. Peer routers are left out so the test
//! does not need the `/opt/peers` venv.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{MODEL, Weir, metric_sum, scrape};
use serde_json::Value;

/// The workspace root (the harness lives in `scripts/`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("weir/ has a parent")
        .to_path_buf()
}

/// Run the harness under coreutils `timeout`, so a hang fails the test instead of blocking it.
fn harness(args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["300", "python3"])
        .arg(repo().join("scripts/bench-routers"))
        .args(args)
        .output()
        .expect("spawn python3 scripts/bench-routers")
}

fn fail_text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn harness_self_test_passes() {
    let out = harness(&["--self-test"]);
    assert!(out.status.success(), "{}", fail_text(&out));
}

/// Run one quick proxy c32 cell of `setups` (extra harness flags first) into a fresh directory; return the harness's
/// output, the JSON report and the markdown path.
fn proxy_cell(label: &str, extra: &[&str], setups: &str) -> (Output, Value, PathBuf) {
    let dir = std::env::temp_dir().join(format!("bench-suite-e2e-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut args = extra.to_vec();
    args.extend_from_slice(&[
        "--only",
        "proxy",
        "--setups",
        setups,
        "--loads",
        "c32",
        "--runs",
        "1",
        "--quick",
        "--wait-quiet",
        "0",
        "--max-minutes",
        "4",
        "--label",
        "e2e",
        "--weir",
        env!("CARGO_BIN_EXE_weir"),
        "--out",
        dir.to_str().expect("utf-8 temp path"),
    ]);
    let out = harness(&args);
    let json = std::fs::read_dir(&dir)
        .expect("read out dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with("-e2e.json"))
        .unwrap_or_else(|| panic!("the harness wrote no <stamp>-e2e.json\n{}", fail_text(&out)));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("read JSON"))
        .expect("valid JSON");
    (out, doc, json.with_extension("md"))
}

#[test]
fn proxy_cell_reports_medians_and_goal_for_direct_and_weir() {
    let (out, doc, md) = proxy_cell("ok", &[], "direct,weir-rr");
    assert!(out.status.success(), "{}", fail_text(&out));
    assert!(doc["command"].as_str().unwrap().contains("--only proxy"));
    assert!(doc["errors"].as_array().unwrap().is_empty(), "{doc}");
    // The report names the measured binary by its own `--version` (the commit baked in at build time).
    let version = Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        doc["binary"].as_str(),
        Some(String::from_utf8_lossy(&version.stdout).trim()),
        "{doc}"
    );

    let cell = &doc["medians"]["proxy"]["c32"];
    for setup in ["direct", "weir-rr"] {
        let m = &cell[setup];
        assert!(m["req_per_s"].as_f64().unwrap() > 0.0, "{setup}: {m}");
        assert_eq!(m["failed"].as_f64(), Some(0.0), "{setup}: {m}");
        assert!(m["e2e_p99_ms"].as_f64().unwrap() > 0.0, "{setup}: {m}");
        // Where the requests went, by the fleet pod's own count: every completed request finished on it.
        let run = &doc["results"]["proxy"]["c32"][setup][0];
        let served = run["pod_requests"].as_array().unwrap();
        assert_eq!(served.len(), 1, "{setup}: {run}");
        let completed = run["requests"].as_u64().unwrap() - run["failed"].as_u64().unwrap();
        assert!(completed > 0, "{setup}: {run}");
        assert!(served[0].as_u64().unwrap() >= completed, "{setup}: {run}");
    }
    // Only a real router process has CPU to report; direct has none.
    assert!(cell["weir-rr"]["router_cpu_us_per_req"].as_f64().unwrap() > 0.0);
    assert!(cell["direct"].get("router_cpu_us_per_req").is_none());

    let goal = doc["goals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["goal"].as_str().unwrap().contains("weir-rr, c32"))
        .expect("p99-added goal for weir at c32");
    let added = goal["value"].as_f64().unwrap();
    let expect = (cell["weir-rr"]["e2e_p99_ms"].as_f64().unwrap()
        - cell["direct"]["e2e_p99_ms"].as_f64().unwrap())
        * 1000.0;
    assert!((added - expect).abs() < 1e-6, "{added} vs {expect}");

    let text = std::fs::read_to_string(&md).expect("markdown next to the JSON");
    assert!(text.contains("| weir-rr | 1 |"), "{text}");
    assert!(text.contains("| direct | 1 |"), "{text}");
    let _ = std::fs::remove_dir_all(md.parent().unwrap());
}

/// A router that sends every request to a pod outside the measured fleet fails its cell: the harness compares the
/// fleet's own finished-request counters with what the bench completed.
#[tokio::test]
async fn a_router_sending_requests_outside_the_fleet_fails_its_cell() {
    let decoy = Weir::sim(&[]).await;
    let setup = format!(
        r#"weir-wrong={{"kind":"weir","args":["--backend","{MODEL}={}","--policy","round-robin"]}}"#,
        decoy.url()
    );
    let (out, doc, md) = proxy_cell(
        "wrong",
        &["--setup", &setup, "--add-setups", "proxy=weir-wrong"],
        "weir-wrong",
    );
    assert!(!out.status.success(), "{}", fail_text(&out));
    let errors = doc["errors"].as_array().unwrap();
    assert!(
        errors.iter().any(|e| {
            let e = e.as_str().unwrap();
            e.starts_with("proxy/c32/weir-wrong") && e.contains("went to a pod outside the fleet")
        }),
        "{doc}"
    );
    // The requests really went to the decoy.
    let served = metric_sum(&scrape(decoy.url()).await, "vllm:request_success_total", "");
    assert!(served > 100.0, "the decoy finished {served} requests");
    let _ = std::fs::remove_dir_all(md.parent().unwrap());
}
