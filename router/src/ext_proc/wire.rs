//! The Envoy side of the endpoint picker, free of I/O: reading an ext_proc request's headers and subset hint, and
//! building the `ProcessingResponse`s the Gateway API Inference Extension's endpoint-picker protocol defines
//! (`docs/proposals/004-endpoint-picker-protocol` upstream): the destination as the `x-gateway-destination-endpoint`
//! request header and as dynamic metadata `envoy.lb` / `x-gateway-destination-endpoint`, the (possibly rewritten) body
//! as streamed body mutations, and errors as `ImmediateResponse`s.

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue as EnvoyHeader, HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders,
    ImmediateResponse, ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation,
    processing_response::Response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

/// The header (and metadata key) naming the picked endpoints, `ip:port[,ip:port..]`: primary first, then fallbacks.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// The dynamic-metadata namespace of [`DESTINATION`].
pub const NAMESPACE: &str = "envoy.lb";
/// The filter-metadata namespace of the data plane's subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// The subset hint's key: the endpoints (`ip:port`) the pick must come from.
pub const SUBSET: &str = "x-gateway-destination-endpoint-subset";
/// Largest streamed body chunk sent back (some Envoy builds cap a chunk at 64 KiB; upstream's EPP uses 62 000).
pub const BODY_CHUNK: usize = 62_000;

/// The request line and headers of an ext_proc `request_headers` message.
#[derive(Debug, Default)]
pub struct Head {
    /// `:method`.
    pub method: String,
    /// `:path` without its query.
    pub path: String,
    /// The regular headers (pseudo-headers and invalid names or values dropped).
    pub headers: HeaderMap,
}

/// A header's bytes: Envoy sends `raw_value` (newer) or `value` (older).
fn bytes_of(h: &EnvoyHeader) -> &[u8] {
    if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    }
}

/// Reads the request line and headers.
pub fn head(h: &HttpHeaders) -> Head {
    let mut out = Head::default();
    for e in h.headers.iter().flat_map(|m| &m.headers) {
        let v = bytes_of(e);
        match e.key.as_str() {
            ":method" => out.method = String::from_utf8_lossy(v).into_owned(),
            ":path" => {
                let p = String::from_utf8_lossy(v);
                out.path = p.split('?').next().unwrap_or_default().to_string();
            }
            k if k.starts_with(':') => {}
            k => {
                if let (Ok(n), Ok(v)) = (HeaderName::try_from(k), HeaderValue::from_bytes(v)) {
                    out.headers.append(n, v);
                }
            }
        }
    }
    out
}

/// `:status` of a `response_headers` message.
pub fn status(h: &HttpHeaders) -> Option<u16> {
    let e = h
        .headers
        .iter()
        .flat_map(|m| &m.headers)
        .find(|e| e.key == ":status")?;
    std::str::from_utf8(bytes_of(e)).ok()?.trim().parse().ok()
}

/// `Retry-After` of a `response_headers` message.
pub fn retry_after(h: &HttpHeaders) -> Option<HeaderValue> {
    let e = h
        .headers
        .iter()
        .flat_map(|m| &m.headers)
        .find(|e| e.key == "retry-after")?;
    HeaderValue::from_bytes(bytes_of(e)).ok()
}

/// Whether a `response_headers` message announces an SSE stream.
pub fn is_event_stream(h: &HttpHeaders) -> bool {
    h.headers
        .iter()
        .flat_map(|m| &m.headers)
        .any(|e| e.key == "content-type" && bytes_of(e).starts_with(b"text/event-stream"))
}

/// The data plane's subset hint, when it sent one: a list of `ip:port` strings (a comma-separated string is
/// accepted too).
pub fn subset(md: Option<&Metadata>) -> Option<Vec<String>> {
    let v = md?
        .filter_metadata
        .get(SUBSET_NAMESPACE)?
        .fields
        .get(SUBSET)?;
    let mut out = Vec::new();
    match &v.kind {
        Some(Kind::ListValue(l)) => {
            for x in &l.values {
                if let Some(Kind::StringValue(s)) = &x.kind {
                    out.push(s.trim().to_string());
                }
            }
        }
        Some(Kind::StringValue(s)) => {
            out.extend(s.split(',').map(|s| s.trim().to_string()));
        }
        _ => {}
    }
    out.retain(|s| !s.is_empty());
    Some(out)
}

