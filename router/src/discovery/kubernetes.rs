//! Kubernetes discovery: watches model-server pods (selected by a Gateway API Inference Extension `InferencePool`,
//! or by a plain label selector) and publishes the endpoint set on every change through the discovery seam's
//! `watch` channel.
//!
//! Rules: only pods that are Ready, have a pod IP and are not terminating count; each of the pool's `targetPorts`
//! on such a pod is one endpoint (`http://podIP:port`, id `pod:port`); the P/D role comes from the `llm-d.ai/role`
//! label (absent: aggregated `prefill-decode`); every pod label, the GPU type label [`GPU_LABEL`] included, is
//! carried on the endpoint. A pod's vLLM KV-event publisher (for `precise-prefix` pools) is announced by the
//! [`KV_EVENTS_PORT`] annotation (or label), with [`KV_REPLAY_PORT`] for the replay socket (default on one-port pods:
//! the PUB port + 1); the i-th port of the pool on a pod is data-parallel rank i, whose sockets vLLM binds at the
//! announced ports + i (llm-d dials `socketPort + rankIndex` the same way). Pods and the pool are watched with
//! `kube::runtime` reflectors (list then watch, resumed from the last resource version, backoff on errors); the pure
//! [`endpoints`] function turns the stores into the set, which is sent only when it differs from the last one.
//! Nothing is published before both initial lists are complete, so a restart never flashes an empty set.
//!
//! The kube client is built without TLS (compile time); in a cluster, talk to the API server through a local
//! `kubectl proxy`-style sidecar or enable kube's TLS feature in the binary.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, CustomResource};
use policies::endpoint::Role;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::DiscoveredEndpoint;
use crate::{Error, Result};

/// Pod label carrying the P/D role (`prefill`, `decode`, `prefill-decode`).
pub const ROLE_LABEL: &str = "llm-d.ai/role";
/// Pod annotation (or label) carrying the vLLM KV-event PUB port; the publisher is `tcp://<podIP>:<port>` (plus the
/// data-parallel rank on pods with several ports).
pub const KV_EVENTS_PORT: &str = "weir.dev/kv-events-port";
/// Pod annotation (or label) carrying the KV-event replay port (default: the PUB port + 1 when the PUB port is set and
/// the pod has one port; pods with several data-parallel ranks need it explicitly, since rank 1 publishes at PUB + 1).
pub const KV_REPLAY_PORT: &str = "weir.dev/kv-replay-port";
/// Pod label carrying the GPU type (e.g. `H100`, `A100-80`, `L4`); read with [`gpu_type`].
pub const GPU_LABEL: &str = policies::pool::GPU_LABEL;

/// GIE `InferencePool` (`inference.networking.k8s.io/v1`): the pods serving one model, and the ports to reach them.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "inference.networking.k8s.io",
    version = "v1",
    kind = "InferencePool",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// Which pods (same namespace) belong to the pool.
    pub selector: PoolSelector,
    /// Ports on each pod; every `podIP:port` is an endpoint (several ports = data-parallel ranks). 1-8 entries.
    pub target_ports: Vec<TargetPort>,
    /// `http` or `kubernetes.io/h2c`; weir speaks HTTP/1 to pods either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// The endpoint picker serving this pool (weir itself, or an EPP); not used for discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_picker_ref: Option<EndpointPickerRef>,
}

/// An `InferencePool` selector: equality on labels only (as in GIE v1).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolSelector {
    /// Labels a pod must carry, all of them, with these values.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One target port of a pool.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub struct TargetPort {
    /// TCP port number on the pod.
    pub number: i32,
}

/// Reference to the endpoint picker of a pool.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPickerRef {
    /// API group of the referent ("" = core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind of the referent (default `Service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name of the referent.
    pub name: String,
    /// Port of the picker service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<TargetPort>,
    /// `FailOpen` or `FailClose` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<String>,
}

/// Which pods to discover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// The pods and ports of the named `InferencePool`; endpoints belong to a pool of the same name.
    InferencePool(String),
    /// Pods carrying all these labels, on these ports, reported as members of `pool`.
    Labels {
        /// Pool name the endpoints are reported under.
        pool: String,
        /// Labels a pod must carry (equality).
        match_labels: BTreeMap<String, String>,
        /// Ports on each pod; each is one endpoint.
        ports: Vec<u16>,
    },
}

