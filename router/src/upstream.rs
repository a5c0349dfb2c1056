//! The proxy's upstream HTTP/1.1 client: keep-alive connections pooled per `host:port`, one request at a time per
//! connection, driven by the task of the request that uses it.
//!
//! Why not hyper's client (`hyper_util::client::legacy` or `hyper::client::conn::http1`): both run every connection
//! as its own task fed through a dispatch channel, so each request crosses tasks four times (request in, response
//! head out, body frames, the connection going idle again), the legacy pool spawns one more task per request to
//! return the connection, and every connection keeps an 8 KiB header buffer and the channel's first block (~8.5 KiB)
//! for its whole life. With one connection per open stream, those two alone were ~16 of the ~35 KiB the router held
//! per stream, and the hand-offs a good share of its CPU per tiny request (numbers in `bench-results/`). Here the
//! request's own task writes the head and body in one `writev`, parses the response head with `httparse` (hyper's
//! parser), and reads the body straight from the socket into a small buffer whose slices are handed on without a
//! copy. What is hand-written is framing only: Content-Length, chunked (sizes parsed by `httparse`), or until close.
//!
//! Not supported, because the proxy never needs it: TLS, HTTP/2, pipelining, upgrades, request bodies that are not
//! in memory. `crate::scrape` and the P/D prefill leg keep the pooled hyper client.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes asked of the socket per read while the length is unknown (response heads, chunked bodies). SSE events are
/// ~250 bytes; a bigger read only costs memory per open stream.
const READ_CHUNK: usize = 1024;
/// Largest read for a body of known length.
const MAX_READ: usize = 64 << 10;
/// Longest response head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Most response headers accepted.
const MAX_HEADERS: usize = 100;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to {authority}: {source}")]
    Connect {
        authority: String,
        #[source]
        source: io::Error,
    },
    #[error("could not connect to {0}: timed out")]
    ConnectTimeout(String),
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("the model server closed the connection before answering")]
    Closed,
    #[error("the model server closed the connection mid-body")]
    Truncated,
    #[error("invalid response from the model server: {0}")]
    Invalid(String),
}

impl UpstreamError {
    /// Nothing reached the model server (safe to retry anywhere).
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::ConnectTimeout(_))
    }
}

/// The pooled client. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    idle: Mutex<HashMap<String, Vec<Idle>>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One keep-alive connection and the bytes read from it but not consumed yet.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("connect_timeout", &self.inner.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Idle connections are kept 90 s, at most 4,096 per `host:port`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self::with_pool(connect_timeout, Duration::from_secs(90), 4096)
    }

    pub fn with_pool(
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle_per_host: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                connect_timeout,
                idle_timeout,
                max_idle_per_host,
                idle: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Idle pooled connections to `authority` (tests and `/debug`).
    pub fn idle_count(&self, authority: &str) -> usize {
        self.inner.idle.lock().get(authority).map_or(0, Vec::len)
    }

    /// Sends `req` (origin-form URI: path and query) to `authority` (`host:port`) and returns the response head; the
    /// body streams from the socket as it is polled. `Host` and `Content-Length` are set here; hop-by-hop headers
    /// must already be removed. A pooled connection the server closed while idle is replaced transparently when
    /// nothing of the response had arrived.
    pub async fn send(
        &self,
        authority: &str,
        req: Request<Bytes>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (parts, body) = req.into_parts();
        let head = encode_head(&parts, authority, body.len());
        let mut fresh_only = false;
        loop {
            let (mut conn, reused) = match (!fresh_only)
                .then(|| self.inner.checkout(authority))
                .flatten()
            {
                Some(c) => (c, true),
                None => (self.connect(authority).await?, false),
            };
            match conn.exchange(&head, &body).await {
                Ok(head) => return Ok(self.response(conn, head, authority)),
                Err(Exchange::Stale(_)) if reused => fresh_only = true,
                Err(Exchange::Stale(e) | Exchange::Failed(e)) => return Err(e),
            }
        }
    }

    async fn connect(&self, authority: &str) -> Result<Conn, UpstreamError> {
        let io =
            match tokio::time::timeout(self.inner.connect_timeout, TcpStream::connect(authority))
                .await
            {
                Ok(Ok(io)) => io,
                Ok(Err(source)) => {
                    return Err(UpstreamError::Connect {
                        authority: authority.to_string(),
                        source,
                    });
                }
                Err(_) => return Err(UpstreamError::ConnectTimeout(authority.to_string())),
            };
        io.set_nodelay(true)?;
        Ok(Conn {
            io,
            buf: BytesMut::new(),
        })
    }

    fn response(&self, conn: Conn, head: Head, authority: &str) -> Response<UpstreamBody> {
        let Head {
            status,
            version,
            headers,
            framing,
            keep_alive,
        } = head;
        let mut body = UpstreamBody {
            conn: Some(conn),
            framing,
            pool: keep_alive.then(|| (self.inner.clone(), authority.to_string())),
        };
        // A body already complete (no body, or all of it in the head's read) frees the connection now.
        if matches!(body.framing, Framing::Length(0)) {
            body.finish();
        }
        let mut r = Response::new(body);
        *r.status_mut() = status;
        *r.version_mut() = version;
        *r.headers_mut() = headers;
        r
    }
}

