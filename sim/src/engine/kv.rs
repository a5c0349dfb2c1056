//! The paged KV cache: a pool of fixed-size blocks with reference counts, vLLM's free-block LRU queue and the
//! prefix-cache index from block hash to block.
//!
//! The free queue is an O(1) intrusive doubly-linked list over block ids (`prev`/`next` arrays), exactly vLLM's
//! `FreeKVCacheBlockQueue`: allocation pops the front, freed blocks are appended at the tail, a prefix hit on a free
//! block unlinks it from the middle. A free block keeps its hash (and stays findable) until it is popped for reuse,
//! which is an eviction. Several blocks may carry the same hash (two requests computed the same prefix at once, as in
//! vLLM); they are chained per hash through `dup_next`. The index is keyed by the low 64 bits vLLM publishes in KV
//! events and checked against the full 32-byte hash, so a 64-bit collision is a miss, never a wrong hit.

use std::collections::{BTreeSet, HashMap};

use policies::blocks::{BlockHash, low64};

/// "No block" in the intrusive lists.
pub(crate) const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Block {
    /// Requests (or pins) holding this block; 0 means it sits in the free queue.
    ref_cnt: u32,
    /// Free-queue neighbours (NIL at the ends or when not queued).
    prev: u32,
    next: u32,
    /// Whether the block is linked into the free queue.
    queued: bool,
    /// Whether `hash` is meaningful and the block is in the index.
    hashed: bool,
    /// Full hash of the block's contents (valid when `hashed`).
    hash: BlockHash,
    /// Next block with the same low-64 hash key (NIL ends the chain).
    dup_next: u32,
}

/// Block pool + free LRU queue + prefix index.
#[derive(Debug, Clone)]
pub(crate) struct KvPool {
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    free_len: u32,
    /// low64(hash) -> first block of the chain of blocks carrying a hash with those low bits.
    index: HashMap<u64, u32>,
}

impl KvPool {
    /// `num_blocks` blocks; block 0 is the null block and is never handed out.
    pub(crate) fn new(num_blocks: u32) -> Self {
        let n = num_blocks.max(2);
        let mut blocks = Vec::with_capacity(n as usize);
        for i in 0..n {
            blocks.push(Block {
                ref_cnt: u32::from(i == 0),
                prev: if i <= 1 { NIL } else { i - 1 },
                next: if i == 0 || i + 1 == n { NIL } else { i + 1 },
                queued: i != 0,
                hashed: false,
                hash: [0; 32],
                dup_next: NIL,
            });
        }
        KvPool {
            blocks,
            head: 1,
            tail: n - 1,
            free_len: n - 1,
            index: HashMap::with_capacity(n as usize),
        }
    }

    /// Blocks in the free queue (cached-but-unreferenced blocks included).
    pub(crate) fn free_count(&self) -> u32 {
        self.free_len
    }

    /// Usable blocks (all but the null block).
    pub(crate) fn usable(&self) -> u32 {
        self.blocks.len() as u32 - 1
    }

    pub(crate) fn ref_count(&self, b: u32) -> u32 {
        self.blocks[b as usize].ref_cnt
    }

    /// A block currently cached under exactly `hash`, if any.
    pub(crate) fn lookup(&self, hash: &BlockHash) -> Option<u32> {
        let mut b = *self.index.get(&low64(hash))?;
        while b != NIL {
            let blk = &self.blocks[b as usize];
            if blk.hash == *hash {
                return Some(b);
            }
            b = blk.dup_next;
        }
        None
    }

