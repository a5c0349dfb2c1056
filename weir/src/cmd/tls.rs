//! TLS for weir's servers that are dialled over TLS: the metrics adapter (HTTPS: the Kubernetes aggregator only talks
//! TLS to an APIService backend) and the ext_proc endpoint picker (gRPC over TLS, ALPN `h2`: Envoy AI Gateway dials
//! an InferencePool's picker over TLS without verifying its certificate).
//!
//! [`server_config`] loads a PEM certificate chain and key (cert-manager's Secret, see
//! deploy/metrics-adapter/certificate.yaml) or, when none is given, makes a self-signed certificate at start with
//! rcgen (for `insecureSkipTLSVerify: true` APIServices, gateways that do not verify, and local runs). [`TlsListener`]
//! accepts in a task of its own and runs each handshake in its own task under a timeout, so one slow or silent client
//! never holds up the accept loop; it is an `axum::serve::Listener` and, through [`TlsListener::into_incoming`], a
//! tonic incoming stream. Client certificates are not checked: run these servers where only their clients reach
//! them (NetworkPolicies); neither API carries secrets.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Completed handshakes waiting for the HTTP server to take them.
const ACCEPT_BACKLOG: usize = 64;

/// Where the serving certificate comes from.
pub enum CertSource<'a> {
    /// PEM files: the certificate chain and its private key.
    Files { cert: &'a Path, key: &'a Path },
    /// A self-signed certificate made now for these names (DNS names or IP addresses).
    SelfSigned(Vec<String>),
}

/// ALPN for HTTP/1.1 (the metrics adapter).
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN for HTTP/2 (gRPC: the ext_proc endpoint picker).
pub const ALPN_H2: &[&[u8]] = &[b"h2"];

/// A rustls server config offering the `alpn` protocols and serving the certificate of `source`.
pub fn server_config(
    source: CertSource<'_>,
    alpn: &[&[u8]],
) -> anyhow::Result<rustls::ServerConfig> {
    let (chain, key) = match source {
        CertSource::Files { cert, key } => {
            let cert_pem =
                std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
            let key_pem =
                std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", cert.display()))?;
            anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .with_context(|| format!("parsing {}", key.display()))?;
            (chain, key)
        }
        CertSource::SelfSigned(names) => {
            let made = rcgen::generate_simple_self_signed(names)
                .context("making a self-signed certificate")?;
            let key =
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
            (vec![made.cert.der().clone()], key)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("TLS certificate and key do not match")?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// The server config of a `--*-tls-cert`/`--*-tls-key` pair, or of a self-signed certificate for `listen` when they
/// are not given.
pub fn config_for(
    cert: Option<&Path>,
    key: Option<&Path>,
    listen: &str,
    alpn: &[&[u8]],
) -> anyhow::Result<rustls::ServerConfig> {
    match (cert, key) {
        (Some(cert), Some(key)) => server_config(CertSource::Files { cert, key }, alpn),
        _ => server_config(CertSource::SelfSigned(self_signed_names(listen)), alpn),
    }
}

/// The names a self-signed certificate is made for: the listen host plus the loopback names.
fn self_signed_names(listen: &str) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Some((host, _)) = listen.rsplit_once(':') {
        let host = host.trim_matches(['[', ']']);
        if !host.is_empty() && host != "0.0.0.0" && host != "::" && !names.iter().any(|n| n == host)
        {
            names.push(host.to_string());
        }
    }
    names
}

/// A listener yielding connections that completed a TLS handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` in a background task; each handshake runs in its own task under a timeout.
    pub fn new(tcp: TcpListener, cfg: rustls::ServerConfig) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let (tx, ready) = mpsc::channel(ACCEPT_BACKLOG);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl TlsListener {
    /// The connections as tonic's `serve_with_incoming` takes them.
    pub fn into_incoming(
        self,
    ) -> impl tokio_stream::Stream<Item = Result<TlsConn, std::convert::Infallible>> {
        use tokio_stream::StreamExt;
        tokio_stream::wrappers::ReceiverStream::new(self.ready).map(|(tls, _)| Ok(TlsConn(tls)))
    }
}

/// A TLS connection for tonic's server, which needs [`Connected`](tonic::transport::server::Connected) on its
/// streams (tonic's own TLS would bring a second TLS setup; this one reports the TCP peer like a plaintext stream).
pub struct TlsConn(TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task only ends when this receiver is gone, so this is never reached while we poll it.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_names_cover_loopback_and_the_listen_host() {
        assert_eq!(self_signed_names("127.0.0.1:0"), ["localhost", "127.0.0.1"]);
        assert_eq!(
            self_signed_names("0.0.0.0:6443"),
            ["localhost", "127.0.0.1"]
        );
        assert_eq!(
            self_signed_names("10.0.0.7:6443"),
            ["localhost", "127.0.0.1", "10.0.0.7"]
        );
        assert_eq!(
            self_signed_names("[::1]:6443"),
            ["localhost", "127.0.0.1", "::1"]
        );
    }
}
