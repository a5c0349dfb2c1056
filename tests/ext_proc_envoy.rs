//! Envoy's side of one ext_proc stream (one HTTP request), as a gateway in front of an InferencePool plays it, over
//! plaintext h2c or over TLS the way Envoy AI Gateway dials an endpoint picker (ALPN h2, certificate not verified).
//! Included by the ext_proc tests of router_cache_e2e (`mod envoy`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Ans;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, body_mutation,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// How Envoy reaches the picker.
#[derive(Clone)]
pub enum Link {
    /// Plaintext gRPC (h2c): `weir serve --ext-proc-plaintext`.
    Plain,
    /// gRPC over TLS with this client config (ALPN h2, server name `localhost`).
    Tls(Arc<rustls::ClientConfig>),
}

/// A verifier that accepts any certificate (the handshake's signatures are still checked), as Envoy AI Gateway's
/// empty validation context does for an InferencePool's picker.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl Link {
    /// TLS accepting whatever certificate the picker presents (its self-signed one), as Envoy AI Gateway dials it.
    pub fn accept_any() -> Link {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth();
        Link::tls(cfg)
    }

    /// TLS trusting only `cert` (chain and name `localhost` verified).
    pub fn trusting(cert: CertificateDer<'static>) -> Link {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Link::tls(cfg)
    }

    fn tls(mut cfg: rustls::ClientConfig) -> Link {
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Link::Tls(Arc::new(cfg))
    }

    /// A gRPC channel to the picker at `addr`.
    async fn channel(&self, addr: &str) -> Result<Channel, String> {
        let ep = Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let cfg = match self {
            Link::Plain => return ep.connect().await.map_err(|e| format!("{e:?}")),
            Link::Tls(cfg) => cfg.clone(),
        };
        let addr = addr.to_string();
        let connector = tower::service_fn(move |_: hyper::Uri| {
            let (cfg, addr) = (cfg.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let name = ServerName::try_from("localhost").unwrap();
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await?;
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                if alpn.as_deref() != Some(&b"h2"[..]) {
                    return Err(std::io::Error::other(format!("ALPN {alpn:?}, not h2")));
                }
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        ep.connect_with_connector(connector)
            .await
            .map_err(|e| format!("{e:?}"))
    }
}

pub struct Stream {
    tx: mpsc::Sender<ProcessingRequest>,
    rx: tonic::Streaming<ProcessingResponse>,
}

/// What the picker answered to the request: the routing (header, metadata, other header edits, body) or an
/// immediate response.
#[derive(Debug, Default)]
pub struct Answer {
    pub destination: String,
    pub metadata_destination: String,
    pub set: BTreeMap<String, String>,
    pub removed: Vec<String>,
    pub body: Vec<u8>,
    pub immediate: Option<(u16, BTreeMap<String, String>, String)>,
}

fn headers(kv: &[(&str, &str)]) -> Option<HeaderMap> {
    Some(HeaderMap {
        headers: kv
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_string(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect(),
    })
}

fn string(v: &Value) -> String {
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("not a string: {other:?}"),
    }
}

impl Stream {
    /// Opens a stream to the picker at `addr` over `link`.
    pub async fn open(addr: &str, link: &Link) -> Stream {
        Stream::try_open(addr, link).await.unwrap()
    }

    /// Opens a stream, or says why it could not (within 10 s).
    pub async fn try_open(addr: &str, link: &Link) -> Result<Stream, String> {
        let open =
            async {
                let mut c = ExternalProcessorClient::new(link.channel(addr).await?);
                let (tx, rx) = mpsc::channel::<ProcessingRequest>(8);
                let out = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|m| (m, rx))
                });
                let rx = c.process(out).await.map_err(|e| format!("{e:?}"))?;
                Ok(Stream {
                    tx,
                    rx: rx.into_inner(),
                })
            };
        tokio::time::timeout(Duration::from_secs(10), open)
            .await
            .map_err(|_| "no stream within 10 s".to_string())?
    }

    async fn send(&self, m: Msg, metadata: Option<Metadata>) {
        let req = ProcessingRequest {
            request: Some(m),
            metadata_context: metadata,
            ..Default::default()
        };
        self.tx.send(req).await.unwrap();
    }

    async fn next_full(&mut self) -> ProcessingResponse {
        tokio::time::timeout(Duration::from_secs(20), self.rx.message())
            .await
            .expect("an answer from the picker in time")
            .unwrap()
            .expect("the picker closed the stream")
    }

    async fn next(&mut self) -> Ans {
        self.next_full().await.response.expect("a response")
    }

    /// Sends the request (headers, then the body in two chunks, as Envoy streams it) and reads the answer.
    pub async fn request(
        &mut self,
        path: &str,
        extra: &[(&str, &str)],
        body: &[u8],
        subset: Option<&[&str]>,
    ) -> Answer {
        let len = body.len().to_string();
        let mut kv = vec![
            (":method", "POST"),
            (":path", path),
            (":authority", "gateway"),
            ("content-type", "application/json"),
            ("content-length", len.as_str()),
        ];
        kv.extend_from_slice(extra);
        let metadata = subset.map(|s| Metadata {
            filter_metadata: [(
                "envoy.lb.subset_hint".to_string(),
                Struct {
                    fields: [(
                        "x-gateway-destination-endpoint-subset".to_string(),
                        Value {
                            kind: Some(Kind::ListValue(ListValue {
                                values: s
                                    .iter()
                                    .map(|x| Value {
                                        kind: Some(Kind::StringValue(x.to_string())),
                                    })
                                    .collect(),
                            })),
                        },
                    )]
                    .into(),
                },
            )]
            .into(),
            ..Default::default()
        });
        self.send(
            Msg::RequestHeaders(HttpHeaders {
                headers: headers(&kv),
                ..Default::default()
            }),
            metadata,
        )
        .await;
        let (a, b) = body.split_at(body.len() / 2);
        for (chunk, eos) in [(a, false), (b, true)] {
            self.send(
                Msg::RequestBody(HttpBody {
                    body: chunk.to_vec(),
                    end_of_stream: eos,
                    ..Default::default()
                }),
                None,
            )
            .await;
        }
        let mut ans = Answer::default();
        let first = self.next_full().await;
        if first.dynamic_metadata.is_some() {
            ans.metadata_destination = metadata_destination(&first);
        }
        match first.response.expect("a response") {
            Ans::ImmediateResponse(i) => {
                let h = i
                    .headers
                    .unwrap_or_default()
                    .set_headers
                    .into_iter()
                    .map(|o| {
                        let h = o.header.unwrap();
                        (h.key, String::from_utf8(h.raw_value).unwrap())
                    })
                    .collect();
                ans.immediate = Some((
                    i.status.unwrap().code as u16,
                    h,
                    String::from_utf8(i.body).unwrap(),
                ));
                return ans;
            }
            Ans::RequestHeaders(h) => {
                let c = h.response.unwrap();
                assert!(c.clear_route_cache, "the route cache is cleared");
                let m = c.header_mutation.unwrap();
                for o in m.set_headers {
                    let h = o.header.unwrap();
                    ans.set
                        .insert(h.key, String::from_utf8(h.raw_value).unwrap());
                }
                ans.removed = m.remove_headers;
            }
            other => panic!("expected the request-headers answer, got {other:?}"),
        }
        ans.destination = ans
            .set
            .get("x-gateway-destination-endpoint")
            .cloned()
            .unwrap_or_default();
        loop {
            match self.next().await {
                Ans::RequestBody(b) => match b.response.unwrap().body_mutation.unwrap().mutation {
                    Some(body_mutation::Mutation::StreamedResponse(s)) => {
                        ans.body.extend_from_slice(&s.body);
                        if s.end_of_stream {
                            break;
                        }
                    }
                    other => panic!("expected a streamed body, got {other:?}"),
                },
                other => panic!("expected the request body, got {other:?}"),
            }
        }
        ans
    }

    /// Plays the model server's answer through Envoy: response headers and one body chunk, each passed on.
    pub async fn respond(&mut self, status: u16, body: &[u8]) {
        self.respond_head(status, "application/json").await;
        self.respond_chunk(body, true).await;
    }

    /// The response headers of the pod's answer; the picker passes them on.
    pub async fn respond_head(&mut self, status: u16, content_type: &str) {
        let status = status.to_string();
        self.send(
            Msg::ResponseHeaders(HttpHeaders {
                headers: headers(&[(":status", &status), ("content-type", content_type)]),
                ..Default::default()
            }),
            None,
        )
        .await;
        assert!(matches!(self.next().await, Ans::ResponseHeaders(_)));
    }

    /// One response body chunk (`eos`: the response's last); the picker passes it on unchanged. Envoy's side of
    /// the exchange stays open either way.
    pub async fn respond_chunk(&mut self, body: &[u8], eos: bool) {
        self.send(
            Msg::ResponseBody(HttpBody {
                body: body.to_vec(),
                end_of_stream: eos,
                ..Default::default()
            }),
            None,
        )
        .await;
        match self.next().await {
            Ans::ResponseBody(b) => match b.response.unwrap().body_mutation.unwrap().mutation {
                Some(body_mutation::Mutation::StreamedResponse(s)) => {
                    assert_eq!(s.body, body, "the response body passes unchanged");
                    assert_eq!(s.end_of_stream, eos);
                }
                other => panic!("{other:?}"),
            },
            other => panic!("expected the response body, got {other:?}"),
        }
    }
}

/// The dynamic metadata's destination (`envoy.lb` / `x-gateway-destination-endpoint`) of a headers answer.
fn metadata_destination(r: &ProcessingResponse) -> String {
    let ns = &r.dynamic_metadata.as_ref().unwrap().fields["envoy.lb"];
    match &ns.kind {
        Some(Kind::StructValue(s)) => string(&s.fields["x-gateway-destination-endpoint"]),
        other => panic!("envoy.lb is not a struct: {other:?}"),
    }
}
