//! End-to-end admission: real `weir serve` with tenants in front of real `weir sim` pods. Nothing is lost under
//! overload with client cancellations and pod faults (per tenant admitted = completed + failed + cancelled, and the
//! ledger's tokens equal the pods' own counters), and a `kill -9` of the router loses at most one second of usage.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Weir, client, eventually, metric_sum, scrape};
use futures::StreamExt;
use policies::tenant::ApiKeyHash;
use serde_json::{Value, json};

const ADMIN: &str = "sk-admin";
const TENANTS: [(&str, &str, &str); 3] = [
    ("ia", "interactive", "sk-ia"),
    ("st", "standard", "sk-st"),
    ("ba", "batch", "sk-ba"),
];

/// A config file: one pool `m` over `pods`, the three tenants with short queues, the admin key, `extra` YAML lines.
fn config(dir: &std::path::Path, pods: &[String], extra: &str) -> std::path::PathBuf {
    let h = |k: &str| ApiKeyHash::of(k).to_hex();
    let mut y = format!(
        "pools: [{{name: m, endpoints: [{}]}}]\nscrape: {{interval: 50ms}}\n\
         retry: {{max_attempts: 2}}\ntenants:\n",
        pods.join(", ")
    );
    for (name, tier, key) in TENANTS {
        y.push_str(&format!(
            "  - {{tenant: {name}, tier: {tier}, queue: {{maxQueued: 6, maxWaitMs: 1500}}, identity: {{apiKeys: [{{sha256: '{}'}}]}}}}\n",
            h(key)
        ));
    }
    y.push_str(&format!(
        "admission: {{admin_keys: ['{}'], {extra}}}\n",
        h(ADMIN)
    ));
    let p = dir.join("weir.yaml");
    std::fs::write(&p, y).unwrap();
    p
}

/// Every usage row (admin key).
async fn usage_rows(router: &str) -> Vec<Value> {
    let r = client()
        .get(format!("{router}/v1/usage"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["data"].as_array().unwrap().clone()
}

fn sum(rows: &[Value], field: &str) -> u64 {
    rows.iter().map(|r| r[field].as_u64().unwrap()).sum()
}

/// The pods' prompt and generation token counters, summed over the fleet.
async fn pod_tokens(pods: &[String]) -> (f64, f64) {
    let (mut p, mut g) = (0.0, 0.0);
    for url in pods {
        let m = scrape(url).await;
        p += metric_sum(&m, "vllm:prompt_tokens_total", "");
        g += metric_sum(&m, "vllm:generation_tokens_total", "");
    }
    (p, g)
}

/// A small deterministic generator (xorshift64*), so a failing run can be replayed from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One client request: streaming or not, sometimes abandoned (before the head, or after a few events).
async fn one(router: &str, key: &str, rng: &mut Rng, i: u64) -> &'static str {
    let stream = rng.below(2) == 0;
    let body = json!({"model": "m", "prompt": format!("request {i} of {key}: {}", "words ".repeat(rng.below(60) as usize)),
        "max_tokens": 4 + rng.below(40), "ignore_eos": true, "stream": stream});
    let req = client()
        .post(format!("{router}/v1/completions"))
        .bearer_auth(key)
        .json(&body)
        .send();
    let cancel = rng.below(4) == 0;
    if cancel && rng.below(2) == 0 {
        // Gone before the response head: queued or in flight.
        let wait = Duration::from_millis(rng.below(80));
        return match tokio::time::timeout(wait, req).await {
            Ok(Ok(r)) if r.status() == 200 => "cancelled",
            Ok(Ok(_)) => "rejected",
            _ => "cancelled",
        };
    }
    let r = req.await.unwrap();
    if r.status() != 200 {
        return "rejected";
    }
    if !stream {
        let _ = r.bytes().await;
        return "done";
    }
    let mut s = r.bytes_stream();
    let keep = if cancel { 1 + rng.below(3) } else { u64::MAX };
    let mut n = 0;
    while let Some(chunk) = s.next().await {
        if chunk.is_err() {
            return "broken";
        }
        n += 1;
        if n >= keep {
            return "cancelled"; // dropping the stream closes the connection
        }
    }
    "done"
}

#[tokio::test]
async fn nothing_is_lost_under_overload_with_client_cancellations_and_pod_faults() {
    // Two pods that fail 10% of requests with injected 503s and 429s (before any token).
    let faults = [
        "--served-model-name",
        "m",
        "--error-rate",
        "10",
        "--error-kinds",
        "server_error,rate_limit",
    ];
    let a = Weir::sim_at("20", &faults).await;
    let b = Weir::sim_at("20", &faults).await;
    let pods = vec![a.url().to_string(), b.url().to_string()];
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &pods, "refresh: 5ms");
    let r = Weir::serve(&["--config", cfg.to_str().unwrap()]).await;
    let before = pod_tokens(&pods).await;

    // 3 tenants x 10 clients for 4 s: more than two pods serve at once, so queues fill and shed.
    let router = r.url().to_string();
    let mut tasks = Vec::new();
    for (t, (_, _, key)) in TENANTS.iter().enumerate() {
        for c in 0..10u64 {
            let router = router.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 * 100 + c + 1));
                let end = tokio::time::Instant::now() + Duration::from_secs(4);
                let mut seen = std::collections::BTreeMap::new();
                let mut i = 0;
                while tokio::time::Instant::now() < end {
                    i += 1;
                    *seen
                        .entry(one(&router, key, &mut rng, i).await)
                        .or_insert(0u64) += 1;
                }
                seen
            }));
        }
    }
    let mut seen = std::collections::BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *seen.entry(k).or_insert(0) += v;
        }
    }
    eprintln!("client outcomes: {seen:?}");

    // Every admitted request ends (cancelled streams are read to their end first), then the ledger balances.
    eventually(
        Duration::from_secs(30),
        "every admitted request settled",
        async || {
            let rows = usage_rows(&router).await;
            sum(&rows, "admitted")
                == sum(&rows, "completed") + sum(&rows, "failed") + sum(&rows, "cancelled")
        },
    )
    .await;
    let rows = usage_rows(&router).await;
    eprintln!("{}", serde_json::to_string_pretty(&rows).unwrap());
    for (name, _, _) in TENANTS {
        let mine: Vec<Value> = rows
            .iter()
            .filter(|r| r["tenant"] == name)
            .cloned()
            .collect();
        assert!(!mine.is_empty(), "{name} has no usage");
        assert_eq!(
            sum(&mine, "admitted"),
            sum(&mine, "completed") + sum(&mine, "failed") + sum(&mine, "cancelled"),
            "{name}: {mine:?}"
        );
    }
    assert!(
        sum(&rows, "rejected") > 0,
        "the load overflowed the queues: {rows:?}"
    );
    assert!(
        sum(&rows, "cancelled") + sum(&rows, "abandoned") > 0,
        "{rows:?}"
    );
    assert!(seen.get("done").copied().unwrap_or(0) > 0, "{seen:?}");

    // The ledger's tokens are the pods' own counts (the pods settle their counters within a step).
    let ledger = (
        sum(&rows, "prompt_tokens") as f64,
        sum(&rows, "completion_tokens") as f64,
    );
    eventually(
        Duration::from_secs(5),
        "pod counters equal the ledger",
        async || {
            let after = pod_tokens(&pods).await;
            (after.0 - before.0, after.1 - before.1) == ledger
        },
    )
    .await;
}

