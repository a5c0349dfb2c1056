//! The storage both prefix indexes share: a slab of (block hash, pod) entries threaded on two intrusive lists.
//!
//! Each entry sits on a *holder chain* (all entries with the same block hash, found through one hash-map slot) and on
//! one *LRU list* (per pod for the approximate index, global for the precise one). Links are `u32` slab indices, so
//! an entry costs a fixed 40 bytes plus its share of the hash map, and nothing allocates per entry. Lookup walks the
//! request's block hashes in order and advances each holder's consecutive-match counter: `O(sum of holders)`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// End of a list.
pub(crate) const NIL: u32 = u32::MAX;

/// Keys are already uniformly distributed 64-bit hashes (xxh64, low 64 bits of sha256): hashing them again is waste.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-u64 keys; fold the bytes so it stays correct if ever used that way.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A `HashMap` keyed by a 64-bit hash, without rehashing.
pub(crate) type HashKeyed<V> = HashMap<u64, V, BuildHasherDefault<IdentityHasher>>;

/// Heap bytes of a hashbrown-backed map: buckets (capacity is 7/8 of them, a power of two) x (slot + control byte).
pub(crate) fn map_bytes<V>(m: &HashKeyed<V>) -> usize {
    if m.capacity() == 0 {
        return 0;
    }
    let buckets = (m.capacity() * 8 / 7).next_power_of_two();
    buckets * (std::mem::size_of::<(u64, V)>() + 1)
}

/// A block's holder-chain head, plus a bitmask of its holders among pod slots 0..64 so pools of up to 64 pods look
/// a block up with one hash probe instead of a chain walk (one cache miss per block, not one per holder).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    first: u32,
    mask: u64,
}

/// Bit of `pod` in a [`Head`] mask (0 for slots >= 64).
#[inline]
pub(crate) fn pod_bit(pod: u32) -> u64 {
    if pod < 64 { 1u64 << pod } else { 0 }
}

/// One (block, pod) fact.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    /// weir's block hash (PrefixHasher chain): what requests look up.
    pub key: u64,
    /// The engine's own block hash (precise index), so `BlockRemoved` can find the entry; 0 in the approximate index.
    pub aux: u64,
    /// Dense pod slot.
    pub pod: u32,
    /// How many times the engine stored this block without removing it (vLLM can hold duplicates); 1 for approximate.
    pub count: u32,
    h_prev: u32,
    h_next: u32,
    l_prev: u32,
    l_next: u32,
}

/// An LRU list threaded through the slab: `head` is the most recently used entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lru {
    head: u32,
    tail: u32,
    /// Entries on the list.
    pub len: u32,
}

