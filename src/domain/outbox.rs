//! The durable outbox of asynchronous writes and its delivery worker.
//!
//! A write acknowledged in ASYNC mode is a row here, committed (fsync) before the caller hears
//! back. The worker replays each delivery through an [`Executor`] (the same code path as a
//! synchronous call, at background priority), retries transient failures with full-jitter
//! backoff for the retry window, and then moves the delivery to the dead-letter list, from
//! which an operator can requeue it.
//!
//! Ordering: every delivery carries ordering keys (the customers it touches). A delivery starts
//! only when no older, unfinished delivery shares one of its keys, so writes to one customer reach
//! the upstream in the order they were acknowledged, while writes to different customers proceed
//! concurrently (and can be coalesced into batch calls by the scheduler).
//!
//! What a failed attempt means is decided in one place, from what the upstream can have done
//! ([`crate::upstream::failure::delivery_decision`]): a write the upstream surely did not apply
//! (429, 503, a connection never made) is retried for the whole retry window, whatever its kind.
//!
//! Crash safety: a delivery is marked in flight (durably) before it is sent. After a crash, an
//! in-flight delivery whose operation is idempotent is simply sent again. One whose operation is
//! not (an event that starts workflows, a survey invitation) may have been applied; if its
//! upstream keeps a history the gateway can read (Retently's sent surveys), its next attempt
//! checks that history first and sends only what is missing (`verify_since_ms`). Otherwise it is
//! in doubt and never sent twice: it moves to the dead-letter list with reason
//! `DELIVERY_IN_DOUBT`, where an operator who has checked the upstream can requeue it.
//!
//! Drains: when draining starts the worker claims nothing more and waits, up to the grace
//! period, for the deliveries it started; the upstream lanes stop sending background work, so a
//! delivery still waiting for its turn comes back refused and returns to pending, never to in
//! doubt. Only a delivery whose request is on the wire when the grace ends stays in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use rusqlite::{OptionalExtension as _, Row, params};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::backoff::{Backoff, FailureStreak, LogLimit};
use crate::domain::{Owner, Visibility};
use crate::error::Error;
use crate::readiness::Readiness;
use crate::shutdown::Drain;
use crate::store::Store;

/// Schema of the outbox; registered with the store's migrations.
pub const MIGRATION: (&str, &str) = (
    "0002_outbox",
    "CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        delivery_id TEXT NOT NULL UNIQUE,
        method TEXT NOT NULL,
        request BLOB NOT NULL,
        destinations TEXT NOT NULL,
        item_count INTEGER NOT NULL,
        idempotency_key TEXT,
        replay_safe INTEGER NOT NULL,
        state INTEGER NOT NULL,
        attempt_count INTEGER NOT NULL DEFAULT 0,
        replay_count INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        result BLOB,
        create_ms INTEGER NOT NULL,
        update_ms INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL,
        complete_ms INTEGER,
        expire_ms INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX outbox_by_state ON outbox (state, next_attempt_ms);
    CREATE TABLE outbox_keys (
        key TEXT NOT NULL,
        seq INTEGER NOT NULL REFERENCES outbox (seq) ON DELETE CASCADE,
        PRIMARY KEY (key, seq)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX outbox_keys_by_seq ON outbox_keys (seq);",
);

/// The W3C `traceparent` of the span that queued each delivery (NULL when traces were not
/// exported), so its delivery can link to the trace of the call that was acknowledged.
pub const TRACE_CONTEXT_MIGRATION: (&str, &str) = (
    "0011_outbox_traceparent",
    "ALTER TABLE outbox ADD COLUMN traceparent TEXT;",
);

/// When a delivery's earliest attempt that may have reached the upstream without a clear answer
/// started (UNIX ms), for writes whose upstream keeps a history to check (survey sends): the
/// next attempt first reads that history since then and sends only what is not in it. NULL when
/// there is nothing to check.
pub const VERIFY_MIGRATION: (&str, &str) = (
    "0014_outbox_verify_since",
    "ALTER TABLE outbox ADD COLUMN verify_since_ms INTEGER;",
);

/// Delivery states; the numbers are those of `cx.gateway.v1.DeliveryState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryState {
    Pending = 1,
    InFlight = 2,
    RetryWait = 3,
    Delivered = 4,
    DeadLettered = 5,
}

impl DeliveryState {
    fn from_i64(value: i64) -> DeliveryState {
        match value {
            2 => DeliveryState::InFlight,
            3 => DeliveryState::RetryWait,
            4 => DeliveryState::Delivered,
            5 => DeliveryState::DeadLettered,
            _ => DeliveryState::Pending,
        }
    }
}

/// Why an attempt failed, in the shape of `cx.gateway.v1.ItemError`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryError {
    pub code: i32,
    pub reason: String,
    pub message: String,
    pub metadata: HashMap<String, String>,
}

impl From<&Error> for DeliveryError {
    fn from(error: &Error) -> Self {
        DeliveryError {
            code: error.code().grpc_code() as i32,
            reason: error.reason().to_owned(),
            message: error.message().to_owned(),
            metadata: error.metadata().clone(),
        }
    }
}

