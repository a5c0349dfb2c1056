//! The per-request context the phases of [`crate::pipeline`] hand along (pingora's per-request `CTX`): who sent the
//! request and its id, the parsed view, the admission it holds and what routing decided. Each phase reads what the
//! earlier ones filled in; nothing is parsed or looked up twice.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::header::{HeaderMap, HeaderValue};

use crate::metrics::ModelSeries;
use crate::plan::View;
use crate::shared::AppState;

/// One request on its way through the phases.
#[derive(Debug)]
pub struct Ctx {
    /// `x-request-id`: echoed to the client, sent upstream, the decision record's key.
    pub request_id: HeaderValue,
    /// The client's headers, forwarded upstream minus hop-by-hop ones.
    pub headers: HeaderMap,
    /// The body, parsed once.
    pub view: View,
    /// Arrival time, for TTFT and end-to-end latency.
    pub start: tokio::time::Instant,
    /// The request's server span (disabled unless traced or logged at debug; see [`crate::telemetry`]).
    pub span: tracing::Span,
    /// The routing decision's id, once one was recorded (`/debug/decisions/{id}`).
    pub decision_id: Option<String>,
    /// The tenant, when admission is on.
    pub tenant: Option<admission::Identity>,
    /// Admission's permit while the request is dispatched; settled once with how it ended
    /// ([`crate::gate::settle`]): at `account`, or when a stream ends.
    pub permit: Option<admission::Permit>,
    /// The tenant's limit states after admission decided (`x-ratelimit-*` headers on the answer).
    pub rate: Option<admission::RateHeaders>,
    /// The latest the request may still be dispatched, when its caller stops waiting at a known time (a gateway's
    /// ext_proc message timeout); admission rejects it past this or its tenant's maximum wait, whichever is first.
    pub deadline: Option<std::time::Instant>,
}

impl Ctx {
    /// A context for a parsed request, before admission.
    pub fn new(
        request_id: HeaderValue,
        headers: HeaderMap,
        view: View,
        start: tokio::time::Instant,
        span: tracing::Span,
    ) -> Self {
        Self {
            request_id,
            headers,
            view,
            start,
            span,
            decision_id: None,
            tenant: None,
            permit: None,
            rate: None,
            deadline: None,
        }
    }
}

/// What admission grants: the route's metric series and the request counted as active (retry budget base, in-flight
/// gauge) until dropped, when its end-to-end time is observed. Held by the response (to the end of a stream).
pub struct Admitted {
    /// The client-facing route name (the `model` metric label).
    pub model: Arc<str>,
    /// That route's per-model series.
    pub series: Arc<ModelSeries>,
    guard: RequestGuard,
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl Admitted {
    /// Counts the request active from now on.
    pub fn new(
        app: Arc<AppState>,
        model: Arc<str>,
        series: Arc<ModelSeries>,
        start: tokio::time::Instant,
    ) -> Self {
        Self {
            model,
            guard: RequestGuard::new(app, series.clone(), start),
            series,
        }
    }

    /// The part that must live as long as the response body.
    pub fn into_guard(self) -> RequestGuard {
        self.guard
    }
}

/// Counts a request as active and observes its end-to-end time when dropped.
pub struct RequestGuard {
    app: Arc<AppState>,
    series: Arc<ModelSeries>,
    start: tokio::time::Instant,
}

impl RequestGuard {
    fn new(app: Arc<AppState>, series: Arc<ModelSeries>, start: tokio::time::Instant) -> Self {
        app.active_requests.fetch_add(1, Ordering::Relaxed);
        series.in_flight.inc();
        Self { app, series, start }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.app.active_requests.fetch_sub(1, Ordering::Relaxed);
        self.series.in_flight.dec();
        self.series.e2e.observe(self.start.elapsed().as_secs_f64());
    }
}
