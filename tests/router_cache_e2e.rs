//! End-to-end cache-aware routing: real `weir serve` in front of real `weir sim` pods. Shared system prompts stick to
//! one pod (and hit its prefix cache), the precise index follows the pods' KV events, a hot prefix under concurrent
//! load spreads (load gate), P/D disaggregates long prompts and falls back when the prefill pod fails, and decision
//! records are served by request id.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    MODEL, Weir, client, endpoint_id, eventually, get_text, metric, metric_sum, post_routed,
    prefix_blocks, scrape,
};
use serde_json::{Value, json};

/// POST through the router: (status, x-weir-endpoint, x-weir-decision-id, JSON body).
async fn post(url: &str, body: &Value) -> (u16, String, String, Value) {
    let r = post_routed(url, body, &[]).await;
    (r.status, r.endpoint, r.decision_id, r.body)
}

fn system_prompt(tag: &str) -> String {
    format!("You are {tag}, an assistant for distributed inference questions. ").repeat(120)
}

fn chat(system: &str, question: &str, max_tokens: u32) -> Value {
    json!({"model": MODEL, "max_tokens": max_tokens, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_system_prompt_sticks_to_one_pod_and_decisions_are_recorded() {
    let f = Weir::fleet(3, "50", &[]).await;
    let u = f.urls();
    let cfg = format!(
        "listen: 127.0.0.1:0\ndecisions: {{size: 4}}\npools:\n  - name: {MODEL}\n    endpoints: [{}]\n    policy: {{kind: cache-aware}}\n",
        u.join(", ")
    );
    let path = std::env::temp_dir().join(format!("weir-cache-{}.yaml", std::process::id()));
    std::fs::write(&path, cfg).unwrap();
    let r = Weir::serve(&["--config", path.to_str().unwrap()]).await;
    let chat_url = format!("{}/v1/chat/completions", r.url());
    let sys = system_prompt("Ada");
    let mut pods = BTreeSet::new();
    let mut ids = Vec::new();
    for i in 0..6 {
        let (st, ep, did, body) = post(&chat_url, &chat(&sys, &format!("Question {i}?"), 4)).await;
        assert_eq!(st, 200, "{body}");
        assert!(
            !did.is_empty(),
            "x-weir-decision-id on every routed response"
        );
        pods.insert(ep);
        ids.push(did);
    }
    assert_eq!(pods.len(), 1, "same system prompt, same pod: {pods:?}");
    let pod = pods.into_iter().next().unwrap();
    let pod_url = u.iter().find(|x| endpoint_id(x) == pod).unwrap();
    let hits = metric(&scrape(pod_url).await, "vllm:prefix_cache_hits_total");
    assert!(
        hits > 1000.0,
        "the pod served the shared prompt from its cache: {hits}"
    );
    let rm = scrape(r.url()).await;
    assert!(metric_sum(&rm, "weir_prefix_lookups_total", "result=\"hit\"") >= 5.0);
    assert!(metric(&rm, "weir_prefix_matched_blocks_total") > 100.0);

    // Decision records: the newest by id, `limit`, bounded ring (size 4), 404 in OpenAI shape when unknown.
    let last = ids.last().unwrap();
    let rec: Value =
        serde_json::from_str(&get_text(&format!("{}/debug/decisions/{last}", r.url())).await)
            .unwrap();
    assert_eq!(rec["request_id"], last.as_str());
    assert_eq!(rec["picked"], pod.as_str());
    assert_eq!(rec["candidates"].as_array().unwrap().len(), 3);
    let picked_row = rec["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["endpoint"] == pod.as_str())
        .unwrap();
    // The cache-aware picker predicts TTFT per candidate (issue 27) instead of scoring.
    assert!(
        picked_row["predicted_ttft_ms"].as_f64().is_some(),
        "{picked_row}"
    );
    assert!(picked_row["prefix_blocks"].as_u64().unwrap() > 20);
    assert!(rec["predicted_ttft_ms"].as_f64().is_some());
    assert!(
        rec["measured_ttft_ms"].as_f64().unwrap() > 0.0,
        "measured TTFT filled in: {rec}"
    );
    let list: Value =
        serde_json::from_str(&get_text(&format!("{}/debug/decisions?limit=2", r.url())).await)
            .unwrap();
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["request_id"], last.as_str(), "newest first");
    let all: Value =
        serde_json::from_str(&get_text(&format!("{}/debug/decisions?limit=100", r.url())).await)
            .unwrap();
    assert_eq!(
        all["data"].as_array().unwrap().len(),
        4,
        "ring bounded at 4"
    );
    let resp = client()
        .get(format!("{}/debug/decisions/{}", r.url(), ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "evicted from the ring");
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "decision_not_found");
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precise_index_follows_kv_events_of_requests_sent_around_the_router() {
    let f = Weir::fleet(2, "50", &["--kv-events-base-port", "0"]).await;
    let u = f.urls();
    let kv = |i: usize| {
        format!(
            "{}={},{}",
            u[i],
            f.endpoint(i)["kv_events"].as_str().unwrap(),
            f.endpoint(i)["replay"].as_str().unwrap()
        )
    };
    let backend = format!("{MODEL}={},{}", u[0], u[1]);
    let (kv0, kv1) = (kv(0), kv(1));
    let r = Weir::serve(&[
        "--backend",
        &backend,
        "--policy",
        "precise-prefix",
        "--kv-events",
        &kv0,
        "--kv-events",
        &kv1,
    ])
    .await;
    // Warm pod 1 directly, around the router.
    let sys = system_prompt("Grace");
    let (st, _, _, body) = post(
        &format!("{}/v1/chat/completions", u[1]),
        &chat(&sys, "Warm-up?", 2),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let pod1 = endpoint_id(&u[1]);
    eventually(
        Duration::from_secs(20),
        "router index sees pod 1's blocks",
        async || prefix_blocks(r.url(), &pod1).await > 20,
    )
    .await;
    for i in 0..3 {
        let (st, ep, _, body) = post(
            &format!("{}/v1/chat/completions", r.url()),
            &chat(&sys, &format!("Routed {i}?"), 2),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(
            ep, pod1,
            "routed to the pod whose KV cache holds the prefix"
        );
    }
}

/// 24 concurrent requests sharing one long system prompt through a fresh router with load gate `gate` (`on` /
/// `off`) over `urls`; the pods they were routed to. Scoring is prefix hit (weight 3) against the router's in-flight
/// count per pod (weight 1), so without the gate the prefix holder always outscores an idle pod: only the gate can
/// move a request off it.
async fn hot_prefix_burst(urls: &[String], gate: &str) -> BTreeSet<String> {
    let cfg = format!(
        "listen: 127.0.0.1:0\npools:\n  - name: {MODEL}\n    endpoints: [{}]\n    policy: {{kind: cache-aware, \
         weights: {{prefix: 3, queue: 0, kv: 0, prefill_backlog: 0, active_request: 1}}, load_gate: {gate}}}\n",
        urls.join(", ")
    );
    let path = std::env::temp_dir().join(format!("weir-gate-{gate}-{}.yaml", std::process::id()));
    std::fs::write(&path, cfg).unwrap();
    let r = Weir::serve(&["--config", path.to_str().unwrap()]).await;
    let url = format!("{}/v1/chat/completions", r.url());
    let sys = system_prompt("Hopper").repeat(2);
    let reqs: Vec<_> = (0..24)
        .map(|i| {
            let (url, body) = (url.clone(), chat(&sys, &format!("Burst {i}?"), 150));
            tokio::spawn(async move { post(&url, &body).await })
        })
        .collect();
    let mut pods = BTreeSet::new();
    for h in reqs {
        let (st, ep, _, body) = h.await.unwrap();
        assert_eq!(st, 200, "{body}");
        pods.insert(ep);
    }
    pods
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_gate_spreads_a_hot_prefix_over_pods() {
    let f = Weir::fleet(3, "1", &["--jitter", "0"]).await;
    let u = f.urls();
    // The control: with the gate off every request of the burst piles onto the pod holding the prefix, so the
    // spread below is the gate's doing.
    let off = hot_prefix_burst(&u, "off").await;
    assert_eq!(off.len(), 1, "gate off: {off:?}");
    let on = hot_prefix_burst(&u, "on").await;
    assert!(on.len() > 1, "the load gate spreads a hot prefix: {on:?}");
}

/// Prefill pod, decode pod and a `both` pod (separate processes, so the P/D handshake crosses processes).
async fn pd_pods(prefill_extra: &[&str]) -> (Weir, Weir, Weir) {
    let mut p = vec!["--jitter", "0", "--role", "prefill"];
    p.extend_from_slice(prefill_extra);
    (
        Weir::sim_at("10", &p).await,
        Weir::sim_at("10", &["--jitter", "0", "--role", "decode"]).await,
        Weir::sim_at("10", &["--jitter", "0", "--role", "both"]).await,
    )
}

async fn pd_router(prefill: &Weir, decode: &Weir) -> Weir {
    let backend = format!("{MODEL}={},{}", prefill.url(), decode.url());
    let (rp, rd) = (
        format!("{}=prefill", prefill.url()),
        format!("{}=decode", decode.url()),
    );
    Weir::serve(&[
        "--backend",
        &backend,
        "--policy",
        "cache-aware",
        "--role",
        &rp,
        "--role",
        &rd,
    ])
    .await
}

fn long_completion() -> Value {
    let prompt =
        "Summarise the history of distributed inference systems in great detail. ".repeat(450);
    json!({"model": MODEL, "prompt": prompt, "max_tokens": 16, "ignore_eos": true})
}

async fn decision(router: &Weir, id: &str) -> Value {
    serde_json::from_str(&get_text(&format!("{}/debug/decisions/{id}", router.url())).await)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_prompt_is_disaggregated_with_the_colocated_answer() {
    let (prefill, decode, both) = pd_pods(&[]).await;
    let r = pd_router(&prefill, &decode).await;
    let body = long_completion();
    let (st, ep, did, out) = post(&format!("{}/v1/completions", r.url()), &body).await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(ep, endpoint_id(decode.url()), "the decode pod answers");
    let (_, _, _, direct) = post(&format!("{}/v1/completions", both.url()), &body).await;
    assert_eq!(out["choices"][0]["text"], direct["choices"][0]["text"]);
    assert_eq!(out["usage"]["completion_tokens"], 16);
    assert_eq!(
        out["usage"]["prompt_tokens"], direct["usage"]["prompt_tokens"],
        "prompt counted once, from the decode leg"
    );
    let rec = decision(&r, &did).await;
    assert_eq!(rec["pd"]["decision"], "disaggregated", "{rec}");
    assert_eq!(rec["pd"]["prefill"], endpoint_id(prefill.url()).as_str());
    let dm = scrape(decode.url()).await;
    assert!(
        metric(&dm, "vllm:external_prefix_cache_hits_total") > 1000.0,
        "decode pulled the prompt's KV"
    );
    let rm = scrape(r.url()).await;
    assert_eq!(
        metric_sum(&rm, "weir_pd_decisions_total", "decision=\"disaggregated\""),
        1.0
    );
    // A short prompt is served colocated.
    let short = json!({"model": MODEL, "prompt": "hi", "max_tokens": 2});
    let (st, ep, did, _) = post(&format!("{}/v1/completions", r.url()), &short).await;
    assert_eq!((st, ep), (200, endpoint_id(decode.url())));
    assert_eq!(decision(&r, &did).await["pd"]["decision"], "colocated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_prefill_pod_falls_back_to_colocated() {
    let (prefill, decode, both) =
        pd_pods(&["--error-rate", "100", "--error-kinds", "server_error"]).await;
    let r = pd_router(&prefill, &decode).await;
    let body = long_completion();
    let (st, ep, did, out) = post(&format!("{}/v1/completions", r.url()), &body).await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(ep, endpoint_id(decode.url()));
    let (_, _, _, direct) = post(&format!("{}/v1/completions", both.url()), &body).await;
    assert_eq!(out["choices"][0]["text"], direct["choices"][0]["text"]);
    let rec = decision(&r, &did).await;
    assert_eq!(rec["pd"]["decision"], "fallback", "{rec}");
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .contains("prefill pod answered 5"),
        "{rec}"
    );
    let rm = scrape(r.url()).await;
    assert_eq!(
        metric_sum(&rm, "weir_pd_decisions_total", "decision=\"fallback\""),
        1.0
    );
}
