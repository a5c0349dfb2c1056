//! The decisions of the proxy step, synchronous and free of I/O: which pool a request goes to and the body it sends
//! there ([`plan`]), which endpoint each attempt tries ([`pick`]), what an upstream answer means for the endpoint's
//! breaker and for retrying ([`Failure`], [`classify_status`]), and the error the client gets when every attempt
//! failed ([`give_up`]). `now` and the random draws come in as arguments; [`crate::execute`] does the I/O around them.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::StatusCode;
use hyper::header::{self, HeaderMap, HeaderValue};
use policies::endpoint::EndpointView;
use policies::errors::{ApiError, Blame};
use policies::pick::budget::RetryBudget;
use policies::pick::{NoEligibleEndpoint, RequestView as PickView};
use rand_core::RngCore;

use crate::metrics::RetryReason;
use crate::route::{CacheMetrics, Decided, Prepared};
use crate::snapshot::{EndpointSnapshot, Pool, Route};

/// The request view the router works from: the body as received plus the fields it routes on.
pub type View = policies::openai::RequestView<Bytes>;

/// Base of the jittered backoff between attempts on different endpoints (Envoy's 25 ms).
pub const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(25);

/// The route serving the view's model, or the OpenAI 404 `model_not_found`.
pub fn resolve<'s>(snap: &'s EndpointSnapshot, model: &str) -> Result<&'s Route, ApiError> {
    snap.route(model).map(|r| &**r).ok_or_else(|| {
        ApiError::new(
            404,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param("model")
        .with_code("model_not_found")
    })
}

/// How one request will be proxied, decided before any I/O.
#[derive(Debug)]
pub struct Plan {
    /// Index of the destination pool in the snapshot.
    pub pool: usize,
    /// The upstream body: the original bytes, or one rewrite (model renamed, usage requested).
    pub body: Bytes,
    /// weir asked the pod for stream usage the client did not ask for; the usage chunk is stripped on the way back.
    pub inject_usage: bool,
    /// Attempts at most, the first included.
    pub max_attempts: u32,
    /// Retries may only run while the budget allows them.
    pub retry_budget: RetryBudget,
}

/// Plans `view` on `route`: the weighted target pool (`u` a uniform draw in [0, 1), used only for split routes) and
/// the upstream body.
pub fn plan(
    route: &Route,
    pools: &[Pool],
    view: &View,
    max_attempts: u32,
    retry_budget: RetryBudget,
    u: impl FnOnce() -> f64,
) -> Result<Plan, ApiError> {
    let target = if route.targets.len() == 1 {
        route.targets[0]
    } else {
        route.pick_target(u())
    };
    let inject_usage = view.needs_usage_injected();
    let body = upstream_body(view, &pools[target.pool].model, inject_usage)?;
    Ok(Plan {
        pool: target.pool,
        body,
        inject_usage,
        max_attempts,
        retry_budget,
    })
}

/// The body to send upstream: the original bytes when nothing changes; a byte splice when only
/// `stream_options.include_usage` must be added; a re-serialisation when the model name changes too.
pub fn upstream_body(
    view: &View,
    upstream_model: &str,
    inject_usage: bool,
) -> Result<Bytes, ApiError> {
    let raw = &view.body;
    let rename = view.model != upstream_model;
    if !rename && !inject_usage {
        return Ok(raw.clone());
    }
    if !rename && !view.has_stream_options {
        // `{` + `"stream_options":{"include_usage":true},` + rest; the object has at least `model`, so is not empty.
        if let Some(open) = raw.iter().position(|&b| b == b'{') {
            let mut out = Vec::with_capacity(raw.len() + 40);
            out.extend_from_slice(&raw[..=open]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
            out.extend_from_slice(&raw[open + 1..]);
            return Ok(Bytes::from(out));
        }
    }
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(raw).map_err(|e| {
            ApiError::invalid_request(format!("Invalid request body: {e}"), None, "invalid_json")
        })?;
    if rename {
        v.insert(
            "model".into(),
            serde_json::Value::String(upstream_model.to_string()),
        );
    }
    if inject_usage {
        let so = v
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(o) = so.as_object_mut() {
            o.insert("include_usage".into(), serde_json::Value::Bool(true));
        }
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| ApiError::new(500, "server_error", e.to_string()))
}

/// What the pickers see of a request, computed once per request (not per attempt): a cache-aware pool's prompt
/// tokenized, hashed and looked up, its session from `x-session-id` (other pools never pay for it), and the pick view,
/// whose prompt size is that token count, else the byte estimate.
pub fn prepare(
    pool: &Pool,
    view: &View,
    headers: &HeaderMap,
    now: Instant,
    metrics: &CacheMetrics,
) -> (Option<Prepared>, PickView) {
    let prep = pool.cache.as_ref().map(|c| {
        let session = headers.get("x-session-id").and_then(|v| v.to_str().ok());
        c.prepare(view, session, now, metrics)
    });
    let rv = PickView {
        prompt_tokens: prep
            .as_ref()
            .map_or(view.estimated_prompt_tokens(), |p| p.prompt_tokens),
        max_tokens: view.max_tokens,
    };
    (prep, rv)
}

/// The candidates of one attempt: every pool endpoint's view at `now`, those already `tried` unavailable.
pub fn candidates(
    pool: &Pool,
    tried: &[usize],
    now: Instant,
    since_epoch: Duration,
    stale_after: Duration,
) -> Vec<EndpointView> {
    pool.endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut v = e.state.view(i, e.role, now, since_epoch, stale_after);
            if tried.contains(&i) {
                v.available = false;
            }
            v
        })
        .collect()
}