/// A write to queue.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// The RPC it came from (`UpsertCustomers`), which tells the executor how to read `request`.
    pub method: String,
    /// The validated request, as the executor will replay it.
    pub request: Vec<u8>,
    /// `cx.gateway.v1.Destination` numbers it writes to.
    pub destinations: Vec<i32>,
    pub item_count: u32,
    /// The customers it touches; see the module doc on ordering.
    pub ordering_keys: Vec<String>,
    pub idempotency_key: Option<String>,
    /// Whether sending it twice is harmless (upserts, deletes) or not (events, survey sends).
    pub replay_safe: bool,
    /// Who queued it: only they (or an admin) see and requeue it.
    pub owner: Owner,
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
    pub next_attempt_ms: Option<i64>,
    pub complete_ms: Option<i64>,
    pub expire_ms: i64,
}

/// The outcome of one attempt.
#[derive(Debug, Clone)]
pub enum Attempt {
    /// Done; `result` is the encoded response of the RPC.
    Delivered { result: Vec<u8> },
    /// Failed in a way that may pass (unavailable, rate limited); try again later.
    Retry {
        error: DeliveryError,
        retry_after: Option<Duration>,
    },
    /// Failed for good (the upstream rejected the input); dead-letter it.
    Failed { error: DeliveryError },
    /// May have been applied, and sending it again could apply it twice with no way to check:
    /// dead-letter it as in doubt, `error` being the failure that left the doubt.
    InDoubt { error: DeliveryError },
    /// Some of it may have been applied by an attempt that started at `since_ms`; the upstream
    /// keeps a history, so the next attempt checks it and sends only the rest.
    Unresolved {
        error: DeliveryError,
        since_ms: i64,
        retry_after: Option<Duration>,
    },
}

impl Attempt {
    fn outcome(&self) -> &'static str {
        match self {
            Attempt::Delivered { .. } => "delivered",
            Attempt::Retry { .. } => "retry",
            Attempt::Failed { .. } => "failed",
            Attempt::InDoubt { .. } => "in_doubt",
            Attempt::Unresolved { .. } => "unresolved",
        }
    }

    fn error(&self) -> Option<&DeliveryError> {
        match self {
            Attempt::Delivered { .. } => None,
            Attempt::Retry { error, .. }
            | Attempt::Failed { error }
            | Attempt::InDoubt { error }
            | Attempt::Unresolved { error, .. } => Some(error),
        }
    }
}

/// The dead letter's error for a write that may have been applied: reason `DELIVERY_IN_DOUBT`,
/// saying what left the doubt (`cause`, plus the failure's own metadata).
pub fn in_doubt_error(cause: Option<&DeliveryError>, message: &str) -> DeliveryError {
    let mut metadata = HashMap::new();
    if let Some(cause) = cause {
        metadata.extend(cause.metadata.clone());
        metadata.insert("cause".to_owned(), cause.reason.clone());
    }
    DeliveryError {
        code: tonic::Code::Aborted as i32,
        reason: "DELIVERY_IN_DOUBT".to_owned(),
        message: message.to_owned(),
        metadata,
    }
}

const IN_DOUBT_AFTER_FAILURE: &str = "the upstream may have applied this write before it failed; \
    it was not sent again (requeue it once checked)";
const IN_DOUBT_UNVERIFIED: &str = "the upstream may have applied this write and its history \
    could not be checked within the retry window; it was not sent again (requeue it once checked)";

/// Replays queued writes. Implemented by the gRPC layer, which owns the request encoding.
#[tonic::async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Attempts the write once; `delivery_id` goes into the result the RPC reports. With
    /// `verify_since_ms`, an earlier attempt (or one cut by a stop) may have applied part of it
    /// from then on: the upstream's history is checked first (see [`Attempt::Unresolved`]).
    async fn execute(
        &self,
        method: &str,
        request: &[u8],
        delivery_id: &str,
        verify_since_ms: Option<i64>,
    ) -> Attempt;
}

#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// How long a delivery is retried before it is dead-lettered.
    pub retry_window: Duration,
    /// First retry delay; doubles per attempt up to `max_backoff`, with full jitter.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Deliveries executed at once; enough to let the scheduler fill batch calls.
    pub concurrency: usize,
    /// Delivered records are kept this long for GetDelivery, dead letters `dead_letter_retention`.
    pub delivered_retention: Duration,
    pub dead_letter_retention: Duration,
    /// How long a drain waits for the deliveries already started (the shutdown grace).
    pub drain_grace: Duration,
    /// Methods whose upstream keeps a history the executor checks before sending again, so an
    /// in-flight delivery found after a stop is verified rather than parked in doubt.
    pub verifiable_methods: Vec<String>,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            retry_window: Duration::from_secs(4 * 3600),
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            concurrency: 64,
            delivered_retention: Duration::from_secs(7 * 24 * 3600),
            dead_letter_retention: Duration::from_secs(30 * 24 * 3600),
            drain_grace: Duration::from_secs(20),
            verifiable_methods: Vec::new(),
        }
    }
}

/// A page of dead letters.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterPage {
    pub deliveries: Vec<DeliveryRecord>,
    /// The `seq` to continue after, if there is more.
    pub next_after: Option<i64>,
    pub total: i64,
}

