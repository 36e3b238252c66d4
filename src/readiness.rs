//! Whether the gateway's start-up work is done: until the outbox has recovered the deliveries that
//! were in flight at the last stop, no delivery is claimed, so `/readyz` answers 503 and gRPC
//! health says NOT_SERVING (load balancers send their traffic to replicas that deliver).
//!
//! Three stages rather than a flag so the server can wait for the first attempt before it answers
//! its first health check: a healthy store is ready from the first answer on, and one whose
//! recovery failed is reported not ready from the first answer on, with no window in between.

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The first recovery attempt has not finished.
    Starting,
    /// The first attempt failed; it is being retried.
    Retrying,
    /// Recovery succeeded.
    Ready,
}

/// A cheap, cloneable view and setter of the start-up stage.
#[derive(Debug, Clone)]
pub struct Readiness {
    stage: watch::Sender<Stage>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new()
    }
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness {
            stage: watch::channel(Stage::Starting).0,
        }
    }

    pub fn stage(&self) -> Stage {
        *self.stage.borrow()
    }

    pub fn is_ready(&self) -> bool {
        self.stage() == Stage::Ready
    }

    pub fn mark_ready(&self) {
        self.stage.send_replace(Stage::Ready);
    }

    /// The first attempt failed (later failures leave the stage as it is).
    pub fn mark_retrying(&self) {
        self.stage.send_if_modified(|stage| {
            let first = *stage == Stage::Starting;
            if first {
                *stage = Stage::Retrying;
            }
            first
        });
    }

    /// Resolves once the first attempt finished, with the stage it left.
    pub async fn first_attempt(&self) -> Stage {
        let mut receiver = self.stage.subscribe();
        match receiver.wait_for(|stage| *stage != Stage::Starting).await {
            Ok(stage) => *stage,
            // Unreachable while `self` holds the sender.
            Err(_) => Stage::Starting,
        }
    }

    /// Resolves once ready.
    pub async fn ready(&self) {
        let mut receiver = self.stage.subscribe();
        let _ = receiver.wait_for(|stage| *stage == Stage::Ready).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_first_attempt_settles_as_retrying_until_ready() {
        let readiness = Readiness::new();
        let waiter = readiness.clone();
        let first = tokio::spawn(async move { waiter.first_attempt().await });
        readiness.mark_retrying();
        assert_eq!(first.await.unwrap(), Stage::Retrying);
        assert!(!readiness.is_ready());
        readiness.mark_retrying();
        assert_eq!(readiness.stage(), Stage::Retrying);
        readiness.mark_ready();
        readiness.ready().await;
        assert!(readiness.is_ready());
        // Ready stays ready: a later failure is not a start-up failure.
        readiness.mark_retrying();
        assert!(readiness.is_ready());
    }
}
