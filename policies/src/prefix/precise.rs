//! Precise prefix index: the pods' real KV-cache contents, rebuilt from their vLLM KV events.
//!
//! Keys are rebuilt with weir's own [`PrefixHasher`] over each `BlockStored` event's `token_ids` (block size taken
//! from the event; the LoRA name, when present, seeds the chain instead of the pod's model, matching a request whose
//! `model` is the adapter), chained from the parent: each pod keeps a map engine hash -> entry, so a child's parent
//! engine hash resolves to its weir hash, and `BlockRemoved` (engine hashes) finds its entries. The index therefore
//! never depends on the engine's hash algorithm or `PYTHONHASHSEED`. vLLM may store the same block twice (two
//! requests computing it at once), so entries count stores and a block leaves only when every copy is removed.
//! `AllBlocksCleared`, a pod removal and a pod restart (sequence numbers going back) drop the pod's entries.
//!
//! Bounds: at most `max_entries` (pod, block) entries overall (default 10,000,000); past it the least recently
//! stored entry is evicted (a global LRU). At most [`PRECISE_BYTES_PER_ENTRY`] heap bytes per entry at full load:
//! measured 150 B by `memory_stays_under_its_bound_under_a_flood` (50,000-entry cap, 320,000 unique blocks stored):
//! slab 40 B + chain-head map (head + 64-pod holder mask) + per-pod engine-hash map, both maps at hashbrown's
//! post-churn ~30-60% load. The default cap of 10M entries is therefore bounded by ~1.7 GB; size it to the fleet
//! (pods x KV blocks per pod).
//! Speculative entries (pod, block, expiry), inserted by the router at pick time, bridge the ~tens of ms before the
//! pod's first `BlockStored` arrives; they expire after `speculative_ttl` (2 s, llm-d's figure) and are capped at
//! `max_entries / 4`.
//!
//! Sequence numbers: [`PreciseIndex::check_seq`] classifies each batch's `seq` against the pod's last one (next in
//! order, a gap to fill from the replay socket, a restart, or a duplicate of a replayed batch), so the I/O shell can
//! request replays. On every new subscription the shell calls [`PreciseIndex::begin_resync`] (the first seq the index
//! still needs), replays from there through [`PreciseIndex::apply_replay`] (which reports batches the publisher's
//! buffer no longer held), and the live batches that the replay already covered then classify as
//! [`SeqCheck::Duplicate`] instead of looking like a restart.
//! Not modelled: the CPU tier weighting (llm-d: GPU 1.0, CPU 0.8; every block counts 1.0 here) and `cache_salt`
//! (events do not carry it, so salted blocks are indexed as unsalted).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::table::{HashKeyed, Lru, Table, map_bytes};
use super::{PodSlot, Pods, PrefixMatches};
use crate::blocks::PrefixHasher;
use crate::endpoint::EndpointId;
use crate::kv_events::{KvCacheEvent, KvEventBatch};

/// Default global cap on (pod, block) entries: every block of ~340 pods of 8B on H100 (~29,000 blocks each).
pub const DEFAULT_MAX_ENTRIES: usize = 10_000_000;

/// How long a speculative entry lives without a confirming event.
pub const DEFAULT_SPECULATIVE_TTL: Duration = Duration::from_secs(2);

/// Upper bound on heap bytes per live stored entry at full load (measured 150 B; see the module doc), checked by the
/// flood test.
pub const PRECISE_BYTES_PER_ENTRY: usize = 168;

/// Precise-index knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreciseConfig {
    /// Global cap on (pod, block) entries.
    pub max_entries: usize,
    /// Lifetime of speculative entries.
    pub speculative_ttl: Duration,
}

impl Default for PreciseConfig {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            speculative_ttl: DEFAULT_SPECULATIVE_TTL,
        }
    }
}

/// How a batch's sequence number relates to what the index has seen from that pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The next batch (or the pod's first, seq 0): apply it.
    InOrder,
    /// Batches `from..seq` are missing: replay them from the pod's replay socket, then apply this one.
    Gap {
        /// First missing sequence number.
        from: u64,
    },
    /// Already applied by the replay that began this subscription (the live copy was queued while the replay ran):
    /// skip it.
    Duplicate,
}

