use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn t0() -> Instant {
    // A fixed origin: tests only compare instants derived from it (the crate's one test-only clock read).
    crate::testkit::now()
}

struct Mk {
    now: Instant,
    next: RequestId,
}

impl Mk {
    fn new() -> Self {
        Self { now: t0(), next: 0 }
    }
    fn req(&mut self, tenant: &str, tier: Tier, weight: f64, prompt: u64, out: u64) -> Request {
        self.next += 1;
        Request {
            id: self.next,
            tenant: Arc::from(tenant),
            tier,
            weight,
            prompt_tokens: prompt,
            expected_output: out,
            enqueued_at: self.now,
            deadline: self.now + Duration::from_secs(60),
        }
    }
}

fn dispatch_one(s: &mut Scheduler) -> Option<Grant> {
    s.add_room(1);
    let ids = s.dispatch();
    ids.first().and_then(|id| s.start(*id))
}

#[test]
fn strict_priority_between_tiers() {
    let mut mk = Mk::new();
    let mut s = Scheduler::new(FairConfig {
        min_share: [0.0; 3],
        ..FairConfig::default()
    });
    let b = mk.req("b", Tier::Batch, 1.0, 10, 10);
    let st = mk.req("s", Tier::Standard, 1.0, 10, 10);
    let i = mk.req("i", Tier::Interactive, 1.0, 10, 10);
    let ids = [b.id, st.id, i.id];
    for r in [b, st, i] {
        s.enqueue(r, 10).unwrap();
    }
    s.set_room(3);
    assert_eq!(s.dispatch(), vec![ids[2], ids[1], ids[0]]);
}

#[test]
fn fifo_within_a_tenant() {
    let mut mk = Mk::new();
    let mut s = Scheduler::new(FairConfig::default());
    let ids: Vec<_> = (0..5)
        .map(|_| {
            let r = mk.req("a", Tier::Standard, 1.0, 7, 3);
            let id = r.id;
            s.enqueue(r, 10).unwrap();
            id
        })
        .collect();
    s.set_room(5);
    assert_eq!(s.dispatch(), ids);
}

#[test]
fn interactive_arrival_displaces_an_unstarted_batch_grant_which_is_requeued() {
    let mut mk = Mk::new();
    let mut s = Scheduler::new(FairConfig::default());
    let b1 = mk.req("b", Tier::Batch, 1.0, 100, 100);
    let b2 = mk.req("b", Tier::Batch, 1.0, 100, 100);
    let (id1, id2) = (b1.id, b2.id);
    s.enqueue(b1, 10).unwrap();
    s.enqueue(b2, 10).unwrap();
    s.set_room(1);
    assert_eq!(s.dispatch(), vec![id1]);
    let before = s.counter("b", Tier::Batch).unwrap();
    assert_eq!(before, 300.0);
    let i = mk.req("i", Tier::Interactive, 1.0, 10, 10);
    let iid = i.id;
    assert_eq!(s.enqueue(i, 10), Ok(Some(id1)));
    // Requeued at the head of its tenant's queue, charge refunded; the interactive request takes the slot.
    assert!(s.is_queued(id1, "b", Tier::Batch) && !s.is_granted(id1));
    assert_eq!(s.counter("b", Tier::Batch), Some(0.0));
    assert_eq!(s.start(id1), None);
    assert_eq!(s.dispatch(), vec![iid]);
    s.add_room(2);
    assert_eq!(s.dispatch(), vec![id1, id2]);
}

#[test]
fn a_started_request_is_never_displaced() {
    let mut mk = Mk::new();
    let mut s = Scheduler::new(FairConfig::default());
    let b = mk.req("b", Tier::Batch, 1.0, 1, 1);
    let id = b.id;
    s.enqueue(b, 10).unwrap();
    s.set_room(1);
    s.dispatch();
    assert!(s.start(id).is_some());
    assert_eq!(
        s.enqueue(mk.req("i", Tier::Interactive, 1.0, 1, 1), 10),
        Ok(None)
    );
}

#[test]
fn queue_limits_shed_with_retry_after() {
    let mut mk = Mk::new();
    let cfg = FairConfig {
        max_queued_per_tier: [2, 2, 2],
        ..FairConfig::default()
    };
    let mut s = Scheduler::new(cfg);
    s.enqueue(mk.req("a", Tier::Batch, 1.0, 1, 1), 1).unwrap();
    assert_eq!(
        s.enqueue(mk.req("a", Tier::Batch, 1.0, 1, 1), 1),
        Err(Shed::TenantFull {
            retry_after: Duration::from_secs(1)
        })
    );
    s.enqueue(mk.req("b", Tier::Batch, 1.0, 1, 1), 1).unwrap();
    assert_eq!(
        s.enqueue(mk.req("c", Tier::Batch, 1.0, 1, 1), 1),
        Err(Shed::TierFull {
            tier: Tier::Batch,
            retry_after: Duration::from_secs(1)
        })
    );
    // Other tiers have their own bound.
    s.enqueue(mk.req("c", Tier::Standard, 1.0, 1, 1), 1)
        .unwrap();
}

