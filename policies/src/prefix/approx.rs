//! Approximate prefix index: "which pods were routed this prefix", llm-d's routing-history mode.
//!
//! Map block hash -> pods (holder chains in [`Table`]) plus a per-pod LRU of at most `capacity_per_pod` blocks
//! (default 31,250, GIE's figure: (80-16) GB / 128 KiB per token x 4 chars / 64 chars per block, an 8B model on an
//! H100). Evicting a block from a pod's LRU removes the pod from that block. After a pick the router calls
//! [`ApproxIndex::record`]: the pod is assumed to hold every full block of the request from then on (a guess, not
//! cache state). Blocks are recorded deepest-first so block 0 is the most recently used: eviction trims chains from
//! the tail, as vLLM's free queue does, instead of cutting a chain at its root.
//!
//! Memory: at most [`APPROX_BYTES_PER_ENTRY`] heap bytes per (block, pod) entry. Measured by
//! `memory_stays_under_its_bound_under_a_flood` (4 pods x 20,000 blocks under a flood of unique prefixes): 124 B
//! per entry = slab 40 B (+ <= 25% growth slack) + ~80 B of chain-head map (24 B slots: head + 64-pod holder mask),
//! because hashbrown grows on tombstones under insert/evict churn and then sits at ~30% load. (GIE quotes ~60-70 B;
//! the holder mask buys a one-probe-per-block lookup.) A 64-pod pool at the default capacity is therefore bounded by
//! 64 x 31,250 x 136 B = 272 MB.

use super::table::{Lru, Table};
use super::{PodSlot, Pods, PrefixMatches};
use crate::endpoint::EndpointId;

/// GIE's per-pod block capacity.
pub const DEFAULT_BLOCKS_PER_POD: u32 = 31_250;

/// Upper bound on heap bytes per live entry at full load (measured 124 B; see the module doc), checked by the flood
/// test.
pub const APPROX_BYTES_PER_ENTRY: usize = 136;

/// Routing-history prefix index over every pod of a pool (all models: keys are model-seeded).
#[derive(Debug)]
pub struct ApproxIndex {
    table: Table,
    pods: Pods,
    /// One LRU per pod slot.
    lrus: Vec<Lru>,
    /// Blocks a pod may hold before its least recently routed block is forgotten.
    capacity_per_pod: u32,
}

impl ApproxIndex {
    /// An empty index; `capacity_per_pod` is clamped to at least 1.
    pub fn new(capacity_per_pod: u32) -> Self {
        Self {
            table: Table::with_max(usize::MAX / 2),
            pods: Pods::default(),
            lrus: Vec::new(),
            capacity_per_pod: capacity_per_pod.max(1),
        }
    }

    /// Registers a pod (idempotent) and returns its slot.
    pub fn add_pod(&mut self, id: &EndpointId) -> PodSlot {
        let (slot, _) = self.pods.add(id);
        if self.lrus.len() <= slot.0 as usize {
            self.lrus.resize(slot.0 as usize + 1, Lru::default());
        }
        slot
    }

    /// The slot of a registered pod.
    pub fn slot(&self, id: &EndpointId) -> Option<PodSlot> {
        self.pods.slot(id)
    }

    /// Forgets a pod and everything recorded for it (pod deleted or restarted: its cache is gone).
    pub fn remove_pod(&mut self, id: &EndpointId) -> bool {
        let Some(slot) = self.pods.remove(id) else {
            return false;
        };
        let mut lru = std::mem::take(&mut self.lrus[slot.0 as usize]);
        for s in self.table.lru_slots(&lru) {
            self.table.lru_unlink(&mut lru, s);
            self.table.release(s);
        }
        true
    }

    /// Records that `pod` now holds `hashes` (a request's full-block chain, block 0 first).
    pub fn record(&mut self, pod: PodSlot, hashes: &[u64]) {
        let Some(mut lru) = self.lrus.get(pod.0 as usize).copied() else {
            return;
        };
        if self.pods.id(pod).is_none() {
            return;
        }
        // Deepest first, so block 0 ends up most recent and eviction trims from the tail of chains.
        for &h in hashes.iter().rev() {
            match self.table.find(h, pod.0) {
                Some(s) => self.table.lru_touch(&mut lru, s),
                None => {
                    if lru.len >= self.capacity_per_pod
                        && let Some(victim) = lru.back()
                    {
                        self.table.lru_unlink(&mut lru, victim);
                        self.table.release(victim);
                    }
                    let s = self.table.alloc(h, 0, pod.0);
                    self.table.lru_push_front(&mut lru, s);
                }
            }
        }
        self.lrus[pod.0 as usize] = lru;
    }

    /// Per-pod consecutive matched blocks from block 0 for `hashes`, written into `out` (allocation reused).
    pub fn lookup(&self, hashes: &[u64], out: &mut PrefixMatches) {
        out.reset(self.pods.span(), hashes.len());
        self.table.consecutive(hashes, &mut out.blocks, |_, _| {});
    }

    /// Blocks currently recorded for a pod.
    pub fn pod_blocks(&self, pod: PodSlot) -> u32 {
        self.lrus.get(pod.0 as usize).map_or(0, |l| l.len)
    }

    /// Live (block, pod) entries.
    pub fn entries(&self) -> usize {
        self.table.live()
    }

    /// Heap bytes held by the index's tables.
    pub fn heap_bytes(&self) -> usize {
        self.table.heap_bytes() + self.lrus.capacity() * std::mem::size_of::<Lru>()
    }

    /// Registered pods.
    pub fn pods(&self) -> usize {
        self.pods.len()
    }
}

