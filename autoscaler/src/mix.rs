//! The cheapest replica counts covering a demand: a bounded covering knapsack over the pools.
//!
//! Aggregated (`Both`) pods each cover the fraction `min(p_i / P, d_i / D)` of a demand of `P` prompt tokens/s and
//! `D` output tokens/s, where `p_i`, `d_i` are what one pod sustains within the SLO ([`Capacity`]). Disaggregated
//! serving covers `P` with prefill pods and `D` with decode pods, sized independently. The solver tries both shapes
//! (pools of the other shape stay at their minimum) and keeps the cheaper. Each covering problem is solved exactly on a
//! grid of a quarter of the smallest pod's coverage by dynamic programming over (pool, power-of-two chunk) items, so
//! covering more never costs less: the cost is monotone in the demand.

use serde::Serialize;
use sim::engine::Role;

use crate::capacity::Capacity;

/// One pool as the solver sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolOption {
    pub name: String,
    pub gpu: String,
    pub role: Role,
    /// USD per pod-hour.
    pub price_per_hour: f64,
    pub min: u32,
    pub max: u32,
    /// What one pod sustains within the SLO (zero = the pool cannot meet it).
    pub capacity: Capacity,
}

/// A demand to cover, tokens per second.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Demand {
    pub prompt_tok_s: f64,
    pub output_tok_s: f64,
}

impl Demand {
    /// Component-wise maximum.
    pub fn max(self, o: Demand) -> Demand {
        Demand {
            prompt_tok_s: self.prompt_tok_s.max(o.prompt_tok_s),
            output_tok_s: self.output_tok_s.max(o.output_tok_s),
        }
    }

    /// Both components times `k`.
    pub fn scale(self, k: f64) -> Demand {
        Demand {
            prompt_tok_s: self.prompt_tok_s * k,
            output_tok_s: self.output_tok_s * k,
        }
    }

    fn is_zero(&self) -> bool {
        !(self.prompt_tok_s > 0.0 || self.output_tok_s > 0.0)
    }
}

/// Replica counts per pool and what they cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mix {
    pub replicas: Vec<u32>,
    pub cost_per_hour: f64,
    /// False when even every pool at its maximum cannot cover the demand (then every usable pool is at its maximum).
    pub covered: bool,
}

/// Cost of counts.
pub fn cost(pools: &[PoolOption], counts: &[u32]) -> f64 {
    pools
        .iter()
        .zip(counts)
        .map(|(p, &n)| p.price_per_hour * f64::from(n))
        .sum()
}

fn share(cap: f64, need: f64) -> f64 {
    if need > 0.0 {
        cap / need
    } else {
        f64::INFINITY
    }
}

/// Fraction of demand `d` one pod of `p` covers in its role.
fn pod_share(p: &PoolOption, d: Demand) -> f64 {
    match p.role {
        Role::Both => share(p.capacity.prefill_tok_s, d.prompt_tok_s)
            .min(share(p.capacity.decode_tok_s, d.output_tok_s)),
        Role::Prefill => share(p.capacity.prefill_tok_s, d.prompt_tok_s),
        Role::Decode => share(p.capacity.decode_tok_s, d.output_tok_s),
    }
}

/// How many times over `counts` cover `d` (1.0 = exactly; infinite for a zero demand).
pub fn coverage(pools: &[PoolOption], counts: &[u32], d: Demand) -> f64 {
    if d.is_zero() {
        return f64::INFINITY;
    }
    let sum = |role: Role| -> f64 {
        pools
            .iter()
            .zip(counts)
            .filter(|(p, _)| p.role == role)
            .map(|(p, &n)| f64::from(n) * pod_share(p, d))
            .sum()
    };
    sum(Role::Both) + sum(Role::Prefill).min(sum(Role::Decode))
}

