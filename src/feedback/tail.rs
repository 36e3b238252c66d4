//! The log tail: on a store shared by several replicas, publishes to this replica's hub what the
//! other replicas append (the poller runs on one replica only, and webhook calls reach any).
//!
//! It reads the log after the hub's published head whenever the store signals an append (on
//! PostgreSQL a `NOTIFY` sent by the appending transaction on commit, received on a listening
//! connection) and, since a signal can be lost, at least every [`TAIL_INTERVAL`]: the signal
//! makes the tail fast, the periodic read makes it certain. The same read refreshes the hub's
//! sync watermark from the stored state of whichever replica polls, so heartbeats and the sync
//! lag are right on every replica. Only runs when the store has other appenders
//! ([`crate::store::FeedbackLogStore::append_wakeups`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::hub::Hub;
use super::sync::SyncState;
use crate::backoff::{LOG_EVERY, LogLimit};
use crate::shutdown::Drain;
use crate::store::Store;

/// The longest an entry appended by another replica waits for this replica's subscribers when
/// its wake-up was lost; one indexed read of the log per interval.
pub const TAIL_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(hub: Arc<Hub>, store: Store, mut wakeups: watch::Receiver<u64>, drain: Drain) {
    // Both reads fail together while the database is away: one line per interval says so.
    let failure_log = LogLimit::new(LOG_EVERY);
    let mut signals = true;
    // An interval, not a sleep per round: wake-ups in a row must not put the periodic read off.
    let mut tick = tokio::time::interval(TAIL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let woken = tokio::select! {
            biased;
            () = drain.clone().signaled() => return,
            changed = wakeups.changed(), if signals => {
                // The signal's source is gone for good: the periodic read carries on alone.
                signals = changed.is_ok();
                signals
            }
            _ = tick.tick() => false,
        };
        if let Err(error) = hub.publish_from_log().await {
            if let Some(suppressed) = failure_log.admit() {
                tracing::warn!(%error, suppressed, "cannot read the feedback log's tail");
            }
            continue;
        }
        if woken {
            continue;
        }
        match SyncState::load(&store).await {
            Ok(Some(state)) if state.synced_to_ms > hub.sync_time_ms() => {
                hub.set_sync_time(state.synced_to_ms);
            }
            Ok(_) => {}
            Err(error) => {
                if let Some(suppressed) = failure_log.admit() {
                    tracing::warn!(%error, suppressed, "cannot read the feedback sync state");
                }
            }
        }
    }
}
