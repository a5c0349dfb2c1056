//! Test-only helpers shared by the unit tests of this crate: a tiny seeded RNG and one fixed instant.
//!
//! Decision code never reads the clock; tests still need *some* `Instant` to pass in as `now`, and std offers no way to
//! make one except reading the clock, so this module is the crate's single place that does (test builds only).

use std::time::Instant;

use rand_core::RngCore;

/// splitmix64: a seeded RNG so tests need no extra crate and are reproducible.
pub struct Seeded(pub u64);

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

/// A base instant for tests; they offset from it (`now() + Duration::from_secs(..)`), never read the clock again.
pub fn now() -> Instant {
    #[allow(clippy::disallowed_methods)]
    Instant::now()
}

/// Pools of up to `max` endpoints for property tests of the pickers: every role, mostly available, loads drawn from
/// few values so scores tie (ties are where the RNG is drawn) and hot holders look imbalanced to the load gate.
pub fn arb_pool(
    max: usize,
) -> impl proptest::strategy::Strategy<Value = Vec<crate::endpoint::EndpointView>> {
    use crate::endpoint::{EndpointView, Role, ScrapedLoad};
    use proptest::prelude::*;
    let one = (
        prop_oneof![Just(Role::Both), Just(Role::Prefill), Just(Role::Decode)],
        proptest::bool::weighted(0.85),
        prop_oneof![Just(0u32), Just(2), 0u32..40],
        prop_oneof![Just(0u64), 0u64..300_000],
        prop_oneof![Just(0u64), Just(8_192), 0u64..40_000],
        proptest::option::weighted(0.8, (0u32..4, 0u32..64, prop_oneof![Just(10u8), 0u8..=100])),
    );
    proptest::collection::vec(one, 0..=max).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(
                |(
                    index,
                    (role, available, in_flight, in_flight_tokens, prefill_tokens, scraped),
                )| {
                    EndpointView {
                        index,
                        role,
                        available,
                        in_flight,
                        in_flight_tokens,
                        prefill_tokens,
                        scraped: scraped.map(|(waiting, running, kv)| ScrapedLoad {
                            waiting,
                            running,
                            kv_usage: f64::from(kv) / 100.0,
                            age_ms: 10,
                        }),
                    }
                },
            )
            .collect()
    })
}