#[test]
fn deadlines_expire_queued_requests_only() {
    let mut mk = Mk::new();
    let mut s = Scheduler::new(FairConfig::default());
    let mut short = mk.req("a", Tier::Standard, 1.0, 1, 1);
    short.deadline = mk.now + Duration::from_secs(1);
    let long = mk.req("a", Tier::Standard, 1.0, 1, 1);
    let (sid, lid) = (short.id, long.id);
    s.enqueue(short, 10).unwrap();
    s.enqueue(long, 10).unwrap();
    assert_eq!(s.next_deadline(), Some(mk.now + Duration::from_secs(1)));
    assert!(s.expire(mk.now).is_empty());
    let gone = s.expire(mk.now + Duration::from_secs(1));
    assert_eq!(gone.iter().map(|r| r.id).collect::<Vec<_>>(), vec![sid]);
    assert_eq!(s.queued(Tier::Standard), 1);
    s.set_room(1);
    assert_eq!(s.dispatch(), vec![lid]);
}

#[test]
fn cancelling_a_grant_refunds_and_returns_the_slot() {
    let mut mk = Mk::new();
    let mut s = Scheduler::new(FairConfig::default());
    let a = mk.req("a", Tier::Standard, 1.0, 10, 0);
    let id = a.id;
    s.enqueue(a, 10).unwrap();
    s.set_room(1);
    s.dispatch();
    assert_eq!(s.available(), 0);
    assert!(matches!(
        s.cancel(id, "a", Tier::Standard),
        Removed::Granted(_)
    ));
    assert_eq!(s.available(), 1);
    assert_eq!(s.counter("a", Tier::Standard), Some(0.0));
    assert_eq!(s.cancel(id, "a", Tier::Standard), Removed::Unknown);
}

#[test]
fn settlement_moves_the_counter_by_the_difference() {
    let mut mk = Mk::new();
    let mut s = Scheduler::new(FairConfig::default());
    s.enqueue(mk.req("a", Tier::Standard, 2.0, 10, 100), 10)
        .unwrap();
    let g = dispatch_one(&mut s).unwrap();
    assert_eq!(g.charged, 210.0);
    assert_eq!(s.counter("a", Tier::Standard), Some(105.0));
    s.settle(&g, 10, 20);
    assert_eq!(s.counter("a", Tier::Standard), Some(25.0));
}

#[test]
fn a_returning_tenant_is_lifted_to_the_backlogged_minimum() {
    let mut mk = Mk::new();
    let mut s = Scheduler::new(FairConfig::default());
    for _ in 0..10 {
        s.enqueue(mk.req("a", Tier::Standard, 1.0, 10, 0), 100)
            .unwrap();
    }
    for _ in 0..5 {
        dispatch_one(&mut s).unwrap();
    }
    // b was idle: it starts at a's counter, not at 0, so it alternates with a instead of taking 5 turns in a row.
    s.enqueue(mk.req("b", Tier::Standard, 1.0, 10, 0), 100)
        .unwrap();
    s.enqueue(mk.req("b", Tier::Standard, 1.0, 10, 0), 100)
        .unwrap();
    assert_eq!(s.counter("b", Tier::Standard), Some(50.0));
    let order: Vec<_> = (0..4)
        .map(|_| dispatch_one(&mut s).unwrap().request.tenant.to_string())
        .collect();
    assert_eq!(order, ["a", "b", "a", "b"]);
}

