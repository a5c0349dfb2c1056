//! The two NIXL legs of a disaggregated request (vLLM's P/D contract, as vllm-router and llm-d's decode sidecar
//! run them): the prefill leg's body (`max_tokens: 1`, `min_tokens: 1`, `stream: false`, no `stream_options`,
//! `kv_transfer_params` asking for a remote decode), the prefill call itself, and the decode leg's body (the original
//! plus the `kv_transfer_params` the prefill pod returned). Any failure of the prefill leg is returned as a reason so
//! the caller serves the request colocated on the decode pod instead.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request};
use serde_json::{Map, Value, json};

use crate::proxy::{Api, HttpClient};

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
