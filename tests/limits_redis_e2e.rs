//! End-to-end shared rate limits: a real `redis-server` on a loopback port, two `weir serve` processes over one
//! `weir sim` pod, one tenant with an RPM limit. The two routers share the limit through Redis; when Redis is killed
//! mid-load they fail open to their local limits (answers stay 200 or 429, `admission_limit_fail_open_total`
//! counts it) and, once Redis is back on the same port, they use it again without a restart.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Weir, client, eventually, metric_sum, scrape};
use policies::tenant::ApiKeyHash;
use serde_json::json;

/// A `redis-server` on `port` with no persistence; killed on drop.
struct Redis(Child);

impl Redis {
    async fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        eventually(
            Duration::from_secs(10),
            "redis-server to listen",
            async || {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        Redis(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One completion for alice; the status.
async fn one(router: &str) -> u16 {
    client()
        .post(format!("{router}/v1/completions"))
        .bearer_auth("sk-alice")
        .json(&json!({"model": "m", "prompt": "hello", "max_tokens": 1}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `n` sequential requests to `router`: how many got 200 (every other answer must be a 429).
async fn ok_of(router: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        match one(router).await {
            200 => ok += 1,
            429 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    ok
}

async fn fail_opens(router: &str) -> f64 {
    metric_sum(&scrape(router).await, "admission_limit_fail_open_total", "")
}

#[tokio::test]
async fn two_routers_share_a_limit_in_redis_and_fail_open_while_it_is_down() {
    let port = free_port();
    let mut redis = Redis::start(port).await;
    let pod = Weir::sim(&["--served-model-name", "m"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("weir.yaml");
    // RPM 10: a burst of 10, then one every 6 s (at most a couple refill during the test).
    std::fs::write(
        &cfg,
        format!(
            "pools: [{{name: m, endpoints: ['{}']}}]\n\
             tenants: [{{tenant: alice, limits: {{rpm: 10}}, identity: {{apiKeys: [{{sha256: '{}'}}]}}}}]\n\
             admission: {{gate: false, redis: 'redis://127.0.0.1:{port}'}}\n",
            pod.url(),
            ApiKeyHash::of("sk-alice").to_hex()
        ),
    )
    .unwrap();
    let a = Weir::serve(&["--config", cfg.to_str().unwrap()]).await;
    let b = Weir::serve(&["--config", cfg.to_str().unwrap()]).await;
    let (a_url, b_url) = (a.url().to_string(), b.url().to_string());

    // Shared: 10 through A spend the limit for B too (B alone would allow 10).
    let t0 = tokio::time::Instant::now();
    assert_eq!(ok_of(&a_url, 10).await, 10);
    let refill = |t: tokio::time::Instant| (t.elapsed().as_secs() / 6) as usize;
    let on_b = ok_of(&b_url, 5).await;
    assert!(
        on_b <= refill(t0),
        "B admitted {on_b} of a limit A had spent"
    );
    assert_eq!(fail_opens(&a_url).await + fail_opens(&b_url).await, 0.0);

    // Load on A while Redis goes away and comes back: every answer stays 200 or 429.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, answered, a_url) = (stop.clone(), answered.clone(), a_url.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let s = one(&a_url).await;
                assert!(s == 200 || s == 429, "status {s} while Redis was down");
                answered.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    redis.kill();
    // Fail open: B's local limiter (never charged while Redis decided) admits again, up to its own limit.
    let t1 = tokio::time::Instant::now();
    let local = ok_of(&b_url, 12).await;
    assert!(
        (1..=10 + refill(t1)).contains(&local),
        "B admitted {local} of 12 on its local limit of 10"
    );
    assert!(fail_opens(&b_url).await >= 1.0);
    let during = answered.load(Ordering::SeqCst);

    // Redis back on the same port (empty): the routers use it again without a restart.
    let redis = Redis::start(port).await;
    eventually(
        Duration::from_secs(10),
        "B to decide with Redis again",
        async || {
            let before = fail_opens(&b_url).await;
            let _ = one(&b_url).await;
            fail_opens(&b_url).await == before
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert!(answered.load(Ordering::SeqCst) > during, "A kept answering");
    // Shared again: spend the rest of the fresh limit on B, then A is refused too.
    let _ = ok_of(&b_url, 12).await;
    let t2 = tokio::time::Instant::now();
    let on_a = ok_of(&a_url, 3).await;
    assert!(
        on_a <= refill(t2),
        "A admitted {on_a} after B spent the shared limit"
    );
    drop(redis);
}
