//! KV-event subscription shell: keeps a [`PreciseIndex`] in step with every pod's vLLM KV events over ZeroMQ.
//!
//! One tokio task per pod owns a SUB socket connected to the pod's publisher (`tcp://<pod>:5557`), subscribed to the
//! topic prefix `kv@` (llm-d's `kv@<ip>:<port>@<model>`). Each message is `[topic, seq (u64 BE), msgpack batch]`,
//! decoded with `policies::kv_events`. Replays go to the pod's replay ROUTER socket through a DEALER (`["", start_seq]`
//! -> `["", seq, payload]`* then `seq = u64::MAX`).
//!
//! On every new subscription (first connect and every reconnect), once the SUB socket is connected and subscribed,
//! the task replays from the first seq the index still needs (0 for a pod it knows nothing about, last applied + 1
//! on a reconnect) and applies those batches before reading live ones, so a pod whose cache filled before weir
//! subscribed is indexed at once rather than at its next event. Live batches published while the replay ran wait in
//! the SUB socket; those the replay already applied are skipped as duplicates (not taken for a restart). vLLM keeps
//! only the last `buffer_steps` batches: a replay that starts above the requested seq means the older ones are gone,
//! which is logged and counted (`replay_lost`); their blocks stay unknown until stored again.
//!
//! Live batches: the pure index classifies `seq`: in order -> apply; a gap (batches missed, e.g. published between
//! the replay and the subscription taking effect at the publisher) -> replay `from..seq`, apply those in order, then
//! the current batch; a sequence that goes back (the publisher restarted) -> the index drops the pod's blocks first.
//! A failed replay is logged and counted, and the live batch is applied anyway (the index is then missing blocks
//! until they are stored again). A pod without a replay socket is followed from its live batches only. A publisher
//! that restarted while the connection was down is recognised by its first live seq at or below the last applied
//! one (a replay from last + 1 cannot tell it from the old one). No decision arithmetic here: that is
//! `policies::prefix`.
//!
//! Metrics: [`KvMetrics`] is a Prometheus collector that reads each subscription's [`ShellStats`] and the index's
//! per-pod and per-pool numbers when `/metrics` is encoded, so the event path updates nothing beyond its atomics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use policies::endpoint::EndpointId;
use policies::kv_events::{KvEventBatch, decode_batch};
use policies::prefix::{PodSlot, PodStats, PreciseIndex, SeqCheck};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
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

/// One pod subscription's shell counters (the index has its own [`policies::prefix::PreciseStats`] and
/// [`PodStats`]). They start at zero with each [`KvIndexer::watch`] of new endpoints, as the index's pod state does.
#[derive(Debug, Default)]
pub struct ShellStats {
    /// True while the SUB socket is connected and subscribed, so an operator can tell a pod whose publisher is
    /// unreachable (reconnecting every `reconnect_delay`) from one that is merely quiet.
    pub connected: AtomicBool,
    /// Batches applied (live and replayed).
    pub batches: AtomicU64,
    /// Messages that were not `[topic, seq, payload]` or did not decode.
    pub bad_messages: AtomicU64,
    /// Batches recovered through replay.
    pub replayed: AtomicU64,
    /// Replays that failed (error, timeout) and gaps on pods without a replay socket.
    pub replay_failures: AtomicU64,
    /// Batches the index needed that a replay no longer carried: vLLM buffers only the last `buffer_steps` batches,
    /// so a subscription that starts (or a gap that lasts) longer than that loses the older ones.
    pub replay_lost: AtomicU64,
}

/// One followed pod.
#[derive(Debug)]
struct Followed {
    pod: PodEvents,
    task: JoinHandle<()>,
    /// Shared with the task, which updates it; read by [`KvMetrics`] at scrape time.
    stats: Arc<ShellStats>,
}

/// Owns the per-pod subscription tasks.
#[derive(Debug)]
pub struct KvIndexer {
    index: Arc<RwLock<PreciseIndex>>,
    cfg: KvIndexerConfig,
    tasks: Mutex<HashMap<EndpointId, Followed>>,
}

