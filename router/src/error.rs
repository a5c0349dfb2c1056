//! The router's one error rendering: every error the router answers with, its own (bad body, unknown model or path,
//! wrong method, no endpoint, admission's rejections) and a model server's (translated by [`from_upstream`]), is a
//! [`policies::errors::ApiError`] turned into an HTTP response here, in the OpenAI shape, with `x-request-id` and,
//! for 429 and 503, `Retry-After`.

use axum::body::Body;
use axum::response::Response;
use hyper::StatusCode;
use hyper::header::{self, HeaderName, HeaderValue};
use policies::errors::{ApiError, Blame};
use serde::Deserialize;

/// The response for `e`: OpenAI-shaped JSON body, `x-request-id`, and `Retry-After` (the error's own, else 1 s for
/// 429 and 503).
pub fn respond(e: &ApiError, request_id: &HeaderValue) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = Response::new(Body::from(e.openai_json()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(HeaderName::from_static("x-request-id"), request_id.clone());
    let ra = e
        .retry_after
        .or((e.status == 429 || e.status == 503).then_some(1));
    if let Some(s) = ra {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// 413 for a body over the configured limit.
pub fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        413,
        "invalid_request_error",
        format!("Request body is larger than the {limit}-byte limit."),
    )
    .with_code("request_too_large")
}

/// Maps an upstream error body (vLLM nested or flat shape, integer code) to weir's OpenAI shape, keeping the status.
pub fn from_upstream(status: StatusCode, body: &[u8]) -> ApiError {
    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        message: Option<String>,
    }
    #[derive(Deserialize)]
    struct Outer {
        #[serde(default)]
        error: Option<serde_json::Value>,
        #[serde(default)]
        message: Option<String>,
    }
    let message = serde_json::from_slice::<Outer>(body)
        .ok()
        .and_then(|o| match o.error {
            Some(serde_json::Value::Object(m)) => {
                serde_json::from_value::<Inner>(serde_json::Value::Object(m))
                    .ok()
                    .and_then(|i| i.message)
            }
            Some(serde_json::Value::String(s)) => Some(s),
            _ => o.message,
        })
        .unwrap_or_else(|| format!("The model server answered {status}."));
    let (kind, code) = match status.as_u16() {
        400 | 422 => ("invalid_request_error", Some("invalid_value")),
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => ("permission_error", Some("permission_denied")),
        404 => ("invalid_request_error", Some("model_not_found")),
        413 => ("invalid_request_error", Some("request_too_large")),
        429 => ("requests", Some("rate_limit_exceeded")),
        503 => ("server_error", Some("service_unavailable")),
        s if s >= 500 => ("server_error", None),
        _ => ("invalid_request_error", None),
    };
    let e = ApiError::new(status.as_u16(), kind, message)
        .blamed(Blame::Upstream)
        .retryable(status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS);
    match code {
        Some(c) => e.with_code(c),
        None => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_errors_become_openai_errors() {
        let e = from_upstream(
            StatusCode::NOT_FOUND,
            br#"{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}}"#,
        );
        let v: serde_json::Value = serde_json::from_str(&e.openai_json()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["message"], "The model `x` does not exist.");
        let e = from_upstream(
            StatusCode::BAD_REQUEST,
            br#"{"object":"error","message":"flat","code":400}"#,
        );
        assert_eq!(e.message, "flat");
        let e = from_upstream(StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(e.status, 502);
    }

    #[test]
    fn rendering_sets_status_request_id_and_retry_after() {
        let rid = HeaderValue::from_static("r1");
        let r = respond(&ApiError::new(503, "server_error", "none"), &rid);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["x-request-id"], "r1");
        let r = respond(
            &ApiError::new(429, "requests", "later").with_retry_after(7),
            &rid,
        );
        assert_eq!(r.headers()["retry-after"], "7");
        let r = respond(&ApiError::invalid_request("x", None, "invalid_json"), &rid);
        assert!(r.headers().get("retry-after").is_none());
        let e = from_upstream(StatusCode::SERVICE_UNAVAILABLE, b"");
        assert_eq!((e.blame, e.retryable), (Blame::Upstream, true));
    }
}
