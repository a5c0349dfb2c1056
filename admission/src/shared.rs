//! RPM and TPM limits shared by every replica, in Redis: the GCRA of [`policies::gcra`] as one Lua script per
//! check that reads Redis's own clock (`TIME`, so replicas never disagree about `now`), checks both limits of a
//! tenant and charges none if either denies (keys `weir:{tenant}:rpm` / `:tpm`, one hash slot). Settling a
//! reservation runs a second script that refunds the unused tokens or charges an overrun.
//!
//! Failure policy (velocity limits fail open): a Redis error or a reply slower than [`TIMEOUT`] makes the caller
//! use its local limiter instead ([`crate::limits`]), counted in `admission_limit_fail_open_total` and logged; after
//! a failure Redis is skipped for [`BACKOFF`], then tried again, so limits recover without a restart once Redis is
//! back. Concurrency stays a per-replica limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use policies::gcra::Rate;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::limits::{LimitState, RateHeaders};

/// Longest wait for a Redis answer before failing open (Envoy Gateway's rate-limit client default).
pub const TIMEOUT: Duration = Duration::from_millis(20);
/// How long Redis is skipped after a failure.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// Check and charge: KEYS rpm, tpm; ARGV rpm T us, rpm tau us (0: no limit), tpm T us, tpm tau us, tokens.
/// Replies {status, retry_us, rpm_remaining, rpm_reset_us, tpm_remaining, tpm_reset_us};
/// status 0 allowed, 1 RPM denied, 2 TPM denied, 3 tokens above the whole TPM.
const CHECK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function gcra(key, T, tau, n)
  if T <= 0 then return nil end
  local stored = tonumber(redis.call('GET', key) or now)
  local tat = math.max(stored, now)
  local inc = n * T
  if inc > tau then return {3, 0, math.floor(math.max(tau - (tat - now), 0) / T), tat - now, tat} end
  local new = tat + inc
  local ahead = new - now
  if ahead <= tau then return {0, 0, math.floor((tau - ahead) / T), ahead, new} end
  return {1, ahead - tau, math.floor(math.max(tau - (tat - now), 0) / T), tat - now, tat}
end
local r = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 1)
local k = gcra(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
local status, retry = 0, 0
if k and k[1] == 3 then status = 3
elseif r and r[1] == 1 then status, retry = 1, r[2]
elseif k and k[1] == 1 then status, retry = 2, k[2] end
if status == 0 then
  if r then redis.call('SET', KEYS[1], string.format('%d', r[5]), 'PX', math.floor(r[4] / 1000) + 1000) end
  if k then redis.call('SET', KEYS[2], string.format('%d', k[5]), 'PX', math.floor(k[4] / 1000) + 1000) end
end
local function v(x, i) if x then return x[i] else return -1 end end
return {status, retry, v(r, 3), v(r, 4), v(k, 3), v(k, 4)}
";

/// Refund (units > 0) or charge (units < 0): KEYS key; ARGV T us, units. Never moves the TAT before `now`.
const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T, units = tonumber(ARGV[1]), tonumber(ARGV[2])
local stored = redis.call('GET', KEYS[1])
if not stored and units > 0 then return 0 end
local tat = tonumber(stored or now)
local new
if units > 0 then new = math.max(tat - units * T, now) else new = math.max(tat, now) - units * T end
if new <= now then redis.call('DEL', KEYS[1]) return 0 end
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.floor((new - now) / 1000) + 1000)
return 0
";

/// What the shared limiter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Charged; the limit states after it.
    Allowed(RateHeaders),
    /// RPM (`requests: true`) or TPM denied; retry after the duration.
    Denied {
        requests: bool,
        retry_after: Duration,
        rate: RateHeaders,
    },
    /// The token cost is above the whole TPM.
    TooLarge(RateHeaders),
}

/// The Redis side of the limits. Cheap to share (`Arc`).
pub struct Shared {
    client: redis::Client,
    conn: tokio::sync::OnceCell<ConnectionManager>,
    check: redis::Script,
    settle: redis::Script,
    /// Redis failed at this moment: skip it until `BACKOFF` later.
    failed_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `(T, tau)` in microseconds; `(0, 0)` for no limit.
fn args(rate: Option<&Rate>) -> (u64, u64) {
    rate.map_or((0, 0), |r| (micros(r.interval).max(1), micros(r.tolerance)))
}

impl Shared {
    /// A shared limiter on `url` (`redis://host:port`); connects on first use.
    pub fn new(url: &str) -> redis::RedisResult<Arc<Self>> {
        Ok(Arc::new(Self {
            client: redis::Client::open(url)?,
            conn: tokio::sync::OnceCell::new(),
            check: redis::Script::new(CHECK),
            settle: redis::Script::new(SETTLE),
            failed_at: Mutex::new(None),
        }))
    }

