//! The drain signal: one sender flips it when shutdown starts, every long-lived task watches it.
//!
//! A `watch` channel rather than a `broadcast` one because late subscribers (a stream opened a
//! moment before the signal) must still see that draining has begun, and the value is a single
//! flag that never needs a history.

use tokio::sync::watch;

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