impl Inner {
    /// The most recently used live idle connection to `authority`, if any.
    fn checkout(&self, authority: &str) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        let list = idle.get_mut(authority)?;
        while let Some(Idle { conn, since }) = list.pop() {
            if now.duration_since(since) < self.idle_timeout && conn.is_reusable() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, authority: String, conn: Conn) {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        let list = idle.entry(authority).or_default();
        // The oldest entries are first (LIFO reuse): drop the expired ones so a pool that only grows stays bounded.
        let expired = list
            .iter()
            .take_while(|i| now.duration_since(i.since) >= self.idle_timeout)
            .count();
        list.drain(..expired);
        if list.len() < self.max_idle_per_host {
            list.push(Idle { conn, since: now });
        }
    }
}

impl Conn {
    /// An idle connection is reusable when the server has neither closed it nor sent anything unasked. Costs no
    /// system call unless the socket became readable while idle (reads that drain the socket clear readiness).
    fn is_reusable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes the request and reads the response head (skipping 1xx interim responses).
    async fn exchange(&mut self, head: &[u8], body: &Bytes) -> Result<Head, Exchange> {
        if let Err(e) = write_all_vectored(&mut self.io, head, body).await {
            // Nothing of the response can have arrived: a closed idle connection shows up here or below.
            return Err(Exchange::Stale(e.into()));
        }
        let mut received = false;
        loop {
            if let Some(h) = parse_head(&mut self.buf).map_err(Exchange::Failed)? {
                if h.status.is_informational() && h.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                return Ok(h);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(Exchange::Failed(UpstreamError::Invalid(
                    "response head too large".into(),
                )));
            }
            match read_more(&mut self.io, &mut self.buf, READ_CHUNK).await {
                Ok(0) if received => return Err(Exchange::Failed(UpstreamError::Closed)),
                Ok(0) => return Err(Exchange::Stale(UpstreamError::Closed)),
                Ok(_) => received = true,
                Err(e) if !received && is_reset(&e) => return Err(Exchange::Stale(e.into())),
                Err(e) => return Err(Exchange::Failed(e.into())),
            }
        }
    }
}

/// How an exchange failed: `Stale` when nothing came back (a pooled connection the server had closed).
enum Exchange {
    Stale(UpstreamError),
    Failed(UpstreamError),
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

async fn write_all_vectored(io: &mut TcpStream, head: &[u8], body: &[u8]) -> io::Result<()> {
    let (mut h, mut b) = (head, body);
    while !h.is_empty() || !b.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(h), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(h.len());
        h = &h[from_head..];
        b = &b[n - from_head..];
    }
    Ok(())
}

/// Reads at most `want` more bytes onto `buf`; 0 at end of stream.
async fn read_more(io: &mut TcpStream, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_more(io, buf, want, cx)).await
}

