//! The HTTP surface: `custom.metrics.k8s.io` v1beta2 and v1beta1 (always), `external.metrics.k8s.io/v1beta1`
//! (opt-in: only one backend may own it per cluster), and `GET /metrics-api/pools` (JSON for KEDA's `metrics-api`
//! scaler and the dashboard). Wire shapes and rules follow `autoscaling-and-metrics-apis.md` §1–§2:
//!
//! - values are quantities in milli-units, never NaN or negative ([`crate::quantity`]);
//! - a pod without a fresh value is left out (missing), not reported as 0;
//! - object and namespace requests answer exactly one item: a known metric with no data for the object answers
//!   `"0"` (an empty list would make the HPA fail the metric);
//! - an unknown metric or resource is a `Status` with code 404, reason `NotFound`;
//! - a failing source is a 503 `Status` (the aggregator marks the group-version stale instead of scaling on zeros).
//!
//! Objects: `inferencepools.inference.networking.k8s.io/{name}` is the router pool `{name}`;
//! `deployments.apps/{name}` and `leaderworkersets.leaderworkerset.x-k8s.io/{name}` are the pods whose router pool
//! is `{name}`, whose `weir.dev/pool` label is `{name}`, or (LeaderWorkerSet) whose
//! `leaderworkerset.sigs.k8s.io/name` label is `{name}`.
//! Namespaces: the router's snapshot carries no namespace; with [`AdapterConfig::namespace`] set, other namespaces
//! have no pods (pods lists are empty, objects 404); unset, every namespace sees the router's pods.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::catalog::{self, Metric};
use crate::quantity::{quantity, rfc3339};
use crate::selector::Selector;
use crate::source::{PodValue, Source};

/// Group of the custom metrics API.
pub const CUSTOM_GROUP: &str = "custom.metrics.k8s.io";
/// Group-version of the external metrics API.
pub const EXTERNAL_GV: &str = "external.metrics.k8s.io/v1beta1";
/// Prefix of per-pool external metric names (`weir_pool_num_requests_waiting`).
pub const EXTERNAL_PREFIX: &str = "weir_pool_";

/// Adapter settings.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// Serve `external.metrics.k8s.io` (off by default: KEDA or prometheus-adapter often own it).
    pub external: bool,
    /// The one namespace the router's pods live in, when known.
    pub namespace: Option<String>,
    /// `windowSeconds` reported with each value: the span a value summarizes (the router's scrape interval,
    /// rounded up to a second).
    pub window_seconds: u64,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            external: false,
            namespace: None,
            window_seconds: 1,
        }
    }
}

/// Shared state of the API.
pub struct AdapterState {
    pub source: Arc<dyn Source>,
    pub config: AdapterConfig,
    /// Wall clock in Unix seconds, for `timestamp` (passed in so tests are exact).
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// An object kind the custom API resolves.
struct ObjectKind {
    /// Resource as the HPA writes it (`deployments.apps`).
    resource: &'static str,
    /// Bare plural also accepted.
    plural: &'static str,
    kind: &'static str,
    api_version: &'static str,
}

const OBJECTS: &[ObjectKind] = &[
    ObjectKind {
        resource: "inferencepools.inference.networking.k8s.io",
        plural: "inferencepools",
        kind: "InferencePool",
        api_version: "inference.networking.k8s.io/v1",
    },
    ObjectKind {
        resource: "deployments.apps",
        plural: "deployments",
        kind: "Deployment",
        api_version: "apps/v1",
    },
    ObjectKind {
        resource: "leaderworkersets.leaderworkerset.x-k8s.io",
        plural: "leaderworkersets",
        kind: "LeaderWorkerSet",
        api_version: "leaderworkerset.x-k8s.io/v1",
    },
];

/// A Kubernetes `Status` error reply.
fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message.into(), "reason": reason, "code": code.as_u16(),
        })),
    )
        .into_response()
}

fn not_found(what: impl Into<String>) -> Response {
    status(StatusCode::NOT_FOUND, "NotFound", what)
}

fn source_error(e: crate::Error) -> Response {
    tracing::warn!(error = %e, "metrics source failed");
    status(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        e.to_string(),
    )
}

fn selector(q: &HashMap<String, String>, key: &str) -> Result<Selector, Box<Response>> {
    Selector::parse(q.get(key).map_or("", String::as_str))
        .map_err(|e| Box::new(status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string())))
}

