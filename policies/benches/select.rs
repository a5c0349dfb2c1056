//! Full cache-aware routing decision for 64 endpoints: hash a 4k-token prompt (one variant), prefix-index lookup,
//! gate, all scorers, max-score pick; plus a decision-record variant, and the same decision by the predicted-TTFT
//! picker (`cache-aware`'s picker since weir issue 27: lookup, gate, a TTFT prediction per pod, least wins). After criterion, a plain loop measures the
//! per-decision latency distribution (p50/p99/p99.9 over 100,000 decisions) that criterion's mean hides.
//! Run: `cargo bench -p policies --bench select`.

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use policies::blocks::PrefixHasher;
use policies::endpoint::{EndpointId, EndpointView, Role, ScrapedLoad};
use policies::pick::RequestView;
use policies::pick::predicted_ttft::PrefillModel;
use policies::pick::prefix::RequestFacts;
use policies::pick::profile::Profile;
use policies::prefix::{ApproxIndex, PodSlot, PrefixMatches};
use rand_core::RngCore;

const PODS: usize = 64;
const PROMPT: usize = 4096;

/// splitmix64.
struct Seeded(u64);
impl RngCore for Seeded {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        rand_core::impls::fill_bytes_via_next(self, dst)
    }
}

struct World {
    hasher: PrefixHasher,
    index: ApproxIndex,
    slots: Vec<PodSlot>,
    ids: Vec<EndpointId>,
    eps: Vec<EndpointView>,
    profile: Profile,
    /// The predicted-TTFT profile.
    ttft: Profile,
    /// 4k-token prompts: 100 shared 3k-token prefixes + unique 1k suffixes.
    prompts: Vec<Vec<u32>>,
    hashes: Vec<Vec<u64>>,
}

