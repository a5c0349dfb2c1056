//! Engine behaviour tests through the public API (property tests included).

use super::*;

fn h100() -> Profile {
    Profile::resolve("h100", "llama-3.1-8b").unwrap()
}

fn cfg(p: Profile) -> EngineConfig {
    let mut c = EngineConfig::new(p);
    c.jitter = 0.0;
    c
}

/// Drive an engine until idle; returns (all events with their end time, all kv events).
fn run(e: &mut Engine, mut now: f64) -> (Vec<(f64, Event)>, Vec<KvEvent>, f64) {
    let mut evs = Vec::new();
    let mut kvs = Vec::new();
    for _ in 0..1_000_000 {
        if !e.has_work() {
            match e.next_wakeup() {
                Some(t) if e.num_requests() > 0 => now = now.max(t),
                _ => break,
            }
        }
        let out = e.step(now);
        now += out.duration;
        evs.extend(out.events.into_iter().map(|ev| (now, ev)));
        kvs.extend(out.kv_events);
    }
    (evs, kvs, now)
}

fn tokens_of(evs: &[(f64, Event)], id: ReqId) -> Vec<u32> {
    evs.iter()
        .filter_map(|(_, e)| match e {
            Event::Token { id: i, token, .. } if *i == id => Some(*token),
            _ => None,
        })
        .collect()
}

fn finished(evs: &[(f64, Event)], id: ReqId) -> (FinishReason, Usage, RequestTimes) {
    evs.iter()
        .find_map(|(_, e)| match e {
            Event::Finished {
                id: i,
                reason,
                usage,
                times,
                ..
            } if *i == id => Some((*reason, *usage, *times)),
            _ => None,
        })
        .unwrap()
}

#[test]
fn single_request_generates_max_tokens_with_ignore_eos() {
    let mut e = Engine::new(cfg(h100()));
    let mut r = EngineRequest::new(ReqId(1), (0..100).collect(), 20, 9);
    r.ignore_eos = true;
    e.add_request(r, 0.0).unwrap();
    let (evs, _, _) = run(&mut e, 0.0);
    let toks = tokens_of(&evs, ReqId(1));
    assert_eq!(
        toks,
        (0..20).map(|i| output_token(9, i)).collect::<Vec<_>>()
    );
    let (reason, usage, times) = finished(&evs, ReqId(1));
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: 100,
            completion_tokens: 20,
            cached_tokens: 0
        }
    );
    assert!(times.first_token > 0.0 && times.finished > times.first_token);
    assert_eq!(e.gauges().free_blocks, e.gauges().num_gpu_blocks - 1);
}

fn tiny(blocks: u32) -> Profile {
    let mut p = h100();
    p.num_gpu_blocks = blocks;
    p.max_model_len = (blocks - 1) * 16;
    p.max_num_batched_tokens = 256;
    p.max_num_seqs = 8;
    p
}

#[test]
fn repeated_prompt_hits_every_full_block_but_the_last_token_and_salt_separates() {
    let mut e = Engine::new(cfg(h100()));
    let prompt: Vec<u32> = (0..160).map(|i| i * 7 % 1000).collect(); // exactly 10 blocks
    e.add_request(EngineRequest::new(ReqId(1), prompt.clone(), 2, 1), 0.0)
        .unwrap();
    let (_, _, t) = run(&mut e, 0.0);
    // Full hit would be 160 tokens, but the last token is recomputed: 9 blocks.
    assert_eq!(e.peek_prefix_hit(&prompt, None, None), 144);
    assert_eq!(e.peek_prefix_hit(&prompt, Some("tenant-b"), None), 0);
    assert_eq!(e.peek_prefix_hit(&prompt, None, Some("adapter")), 0);
    let mut longer = prompt.clone();
    longer.extend([5, 6, 7]);
    assert_eq!(e.peek_prefix_hit(&longer, None, None), 160);
    e.add_request(EngineRequest::new(ReqId(2), prompt.clone(), 2, 1), t)
        .unwrap();
    let mut salted = EngineRequest::new(ReqId(3), prompt.clone(), 2, 1);
    salted.cache_salt = Some("tenant-b".into());
    e.add_request(salted, t).unwrap();
    let (evs, _, _) = run(&mut e, t);
    assert_eq!(finished(&evs, ReqId(2)).1.cached_tokens, 144);
    assert_eq!(finished(&evs, ReqId(3)).1.cached_tokens, 0);
    e.check_invariants().unwrap();
}

