//! The phases of [`crate::pipeline`] for a request the gateway holds: identify, resolve, route and admit are the very
//! functions `weir serve` runs, and the pick is [`plan::pick`] over [`plan::candidates`], committed to the pool's
//! prefix index and decision ring as [`crate::execute`] commits it. Only the proxy step differs: the gateway sends
//! the request to the pick, and the account phase runs when it reports the response's end ([`Held::finish`]).
//! [`route_request`] runs in three steps: [`parse`] (the path and identify), [`decide`] (resolve, route, admit) and
//! [`act`] (body, pick, fail-open or refusal).
//!
//! Differences from the proxy path, all because the gateway, not weir, talks to the pod: the pick's fallbacks are the
//! endpoints weir's own retries would try next (as the protocol's `ip:port,ip:port..` list), picked at once; a P/D
//! pool's decision is served colocated on its decode pod (no prefill leg runs); `stream_options.include_usage` is not
//! injected (nobody would strip the extra chunk).

use std::sync::Arc;

use axum::extract::Request;
use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderValue};
use policies::errors::ApiError;
use policies::openai::Api;

use crate::ctx::{Admitted, Ctx};
use crate::execute::{Attempt, Outcome};
use crate::gate::End;
use crate::ids::with_rng;
use crate::metrics::{EndpointLabel, ModelOutcome, StreamOutcome};
use crate::plan::{self, Plan};
use crate::shared::AppState;
use crate::snapshot::{EndpointSnapshot, Pool};
use crate::sse::Usage;
use crate::state::{EndpointState, PrefillClaim};

/// What to do when the picker cannot pick (no eligible endpoint): the InferencePool's `failureMode` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// Answer 503 (the InferencePool default).
    #[default]
    FailClose,
    /// Send the request to an endpoint of the pool drawn at random, past the filters (503 only when the pool has
    /// none, or when the gateway sent a subset hint: the protocol wants a 503 then).
    FailOpen,
}

impl std::str::FromStr for FailureMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail-close" | "FailClose" => Ok(Self::FailClose),
            "fail-open" | "FailOpen" => Ok(Self::FailOpen),
            o => Err(format!(
                "unknown failure mode `{o}` (fail-close, fail-open)"
            )),
        }
    }
}

/// A request the gateway holds, as read from ext_proc.
#[derive(Debug)]
pub struct GatewayRequest {
    /// `:path` without the query.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The data plane's subset hint: pick only among these `ip:port`s.
    pub subset: Option<Vec<String>>,
    /// The latest the request may be dispatched: the gateway stops waiting for the answer soon after.
    pub deadline: Option<std::time::Instant>,
}

/// A routed request: where the gateway sends it, with what, and what weir holds until the answer.
pub struct Routed {
    /// `ip:port` of the pick, then of the fallbacks in retry order.
    pub destinations: Vec<String>,
    /// The body to send: the client's bytes, or rewritten for the pool's model name.
    pub body: Bytes,
    /// The pool's own `Authorization` for its pods (the client's credentials never reach them).
    pub upstream_auth: Option<HeaderValue>,
    pub request_id: HeaderValue,
    pub held: Held,
}

/// What the gateway reported of the pod's answer, for the account phase ([`Held::finish`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// `:status` of the response head, `None` when none was reported.
    pub status: Option<u16>,
    /// The usage read from the response body (the last usage chunk of a stream, the `usage` of a JSON body).
    pub usage: Option<Usage>,
    /// A 2xx `text/event-stream` answer: its end is also counted in `weir_stream_outcomes`.
    pub streaming: bool,
    /// The response reached its end of stream; `false`: the exchange ended first (client gone, gateway error).
    pub complete: bool,
}

/// What a routed request holds while the gateway proxies it: admission's permit, the active-request count, the
/// picked endpoint's in-flight counts and prefill claim. Settled once by [`Held::finish`] (dropping it counts the
/// request cancelled).
pub struct Held {
    app: Arc<AppState>,
    model: Arc<str>,
    admitted: Admitted,
    permit: Option<admission::Permit>,
    endpoint: Option<Picked>,
}

