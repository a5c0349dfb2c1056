//! Hostile clients at the real front door ([`crate::app::serve`] on a loopback port, fake vLLM behind it): stalled
//! request heads and bodies are cut off by the configured timeouts, the connection cap holds, valid traffic keeps
//! being answered, and every response carries the security headers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::handler_tests::{OK, PROMPT, err_code, fake, post, send, state};
use crate::shared::AppState;

/// A running `serve` and the means to stop it.
struct Server {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(s: Arc<AppState>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::app::serve(
            listener,
            s,
            async move {
                let _ = stopped.await;
            },
            Duration::from_millis(200),
        ));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// One completion over a fresh connection (`connection: close`); the raw response text.
async fn complete(addr: std::net::SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{PROMPT}",
        PROMPT.len()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    out
}

/// Reads until the server closes the connection (EOF or reset); what it sent.
async fn until_closed(c: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn stalled_connections_are_closed_after_the_header_timeout_while_valid_requests_are_served() {
    let (_f, url) = fake(OK).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\nfront_door: {{header_read_timeout: 1s}}"
    ));
    let server = Server::start(s).await;
    let opened = tokio::time::Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..64 {
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        c.write_all(b"POST /v1/compl").await.unwrap(); // half a request line, then nothing
        stalled.push(c);
    }
    // Valid requests keep being answered while the 64 hold their connections open.
    for _ in 0..5 {
        let r = complete(server.addr).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert!(
        opened.elapsed() < Duration::from_secs(1),
        "the valid requests were answered while every stalled connection was still open"
    );
    // Each stalled connection is closed by the server once the header timeout passed (and not long after).
    let closed = futures::future::join_all(stalled.iter_mut().map(|c| async move {
        tokio::time::timeout(Duration::from_secs(5), until_closed(c))
            .await
            .expect("a stalled connection stayed open");
        tokio::time::Instant::now()
    }))
    .await;
    for at in closed {
        let after = at.duration_since(opened);
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(3),
            "closed after {after:?}"
        );
    }
    let r = complete(server.addr).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_body_gets_408_after_the_body_timeout() {
    let (f, url) = fake(OK).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\nfront_door: {{body_read_timeout: 300ms}}"
    ));
    let server = Server::start(s).await;
    let mut c = TcpStream::connect(server.addr).await.unwrap();
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let t0 = tokio::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    let r = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    let body = &r[r.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(err_code(body), "request_timeout", "{r}");
    assert_eq!(f.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() {
    let (_f, url) = fake(OK).await;
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\nfront_door: {{header_read_timeout: 1s, max_connections: 4}}"
    ));
    let server = Server::start(s).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        c.write_all(b"GET /heal").await.unwrap();
        stalled.push(c);
    }
    let addr = server.addr;
    let fifth = tokio::spawn(async move { complete(addr).await });
    // The fifth is connected (backlog) but not served while four connections hold every place.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!fifth.is_finished(), "served beyond max_connections");
    // Once the stalled ones are closed by the header timeout, it is served.
    let r = tokio::time::timeout(Duration::from_secs(5), fifth)
        .await
        .expect("never served after the cap freed")
        .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    for c in &mut stalled {
        tokio::time::timeout(Duration::from_secs(5), until_closed(c))
            .await
            .unwrap();
    }
    server.stop().await;
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let (_f, url) = fake(OK).await;
    let s = state(&format!("pools: [{{name: m, endpoints: ['{url}']}}]"));
    for req in [
        post("/v1/completions", PROMPT),
        post("/v1/completions", "{not json"),
        Request::get("/v1/models").body(Body::empty()).unwrap(),
        Request::get("/nope").body(Body::empty()).unwrap(),
        Request::get("/v1/completions").body(Body::empty()).unwrap(),
    ] {
        let path = req.uri().to_string();
        let (st, h, _) = send(&s, req).await;
        assert!(st == StatusCode::OK || st.is_client_error(), "{path}: {st}");
        for (name, value) in crate::app::SECURITY_HEADERS {
            assert_eq!(h.get(&name), Some(&value), "{path}: {name}");
        }
        assert_eq!(h["cache-control"], "no-store", "{path}");
    }
}

