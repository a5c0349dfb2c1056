//! Server-sent-event pass-through: splits upstream bytes into `data:` events without re-encoding them, notices the
//! usage chunk, `[DONE]` and error events, and drops the usage chunk when weir (not the client) asked for it.
//! [`SseScanner`] is pure; [`proxy_stream`] wraps an upstream body with idle timeout, metrics and a clean ending
//! (`data: {"error":..}` then `data: [DONE]`) when the backend breaks mid-stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::metrics::{ModelOutcome, ModelSeries, StreamOutcome};

/// Token usage reported by the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

#[derive(Deserialize)]
struct UsagePeek {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
}

/// What one [`SseScanner::push`] saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushStats {
    /// Events with choices (tokens) forwarded in this push.
    pub token_events: u32,
}

/// Splits an SSE byte stream into events and inspects each.
#[derive(Debug, Default)]
pub struct SseScanner {
    /// Bytes of an event not yet terminated by a blank line.
    buf: BytesMut,
    /// Drop the final usage-only chunk (`"choices":[]` with `usage`) because weir injected `include_usage`.
    strip_usage: bool,
    /// Final usage, once seen.
    pub usage: Option<Usage>,
    /// `data: [DONE]` was seen.
    pub saw_done: bool,
    /// An error event was seen.
    pub saw_error: bool,
}

fn find_event_end(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\n\n").map(|p| p + 2)
}

impl SseScanner {
    pub fn new(strip_usage: bool) -> Self {
        Self {
            strip_usage,
            ..Self::default()
        }
    }

    /// Feeds upstream bytes; returns the complete events to forward (possibly empty) and what they held.
    pub fn push(&mut self, chunk: &[u8]) -> (Bytes, PushStats) {
        self.buf.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        let mut stats = PushStats::default();
        while let Some(end) = find_event_end(&self.buf) {
            let ev = self.buf.split_to(end);
            if self.keep(&ev, &mut stats) {
                // O(1) when consecutive events are all kept (they are contiguous in one allocation).
                out.unsplit(ev);
            }
        }
        (out.freeze(), stats)
    }

    /// Like [`push`](Self::push) for an owned chunk: when nothing is buffered (the usual case, a read holds whole
    /// events) the kept events are returned as a slice of `chunk` itself, without a copy or an allocation.
    pub fn push_bytes(&mut self, chunk: Bytes) -> (Bytes, PushStats) {
        if !self.buf.is_empty() {
            return self.push(&chunk);
        }
        let mut stats = PushStats::default();
        // `chunk[..kept]` holds only kept events until one is dropped; then `copied` takes over.
        let mut kept = 0;
        let mut copied: Option<BytesMut> = None;
        let mut pos = 0;
        while let Some(len) = find_event_end(&chunk[pos..]) {
            let end = pos + len;
            let keep = self.keep(&chunk[pos..end], &mut stats);
            match (&mut copied, keep) {
                (None, true) => kept = end,
                (None, false) => copied = Some(BytesMut::from(&chunk[..kept])),
                (Some(c), true) => c.extend_from_slice(&chunk[pos..end]),
                (Some(_), false) => {}
            }
            pos = end;
        }
        if pos < chunk.len() {
            self.buf.extend_from_slice(&chunk[pos..]);
        }
        let out = match copied {
            Some(c) => c.freeze(),
            None => chunk.slice(..kept),
        };
        (out, stats)
    }

