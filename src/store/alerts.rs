//! The alert evaluator's durable state: its checkpoint in the feedback log, the key of every alert
//! it raised (one per rule, response and version), and the per-rule counts its rate limits read.
//!
//! [`AlertStore::queue_alerts`] queues a batch's alerts in the outbox, records their keys and
//! moves the checkpoint as one atomic operation: a crash before it re-evaluates the batch
//! (nothing was queued), a crash after it finds the checkpoint past the batch (nothing is queued
//! twice), and an entry evaluated again anyway (a checkpoint moved back by hand, a response logged
//! again after retention forgot it) meets its key and is skipped.

use std::time::Duration;

use super::StoreError;
use super::outbox::QueuedDelivery;

/// At most `count` alerts of one rule within any `per` (counted from the alerts it queued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

/// An alert a rule raised for one log entry, not yet queued.
#[derive(Debug, Clone)]
pub struct PendingAlert {
    pub rule: String,
    pub feedback_id: String,
    /// Tells versions of one response apart (a digest of the version's content), so a rule that
    /// watches updates alerts once per version.
    pub version: String,
    pub rate_limit: Option<RateLimit>,
    /// The delivery to queue unless the alert is a duplicate or over its rate limit; its
    /// `delivery_id` is the alert's id.
    pub delivery: QueuedDelivery,
}

/// What became of a pending alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertOutcome {
    /// Queued in the outbox under this delivery id.
    Queued(String),
    /// This rule already alerted for this version of the response.
    Duplicate,
    /// The rule's rate limit was reached; the alert is dropped (and its key remembered, so it
    /// is not raised later either).
    RateLimited,
}

/// The alert evaluator's state. Every method is one atomic operation, applied completely and
/// durably before it returns `Ok`, or not at all. "Now" is the engine's wall clock in UNIX
/// milliseconds when the operation runs.
#[async_trait::async_trait]
pub trait AlertStore: Send + Sync + 'static {
    /// The checkpoint (the last feedback log sequence evaluated), if the evaluator ever started.
    async fn checkpoint(&self) -> Result<Option<i64>, StoreError>;

    /// The checkpoint; when there is none yet it is set to `head` first, so alerting begins with
    /// the responses logged from then on instead of raising alerts for the whole retained log.
    async fn checkpoint_or_start_at(&self, head: i64) -> Result<i64, StoreError>;

    /// In one transaction, for each alert in order: a duplicate when its (rule, response,
    /// version) key is known; otherwise its key is recorded (with now) and it is rate limited
    /// when its rule already queued `count` alerts within the last `per`, else its delivery is
    /// queued in the outbox (pending, due now, as [`super::OutboxStore::enqueue`] stores one).
    /// Then the checkpoint moves to `checkpoint`, never backwards. One outcome per alert, in
    /// order.
    async fn queue_alerts(
        &self,
        alerts: Vec<PendingAlert>,
        checkpoint: i64,
    ) -> Result<Vec<AlertOutcome>, StoreError>;

    /// Forgets the keys of alerts recorded more than `older_than` ago; returns how many.
    async fn prune(&self, older_than: Duration) -> Result<usize, StoreError>;
}
