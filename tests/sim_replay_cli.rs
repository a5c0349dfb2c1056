//! End-to-end: `weir calibrate` and `weir replay` through the real binary, and `weir --version` naming the commit
//! the binary was built from.

mod common;

use std::time::Duration;

use common::run_weir_blocking;

/// Run `weir <args>`, which must succeed, and parse its stdout as JSON.
fn weir(args: &[&str]) -> serde_json::Value {
    let out = run_weir_blocking(args, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "weir {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json output")
}

#[test]
fn calibrate_json_has_every_referenced_point_within_20_percent() {
    let rows = weir(&["calibrate", "--format", "json"]);
    let rows = rows.as_array().unwrap();
    assert!(rows.len() >= 8);
    let mut referenced = 0;
    for r in rows {
        for p in r["points"].as_array().unwrap() {
            if let Some(ratio) = p["ratio"].as_f64() {
                assert!((0.8..=1.2).contains(&ratio), "{r}");
                referenced += 1;
            }
        }
    }
    assert_eq!(referenced, 30);
}

#[test]
fn replay_is_deterministic_and_completes_the_trace() {
    let args = [
        "replay",
        "--workload",
        "shared-prefix",
        "--duration",
        "30",
        "--fleet",
        "2xh100:llama-3.1-8b,l4:llama-3.1-8b",
        "--seed",
        "7",
        "--format",
        "json",
    ];
    let a = weir(&args);
    let b = weir(&args);
    assert_eq!(a["report"], b["report"]);
    let rep = &a["report"];
    assert_eq!(rep["completed"], rep["requests"]);
    assert!(rep["requests"].as_u64().unwrap() > 200);
    assert_eq!(rep["pods"].as_array().unwrap().len(), 3);
    assert!(rep["prefix_hit_rate"].as_f64().unwrap() > 0.5);
    assert!(a["wall_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(a["workload"], "shared-prefix");
}

#[test]
fn replay_rejects_a_bad_fleet() {
    let out = run_weir_blocking(
        &[
            "replay",
            "--fleet",
            "3xv100:llama-3.1-8b",
            "--duration",
            "1",
        ],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown GPU"));
}

#[test]
fn replay_runs_the_bench_presets_by_either_name() {
    for (name, canonical) in [
        ("tiny", "tiny"),
        ("long-context-rag", "long-context-rag"),
        ("batch", "batch"),
        ("chat", "azure-conv"),
    ] {
        let v = weir(&[
            "replay",
            "--workload",
            name,
            "--duration",
            "10",
            "--fleet",
            "h100:llama-3.1-8b",
            "--seed",
            "3",
            "--format",
            "json",
        ]);
        assert_eq!(v["workload"], canonical);
        let rep = &v["report"];
        assert!(rep["requests"].as_u64().unwrap() > 0, "{name}: {rep}");
        assert_eq!(rep["completed"], rep["requests"], "{name}");
    }
}

/// The harness itself: a process that dies before its first stdout line fails the test with its stderr.
#[test]
#[should_panic(expected = "unexpected argument")]
fn harness_shows_stderr_of_a_process_that_dies_at_start() {
    common::Weir::start(&["sim", "--no-such-flag"]);
}

/// `weir --version` is `weir <version> (<commit>[-dirty])`, the commit the binary was built from (weir/build.rs):
/// benchmark records name the measured binary with it. In a git checkout the commit is this tree's HEAD, `-dirty`
/// exactly when the workspace's crates or manifests differ from it (cargo rebuilds the binary on any change there).
#[test]
fn version_names_the_commit_the_binary_was_built_from() {
    let out = run_weir_blocking(&["--version"], Duration::from_secs(30));
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.trim();
    let rest = line
        .strip_prefix(&format!("weir {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("`{line}`"));
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"][..]) {
        Some(head) => {
            // The sources build.rs checks: the workspace's crates and manifests (not docs or results).
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap();
            let mut status = vec![
                "status".to_owned(),
                "--porcelain".to_owned(),
                "--".to_owned(),
            ];
            for e in std::fs::read_dir(root).unwrap().flatten() {
                if e.path().join("Cargo.toml").is_file() {
                    status.push(e.path().display().to_string());
                }
            }
            status.extend(["Cargo.toml", "Cargo.lock"].map(|f| root.join(f).display().to_string()));
            let status: Vec<&str> = status.iter().map(String::as_str).collect();
            let dirty = !git(&status[..]).unwrap().is_empty();
            let want = if dirty { format!("{head}-dirty") } else { head };
            assert_eq!(rest, want, "`{line}`");
        }
        None => assert_eq!(rest, "unknown", "`{line}` outside a git checkout"),
    }
    // Every subcommand reports the same.
    let sub = run_weir_blocking(&["serve", "--version"], Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&sub.stdout).contains(&format!("({rest})")));
}