/// The GPU type of an endpoint discovered from Kubernetes (the [`GPU_LABEL`] pod label).
pub fn gpu_type(ep: &DiscoveredEndpoint) -> Option<&str> {
    ep.labels.get(GPU_LABEL).map(String::as_str)
}

/// Whether the pod is Ready, has an IP and is not being deleted.
pub fn serving(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(status) = &pod.status else {
        return false;
    };
    let has_ip = status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty());
    let ready = status
        .conditions
        .as_ref()
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    has_ip && ready
}

/// The endpoint set for `pool`: every serving pod carrying all of `match_labels`, once per port, sorted by id. The
/// i-th entry of `ports` is data-parallel rank i: its KV-event addresses are the announced ports + i.
pub fn endpoints<'a>(
    pool: &str,
    match_labels: &BTreeMap<String, String>,
    ports: &[u16],
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Vec<DiscoveredEndpoint> {
    let mut out = Vec::new();
    for pod in pods {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if !match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)) || !serving(pod) {
            continue;
        }
        let (Some(name), Some(ip)) = (
            pod.metadata.name.as_deref(),
            pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
        ) else {
            continue;
        };
        let role = match labels.get(ROLE_LABEL) {
            None => Role::default(),
            Some(v) => Role::from_label(v).unwrap_or_else(|| {
                tracing::warn!(pod = name, value = %v, "unknown {ROLE_LABEL} label; treating as prefill-decode");
                Role::default()
            }),
        };
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let port_of = |key: &str| {
            annotations
                .get(key)
                .or_else(|| labels.get(key))
                .and_then(|v| v.parse::<u16>().ok())
        };
        let kv_port = port_of(KV_EVENTS_PORT);
        // The PUB port + 1 default only fits one rank: with several, rank 1 publishes there.
        let replay_port = port_of(KV_REPLAY_PORT).or(if ports.len() == 1 {
            kv_port.and_then(|p| p.checked_add(1))
        } else {
            None
        });
        for (rank, port) in ports.iter().enumerate() {
            // vLLM offsets both ZMQ ports by the data-parallel rank (`offset_endpoint_port`).
            let at = |base: Option<u16>| {
                let p = u16::try_from(rank)
                    .ok()
                    .and_then(|r| base?.checked_add(r))?;
                Some(format!("tcp://{host}:{p}"))
            };
            out.push(DiscoveredEndpoint {
                id: format!("{name}:{port}"),
                url: format!("http://{host}:{port}"),
                pool: pool.to_string(),
                role,
                labels: labels.clone(),
                kv_events: at(kv_port),
                kv_replay: at(kv_port.and(replay_port)),
            });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// A pool's valid target ports (out-of-range numbers dropped with a warning).
fn pool_ports(pool: &InferencePool) -> Vec<u16> {
    let mut ports: Vec<u16> = pool
        .spec
        .target_ports
        .iter()
        .filter_map(|p| match u16::try_from(p.number) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                tracing::warn!(pool = ?pool.metadata.name, port = p.number, "ignoring invalid InferencePool target port");
                None
            }
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Watches pods (and the pool) in one namespace and publishes endpoint sets.
pub struct KubernetesDiscovery {
    /// API client (a real cluster, or a mock transport in tests).
    client: Client,
    /// Namespace of the pods and the pool.
    namespace: String,
    /// What to select.
    selection: Selection,
}

/// Which watch an event came from, and whether it may have changed the stores.
enum Tick {
    Pods { settled: bool },
    Pool { settled: bool },
}

fn tick<K>(
    ev: &std::result::Result<watcher::Event<K>, watcher::Error>,
    what: &str,
) -> Option<bool> {
    match ev {
        Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
            Some(true)
        }
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Some(false),
        Err(e) => {
            tracing::warn!(error = %e, watch = what, "kubernetes watch error; retrying with backoff");
            None
        }
    }
}

impl KubernetesDiscovery {
    /// Validates the selection; fails with `InvalidConfig` naming the field.
    pub fn new(client: Client, namespace: &str, selection: Selection) -> Result<Self> {
        let invalid = |field: &str, reason: &str| Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        };
        if namespace.is_empty() {
            return Err(invalid(
                "discovery.kubernetes.namespace",
                "must not be empty",
            ));
        }
        match &selection {
            Selection::InferencePool(name) if name.is_empty() => {
                return Err(invalid(
                    "discovery.kubernetes.inference_pool",
                    "must not be empty",
                ));
            }
            Selection::Labels {
                match_labels,
                ports,
                pool,
            } => {
                if match_labels.is_empty() {
                    return Err(invalid(
                        "discovery.kubernetes.selector",
                        "needs at least one label",
                    ));
                }
                if ports.is_empty() || ports.contains(&0) {
                    return Err(invalid(
                        "discovery.kubernetes.ports",
                        "needs one or more ports in 1..=65535",
                    ));
                }
                if pool.is_empty() {
                    return Err(invalid("discovery.kubernetes.pool", "must not be empty"));
                }
            }
            Selection::InferencePool(_) => {}
        }
        Ok(Self {
            client,
            namespace: namespace.to_string(),
            selection,
        })
    }

    /// Watches until every receiver of `tx` is gone, sending the full set whenever it changes.
    pub async fn run(self, tx: watch::Sender<Vec<DiscoveredEndpoint>>) {
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let (pods, pod_writer) = reflector::store::<Pod>();
        let mut pod_cfg = watcher::Config::default();
        if let Selection::Labels { match_labels, .. } = &self.selection {
            let sel: Vec<String> = match_labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            pod_cfg = pod_cfg.labels(&sel.join(","));
        }
        let pod_events = reflector::reflector(pod_writer, watcher(pods_api, pod_cfg))
            .default_backoff()
            .filter_map(|ev| async move { tick(&ev, "pods").map(|settled| Tick::Pods { settled }) })
            .boxed();
        let (pools, pool_events): (Option<Store<InferencePool>>, _) = match &self.selection {
            Selection::InferencePool(name) => {
                let api: Api<InferencePool> = Api::namespaced(self.client.clone(), &self.namespace);
                let (store, writer) = reflector::store::<InferencePool>();
                let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
                let evs = reflector::reflector(writer, watcher(api, cfg))
                    .default_backoff()
                    .filter_map(|ev| async move {
                        tick(&ev, "inferencepools").map(|settled| Tick::Pool { settled })
                    })
                    .boxed();
                (Some(store), evs)
            }
            Selection::Labels { .. } => (None, stream::pending().boxed()),
        };
        let mut events = stream::select(pod_events, pool_events);
        let (mut pods_listed, mut pool_listed) = (false, pools.is_none());
        loop {
            let ev = tokio::select! {
                ev = events.next() => ev,
                () = tx.closed() => return,
            };
            let Some(ev) = ev else { return };
            match ev {
                Tick::Pods { settled } => pods_listed |= settled,
                Tick::Pool { settled } => pool_listed |= settled,
            }
            if !(pods_listed && pool_listed) {
                continue;
            }
            let state = pods.state();
            let set = match (&self.selection, &pools) {
                (Selection::InferencePool(name), Some(store)) => {
                    let pool = store
                        .state()
                        .into_iter()
                        .find(|p| p.metadata.name.as_deref() == Some(name.as_str()));
                    match pool {
                        Some(p) => endpoints(
                            name,
                            &p.spec.selector.match_labels,
                            &pool_ports(&p),
                            state.iter().map(Arc::as_ref),
                        ),
                        None => Vec::new(),
                    }
                }
                (
                    Selection::Labels {
                        pool,
                        match_labels,
                        ports,
                    },
                    _,
                ) => endpoints(pool, match_labels, ports, state.iter().map(Arc::as_ref)),
                (Selection::InferencePool(_), None) => Vec::new(),
            };
            let changed = tx.send_if_modified(|cur| {
                if *cur == set {
                    false
                } else {
                    *cur = set;
                    true
                }
            });
            if changed {
                tracing::info!(namespace = %self.namespace, endpoints = tx.borrow().len(), "kubernetes endpoints changed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::time::Duration;

    use hyper::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tokio::sync::mpsc;

    use super::*;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
    type Reply = tower_test::mock::SendResponse<Response<Body>>;

    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    enum Res {
        Pods,
        Pools,
    }

    fn pod(name: &str, rv: u32, labels: &[(&str, &str)], ready: bool, terminating: bool) -> Value {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let mut meta = json!({"name": name, "namespace": "default", "resourceVersion": rv.to_string(), "labels": labels});
        if terminating {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "status": {"podIP": format!("10.0.0.{}", name.bytes().map(u32::from).sum::<u32>() % 200 + 1),
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        })
    }

    fn pool(rv: u32, ports: &[i32]) -> Value {
        json!({
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "llama", "namespace": "default", "resourceVersion": rv.to_string()},
            "spec": {"selector": {"matchLabels": {"app": "vllm"}},
                     "targetPorts": ports.iter().map(|n| json!({"number": n})).collect::<Vec<_>>(),
                     "endpointPickerRef": {"name": "weir", "port": {"number": 9002}}}
        })
    }

    fn list(kind: &str, items: Vec<Value>) -> Value {
        json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
    }

    fn respond(reply: Reply, body: Vec<u8>) {
        reply.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(body))
                .unwrap(),
        );
    }

    /// A scripted API server: answers LISTs with the initial lists, and each WATCH with the next scripted batch of
    /// events for that resource (holding the watch open until the test sends one).
    async fn api_server(
        mut handle: Handle,
        lists: HashMap<Res, Value>,
        mut script: mpsc::UnboundedReceiver<(Res, Vec<Value>)>,
    ) {
        let mut parked: HashMap<Res, Reply> = HashMap::new();
        let mut queued: HashMap<Res, VecDeque<Vec<Value>>> = HashMap::new();
        let encode = |batch: Vec<Value>| -> Vec<u8> {
            batch
                .into_iter()
                .flat_map(|e| {
                    let mut line = serde_json::to_vec(&e).unwrap();
                    line.push(b'\n');
                    line
                })
                .collect()
        };
        loop {
            tokio::select! {
                req = handle.next_request() => {
                    let Some((req, reply)) = req else { return };
                    let res = if req.uri().path().contains("/inferencepools") { Res::Pools } else { Res::Pods };
                    let watching = req.uri().query().is_some_and(|q| q.contains("watch=true"));
                    if !watching {
                        respond(reply, serde_json::to_vec(&lists[&res]).unwrap());
                    } else if let Some(batch) = queued.get_mut(&res).and_then(VecDeque::pop_front) {
                        respond(reply, encode(batch));
                    } else {
                        parked.insert(res, reply);
                    }
                }
                step = script.recv() => {
                    let Some((res, batch)) = step else { return };
                    match parked.remove(&res) {
                        Some(reply) => respond(reply, encode(batch)),
                        None => queued.entry(res).or_default().push_back(batch),
                    }
                }
            }
        }
    }

    fn ev(kind: &str, obj: Value) -> Value {
        json!({"type": kind, "object": obj})
    }

    /// A discovery task running against a scripted API server ([`api_server`]).
    struct Run {
        /// The published endpoint sets.
        rx: watch::Receiver<Vec<DiscoveredEndpoint>>,
        /// Watch-event batches for the API server to serve.
        script: mpsc::UnboundedSender<(Res, Vec<Value>)>,
        task: tokio::task::JoinHandle<()>,
        server: tokio::task::JoinHandle<()>,
    }

    impl Run {
        /// Starts discovery of `selection` against an API server whose LISTs answer `lists`.
        fn start(lists: HashMap<Res, Value>, selection: Selection) -> Run {
            let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let client = Client::new(svc, "default");
            let (script, script_rx) = mpsc::unbounded_channel();
            let server = tokio::spawn(api_server(handle, lists, script_rx));
            let (tx, rx) = watch::channel(Vec::new());
            let disco = KubernetesDiscovery::new(client, "default", selection).unwrap();
            let task = tokio::spawn(disco.run(tx));
            Run {
                rx,
                script,
                task,
                server,
            }
        }

        /// Serves `batch` on the next (or the open) watch of `res`.
        fn send(&self, res: Res, batch: Vec<Value>) {
            self.script.send((res, batch)).unwrap();
        }

        /// Drops the receiver and checks the discovery task returns because of it.
        async fn stop(self) {
            drop(self.rx);
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("run returns once receivers are gone")
                .unwrap();
            self.server.abort();
        }
    }

    /// `obj` (a [`pod`]) with these annotations.
    fn annotated(mut obj: Value, annotations: &[(&str, &str)]) -> Value {
        let a: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        obj["metadata"]["annotations"] = json!(a);
        obj
    }

    /// Waits until the published set satisfies `ok`; panics with `what` and the last set after 10 s.
    async fn expect_where(
        rx: &mut watch::Receiver<Vec<DiscoveredEndpoint>>,
        what: &str,
        ok: impl Fn(&[DiscoveredEndpoint]) -> bool,
    ) -> Vec<DiscoveredEndpoint> {
        let res = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|eps| ok(eps)))
            .await
            .map(|got| got.unwrap().clone());
        match res {
            Ok(got) => got,
            Err(_) => panic!("{what}: never seen; last set {:#?}", *rx.borrow()),
        }
    }

    /// (id, kv_events, kv_replay) of each endpoint, with the pod IP written as `IP` (it is derived from the name).
    fn kv(eps: &[DiscoveredEndpoint]) -> Vec<(String, Option<String>, Option<String>)> {
        let ip = |a: &Option<String>, url: &str| {
            let host = url
                .trim_start_matches("http://")
                .rsplit_once(':')
                .unwrap()
                .0;
            a.as_ref().map(|a| a.replace(host, "IP"))
        };
        eps.iter()
            .map(|e| {
                (
                    e.id.clone(),
                    ip(&e.kv_events, &e.url),
                    ip(&e.kv_replay, &e.url),
                )
            })
            .collect()
    }

    fn row(
        id: &str,
        pubs: Option<&str>,
        replay: Option<&str>,
    ) -> (String, Option<String>, Option<String>) {
        let tcp = |p: Option<&str>| p.map(|p| format!("tcp://IP:{p}"));
        (id.to_string(), tcp(pubs), tcp(replay))
    }

    /// Waits until the published set is exactly these endpoint ids, in order; panics with the last set after 10 s.
    async fn expect(
        rx: &mut watch::Receiver<Vec<DiscoveredEndpoint>>,
        ids: &[&str],
    ) -> Vec<DiscoveredEndpoint> {
        expect_where(rx, &format!("endpoint ids {ids:?}"), |eps| {
            eps.iter().map(|e| e.id.as_str()).eq(ids.iter().copied())
        })
        .await
    }

    #[tokio::test]
    async fn follows_an_inference_pool_and_its_pods() {
        let lists = HashMap::from([
            (
                Res::Pods,
                list(
                    "PodList",
                    vec![
                        pod("a", 2, &[("app", "vllm"), (GPU_LABEL, "H100")], true, false),
                        pod(
                            "b",
                            3,
                            &[("app", "vllm"), (ROLE_LABEL, "decode")],
                            false,
                            false,
                        ),
                        pod("c", 4, &[("app", "other")], true, false),
                    ],
                ),
            ),
            (
                Res::Pools,
                list("InferencePoolList", vec![pool(5, &[8000, 8001])]),
            ),
        ]);
        let mut run = Run::start(lists, Selection::InferencePool("llama".into()));

        // Initial lists: only ready, selected pod `a`, on both target ports.
        let eps = expect(&mut run.rx, &["a:8000", "a:8001"]).await;
        assert_eq!(eps[0].pool, "llama");
        assert_eq!(eps[0].role, Role::Both);
        assert!(
            eps[0].url.starts_with("http://10.0.0.") && eps[0].url.ends_with(":8000"),
            "{}",
            eps[0].url
        );
        assert_eq!(gpu_type(&eps[0]), Some("H100"));

        // b becomes ready: it joins, with its decode role.
        run.send(
            Res::Pods,
            vec![ev(
                "MODIFIED",
                pod(
                    "b",
                    6,
                    &[("app", "vllm"), (ROLE_LABEL, "decode")],
                    true,
                    false,
                ),
            )],
        );
        let eps = expect(&mut run.rx, &["a:8000", "a:8001", "b:8000", "b:8001"]).await;
        assert_eq!(eps[2].role, Role::Decode);

        // a turns not ready: it leaves.
        run.send(
            Res::Pods,
            vec![ev(
                "MODIFIED",
                pod("a", 7, &[("app", "vllm")], false, false),
            )],
        );
        expect(&mut run.rx, &["b:8000", "b:8001"]).await;

        // The pool drops a target port.
        run.send(Res::Pools, vec![ev("MODIFIED", pool(8, &[8000]))]);
        expect(&mut run.rx, &["b:8000"]).await;

        // c is relabelled into the pool (and is ready); b starts terminating in the same batch.
        run.send(
            Res::Pods,
            vec![
                ev(
                    "MODIFIED",
                    pod("c", 9, &[("app", "vllm"), (GPU_LABEL, "L4")], true, false),
                ),
                ev(
                    "MODIFIED",
                    pod(
                        "b",
                        10,
                        &[("app", "vllm"), (ROLE_LABEL, "decode")],
                        true,
                        true,
                    ),
                ),
            ],
        );
        let eps = expect(&mut run.rx, &["c:8000"]).await;
        assert_eq!(gpu_type(&eps[0]), Some("L4"));

        // c is deleted: nothing left.
        run.send(
            Res::Pods,
            vec![ev("DELETED", pod("c", 11, &[("app", "vllm")], true, false))],
        );
        expect(&mut run.rx, &[]).await;

        // A ready pod comes back, then the pool itself is deleted: the set empties again.
        run.send(
            Res::Pods,
            vec![ev("ADDED", pod("d", 12, &[("app", "vllm")], true, false))],
        );
        expect(&mut run.rx, &["d:8000"]).await;
        run.send(Res::Pools, vec![ev("DELETED", pool(13, &[8000]))]);
        expect(&mut run.rx, &[]).await;

        run.stop().await;
    }

    #[tokio::test]
    async fn kv_event_addresses_follow_pod_annotations_and_ranks() {
        let app = [("app", "vllm")];
        let lists = HashMap::from([
            (
                Res::Pods,
                list(
                    "PodList",
                    vec![
                        // PUB port annotated: replay defaults to PUB + 1.
                        annotated(pod("a", 2, &app, true, false), &[(KV_EVENTS_PORT, "5557")]),
                        // PUB port as a label, replay annotated.
                        annotated(
                            pod(
                                "b",
                                3,
                                &[("app", "vllm"), (KV_EVENTS_PORT, "6000")],
                                true,
                                false,
                            ),
                            &[(KV_REPLAY_PORT, "6100")],
                        ),
                        // Nothing announced, or nonsense: no KV events.
                        pod("c", 4, &app, true, false),
                        annotated(pod("d", 5, &app, true, false), &[(KV_EVENTS_PORT, "zmq")]),
                    ],
                ),
            ),
            (
                Res::Pools,
                list("InferencePoolList", vec![pool(6, &[8000])]),
            ),
        ]);
        let mut run = Run::start(lists, Selection::InferencePool("llama".into()));

        let eps = expect(&mut run.rx, &["a:8000", "b:8000", "c:8000", "d:8000"]).await;
        assert_eq!(
            kv(&eps),
            vec![
                row("a:8000", Some("5557"), Some("5558")),
                row("b:8000", Some("6000"), Some("6100")),
                row("c:8000", None, None),
                row("d:8000", None, None),
            ]
        );
        assert!(
            eps[0]
                .kv_events
                .as_deref()
                .unwrap()
                .starts_with("tcp://10.0.0.")
        );

        // a's publisher moves: the endpoint follows.
        run.send(
            Res::Pods,
            vec![ev(
                "MODIFIED",
                annotated(pod("a", 7, &app, true, false), &[(KV_EVENTS_PORT, "5600")]),
            )],
        );
        expect_where(&mut run.rx, "a's new publisher", |eps| {
            kv(eps)[0] == row("a:8000", Some("5600"), Some("5601"))
        })
        .await;

        // The annotation is removed: a is still an endpoint, without KV events.
        run.send(
            Res::Pods,
            vec![ev("MODIFIED", pod("a", 8, &app, true, false))],
        );
        expect_where(&mut run.rx, "a without KV events", |eps| {
            kv(eps)[0] == row("a:8000", None, None)
        })
        .await;

        // Two target ports = two data-parallel ranks: each rank's sockets are offset by its rank. b's replay port is
        // explicit; c announces only a PUB port, whose default replay (PUB + 1) would be rank 1's PUB, so none.
        run.send(
            Res::Pods,
            vec![ev(
                "MODIFIED",
                annotated(pod("c", 9, &app, true, false), &[(KV_EVENTS_PORT, "7000")]),
            )],
        );
        run.send(Res::Pools, vec![ev("MODIFIED", pool(10, &[8000, 8001]))]);
        let eps = expect_where(&mut run.rx, "two ranks per pod", |eps| {
            eps.len() == 8
                && eps
                    .iter()
                    .any(|e| e.id == "c:8001" && e.kv_events.is_some())
        })
        .await;
        assert_eq!(
            kv(&eps),
            vec![
                row("a:8000", None, None),
                row("a:8001", None, None),
                row("b:8000", Some("6000"), Some("6100")),
                row("b:8001", Some("6001"), Some("6101")),
                row("c:8000", Some("7000"), None),
                row("c:8001", Some("7001"), None),
                row("d:8000", None, None),
                row("d:8001", None, None),
            ]
        );

        // b is deleted: its endpoints (and their KV-event addresses) go.
        run.send(
            Res::Pods,
            vec![ev("DELETED", pod("b", 11, &app, true, false))],
        );
        expect(
            &mut run.rx,
            &["a:8000", "a:8001", "c:8000", "c:8001", "d:8000", "d:8001"],
        )
        .await;

        run.stop().await;
    }

    #[tokio::test]
    async fn label_selector_mode_uses_configured_ports_and_pool() {
        let lists = HashMap::from([(
            Res::Pods,
            list(
                "PodList",
                vec![pod(
                    "p1",
                    2,
                    &[("app", "vllm"), (ROLE_LABEL, "prefill")],
                    true,
                    false,
                )],
            ),
        )]);
        let sel = Selection::Labels {
            pool: "fleet".into(),
            match_labels: BTreeMap::from([("app".to_string(), "vllm".to_string())]),
            ports: vec![8200],
        };
        let mut run = Run::start(lists, sel);
        let eps = expect(&mut run.rx, &["p1:8200"]).await;
        assert_eq!(
            (eps[0].pool.as_str(), eps[0].role),
            ("fleet", Role::Prefill)
        );
        run.send(
            Res::Pods,
            vec![ev("MODIFIED", pod("p1", 3, &[("app", "vllm")], true, true))],
        );
        expect(&mut run.rx, &[]).await;
        run.stop().await;
    }

    #[tokio::test]
    async fn rejects_bad_selections() {
        let (svc, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let bad = Selection::Labels {
            pool: "p".into(),
            match_labels: BTreeMap::new(),
            ports: vec![8000],
        };
        let err = KubernetesDiscovery::new(client.clone(), "default", bad)
            .err()
            .unwrap();
        assert!(
            matches!(err, Error::InvalidConfig { ref field, .. } if field == "discovery.kubernetes.selector")
        );
        let bad = Selection::Labels {
            pool: "p".into(),
            match_labels: BTreeMap::from([("a".into(), "b".into())]),
            ports: vec![],
        };
        assert!(KubernetesDiscovery::new(client.clone(), "default", bad).is_err());
        assert!(
            KubernetesDiscovery::new(client, "", Selection::InferencePool("x".into())).is_err()
        );
    }

    #[test]
    fn ipv6_pods_get_bracketed_urls_and_bad_ports_are_dropped() {
        let mut p: Pod =
            serde_json::from_value(pod("v6", 1, &[("app", "vllm")], true, false)).unwrap();
        if let Some(s) = p.status.as_mut() {
            s.pod_ip = Some("fd00::1".into());
        }
        let eps = endpoints(
            "x",
            &BTreeMap::from([("app".into(), "vllm".into())]),
            &[8000],
            [&p],
        );
        assert_eq!(eps[0].url, "http://[fd00::1]:8000");
        let pl: InferencePool = serde_json::from_value(pool(1, &[8000, 0, 70000, 8000])).unwrap();
        assert_eq!(pool_ports(&pl), vec![8000]);
    }

    #[test]
    fn crd_schema_names_the_gie_group() {
        use kube::CustomResourceExt;
        let crd = InferencePool::crd();
        assert_eq!(crd.spec.group, "inference.networking.k8s.io");
        assert_eq!(crd.spec.names.kind, "InferencePool");
        assert_eq!(crd.spec.versions[0].name, "v1");
    }
}
