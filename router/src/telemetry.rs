//! Distributed-tracing glue for the request path (W3C Trace Context).
//!
//! A routed request is a tree of `tracing` spans: the server span `request` (in [`crate::app`]), and under it `pick`
//! (one per attempt), `upstream` (one per attempt on a model server; the decode leg of a P/D request) and `prefill`
//! (the prefill leg), all at debug level with target `router::*`. They reach OpenTelemetry only when the binary
//! installed a `tracing-opentelemetry` layer (`weir serve` with OTLP configured, see `weir/src/telemetry.rs`); without
//! it the spans are disabled at the default log filter, every helper here is one `is_disabled` check, and the
//! hand-built [`traceparent`] still carries the caller's trace id to the backends.
//!
//! With the layer: the caller's `traceparent` (and `tracestate`) becomes the remote parent of the server span
//! ([`set_remote_parent`]), and each upstream hop sends a `traceparent` naming its own attempt span
//! ([`traceparent_of`]), so a trace viewer shows client → weir → model server as one trace.

use hyper::header::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Reads propagation headers from a request's header map.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Catches the `traceparent` a propagator writes (a client's `tracestate` is forwarded as it came).
struct TraceparentOnly(Option<HeaderValue>);

impl Injector for TraceparentOnly {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = HeaderValue::from_str(&value).ok();
        }
    }
}

/// Makes the caller's trace (a valid `traceparent` in `headers`) the remote parent of `span`. Without a valid
/// header, or when OpenTelemetry does not track `span`, nothing changes (the span starts a new trace or stays a
/// log-only span).
pub fn set_remote_parent(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    if cx.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed (spans enabled for the log output alone): no trace.
        let _ = span.set_parent(cx);
    }
}

/// The W3C `traceparent` naming `span` (its trace id, its own span id, its sampling flag) for the next hop, or `None`
/// when OpenTelemetry does not track `span` (then [`traceparent`] builds one).
pub fn traceparent_of(span: &tracing::Span) -> Option<HeaderValue> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = TraceparentOnly(None);
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}

/// The `traceparent` for an upstream request made under `span`: the span's own when traced, else the hand-built one
/// that keeps the caller's trace id.
pub fn upstream_traceparent(span: &tracing::Span, incoming: Option<&HeaderValue>) -> HeaderValue {
    traceparent_of(span).unwrap_or_else(|| traceparent(incoming))
}

/// A W3C `traceparent` for the upstream hop when OpenTelemetry does not track the request (no OTLP export): keeps
/// the caller's trace id (if the header is valid) with a new span id. Traced requests send their attempt span's id
/// instead ([`crate::telemetry::upstream_traceparent`]).
pub fn traceparent(incoming: Option<&HeaderValue>) -> HeaderValue {
    let (hi, lo, span) = crate::ids::with_rng(|r| {
        use rand_core::RngCore;
        (r.next_u64(), r.next_u64(), r.next_u64() | 1)
    });
    // `00-<trace id: 32 hex>-<span id: 16 hex>-<flags: 2 hex>`, built in place (this runs once per attempt).
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match incoming
        .map(HeaderValue::as_bytes)
        .filter(|b| valid_traceparent(b))
    {
        Some(b) => {
            out[3..35].copy_from_slice(&b[3..35]);
            out[53..55].copy_from_slice(&b[53..55]);
        }
        None => {
            crate::ids::hex_into(hi, &mut out[3..19]);
            crate::ids::hex_into(lo, &mut out[19..35]);
        }
    }
    crate::ids::hex_into(span, &mut out[36..52]);
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static(
        "00-00000000000000000000000000000001-0000000000000001-01",
    ))
}

