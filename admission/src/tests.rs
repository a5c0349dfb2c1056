//! Admission through its real interface, on tokio's paused clock.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use policies::tenant::{ApiKeySpec, IdentitySpec, QueueSpec, TenantPolicySpec, Tier};

use super::*;

/// SHA-256 hex of a key, as an operator would write it in YAML.
fn hex_sha256(key: &str) -> String {
    policies::tenant::ApiKeyHash::of(key)
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn policy(tenant: &str, tier: Tier) -> TenantPolicySpec {
    TenantPolicySpec {
        tenant: tenant.into(),
        tier,
        weight: None,
        models: vec![],
        limits: None,
        queue: None,
        slo: None,
        identity: Some(IdentitySpec {
            api_keys: vec![ApiKeySpec {
                secret_ref: None,
                sha256: Some(hex_sha256(&format!("sk-{tenant}"))),
            }],
            jwt: None,
        }),
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

fn req(model: &str) -> AdmitRequest {
    AdmitRequest {
        model: model.into(),
        pool: "p".into(),
        prompt_tokens: 100,
        max_tokens: Some(50),
        deadline: None,
    }
}

fn three_tiers() -> Admission {
    Admission::from_policies(
        vec![
            policy("i", Tier::Interactive),
            policy("s", Tier::Standard),
            policy("b", Tier::Batch),
        ],
        AdmissionConfig::default(),
    )
    .unwrap()
}

fn who(adm: &Admission, tenant: &str) -> Identity {
    adm.identify(Some(&format!("sk-{tenant}"))).unwrap()
}

/// Polls `fut` once from the current task.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx))).await
}

/// Lets spawned tasks run until they block.
async fn settle_tasks() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[test]
fn identify_by_hashed_key_or_the_implicit_default_tenant() {
    let adm = Admission::from_policies(vec![], AdmissionConfig::default()).unwrap();
    assert_eq!(&*adm.identify(None).unwrap().tenant, DEFAULT_TENANT);
    assert_eq!(
        &*adm.identify(Some("anything")).unwrap().tenant,
        DEFAULT_TENANT
    );

    let adm = three_tiers();
    let id = adm.identify(Some("sk-b")).unwrap();
    assert_eq!((&*id.tenant, id.tier), ("b", Tier::Batch));
    assert_eq!(
        adm.identify(None).unwrap_err().reason,
        RejectReason::MissingApiKey
    );
    let e = adm.identify(Some("sk-x")).unwrap_err();
    assert_eq!(
        (e.reason, e.reason.status()),
        (RejectReason::InvalidApiKey, 401)
    );
    let body = e.to_api_error().openai_json();
    assert!(body.contains("\"code\":\"invalid_api_key\""), "{body}");
}

#[test]
fn invalid_policies_are_refused_and_the_old_ones_stay() {
    let adm = three_tiers();
    let mut bad = policy("x", Tier::Batch);
    bad.weight = Some(-1.0);
    let e = adm.replace_policies(vec![bad]).unwrap_err();
    assert!(e.to_string().contains("spec.weight"), "{e}");
    assert!(adm.identify(Some("sk-i")).is_ok());
    adm.replace_policies(vec![policy("x", Tier::Batch)])
        .unwrap();
    assert!(adm.identify(Some("sk-i")).is_err());
    assert_eq!(&*adm.identify(Some("sk-x")).unwrap().tenant, "x");
}

#[tokio::test(start_paused = true)]
async fn models_outside_the_policy_are_forbidden_and_counted() {
    let mut p = policy("a", Tier::Standard);
    p.models = vec!["llama*".into()];
    let adm = Admission::from_policies(vec![p], AdmissionConfig::default()).unwrap();
    let a = who(&adm, "a");
    let e = adm.admit(&a, req("qwen"), now()).await.unwrap_err();
    assert_eq!(
        (e.reason, e.reason.status()),
        (RejectReason::ModelNotAllowed, 403)
    );
    let permit = adm.admit(&a, req("llama-8b"), now()).await.unwrap();
    assert_eq!(&*permit.model, "llama-8b");
    permit.complete(Usage {
        prompt_tokens: 100,
        completion_tokens: 7,
        ..Usage::default()
    });
    let rows = adm.usage("a");
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].model.as_str(), rows[0].counters.rejected),
        ("-", 1)
    );
    assert_eq!(
        (
            rows[1].counters.admitted,
            rows[1].counters.completed,
            rows[1].counters.completion_tokens
        ),
        (1, 1, 7)
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_dispatch_by_tier_as_room_appears() {
    // Without tier floors: strict priority (the floors are policies::fair's tests).
    let cfg = AdmissionConfig {
        fair: policies::fair::FairConfig {
            min_share: [0.0; 3],
            ..Default::default()
        },
        ..AdmissionConfig::default()
    };
    let specs = vec![
        policy("i", Tier::Interactive),
        policy("s", Tier::Standard),
        policy("b", Tier::Batch),
    ];
    let adm = Admission::from_policies(specs, cfg).unwrap();
    adm.set_room("p", 0);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for t in ["b", "s", "i", "b", "i"] {
        let (adm, tx, w) = (adm.clone(), tx.clone(), who(&adm, t));
        tokio::spawn(async move {
            let p = adm.admit(&w, req("m"), now()).await.unwrap();
            tx.send(p).unwrap();
        });
        settle_tasks().await;
    }
    assert!(rx.try_recv().is_err(), "nothing dispatches without room");
    let mut order = Vec::new();
    for _ in 0..5 {
        adm.set_room("p", 1);
        settle_tasks().await;
        let p = rx.try_recv().unwrap();
        order.push(p.tenant.to_string());
        adm.set_room("p", 0);
        p.complete(Usage::default());
    }
    assert_eq!(order, ["i", "i", "s", "b", "b"]);
}

#[tokio::test(start_paused = true)]
async fn tier_queues_report_depth_and_the_oldest_wait_per_pool_and_tier() {
    let adm = three_tiers();
    adm.set_room("p", 0);
    let mut changes = adm.queue_changes();
    assert!(!changes.has_changed().unwrap());
    let mut held = Vec::new();
    for t in ["b", "b", "i"] {
        let (adm, w) = (adm.clone(), who(&adm, t));
        held.push(tokio::spawn(async move {
            adm.admit(&w, req("m"), now()).await.map(drop)
        }));
        settle_tasks().await;
        tokio::time::advance(Duration::from_secs(2)).await;
    }
    // Every queued request told the watchers.
    assert!(changes.has_changed().unwrap());
    changes.mark_unchanged();
    let q = adm.tier_queues(now());
    let row = |tier: Tier| q.iter().find(|r| r.pool == "p" && r.tier == tier).unwrap();
    assert_eq!(q.len(), 3, "{q:?}");
    assert_eq!(
        (row(Tier::Batch).queued, row(Tier::Batch).oldest_wait),
        (2, Duration::from_secs(6))
    );
    assert_eq!(
        (
            row(Tier::Interactive).queued,
            row(Tier::Interactive).oldest_wait
        ),
        (1, Duration::from_secs(2))
    );
    assert_eq!(
        (row(Tier::Standard).queued, row(Tier::Standard).oldest_wait),
        (0, Duration::ZERO)
    );
    // A client leaving takes its place with it (and tells the watchers).
    held.pop().unwrap().abort();
    settle_tasks().await;
    assert!(changes.has_changed().unwrap());
    assert_eq!(
        adm.tier_queues(now()).iter().map(|r| r.queued).sum::<u64>(),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn an_interactive_arrival_displaces_an_unstarted_batch_grant_which_still_runs_later() {
    let adm = three_tiers();
    adm.set_room("p", 0);
    let (adm2, b) = (adm.clone(), who(&adm, "b"));
    let batch = tokio::spawn(async move { adm2.admit(&b, req("m"), now()).await.unwrap() });
    settle_tasks().await;
    // Room for one: the batch request is granted, but before its task runs an interactive request arrives.
    adm.set_room("p", 1);
    let i = who(&adm, "i");
    let mut fut = Box::pin(adm.admit(&i, req("m"), now()));
    let Poll::Ready(Ok(permit)) = poll_once(&mut fut).await else {
        panic!("interactive should take the slot")
    };
    assert_eq!(permit.tier, Tier::Interactive);
    settle_tasks().await;
    assert!(
        !batch.is_finished(),
        "the displaced batch request waits again"
    );
    // When the interactive request ends its slot returns and the requeued batch request runs.
    permit.complete(Usage::default());
    settle_tasks().await;
    let bp = batch.await.unwrap();
    assert_eq!(&*bp.tenant, "b");
    drop(bp);
    let b_rows = adm.usage("b");
    assert_eq!(
        (b_rows[0].counters.admitted, b_rows[0].counters.cancelled),
        (1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_deadline_passed_in_the_queue_is_shed_with_retry_after() {
    let mut p = policy("a", Tier::Batch);
    p.queue = Some(QueueSpec {
        max_queued: None,
        max_wait_ms: Some(2_000),
    });
    let adm = Admission::from_policies(vec![p], AdmissionConfig::default()).unwrap();
    adm.set_room("p", 0);
    let a = who(&adm, "a");
    let t0 = tokio::time::Instant::now();
    // The request's own deadline (1 s) is shorter than the tenant's maximum wait (2 s).
    let mut r = req("m");
    r.deadline = Some(now() + Duration::from_secs(1));
    let e = adm.admit(&a, r, now()).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert_eq!(
        (e.reason, e.reason.status()),
        (RejectReason::DeadlineExceeded, 429)
    );
    assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
    // Without one, the tenant's maximum wait applies.
    let e = adm.admit(&a, req("m"), now()).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
    assert_eq!(e.reason, RejectReason::DeadlineExceeded);
    assert_eq!(adm.usage("a")[0].counters.rejected, 2);
}

#[tokio::test(start_paused = true)]
async fn a_client_leaving_the_queue_frees_its_place_at_once() {
    let mut p = policy("a", Tier::Standard);
    p.queue = Some(QueueSpec {
        max_queued: Some(1),
        max_wait_ms: None,
    });
    let adm = Admission::from_policies(vec![p], AdmissionConfig::default()).unwrap();
    adm.set_room("p", 0);
    let a = who(&adm, "a");
    let mut first = Box::pin(adm.admit(&a, req("m"), now()));
    assert!(poll_once(&mut first).await.is_pending());
    let e = adm.admit(&a, req("m"), now()).await.unwrap_err();
    assert_eq!(
        (e.reason, e.retry_after),
        (RejectReason::TenantQueueFull, Some(Duration::from_secs(1)))
    );
    drop(first);
    let mut second = Box::pin(adm.admit(&a, req("m"), now()));
    assert!(
        poll_once(&mut second).await.is_pending(),
        "the place is free again"
    );
    let c = adm.usage("a")[0].counters;
    assert_eq!((c.abandoned, c.rejected, c.admitted), (1, 1, 0));
    // And room goes to the one still waiting.
    adm.set_room("p", 1);
    assert!(matches!(poll_once(&mut second).await, Poll::Ready(Ok(_))));
}

/// Without tenants one client's burst waits for room instead of being shed at a per-tenant default of 128: only the
/// tier's cap bounds the implicit tenant's queue.
#[tokio::test(start_paused = true)]
async fn without_tenants_the_queue_is_bounded_by_the_tier_cap_only() {
    let mut cfg = AdmissionConfig::default();
    cfg.fair.max_queued_per_tier = [300; 3];
    let adm = Admission::from_policies(vec![], cfg).unwrap();
    adm.set_room("p", 0);
    let id = adm.identify(None).unwrap();
    let mut waiting = Vec::new();
    for _ in 0..300 {
        let mut f = Box::pin(adm.admit(&id, req("m"), now()));
        assert!(poll_once(&mut f).await.is_pending(), "held, not shed");
        waiting.push(f);
    }
    let e = adm.admit(&id, req("m"), now()).await.unwrap_err();
    assert_eq!(
        e.reason,
        RejectReason::QueueFull,
        "the tier's cap, not the tenant's"
    );
    adm.set_room("p", 300);
    for f in &mut waiting {
        assert!(matches!(poll_once(f).await, Poll::Ready(Ok(_))));
    }
}

#[tokio::test(start_paused = true)]
async fn every_admitted_request_ends_completed_failed_or_cancelled() {
    let adm = three_tiers();
    adm.set_room("p", 3);
    let mut tasks = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for n in 0..60u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (adm2, w) = (adm.clone(), who(&adm, ["i", "s", "b"][(x % 3) as usize]));
        let fate = (x >> 8) % 4;
        let hold = Duration::from_millis((x >> 16) % 300);
        tasks.push(tokio::spawn(async move {
            let p = adm2.admit(&w, req("m"), now()).await?;
            tokio::time::sleep(hold).await;
            let u = Usage {
                prompt_tokens: 100,
                cached_tokens: 10,
                completion_tokens: n,
                gpu_seconds: 0.01,
            };
            match fate {
                0 => p.complete(u),
                1 => p.fail(u),
                2 => p.cancel(u),
                _ => drop(p),
            }
            Ok::<_, Reject>(())
        }));
        if n % 7 == 0 {
            // Some clients leave while queued.
            let (adm2, w) = (adm.clone(), who(&adm, "b"));
            let t = tokio::spawn(async move { adm2.admit(&w, req("m"), now()).await.map(drop) });
            settle_tasks().await;
            t.abort();
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let (mut admitted, mut abandoned) = (0, 0);
    for r in adm.usage_all() {
        let c = r.counters;
        assert_eq!(c.admitted, c.completed + c.failed + c.cancelled, "{r:?}");
        assert_eq!(c.rejected, 0);
        admitted += c.admitted;
        abandoned += c.abandoned;
    }
    // 60 requests ran; the 9 that left early were each either admitted (then cancelled) or abandoned in the queue.
    assert!(admitted >= 60);
    assert_eq!(admitted + abandoned, 69);
    assert!(abandoned > 0, "some clients left while queued");
}

#[test]
fn tenants_past_the_label_cap_share_the_other_label() {
    let cfg = AdmissionConfig {
        max_tenant_labels: 2,
        ..AdmissionConfig::default()
    };
    let specs = ["a", "b", "c", "d"]
        .map(|t| policy(t, Tier::Standard))
        .to_vec();
    let adm = Admission::from_policies(specs, cfg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        for t in ["a", "b", "c", "d"] {
            adm.admit(&who(&adm, t), req("m"), now())
                .await
                .unwrap()
                .complete(Usage::default());
        }
    });
    let mut reg = prometheus_client::registry::Registry::default();
    adm.register_metrics(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    let tenants: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("admission_decisions_total{"))
        .filter_map(|l| l.split("tenant=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(tenants.into_iter().collect::<Vec<_>>(), ["a", "b", "other"]);
    assert!(text.contains("admission_decisions_total{tenant=\"other\",tier=\"standard\",decision=\"admitted\",reason=\"none\"} 2"), "{text}");
}

/// Usage recorded every 100 ms; the ledger file is reopened after the process state is dropped without a final
/// flush (a crash): at most one second of usage may be missing.
#[test]
fn a_crash_loses_at_most_one_second_of_usage() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AdmissionConfig {
        ledger: LedgerConfig {
            path: Some(dir.path().join("usage.redb")),
            flush_interval: Duration::from_millis(500),
        },
        ..AdmissionConfig::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let recorded = rt.block_on(async {
        let adm = Admission::from_policies(vec![], cfg.clone()).unwrap();
        let me = adm.identify(None).unwrap();
        let mut n = 0u64;
        // 3.35 s of traffic: the crash falls between two flushes.
        for _ in 0..34 {
            adm.admit(&me, req("m"), now())
                .await
                .unwrap()
                .complete(Usage {
                    completion_tokens: 1,
                    ..Usage::default()
                });
            n += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    });
    // Crash: the runtime (and its flush task) and the ledger go away with no final flush.
    drop(rt);
    let reopened = ledger::Ledger::open(&cfg.ledger).unwrap();
    let c = reopened.usage(DEFAULT_TENANT)[0].counters;
    assert!(
        c.completed < recorded,
        "some usage was unflushed at the crash, else this test proves nothing"
    );
    assert!(
        recorded - c.completed <= 10,
        "lost {} events = more than 1 s of usage",
        recorded - c.completed
    );
    assert_eq!(c.completion_tokens, c.completed);
}
