//! The pooled hyper client used off the proxy's hot path: metric scrapes and P/D prefill legs. (Proxied attempts go
//! through [`crate::upstream`].)

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The pooled client (HTTP/1.1, keep-alive).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled client with the given connect timeout. Reads are exactly 1 KiB (SSE events are ~250 bytes): measured
/// ~4.5 KB less resident memory per open stream than hyper's adaptive 8 KiB buffer.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_connect_timeout(Some(connect_timeout));
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(4096)
        .http1_read_buf_exact_size(1024)
        .build(c)
}
