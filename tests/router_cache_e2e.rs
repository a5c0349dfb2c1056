//! End-to-end cache-aware routing: real `weir serve` in front of real `weir sim` pods. Shared system prompts stick to
//! one pod (and hit its prefix cache), the precise index follows the pods' KV events, a hot prefix under concurrent
//! load spreads (load gate), P/D disaggregates long prompts and falls back when the prefill pod fails, and decision
//! records are served by request id.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
#[path = "ext_proc_envoy.rs"]
mod envoy;

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

/// `weir serve --config <cache-aware pool over urls> --ext-proc-listen 127.0.0.1:0 <extra>`; the router and the
/// picker's address.
async fn serve_with_picker(urls: &[String], extra: &[&str]) -> (Weir, String) {
    let cfg = format!(
        "listen: 127.0.0.1:0\npools:\n  - name: {MODEL}\n    endpoints: [{}]\n    policy: {{kind: cache-aware}}\n",
        urls.join(", ")
    );
    // One file per call: the tests of this binary run at once.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("weir-ext-proc-{}-{n}.yaml", std::process::id()));
    std::fs::write(&path, cfg).unwrap();
    let mut args = vec![
        "--config",
        path.to_str().unwrap(),
        "--ext-proc-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let r = Weir::serve(&args).await;
    let epp = r.json()["ext_proc"]
        .as_str()
        .expect("the picker's address on the first line")
        .to_string();
    (r, epp)
}

const USAGE_BODY: &[u8] = br#"{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1234,"completion_tokens":5,"total_tokens":1239}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_picks_the_pod_weir_serve_picks() {
    let f = Weir::fleet(3, "50", &[]).await;
    let u = f.urls();
    let pods: BTreeSet<String> = u.iter().map(|x| endpoint_id(x)).collect();
    let (r, epp) = serve_with_picker(&u, &[]).await;
    // Over TLS, accepting the picker's self-signed certificate, as Envoy AI Gateway dials it.
    let tls = envoy::Link::accept_any();
    let chat_url = format!("{}/v1/chat/completions", r.url());

    // A prefix weir serve sent to a pod is held there: the picker sends the same prefix to that pod, with the
    // other pods as fallbacks, as header and as `envoy.lb` metadata alike.
    let ada = system_prompt("Ada");
    let (st, served, _, b) = post(&chat_url, &chat(&ada, "Question 1?", 4)).await;
    assert_eq!(st, 200, "{b}");
    let body = serde_json::to_vec(&chat(&ada, "Question 2?", 4)).unwrap();
    let mut e = envoy::Stream::open(&epp, &tls).await;
    let a = e
        .request(
            "/v1/chat/completions",
            &[
                ("authorization", "Bearer sk-client"),
                ("x-request-id", "gw-1"),
            ],
            &body,
            None,
        )
        .await;
    assert!(a.immediate.is_none(), "{a:?}");
    let dests: Vec<String> = a.destination.split(',').map(str::to_string).collect();
    assert_eq!(dests[0], served, "the picker picks weir serve's pod: {a:?}");
    assert_eq!(a.metadata_destination, a.destination);
    assert_eq!(
        dests.iter().collect::<BTreeSet<_>>().len(),
        dests.len(),
        "{dests:?}"
    );
    assert!(
        dests.len() >= 2 && dests.iter().all(|d| pods.contains(d)),
        "{dests:?}"
    );
    assert_eq!(a.body, body, "same model name: the body passes unchanged");
    assert_eq!(a.set["content-length"], body.len().to_string());
    assert_eq!(a.set["x-request-id"], "gw-1");
    assert!(a.removed.iter().any(|h| h == "authorization"), "{a:?}");
    // The pod's answer passes through unchanged.
    e.respond(200, USAGE_BODY).await;
    drop(e);

    // The other way round: a new prefix the picker placed (committed to the same prefix index) is where weir serve
    // then sends it.
    let bob = system_prompt("Bob");
    let mut e = envoy::Stream::open(&epp, &tls).await;
    let body = serde_json::to_vec(&chat(&bob, "Question 1?", 4)).unwrap();
    let a = e.request("/v1/chat/completions", &[], &body, None).await;
    let picked = a.destination.split(',').next().unwrap().to_string();
    assert!(pods.contains(&picked), "{a:?}");
    e.respond(200, USAGE_BODY).await;
    drop(e);
    let (st, served, _, b) = post(&chat_url, &chat(&bob, "Question 2?", 4)).await;
    assert_eq!((st, served), (200, picked), "{b}");

    // The subset hint: only its endpoints; none of the pool's in it is a 503.
    let other = pods.iter().find(|p| **p != dests[0]).unwrap().clone();
    let mut e = envoy::Stream::open(&epp, &tls).await;
    let body = serde_json::to_vec(&chat(&ada, "Question 3?", 4)).unwrap();
    let a = e
        .request(
            "/v1/chat/completions",
            &[],
            &body,
            Some(&[other.as_str()][..]),
        )
        .await;
    assert_eq!(a.destination, other, "{a:?}");
    drop(e);
    let mut e = envoy::Stream::open(&epp, &tls).await;
    let a = e
        .request(
            "/v1/chat/completions",
            &[],
            &body,
            Some(&["10.9.9.9:8000"][..]),
        )
        .await;
    assert_eq!(a.immediate.as_ref().map(|i| i.0), Some(503), "{a:?}");

    // Refusals are immediate responses in weir's OpenAI shape: an unknown model is a 404.
    let mut e = envoy::Stream::open(&epp, &tls).await;
    let body = br#"{"model":"nope","prompt":"x"}"#;
    let a = e
        .request("/v1/completions", &[("x-request-id", "gw-404")], body, None)
        .await;
    let (status, headers, text) = a.immediate.expect("an immediate response");
    assert_eq!(status, 404);
    assert_eq!(headers["x-request-id"], "gw-404");
    let err: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(err["error"]["code"], "model_not_found", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_fails_closed_or_open_when_no_endpoint_is_eligible() {
    // A backend nothing listens on: one request through weir serve opens its breaker (threshold 1).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let urls = vec![format!("http://{dead}")];
    for mode in ["fail-close", "fail-open"] {
        let (r, epp) = serve_with_picker(
            &urls,
            &[
                "--breaker-threshold",
                "1",
                "--breaker-base-ejection",
                "60s",
                "--max-attempts",
                "1",
                "--ext-proc-failure-mode",
                mode,
                "--ext-proc-plaintext",
            ],
        )
        .await;
        let (st, _, _, b) = post(
            &format!("{}/v1/chat/completions", r.url()),
            &chat("sys", "q", 4),
        )
        .await;
        assert_eq!(st, 503, "{b}");
        let mut e = envoy::Stream::open(&epp, &envoy::Link::Plain).await;
        let body = serde_json::to_vec(&chat("sys", "q", 4)).unwrap();
        let a = e.request("/v1/chat/completions", &[], &body, None).await;
        if mode == "fail-open" {
            assert!(a.immediate.is_none(), "{a:?}");
            assert_eq!(a.destination, dead, "fail-open names a pod of the pool");
        } else {
            let (status, headers, text) = a.immediate.expect("fail-close answers at once");
            assert_eq!(status, 503, "{text}");
            assert!(headers.contains_key("retry-after"), "{headers:?}");
            let err: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(err["error"]["code"], "service_unavailable", "{err}");
        }
    }
}

/// A vLLM chat completion (non-streaming), usage 1234 + 5 tokens.
const VLLM_CHAT: &[u8] = br#"{"id":"chatcmpl-7f3a","object":"chat.completion","created":1765152000,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"message":{"role":"assistant","content":"Paged attention.","tool_calls":[]},"logprobs":null,"finish_reason":"length","stop_reason":null}],"usage":{"prompt_tokens":1234,"total_tokens":1239,"completion_tokens":5,"prompt_tokens_details":null},"prompt_logprobs":null,"kv_transfer_params":null}"#;

/// A vLLM chat stream with `include_usage`, in the chunks Envoy might hand over (the usage event split across two);
/// usage 77 + 3 tokens.
const VLLM_STREAM: [&[u8]; 4] = [
    b"data: {\"id\":\"chatcmpl-9b1c\",\"object\":\"chat.completion.chunk\",\"created\":1765152000,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\ndata: {\"id\":\"chatcmpl-9b1c\",\"object\":\"chat.completion.chunk\",\"created\":1765152000,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Paged attention\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"chatcmpl-9b1c\",\"object\":\"chat.completion.chunk\",\"created\":1765152000,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\".\"},\"logprobs\":null,\"finish_reason\":\"length\",\"stop_reason\":null}]}\n\ndata: {\"id\":\"chatcmpl-9b1c\",\"object\":\"chat.completion.chunk\",\"created\":1765152000,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":77,",
    b"\"total_tokens\":80,\"completion_tokens\":3}}\n\n",
    b"data: [DONE]\n\n",
];

/// What the router counted: prompt and completion tokens, requests in flight (router-wide and per endpoint),
/// requests answered 200, and the ledger's completed and cancelled permits with their tokens.
#[derive(Debug, PartialEq)]
struct Counted {
    tokens: (f64, f64),
    in_flight: (f64, f64),
    ok: f64,
    ledger: (u64, u64, u64, u64),
}

async fn counted(router: &str) -> Counted {
    let m = scrape(router).await;
    let usage: Value =
        serde_json::from_str(&get_text(&format!("{router}/v1/usage")).await).unwrap();
    let sum = |k: &str| -> u64 {
        usage["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[k].as_u64().unwrap())
            .sum()
    };
    Counted {
        tokens: (
            metric_sum(&m, "weir_tokens_total", "Prompt"),
            metric_sum(&m, "weir_tokens_total", "Completion"),
        ),
        in_flight: (
            metric_sum(&m, "weir_requests_in_flight", ""),
            metric_sum(&m, "weir_endpoint_in_flight", ""),
        ),
        ok: metric_sum(&m, "weir_requests_total", "status=\"200\""),
        ledger: (
            sum("completed"),
            sum("cancelled"),
            sum("prompt_tokens"),
            sum("completion_tokens"),
        ),
    }
}

/// The account phase runs at the response's end of stream while Envoy still holds its side of the exchange open: the
/// usage of a JSON answer, then of a stream's usage chunk, reaches `weir_tokens_total` and the ledger once, and the
/// in-flight counts drop to 0; closing the exchange afterwards counts nothing again. An exchange closed before its
/// response ended is settled once, as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_accounts_usage_once_at_the_response_end() {
    let f = Weir::fleet(1, "50", &[]).await;
    let (r, epp) = serve_with_picker(&f.urls(), &[]).await;
    let tls = envoy::Link::accept_any();
    let body = serde_json::to_vec(&chat("sys", "q", 4)).unwrap();
    let settled = async |want: &Counted| {
        eventually(Duration::from_secs(10), "the counts", async || {
            counted(r.url()).await == *want
        })
        .await;
    };

    // JSON: counted when the body ends, the exchange still open.
    let mut e = envoy::Stream::open(&epp, &tls).await;
    let a = e.request("/v1/chat/completions", &[], &body, None).await;
    assert!(a.immediate.is_none(), "{a:?}");
    let c = counted(r.url()).await;
    assert_eq!((c.in_flight.0, c.ledger), (1.0, (0, 0, 0, 0)), "{c:?}");
    e.respond(200, VLLM_CHAT).await;
    let c = counted(r.url()).await;
    assert_eq!(
        (c.tokens, c.in_flight.0, c.ok, c.ledger),
        ((1234.0, 5.0), 0.0, 1.0, (1, 0, 1234, 5)),
        "counted at the response's end, before the exchange closes: {c:?}"
    );
    drop(e);

    // SSE: the usage chunk (split across body chunks) counted at the last chunk, the exchange still open.
    let mut e = envoy::Stream::open(&epp, &tls).await;
    e.request("/v1/chat/completions", &[], &body, None).await;
    e.respond_head(200, "text/event-stream").await;
    for (i, chunk) in VLLM_STREAM.iter().enumerate() {
        e.respond_chunk(chunk, i + 1 == VLLM_STREAM.len()).await;
    }
    let both = Counted {
        tokens: (1311.0, 8.0),
        in_flight: (0.0, 0.0),
        ok: 2.0,
        ledger: (2, 0, 1311, 8),
    };
    let c = counted(r.url()).await;
    assert_eq!(
        (c.tokens, c.in_flight.0, c.ok, c.ledger),
        (both.tokens, 0.0, both.ok, both.ledger),
        "{c:?}"
    );
    settled(&both).await;
    let m = scrape(r.url()).await;
    assert_eq!(
        metric_sum(&m, "weir_stream_outcomes_total", "Complete"),
        1.0
    );
    drop(e);

    // Closed before its response ended: settled once, cancelled (its head's status counted, no usage seen).
    let mut e = envoy::Stream::open(&epp, &tls).await;
    e.request("/v1/chat/completions", &[], &body, None).await;
    e.respond_head(200, "text/event-stream").await;
    e.respond_chunk(VLLM_STREAM[0], false).await;
    assert_eq!(counted(r.url()).await.in_flight.0, 1.0);
    drop(e);
    settled(&Counted {
        ok: 3.0,
        ledger: (2, 1, 1311, 8),
        ..both
    })
    .await;
    let m = scrape(r.url()).await;
    assert_eq!(
        metric_sum(&m, "weir_stream_outcomes_total", "Cancelled"),
        1.0
    );
    // The earlier exchanges' closes counted nothing again.
    assert_eq!(
        metric_sum(&m, "weir_stream_outcomes_total", "Complete"),
        1.0
    );
}

/// An immediate 404 (unknown model) from the picker at `epp` over `link`: it answers there.
async fn picker_answers(epp: &str, link: &envoy::Link) {
    let mut e = envoy::Stream::open(epp, link).await;
    let a = e
        .request(
            "/v1/completions",
            &[],
            br#"{"model":"nope","prompt":"x"}"#,
            None,
        )
        .await;
    assert_eq!(a.immediate.map(|i| i.0), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_serves_tls_by_default_and_plaintext_only_when_asked() {
    let urls = vec!["http://127.0.0.1:9".to_string()];
    let (plain, tls) = (envoy::Link::Plain, envoy::Link::accept_any());

    // By default TLS with a self-signed certificate (ALPN h2, checked by the client): a plaintext client gets nowhere.
    let (_r, epp) = serve_with_picker(&urls, &[]).await;
    picker_answers(&epp, &tls).await;
    let err = envoy::Stream::try_open(&epp, &plain).await.err();
    assert!(err.is_some(), "plaintext gRPC on the TLS port");

    // A given certificate (cert-manager's Secret) is the one presented: trusting it verifies, trusting another not.
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("weir-ext-proc-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&crt, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let files = [
        "--ext-proc-tls-cert",
        crt.to_str().unwrap(),
        "--ext-proc-tls-key",
        key.to_str().unwrap(),
    ];
    let (_r, epp) = serve_with_picker(&urls, &files).await;
    picker_answers(&epp, &envoy::Link::trusting(made.cert.der().clone())).await;
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let other = envoy::Link::trusting(other.cert.der().clone());
    let err = envoy::Stream::try_open(&epp, &other).await.err();
    assert!(err.is_some(), "a certificate other than the given one");
    let _ = std::fs::remove_dir_all(&dir);

    // --ext-proc-plaintext: h2c, and a TLS client gets nowhere.
    let (_r, epp) = serve_with_picker(&urls, &["--ext-proc-plaintext"]).await;
    picker_answers(&epp, &plain).await;
    let err = envoy::Stream::try_open(&epp, &tls).await.err();
    assert!(err.is_some(), "TLS on the plaintext port");
}