/// One attempt's pick.
#[derive(Debug)]
pub struct Pick {
    /// Pool index of the destination endpoint (the decode pod under P/D).
    pub index: usize,
    /// The cache-aware (or P/D) decision, for cache-aware pools.
    pub decided: Option<Decided>,
    /// In-flight tokens the attempt adds on the endpoint: the prompt part it must still compute plus the output.
    pub attempt_tokens: u64,
    /// The endpoint's prefill backlog until the first token (0 when a prefill pod computes the prompt).
    pub prefill_claim: u64,
}

/// Picks the endpoint of attempt `attempt` among `views` (P/D only on the first attempt).
#[allow(clippy::too_many_arguments)]
pub fn pick(
    pool: &Pool,
    view: &View,
    prep: Option<&Prepared>,
    rv: &PickView,
    views: &[EndpointView],
    attempt: u32,
    now: Instant,
    rng: &mut impl RngCore,
) -> Result<Pick, NoEligibleEndpoint> {
    let max_tokens = u64::from(view.max_tokens.unwrap_or(0));
    match (pool.cache.as_ref(), prep) {
        (Some(c), Some(p)) => {
            let d = c.decide(rv, views, p, attempt == 0, now, rng)?;
            let uncached = u64::from(c.uncached(p, d.index));
            Ok(Pick {
                index: d.index,
                attempt_tokens: uncached + max_tokens,
                prefill_claim: if d.prefill.is_some() { 0 } else { uncached },
                decided: Some(d),
            })
        }
        _ => {
            let c = pool.pipeline.select(rv, views, now, rng)?;
            tracing::trace!(scores = ?c.scores, "scored");
            let est = view.estimated_tokens();
            Ok(Pick {
                index: c.index,
                decided: None,
                attempt_tokens: est,
                prefill_claim: est.saturating_sub(max_tokens),
            })
        }
    }
}

/// Why an attempt failed; each is retried on another endpoint while attempts and budget remain.
#[derive(Debug)]
pub enum Failure {
    /// No response head within the first-byte timeout.
    Timeout,
    /// Could not connect.
    Connect(String),
    /// The connection or the body broke.
    Broken(String),
    /// A 5xx or 429: its status, `Retry-After` seconds and (bounded) body.
    Status(StatusCode, Option<u64>, Bytes),
}

impl Failure {
    /// The retry metric's reason.
    pub fn reason(&self) -> RetryReason {
        match self {
            Self::Timeout => RetryReason::Timeout,
            Self::Connect(_) => RetryReason::Connect,
            Self::Broken(_) => RetryReason::BrokenBody,
            Self::Status(s, ..) if *s == StatusCode::TOO_MANY_REQUESTS => RetryReason::Status429,
            Self::Status(..) => RetryReason::Status5xx,
        }
    }

    /// Whether the endpoint's breaker counts it as a failure (a 429 is a healthy pod that is busy).
    pub fn counts_against_endpoint(&self) -> bool {
        !matches!(self, Self::Status(s, ..) if *s == StatusCode::TOO_MANY_REQUESTS)
    }
}