/// A pod that records the headers of each completion request it gets.
async fn recording_pod() -> (Arc<parking_lot::Mutex<Vec<hyper::HeaderMap>>>, String) {
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let s = seen.clone();
    let r = axum::Router::new().route(
        "/v1/completions",
        axum::routing::post(move |h: hyper::HeaderMap| async move {
            s.lock().push(h);
            axum::Json(
                serde_json::json!({"id":"cmpl-1","object":"text_completion","model":"m",
                "choices":[{"index":0,"text":"hi","finish_reason":"length"}],
                "usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}),
            )
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, r).await.ok() });
    (seen, url)
}

#[tokio::test]
async fn client_credentials_never_reach_the_pods_and_a_pool_key_does() {
    let (keyed, a) = recording_pod().await;
    let (open, b) = recording_pod().await;
    let key = policies::tenant::ApiKeyHash::of("sk-alice").to_hex();
    let s = state(&format!(
        "pools:\n\
         - {{name: a, endpoints: ['{a}'], api_key: pod-secret}}\n\
         - {{name: b, endpoints: ['{b}']}}\n\
         tenants: [{{tenant: alice, identity: {{apiKeys: [{{sha256: '{key}'}}]}}}}]\n\
         admission: {{gate: false}}"
    ));
    for model in ["a", "b"] {
        let mut req = post(
            "/v1/completions",
            &format!(r#"{{"model":"{model}","prompt":"hello","max_tokens":3}}"#),
        );
        let h = req.headers_mut();
        h.insert("authorization", "Bearer sk-alice".parse().unwrap());
        h.insert("x-api-key", "sk-alice".parse().unwrap());
        h.insert("cookie", "session=s3cret".parse().unwrap());
        h.insert("x-session-id", "conv-1".parse().unwrap());
        let (st, _, body) = send(&s, req).await;
        assert_eq!(st, StatusCode::OK, "{model}: {body}");
    }
    let keyed = keyed.lock();
    let open = open.lock();
    assert_eq!((keyed.len(), open.len()), (1, 1));
    assert_eq!(keyed[0]["authorization"], "Bearer pod-secret");
    assert!(!open[0].contains_key("authorization"), "{:?}", open[0]);
    for h in [&keyed[0], &open[0]] {
        assert!(!h.contains_key("x-api-key"), "{h:?}");
        assert!(!h.contains_key("cookie"), "{h:?}");
        assert_eq!(
            h["x-session-id"], "conv-1",
            "other client headers still pass"
        );
    }
}

#[test]
fn a_pool_key_is_validated_and_never_printed() {
    let c = crate::config::RawConfig::from_yaml(
        "pools: [{name: a, endpoints: ['http://127.0.0.1:1'], api_key: pod-secret}]",
    )
    .unwrap()
    .validate()
    .unwrap();
    assert!(!format!("{c:?}").contains("pod-secret"));
    for bad in ["''", "'two words'"] {
        let e = crate::config::RawConfig::from_yaml(&format!(
            "pools: [{{name: a, endpoints: ['http://127.0.0.1:1'], api_key: {bad}}}]"
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("pools[0].api_key"), "{e}");
    }
}

fn chat_of(n: usize) -> String {
    let m = vec![serde_json::json!({"role": "user", "content": "word"}); n];
    serde_json::json!({"model": "m", "messages": m, "max_tokens": 3}).to_string()
}

#[tokio::test]
async fn a_chat_over_the_message_cap_is_refused_before_any_work() {
    let (f, url) = fake(OK).await;
    // The default cap: 50,000 one-word messages (about 1.75 MB, under the body limit) are refused at once.
    let s = state(&format!("pools: [{{name: m, endpoints: ['{url}']}}]"));
    let (st, _, body) = send(&s, post("/v1/chat/completions", &chat_of(50_000))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(err_code(&body), "array_above_max_length");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["param"], "messages");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum length 2048"),
        "{body}"
    );
    // A configured cap: at the cap served, one over refused; the pod saw only the first.
    let s = state(&format!(
        "pools: [{{name: m, endpoints: ['{url}']}}]\nfront_door: {{max_messages: 3}}"
    ));
    let (st, _, body) = send(&s, post("/v1/chat/completions", &chat_of(3))).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, _, body) = send(&s, post("/v1/chat/completions", &chat_of(4))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(f.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}
