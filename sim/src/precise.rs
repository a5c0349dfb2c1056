//! Sleeping to a deadline with microsecond precision.
//!
//! tokio's timer wheel fires on 1 ms ticks, so `tokio::time::sleep_until(d)` wakes anywhere up to 1 ms after `d`.
//! That is fine for step times of many milliseconds, but not for a latency floor meant to be measured against at
//! the 100 µs scale (`--min-latency`): a request that reaches the pod 100 µs later, because a router sits in front,
//! would still wake on the same tick, and the router's cost on the way in would vanish from the measurement. A Linux
//! `timerfd` registered with tokio's reactor wakes the task within microseconds of the deadline (the kernel's
//! high-resolution timer, no timer slack). Hand-written because no well-kept crate offers a tokio-integrated
//! high-resolution sleep; it is a few lines over `rustix`'s timerfd calls and tokio's `AsyncFd`.

use std::io;
use std::os::fd::OwnedFd;

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// Sleep until `deadline` (tokio's clock), waking within microseconds of it. Falls back to tokio's timer if the
/// timerfd cannot be created (e.g. out of file descriptors): late by up to a tick, never early.
pub async fn sleep_until(deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return;
    }
    if precise(left).await.is_err() {
        tokio::time::sleep_until(deadline).await;
    }
}

async fn precise(left: std::time::Duration) -> io::Result<()> {
    let fd: OwnedFd = timerfd_create(
        TimerfdClockId::Monotonic,
        TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
    )?;
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let value = Timespec {
        tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(left.subsec_nanos()).max(1),
    };
    timerfd_settime(
        &fd,
        TimerfdTimerFlags::empty(),
        &Itimerspec {
            it_interval: zero,
            it_value: value,
        },
    )?;
    // `with_interest` is deprecated since tokio 1.52 for types whose `as_raw_fd` could change or close while
    // registered; an `OwnedFd` cannot (its fd is fixed and closed only after `AsyncFd` deregisters it on drop). The
    // replacement, `register_with_interest`, is `unsafe`, which this workspace forbids.
    #[allow(deprecated)]
    let fd = AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?;
    // A one-shot timer: readable once it has expired. The fd is closed on drop, so nothing needs reading.
    let _ready = fd.readable().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_at_the_deadline_not_on_the_next_millisecond_tick() {
        // tokio's own timer wakes 0-1 ms late (uniform over the tick); the timerfd should be within ~100 µs. Judged
        // on the median of many sleeps so a noisy machine's occasional preemption cannot fail it, while a
        // tick-aligned timer (median lateness ~500 µs) always does.
        let mut late = Vec::new();
        for i in 0..40u64 {
            let d = Instant::now() + Duration::from_micros(1_300 + 37 * i);
            sleep_until(d).await;
            let now = Instant::now();
            assert!(now >= d, "woke early");
            late.push(now - d);
        }
        late.sort();
        let median = late[late.len() / 2];
        assert!(
            median < Duration::from_micros(250),
            "median lateness {median:?}"
        );
    }

    #[tokio::test]
    async fn past_deadline_returns_at_once() {
        let t0 = Instant::now();
        sleep_until(t0 - Duration::from_millis(5)).await;
        sleep_until(t0).await;
        assert!(t0.elapsed() < Duration::from_millis(1));
    }
}