/// What [`PreciseIndex::apply_replay`] did with a replay's batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// Batches applied.
    pub applied: u64,
    /// Sequence numbers the index needed that the replay did not carry (vLLM buffers only the last `buffer_steps`
    /// batches, so a replay may start above the requested seq): their blocks are missing until stored again.
    pub lost: u64,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PreciseStats {
    /// Blocks stored (events x blocks).
    pub stored: u64,
    /// Block copies removed.
    pub removed: u64,
    /// Stored blocks skipped because their parent was unknown (a missed event) or the event was malformed.
    pub orphaned: u64,
    /// Entries evicted by the global cap.
    pub evicted: u64,
    /// Pod restarts detected from sequence numbers.
    pub restarts: u64,
    /// Sequence gaps detected.
    pub gaps: u64,
    /// Live batches skipped because the subscription's replay had already applied them.
    pub duplicates: u64,
}

/// One pod's view of the index, for per-pod metrics: read at scrape time, so the counters live in the pod's state
/// (bumped where the global [`PreciseStats`] are) rather than being derived from the global sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodStats {
    /// Live stored entries of the pod (speculative ones excluded).
    pub blocks: u64,
    /// Last applied batch sequence number.
    pub last_seq: Option<u64>,
    /// Publisher restarts detected from sequence numbers.
    pub restarts: u64,
    /// Sequence gaps detected.
    pub gaps: u64,
    /// Live batches skipped because the subscription's replay had already applied them.
    pub duplicates: u64,
    /// Stored blocks skipped because their parent was unknown (a missed event) or the event was malformed.
    pub orphaned: u64,
}

/// Per-pod shares of [`PreciseStats`]; they start at zero whenever the pod is (re-)registered.
#[derive(Debug, Clone, Copy, Default)]
struct PodCounts {
    restarts: u64,
    gaps: u64,
    duplicates: u64,
    orphaned: u64,
}

#[derive(Debug, Default)]
struct PodState {
    /// The model the pod serves: seeds block 0's hash.
    model: Arc<str>,
    /// Engine block hash -> entry slot.
    engine: HashKeyed<u32>,
    /// Last applied batch sequence number.
    last_seq: Option<u64>,
    /// Lowest seq a live batch may carry and still be a copy of one the current subscription's replay applied; set
    /// by `begin_resync`, raised past each duplicate, cleared by the first live batch that is not one. Without it a
    /// queued live copy of a replayed batch (seq <= last) would read as a publisher restart.
    dup_floor: Option<u64>,
    /// This pod's share of the global counters, so metrics can tell which pod is gapping or restarting.
    counts: PodCounts,
}

/// The precise index over all pods of a pool.
#[derive(Debug)]
pub struct PreciseIndex {
    cfg: PreciseConfig,
    table: Table,
    pods: Pods,
    state: Vec<PodState>,
    /// Global LRU over every entry (stores refresh).
    lru: Lru,
    /// weir block hash -> speculative holders (pod slot, expiry).
    spec: HashKeyed<Vec<(u32, Instant)>>,
    /// Speculative entries in insertion (= expiry) order, for `expire`.
    spec_queue: VecDeque<(Instant, u32, u64)>,
    stats: PreciseStats,
}

impl PreciseIndex {
    pub fn new(cfg: PreciseConfig) -> Self {
        let cfg = PreciseConfig {
            max_entries: cfg.max_entries.max(1),
            ..cfg
        };
        Self {
            table: Table::with_max(cfg.max_entries),
            cfg,
            pods: Pods::default(),
            state: Vec::new(),
            lru: Lru::default(),
            spec: HashKeyed::default(),
            spec_queue: VecDeque::new(),
            stats: PreciseStats::default(),
        }
    }

    /// Registers a pod serving `model` (idempotent; a changed model drops what was known).
    pub fn add_pod(&mut self, id: &EndpointId, model: &str) -> PodSlot {
        let (slot, new) = self.pods.add(id);
        let i = slot.0 as usize;
        if self.state.len() <= i {
            self.state.resize_with(i + 1, PodState::default);
        }
        if new || &*self.state[i].model != model {
            self.clear_slot(slot.0);
            self.state[i] = PodState {
                model: Arc::from(model),
                ..PodState::default()
            };
        }
        slot
    }

    pub fn slot(&self, id: &EndpointId) -> Option<PodSlot> {
        self.pods.slot(id)
    }

