//! Whether a networked store can be reached: a cheap probe every second drives readiness, so a
//! replica whose database went away reports NOT_SERVING (load balancers send its callers to
//! replicas that can commit) and reports SERVING again by itself once the database answers.
//!
//! The probe is the truth for readiness only. Writes are never gated on it: a write is
//! acknowledged when, and only when, its commit succeeded, so a replica that lost its database
//! answers `UNAVAILABLE` from the failed commit itself and a write that commits just after the
//! database returned (before the next probe) is acknowledged rightly.
//!
//! The embedded store has no probe: its file cannot be out of reach the way a server can.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::readiness::Readiness;
use crate::shutdown::Drain;
use crate::store::StoreError;

/// A store that can be unreachable, answering one cheap round trip.
#[async_trait::async_trait]
pub trait HealthProbe: Send + Sync + 'static {
    /// One round trip to the store; `Err` when it could not be made.
    async fn check(&self) -> Result<(), StoreError>;
}

/// How the store is watched.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// Time between probes, in both states: how soon a loss and a return are noticed.
    pub interval: Duration,
    /// A probe that takes longer failed: a database that takes this long for `SELECT 1` cannot
    /// serve writes either.
    pub timeout: Duration,
    /// After a failed probe, the next one comes this soon, to confirm the loss: one failed
    /// probe (a connection that the database closed while idle) is not an outage.
    pub confirm_after: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
            confirm_after: Duration::from_millis(250),
        }
    }
}

/// Probes until `drain` fires, marking `readiness` unreachable after two failures in a row and
/// reachable again after one success; `on_return` runs at each return, so loops that backed off
/// while the store was away (the outbox's claims) start again at once.
pub async fn watch(
    probe: Arc<dyn HealthProbe>,
    settings: HealthSettings,
    readiness: Readiness,
    drain: Drain,
    on_return: impl Fn() + Send + 'static,
) {
    let metrics = crate::telemetry::metrics();
    let mut failures: u32 = 0;
    // When the outage began as seen from here (the first failed probe), for the log line of the
    // return.
    let mut lost_at: Option<Instant> = None;
    loop {
        let outcome = match tokio::time::timeout(settings.timeout, probe.check()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.message().to_owned()),
            Err(_elapsed) => Err(format!(
                "no answer within {}",
                humantime::format_duration(settings.timeout)
            )),
        };
        let next = match outcome {
            Ok(()) => {
                metrics
                    .store_health_checks
                    .add(1, &[opentelemetry::KeyValue::new("outcome", "ok")]);
                failures = 0;
                if readiness.set_store_reachable(true) {
                    let down_ms = lost_at
                        .take()
                        .map_or(0, |since| since.elapsed().as_millis());
                    tracing::info!(down_ms, "the store answers again, serving");
                    on_return();
                }
                lost_at = None;
                settings.interval
            }
            Err(error) => {
                metrics
                    .store_health_checks
                    .add(1, &[opentelemetry::KeyValue::new("outcome", "failed")]);
                failures = failures.saturating_add(1);
                lost_at.get_or_insert_with(Instant::now);
                if failures >= 2 && readiness.set_store_reachable(false) {
                    tracing::warn!(
                        %error,
                        failures,
                        "the store cannot be reached, reporting not serving until it answers"
                    );
                }
                if failures == 1 {
                    settings.confirm_after
                } else {
                    settings.interval
                }
            }
        };
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            () = drain.clone().signaled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::StoreError;

    /// A probe whose answers the test sets, counting the checks it answered.
    #[derive(Default)]
    struct Switch {
        down: Mutex<bool>,
        checks: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl HealthProbe for Switch {
        async fn check(&self) -> Result<(), StoreError> {
            self.checks.fetch_add(1, Ordering::SeqCst);
            if *self.down.lock().unwrap() {
                Err(StoreError::unavailable("postgres: connection refused"))
            } else {
                Ok(())
            }
        }
    }

    /// Lets the watcher run until it has answered `checks` probes in all (the clock is paused,
    /// so sleeping advances it exactly as far as the watcher's timers need).
    async fn until_checks(probe: &Switch, checks: usize) {
        while probe.checks.load(Ordering::SeqCst) < checks {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn two_failed_probes_make_the_replica_unready_and_one_answer_makes_it_ready() {
        let probe = Arc::new(Switch::default());
        let readiness = Readiness::new();
        readiness.mark_ready();
        let (trigger, drain) = crate::shutdown::channel();
        let returns = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&returns);
        let watcher = tokio::spawn(watch(
            Arc::clone(&probe) as Arc<dyn HealthProbe>,
            HealthSettings::default(),
            readiness.clone(),
            drain,
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
            },
        ));
        until_checks(&probe, 2).await;
        assert!(readiness.is_ready());

        *probe.down.lock().unwrap() = true;
        let checks = probe.checks.load(Ordering::SeqCst);
        until_checks(&probe, checks + 1).await;
        // One failure is not an outage.
        assert!(readiness.is_ready());
        until_checks(&probe, checks + 2).await;
        assert!(!readiness.is_ready());
        assert!(!readiness.store_reachable());
        // Still probing while down, and still down.
        until_checks(&probe, checks + 5).await;
        assert!(!readiness.is_ready());
        assert_eq!(returns.load(Ordering::SeqCst), 0);

        *probe.down.lock().unwrap() = false;
        let checks = probe.checks.load(Ordering::SeqCst);
        until_checks(&probe, checks + 1).await;
        tokio::task::yield_now().await;
        assert!(readiness.is_ready());
        assert_eq!(returns.load(Ordering::SeqCst), 1, "one return, one wake-up");

        trigger.start();
        watcher.await.unwrap();
    }

    /// A probe that hangs (a database behind a dead network path answers nothing) fails at the
    /// timeout.
    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_answers_fails_at_the_timeout() {
        struct Hangs;
        #[async_trait::async_trait]
        impl HealthProbe for Hangs {
            async fn check(&self) -> Result<(), StoreError> {
                std::future::pending().await
            }
        }
        let readiness = Readiness::new();
        readiness.mark_ready();
        let (trigger, drain) = crate::shutdown::channel();
        let settings = HealthSettings::default();
        let started = Instant::now();
        let watcher = tokio::spawn(watch(
            Arc::new(Hangs),
            settings.clone(),
            readiness.clone(),
            drain,
            || {},
        ));
        readiness.changed_from(true).await;
        assert_eq!(
            started.elapsed(),
            settings.timeout * 2 + settings.confirm_after,
            "two probes timed out, the second after the confirmation delay"
        );
        trigger.start();
        watcher.await.unwrap();
    }
}
