//! End-to-end test of `scripts/bench-routers`, the router benchmark harness: its pure pieces (`--self-test`), and
//! one real proxy cell (direct-to-backend and weir round-robin at 32 concurrent) run with this build's `weir`
//! binary, checking the JSON it writes: medians per setup, router CPU from /proc, and the issue-5 latency goal.
//! Peer routers are left out so the test does not need the `/opt/peers` venv.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

#[test]
fn proxy_cell_reports_medians_and_goal_for_direct_and_weir() {
    let dir = std::env::temp_dir().join(format!("bench-suite-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = harness(&[
        "--only",
        "proxy",
        "--setups",
        "direct,weir-rr",
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
    assert!(out.status.success(), "{}", fail_text(&out));

    let json = std::fs::read_dir(&dir)
        .expect("read out dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with("-e2e.json"))
        .expect("the harness wrote <stamp>-e2e.json");
    let md = json.with_extension("md");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("read JSON"))
        .expect("valid JSON");
    assert!(doc["command"].as_str().unwrap().contains("--only proxy"));
    assert!(doc["errors"].as_array().unwrap().is_empty(), "{doc}");

    let cell = &doc["medians"]["proxy"]["c32"];
    for setup in ["direct", "weir-rr"] {
        let m = &cell[setup];
        assert!(m["req_per_s"].as_f64().unwrap() > 0.0, "{setup}: {m}");
        assert_eq!(m["failed"].as_f64(), Some(0.0), "{setup}: {m}");
        assert!(m["e2e_p99_ms"].as_f64().unwrap() > 0.0, "{setup}: {m}");
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
    let _ = std::fs::remove_dir_all(&dir);
}