fn poll_read_more(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let start = buf.len();
    // Zero-filled instead of reading into spare capacity: this crate forbids `unsafe`, and a memset of at most one
    // read is noise next to the system call.
    buf.resize(start + want, 0);
    let mut rb = ReadBuf::new(&mut buf[start..]);
    let r = Pin::new(&mut *io).poll_read(cx, &mut rb);
    let n = rb.filled().len();
    buf.truncate(start + n);
    match r {
        Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// `POST /path HTTP/1.1`, the caller's headers, `host`, `content-length`.
fn encode_head(parts: &hyper::http::request::Parts, authority: &str, body_len: usize) -> Vec<u8> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut len = parts.method.as_str().len() + path.len() + authority.len() + 64;
    for (k, v) in &parts.headers {
        len += k.as_str().len() + v.len() + 4;
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (k, v) in &parts.headers {
        if k == header::HOST || k == header::CONTENT_LENGTH || k == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"host: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// A parsed response head and how its body is framed.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// Parses a complete response head off the front of `buf` (`None`: incomplete). Header values share the head's
/// bytes (no copy per header).
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, UpstreamError> {
    let invalid = |e: &dyn std::fmt::Display| UpstreamError::Invalid(e.to_string());
    // Uninitialised slots: zeroing 100 headers (3.2 KB) per response cost more than the parse.
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(&e)),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0)).map_err(|e| invalid(&e))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let base = buf.as_ptr() as usize;
    let mut ranges: Vec<(HeaderName, usize, usize)> = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| invalid(&e))?;
        let at = h.value.as_ptr() as usize - base;
        ranges.push((name, at, at + h.value.len()));
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(ranges.len());
    for (name, from, to) in ranges {
        let v = HeaderValue::from_maybe_shared(head.slice(from..to)).map_err(|e| invalid(&e))?;
        headers.append(name, v);
    }
    let mut keep_alive = version == Version::HTTP_11;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|&b| b == b',') {
            let t = token.trim_ascii();
            if t.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                keep_alive = true;
            }
        }
    }
    let framing = framing(status, &headers).map_err(UpstreamError::Invalid)?;
    if matches!(framing, Framing::UntilClose) {
        keep_alive = false;
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// RFC 9112 §6.3, for responses to requests that are not HEAD or CONNECT.
fn framing(status: StatusCode, headers: &HeaderMap) -> Result<Framing, String> {
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    if let Some(te) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let last = te.as_bytes().rsplit(|&b| b == b',').next().unwrap_or(b"");
        return Ok(if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::UntilClose
        });
    }
    let mut length: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n = std::str::from_utf8(part.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| "invalid content-length".to_string())?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values".into());
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// How the rest of a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    Chunked(Chunk),
    /// Until the server closes the connection (not reusable).
    UntilClose,
    /// Complete.
    Done,
}

/// Position inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many data bytes of the current chunk remain.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// A response body read from the socket as it is polled. Reaching its end returns the connection to the pool;
/// dropping it before the end closes the connection (which makes vLLM abort the request).
pub struct UpstreamBody {
    conn: Option<Conn>,
    framing: Framing,
    /// Where the connection goes when the body ends (`None`: not reusable).
    pool: Option<(Arc<Inner>, String)>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let (Some(conn), Some((inner, authority))) = (self.conn.take(), self.pool.take()) {
            // Bytes past the end of the response: the connection is out of step, do not reuse it.
            if conn.buf.is_empty() {
                inner.checkin(authority, conn);
            }
        }
    }

    /// Decodes what is buffered: `Some(data)` to hand on, `None` when more input is needed (or the body ended).
    fn decode(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let step = decode(&mut self.framing, &mut conn.buf)?;
        if self.framing == Framing::Done {
            self.finish();
        }
        Ok(step)
    }

    /// How many bytes to ask the socket for next.
    fn want(&self) -> usize {
        match self.framing {
            // Exactly the rest: nothing follows a response on its connection.
            Framing::Length(n) => usize::try_from(n).unwrap_or(MAX_READ).clamp(1, MAX_READ),
            // At least a small read: the chunk's CRLF and the next size line usually come with it.
            Framing::Chunked(Chunk::Data(n)) => usize::try_from(n)
                .unwrap_or(MAX_READ)
                .clamp(READ_CHUNK, MAX_READ),
            _ => READ_CHUNK,
        }
    }
}

/// Splits off up to `n` bytes of `buf`: the bytes, and how many of `n` are still to come.
fn take_up_to(buf: &mut BytesMut, n: u64) -> (Bytes, u64) {
    let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
    (buf.split_to(take).freeze(), n - take as u64)
}

