//! What weir's planner is measured against, as controllers of the elastic fleet:
//! - [`static_peak`]: the cheapest fleet for the trace's peak minute, all day;
//! - [`Hpa`]: the Kubernetes HPA v2 algorithm (autoscaling-and-metrics-apis.md §5) on one pool, metric = requests in
//!   the pod (vLLM `num_requests_running + num_requests_waiting`) per pod, AverageValue target;
//! - [`Keda`]: a KEDA queue-length scaler (`num_requests_waiting` summed, plus requests held by the router) feeding
//!   the same HPA algorithm with an AverageValue target per replica and KEDA's 30 s polling;
//! - [`Oracle`]: perfect foresight: at every tick the cheapest fleet for the highest demand between now and one cold
//!   start ahead (it knows the trace), the lower bound on cost at the same headroom.

use std::collections::VecDeque;

use sim::elastic::{Controller, Observation};
use sim::workload::TraceRequest;

use crate::mix::{self, Demand, PoolOption};

/// Mean demand of the trace per `window_s` bucket (bucket `k` covers `[k w, (k+1) w)`).
pub fn demand_buckets(trace: &[TraceRequest], window_s: f64, horizon_s: f64) -> Vec<Demand> {
    let n = ((horizon_s / window_s).ceil() as usize).max(1);
    let mut out = vec![Demand::default(); n];
    for r in trace {
        let k = ((r.arrival_s / window_s) as usize).min(n - 1);
        out[k].prompt_tok_s += f64::from(r.prompt_len()) / window_s;
        out[k].output_tok_s += f64::from(r.output_tokens) / window_s;
    }
    out
}

/// Static fleet sized for the busiest bucket, with the same headroom as the planner.
pub fn static_peak(pools: &[PoolOption], buckets: &[Demand], utilization: f64) -> Vec<u32> {
    let peak = buckets.iter().fold(Demand::default(), |acc, d| acc.max(*d));
    mix::cheapest(pools, peak.scale(1.0 / utilization)).replicas
}

/// The HPA v2 algorithm's knobs (Kubernetes defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HpaBehavior {
    pub sync_s: f64,
    pub tolerance: f64,
    pub up_stabilization_s: f64,
    pub down_stabilization_s: f64,
    /// Scale-up limit per sync: max(`up_pods`, `up_percent`% of current).
    pub up_pods: u32,
    pub up_percent: f64,
}

impl Default for HpaBehavior {
    fn default() -> Self {
        HpaBehavior {
            sync_s: 15.0,
            tolerance: 0.1,
            up_stabilization_s: 0.0,
            down_stabilization_s: 300.0,
            up_pods: 4,
            up_percent: 100.0,
        }
    }
}

/// Which number the HPA scales on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HpaMetric {
    /// Pods metric, AverageValue: running + waiting requests averaged over ready pods.
    InFlightPerPod,
    /// External metric, AverageValue (KEDA): waiting + held requests of the pool in total.
    QueueLength,
}

/// The HPA v2 replica calculation and behavior on one pool (the others stay at their current count).
#[derive(Debug, Clone)]
pub struct Hpa {
    pub name: String,
    pub pool: usize,
    pub metric: HpaMetric,
    /// AverageValue target.
    pub target: f64,
    pub min: u32,
    pub max: u32,
    pub behavior: HpaBehavior,
    last_sync: f64,
    recs: VecDeque<(f64, u32)>,
}

impl Hpa {
    pub fn new(
        name: &str,
        pool: usize,
        metric: HpaMetric,
        target: f64,
        min: u32,
        max: u32,
    ) -> Self {
        Hpa {
            name: name.into(),
            pool,
            metric,
            target,
            min,
            max,
            behavior: HpaBehavior::default(),
            last_sync: f64::NEG_INFINITY,
            recs: VecDeque::new(),
        }
    }

    /// KEDA: the queue-length trigger with its 30 s polling interval on the HPA defaults.
    pub fn keda(pool: usize, queue_per_replica: f64, min: u32, max: u32) -> Self {
        let mut h = Hpa::new(
            "keda",
            pool,
            HpaMetric::QueueLength,
            queue_per_replica,
            min,
            max,
        );
        h.behavior.sync_s = 30.0;
        h
    }

