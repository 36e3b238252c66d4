//! Whether this replica should be sent calls: its start-up work is done, and its store can be
//! reached. `/readyz` and gRPC health report it, so load balancers send their traffic to
//! replicas that deliver and commit.
//!
//! - Start-up: until the outbox has recovered the deliveries that were in flight at the last
//!   stop, no delivery is claimed. Three stages rather than a flag so the server can wait for
//!   the first attempt before it answers its first health check: a healthy store is ready from
//!   the first answer on, and one whose recovery failed is reported not ready from the first
//!   answer on, with no window in between.
//! - Reachability: a networked store (PostgreSQL) that stops answering makes the replica not
//!   ready until it answers again (see [`crate::store::health`]); the embedded store is always
//!   reachable.

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

/// Both conditions in one value, so a watcher sees them change together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    stage: Stage,
    store_reachable: bool,
}

impl State {
    fn ready(self) -> bool {
        self.stage == Stage::Ready && self.store_reachable
    }
}

/// A cheap, cloneable view and setter of the start-up stage and the store's reachability.
#[derive(Debug, Clone)]
pub struct Readiness {
    state: watch::Sender<State>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new()
    }
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness {
            state: watch::channel(State {
                stage: Stage::Starting,
                // Reachable until a probe says otherwise: the store was reached at start.
                store_reachable: true,
            })
            .0,
        }
    }

    pub fn stage(&self) -> Stage {
        self.state.borrow().stage
    }

    /// Start-up done and the store reachable: the replica should be sent calls.
    pub fn is_ready(&self) -> bool {
        self.state.borrow().ready()
    }

    pub fn store_reachable(&self) -> bool {
        self.state.borrow().store_reachable
    }

    pub fn mark_ready(&self) {
        self.state.send_modify(|state| state.stage = Stage::Ready);
    }

    /// The first attempt failed (later failures leave the stage as it is).
    pub fn mark_retrying(&self) {
        self.state.send_if_modified(|state| {
            let first = state.stage == Stage::Starting;
            if first {
                state.stage = Stage::Retrying;
            }
            first
        });
    }

    /// Records whether the store answers; `true` when that changed.
    pub fn set_store_reachable(&self, reachable: bool) -> bool {
        self.state.send_if_modified(|state| {
            let changed = state.store_reachable != reachable;
            state.store_reachable = reachable;
            changed
        })
    }

    /// Resolves once the first attempt finished, with the stage it left.
    pub async fn first_attempt(&self) -> Stage {
        let mut receiver = self.state.subscribe();
        match receiver
            .wait_for(|state| state.stage != Stage::Starting)
            .await
        {
            Ok(state) => state.stage,
            // Unreachable while `self` holds the sender.
            Err(_) => Stage::Starting,
        }
    }

    /// Resolves once start-up work is done (whether the store is reachable or not).
    pub async fn ready(&self) {
        let mut receiver = self.state.subscribe();
        let _ = receiver.wait_for(|state| state.stage == Stage::Ready).await;
    }

    /// Resolves once [`Readiness::is_ready`] differs from `was_ready`, with the new value (at
    /// once if it already does), so a follower that publishes readiness misses no change.
    pub async fn changed_from(&self, was_ready: bool) -> bool {
        let mut receiver = self.state.subscribe();
        match receiver.wait_for(|state| state.ready() != was_ready).await {
            Ok(state) => state.ready(),
            // Unreachable while `self` holds the sender.
            Err(_) => was_ready,
        }
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

    #[tokio::test]
    async fn an_unreachable_store_makes_a_started_replica_unready_until_it_returns() {
        let readiness = Readiness::new();
        // Before start-up finished, reachability alone does not make it ready.
        assert!(!readiness.is_ready());
        assert!(!readiness.set_store_reachable(true), "no change");
        readiness.mark_ready();
        assert!(readiness.is_ready());

        let follower = readiness.clone();
        let lost = tokio::spawn(async move { follower.changed_from(true).await });
        assert!(readiness.set_store_reachable(false));
        assert!(!lost.await.unwrap());
        assert!(!readiness.is_ready());
        assert_eq!(readiness.stage(), Stage::Ready, "start-up stays done");
        // Waiting for start-up does not wait for the store.
        readiness.ready().await;

        let follower = readiness.clone();
        let back = tokio::spawn(async move { follower.changed_from(false).await });
        assert!(readiness.set_store_reachable(true));
        assert!(back.await.unwrap());
        assert!(readiness.is_ready());
    }
}
