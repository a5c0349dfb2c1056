//! The planner as a controller of the simulator's elastic fleet, and a wrapper reporting progress.

use sim::elastic::{Controller, Observation};

use crate::planner::{DemandSample, Planner, Reason};

/// Feeds each tick's demand to the [`Planner`] and applies its counts.
#[derive(Debug, Clone)]
pub struct WeirController {
    planner: Planner,
    /// Running mean prompt length, to turn engine-queued requests into queued tokens.
    mean_prompt: f64,
    /// How often each reason was given, in [`Reason`] declaration order.
    pub reasons: [u64; 6],
}

impl WeirController {
    pub fn new(planner: Planner) -> Self {
        WeirController {
            planner,
            mean_prompt: 1000.0,
            reasons: [0; 6],
        }
    }
}

impl Controller for WeirController {
    fn desired(&mut self, obs: &Observation) -> Vec<u32> {
        let w = obs.window_s.max(1e-9);
        if obs.arrivals > 0 {
            let m = obs.prompt_tokens as f64 / f64::from(obs.arrivals);
            self.mean_prompt = 0.9 * self.mean_prompt + 0.1 * m;
        }
        let waiting: u32 = obs.pools.iter().map(|p| p.waiting).sum();
        self.planner.observe(DemandSample {
            t: obs.now,
            arrivals_per_s: f64::from(obs.arrivals) / w,
            prompt_tok_s: obs.prompt_tokens as f64 / w,
            output_tok_s: obs.output_tokens as f64 / w,
            queued_prompt_tokens: obs.held_prompt_tokens as f64
                + f64::from(waiting) * self.mean_prompt,
        });
        let current: Vec<u32> = obs.pools.iter().map(|p| p.ready + p.starting).collect();
        let ready: Vec<u32> = obs.pools.iter().map(|p| p.ready).collect();
        let rec = self.planner.recommend(obs.now, &current, &ready);
        let k = match rec.reason {
            Reason::Stale => 0,
            Reason::ScaleUp => 1,
            Reason::ScaleDown => 2,
            Reason::Replacing => 3,
            Reason::Steady => 4,
            Reason::AtMax => 5,
        };
        self.reasons[k] += 1;
        rec.replicas
    }

    fn name(&self) -> String {
        "weir".into()
    }
}

/// Calls `on_tick(now)` before delegating: progress bars for long virtual-time runs.
pub struct WithProgress<'a> {
    pub inner: &'a mut dyn Controller,
    pub on_tick: &'a mut dyn FnMut(f64),
}

impl Controller for WithProgress<'_> {
    fn desired(&mut self, obs: &Observation) -> Vec<u32> {
        (self.on_tick)(obs.now);
        self.inner.desired(obs)
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}
