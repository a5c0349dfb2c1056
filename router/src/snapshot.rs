//! The immutable routing snapshot: pools of endpoints, their pipelines, and client-facing routes. Rebuilt by
//! discovery on every change and swapped atomically; requests load one `Arc` and never see a half-built state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use hyper::http::uri::Authority;
use policies::endpoint::{EndpointId, Role};
use policies::pick::Pipeline;
use policies::pick::breaker::BreakerConfig;

use crate::config::{Config, PolicyConfig, RouteConfig};
use crate::discovery::DiscoveredEndpoint;
use crate::route::{CachePool, CacheView, Member, Routing, has_prefill};
use crate::state::EndpointState;

/// One endpoint in a snapshot.
#[derive(Debug)]
pub struct Endpoint {
    /// Stable id (metric label, decision records).
    pub id: EndpointId,
    /// Base URL, for logs and `/debug/routes`.
    pub url: Arc<str>,
    /// `host:port`, the part requests need.
    pub authority: Authority,
    /// P/D role.
    pub role: Role,
    /// Labels from discovery.
    pub labels: BTreeMap<String, String>,
    /// KV-event PUB address, for `precise-prefix` pools.
    pub kv_events: Option<String>,
    /// KV-event replay address.
    pub kv_replay: Option<String>,
    /// Live state, shared across snapshots for the same id.
    pub state: Arc<EndpointState>,
}

/// A pool: endpoints serving one upstream model, with the pipeline that picks among them.
#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    /// Model name the endpoints serve; the request body's `model` is rewritten to it when it differs.
    pub model: Arc<str>,
    /// Endpoints sorted by id; [`policies::endpoint::EndpointView::index`] indexes this.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Shared across snapshots so round-robin cursors survive rebuilds.
    pub pipeline: Arc<Pipeline>,
    /// Cache-aware state (prefix index, sessions, P/D router) when the pool's policy is cache-aware; `None` keeps
    /// the request path free of tokenizing and hashing.
    pub cache: Option<CacheView>,
    /// `Authorization` the pods expect (`Bearer <pool api_key>`); clients' credentials are never forwarded.
    pub upstream_auth: Option<hyper::header::HeaderValue>,
}

/// One weighted target of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTarget {
    /// Index into [`EndpointSnapshot::pools`].
    pub pool: usize,
    pub weight: u32,
}

/// A client-facing model name split over pools by weight.
#[derive(Debug)]
pub struct Route {
    /// Canonical served name (aliases resolve to the same route).
    pub name: Arc<str>,
    pub aliases: Vec<Arc<str>>,
    pub targets: Vec<RouteTarget>,
    /// Sum of target weights (> 0).
    pub total_weight: u64,
}

impl Route {
    /// The target for a uniform draw `u` in `[0, 1)`.
    pub fn pick_target(&self, u: f64) -> RouteTarget {
        let mut x = (u * self.total_weight as f64) as u64;
        for t in &self.targets {
            if x < u64::from(t.weight) {
                return *t;
            }
            x -= u64::from(t.weight);
        }
        // Only reachable through float rounding at u ~ 1.0.
        self.targets[self.targets.len() - 1]
    }
}

/// Everything the request path needs, immutable.
#[derive(Debug, Default)]
pub struct EndpointSnapshot {
    /// Increases with every rebuild.
    pub version: u64,
    /// Pools sorted by name.
    pub pools: Vec<Pool>,
    /// Routes in config order.
    pub routes: Vec<Arc<Route>>,
    /// Served name or alias -> route.
    by_name: HashMap<Box<str>, Arc<Route>>,
    /// Process-wide routing state (decision ring, cache metrics), the same in every snapshot.
    pub routing: Arc<Routing>,
}

impl EndpointSnapshot {
    pub fn route(&self, model: &str) -> Option<&Arc<Route>> {
        self.by_name.get(model)
    }

    /// Every endpoint once (an endpoint in two pools appears once), sorted by id.
    pub fn unique_endpoints(&self) -> Vec<Arc<Endpoint>> {
        let mut m: BTreeMap<&EndpointId, &Arc<Endpoint>> = BTreeMap::new();
        for p in &self.pools {
            for e in &p.endpoints {
                m.entry(&e.id).or_insert(e);
            }
        }
        m.into_values().cloned().collect()
    }
}

