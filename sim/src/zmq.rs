//! KV-cache events over ZeroMQ, as vLLM's `ZmqEventPublisher` sends them: a PUB socket and a replay ROUTER socket.
//!
//! Routers with a precise prefix index (llm-d's kv-cache manager, weir's router) subscribe to every pod's events, so
//! the simulator publishes the engine's `BlockStored`/`BlockRemoved`/`AllBlocksCleared` batches exactly as vLLM does:
//! multipart `[topic, seq (u64 big-endian, from 0), msgpack payload]`, one message per engine step with events. The
//! replay socket answers `[id, "", start_seq]` with `[id, "", seq, payload]` for each buffered batch with
//! `seq >= start_seq`, then `[id, "", u64::MAX, ""]`. One tokio task owns both sockets (pure-Rust `zeromq` crate).

use std::collections::VecDeque;

use bytes::Bytes;
use policies::kv_events::{KvCacheEvent, KvEventBatch, encode_batch};
use serde::Deserialize;
use tokio::sync::mpsc;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

/// `--kv-events-config` JSON, field names as vLLM's `KVEventsConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct KvEventsConfig {
    /// Publish at all.
    pub enable_kv_cache_events: bool,
    /// `"zmq"` (or `"null"` to disable).
    pub publisher: String,
    /// PUB endpoint; binds when it contains `*` (vLLM's heuristic), else connects.
    pub endpoint: String,
    /// ROUTER endpoint for replay, if any.
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// High-water mark (accepted for compatibility; the pure-Rust socket drops on slow peers on its own).
    pub hwm: usize,
    /// Topic frame; empty means the sim default `kv@<host>:<port>@<model>`.
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enable_kv_cache_events: false,
            publisher: "zmq".into(),
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            topic: String::new(),
        }
    }
}

impl KvEventsConfig {
    /// Parse the JSON flag value.
    pub fn parse(json: &str) -> Result<Self, String> {
        serde_json::from_str(json).map_err(|e| format!("--kv-events-config: {e}"))
    }

    /// Whether a publisher should run.
    pub fn enabled(&self) -> bool {
        self.enable_kv_cache_events && self.publisher == "zmq"
    }
}

/// Where the sockets ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEndpoints {
    /// PUB endpoint as bound/connected, with the real port (`tcp://127.0.0.1:5557`).
    pub publisher: String,
    /// Replay endpoint with the real port, if any.
    pub replay: Option<String>,
}

/// Sends step batches to the publisher task.
#[derive(Debug, Clone)]
pub struct KvPublisher {
    tx: mpsc::UnboundedSender<KvEventBatch>,
}

impl KvPublisher {
    /// Queue one step's events (no-op for an empty list; vLLM publishes only steps with events).
    pub fn publish(&self, ts: f64, events: Vec<KvCacheEvent>) {
        if events.is_empty() {
            return;
        }
        let _ = self.tx.send(KvEventBatch {
            ts,
            events,
            data_parallel_rank: Some(0),
        });
    }
}

/// `tcp://*:p` -> `tcp://0.0.0.0:p` (the crate cannot bind the `*` wildcard).
fn bindable(ep: &str) -> String {
    ep.replace("tcp://*:", "tcp://0.0.0.0:")
}

/// Report a bound wildcard as loopback so clients on this host can connect to it.
fn reachable(ep: &str) -> String {
    ep.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
}

/// Bind (or connect) the sockets and spawn the publisher task. `topic` is the topic frame.
pub async fn start(
    cfg: &KvEventsConfig,
    topic: String,
) -> Result<(KvPublisher, KvEndpoints), zeromq::ZmqError> {
    let mut publ = zeromq::PubSocket::new();
    let pub_ep = if cfg.endpoint.contains('*')
        || cfg.endpoint.contains("0.0.0.0")
        || cfg.endpoint.starts_with("ipc://")
    {
        reachable(&publ.bind(&bindable(&cfg.endpoint)).await?.to_string())
    } else {
        publ.connect(&cfg.endpoint).await?;
        cfg.endpoint.clone()
    };
    let (router, replay_ep) = match &cfg.replay_endpoint {
        Some(ep) => {
            let mut r = zeromq::RouterSocket::new();
            let bound = r.bind(&bindable(ep)).await?;
            (Some(r), Some(reachable(&bound.to_string())))
        }
        None => (None, None),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(
        publ,
        router,
        rx,
        Bytes::from(topic),
        cfg.buffer_steps.max(1),
    ));
    Ok((
        KvPublisher { tx },
        KvEndpoints {
            publisher: pub_ep,
            replay: replay_ep,
        },
    ))
}