/// Which dead letters to requeue.
#[derive(Debug, Clone)]
pub enum RetrySelection {
    Ids(Vec<String>),
    All { method: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryResult {
    pub delivery_id: String,
    pub requeued: bool,
    /// Why it was not requeued.
    pub error: Option<DeliveryError>,
}

#[derive(Clone)]
pub struct Outbox {
    store: Store,
    settings: Arc<OutboxSettings>,
    /// Wakes the worker when something was queued or requeued.
    wake: Arc<Notify>,
    /// Counts recorded attempt outcomes, so observers wait for progress instead of polling.
    outcomes: Arc<watch::Sender<u64>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A delivery taken for an attempt.
struct Claimed {
    delivery_id: String,
    method: String,
    request: Vec<u8>,
    /// Attempts including this one.
    attempts: u32,
    /// The `traceparent` of the span that queued it.
    traceparent: Option<String>,
    /// See [`VERIFY_MIGRATION`].
    verify_since_ms: Option<i64>,
}

/// A fresh delivery id: 128 random bits, so ids are unguessable and never collide in practice.
pub fn new_delivery_id() -> String {
    let bits: u128 = rand::rng().random();
    format!("dlv_{bits:032x}")
}

const SELECT_RECORD: &str =
    "SELECT delivery_id, method, state, destinations, item_count, idempotency_key,
    attempt_count, replay_count, last_error, result, create_ms, update_ms, next_attempt_ms,
    complete_ms, expire_ms FROM outbox";

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    let state = DeliveryState::from_i64(row.get(2)?);
    let destinations: String = row.get(3)?;
    let last_error: Option<String> = row.get(8)?;
    let next_attempt_ms: i64 = row.get(12)?;
    Ok(DeliveryRecord {
        delivery_id: row.get(0)?,
        method: row.get(1)?,
        state,
        destinations: destinations
            .split(',')
            .filter_map(|d| d.parse().ok())
            .collect(),
        item_count: row.get(4)?,
        idempotency_key: row.get(5)?,
        attempt_count: row.get(6)?,
        replay_count: row.get(7)?,
        last_error: last_error.and_then(|text| serde_json::from_str(&text).ok()),
        result: row.get(9)?,
        create_ms: row.get(10)?,
        update_ms: row.get(11)?,
        next_attempt_ms: matches!(state, DeliveryState::Pending | DeliveryState::RetryWait)
            .then_some(next_attempt_ms),
        complete_ms: row.get(13)?,
        expire_ms: row.get(14)?,
    })
}

/// Restricts a query to the deliveries an owner filter (parameter `?2`, NULL for every delivery)
/// lets a caller see: its own, and those queued before deliveries had owners.
const VISIBLE_TO_2: &str = "(?2 IS NULL OR owner = ?2 OR owner IS NULL)";

fn error_json(error: &DeliveryError) -> String {
    serde_json::to_string(error).unwrap_or_default()
}

impl Outbox {
    pub fn new(store: Store, settings: OutboxSettings) -> Outbox {
        Outbox {
            store,
            settings: Arc::new(settings),
            wake: Arc::new(Notify::new()),
            outcomes: Arc::new(watch::channel(0).0),
        }
    }

    /// Wakes the worker after deliveries were inserted with [`insert_delivery`].
    pub(crate) fn notify(&self) {
        self.wake.notify_one();
    }

    /// When a delivery queued now stops being retried (UNIX ms).
    pub(crate) fn expire_ms_from(&self, now_ms: i64) -> i64 {
        now_ms.saturating_add(millis(self.settings.retry_window))
    }

    /// Changes each time an attempt's outcome is recorded.
    pub fn outcomes(&self) -> watch::Receiver<u64> {
        self.outcomes.subscribe()
    }

    pub fn settings(&self) -> &OutboxSettings {
        &self.settings
    }

    /// Queues `delivery` and returns once it is durable. `also` runs in the same transaction (the
    /// idempotency record of the call), so a crash never keeps one without the other.
    pub async fn enqueue_with(
        &self,
        delivery_id: String,
        delivery: NewDelivery,
        also: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()> + Send + 'static,
    ) -> Result<String, Error> {
        let expire_ms = now_ms().saturating_add(millis(self.settings.retry_window));
        let id = delivery_id.clone();
        let method = delivery.method.clone();
        let span = tracing::info_span!(
            "outbox.enqueue",
            method = %method,
            items = delivery.item_count,
        );
        let traceparent = crate::telemetry::propagation::traceparent(&span);
        self.store
            .write(move |tx| {
                insert_delivery(
                    tx,
                    &id,
                    &delivery,
                    now_ms(),
                    expire_ms,
                    traceparent.as_deref(),
                )?;
                also(tx)
            })
            .instrument(span)
            .await?;
        crate::telemetry::metrics()
            .outbox_enqueued
            .add(1, &[opentelemetry::KeyValue::new("method", method)]);
        self.wake.notify_one();
        Ok(delivery_id)
    }

    pub async fn enqueue(&self, delivery: NewDelivery) -> Result<String, Error> {
        self.enqueue_with(new_delivery_id(), delivery, |_| Ok(()))
            .await
    }

    /// The delivery with this id, if `visibility` lets the caller see it.
    pub async fn get(
        &self,
        delivery_id: &str,
        visibility: &Visibility,
    ) -> Result<Option<DeliveryRecord>, Error> {
        let id = delivery_id.to_owned();
        let owner = visibility.owner_filter();
        self.store
            .read(move |c| {
                c.query_row(
                    &format!("{SELECT_RECORD} WHERE delivery_id = ?1 AND {VISIBLE_TO_2}"),
                    params![id, owner],
                    record_from_row,
                )
                .optional()
            })
            .await
    }

    /// Dead letters `visibility` lets the caller see, in the order they were acknowledged, after
    /// `after` (a `seq`).
    pub async fn dead_letters(
        &self,
        method: Option<String>,
        destination: Option<i32>,
        visibility: &Visibility,
        after: i64,
        limit: usize,
    ) -> Result<DeadLetterPage, Error> {
        let owner = visibility.owner_filter();
        self.store
            .read(move |c| {
                let filter = "state = ?1 AND (?2 IS NULL OR method = ?2)
                    AND (?3 IS NULL OR (',' || destinations || ',') LIKE ('%,' || ?3 || ',%'))
                    AND (?4 IS NULL OR owner = ?4 OR owner IS NULL)";
                let total: i64 = c.query_row(
                    &format!("SELECT COUNT(*) FROM outbox WHERE {filter}"),
                    params![DeliveryState::DeadLettered as i64, method, destination, owner],
                    |row| row.get(0),
                )?;
                let mut statement = c.prepare(&format!(
                    "SELECT seq, delivery_id FROM outbox WHERE {filter} AND seq > ?5 ORDER BY seq LIMIT ?6"
                ))?;
                let rows = statement
                    .query_map(
                        params![
                            DeliveryState::DeadLettered as i64,
                            method,
                            destination,
                            owner,
                            after,
                            i64::try_from(limit + 1).unwrap_or(i64::MAX)
                        ],
                        |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)),
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let more = rows.len() > limit;
                let mut deliveries = Vec::with_capacity(limit);
                let mut last_seq = None;
                for (seq, id) in rows.into_iter().take(limit) {
                    deliveries.push(c.query_row(
                        &format!("{SELECT_RECORD} WHERE delivery_id = ?1"),
                        [id],
                        record_from_row,
                    )?);
                    last_seq = Some(seq);
                }
                Ok(DeadLetterPage {
                    deliveries,
                    next_after: if more { last_seq } else { None },
                    total,
                })
            })
            .await
    }

    /// Requeues the dead letters `visibility` lets the caller see: a fresh retry window,
    /// attempts from now. An id the caller may not see is reported as not found, so ids of other
    /// callers' deliveries cannot be probed.
    pub async fn retry_dead_letters(
        &self,
        selection: RetrySelection,
        visibility: &Visibility,
    ) -> Result<Vec<RetryResult>, Error> {
        let window = millis(self.settings.retry_window);
        let owner = visibility.owner_filter();
        let results = self
            .store
            .write(move |tx| {
                let now = now_ms();
                let ids: Vec<String> = match selection {
                    RetrySelection::Ids(ids) => ids,
                    RetrySelection::All { method } => {
                        let mut statement = tx.prepare(
                            "SELECT delivery_id FROM outbox WHERE state = ?1
                             AND (?2 IS NULL OR method = ?2)
                             AND (?3 IS NULL OR owner = ?3 OR owner IS NULL) ORDER BY seq",
                        )?;
                        statement
                            .query_map(
                                params![DeliveryState::DeadLettered as i64, method, owner],
                                |row| row.get(0),
                            )?
                            .collect::<rusqlite::Result<Vec<String>>>()?
                    }
                };
                let mut results = Vec::with_capacity(ids.len());
                for id in ids {
                    let changed = tx.execute(
                        "UPDATE outbox SET state = ?1, replay_count = replay_count + 1,
                            next_attempt_ms = ?2, update_ms = ?2, expire_ms = ?3, complete_ms = NULL
                         WHERE delivery_id = ?4 AND state = ?5
                            AND (?6 IS NULL OR owner = ?6 OR owner IS NULL)",
                        params![
                            DeliveryState::Pending as i64,
                            now,
                            now.saturating_add(window),
                            id,
                            DeliveryState::DeadLettered as i64,
                            owner,
                        ],
                    )?;
                    let error = if changed == 1 {
                        None
                    } else {
                        let exists: bool = tx.query_row(
                            &format!(
                                "SELECT EXISTS (SELECT 1 FROM outbox
                                 WHERE delivery_id = ?1 AND {VISIBLE_TO_2})"
                            ),
                            params![&id, owner],
                            |row| row.get(0),
                        )?;
                        Some(if exists {
                            DeliveryError {
                                code: tonic::Code::FailedPrecondition as i32,
                                reason: "DELIVERY_NOT_DEAD_LETTERED".to_owned(),
                                message: "the delivery is not in the dead-letter list".to_owned(),
                                metadata: HashMap::new(),
                            }
                        } else {
                            DeliveryError {
                                code: tonic::Code::NotFound as i32,
                                reason: "DELIVERY_NOT_FOUND".to_owned(),
                                message: "no delivery has this id".to_owned(),
                                metadata: HashMap::new(),
                            }
                        })
                    };
                    results.push(RetryResult {
                        delivery_id: id,
                        requeued: changed == 1,
                        error,
                    });
                }
                Ok(results)
            })
            .await?;
        self.wake.notify_one();
        Ok(results)
    }