#[tokio::test]
async fn a_kill_9_of_the_router_loses_at_most_one_second_of_usage() {
    let pod = Weir::sim_at("50", &["--served-model-name", "m"]).await;
    let pods = vec![pod.url().to_string()];
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("usage.redb");
    let cfg = config(
        dir.path(),
        &pods,
        &format!("ledger: '{}', ledger_flush: 500ms", ledger.display()),
    );
    let mut r = Weir::serve(&["--config", cfg.to_str().unwrap()]).await;
    let router = r.url().to_string();

    // 4 clients send short requests back to back; each answer's arrival time is kept.
    let start = tokio::time::Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let mut clients = Vec::new();
    for c in 0..4 {
        let (router, tx) = (router.clone(), tx.clone());
        clients.push(tokio::spawn(async move {
            for i in 0.. {
                let body = json!({"model": "m", "prompt": format!("client {c} request {i}"), "max_tokens": 4});
                let sent = client().post(format!("{router}/v1/completions")).bearer_auth("sk-st").json(&body).send();
                let Ok(r) = sent.await else { return };
                if r.status() != 200 || r.bytes().await.is_err() {
                    return;
                }
                let _ = tx.send(start.elapsed());
            }
        }));
    }
    drop(tx);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let killed_at = start.elapsed();
    r.kill9();
    for c in clients {
        c.await.unwrap();
    }
    let mut answered = Vec::new();
    while let Some(t) = rx.recv().await {
        answered.push(t);
    }
    assert!(
        answered.len() > 20,
        "too little load to judge: {}",
        answered.len()
    );

    // The restarted router reads the same ledger file.
    let r2 = Weir::serve(&["--config", cfg.to_str().unwrap()]).await;
    let rows = usage_rows(r2.url()).await;
    let completed = sum(&rows, "completed") as usize;
    let by = |t: Duration| answered.iter().filter(|a| **a <= t).count();
    let one_second_before = by(killed_at.saturating_sub(Duration::from_secs(1)));
    eprintln!(
        "answered {} (by {killed_at:?}), {one_second_before} more than 1 s before the kill; ledger after restart: {completed}",
        answered.len()
    );
    assert!(
        completed >= one_second_before,
        "lost more than 1 s of usage: {completed} < {one_second_before}"
    );
    // Nothing invented: at most the answers plus the 4 that may have been settled but not yet received.
    assert!(
        completed <= answered.len() + 4,
        "{completed} > {}",
        answered.len()
    );
}