impl Held {
    /// The pod's response head arrived (its first byte): its prefill of this request is over; a 5xx counts against
    /// the endpoint's breaker, a 429 cools it as the proxy path does.
    pub fn answered(&mut self, status: u16, retry_after: Option<&HeaderValue>) {
        let Some((state, att, claim)) = &mut self.endpoint else {
            return;
        };
        claim.release();
        let now = tokio::time::Instant::now();
        if status == 429 {
            state.cool(
                now.duration_since(self.app.epoch),
                plan::backend_cooldown(retry_after),
            );
        }
        if status >= 500 {
            att.failure(now.into_std());
        } else {
            att.success();
        }
    }

    /// The account phase: counts the answer (its status, its usage in `weir_tokens_total`) once, settles the permit
    /// with that usage (completed or failed by status when the response ended, cancelled when the exchange ended
    /// first) and releases the in-flight counts.
    pub fn finish(mut self, r: Report) {
        let status = match (r.status, r.complete) {
            (Some(s), _) => s,
            // The whole body came without a reported head (the gateway skips response headers).
            (None, true) => 200,
            // The exchange ended before the pod answered: the client went away (as a client leaving its queue).
            (None, false) => 499,
        };
        let outcome = Outcome {
            status,
            endpoint: None,
            attempts: 1,
            streaming: r.streaming,
            usage: r.usage,
        };
        let permit = self.permit.take();
        let (settled, cut) = if r.complete {
            (permit, None)
        } else {
            (None, permit)
        };
        crate::pipeline::account(
            &self.app,
            &self.model,
            &self.admitted.series,
            &outcome,
            settled,
        );
        if let Some(p) = cut {
            crate::gate::settle(p, End::Cancelled, r.usage);
        }
        if r.streaming {
            let outcome = if r.complete {
                StreamOutcome::Complete
            } else {
                StreamOutcome::Cancelled
            };
            self.app
                .metrics
                .stream_outcomes
                .get_or_create(&ModelOutcome {
                    model: self.model.clone().into(),
                    outcome,
                })
                .inc();
        }
    }

    /// A refusal after admission: answered at once with `status`.
    fn refuse(self, error: ApiError, ctx: &mut Ctx) -> Refusal {
        self.finish(Report {
            status: Some(error.status),
            complete: true,
            ..Report::default()
        });
        Refusal {
            error,
            request_id: ctx.request_id.clone(),
            rate: ctx.rate.take(),
        }
    }
}

/// The refusal the gateway answers the client with.
#[derive(Debug)]
pub struct Refusal {
    pub error: ApiError,
    pub request_id: HeaderValue,
    /// `x-ratelimit-*` of the tenant, when admission decided.
    pub rate: Option<admission::RateHeaders>,
}

impl Refusal {
    /// A refusal before admission, counted under `model` as `weir serve` counts it.
    fn counted(
        app: &AppState,
        model: &Arc<str>,
        error: ApiError,
        request_id: &HeaderValue,
        rate: Option<admission::RateHeaders>,
    ) -> Self {
        app.count(model, error.status);
        Self {
            error,
            request_id: request_id.clone(),
            rate,
        }
    }
}

/// The API of a path, as the front door routes it (404 otherwise).
fn api_of(path: &str) -> Result<Api, ApiError> {
    match path {
        "/v1/chat/completions" => Ok(Api::Chat),
        "/v1/completions" => Ok(Api::Completions),
        p => Err(ApiError::unknown_path("POST", p)),
    }
}

/// Runs identify → resolve → route → admit → pick for `req`. Cancel-safe: dropped while queued in admission, the
/// request leaves its queue.
pub async fn route_request(
    app: &Arc<AppState>,
    mode: FailureMode,
    req: GatewayRequest,
) -> Result<Routed, Refusal> {
    let start = tokio::time::Instant::now();
    let request_id = crate::ids::request_id(&req.headers);
    let subset = req.subset.clone();
    let mut ctx = parse(app, req, start, &request_id)
        .await
        .map_err(|e| Refusal::counted(app, &app.unknown_model, e, &request_id, None))?;
    let snap = app.snapshot.load_full();
    let granted = decide(app, &snap, &mut ctx).await?;
    act(
        app,
        mode,
        &snap,
        ctx,
        granted,
        subset.as_deref(),
        tokio::time::Instant::now(),
    )
    .map_err(|r| *r)
}