/// `version-traceid-parentid-flags` with the W3C lengths, hex digits, a version other than `ff` and a non-zero trace
/// id.
fn valid_traceparent(b: &[u8]) -> bool {
    b.len() == 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && &b[..2] != b"ff"
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 2 | 35 | 52) || c.is_ascii_hexdigit())
        && b[3..35].iter().any(|&c| c != b'0')
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use parking_lot::Mutex;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Keeps exported spans in memory.
    #[derive(Clone, Debug, Default)]
    struct Memory(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Memory {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().extend(batch);
            Ok(())
        }
    }

    const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_str(tp).unwrap());
        h
    }

    /// Runs `f` under a subscriber with only the OpenTelemetry layer and returns the finished spans.
    fn traced(f: impl FnOnce()) -> Vec<SpanData> {
        let mem = Memory::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(mem.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f);
        provider.force_flush().unwrap();
        mem.0.lock().clone()
    }

    #[test]
    fn the_caller_is_the_parent_and_upstream_names_the_attempt_span() {
        let mut upstream = None;
        let spans = traced(|| {
            let server = tracing::debug_span!("request");
            set_remote_parent(&server, &headers(INCOMING));
            let attempt = tracing::debug_span!(parent: &server, "upstream");
            upstream = Some(upstream_traceparent(
                &attempt,
                headers(INCOMING).get("traceparent"),
            ));
        });
        let server = spans.iter().find(|s| s.name == "request").unwrap();
        let attempt = spans.iter().find(|s| s.name == "upstream").unwrap();
        let caller_trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        assert_eq!(server.span_context.trace_id(), caller_trace);
        assert_eq!(
            server.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(server.parent_span_is_remote);
        assert_eq!(attempt.span_context.trace_id(), caller_trace);
        assert_eq!(attempt.parent_span_id, server.span_context.span_id());
        assert_eq!(
            upstream.unwrap().to_str().unwrap(),
            format!("00-{caller_trace}-{}-01", attempt.span_context.span_id())
        );
    }

    #[test]
    fn an_invalid_traceparent_starts_a_new_trace() {
        let spans = traced(|| {
            let server = tracing::debug_span!("request");
            set_remote_parent(
                &server,
                &headers("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            );
        });
        assert_eq!(spans.len(), 1);
        assert!(spans[0].span_context.is_valid());
        assert_eq!(spans[0].parent_span_id, SpanId::INVALID);
    }

    #[test]
    fn without_opentelemetry_the_hand_built_traceparent_keeps_the_trace_id() {
        // No subscriber at all: spans are disabled, as with OTLP off at the default log filter.
        let span = tracing::debug_span!("upstream");
        assert!(span.is_disabled());
        assert_eq!(traceparent_of(&span), None);
        let tp = upstream_traceparent(&span, headers(INCOMING).get("traceparent"));
        let tp = tp.to_str().unwrap();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(!tp.contains("00f067aa0ba902b7"), "{tp}");
        // Spans enabled for the log output only (no OpenTelemetry layer): still the hand-built header.
        let fmt_only = tracing_subscriber::registry();
        tracing::subscriber::with_default(fmt_only, || {
            let span = tracing::debug_span!("upstream");
            assert!(!span.is_disabled());
            set_remote_parent(&span, &headers(INCOMING));
            assert_eq!(traceparent_of(&span), None);
        });
    }

    #[test]
    fn traceparent_keeps_trace_id_or_makes_one() {
        let inc =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let out = traceparent(Some(&inc));
        let s = out.to_str().unwrap();
        assert!(s.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!s.contains("00f067aa0ba902b7"));
        assert!(s.ends_with("-01"));
        for bad in [
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-010",
        ] {
            let made = traceparent(Some(&HeaderValue::from_static(bad)));
            let s = made.to_str().unwrap();
            let parts: Vec<&str> = s.split('-').collect();
            assert_eq!(
                (
                    parts.len(),
                    parts[0],
                    parts[1].len(),
                    parts[2].len(),
                    parts[3]
                ),
                (4, "00", 32, 16, "01"),
                "{bad} -> {s}"
            );
            assert!(!bad.contains(parts[1]), "{bad} -> {s}");
            assert!(s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        }
    }
}