    /// Whatever is buffered without a terminating blank line (a truncated event).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    fn keep(&mut self, ev: &[u8], stats: &mut PushStats) -> bool {
        let text = ev.strip_suffix(b"\n\n").unwrap_or(ev);
        let Some(payload) = text.strip_prefix(b"data:") else {
            return true;
        };
        let payload = payload.trim_ascii();
        if payload == b"[DONE]" {
            self.saw_done = true;
            return true;
        }
        if payload.starts_with(b"{\"error\"") {
            self.saw_error = true;
            return true;
        }
        let has_usage = memchr_sub(payload, b"\"usage\":{") || memchr_sub(payload, b"\"usage\": {");
        if !has_usage {
            stats.token_events += 1;
            return true;
        }
        match serde_json::from_slice::<UsagePeek>(payload) {
            Ok(p) => {
                let usage_only = p.choices.as_ref().is_some_and(Vec::is_empty);
                if let Some(u) = p.usage {
                    self.usage = Some(u);
                }
                if usage_only {
                    !self.strip_usage
                } else {
                    stats.token_events += 1;
                    true
                }
            }
            Err(_) => true,
        }
    }
}

fn memchr_sub(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The error event weir appends when a stream cannot finish normally.
pub fn error_event(message: &str, kind: &str, code: &str) -> Bytes {
    let e = policies::errors::ApiError::new(502, kind, message).with_code(code);
    Bytes::from(format!("data: {}\n\ndata: [DONE]\n\n", e.openai_json()))
}

/// What a stream calls once at its end: how it ended and the pod's usage.
pub type OnEnd = Box<dyn FnOnce(StreamOutcome, Option<Usage>) + Send + Sync>;

/// Everything the stream adapter needs besides the upstream body.
pub struct StreamCtx {
    pub scanner: SseScanner,
    pub idle: Duration,
    /// The client model's per-request series (TTFT, ITL, tokens).
    pub series: Arc<ModelSeries>,
    /// `weir_stream_outcomes`, counted once when the stream ends.
    pub outcomes: Family<ModelOutcome, Counter>,
    /// When the request arrived, for TTFT.
    pub start: tokio::time::Instant,
    /// Dropped when the stream ends or the client goes away: releases in-flight counts.
    pub guards: Box<dyn std::any::Any + Send + Sync>,
    /// Called once when the stream ends, with how it ended and the usage the pod reported (exact even when the client
    /// left, as long as the pod's usage chunk arrived): the endpoint's breaker verdict is given here, not at the
    /// response head, so a pod that always fails mid-stream still gets ejected.
    pub on_end: Option<OnEnd>,
    /// When the client leaves mid-stream, keep reading the pod's stream to its end (in a task of its own) so its
    /// usage chunk arrives and the request is billed exactly what the pod computed; `on_end` is called then. Off:
    /// the upstream connection is closed at once, which makes vLLM abort the request (less GPU, usage unknown).
    pub drain_cancelled: bool,
}

/// Reads the rest of a stream whose client left, then ends it (see [`StreamCtx::drain_cancelled`]).
type Drain<B> = fn(B, SseScanner, OnEnd, Duration, Arc<ModelSeries>);

struct StreamState<B> {
    /// `None` once handed to a drain.
    upstream: Option<B>,
    ctx: StreamCtx,
    last_event: Option<tokio::time::Instant>,
    finished: bool,
    outcome: StreamOutcome,
    drain: Option<Drain<B>>,
}

impl<B> StreamState<B> {
    /// Hands the unfinished upstream to a drain task; false when there is nothing to drain or no runtime to run it.
    fn start_drain(&mut self) -> bool {
        if self.finished || tokio::runtime::Handle::try_current().is_err() {
            return false;
        }
        let (Some(drain), Some(on_end)) = (self.drain, self.ctx.on_end.take()) else {
            return false;
        };
        let Some(up) = self.upstream.take() else {
            self.ctx.on_end = Some(on_end);
            return false;
        };
        let scanner = std::mem::take(&mut self.ctx.scanner);
        drain(up, scanner, on_end, self.ctx.idle, self.ctx.series.clone());
        true
    }
}

impl<B> Drop for StreamState<B> {
    fn drop(&mut self) {
        let outcome = if self.finished {
            self.outcome
        } else {
            StreamOutcome::Cancelled
        };
        self.ctx
            .outcomes
            .get_or_create(&ModelOutcome {
                model: self.ctx.series.model.clone().into(),
                outcome,
            })
            .inc();
        if self.ctx.drain_cancelled && self.start_drain() {
            return;
        }
        if let Some(f) = self.ctx.on_end.take() {
            f(outcome, self.ctx.scanner.usage);
        }
        count_usage(&self.ctx.series, self.ctx.scanner.usage);
    }
}

fn count_usage(series: &ModelSeries, usage: Option<Usage>) {
    if let Some(u) = usage {
        series.prompt_tokens.inc_by(u.prompt_tokens);
        series.completion_tokens.inc_by(u.completion_tokens);
    }
}

/// The drain task: reads the pod's stream to its end (each gap bounded by `idle`), then calls `on_end` with the usage
/// the pod reported.
fn drain_rest<B>(
    mut upstream: B,
    mut scanner: SseScanner,
    on_end: OnEnd,
    idle: Duration,
    series: Arc<ModelSeries>,
) where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    tokio::spawn(async move {
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(idle, upstream.frame()).await {
            if let Ok(data) = frame.into_data() {
                let _ = scanner.push_bytes(data);
            }
        }
        on_end(StreamOutcome::Cancelled, scanner.usage);
        count_usage(&series, scanner.usage);
    });
}

