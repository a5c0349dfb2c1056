//! The two NIXL legs of a disaggregated request (vLLM's P/D contract, as vllm-router and llm-d's decode sidecar
//! run them): the prefill leg's body (`max_tokens: 1`, `min_tokens: 1`, `stream: false`, no `stream_options`,
//! `kv_transfer_params` asking for a remote decode), the prefill call itself, and the decode leg's body (the original
//! plus the `kv_transfer_params` the prefill pod returned). Any failure of the prefill leg is returned as a reason so
//! the caller serves the request colocated on the decode pod instead.
//!
//! [`PrefillRate`] learns the pool's prefill throughput from those legs, so the P/D decider's TTFT model is in the
//! pods' real seconds rather than a configured guess.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request};
use serde_json::{Map, Value, json};

use policies::openai::Api;

use crate::client::HttpClient;

/// The prefill throughput of a pool's pods, tokens per second, learned from P/D prefill legs.
///
/// The decider's TTFT model divides uncached tokens by a prefill rate, and its margin is in seconds, so the rate
/// must be the pods' own: the configured default (llm-d's 15,928 tokens/s) is 2.2x too slow for Llama-3.1-8B on an
/// H100 (8,192 tokens in ~230 ms), which would make one queued prefill read as 0.5 s and decline P/D far too early;
/// on an A100 or L4 it is too fast. A prefill leg sent to a pod with no prefill backlog (none of this router's
/// requests before their first token there) measures it directly: its duration is the prompt's prefill, one sampled
/// token and an HTTP round trip on loopback or a cluster network (a few ms against hundreds). Legs shorter than
/// [`Self::MIN_TOKENS`] are skipped (the round trip would dominate). Exponentially weighted (1/5 per sample) so it
/// follows a pool whose pods change; used once [`Self::MIN_SAMPLES`] legs were seen. Lock-free; concurrent updates
/// may drop a sample, which only slows the average down.
#[derive(Debug, Default)]
pub struct PrefillRate {
    /// Tokens per second as `f64` bits.
    bits: AtomicU64,
    samples: AtomicU32,
}

impl PrefillRate {
    /// Shortest leg (uncached tokens) that counts as a sample.
    pub const MIN_TOKENS: u32 = 2048;
    /// Samples before [`Self::get`] answers.
    pub const MIN_SAMPLES: u32 = 3;
    /// Weight of a new sample.
    const ALPHA: f64 = 0.2;

    /// One prefill leg of `tokens` uncached tokens that took `secs` on an otherwise idle prefill pod.
    pub fn observe(&self, tokens: u32, secs: f64) {
        if tokens < Self::MIN_TOKENS || !(secs.is_finite() && secs > 0.0) {
            return;
        }
        let sample = f64::from(tokens) / secs;
        let n = self.samples.load(Ordering::Relaxed);
        let old = f64::from_bits(self.bits.load(Ordering::Relaxed));
        let new = if n == 0 {
            sample
        } else {
            old + Self::ALPHA * (sample - old)
        };
        self.bits.store(new.to_bits(), Ordering::Relaxed);
        self.samples.store(n.saturating_add(1), Ordering::Relaxed);
    }

    /// The learned rate, once enough legs were measured.
    pub fn get(&self) -> Option<f64> {
        (self.samples.load(Ordering::Relaxed) >= Self::MIN_SAMPLES)
            .then(|| f64::from_bits(self.bits.load(Ordering::Relaxed)))
    }
}

fn object(body: &[u8]) -> Result<Map<String, Value>, String> {
    serde_json::from_slice(body).map_err(|e| format!("request body is not a JSON object: {e}"))
}

