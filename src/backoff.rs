//! How a background loop meets a dependency that keeps failing (a full, read-only or damaged
//! store, mostly): it waits longer after each consecutive failure, with jitter so loops that failed
//! together do not retry together, and it logs the first failure at once and then at most one line
//! per interval, carrying the count of the failures it left out.
//!
//! Without this a loop whose store write fails retries at once: a full volume once produced about
//! 1,300 identical error lines a second from the outbox alone, which buries the one line that says
//! what is wrong and can fill the log volume too.

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng as _;
use tokio::time::Instant;

/// Exponential delays between attempts of one failing operation, with "equal jitter": a delay is
/// uniform in `[ceiling / 2, ceiling]`, where the ceiling doubles per consecutive failure from
/// `base` up to `max`. The lower half keeps a loop from ever retrying at once (full jitter can draw
/// zero); the upper half spreads loops that failed at the same moment.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exponent = (self.failures - 1).min(30);
        let ceiling = self.base.saturating_mul(1_u32 << exponent).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Ends the streak; returns how many failures it had.
    pub fn reset(&mut self) -> u32 {
        std::mem::take(&mut self.failures)
    }
}

/// Lets one log line of a kind through per `every`, and counts the ones held back so the next
/// line can say how many there were. Shareable (`&self`), so concurrent tasks that fail the same
/// way (every delivery recording its outcome on a full store) share one allowance.
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    pub fn new(every: Duration) -> LogLimit {
        LogLimit {
            every,
            state: Mutex::new(LogState::default()),
        }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many were held back since the
    /// last line that was let through; `None` when it should be left out (and is counted).
    pub fn admit(&self) -> Option<u64> {
        // A poisoned lock only means a panic elsewhere while counting: log rather than go silent.
        let Ok(mut state) = self.state.lock() else {
            return Some(0);
        };
        let now = Instant::now();
        match state.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

/// A loop's view of one operation that may keep failing: the [`Backoff`] between attempts and the
/// [`LogLimit`] of its error line.
#[derive(Debug)]
pub struct FailureStreak {
    backoff: Backoff,
    log: LogLimit,
}

/// What to do about one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Wait this long before trying again.
    pub delay: Duration,
    /// Consecutive failures, this one included.
    pub failures: u32,
    /// `Some(n)`: log this failure, mentioning `n` lines left out since the last one.
    pub log: Option<u64>,
}

/// Error lines of one failing operation are let through at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

impl FailureStreak {
    pub fn new(base: Duration, max: Duration) -> FailureStreak {
        FailureStreak {
            backoff: Backoff::new(base, max),
            log: LogLimit::new(LOG_EVERY),
        }
    }

    /// For loops whose work is a store read or write: the first retry after about 0.1 s (a store
    /// that failed once, say on a busy disk, is usually back at once), then doubling to 10 s, so
    /// a volume that gets room again is used within seconds.
    pub fn for_store() -> FailureStreak {
        FailureStreak::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    pub fn failed(&mut self) -> Failure {
        let delay = self.backoff.next_delay();
        Failure {
            delay,
            failures: self.backoff.failures(),
            log: self.log.admit(),
        }
    }

    /// Ends the streak; returns how many failures it had (0 when there was none), so the loop can
    /// say once that the operation works again.
    pub fn succeeded(&mut self) -> u32 {
        self.backoff.reset()
    }
}

/// Counts one failure of a retried loop on its [`FailureStreak`] and returns the [`Failure`],
/// logging it when the streak lets the line through: the error, the failures so far and the lines
/// left out since the last one, plus `retry_in_ms` where the loop waits out the delay before its
/// next attempt. Macros rather than a function so each line keeps the target (module) of the loop
/// that failed; [`failed_warn`] and [`failed_error`] name the level.
macro_rules! failed_at {
    ($level:ident, $streak:expr, $error:expr, $($retry_in_ms:ident,)? $message:literal) => {{
        let failure = $streak.failed();
        if let Some(suppressed) = failure.log {
            tracing::event!(
                tracing::Level::$level,
                error = %$error,
                failures = failure.failures,
                suppressed,
                $($retry_in_ms = failure.delay.as_millis(),)?
                $message
            );
        }
        failure
    }};
}

/// [`failed_at`] at level WARN: a failure the loop gets over by itself.
macro_rules! failed_warn {
    ($($arguments:tt)*) => {
        $crate::backoff::failed_at!(WARN, $($arguments)*)
    };
}

/// [`failed_at`] at level ERROR: a failure that keeps the gateway from doing its job meanwhile.
macro_rules! failed_error {
    ($($arguments:tt)*) => {
        $crate::backoff::failed_at!(ERROR, $($arguments)*)
    };
}

pub(crate) use {failed_at, failed_error, failed_warn};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_within_their_jitter_band_and_stop_at_the_ceiling() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for _ in 0..200 {
            let mut backoff = Backoff::new(base, max);
            for failure in 1..=12_u32 {
                let ceiling = (base * 2_u32.pow(failure - 1)).min(max);
                let delay = backoff.next_delay();
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "failure {failure}: {delay:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
            }
            assert_eq!(backoff.reset(), 12);
            let after_reset = backoff.next_delay();
            assert!(after_reset <= base, "{after_reset:?}");
        }
    }

    #[test]
    fn jitter_spreads_loops_that_failed_together() {
        let delays: std::collections::HashSet<Duration> = (0..50)
            .map(|_| {
                let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
                backoff.next_delay();
                backoff.next_delay()
            })
            .collect();
        assert!(delays.len() > 40, "only {} distinct delays", delays.len());
    }

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_then_the_count_of_the_rest() {
        let limit = LogLimit::new(Duration::from_secs(10));
        assert_eq!(limit.admit(), Some(0));
        for _ in 0..99 {
            assert_eq!(limit.admit(), None);
        }
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(limit.admit(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(limit.admit(), Some(100));
        assert_eq!(limit.admit(), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(limit.admit(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_streak_counts_its_failures_and_a_success_ends_it() {
        let mut streak = FailureStreak::for_store();
        let first = streak.failed();
        assert_eq!((first.failures, first.log), (1, Some(0)));
        let second = streak.failed();
        assert_eq!((second.failures, second.log), (2, None));
        assert_eq!(streak.succeeded(), 2);
        assert_eq!(streak.succeeded(), 0);
        // The log allowance outlives the streak: a store that fails every other write must not
        // log every other write.
        assert_eq!(streak.failed().log, None);
    }
}
