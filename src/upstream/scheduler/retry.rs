//! Retry timing: exponential backoff with full jitter, `Retry-After`, and a retry budget.
//!
//! Full jitter (a uniform delay in `[0, min(cap, base · 2^attempt)]`) spreads the retries of many
//! callers that failed together, so a recovering upstream is not hit by synchronised waves. The
//! retry budget bounds the extra load retries add while the upstream struggles: retries may be at
//! most `ratio` of the first attempts seen in the last `window`, plus a small `floor` so a quiet
//! gateway can still retry a rare failure.

use std::collections::VecDeque;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// Backoff parameters.
#[derive(Debug, Clone)]
pub struct BackoffPolicy {
    /// Upper bound of the first retry's delay.
    pub base: Duration,
    /// Largest delay between two attempts, whatever the attempt number.
    pub cap: Duration,
    /// Attempts per call, the first one included.
    pub max_attempts: u32,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(10),
            max_attempts: 4,
        }
    }
}

impl BackoffPolicy {
    /// The ceiling of the delay before retry number `retry` (0 for the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A full-jitter delay before retry number `retry`, at least `retry_after` when the upstream
    /// asked for it (a server's explicit wish beats our guess).
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(retry);
        let jittered = if ceiling.is_zero() {
            Duration::ZERO
        } else {
            rng.random_range(Duration::ZERO..=ceiling)
        };
        match retry_after {
            Some(asked) => jittered.max(asked),
            None => jittered,
        }
    }
}

/// Settings of the retry budget.
#[derive(Debug, Clone)]
pub struct RetryBudgetConfig {
    /// Share of first attempts that may be retried.
    pub ratio: f64,
    /// Retries always allowed per window, whatever the traffic.
    pub floor: u32,
    /// How far back attempts are counted.
    pub window: Duration,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            floor: 5,
            window: Duration::from_secs(10),
        }
    }
}

/// Counts first attempts and retries in a sliding window.
#[derive(Debug)]
pub struct RetryBudget {
    config: RetryBudgetConfig,
    calls: VecDeque<Instant>,
    retries: VecDeque<Instant>,
}

impl RetryBudget {
    pub fn new(config: RetryBudgetConfig) -> Self {
        Self {
            config,
            calls: VecDeque::new(),
            retries: VecDeque::new(),
        }
    }

    fn evict(&mut self, now: Instant) {
        let window = self.config.window;
        for log in [&mut self.calls, &mut self.retries] {
            while log.front().is_some_and(|&t| t + window <= now) {
                log.pop_front();
            }
        }
    }

    /// Records a first attempt (it earns the budget a fraction of a retry).
    pub fn record_call(&mut self, now: Instant) {
        self.evict(now);
        self.calls.push_back(now);
    }

    /// Takes one retry from the budget, or says no.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        self.evict(now);
        let allowed = f64::from(self.config.floor) + self.config.ratio * self.calls.len() as f64;
        if (self.retries.len() as f64) < allowed {
            self.retries.push_back(now);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let policy = BackoffPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            max_attempts: 10,
        };
        assert_eq!(policy.ceiling(0), Duration::from_millis(100));
        assert_eq!(policy.ceiling(1), Duration::from_millis(200));
        assert_eq!(policy.ceiling(3), Duration::from_millis(800));
        assert_eq!(policy.ceiling(5), Duration::from_secs(2));
        assert_eq!(policy.ceiling(40), Duration::from_secs(2));
    }

    #[test]
    fn full_jitter_stays_within_bounds_and_spreads() {
        let policy = BackoffPolicy::default();
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 0..8 {
            let ceiling = policy.ceiling(retry);
            let delays: Vec<Duration> = (0..500)
                .map(|_| policy.delay(retry, None, &mut rng))
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling));
            // Full jitter uses the whole range, not just the top of it.
            assert!(delays.iter().any(|d| *d < ceiling / 4), "retry {retry}");
            assert!(delays.iter().any(|d| *d > ceiling * 3 / 4), "retry {retry}");
        }
    }

    #[test]
    fn retry_after_is_a_lower_bound() {
        let policy = BackoffPolicy::default();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let delay = policy.delay(0, Some(Duration::from_secs(3)), &mut rng);
            assert!(delay >= Duration::from_secs(3));
            assert!(delay <= Duration::from_secs(3).max(policy.ceiling(0)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budget_allows_floor_plus_ratio() {
        let mut budget = RetryBudget::new(RetryBudgetConfig {
            ratio: 0.2,
            floor: 2,
            window: Duration::from_secs(10),
        });
        let now = Instant::now();
        for _ in 0..50 {
            budget.record_call(now);
        }
        // 2 + 0.2 × 50 = 12 retries.
        let granted = (0..100).filter(|_| budget.try_retry(now)).count();
        assert_eq!(granted, 12);
        // Once the window has passed, only the floor is left until new calls arrive.
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        let granted = (0..100).filter(|_| budget.try_retry(now)).count();
        assert_eq!(granted, 2);
    }
}
