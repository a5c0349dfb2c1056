//! Fault injection for the simulated server: per-request error replies, mid-stream errors, crashes and hangs.
//!
//! Routers and clients must survive misbehaving pods, so `weir sim` can misbehave on purpose, reproducibly: every
//! draw comes from one seeded RNG. `X-Return-Error: <status>` (the llm-d simulator's convention) forces an error reply
//! for a single request. Decisions are plain values ([`FaultPlan`]); the HTTP layer acts them out.

use parking_lot::Mutex;
use policies::errors::ApiError;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A kind of injected error reply (`--error-kinds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 429.
    RateLimit,
    /// 401.
    InvalidApiKey,
    /// 400, context length exceeded.
    ContextLength,
    /// 400.
    InvalidRequest,
    /// 404.
    ModelNotFound,
    /// 503.
    ServerError,
}

impl ErrorKind {
    /// Every kind, the default for `--error-kinds`.
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::RateLimit,
        ErrorKind::InvalidApiKey,
        ErrorKind::ContextLength,
        ErrorKind::InvalidRequest,
        ErrorKind::ModelNotFound,
        ErrorKind::ServerError,
    ];

    /// Parse a flag value (`rate_limit`, `invalid_api_key`, `context_length`, `invalid_request`, `model_not_found`,
    /// `server_error`).
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s.trim() {
            "rate_limit" => ErrorKind::RateLimit,
            "invalid_api_key" => ErrorKind::InvalidApiKey,
            "context_length" => ErrorKind::ContextLength,
            "invalid_request" => ErrorKind::InvalidRequest,
            "model_not_found" => ErrorKind::ModelNotFound,
            "server_error" => ErrorKind::ServerError,
            other => return Err(format!("unknown error kind '{other}'")),
        })
    }

    /// The error reply in vLLM's shape.
    pub fn error(self) -> ApiError {
        match self {
            ErrorKind::RateLimit => ApiError::new(
                429,
                "RateLimitError",
                "Rate limit exceeded (injected fault).",
            ),
            ErrorKind::InvalidApiKey => ApiError::new(
                401,
                "AuthenticationError",
                "Invalid API key (injected fault).",
            ),
            ErrorKind::ContextLength => ApiError::bad_request(
                "This model's maximum context length was exceeded (injected fault).",
            )
            .with_param("messages"),
            ErrorKind::InvalidRequest => ApiError::bad_request("Invalid request (injected fault)."),
            ErrorKind::ModelNotFound => {
                ApiError::not_found("The model does not exist (injected fault).")
                    .with_param("model")
            }
            ErrorKind::ServerError => ApiError::new(
                503,
                "ServiceUnavailableError",
                "Server overloaded (injected fault).",
            ),
        }
    }
}

/// The vLLM error type name for an HTTP status, for `X-Return-Error`.
pub fn error_for_status(status: u16) -> ApiError {
    let kind = match status {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        408 => "RequestTimeoutError",
        409 => "ConflictError",
        413 => "RequestEntityTooLargeError",
        422 => "UnprocessableEntityError",
        429 => "RateLimitError",
        501 => "NotImplementedError",
        503 => "ServiceUnavailableError",
        _ if status >= 500 => "InternalServerError",
        _ => "BadRequestError",
    };
    ApiError::new(
        status,
        kind,
        format!("Injected error with status {status} (X-Return-Error)."),
    )
}

/// Fault settings (all rates are percentages, 0-100).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Share of requests answered with an error instead of being served.
    pub error_rate: f64,
    /// Kinds drawn uniformly for `error_rate`.
    pub error_kinds: Vec<ErrorKind>,
    /// Share of streams that send an error event then `[DONE]` part-way.
    pub midstream_error_rate: f64,
    /// Share of requests whose connection is dropped abruptly part-way.
    pub crash_rate: f64,
    /// Crash every response after this many tokens (deterministic crash).
    pub crash_after_tokens: Option<u32>,
    /// Share of requests accepted and never answered.
    pub hang_rate: f64,
    /// RNG seed.
    pub seed: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_kinds: ErrorKind::ALL.to_vec(),
            midstream_error_rate: 0.0,
            crash_rate: 0.0,
            crash_after_tokens: None,
            hang_rate: 0.0,
            seed: 0,
        }
    }
}

/// What to do to one request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FaultPlan {
    /// Answer with this error instead of serving.
    pub error: Option<ApiError>,
    /// Never answer.
    pub hang: bool,
    /// Drop the connection after this many tokens.
    pub crash_after: Option<u32>,
    /// Send an error event (then `[DONE]`) after this many tokens.
    pub midstream_error_after: Option<u32>,
}

/// Seeded fault decisions, shared by a pod's handlers.
#[derive(Debug)]
pub struct Faults {
    cfg: FaultConfig,
    rng: Mutex<SmallRng>,
}

impl Faults {
    /// A fault source with its own seeded RNG.
    pub fn new(cfg: FaultConfig) -> Self {
        let rng = Mutex::new(SmallRng::seed_from_u64(cfg.seed));
        Self { cfg, rng }
    }

    /// The settings.
    pub fn config(&self) -> &FaultConfig {
        &self.cfg
    }

    /// Decide the fate of one request; `forced` is the `X-Return-Error` status, if any; `max_tokens` bounds the
    /// mid-stream points.
    pub fn plan(&self, forced: Option<u16>, max_tokens: u32) -> FaultPlan {
        if let Some(s) = forced {
            return FaultPlan {
                error: Some(error_for_status(s)),
                ..Default::default()
            };
        }
        let c = &self.cfg;
        let any = c.error_rate > 0.0
            || c.hang_rate > 0.0
            || c.crash_rate > 0.0
            || c.midstream_error_rate > 0.0;
        let mut plan = FaultPlan {
            crash_after: c.crash_after_tokens,
            ..Default::default()
        };
        if !any {
            return plan;
        }
        let mut rng = self.rng.lock();
        let mut hit = |rate: f64| rate > 0.0 && rng.random::<f64>() * 100.0 < rate;
        if hit(c.error_rate) && !c.error_kinds.is_empty() {
            let k = c.error_kinds[rng.random_range(0..c.error_kinds.len())];
            plan.error = Some(k.error());
            return plan;
        }
        if hit(c.hang_rate) {
            plan.hang = true;
            return plan;
        }
        let upto = max_tokens.max(1);
        if hit(c.crash_rate) {
            let at = rng.random_range(0..upto);
            plan.crash_after = Some(plan.crash_after.map_or(at, |x| x.min(at)));
        } else if hit(c.midstream_error_rate) {
            plan.midstream_error_after = Some(rng.random_range(0..upto));
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_status_wins() {
        let f = Faults::new(FaultConfig::default());
        let p = f.plan(Some(429), 10);
        let e = p.error.unwrap();
        assert_eq!((e.status, e.kind.as_str()), (429, "RateLimitError"));
    }

    #[test]
    fn no_faults_by_default() {
        let f = Faults::new(FaultConfig::default());
        for _ in 0..100 {
            assert_eq!(f.plan(None, 10), FaultPlan::default());
        }
    }

    #[test]
    fn error_rate_is_roughly_honoured_and_seeded() {
        let cfg = FaultConfig {
            error_rate: 30.0,
            error_kinds: vec![ErrorKind::RateLimit],
            seed: 7,
            ..Default::default()
        };
        let a = Faults::new(cfg.clone());
        let b = Faults::new(cfg);
        let n = (0..2000)
            .filter(|_| a.plan(None, 10).error.is_some())
            .count();
        assert!((500..700).contains(&n), "{n}");
        let a2 = Faults::new(FaultConfig {
            error_rate: 30.0,
            seed: 7,
            error_kinds: vec![ErrorKind::RateLimit],
            ..Default::default()
        });
        let xs: Vec<_> = (0..50).map(|_| a2.plan(None, 10)).collect();
        let ys: Vec<_> = (0..50).map(|_| b.plan(None, 10)).collect();
        assert_eq!(xs, ys);
    }

    #[test]
    fn kinds_parse_and_map_to_statuses() {
        let want = [
            ("rate_limit", 429),
            ("invalid_api_key", 401),
            ("context_length", 400),
            ("invalid_request", 400),
            ("model_not_found", 404),
            ("server_error", 503),
        ];
        for (s, status) in want {
            assert_eq!(ErrorKind::parse(s).unwrap().error().status, status);
        }
        assert!(ErrorKind::parse("nope").is_err());
    }

    #[test]
    fn crash_points_stay_within_output() {
        let f = Faults::new(FaultConfig {
            crash_rate: 100.0,
            seed: 1,
            ..Default::default()
        });
        for _ in 0..100 {
            let p = f.plan(None, 5);
            assert!(p.crash_after.unwrap() < 5);
        }
    }
}