    /// The raw recommendation (before stabilization and rate limits), `None` when the metric is missing.
    fn recommend(&self, obs: &Observation, current: u32) -> Option<u32> {
        let p = obs.pools.get(self.pool)?;
        let tol = self.behavior.tolerance;
        match self.metric {
            HpaMetric::InFlightPerPod => {
                if p.ready == 0 {
                    return None;
                }
                let total = f64::from(p.running + p.waiting);
                let ratio = total / f64::from(p.ready) / self.target;
                if (ratio - 1.0).abs() <= tol {
                    return Some(current);
                }
                let mut rec = (ratio * f64::from(p.ready)).ceil() as u32;
                if rec > current && p.starting > 0 {
                    // Pending pods count as 0 on scale-up; a reversed direction means no change.
                    let with = f64::from(p.ready + p.starting);
                    let r2 = total / with / self.target;
                    if r2 <= 1.0 + tol {
                        return Some(current);
                    }
                    rec = (r2 * with).ceil() as u32;
                }
                Some(rec)
            }
            HpaMetric::QueueLength => {
                let value = f64::from(p.waiting + obs.held);
                if current > 0 && (value / (self.target * f64::from(current)) - 1.0).abs() <= tol {
                    return Some(current);
                }
                Some((value / self.target).ceil() as u32)
            }
        }
    }
}

