//! End-to-end P/D through `weir serve`: a prefill pod and a decode pod (two `weir sim` processes) behind a
//! cache-aware router. A streamed request that the decider disaggregates must reach the client as the same SSE stream
//! a colocated pod sends (vLLM's framing, same text and token count, one usage chunk when asked for, none otherwise),
//! with the decode pod having pulled the prompt's KV instead of computing it; a follow-up turn whose history the
//! decode pod already caches is declined and served there. (Prefill-failure fallback: `router_cache_e2e`.)

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use common::{MODEL, Weir, endpoint_id, get_text, metric, metric_sum, scrape, send_json, sse_data};
use serde_json::{Value, json};

/// Prefill, decode and a `both` pod for the colocated reference; time-scale 10, no jitter, so model-time TTFT and
/// token order are deterministic.
async fn pods() -> (Weir, Weir, Weir) {
    (sim("prefill").await, sim("decode").await, sim("both").await)
}

async fn sim(role: &str) -> Weir {
    Weir::sim_at("10", &["--jitter", "0", "--role", role]).await
}

/// `weir serve` over the prefill and decode pods, roles given per endpoint.
async fn router(prefill: &Weir, decode: &Weir) -> Weir {
    Weir::serve(&[
        "--backend",
        &format!("{MODEL}={},{}", prefill.url(), decode.url()),
        "--policy",
        "cache-aware",
        "--role",
        &format!("{}=prefill", prefill.url()),
        "--role",
        &format!("{}=decode", decode.url()),
    ])
    .await
}

/// Document `n`: a ~8k-token system message, far past the decider's 512-token threshold.
fn document(n: u32) -> String {
    format!("Document {n}. ")
        + &"Disaggregated serving moves the prompt's prefill to its own pool and ships the KV cache to the decoder. "
            .repeat(310)
}

/// A streamed chat about document `doc`.
fn chat(doc: u32, question: &str, stream_options: Option<Value>) -> Value {
    let mut b = json!({"model": MODEL, "max_tokens": 24, "ignore_eos": true, "stream": true,
        "messages": [{"role": "system", "content": document(doc)}, {"role": "user", "content": question}]});
    if let Some(o) = stream_options {
        b["stream_options"] = o;
    }
    b
}

/// A streamed response: headers of interest and the raw SSE body.
struct Stream {
    content_type: String,
    endpoint: String,
    decision_id: String,
    body: String,
}

async fn stream(url: &str, body: &Value) -> Stream {
    let r = send_json(url, body).await;
    assert_eq!(r.status().as_u16(), 200);
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (content_type, endpoint, decision_id) = (
        h("content-type"),
        h("x-weir-endpoint"),
        h("x-weir-decision-id"),
    );
    Stream {
        content_type,
        endpoint,
        decision_id,
        body: r.text().await.expect("stream body"),
    }
}

/// vLLM's framing, strictly: only `data: <payload>\n\n` events, ending with `data: [DONE]`; the JSON chunks.
fn framed_chunks(body: &str) -> Vec<Value> {
    assert!(body.ends_with("data: [DONE]\n\n"), "stream end: {body:?}");
    for event in body.split_terminator("\n\n") {
        assert!(
            event.starts_with("data: ") && !event.contains('\n'),
            "not a single-line data event: {event:?}"
        );
    }
    let data = sse_data(body);
    assert_eq!(data.iter().filter(|d| **d == "[DONE]").count(), 1);
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk {d:?}: {e}")))
        .collect()
}

/// What a client reads out of a chat stream: the text, the finish reason, and the usage chunk if any.
#[derive(Debug, PartialEq)]
struct Read {
    role: Value,
    text: String,
    finish_reason: Value,
    content_chunks: usize,
    usage: Option<Value>,
}

fn read(chunks: &[Value]) -> Read {
    let id = &chunks[0]["id"];
    let mut text = String::new();
    let mut finish_reason = Value::Null;
    let mut content_chunks = 0;
    let mut usage = None;
    for c in chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(&c["id"], id, "one id per stream");
        assert_eq!(c["model"], MODEL);
        let choices = c["choices"].as_array().expect("choices");
        if choices.is_empty() {
            assert!(usage.is_none(), "a second usage chunk: {c}");
            usage = Some(c["usage"].clone());
            continue;
        }
        assert!(
            usage.is_none(),
            "the usage chunk must come after every choice chunk"
        );
        assert!(
            c.get("usage").is_none_or(Value::is_null),
            "usage only in its own chunk: {c}"
        );
        if let Some(t) = choices[0]["delta"]["content"]
            .as_str()
            .filter(|t| !t.is_empty())
        {
            text.push_str(t);
            content_chunks += 1;
        }
        if !choices[0]["finish_reason"].is_null() {
            finish_reason = choices[0]["finish_reason"].clone();
        }
    }
    Read {
        role: chunks[0]["choices"][0]["delta"]["role"].clone(),
        text,
        finish_reason,
        content_chunks,
        usage,
    }
}

