//! Prefix-cache indexes: which pods (probably) hold the KV blocks of a request's prompt prefix.
//!
//! Both indexes key blocks by weir's own chained hash ([`crate::blocks::PrefixHasher`], seeded by model name, so one
//! index serves every model without collisions) and answer the same question: for each pod, how many of the
//! request's blocks it holds *consecutively from block 0* (a vLLM prefix hit is a chain, a hole ends it).
//! - [`ApproxIndex`]: routing history (llm-d's approximate mode). After a pick the router records that the pod now
//!   holds all the request's blocks; each pod keeps an LRU of at most `capacity_per_pod` blocks (default 31,250).
//! - [`PreciseIndex`]: fed by the pods' vLLM KV events (`BlockStored`/`BlockRemoved`/`AllBlocksCleared`), with a global
//!   entry cap under LRU, per-pod sequence tracking for gap/restart detection, and short-lived speculative entries
//!   inserted at pick time. The ZMQ subscription shell lives in the router (`router::kv_index`).
//!
//! Pods are addressed by a dense [`PodSlot`] that the router resolves once per discovery change (not per request).
//! Pure: no clock (`now` is an argument), no I/O, no locks; the router wraps an index in a `RwLock`.

mod approx;
mod precise;
mod table;

pub use approx::{APPROX_BYTES_PER_ENTRY, ApproxIndex, DEFAULT_BLOCKS_PER_POD};
pub use precise::{
    DEFAULT_MAX_ENTRIES, DEFAULT_SPECULATIVE_TTL, PRECISE_BYTES_PER_ENTRY, PodStats, PreciseConfig,
    PreciseIndex, PreciseStats, ReplayOutcome, SeqCheck,
};

use std::collections::HashMap;

use crate::endpoint::EndpointId;

/// Dense handle of a pod inside one index; stable until the pod is removed from that index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodSlot(pub u32);

/// Result of a lookup: consecutive matched blocks per pod slot, plus the request's block count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixMatches {
    /// `blocks[slot]` = blocks pod `slot` holds consecutively from block 0 (0 for unknown slots).
    pub blocks: Vec<u32>,
    /// Full blocks in the request (the denominator of the prefix score).
    pub total: u32,
}

impl PrefixMatches {
    /// Matched blocks for a pod (0 when the pod is not in the index).
    pub fn get(&self, slot: Option<PodSlot>) -> u32 {
        slot.and_then(|s| self.blocks.get(s.0 as usize))
            .copied()
            .unwrap_or(0)
    }

    /// The longest match of any pod.
    pub fn longest(&self) -> u32 {
        self.blocks.iter().copied().max().unwrap_or(0)
    }

    /// Resets for a lookup over `pods` slots and `total` blocks, keeping the allocation.
    pub(crate) fn reset(&mut self, pods: usize, total: usize) {
        self.blocks.clear();
        self.blocks.resize(pods, 0);
        self.total = u32::try_from(total).unwrap_or(u32::MAX);
    }
}

/// Pod id <-> dense slot registry shared by both indexes.
#[derive(Debug, Default)]
pub(crate) struct Pods {
    ids: Vec<Option<EndpointId>>,
    by_id: HashMap<EndpointId, u32>,
    free: Vec<u32>,
}

impl Pods {
    pub fn slot(&self, id: &EndpointId) -> Option<PodSlot> {
        self.by_id.get(id).map(|&s| PodSlot(s))
    }

    /// Slot for `id`, allocating one if new. Returns (slot, newly added).
    pub fn add(&mut self, id: &EndpointId) -> (PodSlot, bool) {
        if let Some(&s) = self.by_id.get(id) {
            return (PodSlot(s), false);
        }
        let s = match self.free.pop() {
            Some(s) => {
                self.ids[s as usize] = Some(id.clone());
                s
            }
            None => {
                self.ids.push(Some(id.clone()));
                (self.ids.len() - 1) as u32
            }
        };
        self.by_id.insert(id.clone(), s);
        (PodSlot(s), true)
    }

    pub fn remove(&mut self, id: &EndpointId) -> Option<PodSlot> {
        let s = self.by_id.remove(id)?;
        self.ids[s as usize] = None;
        self.free.push(s);
        Some(PodSlot(s))
    }

    pub fn id(&self, slot: PodSlot) -> Option<&EndpointId> {
        self.ids.get(slot.0 as usize).and_then(Option::as_ref)
    }

    /// One past the highest slot ever handed out: the length of a per-slot array.
    pub fn span(&self) -> usize {
        self.ids.len()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}