impl Controller for Hpa {
    fn desired(&mut self, obs: &Observation) -> Vec<u32> {
        let mut out: Vec<u32> = obs.pools.iter().map(|p| p.ready + p.starting).collect();
        let Some(&current) = out.get(self.pool) else {
            return out;
        };
        if obs.now - self.last_sync < self.behavior.sync_s - 1e-9 {
            return out;
        }
        self.last_sync = obs.now;
        let Some(rec) = self.recommend(obs, current) else {
            // Missing metric: no change (a missing metric blocks scale-down); the minimum still holds.
            out[self.pool] = current.clamp(self.min, self.max);
            return out;
        };
        let rec = rec.clamp(self.min, self.max);
        self.recs.push_back((obs.now, rec));
        let keep = self
            .behavior
            .down_stabilization_s
            .max(self.behavior.up_stabilization_s);
        while self.recs.front().is_some_and(|(t, _)| *t < obs.now - keep) {
            self.recs.pop_front();
        }
        let window = |w: f64| {
            self.recs
                .iter()
                .filter(move |(t, _)| *t >= obs.now - w)
                .map(|r| r.1)
        };
        let up = window(self.behavior.up_stabilization_s)
            .min()
            .unwrap_or(rec);
        let down = window(self.behavior.down_stabilization_s)
            .max()
            .unwrap_or(rec);
        let mut desired = if current < up {
            up
        } else if current > down {
            down
        } else {
            current
        };
        if desired > current {
            let by_pct =
                (f64::from(current) * (1.0 + self.behavior.up_percent / 100.0)).ceil() as u32;
            desired = desired.min(by_pct.max(current + self.behavior.up_pods));
        }
        out[self.pool] = desired.clamp(self.min, self.max);
        out
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// Perfect foresight over per-bucket demand.
#[derive(Debug, Clone)]
pub struct Oracle {
    pub pools: Vec<PoolOption>,
    pub buckets: Vec<Demand>,
    pub window_s: f64,
    /// How far ahead the fleet must already cover (the cold start).
    pub lead_s: f64,
    pub utilization: f64,
}

impl Controller for Oracle {
    fn desired(&mut self, obs: &Observation) -> Vec<u32> {
        let from = (obs.now / self.window_s) as usize;
        let to = ((obs.now + self.lead_s) / self.window_s) as usize;
        let peak = self
            .buckets
            .iter()
            .skip(from)
            .take(to + 1 - from)
            .fold(Demand::default(), |acc, d| acc.max(*d));
        let plan = mix::cheapest(&self.pools, peak.scale(1.0 / self.utilization)).replicas;
        let current: Vec<u32> = obs.pools.iter().map(|p| p.ready + p.starting).collect();
        let starting = obs.pools.iter().any(|p| p.starting > 0);
        let grows = plan.iter().zip(&current).any(|(p, c)| p > c);
        if grows || starting {
            // Never open a hole: pods being replaced stay until the new ones are ready.
            plan.iter().zip(&current).map(|(&p, &c)| p.max(c)).collect()
        } else {
            plan
        }
    }

    fn name(&self) -> String {
        "oracle".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::elastic::PoolObservation;

    fn obs(
        now: f64,
        ready: u32,
        starting: u32,
        running: u32,
        waiting: u32,
        held: u32,
    ) -> Observation {
        Observation {
            now,
            pools: vec![PoolObservation {
                ready,
                starting,
                running,
                waiting,
                ..Default::default()
            }],
            held,
            held_prompt_tokens: 0,
            window_s: 5.0,
            arrivals: 0,
            prompt_tokens: 0,
            output_tokens: 0,
        }
    }

    #[test]
    fn hpa_follows_the_v2_formula_tolerance_and_rate_limits() {
        let mut h = Hpa::new("hpa", 0, HpaMetric::InFlightPerPod, 10.0, 1, 100);
        // 4 pods at 10.5 per pod: within the 10% tolerance.
        assert_eq!(h.desired(&obs(15.0, 4, 0, 42, 0, 0)), vec![4]);
        // 4 pods at 30 per pod: ceil(3.0 x 4) = 12, capped at max(4 + 4, 2 x 4) = 8.
        assert_eq!(h.desired(&obs(30.0, 4, 0, 120, 0, 0)), vec![8]);
        // Not a sync yet (15 s period).
        assert_eq!(h.desired(&obs(35.0, 4, 4, 120, 0, 0)), vec![8]);
        // With 4 pending pods counted as 0 the ratio is 120 / 8 / 10 = 1.5: ceil(12).
        assert_eq!(h.desired(&obs(45.0, 4, 4, 120, 0, 0)), vec![12]);
    }

    #[test]
    fn hpa_scale_down_waits_for_the_stabilization_window() {
        let mut h = Hpa::new("hpa", 0, HpaMetric::InFlightPerPod, 10.0, 1, 100);
        assert_eq!(h.desired(&obs(15.0, 10, 0, 100, 0, 0)), vec![10]);
        let mut t = 30.0;
        while t < 300.0 {
            assert_eq!(h.desired(&obs(t, 10, 0, 20, 0, 0)), vec![10], "at {t}");
            t += 15.0;
        }
        // 300 s after the last recommendation of 10, the highest in the window is 2.
        let mut last = vec![10];
        while t <= 330.0 {
            last = h.desired(&obs(t, 10, 0, 20, 0, 0));
            t += 15.0;
        }
        assert_eq!(last, vec![2]);
    }

    #[test]
    fn keda_scales_on_total_queue_per_replica() {
        let mut k = Hpa::keda(0, 5.0, 1, 50);
        // 3 replicas, 40 waiting + 10 held: ceil(50 / 5) = 10, limited to max(3 + 4, 6) = 7.
        assert_eq!(k.desired(&obs(30.0, 3, 0, 0, 40, 10)), vec![7]);
        // Empty queue: the recommendation is the minimum, applied after the 300 s window.
        assert_eq!(k.desired(&obs(60.0, 7, 0, 0, 0, 0)), vec![7]);
    }

    #[test]
    fn static_peak_covers_the_busiest_bucket() {
        use crate::capacity::Capacity;
        let pools = vec![PoolOption {
            name: "a".into(),
            gpu: "a".into(),
            role: sim::engine::Role::Both,
            price_per_hour: 1.0,
            min: 0,
            max: 100,
            capacity: Capacity {
                rate: 1.0,
                prefill_tok_s: 1000.0,
                decode_tok_s: 100.0,
                concurrency: 1.0,
            },
        }];
        let mk = |t: f64| TraceRequest {
            arrival_s: t,
            prefix_group: None,
            prefix_tokens: 0,
            unique_tokens: 1000,
            output_tokens: 100,
            unique_seed: 0,
            session: None,
        };
        // 60 requests in the first minute (1/s), 300 in the second (5/s).
        let mut trace: Vec<TraceRequest> = (0..60).map(|i| mk(f64::from(i))).collect();
        trace.extend((0..300).map(|i| mk(60.0 + f64::from(i) / 5.0)));
        let b = demand_buckets(&trace, 60.0, 120.0);
        assert_eq!(b.len(), 2);
        assert!((b[1].prompt_tok_s - 5000.0).abs() < 1e-9);
        assert_eq!(static_peak(&pools, &b, 0.5), vec![10]);
    }
}
