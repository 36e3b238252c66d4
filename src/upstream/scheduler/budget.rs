//! The request budget of one upstream account: a sliding-window log.
//!
//! Why a log and not a token bucket or GCRA: the upstream's enforcement is unknown, and the
//! emulator counts requests in any sliding 60 s window per key. A token bucket refills
//! continuously, so after an idle minute it allows a full burst of N and then keeps trickling one
//! request every 60/N s — which puts up to 2N-1 requests into some 60 s window. GCRA without burst
//! avoids that but spaces requests evenly, throwing away the burst a quiet account is entitled to
//! (100 interactive reads at once would take 40 s). A log of the grant times of the last N
//! requests is exact for both: a request is granted only if fewer than N grants lie in the window
//! ending now, so no window of that length — wherever the upstream places it — ever holds more
//! than N grants. It costs N timestamps (150 × 8 bytes) per upstream.
//!
//! The window used here is the upstream's window plus a safety margin (see
//! [`crate::upstream::SchedulerSettings::jitter_margin`]): requests granted `window + margin`
//! apart can arrive up to `margin` closer together after network jitter and still never share
//! an upstream window.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Grant times of the requests made in the last `window`, oldest first.
#[derive(Debug)]
pub struct SlidingWindow {
    limit: usize,
    window: Duration,
    log: VecDeque<Instant>,
    /// Set when the upstream itself answered 429 with a `Retry-After`: nothing is granted before.
    blocked_until: Option<Instant>,
}

