//! `weir bench --preset qos` end to end (issue 20): a one-pod simulated fleet, `weir serve` with a tenants config
//! written from the preset's own tenants (`--print-tenants`, keys SHA-256-hashed), and the preset run against it for
//! a few seconds. Every tenant gets its row; the steady tiers are served and never shed, the batch flood (10x the
//! pod's capacity) is partly served and partly shed with 429 by admission.

mod common;

use std::time::Duration;

use common::{MODEL, Weir};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Batch-workload requests per second one simulated H100 pod completes at time-scale 2: the 8-pod fleet's 52
/// (`tenants::QOS_CAPACITY_8XH100_8B`) / 8 x 2.
const CAPACITY: &str = "13";

fn hex_sha256(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_preset_runs_against_a_router_with_tenants_and_reports_every_tenant() {
    let fleet = Weir::fleet(1, "2", &[]).await;
    let out = common::run_weir(
        &[
            "bench",
            "--preset",
            "qos",
            "--capacity",
            CAPACITY,
            "--print-tenants",
        ],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loads: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(loads.len(), 7);
    // The flood's queues are short and its waits bounded, so its excess is shed at once and the run ends soon after
    // the load stops.
    let tenants: Vec<Value> = loads
        .iter()
        .map(|t| {
            let batch = t["tier"] == "batch";
            serde_json::json!({
                "tenant": t["name"], "tier": t["tier"], "weight": t["weight"],
                "identity": {"apiKeys": [{"sha256": hex_sha256(t["key"].as_str().unwrap())}]},
                "queue": if batch { serde_json::json!({"maxQueued": 8, "maxWaitMs": 2000}) }
                         else { serde_json::json!({"maxQueued": 100, "maxWaitMs": 30000}) },
            })
        })
        .collect();
    let config = serde_json::json!({
        "pools": [{"name": "llama-8b", "model": MODEL, "endpoints": fleet.urls(), "policy": {"kind": "cache-aware"}}],
        "tenants": tenants,
        // At most 32 requests on the pod: admitted batch requests (600 output tokens) run in a small batch and
        // finish within seconds of the load stopping, instead of a 256-sequence batch draining for 15 s.
        "admission": {"max_in_flight": 32},
    });
    let path = std::env::temp_dir().join(format!("weir-qos-e2e-{}.yaml", std::process::id()));
    std::fs::write(&path, config.to_string()).unwrap();
    let router = Weir::serve(&["--config", path.to_str().unwrap()]).await;

    let run = common::run_bench(
        &[
            "--url",
            router.url(),
            "--model",
            MODEL,
            "--preset",
            "qos",
            "--capacity",
            CAPACITY,
            "--duration",
            "3s",
            "--timeout",
            "30s",
            "--seed",
            "1",
        ],
        Duration::from_secs(90),
    )
    .await;
    let _ = std::fs::remove_file(&path);
    let r = run.report;
    let rows = r["tenants"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|t| t["tenant"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "interactive-1",
            "interactive-2",
            "standard-1",
            "standard-2",
            "batch-1",
            "batch-2",
            "batch-3"
        ]
    );
    for t in rows {
        assert!(
            run.stdout
                .contains(&format!("| {} |", t["tenant"].as_str().unwrap())),
            "{}",
            run.stdout
        );
    }
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    // Interactive and standard: every request served (none shed by admission, none failed).
    let steady: Vec<&Value> = rows.iter().filter(|t| t["tier"] != "batch").collect();
    assert!(
        steady.iter().map(|t| n(&t["requests"])).sum::<u64>() > 0,
        "{r}"
    );
    for t in &steady {
        assert_eq!(t["completed"], t["requests"], "{t}");
        assert_eq!(t["ttft_ms"]["count"], t["completed"], "{t}");
    }
    // Batch: a flood at 10x the pod's capacity, partly served, partly shed with 429 by admission.
    let batch = r["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == "batch")
        .unwrap();
    assert!(n(&batch["completed"]) > 0, "{batch}");
    assert!(n(&batch["rejected"]["429"]) > 0, "{batch}");
    assert!(batch["cost_share"].as_f64().unwrap() > 0.0, "{batch}");
    assert_eq!(
        batch["jain"][0]["tenants"],
        serde_json::json!(["batch-1", "batch-2"])
    );
}