/// Runs `n` dispatches one at a time with every listed (tenant, tier, weight) kept backlogged, costs drawn from a
/// seeded generator; returns the cost served per tenant.
fn backlogged_run(
    tenants: &[(&str, Tier, f64)],
    n: usize,
    seed: u64,
    cfg: FairConfig,
) -> BTreeMap<String, f64> {
    let mut mk = Mk::new();
    let mut s = Scheduler::new(cfg);
    let mut x = seed | 1;
    let mut rnd = move |m: u64| {
        // xorshift64: deterministic, no dependency.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let mut served: BTreeMap<String, f64> = BTreeMap::new();
    for _ in 0..n {
        for (t, tier, w) in tenants {
            while s.bands[tier.rank()].queued_for(t) < 2 {
                let r = mk.req(t, *tier, *w, 1 + rnd(512), 1 + rnd(256));
                s.enqueue(r, 100).unwrap();
            }
        }
        let g = dispatch_one(&mut s).unwrap();
        *served.entry(g.request.tenant.to_string()).or_default() += g.charged;
    }
    served
}

#[test]
fn weighted_shares_are_within_five_percent_of_weights() {
    let tenants = [
        ("a", Tier::Standard, 1.0),
        ("b", Tier::Standard, 2.0),
        ("c", Tier::Standard, 3.0),
        ("d", Tier::Standard, 0.5),
    ];
    let served = backlogged_run(&tenants, 20_000, 7, FairConfig::default());
    let total: f64 = served.values().sum();
    let wsum: f64 = tenants.iter().map(|t| t.2).sum();
    for (t, _, w) in tenants {
        let share = served[t] / total;
        let want = w / wsum;
        assert!(
            (share / want - 1.0).abs() <= 0.05,
            "{t}: share {share:.4} want {want:.4}"
        );
    }
}

#[test]
fn jain_index_among_equal_weights_is_at_least_0_99() {
    let names: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
    let tenants: Vec<_> = names
        .iter()
        .map(|n| (n.as_str(), Tier::Batch, 1.0))
        .collect();
    let served = backlogged_run(&tenants, 10_000, 11, FairConfig::default());
    let xs: Vec<f64> = served.values().copied().collect();
    assert_eq!(xs.len(), 8);
    let j = jain(&xs);
    assert!(j >= 0.99, "jain {j}");
}

#[test]
fn jain_is_one_for_equal_and_one_over_n_for_a_monopoly() {
    assert_eq!(jain(&[3.0, 3.0, 3.0]), 1.0);
    assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
}

#[test]
fn no_tier_starves_under_a_higher_tier_flood() {
    let tenants = [
        ("i", Tier::Interactive, 1.0),
        ("s", Tier::Standard, 1.0),
        ("b", Tier::Batch, 1.0),
    ];
    let served = backlogged_run(&tenants, 10_000, 3, FairConfig::default());
    let total: f64 = served.values().sum();
    assert!(
        served["b"] / total >= 0.05 * 0.95,
        "batch share {}",
        served["b"] / total
    );
    assert!(
        served["s"] / total >= 0.20 * 0.95,
        "standard share {}",
        served["s"] / total
    );
    assert!(
        served["i"] / total >= 0.70,
        "interactive share {}",
        served["i"] / total
    );
}

#[derive(Debug, Clone)]
enum Op {
    Arrive {
        tenant: u8,
        tier: u8,
        prompt: u16,
        out: u16,
    },
    Room(u8),
    Dispatch,
    StartOldest,
    Cancel(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u8..3, 1u16..2048, 1u16..512).prop_map(|(tenant, tier, prompt, out)| Op::Arrive { tenant, tier, prompt, out }),
        1 => (0u8..4).prop_map(Op::Room),
        2 => Just(Op::Dispatch),
        2 => Just(Op::StartOldest),
        1 => any::<u8>().prop_map(Op::Cancel),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Where {
    Queued,
    Granted,
    Started,
    Cancelled,
    Shed,
}

proptest! {
    /// Every arrival is, at every step, in exactly one place; a revoked grant is back in the queue; dispatch is
    /// work-conserving (after it, either no room or nothing queued).
    #[test]
    fn requests_are_never_lost_and_dispatch_is_work_conserving(ops in proptest::collection::vec(op(), 1..200)) {
        let mut mk = Mk::new();
        let mut s = Scheduler::new(FairConfig { max_queued_per_tier: [20; 3], ..FairConfig::default() });
        let mut state: BTreeMap<RequestId, (Request, Where)> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Arrive { tenant, tier, prompt, out } => {
                    let r = mk.req(&format!("t{tenant}"), Tier::ALL[tier as usize], 1.0 + f64::from(tenant), prompt.into(), out.into());
                    match s.enqueue(r.clone(), 8) {
                        Ok(displaced) => {
                            state.insert(r.id, (r.clone(), Where::Queued));
                            if let Some(d) = displaced {
                                let e = state.get_mut(&d).unwrap();
                                prop_assert_eq!(e.1, Where::Granted);
                                prop_assert!(e.0.tier > r.tier);
                                e.1 = Where::Queued;
                            }
                        }
                        Err(_) => { state.insert(r.id, (r, Where::Shed)); }
                    }
                }
                Op::Room(n) => s.set_room(n.into()),
                Op::Dispatch => {
                    for id in s.dispatch() {
                        let e = state.get_mut(&id).unwrap();
                        prop_assert_eq!(e.1, Where::Queued);
                        e.1 = Where::Granted;
                    }
                    let queued: usize = Tier::ALL.iter().map(|t| s.queued(*t)).sum();
                    prop_assert!(s.available() == 0 || queued == 0);
                }
                Op::StartOldest => {
                    if let Some((&id, _)) = state.iter().find(|(_, e)| e.1 == Where::Granted) {
                        prop_assert!(s.start(id).is_some());
                        state.get_mut(&id).unwrap().1 = Where::Started;
                    }
                }
                Op::Cancel(k) => {
                    if state.is_empty() { continue; }
                    let id = *state.keys().nth(k as usize % state.len()).unwrap();
                    let (r, w) = state[&id].clone();
                    let got = s.cancel(id, &r.tenant, r.tier);
                    match w {
                        Where::Queued => prop_assert!(matches!(got, Removed::Queued(_))),
                        Where::Granted => prop_assert!(matches!(got, Removed::Granted(_))),
                        _ => prop_assert_eq!(got, Removed::Unknown),
                    }
                    if matches!(w, Where::Queued | Where::Granted) {
                        state.get_mut(&id).unwrap().1 = Where::Cancelled;
                    }
                }
            }
            for (id, (r, w)) in &state {
                prop_assert_eq!(s.is_queued(*id, &r.tenant, r.tier), *w == Where::Queued, "id {} {:?}", id, w);
                prop_assert_eq!(s.is_granted(*id), *w == Where::Granted);
            }
        }
    }

    /// Among continuously backlogged tenants of one tier, weighted service differs by at most twice the largest
    /// single weighted charge (the VTC bound).
    #[test]
    fn vtc_spread_among_backlogged_tenants_stays_bounded(
        weights in proptest::collection::vec(1u8..5, 2..5),
        costs in proptest::collection::vec((1u64..2048, 1u64..512), 50..300),
    ) {
        let mut mk = Mk::new();
        let mut s = Scheduler::new(FairConfig::default());
        let names: Vec<String> = (0..weights.len()).map(|i| format!("t{i}")).collect();
        let mut k = 0;
        let mut served = vec![0.0f64; weights.len()];
        let max_charge = (0..weights.len())
            .map(|i| costs.iter().map(|(p, o)| (*p as f64 + 2.0 * *o as f64) / f64::from(weights[i])).fold(0.0, f64::max))
            .fold(0.0, f64::max);
        for _ in 0..costs.len() {
            for (i, n) in names.iter().enumerate() {
                // Two queued, so a tenant's queue never empties between a dispatch and its refill.
                while s.bands[Tier::Standard.rank()].queued_for(n) < 2 {
                    let (p, o) = costs[k % costs.len()];
                    k += 1;
                    s.enqueue(mk.req(n, Tier::Standard, f64::from(weights[i]), p, o), 10).unwrap();
                }
            }
            let g = dispatch_one(&mut s).unwrap();
            let i = names.iter().position(|n| **n == *g.request.tenant).unwrap();
            served[i] += g.charged / f64::from(weights[i]);
            let (lo, hi) = served.iter().fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            prop_assert!(hi - lo <= 2.0 * max_charge, "spread {} bound {}", hi - lo, 2.0 * max_charge);
        }
    }

    /// With every tier backlogged, each tier with a floor gets at least (almost) its floor of dispatched cost.
    #[test]
    fn no_tier_starves(seed in any::<u64>()) {
        let tenants = [("i", Tier::Interactive, 1.0), ("s", Tier::Standard, 1.0), ("b", Tier::Batch, 1.0)];
        let served = backlogged_run(&tenants, 3000, seed, FairConfig::default());
        let total: f64 = served.values().sum();
        prop_assert!(served["b"] / total >= 0.045, "batch {}", served["b"] / total);
        prop_assert!(served["s"] / total >= 0.18, "standard {}", served["s"] / total);
    }
}