#[test]
fn kv_events_rebuild_the_cached_set_through_evictions_and_reset() {
    let mut e = Engine::new(cfg(tiny(24)));
    let mut live: std::collections::BTreeMap<u64, i64> = Default::default();
    let apply = |live: &mut std::collections::BTreeMap<u64, i64>, kvs: &[KvEvent]| {
        for k in kvs {
            match k {
                KvEvent::BlockStored {
                    block_hashes,
                    token_ids,
                    block_size,
                    ..
                } => {
                    assert_eq!(token_ids.len(), block_hashes.len() * *block_size as usize);
                    for h in block_hashes {
                        *live.entry(*h).or_default() += 1;
                    }
                }
                KvEvent::BlockRemoved { block_hashes } => {
                    for h in block_hashes {
                        let c = live.get_mut(h).expect("removed a hash never stored");
                        *c -= 1;
                        if *c == 0 {
                            live.remove(h);
                        }
                    }
                }
                KvEvent::AllBlocksCleared => live.clear(),
            }
        }
    };
    let mut now = 0.0;
    let mut removed = 0;
    for round in 0..3u64 {
        for i in 0..12u64 {
            let id = round * 100 + i;
            let base = (i % 4) as u32 * 1000; // four shared prefixes
            let prompt: Vec<u32> = (0..40 + (i as u32 % 3) * 17).map(|k| base + k).collect();
            e.add_request(EngineRequest::new(ReqId(id), prompt, 20, id), now)
                .unwrap();
        }
        let (_, kvs, t) = run(&mut e, now);
        now = t;
        removed += kvs
            .iter()
            .filter(|k| matches!(k, KvEvent::BlockRemoved { .. }))
            .count();
        apply(&mut live, &kvs);
        assert_eq!(
            live.keys().copied().collect::<BTreeSet<_>>(),
            e.cached_block_hashes()
        );
        e.check_invariants().unwrap();
        if round == 1 {
            assert!(e.reset_prefix_cache());
            assert!(e.cached_block_hashes().is_empty());
            let out = e.step(now);
            assert_eq!(out.duration, 0.0);
            apply(&mut live, &out.kv_events);
            assert!(live.is_empty());
        }
    }
    assert!(removed > 0, "the small cache must have evicted");
}

#[test]
fn reset_is_refused_while_blocks_are_in_use() {
    let mut e = Engine::new(cfg(h100()));
    e.add_request(EngineRequest::new(ReqId(1), (0..64).collect(), 50, 1), 0.0)
        .unwrap();
    e.step(0.0);
    assert!(!e.reset_prefix_cache());
    run(&mut e, 1.0);
    assert!(e.reset_prefix_cache());
}

fn timings(seed: u64, jitter: f64) -> Vec<(u64, u32, f64)> {
    let mut c = EngineConfig::new(tiny(40));
    c.seed = seed;
    c.jitter = jitter;
    let mut e = Engine::new(c);
    for i in 0..10u64 {
        let mut r = EngineRequest::new(
            ReqId(i),
            (0..(50 + i as u32 * 13))
                .map(|k| k * 3 + i as u32)
                .collect(),
            40,
            i,
        );
        r.ignore_eos = i % 2 == 0;
        e.add_request(r, i as f64 * 0.003).unwrap();
    }
    let (evs, _, _) = run(&mut e, 0.0);
    evs.iter()
        .filter_map(|(t, ev)| match ev {
            Event::Token { id, index, .. } => Some((id.0, *index, *t)),
            _ => None,
        })
        .collect()
}

#[test]
fn same_seed_same_timings_different_seed_differs() {
    assert_eq!(timings(1, 0.05), timings(1, 0.05));
    assert_ne!(timings(1, 0.05), timings(2, 0.05));
    assert_eq!(timings(1, 0.0), timings(2, 0.0));
}

#[test]
fn preemption_recomputes_without_reemitting() {
    // 20 usable blocks = 320 tokens; 4 requests that each grow to 150 tokens cannot all fit.
    let mut e = Engine::new(cfg(tiny(21)));
    for i in 0..4u64 {
        let mut r = EngineRequest::new(
            ReqId(i),
            (0..50).map(|k| k + 100 * i as u32).collect(),
            100,
            i,
        );
        r.ignore_eos = true;
        e.add_request(r, 0.0).unwrap();
    }
    let mut now = 0.0;
    let mut evs = Vec::new();
    let mut preemptions = 0;
    while e.has_work() {
        let out = e.step(now);
        now += out.duration;
        preemptions += out.stats.preemptions;
        evs.extend(out.events.into_iter().map(|ev| (now, ev)));
        e.check_invariants().unwrap();
    }
    assert!(preemptions > 0);
    for i in 0..4u64 {
        let toks = tokens_of(&evs, ReqId(i));
        assert_eq!(
            toks,
            (0..100).map(|k| output_token(i, k)).collect::<Vec<_>>()
        );
        assert_eq!(finished(&evs, ReqId(i)).0, FinishReason::Length);
    }
    assert_eq!(e.gauges().free_blocks, 20);
}

