//! The phases of [`crate::pipeline`] for a request the gateway holds: identify, resolve, route and admit are the very
//! functions `weir serve` runs, and the pick is [`plan::pick`] over [`plan::candidates`], committed to the pool's
//! prefix index and decision ring as [`crate::execute`] commits it. Only the proxy step differs: the gateway sends
//! the request to the pick, and the account phase runs when it reports the answer ([`Held::finish`]).
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
use policies::pick::RequestView as PickView;

use crate::ctx::{Admitted, Ctx};
use crate::execute::Attempt;
use crate::gate::End;
use crate::ids::with_rng;
use crate::metrics::EndpointLabel;
use crate::plan;
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

/// What a routed request holds while the gateway proxies it: admission's permit, the active-request count, the
/// picked endpoint's in-flight counts and prefill claim. Settled once by [`Held::finish`] (dropping it counts the
/// request cancelled).
pub struct Held {
    app: Arc<AppState>,
    model: Arc<str>,
    admitted: Option<Admitted>,
    permit: Option<admission::Permit>,
    endpoint: Option<(Arc<EndpointState>, Attempt, PrefillClaim)>,
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

    /// The exchange ended: counts the answer (`None`: the gateway never reported one) and settles the permit with the
    /// usage seen in the response body.
    pub fn finish(mut self, status: Option<u16>, usage: Option<Usage>) {
        let series = self.admitted.as_ref().map(|a| a.series.clone());
        if let (Some(s), Some(series)) = (status, &series) {
            crate::pipeline::account(
                &self.app,
                &self.model,
                series,
                &crate::execute::Outcome {
                    status: s,
                    endpoint: None,
                    attempts: 1,
                    streaming: false,
                    usage,
                },
                self.permit.take(),
            );
        } else if let Some(p) = self.permit.take() {
            crate::gate::settle(p, End::Cancelled, usage);
        }
        drop(self.endpoint.take());
        drop(self.admitted.take());
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
    let refuse = |error: ApiError, model: &Arc<str>, rate| {
        app.count(model, error.status);
        Refusal {
            error,
            request_id: request_id.clone(),
            rate,
        }
    };
    let api = api_of(&req.path).map_err(|e| refuse(e, &app.unknown_model, None))?;
    let mut http = Request::new(axum::body::Body::from(req.body));
    *http.method_mut() = hyper::Method::POST;
    *http.headers_mut() = req.headers;
    let (headers, view, tenant) =
        crate::pipeline::identify(app, api, http, app.proxy.max_body_bytes)
            .await
            .map_err(|e| refuse(e, &app.unknown_model, None))?;
    let mut ctx = Ctx::new(
        request_id.clone(),
        headers,
        view,
        start,
        tracing::Span::none(),
    );
    ctx.tenant = tenant;
    let snap = app.snapshot.load_full();
    let route =
        crate::pipeline::resolve(&snap, &ctx).map_err(|e| refuse(e, &app.unknown_model, None))?;
    let model = route.name.clone();
    let planned =
        crate::pipeline::route(app, &snap, route, &ctx).map_err(|e| refuse(e, &model, None))?;
    let admitted = match crate::pipeline::admit(app, &snap, route, &planned, &mut ctx, None).await {
        Ok(a) => a,
        Err(e) => return Err(refuse(e, &model, ctx.rate.take())),
    };
    let pool = &snap.pools[planned.pool];
    let body = if planned.inject_usage {
        plan::upstream_body(&ctx.view, &pool.model, false)
    } else {
        Ok(planned.body.clone())
    };
    let mut held = Held {
        app: app.clone(),
        model: model.clone(),
        admitted: Some(admitted),
        permit: ctx.permit.take(),
        endpoint: None,
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let status = e.status;
            held.finish(Some(status), None);
            return Err(Refusal {
                error: e,
                request_id,
                rate: ctx.rate,
            });
        }
    };
    match pick(
        app,
        &snap,
        pool,
        &ctx,
        &model,
        req.subset.as_deref(),
        planned.max_attempts,
    ) {
        Ok((destinations, endpoint)) => {
            held.endpoint = endpoint;
            Ok(Routed {
                destinations,
                body,
                upstream_auth: pool.upstream_auth.clone(),
                request_id,
                held,
            })
        }
        Err(no) => match (mode, open_to(pool, req.subset.as_deref())) {
            (FailureMode::FailOpen, Some(dest)) => {
                tracing::warn!(pool = %pool.name, reason = %no, %dest, "no endpoint picked; failing open");
                Ok(Routed {
                    destinations: vec![dest],
                    body,
                    upstream_auth: pool.upstream_auth.clone(),
                    request_id,
                    held,
                })
            }
            _ => {
                let now = tokio::time::Instant::now().into_std();
                let ra = plan::breaker_retry_after(pool, now, app.proxy.max_retry_after_secs);
                let e = plan::no_endpoint(&ctx.view.model, &no, ra);
                held.finish(Some(e.status), None);
                Err(Refusal {
                    error: e,
                    request_id,
                    rate: ctx.rate,
                })
            }
        },
    }
}

type Picked = (Arc<EndpointState>, Attempt, PrefillClaim);

/// The pick and its fallbacks, as the proxy path's attempts would pick them; the pick is committed (prefix index,
/// session, decision record, pick counter) and its in-flight counts held.
fn pick(
    app: &AppState,
    snap: &EndpointSnapshot,
    pool: &Pool,
    ctx: &Ctx,
    model: &Arc<str>,
    subset: Option<&[String]>,
    max_attempts: u32,
) -> Result<(Vec<String>, Option<Picked>), policies::pick::NoEligibleEndpoint> {
    let routing = &snap.routing;
    let now = tokio::time::Instant::now();
    let now_std = now.into_std();
    let prep = pool.cache.as_ref().map(|c| {
        let session = ctx
            .headers
            .get("x-session-id")
            .and_then(|v| v.to_str().ok());
        c.prepare(&ctx.view, session, now_std, &routing.metrics)
    });
    let rv = PickView {
        prompt_tokens: prep
            .as_ref()
            .map_or(ctx.view.estimated_prompt_tokens(), |p| p.prompt_tokens),
        max_tokens: ctx.view.max_tokens,
    };
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
        (Some(h), _) => Ok((destinations, Some(h))),
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