async fn run(
    mut publ: zeromq::PubSocket,
    mut router: Option<zeromq::RouterSocket>,
    mut rx: mpsc::UnboundedReceiver<KvEventBatch>,
    topic: Bytes,
    buffer_steps: usize,
) {
    let mut seq: u64 = 0;
    let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::with_capacity(buffer_steps.min(4096));
    loop {
        let replay_req = async {
            match router.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                let payload = Bytes::from(encode_batch(&batch));
                let frames = vec![topic.clone(), Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone()];
                if let Ok(msg) = ZmqMessage::try_from(frames)
                    && let Err(e) = publ.send(msg).await
                {
                    tracing::warn!(error = %e, "kv events: publish failed");
                }
                if buffer.len() == buffer_steps {
                    buffer.pop_front();
                }
                buffer.push_back((seq, payload));
                seq += 1;
            }
            req = replay_req => {
                match req {
                    Ok(msg) => {
                        if let Some(r) = router.as_mut() {
                            serve_replay(r, msg, &buffer).await;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "kv events: replay recv failed"),
                }
            }
        }
    }
}

async fn serve_replay(
    r: &mut zeromq::RouterSocket,
    msg: ZmqMessage,
    buffer: &VecDeque<(u64, Bytes)>,
) {
    let frames = msg.into_vec();
    if frames.len() != 3 {
        tracing::warn!(frames = frames.len(), "kv events: invalid replay request");
        return;
    }
    let id = frames[0].clone();
    let start = match <[u8; 8]>::try_from(frames[2].as_ref()) {
        Ok(b) => u64::from_be_bytes(b),
        Err(_) => {
            tracing::warn!("kv events: replay start_seq is not 8 bytes");
            return;
        }
    };
    let send = |seq: u64, payload: Bytes| {
        ZmqMessage::try_from(vec![
            id.clone(),
            Bytes::new(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ])
    };
    for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
        if let Ok(m) = send(*seq, payload.clone())
            && r.send(m).await.is_err()
        {
            return;
        }
    }
    if let Ok(m) = send(u64::MAX, Bytes::new()) {
        let _ = r.send(m).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_vllm_json() {
        let c = KvEventsConfig::parse(
            r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv"}"#,
        )
        .unwrap();
        assert!(c.enabled());
        assert_eq!(c.buffer_steps, 10_000);
        assert_eq!(c.replay_endpoint.as_deref(), Some("tcp://*:5558"));
        assert!(KvEventsConfig::parse("{").is_err());
    }

    #[tokio::test]
    async fn publishes_and_replays() {
        let cfg = KvEventsConfig {
            enable_kv_cache_events: true,
            endpoint: "tcp://127.0.0.1:0".replace("127.0.0.1", "0.0.0.0"),
            replay_endpoint: Some("tcp://0.0.0.0:0".into()),
            ..Default::default()
        };
        let (p, eps) = start(&cfg, "kv@test".into()).await.unwrap();
        let mut sub = zeromq::SubSocket::new();
        sub.connect(&eps.publisher).await.unwrap();
        sub.subscribe("").await.unwrap();
        // PUB drops messages until the subscription arrives: publish until one is seen.
        let mut got = None;
        for _ in 0..200 {
            p.publish(1.0, vec![KvCacheEvent::AllBlocksCleared]);
            if let Ok(Ok(m)) =
                tokio::time::timeout(std::time::Duration::from_millis(20), sub.recv()).await
            {
                got = Some(m);
                break;
            }
        }
        let m = got.expect("a batch").into_vec();
        assert_eq!(m[0].as_ref(), b"kv@test");
        let d = policies::kv_events::decode_batch(&m[2]).unwrap();
        assert_eq!(d.events, vec![KvCacheEvent::AllBlocksCleared]);

        let mut dealer = zeromq::DealerSocket::new();
        dealer
            .connect(eps.replay.as_deref().unwrap())
            .await
            .unwrap();
        let req = ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&0u64.to_be_bytes()),
        ])
        .unwrap();
        dealer.send(req).await.unwrap();
        let mut seqs = Vec::new();
        loop {
            let f = dealer.recv().await.unwrap().into_vec();
            let seq = u64::from_be_bytes(<[u8; 8]>::try_from(f[1].as_ref()).unwrap());
            if seq == u64::MAX {
                assert!(f[2].is_empty());
                break;
            }
            seqs.push(seq);
        }
        assert_eq!(seqs.first(), Some(&0));
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }
}