impl KvIndexer {
    pub fn new(index: Arc<RwLock<PreciseIndex>>, cfg: KvIndexerConfig) -> Self {
        Self {
            index,
            cfg,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    pub fn index(&self) -> &Arc<RwLock<PreciseIndex>> {
        &self.index
    }

    /// The shell counters of a followed pod.
    pub fn stats(&self, id: &EndpointId) -> Option<Arc<ShellStats>> {
        self.tasks.lock().get(id).map(|f| Arc::clone(&f.stats))
    }

    /// Every followed pod with its shell counters (the lock is released before the caller reads the index).
    fn followed(&self) -> Vec<(EndpointId, Arc<ShellStats>)> {
        self.tasks
            .lock()
            .iter()
            .map(|(id, f)| (id.clone(), Arc::clone(&f.stats)))
            .collect()
    }

    /// Starts following a pod (must be called inside a tokio runtime). A pod already followed with the same
    /// endpoints is left alone; changed endpoints (a restarted pod) restart the subscription from an empty index.
    pub fn watch(&self, pod: PodEvents) {
        let mut tasks = self.tasks.lock();
        if let Some(old) = tasks.get(&pod.id)
            && old.pod == pod
        {
            return;
        }
        if let Some(old) = tasks.remove(&pod.id) {
            old.task.abort();
            self.index.write().remove_pod(&pod.id);
        }
        let slot = self.index.write().add_pod(&pod.id, &pod.model);
        let stats = Arc::new(ShellStats::default());
        let task = tokio::spawn(follow(
            Arc::clone(&self.index),
            slot,
            pod.clone(),
            self.cfg.clone(),
            Arc::clone(&stats),
        ));
        tasks.insert(pod.id.clone(), Followed { pod, task, stats });
    }

    /// Stops following a pod and forgets its blocks.
    pub fn unwatch(&self, id: &EndpointId) {
        if let Some(f) = self.tasks.lock().remove(id) {
            f.task.abort();
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
        for (_, f) in self.tasks.lock().drain() {
            f.task.abort();
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
        stats.connected.store(false, Ordering::Relaxed);
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
    stats.connected.store(true, Ordering::Relaxed);
    // Catch up before reading live: a pod whose cache filled before this subscription (weir restarted, the pod was
    // discovered late, the connection dropped) may publish nothing more for a long time. Live batches published
    // meanwhile wait in the SUB socket; the index skips those the replay already applied.
    if let Some(ep) = &pod.replay {
        let from = index.write().begin_resync(slot);
        if let Some(batches) = fetch_replay(ep, from, pod, cfg, stats).await {
            apply_replayed(index, slot, pod, from, &batches, None, stats);
        }
    }
    loop {
        let frames = sub.recv().await?.into_vec();
        let Some((seq, batch)) = parse_live(&frames) else {
            stats.bad_messages.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(pod = %pod.id, frames = frames.len(), "kv events: bad message");
            continue;
        };
        let check = index.write().check_seq(slot, seq);
        match check {
            SeqCheck::InOrder => {}
            SeqCheck::Duplicate => continue,
            SeqCheck::Gap { from } => match &pod.replay {
                Some(ep) => {
                    if let Some(batches) = fetch_replay(ep, from, pod, cfg, stats).await {
                        apply_replayed(index, slot, pod, from, &batches, Some(seq), stats);
                    }
                }
                None => {
                    stats.replay_failures.fetch_add(1, Ordering::Relaxed);
                }
            },
        }
        index.write().apply_batch(slot, seq, &batch);
        stats.batches.fetch_add(1, Ordering::Relaxed);
    }
}

/// Replays from `from` under the configured timeout; a failure is logged and counted, and yields `None`.
async fn fetch_replay(
    endpoint: &str,
    from: u64,
    pod: &PodEvents,
    cfg: &KvIndexerConfig,
    stats: &ShellStats,
) -> Option<Vec<(u64, KvEventBatch)>> {
    let err = match tokio::time::timeout(cfg.replay_timeout, replay(endpoint, from)).await {
        Ok(Ok(v)) => return Some(v),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_string(),
    };
    stats.replay_failures.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(pod = %pod.id, from, error = %err, "kv events: replay failed");
    None
}

/// Applies a replay's batches (up to the live seq `until` that revealed a gap, if one did) and accounts for them.
fn apply_replayed(
    index: &RwLock<PreciseIndex>,
    slot: PodSlot,
    pod: &PodEvents,
    from: u64,
    batches: &[(u64, KvEventBatch)],
    until: Option<u64>,
    stats: &ShellStats,
) {
    let out = index
        .write()
        .apply_replay(slot, batches.iter().map(|(s, b)| (*s, b)), until);
    stats.replayed.fetch_add(out.applied, Ordering::Relaxed);
    stats.batches.fetch_add(out.applied, Ordering::Relaxed);
    if out.lost > 0 {
        stats.replay_lost.fetch_add(out.lost, Ordering::Relaxed);
        tracing::warn!(
            pod = %pod.id,
            from,
            lost = out.lost,
            first = batches.first().map(|(s, _)| *s),
            "kv events: the publisher's replay buffer no longer holds batches the index needs; \
             their blocks stay unknown until stored again"
        );
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

/// Exports the precise indexes of the cache-aware pools and their KV-event subscriptions as `weir_kv_events_*` and
/// `weir_kv_index_*`. A [`Collector`]: the numbers are read when `/metrics` is encoded (the shell's atomics, then
/// each index under one read lock, O(pods)), so applying events and routing requests pay nothing for them.
#[derive(Debug, Clone, Default)]
pub struct KvMetrics {
    /// Each precise-mode pool, added when the pool is created.
    pools: Arc<RwLock<Vec<PoolSource>>>,
}

/// A precise-mode pool as [`KvMetrics`] reads it.
#[derive(Debug)]
struct PoolSource {
    /// The `pool` label.
    pool: Arc<str>,
    /// Weak: the metrics must not keep a pool's subscriptions running.
    indexer: Weak<KvIndexer>,
}

/// `{pool}` of the per-index series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: crate::metrics::Name,
}

/// One followed pod's numbers, read at scrape time.
struct PodRow {
    label: crate::metrics::EndpointLabel,
    shell: Arc<ShellStats>,
    /// `None` if the pod left the index between reading the followed set and reading the index.
    index: Option<PodStats>,
}

/// One precise index's numbers, read at scrape time.
struct PoolRow {
    label: PoolLabel,
    heap_bytes: u64,
    max_entries: u64,
    evicted: u64,
    speculative: u64,
}

impl KvMetrics {
    /// Registers the collector under the `weir` prefix; pools are added as they are created ([`Self::add`]).
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self::default();
        reg.sub_registry_with_prefix("weir")
            .register_collector(Box::new(m.clone()));
        m
    }

    /// Exports `indexer`'s index and subscriptions with label `pool`, for as long as the indexer lives.
    pub fn add(&self, pool: &str, indexer: &Arc<KvIndexer>) {
        let mut pools = self.pools.write();
        pools.retain(|p| p.indexer.strong_count() > 0);
        pools.push(PoolSource {
            pool: Arc::from(pool),
            indexer: Arc::downgrade(indexer),
        });
    }

    fn rows(&self) -> (Vec<PodRow>, Vec<PoolRow>) {
        let (mut pods, mut pools) = (Vec::new(), Vec::new());
        for PoolSource { pool, indexer } in self.pools.read().iter() {
            let Some(indexer) = indexer.upgrade() else {
                continue;
            };
            let followed = indexer.followed();
            let ix = indexer.index.read();
            for (id, shell) in followed {
                let index = ix.slot(&id).and_then(|s| ix.pod_stats(s));
                pods.push(PodRow {
                    label: crate::metrics::EndpointLabel {
                        pool: Arc::clone(pool).into(),
                        endpoint: id.0.into(),
                    },
                    shell,
                    index,
                });
            }
            pools.push(PoolRow {
                label: PoolLabel {
                    pool: Arc::clone(pool).into(),
                },
                heap_bytes: ix.heap_bytes() as u64,
                max_entries: ix.config().max_entries as u64,
                evicted: ix.stats().evicted,
                speculative: ix.speculative_entries() as u64,
            });
        }
        (pods, pools)
    }
}

/// A scrape-time row with its label set.
trait Row {
    type Label: EncodeLabelSet;
    fn label(&self) -> &Self::Label;
}

impl Row for PodRow {
    type Label = crate::metrics::EndpointLabel;
    fn label(&self) -> &Self::Label {
        &self.label
    }
}

impl Row for PoolRow {
    type Label = PoolLabel;
    fn label(&self) -> &Self::Label {
        &self.label
    }
}

/// Encodes one family, a series per row with a value (skipped when no row has one, so routers without precise pools
/// show none of these).
fn family<R: Row>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[R],
    value: impl Fn(&R) -> Option<u64>,
) -> Result<(), std::fmt::Error> {
    if rows.iter().all(|r| value(r).is_none()) {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (r, v) in rows.iter().filter_map(|r| Some((r, value(r)?))) {
        let e = m.encode_family(r.label())?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(e)?,
            _ => ConstGauge::new(v).encode(e)?,
        }
    }
    Ok(())
}

impl Collector for KvMetrics {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let (pods, pools) = self.rows();
        let shell = |f: fn(&ShellStats) -> &AtomicU64| {
            move |r: &PodRow| Some(f(&r.shell).load(Ordering::Relaxed))
        };
        let index = |f: fn(&PodStats) -> Option<u64>| move |r: &PodRow| f(r.index.as_ref()?);
        let pool = |f: fn(&PoolRow) -> u64| move |r: &PoolRow| Some(f(r));
        let e = &mut enc;
        family(
            e,
            "kv_events_batches",
            "KV-event batches applied to the precise prefix index, live and replayed",
            Counter,
            &pods,
            shell(|s| &s.batches),
        )?;
        family(
            e,
            "kv_events_replayed_batches",
            "KV-event batches recovered from the pod's replay socket",
            Counter,
            &pods,
            shell(|s| &s.replayed),
        )?;
        family(
            e,
            "kv_events_replay_failures",
            "KV-event replays that failed or timed out, and gaps on pods without a replay socket",
            Counter,
            &pods,
            shell(|s| &s.replay_failures),
        )?;
        family(
            e,
            "kv_events_lost_batches",
            "KV-event batches the index needed that the pod's replay buffer no longer held; their blocks stay unknown until stored again",
            Counter,
            &pods,
            shell(|s| &s.replay_lost),
        )?;
        family(
            e,
            "kv_events_bad_messages",
            "KV-event messages that were not [topic, seq, payload] or did not decode",
            Counter,
            &pods,
            shell(|s| &s.bad_messages),
        )?;
        family(
            e,
            "kv_events_duplicate_batches",
            "Live KV-event batches skipped because the subscription's replay had already applied them",
            Counter,
            &pods,
            index(|s| Some(s.duplicates)),
        )?;
        family(
            e,
            "kv_events_gaps",
            "Gaps in a pod's KV-event sequence numbers (batches missed live, replayed if the pod has a replay socket)",
            Counter,
            &pods,
            index(|s| Some(s.gaps)),
        )?;
        family(
            e,
            "kv_events_publisher_restarts",
            "KV-event publisher restarts detected from sequence numbers going back (the pod's blocks are dropped)",
            Counter,
            &pods,
            index(|s| Some(s.restarts)),
        )?;
        family(
            e,
            "kv_events_connected",
            "1 while the subscription to the pod's KV-event publisher is connected, 0 while it reconnects",
            Gauge,
            &pods,
            |r: &PodRow| Some(u64::from(r.shell.connected.load(Ordering::Relaxed))),
        )?;
        family(
            e,
            "kv_events_last_seq",
            "Sequence number of the last KV-event batch applied from the pod (absent before the first)",
            Gauge,
            &pods,
            index(|s| s.last_seq),
        )?;
        family(
            e,
            "kv_index_blocks",
            "Blocks the precise prefix index holds for the pod, from its KV events (speculative entries excluded)",
            Gauge,
            &pods,
            index(|s| Some(s.blocks)),
        )?;
        family(
            e,
            "kv_index_orphaned_blocks",
            "Stored blocks skipped because their parent was unknown (a missed event) or the event was malformed",
            Counter,
            &pods,
            index(|s| Some(s.orphaned)),
        )?;
        family(
            e,
            "kv_index_memory_bytes",
            "Heap bytes of the precise prefix index's block tables (speculative entries excluded)",
            Gauge,
            &pools,
            pool(|p| p.heap_bytes),
        )?;
        family(
            e,
            "kv_index_max_blocks",
            "Cap on the precise prefix index's (pod, block) entries; past it the least recently stored are evicted",
            Gauge,
            &pools,
            pool(|p| p.max_entries),
        )?;
        family(
            e,
            "kv_index_evicted_blocks",
            "Blocks evicted from the precise prefix index by its cap",
            Counter,
            &pools,
            pool(|p| p.evicted),
        )?;
        family(
            e,
            "kv_index_speculative_blocks",
            "Speculative entries of the precise prefix index (recorded at pick time until the pod's events confirm them), expired ones not yet purged included",
            Gauge,
            &pools,
            pool(|p| p.speculative),
        )
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

    /// A `BlockStored` of two root-chained blocks over tokens `base..base + 32` (engine hashes `engine`,
    /// `engine + 1`) and the weir keys a request over those tokens looks up.
    fn two_blocks(base: u32, engine: u64) -> (KvCacheEvent, Vec<u64>) {
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
            PrefixHasher::new("m", None, 16).block_hashes(&tokens),
        )
    }

    /// Polls until `done` holds for the index (the subscription task runs on its own).
    async fn until(index: &RwLock<PreciseIndex>, what: &str, done: impl Fn(&PreciseIndex) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done(&index.read()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_pod_whose_cache_filled_before_the_subscription_is_indexed_without_new_events() {
        let cfg = sim::zmq::KvEventsConfig {
            enable_kv_cache_events: true,
            endpoint: "tcp://0.0.0.0:0".into(),
            replay_endpoint: Some("tcp://0.0.0.0:0".into()),
            ..Default::default()
        };
        let (publisher, eps) = sim::zmq::start(&cfg, "kv@127.0.0.1:8000@m".into())
            .await
            .unwrap();
        // Published before anyone subscribed (the PUB socket drops them): only a replay can bring them back.
        let mut keys = Vec::new();
        for k in 0..3u32 {
            let (ev, kk) = two_blocks(1_000 * k, 100 + 2 * u64::from(k));
            publisher.publish(1.0, vec![ev]);
            keys.push(kk);
        }
        // Wait until the publisher task has buffered all three (its queue is served alongside replay requests).
        let replay_ep = eps.replay.clone().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while replay(&replay_ep, 0).await.unwrap().len() < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "publisher never buffered"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

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
        // Nothing more is published: the subscription's own replay must index the pod's cache.
        until(&index, "the pre-subscription batches", |ix| {
            ix.entries() == 6
        })
        .await;
        let mut m = PrefixMatches::default();
        for kk in &keys {
            index
                .read()
                .lookup(kk, tokio::time::Instant::now().into_std(), &mut m);
            assert_eq!(m.get(Some(slot)), 2);
        }
        assert_eq!(index.read().next_seq(slot), 3);
        let st = indexer.stats(&id).unwrap();
        assert_eq!(st.replayed.load(Ordering::Relaxed), 3);
        assert_eq!(index.read().stats().gaps, 0, "no live event was needed");
        indexer.unwatch(&id);
        assert_eq!(index.read().entries(), 0);
    }

    /// A scripted vLLM publisher: the test decides what goes out live and what each replay answers.
    struct FakePublisher {
        publ: zeromq::PubSocket,
        router: zeromq::RouterSocket,
        pod: PodEvents,
    }

    impl FakePublisher {
        async fn start() -> Self {
            let mut publ = zeromq::PubSocket::new();
            let publisher = publ.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
            let mut router = zeromq::RouterSocket::new();
            let replay = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
            let pod = PodEvents {
                id: EndpointId::new("pod-f"),
                model: "m".into(),
                publisher,
                replay: Some(replay),
            };
            Self { publ, router, pod }
        }

        async fn publish(&mut self, seq: u64, batch: &KvEventBatch) {
            let msg = ZmqMessage::try_from(vec![
                Bytes::from_static(b"kv@127.0.0.1:8000@m"),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                Bytes::from(encode_batch(batch)),
            ])
            .unwrap();
            self.publ.send(msg).await.unwrap();
        }

        /// Waits for a replay request: (peer identity, start seq).
        async fn replay_request(&mut self) -> (Bytes, u64) {
            let f = tokio::time::timeout(Duration::from_secs(10), self.router.recv())
                .await
                .expect("a replay request")
                .unwrap()
                .into_vec();
            (
                f[0].clone(),
                u64::from_be_bytes(<[u8; 8]>::try_from(f[2].as_ref()).unwrap()),
            )
        }

        async fn answer(&mut self, peer: &Bytes, batches: &[(u64, KvEventBatch)]) {
            let frames = batches
                .iter()
                .map(|(s, b)| (*s, Bytes::from(encode_batch(b))))
                .chain([(u64::MAX, Bytes::new())]);
            for (seq, payload) in frames {
                let msg = ZmqMessage::try_from(vec![
                    peer.clone(),
                    Bytes::new(),
                    Bytes::copy_from_slice(&seq.to_be_bytes()),
                    payload,
                ])
                .unwrap();
                self.router.send(msg).await.unwrap();
            }
        }
    }

    /// Batch `seq` of the fake publisher: two blocks of its own.
    fn fake_batch(seq: u64) -> KvEventBatch {
        KvEventBatch {
            ts: 1.0,
            events: vec![two_blocks(1_000 * seq as u32, 100 + 2 * seq).0],
            data_parallel_rank: Some(0),
        }
    }

    /// The registry's text exposition, as `/metrics` serves it.
    fn exposition(reg: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, reg).unwrap();
        s
    }

    /// Polls until the exposition holds every line of `want` (counters are bumped just after the index changes).
    async fn until_exposed(reg: &Registry, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = exposition(reg);
            let missing: Vec<&&str> = want
                .iter()
                .filter(|w| !text.lines().any(|l| l == **w))
                .collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "missing {missing:?} in\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn live_copies_of_replayed_batches_are_skipped_and_gaps_and_restarts_still_handled() {
        let mut f = FakePublisher::start().await;
        let index = Arc::new(RwLock::new(PreciseIndex::default()));
        let mut reg = Registry::default();
        let metrics = KvMetrics::register(&mut reg);
        let indexer = Arc::new(KvIndexer::new(
            Arc::clone(&index),
            KvIndexerConfig::default(),
        ));
        metrics.add("pool-f", &indexer);
        indexer.watch(f.pod.clone());
        let slot = index.read().slot(&f.pod.id).unwrap();
        let (peer, from) = f.replay_request().await;
        assert_eq!(
            from, 0,
            "a pod the index knows nothing about is replayed from the start"
        );
        // The SUB socket connected and subscribed before the replay request was sent; leave the PUB side a moment to
        // register the subscription, then publish 0..=2 live while the replay is still pending, and answer it with
        // the same batches: each must be applied once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for s in 0..3 {
            f.publish(s, &fake_batch(s)).await;
        }
        let replayed: Vec<(u64, KvEventBatch)> = (0..3).map(|s| (s, fake_batch(s))).collect();
        f.answer(&peer, &replayed).await;
        f.publish(3, &fake_batch(3)).await;
        until(&index, "seq 3", |ix| ix.next_seq(slot) == 4).await;
        let want: Vec<u64> = (100..108).collect();
        assert_eq!(index.read().engine_hashes(slot), want);
        let st = index.read().stats();
        assert_eq!(
            (st.stored, st.duplicates, st.restarts, st.gaps),
            (8, 3, 0, 0)
        );

        // Seq 4 never arrives live: seq 5 reveals the gap, which is replayed from 4.
        f.publish(5, &fake_batch(5)).await;
        let (peer, from) = f.replay_request().await;
        assert_eq!(from, 4);
        f.answer(&peer, &[(4, fake_batch(4)), (5, fake_batch(5))])
            .await;
        until(&index, "seq 5", |ix| ix.next_seq(slot) == 6).await;
        let want: Vec<u64> = (100..112).collect();
        assert_eq!(index.read().engine_hashes(slot), want);
        assert_eq!(
            index.read().stats().stored,
            12,
            "seq 5 came both replayed and live, applied once"
        );

        // The publisher restarts: seq 0 again drops what the pod held.
        f.publish(0, &fake_batch(7)).await;
        until(&index, "the restart", |ix| ix.stats().restarts == 1).await;
        assert_eq!(index.read().engine_hashes(slot), vec![114, 115]);

        // /metrics tells the same story per pod: 3 + 1 replayed and 3 live batches applied (live 0..=2 were the
        // replay's duplicates), one gap, one restart, the restarted publisher's seq 0 with its 2 blocks.
        let l = r#"{pool="pool-f",endpoint="pod-f"}"#;
        let pool = r#"{pool="pool-f"}"#;
        until_exposed(
            &reg,
            &[
                &format!("weir_kv_events_batches_total{l} 7"),
                &format!("weir_kv_events_replayed_batches_total{l} 4"),
                &format!("weir_kv_events_replay_failures_total{l} 0"),
                &format!("weir_kv_events_lost_batches_total{l} 0"),
                &format!("weir_kv_events_bad_messages_total{l} 0"),
                &format!("weir_kv_events_duplicate_batches_total{l} 3"),
                &format!("weir_kv_events_gaps_total{l} 1"),
                &format!("weir_kv_events_publisher_restarts_total{l} 1"),
                &format!("weir_kv_events_connected{l} 1"),
                &format!("weir_kv_events_last_seq{l} 0"),
                &format!("weir_kv_index_blocks{l} 2"),
                &format!("weir_kv_index_orphaned_blocks_total{l} 0"),
                &format!("weir_kv_index_evicted_blocks_total{pool} 0"),
                &format!(
                    "weir_kv_index_max_blocks{pool} {}",
                    policies::prefix::DEFAULT_MAX_ENTRIES
                ),
                "# TYPE weir_kv_events_batches counter",
                "# TYPE weir_kv_index_blocks gauge",
            ],
        )
        .await;
        let text = exposition(&reg);
        let bytes: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("weir_kv_index_memory_bytes{pool} ")))
            .unwrap_or_else(|| panic!("no memory gauge in\n{text}"))
            .parse()
            .unwrap();
        assert_eq!(bytes, index.read().heap_bytes() as u64);
        assert!(bytes > 0);

        // A pod whose publisher cannot be reached is followed but not connected, and has applied nothing.
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        indexer.watch(PodEvents {
            id: EndpointId::new("pod-dead"),
            model: "m".into(),
            publisher: format!("tcp://{dead_addr}"),
            replay: None,
        });
        let d = r#"{pool="pool-f",endpoint="pod-dead"}"#;
        until_exposed(
            &reg,
            &[
                &format!("weir_kv_events_connected{d} 0"),
                &format!("weir_kv_events_batches_total{d} 0"),
                &format!("weir_kv_index_blocks{d} 0"),
            ],
        )
        .await;
        assert!(
            !exposition(&reg).contains(&format!("weir_kv_events_last_seq{d}")),
            "no seq before the first batch"
        );

        // An unwatched pod's series go away with it.
        indexer.unwatch(&f.pod.id);
        let text = exposition(&reg);
        assert!(!text.contains(r#"endpoint="pod-f""#), "{text}");
    }

    #[tokio::test]
    async fn a_replay_that_starts_above_the_needed_seq_counts_the_lost_batches() {
        let mut f = FakePublisher::start().await;
        let index = Arc::new(RwLock::new(PreciseIndex::default()));
        let indexer = KvIndexer::new(Arc::clone(&index), KvIndexerConfig::default());
        indexer.watch(f.pod.clone());
        let slot = index.read().slot(&f.pod.id).unwrap();
        let (peer, from) = f.replay_request().await;
        assert_eq!(from, 0);
        // The publisher's buffer kept only seqs 3 and 4.
        f.answer(&peer, &[(3, fake_batch(3)), (4, fake_batch(4))])
            .await;
        until(&index, "the replay", |ix| ix.next_seq(slot) == 5).await;
        assert_eq!(index.read().engine_hashes(slot), vec![106, 107, 108, 109]);
        let st = indexer.stats(&f.pod.id).unwrap();
        assert_eq!(st.replay_lost.load(Ordering::Relaxed), 3);
        assert_eq!(st.replayed.load(Ordering::Relaxed), 2);
    }
}