fn world() -> World {
    let hasher = PrefixHasher::new("llama-3.1-8b", None, 16);
    let mut index = ApproxIndex::default();
    let ids: Vec<EndpointId> = (0..PODS)
        .map(|i| EndpointId::new(format!("pod-{i:02}")))
        .collect();
    let slots: Vec<PodSlot> = ids.iter().map(|id| index.add_pod(id)).collect();
    let mut rng = Seeded(42);
    let eps: Vec<EndpointView> = (0..PODS)
        .map(|index| EndpointView {
            index,
            role: Role::Both,
            available: true,
            in_flight: (rng.next_u32() % 32),
            in_flight_tokens: u64::from(rng.next_u32() % 200_000),
            prefill_tokens: 0,
            scraped: Some(ScrapedLoad {
                waiting: rng.next_u32() % 8,
                running: rng.next_u32() % 64,
                kv_usage: f64::from(rng.next_u32() % 100) / 100.0,
                age_ms: 20,
            }),
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..1000u32)
        .map(|r| {
            let group = r % 100;
            (0..3072u32)
                .map(|k| group * 1_000_000 + k)
                .chain((0..(PROMPT as u32 - 3072)).map(|k| 500_000_000 + r * 4096 + k))
                .collect()
        })
        .collect();
    let hashes: Vec<Vec<u64>> = prompts.iter().map(|p| hasher.block_hashes(p)).collect();
    // Warm the index: each prompt routed to 1-2 pods.
    for (r, h) in hashes.iter().enumerate() {
        index.record(slots[r % PODS], h);
        if r % 3 == 0 {
            index.record(slots[(r * 7 + 1) % PODS], h);
        }
    }
    World {
        hasher,
        index,
        slots,
        ids,
        eps,
        profile: Profile::cache_aware(),
        ttft: Profile::predicted_ttft(PrefillModel::default(), clock()),
        prompts,
        hashes,
    }
}

/// One decision by `profile`: optional hashing, lookup, facts, gate + scorers (or predictions) + pick.
fn decide(
    w: &World,
    profile: &Profile,
    r: usize,
    hash: bool,
    m: &mut PrefixMatches,
    rng: &mut Seeded,
    now: Instant,
) -> usize {
    let owned;
    let hashes: &[u64] = if hash {
        owned = w.hasher.block_hashes(&w.prompts[r]);
        &owned
    } else {
        &w.hashes[r]
    };
    w.index.lookup(hashes, m);
    let facts = RequestFacts {
        matched: w.slots.iter().map(|&s| m.get(Some(s))).collect(),
        total_blocks: m.total,
        block_size: 16,
        session_pod: None,
    };
    let req = RequestView {
        prompt_tokens: PROMPT as u32,
        max_tokens: Some(256),
    };
    match profile.decide(&req, &w.eps, &facts, now, rng) {
        Ok(routed) => routed.choice.index,
        Err(_) => usize::MAX,
    }
}

fn decide_and_explain(
    w: &World,
    r: usize,
    m: &mut PrefixMatches,
    rng: &mut Seeded,
    now: Instant,
) -> usize {
    w.index.lookup(&w.hashes[r], m);
    let facts = RequestFacts {
        matched: w.slots.iter().map(|&s| m.get(Some(s))).collect(),
        total_blocks: m.total,
        block_size: 16,
        session_pod: None,
    };
    let req = RequestView {
        prompt_tokens: PROMPT as u32,
        max_tokens: Some(256),
    };
    match w.profile.decide(&req, &w.eps, &facts, now, rng) {
        Ok(routed) => w
            .profile
            .explain(&req, &w.eps, &facts, &routed, &w.ids, now)
            .len(),
        Err(_) => 0,
    }
}

#[allow(clippy::disallowed_methods)] // benchmark timing is the one place that reads the real clock
fn clock() -> Instant {
    Instant::now()
}

fn criterion_benches(c: &mut Criterion, w: &World) {
    let now = clock();
    let mut g = c.benchmark_group("select_64_endpoints_4k_prompt");
    let mut m = PrefixMatches::default();
    let mut rng = Seeded(1);
    let mut r = 0usize;
    g.bench_function("hash+lookup+score+pick", |b| {
        b.iter(|| {
            r = (r + 1) % w.prompts.len();
            black_box(decide(w, &w.profile, r, true, &mut m, &mut rng, now))
        })
    });
    g.bench_function("lookup+score+pick (prehashed)", |b| {
        b.iter(|| {
            r = (r + 1) % w.prompts.len();
            black_box(decide(w, &w.profile, r, false, &mut m, &mut rng, now))
        })
    });
    g.bench_function("predicted-ttft: hash+lookup+predict+pick", |b| {
        b.iter(|| {
            r = (r + 1) % w.prompts.len();
            black_box(decide(w, &w.ttft, r, true, &mut m, &mut rng, now))
        })
    });
    g.bench_function("predicted-ttft: lookup+predict+pick (prehashed)", |b| {
        b.iter(|| {
            r = (r + 1) % w.prompts.len();
            black_box(decide(w, &w.ttft, r, false, &mut m, &mut rng, now))
        })
    });
    g.bench_function("prehashed + decision record", |b| {
        b.iter(|| {
            r = (r + 1) % w.prompts.len();
            black_box(decide_and_explain(w, r, &mut m, &mut rng, now))
        })
    });
    g.bench_function("lookup only", |b| {
        b.iter(|| {
            r = (r + 1) % w.prompts.len();
            w.index.lookup(&w.hashes[r], &mut m);
            black_box(m.total)
        })
    });
    let facts = RequestFacts {
        matched: (0..PODS as u32)
            .map(|i| if i % 9 == 0 { 192 } else { 0 })
            .collect(),
        total_blocks: 256,
        block_size: 16,
        session_pod: None,
    };
    let req = RequestView {
        prompt_tokens: PROMPT as u32,
        max_tokens: Some(256),
    };
    g.bench_function("gate+score+pick only", |b| {
        b.iter(|| {
            black_box(
                w.profile
                    .decide(&req, &w.eps, &facts, now, &mut rng)
                    .is_ok(),
            )
        })
    });
    g.bench_function("hash only (4k tokens)", |b| {
        b.iter(|| {
            r = (r + 1) % w.prompts.len();
            black_box(w.hasher.block_hashes(&w.prompts[r]).len())
        })
    });
    g.finish();
}

/// Per-decision latency percentiles over `n` decisions by `profile` (named `name`).
fn percentiles(w: &World, name: &str, profile: &Profile, hash: bool, n: usize) {
    let now = clock();
    let mut m = PrefixMatches::default();
    let mut rng = Seeded(9);
    let mut ns: Vec<u64> = Vec::with_capacity(n);
    for i in 0..n {
        let r = i % w.prompts.len();
        let t = clock();
        black_box(decide(w, profile, r, hash, &mut m, &mut rng, now));
        ns.push(t.elapsed().as_nanos() as u64);
    }
    ns.sort_unstable();
    let p = |q: f64| ns[((n as f64 * q) as usize).min(n - 1)] as f64 / 1000.0;
    println!(
        "p99 loop, {name}, {n} decisions, {} : p50 {:.2} us  p99 {:.2} us  p99.9 {:.2} us  max {:.2} us",
        if hash {
            "hash+decide"
        } else {
            "prehashed decide"
        },
        p(0.50),
        p(0.99),
        p(0.999),
        ns[n - 1] as f64 / 1000.0
    );
}

fn main() {
    let w = world();
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &w);
    c.final_summary();
    for (name, p) in [("scorers", &w.profile), ("predicted-ttft", &w.ttft)] {
        percentiles(&w, name, p, false, 100_000);
        percentiles(&w, name, p, true, 100_000);
    }
}
