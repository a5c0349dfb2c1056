//! `active-request` scorer (llm-d): prefers pods with fewer requests in flight from this router.
//!
//! Score = `(max - in_flight) / max` over the candidates, where `max` is the largest in-flight count among them;
//! idle pods score 1.0 and all pods score 1.0 when every pod is idle. Unlike min-max (`least-requests`), the busiest
//! pod keeps a non-zero score relative to an idle pool only when it is idle too, and scores stay proportional to the
//! spare share. Used by the decode profile, where outstanding decodes (not prompt tokens) are the load.

use std::time::Instant;

use super::{RequestView, Scorer};
use crate::endpoint::EndpointView;

/// Prefers pods with fewer router-tracked in-flight requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActiveRequest;

impl Scorer for ActiveRequest {
    fn name(&self) -> &'static str {
        "active-request"
    }
    fn score(&self, _req: &RequestView, eps: &[EndpointView], _now: Instant, out: &mut [f64]) {
        let max = eps.iter().map(|e| e.in_flight).max().unwrap_or(0);
        for (slot, e) in out.iter_mut().zip(eps) {
            *slot = if max == 0 {
                1.0
            } else {
                f64::from(max - e.in_flight) / f64::from(max)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Role;

    #[test]
    fn idle_pods_score_one_and_the_busiest_zero() {
        let ep = |in_flight| EndpointView {
            index: 0,
            role: Role::Both,
            available: true,
            in_flight,
            in_flight_tokens: 0,
            prefill_tokens: 0,
            scraped: None,
        };
        let now = crate::testkit::now();
        let mut out = [0.0; 3];
        ActiveRequest.score(
            &RequestView::default(),
            &[ep(0), ep(2), ep(4)],
            now,
            &mut out,
        );
        assert_eq!(out, [1.0, 0.5, 0.0]);
        ActiveRequest.score(&RequestView::default(), &[ep(0), ep(0)], now, &mut out[..2]);
        assert_eq!(&out[..2], &[1.0, 1.0]);
    }
}
