//! The usage ledger: per tenant x model x tier counters, durable in an embedded redb file.
//!
//! Counters live in memory (one short lock per event); a flush task writes the entries changed since the last flush
//! in one redb write transaction every `flush_interval` (default 500 ms), so a crash loses at most one interval plus
//! one commit of usage. On open, the file's counters are loaded and counting continues from them. With no path the
//! ledger is in memory only (`weir demo`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use policies::tenant::Tier;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Table: key `tenant \x1f model \x1f tier` -> JSON [`Counters`].
const USAGE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("usage_v1");

/// Where and how often the ledger is persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerConfig {
    /// redb file; `None` keeps the ledger in memory only.
    pub path: Option<PathBuf>,
    /// How often changed counters are committed (at most this much usage is at risk on a crash).
    pub flush_interval: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            path: None,
            flush_interval: Duration::from_millis(500),
        }
    }
}

/// What a ledger row counts.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Requests given a permit (dispatched).
    pub admitted: u64,
    /// Permits settled as completed.
    pub completed: u64,
    /// Permits settled as failed (upstream error).
    pub failed: u64,
    /// Permits dropped or settled as cancelled (client gone after dispatch).
    pub cancelled: u64,
    /// Requests whose client left while they were still queued (never admitted).
    pub abandoned: u64,
    /// Requests rejected (model not allowed, queue full, deadline passed in the queue).
    pub rejected: u64,
    /// Prompt tokens of settled requests.
    pub prompt_tokens: u64,
    /// Of those, prompt tokens served from the prefix cache.
    pub cached_tokens: u64,
    /// Completion tokens of settled requests.
    pub completion_tokens: u64,
    /// GPU-seconds attributed by the caller.
    pub gpu_seconds: f64,
}

/// One row of a usage query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    /// Tenant.
    pub tenant: String,
    /// Model.
    pub model: String,
    /// Tier.
    pub tier: Tier,
    /// Counters.
    #[serde(flatten)]
    pub counters: Counters,
}

/// (tenant, model, tier).
pub(crate) type Key = (Arc<str>, Arc<str>, Tier);

fn encode_key(k: &Key) -> String {
    format!("{}\x1f{}\x1f{}", k.0, k.1, k.2.as_str())
}

fn decode_key(s: &str) -> Option<Key> {
    let mut it = s.split('\x1f');
    let (t, m, tier) = (it.next()?, it.next()?, it.next()?);
    let tier = Tier::ALL.into_iter().find(|x| x.as_str() == tier)?;
    Some((Arc::from(t), Arc::from(m), tier))
}

#[derive(Debug, Default)]
struct State {
    rows: BTreeMap<Key, Counters>,
    dirty: BTreeSet<Key>,
}

/// The ledger. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    state: Arc<Mutex<State>>,
    db: Option<Arc<Database>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("rows", &self.state.lock().rows.len())
            .finish()
    }
}

fn store_err(e: impl Into<redb::Error>) -> Error {
    Error::Ledger(e.into())
}

impl Ledger {
    /// Opens (or creates) the ledger, loading the counters already on disk.
    pub fn open(cfg: &LedgerConfig) -> Result<Self> {
        let Some(path) = &cfg.path else {
            return Ok(Self {
                state: Arc::default(),
                db: None,
            });
        };
        let db = Database::create(path).map_err(store_err)?;
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(USAGE).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        let mut rows = BTreeMap::new();
        let rtx = db.begin_read().map_err(store_err)?;
        let table = rtx.open_table(USAGE).map_err(store_err)?;
        for entry in table.iter().map_err(store_err)? {
            let (k, v) = entry.map_err(store_err)?;
            let (Some(key), Ok(c)) = (
                decode_key(k.value()),
                serde_json::from_slice::<Counters>(v.value()),
            ) else {
                tracing::warn!(key = k.value(), "skipping an unreadable ledger row");
                continue;
            };
            rows.insert(key, c);
        }
        drop(table);
        drop(rtx);
        Ok(Self {
            state: Arc::new(Mutex::new(State {
                rows,
                dirty: BTreeSet::new(),
            })),
            db: Some(Arc::new(db)),
        })
    }

    /// Applies `f` to the row of `key`.
    pub(crate) fn record(&self, key: &Key, f: impl FnOnce(&mut Counters)) {
        let mut s = self.state.lock();
        if let Some(c) = s.rows.get_mut(key) {
            f(c);
        } else {
            let mut c = Counters::default();
            f(&mut c);
            s.rows.insert(key.clone(), c);
        }
        if self.db.is_some() && !s.dirty.contains(key) {
            s.dirty.insert(key.clone());
        }
    }

