//! KV-event subscription shell: keeps a [`PreciseIndex`] in step with every pod's vLLM KV events over ZeroMQ.
//!
//! One tokio task per pod owns a SUB socket connected to the pod's publisher (`tcp://<pod>:5557`), subscribed to the
//! topic prefix `kv@` (llm-d's `kv@<ip>:<port>@<model>`). Each message is `[topic, seq (u64 BE), msgpack batch]`,
//! decoded with `policies::kv_events`. The pure index classifies `seq`: in order -> apply; a gap (missed batches, or
//! a first message with `seq > 0` because we joined late) -> fetch `from..seq` from the pod's replay ROUTER socket
//! with a DEALER (`["", start_seq]` -> `["", seq, payload]`* then `seq = u64::MAX`), apply those in order, then the
//! current batch; a sequence that goes back (the publisher restarted) -> the index drops the pod's blocks first. A
//! failed replay is logged and counted, and the live batch is applied anyway (the index is then missing blocks until
//! they are stored again). No decision arithmetic here: that is `policies::prefix`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use policies::endpoint::EndpointId;
use policies::kv_events::{KvEventBatch, decode_batch};
use policies::prefix::{PodSlot, PreciseIndex, SeqCheck};
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

/// Shell knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvIndexerConfig {
    /// SUB topic prefix.
    pub topic_prefix: String,
    /// Give up on a replay after this long.
    pub replay_timeout: Duration,
    /// Wait before reconnecting a failed subscription.
    pub reconnect_delay: Duration,
}

impl Default for KvIndexerConfig {
    fn default() -> Self {
        Self {
            topic_prefix: "kv@".into(),
            replay_timeout: Duration::from_secs(2),
            reconnect_delay: Duration::from_secs(1),
        }
    }
}

/// Where one pod publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvents {
    pub id: EndpointId,
    /// Model the pod serves (seeds block 0's key).
    pub model: String,
    /// PUB endpoint, e.g. `tcp://10.0.0.7:5557`.
    pub publisher: String,
    /// Replay ROUTER endpoint, e.g. `tcp://10.0.0.7:5558`, if the pod runs one.
    pub replay: Option<String>,
}

/// Shell counters (the index has its own [`policies::prefix::PreciseStats`]).
#[derive(Debug, Default)]
pub struct ShellStats {
    /// Batches applied (live and replayed).
    pub batches: AtomicU64,
    /// Messages that were not `[topic, seq, payload]` or did not decode.
    pub bad_messages: AtomicU64,
    /// Batches recovered through replay.
    pub replayed: AtomicU64,
    /// Gaps that could not be filled.
    pub replay_failures: AtomicU64,
}

/// Owns the per-pod subscription tasks.
#[derive(Debug)]
pub struct KvIndexer {
    index: Arc<RwLock<PreciseIndex>>,
    cfg: KvIndexerConfig,
    tasks: Mutex<HashMap<EndpointId, (PodEvents, JoinHandle<()>)>>,
    stats: Arc<ShellStats>,
}

impl KvIndexer {
    pub fn new(index: Arc<RwLock<PreciseIndex>>, cfg: KvIndexerConfig) -> Self {
        Self {
            index,
            cfg,
            tasks: Mutex::new(HashMap::new()),
            stats: Arc::new(ShellStats::default()),
        }
    }

    pub fn index(&self) -> &Arc<RwLock<PreciseIndex>> {
        &self.index
    }

    pub fn stats(&self) -> &ShellStats {
        &self.stats
    }

    /// Starts following a pod (must be called inside a tokio runtime). A pod already followed with the same
    /// endpoints is left alone; changed endpoints (a restarted pod) restart the subscription from an empty index.
    pub fn watch(&self, pod: PodEvents) {
        let mut tasks = self.tasks.lock();
        if let Some((old, _)) = tasks.get(&pod.id)
            && *old == pod
        {
            return;
        }
        if let Some((_, h)) = tasks.remove(&pod.id) {
            h.abort();
            self.index.write().remove_pod(&pod.id);
        }
        let slot = self.index.write().add_pod(&pod.id, &pod.model);
        let task = tokio::spawn(follow(
            Arc::clone(&self.index),
            slot,
            pod.clone(),
            self.cfg.clone(),
            Arc::clone(&self.stats),
        ));
        tasks.insert(pod.id.clone(), (pod, task));
    }