/// Forwards an upstream SSE body event by event. Dropping the returned stream (client gone) drops the upstream body,
/// which closes that connection, which makes vLLM abort the request.
pub fn proxy_stream<B>(
    upstream: B,
    ctx: StreamCtx,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let st = StreamState {
        upstream: Some(upstream),
        ctx,
        last_event: None,
        finished: false,
        outcome: StreamOutcome::Complete,
        drain: Some(drain_rest::<B> as Drain<B>),
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.finished {
                return None;
            }
            let upstream = st.upstream.as_mut()?;
            match tokio::time::timeout(st.ctx.idle, upstream.frame()).await {
                Ok(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let (out, stats) = st.ctx.scanner.push_bytes(data);
                    if stats.token_events > 0 {
                        let now = tokio::time::Instant::now();
                        match st.last_event {
                            None => st
                                .ctx
                                .series
                                .ttft
                                .observe(now.duration_since(st.ctx.start).as_secs_f64()),
                            Some(prev) => {
                                let gap = now.duration_since(prev).as_secs_f64()
                                    / f64::from(stats.token_events);
                                for _ in 0..stats.token_events {
                                    st.ctx.series.itl.observe(gap);
                                }
                            }
                        }
                        st.last_event = Some(now);
                    }
                    if st.ctx.scanner.saw_error {
                        st.outcome = StreamOutcome::UpstreamError;
                    }
                    if !out.is_empty() {
                        return Some((Ok(out), st));
                    }
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream stream broke");
                    st.finished = true;
                    st.outcome = StreamOutcome::UpstreamError;
                    let tail = if st.ctx.scanner.saw_done {
                        Bytes::new()
                    } else {
                        error_event(
                            "the model server failed mid-stream",
                            "server_error",
                            "upstream_error",
                        )
                    };
                    return Some((Ok(tail), st));
                }
                Ok(None) => {
                    st.finished = true;
                    if st.ctx.scanner.saw_done {
                        return None;
                    }
                    st.outcome = StreamOutcome::Truncated;
                    return Some((
                        Ok(error_event(
                            "the model server ended the stream early",
                            "server_error",
                            "upstream_error",
                        )),
                        st,
                    ));
                }
                Err(_) => {
                    st.finished = true;
                    st.outcome = StreamOutcome::IdleTimeout;
                    return Some((
                        Ok(error_event(
                            "the model server stopped sending tokens",
                            "server_error",
                            "upstream_timeout",
                        )),
                        st,
                    ));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: &str =
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    #[test]
    fn strips_injected_usage_chunk_and_records_usage() {
        let mut s = SseScanner::new(true);
        let all = format!("{CHUNK}{CHUNK}{USAGE}{DONE}");
        let (out, stats) = s.push(all.as_bytes());
        assert_eq!(out, Bytes::from(format!("{CHUNK}{CHUNK}{DONE}")));
        assert_eq!(stats.token_events, 2);
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2
            })
        );
        assert!(s.saw_done);
    }

    #[test]
    fn keeps_usage_chunk_when_the_client_asked() {
        let mut s = SseScanner::new(false);
        let (out, _) = s.push(format!("{USAGE}{DONE}").as_bytes());
        assert_eq!(out, Bytes::from(format!("{USAGE}{DONE}")));
    }

    #[test]
    fn events_split_across_chunks_are_reassembled_byte_for_byte() {
        let all = format!("{CHUNK}{USAGE}{CHUNK}{DONE}");
        for cut in 1..all.len() {
            let mut s = SseScanner::new(false);
            let (a, _) = s.push(&all.as_bytes()[..cut]);
            let (b, _) = s.push(&all.as_bytes()[cut..]);
            let mut joined = a.to_vec();
            joined.extend_from_slice(&b);
            assert_eq!(joined, all.as_bytes(), "cut at {cut}");
            assert_eq!(s.pending(), 0);
        }
    }

    proptest::proptest! {
        #[test]
        fn any_chunking_forwards_every_byte_except_the_stripped_usage_chunk(
            tokens in 0usize..6,
            cuts in proptest::collection::vec(0usize..2000, 0..8),
            strip in proptest::bool::ANY,
            owned in proptest::bool::ANY,
        ) {
            let mut all = CHUNK.repeat(tokens);
            all.push_str(USAGE);
            all.push_str(DONE);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (all.len() + 1)).collect();
            cuts.sort_unstable();
            let mut s = SseScanner::new(strip);
            let mut out = Vec::new();
            let mut events = 0;
            let mut prev = 0;
            for (i, c) in cuts.into_iter().chain([all.len()]).enumerate() {
                // Both entry points, alternating, must agree byte for byte.
                let piece = &all.as_bytes()[prev..c];
                let (b, st) = if (i + usize::from(owned)) % 2 == 0 {
                    s.push(piece)
                } else {
                    s.push_bytes(Bytes::copy_from_slice(piece))
                };
                out.extend_from_slice(&b);
                events += st.token_events;
                prev = c;
            }
            let expected = if strip { format!("{}{DONE}", CHUNK.repeat(tokens)) } else { all.clone() };
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
            proptest::prop_assert_eq!(events as usize, tokens);
            proptest::prop_assert_eq!(s.usage, Some(Usage { prompt_tokens: 3, completion_tokens: 2 }));
            proptest::prop_assert!(s.saw_done);
        }
    }

    #[test]
    fn whole_events_pass_through_without_a_copy() {
        let all = Bytes::from(format!("{CHUNK}{CHUNK}{DONE}"));
        let mut s = SseScanner::new(true);
        let (out, stats) = s.push_bytes(all.clone());
        assert_eq!(out, all);
        assert_eq!(
            out.as_ptr(),
            all.as_ptr(),
            "kept events are a slice of the chunk"
        );
        assert_eq!(stats.token_events, 2);
        assert!(s.saw_done);
        let mut s = SseScanner::new(true);
        let (out, _) = s.push_bytes(Bytes::from(format!("{CHUNK}{USAGE}{DONE}")));
        assert_eq!(out, Bytes::from(format!("{CHUNK}{DONE}")));
        assert_eq!(s.pending(), 0);
        let (out, _) = s.push_bytes(Bytes::from(&CHUNK[..10]));
        assert!(out.is_empty());
        assert_eq!(s.pending(), 10);
    }

    #[test]
    fn notices_error_events() {
        let mut s = SseScanner::new(true);
        s.push(b"data: {\"error\":{\"message\":\"boom\"}}\n\n");
        assert!(s.saw_error);
    }
}
