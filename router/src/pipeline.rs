//! The request path of `/v1/chat/completions` and `/v1/completions`, in named phases over one [`Ctx`]:
//!
//! 1. [`identify`]: the tenant (API key, when admission is on; 401 otherwise), the request id, the body read under
//!    its size limit and parsed once into the request view;
//! 2. [`resolve`]: the model must name a route (404);
//! 3. [`route`]: the pure [`plan`](crate::plan::plan): target pool by weight, upstream body, retry budget;
//! 4. [`admit`]: with admission on, the request waits in its tenant's tier queue of that pool until the pool has room
//!    ([`crate::gate`]; 403 for a model the tenant may not use, 429 + `Retry-After` when the queue is full or the
//!    wait too long); it holds a permit from then on, and is counted active ([`Admitted`]);
//! 5. [`proxy`]: [`execute`](crate::execute::execute) does the I/O, picking an endpoint per attempt;
//! 6. [`account`]: the [`Outcome`] is counted (status, usage) once, and the permit settled with it (a stream's when
//!    it ends).
//!
//! Every phase takes typed input and returns typed output or an [`ApiError`]; [`completions`] runs them and renders
//! an error, wherever it came from, through [`crate::error::respond`].

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use policies::errors::ApiError;
use policies::openai::Api;

use admission::{AdmitRequest, Identity, Permit};

use crate::ctx::{Admitted, Ctx};
use crate::error::{respond, too_large};
use crate::execute::Outcome;
use crate::gate::End;

/// Resolves when the client left.
type Gone = tokio::sync::oneshot::Receiver<()>;
use crate::ids::with_rng;
use crate::metrics::ModelSeries;
use crate::plan::{Plan, View};
use crate::shared::AppState;
use crate::snapshot::{EndpointSnapshot, Route};

/// The server span of a request (`crate::telemetry`). Debug level: at the default `info` filter, without OTLP, the
/// span is disabled, so nothing is built or formatted per request.
fn request_span(api: Api, request_id: &HeaderValue) -> tracing::Span {
    tracing::debug_span!(
        "request",
        otel.name = match api {
            Api::Chat => "POST /v1/chat/completions",
            Api::Completions => "POST /v1/completions",
        },
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        "http.request.method" = "POST",
        "url.path" = api.path(),
        "weir.request_id" = request_id.to_str().unwrap_or_default(),
        "weir.tenant" = tracing::field::Empty,
        "gen_ai.request.model" = tracing::field::Empty,
        "weir.stream" = tracing::field::Empty,
        "http.response.status_code" = tracing::field::Empty,
        "weir.endpoint" = tracing::field::Empty,
        "weir.decision_id" = tracing::field::Empty,
        "weir.ttft_ms" = tracing::field::Empty,
    )
}

/// Phase 1: the tenant (before the body is read: a caller without a valid key costs no body read), then the body
/// (413 over `limit`, declared or actual) parsed once into the request view.
pub async fn identify(
    app: &AppState,
    api: Api,
    req: Request,
    limit: usize,
) -> Result<(HeaderMap, View, Option<Identity>), ApiError> {
    let tenant = match &app.admission {
        Some(adm) => Some(
            adm.identify(crate::gate::api_key(req.headers()))
                .map_err(|r| r.to_api_error())?,
        ),
        None => None,
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let (parts, body) = req.into_parts();
    // A client that sends its head and then trickles (or stalls) its body is cut off after `body_read_timeout`.
    let read = axum::body::to_bytes(body, limit);
    let read = tokio::time::timeout(app.front_door.body_read_timeout, read)
        .await
        .map_err(|_| {
            ApiError::new(
                408,
                "invalid_request_error",
                "The request body was not received in time.",
            )
            .with_code("request_timeout")
        })?;
    let bytes: Bytes = read.map_err(|e| {
        let over = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if over {
            too_large(limit)
        } else {
            ApiError::invalid_request(
                format!("Could not read the request body: {e}"),
                None,
                "invalid_body",
            )
        }
    })?;
    let view = View::parse(api, bytes)?;
    let max = app.front_door.max_messages;
    if view.messages > max {
        return Err(ApiError::invalid_request(
            format!(
                "Invalid 'messages': array too long. Expected an array with maximum length {max}, but got an array \
                 with length {} instead.",
                view.messages
            ),
            Some("messages"),
            "array_above_max_length",
        ));
    }
    Ok((parts.headers, view, tenant))
}

/// Phase 2: the route serving the request's model (404 `model_not_found` otherwise).
pub fn resolve<'s>(snap: &'s EndpointSnapshot, ctx: &Ctx) -> Result<&'s Route, ApiError> {
    crate::plan::resolve(snap, &ctx.view.model)
}

