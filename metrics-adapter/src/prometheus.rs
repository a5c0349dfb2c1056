//! A [`Source`] that reads Prometheus (`GET /api/v1/query`, through `prometheus-http-query`): one PromQL per served
//! metric, answered per pod, for clusters where the adapter should not depend on the router (or the router is not
//! the only client of the model servers).
//!
//! Queries (defaults for vLLM's own series, overridable per metric):
//!
//! | metric | value query | sample-time query |
//! |---|---|---|
//! | `weir_kv_cache_utilization` | `vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc` (V1 name, else the pre-V1 one) | `timestamp(vllm:kv_cache_usage_perc) or timestamp(vllm:gpu_cache_usage_perc)` |
//! | `weir_num_requests_waiting` | `vllm:num_requests_waiting` | `timestamp(<query>)` |
//! | `weir_num_requests_running` | `vllm:num_requests_running` | `timestamp(<query>)` |
//!
//! Each result series is one pod's value, keyed by its labels ([`SeriesLabels`]: `pod`, else `instance`; `pool`,
//! `model_name`, `role`, `gpu` as weir's PodMonitor relabels them). Several series of one pod (vLLM's `engine`
//! label under data parallelism) fold with the metric's [`crate::catalog::Fold`].
//!
//! **Staleness.** An instant query answers the last sample within Prometheus's lookback (5 min by default), so a pod
//! Prometheus stopped hearing from keeps its last value for minutes. The source therefore asks the sample-time query
//! beside the value query (both concurrently) and leaves out every series whose sample is older than
//! [`PrometheusConfig::max_age`]: such a pod is missing, as the HPA wants, never served as current. Ages are measured
//! on Prometheus's clock (evaluation time minus sample time), so clock skew with the adapter does not matter. Stale
//! series are logged and reported by [`Source::stale`] (the `stale` list of `GET /metrics-api/pools`). `timestamp()`
//! sees real sample times only on plain selectors: a value query with functions or aggregations needs a sample-time
//! query of plain-selector `timestamp()`s (as the KV default shows), else its age reads as 0.
//!
//! Reads are cached for [`PrometheusConfig::ttl`] per metric, so KEDA's and the HPA's polling hit one answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use policies::pool::PoolKey;
use prometheus_http_query::response::{Data, InstantVector};

use crate::catalog::{self, Metric};
use crate::source::{PodValue, Source, StaleValue};
use crate::{Error, Result};

/// The PromQL of one metric.
#[derive(Debug, Clone)]
pub struct MetricQuery {
    pub metric: &'static Metric,
    /// Per-pod values.
    pub value: String,
    /// Per-pod sample times (Unix seconds), joined to `value` on the labels.
    pub timestamp: String,
}

impl MetricQuery {
    /// `value` with the default sample-time query `timestamp(<value>)`.
    pub fn new(metric: &'static Metric, value: impl Into<String>) -> Self {
        let value = value.into();
        Self {
            metric,
            timestamp: format!("timestamp({value})"),
            value,
        }
    }
}

/// The default queries: vLLM's KV-cache utilization, waiting and running requests.
pub fn default_queries() -> Vec<MetricQuery> {
    let m = |name: &str| catalog::find(name).expect("a catalog metric");
    vec![
        MetricQuery {
            metric: m("weir_kv_cache_utilization"),
            value: "vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc".into(),
            timestamp:
                "timestamp(vllm:kv_cache_usage_perc) or timestamp(vllm:gpu_cache_usage_perc)".into(),
        },
        MetricQuery::new(m("weir_num_requests_waiting"), "vllm:num_requests_waiting"),
        MetricQuery::new(m("weir_num_requests_running"), "vllm:num_requests_running"),
    ]
}

/// Which series labels carry a pod's identity.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesLabels {
    /// The pod name: the first of these labels present (`pod`, then `instance` for static targets).
    pub pod: Vec<String>,
    /// The router pool (InferencePool); the model when absent.
    pub pool: String,
    pub model: String,
    /// P/D role; `prefill-decode` when absent.
    pub role: String,
    /// GPU type; `unknown` when absent.
    pub gpu: String,
}

impl Default for SeriesLabels {
    fn default() -> Self {
        Self {
            pod: vec!["pod".into(), "instance".into()],
            pool: "pool".into(),
            model: "model_name".into(),
            role: "role".into(),
            gpu: "gpu".into(),
        }
    }
}

