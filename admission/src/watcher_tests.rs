//! The watcher against a scripted Kubernetes API (a `tower_test` mock transport): list, watch events, status patches.

use std::collections::VecDeque;
use std::time::Duration;

use hyper::{Method, Request, Response};
use kube::client::Body;
use policies::tenant::Tier;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;
use crate::AdmissionConfig;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Reply = tower_test::mock::SendResponse<Response<Body>>;

fn hex(key: &str) -> String {
    policies::tenant::ApiKeyHash::of(key)
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn policy(name: &str, rv: u32, generation: i64, spec: Value) -> Value {
    json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "TenantPolicy",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string(), "generation": generation},
        "spec": spec,
    })
}

fn spec(tenant: &str, tier: &str) -> Value {
    json!({"tenant": tenant, "tier": tier, "identity": {"apiKeys": [{"sha256": hex(&format!("sk-{tenant}"))}]}})
}

fn ev(kind: &str, obj: Value) -> Value {
    json!({"type": kind, "object": obj})
}

fn respond(reply: Reply, body: Vec<u8>) {
    reply.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(body))
            .unwrap(),
    );
}

/// Answers the LIST with `items`, each WATCH with the next scripted batch (parking it until one is sent), and each
/// status PATCH by reporting (name, patch body) to the test.
async fn api_server(
    mut handle: Handle,
    items: Vec<Value>,
    mut script: mpsc::UnboundedReceiver<Vec<Value>>,
    patches: mpsc::UnboundedSender<(String, Value)>,
) {
    let mut parked: Option<Reply> = None;
    let mut queued: VecDeque<Vec<Value>> = VecDeque::new();
    let encode = |batch: Vec<Value>| -> Vec<u8> {
        batch
            .into_iter()
            .flat_map(|e| [serde_json::to_vec(&e).unwrap(), b"\n".to_vec()].concat())
            .collect()
    };
    loop {
        tokio::select! {
            req = handle.next_request() => {
                let Some((req, reply)) = req else { return };
                let path = req.uri().path().to_string();
                if req.method() == Method::PATCH {
                    let name = path.trim_end_matches("/status").rsplit('/').next().unwrap().to_string();
                    let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
                    let patch: Value = serde_json::from_slice(&body).unwrap();
                    let obj = policy(&name, 1, 1, json!({"tenant": "x"}));
                    respond(reply, serde_json::to_vec(&obj).unwrap());
                    patches.send((name, patch)).unwrap();
                } else if !req.uri().query().is_some_and(|q| q.contains("watch=true")) {
                    let list = json!({"apiVersion": "weir.dev/v1alpha1", "kind": "TenantPolicyList",
                                      "metadata": {"resourceVersion": "1"}, "items": items});
                    respond(reply, serde_json::to_vec(&list).unwrap());
                } else if let Some(batch) = queued.pop_front() {
                    respond(reply, encode(batch));
                } else {
                    parked = Some(reply);
                }
            }
            step = script.recv() => {
                let Some(batch) = step else { return };
                match parked.take() {
                    Some(reply) => respond(reply, encode(batch)),
                    None => queued.push_back(batch),
                }
            }
        }
    }
}

/// The next status patch of object `name` (the mock's watch events carry no status, so the watcher rewrites the
/// others' statuses too; those are skipped), or a panic after 10 s.
async fn next_patch(rx: &mut mpsc::UnboundedReceiver<(String, Value)>, name: &str) -> Value {
    loop {
        let (got, patch) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a status patch within 10 s")
            .expect("server running");
        if got == name {
            return patch["status"].clone();
        }
    }
}

fn accepted(status: &Value) -> (&str, &str) {
    let c = &status["conditions"][0];
    assert_eq!(c["type"], ACCEPTED);
    (
        c["status"].as_str().unwrap(),
        c["message"].as_str().unwrap(),
    )
}

#[tokio::test]
async fn policies_are_created_changed_refused_and_deleted_live() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let (script, script_rx) = mpsc::unbounded_channel();
    let (patch_tx, mut patches) = mpsc::unbounded_channel();
    let server = tokio::spawn(api_server(
        handle,
        vec![policy("a", 2, 1, spec("a", "standard"))],
        script_rx,
        patch_tx,
    ));
    let admission = Admission::from_policies(vec![], AdmissionConfig::default()).unwrap();
    let watcher =
        tokio::spawn(PolicyWatcher::new(client, Some("default".into()), admission.clone()).run());

    // Created (initial list): in effect, accepted, generation observed.
    let status = next_patch(&mut patches, "a").await;
    assert_eq!(accepted(&status).0, "True");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(
        admission.identify(Some("sk-a")).unwrap().tier,
        Tier::Standard
    );
    assert!(
        admission.identify(Some("sk-other")).is_err(),
        "no longer the implicit tenant"
    );

    // Changed: the new tier applies without a restart.
    script
        .send(vec![ev("MODIFIED", policy("a", 3, 2, spec("a", "batch")))])
        .unwrap();
    let status = next_patch(&mut patches, "a").await;
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(admission.identify(Some("sk-a")).unwrap().tier, Tier::Batch);

    // Invalid: a False condition naming the field; the previous spec stays in effect.
    let mut bad = spec("a", "interactive");
    bad["weight"] = json!(-1);
    script
        .send(vec![ev("MODIFIED", policy("a", 4, 3, bad))])
        .unwrap();
    let status = next_patch(&mut patches, "a").await;
    let (ok, msg) = accepted(&status);
    assert_eq!(ok, "False");
    assert!(msg.contains("spec.weight"), "{msg}");
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(admission.identify(Some("sk-a")).unwrap().tier, Tier::Batch);

    // A second policy claiming the same tenant is refused; the first keeps working.
    script
        .send(vec![ev(
            "ADDED",
            policy("b", 5, 1, spec("a", "interactive")),
        )])
        .unwrap();
    let status = next_patch(&mut patches, "b").await;
    let (ok, msg) = accepted(&status);
    assert_eq!(ok, "False");
    assert!(msg.contains("same tenant"), "{msg}");
    assert_eq!(admission.identify(Some("sk-a")).unwrap().tier, Tier::Batch);

    // Deleted: the tenant is gone (b, renamed to its own tenant, takes effect in the same step).
    script
        .send(vec![
            ev("DELETED", policy("a", 6, 3, spec("a", "batch"))),
            ev("MODIFIED", policy("b", 7, 2, spec("b", "interactive"))),
        ])
        .unwrap();
    let status = next_patch(&mut patches, "b").await;
    assert_eq!(accepted(&status).0, "True");
    assert!(admission.identify(Some("sk-a")).is_err());
    assert_eq!(
        admission.identify(Some("sk-b")).unwrap().tier,
        Tier::Interactive
    );

    watcher.abort();
    server.abort();
}