/// Phase 3: the plan (pure): target pool by weight, the upstream body, attempts and retry budget.
pub fn route(
    app: &AppState,
    snap: &EndpointSnapshot,
    route: &Route,
    ctx: &Ctx,
) -> Result<Plan, ApiError> {
    crate::plan::plan(
        route,
        &snap.pools,
        &ctx.view,
        app.proxy.max_attempts,
        app.proxy.retry_budget,
        || with_rng(|r| policies::pick::unit(r)),
    )
}

/// Phase 4: with admission on, waits in the tenant's tier queue of the plan's pool until the pool has room and
/// keeps the permit in `ctx` (cancel-safe: a client that leaves while queued frees its place at once). Then the
/// request is counted active. A pool with no pod has no room, so its requests wait here for discovery to add one
/// (scale from zero); one that waits its whole time in vain gets a 503 (see [`crate::plan::rejected`]).
pub async fn admit(
    app: &Arc<AppState>,
    snap: &EndpointSnapshot,
    route: &Route,
    plan: &Plan,
    ctx: &mut Ctx,
    gone: Option<Gone>,
) -> Result<Admitted, ApiError> {
    if let (Some(adm), Some(who)) = (&app.admission, &ctx.tenant) {
        let req = AdmitRequest {
            model: route.name.to_string(),
            pool: snap.pools[plan.pool].name.to_string(),
            prompt_tokens: u64::from(ctx.view.estimated_prompt_tokens()),
            max_tokens: ctx.view.max_tokens.map(u64::from),
            deadline: ctx.deadline,
        };
        let waiting = adm.admit(who, req, tokio::time::Instant::now().into_std());
        let permit = match gone {
            None => waiting.await,
            Some(gone) => tokio::select! {
                p = waiting => p,
                // Dropping `waiting` frees the place (counted `abandoned`); nobody reads this answer.
                _ = gone => return Err(ApiError::new(499, "invalid_request_error", "The client went away.")),
            },
        }
        .map_err(|r| {
            ctx.rate = r.rate;
            let pool = &snap.pools[plan.pool].name;
            let now = app.snapshot.load();
            let no_pod = now
                .pools
                .iter()
                .find(|p| p.name == *pool)
                .is_none_or(|p| p.endpoints.is_empty());
            crate::plan::rejected(&route.name, no_pod, &r)
        })?;
        ctx.rate = Some(permit.rate);
        ctx.permit = Some(permit);
    }
    let model = route.name.clone();
    let series = app.metrics.model(&model);
    Ok(Admitted::new(app.clone(), model, series, ctx.start))
}

/// Phase 5: runs the plan; always answers.
pub async fn proxy(
    app: &Arc<AppState>,
    snap: &EndpointSnapshot,
    ctx: &mut Ctx,
    admitted: Admitted,
    plan: Plan,
) -> (Response, Outcome) {
    crate::execute::execute(app, snap, ctx, admitted, plan).await
}

/// Phase 6: counts the answer under the route's model label, and a non-streaming answer's token usage, and settles
/// the permit still held (a stream's permit and usage are settled when the stream ends).
pub fn account(
    app: &AppState,
    model: &Arc<str>,
    series: &ModelSeries,
    outcome: &Outcome,
    permit: Option<Permit>,
) {
    app.count(model, outcome.status);
    if let Some(u) = outcome.usage {
        series.prompt_tokens.inc_by(u.prompt_tokens);
        series.completion_tokens.inc_by(u.completion_tokens);
    }
    if let Some(p) = permit {
        crate::gate::settle(p, End::of_status(outcome.status), outcome.usage);
    }
}

