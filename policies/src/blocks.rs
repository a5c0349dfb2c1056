//! Chained hashing of token-id blocks: the identity of a KV-cache block.
//!
//! Two hashers live here:
//! - [`VllmBlockHasher`]: vLLM's `sha256_cbor` (`sha256(cbor_canonical((parent, tuple(token_ids), extra_keys)))`,
//!   parent of block 0 = `NONE_HASH = sha256_cbor(PYTHONHASHSEED)`). The simulator uses it so its KV events carry the
//!   same hashes a vLLM pod with the same seed would publish. KV events carry the low 64 bits ([`low64`]).
//! - [`PrefixHasher`]: weir's own chained xxh3-64 over little-endian `u32` ids, seeded by model and `cache_salt`. The
//!   router keys its prefix index with it, so the index never depends on an engine's hash seed or algorithm.
//!
//! Only full blocks are hashed; a trailing partial block has no identity.

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64_with_seed;
use xxhash_rust::xxh64::xxh64;

/// vLLM's KV block size in tokens.
pub const BLOCK_SIZE: usize = 16;

/// A full 32-byte vLLM block hash.
pub type BlockHash = [u8; 32];

/// An extra key mixed into a block's hash (vLLM: LoRA name, multimodal hashes, `cache_salt` on block 0).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExtraKey {
    Str(String),
}

/// Low 64 bits of a 32-byte hash as vLLM puts them in KV events (last 8 bytes, big-endian).
pub fn low64(h: &BlockHash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[24..32]);
    u64::from_be_bytes(b)
}

/// vLLM's `sha256_cbor` chained block hasher.
#[derive(Debug, Clone)]
pub struct VllmBlockHasher {
    none_hash: BlockHash,
}

impl VllmBlockHasher {
    /// `NONE_HASH = sha256_cbor(seed)` as vLLM computes it when `PYTHONHASHSEED=seed`.
    pub fn with_seed(seed: &str) -> Self {
        let mut buf = Vec::with_capacity(seed.len() + 9);
        cbor::text(&mut buf, seed);
        Self {
            none_hash: Sha256::digest(&buf).into(),
        }
    }

    /// The parent hash used for the first block.
    pub fn none_hash(&self) -> &BlockHash {
        &self.none_hash
    }

    /// Hash of one full block given its parent (None for block 0) and extra keys.
    pub fn hash_block(
        &self,
        parent: Option<&BlockHash>,
        tokens: &[u32],
        extra: &[ExtraKey],
    ) -> BlockHash {
        let parent = parent.unwrap_or(&self.none_hash);
        let mut buf = Vec::with_capacity(48 + tokens.len() * 5);
        cbor::array_header(&mut buf, 3);
        cbor::bytes(&mut buf, parent);
        cbor::array_header(&mut buf, tokens.len() as u64);
        for &t in tokens {
            cbor::uint(&mut buf, u64::from(t));
        }
        if extra.is_empty() {
            cbor::null(&mut buf);
        } else {
            cbor::array_header(&mut buf, extra.len() as u64);
            for ExtraKey::Str(s) in extra {
                cbor::text(&mut buf, s);
            }
        }
        Sha256::digest(&buf).into()
    }

    /// Hashes of every full block of `tokens`; `cache_salt` (if any) is an extra key of block 0 only.
    pub fn block_hashes(
        &self,
        tokens: &[u32],
        block_size: usize,
        cache_salt: Option<&str>,
    ) -> Vec<BlockHash> {
        let mut out: Vec<BlockHash> = Vec::with_capacity(tokens.len() / block_size);
        let salt: Vec<ExtraKey> = cache_salt
            .map(|s| vec![ExtraKey::Str(s.to_string())])
            .unwrap_or_default();
        for (i, chunk) in tokens.chunks_exact(block_size).enumerate() {
            let extra: &[ExtraKey] = if i == 0 { &salt } else { &[] };
            let h = self.hash_block(out.last(), chunk, extra);
            out.push(h);
        }
        out
    }
}

/// weir's own chained block hash, used as the router's prefix-index key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixHasher {
    seed: u64,
    block_size: usize,
}

