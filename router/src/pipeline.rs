//! The request path of `/v1/chat/completions` and `/v1/completions`, in named phases over one [`Ctx`]:
//!
//! 1. [`identify`]: the request id, the body read under its size limit and parsed once into the request view;
//! 2. [`admit`]: the model must name a route; the request is counted active from here ([`Admitted`]);
//! 3. [`route`]: the pure [`plan`](crate::plan::plan): target pool, upstream body, retry budget;
//! 4. [`proxy`]: [`execute`](crate::execute::execute) does the I/O, picking an endpoint per attempt;
//! 5. [`account`]: the [`Outcome`] is counted (status, usage) once.
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

use crate::ctx::{Admitted, Ctx};
use crate::error::{respond, too_large};
use crate::execute::Outcome;
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
        "gen_ai.request.model" = tracing::field::Empty,
        "weir.stream" = tracing::field::Empty,
        "http.response.status_code" = tracing::field::Empty,
        "weir.endpoint" = tracing::field::Empty,
        "weir.decision_id" = tracing::field::Empty,
        "weir.ttft_ms" = tracing::field::Empty,
    )
}

/// Phase 1: reads the body (413 over `limit`, declared or actual) and parses it once into the request view.
pub async fn identify(api: Api, req: Request, limit: usize) -> Result<(HeaderMap, View), ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let (parts, body) = req.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
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
    Ok((parts.headers, view))
}

/// Phase 2: the route serving the request's model (404 `model_not_found` otherwise), and the request counted active.
pub fn admit<'s>(
    app: &Arc<AppState>,
    snap: &'s EndpointSnapshot,
    ctx: &Ctx,
) -> Result<(&'s Route, Admitted), ApiError> {
    let route = crate::plan::resolve(snap, &ctx.view.model)?;
    let model = route.name.clone();
    let series = app.metrics.model(&model);
    Ok((route, Admitted::new(app.clone(), model, series, ctx.start)))
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

/// Phase 4: runs the plan; always answers.
pub async fn proxy(
    app: &Arc<AppState>,
    snap: &EndpointSnapshot,
    ctx: &mut Ctx,
    admitted: Admitted,
    plan: Plan,
) -> (Response, Outcome) {
    crate::execute::execute(app, snap, ctx, admitted, plan).await
}

/// Phase 5: counts the answer under the route's model label, and a non-streaming answer's token usage (a stream's
/// is counted when it ends).
pub fn account(app: &AppState, model: &Arc<str>, series: &ModelSeries, outcome: &Outcome) {
    app.count(model, outcome.status);
    if let Some(u) = outcome.usage {
        series.prompt_tokens.inc_by(u.prompt_tokens);
        series.completion_tokens.inc_by(u.completion_tokens);
    }
}

/// Runs the phases for one completions request.
pub async fn completions(app: Arc<AppState>, api: Api, req: Request) -> Response {
    let start = tokio::time::Instant::now();
    let request_id = crate::ids::request_id(req.headers());
    let span = request_span(api, &request_id);
    crate::telemetry::set_remote_parent(&span, req.headers());
    let (headers, view) = match identify(api, req, app.proxy.max_body_bytes).await {
        Ok(v) => v,
        Err(e) => {
            app.count(&app.unknown_model, e.status);
            return answered(&span, respond(&e, &request_id));
        }
    };
    span.record("gen_ai.request.model", view.model.as_str());
    span.record("weir.stream", view.stream);
    let ctx = Ctx {
        request_id,
        headers,
        view,
        start,
        span: span.clone(),
        decision_id: None,
    };
    let resp = tracing::Instrument::instrument(serve(app, ctx), span.clone()).await;
    answered(&span, resp)
}

/// Phases 2 to 5.
async fn serve(app: Arc<AppState>, mut ctx: Ctx) -> Response {
    let snap = app.snapshot.load_full();
    let (route_, admitted) = match admit(&app, &snap, &ctx) {
        Ok(a) => a,
        Err(e) => {
            app.count(&app.unknown_model, e.status);
            return respond(&e, &ctx.request_id);
        }
    };
    let model = admitted.model.clone();
    let series = admitted.series.clone();
    let (resp, outcome) = match route(&app, &snap, route_, &ctx) {
        Ok(plan) => proxy(&app, &snap, &mut ctx, admitted, plan).await,
        Err(e) => (respond(&e, &ctx.request_id), Outcome::failed(e.status, 0)),
    };
    account(&app, &model, &series, &outcome);
    resp
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
        crate::start(&cfg, d, Default::default(), 0, 3)
    }

    const TWO_POOLS: &str = "pools: [{name: a, model: up-a, endpoints: ['http://127.0.0.1:9']}, {name: b, model: up-b, endpoints: ['http://127.0.0.1:9']}]\nmodels: [{name: m, targets: [{pool: a, weight: 1}, {pool: b, weight: 3}]}]";

    fn ctx(body: &'static str) -> Ctx {
        Ctx {
            request_id: HeaderValue::from_static("r"),
            headers: HeaderMap::new(),
            view: View::parse(Api::Completions, Bytes::from_static(body.as_bytes())).unwrap(),
            start: tokio::time::Instant::now(),
            span: tracing::Span::none(),
            decision_id: None,
        }
    }

    #[tokio::test]
    async fn identify_reads_and_parses_under_the_limit() {
        let req = |b: &'static str| {
            Request::post("/v1/completions")
                .header("content-length", b.len())
                .body(Body::from(b))
                .unwrap()
        };
        let (_, v) = identify(Api::Completions, req(r#"{"model":"m","prompt":"x"}"#), 100)
            .await
            .unwrap();
        assert_eq!((v.model.as_str(), v.stream), ("m", false));
        let e = identify(
            Api::Completions,
            req(r#"{"model":"m","prompt":"xxxxxxxx"}"#),
            10,
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, 413);
        let e = identify(Api::Chat, req(r#"{"model":"m","prompt":"x"}"#), 100)
            .await
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[tokio::test]
    async fn admit_needs_a_route_and_counts_the_request_active_while_held() {
        let app = app_with(TWO_POOLS);
        let snap = app.snapshot.load_full();
        let e = admit(&app, &snap, &ctx(r#"{"model":"nope","prompt":"x"}"#)).unwrap_err();
        assert_eq!(
            (e.status, e.code.as_deref()),
            (404, Some("model_not_found"))
        );
        assert_eq!(app.active_requests.load(Ordering::Relaxed), 0);
        let (route, admitted) = admit(&app, &snap, &ctx(r#"{"model":"m","prompt":"x"}"#)).unwrap();
        assert_eq!(&*route.name, "m");
        assert_eq!(app.active_requests.load(Ordering::Relaxed), 1);
        drop(admitted);
        assert_eq!(app.active_requests.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn route_plans_the_weighted_pool_and_its_upstream_body() {
        let app = app_with(TWO_POOLS);
        let snap = app.snapshot.load_full();
        let c = ctx(r#"{"model":"m","prompt":"x","stream":true}"#);
        let (route_, _admitted) = admit(&app, &snap, &c).unwrap();
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
