//! The outbox of asynchronous writes as stored: what a delivery is, and the operations the
//! delivery worker and the `DeliveryService` need, each one atomic.
//!
//! The policy (when to retry, what "in doubt" means, backoff) is the domain's
//! ([`crate::domain::outbox`]); an engine only keeps the rows and applies each operation as one
//! transaction.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::idempotency::IdempotencyRecord;
use crate::error::{ErrorCode, Reason};

/// Delivery states; the numbers are those of `cx.gateway.v1.DeliveryState` (and of the stored
/// `state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryState {
    Pending = 1,
    InFlight = 2,
    RetryWait = 3,
    Delivered = 4,
    DeadLettered = 5,
}

impl DeliveryState {
    /// The state stored as `value`; an unknown number reads as pending (it is due again).
    pub fn from_i64(value: i64) -> DeliveryState {
        match value {
            2 => DeliveryState::InFlight,
            3 => DeliveryState::RetryWait,
            4 => DeliveryState::Delivered,
            5 => DeliveryState::DeadLettered,
            _ => DeliveryState::Pending,
        }
    }
}

/// Why an attempt failed, in the shape of `cx.gateway.v1.ItemError`; stored as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryError {
    /// The gateway's own code, stored by its stable name (see [`ErrorCode::as_str`]).
    pub code: ErrorCode,
    pub reason: Reason,
    pub message: String,
    pub metadata: HashMap<String, String>,
}

/// A write to queue. `O` says who queued it: the domain's owner on the write path, stored as
/// [`crate::domain::Owner::stored`] spells it (the default).
#[derive(Debug, Clone)]
pub struct NewDelivery<O = String> {
    /// The RPC it came from (`UpsertCustomers`), which tells the executor how to read `request`.
    pub method: String,
    /// The validated request, as the executor will replay it.
    pub request: Vec<u8>,
    /// `cx.gateway.v1.Destination` numbers it writes to.
    pub destinations: Vec<i32>,
    pub item_count: u32,
    /// The customers it touches; see [`OutboxStore::claim`] on ordering.
    pub ordering_keys: Vec<String>,
    pub idempotency_key: Option<String>,
    /// Whether sending it twice is harmless (upserts, deletes) or not (events, survey sends).
    pub replay_safe: bool,
    /// Who queued it: only they (or an admin) see and requeue it.
    pub owner: O,
}

impl<O> NewDelivery<O> {
    /// The same delivery with its owner spelled by `spell`.
    pub fn map_owner<P>(self, spell: impl FnOnce(O) -> P) -> NewDelivery<P> {
        NewDelivery {
            method: self.method,
            request: self.request,
            destinations: self.destinations,
            item_count: self.item_count,
            ordering_keys: self.ordering_keys,
            idempotency_key: self.idempotency_key,
            replay_safe: self.replay_safe,
            owner: spell(self.owner),
        }
    }
}

/// A delivery as [`OutboxStore::enqueue`] stores it.
#[derive(Debug, Clone)]
pub struct QueuedDelivery {
    /// Unique among all deliveries ever queued.
    pub delivery_id: String,
    pub delivery: NewDelivery,
    /// The end of its retry window (UNIX ms).
    pub expire_ms: i64,
    /// The W3C `traceparent` of the span that queued it, if traces are exported.
    pub traceparent: Option<String>,
}

/// What the outbox knows about one delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    pub delivery_id: String,
    pub method: String,
    pub state: DeliveryState,
    pub destinations: Vec<i32>,
    pub item_count: u32,
    pub idempotency_key: Option<String>,
    pub attempt_count: u32,
    pub replay_count: u32,
    pub last_error: Option<DeliveryError>,
    /// The response the RPC would have returned in SYNC mode, once delivered.
    pub result: Option<Vec<u8>>,
    pub create_ms: i64,
    pub update_ms: i64,
    /// When the next attempt is due; only for pending and retry-waiting deliveries.
    pub next_attempt_ms: Option<i64>,
    pub complete_ms: Option<i64>,
    pub expire_ms: i64,
}