/// The metric labels of a pod value (what `metricLabelSelector` and external `labelSelector` match).
fn metric_labels(v: &PodValue) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("pool".to_string(), v.key.to_string()),
        ("model".to_string(), v.key.model.clone()),
        ("role".to_string(), v.key.role.clone()),
        ("gpu".to_string(), v.key.gpu.clone()),
        ("inference_pool".to_string(), v.pool.clone()),
    ])
}

fn version_ok(v: &str) -> bool {
    v == "v1beta2" || v == "v1beta1"
}

/// The custom API's discovery document.
async fn custom_discovery(
    State(s): State<Arc<AdapterState>>,
    Path(version): Path<String>,
) -> Response {
    if !version_ok(&version) {
        return not_found(format!("{CUSTOM_GROUP}/{version} is not served"));
    }
    let mut resources = Vec::new();
    for m in s.source.metrics() {
        let mut entry = |name: String, namespaced: bool| {
            resources.push(
                json!({"name": name, "singularName": "", "namespaced": namespaced,
                "kind": "MetricValueList", "verbs": ["get"]}),
            );
        };
        entry(format!("pods/{}", m.name), true);
        for o in OBJECTS {
            entry(format!("{}/{}", o.resource, m.name), true);
        }
        entry(format!("namespaces/{}", m.name), false);
    }
    axum::Json(json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": format!("{CUSTOM_GROUP}/{version}"), "resources": resources}))
    .into_response()
}

/// One `MetricValueList` item in `version`'s shape.
fn item(s: &AdapterState, version: &str, described: Value, metric: &Metric, value: f64) -> Value {
    let ts = rfc3339((s.clock)());
    let q = quantity(value);
    if version == "v1beta1" {
        json!({"describedObject": described, "metricName": metric.name, "selector": null,
            "timestamp": ts, "window": s.config.window_seconds, "value": q})
    } else {
        json!({"describedObject": described, "metric": {"name": metric.name, "selector": null},
            "timestamp": ts, "windowSeconds": s.config.window_seconds, "value": q})
    }
}

fn list(version: &str, items: Vec<Value>) -> Response {
    axum::Json(json!({"kind": "MetricValueList",
        "apiVersion": format!("{CUSTOM_GROUP}/{version}"), "metadata": {}, "items": items}))
    .into_response()
}

/// Resolves the version and metric, or the 404 reply.
fn lookup(s: &AdapterState, version: &str, metric: &str) -> Result<&'static Metric, Box<Response>> {
    if !version_ok(version) {
        return Err(Box::new(not_found(format!(
            "{CUSTOM_GROUP}/{version} is not served"
        ))));
    }
    catalog::find(metric)
        .filter(|m| s.source.metrics().iter().any(|x| x.name == m.name))
        .ok_or_else(|| Box::new(not_found(format!("metric `{metric}` is not served"))))
}

fn namespace_ok(s: &AdapterState, ns: &str) -> bool {
    s.config.namespace.as_deref().is_none_or(|n| n == ns)
}

/// `GET /apis/custom.metrics.k8s.io/{version}/namespaces/{ns}/{resource}/{name}/{metric}`.
async fn custom_object(
    State(s): State<Arc<AdapterState>>,
    Path((version, ns, resource, name, metric)): Path<(String, String, String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let m = match lookup(&s, &version, &metric) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let (labels, metric_labels_sel) = match (
        selector(&q, "labelSelector"),
        selector(&q, "metricLabelSelector"),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(r), _) | (_, Err(r)) => return *r,
    };
    let values = match s.source.values(m).await {
        Ok(v) => v,
        Err(e) => return source_error(e),
    };
    let in_ns = namespace_ok(&s, &ns);
    let selected = values
        .into_iter()
        .filter(|v| labels.matches(&v.labels) && metric_labels_sel.matches(&metric_labels(v)));
    if resource == "pods" {
        let field = q
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("metadata.name="));
        let items = selected
            .filter(|v| in_ns && (name == "*" || v.pod == name) && field.is_none_or(|f| v.pod == f))
            .map(|v| {
                let d = json!({"kind": "Pod", "namespace": ns, "name": v.pod, "apiVersion": "/v1"});
                item(&s, &version, d, m, v.value)
            })
            .collect();
        return list(&version, items);
    }
    let Some(kind) = OBJECTS
        .iter()
        .find(|o| o.resource == resource || o.plural == resource)
    else {
        return not_found(format!("resource `{resource}` has no metrics here"));
    };
    if !in_ns {
        return not_found(format!(
            "{} {ns}/{name} is not known to this adapter",
            kind.kind
        ));
    }
    let member = |v: &PodValue| {
        v.pool == name
            || v.labels.get("weir.dev/pool") == Some(&name)
            || (kind.kind == "LeaderWorkerSet"
                && v.labels.get("leaderworkerset.sigs.k8s.io/name") == Some(&name))
    };
    // No data for a known metric is "0": the object reply must hold exactly one item.
    let value = catalog::fold(m.fold, selected.filter(member).map(|v| v.value)).unwrap_or(0.0);
    let d =
        json!({"kind": kind.kind, "namespace": ns, "name": name, "apiVersion": kind.api_version});
    list(&version, vec![item(&s, &version, d, m, value)])
}