/// Parse: the path's API, then `weir serve`'s identify phase (tenant, body under its limit, the request view).
async fn parse(
    app: &AppState,
    req: GatewayRequest,
    start: tokio::time::Instant,
    request_id: &HeaderValue,
) -> Result<Ctx, ApiError> {
    let api = api_of(&req.path)?;
    let mut http = Request::new(axum::body::Body::from(req.body));
    *http.method_mut() = hyper::Method::POST;
    *http.headers_mut() = req.headers;
    let (headers, view, tenant) =
        crate::pipeline::identify(app, api, http, app.proxy.max_body_bytes).await?;
    let mut ctx = Ctx::new(
        request_id.clone(),
        headers,
        view,
        start,
        tracing::Span::none(),
    );
    ctx.tenant = tenant;
    ctx.deadline = req.deadline;
    Ok(ctx)
}

/// What [`decide`] grants: the route's model, the plan, and the admitted request (its permit in the context).
struct Granted {
    model: Arc<str>,
    plan: Plan,
    admitted: Admitted,
}

/// Decide: `weir serve`'s resolve, route and admit phases (admission may hold the request in its tenant's tier
/// queue until the pool has room).
async fn decide(
    app: &Arc<AppState>,
    snap: &EndpointSnapshot,
    ctx: &mut Ctx,
) -> Result<Granted, Refusal> {
    let route = crate::pipeline::resolve(snap, ctx)
        .map_err(|e| Refusal::counted(app, &app.unknown_model, e, &ctx.request_id, None))?;
    let model = route.name.clone();
    let plan = crate::pipeline::route(app, snap, route, ctx)
        .map_err(|e| Refusal::counted(app, &model, e, &ctx.request_id, None))?;
    match crate::pipeline::admit(app, snap, route, &plan, ctx, None).await {
        Ok(admitted) => Ok(Granted {
            model,
            plan,
            admitted,
        }),
        Err(e) => {
            let rate = ctx.rate.take();
            Err(Refusal::counted(app, &model, e, &ctx.request_id, rate))
        }
    }
}

/// Act: the body the pod gets, then the pick and its fallbacks at `now` (or, failing open, any endpoint of the pool).
/// From here on the request holds what admission granted, so a refusal is accounted as its answer.
fn act(
    app: &Arc<AppState>,
    mode: FailureMode,
    snap: &EndpointSnapshot,
    mut ctx: Ctx,
    g: Granted,
    subset: Option<&[String]>,
    now: tokio::time::Instant,
) -> Result<Routed, Box<Refusal>> {
    let pool = &snap.pools[g.plan.pool];
    let mut held = Held {
        app: app.clone(),
        model: g.model,
        admitted: g.admitted,
        permit: ctx.permit.take(),
        endpoint: None,
    };
    // Without `stream_options.include_usage` injected: nobody would strip the extra chunk.
    let body = if g.plan.inject_usage {
        plan::upstream_body(&ctx.view, &pool.model, false)
    } else {
        Ok(g.plan.body.clone())
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return Err(Box::new(held.refuse(e, &mut ctx))),
    };
    let picked = pick(
        app,
        snap,
        pool,
        &ctx,
        &held.model,
        subset,
        g.plan.max_attempts,
        now,
    );
    let destinations = match picked {
        Ok((destinations, endpoint)) => {
            held.endpoint = Some(endpoint);
            destinations
        }
        Err(no) => match (mode, open_to(pool, subset)) {
            (FailureMode::FailOpen, Some(dest)) => {
                tracing::warn!(pool = %pool.name, reason = %no, %dest, "no endpoint picked; failing open");
                vec![dest]
            }
            _ => {
                let now = now.into_std();
                let ra = plan::breaker_retry_after(pool, now, app.proxy.max_retry_after_secs);
                let e = plan::no_endpoint(&ctx.view.model, &no, ra);
                return Err(Box::new(held.refuse(e, &mut ctx)));
            }
        },
    };
    Ok(Routed {
        destinations,
        body,
        upstream_auth: pool.upstream_auth.clone(),
        request_id: ctx.request_id,
        held,
    })
}