/// A delivery taken for an attempt by [`OutboxStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedDelivery {
    pub delivery_id: String,
    pub method: String,
    pub request: Vec<u8>,
    /// Attempts including this one.
    pub attempts: u32,
    /// The `traceparent` of the span that queued it.
    pub traceparent: Option<String>,
    /// When the earliest attempt that may have reached the upstream without a clear answer
    /// started (UNIX ms): the next attempt checks the upstream's history from then on.
    pub verify_since_ms: Option<i64>,
    /// Who queued it, as [`NewDelivery::owner`] stored it; `None` for a delivery queued before
    /// deliveries had owners. The attempt runs on its owner's share of the upstream budget.
    pub owner: Option<String>,
}

/// Which deliveries a reader may see: `None` every delivery (an admin), `Some(owner)` that
/// owner's deliveries plus those queued before deliveries had owners (stored without one).
pub type OwnerFilter = Option<String>;

/// Which dead letters [`OutboxStore::dead_letters`] lists; every set condition must hold.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub method: Option<String>,
    /// A `cx.gateway.v1.Destination` number the delivery writes to.
    pub destination: Option<i32>,
    pub visible_to: OwnerFilter,
}

/// A page of dead letters.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterPage {
    pub deliveries: Vec<DeliveryRecord>,
    /// The position to continue after, if there is more.
    pub next_after: Option<i64>,
    /// Dead letters matching the filter in total.
    pub total: i64,
}

/// Which dead letters to requeue.
#[derive(Debug, Clone)]
pub enum RetrySelection {
    Ids(Vec<String>),
    All { method: Option<String> },
}

/// What [`OutboxStore::requeue_dead_letters`] did with one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeueOutcome {
    /// Pending again, with a fresh retry window.
    Requeued,
    /// Visible to the caller but not in the dead-letter list (pending, in flight, delivered).
    NotDeadLettered,
    /// No delivery with this id that the caller may see.
    NotFound,
}

/// How an attempt ended, as [`OutboxStore::record_attempt`] stores it.
#[derive(Debug, Clone)]
pub enum AttemptRecord {
    /// Delivered; `result` is the encoded response of the RPC.
    Delivered { result: Vec<u8> },
    /// Dead-lettered with `error`.
    DeadLetter { error: DeliveryError },
    /// Due again `delay` from now if that is still within the delivery's retry window. Otherwise
    /// dead-lettered: with `error` when nothing needs checking, with `unverified` when the
    /// delivery has (or gets here) a `verify_since_ms`, since an attempt may have applied it and
    /// the upstream's history was never checked.
    Retry {
        error: DeliveryError,
        delay: Duration,
        /// Kept at its earliest value: the history must be read from the first attempt that may
        /// have acted.
        verify_since_ms: Option<i64>,
        unverified: DeliveryError,
    },
}

/// What [`OutboxStore::recover`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Back to pending (replay-safe, or verifiable before sending again).
    pub requeued: usize,
    /// Dead-lettered as in doubt.
    pub in_doubt: usize,
}

/// How many deliveries wait and how many are dead letters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxDepth {
    /// Pending, in flight or waiting for a retry.
    pub unfinished: i64,
    pub dead_lettered: i64,
}