impl Default for ApproxIndex {
    fn default() -> Self {
        Self::new(DEFAULT_BLOCKS_PER_POD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, VecDeque};

    fn id(i: usize) -> EndpointId {
        EndpointId::new(format!("pod-{i}"))
    }

    #[test]
    fn lookup_counts_consecutive_blocks_from_zero() {
        let mut ix = ApproxIndex::new(100);
        let a = ix.add_pod(&id(0));
        let b = ix.add_pod(&id(1));
        ix.record(a, &[1, 2, 3, 4]);
        ix.record(b, &[1, 2, 9]);
        let mut m = PrefixMatches::default();
        ix.lookup(&[1, 2, 3, 5], &mut m);
        assert_eq!((m.get(Some(a)), m.get(Some(b)), m.total), (3, 2, 4));
        ix.lookup(&[7, 2, 3], &mut m);
        assert_eq!(m.longest(), 0, "a miss at block 0 is a miss everywhere");
    }

    #[test]
    fn eviction_trims_chain_tails_first() {
        let mut ix = ApproxIndex::new(4);
        let a = ix.add_pod(&id(0));
        ix.record(a, &[1, 2, 3]);
        ix.record(a, &[10, 11, 12]);
        let mut m = PrefixMatches::default();
        ix.lookup(&[1, 2, 3], &mut m);
        // Capacity 4: the newest chain is whole, the older one kept only its root.
        assert_eq!(m.get(Some(a)), 1);
        ix.lookup(&[10, 11, 12], &mut m);
        assert_eq!(m.get(Some(a)), 3);
        assert_eq!(ix.pod_blocks(a), 4);
    }

    #[test]
    fn removing_a_pod_forgets_its_blocks_and_reuses_the_slot() {
        let mut ix = ApproxIndex::new(10);
        let a = ix.add_pod(&id(0));
        ix.record(a, &[1, 2]);
        assert!(ix.remove_pod(&id(0)));
        assert_eq!(ix.entries(), 0);
        let b = ix.add_pod(&id(1));
        assert_eq!(a, b);
        let mut m = PrefixMatches::default();
        ix.lookup(&[1, 2], &mut m);
        assert_eq!(m.get(Some(b)), 0);
    }

    #[test]
    fn pools_over_64_pods_take_the_chain_walk_path() {
        let mut ix = ApproxIndex::new(100);
        let slots: Vec<PodSlot> = (0..70).map(|i| ix.add_pod(&id(i))).collect();
        ix.record(slots[3], &[1, 2, 3]);
        ix.record(slots[66], &[1, 2]);
        ix.record(slots[69], &[1, 9]);
        let mut m = PrefixMatches::default();
        ix.lookup(&[1, 2, 3, 4], &mut m);
        assert_eq!(
            (
                m.get(Some(slots[3])),
                m.get(Some(slots[66])),
                m.get(Some(slots[69])),
                m.get(Some(slots[0]))
            ),
            (3, 2, 1, 0)
        );
    }

    #[test]
    fn memory_stays_under_its_bound_under_a_flood() {
        let cap = 20_000u32;
        let pods = 4;
        let mut ix = ApproxIndex::new(cap);
        let slots: Vec<PodSlot> = (0..pods).map(|i| ix.add_pod(&id(i))).collect();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for r in 0..20_000u64 {
            let hashes: Vec<u64> = (0..16)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                })
                .collect();
            ix.record(slots[(r % pods as u64) as usize], &hashes);
        }
        let bound = cap as usize * pods;
        assert_eq!(ix.entries(), bound);
        let per_entry = ix.heap_bytes() as f64 / bound as f64;
        eprintln!("approx index: {per_entry:.1} heap bytes per entry at {bound} entries");
        assert!(
            ix.heap_bytes() <= bound * APPROX_BYTES_PER_ENTRY,
            "{per_entry:.1} B/entry"
        );
    }

    /// The naive model: per pod an ordered recency list of hashes.
    #[derive(Default)]
    struct Naive {
        pods: BTreeMap<u32, VecDeque<u64>>,
        cap: usize,
    }

    impl Naive {
        fn record(&mut self, pod: u32, hashes: &[u64]) {
            let l = self.pods.entry(pod).or_default();
            for &h in hashes.iter().rev() {
                if let Some(p) = l.iter().position(|&x| x == h) {
                    l.remove(p);
                } else if l.len() >= self.cap {
                    l.pop_back();
                }
                l.push_front(h);
            }
        }
        fn matched(&self, pod: u32, hashes: &[u64]) -> u32 {
            let Some(l) = self.pods.get(&pod) else {
                return 0;
            };
            hashes.iter().take_while(|h| l.contains(h)).count() as u32
        }
    }

    proptest! {
        #[test]
        fn agrees_with_a_naive_model(
            ops in proptest::collection::vec(
                (0u32..4, proptest::collection::vec(0u64..12, 1..8), any::<bool>()), 1..80),
            cap in 1u32..20,
        ) {
            let mut ix = ApproxIndex::new(cap);
            let mut naive = Naive { cap: cap as usize, ..Naive::default() };
            let slots: Vec<PodSlot> = (0..4).map(|i| ix.add_pod(&id(i))).collect();
            let mut m = PrefixMatches::default();
            for (pod, hashes, is_record) in ops {
                if is_record {
                    ix.record(slots[pod as usize], &hashes);
                    naive.record(pod, &hashes);
                } else {
                    ix.lookup(&hashes, &mut m);
                    for p in 0..4u32 {
                        prop_assert_eq!(m.get(Some(slots[p as usize])), naive.matched(p, &hashes));
                    }
                }
            }
        }
    }
}