async fn decision(router: &Weir, id: &str) -> Value {
    serde_json::from_str(&get_text(&format!("{}/debug/decisions/{id}", router.url())).await)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disaggregated_stream_equals_the_colocated_stream() {
    let (prefill, decode, both) = pods().await;
    let r = router(&prefill, &decode).await;
    let url = |base: &str| format!("{base}/v1/chat/completions");
    let usage = Some(json!({"include_usage": true}));

    let body = chat(1, "Summarise the document.", usage);
    let via = stream(&url(r.url()), &body).await;
    assert!(
        via.content_type.starts_with("text/event-stream"),
        "{}",
        via.content_type
    );
    assert_eq!(
        via.endpoint,
        endpoint_id(decode.url()),
        "the decode pod streams the answer"
    );
    let got = read(&framed_chunks(&via.body));
    let want = read(&framed_chunks(&stream(&url(both.url()), &body).await.body));
    assert_eq!(got, want, "P/D stream differs from the colocated one");
    assert_eq!(got.role, "assistant");
    assert_eq!(got.finish_reason, "length");
    assert_eq!(
        got.content_chunks, 24,
        "one chunk per token after the role chunk"
    );
    let u = got.usage.as_ref().expect("usage chunk");
    assert_eq!(u["completion_tokens"], 24);
    assert!(u["prompt_tokens"].as_u64().unwrap() > 7_000, "{u}");
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 24)
    );

    let rec = decision(&r, &via.decision_id).await;
    assert_eq!(rec["pd"]["decision"], "disaggregated", "{rec}");
    assert_eq!(rec["pd"]["prefill"], endpoint_id(prefill.url()).as_str());
    assert!(
        rec["measured_ttft_ms"].as_f64().is_some(),
        "measured TTFT recorded: {rec}"
    );
    // The prefill pod computed the prompt; the decode pod pulled its KV and generated every token.
    let (dm, pm) = (scrape(decode.url()).await, scrape(prefill.url()).await);
    assert!(metric(&pm, "vllm:prompt_tokens_total") > 7_000.0);
    assert!(metric(&dm, "vllm:external_prefix_cache_hits_total") > 7_000.0);
    assert_eq!(metric(&dm, "vllm:generation_tokens_total"), 24.0);

    // Without `include_usage` the client gets no usage chunk (the router asks the decode pod for usage and strips
    // it), and the same text. Another document, so the prompt is new to every pod and is disaggregated again.
    let body = chat(2, "List the key points.", None);
    let via = stream(&url(r.url()), &body).await;
    let got = read(&framed_chunks(&via.body));
    let want = read(&framed_chunks(&stream(&url(both.url()), &body).await.body));
    assert_eq!(got, want);
    assert_eq!(got.usage, None);
    let rm = scrape(r.url()).await;
    assert_eq!(
        metric_sum(&rm, "weir_pd_decisions_total", "decision=\"disaggregated\""),
        2.0,
        "{rm}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_turn_is_declined_and_served_from_the_decode_pods_cache() {
    let (prefill, decode, both) = pods().await;
    drop(both);
    let r = router(&prefill, &decode).await;
    let url = format!("{}/v1/chat/completions", r.url());
    let first = stream(&url, &chat(1, "Summarise the document.", None)).await;
    assert_eq!(
        decision(&r, &first.decision_id).await["pd"]["decision"],
        "disaggregated"
    );
    let hits = |m: &str| metric(m, "vllm:prefix_cache_hits_total");
    let before = hits(&scrape(decode.url()).await);

    // The same document with a new short question: the decode pod holds all but ~10 tokens.
    let follow = stream(&url, &chat(1, "And the second point?", None)).await;
    assert_eq!(follow.endpoint, endpoint_id(decode.url()));
    let got = read(&framed_chunks(&follow.body));
    assert_eq!(
        (got.content_chunks, &got.finish_reason),
        (24, &json!("length"))
    );
    let rec = decision(&r, &follow.decision_id).await;
    assert_eq!(rec["pd"]["decision"], "colocated", "{rec}");
    assert_eq!(rec["pd"]["reason"], "short-uncached", "{rec}");
    assert!(rec["pd"]["on_prefill_pod"].is_null(), "{rec}");
    let after = hits(&scrape(decode.url()).await);
    assert!(
        after - before > 7_000.0,
        "the follow-up reused the decode pod's cached document: {before} -> {after}"
    );
    let rm = scrape(r.url()).await;
    assert_eq!(
        metric_sum(
            &rm,
            "weir_pd_declined_total",
            "reason=\"short-uncached\",on=\"decode\""
        ),
        1.0,
        "{rm}"
    );
}
