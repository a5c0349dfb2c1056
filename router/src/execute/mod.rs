//! The proxy step's I/O: runs a [`Plan`] against the pool's endpoints, one attempt after another (each picked by
//! [`plan::pick`]), sends the request with connect / first-byte / idle timeouts, runs the prefill leg of a
//! disaggregated request, and returns the client's response with an [`Outcome`]. Every decision is made in
//! [`crate::plan`]; this file only waits, sends and counts.

mod prefill;
mod stream;
mod wire;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::response::Response;
use hyper::StatusCode;
use hyper::header;
use policies::endpoint::EndpointId;
use policies::errors::ApiError;

use self::prefill::run_prefill_leg;
use self::stream::{StreamParts, stream_body};
pub use self::wire::usage_of;
use self::wire::{collect_limited, response_head, upstream_request};
use crate::ctx::{Admitted, Ctx};
use crate::ids::with_rng;
use crate::metrics::EndpointLabel;
use crate::plan::{self, Failure, HeadVerdict, Plan};
use crate::route::PdLabel;
use crate::shared::AppState;
use crate::snapshot::EndpointSnapshot;
use crate::sse::Usage;
use crate::state::{EndpointState, PrefillClaim};

/// What happened to a request, for the phases after the proxy (metrics, decision record, ledger).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The status the client got.
    pub status: u16,
    /// The endpoint that answered, if any did.
    pub endpoint: Option<EndpointId>,
    /// Attempts made.
    pub attempts: u32,
    /// A streaming answer: its usage and end are accounted when the stream ends.
    pub streaming: bool,
    /// Token usage of a non-streaming answer.
    pub usage: Option<Usage>,
}

impl Outcome {
    /// An error answer after `attempts` attempts.
    pub fn failed(status: u16, attempts: u32) -> Self {
        Self {
            status,
            endpoint: None,
            attempts,
            streaming: false,
            usage: None,
        }
    }
}

/// Releases the router's own counts for one endpoint attempt, and the breaker's half-open probe if no verdict came.
/// Also held by [`crate::ext_proc`] for the request a gateway sends to its pick.
pub(crate) struct Attempt {
    state: Arc<EndpointState>,
    tokens: u64,
    verdict: bool,
}

impl Attempt {
    pub(crate) fn new(state: Arc<EndpointState>, tokens: u64) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
        Self {
            state,
            tokens,
            verdict: false,
        }
    }
    pub(crate) fn success(&mut self) {
        self.verdict = true;
        self.state.on_success();
    }
    pub(crate) fn failure(&mut self, now: std::time::Instant) {
        self.verdict = true;
        if self.state.on_failure(now) {
            tracing::warn!("circuit breaker opened");
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.state
            .in_flight_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
        if !self.verdict {
            self.state.on_abandoned();
        }
    }
}

/// Counts one retry against the budget while it runs.
struct RetryGuard<'a>(&'a AppState);

impl Drop for RetryGuard<'_> {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks an attempt's span failed (a no-op when the span is disabled: nothing is formatted).
pub(super) fn span_failed(span: &tracing::Span, kind: &str, why: &dyn std::fmt::Display) {
    span.record("error.type", kind);
    span.record("otel.status_code", "error");
    span.record("otel.status_description", tracing::field::display(why));
}

