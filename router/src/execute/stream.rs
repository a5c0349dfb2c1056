//! The client body of a streaming answer.

use axum::body::Body;

use super::{Attempt, span_failed};
use crate::ctx::{Admitted, Ctx};
use crate::gate::End;
use crate::metrics::StreamOutcome;
use crate::shared::AppState;
use crate::snapshot::EndpointSnapshot;
use crate::sse::{SseScanner, StreamCtx, proxy_stream};
use crate::state::PrefillClaim;

/// Keeps a span open while held and ends it when dropped: tracing-opentelemetry ends a span at its last exit, so the
/// server span of a stream is entered once more when the body is done, to cover the whole stream.
pub(super) struct EndsOnDrop(tracing::Span);

impl Drop for EndsOnDrop {
    fn drop(&mut self) {
        let _end = self.0.enter();
    }
}

/// What a successful streaming attempt hands to its response body.
pub(super) struct StreamParts {
    /// The attempt: its verdict is given when the stream ends.
    pub(super) att: Attempt,
    /// The attempt's span, covering the whole stream.
    pub(super) up_span: tracing::Span,
    /// The pod's prefill backlog, released at the first event.
    pub(super) first_token: PrefillClaim,
    /// The decision record's id, for the measured TTFT.
    pub(super) recorded: Option<String>,
    /// weir asked for the usage chunk: strip it.
    pub(super) inject_usage: bool,
    /// Admission's permit, settled with the stream's end and the pod's usage.
    pub(super) permit: Option<admission::Permit>,
}

/// The client body of a streaming answer: the pod's events through [`proxy_stream`], the first one releasing the
/// prefill backlog and measuring TTFT; the breaker verdict and the request's end come when the stream ends.
pub(super) fn stream_body(
    app: &AppState,
    snap: &EndpointSnapshot,
    ctx: &Ctx,
    admitted: Admitted,
    upstream: crate::upstream::UpstreamBody,
    parts: StreamParts,
) -> Body {
    let StreamParts {
        mut att,
        up_span,
        first_token,
        recorded,
        inject_usage,
        permit,
    } = parts;
    let series = admitted.series.clone();
    let sctx = StreamCtx {
        scanner: SseScanner::new(inject_usage),
        idle: app.proxy.idle,
        drain_cancelled: app.proxy.drain_cancelled,
        series,
        outcomes: app.metrics.stream_outcomes.clone(),
        start: ctx.start,
        guards: Box::new(admitted.into_guard()),
        // Holds the attempt span, which so covers the whole stream and closes when it ends.
        on_end: Some(Box::new(move |outcome, usage| {
            up_span.record("weir.stream_outcome", tracing::field::debug(outcome));
            if let Some(p) = permit {
                let end = match outcome {
                    StreamOutcome::Complete => End::Completed,
                    StreamOutcome::Cancelled => End::Cancelled,
                    _ => End::Failed,
                };
                crate::gate::settle(p, end, usage);
            }
            match outcome {
                StreamOutcome::Complete => att.success(),
                StreamOutcome::UpstreamError
                | StreamOutcome::Truncated
                | StreamOutcome::IdleTimeout => {
                    span_failed(&up_span, "stream", &format_args!("{outcome:?}"));
                    att.failure(tokio::time::Instant::now().into_std());
                }
                // The client left: no verdict on the endpoint; dropping `att` frees a half-open probe.
                StreamOutcome::Cancelled => drop(att),
            }
        })),
    };
    let stream = proxy_stream(upstream, sctx);
    // The first event ends the pod's prefill of this request (releases its prefill backlog) and is the measured
    // TTFT. The closure holds the server span, which so stays open until the stream ends.
    let measure = recorded.is_some() || !ctx.span.is_disabled();
    let routing = snap.routing.clone();
    let req_span = EndsOnDrop(ctx.span.clone());
    let start = ctx.start;
    let mut first_token = Some(first_token);
    Body::from_stream(futures::StreamExt::map(stream, move |item| {
        if let Some(mut claim) = first_token.take() {
            claim.release();
            if measure {
                let ms = start.elapsed().as_secs_f64() * 1000.0;
                if let Some(rid) = &recorded {
                    routing.measured_ttft(rid, ms);
                }
                req_span.0.record("weir.ttft_ms", ms);
            }
        }
        item
    }))
}