    /// Number of deliveries not finished yet, and of dead letters.
    pub async fn depth(&self) -> Result<(i64, i64), Error> {
        self.store
            .read(|c| {
                c.query_row(
                    "SELECT
                        COALESCE(SUM(state IN (1, 2, 3)), 0),
                        COALESCE(SUM(state = 5), 0)
                     FROM outbox",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
            })
            .await
    }

    /// When the oldest delivery not finished yet was accepted (milliseconds since the epoch), or
    /// `None` when nothing is waiting: its age is how far behind delivery runs, which the depth
    /// alone cannot tell (a deep queue that drains fast is healthy, one old entry is not).
    pub async fn oldest_pending_ms(&self) -> Result<Option<i64>, Error> {
        self.store
            .read(|c| {
                c.query_row(
                    "SELECT MIN(create_ms) FROM outbox WHERE state IN (1, 2, 3)",
                    [],
                    |row| row.get(0),
                )
            })
            .await
    }

    /// Puts deliveries that were in flight when the gateway stopped back in the queue, or in the
    /// dead-letter list when sending them again could duplicate them (see the module doc).
    pub async fn recover(&self) -> Result<(usize, usize), Error> {
        let in_doubt = error_json(&in_doubt_error(
            None,
            "the gateway stopped while this write was being sent; the upstream may have applied \
             it, so it was not sent again (requeue it once checked)",
        ));
        let verifiable = self.settings.verifiable_methods.clone();
        self.store
            .write(move |tx| {
                let now = now_ms();
                let mut requeued = tx.execute(
                    "UPDATE outbox SET state = ?1, next_attempt_ms = ?2, update_ms = ?2
                     WHERE state = ?3 AND replay_safe = 1",
                    params![
                        DeliveryState::Pending as i64,
                        now,
                        DeliveryState::InFlight as i64
                    ],
                )?;
                // Its attempt started at the claim (update_ms) at the latest: the next attempt
                // checks the upstream's history from the earliest moment it may have acted.
                for method in &verifiable {
                    requeued += tx.execute(
                        "UPDATE outbox SET state = ?1, next_attempt_ms = ?2, update_ms = ?2,
                            verify_since_ms = COALESCE(verify_since_ms, update_ms)
                         WHERE state = ?3 AND replay_safe = 0 AND method = ?4",
                        params![
                            DeliveryState::Pending as i64,
                            now,
                            DeliveryState::InFlight as i64,
                            method
                        ],
                    )?;
                }
                let in_doubt = tx.execute(
                    "UPDATE outbox SET state = ?1, last_error = ?2, update_ms = ?3, complete_ms = ?3
                     WHERE state = ?4 AND replay_safe = 0",
                    params![
                        DeliveryState::DeadLettered as i64,
                        in_doubt,
                        now,
                        DeliveryState::InFlight as i64
                    ],
                )?;
                Ok((requeued, in_doubt))
            })
            .await
    }

    /// Puts a delivery whose attempt was refused by a drain back in the queue, due at once: the
    /// next start sends it.
    async fn requeue(&self, delivery_id: String, error: DeliveryError) -> Result<(), Error> {
        self.store
            .write(move |tx| {
                let now = now_ms();
                tx.execute(
                    "UPDATE outbox SET state = ?1, last_error = ?2, update_ms = ?3,
                        next_attempt_ms = ?3 WHERE delivery_id = ?4",
                    params![
                        DeliveryState::Pending as i64,
                        error_json(&error),
                        now,
                        delivery_id
                    ],
                )?;
                Ok(())
            })
            .await
    }

    /// Claims up to `limit` deliveries that are due and not blocked by an older unfinished
    /// delivery for the same customer, marking them in flight (durably) before they are sent.
    async fn claim(&self, limit: usize) -> Result<Vec<Claimed>, Error> {
        self.store
            .write(move |tx| {
                let now = now_ms();
                let mut statement = tx.prepare_cached(
                    "SELECT d.seq, d.delivery_id, d.method, d.request, d.attempt_count,
                        d.traceparent, d.verify_since_ms FROM outbox d
                     WHERE d.state IN (1, 3) AND d.next_attempt_ms <= ?1
                       AND NOT EXISTS (
                         SELECT 1 FROM outbox_keys k
                         JOIN outbox_keys older ON older.key = k.key AND older.seq < k.seq
                         JOIN outbox o ON o.seq = older.seq AND o.state IN (1, 2, 3)
                         WHERE k.seq = d.seq)
                     ORDER BY d.seq LIMIT ?2",
                )?;
                let claimed = statement
                    .query_map(
                        params![now, i64::try_from(limit).unwrap_or(i64::MAX)],
                        |row| {
                            Ok((
                                row.get::<_, i64>(0)?,
                                Claimed {
                                    delivery_id: row.get(1)?,
                                    method: row.get(2)?,
                                    request: row.get(3)?,
                                    attempts: row.get::<_, u32>(4)? + 1,
                                    traceparent: row.get(5)?,
                                    verify_since_ms: row.get(6)?,
                                },
                            ))
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let mut mark = tx.prepare_cached(
                    "UPDATE outbox SET state = 2, attempt_count = attempt_count + 1, update_ms = ?1
                     WHERE seq = ?2",
                )?;
                for (seq, _) in &claimed {
                    mark.execute(params![now, seq])?;
                }
                Ok(claimed.into_iter().map(|(_, claimed)| claimed).collect())
            })
            .await
    }

    /// When the next delivery becomes due, if any is waiting.
    async fn next_due_ms(&self) -> Result<Option<i64>, Error> {
        self.store
            .read(|c| {
                c.query_row(
                    "SELECT MIN(next_attempt_ms) FROM outbox WHERE state IN (1, 3)",
                    [],
                    |row| row.get(0),
                )
            })
            .await
    }

    async fn complete(
        &self,
        delivery_id: String,
        attempts: u32,
        attempt: Attempt,
    ) -> Result<(), Error> {
        let settings = Arc::clone(&self.settings);
        self.store
            .write(move |tx| {
                let now = now_ms();
                match attempt {
                    Attempt::Delivered { result } => {
                        tx.execute(
                            "UPDATE outbox SET state = 4, result = ?1, update_ms = ?2, complete_ms = ?2
                             WHERE delivery_id = ?3",
                            params![result, now, delivery_id],
                        )?;
                    }
                    Attempt::Failed { error } => {
                        dead_letter(tx, &delivery_id, &error, now)?;
                    }
                    Attempt::InDoubt { error } => {
                        let error = in_doubt_error(Some(&error), IN_DOUBT_AFTER_FAILURE);
                        dead_letter(tx, &delivery_id, &error, now)?;
                    }
                    Attempt::Retry { error, retry_after } => {
                        let (expire_ms, verify_since_ms): (i64, Option<i64>) = tx.query_row(
                            "SELECT expire_ms, verify_since_ms FROM outbox WHERE delivery_id = ?1",
                            [&delivery_id],
                            |row| Ok((row.get(0)?, row.get(1)?)),
                        )?;
                        let next = now.saturating_add(millis(
                            retry_after
                                .unwrap_or_default()
                                .max(backoff(&settings, attempts)),
                        ));
                        if next <= expire_ms {
                            retry_later(tx, &delivery_id, &error, now, next, None)?;
                        } else if verify_since_ms.is_some() {
                            // An earlier attempt may have applied it and the history was never
                            // checked: that doubt outlives this attempt's plain failure.
                            let error = in_doubt_error(Some(&error), IN_DOUBT_UNVERIFIED);
                            dead_letter(tx, &delivery_id, &error, now)?;
                        } else {
                            dead_letter(tx, &delivery_id, &error, now)?;
                        }
                    }
                    Attempt::Unresolved {
                        error,
                        since_ms,
                        retry_after,
                    } => {
                        let expire_ms: i64 = tx.query_row(
                            "SELECT expire_ms FROM outbox WHERE delivery_id = ?1",
                            [&delivery_id],
                            |row| row.get(0),
                        )?;
                        let next = now.saturating_add(millis(
                            retry_after
                                .unwrap_or_default()
                                .max(backoff(&settings, attempts)),
                        ));
                        if next <= expire_ms {
                            retry_later(tx, &delivery_id, &error, now, next, Some(since_ms))?;
                        } else {
                            let error = in_doubt_error(Some(&error), IN_DOUBT_UNVERIFIED);
                            dead_letter(tx, &delivery_id, &error, now)?;
                        }
                    }
                }
                Ok(())
            })
            .await
    }

    /// Deletes finished deliveries past their retention.
    pub async fn prune(&self) -> Result<usize, Error> {
        let delivered = millis(self.settings.delivered_retention);
        let dead = millis(self.settings.dead_letter_retention);
        self.store
            .write(move |tx| {
                let now = now_ms();
                let pruned = tx.execute(
                    "DELETE FROM outbox WHERE (state = 4 AND complete_ms < ?1)
                        OR (state = 5 AND complete_ms < ?2)",
                    params![now.saturating_sub(delivered), now.saturating_sub(dead)],
                )?;
                Ok(pruned)
            })
            .await
    }

    /// Recovers the deliveries in flight at the last stop (see [`Outbox::recover`]), retrying
    /// with backoff until it succeeds, and marks `readiness` ready then. `false` when draining
    /// started first.
    ///
    /// No delivery may be claimed before this succeeds: recovery takes every in-flight delivery
    /// for one of the last run, so it would also take those this run had just claimed.
    async fn recover_until_done(&self, drain: &Drain, readiness: &Readiness) -> bool {
        let mut streak = FailureStreak::for_store();
        loop {
            match self.recover().await {
                Ok((requeued, in_doubt)) => {
                    if requeued > 0 || in_doubt > 0 {
                        tracing::warn!(
                            requeued,
                            in_doubt,
                            "recovered deliveries that were in flight at the last stop"
                        );
                    }
                    let failures = streak.succeeded();
                    if failures > 0 {
                        tracing::info!(failures, "in-flight deliveries recovered, now ready");
                    }
                    readiness.mark_ready();
                    return true;
                }
                Err(error) => {
                    let failure = streak.failed();
                    if let Some(suppressed) = failure.log {
                        tracing::error!(
                            %error,
                            failures = failure.failures,
                            suppressed,
                            retry_in_ms = failure.delay.as_millis(),
                            "cannot recover in-flight deliveries, not ready until this succeeds"
                        );
                    }
                    // After the line, so whoever sees the stage change finds the reason logged.
                    readiness.mark_retrying();
                    tokio::select! {
                        () = tokio::time::sleep(failure.delay) => {}
                        () = drain.clone().signaled() => return false,
                    }
                }
            }
        }
    }

    /// Delivers until `drain` fires: first recovers what was in flight at the last stop (and marks
    /// `readiness` once that succeeded), then claims due deliveries, runs up to `concurrency` of
    /// them at once, records each outcome, and sleeps until the next is due or something is queued.
    /// Store failures are retried with backoff (see [`crate::backoff`]), never in a tight loop.
    pub async fn run_worker(self, executor: Arc<dyn Executor>, drain: Drain, readiness: Readiness) {
        if !self.recover_until_done(&drain, &readiness).await {
            return;
        }
        let permits = Arc::new(Semaphore::new(self.settings.concurrency));
        // The attempts under way, so a drain can wait for them (and cut them at the grace).
        let mut started: JoinSet<()> = JoinSet::new();
        let mut last_prune = tokio::time::Instant::now();
        let mut claims = FailureStreak::for_store();
        let mut reads = FailureStreak::for_store();
        // Shared by every delivery task: on a full store they all fail to record their outcome
        // at once, and one line says so for all of them.
        let outcome_log = Arc::new(LogLimit::new(crate::backoff::LOG_EVERY));
        loop {
            while started.try_join_next().is_some() {}
            if drain.is_draining() {
                break;
            }
            let free = permits.available_permits();
            let claimed = if free == 0 {
                Vec::new()
            } else {
                match self.claim(free).await {
                    Ok(claimed) => {
                        let failures = claims.succeeded();
                        if failures > 0 {
                            tracing::info!(failures, "claiming deliveries works again");
                        }
                        claimed
                    }
                    Err(error) => {
                        let failure = claims.failed();
                        if let Some(suppressed) = failure.log {
                            tracing::error!(
                                %error,
                                failures = failure.failures,
                                suppressed,
                                retry_in_ms = failure.delay.as_millis(),
                                "cannot claim deliveries"
                            );
                        }
                        // A delivery queued meanwhile proves the store takes writes again.
                        tokio::select! {
                            () = self.wake.notified() => {}
                            () = tokio::time::sleep(failure.delay) => {}
                            () = drain.clone().signaled() => return,
                        }
                        continue;
                    }
                }
            };
            let claimed_any = !claimed.is_empty();
            for claimed in claimed {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    return;
                };
                let attempt = self.attempt(
                    Arc::clone(&executor),
                    claimed,
                    drain.clone(),
                    Arc::clone(&outcome_log),
                );
                started.spawn(async move {
                    attempt.await;
                    drop(permit);
                });
            }
            if last_prune.elapsed() > Duration::from_secs(600) {
                last_prune = tokio::time::Instant::now();
                if let Err(error) = self.prune().await {
                    tracing::warn!(%error, "cannot prune finished deliveries");
                }
            }
            if claimed_any {
                continue;
            }
            let wait = match self.next_due_ms().await {
                Ok(due) => {
                    reads.succeeded();
                    match due {
                        Some(due) => Duration::from_millis(
                            u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0),
                        )
                        .min(Duration::from_secs(1)),
                        None => Duration::from_secs(1),
                    }
                }
                Err(error) => {
                    let failure = reads.failed();
                    if let Some(suppressed) = failure.log {
                        tracing::error!(%error, failures = failure.failures, suppressed, "cannot read the outbox");
                    }
                    failure.delay.max(Duration::from_secs(1))
                }
            };
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = drain.clone().signaled() => break,
            }
        }
        self.finish_started(started).await;
    }

