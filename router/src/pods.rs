//! The router's live per-pod load as [`policies::pool::PodSample`]s: read in process through a [`PodsHandle`], or
//! by other processes (the metrics adapter, the autoscaler) from `GET /debug/pods` on each router replica.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use policies::pool::{GPU_LABEL, PodSample, ScrapedSample};

use crate::shared::AppState;
use crate::snapshot::{Endpoint, EndpointSnapshot};

/// A cheap clonable handle on a router's snapshot, for in-process readers of [`samples`].
#[derive(Clone)]
pub struct PodsHandle {
    pub snapshot: Arc<ArcSwap<EndpointSnapshot>>,
    /// The router's scrape-age origin.
    pub epoch: tokio::time::Instant,
    /// Scrapes older than this read as missing.
    pub stale_after: Duration,
}

impl PodsHandle {
    pub fn from_state(state: &AppState) -> Self {
        Self {
            snapshot: state.snapshot.clone(),
            epoch: state.epoch,
            stale_after: state.proxy.stale_after,
        }
    }

    /// Every endpoint of the current snapshot, as of now.
    pub fn samples(&self) -> Vec<PodSample> {
        let since = tokio::time::Instant::now().duration_since(self.epoch);
        samples(&self.snapshot.load(), since, self.stale_after)
    }
}

/// The pod name the Kubernetes metrics APIs key by: Kubernetes endpoints have id `pod:port` and a URL on the pod
/// IP, static ones have the URL's `host:port` as id (kept whole, so two pods on one host stay apart).
fn pod_name(e: &Endpoint) -> String {
    let id = e.id.as_str();
    if e.url.trim_start_matches("http://") == id {
        return id.to_string();
    }
    id.rsplit_once(':').map_or(id, |(pod, _)| pod).to_string()
}

/// One sample per (pool, endpoint) of `snap`, with scrapes judged at `since_epoch`.
pub fn samples(snap: &EndpointSnapshot, since_epoch: Duration, stale: Duration) -> Vec<PodSample> {
    let mut out = Vec::new();
    for p in &snap.pools {
        for e in &p.endpoints {
            let st = &e.state;
            let gpu = e
                .labels
                .get(GPU_LABEL)
                .cloned()
                .or_else(|| st.scraped_gpu.lock().as_deref().map(str::to_string));
            out.push(PodSample {
                id: e.id.as_str().to_string(),
                pod: pod_name(e),
                pool: p.name.to_string(),
                model: p.model.to_string(),
                role: e.role.as_str().to_string(),
                gpu,
                labels: e.labels.clone(),
                scraped: st.scraped(since_epoch, stale).map(|s| ScrapedSample {
                    waiting: s.waiting,
                    running: s.running,
                    kv_usage: s.kv_usage,
                    age_ms: s.age_ms,
                }),
                in_flight: st.in_flight.load(Ordering::Relaxed),
                in_flight_tokens: st.in_flight_tokens.load(Ordering::Relaxed),
                prefill_tokens: st.prefill_tokens.load(Ordering::Relaxed),
            });
        }
    }
    out
}

/// `GET /debug/pods`: `[PodSample, ..]`.
pub async fn debug_pods(State(app): State<Arc<AppState>>) -> Response {
    axum::Json(PodsHandle::from_state(&app).samples()).into_response()
}