    /// Stops following a pod and forgets its blocks.
    pub fn unwatch(&self, id: &EndpointId) {
        if let Some((_, h)) = self.tasks.lock().remove(id) {
            h.abort();
        }
        self.index.write().remove_pod(id);
    }

    /// Makes the followed set equal `pods` (call on every discovery change).
    pub fn sync(&self, pods: &[PodEvents]) {
        let gone: Vec<EndpointId> = self
            .tasks
            .lock()
            .keys()
            .filter(|id| !pods.iter().any(|p| &p.id == *id))
            .cloned()
            .collect();
        for id in gone {
            self.unwatch(&id);
        }
        for p in pods {
            self.watch(p.clone());
        }
    }

    /// Purges expired speculative entries every `every` until the returned task is aborted.
    pub fn spawn_expiry(&self, every: Duration) -> JoinHandle<()> {
        let index = Arc::clone(&self.index);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                index.write().expire(tokio::time::Instant::now().into_std());
            }
        })
    }
}

impl Drop for KvIndexer {
    fn drop(&mut self) {
        for (_, (_, h)) in self.tasks.lock().drain() {
            h.abort();
        }
    }
}

/// One pod's subscription loop; reconnects after errors.
async fn follow(
    index: Arc<RwLock<PreciseIndex>>,
    slot: PodSlot,
    pod: PodEvents,
    cfg: KvIndexerConfig,
    stats: Arc<ShellStats>,
) {
    loop {
        if let Err(e) = subscribe_and_apply(&index, slot, &pod, &cfg, &stats).await {
            tracing::warn!(pod = %pod.id, error = %e, "kv events: subscription failed; reconnecting");
        }
        tokio::time::sleep(cfg.reconnect_delay).await;
    }
}