type Picked = (Arc<EndpointState>, Attempt, PrefillClaim);

/// The pick and its fallbacks at `now`, as the proxy path's attempts would pick them; the pick is committed (prefix
/// index, session, decision record, pick counter) and its in-flight counts held.
#[allow(clippy::too_many_arguments)]
fn pick(
    app: &AppState,
    snap: &EndpointSnapshot,
    pool: &Pool,
    ctx: &Ctx,
    model: &Arc<str>,
    subset: Option<&[String]>,
    max_attempts: u32,
    now: tokio::time::Instant,
) -> Result<(Vec<String>, Picked), policies::pick::NoEligibleEndpoint> {
    let routing = &snap.routing;
    let now_std = now.into_std();
    let (prep, rv) = plan::prepare(pool, &ctx.view, &ctx.headers, now_std, &routing.metrics);
    let mut tried: Vec<usize> = Vec::new();
    let mut destinations = Vec::new();
    let mut held: Option<Picked> = None;
    let mut first_err = None;
    for attempt in 0..max_attempts.max(1) {
        let mut views = plan::candidates(
            pool,
            &tried,
            now_std,
            now.duration_since(app.epoch),
            app.proxy.stale_after,
        );
        if let Some(s) = subset {
            for v in &mut views {
                if !s
                    .iter()
                    .any(|a| a == pool.endpoints[v.index].authority.as_str())
                {
                    v.available = false;
                }
            }
        }
        let picked = with_rng(|r| {
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
        });
        let p = match picked {
            Ok(p) => p,
            Err(no) => {
                first_err.get_or_insert(no);
                break;
            }
        };
        tried.push(p.index);
        let ep = &pool.endpoints[p.index];
        if held.is_some() {
            destinations.push(ep.authority.as_str().to_string());
            continue;
        }
        if !ep.state.try_acquire(now_std) {
            continue;
        }
        if let (Some(c), Some(pr), Some(mut d)) = (pool.cache.as_ref(), &prep, p.decided) {
            // No prefill leg runs behind a gateway: the decode pod computes the prompt.
            d.prefill = None;
            c.commit(&d, pr, now_std, &routing.metrics);
            let rid = ctx.request_id.to_str().unwrap_or("").to_string();
            let lazy = c.record(
                &rid,
                model,
                rv,
                views,
                pr,
                d,
                now_std,
                routing.unix_ms(now_std),
            );
            routing.ring.lock().push(lazy);
        }
        app.metrics
            .picks
            .get_or_create(&EndpointLabel {
                pool: pool.name.clone().into(),
                endpoint: ep.id.0.clone().into(),
            })
            .inc();
        held = Some((
            ep.state.clone(),
            Attempt::new(ep.state.clone(), p.attempt_tokens),
            PrefillClaim::new(ep.state.clone(), p.prefill_claim),
        ));
        destinations.push(ep.authority.as_str().to_string());
    }
    match (held, first_err) {
        (Some(h), _) => Ok((destinations, h)),
        (None, Some(no)) => Err(no),
        // Every pick's half-open breaker was already probing.
        (None, None) => Err(policies::pick::NoEligibleEndpoint::Filtered { by: "available" }),
    }
}

/// Fail-open's destination; none under a subset hint, where the protocol demands a 503 when no endpoint of the
/// subset is eligible.
fn open_to(pool: &Pool, subset: Option<&[String]>) -> Option<String> {
    subset.is_none().then(|| fallback(pool, None)).flatten()
}

/// Fail-open's destination: an endpoint of the pool (of the subset, when given) drawn at random. Also where a request
/// without a body (e.g. `GET /v1/models`) goes, as upstream's picker sends it.
pub fn fallback(pool: &Pool, subset: Option<&[String]>) -> Option<String> {
    let all: Vec<&str> = pool
        .endpoints
        .iter()
        .map(|e| e.authority.as_str())
        .filter(|a| subset.is_none_or(|s| s.iter().any(|x| x == a)))
        .collect();
    if all.is_empty() {
        return None;
    }
    let i = with_rng(|r| (policies::pick::unit(r) * all.len() as f64) as usize).min(all.len() - 1);
    Some(all[i].to_string())
}
