//! End-to-end P/D: a prefill pod and a decode pod (two processes) answer with the same tokens as one `both` pod, and
//! the decode pod's TTFT reflects the KV transfer rather than a prefill.

mod common;

use common::{Weir, metric, post_json, scrape};
use serde_json::{Value, json};

/// A `weir sim` in `role` at time-scale 10 (so host scheduling hiccups don't swamp model-time TTFT), no jitter.
async fn sim(role: &str) -> Weir {
    let w = Weir::sim_at("10", &["--jitter", "0", "--role", role]).await;
    assert_eq!(w.endpoint(0)["role"], role);
    w
}

/// POST a completion that must succeed; its JSON.
async fn post(url: String, body: &Value) -> Value {
    let (st, text) = post_json(&url, body, &[]).await;
    assert_eq!(st, 200);
    serde_json::from_str(&text).expect("JSON body")
}

#[tokio::test]
async fn prefill_decode_pair_matches_both_pod() {
    let (prefill, decode, both) = (sim("prefill").await, sim("decode").await, sim("both").await);
    let model = "meta-llama/Llama-3.1-8B-Instruct";
    let prompt =
        "Summarise the history of distributed inference systems in great detail. ".repeat(450);
    let original = json!({"model": model, "prompt": prompt, "max_tokens": 16, "ignore_eos": true});

    // Leg 1: prefill with max_tokens 1 and do_remote_decode.
    let mut leg1 = original.clone();
    leg1["max_tokens"] = json!(1);
    leg1["min_tokens"] = json!(1);
    leg1["stream"] = json!(false);
    leg1["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false,
        "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null});
    let r1 = post(format!("{}/v1/completions", prefill.url()), &leg1).await;
    assert_eq!(r1["choices"][0]["finish_reason"], "length");
    let kv = r1["kv_transfer_params"].clone();
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["do_remote_decode"], false);
    assert!(!kv["remote_block_ids"].as_array().unwrap().is_empty());
    assert_eq!(
        kv["remote_port"].as_u64().unwrap(),
        prefill
            .url()
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    );
    assert_eq!(kv["tp_size"], 1);

    // Leg 2: decode with the original body plus the handshake.
    let mut leg2 = original.clone();
    leg2["kv_transfer_params"] = kv;
    let r2 = post(format!("{}/v1/completions", decode.url()), &leg2).await;
    let r3 = post(format!("{}/v1/completions", both.url()), &original).await;
    assert_eq!(
        r2["choices"][0]["text"], r3["choices"][0]["text"],
        "P/D output equals single-pod output"
    );
    assert_eq!(r2["usage"]["completion_tokens"], 16);

    let (dm, bm) = (scrape(decode.url()).await, scrape(both.url()).await);
    let ttft = |m: &str| metric(m, "vllm:time_to_first_token_seconds_sum");
    let prompt_tokens = r3["usage"]["prompt_tokens"].as_f64().unwrap();
    assert!(
        metric(&dm, "vllm:external_prefix_cache_hits_total") >= prompt_tokens - 16.0,
        "decode pulled the prompt"
    );
    // Transfer of ~8k tokens is ~60 ms model time; prefilling them is ~230 ms.
    assert!(
        ttft(&dm) < 0.6 * ttft(&bm),
        "decode TTFT {} vs both {}",
        ttft(&dm),
        ttft(&bm)
    );
    let transfer = 0.026 + 4.25e-6 * prompt_tokens;
    assert!(
        ttft(&dm) >= transfer,
        "decode TTFT {} must include the transfer {transfer}",
        ttft(&dm)
    );
}
