//! The Kubernetes actuator against a scripted API server (a `tower_test` mock transport, as the TenantPolicy
//! watcher's tests do): paths, methods, content type and bodies of the scale calls, and the API's errors.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

use super::*;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn scale_json(name: &str, replicas: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {"name": name, "namespace": "llm"},
        "spec": {"replicas": replicas}, "status": {"replicas": 1}
    }))
    .unwrap()
}

fn target(kind: &str, name: &str) -> ScaleTarget {
    ScaleTarget {
        kind: kind.into(),
        name: name.into(),
    }
}

/// The mock API server: expects one request, checks method, path and (for a patch) body, answers `status` with
/// `answer`.
async fn expect(
    handle: &mut Handle,
    method: &str,
    path: &str,
    body: Option<Value>,
    status: u16,
    answer: Vec<u8>,
) {
    let (req, reply) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request within 5 s")
        .expect("a request");
    assert_eq!(req.method().as_str(), method);
    assert_eq!(req.uri().path(), path);
    if let Some(want) = body {
        assert_eq!(
            req.headers()["content-type"],
            "application/merge-patch+json"
        );
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let got: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(got, want);
    }
    reply.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(answer))
            .unwrap(),
    );
}

fn actuator() -> (KubeActuator, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (KubeActuator::new(Client::new(svc, "llm"), "llm"), handle)
}

#[tokio::test]
async fn scales_a_deployment_through_its_scale_subresource() {
    let (a, mut h) = actuator();
    let t = target("Deployment", "vllm-h100");
    let server = tokio::spawn(async move {
        let path = "/apis/apps/v1/namespaces/llm/deployments/vllm-h100/scale";
        let patch = Some(json!({"spec": {"replicas": 3}}));
        expect(
            &mut h,
            "PATCH",
            path,
            patch,
            200,
            scale_json("vllm-h100", 3),
        )
        .await;
        expect(&mut h, "GET", path, None, 200, scale_json("vllm-h100", 3)).await;
    });
    assert_eq!(a.scale(&t, 3).await.unwrap(), 3);
    assert_eq!(a.replicas(&t).await.unwrap(), 3);
    server.await.unwrap();
}

#[tokio::test]
async fn scales_a_leader_worker_set_to_zero_and_refuses_other_kinds() {
    let (a, mut h) = actuator();
    let server = tokio::spawn(async move {
        expect(
            &mut h,
            "PATCH",
            "/apis/leaderworkerset.x-k8s.io/v1/namespaces/llm/leaderworkersets/vllm-70b/scale",
            Some(json!({"spec": {"replicas": 0}})),
            200,
            scale_json("vllm-70b", 0),
        )
        .await;
    });
    assert_eq!(
        a.scale(&target("LeaderWorkerSet", "vllm-70b"), 0)
            .await
            .unwrap(),
        0
    );
    server.await.unwrap();
    let err = a.scale(&target("StatefulSet", "x"), 1).await.unwrap_err();
    assert_eq!(err.kind(), "unsupported_kind");
}

#[tokio::test]
async fn scales_a_deployment_at_zero_to_its_first_pod() {
    // Scale from zero: the Deployment reads 0 replicas, the plan asks for one pod, one PATCH sets it.
    let (a, mut h) = actuator();
    let targets = vec![Some(target("Deployment", "vllm-l4"))];
    let server = tokio::spawn(async move {
        let path = "/apis/apps/v1/namespaces/llm/deployments/vllm-l4/scale";
        expect(&mut h, "GET", path, None, 200, scale_json("vllm-l4", 0)).await;
        let patch = Some(json!({"spec": {"replicas": 1}}));
        expect(&mut h, "PATCH", path, patch, 200, scale_json("vllm-l4", 1)).await;
    });
    let t = targets[0].as_ref().unwrap();
    let current = a.replicas(t).await.unwrap();
    assert_eq!(current, 0);
    let out = a.apply(&targets, &[current], &[1]).await;
    server.await.unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0, out[0].1.as_ref().ok()), (0, Some(&1)));
}

#[tokio::test]
async fn apply_scales_only_changed_targeted_pools_and_reports_api_errors() {
    let (a, mut h) = actuator();
    let targets = vec![
        Some(target("Deployment", "vllm-h100")),
        None,
        Some(target("Deployment", "vllm-l4")),
        Some(target("Deployment", "vllm-a100")),
    ];
    let server = tokio::spawn(async move {
        // Pool 0 changes 1 -> 2; pool 1 has no target; pool 2 is unchanged; pool 3 changes 4 -> 0 and the API
        // answers 404 (the Deployment is gone).
        expect(
            &mut h,
            "PATCH",
            "/apis/apps/v1/namespaces/llm/deployments/vllm-h100/scale",
            Some(json!({"spec": {"replicas": 2}})),
            200,
            scale_json("vllm-h100", 2),
        )
        .await;
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "deployments.apps \"vllm-a100\" not found", "reason": "NotFound", "code": 404});
        expect(
            &mut h,
            "PATCH",
            "/apis/apps/v1/namespaces/llm/deployments/vllm-a100/scale",
            Some(json!({"spec": {"replicas": 0}})),
            404,
            serde_json::to_vec(&status).unwrap(),
        )
        .await;
    });
    let out = a.apply(&targets, &[1, 5, 3, 4], &[2, 7, 3, 0]).await;
    server.await.unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].0, out[0].1.as_ref().ok()), (0, Some(&2)));
    assert_eq!(out[1].0, 3);
    match &out[1].1 {
        Err(ActuatorError::Api(kube::Error::Api(s))) => assert_eq!(s.code, 404),
        other => panic!("{other:?}"),
    }
}

#[test]
fn changes_skip_untargeted_and_unchanged_pools() {
    let t = Some(target("Deployment", "d"));
    let targets = vec![t.clone(), None, t.clone(), t];
    assert_eq!(
        changes(&targets, &[1, 1, 2, 0], &[1, 4, 0, 3]),
        vec![(2, 0), (3, 3)]
    );
    assert!(changes(&targets, &[1, 1, 2, 0], &[1, 1, 2, 0]).is_empty());
}