/// Runs the phases for one completions request.
pub async fn completions(app: Arc<AppState>, api: Api, req: Request) -> Response {
    let start = tokio::time::Instant::now();
    let request_id = crate::ids::request_id(req.headers());
    let span = request_span(api, &request_id);
    crate::telemetry::set_remote_parent(&span, req.headers());
    let (headers, view, tenant) = match identify(&app, api, req, app.proxy.max_body_bytes).await {
        Ok(v) => v,
        Err(e) => {
            app.count(&app.unknown_model, e.status);
            return answered(&span, respond(&e, &request_id));
        }
    };
    span.record("gen_ai.request.model", view.model.as_str());
    span.record("weir.stream", view.stream);
    if let Some(t) = &tenant {
        span.record("weir.tenant", &*t.tenant);
    }
    let mut ctx = Ctx::new(request_id, headers, view, start, span.clone());
    ctx.tenant = tenant;
    let resp = if app.proxy.drain_cancelled {
        // Usage is billed: once dispatched, the request runs to its end even if the client leaves (its own task; a
        // stream is then read to its end by the drain), so the ledger gets the pod's usage. While it is still
        // queued, the client leaving frees its place at once (`gone`).
        let (alive, gone) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tracing::Instrument::instrument(
            serve(app.clone(), ctx, Some(gone)),
            span.clone(),
        ));
        let resp = task.await;
        drop(alive);
        resp.unwrap_or_else(|e| {
            tracing::error!(error = %e, "request task failed");
            let e = ApiError::new(500, "server_error", "The request failed inside the router.");
            respond(&e, &crate::ids::new_request_id())
        })
    } else {
        tracing::Instrument::instrument(serve(app, ctx, None), span.clone()).await
    };
    answered(&span, resp)
}

/// Phases 2 to 6. `gone` resolves when the client left (requests that run on after their client, see
/// [`completions`]).
async fn serve(app: Arc<AppState>, mut ctx: Ctx, gone: Option<Gone>) -> Response {
    let snap = app.snapshot.load_full();
    let route_ = match resolve(&snap, &ctx) {
        Ok(r) => r,
        Err(e) => {
            app.count(&app.unknown_model, e.status);
            return respond(&e, &ctx.request_id);
        }
    };
    let model = route_.name.clone();
    let planned = match route(&app, &snap, route_, &ctx) {
        Ok(plan) => admit(&app, &snap, route_, &plan, &mut ctx, gone)
            .await
            .map(|a| (plan, a)),
        Err(e) => Err(e),
    };
    let (mut plan, admitted) = match planned {
        Ok(p) => p,
        Err(e) => {
            app.count(&model, e.status);
            let mut r = respond(&e, &ctx.request_id);
            crate::gate::rate_headers(r.headers_mut(), ctx.rate.as_ref());
            return r;
        }
    };
    let snap = latest(&app, snap, &mut plan);
    let series = admitted.series.clone();
    let (mut resp, outcome) = proxy(&app, &snap, &mut ctx, admitted, plan).await;
    account(&app, &model, &series, &outcome, ctx.permit.take());
    crate::gate::rate_headers(resp.headers_mut(), ctx.rate.as_ref());
    resp
}

/// The newest snapshot, with `plan.pool` naming the same pool in it: a request that waited in admission runs on
/// the endpoints discovered meanwhile (the pod added to a pool that was at zero). `snap` when nothing changed or the
/// pool is gone from the newest one.
fn latest(app: &AppState, snap: Arc<EndpointSnapshot>, plan: &mut Plan) -> Arc<EndpointSnapshot> {
    let now = app.snapshot.load_full();
    if now.version == snap.version {
        return snap;
    }
    let name = &snap.pools[plan.pool].name;
    match now.pools.iter().position(|p| p.name == *name) {
        Some(i) => {
            plan.pool = i;
            now
        }
        None => snap,
    }
}

