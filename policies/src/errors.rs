//! Error bodies in the two shapes weir speaks.
//!
//! vLLM answers `{"error":{"message","type","param","code"}}` with `code` = the integer HTTP status; OpenAI (and weir's
//! own front door) uses the same envelope with `code` a string such as `"model_not_found"`. One type carries both.

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
        }
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
}