    /// Whether Redis should be tried at `now` (not within [`BACKOFF`] of a failure).
    pub fn usable(&self, now: Instant) -> bool {
        self.failed_at
            .lock()
            .is_none_or(|t| now.saturating_duration_since(t) >= BACKOFF)
    }

    fn failed(&self, now: Instant) {
        *self.failed_at.lock() = Some(now);
    }

    async fn conn(&self) -> redis::RedisResult<ConnectionManager> {
        self.conn
            .get_or_try_init(|| async {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(TIMEOUT))
                    .set_response_timeout(Some(TIMEOUT))
                    .set_number_of_retries(1);
                self.client.get_connection_manager_with_config(cfg).await
            })
            .await
            .cloned()
    }

    /// Checks and charges one request and `tokens` for `tenant`. `Err` (Redis down or slow) means: fail open.
    pub async fn reserve(
        &self,
        tenant: &str,
        rpm: Option<&Rate>,
        tpm: Option<&Rate>,
        tokens: u64,
        now: Instant,
    ) -> Result<Decision, String> {
        let run = async {
            let mut c = self.conn().await?;
            let (rt, rtau) = args(rpm);
            let (tt, ttau) = args(tpm);
            self.check
                .key(format!("weir:{{{tenant}}}:rpm"))
                .key(format!("weir:{{{tenant}}}:tpm"))
                .arg(rt)
                .arg(rtau)
                .arg(tt)
                .arg(ttau)
                .arg(tokens)
                .invoke_async::<Vec<i64>>(&mut c)
                .await
        };
        let reply = match tokio::time::timeout(TIMEOUT * 2, run).await {
            Ok(Ok(v)) if v.len() == 6 => v,
            Ok(Ok(v)) => {
                self.failed(now);
                return Err(format!("unexpected reply {v:?}"));
            }
            Ok(Err(e)) => {
                self.failed(now);
                return Err(e.to_string());
            }
            Err(_) => {
                self.failed(now);
                return Err("timed out".into());
            }
        };
        *self.failed_at.lock() = None;
        let state = |rate: Option<&Rate>, remaining: i64, reset_us: i64| {
            rate.map(|r| LimitState {
                limit: r.limit,
                remaining: u64::try_from(remaining).unwrap_or(0),
                reset: Duration::from_micros(u64::try_from(reset_us).unwrap_or(0)),
            })
        };
        let rate = RateHeaders {
            requests: state(rpm, reply[2], reply[3]),
            tokens: state(tpm, reply[4], reply[5]),
        };
        let retry_after = Duration::from_micros(u64::try_from(reply[1]).unwrap_or(0));
        Ok(match reply[0] {
            0 => Decision::Allowed(rate),
            1 => Decision::Denied {
                requests: true,
                retry_after,
                rate,
            },
            2 => Decision::Denied {
                requests: false,
                retry_after,
                rate,
            },
            _ => Decision::TooLarge(rate),
        })
    }

    /// Refunds (`units > 0`) or charges (`units < 0`) `units` of `rate` on `tenant`'s `kind` key (`rpm` / `tpm`)
    /// in the background; a failure is logged (the charge then stands).
    pub fn settle(self: &Arc<Self>, tenant: Arc<str>, kind: &'static str, rate: Rate, units: i64) {
        if units == 0 {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            let run = async {
                let mut c = me.conn().await?;
                me.settle
                    .key(format!("weir:{{{tenant}}}:{kind}"))
                    .arg(micros(rate.interval).max(1))
                    .arg(units)
                    .invoke_async::<i64>(&mut c)
                    .await
            };
            match tokio::time::timeout(TIMEOUT * 5, run).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%tenant, kind, error = %e, "shared limit settlement failed")
                }
                Err(_) => tracing::warn!(%tenant, kind, "shared limit settlement timed out"),
            }
        });
    }
}