/// `GET /apis/custom.metrics.k8s.io/{version}/namespaces/{ns}/metrics/{metric}`: the namespace's total (or mean).
async fn custom_namespace(
    State(s): State<Arc<AdapterState>>,
    Path((version, ns, metric)): Path<(String, String, String)>,
) -> Response {
    let m = match lookup(&s, &version, &metric) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let values = match s.source.values(m).await {
        Ok(v) => v,
        Err(e) => return source_error(e),
    };
    let value = if namespace_ok(&s, &ns) {
        catalog::fold(m.fold, values.iter().map(|v| v.value)).unwrap_or(0.0)
    } else {
        0.0
    };
    let d = json!({"kind": "Namespace", "name": ns, "apiVersion": "/v1"});
    list(&version, vec![item(&s, &version, d, m, value)])
}

/// Cluster-scoped objects: none carry weir metrics.
async fn custom_root(
    Path((version, resource, name, metric)): Path<(String, String, String, String)>,
) -> Response {
    not_found(format!(
        "no metric `{metric}` for cluster-scoped {resource}/{name} ({version})"
    ))
}

async fn external_discovery(State(s): State<Arc<AdapterState>>) -> Response {
    let mut names: Vec<String> = s
        .source
        .metrics()
        .iter()
        .map(|m| external_name(m))
        .collect();
    if s.source.tier_queues().is_some() {
        names.extend(catalog::TIER_METRICS.iter().map(|m| m.name.to_string()));
    }
    let resources: Vec<Value> = names
        .into_iter()
        .map(|name| {
            json!({"name": name, "singularName": "", "namespaced": true,
                "kind": "ExternalMetricValueList", "verbs": ["get"]})
        })
        .collect();
    axum::Json(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": EXTERNAL_GV,
        "resources": resources}),
    )
    .into_response()
}

fn external_name(m: &Metric) -> String {
    format!("{EXTERNAL_PREFIX}{}", m.name.trim_start_matches("weir_"))
}

/// Folds per-pod values into one value per scaling pool, sorted by pool.
fn per_pool(m: &Metric, values: &[PodValue]) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut pools: BTreeMap<String, (BTreeMap<String, String>, Vec<f64>)> = BTreeMap::new();
    for v in values {
        pools
            .entry(v.key.to_string())
            .or_insert_with(|| {
                let mut l = metric_labels(v);
                l.remove("inference_pool");
                (l, Vec::new())
            })
            .1
            .push(v.value);
    }
    pools
        .into_values()
        .filter_map(|(l, vs)| Some((l, catalog::fold(m.fold, vs)?)))
        .collect()
}

/// Tier-queue values with their metric labels (`pool`, `tier`), one per queue.
fn per_tier_queue(
    m: &catalog::TierMetric,
    queues: &[catalog::TierQueue],
) -> Vec<(BTreeMap<String, String>, f64)> {
    queues
        .iter()
        .map(|q| {
            let labels = BTreeMap::from([
                ("pool".to_string(), q.pool.clone()),
                ("tier".to_string(), q.tier.clone()),
            ]);
            (labels, (m.from_queue)(q))
        })
        .collect()
}