#[test]
fn priority_policy_admits_lower_value_first() {
    let mut p = h100();
    p.max_num_seqs = 1;
    let mut c = cfg(p);
    c.scheduling = SchedulingPolicy::Priority;
    let mut e = Engine::new(c);
    for (id, prio) in [(1u64, 5), (2, -1), (3, 0)] {
        let mut r = EngineRequest::new(ReqId(id), vec![1, 2, 3, id as u32], 3, id);
        r.priority = prio;
        r.ignore_eos = true;
        e.add_request(r, 0.0).unwrap();
    }
    let (evs, _, _) = run(&mut e, 0.0);
    let order: Vec<u64> = evs
        .iter()
        .filter_map(|(_, ev)| match ev {
            Event::Finished { id, .. } => Some(id.0),
            _ => None,
        })
        .collect();
    assert_eq!(order, vec![2, 3, 1]);
}

#[test]
fn eos_stop_ids_and_min_tokens() {
    let mut c = cfg(h100());
    c.natural_output_mean = 5.0;
    let mut e = Engine::new(c);
    let seed = (0..1000)
        .find(|&s| natural_output_len(s, 5.0) >= 3)
        .unwrap();
    let n = natural_output_len(seed, 5.0);
    e.add_request(EngineRequest::new(ReqId(1), vec![1; 20], 500, seed), 0.0)
        .unwrap();
    let mut min = EngineRequest::new(ReqId(2), vec![1; 20], 500, seed);
    min.min_tokens = n + 7;
    e.add_request(min, 0.0).unwrap();
    let stop_tok = output_token(seed, 1);
    let mut stop = EngineRequest::new(ReqId(3), vec![2; 20], 500, seed);
    stop.stop_token_ids = vec![stop_tok];
    e.add_request(stop, 0.0).unwrap();
    let (evs, _, _) = run(&mut e, 0.0);
    let t1 = tokens_of(&evs, ReqId(1));
    assert_eq!(t1.len() as u32, n);
    assert_eq!(*t1.last().unwrap(), EOS_TOKEN);
    let f1 = evs.iter().find_map(|(_, ev)| match ev {
        Event::Finished {
            id: ReqId(1),
            reason,
            stop_token,
            ..
        } => Some((*reason, *stop_token)),
        _ => None,
    });
    assert_eq!(f1, Some((FinishReason::Stop, Some(EOS_TOKEN))));
    assert_eq!(tokens_of(&evs, ReqId(2)).len() as u32, n + 7);
    let t3 = tokens_of(&evs, ReqId(3));
    let first_stop = (0..).find(|&k| output_token(seed, k) == stop_tok).unwrap();
    assert_eq!(t3.len() as u32, first_stop + 1);
    assert_eq!(finished(&evs, ReqId(3)).0, FinishReason::Stop);
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let mut e = Engine::new(cfg(tiny(10)));
    assert_eq!(
        e.add_request(EngineRequest::new(ReqId(1), vec![], 1, 0), 0.0),
        Err(EngineError::EmptyPrompt)
    );
    assert_eq!(
        e.add_request(EngineRequest::new(ReqId(1), vec![1], 0, 0), 0.0),
        Err(EngineError::ZeroMaxTokens)
    );
    assert!(matches!(
        e.add_request(EngineRequest::new(ReqId(1), vec![1; 140], 10, 0), 0.0),
        Err(EngineError::PromptTooLong {
            prompt_tokens: 140,
            max_tokens: 10,
            max_model_len: 144
        })
    ));
    e.add_request(EngineRequest::new(ReqId(1), vec![1; 10], 10, 0), 0.0)
        .unwrap();
    assert_eq!(
        e.add_request(EngineRequest::new(ReqId(1), vec![1; 10], 10, 0), 0.0),
        Err(EngineError::DuplicateId(ReqId(1)))
    );
    e.step(0.0);
    assert!(matches!(
        e.abort(ReqId(1), 0.1),
        Some(Event::Finished {
            reason: FinishReason::Abort,
            ..
        })
    ));
    assert!(e.abort(ReqId(1), 0.1).is_none());
    assert_eq!(e.gauges().free_blocks, 9);
    e.check_invariants().unwrap();
}

