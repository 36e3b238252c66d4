//! The survey spool: single-recipient survey sends of every replica, handed to the one replica
//! that sends them, so the replicas' recipients share `POST /survey` batches as one replica's
//! callers do (see [`crate::upstream::retently::spool`]).
//!
//! A replica spools an entry and waits for its answer; the replica holding the account's sender
//! lease claims pending entries under the lease's fence, sends them through its batcher and
//! answers them. An entry claimed under an epoch the lease no longer has belongs to a sender
//! that lost the lease (it died, or was cut off): nobody will answer it, and whether it went out
//! is unknown. Entries and answers are opaque JSON to the store.
//!
//! Only the PostgreSQL engine implements it: one embedded replica batches in memory.

use tokio::sync::watch;

use super::StoreError;
use super::leases::{Fence, UnderLease};

/// One recipient's survey send, waiting in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolEntry {
    /// The upstream account it is for (a fingerprint, never a credential).
    pub account: String,
    /// The batching key and the item, as the sender's batcher reads them back (JSON).
    pub key: String,
    pub item: String,
    /// The caller's priority and name, so the sender's lane schedules it as the caller's.
    pub interactive: bool,
    pub caller: Option<String>,
    /// The caller's deadline on the wall clock (milliseconds since the Unix epoch).
    pub deadline_ms: Option<i64>,
}

/// What became of a spooled entry, once it is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolAnswer {
    /// The sender's answer (JSON).
    Answered(String),
    /// Claimed by a sender that has lost the lease since: it may or may not have been sent.
    SenderLost,
}

/// The survey spool. Each method is one atomic operation of the engine.
#[async_trait::async_trait]
pub trait SurveySpoolStore: Send + Sync + 'static {
    /// Adds `entry` and wakes the sender; returns the entry's id.
    async fn spool(&self, entry: &SpoolEntry) -> Result<i64, StoreError>;

    /// Takes up to `limit` pending entries of `account`, oldest first, for the holder of
    /// `fence`, checked in the same transaction: a sender that lost its lease claims nothing.
    async fn claim_spooled(
        &self,
        fence: &Fence,
        account: &str,
        limit: usize,
    ) -> Result<UnderLease<Vec<(i64, SpoolEntry)>>, StoreError>;

    /// Records the answers of claimed entries and wakes their waiters. An entry that is gone
    /// (its waiter settled it as lost) is skipped.
    async fn answer_spooled(&self, answers: &[(i64, String)]) -> Result<(), StoreError>;

    /// Removes and returns those of `ids` that are settled: answered, or claimed under an
    /// epoch that `lease` no longer has. Unsettled ones stay.
    async fn collect_spooled(
        &self,
        lease: &str,
        ids: &[i64],
    ) -> Result<Vec<(i64, SpoolAnswer)>, StoreError>;

    /// Removes entry `id` if no sender has claimed it yet; `false` when one has (it will be
    /// answered) or it is gone.
    async fn withdraw_spooled(&self, id: i64) -> Result<bool, StoreError>;

    /// Removes claimed entries of `account` older than `older_than_ms` (wall clock): answers
    /// whose waiter went away with its replica. Returns how many.
    async fn prune_spooled(&self, account: &str, older_than_ms: i64) -> Result<u64, StoreError>;

    /// A counter that changes when entries are spooled (a hint for the sender; it may miss
    /// some, so the sender also looks every so often).
    fn spooled_wakeups(&self) -> watch::Receiver<u64>;

    /// A counter that changes when answers are recorded (a hint for the waiters, likewise).
    fn answered_wakeups(&self) -> watch::Receiver<u64>;
}