/// Builds snapshots from discovered endpoints, keeping live state and pipelines across rebuilds.
#[derive(Debug)]
pub struct SnapshotBuilder {
    /// Pools from config: name -> (served model, policy).
    pools: BTreeMap<String, (String, PolicyConfig)>,
    /// Pools' upstream `Authorization` from config, by pool name.
    upstream_auth: HashMap<String, hyper::header::HeaderValue>,
    /// Routes from config.
    routes: Vec<RouteConfig>,
    breaker: BreakerConfig,
    /// Live state by endpoint id.
    states: HashMap<String, Arc<EndpointState>>,
    /// Pipelines by pool name.
    pipelines: HashMap<String, Arc<Pipeline>>,
    /// Cache-aware pool state by pool name (indexes and subscriptions survive rebuilds).
    caches: HashMap<String, Arc<CachePool>>,
    routing: Arc<Routing>,
    version: u64,
}

impl SnapshotBuilder {
    pub fn new(config: &Config) -> Self {
        Self {
            pools: config
                .pools
                .iter()
                .map(|p| (p.name.clone(), (p.model.clone(), p.policy.clone())))
                .collect(),
            upstream_auth: config
                .pools
                .iter()
                .filter_map(|p| Some((p.name.clone(), p.upstream_auth.clone()?)))
                .collect(),
            routes: config.routes.clone(),
            breaker: config.breaker,
            states: HashMap::new(),
            pipelines: HashMap::new(),
            caches: HashMap::new(),
            routing: Arc::new(Routing::default()),
            version: 0,
        }
    }

    /// Uses `routing` (decision ring, registered metrics) in every snapshot.
    pub fn with_routing(mut self, routing: Arc<Routing>) -> Self {
        self.routing = routing;
        self
    }

    /// A new snapshot for this endpoint set. Endpoints with unparsable URLs are skipped with a warning.
    pub fn build(&mut self, eps: &[DiscoveredEndpoint]) -> EndpointSnapshot {
        self.version += 1;
        let mut pool_defs = self.pools.clone();
        for e in eps {
            pool_defs
                .entry(e.pool.clone())
                .or_insert_with(|| (e.pool.clone(), PolicyConfig::default()));
        }
        let mut live_ids = Vec::new();
        let mut pools = Vec::new();
        for (name, (model, policy)) in &pool_defs {
            let pipeline = self
                .pipelines
                .entry(name.clone())
                .or_insert_with(|| Arc::new(policy.build()))
                .clone();
            let mut endpoints = Vec::new();
            for e in eps.iter().filter(|e| &e.pool == name) {
                let authority = match e
                    .url
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .parse::<Authority>()
                {
                    Ok(a) => a,
                    Err(err) => {
                        tracing::warn!(id = %e.id, url = %e.url, %err, "skipping endpoint with a bad URL");
                        continue;
                    }
                };
                let state = self
                    .states
                    .entry(e.id.clone())
                    .or_insert_with(|| Arc::new(EndpointState::new(self.breaker)))
                    .clone();
                live_ids.push(e.id.clone());
                endpoints.push(Arc::new(Endpoint {
                    id: EndpointId::new(&e.id),
                    url: Arc::from(e.url.as_str()),
                    authority,
                    role: e.role,
                    labels: e.labels.clone(),
                    kv_events: e.kv_events.clone(),
                    kv_replay: e.kv_replay.clone(),
                    state,
                }));
            }
            endpoints.sort_by(|a, b| a.id.cmp(&b.id));
            let cache = match policy {
                PolicyConfig::CacheAware(cfg) => {
                    let pool = self
                        .caches
                        .entry(name.clone())
                        .or_insert_with(|| {
                            let pool = Arc::new(CachePool::new(cfg, model));
                            if let Some(kv) = pool.kv_indexer() {
                                self.routing.metrics.kv.add(name, kv);
                            }
                            pool
                        })
                        .clone();
                    let members: Vec<Member> = endpoints
                        .iter()
                        .map(|e| Member {
                            id: e.id.clone(),
                            kv_events: e.kv_events.clone(),
                            kv_replay: e.kv_replay.clone(),
                        })
                        .collect();
                    let slots = pool.sync(&members);
                    Some(CacheView {
                        pool,
                        slots,
                        ids: endpoints.iter().map(|e| e.id.clone()).collect(),
                        pd: has_prefill(endpoints.iter().map(|e| e.role)),
                    })
                }
                _ => None,
            };
            pools.push(Pool {
                name: Arc::from(name.as_str()),
                model: Arc::from(model.as_str()),
                endpoints,
                pipeline,
                cache,
                upstream_auth: self.upstream_auth.get(name).cloned(),
            });
        }
        // Forget state of endpoints that left (a returning pod starts fresh).
        self.states.retain(|id, _| live_ids.contains(id));

        let pool_index: HashMap<&str, usize> = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (&*p.name, i))
            .collect();
        let mut routes = Vec::new();
        let mut by_name = HashMap::new();
        let add = |rc: &RouteConfig,
                   routes: &mut Vec<Arc<Route>>,
                   by_name: &mut HashMap<Box<str>, Arc<Route>>| {
            let targets: Vec<RouteTarget> = rc
                .targets
                .iter()
                .filter_map(|(p, w)| {
                    pool_index
                        .get(p.as_str())
                        .map(|&pool| RouteTarget { pool, weight: *w })
                })
                .collect();
            if targets.is_empty() || by_name.contains_key(rc.name.as_str()) {
                return;
            }
            let route = Arc::new(Route {
                name: Arc::from(rc.name.as_str()),
                aliases: rc.aliases.iter().map(|a| Arc::from(a.as_str())).collect(),
                total_weight: targets.iter().map(|t| u64::from(t.weight)).sum(),
                targets,
            });
            by_name.insert(rc.name.as_str().into(), route.clone());
            for a in &rc.aliases {
                by_name
                    .entry(a.as_str().into())
                    .or_insert_with(|| route.clone());
            }
            routes.push(route);
        };
        for rc in &self.routes {
            add(rc, &mut routes, &mut by_name);
        }
        // Implicit routes for discovered pools that config does not name.
        for p in &pools {
            let rc = RouteConfig {
                name: p.model.to_string(),
                aliases: vec![],
                targets: vec![(p.name.to_string(), 1)],
            };
            add(&rc, &mut routes, &mut by_name);
        }
        EndpointSnapshot {
            version: self.version,
            pools,
            routes,
            by_name,
            routing: self.routing.clone(),
        }
    }
}