/// One decoding step over the buffered bytes: data to hand on, or `None` when more input is needed or the body is
/// complete (then `framing` is [`Framing::Done`]).
fn decode(framing: &mut Framing, buf: &mut BytesMut) -> Result<Option<Bytes>, UpstreamError> {
    loop {
        match *framing {
            Framing::Done => return Ok(None),
            Framing::Length(0) => {
                *framing = Framing::Done;
                return Ok(None);
            }
            Framing::Length(n) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let (data, left) = take_up_to(buf, n);
                *framing = match left {
                    0 => Framing::Done,
                    left => Framing::Length(left),
                };
                return Ok(Some(data));
            }
            Framing::UntilClose => {
                if buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(buf.split().freeze()));
            }
            Framing::Chunked(Chunk::Size) => match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    buf.advance(used);
                    *framing = Framing::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > 4096 {
                        return Err(UpstreamError::Invalid("chunk size line too long".into()));
                    }
                    return Ok(None);
                }
                Err(_) => return Err(UpstreamError::Invalid("invalid chunk size".into())),
            },
            Framing::Chunked(Chunk::Data(n)) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let (data, left) = take_up_to(buf, n);
                *framing = Framing::Chunked(match left {
                    0 => Chunk::DataEnd,
                    left => Chunk::Data(left),
                });
                return Ok(Some(data));
            }
            Framing::Chunked(Chunk::DataEnd) => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(UpstreamError::Invalid("missing CRLF after chunk".into()));
                }
                buf.advance(2);
                *framing = Framing::Chunked(Chunk::Size);
            }
            Framing::Chunked(Chunk::Trailers) => {
                // Trailer fields are dropped (vLLM sends none); only their end, an empty line, matters. A partial
                // line stays buffered until its LF arrives.
                let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > 8192 {
                        return Err(UpstreamError::Invalid("trailer line too long".into()));
                    }
                    return Ok(None);
                };
                let empty = eol == 0 || (eol == 1 && buf[0] == b'\r');
                buf.advance(eol + 1);
                if empty {
                    *framing = Framing::Done;
                    return Ok(None);
                }
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        loop {
            match this.decode() {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) if this.framing == Framing::Done => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let want = this.want();
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(poll_read_more(&mut conn.io, &mut conn.buf, want, cx)) {
                Ok(0) => {
                    let ended = this.framing == Framing::UntilClose;
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready((!ended).then_some(Err(UpstreamError::Truncated)));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// What the test server does for the next request it reads.
    enum Reply {
        /// These writes, flushed separately, then wait for the next request.
        Send(Vec<&'static [u8]>),
        /// These writes, then close the connection.
        SendClose(Vec<&'static [u8]>),
        /// Close without answering.
        Close,
    }

    /// A server that answers every request on every connection with the next scripted reply, counting
    /// connections.
    async fn server(script: Vec<Reply>) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(Mutex::new(script.into_iter()));
        let acc = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut b = [0u8; 4096];
                    loop {
                        // One request: a head and a content-length body.
                        let n = match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        req.extend_from_slice(&b[..n]);
                        let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&req[..end]).to_lowercase();
                        let cl: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if req.len() < end + 4 + cl {
                            continue;
                        }
                        req.drain(..end + 4 + cl);
                        let next = script.lock().next();
                        let (writes, close) = match next {
                            Some(Reply::Send(w)) => (w, false),
                            Some(Reply::SendClose(w)) => (w, true),
                            Some(Reply::Close) | None => return,
                        };
                        for w in writes {
                            s.write_all(w).await.unwrap();
                            s.flush().await.unwrap();
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn post(body: &'static str) -> Request<Bytes> {
        Request::builder()
            .method("POST")
            .uri("/v1/completions")
            .header("content-type", "application/json")
            .body(Bytes::from_static(body.as_bytes()))
            .unwrap()
    }

    async fn text(r: Response<UpstreamBody>) -> Result<String, UpstreamError> {
        let b = r.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(b.to_vec()).unwrap())
    }

    const OK: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

    #[tokio::test]
    async fn content_length_responses_reuse_one_connection() {
        let (addr, accepted) = server(vec![
            Reply::Send(vec![OK]),
            Reply::Send(vec![OK]),
            Reply::Send(vec![OK]),
        ])
        .await;
        let up = Upstream::new(Duration::from_secs(1));
        for _ in 0..3 {
            let r = up.send(&addr, post("{\"a\":1}")).await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["content-type"], "application/json");
            assert_eq!(text(r).await.unwrap(), "{}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(up.idle_count(&addr), 1);
    }

    #[tokio::test]
    async fn chunked_bodies_split_anywhere_decode_to_the_same_bytes() {
        let whole: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n4;ext=1\r\nabc\n\r\n0\r\nx-trailer: 1\r\n\r\n";
        for cut in 1..whole.len() {
            let (a, b) = whole.split_at(cut);
            let a: &'static [u8] = Box::leak(a.to_vec().into_boxed_slice());
            let b: &'static [u8] = Box::leak(b.to_vec().into_boxed_slice());
            let (addr, _) = server(vec![Reply::Send(vec![a, b]), Reply::Send(vec![OK])]).await;
            let up = Upstream::new(Duration::from_secs(1));
            let r = up.send(&addr, post("{}")).await.unwrap();
            assert_eq!(text(r).await.unwrap(), "data: abc\n", "cut at {cut}");
            // The connection went back to the pool and serves the next request.
            assert_eq!(up.idle_count(&addr), 1, "cut at {cut}");
            assert_eq!(
                text(up.send(&addr, post("{}")).await.unwrap())
                    .await
                    .unwrap(),
                "{}"
            );
        }
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_close_delimited_bodies_read_to_the_end() {
        let (addr, _) = server(vec![Reply::SendClose(vec![
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello ",
            b"world",
        ])])
        .await;
        let up = Upstream::new(Duration::from_secs(1));
        let r = up.send(&addr, post("{}")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(text(r).await.unwrap(), "hello world");
        assert_eq!(up.idle_count(&addr), 0);
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_by_the_server_is_replaced() {
        // First connection answers once then closes; the retry opens a second one.
        let (addr, accepted) = server(vec![
            Reply::Send(vec![OK]),
            Reply::Close,
            Reply::Send(vec![OK]),
        ])
        .await;
        let up = Upstream::new(Duration::from_secs(1));
        assert_eq!(
            text(up.send(&addr, post("{}")).await.unwrap())
                .await
                .unwrap(),
            "{}"
        );
        // Not yet known to be closed (the server closes when it reads the next request).
        let r = up.send(&addr, post("{}")).await.unwrap();
        assert_eq!(text(r).await.unwrap(), "{}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_closed_by_the_server_is_not_reused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = l.accept().await {
                n += 1;
                let close = n == 1;
                tokio::spawn(async move {
                    let mut b = [0u8; 4096];
                    let _ = s.read(&mut b).await;
                    s.write_all(OK).await.unwrap();
                    if close {
                        return; // drop: FIN while the client holds it idle
                    }
                    let _ = s.read(&mut b).await;
                });
            }
        });
        let up = Upstream::new(Duration::from_secs(1));
        assert_eq!(
            text(up.send(&addr, post("{}")).await.unwrap())
                .await
                .unwrap(),
            "{}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let idle = up.inner.checkout(&addr);
        assert!(idle.is_none(), "the closed connection was handed out");
    }

    #[tokio::test]
    async fn dropping_a_body_mid_stream_closes_the_connection() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 4096];
            let _ = s.read(&mut b).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
                .await
                .unwrap();
            // The client's close arrives as end of stream.
            let n = s.read(&mut b).await.unwrap_or(0);
            let _ = tx.send(n);
        });
        let up = Upstream::new(Duration::from_secs(1));
        let mut body = up.send(&addr, post("{}")).await.unwrap().into_body();
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "hi");
        drop(body);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(2), rx)
                .await
                .unwrap()
                .unwrap(),
            0
        );
        assert_eq!(up.idle_count(&addr), 0);
    }

    #[tokio::test]
    async fn broken_responses_are_errors_not_panics() {
        let cases: Vec<&'static [u8]> = vec![
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
        ];
        for c in cases {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 4096];
                let _ = s.read(&mut b).await;
                s.write_all(c).await.unwrap();
                // Close: truncated bodies end here.
            });
            let up = Upstream::new(Duration::from_secs(1));
            let r = match up.send(&addr, post("{}")).await {
                Ok(r) => text(r).await,
                Err(e) => Err(e),
            };
            assert!(r.is_err(), "{:?} gave {r:?}", String::from_utf8_lossy(c));
        }
    }

    #[tokio::test]
    async fn connect_failures_are_connect_errors() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let up = Upstream::new(Duration::from_secs(1));
        let e = up.send(&addr, post("{}")).await.unwrap_err();
        assert!(e.is_connect(), "{e}");
    }

    #[test]
    fn request_head_carries_host_and_length_and_the_callers_headers() {
        let req = Request::builder()
            .method("POST")
            .uri("/v1/chat/completions")
            .header("x-request-id", "r1")
            .header("content-length", "999")
            .header("host", "elsewhere")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let head = encode_head(&parts, "10.0.0.1:8000", 42);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /v1/chat/completions HTTP/1.1\r\nx-request-id: r1\r\nhost: 10.0.0.1:8000\r\ncontent-length: 42\r\n\r\n"
        );
    }
}
