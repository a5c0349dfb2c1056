//! End-to-end: a ZMQ subscriber rebuilding the block set from `weir sim`'s KV events (with replay filling the gap
//! before the subscription took effect) ends equal to the engine's cached set, across evictions and a cache reset.

#![allow(clippy::unwrap_used)] // the replay helper below

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use common::{Weir, client};
use policies::kv_events::{KvCacheEvent, decode_batch};
use serde_json::{Value, json};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

fn apply(set: &mut BTreeSet<u64>, events: &[KvCacheEvent]) {
    for e in events {
        match e {
            KvCacheEvent::BlockStored { block_hashes, .. } => {
                set.extend(block_hashes.iter().copied())
            }
            KvCacheEvent::BlockRemoved { block_hashes, .. } => {
                for h in block_hashes {
                    set.remove(h);
                }
            }
            KvCacheEvent::AllBlocksCleared => set.clear(),
        }
    }
}

async fn replay(endpoint: &str, start: u64) -> BTreeMap<u64, Bytes> {
    let mut d = zeromq::DealerSocket::new();
    d.connect(endpoint).await.expect("connect replay");
    let req = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .unwrap();
    d.send(req).await.unwrap();
    let mut out = BTreeMap::new();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(5), d.recv())
            .await
            .expect("replay timeout")
            .unwrap()
            .into_vec();
        let seq = u64::from_be_bytes(<[u8; 8]>::try_from(f[1].as_ref()).unwrap());
        if seq == u64::MAX {
            assert!(f[2].is_empty());
            return out;
        }
        out.insert(seq, f[2].clone());
    }
}

#[tokio::test]
async fn subscriber_rebuild_matches_engine_after_evictions_and_reset() {
    let sim = Weir::sim(&["--num-gpu-blocks", "64", "--kv-events-port", "0"]).await;
    let ep = sim.endpoint(0).clone();
    let url = sim.url().to_string();
    let model = ep["model"].as_str().unwrap().to_string();
    let topic_expected = format!("kv@{}@{model}", url.trim_start_matches("http://"));

    let mut sub = zeromq::SubSocket::new();
    sub.connect(ep["kv_events"].as_str().unwrap())
        .await
        .unwrap();
    sub.subscribe("").await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Bytes>>();
    tokio::spawn(async move {
        while let Ok(m) = sub.recv().await {
            if tx.send(m.into_vec()).is_err() {
                break;
            }
        }
    });

    // A seeded random workload: shared system prefixes, varied suffixes, enough tokens to overflow 63 blocks.
    let client = client();
    let mut x: u64 = 42;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    let systems: Vec<String> = (0..4)
        .map(|i| format!("System prompt number {i}. ").repeat(12))
        .collect();
    for round in 0..2 {
        for _ in 0..14 {
            let sys = &systems[(next() % 4) as usize];
            let user = format!("question {} ", next()).repeat(1 + (next() % 20) as usize);
            let body = json!({"model": model, "prompt": format!("{sys}{user}"), "max_tokens": 1 + next() % 24,
                "ignore_eos": true});
            let res = client
                .post(format!("{url}/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        }
        if round == 0 {
            let res = client
                .post(format!("{url}/reset_prefix_cache"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        }
    }

    // The engine's view, and the subscriber's once every batch has arrived (poll, no sleeps for correctness).
    let engine: BTreeSet<u64> = {
        let v: Value = client
            .get(format!("{url}/sim/debug/cached_blocks"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_u64().unwrap())
            .collect()
    };
    assert!(!engine.is_empty());
    let mut live: BTreeMap<u64, Bytes> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let replayed = loop {
        while let Ok(frames) = rx.try_recv() {
            assert_eq!(frames.len(), 3);
            assert_eq!(std::str::from_utf8(&frames[0]).unwrap(), topic_expected);
            let seq = u64::from_be_bytes(<[u8; 8]>::try_from(frames[1].as_ref()).unwrap());
            live.insert(seq, frames[2].clone());
        }
        let all = replay(ep["replay"].as_str().unwrap(), 0).await;
        let mut set = BTreeSet::new();
        for p in all.values() {
            apply(&mut set, &decode_batch(p).unwrap().events);
        }
        if set == engine || tokio::time::Instant::now() > deadline {
            assert_eq!(
                set, engine,
                "rebuilt set differs from the engine's cached set"
            );
            break all;
        }
        tokio::task::yield_now().await;
    };
    // Sequence numbers are dense from 0; what the subscriber saw is byte-identical to the replay.
    assert_eq!(
        replayed.keys().copied().collect::<Vec<_>>(),
        (0..replayed.len() as u64).collect::<Vec<_>>()
    );
    for (seq, p) in &live {
        assert_eq!(replayed.get(seq), Some(p), "seq {seq}");
    }
    let kinds: Vec<KvCacheEvent> = replayed
        .values()
        .flat_map(|p| decode_batch(p).unwrap().events)
        .collect();
    assert!(
        kinds
            .iter()
            .any(|e| matches!(e, KvCacheEvent::BlockRemoved { .. })),
        "the tiny cache must evict"
    );
    assert!(
        kinds
            .iter()
            .any(|e| matches!(e, KvCacheEvent::AllBlocksCleared))
    );
    // Replay from the middle returns only the tail.
    let mid = replayed.len() as u64 / 2;
    let tail = replay(ep["replay"].as_str().unwrap(), mid).await;
    assert_eq!(tail.keys().next().copied(), Some(mid));
}
