//! The upstream rate limit: at most N accepted requests per key in any sliding window.
//!
//! A log of accepted request instants per key is exact: unlike a fixed-window counter it never
//! lets 2N requests through around a window boundary, and unlike a token bucket it has no burst
//! allowance beyond what the window holds, which is the strictest reading of "150 requests/min".
//! Rejected requests are not logged, so a client hammering the limit does not push its own
//! recovery further away. Time is `tokio::time::Instant` so tests can pause the clock.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

pub(crate) struct SlidingWindow {
    limit: u32,
    window: Duration,
    hits: HashMap<String, VecDeque<Instant>>,
}

impl SlidingWindow {
    /// `limit` 0 means no limit.
    pub(crate) fn new(limit: u32, window: Duration) -> Self {
        SlidingWindow {
            limit,
            window,
            hits: HashMap::new(),
        }
    }

    pub(crate) fn limit(&self) -> u32 {
        self.limit
    }

    pub(crate) fn set_limit(&mut self, limit: u32) {
        self.limit = limit;
    }

    /// Admits a request of `key` at `now`, or says how long until a slot frees (at least 1 ms).
    pub(crate) fn check(&mut self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        let window = self.window;
        let hits = self.hits.entry(key.to_owned()).or_default();
        while hits
            .front()
            .is_some_and(|first| now.saturating_duration_since(*first) >= window)
        {
            hits.pop_front();
        }
        if hits.len() < self.limit as usize {
            hits.push_back(now);
            return Ok(());
        }
        // The oldest hit inside the window leaves it first.
        let wait = hits
            .front()
            .map(|first| (*first + window).saturating_duration_since(now))
            .unwrap_or_default();
        Err(wait.max(Duration::from_millis(1)))
    }

    /// Forgets every key's history (the admin "reset" does this with the counters).
    pub(crate) fn clear(&mut self) {
        self.hits.clear();
    }
}

/// `Retry-After` in whole seconds, rounded up so a client that waits that long is admitted.
pub(crate) fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs();
    if wait.subsec_nanos() > 0 {
        seconds + 1
    } else {
        seconds.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_in_any_window() {
        let mut limiter = SlidingWindow::new(3, MINUTE);
        let start = Instant::now();
        assert!(limiter.check("k", Instant::now()).is_ok());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(limiter.check("k", Instant::now()).is_ok());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(limiter.check("k", Instant::now()).is_ok());
        tokio::time::advance(Duration::from_secs(10)).await;
        // 30 s in: three hits in the window, the first leaves it at 60 s.
        let wait = limiter.check("k", Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_secs(30));
        assert_eq!(retry_after_seconds(wait), 30);
        // Just before the first hit leaves, still refused, with a 1 s Retry-After.
        tokio::time::advance(Duration::from_millis(29_500)).await;
        let wait = limiter.check("k", Instant::now()).unwrap_err();
        assert_eq!(retry_after_seconds(wait), 1);
        // At exactly 60 s the first hit is out of the window.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(Instant::now() - start, MINUTE);
        assert!(limiter.check("k", Instant::now()).is_ok());
        // And the next slot frees when the second hit (10 s) leaves: at 70 s.
        let wait = limiter.check("k", Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_requests_do_not_extend_the_wait() {
        let mut limiter = SlidingWindow::new(1, MINUTE);
        assert!(limiter.check("k", Instant::now()).is_ok());
        for _ in 0..50 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(limiter.check("k", Instant::now()).is_err());
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(limiter.check("k", Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_limited_separately_and_zero_is_unlimited() {
        let mut limiter = SlidingWindow::new(1, MINUTE);
        assert!(limiter.check("a", Instant::now()).is_ok());
        assert!(limiter.check("b", Instant::now()).is_ok());
        assert!(limiter.check("a", Instant::now()).is_err());
        limiter.set_limit(0);
        for _ in 0..1000 {
            assert!(limiter.check("a", Instant::now()).is_ok());
        }
        limiter.set_limit(2);
        limiter.clear();
        assert!(limiter.check("a", Instant::now()).is_ok());
        assert!(limiter.check("a", Instant::now()).is_ok());
        assert!(limiter.check("a", Instant::now()).is_err());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
    }
}