fn pd_request(id: u64, prompt: &[u32], kv: KvTransfer, max_tokens: u32) -> EngineRequest {
    let mut r = EngineRequest::new(ReqId(id), prompt.to_vec(), max_tokens, 4242);
    r.kv = kv;
    r
}

#[test]
fn prefill_then_decode_matches_a_both_engine() {
    let prompt: Vec<u32> = (0..8000).map(|k| k * 31 % 100_000).collect();
    // Reference: one `both` engine.
    let mut both = Engine::new(cfg(h100()));
    both.add_request(pd_request(1, &prompt, KvTransfer::None, 30), 0.0)
        .unwrap();
    let (bevs, _, _) = run(&mut both, 0.0);
    let expected = tokens_of(&bevs, ReqId(1));
    let prefill_ttft = finished(&bevs, ReqId(1)).2.first_token;

    // Prefill leg.
    let mut pc = cfg(h100());
    pc.role = Role::Prefill;
    pc.engine_id = "prefill-0".into();
    let mut pre = Engine::new(pc);
    let mut leg = pd_request(7, &prompt, KvTransfer::RemoteDecode, 1);
    leg.min_tokens = 1;
    pre.add_request(leg, 0.0).unwrap();
    let (pevs, _, _) = run(&mut pre, 0.0);
    let handoff = pevs
        .iter()
        .find_map(|(_, ev)| match ev {
            Event::Finished {
                reason: FinishReason::Length,
                handoff: Some(h),
                ..
            } => Some(h.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(handoff.remote_engine_id, "prefill-0");
    assert_eq!(handoff.remote_block_ids.len(), 8000usize.div_ceil(16));
    assert_eq!(pre.gauges().pinned_blocks, 500);
    pre.check_invariants().unwrap();

    // Decode leg.
    let mut dc = cfg(h100());
    dc.role = Role::Decode;
    let mut dec = Engine::new(dc);
    let kv = KvTransfer::RemotePrefill {
        remote_engine_id: handoff.remote_engine_id.clone(),
        remote_block_ids: handoff.remote_block_ids.clone(),
        remote_host: "10.0.0.1".into(),
        remote_port: 5600,
        remote_request_id: Some(handoff.remote_request_id.clone()),
    };
    let t0 = 10.0;
    dec.add_request(pd_request(9, &prompt, kv, 30), t0).unwrap();
    assert!(dec.has_work());
    let first = dec.step(t0);
    assert_eq!(first.duration, 0.0, "starting a pull computes nothing");
    assert_eq!(first.stats.external_hits, 8000);
    let wake = dec.next_wakeup().unwrap();
    let transfer = TransferModel::default().time(8000);
    assert!((wake - t0 - transfer).abs() < 1e-9);
    assert!(!dec.has_work());
    let (devs, _, _) = run(&mut dec, t0);
    assert_eq!(tokens_of(&devs, ReqId(9)), expected);
    let (_, usage, times) = finished(&devs, ReqId(9));
    assert_eq!(usage.cached_tokens, 8000);
    let ttft = times.first_token - t0;
    let one_step = {
        let mut s = crate::profile::BatchShape::default();
        s.add_decode(8000);
        h100().step_time(&s)
    };
    assert!(
        (ttft - transfer - one_step).abs() < 1e-6,
        "ttft {ttft} transfer {transfer} step {one_step}"
    );
    assert!(
        ttft < prefill_ttft / 2.0,
        "decode TTFT {ttft} vs prefill {prefill_ttft}"
    );
    let done = devs.iter().find_map(|(_, ev)| match ev {
        Event::TransferDone {
            remote_request_id,
            remote_port,
            ..
        } => Some((remote_request_id.clone(), *remote_port)),
        _ => None,
    });
    assert_eq!(done, Some((Some(handoff.remote_request_id.clone()), 5600)));

    // The prefill side unpins on release; a second release is a no-op.
    assert!(pre.release_transfer(&handoff.remote_request_id));
    assert!(!pre.release_transfer(&handoff.remote_request_id));
    assert_eq!(pre.gauges().pinned_blocks, 0);
    assert_eq!(pre.gauges().free_blocks, pre.gauges().num_gpu_blocks - 1);
    pre.check_invariants().unwrap();
}

#[test]
fn pinned_blocks_expire_after_the_timeout() {
    let mut c = cfg(h100());
    c.pinned_timeout_s = 30.0;
    let mut e = Engine::new(c);
    let mut leg = pd_request(1, &[3; 100], KvTransfer::RemoteDecode, 1);
    leg.min_tokens = 1;
    e.add_request(leg, 0.0).unwrap();
    let (evs, _, end) = run(&mut e, 0.0);
    assert!(evs.iter().any(|(_, ev)| matches!(
        ev,
        Event::Finished {
            handoff: Some(_),
            ..
        }
    )));
    assert_eq!(e.gauges().pinned_blocks, 7);
    let wake = e.next_wakeup().unwrap();
    assert!((wake - end - 30.0).abs() < 1e-9);
    e.step(wake - 1.0);
    assert_eq!(e.gauges().pinned_blocks, 7);
    e.step(wake);
    assert_eq!(e.gauges().pinned_blocks, 0);
    assert!(e.next_wakeup().is_none());
    e.check_invariants().unwrap();
}

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    struct Spec {
        at: u8,
        prefix: u8,
        len: u16,
        max_tokens: u16,
        ignore_eos: bool,
        priority: i8,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (0u8..40, 0u8..4, 1u16..120, 1u16..60, any::<bool>(), -2i8..3).prop_map(
            |(at, prefix, len, max_tokens, ignore_eos, priority)| Spec {
                at,
                prefix,
                len,
                max_tokens,
                ignore_eos,
                priority,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn kv_is_never_overallocated_or_leaked_and_every_request_finishes(
            specs in proptest::collection::vec(spec(), 1..30),
            blocks in 12u32..60,
            priority in any::<bool>(),
            caching in any::<bool>(),
        ) {
            let mut c = cfg(tiny(blocks));
            c.natural_output_mean = 20.0;
            c.enable_prefix_caching = caching;
            if priority { c.scheduling = SchedulingPolicy::Priority; }
            let mut e = Engine::new(c);
            let max_len = (blocks - 1) * 16;
            let mut accepted = Vec::new();
            let mut now = 0.0;
            let mut evs: Vec<(f64, Event)> = Vec::new();
            let mut sorted = specs.clone();
            sorted.sort_by_key(|s| s.at);
            let mut next = 0;
            for _ in 0..200_000 {
                while next < sorted.len() && f64::from(sorted[next].at) * 0.01 <= now {
                    let s = &sorted[next];
                    let prompt: Vec<u32> = (0..u32::from(s.len)).map(|k| if k < 48 { u32::from(s.prefix) * 1000 + k } else { k + next as u32 * 7919 }).collect();
                    let mut r = EngineRequest::new(ReqId(next as u64), prompt, u32::from(s.max_tokens), next as u64);
                    r.ignore_eos = s.ignore_eos;
                    r.priority = i32::from(s.priority);
                    let fits = u32::from(s.len) + u32::from(s.max_tokens) <= max_len;
                    let res = e.add_request(r, now);
                    prop_assert_eq!(res.is_ok(), fits);
                    if fits { accepted.push((next as u64, s.clone())); }
                    next += 1;
                }
                if !e.has_work() {
                    if next >= sorted.len() { break; }
                    now = now.max(f64::from(sorted[next].at) * 0.01);
                    continue;
                }
                let out = e.step(now);
                now += out.duration;
                prop_assert!(out.stats.prefix_hits <= out.stats.prefix_queries);
                evs.extend(out.events.into_iter().map(|ev| (now, ev)));
                if let Err(msg) = e.check_invariants() { prop_assert!(false, "{}", msg); }
            }
            prop_assert_eq!(e.num_requests(), 0, "every request finished");
            let g = e.gauges();
            prop_assert_eq!(g.free_blocks, blocks - 1, "no block leaked");
            for (id, s) in &accepted {
                let toks: Vec<(u32, u32)> = evs.iter().filter_map(|(_, ev)| match ev {
                    Event::Token { id: i, token, index } if i.0 == *id => Some((*index, *token)),
                    _ => None,
                }).collect();
                for (k, (index, token)) in toks.iter().enumerate() {
                    prop_assert_eq!(*index as usize, k, "indices contiguous, never re-emitted");
                    if *token != EOS_TOKEN { prop_assert_eq!(*token, output_token(*id, *index)); }
                }
                let (reason, usage, _) = finished(&evs, ReqId(*id));
                prop_assert_eq!(usage.completion_tokens as usize, toks.len());
                prop_assert!(usage.cached_tokens < u32::from(s.len), "hit <= prompt_len - 1");
                prop_assert!(usage.cached_tokens % 16 == 0, "whole blocks");
                if s.ignore_eos {
                    prop_assert_eq!(toks.len(), usize::from(s.max_tokens));
                    prop_assert_eq!(reason, FinishReason::Length);
                } else {
                    prop_assert!(toks.len() <= usize::from(s.max_tokens));
                }
            }
        }
    }
}
