//! deploy/ checked offline, against real tools: every kustomization renders with `kubectl kustomize`; every rendered
//! object parses as its `k8s-openapi` type (and survives a round trip, so a misspelt field is caught) or validates
//! against the OpenAPI schema of its CRD (vendored upstream CRDs in deploy/vendor/, weir's own in deploy/crds/), with
//! fields the API server would prune reported; the alert rules pass `promtool check rules` and `promtool test rules`;
//! and every Grafana panel's query returns data from a real Prometheus scraping `weir demo` under traffic.
//!
//! Needs `kubectl` (or `WEIR_KUBECTL`), `promtool` and `prometheus` on PATH: scripts/test installs them from Debian.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{self, MODEL, Weir};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

/// A required external tool: a missing one fails the test (scripts/test installs them), never skips it.
fn tool(name: &str, env: &str) -> String {
    let bin = std::env::var(env).unwrap_or_else(|_| name.to_string());
    let found = Command::new(&bin)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "`{bin}` not found: install it (scripts/test does) or set {env}"
    );
    bin
}

/// Every directory under deploy/ holding a kustomization.yaml (vendor/ holds none), sorted.
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.file_name().is_some_and(|n| n == "kustomization.yaml") {
                out.push(p.parent().unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy(), &mut out);
    out
}