/// Builds the first snapshot synchronously (so the router serves from its first request), then keeps rebuilding
/// and swapping on every source change until all sources close.
pub async fn follow(
    mut discovery: crate::discovery::Discovery,
    mut builder: SnapshotBuilder,
    shared: Arc<arc_swap::ArcSwap<EndpointSnapshot>>,
) {
    loop {
        if !discovery.changed().await {
            tracing::info!("all discovery sources closed; keeping the last snapshot");
            return;
        }
        let eps = discovery.current();
        let snap = builder.build(&eps);
        tracing::info!(
            version = snap.version,
            endpoints = eps.len(),
            "endpoint snapshot updated"
        );
        shared.store(Arc::new(snap));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn config() -> Config {
        RawConfig::from_yaml(
            "pools: [{name: a, model: m, endpoints: ['http://127.0.0.1:1']}, {name: b, model: m2}]\n\
             models: [{name: split, aliases: [s], targets: [{pool: a, weight: 3}, {pool: b, weight: 1}]}]",
        )
        .unwrap()
        .validate()
        .unwrap()
    }

    #[test]
    fn routes_resolve_aliases_and_implicit_pools() {
        let c = config();
        let mut b = SnapshotBuilder::new(&c);
        let mut eps = vec![DiscoveredEndpoint::from_url("a", "http://127.0.0.1:1")];
        eps.push(DiscoveredEndpoint::from_url(
            "k8s-pool",
            "http://127.0.0.1:7",
        ));
        let s = b.build(&eps);
        assert!(Arc::ptr_eq(
            s.route("split").unwrap(),
            s.route("s").unwrap()
        ));
        assert_eq!(&*s.pools[s.route("m").unwrap().targets[0].pool].name, "a");
        assert_eq!(s.route("k8s-pool").unwrap().targets.len(), 1);
        assert!(s.route("nope").is_none());
    }

    #[test]
    fn weighted_split_follows_weights() {
        let c = config();
        let s = SnapshotBuilder::new(&c).build(&[]);
        let r = s.route("split").unwrap();
        let to_a = (0..1000)
            .filter(|i| {
                s.pools[r.pick_target(*i as f64 / 1000.0).pool]
                    .name
                    .as_ref()
                    == "a"
            })
            .count();
        assert_eq!(to_a, 750);
    }

    #[test]
    fn live_state_survives_rebuilds() {
        let c = config();
        let mut b = SnapshotBuilder::new(&c);
        let eps = vec![DiscoveredEndpoint::from_url("a", "http://127.0.0.1:1")];
        let s1 = b.build(&eps);
        let s2 = b.build(&eps);
        let a = |s: &EndpointSnapshot| s.pools[0].endpoints[0].state.clone();
        assert!(Arc::ptr_eq(&a(&s1), &a(&s2)));
        assert!(Arc::ptr_eq(&s1.pools[0].pipeline, &s2.pools[0].pipeline));
        assert!(s2.version > s1.version);
    }
}
