//! Error bodies in the two shapes weir speaks.
//!
//! vLLM answers `{"error":{"message","type","param","code"}}` with `code` = the integer HTTP status; OpenAI (and weir's
//! own front door) uses the same envelope with `code` a string such as `"model_not_found"`. One type carries both.
//!
//! Besides the envelope, an error says who is to blame ([`Blame`]: the client, the upstream model server or weir
//! itself) and whether the same request may succeed if retried, as fields rather than strings (pingora's errors), and
//! optionally how long to wait before retrying (`Retry-After`). The router renders it in one place.

use serde::Serialize;

/// An API error: an HTTP status plus the fields of the error envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code (400, 404, 413, 429, 500, 503, ...).
    pub status: u16,
    /// Human-readable message, safe to show to the client.
    pub message: String,
    /// `type` field: `BadRequestError` style (vLLM) or `invalid_request_error` style (OpenAI).
    pub kind: String,
    /// Name of the offending request field, if any.
    pub param: Option<String>,
    /// OpenAI-style string code (`model_not_found`); vLLM shape ignores it and sends the status.
    pub code: Option<String>,
    /// Whose fault it is: by default the client for statuses below 500, weir for the rest.
    pub blame: Blame,
    /// The same request may succeed later or elsewhere (429, 502, 503, 504 by default).
    pub retryable: bool,
    /// Seconds the client should wait before retrying (`Retry-After`), when known.
    pub retry_after: Option<u64>,
}

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blame {
    /// The request itself is wrong (bad body, unknown model, unknown path, over a limit).
    Client,
    /// A model server failed or refused (connect error, timeout, 5xx, its own 4xx).
    Upstream,
    /// weir itself could not serve (no endpoint available, internal failure).
    Internal,
}

impl Blame {
    /// Short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
            Self::Internal => "internal",
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a, C: Serialize> {
    error: Inner<'a, C>,
}

#[derive(Serialize)]
struct Inner<'a, C: Serialize> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: C,
}

impl ApiError {
    pub fn new(status: u16, kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: kind.into(),
            param: None,
            code: None,
            blame: if status < 500 {
                Blame::Client
            } else {
                Blame::Internal
            },
            retryable: matches!(status, 429 | 502 | 503 | 504),
            retry_after: None,
        }
    }

    /// OpenAI's 400 `invalid_request_error` with a string code and, when given, the offending field.
    pub fn invalid_request(message: impl Into<String>, param: Option<&str>, code: &str) -> Self {
        let e = Self::new(400, "invalid_request_error", message).with_code(code);
        match param {
            Some(p) => e.with_param(p),
            None => e,
        }
    }

    /// OpenAI's 404 for a path no route serves.
    pub fn unknown_path(method: &str, path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            format!("Unknown path {method} {path}."),
        )
        .with_code("not_found")
    }

    /// OpenAI's 405 for a known path called with the wrong method (`allowed` names the right one).
    pub fn method_not_allowed(method: &str, path: &str, allowed: &str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            format!("Method {method} is not allowed on {path}; use {allowed}."),
        )
        .with_code("method_not_allowed")
    }

    /// Marks who is to blame.
    pub fn blamed(mut self, blame: Blame) -> Self {
        self.blame = blame;
        self
    }

    /// Marks whether a retry may succeed.
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Sets the `Retry-After` seconds.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// vLLM's 400: `BadRequestError`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequestError", message)
    }

    /// vLLM's 404: `NotFoundError`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "NotFoundError", message)
    }

    /// vLLM's 500: `InternalServerError`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalServerError", message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Body in vLLM's shape: `code` is the integer status.
    pub fn vllm_json(&self) -> String {
        let env = Envelope {
            error: Inner {
                message: &self.message,
                kind: &self.kind,
                param: self.param.as_deref(),
                code: self.status,
            },
        };
        serde_json::to_string(&env).unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }

    /// Body in OpenAI's shape: `code` is a string or null.
    pub fn openai_json(&self) -> String {
        let env = Envelope {
            error: Inner {
                message: &self.message,
                kind: &self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        };
        serde_json::to_string(&env).unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_shape_has_integer_code() {
        let e = ApiError::not_found("The model `x` does not exist.").with_param("model");
        let v: serde_json::Value = serde_json::from_str(&e.vllm_json()).unwrap();
        assert_eq!(v["error"]["code"], 404);
        assert_eq!(v["error"]["type"], "NotFoundError");
        assert_eq!(v["error"]["param"], "model");
    }

    #[test]
    fn openai_shape_has_string_code() {
        let e = ApiError::new(404, "invalid_request_error", "no such model")
            .with_code("model_not_found");
        let v: serde_json::Value = serde_json::from_str(&e.openai_json()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn blame_and_retryability_default_from_the_status() {
        let e = ApiError::invalid_request("bad", Some("model"), "invalid_value");
        assert_eq!(
            (e.status, e.blame, e.retryable),
            (400, Blame::Client, false)
        );
        let e = ApiError::new(503, "server_error", "none");
        assert_eq!((e.blame, e.retryable), (Blame::Internal, true));
        let e = ApiError::new(500, "server_error", "x").blamed(Blame::Upstream);
        assert_eq!((e.blame, e.retryable), (Blame::Upstream, false));
        let e = ApiError::new(429, "requests", "slow down").with_retry_after(3);
        assert_eq!(
            (e.blame, e.retryable, e.retry_after),
            (Blame::Client, true, Some(3))
        );
        let e = ApiError::method_not_allowed("GET", "/v1/completions", "POST");
        assert_eq!(
            (e.status, e.code.as_deref()),
            (405, Some("method_not_allowed"))
        );
    }
}