/// The YAML documents of a stream as JSON values (empty documents dropped).
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).expect("YAML document");
            serde_json::to_value(v).expect("YAML as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubectl kustomize <dir>`, parsed; panics with kubectl's message when it does not render.
fn render(dir: &Path) -> Vec<Value> {
    let kubectl = tool("kubectl", "WEIR_KUBECTL");
    let out = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("running kubectl");
    assert!(
        out.status.success(),
        "`{kubectl} kustomize {}` failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8(out.stdout).expect("UTF-8 output"))
}

fn id(obj: &Value) -> String {
    format!(
        "{}/{} {}",
        obj["apiVersion"].as_str().unwrap_or("?"),
        obj["kind"].as_str().unwrap_or("?"),
        obj["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Where `orig` has something `back` lacks or differs on: fields the typed parse dropped (unknown or misplaced) or
/// changed (wrong type). `back` may add defaults.
fn lost_in_round_trip(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost_in_round_trip(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: not a field of the type")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost_in_round_trip(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        // A float field (e.g. a CRD schema's `minimum`) reads an integer and writes it back as `0.0`: the same number.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Parses `obj` as `T` and back; the problems found, or `None` when the kind is not a built-in one.
fn typed_problems(obj: &Value) -> Option<Vec<String>> {
    use k8s_openapi::api::{apps, autoscaling, core, networking, policy, rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
    fn check<T: serde::de::DeserializeOwned + serde::Serialize>(obj: &Value) -> Vec<String> {
        match serde_json::from_value::<T>(obj.clone()) {
            Err(e) => vec![format!("does not parse: {e}")],
            Ok(t) => {
                let back = serde_json::to_value(&t).expect("serialize");
                let mut out = Vec::new();
                lost_in_round_trip(obj, &back, "", &mut out);
                out
            }
        }
    }
    let api = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    Some(match (api, kind) {
        ("v1", "Namespace") => check::<core::v1::Namespace>(obj),
        ("v1", "ServiceAccount") => check::<core::v1::ServiceAccount>(obj),
        ("v1", "ConfigMap") => check::<core::v1::ConfigMap>(obj),
        ("v1", "Secret") => check::<core::v1::Secret>(obj),
        ("v1", "Service") => check::<core::v1::Service>(obj),
        ("apps/v1", "Deployment") => check::<apps::v1::Deployment>(obj),
        ("apps/v1", "StatefulSet") => check::<apps::v1::StatefulSet>(obj),
        ("rbac.authorization.k8s.io/v1", "Role") => check::<rbac::v1::Role>(obj),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => check::<rbac::v1::RoleBinding>(obj),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => check::<rbac::v1::ClusterRole>(obj),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            check::<rbac::v1::ClusterRoleBinding>(obj)
        }
        ("policy/v1", "PodDisruptionBudget") => check::<policy::v1::PodDisruptionBudget>(obj),
        ("networking.k8s.io/v1", "NetworkPolicy") => check::<networking::v1::NetworkPolicy>(obj),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => {
            check::<autoscaling::v2::HorizontalPodAutoscaler>(obj)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            check::<CustomResourceDefinition>(obj)
        }
        ("apiregistration.k8s.io/v1", "APIService") => check::<APIService>(obj),
        _ => return None,
    })
}

/// `(group/version, kind)` -> the version's `openAPIV3Schema`, from the vendored CRDs and weir's own.
fn crd_schemas() -> BTreeMap<(String, String), Value> {
    let mut files = Vec::new();
    for dir in [
        "vendor/gateway-api",
        "vendor/gateway-api-inference-extension",
        "vendor/prometheus-operator",
        "vendor/keda",
        "vendor/cert-manager",
        "crds",
    ] {
        for e in std::fs::read_dir(deploy().join(dir)).expect("CRD directory") {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
            {
                files.push(p);
            }
        }
    }
    let mut out = BTreeMap::new();
    for f in files {
        for crd in yaml_docs(&std::fs::read_to_string(&f).unwrap()) {
            if crd["kind"] != "CustomResourceDefinition" {
                continue;
            }
            let group = crd["spec"]["group"].as_str().expect("group");
            let kind = crd["spec"]["names"]["kind"].as_str().expect("kind");
            for v in crd["spec"]["versions"].as_array().expect("versions") {
                let version = v["name"].as_str().expect("version name");
                let mut schema = v["schema"]["openAPIV3Schema"].clone();
                drop_re2_only_patterns(&mut schema);
                assert!(
                    schema.is_object(),
                    "{}: {group}/{version} has no schema",
                    f.display()
                );
                out.insert((format!("{group}/{version}"), kind.to_string()), schema);
            }
        }
    }
    out
}

/// CRD patterns are Go RE2, which allows inline flags (`(?i)`, e.g. prometheus-operator's
/// `partial_response_strategy`); JSON Schema patterns are ECMA-262, which does not, so the schema would not compile.
/// Those few patterns are dropped from the copy checked against (no weir manifest sets such a field).
fn drop_re2_only_patterns(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.get("pattern")
                .and_then(Value::as_str)
                .is_some_and(|p| p.contains("(?"))
            {
                m.remove("pattern");
            }
            m.values_mut().for_each(drop_re2_only_patterns);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_re2_only_patterns),
        _ => {}
    }
}

/// Fields of `obj` that `schema` does not declare where it does not allow unknown fields: the API server prunes
/// them silently, so they are typos or misplaced keys.
fn pruned_fields(obj: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    match obj {
        Value::Object(m) => {
            let props = schema["properties"].as_object();
            let additional = schema.get("additionalProperties");
            for (k, v) in m {
                if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let sub = props
                    .and_then(|p| p.get(k))
                    .or(additional.filter(|a| a.is_object()));
                match sub {
                    Some(s) => pruned_fields(v, s, &format!("{path}.{k}"), out),
                    None if preserve || additional == Some(&Value::Bool(true)) => {}
                    None if props.is_some() => {
                        out.push(format!("{path}.{k}: not in the CRD schema"))
                    }
                    None => {}
                }
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                pruned_fields(v, &schema["items"], &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_kustomization_renders_and_every_object_validates() {
    let schemas = crd_schemas();
    let dirs = kustomizations();
    for must in [
        "base",
        "overlays/demo",
        "overlays/gateway",
        "overlays/production",
    ] {
        assert!(
            dirs.contains(&deploy().join(must)),
            "deploy/{must} is not a kustomization"
        );
    }
    for must in [
        "overlays/keda",
        "overlays/hpa",
        "overlays/vllm",
        "observability",
    ] {
        assert!(
            dirs.contains(&deploy().join(must)),
            "deploy/{must} is not a kustomization"
        );
    }
    let mut problems = Vec::new();
    let mut custom_kinds = BTreeSet::new();
    for dir in &dirs {
        let objs = render(dir);
        assert!(!objs.is_empty(), "{} renders nothing", dir.display());
        let rel = dir.strip_prefix(repo()).unwrap().display().to_string();
        for obj in &objs {
            let found = match typed_problems(obj) {
                Some(p) => p,
                None => {
                    let key = (
                        obj["apiVersion"].as_str().unwrap_or_default().to_string(),
                        obj["kind"].as_str().unwrap_or_default().to_string(),
                    );
                    let Some(schema) = schemas.get(&key) else {
                        problems.push(format!(
                            "{rel}: {}: no k8s-openapi type and no CRD schema",
                            id(obj)
                        ));
                        continue;
                    };
                    custom_kinds.insert(format!("{}/{}", key.0, key.1));
                    let validator = jsonschema::draft4::new(schema)
                        .unwrap_or_else(|e| panic!("schema of {key:?} does not compile: {e}"));

                    let mut p: Vec<String> = validator
                        .iter_errors(obj)
                        .map(|e| format!("{} at {}", e, e.instance_path()))
                        .collect();
                    pruned_fields(obj, schema, "", &mut p);
                    p
                }
            };
            problems.extend(
                found
                    .into_iter()
                    .map(|p| format!("{rel}: {}: {p}", id(obj))),
            );
        }
    }
    assert!(
        problems.is_empty(),
        "invalid manifests:\n{}",
        problems.join("\n")
    );
    // Each third-party kind the overlays use was checked against its schema at least once.
    for kind in [
        "gateway.networking.k8s.io/v1/GatewayClass",
        "gateway.networking.k8s.io/v1/Gateway",
        "gateway.networking.k8s.io/v1/HTTPRoute",
        "inference.networking.k8s.io/v1/InferencePool",
        "monitoring.coreos.com/v1/ServiceMonitor",
        "monitoring.coreos.com/v1/PodMonitor",
        "monitoring.coreos.com/v1/PrometheusRule",
        "monitoring.coreos.com/v1alpha1/AlertmanagerConfig",
        "keda.sh/v1alpha1/ScaledObject",
        "cert-manager.io/v1/Certificate",
        "cert-manager.io/v1/Issuer",
    ] {
        assert!(
            custom_kinds.contains(kind),
            "no rendered {kind} was validated"
        );
    }
}

#[test]
fn schema_checks_catch_misspelt_and_mistyped_fields() {
    // The checks above must be able to fail: a typo in a Deployment and a wrong type in an InferencePool.
    let dep = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"replicas": 1, "selector": {}, "template": {"spec": {"containers": [], "nodeSelectr": {}}}}});
    let p = typed_problems(&dep).unwrap();
    assert!(p.iter().any(|p| p.contains("nodeSelectr")), "{p:?}");
    let schemas = crd_schemas();
    let key = (
        "inference.networking.k8s.io/v1".to_string(),
        "InferencePool".to_string(),
    );
    let pool = json!({"spec": {"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": "8000"}],
        "endpointPickerRef": {"name": "weir-epp", "port": {"number": 9002}}, "extra": 1}});
    let v = jsonschema::draft4::new(&schemas[&key]).unwrap();
    assert!(!v.is_valid(&pool), "a string port must not validate");
    let mut pruned = Vec::new();
    pruned_fields(&pool, &schemas[&key], "", &mut pruned);
    assert!(
        pruned.iter().any(|p| p.contains(".spec.extra")),
        "{pruned:?}"
    );
}

/// The PrometheusRule's `spec` as a plain rule file, written to `dir/weir.rules.yaml`.
fn write_rules(dir: &Path) -> PathBuf {
    let objs = render(&deploy().join("observability"));
    let rule = objs
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .expect("a PrometheusRule in deploy/observability");
    let path = dir.join("weir.rules.yaml");
    std::fs::write(&path, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    path
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("weir-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = tool("promtool", "WEIR_PROMTOOL");
    let dir = tempdir("rules");
    let rules = write_rules(&dir);
    let tests = dir.join("weir-rules.test.yaml");
    let src = deploy().join("observability/rules/weir-rules.test.yaml");
    std::fs::copy(&src, &tests).unwrap();
    for args in [vec!["check", "rules"], vec!["test", "rules"]] {
        let file = if args[0] == "check" { &rules } else { &tests };
        let out = Command::new(&promtool)
            .args(&args)
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // One unit test per alert: every alert of the rules appears in an alert_rule_test.
    let spec: Value = serde_json::to_value(
        serde_yaml::from_str::<serde_yaml::Value>(&std::fs::read_to_string(&rules).unwrap())
            .unwrap(),
    )
    .unwrap();
    let test_text = std::fs::read_to_string(&src).unwrap();
    for group in spec["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            if let Some(alert) = rule["alert"].as_str() {
                assert!(
                    test_text.contains(&format!("alertname: {alert}\n")),
                    "alert {alert} has no promtool unit test in {}",
                    src.display()
                );
            }
        }
    }
}

/// One Grafana panel query, with the dashboard's variables substituted as Grafana would.
struct PanelQuery {
    /// `dashboard / panel title`, for messages.
    name: String,
    /// PromQL.
    expr: String,
}

/// Every panel query of every dashboard JSON; `$__rate_interval` becomes `1m` (Grafana's value for a 15 s scrape is
/// 1m), the other variables their current values (the datasource is not in the queries).
fn panel_queries() -> Vec<PanelQuery> {
    let dir = deploy().join("observability/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 6,
        "expected six dashboards in {}",
        dir.display()
    );
    let mut out = Vec::new();
    for f in files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let mut vars: Vec<(String, String)> = vec![("__rate_interval".into(), "1m".into())];
        for v in d["templating"]["list"].as_array().unwrap() {
            if v["type"] == "constant" {
                let name = v["name"].as_str().unwrap().to_string();
                vars.push((name, v["query"].as_str().unwrap().to_string()));
            }
        }
        let panels = d["panels"].as_array().unwrap();
        let ids: BTreeSet<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
        assert_eq!(
            ids.len(),
            panels.len(),
            "{}: duplicate panel ids",
            f.display()
        );
        for p in panels {
            let targets = p["targets"].as_array().expect("panel targets");
            assert!(
                !targets.is_empty(),
                "{}: panel {} has no query",
                f.display(),
                p["title"]
            );
            for t in targets {
                let mut expr = t["expr"].as_str().expect("expr").to_string();
                for (k, v) in &vars {
                    expr = expr
                        .replace(&format!("${{{k}}}"), v)
                        .replace(&format!("${k}"), v);
                }
                assert!(
                    !expr.contains('$'),
                    "{}: unresolved variable in {expr}",
                    f.display()
                );
                out.push(PanelQuery {
                    name: format!(
                        "{} / {}",
                        d["title"].as_str().unwrap(),
                        p["title"].as_str().unwrap()
                    ),
                    expr,
                });
            }
        }
    }
    out
}

/// Panels (matched by a part of their query) that show events `weir demo`'s traffic cannot cause, with why. They are
/// still queried, and must parse and return no series: once one returns data, the test fails until its entry is
/// removed and the panel is checked like the others, so this list cannot go stale.
const NO_DEMO_EVENTS: &[(&str, &str)] = &[
    (
        "decision=\"rejected\"",
        "admission rejections need tenants with limits; `weir demo` has one implicit tenant without any",
    ),
    (
        "admission_displaced_total",
        "displacing a queued request needs a full queue of a higher tier; `weir demo`'s clients are one tier",
    ),
];

/// A `prometheus` server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://").trim_end_matches('/')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_returns_data_from_prometheus_scraping_weir_demo() {
    let prometheus = tool("prometheus", "WEIR_PROMETHEUS");
    let queries = panel_queries();
    // The dashboards ConfigMap carries every dashboard file.
    let objs = render(&deploy().join("observability"));
    let cm = objs
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "weir-dashboards")
        .expect("the weir-dashboards ConfigMap");
    let files: BTreeSet<String> = std::fs::read_dir(deploy().join("observability/dashboards"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    let keys: BTreeSet<String> = cm["data"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys, files,
        "the dashboards ConfigMap must carry every dashboard file"
    );

    let demo = Weir::start(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--fleet",
        "1xh100:llama-3.1-8b,1xl4:llama-3.1-8b",
        "--time-scale",
        "20",
        "--seed",
        "7",
    ])
    .ready()
    .await;
    let router = demo.json()["listen"].as_str().expect("listen").to_string();
    let pods = demo.json()["pods"].as_array().expect("pods").clone();

    // Scrape config: the router as the ServiceMonitor would, the pods with the pool/gpu/role labels the PodMonitor's
    // relabelings take from the pod labels (here from the demo's own description of its pods). The rule groups run
    // every second instead of every 30 s so the recording rules have values within the test.
    let dir = tempdir("prometheus");
    let rules = write_rules(&dir);
    let text = std::fs::read_to_string(&rules)
        .unwrap()
        .replace("interval: 30s", "interval: 1s");
    std::fs::write(&rules, text).unwrap();
    let pod_targets: Vec<Value> = pods
        .iter()
        .map(|p| {
            json!({"targets": [host_port(p["url"].as_str().unwrap())],
                   "labels": {"pool": p["model"], "gpu": p["gpu"], "role": p["role"]}})
        })
        .collect();
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules.display().to_string()],
        "scrape_configs": [
            {"job_name": "weir-router", "static_configs": [{"targets": [host_port(&router)]}]},
            {"job_name": "weir-model-servers", "static_configs": pod_targets},
        ],
    });
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let port = free_port();
    let prom = Prometheus {
        child: Command::new(&prometheus)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus"),
        url: format!("http://127.0.0.1:{port}"),
    };
    let http = common::client();
    common::eventually(Duration::from_secs(30), "prometheus ready", async || {
        http.get(format!("{}/-/ready", prom.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;

    // Traffic for the whole query phase (rates need increases inside their window): three clients in a loop
    // sending streamed chats that share a long system prompt (prefix hits), until the queries are done.
    let system = "You are a careful assistant for GPU fleet operators. ".repeat(30);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..3 {
        let (http, url, system, stop) = (
            http.clone(),
            format!("{router}/v1/chat/completions"),
            system.clone(),
            stop.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = json!({"model": MODEL, "stream": true, "max_tokens": 24,
                    "messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": format!("Client {c} question {i}: what is KV reuse?")}]});
                let r = http.post(&url).json(&body).send().await.expect("request");
                assert!(r.status().is_success(), "status {}", r.status());
                r.text().await.expect("body");
                i += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            i
        }));
    }

    let mut eventless = Vec::new();
    let mut checked = Vec::new();
    for q in &queries {
        match NO_DEMO_EVENTS.iter().find(|(p, _)| q.expr.contains(p)) {
            Some((_, why)) => eventless.push((q, *why)),
            None => checked.push(q),
        }
    }
    // Every query must return at least one finite sample; the traffic above keeps every rate window non-empty.
    let query = async |expr: &str| -> Vec<Value> {
        let r = http
            .get(format!("{}/api/v1/query", prom.url))
            .query(&[("query", expr)])
            .send()
            .await
            .expect("query");
        let body: Value = r.json().await.expect("query JSON");
        assert_eq!(body["status"], "success", "query {expr} failed: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let finite = |res: &[Value]| {
        res.iter().any(|s| {
            s["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(f64::is_finite)
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut empty: Vec<&PanelQuery> = checked.clone();
    while !empty.is_empty() && tokio::time::Instant::now() < deadline {
        let mut still = Vec::new();
        for q in empty {
            if !finite(&query(&q.expr).await) {
                still.push(q);
            }
        }
        empty = still;
        if !empty.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data from a Prometheus scraping `weir demo`:\n{}",
        empty
            .iter()
            .map(|q| format!("  {}: {}", q.name, q.expr))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (q, why) in &eventless {
        assert!(
            query(&q.expr).await.is_empty(),
            "panel {} now has data from `weir demo`: remove it from NO_DEMO_EVENTS ({why}) so it is checked",
            q.name
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        assert!(c.await.unwrap() > 0, "a traffic client sent nothing");
    }
    eprintln!(
        "{} panel queries returned data; {} returned none, as they must (events `weir demo` cannot cause):\n  {}",
        checked.len(),
        eventless.len(),
        eventless
            .iter()
            .map(|(q, why)| format!("{}: {why}", q.name))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    drop(prom);
    drop(demo);
}