/// What a response head means for the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadVerdict {
    /// 5xx or 429: read the (small) body and retry elsewhere.
    Retry,
    /// Anything else: this is the answer (a 4xx is the request's fault, the pod is healthy).
    Answer,
}

/// Classifies a response status.
pub fn classify_status(status: StatusCode) -> HeadVerdict {
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        HeadVerdict::Retry
    } else {
        HeadVerdict::Answer
    }
}

/// `Retry-After` seconds of an upstream answer, when a plain number.
pub fn retry_after_header(h: &HeaderMap) -> Option<u64> {
    h.get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// How long a backend 429 keeps its endpoint out of picks: its `Retry-After` seconds, 5 s when absent or not a number
/// of seconds, at most 60 s.
pub fn backend_cooldown(retry_after: Option<&HeaderValue>) -> Duration {
    let secs = retry_after
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(5)
        .min(60);
    Duration::from_secs(secs)
}

/// Time until the first breaker in the pool closes again, rounded up to whole seconds, within [1, `cap`].
pub fn breaker_retry_after(pool: &Pool, now: Instant, cap: u64) -> u64 {
    pool.endpoints
        .iter()
        .filter_map(|e| e.state.retry_after(now))
        .min()
        .map_or(1, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .max(1)
        .min(cap)
}

/// The 503 when no endpoint of the pool can take the request.
pub fn no_endpoint(model: &str, why: &NoEligibleEndpoint, retry_after: u64) -> ApiError {
    ApiError::new(
        503,
        "server_error",
        format!("No model server is available for `{model}` ({why})."),
    )
    .with_code("service_unavailable")
    .with_retry_after(retry_after)
}

/// The client's error for a request admission did not admit. One that waited its whole queue time for a pool that
/// still has no pod (`no_pod`: scaled to zero, and none became ready in time) is a 503 `service_unavailable` with the
/// queue's `Retry-After`, not the 429 of a busy pool: no rate of the client's caused it.
pub fn rejected(model: &str, no_pod: bool, r: &admission::Reject) -> ApiError {
    let e = r.to_api_error();
    if !no_pod || r.reason != admission::RejectReason::DeadlineExceeded {
        return e;
    }
    let held = ApiError::new(
        503,
        "server_error",
        format!(
            "No model server for `{model}` became ready in time. {}",
            r.message
        ),
    )
    .with_code("service_unavailable")
    .blamed(Blame::Upstream);
    match e.retry_after {
        Some(s) => held.with_retry_after(s),
        None => held,
    }
}

/// The client's error after the last attempt failed with `last` (`None`: no endpoint could even be tried).
/// `breaker_retry_after` is asked only for the errors that carry it.
pub fn give_up(last: Option<Failure>, breaker_retry_after: impl FnOnce() -> u64) -> ApiError {
    match last {
        Some(Failure::Timeout) => ApiError::new(
            504,
            "server_error",
            "The model server did not answer in time.",
        )
        .with_code("gateway_timeout")
        .blamed(Blame::Upstream),
        Some(Failure::Connect(m)) => ApiError::new(
            503,
            "server_error",
            format!("No model server could be reached: {m}"),
        )
        .with_code("service_unavailable")
        .blamed(Blame::Upstream)
        .with_retry_after(breaker_retry_after()),
        Some(Failure::Broken(m)) => {
            ApiError::new(502, "server_error", format!("The model server failed: {m}"))
                .with_code("bad_gateway")
                .blamed(Blame::Upstream)
        }
        Some(Failure::Status(s, ra, b)) => {
            let e = crate::error::from_upstream(s, &b);
            match ra.or((s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::SERVICE_UNAVAILABLE)
                .then_some(1))
            {
                Some(ra) => e.with_retry_after(ra),
                None => e,
            }
        }
        None => ApiError::new(503, "server_error", "No model server is available.")
            .with_code("service_unavailable")
            .with_retry_after(breaker_retry_after()),
    }
}

#[cfg(test)]
mod tests {
    use policies::openai::Api;

    use super::*;

    fn view(api: Api, body: &'static [u8]) -> View {
        View::parse(api, Bytes::from_static(body)).unwrap()
    }

    #[test]
    fn body_is_forwarded_untouched_when_nothing_changes() {
        let v = view(
            Api::Completions,
            br#"{"model":"m","prompt":"x","max_tokens":3}"#,
        );
        assert_eq!(v.max_tokens, Some(3));
        let out = upstream_body(&v, "m", false).unwrap();
        assert_eq!(out.as_ptr(), v.body.as_ptr());
    }

    #[test]
    fn usage_is_spliced_in_and_model_rewritten() {
        let v = view(
            Api::Completions,
            br#" {"model":"m","prompt":"x","stream":true}"#,
        );
        let out = upstream_body(&v, "m", true).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(j["stream_options"]["include_usage"], true);
        assert_eq!(j["prompt"], "x");
        let out = upstream_body(&v, "upstream-m", true).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (
                j["model"].as_str(),
                j["stream_options"]["include_usage"].as_bool()
            ),
            (Some("upstream-m"), Some(true))
        );
        let v = view(
            Api::Completions,
            br#"{"model":"m","prompt":"x","stream":true,"stream_options":{"continuous_usage_stats":true}}"#,
        );
        let j: serde_json::Value =
            serde_json::from_slice(&upstream_body(&v, "m", true).unwrap()).unwrap();
        assert_eq!(
            j["stream_options"],
            serde_json::json!({"continuous_usage_stats": true, "include_usage": true})
        );
    }

    #[test]
    fn a_request_that_waited_in_vain_for_a_pool_at_zero_is_a_503_with_retry_after() {
        use admission::{Reject, RejectReason};
        let late = Reject::new(
            RejectReason::DeadlineExceeded,
            Some(Duration::from_millis(1500)),
            "waited 3000 ms",
        );
        let e = rejected("m", true, &late);
        assert_eq!(
            (e.status, e.code.as_deref(), e.retry_after, e.blame),
            (503, Some("service_unavailable"), Some(2), Blame::Upstream)
        );
        assert!(e.message.contains("`m`") && e.message.contains("waited 3000 ms"));
        // A pool with pods that stayed busy: the queue's 429.
        let e = rejected("m", false, &late);
        assert_eq!((e.status, e.code.as_deref()), (429, Some("queue_timeout")));
        // Other rejections are never rewritten.
        let full = Reject::new(
            RejectReason::QueueFull,
            Some(Duration::from_secs(1)),
            "full",
        );
        assert_eq!(rejected("m", true, &full).status, 429);
    }

    #[test]
    fn failures_map_to_retry_reasons_verdicts_and_client_errors() {
        assert_eq!(classify_status(StatusCode::OK), HeadVerdict::Answer);
        assert_eq!(
            classify_status(StatusCode::BAD_REQUEST),
            HeadVerdict::Answer
        );
        assert_eq!(
            classify_status(StatusCode::TOO_MANY_REQUESTS),
            HeadVerdict::Retry
        );
        assert_eq!(classify_status(StatusCode::BAD_GATEWAY), HeadVerdict::Retry);
        let busy = Failure::Status(StatusCode::TOO_MANY_REQUESTS, None, Bytes::new());
        assert!(!busy.counts_against_endpoint());
        assert_eq!(busy.reason(), RetryReason::Status429);
        assert!(Failure::Timeout.counts_against_endpoint());
        let e = give_up(Some(Failure::Timeout), || unreachable!());
        assert_eq!((e.status, e.blame), (504, Blame::Upstream));
        let e = give_up(Some(Failure::Connect("refused".into())), || 7);
        assert_eq!((e.status, e.retry_after), (503, Some(7)));
        let e = give_up(Some(busy), || unreachable!());
        assert_eq!((e.status, e.retry_after, e.retryable), (429, Some(1), true));
        let e = give_up(None, || 2);
        assert_eq!(
            (e.status, e.blame, e.retry_after),
            (503, Blame::Internal, Some(2))
        );
    }

    #[test]
    fn backend_cooldown_follows_retry_after_within_bounds() {
        assert_eq!(backend_cooldown(None), Duration::from_secs(5));
        let h = HeaderValue::from_static("2");
        assert_eq!(backend_cooldown(Some(&h)), Duration::from_secs(2));
        let h = HeaderValue::from_static("600");
        assert_eq!(backend_cooldown(Some(&h)), Duration::from_secs(60));
    }
}
