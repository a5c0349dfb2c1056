//! HTTPS for the metrics adapter: the Kubernetes aggregator only talks TLS to an APIService backend.
//!
//! [`server_config`] loads a PEM certificate chain and key (cert-manager's Secret, see
//! deploy/metrics-adapter/certificate.yaml) or, when none is given, makes a self-signed certificate at start with
//! rcgen (for `insecureSkipTLSVerify: true` APIServices and local runs). [`TlsListener`] is an
//! `axum::serve::Listener` whose handshakes run in their own tasks, so one slow or silent client never holds up the
//! accept loop. Client certificates are not checked: run the adapter where only the aggregator reaches it (a
//! NetworkPolicy); the metrics APIs carry no secrets.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
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

/// A rustls server config (HTTP/1.1 by ALPN) serving the certificate of `source`.
pub fn server_config(source: CertSource<'_>) -> anyhow::Result<rustls::ServerConfig> {
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
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
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
