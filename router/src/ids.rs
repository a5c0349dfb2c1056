//! Per-thread seeded randomness and the identifiers built from it (request ids, W3C trace ids). The bottom layer of
//! the request path: everything may use it, it uses nothing of the crate.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::header::{HeaderMap, HeaderValue};
use rand::SeedableRng;
use rand::rngs::SmallRng;

static SEED: AtomicU64 = AtomicU64::new(0x5EED);
static THREADS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::seed_from_u64(
        SEED.load(Ordering::Relaxed) ^ THREADS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
}

/// Seeds the per-thread RNGs created from now on (log the seed to replay decisions).
pub fn seed(seed: u64) {
    SEED.store(seed, Ordering::Relaxed);
}

/// Runs `f` with this thread's seeded RNG (picks, weighted splits, ids). Never held across an `.await`.
pub fn with_rng<R>(f: impl FnOnce(&mut SmallRng) -> R) -> R {
    RNG.with(|r| f(&mut r.borrow_mut()))
}

/// Writes the low `out.len()` hex digits of `v` (lowercase, zero-padded) into `out`.
pub fn hex_into(mut v: u64, out: &mut [u8]) {
    for o in out.iter_mut().rev() {
        *o = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// The client's `x-request-id` when it is usable (non-empty visible ASCII, at most 128 bytes).
pub fn client_request_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    headers
        .get("x-request-id")
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.to_str().is_ok())
}

/// A new request id: `weir-` + 24 hex digits, built in place (once per request).
pub fn new_request_id() -> HeaderValue {
    let (a, b) = with_rng(|r| {
        use rand_core::RngCore;
        (r.next_u64(), r.next_u32())
    });
    let mut id = *b"weir-000000000000000000000000";
    hex_into(a, &mut id[5..21]);
    hex_into(u64::from(b), &mut id[21..29]);
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("weir-0"))
}

/// The request's id: the client's usable `x-request-id`, else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    client_request_id(headers)
        .cloned()
        .unwrap_or_else(new_request_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_usable_client_id_and_makes_one_otherwise() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        assert_eq!(request_id(&h), "abc");
        h.insert("x-request-id", HeaderValue::from_static(""));
        let made = request_id(&h);
        let s = made.to_str().unwrap();
        assert!(s.starts_with("weir-") && s.len() == 29, "{s}");
        assert!(s[5..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(made, request_id(&h));
    }
}