    /// Commits the rows changed since the last flush. A failed commit keeps them dirty for the next one.
    pub fn flush(&self) -> Result<()> {
        let Some(db) = &self.db else { return Ok(()) };
        let batch: Vec<(String, Vec<u8>)> = {
            let mut s = self.state.lock();
            let dirty = std::mem::take(&mut s.dirty);
            dirty
                .into_iter()
                .filter_map(|k| {
                    let v = serde_json::to_vec(s.rows.get(&k)?).ok()?;
                    Some((encode_key(&k), v))
                })
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        let write = || -> Result<()> {
            let tx = db.begin_write().map_err(store_err)?;
            {
                let mut t = tx.open_table(USAGE).map_err(store_err)?;
                for (k, v) in &batch {
                    t.insert(k.as_str(), v.as_slice()).map_err(store_err)?;
                }
            }
            tx.commit().map_err(store_err)
        };
        if let Err(e) = write() {
            let mut s = self.state.lock();
            for (k, _) in &batch {
                if let Some(key) = decode_key(k) {
                    s.dirty.insert(key);
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Flushes every `interval` until the ledger's last handle is dropped. Needs a tokio runtime.
    pub(crate) fn spawn_flusher(&self, interval: Duration) {
        if self.db.is_none() {
            return;
        }
        let weak = Arc::downgrade(&self.state);
        let db = self.db.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade() else { return };
                let ledger = Ledger {
                    state,
                    db: db.clone(),
                };
                // redb commits fsync: keep them off the async workers.
                let res = tokio::task::spawn_blocking(move || ledger.flush()).await;
                match res {
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "usage ledger flush failed; retrying next interval")
                    }
                    Err(e) => tracing::warn!(error = %e, "usage ledger flush task failed"),
                    Ok(Ok(())) => {}
                }
            }
        });
    }

    /// Every row of `tenant`, sorted by model and tier.
    pub fn usage(&self, tenant: &str) -> Vec<UsageRow> {
        self.rows(|t| t == tenant)
    }

    /// Every row, sorted by tenant, model and tier.
    pub fn usage_all(&self) -> Vec<UsageRow> {
        self.rows(|_| true)
    }

    fn rows(&self, keep: impl Fn(&str) -> bool) -> Vec<UsageRow> {
        self.state
            .lock()
            .rows
            .iter()
            .filter(|(k, _)| keep(&k.0))
            .map(|(k, c)| UsageRow {
                tenant: k.0.to_string(),
                model: k.1.to_string(),
                tier: k.2,
                counters: *c,
            })
            .collect()
    }

    /// Totals of `tenant` over models and tiers (for the policy status).
    pub fn summary(&self, tenant: &str) -> policies::tenant::UsageSummary {
        let mut s = policies::tenant::UsageSummary::default();
        for r in self.usage(tenant) {
            let c = r.counters;
            s.admitted += c.admitted;
            s.completed += c.completed;
            s.failed += c.failed;
            s.cancelled += c.cancelled;
            s.rejected += c.rejected;
            s.prompt_tokens += c.prompt_tokens;
            s.completion_tokens += c.completion_tokens;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str) -> Key {
        (Arc::from(t), Arc::from("m"), Tier::Batch)
    }

    #[test]
    fn flushed_counters_survive_a_reopen_and_unflushed_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LedgerConfig {
            path: Some(dir.path().join("usage.redb")),
            ..LedgerConfig::default()
        };
        {
            let l = Ledger::open(&cfg).unwrap();
            l.record(&key("a"), |c| {
                c.admitted += 2;
                c.prompt_tokens += 100;
                c.gpu_seconds += 0.5;
            });
            l.flush().unwrap();
            l.record(&key("a"), |c| c.admitted += 1);
            // Dropped without a flush: the last increment is lost, the flushed ones are not.
        }
        let l = Ledger::open(&cfg).unwrap();
        let rows = l.usage("a");
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].counters.admitted, rows[0].counters.prompt_tokens),
            (2, 100)
        );
        assert_eq!(rows[0].counters.gpu_seconds, 0.5);
        assert_eq!(rows[0].tier, Tier::Batch);
        assert!(l.usage("b").is_empty());
        l.record(&key("b"), |c| c.rejected += 1);
        assert_eq!(l.usage_all().len(), 2);
        assert_eq!(l.summary("a").admitted, 2);
    }

    #[test]
    fn keys_round_trip() {
        let k = key("t.1");
        assert_eq!(decode_key(&encode_key(&k)), Some(k));
        assert_eq!(decode_key("a\x1fb\x1fgold"), None);
    }
}