fn header(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(EnvoyHeader {
            key: key.to_string(),
            raw_value: value.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `envoy.lb` / `x-gateway-destination-endpoint` = `destination`.
fn metadata(destination: &str) -> Struct {
    let inner = Struct {
        fields: [(
            DESTINATION.to_string(),
            Value {
                kind: Some(Kind::StringValue(destination.to_string())),
            },
        )]
        .into(),
    };
    Struct {
        fields: [(
            NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

/// The answer to the request headers once the pick is made: `destination` (`ip:port[,..]`) as header and metadata,
/// plus the other header edits (`set`, `remove`); the route cache is cleared so the destination is routed on.
pub fn routed(destination: &str, set: &[(&str, &[u8])], remove: &[&str]) -> ProcessingResponse {
    let mut set_headers = vec![header(DESTINATION, destination.as_bytes())];
    set_headers.extend(set.iter().map(|(k, v)| header(k, v)));
    ProcessingResponse {
        response: Some(Response::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse {
                clear_route_cache: true,
                header_mutation: Some(HeaderMutation {
                    set_headers,
                    remove_headers: remove.iter().map(|s| s.to_string()).collect(),
                }),
                ..Default::default()
            }),
        })),
        dynamic_metadata: Some(metadata(destination)),
        ..Default::default()
    }
}

/// `body` as streamed body mutations of at most [`BODY_CHUNK`] bytes each, the last one ending the stream when `eos`
/// (the request body when `request`, else the response body). An empty body is one empty chunk.
pub fn body(body: &[u8], eos: bool, request: bool) -> Vec<ProcessingResponse> {
    let mut chunks: Vec<&[u8]> = body.chunks(BODY_CHUNK).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let r = BodyResponse {
                response: Some(CommonResponse {
                    body_mutation: Some(BodyMutation {
                        mutation: Some(body_mutation::Mutation::StreamedResponse(
                            StreamedBodyResponse {
                                body: c.to_vec(),
                                end_of_stream: eos && i + 1 == n,
                                ..Default::default()
                            },
                        )),
                    }),
                    ..Default::default()
                }),
            };
            ProcessingResponse {
                response: Some(if request {
                    Response::RequestBody(r)
                } else {
                    Response::ResponseBody(r)
                }),
                ..Default::default()
            }
        })
        .collect()
}

/// Headers (of the response, or trailers of either side) passed on unchanged.
pub fn pass_response_headers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseHeaders(HeadersResponse::default())),
        ..Default::default()
    }
}

/// Trailers passed on unchanged.
pub fn pass_trailers(request: bool) -> ProcessingResponse {
    let t = TrailersResponse::default();
    ProcessingResponse {
        response: Some(if request {
            Response::RequestTrailers(t)
        } else {
            Response::ResponseTrailers(t)
        }),
        ..Default::default()
    }
}

/// A locally generated answer (`status`, `headers`, `body`) instead of proxying.
pub fn immediate(status: u16, headers: &HeaderMap, body: Bytes) -> ProcessingResponse {
    let set_headers = headers
        .iter()
        .map(|(k, v)| header(k.as_str(), v.as_bytes()))
        .collect();
    ProcessingResponse {
        response: Some(Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers: Some(HeaderMutation {
                set_headers,
                remove_headers: Vec::new(),
            }),
            body: body.to_vec(),
            details: "weir_endpoint_picker".to_string(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::HeaderMap as EnvoyHeaders;
    use envoy_types::pb::google::protobuf::ListValue;

    use super::*;

    fn headers(kv: &[(&str, &str)]) -> HttpHeaders {
        HttpHeaders {
            headers: Some(EnvoyHeaders {
                headers: kv
                    .iter()
                    .enumerate()
                    .map(|(i, (k, v))| EnvoyHeader {
                        key: k.to_string(),
                        // Both encodings Envoy uses.
                        value: if i % 2 == 0 {
                            v.to_string()
                        } else {
                            String::new()
                        },
                        raw_value: if i % 2 == 0 {
                            Vec::new()
                        } else {
                            v.as_bytes().to_vec()
                        },
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_head_splits_pseudo_headers_from_regular_ones() {
        let h = headers(&[
            (":method", "POST"),
            (":path", "/v1/completions?x=1"),
            ("authorization", "Bearer k"),
            ("bad name", "x"),
        ]);
        let hd = head(&h);
        assert_eq!(
            (hd.method.as_str(), hd.path.as_str()),
            ("POST", "/v1/completions")
        );
        assert_eq!(hd.headers.len(), 1);
        assert_eq!(hd.headers["authorization"], "Bearer k");
        let r = headers(&[(":status", "503"), ("content-type", "text/event-stream")]);
        assert_eq!(status(&r), Some(503));
        assert!(is_event_stream(&r));
    }

    #[test]
    fn the_subset_hint_is_read_from_its_namespace() {
        let s = |v: Value| Metadata {
            filter_metadata: [(
                SUBSET_NAMESPACE.to_string(),
                Struct {
                    fields: [(SUBSET.to_string(), v)].into(),
                },
            )]
            .into(),
            ..Default::default()
        };
        let list = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: ["10.0.0.1:8000", "10.0.0.2:8000"]
                    .iter()
                    .map(|x| Value {
                        kind: Some(Kind::StringValue(x.to_string())),
                    })
                    .collect(),
            })),
        };
        assert_eq!(
            subset(Some(&s(list))).unwrap(),
            ["10.0.0.1:8000", "10.0.0.2:8000"]
        );
        let text = Value {
            kind: Some(Kind::StringValue("10.0.0.3:8000, ".into())),
        };
        assert_eq!(subset(Some(&s(text))).unwrap(), ["10.0.0.3:8000"]);
        assert_eq!(subset(Some(&Metadata::default())), None);
        assert_eq!(subset(None), None);
    }

    #[test]
    fn bodies_are_chunked_with_the_end_on_the_last_chunk() {
        let b = vec![b'x'; BODY_CHUNK * 2 + 1];
        let out = body(&b, true, true);
        assert_eq!(out.len(), 3);
        let eos: Vec<bool> = out
            .iter()
            .map(|r| match &r.response {
                Some(Response::RequestBody(BodyResponse {
                    response:
                        Some(CommonResponse {
                            body_mutation:
                                Some(BodyMutation {
                                    mutation: Some(body_mutation::Mutation::StreamedResponse(s)),
                                }),
                            ..
                        }),
                })) => s.end_of_stream,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(eos, [false, false, true]);
        assert_eq!(body(&[], true, false).len(), 1);
    }
}