impl SeriesLabels {
    /// Sets one field from `FIELD=LABEL` (`pod=pod,instance` lists alternatives).
    pub fn set(&mut self, spec: &str) -> Result<(), String> {
        let (field, label) = spec
            .split_once('=')
            .filter(|(_, l)| !l.trim().is_empty())
            .ok_or_else(|| format!("`{spec}`: expected FIELD=LABEL"))?;
        let label = label.trim().to_string();
        match field.trim() {
            "pod" => self.pod = label.split(',').map(|s| s.trim().to_string()).collect(),
            "pool" => self.pool = label,
            "model" => self.model = label,
            "role" => self.role = label,
            "gpu" => self.gpu = label,
            other => {
                return Err(format!(
                    "`{other}`: not a series field (one of pod, pool, model, role, gpu)"
                ));
            }
        }
        Ok(())
    }

    /// The pod value of a series, `None` without a pod label.
    fn pod_value(&self, labels: &BTreeMap<String, String>, value: f64) -> Option<PodValue> {
        let pod = self.pod.iter().find_map(|l| labels.get(l))?.clone();
        let get = |l: &String| labels.get(l).filter(|v| !v.is_empty()).cloned();
        let model = get(&self.model).unwrap_or_else(|| "unknown".into());
        Some(PodValue {
            pod,
            pool: get(&self.pool).unwrap_or_else(|| model.clone()),
            key: PoolKey {
                role: get(&self.role).unwrap_or_else(|| "prefill-decode".into()),
                gpu: get(&self.gpu).unwrap_or_else(|| "unknown".into()),
                model,
            },
            labels: labels.clone(),
            value,
        })
    }
}

/// Settings of a [`PrometheusSource`].
#[derive(Debug, Clone)]
pub struct PrometheusConfig {
    /// Base URL (`http://prometheus.monitoring.svc:9090`).
    pub url: String,
    pub queries: Vec<MetricQuery>,
    pub labels: SeriesLabels,
    /// A sample older than this is not served.
    pub max_age: Duration,
    /// How long one answer per metric is reused.
    pub ttl: Duration,
    /// Per-query timeout.
    pub timeout: Duration,
}

impl PrometheusConfig {
    /// `url` with the default queries and labels, `max_age` 45 s (three missed scrapes at the PodMonitor's 15 s),
    /// `ttl` 1 s, `timeout` 2 s.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            queries: default_queries(),
            labels: SeriesLabels::default(),
            max_age: Duration::from_secs(45),
            ttl: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
        }
    }

    /// Replaces (or adds) the query of one metric from `NAME=PROMQL` (`NAME` with or without `weir_`); the sample
    /// time becomes `timestamp(PROMQL)` unless `timestamp` is set.
    pub fn set_query(&mut self, spec: &str, timestamp: bool) -> Result<(), String> {
        let (name, promql) = spec
            .split_once('=')
            .filter(|(_, q)| !q.trim().is_empty())
            .ok_or_else(|| format!("`{spec}`: expected METRIC=PROMQL"))?;
        let name = name.trim();
        let metric = catalog::find(name)
            .or_else(|| catalog::find(&format!("weir_{name}")))
            .ok_or_else(|| {
                let known: Vec<&str> = catalog::METRICS.iter().map(|m| m.name).collect();
                format!(
                    "`{name}` is not a served metric (one of {})",
                    known.join(", ")
                )
            })?;
        let promql = promql.trim();
        match self
            .queries
            .iter_mut()
            .find(|q| q.metric.name == metric.name)
        {
            Some(q) if timestamp => q.timestamp = promql.to_string(),
            Some(q) => *q = MetricQuery::new(metric, promql),
            None if timestamp => {
                return Err(format!(
                    "`{name}`: set its value query before its sample-time query"
                ));
            }
            None => self.queries.push(MetricQuery::new(metric, promql)),
        }
        Ok(())
    }
}

/// One metric's cached answer: when it was read, the fresh values, the stale series.
type Cached = (tokio::time::Instant, Arc<Vec<PodValue>>, Vec<StaleValue>);

/// Prometheus as a source.
pub struct PrometheusSource {
    client: prometheus_http_query::Client,
    config: PrometheusConfig,
    cache: Mutex<HashMap<&'static str, Cached>>,
}