    /// Records an attempt's outcome, retrying with backoff while the store refuses: the attempt
    /// happened, and a delivery left in flight would be taken for in doubt at the next start.
    /// Gives up only when draining starts (the next start then recovers the delivery).
    async fn record_outcome(
        &self,
        delivery_id: String,
        attempts: u32,
        attempt: Attempt,
        log: &LogLimit,
        drain: &Drain,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let error = match self
                .complete(delivery_id.clone(), attempts, attempt.clone())
                .await
            {
                Ok(()) => return,
                Err(error) => error,
            };
            let delay = backoff.next_delay();
            if let Some(suppressed) = log.admit() {
                tracing::error!(
                    %error,
                    %delivery_id,
                    failures = backoff.failures(),
                    suppressed,
                    "cannot record a delivery outcome, retrying"
                );
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = drain.clone().signaled() => return,
            }
        }
    }

    /// The drain: waits up to the grace period for the attempts already started. Attempts the
    /// lanes refuse meanwhile (not sent) go back to pending as they return; one still running at
    /// the end of the grace has its request on the wire and stays in flight for the next start.
    async fn finish_started(&self, mut started: JoinSet<()>) {
        let running = started.len();
        if running == 0 {
            return;
        }
        let grace = self.settings.drain_grace;
        tracing::info!(running, grace = %humantime::format_duration(grace), "finishing deliveries under way");
        let finished = tokio::time::timeout(grace, async {
            while started.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                remaining = started.len(),
                "deliveries still waiting for the upstream when the grace ended"
            );
            started.abort_all();
        }
    }

    /// One attempt of a claimed delivery, traced, with its outcome recorded.
    fn attempt(
        &self,
        executor: Arc<dyn Executor>,
        claimed: Claimed,
        drain: Drain,
        outcome_log: Arc<LogLimit>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let Claimed {
            delivery_id,
            method,
            request,
            attempts,
            traceparent,
            verify_since_ms,
        } = claimed;
        let outbox = self.clone();
        // Each attempt is a trace of its own: the call that queued it has long returned.
        // It links to the span that queued it, so the two traces are one click apart.
        let span = tracing::info_span!(
            parent: None,
            "outbox.delivery",
            otel.kind = "consumer",
            method = %method,
            attempt = attempts,
            outcome = tracing::field::Empty,
        );
        if let Some(enqueued) = traceparent
            .as_deref()
            .and_then(crate::telemetry::propagation::parse_traceparent)
        {
            span.add_link(enqueued);
        }
        async move {
            let attempt = executor
                .execute(&method, &request, &delivery_id, verify_since_ms)
                .await;
            let outcome = attempt.outcome();
            tracing::Span::current().record("outcome", outcome);
            crate::telemetry::metrics().outbox_attempts.add(
                1,
                &[
                    opentelemetry::KeyValue::new("method", method.clone()),
                    opentelemetry::KeyValue::new("outcome", outcome),
                ],
            );
            if let Some(error) = attempt.error() {
                tracing::info!(%delivery_id, %method, attempts, reason = %error.reason, "delivery attempt failed");
            }
            match attempt {
                // Refused (or failed harmlessly) while draining: due again at the next start.
                Attempt::Retry { error, .. } if drain.is_draining() => {
                    if let Err(error) = outbox.requeue(delivery_id, error).await {
                        tracing::error!(%error, "cannot put a delivery back to pending");
                    }
                }
                attempt => {
                    outbox
                        .record_outcome(delivery_id, attempts, attempt, &outcome_log, &drain)
                        .await;
                }
            }
            outbox.outcomes.send_modify(|count| *count += 1);
            // A finished delivery may unblock the next one for the same customer.
            outbox.wake.notify_one();
        }
        .instrument(span)
    }
}

