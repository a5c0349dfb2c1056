//! `weir demo` end to end: the README's first command starts a fleet and the router in one process, and a chat
//! request through it is served by one of the fleet's pods, with prefix caching visible on the pods.

mod common;
// deploy/ checked offline and against a Prometheus scraping `weir demo` (folded in here: one binary links weir once).
mod deploy_manifests;

use common::{MODEL, Weir, post_json_full, scrape};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_routes_through_its_own_fleet() {
    let demo = Weir::start(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--fleet",
        "2xh100:llama-3.1-8b",
        "--time-scale",
        "20",
    ])
    .ready()
    .await;
    let pods: Vec<String> = demo.json()["pods"]
        .as_array()
        .expect("pods array on the first line")
        .iter()
        .map(|p| p["url"].as_str().expect("pod url").to_string())
        .collect();
    assert_eq!(pods.len(), 2);

    let system = "You are a careful assistant for GPU fleet operators. ".repeat(40);
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "How many pods?"}],
        "max_tokens": 4,
    });
    let url = format!("{}/v1/chat/completions", demo.url());
    let mut served_by = Vec::new();
    for _ in 0..4 {
        let (status, headers, text) = post_json_full(&url, &body, &[]).await;
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["usage"]["completion_tokens"], 4);
        let ep = headers
            .get("x-weir-endpoint")
            .expect("x-weir-endpoint header")
            .to_str()
            .expect("ascii");
        assert!(
            pods.iter().any(|p| p.ends_with(ep)),
            "{ep} not one of {pods:?}"
        );
        served_by.push(ep.to_string());
    }
    // Cache-aware by default: the repeated system prompt goes back to the pod that holds it, which hits its cache.
    served_by.dedup();
    assert_eq!(
        served_by.len(),
        1,
        "the same prefix moved between pods: {served_by:?}"
    );
    let mut hits = 0.0;
    for p in &pods {
        hits += common::metric(&scrape(p).await, "vllm:prefix_cache_hits_total");
    }
    assert!(
        hits > 0.0,
        "no prefix-cache hits across the demo fleet (served by {served_by:?})"
    );
}
