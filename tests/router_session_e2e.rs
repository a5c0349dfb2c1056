//! End-to-end session affinity (weir issue 6): real `weir serve` (cache-aware, `session_affinity: true`) in front of
//! a real `weir sim` fleet. Each turn of a conversation carries an unrelated prompt, so prefix affinity cannot keep
//! the turns together: only the `x-session-id` header can. One session's turns stick to one pod, different sessions
//! spread over the pods (ties between idle pods are broken at random), and the same turns without the header spread
//! too.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{MODEL, Routed, Weir, get_text, post_routed};
use serde_json::{Value, json};

const SESSIONS: usize = 12;
const TURNS: usize = 3;

/// A prompt no other (session, turn) shares a block with: it differs from the first byte.
fn completion(session: usize, turn: usize) -> Value {
    let prompt =
        format!("{session}.{turn} Tell me something new about distributed inference scheduling. ")
            .repeat(6);
    json!({"model": MODEL, "prompt": prompt, "max_tokens": 2})
}

/// The raw `session-affinity` score of each candidate in the request's decision record, by endpoint.
async fn session_scores(router: &Weir, r: &Routed) -> BTreeMap<String, f64> {
    let url = format!("{}/debug/decisions/{}", router.url(), r.decision_id);
    let rec: Value = serde_json::from_str(&get_text(&url).await).unwrap();
    rec["candidates"]
        .as_array()
        .unwrap_or_else(|| panic!("no candidates in {rec}"))
        .iter()
        .map(|c| {
            let s = c["scores"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["scorer"] == "session-affinity")
                .unwrap_or_else(|| panic!("no session-affinity score in {c}"));
            (
                c["endpoint"].as_str().unwrap().to_string(),
                s["raw"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_sticks_to_one_pod_and_sessions_spread() {
    let f = Weir::fleet(3, "50", &[]).await;
    let cfg = format!(
        "pools:\n  - name: {MODEL}\n    endpoints: [{}]\n    policy: {{kind: cache-aware, session_affinity: true}}\n",
        f.urls().join(", ")
    );
    let path = std::env::temp_dir().join(format!("weir-session-{}.yaml", std::process::id()));
    std::fs::write(&path, cfg).unwrap();
    let r = Weir::serve(&["--config", path.to_str().unwrap()]).await;
    let url = format!("{}/v1/completions", r.url());

    // Turns interleaved across sessions, as concurrent conversations arrive.
    let mut pods: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for turn in 0..TURNS {
        for s in 0..SESSIONS {
            let id = format!("conversation-{s}");
            let res = post_routed(&url, &completion(s, turn), &[("x-session-id", &id)]).await;
            assert_eq!(res.status, 200, "{}", res.body);
            assert!(
                !res.endpoint.is_empty(),
                "x-weir-endpoint on every response"
            );
            let scores = session_scores(&r, &res).await;
            if turn == 0 {
                assert!(
                    scores.values().all(|&v| v == 0.0),
                    "a new session has no pod yet: {scores:?}"
                );
            } else {
                let want: BTreeMap<String, f64> = scores
                    .keys()
                    .map(|e| (e.clone(), if *e == res.endpoint { 1.0 } else { 0.0 }))
                    .collect();
                assert_eq!(scores, want, "session {s} turn {turn}: only its pod scores");
            }
            pods.entry(s).or_default().insert(res.endpoint);
        }
    }
    for (s, p) in &pods {
        assert_eq!(p.len(), 1, "session {s} moved between pods: {p:?}");
    }
    let used: BTreeSet<&String> = pods.values().flatten().collect();
    assert!(
        used.len() > 1,
        "{SESSIONS} sessions all on one pod: {used:?}"
    );

    // The control: one conversation's turns without the header are not kept together.
    let mut without = BTreeSet::new();
    for turn in TURNS..TURNS + SESSIONS {
        let res = post_routed(&url, &completion(0, turn), &[]).await;
        assert_eq!(res.status, 200, "{}", res.body);
        without.insert(res.endpoint);
    }
    assert!(
        without.len() > 1,
        "without x-session-id, {SESSIONS} unrelated prompts all went to {without:?}"
    );
    let _ = std::fs::remove_file(path);
}