    /// Forgets a pod (deleted, or restarted as seen by discovery).
    pub fn remove_pod(&mut self, id: &EndpointId) -> bool {
        match self.pods.remove(id) {
            Some(slot) => {
                self.clear_slot(slot.0);
                self.state[slot.0 as usize] = PodState::default();
                true
            }
            None => false,
        }
    }

    /// Classifies live `seq` for `pod`. A copy of a batch the current subscription's replay applied (see
    /// [`Self::begin_resync`]) is a duplicate; otherwise a sequence that goes back (publisher restarted) drops the
    /// pod's entries first.
    pub fn check_seq(&mut self, pod: PodSlot, seq: u64) -> SeqCheck {
        let Some(st) = self.state.get_mut(pod.0 as usize) else {
            return SeqCheck::InOrder;
        };
        let last = st.last_seq;
        if let Some(floor) = st.dup_floor.take()
            && seq >= floor
            && last.is_some_and(|l| seq <= l)
        {
            // Copies arrive in publishing order, so the next one must be above this one.
            st.dup_floor = Some(seq + 1);
            st.counts.duplicates += 1;
            self.stats.duplicates += 1;
            return SeqCheck::Duplicate;
        }
        let expected = match last {
            Some(l) if seq <= l => {
                self.stats.restarts += 1;
                self.clear_slot(pod.0);
                let st = &mut self.state[pod.0 as usize];
                st.last_seq = None;
                st.counts.restarts += 1;
                0
            }
            Some(l) => l + 1,
            None => 0,
        };
        if seq == expected {
            SeqCheck::InOrder
        } else {
            self.stats.gaps += 1;
            self.state[pod.0 as usize].counts.gaps += 1;
            SeqCheck::Gap { from: expected }
        }
    }

    /// Last applied sequence number of a pod.
    pub fn last_seq(&self, pod: PodSlot) -> Option<u64> {
        self.state.get(pod.0 as usize).and_then(|s| s.last_seq)
    }

    /// First sequence number the index still needs from `pod`: 0 when it has applied nothing, else last + 1.
    pub fn next_seq(&self, pod: PodSlot) -> u64 {
        self.last_seq(pod).map_or(0, |l| l + 1)
    }

    /// Starts a new subscription to `pod` that will replay before reading live batches: returns the seq to replay
    /// from ([`Self::next_seq`]) and treats live batches in `from..=` (whatever the replay then applies) as
    /// duplicates until the first live batch that is not one. Only for the same publisher the index followed
    /// before; a changed one is a new pod (`remove_pod` + `add_pod`).
    pub fn begin_resync(&mut self, pod: PodSlot) -> u64 {
        let from = self.next_seq(pod);
        if let Some(st) = self.state.get_mut(pod.0 as usize) {
            st.dup_floor = Some(from);
        }
        from
    }

    /// Applies the batches a replay socket returned (publishing order) for a request from [`Self::next_seq`]:
    /// batches the index already applied are skipped, and sequence numbers it needed but the replay lacks (the
    /// publisher's buffer dropped them) are counted as lost; the batches after them are applied anyway. `until` is
    /// the live seq that revealed a gap, if one did: the replay fills only up to it (that batch and later ones come
    /// live), and one that stops short of it lost the rest.
    pub fn apply_replay<'a>(
        &mut self,
        pod: PodSlot,
        batches: impl IntoIterator<Item = (u64, &'a KvEventBatch)>,
        until: Option<u64>,
    ) -> ReplayOutcome {
        let mut out = ReplayOutcome::default();
        if self.pods.id(pod).is_none() {
            return out;
        }
        for (seq, batch) in batches {
            let next = self.next_seq(pod);
            if seq < next {
                continue;
            }
            if until.is_some_and(|u| seq >= u) {
                break;
            }
            out.lost += seq - next;
            out.applied += 1;
            self.apply_batch(pod, seq, batch);
        }
        if let Some(u) = until {
            out.lost += u.saturating_sub(self.next_seq(pod));
        }
        out
    }

    /// Applies one batch from `pod` and records `seq` as its last.
    pub fn apply_batch(&mut self, pod: PodSlot, seq: u64, batch: &KvEventBatch) {
        if self.pods.id(pod).is_none() {
            return;
        }
        for ev in &batch.events {
            self.apply_event(pod, ev);
        }
        self.state[pod.0 as usize].last_seq = Some(seq);
    }