/// Inserts a pending delivery inside the caller's transaction, due at once: the one statement
/// every producer of deliveries shares ([`Outbox::enqueue_with`], and producers that must queue
/// several deliveries together with their own state, such as the alert evaluator). Wake the
/// worker with [`Outbox::notify`] once the transaction committed.
pub(crate) fn insert_delivery(
    tx: &rusqlite::Transaction<'_>,
    delivery_id: &str,
    delivery: &NewDelivery,
    now: i64,
    expire_ms: i64,
    traceparent: Option<&str>,
) -> rusqlite::Result<()> {
    let destinations = delivery
        .destinations
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    tx.execute(
        "INSERT INTO outbox (delivery_id, method, request, destinations, item_count,
            idempotency_key, replay_safe, state, create_ms, update_ms, next_attempt_ms,
            expire_ms, traceparent, owner)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?9, ?10, ?11, ?12)",
        params![
            delivery_id,
            delivery.method,
            delivery.request,
            destinations,
            delivery.item_count,
            delivery.idempotency_key,
            delivery.replay_safe,
            DeliveryState::Pending as i64,
            now,
            expire_ms,
            traceparent,
            delivery.owner.stored(),
        ],
    )?;
    let seq = tx.last_insert_rowid();
    let mut insert_key =
        tx.prepare_cached("INSERT OR IGNORE INTO outbox_keys (key, seq) VALUES (?1, ?2)")?;
    for key in &delivery.ordering_keys {
        insert_key.execute(params![key, seq])?;
    }
    Ok(())
}

