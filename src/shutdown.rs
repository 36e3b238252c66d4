//! The drain signal: one sender flips it when shutdown starts, every long-lived task watches it.
//!
//! A `watch` channel rather than a `broadcast` one because late subscribers (a stream opened a
//! moment before the signal) must still see that draining has begun, and the value is a single
//! flag that never needs a history.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};

/// Starts the drain; dropping it without calling [`DrainTrigger::start`] also starts it, so a
/// panicking server task cannot leave streams running forever.
#[derive(Debug)]
pub struct DrainTrigger {
    sender: watch::Sender<bool>,
}

/// A cheap, cloneable view of the drain state.
#[derive(Debug, Clone)]
pub struct Drain {
    receiver: watch::Receiver<bool>,
}

pub fn channel() -> (DrainTrigger, Drain) {
    let (sender, receiver) = watch::channel(false);
    (DrainTrigger { sender }, Drain { receiver })
}

impl DrainTrigger {
    pub fn start(&self) {
        self.sender.send_replace(true);
    }
}

impl Drop for DrainTrigger {
    fn drop(&mut self) {
        self.sender.send_replace(true);
    }
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves once draining has started (at once if it already has).
    pub async fn signaled(mut self) {
        // An error means the trigger is gone, which counts as draining.
        let _ = self.receiver.wait_for(|draining| *draining).await;
    }
}

/// The clock of a task that works in rounds until draining starts: one round every period, the
/// first one period after the start (whatever ran at start needs no repeat at once), and after a
/// stall the missed rounds are skipped rather than run back to back.
#[derive(Debug)]
pub struct Rounds {
    ticker: Interval,
    drain: Drain,
}

impl Rounds {
    pub fn every(period: Duration, drain: Drain) -> Rounds {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Rounds { ticker, drain }
    }

    /// Waits for the next round; `false` once draining has started (the drain wins a tie, so no
    /// round starts after it).
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            biased;
            () = self.drain.clone().signaled() => false,
            _ = self.ticker.tick() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn late_watchers_see_the_signal() {
        let (trigger, drain) = channel();
        assert!(!drain.is_draining());
        trigger.start();
        let late = drain.clone();
        late.signaled().await;
        assert!(drain.is_draining());
    }

    #[tokio::test]
    async fn dropping_the_trigger_drains() {
        let (trigger, drain) = channel();
        drop(trigger);
        drain.signaled().await;
    }
}
