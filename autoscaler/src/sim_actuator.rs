//! The in-process simulated-fleet actuator: a pool's replica count as simulated vLLM pods (`sim::fleet`, real HTTP on
//! loopback) started and stopped in this process, the way `weir demo` runs its fleet. A new pod pays its cold start
//! (`/health` answers 503 until the template's `startup_delay`, by default the profile's `startup_s` over the time
//! scale) as a loading vLLM pod does; scale-down stops the newest pods first (those still starting go before ready
//! ones). The caller publishes [`SimActuator::ready_endpoints`] to the router's discovery after each change and when
//! a cold start ends ([`SimActuator::next_ready`]), as Kubernetes lists only Ready pods: a request held for a pool at
//! zero then goes to the new pod once it can serve, never to one still loading.

use sim::fleet::{FleetError, PodEndpoint, PodOptions, start_pod};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One simulated pool: its name and the options every pod of it starts with.
#[derive(Debug, Clone)]
pub struct SimPool {
    pub name: String,
    /// Pod template (port 0 = ephemeral; the seed is offset per pod).
    pub template: PodOptions,
}

struct Pod {
    endpoint: PodEndpoint,
    /// When its cold start is over (`/health` 200): taken after the pod started, so never before the pod's own.
    ready_at: tokio::time::Instant,
    /// Turning it true stops the pod's server.
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

struct PoolState {
    spec: SimPool,
    pods: Vec<Pod>,
}

/// Starts and stops simulated pods per pool.
pub struct SimActuator {
    pools: Vec<PoolState>,
    /// Pods started so far: each gets `template.seed + started` so no two pods jitter alike.
    started: u64,
}

impl SimActuator {
    pub fn new(pools: Vec<SimPool>) -> Self {
        SimActuator {
            pools: pools
                .into_iter()
                .map(|spec| PoolState {
                    spec,
                    pods: Vec::new(),
                })
                .collect(),
            started: 0,
        }
    }

    /// Pods per pool (starting or ready), in pool order.
    pub fn replicas(&self) -> Vec<u32> {
        self.pools.iter().map(|p| p.pods.len() as u32).collect()
    }

    /// Set pool `pool` to `n` pods: start the missing ones, stop the newest surplus ones. Returns the new count.
    pub async fn scale(&mut self, pool: usize, n: u32) -> Result<u32, crate::Error> {
        let count = self.pools.len();
        let Some(p) = self.pools.get_mut(pool) else {
            return Err(crate::Error::InvalidConfig {
                field: "pool".into(),
                reason: format!("no pool {pool} (there are {count})"),
            });
        };
        while p.pods.len() > n as usize {
            if let Some(pod) = p.pods.pop() {
                let _ = pod.stop.send(true);
                // The server ends on the signal; its result only matters to logs.
                let _ = pod.task.await;
            }
        }
        while p.pods.len() < n as usize {
            let mut o = p.spec.template.clone();
            o.seed = o.seed.wrapping_add(self.started);
            let (stop, rx) = watch::channel(false);
            let delay = std::time::Duration::from_secs_f64(o.startup_delay_s());
            let (endpoint, task) = start_pod(o, rx).await.map_err(sim_error)?;
            self.started += 1;
            p.pods.push(Pod {
                endpoint,
                ready_at: tokio::time::Instant::now() + delay,
                stop,
                task,
            });
        }
        Ok(p.pods.len() as u32)
    }

    /// Apply counts for every pool (missing entries keep their count). Returns the counts after.
    pub async fn apply(&mut self, desired: &[u32]) -> Result<Vec<u32>, crate::Error> {
        for (i, &n) in desired.iter().enumerate().take(self.pools.len()) {
            self.scale(i, n).await?;
        }
        Ok(self.replicas())
    }

    /// Every pod as (pool name, endpoint), in pool then start order.
    pub fn endpoints(&self) -> Vec<(&str, &PodEndpoint)> {
        self.pools
            .iter()
            .flat_map(|p| p.pods.iter().map(|d| (p.spec.name.as_str(), &d.endpoint)))
            .collect()
    }

    /// The pods whose cold start is over at `now`, as (pool name, endpoint), in pool then start order.
    pub fn ready_endpoints(&self, now: tokio::time::Instant) -> Vec<(&str, &PodEndpoint)> {
        self.pools
            .iter()
            .flat_map(|p| {
                p.pods
                    .iter()
                    .filter(move |d| d.ready_at <= now)
                    .map(|d| (p.spec.name.as_str(), &d.endpoint))
            })
            .collect()
    }

    /// When the next pod still starting at `now` is ready (`None`: none is starting).
    pub fn next_ready(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        self.pools
            .iter()
            .flat_map(|p| p.pods.iter().map(|d| d.ready_at))
            .filter(|&t| t > now)
            .min()
    }

    /// Stop every pod.
    pub async fn shutdown(&mut self) {
        for i in 0..self.pools.len() {
            let _ = self.scale(i, 0).await;
        }
    }
}

fn sim_error(e: FleetError) -> crate::Error {
    crate::Error::InvalidConfig {
        field: "pool.template".into(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::profile::Profile;

    async fn health(url: &str) -> Option<u16> {
        let addr = url.trim_start_matches("http://");
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let head = String::from_utf8_lossy(&buf);
        head.split_whitespace().nth(1)?.parse().ok()
    }

    fn pool(name: &str, gpu: &str, startup: f64) -> SimPool {
        let mut o = PodOptions::new(Profile::resolve(gpu, "llama-3.1-8b").unwrap());
        o.startup_delay = Some(startup);
        SimPool {
            name: name.into(),
            template: o,
        }
    }

    #[tokio::test]
    async fn pods_start_cold_serve_and_stop_newest_first() {
        let mut a = SimActuator::new(vec![pool("h100", "h100", 0.0), pool("l4", "l4", 3600.0)]);
        assert_eq!(a.apply(&[2, 1]).await.unwrap(), vec![2, 1]);
        let eps: Vec<(String, String)> = a
            .endpoints()
            .iter()
            .map(|(p, e)| (p.to_string(), e.url.clone()))
            .collect();
        assert_eq!(eps.len(), 3);
        assert_eq!((eps[0].0.as_str(), eps[2].0.as_str()), ("h100", "l4"));
        // Ready pods answer 200; the L4 is still in its cold start (503), so it is not listed as ready.
        assert_eq!(health(&eps[0].1).await, Some(200));
        assert_eq!(health(&eps[2].1).await, Some(503));
        let now = tokio::time::Instant::now();
        let ready: Vec<&str> = a.ready_endpoints(now).iter().map(|(p, _)| *p).collect();
        assert_eq!(ready, ["h100", "h100"]);
        let l4_ready = a.next_ready(now).unwrap();
        assert!(l4_ready >= now + std::time::Duration::from_secs(3599));
        assert_eq!(a.ready_endpoints(l4_ready).len(), 3);
        // Scale the H100 pool to 1: the newest pod is stopped and refuses connections.
        assert_eq!(a.scale(0, 1).await.unwrap(), 1);
        assert_eq!(a.endpoints()[0].1.url, eps[0].1);
        assert_eq!(health(&eps[1].1).await, None);
        assert_eq!(health(&eps[0].1).await, Some(200));
        assert!(a.scale(5, 1).await.is_err());
        a.shutdown().await;
        assert_eq!(a.replicas(), vec![0, 0]);
        assert_eq!(health(&eps[0].1).await, None);
    }
}