    fn unlink(&mut self, b: u32) {
        let (prev, next) = {
            let blk = &self.blocks[b as usize];
            (blk.prev, blk.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let blk = &mut self.blocks[b as usize];
        blk.prev = NIL;
        blk.next = NIL;
        blk.queued = false;
        self.free_len -= 1;
    }

    fn push_tail(&mut self, b: u32) {
        let tail = self.tail;
        {
            let blk = &mut self.blocks[b as usize];
            blk.prev = tail;
            blk.next = NIL;
            blk.queued = true;
        }
        if tail == NIL {
            self.head = b;
        } else {
            self.blocks[tail as usize].next = b;
        }
        self.tail = b;
        self.free_len += 1;
    }

    /// Take a reference on a (prefix-hit) block, removing it from the free queue if it was free.
    pub(crate) fn touch(&mut self, b: u32) {
        if self.blocks[b as usize].ref_cnt == 0 {
            self.unlink(b);
        }
        self.blocks[b as usize].ref_cnt += 1;
    }

    /// Pop `n` blocks from the front of the free queue into `out`; hashed ones are evicted (their low-64 hash is
    /// pushed to `evicted`). All-or-nothing: returns false (and changes nothing) when fewer than `n` are free.
    pub(crate) fn allocate(&mut self, n: u32, out: &mut Vec<u32>, evicted: &mut Vec<u64>) -> bool {
        if n > self.free_len {
            return false;
        }
        for _ in 0..n {
            let b = self.head;
            self.unlink(b);
            if self.blocks[b as usize].hashed {
                evicted.push(low64(&self.blocks[b as usize].hash));
                self.uncache(b);
            }
            self.blocks[b as usize].ref_cnt = 1;
            out.push(b);
        }
        true
    }

    /// Drop one reference; a block reaching zero is appended to the free queue's tail (still cached).
    pub(crate) fn release(&mut self, b: u32) {
        let blk = &mut self.blocks[b as usize];
        debug_assert!(blk.ref_cnt > 0 && b != 0);
        blk.ref_cnt -= 1;
        if blk.ref_cnt == 0 {
            self.push_tail(b);
        }
    }

    /// Whether `b` carries a hash already.
    pub(crate) fn is_hashed(&self, b: u32) -> bool {
        self.blocks[b as usize].hashed
    }

    /// Register a full block under `hash` in the prefix index.
    pub(crate) fn cache(&mut self, b: u32, hash: &BlockHash) {
        let key = low64(hash);
        let head = self.index.insert(key, b).unwrap_or(NIL);
        let blk = &mut self.blocks[b as usize];
        blk.hashed = true;
        blk.hash = *hash;
        blk.dup_next = head;
    }

    fn uncache(&mut self, b: u32) {
        let key = low64(&self.blocks[b as usize].hash);
        let next = self.blocks[b as usize].dup_next;
        match self.index.get(&key).copied() {
            Some(h) if h == b => {
                if next == NIL {
                    self.index.remove(&key);
                } else {
                    self.index.insert(key, next);
                }
            }
            Some(mut cur) => {
                while cur != NIL {
                    let n = self.blocks[cur as usize].dup_next;
                    if n == b {
                        self.blocks[cur as usize].dup_next = next;
                        break;
                    }
                    cur = n;
                }
            }
            None => {}
        }
        let blk = &mut self.blocks[b as usize];
        blk.hashed = false;
        blk.dup_next = NIL;
    }

    /// Forget every hash (vLLM `reset_prefix_cache`); refuses (false) while any block is referenced.
    pub(crate) fn reset(&mut self) -> bool {
        if self.free_len != self.usable() {
            return false;
        }
        for blk in &mut self.blocks {
            blk.hashed = false;
            blk.dup_next = NIL;
        }
        self.index.clear();
        true
    }

    /// Low-64 hashes of every findable block.
    pub(crate) fn cached_hashes(&self) -> BTreeSet<u64> {
        self.index.keys().copied().collect()
    }

    /// Check every structural invariant; `held` = total references requests and pins hold per block.
    #[cfg(test)]
    pub(crate) fn check(&self, held: &HashMap<u32, u32>) -> Result<(), String> {
        let mut seen = vec![false; self.blocks.len()];
        let mut b = self.head;
        let mut prev = NIL;
        let mut n = 0;
        while b != NIL {
            if seen[b as usize] {
                return Err(format!("block {b} twice in free queue"));
            }
            seen[b as usize] = true;
            let blk = &self.blocks[b as usize];
            if blk.ref_cnt != 0 || !blk.queued || blk.prev != prev {
                return Err(format!("free block {b} inconsistent: {blk:?}"));
            }
            prev = b;
            b = blk.next;
            n += 1;
        }
        if prev != self.tail || n != self.free_len {
            return Err(format!("free queue length {n} vs {} / tail", self.free_len));
        }
        for (i, blk) in self.blocks.iter().enumerate().skip(1) {
            let want = held.get(&(i as u32)).copied().unwrap_or(0);
            if blk.ref_cnt != want {
                return Err(format!("block {i}: ref {} but held {want}", blk.ref_cnt));
            }
            if (blk.ref_cnt == 0) != seen[i] {
                return Err(format!(
                    "block {i}: ref {} but queued {}",
                    blk.ref_cnt, seen[i]
                ));
            }
            if blk.hashed && self.lookup(&blk.hash).is_none() {
                return Err(format!("hashed block {i} not findable"));
            }
        }
        let mut indexed = 0;
        for &h in self.index.values() {
            let mut c = h;
            while c != NIL {
                if !self.blocks[c as usize].hashed {
                    return Err(format!("unhashed block {c} in index"));
                }
                indexed += 1;
                c = self.blocks[c as usize].dup_next;
            }
        }
        let hashed = self.blocks.iter().filter(|b| b.hashed).count();
        if indexed != hashed {
            return Err(format!("{indexed} indexed vs {hashed} hashed"));
        }
        Ok(())
    }
}
