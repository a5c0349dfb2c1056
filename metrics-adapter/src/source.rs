//! Where metric values come from, behind one trait: [`Source::values`] gives one metric's per-pod values.
//!
//! [`RouterSource`] reads the router's live snapshot: in process through a closure the `weir` binary builds from
//! the router's handle, or from router replicas over HTTP (`GET /debug/pods` on each, merged with
//! [`policies::pool::merge_replicas`]: engine numbers from the freshest scrape, router in-flight counts summed).
//! Replica reads are cached for `ttl` so that KEDA's and the HPA's polling hit one snapshot.
//!
//! Staleness: a pod whose scrape is older than the router's `stale_after` arrives without engine numbers and is
//! left out of every metric (see [`crate::catalog::Metric::from_sample`]); a replica that does not answer within
//! `timeout` is skipped with a warning, and when no replica answers the query fails (the API answers 503, which the
//! aggregator reads as "stale", rather than zeros).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use policies::pool::{PodSample, PoolKey, merge_replicas};

use crate::catalog::{Metric, TierQueue, TierQueues};
use crate::{Error, Result};

/// One pod's value of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct PodValue {
    /// Pod name (`describedObject.name`).
    pub pod: String,
    /// Router pool (InferencePool) the pod serves in.
    pub pool: String,
    /// Scaling pool: model × role × GPU.
    pub key: PoolKey,
    /// Pod labels, for `labelSelector`.
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A value a source left out because its sample was too old (see [`crate::prometheus`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StaleValue {
    pub metric: &'static str,
    pub pod: String,
    /// Age of the sample when it was last read.
    pub age_seconds: f64,
}

/// A metrics source.
pub trait Source: Send + Sync {
    /// For logs and errors.
    fn name(&self) -> &str;
    /// The metrics this source can answer.
    fn metrics(&self) -> Vec<&'static Metric>;
    /// Every pod's value of `metric` now (pods without a fresh value left out), sorted by pod.
    fn values<'a>(&'a self, metric: &'static Metric) -> BoxFuture<'a, Result<Vec<PodValue>>>;
    /// Values left out of the last reads because their samples were older than the source's max age (a source
    /// that ages its samples elsewhere, like the router's scraper, reports none).
    fn stale(&self) -> Vec<StaleValue> {
        Vec::new()
    }
    /// Admission's queues per pool × tier now; `None` when the source has no admission to read (the tier-queue
    /// metrics are then not served).
    fn tier_queues(&self) -> Option<Vec<TierQueue>> {
        None
    }
    /// Changes whenever [`Source::tier_queues`] does, for watchers that push on change (`None`: poll).
    fn tier_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// How a [`RouterSource`] gets samples.
#[derive(Clone)]
pub enum RouterFeed {
    /// The router in this process.
    InProcess(Arc<dyn Fn() -> Vec<PodSample> + Send + Sync>),
    /// Router replicas' base URLs (`http://host:port`), read on `GET /debug/pods`.
    Replicas {
        urls: Vec<String>,
        client: reqwest::Client,
        timeout: Duration,
        ttl: Duration,
    },
}

/// The router's live snapshot as a source.
pub struct RouterSource {
    feed: RouterFeed,
    /// Last merged replica read and when it was taken.
    cache: Mutex<Option<(tokio::time::Instant, Arc<Vec<PodSample>>)>>,
    /// The router's admission queues, when it admits (in process only).
    tiers: Option<Arc<dyn TierQueues>>,
}

impl RouterSource {
    pub fn new(feed: RouterFeed) -> Self {
        Self {
            feed,
            cache: Mutex::new(None),
            tiers: None,
        }
    }

    /// Also serves admission's tier queues from `tiers`.
    pub fn with_tier_queues(mut self, tiers: Arc<dyn TierQueues>) -> Self {
        self.tiers = Some(tiers);
        self
    }

    /// The current samples (cached for `ttl` when read from replicas).
    pub async fn samples(&self) -> Result<Arc<Vec<PodSample>>> {
        match &self.feed {
            RouterFeed::InProcess(f) => Ok(Arc::new(f())),
            RouterFeed::Replicas {
                urls,
                client,
                timeout,
                ttl,
            } => {
                let now = tokio::time::Instant::now();
                if let Some((at, s)) = &*self.cache.lock()
                    && now.duration_since(*at) < *ttl
                {
                    return Ok(s.clone());
                }
                let reads = futures::future::join_all(urls.iter().map(|u| async move {
                    let r = client
                        .get(format!("{}/debug/pods", u.trim_end_matches('/')))
                        .timeout(*timeout)
                        .send()
                        .await
                        .and_then(reqwest::Response::error_for_status)
                        .map_err(|e| e.to_string())?;
                    r.json::<Vec<PodSample>>().await.map_err(|e| e.to_string())
                }))
                .await;
                let mut ok = Vec::new();
                let mut last_err = String::new();
                for (u, r) in urls.iter().zip(reads) {
                    match r {
                        Ok(s) => ok.push(s),
                        Err(e) => {
                            tracing::warn!(replica = %u, error = %e, "router replica did not answer");
                            last_err = format!("{u}: {e}");
                        }
                    }
                }
                if ok.is_empty() {
                    return Err(Error::Source {
                        source_name: self.name().to_string(),
                        reason: format!("no router replica answered ({last_err})"),
                    });
                }
                let merged = Arc::new(merge_replicas(ok));
                *self.cache.lock() = Some((now, merged.clone()));
                Ok(merged)
            }
        }
    }
}

impl Source for RouterSource {
    fn name(&self) -> &str {
        match self.feed {
            RouterFeed::InProcess(_) => "router (in process)",
            RouterFeed::Replicas { .. } => "router replicas",
        }
    }

    fn metrics(&self) -> Vec<&'static Metric> {
        crate::catalog::METRICS.iter().collect()
    }

    fn values<'a>(&'a self, metric: &'static Metric) -> BoxFuture<'a, Result<Vec<PodValue>>> {
        Box::pin(async move {
            let samples = self.samples().await?;
            let mut out: Vec<PodValue> = samples
                .iter()
                .filter_map(|s| {
                    let value = (metric.from_sample)(s)?;
                    Some(PodValue {
                        pod: s.pod.clone(),
                        pool: s.pool.clone(),
                        key: s.key(),
                        labels: s.labels.clone(),
                        value,
                    })
                })
                .filter(|v| v.value.is_finite())
                .collect();
            out.sort_by(|a, b| a.pod.cmp(&b.pod));
            Ok(out)
        })
    }

    fn tier_queues(&self) -> Option<Vec<TierQueue>> {
        self.tiers.as_ref().map(|t| t.tier_queues())
    }

    fn tier_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.tiers.as_ref().and_then(|t| t.changes())
    }
}