/// The cheapest counts within every pool's [min, max] covering `d`.
pub fn cheapest(pools: &[PoolOption], d: Demand) -> Mix {
    let mins: Vec<u32> = pools.iter().map(|p| p.min).collect();
    if d.is_zero() {
        return Mix {
            cost_per_hour: cost(pools, &mins),
            replicas: mins,
            covered: true,
        };
    }
    let only = |role: Role| -> Vec<usize> {
        (0..pools.len())
            .filter(|&i| pools[i].role == role)
            .collect()
    };
    let mut options = Vec::new();
    let both = only(Role::Both);
    if !both.is_empty() {
        let (c, ok) = cover(pools, &both, d, &mins);
        options.push((c, ok));
    }
    let (pre, dec) = (only(Role::Prefill), only(Role::Decode));
    if !pre.is_empty() && !dec.is_empty() {
        let prompt_only = Demand {
            prompt_tok_s: d.prompt_tok_s,
            output_tok_s: 0.0,
        };
        let output_only = Demand {
            prompt_tok_s: 0.0,
            output_tok_s: d.output_tok_s,
        };
        let (c1, ok1) = cover(pools, &pre, prompt_only, &mins);
        let (c2, ok2) = cover(pools, &dec, output_only, &c1);
        options.push((c2, ok1 && ok2));
    }
    let best = options
        .iter()
        .filter(|(_, ok)| *ok)
        .min_by(|a, b| cost(pools, &a.0).total_cmp(&cost(pools, &b.0)))
        .or_else(|| {
            options
                .iter()
                .max_by(|a, b| coverage(pools, &a.0, d).total_cmp(&coverage(pools, &b.0, d)))
        });
    match best {
        Some((counts, ok)) => Mix {
            cost_per_hour: cost(pools, counts),
            replicas: counts.clone(),
            covered: *ok,
        },
        None => Mix {
            cost_per_hour: cost(pools, &mins),
            replicas: mins,
            covered: false,
        },
    }
}

/// Largest grid the covering DP uses; beyond it the grid coarsens (a plan of thousands of pods).
const MAX_UNITS: f64 = 20_000.0;