async fn subscribe_and_apply(
    index: &RwLock<PreciseIndex>,
    slot: PodSlot,
    pod: &PodEvents,
    cfg: &KvIndexerConfig,
    stats: &ShellStats,
) -> Result<(), zeromq::ZmqError> {
    let mut sub = zeromq::SubSocket::new();
    sub.connect(&pod.publisher).await?;
    sub.subscribe(&cfg.topic_prefix).await?;
    loop {
        let frames = sub.recv().await?.into_vec();
        let Some((seq, batch)) = parse_live(&frames) else {
            stats.bad_messages.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(pod = %pod.id, frames = frames.len(), "kv events: bad message");
            continue;
        };
        let check = index.write().check_seq(slot, seq);
        let mut replayed = Vec::new();
        if let SeqCheck::Gap { from } = check {
            match &pod.replay {
                Some(ep) => {
                    match tokio::time::timeout(cfg.replay_timeout, replay(ep, from)).await {
                        Ok(Ok(v)) => replayed = v,
                        Ok(Err(e)) => {
                            stats.replay_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(pod = %pod.id, from, error = %e, "kv events: replay failed");
                        }
                        Err(_) => {
                            stats.replay_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(pod = %pod.id, from, "kv events: replay timed out");
                        }
                    }
                }
                None => {
                    stats.replay_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            replayed.retain(|(s, _)| *s >= from && *s < seq);
        }
        let mut ix = index.write();
        for (s, b) in &replayed {
            ix.apply_batch(slot, *s, b);
        }
        ix.apply_batch(slot, seq, &batch);
        drop(ix);
        stats
            .replayed
            .fetch_add(replayed.len() as u64, Ordering::Relaxed);
        stats
            .batches
            .fetch_add(1 + replayed.len() as u64, Ordering::Relaxed);
    }
}

/// `[topic, seq, payload]` -> (seq, batch).
fn parse_live(frames: &[Bytes]) -> Option<(u64, KvEventBatch)> {
    let [_topic, seq, payload] = frames else {
        return None;
    };
    let seq = u64::from_be_bytes(<[u8; 8]>::try_from(seq.as_ref()).ok()?);
    Some((seq, decode_batch(payload).ok()?))
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("zmq: {0}")]
    Zmq(#[from] zeromq::ZmqError),
    #[error("malformed replay frame")]
    Malformed,
}

/// Asks the pod's replay socket for every buffered batch with `seq >= from`.
async fn replay(endpoint: &str, from: u64) -> Result<Vec<(u64, KvEventBatch)>, ReplayError> {
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(endpoint).await?;
    let req = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&from.to_be_bytes()),
    ])
    .map_err(|_| ReplayError::Malformed)?;
    dealer.send(req).await?;
    let mut out = Vec::new();
    loop {
        let frames = dealer.recv().await?.into_vec();
        // DEALER sees `["", seq, payload]` (the ROUTER's identity frame is stripped).
        let (seq, payload) = match frames.as_slice() {
            [_empty, seq, payload] => (seq, payload),
            [seq, payload] => (seq, payload),
            _ => return Err(ReplayError::Malformed),
        };
        let seq = u64::from_be_bytes(
            <[u8; 8]>::try_from(seq.as_ref()).map_err(|_| ReplayError::Malformed)?,
        );
        if seq == u64::MAX {
            return Ok(out);
        }
        match decode_batch(payload) {
            Ok(b) => out.push((seq, b)),
            Err(e) => tracing::debug!(seq, error = %e, "kv events: undecodable replayed batch"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policies::blocks::PrefixHasher;
    use policies::kv_events::{KvCacheEvent, encode_batch};
    use policies::prefix::{PreciseConfig, PrefixMatches};
    use sim::engine::{Engine, EngineConfig, EngineRequest, ReqId};
    use sim::profile::Profile;

    fn tiny_engine(blocks: u32, seed: u64) -> Engine {
        let mut p = Profile::resolve("h100", "llama-3.1-8b").unwrap();
        p.num_gpu_blocks = blocks;
        p.max_model_len = (blocks - 1) * 16;
        p.max_num_batched_tokens = 256;
        p.max_num_seqs = 8;
        let mut c = EngineConfig::new(p);
        c.jitter = 0.0;
        c.seed = seed;
        Engine::new(c)
    }

    /// A pod as the index sees it: an engine plus its publisher's sequence counter.
    struct Pod {
        engine: Engine,
        seq: u64,
        slot: PodSlot,
    }

    /// Runs the engine until idle, pushing every step's events through msgpack into the index.
    fn drain(pod: &mut Pod, ix: &mut PreciseIndex, mut now: f64) -> f64 {
        for _ in 0..100_000 {
            if !pod.engine.has_work() {
                match pod.engine.next_wakeup() {
                    Some(t) if pod.engine.num_requests() > 0 => now = now.max(t),
                    _ => break,
                }
            }
            let out = pod.engine.step(now);
            now += out.duration;
            let mut events: Vec<KvCacheEvent> = pod
                .engine
                .drain_kv_events()
                .into_iter()
                .map(sim::driver::to_wire)
                .collect();
            events.extend(out.kv_events.into_iter().map(sim::driver::to_wire));
            if events.is_empty() {
                continue;
            }
            let wire = encode_batch(&KvEventBatch {
                ts: now,
                events,
                data_parallel_rank: Some(0),
            });
            let batch = decode_batch(&wire).unwrap();
            assert_eq!(ix.check_seq(pod.slot, pod.seq), SeqCheck::InOrder);
            ix.apply_batch(pod.slot, pod.seq, &batch);
            pod.seq += 1;
        }
        now
    }

    fn assert_matches_engine(pod: &Pod, ix: &PreciseIndex, prompts: &[Vec<u32>]) {
        let cached: Vec<u64> = pod.engine.cached_block_hashes().into_iter().collect();
        assert_eq!(ix.engine_hashes(pod.slot), cached);
        let hasher = PrefixHasher::new("llama-3.1-8b", None, 16);
        let mut m = PrefixMatches::default();
        #[allow(clippy::disallowed_methods)]
        let now = std::time::Instant::now();
        for p in prompts {
            ix.lookup(&hasher.block_hashes(p), now, &mut m);
            let cap = (p.len() as u32 - 1) / 16;
            assert_eq!(
                m.get(Some(pod.slot)).min(cap) * 16,
                pod.engine.peek_prefix_hit(p, None, None),
                "prompt of {}",
                p.len()
            );
        }
    }

    #[test]
    fn precise_index_equals_the_engines_cached_blocks_through_evictions_and_a_restart() {
        let mut ix = PreciseIndex::new(PreciseConfig {
            max_entries: 1_000_000,
            ..PreciseConfig::default()
        });
        let mut pods: Vec<Pod> = (0..2)
            .map(|i| Pod {
                engine: tiny_engine(40, i),
                seq: 0,
                slot: ix.add_pod(&EndpointId::new(format!("pod-{i}")), "llama-3.1-8b"),
            })
            .collect();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut now = 0.0;
        let mut prompts: Vec<Vec<u32>> = Vec::new();
        let mut id = 0u64;
        for round in 0..6 {
            for _ in 0..10 {
                let base = rnd(5) as u32 * 10_000; // five shared prefixes
                let len = 20 + rnd(90) as u32;
                let prompt: Vec<u32> = (0..len)
                    .map(|k| base + if k < 40 { k } else { k + 1000 * rnd(3) as u32 })
                    .collect();
                let pod = rnd(2) as usize;
                pods[pod]
                    .engine
                    .add_request(
                        EngineRequest::new(ReqId(id), prompt.clone(), 1 + rnd(20) as u32, id),
                        now,
                    )
                    .unwrap();
                id += 1;
                prompts.push(prompt);
            }
            for p in pods.iter_mut() {
                now = drain(p, &mut ix, now);
            }
            for p in &pods {
                assert_matches_engine(p, &ix, &prompts);
            }
            if round == 3 {
                // Pod 1 restarts: a fresh engine whose publisher counts from 0 again.
                pods[1].engine = tiny_engine(40, 99);
                pods[1].seq = 0;
                let before = ix.stats().restarts;
                let p = &mut pods[1];
                p.engine
                    .add_request(
                        EngineRequest::new(ReqId(id), prompts[0].clone(), 2, id),
                        now,
                    )
                    .unwrap();
                id += 1;
                now = drain(p, &mut ix, now);
                assert_eq!(ix.stats().restarts, before + 1);
                assert_matches_engine(&pods[1], &ix, &prompts);
            }
        }
        assert!(
            ix.stats().removed > 0,
            "the 40-block caches must have evicted"
        );
    }

    #[tokio::test]
    async fn follows_a_publisher_and_fills_the_join_gap_from_replay() {
        let cfg = sim::zmq::KvEventsConfig {
            enable_kv_cache_events: true,
            endpoint: "tcp://0.0.0.0:0".into(),
            replay_endpoint: Some("tcp://0.0.0.0:0".into()),
            ..Default::default()
        };
        let (publisher, eps) = sim::zmq::start(&cfg, "kv@127.0.0.1:8000@m".into())
            .await
            .unwrap();
        let hasher = PrefixHasher::new("m", None, 16);
        let stored = |base: u32, engine: u64| {
            let tokens: Vec<u32> = (0..32).map(|k| base + k).collect();
            (
                KvCacheEvent::BlockStored {
                    block_hashes: vec![engine, engine + 1],
                    parent_block_hash: None,
                    token_ids: tokens.clone(),
                    block_size: 16,
                    lora_id: None,
                    medium: Some("GPU".into()),
                    lora_name: None,
                    group_idx: None,
                },
                hasher.block_hashes(&tokens),
            )
        };
        // Published before anyone subscribed: only replay can recover it.
        let (early, early_keys) = stored(0, 100);
        publisher.publish(1.0, vec![early]);

        let index = Arc::new(RwLock::new(PreciseIndex::default()));
        let indexer = KvIndexer::new(Arc::clone(&index), KvIndexerConfig::default());
        let id = EndpointId::new("pod-a");
        indexer.watch(PodEvents {
            id: id.clone(),
            model: "m".into(),
            publisher: eps.publisher.clone(),
            replay: eps.replay.clone(),
        });
        let slot = index.read().slot(&id).unwrap();
        let mut m = PrefixMatches::default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut k = 0u32;
        let late_keys = loop {
            // Keep publishing until the subscription is live (PUB drops messages before it is).
            k += 1;
            let (late, keys) = stored(1_000 * k, 1_000 + 2 * u64::from(k));
            publisher.publish(2.0, vec![late]);
            tokio::time::sleep(Duration::from_millis(20)).await;
            index
                .read()
                .lookup(&keys, tokio::time::Instant::now().into_std(), &mut m);
            if m.get(Some(slot)) == 2 {
                break keys;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "index never caught up"
            );
        };
        assert_eq!(m.get(Some(slot)), 2, "{late_keys:?}");
        let now = tokio::time::Instant::now().into_std();
        index.read().lookup(&early_keys, now, &mut m);
        assert_eq!(
            m.get(Some(slot)),
            2,
            "the pre-subscription batch came back through replay"
        );
        assert!(index.read().stats().gaps >= 1);
        assert!(indexer.stats().replayed.load(Ordering::Relaxed) >= 1);
        indexer.unwatch(&id);
        assert_eq!(index.read().entries(), 0);
    }
}