/// The prefill leg's body from the upstream body.
pub fn prefill_body(upstream: &[u8]) -> Result<Bytes, String> {
    let mut v = object(upstream)?;
    v.insert("max_tokens".into(), json!(1));
    if v.contains_key("max_completion_tokens") {
        v.insert("max_completion_tokens".into(), json!(1));
    }
    v.insert("min_tokens".into(), json!(1));
    v.insert("stream".into(), json!(false));
    v.remove("stream_options");
    v.insert(
        "kv_transfer_params".into(),
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null}),
    );
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// The decode leg's body: the upstream body plus the prefill pod's `kv_transfer_params`.
pub fn decode_body(upstream: &[u8], kv_transfer_params: Value) -> Result<Bytes, String> {
    let mut v = object(upstream)?;
    v.insert("kv_transfer_params".into(), kv_transfer_params);
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// `kv_transfer_params` of a prefill answer, if it asks for a remote prefill pull.
pub fn kv_params_of(answer: &[u8]) -> Result<Value, String> {
    let v: Value =
        serde_json::from_slice(answer).map_err(|e| format!("prefill answer is not JSON: {e}"))?;
    match v.get("kv_transfer_params") {
        Some(p) if p.get("do_remote_prefill") == Some(&Value::Bool(true)) => Ok(p.clone()),
        Some(_) => Err("prefill answer's kv_transfer_params do not offer a remote prefill".into()),
        None => Err("prefill answer has no kv_transfer_params".into()),
    }
}

/// Runs the prefill leg on `authority` and returns the `kv_transfer_params` for the decode leg, or why not.
#[allow(clippy::too_many_arguments)]
pub async fn run_prefill(
    client: &HttpClient,
    authority: &str,
    api: Api,
    body: Bytes,
    forwarded: &HeaderMap,
    request_id: &HeaderValue,
    timeout: Duration,
    max_response_bytes: usize,
) -> Result<Value, String> {
    let mut rb = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{authority}{}", api.path()));
    if let Some(h) = rb.headers_mut() {
        for (k, v) in forwarded {
            h.append(k.clone(), v.clone());
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(HeaderName::from_static("x-request-id"), request_id.clone());
    }
    let req = rb.body(Full::new(body)).map_err(|e| e.to_string())?;
    let leg = async {
        let resp = client.request(req).await.map_err(|e| {
            format!(
                "prefill leg failed: {e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            )
        })?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), max_response_bytes)
            .collect()
            .await
            .map_err(|e| format!("prefill answer broke: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("prefill pod answered {status}"));
        }
        kv_params_of(&bytes)
    };
    match tokio::time::timeout(timeout, leg).await {
        Ok(r) => r,
        Err(_) => Err(format!("prefill leg timed out after {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_rate_learns_from_long_legs_only() {
        let r = PrefillRate::default();
        r.observe(8_192, 0.23);
        r.observe(8_192, 0.24);
        assert_eq!(r.get(), None, "two samples are not enough");
        r.observe(100, 0.001);
        r.observe(8_192, 0.0);
        r.observe(8_192, f64::NAN);
        assert_eq!(r.get(), None, "short or broken legs are not samples");
        r.observe(8_192, 0.23);
        let got = r.get().unwrap();
        assert!((34_000.0..36_000.0).contains(&got), "{got}");
        // A slower pool moves the average a fifth of the way per sample.
        r.observe(8_192, 0.64);
        let slower = r.get().unwrap();
        assert!(
            (slower - (got + 0.2 * (12_800.0 - got))).abs() < 1.0,
            "{slower}"
        );
    }

    #[test]
    fn prefill_leg_asks_for_one_token_and_a_remote_decode() {
        let up =
            br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true},
            "max_completion_tokens":50,"temperature":0}"#;
        let v: Value = serde_json::from_slice(&prefill_body(up).unwrap()).unwrap();
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["max_completion_tokens"], 1);
        assert_eq!(v["min_tokens"], 1);
        assert_eq!(v["stream"], false);
        assert!(v.get("stream_options").is_none());
        assert_eq!(v["temperature"], 0);
        assert_eq!(v["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(v["kv_transfer_params"]["do_remote_prefill"], false);
        assert!(v["kv_transfer_params"]["remote_block_ids"].is_null());
        let v: Value =
            serde_json::from_slice(&prefill_body(br#"{"model":"m","prompt":"x"}"#).unwrap())
                .unwrap();
        assert!(v.get("max_completion_tokens").is_none());
        assert!(prefill_body(b"[1]").is_err());
    }

    #[test]
    fn decode_leg_carries_the_prefill_answer() {
        let answer = br#"{"choices":[],"kv_transfer_params":{"do_remote_prefill":true,"do_remote_decode":false,
            "remote_block_ids":[1,2],"remote_engine_id":"e","remote_host":"127.0.0.1","remote_port":9}}"#;
        let kv = kv_params_of(answer).unwrap();
        let v: Value = serde_json::from_slice(
            &decode_body(br#"{"model":"m","prompt":"x","stream":true}"#, kv).unwrap(),
        )
        .unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["kv_transfer_params"]["remote_block_ids"], json!([1, 2]));
        assert!(kv_params_of(br#"{"choices":[]}"#).is_err());
        assert!(kv_params_of(br#"{"kv_transfer_params":{"do_remote_prefill":false}}"#).is_err());
        assert!(kv_params_of(b"<html>").is_err());
    }
}
