//! The prefill leg of a disaggregated (P/D) request.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName};

use super::wire::forwarded;
use super::{Attempt, span_failed};
use crate::ctx::Ctx;
use crate::route::{CacheView, Prepared};
use crate::shared::AppState;
use crate::snapshot::Pool;
use crate::state::PrefillClaim;

/// Runs the prefill leg of a disaggregated request on pool endpoint `pi` (counting it in flight there) and returns
/// the decode leg's body, or why the request must be served colocated.
pub(super) async fn run_prefill_leg(
    app: &AppState,
    pool: &Pool,
    pi: usize,
    cache: &CacheView,
    prep: &Prepared,
    ctx: &Ctx,
    up_body: &Bytes,
) -> Result<Bytes, String> {
    let pep = pool.endpoints[pi].clone();
    let span = tracing::debug_span!(
        "prefill",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        "weir.endpoint" = pep.id.as_str(),
        "server.address" = pep.authority.as_str(),
        "error.type" = tracing::field::Empty,
    );
    let body = match crate::pd::prefill_body(up_body) {
        Ok(b) => b,
        Err(e) => {
            span_failed(&span, "prefill", &e);
            return Err(e);
        }
    };
    let uncached = cache.uncached(prep, pi);
    // A leg sent to a pod with no prefill backlog measures the pods' prefill throughput (see `crate::pd::PrefillRate`).
    let idle = pep.state.prefill_tokens.load(Ordering::Relaxed) == 0;
    let mut patt = Attempt::new(pep.state.clone(), u64::from(uncached) + 1);
    // The prompt is the prefill pod's backlog until the leg answers (its first and only token).
    let _backlog = PrefillClaim::new(pep.state.clone(), u64::from(uncached));
    let sent = tokio::time::Instant::now();
    let mut fwd = HeaderMap::with_capacity(ctx.headers.len());
    for (k, v) in &ctx.headers {
        if forwarded(k) {
            fwd.append(k.clone(), v.clone());
        }
    }
    // The prefill pod's parent span is this leg's (or, untraced, the caller's trace id with a new span id).
    fwd.insert(
        HeaderName::from_static("traceparent"),
        crate::telemetry::upstream_traceparent(&span, ctx.headers.get("traceparent")),
    );
    super::wire::with_pool_auth(&mut fwd, pool.upstream_auth.as_ref());
    let kv = crate::pd::run_prefill(
        &app.client,
        pep.authority.as_str(),
        ctx.view.api,
        body,
        &fwd,
        &ctx.request_id,
        app.proxy.first_byte,
        app.proxy.max_response_bytes,
    )
    .await;
    match kv {
        Ok(kv) => {
            patt.success();
            if idle {
                cache
                    .pool
                    .prefill_rate
                    .observe(uncached, sent.elapsed().as_secs_f64());
            }
            crate::pd::decode_body(up_body, kv)
        }
        Err(e) => {
            patt.failure(tokio::time::Instant::now().into_std());
            span_failed(&span, "prefill", &e);
            Err(e)
        }
    }
}