    /// Applies one event from `pod`.
    pub fn apply_event(&mut self, pod: PodSlot, ev: &KvCacheEvent) {
        let p = pod.0;
        if self.pods.id(pod).is_none() {
            return;
        }
        match ev {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_name,
                ..
            } => {
                let bs = *block_size as usize;
                let st = &self.state[p as usize];
                let mut parent = match parent_block_hash {
                    None => None,
                    Some(ph) => match st.engine.get(ph) {
                        Some(&s) => Some(self.table.get(s).key),
                        None => {
                            self.orphaned(p, block_hashes.len());
                            return;
                        }
                    },
                };
                if bs == 0 || token_ids.len() < block_hashes.len() * bs {
                    self.orphaned(p, block_hashes.len());
                    return;
                }
                let hasher = PrefixHasher::new(lora_name.as_deref().unwrap_or(&st.model), None, bs);
                for (i, &eh) in block_hashes.iter().enumerate() {
                    let key = hasher.hash_block(parent, &token_ids[i * bs..(i + 1) * bs]);
                    self.store(p, eh, key);
                    parent = Some(key);
                }
            }
            KvCacheEvent::BlockRemoved { block_hashes, .. } => {
                for eh in block_hashes {
                    let Some(&s) = self.state[p as usize].engine.get(eh) else {
                        continue;
                    };
                    self.stats.removed += 1;
                    let e = self.table.get_mut(s);
                    e.count -= 1;
                    if e.count == 0 {
                        self.drop_entry(s);
                    }
                }
            }
            KvCacheEvent::AllBlocksCleared => self.clear_slot(p),
        }
    }

    fn orphaned(&mut self, p: u32, blocks: usize) {
        self.stats.orphaned += blocks as u64;
        self.state[p as usize].counts.orphaned += blocks as u64;
    }

    fn store(&mut self, p: u32, engine_hash: u64, key: u64) {
        self.stats.stored += 1;
        if let Some(&s) = self.state[p as usize].engine.get(&engine_hash) {
            let e = self.table.get_mut(s);
            if e.key == key {
                e.count += 1;
                self.table.lru_touch(&mut self.lru, s);
                return;
            }
            // Same engine hash, different content: the engine reused the hash; the newest store wins.
            self.drop_entry(s);
        }
        while self.table.live() >= self.cfg.max_entries {
            let Some(victim) = self.lru.back() else { break };
            self.stats.evicted += 1;
            self.drop_entry(victim);
        }
        let s = self.table.alloc(key, engine_hash, p);
        self.table.lru_push_front(&mut self.lru, s);
        self.state[p as usize].engine.insert(engine_hash, s);
    }

    fn drop_entry(&mut self, s: u32) {
        let e = *self.table.get(s);
        self.table.lru_unlink(&mut self.lru, s);
        self.table.release(s);
        if let Some(st) = self.state.get_mut(e.pod as usize) {
            st.engine.remove(&e.aux);
        }
    }

    fn clear_slot(&mut self, p: u32) {
        let Some(st) = self.state.get_mut(p as usize) else {
            return;
        };
        let slots: Vec<u32> = std::mem::take(&mut st.engine).into_values().collect();
        for s in slots {
            self.table.lru_unlink(&mut self.lru, s);
            self.table.release(s);
        }
    }

    /// Inserts speculative entries: `pod` was just picked for a request with these blocks.
    pub fn speculate(&mut self, pod: PodSlot, hashes: &[u64], now: Instant) {
        if self.pods.id(pod).is_none() {
            return;
        }
        self.expire(now);
        let until = now + self.cfg.speculative_ttl;
        let cap = (self.cfg.max_entries / 4).max(1);
        for &h in hashes {
            while self.spec_queue.len() >= cap {
                if let Some((_, p, k)) = self.spec_queue.pop_front() {
                    self.remove_spec(p, k);
                }
            }
            let holders = self.spec.entry(h).or_default();
            match holders.iter_mut().find(|(p, _)| *p == pod.0) {
                Some(slot) => slot.1 = until,
                None => holders.push((pod.0, until)),
            }
            self.spec_queue.push_back((until, pod.0, h));
        }
    }

    fn remove_spec(&mut self, pod: u32, key: u64) {
        if let Some(v) = self.spec.get_mut(&key) {
            v.retain(|(p, _)| *p != pod);
            if v.is_empty() {
                self.spec.remove(&key);
            }
        }
    }

    /// Drops speculative entries that expired by `now` (the shell calls this on an interval; `speculate` does too).
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(until, p, k)) = self.spec_queue.front() {
            if until > now {
                break;
            }
            self.spec_queue.pop_front();
            // A later `speculate` may have extended this holder; only drop it if it is really due.
            let due = self
                .spec
                .get(&k)
                .and_then(|v| v.iter().find(|(q, _)| *q == p))
                .is_some_and(|(_, u)| *u <= now);
            if due {
                self.remove_spec(p, k);
            }
        }
    }

    /// Per-pod consecutive matched blocks from block 0 (stored or unexpired speculative) into `out`.
    pub fn lookup(&self, hashes: &[u64], now: Instant, out: &mut PrefixMatches) {
        out.reset(self.pods.span(), hashes.len());
        let spec_on = !self.spec.is_empty();
        self.table.consecutive(hashes, &mut out.blocks, |h, add| {
            if spec_on && let Some(v) = self.spec.get(&h) {
                for &(p, until) in v {
                    if until > now {
                        add(p);
                    }
                }
            }
        });
    }

    /// Engine hashes a pod holds according to its events (for comparing with the engine).
    pub fn engine_hashes(&self, pod: PodSlot) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .state
            .get(pod.0 as usize)
            .map(|s| s.engine.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Live stored (pod, block) entries (speculative ones excluded).
    pub fn entries(&self) -> usize {
        self.table.live()
    }

    /// Live speculative entries (including expired ones not yet purged).
    pub fn speculative_entries(&self) -> usize {
        self.spec_queue.len()
    }

    /// Heap bytes of the stored-entry tables (slab, chain heads, per-pod engine maps).
    pub fn heap_bytes(&self) -> usize {
        self.table.heap_bytes()
            + self
                .state
                .iter()
                .map(|s| map_bytes(&s.engine))
                .sum::<usize>()
    }

    pub fn stats(&self) -> PreciseStats {
        self.stats
    }

    /// What the index holds and has counted for one registered pod (O(1): for scrape-time metrics).
    pub fn pod_stats(&self, pod: PodSlot) -> Option<PodStats> {
        self.pods.id(pod)?;
        let st = self.state.get(pod.0 as usize)?;
        Some(PodStats {
            blocks: st.engine.len() as u64,
            last_seq: st.last_seq,
            restarts: st.counts.restarts,
            gaps: st.counts.gaps,
            duplicates: st.counts.duplicates,
            orphaned: st.counts.orphaned,
        })
    }

    pub fn config(&self) -> PreciseConfig {
        self.cfg
    }
}

