//! The wire side of an attempt: which headers cross, the upstream request, the client response's head, bounded body
//! reads and the usage of a non-streaming answer.

use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use policies::openai::Api;
use serde::Deserialize;

use crate::ctx::Ctx;
use crate::snapshot::Endpoint;
use crate::sse::Usage;

/// Hop-by-hop and framing headers never forwarded in either direction.
pub(super) fn skip_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Client headers an upstream request carries (no accept-encoding: the SSE scanner must see plain bytes). The
/// client's credentials (`Authorization`, `x-api-key`, cookies) stay at the front door: the pods get their pool's
/// own key ([`with_pool_auth`]) or none.
pub(super) fn forwarded(k: &HeaderName) -> bool {
    !skip_header(k)
        && k != "traceparent"
        && k != "x-request-id"
        && k != header::ACCEPT_ENCODING
        && k != header::AUTHORIZATION
        && k != "x-api-key"
        && k != header::COOKIE
}

/// Sets the pool's `Authorization` for its pods, if it names a key.
pub(super) fn with_pool_auth(h: &mut HeaderMap, auth: Option<&HeaderValue>) {
    if let Some(a) = auth {
        h.insert(header::AUTHORIZATION, a.clone());
    }
}

pub(super) async fn collect_limited<B>(
    body: B,
    limit: usize,
    idle: std::time::Duration,
) -> Result<Bytes, String>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout(idle, Limited::new(body, limit).collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out reading the response body".into()),
    }
}

/// The top-level `usage` of a non-streaming answer.
pub fn usage_of(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct P {
        #[serde(default)]
        usage: Option<Usage>,
    }
    // Fast path: vLLM puts `usage` after `choices`, so its last `"usage":` is the top-level key (inside a JSON string
    // the quotes would be escaped); read just that object instead of the whole body.
    if let Some(at) =
        memchr::memrchr_iter(b'"', body).find(|&i| body[i..].starts_with(b"\"usage\":"))
    {
        let mut de = serde_json::Deserializer::from_slice(&body[at + 8..]);
        if let Ok(u) = Usage::deserialize(&mut de) {
            return Some(u);
        }
    }
    serde_json::from_slice::<P>(body).ok().and_then(|p| p.usage)
}

/// The request URI of `api`, parsed once (cloning it copies no bytes).
pub(super) fn api_uri(api: Api) -> hyper::Uri {
    static URIS: std::sync::LazyLock<[hyper::Uri; 2]> = std::sync::LazyLock::new(|| {
        [
            hyper::Uri::from_static(Api::Chat.path()),
            hyper::Uri::from_static(Api::Completions.path()),
        ]
    });
    URIS[api as usize].clone()
}

/// The upstream request of one attempt.
pub(super) fn upstream_request(
    ctx: &Ctx,
    body: Bytes,
    trace: HeaderValue,
    auth: Option<&HeaderValue>,
) -> Result<Request<Bytes>, hyper::http::Error> {
    let mut rb = Request::builder()
        .method(Method::POST)
        .uri(api_uri(ctx.view.api));
    if let Some(h) = rb.headers_mut() {
        h.reserve(ctx.headers.len() + 3);
        for (k, v) in &ctx.headers {
            if forwarded(k) {
                h.append(k.clone(), v.clone());
            }
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            HeaderName::from_static("x-request-id"),
            ctx.request_id.clone(),
        );
        h.insert(HeaderName::from_static("traceparent"), trace);
        with_pool_auth(h, auth);
    }
    rb.body(body)
}

/// The client response's head: the pod's headers minus hop-by-hop ones, plus weir's ids.
pub(super) fn response_head(
    status: StatusCode,
    upstream: &HeaderMap,
    ctx: &Ctx,
    ep: &Endpoint,
) -> hyper::http::response::Builder {
    let mut out = Response::builder().status(status);
    if let Some(h) = out.headers_mut() {
        for (k, v) in upstream {
            if !skip_header(k) && k != "x-request-id" {
                h.append(k.clone(), v.clone());
            }
        }
        h.insert(
            HeaderName::from_static("x-request-id"),
            ctx.request_id.clone(),
        );
        if let Ok(v) = HeaderValue::from_str(ep.id.as_str()) {
            h.insert(HeaderName::from_static("x-weir-endpoint"), v);
        }
        h.insert(
            HeaderName::from_static("x-weir-decision-id"),
            ctx.request_id.clone(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_the_top_level_key() {
        let body = br#"{"id":"c","choices":[{"index":0,"text":"say \"usage\":{\"prompt_tokens\":9}"}],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2,"prompt_tokens_details":null},"kv_transfer_params":null}"#;
        let want = Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
        });
        assert_eq!(usage_of(body), want);
        // A `usage` the fast path cannot read falls back to the whole-body parse.
        assert_eq!(
            usage_of(br#"{"choices":[],"usage" : {"prompt_tokens":3,"completion_tokens":2}}"#),
            want
        );
        assert_eq!(usage_of(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(usage_of(br#"{"choices":[]}"#), None);
        assert_eq!(usage_of(b"not json"), None);
    }

    #[test]
    fn hop_by_hop_and_id_headers_are_not_forwarded() {
        for h in [
            "connection",
            "host",
            "content-length",
            "traceparent",
            "x-request-id",
            "accept-encoding",
            "authorization",
            "x-api-key",
            "cookie",
        ] {
            assert!(!forwarded(&HeaderName::from_static(h)), "{h}");
        }
        assert!(forwarded(&HeaderName::from_static("x-session-id")));
    }
}
