//! Circuit breaker: fail fast while an upstream is down, probe it now and then.
//!
//! Counts consecutive transient failures (5xx, connect errors, timeouts). At `threshold` the
//! circuit opens: calls fail at once with `UNAVAILABLE`/`UPSTREAM_CIRCUIT_OPEN` and a `RetryInfo`
//! instead of spending budget and callers' time on an upstream that is not answering. After
//! `open_for` one probe is let through (half-open); its success closes the circuit, its failure
//! opens it again for twice as long (up to `max_open_for`). Rate limiting (429) and caller errors
//! (4xx) say nothing about the upstream's health and are not counted.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// Consecutive transient failures that open the circuit.
    pub threshold: u32,
    /// How long the circuit stays open before the first probe.
    pub open_for: Duration,
    /// Longest open period after repeated failed probes.
    pub max_open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            threshold: 5,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        open_for: Duration,
    },
    /// A probe is in flight; everyone else still fails fast.
    HalfOpen {
        open_for: Duration,
    },
}

/// What the breaker says about a new attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Allowed,
    /// Go ahead: this attempt is the probe that decides whether the circuit closes.
    Probe,
    /// Fail fast; the circuit may let a probe through after this long.
    Rejected { retry_after: Duration },
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed { .. } => Admission::Allowed,
            BreakerState::Open { until, open_for } if now >= until => {
                self.state = BreakerState::HalfOpen { open_for };
                Admission::Probe
            }
            BreakerState::Open { until, .. } => Admission::Rejected {
                retry_after: until - now,
            },
            // The probe has not answered yet; its timeout bounds this state.
            BreakerState::HalfOpen { .. } => Admission::Rejected {
                retry_after: Duration::from_secs(1),
            },
        }
    }

    /// The attempt reached a healthy upstream (any answer but a 5xx, 408 or 429).
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// The attempt failed in a way that says the upstream is unhealthy.
    pub fn on_failure(&mut self, now: Instant) {
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 >= self.config.threshold => {
                BreakerState::Open {
                    until: now + self.config.open_for,
                    open_for: self.config.open_for,
                }
            }
            BreakerState::Closed { failures } => BreakerState::Closed {
                failures: failures + 1,
            },
            BreakerState::HalfOpen { open_for } | BreakerState::Open { open_for, .. } => {
                let open_for = (open_for * 2).min(self.config.max_open_for);
                BreakerState::Open {
                    until: now + open_for,
                    open_for,
                }
            }
        };
    }

    /// The probe ended without telling anything (rate limited, cancelled): let another one try.
    pub fn on_inconclusive(&mut self, now: Instant) {
        if let BreakerState::HalfOpen { open_for } = self.state {
            self.state = BreakerState::Open {
                until: now,
                open_for,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            threshold: 3,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(15),
        })
    }

    fn fail(breaker: &mut Breaker, now: Instant, times: usize) {
        for _ in 0..times {
            breaker.on_failure(now);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_half_opens_with_one_probe() {
        let mut breaker = breaker();
        let now = Instant::now();
        fail(&mut breaker, now, 2);
        assert_eq!(breaker.admit(now), Admission::Allowed);
        breaker.on_failure(now);
        assert_eq!(
            breaker.admit(now),
            Admission::Rejected {
                retry_after: Duration::from_secs(5)
            }
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        assert_eq!(breaker.admit(now), Admission::Probe);
        // Only one probe at a time.
        assert!(matches!(breaker.admit(now), Admission::Rejected { .. }));
        breaker.on_success();
        assert_eq!(breaker.admit(now), Admission::Allowed);
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let mut breaker = breaker();
        let now = Instant::now();
        fail(&mut breaker, now, 2);
        breaker.on_success();
        fail(&mut breaker, now, 2);
        assert_eq!(breaker.admit(now), Admission::Allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_double_the_open_period_up_to_the_cap() {
        let mut breaker = breaker();
        for _ in 0..3 {
            breaker.on_failure(Instant::now());
        }
        for expected in [10u64, 15, 15] {
            let BreakerState::Open { until, .. } = breaker.state() else {
                panic!("open expected, got {:?}", breaker.state());
            };
            tokio::time::advance(until - Instant::now()).await;
            assert_eq!(breaker.admit(Instant::now()), Admission::Probe);
            breaker.on_failure(Instant::now());
            assert_eq!(
                breaker.admit(Instant::now()),
                Admission::Rejected {
                    retry_after: Duration::from_secs(expected)
                }
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_inconclusive_probe_lets_the_next_caller_probe() {
        let mut breaker = breaker();
        for _ in 0..3 {
            breaker.on_failure(Instant::now());
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(breaker.admit(Instant::now()), Admission::Probe);
        breaker.on_inconclusive(Instant::now());
        assert_eq!(breaker.admit(Instant::now()), Admission::Probe);
    }
}
