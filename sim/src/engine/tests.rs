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