impl Default for PreciseIndex {
    fn default() -> Self {
        Self::new(PreciseConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::now as t0;

    fn id(i: usize) -> EndpointId {
        EndpointId::new(format!("pod-{i}"))
    }

    fn stored(engine: &[u64], parent: Option<u64>, tokens: &[u32]) -> KvCacheEvent {
        KvCacheEvent::BlockStored {
            block_hashes: engine.to_vec(),
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
            block_size: 4,
            lora_id: None,
            medium: Some("GPU".into()),
            lora_name: None,
            group_idx: None,
        }
    }

    #[test]
    fn stored_chain_rebuilds_weir_keys_across_events() {
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        let tokens: Vec<u32> = (0..12).collect();
        ix.apply_event(a, &stored(&[100, 101], None, &tokens[..8]));
        ix.apply_event(a, &stored(&[102], Some(101), &tokens[8..]));
        let want = PrefixHasher::new("m", None, 4).block_hashes(&tokens);
        let mut m = PrefixMatches::default();
        ix.lookup(&want, t0(), &mut m);
        assert_eq!(m.get(Some(a)), 3);
        // Another model's request never matches.
        ix.lookup(
            &PrefixHasher::new("other", None, 4).block_hashes(&tokens),
            t0(),
            &mut m,
        );
        assert_eq!(m.get(Some(a)), 0);
        ix.apply_event(
            a,
            &KvCacheEvent::BlockRemoved {
                block_hashes: vec![101],
                medium: None,
                group_idx: None,
            },
        );
        ix.lookup(&want, t0(), &mut m);
        assert_eq!(m.get(Some(a)), 1, "a hole ends the chain");
        ix.apply_event(a, &KvCacheEvent::AllBlocksCleared);
        assert_eq!(ix.entries(), 0);
    }

    #[test]
    fn orphans_are_skipped_and_duplicates_counted() {
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        ix.apply_event(a, &stored(&[7], Some(999), &[1, 2, 3, 4]));
        assert_eq!(ix.entries(), 0);
        assert_eq!(ix.stats().orphaned, 1);
        ix.apply_event(a, &stored(&[5], None, &[1, 2, 3, 4]));
        ix.apply_event(a, &stored(&[5], None, &[1, 2, 3, 4]));
        let rm = KvCacheEvent::BlockRemoved {
            block_hashes: vec![5],
            medium: None,
            group_idx: None,
        };
        ix.apply_event(a, &rm);
        assert_eq!(ix.entries(), 1, "one copy is still cached");
        ix.apply_event(a, &rm);
        assert_eq!(ix.entries(), 0);
    }

    #[test]
    fn sequence_gaps_and_restarts_are_classified() {
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        let batch = |evs| KvEventBatch {
            ts: 0.0,
            events: evs,
            data_parallel_rank: None,
        };
        assert_eq!(ix.check_seq(a, 0), SeqCheck::InOrder);
        ix.apply_batch(a, 0, &batch(vec![stored(&[1], None, &[1, 2, 3, 4])]));
        assert_eq!(ix.check_seq(a, 3), SeqCheck::Gap { from: 1 });
        ix.apply_batch(a, 3, &batch(vec![]));
        assert_eq!(ix.entries(), 1);
        // Back to 0: the pod restarted, its cache is empty.
        assert_eq!(ix.check_seq(a, 0), SeqCheck::InOrder);
        assert_eq!(ix.entries(), 0);
        assert_eq!(ix.stats().restarts, 1);
        let b = ix.add_pod(&id(1), "m");
        assert_eq!(
            ix.check_seq(b, 5),
            SeqCheck::Gap { from: 0 },
            "joined late: replay history"
        );
    }

    #[test]
    fn pod_stats_count_each_pods_own_gaps_restarts_duplicates_and_orphans() {
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        let b = ix.add_pod(&id(1), "m");
        ix.begin_resync(a);
        let replayed: Vec<(u64, KvEventBatch)> = (0..3).map(|s| (s, store_batch(s))).collect();
        ix.apply_replay(a, replayed.iter().map(|(s, b)| (*s, b)), None);
        assert_eq!(ix.check_seq(a, 2), SeqCheck::Duplicate);
        assert_eq!(ix.check_seq(a, 5), SeqCheck::Gap { from: 3 });
        ix.apply_batch(a, 5, &batch(vec![stored(&[7], Some(999), &[1, 2, 3, 4])]));
        assert_eq!(ix.check_seq(b, 0), SeqCheck::InOrder);
        ix.apply_batch(b, 0, &store_batch(9));
        assert_eq!(
            ix.pod_stats(a),
            Some(PodStats {
                blocks: 3,
                last_seq: Some(5),
                restarts: 0,
                gaps: 1,
                duplicates: 1,
                orphaned: 1,
            })
        );
        // A restart clears the pod's blocks and last seq but keeps its counts.
        assert_eq!(ix.check_seq(a, 0), SeqCheck::InOrder);
        let sa = ix.pod_stats(a).unwrap();
        assert_eq!(
            (sa.blocks, sa.last_seq, sa.restarts, sa.gaps),
            (0, None, 1, 1)
        );
        assert_eq!(
            ix.pod_stats(b),
            Some(PodStats {
                blocks: 1,
                last_seq: Some(0),
                ..PodStats::default()
            }),
            "the other pod's counts are its own"
        );
        assert_eq!(ix.stats().gaps, 1);
        ix.remove_pod(&id(0));
        assert_eq!(ix.pod_stats(a), None);
        let a = ix.add_pod(&id(0), "m");
        assert_eq!(ix.pod_stats(a), Some(PodStats::default()));
    }

    fn batch(evs: Vec<KvCacheEvent>) -> KvEventBatch {
        KvEventBatch {
            ts: 0.0,
            events: evs,
            data_parallel_rank: None,
        }
    }

    /// Batch `seq` of a test publisher: stores one root block (engine hash `100 + seq`).
    fn store_batch(seq: u64) -> KvEventBatch {
        let t = seq as u32 * 4;
        batch(vec![stored(&[100 + seq], None, &[t, t + 1, t + 2, t + 3])])
    }

    #[test]
    fn next_seq_is_zero_for_an_unknown_pod_and_last_plus_one_after() {
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        assert_eq!(ix.next_seq(a), 0);
        assert_eq!(ix.begin_resync(a), 0);
        ix.apply_batch(a, 4, &store_batch(4));
        assert_eq!(ix.next_seq(a), 5);
        assert_eq!(
            ix.begin_resync(a),
            5,
            "a reconnect resumes after the last applied batch"
        );
        ix.remove_pod(&id(0));
        let a = ix.add_pod(&id(0), "m");
        assert_eq!(ix.next_seq(a), 0, "a re-added pod starts over");
    }

    #[test]
    fn live_copies_of_replayed_batches_are_duplicates_applied_once() {
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        let from = ix.begin_resync(a);
        let replayed: Vec<(u64, KvEventBatch)> = (0..4).map(|s| (s, store_batch(s))).collect();
        let out = ix.apply_replay(a, replayed.iter().map(|(s, b)| (*s, b)), None);
        assert_eq!(
            (from, out),
            (
                0,
                ReplayOutcome {
                    applied: 4,
                    lost: 0
                }
            )
        );
        // The SUB socket queued seqs 2 and 3 while the replay ran.
        assert_eq!(ix.check_seq(a, 2), SeqCheck::Duplicate);
        assert_eq!(ix.check_seq(a, 3), SeqCheck::Duplicate);
        assert_eq!(ix.check_seq(a, 4), SeqCheck::InOrder);
        ix.apply_batch(a, 4, &store_batch(4));
        assert_eq!(ix.engine_hashes(a), vec![100, 101, 102, 103, 104]);
        assert_eq!(ix.stats().stored, 5, "every block stored once");
        assert_eq!((ix.stats().duplicates, ix.stats().restarts), (2, 0));
        // One removal drops a block: it was not counted as stored twice.
        ix.apply_event(
            a,
            &KvCacheEvent::BlockRemoved {
                block_hashes: vec![102],
                medium: None,
                group_idx: None,
            },
        );
        assert_eq!(ix.engine_hashes(a), vec![100, 101, 103, 104]);
        // The window closed with seq 4: a seq going back now is a restart again.
        assert_eq!(ix.check_seq(a, 0), SeqCheck::InOrder);
        assert_eq!((ix.entries(), ix.stats().restarts), (0, 1));
    }

    #[test]
    fn a_restart_during_the_duplicate_window_is_still_a_restart() {
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        ix.begin_resync(a);
        let replayed: Vec<(u64, KvEventBatch)> = (0..6).map(|s| (s, store_batch(s))).collect();
        ix.apply_replay(a, replayed.iter().map(|(s, b)| (*s, b)), None);
        assert_eq!(ix.check_seq(a, 4), SeqCheck::Duplicate);
        // Copies only go up: seq 1 after 4 is a new publisher counting from 0 again.
        assert_eq!(ix.check_seq(a, 1), SeqCheck::Gap { from: 0 });
        assert_eq!((ix.entries(), ix.stats().restarts), (0, 1));
    }

    #[test]
    fn a_reconnect_resync_only_skips_what_its_replay_applied() {
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        for s in 0..3 {
            assert_eq!(ix.check_seq(a, s), SeqCheck::InOrder);
            ix.apply_batch(a, s, &store_batch(s));
        }
        // Reconnect; the replay from 3 fails or returns nothing, so nothing may be skipped: seq 1 is a restart.
        assert_eq!(ix.begin_resync(a), 3);
        assert_eq!(ix.check_seq(a, 1), SeqCheck::Gap { from: 0 });
        assert_eq!(ix.stats().restarts, 1);
        // Reconnect with a replay that applied 3..=4: live 3 is a copy, live 6 a gap.
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        ix.apply_batch(a, 2, &store_batch(2));
        assert_eq!(ix.begin_resync(a), 3);
        let replayed = [(3, store_batch(3)), (4, store_batch(4))];
        ix.apply_replay(a, replayed.iter().map(|(s, b)| (*s, b)), None);
        assert_eq!(
            ix.check_seq(a, 2),
            SeqCheck::Gap { from: 0 },
            "2 was applied before the resync: a restart"
        );
    }

    #[test]
    fn replays_report_batches_the_publisher_no_longer_buffers() {
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        ix.begin_resync(a);
        // vLLM kept only seqs 5.. of its buffer.
        let replayed: Vec<(u64, KvEventBatch)> = (5..8).map(|s| (s, store_batch(s))).collect();
        let out = ix.apply_replay(a, replayed.iter().map(|(s, b)| (*s, b)), None);
        assert_eq!(
            out,
            ReplayOutcome {
                applied: 3,
                lost: 5
            }
        );
        assert_eq!(ix.engine_hashes(a), vec![105, 106, 107]);
        assert_eq!(ix.next_seq(a), 8);
        // A gap fill stops before the live seq that revealed it and counts what it could not bring back.
        assert_eq!(ix.check_seq(a, 12), SeqCheck::Gap { from: 8 });
        let replayed: Vec<(u64, KvEventBatch)> = (7..14).map(|s| (s, store_batch(s))).collect();
        let out = ix.apply_replay(a, replayed.iter().map(|(s, b)| (*s, b)), Some(12));
        assert_eq!(
            out,
            ReplayOutcome {
                applied: 4,
                lost: 0
            },
            "7 was applied already, 12.. comes live"
        );
        assert_eq!(ix.next_seq(a), 12);
        assert_eq!(ix.check_seq(a, 20), SeqCheck::Gap { from: 12 });
        let out = ix.apply_replay(a, [(14, &store_batch(14))], Some(20));
        assert_eq!(
            out,
            ReplayOutcome {
                applied: 1,
                lost: 7
            },
            "12, 13 and 15..20 are gone"
        );
    }

    #[test]
    fn speculative_entries_match_until_they_expire() {
        let mut ix = PreciseIndex::default();
        let a = ix.add_pod(&id(0), "m");
        let t = t0();
        ix.speculate(a, &[11, 12], t);
        let mut m = PrefixMatches::default();
        ix.lookup(&[11, 12, 13], t + Duration::from_millis(1500), &mut m);
        assert_eq!(m.get(Some(a)), 2);
        ix.lookup(&[11, 12, 13], t + Duration::from_millis(2001), &mut m);
        assert_eq!(m.get(Some(a)), 0);
        ix.expire(t + Duration::from_secs(3));
        assert_eq!(ix.speculative_entries(), 0);
    }

    #[test]
    fn memory_stays_under_its_bound_under_a_flood() {
        let cap = 50_000;
        let mut ix = PreciseIndex::new(PreciseConfig {
            max_entries: cap,
            ..PreciseConfig::default()
        });
        let pods: Vec<PodSlot> = (0..4).map(|i| ix.add_pod(&id(i), "m")).collect();
        let mut next = 1u64;
        for r in 0..40_000u32 {
            // Unique 8-block chains: 320k stores into a 50k cap.
            let tokens: Vec<u32> = (0..32).map(|k| r * 64 + k).collect();
            let engine: Vec<u64> = (0..8).map(|k| next + k).collect();
            next += 8;
            ix.apply_event(pods[(r % 4) as usize], &stored(&engine, None, &tokens));
        }
        assert_eq!(ix.entries(), cap);
        assert!(ix.stats().evicted > 0);
        let per = ix.heap_bytes() as f64 / cap as f64;
        eprintln!("precise index: {per:.1} heap bytes per entry at {cap} entries");
        assert!(
            ix.heap_bytes() <= cap * PRECISE_BYTES_PER_ENTRY,
            "{per:.1} B/entry"
        );
        // The newest chain survives whole.
        let last = 39_999u32;
        let tokens: Vec<u32> = (0..32).map(|k| last * 64 + k).collect();
        let mut m = PrefixMatches::default();
        ix.lookup(
            &PrefixHasher::new("m", None, 4).block_hashes(&tokens),
            t0(),
            &mut m,
        );
        assert_eq!(m.get(Some(pods[3])), 8);
    }
}
