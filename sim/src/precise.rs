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
    let fd = arm(left)?;
    // `with_interest` is deprecated since tokio 1.52 for types whose `as_raw_fd` could change or close while
    // registered; an `OwnedFd` cannot (its fd is fixed and closed only after `AsyncFd` deregisters it on drop). The
    // replacement, `register_with_interest`, is `unsafe`, which this workspace forbids.
    #[allow(deprecated)]
    let fd = AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?;
    // A one-shot timer: readable once it has expired. The fd is closed on drop, so nothing needs reading.
    let _ready = fd.readable().await?;
    Ok(())
}

/// A one-shot `CLOCK_MONOTONIC` timerfd armed to expire `left` from now.
fn arm(left: std::time::Duration) -> io::Result<OwnedFd> {
    let fd: OwnedFd = timerfd_create(
        TimerfdClockId::Monotonic,
        TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
    )?;
    timerfd_settime(&fd, TimerfdTimerFlags::empty(), &one_shot(left))?;
    Ok(fd)
}

/// The timer setting that expires once, `left` from now. A zero `it_value` would disarm the timer instead of firing
/// it, so a whole number of seconds gets one extra nanosecond.
fn one_shot(left: std::time::Duration) -> Itimerspec {
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    Itimerspec {
        it_interval: zero,
        it_value: Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()).max(1),
        },
    }
}

// How late the timerfd wakes (the reason this file exists) is timing on a shared machine, so it is measured by a
// benchmark, not asserted here: `cargo bench -p sim --bench precise_sleep` (median lateness against tokio's timer).
// These tests check the logic deterministically: the timer armed for the right deadline, never early, and no timer
// at all for a deadline already passed.
#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    #[test]
    fn the_timer_is_set_once_for_the_time_left() {
        let t = one_shot(Duration::new(3, 250_000));
        assert_eq!((t.it_value.tv_sec, t.it_value.tv_nsec), (3, 250_000));
        assert_eq!(
            (t.it_interval.tv_sec, t.it_interval.tv_nsec),
            (0, 0),
            "one-shot"
        );
        // A whole number of seconds must still arm the timer (an all-zero value disarms it).
        let t = one_shot(Duration::from_secs(2));
        assert_eq!((t.it_value.tv_sec, t.it_value.tv_nsec), (2, 1));
        let t = one_shot(Duration::from_nanos(1));
        assert_eq!((t.it_value.tv_sec, t.it_value.tv_nsec), (0, 1));
    }

    #[test]
    fn the_kernel_timer_is_armed_for_that_deadline() {
        // An hour, so that however slow this host is the timer cannot have run down far when it is read back.
        let left = Duration::from_secs(3600);
        let fd = arm(left).unwrap();
        let set = rustix::time::timerfd_gettime(&fd).unwrap();
        let remaining = Duration::new(
            u64::try_from(set.it_value.tv_sec).unwrap(),
            u32::try_from(set.it_value.tv_nsec).unwrap(),
        );
        assert!(remaining <= left, "{remaining:?}");
        assert!(remaining > left - Duration::from_secs(600), "{remaining:?}");
        assert_eq!(
            (set.it_interval.tv_sec, set.it_interval.tv_nsec),
            (0, 0),
            "one-shot"
        );
    }

    #[test]
    fn a_deadline_already_passed_returns_on_the_first_poll() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let now = Instant::now();
        for deadline in [now - Duration::from_millis(5), now] {
            let mut sleep = std::pin::pin!(sleep_until(deadline));
            let poll = sleep.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            assert!(poll.is_ready(), "no timer for a deadline already passed");
        }
        // A future deadline does wait.
        let mut sleep = std::pin::pin!(sleep_until(now + Duration::from_secs(3600)));
        let poll = sleep.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        assert_eq!(poll, Poll::Pending);
    }

    #[tokio::test]
    async fn never_wakes_before_the_deadline() {
        for i in 0..10u64 {
            let d = Instant::now() + Duration::from_micros(500 + 137 * i);
            sleep_until(d).await;
            assert!(Instant::now() >= d, "woke early");
        }
    }
}