#[test]
fn batch_leaves_the_reserve_to_the_other_tiers_and_takes_freed_slots_beyond_it() {
    let mut mk = Mk::new();
    let mut s = Scheduler::new(FairConfig::default());
    let batch: Vec<_> = (0..4)
        .map(|_| mk.req("b", Tier::Batch, 1.0, 10, 0))
        .collect();
    let ids: Vec<_> = batch.iter().map(|r| r.id).collect();
    for r in batch {
        s.enqueue(r, 10).unwrap();
    }
    // 3 slots, 2 of them reserved: batch takes one.
    s.set_room_reserved(3, 2);
    assert_eq!(s.dispatch(), vec![ids[0]]);
    assert_eq!(s.available(), 2);
    // An interactive arrival takes a reserved slot at once.
    let i = mk.req("i", Tier::Interactive, 1.0, 10, 0);
    let iid = i.id;
    s.enqueue(i, 10).unwrap();
    assert_eq!(s.dispatch(), vec![iid]);
    // A freed slot beyond the reserve goes to batch: it keeps the pace of completions.
    s.add_room(1);
    assert!(s.dispatch().is_empty(), "2 slots left, both reserved");
    s.add_room(1);
    assert_eq!(s.dispatch(), vec![ids[1]]);
    // Without a reserve batch takes everything.
    s.set_room(5);
    assert_eq!(s.dispatch(), vec![ids[2], ids[3]]);
}