/// `GET /apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}?labelSelector=..`: one item per scaling pool
/// matching the selector (labels `pool`, `model`, `role`, `gpu`), or for the tier-queue metrics one per admission
/// queue (labels `pool` = router pool, `tier`); the HPA sums them. With nothing reporting, one `"0"` item labelled
/// with the selector's equalities (an empty list would fail the HPA).
async fn external_value(
    State(s): State<Arc<AdapterState>>,
    Path((ns, metric)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let sel = match selector(&q, "labelSelector") {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let rows = if let Some(m) = s
        .source
        .metrics()
        .into_iter()
        .find(|m| external_name(m) == metric)
    {
        match s.source.values(m).await {
            Ok(v) if namespace_ok(&s, &ns) => per_pool(m, &v),
            Ok(_) => Vec::new(),
            Err(e) => return source_error(e),
        }
    } else if let (Some(m), Some(queues)) = (catalog::find_tier(&metric), s.source.tier_queues()) {
        if namespace_ok(&s, &ns) {
            per_tier_queue(m, &queues)
        } else {
            Vec::new()
        }
    } else {
        return not_found(format!("external metric `{metric}` is not served"));
    };
    let ts = rfc3339((s.clock)());
    let mut items: Vec<Value> = rows
        .into_iter()
        .filter(|(l, _)| sel.matches(l))
        .map(|(l, v)| {
            json!({"metricName": metric, "metricLabels": l, "timestamp": ts,
            "window": s.config.window_seconds, "value": quantity(v)})
        })
        .collect();
    if items.is_empty() {
        let labels: BTreeMap<String, String> = q
            .get("labelSelector")
            .into_iter()
            .flat_map(|s| s.split(','))
            .filter(|t| !t.contains("!="))
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| {
                (
                    k.trim().to_string(),
                    v.trim_start_matches('=').trim().to_string(),
                )
            })
            .collect();
        items.push(
            json!({"metricName": metric, "metricLabels": labels, "timestamp": ts,
            "window": s.config.window_seconds, "value": "0"}),
        );
    }
    axum::Json(
        json!({"kind": "ExternalMetricValueList", "apiVersion": EXTERNAL_GV, "metadata": {},
        "items": items}),
    )
    .into_response()
}

/// Every metric per scaling pool: `[{pool, model, role, gpu, <metric>: value, ..}]`, filtered by the `model`, `role`,
/// `gpu` and `pool` query parameters.
pub async fn pool_table(
    source: &dyn Source,
    filter: &HashMap<String, String>,
) -> crate::Result<Vec<serde_json::Map<String, Value>>> {
    let mut rows: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for m in source.metrics() {
        for (labels, v) in per_pool(m, &source.values(m).await?) {
            if !filter.iter().all(|(k, want)| labels.get(k) == Some(want)) {
                continue;
            }
            let row = rows.entry(labels["pool"].clone()).or_insert_with(|| {
                labels
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                    .collect()
            });
            row.insert(m.name.to_string(), json!(v));
        }
    }
    Ok(rows.into_values().collect())
}

/// `GET /metrics-api/pools`: `{"pools": [..], "stale": [..], "tier_queues": [..]}` (see [`pool_table`]; `stale`:
/// the values the source left out as too old, [`Source::stale`]; `tier_queues`: admission's queues per pool × tier,
/// `{pool, tier, queued, oldest_wait_seconds}`, empty without admission); KEDA `metrics-api` reads e.g.
/// `valueLocation: pools.0.weir_num_requests_waiting` with `?model=..&role=decode&gpu=H100`.
async fn pools_json(
    State(s): State<Arc<AdapterState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match pool_table(s.source.as_ref(), &q).await {
        Ok(rows) => axum::Json(json!({"pools": rows, "stale": s.source.stale(),
            "tier_queues": s.source.tier_queues().unwrap_or_default()}))
        .into_response(),
        Err(e) => source_error(e),
    }
}

async fn fallback() -> Response {
    not_found("the requested resource could not be found")
}

/// The adapter's HTTP surface.
pub fn app(state: Arc<AdapterState>) -> Router {
    let c = "/apis/custom.metrics.k8s.io/{version}";
    let mut r = Router::new()
        .route(c, get(custom_discovery))
        .route(
            &format!("{c}/namespaces/{{ns}}/metrics/{{metric}}"),
            get(custom_namespace),
        )
        .route(
            &format!("{c}/namespaces/{{ns}}/{{resource}}/{{name}}/{{metric}}"),
            get(custom_object),
        )
        .route(
            &format!("{c}/{{resource}}/{{name}}/{{metric}}"),
            get(custom_root),
        )
        .route("/metrics-api/pools", get(pools_json));
    if state.config.external {
        r = r
            .route(
                "/apis/external.metrics.k8s.io/v1beta1",
                get(external_discovery),
            )
            .route(
                "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}",
                get(external_value),
            );
    }
    r.fallback(fallback).with_state(state)
}