/// Runs `plan` for the admitted request in `ctx`; never panics, always answers.
pub async fn execute(
    app: &Arc<AppState>,
    snap: &EndpointSnapshot,
    ctx: &mut Ctx,
    admitted: Admitted,
    plan: Plan,
) -> (Response, Outcome) {
    let pool = &snap.pools[plan.pool];
    let routing = &snap.routing;
    let cache = pool.cache.as_ref();
    let cfg = &app.proxy;
    let (prep, rv) = plan::prepare(
        pool,
        &ctx.view,
        &ctx.headers,
        tokio::time::Instant::now().into_std(),
        &routing.metrics,
    );
    let model = admitted.model.clone();
    let mut tried: Vec<usize> = Vec::with_capacity(2);
    let mut last: Option<Failure> = None;
    let mut attempts = 0;

    for attempt in 0..plan.max_attempts {
        let _retry_guard = if attempt > 0 {
            let active = app.active_requests.load(Ordering::Relaxed);
            let retries = app.active_retries.load(Ordering::Relaxed);
            if !plan.retry_budget.allows(active, retries) {
                app.metrics.retry_budget_exhausted.inc();
                break;
            }
            app.active_retries.fetch_add(1, Ordering::Relaxed);
            let guard = RetryGuard(app);
            let u = with_rng(|r| policies::pick::unit(r));
            tokio::time::sleep(policies::pick::budget::backoff(
                attempt,
                plan::RETRY_BACKOFF_BASE,
                u,
            ))
            .await;
            Some(guard)
        } else {
            None
        };
        let now = tokio::time::Instant::now();
        let now_std = now.into_std();
        let views = plan::candidates(
            pool,
            &tried,
            now_std,
            now.duration_since(app.epoch),
            cfg.stale_after,
        );
        let pick_span = tracing::debug_span!(
            "pick",
            attempt = i64::from(attempt),
            "weir.pool" = &*pool.name,
            "weir.endpoint" = tracing::field::Empty,
            "weir.prefill_endpoint" = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        let picked = pick_span.in_scope(|| {
            with_rng(|r| {
                plan::pick(
                    pool,
                    &ctx.view,
                    prep.as_ref(),
                    &rv,
                    &views,
                    attempt,
                    now_std,
                    r,
                )
            })
        });
        let pick = match picked {
            Ok(p) => p,
            Err(no) => {
                pick_span.record("otel.status_code", "error");
                pick_span.record("otel.status_description", tracing::field::display(&no));
                if last.is_some() {
                    break;
                }
                let ra = plan::breaker_retry_after(pool, now_std, cfg.max_retry_after_secs);
                let e = plan::no_endpoint(&ctx.view.model, &no, ra);
                return (
                    crate::error::respond(&e, &ctx.request_id),
                    Outcome::failed(e.status, attempts),
                );
            }
        };
        let index = pick.index;
        tried.push(index);
        let ep = pool.endpoints[index].clone();
        if !ep.state.try_acquire(now_std) {
            continue;
        }
        attempts += 1;
        tracing::debug!(endpoint = %ep.id, attempt, "picked");
        pick_span.record("weir.endpoint", ep.id.as_str());
        if let Some(pi) = pick.decided.as_ref().and_then(|d| d.prefill) {
            pick_span.record("weir.prefill_endpoint", pool.endpoints[pi].id.as_str());
        }
        drop(pick_span);
        ctx.span.record("weir.endpoint", ep.id.as_str());
        app.metrics
            .picks
            .get_or_create(&EndpointLabel {
                pool: pool.name.clone().into(),
                endpoint: ep.id.0.clone().into(),
            })
            .inc();
        let mut att = Attempt::new(ep.state.clone(), pick.attempt_tokens);
        // The pod's prefill backlog until the first token: the uncached prompt (the byte estimate without a
        // cache-aware pool). A disaggregated request's prompt is computed on the prefill pod instead (its leg claims
        // it there), unless that leg fails (claimed here at the fallback below).
        let mut first_token = PrefillClaim::new(ep.state.clone(), pick.prefill_claim);
        let mut send_body = plan.body.clone();
        let mut recorded: Option<String> = None;
        if let (Some(c), Some(p), Some(d)) = (cache, &prep, pick.decided) {
            c.commit(&d, p, now_std, &routing.metrics);
            let prefill = d.prefill;
            let is_pd = matches!(d.how, crate::route::How::Pd(_));
            let rid = ctx.request_id.to_str().unwrap_or("").to_string();
            let mut lazy = c.record(
                &rid,
                &model,
                rv,
                views,
                p,
                d,
                now_std,
                routing.unix_ms(now_std),
            );
            let pd = |decision| {
                routing
                    .metrics
                    .pd
                    .get_or_create(&PdLabel { decision })
                    .inc()
            };
            if let Some(pi) = prefill {
                match run_prefill_leg(app, pool, pi, c, p, ctx, &plan.body).await {
                    Ok(b) => {
                        send_body = b;
                        pd("disaggregated");
                    }
                    Err(why) => {
                        tracing::warn!(prefill = %pool.endpoints[pi].id, reason = %why, "prefill leg failed; serving colocated");
                        pd("fallback");
                        lazy.fallback = Some(why);
                        first_token =
                            PrefillClaim::new(ep.state.clone(), u64::from(c.uncached(p, index)));
                    }
                }
            } else if is_pd {
                pd("colocated");
            }
            routing.ring.lock().push(lazy);
            ctx.span.record("weir.decision_id", rid.as_str());
            recorded = Some(rid);
        }
        ctx.decision_id.clone_from(&recorded);
        // The upstream attempt (the decode leg of a disaggregated request); its id is the backend's parent span.
        let up_span = tracing::debug_span!(
            "upstream",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            attempt = i64::from(attempt),
            "weir.endpoint" = ep.id.as_str(),
            "server.address" = ep.authority.as_str(),
            "http.response.status_code" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
            "weir.stream_outcome" = tracing::field::Empty,
        );
        let trace =
            crate::telemetry::upstream_traceparent(&up_span, ctx.headers.get("traceparent"));
        let req = match upstream_request(ctx, send_body, trace, pool.upstream_auth.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                att.verdict = true;
                let e = ApiError::new(
                    500,
                    "server_error",
                    format!("could not build upstream request: {e}"),
                );
                return (
                    crate::error::respond(&e, &ctx.request_id),
                    Outcome::failed(500, attempts),
                );
            }
        };

        let sent = app.upstream.send(ep.authority.as_str(), req);
        let failure = match tokio::time::timeout(cfg.first_byte, sent).await {
            Err(_) => {
                span_failed(&up_span, "timeout", &"no response head in time");
                Failure::Timeout
            }
            Ok(Err(e)) => {
                let msg = format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                );
                tracing::warn!(endpoint = %ep.id, error = %msg, "upstream request failed");
                if e.is_connect() {
                    span_failed(&up_span, "connect", &msg);
                    Failure::Connect(msg)
                } else {
                    span_failed(&up_span, "broken", &msg);
                    Failure::Broken(msg)
                }
            }
            Ok(Ok(resp)) => {
                let status = resp.status();
                up_span.record("http.response.status_code", i64::from(status.as_u16()));
                if status.is_client_error() || status.is_server_error() {
                    span_failed(&up_span, status.as_str(), &status);
                }
                if status == StatusCode::TOO_MANY_REQUESTS {
                    let d = plan::backend_cooldown(resp.headers().get(header::RETRY_AFTER));
                    ep.state
                        .cool(tokio::time::Instant::now().duration_since(app.epoch), d);
                    tracing::debug!(endpoint = %ep.id, cooldown_ms = d.as_millis() as u64, "backend 429; cooling the endpoint");
                }
                match plan::classify_status(status) {
                    HeadVerdict::Retry => {
                        let (parts, b) = resp.into_parts();
                        let bytes = collect_limited(b, 64 << 10, cfg.idle)
                            .await
                            .unwrap_or_default();
                        Failure::Status(status, plan::retry_after_header(&parts.headers), bytes)
                    }
                    HeadVerdict::Answer => {
                        let (parts, upstream) = resp.into_parts();
                        let is_sse = parts
                            .headers
                            .get(header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.starts_with("text/event-stream"));
                        let out = response_head(status, &parts.headers, ctx, &ep);
                        let outcome = Outcome {
                            status: status.as_u16(),
                            endpoint: Some(ep.id.clone()),
                            attempts,
                            streaming: false,
                            usage: None,
                        };
                        if is_sse && status.is_success() {
                            let stream = StreamParts {
                                att,
                                up_span,
                                first_token,
                                recorded,
                                inject_usage: plan.inject_usage,
                                permit: ctx.permit.take(),
                            };
                            // The request stays active (and its end-to-end time open) until the stream ends.
                            let body = stream_body(app, snap, ctx, admitted, upstream, stream);
                            let resp = out
                                .body(body)
                                .unwrap_or_else(|_| Response::new(Body::empty()));
                            return (
                                resp,
                                Outcome {
                                    streaming: true,
                                    ..outcome
                                },
                            );
                        }
                        match collect_limited(upstream, app.proxy.max_response_bytes, cfg.idle)
                            .await
                        {
                            Err(e) => {
                                span_failed(&up_span, "broken_body", &e);
                                Failure::Broken(e)
                            }
                            Ok(bytes) => {
                                att.success();
                                if !status.is_success() {
                                    // A 4xx from the model server: the endpoint is healthy, the request is not.
                                    let e = crate::error::from_upstream(status, &bytes);
                                    return (
                                        crate::error::respond(&e, &ctx.request_id),
                                        Outcome {
                                            status: e.status,
                                            ..outcome
                                        },
                                    );
                                }
                                if recorded.is_some() || !ctx.span.is_disabled() {
                                    let ms = ctx.start.elapsed().as_secs_f64() * 1000.0;
                                    if let Some(rid) = &recorded {
                                        routing.measured_ttft(rid, ms);
                                    }
                                    ctx.span.record("weir.ttft_ms", ms);
                                }
                                let usage = usage_of(&bytes);
                                let resp = out
                                    .body(Body::from(bytes))
                                    .unwrap_or_else(|_| Response::new(Body::empty()));
                                return (resp, Outcome { usage, ..outcome });
                            }
                        }
                    }
                }
            }
        };
        if failure.counts_against_endpoint() {
            att.failure(tokio::time::Instant::now().into_std());
        } else {
            att.success();
        }
        app.retried(&model, failure.reason(), attempt, plan.max_attempts);
        last = Some(failure);
    }

    drop(admitted);
    let now_std = tokio::time::Instant::now().into_std();
    let e = plan::give_up(last, || {
        plan::breaker_retry_after(pool, now_std, cfg.max_retry_after_secs)
    });
    (
        crate::error::respond(&e, &ctx.request_id),
        Outcome::failed(e.status, attempts),
    )
}