/// Records the answer's status on the request span (a 5xx marks the server span failed).
fn answered(span: &tracing::Span, resp: Response) -> Response {
    let status = resp.status();
    if !span.is_disabled() {
        span.record("http.response.status_code", i64::from(status.as_u16()));
        if status.is_server_error() {
            span.record("otel.status_code", "error");
        }
    }
    span.in_scope(|| tracing::debug!(status = status.as_u16(), "answered"));
    resp
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use axum::body::Body;

    use super::*;

    fn app_with(yaml: &str) -> Arc<AppState> {
        let cfg = crate::config::RawConfig::from_yaml(yaml)
            .unwrap()
            .validate()
            .unwrap();
        let mut d = crate::discovery::Discovery::new();
        d.add_static(&cfg);
        crate::start(&cfg, d, Default::default(), 0, 3).unwrap()
    }

    const TWO_POOLS: &str = "pools: [{name: a, model: up-a, endpoints: ['http://127.0.0.1:9']}, {name: b, model: up-b, endpoints: ['http://127.0.0.1:9']}]\nmodels: [{name: m, targets: [{pool: a, weight: 1}, {pool: b, weight: 3}]}]";

    /// sha256("sk-a") (admission keeps only hashes).
    const KEY_A: &str = "sk-a";

    fn tenants_yaml() -> String {
        let hash = policies::tenant::ApiKeyHash::of(KEY_A).to_hex();
        format!(
            "{TWO_POOLS}\ntenants: [{{tenant: alice, tier: interactive, models: [m], identity: {{apiKeys: [{{sha256: '{hash}'}}]}}}}]"
        )
    }

    fn ctx(body: &'static str) -> Ctx {
        Ctx::new(
            HeaderValue::from_static("r"),
            HeaderMap::new(),
            View::parse(Api::Completions, Bytes::from_static(body.as_bytes())).unwrap(),
            tokio::time::Instant::now(),
            tracing::Span::none(),
        )
    }

    fn req(b: &'static str, key: Option<&str>) -> Request {
        let mut r = Request::post("/v1/completions").header("content-length", b.len());
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        r.body(Body::from(b)).unwrap()
    }

    #[tokio::test]
    async fn identify_reads_and_parses_under_the_limit() {
        let app = app_with(TWO_POOLS);
        let (_, v, who) = identify(
            &app,
            Api::Completions,
            req(r#"{"model":"m","prompt":"x"}"#, None),
            100,
        )
        .await
        .unwrap();
        assert_eq!((v.model.as_str(), v.stream), ("m", false));
        // No tenants configured: everyone is the implicit tenant.
        assert_eq!(
            who.map(|w| w.tenant.to_string()).as_deref(),
            Some("default")
        );
        let e = identify(
            &app,
            Api::Completions,
            req(r#"{"model":"m","prompt":"xxxxxxxx"}"#, None),
            10,
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, 413);
        let e = identify(
            &app,
            Api::Chat,
            req(r#"{"model":"m","prompt":"x"}"#, None),
            100,
        )
        .await
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[tokio::test]
    async fn identify_needs_a_tenant_key_when_tenants_are_configured() {
        let app = app_with(&tenants_yaml());
        let body = r#"{"model":"m","prompt":"x"}"#;
        let (_, _, who) = identify(&app, Api::Completions, req(body, Some(KEY_A)), 100)
            .await
            .unwrap();
        assert_eq!(&*who.unwrap().tenant, "alice");
        for (key, code) in [(None, "missing_api_key"), (Some("sk-b"), "invalid_api_key")] {
            let e = identify(&app, Api::Completions, req(body, key), 100)
                .await
                .unwrap_err();
            assert_eq!((e.status, e.code.as_deref()), (401, Some(code)));
        }
    }

    #[tokio::test]
    async fn resolve_needs_a_route() {
        let app = app_with(TWO_POOLS);
        let snap = app.snapshot.load_full();
        let e = resolve(&snap, &ctx(r#"{"model":"nope","prompt":"x"}"#)).unwrap_err();
        assert_eq!(
            (e.status, e.code.as_deref()),
            (404, Some("model_not_found"))
        );
        assert_eq!(
            &*resolve(&snap, &ctx(r#"{"model":"m","prompt":"x"}"#))
                .unwrap()
                .name,
            "m"
        );
    }

    #[tokio::test]
    async fn admit_holds_a_permit_and_counts_the_request_active_while_held() {
        let app = app_with(&tenants_yaml());
        let snap = app.snapshot.load_full();
        let mut c = ctx(r#"{"model":"m","prompt":"x"}"#);
        c.tenant = app.admission.as_ref().unwrap().identify(Some(KEY_A)).ok();
        let route_ = resolve(&snap, &c).unwrap();
        let plan = route(&app, &snap, route_, &c).unwrap();
        assert_eq!(app.active_requests.load(Ordering::Relaxed), 0);
        let admitted = admit(&app, &snap, route_, &plan, &mut c, None)
            .await
            .unwrap();
        assert_eq!(app.active_requests.load(Ordering::Relaxed), 1);
        let permit = c.permit.take().unwrap();
        assert_eq!((&*permit.tenant, &*permit.model), ("alice", "m"));
        drop(admitted);
        assert_eq!(app.active_requests.load(Ordering::Relaxed), 0);
        // Settled with the answer's usage at `account`.
        let outcome = Outcome {
            usage: Some(crate::sse::Usage {
                prompt_tokens: 3,
                completion_tokens: 5,
            }),
            ..Outcome::failed(200, 1)
        };
        let series = app.metrics.model(&route_.name);
        account(&app, &route_.name, &series, &outcome, Some(permit));
        let rows = app.admission.as_ref().unwrap().usage("alice");
        assert_eq!(rows.len(), 1);
        let c = rows[0].counters;
        assert_eq!(
            (
                c.admitted,
                c.completed,
                c.prompt_tokens,
                c.completion_tokens
            ),
            (1, 1, 3, 5)
        );
    }

    #[tokio::test]
    async fn admit_rejects_a_queued_request_at_the_callers_deadline() {
        // No room feed: the pools' room is what the test sets, none.
        let app = app_with(&format!("{}\nadmission: {{gate: false}}", tenants_yaml()));
        let adm = app.admission.as_ref().unwrap();
        for pool in ["a", "b"] {
            adm.set_room_reserved(pool, 0, 0);
        }
        let snap = app.snapshot.load_full();
        let mut c = ctx(r#"{"model":"m","prompt":"x"}"#);
        c.tenant = adm.identify(Some(KEY_A)).ok();
        // The tenant would wait 60 s; the caller's deadline (a gateway's message timeout) comes first.
        c.deadline =
            Some(tokio::time::Instant::now().into_std() + std::time::Duration::from_millis(30));
        let route_ = resolve(&snap, &c).unwrap();
        let plan = route(&app, &snap, route_, &c).unwrap();
        let waited = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            admit(&app, &snap, route_, &plan, &mut c, None),
        )
        .await
        .expect("refused at the deadline, not after the tenant's maximum wait");
        let e = waited.unwrap_err();
        assert_eq!((e.status, e.code.as_deref()), (429, Some("queue_timeout")));
        assert_eq!(app.active_requests.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn admit_rejects_a_model_the_tenant_may_not_use() {
        let yaml = tenants_yaml().replace("models: [m]", "models: [other]");
        let app = app_with(&yaml);
        let snap = app.snapshot.load_full();
        let mut c = ctx(r#"{"model":"m","prompt":"x"}"#);
        c.tenant = app.admission.as_ref().unwrap().identify(Some(KEY_A)).ok();
        let route_ = resolve(&snap, &c).unwrap();
        let plan = route(&app, &snap, route_, &c).unwrap();
        let e = admit(&app, &snap, route_, &plan, &mut c, None)
            .await
            .unwrap_err();
        assert_eq!(
            (e.status, e.code.as_deref()),
            (403, Some("model_not_allowed"))
        );
        assert!(c.permit.is_none());
        assert_eq!(app.active_requests.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn route_plans_the_weighted_pool_and_its_upstream_body() {
        let app = app_with(TWO_POOLS);
        let snap = app.snapshot.load_full();
        let c = ctx(r#"{"model":"m","prompt":"x","stream":true}"#);
        let route_ = resolve(&snap, &c).unwrap();
        let pool_a = snap.pools.iter().position(|p| &*p.name == "a").unwrap();
        let mut seen = [0u32; 2];
        for _ in 0..400 {
            let plan = route(&app, &snap, route_, &c).unwrap();
            assert!(plan.inject_usage);
            let body: serde_json::Value = serde_json::from_slice(&plan.body).unwrap();
            assert_eq!(body["stream_options"]["include_usage"], true);
            if plan.pool == pool_a {
                seen[0] += 1;
                assert_eq!(body["model"], "up-a");
            } else {
                seen[1] += 1;
                assert_eq!(body["model"], "up-b");
            }
        }
        // Weights 1:3: about 100 against 300.
        assert!((60..140).contains(&seen[0]), "{seen:?}");
    }
}
