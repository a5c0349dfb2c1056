//! Scrapes each endpoint's `/metrics` on an interval into its live [`EndpointState`](crate::state::EndpointState):
//! `vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (or the legacy
//! `vllm:gpu_cache_usage_perc`) and `vllm:cache_config_info`. A failed or slow scrape leaves the old numbers to go
//! stale (pickers then see `scraped: None`). [`parse`] is pure and tested on its own.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use policies::promtext;

use crate::client::HttpClient;
use crate::config::ScrapeConfig;
use crate::metrics::{EndpointLabel, Metrics, RouteLabel};
use crate::snapshot::{Endpoint, EndpointSnapshot};
use crate::state::Scrape;

/// Reads vLLM's load series out of Prometheus text ([`policies::promtext`]). Series for several engines or DP ranks
/// are summed (waiting, running) or maxed (KV usage). Returns `None` when none of the load series is present (not a
/// vLLM server).
pub fn parse(text: &str) -> Option<Scrape> {
    let mut s = Scrape::default();
    let mut seen = false;
    let mut kv_new: Option<f64> = None;
    let mut kv_legacy: Option<f64> = None;
    for sample in promtext::samples(text) {
        let v = sample.value;
        if v.is_nan() {
            continue;
        }
        match sample.name {
            "vllm:num_requests_waiting" => {
                s.waiting = s.waiting.saturating_add(v.max(0.0) as u32);
                seen = true;
            }
            "vllm:num_requests_running" => {
                s.running = s.running.saturating_add(v.max(0.0) as u32);
                seen = true;
            }
            "vllm:kv_cache_usage_perc" => kv_new = Some(kv_new.unwrap_or(0.0).max(v)),
            "vllm:gpu_cache_usage_perc" => kv_legacy = Some(kv_legacy.unwrap_or(0.0).max(v)),
            "vllm:cache_config_info" => {
                s.block_size = sample.label("block_size").and_then(|b| b.parse().ok());
                s.num_gpu_blocks = sample.label("num_gpu_blocks").and_then(|b| b.parse().ok());
            }
            _ => {}
        }
    }
    s.kv_usage = kv_new.or(kv_legacy).unwrap_or(0.0).clamp(0.0, 1.0);
    seen.then_some(s)
}

/// The GPU type a pod announces in its `weir_gpu_info{gpu=".."}` info series (`weir sim` does; vLLM does not).
pub fn gpu_info(text: &str) -> Option<String> {
    promtext::series(text, policies::pool::GPU_INFO_SERIES)
        .find_map(|s| s.label("gpu").map(|g| g.into_owned()))
}

async fn scrape_one(client: &HttpClient, ep: &Endpoint, timeout: Duration) -> Option<Scrape> {
    let uri = format!("http://{}/metrics", ep.authority);
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let fut = async {
        let resp = client.request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        let text = std::str::from_utf8(&body).ok()?;
        if let Some(gpu) = gpu_info(text) {
            let mut g = ep.state.scraped_gpu.lock();
            if g.as_deref() != Some(gpu.as_str()) {
                *g = Some(gpu.into());
            }
        }
        parse(text)
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

/// Scrapes every endpoint of the current snapshot each interval, concurrently, until the task is dropped; also
/// refreshes the per-endpoint health, breaker and in-flight gauges.
pub async fn run(
    client: HttpClient,
    snapshot: Arc<ArcSwap<EndpointSnapshot>>,
    cfg: ScrapeConfig,
    metrics: Metrics,
    epoch: tokio::time::Instant,
) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = snapshot.load_full();
        let eps = snap.unique_endpoints();
        let results =
            futures::future::join_all(eps.iter().map(|e| scrape_one(&client, e, cfg.timeout)))
                .await;
        let now = tokio::time::Instant::now();
        let since = now.duration_since(epoch);
        for (e, r) in eps.iter().zip(results) {
            match r {
                Some(s) => e.state.record_scrape(&s, since),
                None => e.state.record_scrape_failure(),
            }
        }
        for r in &snap.routes {
            for t in &r.targets {
                let l = RouteLabel {
                    route: r.name.clone().into(),
                    pool: snap.pools[t.pool].name.clone().into(),
                };
                metrics
                    .route_share
                    .get_or_create(&l)
                    .set(f64::from(t.weight) / r.total_weight as f64);
            }
        }
        for p in &snap.pools {
            for e in &p.endpoints {
                let l = EndpointLabel {
                    pool: p.name.clone().into(),
                    endpoint: e.id.0.clone().into(),
                };
                let fresh = e.state.scraped(since, cfg.stale_after).is_some();
                metrics
                    .endpoint_healthy
                    .get_or_create(&l)
                    .set(i64::from(fresh));
                metrics
                    .endpoint_breaker
                    .get_or_create(&l)
                    .set(e.state.breaker_state(now.into_std()).as_gauge());
                metrics.endpoint_in_flight.get_or_create(&l).set(i64::from(
                    e.state.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:cache_config_info{block_size="16",cache_dtype="auto",cpu_num_gpu_blocks="None",enable_prefix_caching="True",num_gpu_blocks="28000",engine="0"} 1.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 12.0
"#;

    #[test]
    fn parses_vllm_load_series() {
        let s = parse(SAMPLE).unwrap();
        assert_eq!((s.waiting, s.running), (7, 5));
        assert_eq!(s.kv_usage, 0.25);
        assert_eq!(s.block_size, Some(16));
        assert_eq!(s.num_gpu_blocks, Some(28000));
    }

    #[test]
    fn legacy_kv_name_is_a_fallback() {
        let s =
            parse("vllm:num_requests_waiting 0\nvllm:gpu_cache_usage_perc{a=\"b\"} 0.5\n").unwrap();
        assert_eq!(s.kv_usage, 0.5);
    }

    #[test]
    fn reads_the_gpu_info_series() {
        let text = "vllm:num_requests_waiting 0\nweir_gpu_info{gpu=\"A100-80\"} 1.0\n";
        assert_eq!(gpu_info(text).as_deref(), Some("A100-80"));
        assert_eq!(gpu_info(SAMPLE), None);
    }

    #[test]
    fn non_vllm_text_is_none() {
        assert!(parse("process_cpu_seconds_total 1\n").is_none());
        assert!(parse("").is_none());
    }
}
