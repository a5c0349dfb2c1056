//! `session-affinity` scorer and its session table: keep a conversation on the pod that served it.
//!
//! The router reads `x-session-id`, looks the session up in a [`SessionTable`] (session id -> pod, idle TTL 300 s as
//! llm-d, refreshed on every use, at most `capacity` sessions with the least recently used evicted first), and the
//! per-request [`SessionAffinity`] scorer gives that pod 1.0 and every other pod 0. After the pick the router calls
//! [`SessionTable::record`] with the chosen pod. Pure: `now` is an argument; iteration never decides anything.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{RequestView, Scorer};
use crate::endpoint::{EndpointId, EndpointView};

/// llm-d's session TTL.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(300);

/// Default bound on remembered sessions.
pub const DEFAULT_SESSION_CAPACITY: usize = 100_000;

/// 1.0 for the session's pod, 0 elsewhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionAffinity {
    /// Pool index of the session's pod.
    pub pod: Option<usize>,
}

impl Scorer for SessionAffinity {
    fn name(&self) -> &'static str {
        "session-affinity"
    }
    fn score(&self, _req: &RequestView, eps: &[EndpointView], _now: Instant, out: &mut [f64]) {
        for (slot, e) in out.iter_mut().zip(eps) {
            *slot = if Some(e.index) == self.pod { 1.0 } else { 0.0 };
        }
    }
}

#[derive(Debug, Clone)]
struct Session {
    pod: EndpointId,
    expires: Instant,
    /// Position stamp of the newest queue entry for this session (older entries are stale).
    stamp: u64,
}

/// Bounded session id -> pod map with an idle TTL.
#[derive(Debug)]
pub struct SessionTable {
    ttl: Duration,
    capacity: usize,
    map: HashMap<String, Session>,
    /// (stamp, session) in use order; stale entries are skipped lazily.
    order: VecDeque<(u64, String)>,
    next_stamp: u64,
}

impl SessionTable {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
            next_stamp: 0,
        }
    }

    /// The pod serving `session`, if remembered and not idle past the TTL.
    pub fn get(&self, session: &str, now: Instant) -> Option<&EndpointId> {
        self.map
            .get(session)
            .filter(|s| s.expires > now)
            .map(|s| &s.pod)
    }

    /// Remembers (or refreshes) `session` -> `pod`.
    pub fn record(&mut self, session: &str, pod: &EndpointId, now: Instant) {
        self.expire(now);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let s = Session {
            pod: pod.clone(),
            expires: now + self.ttl,
            stamp,
        };
        if self.map.insert(session.to_owned(), s).is_none() {
            while self.map.len() > self.capacity {
                if !self.evict_oldest() {
                    break;
                }
            }
        }
        self.order.push_back((stamp, session.to_owned()));
        // Keep the lazy queue from growing without bound when the same sessions are refreshed repeatedly.
        if self.order.len() > 2 * self.capacity + 16 {
            let map = &self.map;
            self.order
                .retain(|(st, k)| map.get(k).is_some_and(|s| s.stamp == *st));
        }
    }

    fn evict_oldest(&mut self) -> bool {
        while let Some((st, k)) = self.order.pop_front() {
            if self.map.get(&k).is_some_and(|s| s.stamp == st) {
                self.map.remove(&k);
                return true;
            }
        }
        false
    }

    /// Drops sessions idle past the TTL (oldest first; stops at the first live one).
    pub fn expire(&mut self, now: Instant) {
        while let Some((st, k)) = self.order.front() {
            match self.map.get(k) {
                Some(s) if s.stamp == *st => {
                    if s.expires > now {
                        break;
                    }
                    self.map.remove(k);
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }

    /// Forgets every session on a removed pod.
    pub fn remove_pod(&mut self, pod: &EndpointId) {
        self.map.retain(|_, s| &s.pod != pod);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Default for SessionTable {
    fn default() -> Self {
        Self::new(DEFAULT_SESSION_TTL, DEFAULT_SESSION_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::now as t0;

    #[test]
    fn sessions_expire_after_idle_ttl_and_refresh_on_use() {
        let mut t = SessionTable::default();
        let now = t0();
        let a = EndpointId::new("a");
        t.record("s1", &a, now);
        assert_eq!(t.get("s1", now + Duration::from_secs(299)), Some(&a));
        t.record("s1", &a, now + Duration::from_secs(200));
        assert_eq!(t.get("s1", now + Duration::from_secs(450)), Some(&a));
        assert_eq!(t.get("s1", now + Duration::from_secs(501)), None);
        t.expire(now + Duration::from_secs(501));
        assert!(t.is_empty());
    }

    #[test]
    fn table_is_bounded_and_evicts_least_recently_used() {
        let mut t = SessionTable::new(DEFAULT_SESSION_TTL, 3);
        let now = t0();
        let p = EndpointId::new("p");
        for s in ["a", "b", "c"] {
            t.record(s, &p, now);
        }
        t.record("a", &p, now); // a is now the most recent
        t.record("d", &p, now);
        assert_eq!(t.len(), 3);
        assert!(t.get("b", now).is_none());
        assert!(t.get("a", now).is_some());
        for i in 0..1000 {
            t.record(&format!("x{}", i % 5), &p, now);
        }
        assert!(t.len() <= 3 && t.order.len() <= 2 * 3 + 16 + 1);
    }

    #[test]
    fn scorer_prefers_the_session_pod() {
        use crate::endpoint::Role;
        let ep = |index| EndpointView {
            index,
            role: Role::Both,
            available: true,
            in_flight: 0,
            in_flight_tokens: 0,
            prefill_tokens: 0,
            scraped: None,
        };
        let mut out = [0.5; 3];
        SessionAffinity { pod: Some(4) }.score(
            &RequestView::default(),
            &[ep(1), ep(4), ep(0)],
            t0(),
            &mut out,
        );
        assert_eq!(out, [0.0, 1.0, 0.0]);
    }
}
