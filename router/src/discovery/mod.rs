//! Discovery seam: sources publish endpoint sets; the router turns them into immutable snapshots.
//!
//! A source is anything that knows which model-server endpoints exist: static config ([`Discovery::add_static`]),
//! or the Kubernetes watcher (`discovery/kubernetes.rs`). Each source owns one
//! `tokio::sync::watch::Sender<Vec<DiscoveredEndpoint>>` obtained from [`Discovery::add_source`] and simply sends its
//! whole current set whenever it changes. [`crate::snapshot::follow`] merges every source's latest set, builds a new
//! [`EndpointSnapshot`](crate::snapshot::EndpointSnapshot) and swaps it into the shared `ArcSwap` atomically; the
//! request path only ever loads that `Arc`, never takes a write lock. Per-endpoint live state (in-flight counts,
//! breaker, scraped metrics) is keyed by endpoint id and survives rebuilds.

pub mod kubernetes;

use std::collections::BTreeMap;

use policies::endpoint::Role;
use tokio::sync::watch;

use crate::config::Config;

/// One endpoint as a discovery source reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredEndpoint {
    /// Stable identity (pod name plus port for Kubernetes, `host:port` for static config). Live state is keyed by it.
    pub id: String,
    /// Base URL, `http://host:port`, no path.
    pub url: String,
    /// Pool (InferencePool / config pool) this endpoint belongs to. Unknown pools get an implicit round-robin pool
    /// whose served model name is the pool name.
    pub pool: String,
    /// P/D role (`llm-d.ai/role` label).
    pub role: Role,
    /// Pod labels (or config labels), for future filters; never used as metric labels.
    pub labels: BTreeMap<String, String>,
    /// vLLM KV-event PUB address (`tcp://host:port`), followed by `precise-prefix` pools.
    pub kv_events: Option<String>,
    /// KV-event replay ROUTER address, to fill sequence gaps.
    pub kv_replay: Option<String>,
}

impl DiscoveredEndpoint {
    /// An aggregated (`prefill-decode`) endpoint with no labels, identified by its URL's `host:port`.
    pub fn from_url(pool: &str, url: &str) -> Self {
        let id = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        Self {
            id,
            url: url.to_string(),
            pool: pool.to_string(),
            role: Role::Both,
            labels: BTreeMap::new(),
            kv_events: None,
            kv_replay: None,
        }
    }
}

/// The set of discovery sources feeding one router.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Each source's name and the receiving end of its endpoint-set channel.
    sources: Vec<(String, watch::Receiver<Vec<DiscoveredEndpoint>>)>,
    /// Senders of sources that never change (static config), kept alive so their receivers stay open.
    fixed: Vec<watch::Sender<Vec<DiscoveredEndpoint>>>,
}

impl Discovery {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a source and returns its sender; send the full endpoint set on every change.
    pub fn add_source(&mut self, name: &str) -> watch::Sender<Vec<DiscoveredEndpoint>> {
        let (tx, rx) = watch::channel(Vec::new());
        self.sources.push((name.to_string(), rx));
        tx
    }

    /// Registers the static endpoints from config as a source that never changes.
    pub fn add_static(&mut self, config: &Config) {
        let eps = config
            .pools
            .iter()
            .flat_map(|p| {
                p.endpoints.iter().map(move |e| DiscoveredEndpoint {
                    role: e.role,
                    kv_events: e.kv_events.clone(),
                    kv_replay: e.kv_replay.clone(),
                    labels: e
                        .gpu
                        .iter()
                        .map(|g| (policies::pool::GPU_LABEL.to_string(), g.clone()))
                        .collect(),
                    ..DiscoveredEndpoint::from_url(&p.name, &e.url)
                })
            })
            .collect();
        let tx = self.add_source("static");
        tx.send_replace(eps);
        self.fixed.push(tx);
    }

    /// The union of every source's current set, sorted by (pool, id), duplicates (same pool and id) dropped.
    pub fn current(&mut self) -> Vec<DiscoveredEndpoint> {
        let mut all: Vec<DiscoveredEndpoint> = self
            .sources
            .iter_mut()
            .flat_map(|(_, rx)| rx.borrow_and_update().clone())
            .collect();
        all.sort_by(|a, b| (&a.pool, &a.id).cmp(&(&b.pool, &b.id)));
        all.dedup_by(|a, b| a.pool == b.pool && a.id == b.id);
        all
    }

    /// Waits until any open source sends a change. Returns false once every source has closed.
    pub async fn changed(&mut self) -> bool {
        let waits: Vec<_> = self
            .sources
            .iter_mut()
            .filter(|(_, rx)| rx.has_changed().is_ok())
            .map(|(_, rx)| Box::pin(rx.changed()))
            .collect();
        if waits.is_empty() {
            return false;
        }
        let (res, _, _) = futures::future::select_all(waits).await;
        res.is_ok() || self.sources.iter().any(|(_, rx)| rx.has_changed().is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn merges_sources_and_wakes_on_change() {
        let mut d = Discovery::new();
        let a = d.add_source("a");
        let b = d.add_source("b");
        a.send_replace(vec![DiscoveredEndpoint::from_url(
            "p",
            "http://127.0.0.1:2",
        )]);
        b.send_replace(vec![
            DiscoveredEndpoint::from_url("p", "http://127.0.0.1:1"),
            DiscoveredEndpoint::from_url("p", "http://127.0.0.1:2"),
        ]);
        let ids: Vec<String> = d.current().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, vec!["127.0.0.1:1", "127.0.0.1:2"]);
        b.send_replace(vec![]);
        assert!(d.changed().await);
        assert_eq!(d.current().len(), 1);
        drop(a);
        drop(b);
        assert!(!d.changed().await);
    }

    #[test]
    fn static_endpoints_carry_their_gpu_label() {
        let cfg = crate::config::RawConfig::from_yaml(
            "pools:\n- name: p\n  gpu: L4\n  endpoints:\n  - http://127.0.0.1:1\n  - {url: http://127.0.0.1:2, gpu: H100}\n- name: q\n  endpoints: [http://127.0.0.1:3]\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        let mut d = Discovery::new();
        d.add_static(&cfg);
        let gpus: Vec<(String, Option<String>)> = d
            .current()
            .into_iter()
            .map(|e| (e.id, e.labels.get(policies::pool::GPU_LABEL).cloned()))
            .collect();
        assert_eq!(
            gpus,
            [
                ("127.0.0.1:1".to_string(), Some("L4".to_string())),
                ("127.0.0.1:2".to_string(), Some("H100".to_string())),
                ("127.0.0.1:3".to_string(), None),
            ]
        );
    }
}