/// Cover demand `d` with pools `idx` on top of `base` counts (which must already hold every pool's minimum).
fn cover(pools: &[PoolOption], idx: &[usize], d: Demand, base: &[u32]) -> (Vec<u32>, bool) {
    let mut counts = base.to_vec();
    let shares: Vec<f64> = idx.iter().map(|&i| pod_share(&pools[i], d)).collect();
    let have: f64 = idx
        .iter()
        .zip(&shares)
        .map(|(&i, s)| f64::from(base[i]) * s)
        .sum();
    let rem = 1.0 - have;
    if rem <= 1e-12 {
        return (counts, true);
    }
    let usable: Vec<(usize, f64)> = idx
        .iter()
        .zip(&shares)
        .filter(|(i, s)| **s > 0.0 && s.is_finite() && pools[**i].max > base[**i])
        .map(|(&i, &s)| (i, s))
        .collect();
    let room: f64 = usable
        .iter()
        .map(|&(i, s)| f64::from(pools[i].max - base[i]) * s)
        .sum();
    if room < rem - 1e-12 {
        for &(i, _) in &usable {
            counts[i] = pools[i].max;
        }
        return (counts, false);
    }
    let smallest = usable.iter().map(|&(_, s)| s).fold(f64::INFINITY, f64::min);
    let unit = (smallest / 4.0).max(rem / MAX_UNITS);
    let target = ((rem / unit) - 1e-9).ceil().max(1.0) as usize;
    // Items: (pool, pods, grid units, cost), counts split in powers of two.
    let mut items: Vec<(usize, u32, usize, f64)> = Vec::new();
    for &(i, s) in &usable {
        // The epsilon keeps exact multiples (a pod 10x another) from flooring to one unit less.
        let units = (s / unit + 1e-9).floor() as usize;
        if units == 0 {
            continue;
        }
        let mut left = pools[i].max - base[i];
        let mut k = 1u32;
        while left > 0 {
            let take = k.min(left);
            items.push((
                i,
                take,
                units * take as usize,
                pools[i].price_per_hour * f64::from(take),
            ));
            left -= take;
            k = k.saturating_mul(2);
        }
    }
    let mut dp = vec![f64::INFINITY; target + 1];
    dp[0] = 0.0;
    let mut from: Vec<Vec<u32>> = Vec::with_capacity(items.len());
    for &(_, _, units, c) in &items {
        let mut next = dp.clone();
        let mut f = vec![u32::MAX; target + 1];
        for (j, &here) in dp.iter().enumerate() {
            if !here.is_finite() {
                continue;
            }
            let nj = (j + units).min(target);
            let v = here + c;
            if v < next[nj] {
                next[nj] = v;
                f[nj] = j as u32;
            }
        }
        dp = next;
        from.push(f);
    }
    if !dp[target].is_finite() {
        // Flooring the grid lost the last sliver: fall back to every usable pool at its maximum.
        for &(i, _) in &usable {
            counts[i] = pools[i].max;
        }
        return (counts, true);
    }
    let mut j = target;
    for (k, f) in from.iter().enumerate().rev() {
        if f[j] != u32::MAX {
            counts[items[k].0] += items[k].1;
            j = f[j] as usize;
        }
    }
    (counts, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn pool(name: &str, role: Role, price: f64, p: f64, d: f64, max: u32) -> PoolOption {
        PoolOption {
            name: name.into(),
            gpu: name.into(),
            role,
            price_per_hour: price,
            min: 0,
            max,
            capacity: Capacity {
                rate: 1.0,
                prefill_tok_s: p,
                decode_tok_s: d,
                concurrency: 1.0,
            },
        }
    }

    fn demand(p: f64, d: f64) -> Demand {
        Demand {
            prompt_tok_s: p,
            output_tok_s: d,
        }
    }

    #[test]
    fn picks_the_cheaper_gpu_per_unit_of_capacity_and_tops_up_with_a_small_one() {
        let pools = vec![
            pool("big", Role::Both, 6.88, 10_000.0, 2_000.0, 16),
            pool("small", Role::Both, 0.80, 1_000.0, 200.0, 16),
        ];
        // 2.1 big pods of demand: 2 big + 1 small (14.56) beats 3 big (20.64) and 21 small (can't: max 16).
        let m = cheapest(&pools, demand(21_000.0, 4_200.0));
        assert_eq!(m.replicas, vec![2, 1]);
        assert!(m.covered);
        assert!((m.cost_per_hour - 14.56).abs() < 1e-9);
        assert!(coverage(&pools, &m.replicas, demand(21_000.0, 4_200.0)) >= 1.0);
    }

    #[test]
    fn prefill_and_decode_are_sized_independently_when_cheaper() {
        let pools = vec![
            pool("agg", Role::Both, 3.0, 1_000.0, 1_000.0, 20),
            pool("pre", Role::Prefill, 1.0, 2_000.0, 0.0, 20),
            pool("dec", Role::Decode, 2.0, 0.0, 2_000.0, 20),
        ];
        // Prompt-heavy: 8k prompt tok/s, 1k output: agg needs 8 (24 $/h); P/D needs 4 + 1 (6 $/h).
        let m = cheapest(&pools, demand(8_000.0, 1_000.0));
        assert_eq!(m.replicas, vec![0, 4, 1]);
    }

    #[test]
    fn bounds_hold_and_uncoverable_demand_uses_every_maximum() {
        let mut pools = vec![pool("a", Role::Both, 1.0, 100.0, 100.0, 3)];
        pools[0].min = 1;
        assert_eq!(cheapest(&pools, Demand::default()).replicas, vec![1]);
        let m = cheapest(&pools, demand(1e6, 1e6));
        assert_eq!((m.replicas.clone(), m.covered), (vec![3], false));
    }

    proptest! {
        #[test]
        fn within_bounds_covering_and_monotone_in_load(
            caps in proptest::collection::vec((0.5f64..10.0, 50.0f64..5000.0, 20.0f64..2000.0, 0u32..3, 1u32..40), 1..4),
            p in 0.0f64..50_000.0, d in 0.0f64..10_000.0, k in 1.0f64..3.0,
        ) {
            let pools: Vec<PoolOption> = caps.iter().enumerate().map(|(i, &(price, pc, dc, min, extra))| {
                let mut o = pool(&format!("p{i}"), Role::Both, price, pc, dc, min + extra);
                o.min = min;
                o
            }).collect();
            let lo = cheapest(&pools, demand(p, d));
            let hi = cheapest(&pools, demand(p * k, d * k));
            for (m, o) in [(&lo, demand(p, d)), (&hi, demand(p * k, d * k))] {
                for (n, pl) in m.replicas.iter().zip(&pools) {
                    prop_assert!(*n >= pl.min && *n <= pl.max);
                }
                if m.covered {
                    prop_assert!(coverage(&pools, &m.replicas, o) >= 1.0 - 1e-9);
                }
            }
            if lo.covered && hi.covered {
                prop_assert!(hi.cost_per_hour >= lo.cost_per_hour - 1e-9);
            }
        }
    }
}