impl SlidingWindow {
    /// A budget of `limit` requests in any `window`. A `limit` of 0 is treated as 1 so the
    /// budget can never wedge every caller forever.
    pub fn new(limit: u32, window: Duration) -> Self {
        let limit = limit.max(1) as usize;
        Self {
            limit,
            window,
            log: VecDeque::with_capacity(limit),
            blocked_until: None,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    fn evict(&mut self, now: Instant) {
        while let Some(&oldest) = self.log.front() {
            if oldest + self.window <= now {
                self.log.pop_front();
            } else {
                break;
            }
        }
        if self.blocked_until.is_some_and(|until| until <= now) {
            self.blocked_until = None;
        }
    }

    /// Takes one request slot at `now`, or tells when the next slot frees.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Instant> {
        self.evict(now);
        if let Some(until) = self.blocked_until {
            return Err(until);
        }
        if self.log.len() < self.limit {
            self.log.push_back(now);
            Ok(())
        } else {
            // The log is full, so it has `limit` >= 1 entries and a front.
            Err(self.log.front().map_or(now, |&oldest| oldest + self.window))
        }
    }

    /// Requests that would be granted at `now` (0 while an upstream `Retry-After` holds).
    pub fn available(&mut self, now: Instant) -> usize {
        self.evict(now);
        if self.blocked_until.is_some() {
            0
        } else {
            self.limit.saturating_sub(self.log.len())
        }
    }

    /// Replaces the log with the one a shared budget reported at `now`: the ages of its grants,
    /// oldest first, and how long a `Retry-After` still holds. The lane then estimates waits
    /// from what every replica was granted.
    pub fn mirror(&mut self, now: Instant, ages: &[Duration], blocked_for: Option<Duration>) {
        self.log.clear();
        self.log
            .extend(ages.iter().map(|&age| now.checked_sub(age).unwrap_or(now)));
        self.blocked_until = blocked_for.map(|pause| now + pause);
    }

    /// Gives back a slot granted at `at` that was never used (its caller left before sending).
    pub fn refund(&mut self, at: Instant) {
        if let Some(position) = self.log.iter().rposition(|&granted| granted == at) {
            self.log.remove(position);
        }
    }

    /// Honours an upstream `Retry-After`: no slot is granted before `until`.
    pub fn block_until(&mut self, until: Instant) {
        if self.blocked_until.is_none_or(|current| current < until) {
            self.blocked_until = Some(until);
        }
    }

    /// When the request that has `ahead` requests granted before it would get its slot, if no
    /// other request arrived. Exact for this log; used to shed early and to fill `RetryInfo`.
    ///
    /// Grant `m` (0-based, counting from now) happens at `now` while slots are free; after that
    /// it waits for the slot of the grant `limit` places before it to leave the window, so it is
    /// the expiry of a logged grant plus whole windows.
    pub fn estimate(&mut self, now: Instant, ahead: usize) -> Instant {
        self.evict(now);
        let logged = self.log.len();
        let mut m = ahead;
        let mut rounds = 0u32;
        while m >= self.limit {
            m -= self.limit;
            rounds += 1;
        }
        let base = if logged + m < self.limit {
            now
        } else {
            // logged + m >= limit and m < limit, so the index lies inside the log.
            self.log
                .get(logged + m - self.limit)
                .map_or(now, |&granted| (granted + self.window).max(now))
        };
        let base = match self.blocked_until {
            Some(until) => base.max(until),
            None => base,
        };
        base + self.window * rounds
    }

    /// Number of grants in the window ending at `now`.
    pub fn in_window(&mut self, now: Instant) -> usize {
        self.evict(now);
        self.log.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::scheduler::tests::max_in_any_window;

    #[tokio::test(start_paused = true)]
    async fn never_more_than_limit_in_any_window() {
        let window = Duration::from_secs(60);
        let mut budget = SlidingWindow::new(10, window);
        let mut grants = Vec::new();
        // Irregular demand over five minutes: bursts, trickles and idle stretches.
        let steps = [
            0u64, 1, 1, 2, 30, 59, 60, 61, 61, 90, 119, 120, 121, 200, 201, 260, 299,
        ];
        let start = Instant::now();
        for second in steps {
            tokio::time::advance(start + Duration::from_secs(second) - Instant::now()).await;
            for _ in 0..7 {
                if budget.try_acquire(Instant::now()).is_ok() {
                    grants.push(Instant::now());
                }
            }
        }
        assert!(grants.len() > 30, "the budget was used: {}", grants.len());
        assert!(max_in_any_window(&grants, window) <= 10);
    }

    #[tokio::test(start_paused = true)]
    async fn full_burst_then_waits_for_the_oldest_to_expire() {
        let mut budget = SlidingWindow::new(3, Duration::from_secs(60));
        let start = Instant::now();
        for _ in 0..3 {
            budget.try_acquire(start).expect("burst up to the limit");
        }
        assert_eq!(
            budget.try_acquire(start),
            Err(start + Duration::from_secs(60))
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(budget.try_acquire(Instant::now()).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(budget.try_acquire(Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn estimate_matches_actual_grant_times() {
        let window = Duration::from_secs(60);
        let mut budget = SlidingWindow::new(4, window);
        let start = Instant::now();
        budget.try_acquire(start).expect("free");
        tokio::time::advance(Duration::from_secs(10)).await;
        budget.try_acquire(Instant::now()).expect("free");
        let now = Instant::now();
        assert_eq!(budget.estimate(now, 0), now, "two slots still free");
        assert_eq!(budget.estimate(now, 1), now);
        assert_eq!(budget.estimate(now, 2), start + window);
        assert_eq!(budget.estimate(now, 3), start + Duration::from_secs(70));
        // Two more slots were taken at `now`; they free a window later.
        assert_eq!(budget.estimate(now, 4), now + window);
        assert_eq!(budget.estimate(now, 6), start + window * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refund_and_block_until() {
        let mut budget = SlidingWindow::new(1, Duration::from_secs(60));
        let now = Instant::now();
        budget.try_acquire(now).expect("free");
        budget.refund(now);
        assert_eq!(budget.in_window(now), 0);
        budget.block_until(now + Duration::from_secs(5));
        assert_eq!(budget.try_acquire(now), Err(now + Duration::from_secs(5)));
        assert_eq!(budget.estimate(now, 0), now + Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(budget.try_acquire(Instant::now()).is_ok());
    }
}