impl PrefixHasher {
    /// A hasher for one model (and optional `cache_salt`): different models never share keys.
    pub fn new(model: &str, cache_salt: Option<&str>, block_size: usize) -> Self {
        let mut seed_src = Vec::with_capacity(model.len() + 1 + cache_salt.map_or(0, str::len));
        seed_src.extend_from_slice(model.as_bytes());
        if let Some(s) = cache_salt {
            seed_src.push(0);
            seed_src.extend_from_slice(s.as_bytes());
        }
        Self {
            seed: xxh64(&seed_src, 0),
            block_size: block_size.max(1),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Chained hash of one block: `xxh3_64(le_u32 ids, seed = parent or model seed)` (xxh3: about twice xxh64's speed
    /// on 64-byte inputs, and this runs once per block of every routed prompt).
    pub fn hash_block(&self, parent: Option<u64>, tokens: &[u32]) -> u64 {
        xxh3_le(tokens, parent.unwrap_or(self.seed))
    }

    /// Hashes of every full block of `tokens`, chained from the first.
    pub fn block_hashes(&self, tokens: &[u32]) -> Vec<u64> {
        // The common block size as a constant lets xxh3's length dispatch and offsets fold away for every block.
        if self.block_size == BLOCK_SIZE {
            chain(tokens, BLOCK_SIZE, self.seed)
        } else {
            chain(tokens, self.block_size, self.seed)
        }
    }
}

/// Each block's hash seeds the next, so hashing is one dependency chain and anything added to it costs every block.
/// Hence a local `seed` (through a closure capture it went through memory: a store-to-load forward per block) and a
/// pre-sized output (`push`'s grow call in the loop made the compiler spill the multiply results to the stack).
#[inline(always)]
fn chain(tokens: &[u32], block_size: usize, mut seed: u64) -> Vec<u64> {
    let mut out = vec![0; tokens.len() / block_size];
    for (slot, block) in out.iter_mut().zip(tokens.chunks_exact(block_size)) {
        seed = xxh3_le(block, seed);
        *slot = seed;
    }
    out
}

/// xxh3-64 of `tokens` serialised little-endian. The copy into `buf` costs nothing where it matters: with the block
/// size a constant (16) the compiler reads the tokens' own memory on little-endian targets, and it is off the chain's
/// critical path anyway (the tokens do not depend on the seed).
#[inline(always)]
fn xxh3_le(tokens: &[u32], seed: u64) -> u64 {
    let mut buf = [0u8; 4 * 64];
    if tokens.len() <= 64 {
        for (bytes, t) in buf.chunks_exact_mut(4).zip(tokens) {
            bytes.copy_from_slice(&t.to_le_bytes());
        }
        xxh3_64_with_seed(&buf[..tokens.len() * 4], seed)
    } else {
        let v: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        xxh3_64_with_seed(&v, seed)
    }
}

/// The few canonical-CBOR items vLLM's `sha256_cbor` input needs (arrays, unsigned ints, byte and text strings,
/// null). Hand-written because a general CBOR crate would be a large dependency for five item kinds, and canonical
/// form here is simply "shortest length encoding", which these functions always produce.
mod cbor {
    fn head(buf: &mut Vec<u8>, major: u8, n: u64) {
        let m = major << 5;
        match n {
            0..=23 => buf.push(m | n as u8),
            24..=0xff => buf.extend_from_slice(&[m | 24, n as u8]),
            0x100..=0xffff => {
                buf.push(m | 25);
                buf.extend_from_slice(&(n as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                buf.push(m | 26);
                buf.extend_from_slice(&(n as u32).to_be_bytes());
            }
            _ => {
                buf.push(m | 27);
                buf.extend_from_slice(&n.to_be_bytes());
            }
        }
    }
    pub fn uint(buf: &mut Vec<u8>, n: u64) {
        head(buf, 0, n);
    }
    pub fn bytes(buf: &mut Vec<u8>, b: &[u8]) {
        head(buf, 2, b.len() as u64);
        buf.extend_from_slice(b);
    }
    pub fn text(buf: &mut Vec<u8>, s: &str) {
        head(buf, 3, s.len() as u64);
        buf.extend_from_slice(s.as_bytes());
    }
    pub fn array_header(buf: &mut Vec<u8>, n: u64) {
        head(buf, 4, n);
    }
    pub fn null(buf: &mut Vec<u8>) {
        buf.push(0xf6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_hash_is_sha256_of_cbor_text() {
        // cbor("0") = 0x61 0x30
        let h = VllmBlockHasher::with_seed("0");
        let expect: BlockHash = Sha256::digest([0x61u8, 0x30]).into();
        assert_eq!(h.none_hash(), &expect);
    }

    #[test]
    fn cbor_int_lengths() {
        let mut b = Vec::new();
        cbor::uint(&mut b, 23);
        cbor::uint(&mut b, 24);
        cbor::uint(&mut b, 500);
        cbor::uint(&mut b, 128_009);
        assert_eq!(
            b,
            vec![
                0x17, 0x18, 24, 0x19, 0x01, 0xf4, 0x1a, 0x00, 0x01, 0xf4, 0x09
            ]
        );
    }

    #[test]
    fn chains_depend_on_parent_and_salt() {
        let h = VllmBlockHasher::with_seed("0");
        let toks: Vec<u32> = (0..48).collect();
        let a = h.block_hashes(&toks, 16, None);
        let b = h.block_hashes(&toks, 16, Some("tenant-a"));
        assert_eq!(a.len(), 3);
        assert_ne!(a[0], b[0]);
        assert_ne!(
            a[2], b[2],
            "salt on block 0 changes every later hash through the chain"
        );
        // same tokens, different position -> different hash
        let mut shifted = toks.clone();
        shifted.rotate_left(16);
        assert_ne!(h.block_hashes(&shifted, 16, None)[1], a[1]);
    }

    #[test]
    fn prefix_hasher_ignores_partial_block_and_separates_models() {
        let toks: Vec<u32> = (0..40).collect();
        let p = PrefixHasher::new("m", None, 16);
        assert_eq!(p.block_hashes(&toks).len(), 2);
        let q = PrefixHasher::new("other", None, 16);
        assert_ne!(p.block_hashes(&toks)[0], q.block_hashes(&toks)[0]);
        assert_eq!(p.block_hashes(&toks[..32]), p.block_hashes(&toks));
    }

    /// The values the router's prefix index and the precise index's rebuilt keys have always had (computed with the
    /// implementation before the block-size-16 specialisation): a change here orphans every indexed block.
    #[test]
    fn prefix_hashes_are_pinned() {
        let toks: Vec<u32> = (0..70u32)
            .map(|i| i.wrapping_mul(2_654_435_761) >> 7)
            .collect();
        let first_last = |bs: usize| {
            let h = PrefixHasher::new("llama-3.1-8b", Some("tenant"), bs).block_hashes(&toks);
            (h.len(), h[0], h[h.len() - 1])
        };
        assert_eq!(first_last(1), (70, 0x21a55aab22b6246c, 0x893ba96ea450bc77));
        assert_eq!(first_last(4), (17, 0x7ecbc97f95a45211, 0xe6263dfdf103d3a8));
        assert_eq!(first_last(16), (4, 0x1e0f5d93033f0f3d, 0x9bd728cda8696d2e));
        assert_eq!(first_last(33), (2, 0x382a9df41d3bd6a0, 0xe4665bc929b093b5));
        assert_eq!(first_last(65), (1, 0xbf9ef5e62e50fd73, 0xbf9ef5e62e50fd73));
    }

    proptest::proptest! {
        /// `block_hashes` (block size 16 specialised) and `hash_block` equal the definition: xxh3 over each block's
        /// ids serialised little-endian, seeded by the previous block's hash (the model seed for block 0).
        #[test]
        fn prefix_hashes_match_the_byte_serialised_definition(
            toks in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..200),
            bs in 1usize..40,
        ) {
            for bs in [bs, BLOCK_SIZE] {
                let p = PrefixHasher::new("m", None, bs);
                let mut parent = None;
                let want: Vec<u64> = toks
                    .chunks_exact(bs)
                    .map(|c| {
                        let bytes: Vec<u8> = c.iter().flat_map(|t| t.to_le_bytes()).collect();
                        let h = xxh3_64_with_seed(&bytes, parent.unwrap_or(p.seed));
                        parent = Some(h);
                        h
                    })
                    .collect();
                proptest::prop_assert_eq!(p.block_hashes(&toks), want.clone());
                if let Some(&last) = want.last() {
                    let n = want.len();
                    let prev = (n > 1).then(|| want[n - 2]);
                    proptest::prop_assert_eq!(p.hash_block(prev, &toks[(n - 1) * bs..n * bs]), last);
                }
            }
        }
    }
}
