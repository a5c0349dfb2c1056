//! Incremental Server-Sent Events parsing for OpenAI-style streams: bytes in as they arrive, `data:` payloads out,
//! and a classifier that says what each payload means for the measurements (content, usage, error, `[DONE]`).
//!
//! The parser keeps only the bytes of the event still being received, never the whole body.

use serde::Deserialize;

/// Splits a byte stream into SSE event payloads.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the event not yet terminated by a blank line.
    buf: Vec<u8>,
}

impl SseParser {
    /// Feed bytes; every complete event's `data` (multi-line data joined by `\n`) is appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some((end, next)) = find_event_end(&self.buf[start..]) {
            if let Some(data) = event_data(&self.buf[start..start + end]) {
                out.push(data);
            }
            start += next;
        }
        self.buf.drain(..start);
    }

    /// Bytes of an unterminated trailing event (non-empty when a stream was cut mid-event).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// End of the first event in `b` and the offset just past its terminating blank line.
fn find_event_end(b: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\n' {
            match b.get(i + 1) {
                Some(b'\n') => return Some((i, i + 2)),
                Some(b'\r') if b.get(i + 2) == Some(&b'\n') => return Some((i, i + 3)),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// The joined `data:` lines of one event, `None` if it has none (comments, `event:`-only).
fn event_data(ev: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(ev);
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_string()),
            }
        }
    }
    data
}

/// What one stream payload means to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// `[DONE]`.
    Done,
    /// A chunk; `content` is true when it carries non-empty generated text.
    Chunk {
        /// Whether any choice carries non-empty `delta.content` (chat) or `text` (completions).
        content: bool,
        /// `usage` from the chunk, if any.
        usage: Option<Usage>,
    },
    /// `{"error": ..}` sent after the 200 header.
    Error(String),
    /// Not JSON we understand.
    Malformed,
}

/// Token counts reported by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Usage {
    /// Prompt tokens as the server counted them.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Generated tokens.
    #[serde(default)]
    pub completion_tokens: u64,
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    message: Option<WireDelta>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
}

/// Classify one `data:` payload.
pub fn classify(data: &str) -> Payload {
    if data.trim() == "[DONE]" {
        return Payload::Done;
    }
    match serde_json::from_str::<WireChunk>(data) {
        Ok(c) => {
            if let Some(e) = c.error {
                return Payload::Error(error_message(&e));
            }
            let content = c.choices.iter().any(|ch| {
                let delta = ch
                    .delta
                    .as_ref()
                    .or(ch.message.as_ref())
                    .and_then(|d| d.content.as_deref());
                delta.or(ch.text.as_deref()).is_some_and(|s| !s.is_empty())
            });
            Payload::Chunk {
                content,
                usage: c.usage,
            }
        }
        Err(_) => Payload::Malformed,
    }
}

/// A short message from an OpenAI/vLLM error object (nested `{"error":{..}}` or flat).
pub fn error_message(e: &serde_json::Value) -> String {
    match e {
        serde_json::Value::String(s) => s.clone(),
        v => v
            .get("message")
            .and_then(|m| m.as_str())
            .map_or_else(|| v.to_string(), str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(chunks: &[&[u8]]) -> Vec<String> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, &mut out);
        }
        out
    }

    #[test]
    fn splits_events_across_arbitrary_chunk_boundaries() {
        let body = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n: comment\n\ndata: [DONE]\n\n";
        for cut in 0..body.len() {
            let out = feed(&[&body[..cut], &body[cut..]]);
            assert_eq!(
                out,
                vec!["{\"a\":1}", "{\"b\":2}", "[DONE]"],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn joins_multiline_data_and_keeps_partial_event_pending() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.push(b"data: x\ndata:y\n\ndata: par", &mut out);
        assert_eq!(out, vec!["x\ny"]);
        assert_eq!(p.pending(), 9);
    }

    #[test]
    fn classifies_chat_and_completion_chunks() {
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(
            classify(role),
            Payload::Chunk {
                content: false,
                usage: None
            }
        );
        let tok = r#"{"choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}"#;
        assert_eq!(
            classify(tok),
            Payload::Chunk {
                content: true,
                usage: None
            }
        );
        let cmpl = r#"{"object":"text_completion","choices":[{"index":0,"text":" of","finish_reason":null}]}"#;
        assert_eq!(
            classify(cmpl),
            Payload::Chunk {
                content: true,
                usage: None
            }
        );
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
        assert_eq!(
            classify(usage),
            Payload::Chunk {
                content: false,
                usage: Some(Usage {
                    prompt_tokens: 12,
                    completion_tokens: 5
                })
            }
        );
        assert_eq!(classify("[DONE]"), Payload::Done);
        assert_eq!(classify("nope"), Payload::Malformed);
        let err = r#"{"error":{"message":"boom","type":"InternalServerError","code":500}}"#;
        assert_eq!(classify(err), Payload::Error("boom".into()));
    }
}