impl PrometheusSource {
    pub fn new(config: PrometheusConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| Error::Source {
                source_name: "prometheus".into(),
                reason: e.to_string(),
            })?;
        let client =
            prometheus_http_query::Client::from(http, &config.url).map_err(|e| Error::Source {
                source_name: "prometheus".into(),
                reason: format!("{}: {e}", config.url),
            })?;
        Ok(Self {
            client,
            config,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn error(&self, reason: String) -> Error {
        Error::Source {
            source_name: format!("prometheus {}", self.config.url),
            reason,
        }
    }

    async fn instant(&self, promql: &str) -> Result<Vec<InstantVector>> {
        let r = self
            .client
            .query(promql)
            .get()
            .await
            .map_err(|e| self.error(format!("`{promql}`: {e}")))?;
        match r.into_inner().0 {
            Data::Vector(v) => Ok(v),
            Data::Scalar(_) | Data::Matrix(_) => Err(self.error(format!(
                "`{promql}` must return an instant vector (one series per pod)"
            ))),
        }
    }

    async fn read(&self, q: &MetricQuery) -> Result<(Vec<PodValue>, Vec<StaleValue>)> {
        let (values, times) =
            futures::future::join(self.instant(&q.value), self.instant(&q.timestamp)).await;
        let series = values?.into_iter().map(series_of).collect::<Vec<_>>();
        let times = times?.into_iter().map(series_of).collect::<Vec<_>>();
        let (fresh, stale) = split_stale(q.metric, &series, &times, self.config.max_age);
        let mut pods = Vec::new();
        for (labels, v) in fresh {
            match self.config.labels.pod_value(&labels, v) {
                Some(p) => pods.push(p),
                None => tracing::debug!(
                    ?labels,
                    metric = q.metric.name,
                    "series without a pod label"
                ),
            }
        }
        let stale: Vec<StaleValue> = stale
            .into_iter()
            .filter_map(|(labels, age)| {
                Some(StaleValue {
                    metric: q.metric.name,
                    pod: self.config.labels.pod_value(&labels, 0.0)?.pod,
                    age_seconds: age,
                })
            })
            .collect();
        Ok((fold_per_pod(q.metric, pods), stale))
    }
}

/// A result series as (labels without `__name__`, sample value, sample timestamp).
fn series_of(v: InstantVector) -> (BTreeMap<String, String>, f64, f64) {
    let (labels, sample) = v.into_inner();
    let labels = labels
        .into_iter()
        .filter(|(k, _)| k != "__name__")
        .collect();
    (labels, sample.value(), sample.timestamp())
}

type Series = (BTreeMap<String, String>, f64, f64);

/// Splits value series into fresh `(labels, value)` and stale `(labels, age in seconds)`: the age of a series is its
/// evaluation time minus the sample time its label set has in `times` (0 when it has none: the value query's own
/// time is all there is). Non-finite and negative values are dropped (the API never carries them).
#[allow(clippy::type_complexity)]
pub(crate) fn split_stale(
    metric: &Metric,
    values: &[Series],
    times: &[Series],
    max_age: Duration,
) -> (
    Vec<(BTreeMap<String, String>, f64)>,
    Vec<(BTreeMap<String, String>, f64)>,
) {
    let at: HashMap<&BTreeMap<String, String>, f64> =
        times.iter().map(|(l, t, _)| (l, *t)).collect();
    let (mut fresh, mut stale) = (Vec::new(), Vec::new());
    for (labels, value, eval_time) in values {
        let age = at.get(labels).map_or(0.0, |t| (eval_time - t).max(0.0));
        if age > max_age.as_secs_f64() {
            stale.push((labels.clone(), age));
        } else if value.is_finite() && *value >= 0.0 {
            fresh.push((labels.clone(), *value));
        } else {
            tracing::debug!(?labels, value, metric = metric.name, "value out of range");
        }
    }
    (fresh, stale)
}

/// Several series of one pod (vLLM engines under data parallelism) folded into one value, sorted by pod.
fn fold_per_pod(metric: &Metric, pods: Vec<PodValue>) -> Vec<PodValue> {
    let mut by_pod: BTreeMap<String, (PodValue, Vec<f64>)> = BTreeMap::new();
    for p in pods {
        let v = p.value;
        by_pod
            .entry(p.pod.clone())
            .or_insert_with(|| (p, Vec::new()))
            .1
            .push(v);
    }
    by_pod
        .into_values()
        .filter_map(|(mut p, vs)| {
            p.value = catalog::fold(metric.fold, vs)?;
            Some(p)
        })
        .collect()
}

impl Source for PrometheusSource {
    fn name(&self) -> &str {
        "prometheus"
    }

    fn metrics(&self) -> Vec<&'static Metric> {
        self.config.queries.iter().map(|q| q.metric).collect()
    }

    fn values<'a>(&'a self, metric: &'static Metric) -> BoxFuture<'a, Result<Vec<PodValue>>> {
        Box::pin(async move {
            let now = tokio::time::Instant::now();
            if let Some((at, v, _)) = self.cache.lock().get(metric.name)
                && now.duration_since(*at) < self.config.ttl
            {
                return Ok(v.as_ref().clone());
            }
            let q = self
                .config
                .queries
                .iter()
                .find(|q| q.metric.name == metric.name)
                .ok_or_else(|| self.error(format!("no query configured for `{}`", metric.name)))?;
            let (values, stale) = self.read(q).await?;
            if !stale.is_empty() {
                tracing::warn!(metric = metric.name, max_age = ?self.config.max_age, ?stale,
                    "Prometheus samples older than the max age left out");
            }
            let values = Arc::new(values);
            self.cache
                .lock()
                .insert(metric.name, (now, values.clone(), stale));
            Ok(values.as_ref().clone())
        })
    }

    fn stale(&self) -> Vec<StaleValue> {
        let mut out: Vec<StaleValue> = self
            .cache
            .lock()
            .values()
            .flat_map(|(_, _, s)| s.iter().cloned())
            .collect();
        out.sort_by(|a, b| (a.metric, &a.pod).cmp(&(b.metric, &b.pod)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn series_older_than_the_max_age_are_stale_on_prometheus_clock() {
        let m = catalog::find("weir_num_requests_waiting").unwrap();
        let a = labels(&[("pod", "a")]);
        let b = labels(&[("pod", "b")]);
        let c = labels(&[("pod", "c")]);
        let values = vec![
            (a.clone(), 3.0, 1000.0),
            (b.clone(), 4.0, 1000.0),
            (c.clone(), f64::NAN, 1000.0),
        ];
        let times = vec![(a.clone(), 999.0, 1000.0), (b.clone(), 900.0, 1000.0)];
        let (fresh, stale) = split_stale(m, &values, &times, Duration::from_secs(45));
        assert_eq!(fresh, vec![(a, 3.0)]);
        assert_eq!(stale, vec![(b, 100.0)]);
    }

    #[test]
    fn pods_come_from_labels_with_fallbacks_and_fold() {
        let l = SeriesLabels::default();
        let p = l
            .pod_value(
                &labels(&[("instance", "10.0.0.1:8000"), ("model_name", "llama")]),
                0.5,
            )
            .unwrap();
        assert_eq!(
            (p.pod.as_str(), p.pool.as_str(), p.key.to_string()),
            (
                "10.0.0.1:8000",
                "llama",
                "llama/prefill-decode/unknown".to_string()
            )
        );
        assert!(l.pod_value(&labels(&[("job", "x")]), 1.0).is_none());
        let kv = catalog::find("weir_kv_cache_utilization").unwrap();
        let two = |v| {
            l.pod_value(&labels(&[("pod", "p"), ("gpu", "H100")]), v)
                .unwrap()
        };
        let folded = fold_per_pod(kv, vec![two(0.2), two(0.4)]);
        assert_eq!(folded.len(), 1);
        assert!((folded[0].value - 0.3).abs() < 1e-9);
        assert_eq!(folded[0].key.gpu, "H100");
    }

    #[test]
    fn config_flags_parse() {
        let mut c = PrometheusConfig::new("http://p:9090");
        c.set_query("num_requests_waiting=sum by (pod) (x)", false)
            .unwrap();
        c.set_query("num_requests_waiting=timestamp(x)", true)
            .unwrap();
        let q = c
            .queries
            .iter()
            .find(|q| q.metric.name == "weir_num_requests_waiting")
            .unwrap();
        assert_eq!(
            (q.value.as_str(), q.timestamp.as_str()),
            ("sum by (pod) (x)", "timestamp(x)")
        );
        c.set_query("weir_in_flight_tokens=y", false).unwrap();
        assert_eq!(c.queries.last().unwrap().timestamp, "timestamp(y)");
        assert!(c.set_query("nope=x", false).is_err());
        assert!(c.set_query("queued_prompt_tokens=x", true).is_err());
        assert!(c.set_query("waiting", false).is_err());
        let mut l = SeriesLabels::default();
        l.set("pod=kubernetes_pod_name, instance").unwrap();
        l.set("gpu=accelerator").unwrap();
        assert_eq!(l.pod, ["kubernetes_pod_name", "instance"]);
        assert_eq!(l.gpu, "accelerator");
        assert!(l.set("zone=x").is_err());
        assert!(l.set("pod=").is_err());
    }
}