/// The durable outbox. Every method is one atomic operation: it is applied completely and
/// durably (committed to disk, or to the primary of a networked engine) before it returns `Ok`,
/// or not at all. "Now" is the engine's wall clock in UNIX milliseconds when the operation runs.
#[async_trait::async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Stores `queued` as pending and due now, with its ordering keys, and `remember` (the
    /// idempotency record of the call) in the same transaction: a crash never keeps one without
    /// the other. The queue order ([`OutboxStore::claim`]) is the order in which `enqueue`
    /// calls commit.
    async fn enqueue(
        &self,
        queued: QueuedDelivery,
        remember: Option<IdempotencyRecord>,
    ) -> Result<(), StoreError>;

    /// Claims up to `limit` deliveries, oldest first, that are pending or waiting for a retry,
    /// due (`next_attempt_ms <= now`), and whose ordering keys no older unfinished (pending,
    /// in-flight or retry-waiting) delivery shares. "Claimed" means: in flight, its attempt count
    /// raised by one and its `update_ms` set to now, durably, before this returns; a claimed
    /// delivery is not claimed again until [`OutboxStore::record_attempt`],
    /// [`OutboxStore::return_to_pending`] or [`OutboxStore::recover`] moves it out of flight.
    /// Writes to one customer thus reach the upstream in the order they were acknowledged.
    async fn claim(&self, limit: usize) -> Result<Vec<ClaimedDelivery>, StoreError>;

    /// Records how the attempt of a claimed delivery ended (see [`AttemptRecord`]); the retry
    /// window check and the update are one transaction.
    async fn record_attempt(
        &self,
        delivery_id: &str,
        record: AttemptRecord,
    ) -> Result<(), StoreError>;

    /// Puts a claimed delivery whose attempt was refused (a drain) back to pending, due now, with
    /// `error` as its last error; its attempt count stays.
    async fn return_to_pending(
        &self,
        delivery_id: &str,
        error: DeliveryError,
    ) -> Result<(), StoreError>;

    /// Recovery at start, before anything is claimed: every in-flight delivery was in flight
    /// when the last run stopped. In one transaction, replay-safe ones go back to pending (due
    /// now); non-replay-safe ones whose method is in `verifiable_methods` go back to pending with
    /// `verify_since_ms` kept or set to their claim time (`update_ms`); the others are
    /// dead-lettered with `in_doubt` as their last error.
    async fn recover(
        &self,
        verifiable_methods: &[String],
        in_doubt: DeliveryError,
    ) -> Result<Recovered, StoreError>;

    /// The delivery with this id, if `visible_to` lets the reader see it.
    async fn get(
        &self,
        delivery_id: &str,
        visible_to: OwnerFilter,
    ) -> Result<Option<DeliveryRecord>, StoreError>;

    /// Dead letters matching `filter` in the order they were acknowledged, after position
    /// `after` (0: from the start; otherwise a previous page's `next_after`), at most `limit`.
    /// The count and the page come from one snapshot.
    async fn dead_letters(
        &self,
        filter: DeadLetterFilter,
        after: i64,
        limit: usize,
    ) -> Result<DeadLetterPage, StoreError>;

    /// Requeues the selected dead letters `visible_to` lets the reader see, in one transaction:
    /// pending, due now, `replay_count` raised by one, a fresh retry window ending
    /// `retry_window` from now, no completion time. One outcome per selected id, in order
    /// (`All`: every matching dead letter in acknowledgement order).
    async fn requeue_dead_letters(
        &self,
        selection: RetrySelection,
        visible_to: OwnerFilter,
        retry_window: Duration,
    ) -> Result<Vec<(String, RequeueOutcome)>, StoreError>;

    /// Unfinished deliveries and dead letters, counted in one snapshot.
    async fn depth(&self) -> Result<OutboxDepth, StoreError>;

    /// When the oldest unfinished delivery was accepted (UNIX ms), if any.
    async fn oldest_unfinished_ms(&self) -> Result<Option<i64>, StoreError>;

    /// When the next pending or retry-waiting delivery becomes due (UNIX ms), if any.
    async fn next_due_ms(&self) -> Result<Option<i64>, StoreError>;

    /// Deletes deliveries delivered more than `delivered` ago and dead letters dead-lettered more
    /// than `dead_lettered` ago; returns how many.
    async fn prune(
        &self,
        delivered: Duration,
        dead_lettered: Duration,
    ) -> Result<usize, StoreError>;
}