fn dead_letter(
    tx: &rusqlite::Transaction<'_>,
    delivery_id: &str,
    error: &DeliveryError,
    now: i64,
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE outbox SET state = 5, last_error = ?1, update_ms = ?2, complete_ms = ?2
         WHERE delivery_id = ?3",
        params![error_json(error), now, delivery_id],
    )?;
    Ok(())
}

/// Schedules the next attempt at `next`; `verify_since_ms` is kept at its earliest value, since
/// the history must be read from the first attempt that may have acted.
fn retry_later(
    tx: &rusqlite::Transaction<'_>,
    delivery_id: &str,
    error: &DeliveryError,
    now: i64,
    next: i64,
    verify_since_ms: Option<i64>,
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE outbox SET state = 3, last_error = ?1, update_ms = ?2, next_attempt_ms = ?3,
            verify_since_ms = COALESCE(verify_since_ms, ?4)
         WHERE delivery_id = ?5",
        params![error_json(error), now, next, verify_since_ms, delivery_id],
    )?;
    Ok(())
}

/// Full-jitter exponential backoff: a uniform delay in `[0, min(max, base * 2^(attempts-1))]`,
/// at least one base step so a failing delivery never spins.
fn backoff(settings: &OutboxSettings, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(30);
    let ceiling = settings
        .base_backoff
        .saturating_mul(1_u32 << exponent)
        .min(settings.max_backoff);
    let jittered = rand::rng().random_range(0.0..=1.0) * ceiling.as_secs_f64();
    Duration::from_secs_f64(jittered).max(settings.base_backoff.min(ceiling))
}