impl Default for Lru {
    fn default() -> Self {
        Self {
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

impl Lru {
    /// Least recently used entry.
    pub fn back(&self) -> Option<u32> {
        (self.tail != NIL).then_some(self.tail)
    }
}

/// Slab + holder chains.
#[derive(Debug, Default)]
pub(crate) struct Table {
    entries: Vec<Entry>,
    /// Free-list head through `l_next`.
    free: Option<u32>,
    /// Block hash -> first entry of its holder chain and a bitmask of holders with pod slot < 64.
    heads: HashKeyed<Head>,
    live: usize,
    /// Slab never grows past this many entries (the index's bound).
    max_entries: usize,
}

impl Table {
    pub fn with_max(max_entries: usize) -> Self {
        Self {
            max_entries: max_entries.max(1),
            ..Self::default()
        }
    }

    pub fn live(&self) -> usize {
        self.live
    }

    pub fn get(&self, slot: u32) -> &Entry {
        &self.entries[slot as usize]
    }

    pub fn get_mut(&mut self, slot: u32) -> &mut Entry {
        &mut self.entries[slot as usize]
    }

    /// Heap bytes held by the slab and the chain-head map (capacity, not length: what the allocator gave us).
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>() + map_bytes(&self.heads)
    }

    /// A new entry at the front of `key`'s holder chain; not yet on any LRU list. The caller keeps `live` under the
    /// bound by evicting first.
    pub fn alloc(&mut self, key: u64, aux: u64, pod: u32) -> u32 {
        let (head, mask) = self.heads.get(&key).map_or((NIL, 0), |h| (h.first, h.mask));
        let e = Entry {
            key,
            aux,
            pod,
            count: 1,
            h_prev: NIL,
            h_next: head,
            l_prev: NIL,
            l_next: NIL,
        };
        let slot = match self.free {
            Some(s) => {
                self.free = match self.entries[s as usize].l_next {
                    NIL => None,
                    n => Some(n),
                };
                self.entries[s as usize] = e;
                s
            }
            None => {
                if self.entries.len() == self.entries.capacity() {
                    // Grow by a quarter (not doubling) and never past the bound, so allocated capacity stays within
                    // 25% of the live entries and never exceeds the configured cap.
                    let len = self.entries.len();
                    let want = (len + (len / 4).max(64)).min(self.max_entries).max(len + 1);
                    self.entries.reserve_exact(want - len);
                }
                self.entries.push(e);
                (self.entries.len() - 1) as u32
            }
        };
        if head != NIL {
            self.entries[head as usize].h_prev = slot;
        }
        self.heads.insert(
            key,
            Head {
                first: slot,
                mask: mask | pod_bit(pod),
            },
        );
        self.live += 1;
        slot
    }

    /// Unlinks `slot` from its holder chain and frees it. The caller must have taken it off its LRU list.
    pub fn release(&mut self, slot: u32) {
        let e = self.entries[slot as usize];
        if e.h_prev == NIL {
            if e.h_next == NIL {
                self.heads.remove(&e.key);
            } else if let Some(h) = self.heads.get_mut(&e.key) {
                h.first = e.h_next;
            }
        } else {
            self.entries[e.h_prev as usize].h_next = e.h_next;
        }
        if e.h_next != NIL {
            self.entries[e.h_next as usize].h_prev = e.h_prev;
        }
        // The pod may still hold the block through another entry (precise index: two engine hashes, one content).
        if let Some(first) = self.heads.get(&e.key).map(|h| h.first) {
            let mut mask = 0;
            let mut s = first;
            while s != NIL {
                let x = &self.entries[s as usize];
                mask |= pod_bit(x.pod);
                s = x.h_next;
            }
            if let Some(h) = self.heads.get_mut(&e.key) {
                h.mask = mask;
            }
        }
        let f = &mut self.entries[slot as usize];
        f.h_prev = NIL;
        f.h_next = NIL;
        f.l_prev = NIL;
        f.l_next = self.free.unwrap_or(NIL);
        self.free = Some(slot);
        self.live -= 1;
    }

    /// Entry for `(key, pod)` if present (walks the holder chain).
    pub fn find(&self, key: u64, pod: u32) -> Option<u32> {
        let mut s = self.heads.get(&key).map_or(NIL, |h| h.first);
        while s != NIL {
            let e = &self.entries[s as usize];
            if e.pod == pod {
                return Some(s);
            }
            s = e.h_next;
        }
        None
    }

    /// Calls `f(pod)` for every holder of `key`.
    #[inline]
    pub fn for_holders(&self, key: u64, mut f: impl FnMut(u32)) {
        let mut s = self.heads.get(&key).map_or(NIL, |h| h.first);
        while s != NIL {
            let e = &self.entries[s as usize];
            f(e.pod);
            s = e.h_next;
        }
    }

    /// Holders of `key` among pod slots 0..64, as a bitmask.
    #[inline]
    pub fn mask(&self, key: u64) -> u64 {
        self.heads.get(&key).map_or(0, |h| h.mask)
    }

    /// Consecutive matched blocks from block 0 per pod slot into `blocks` (zeroed, length = pod span). `extra(key,
    /// add)` reports additional holders of a block (speculative entries) by calling `add(pod_slot)`. Pools of at most
    /// 64 slots take the bitmask path; larger ones walk holder chains.
    pub fn consecutive(
        &self,
        hashes: &[u64],
        blocks: &mut [u32],
        extra: impl Fn(u64, &mut dyn FnMut(u32)),
    ) {
        let span = blocks.len();
        if span <= 64 {
            let mut alive: u64 = if span == 64 {
                u64::MAX
            } else {
                (1u64 << span) - 1
            };
            let mut stop = hashes.len() as u32;
            for (i, &h) in hashes.iter().enumerate() {
                let mut mask = self.mask(h);
                extra(h, &mut |p| mask |= pod_bit(p));
                let next = alive & mask;
                let mut dropped = alive & !next;
                while dropped != 0 {
                    blocks[dropped.trailing_zeros() as usize] = i as u32;
                    dropped &= dropped - 1;
                }
                alive = next;
                if alive == 0 {
                    stop = i as u32;
                    break;
                }
            }
            while alive != 0 {
                blocks[alive.trailing_zeros() as usize] = stop;
                alive &= alive - 1;
            }
            return;
        }
        for (i, &h) in hashes.iter().enumerate() {
            let i = i as u32;
            let mut any = false;
            let mut bump = |p: u32| {
                if let Some(m) = blocks.get_mut(p as usize)
                    && *m == i
                {
                    *m = i + 1;
                    any = true;
                }
            };
            self.for_holders(h, &mut bump);
            extra(h, &mut bump);
            if !any {
                break;
            }
        }
    }

    pub fn lru_push_front(&mut self, lru: &mut Lru, slot: u32) {
        let old = lru.head;
        {
            let e = &mut self.entries[slot as usize];
            e.l_prev = NIL;
            e.l_next = old;
        }
        if old != NIL {
            self.entries[old as usize].l_prev = slot;
        } else {
            lru.tail = slot;
        }
        lru.head = slot;
        lru.len += 1;
    }

    pub fn lru_unlink(&mut self, lru: &mut Lru, slot: u32) {
        let e = self.entries[slot as usize];
        if e.l_prev == NIL {
            lru.head = e.l_next;
        } else {
            self.entries[e.l_prev as usize].l_next = e.l_next;
        }
        if e.l_next == NIL {
            lru.tail = e.l_prev;
        } else {
            self.entries[e.l_next as usize].l_prev = e.l_prev;
        }
        let f = &mut self.entries[slot as usize];
        f.l_prev = NIL;
        f.l_next = NIL;
        lru.len -= 1;
    }

    /// Marks `slot` most recently used.
    pub fn lru_touch(&mut self, lru: &mut Lru, slot: u32) {
        if lru.head != slot {
            self.lru_unlink(lru, slot);
            self.lru_push_front(lru, slot);
        }
    }

    /// Slots on `lru`, most recent first (tests and pod teardown).
    pub fn lru_slots(&self, lru: &Lru) -> Vec<u32> {
        let mut out = Vec::with_capacity(lru.len as usize);
        let mut s = lru.head;
        while s != NIL {
            out.push(s);
            s = self.entries[s as usize].l_next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_is_forty_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 40);
    }

    #[test]
    fn chains_and_lru_survive_alloc_release_cycles() {
        let mut t = Table::with_max(8);
        let mut lru = Lru::default();
        let a = t.alloc(1, 0, 0);
        t.lru_push_front(&mut lru, a);
        let b = t.alloc(1, 0, 1);
        t.lru_push_front(&mut lru, b);
        let c = t.alloc(2, 0, 0);
        t.lru_push_front(&mut lru, c);
        let mut pods = vec![];
        t.for_holders(1, |p| pods.push(p));
        pods.sort_unstable();
        assert_eq!(pods, vec![0, 1]);
        assert_eq!(lru.back(), Some(a));
        t.lru_touch(&mut lru, a);
        assert_eq!(lru.back(), Some(b));
        t.lru_unlink(&mut lru, b);
        t.release(b);
        assert_eq!(t.find(1, 1), None);
        assert_eq!(t.find(1, 0), Some(a));
        let d = t.alloc(3, 0, 2);
        assert_eq!(d, b, "freed slot is reused");
        assert_eq!(t.live(), 3);
        assert_eq!(t.lru_slots(&lru), vec![a, c]);
    }
}
