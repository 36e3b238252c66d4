//! The outbox on PostgreSQL, shared by every replica.
//!
//! - Queue positions (`seq`) come from the one-row `outbox_head`, updated inside the enqueue
//!   transaction: its row lock makes positions follow commit order, which is the order in
//!   which writes were acknowledged, so per-customer ordering holds across replicas.
//! - A claim locks the due rows it takes with `FOR UPDATE SKIP LOCKED` (two replicas claiming at
//!   once take different rows and never wait on each other) and marks them in flight under a
//!   lease. A row another replica is claiming right now is skipped, but it still counts as an
//!   older unfinished delivery for its customer, so a younger one for the same customer is not
//!   taken in its place.
//! - A live replica renews the lease of its claims (every third of the lease, see
//!   [`PostgresStore::connect`]), so only a replica that died or lost the database lets them
//!   lapse. Its late outcome of a claim it no longer holds is not recorded: the delivery is
//!   another replica's by then.
//! - A replica that dies leaves its claims in flight; once their lease has run out, the next
//!   claim on any replica first takes them over with the recovery rules of [`OutboxStore::recover`]
//!   (replay-safe back to pending, verifiable ones pending with their history checked, the
//!   others dead-lettered as in doubt): a write that may have been applied is never sent again
//!   blindly. Those rules are the ones the last `recover` call passed.
//! - `recover` takes over the claims whose lease ran out and this replica's own (it recovers
//!   before it claims, so those can only be claims of a run that stopped), never the live
//!   claims of another replica: with several replicas, one starting up must not take the
//!   deliveries another is sending.

use std::sync::Mutex;
use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{PostgresStore, in_transaction, query_error};
use crate::store::StoreError;
use crate::store::idempotency::IdempotencyRecord;
use crate::store::outbox::{
    AttemptRecord, ClaimedDelivery, DeadLetterFilter, DeadLetterPage, DeliveryError,
    DeliveryRecord, DeliveryState, OutboxDepth, OutboxStore, OwnerFilter, QueuedDelivery,
    Recovered, RequeueOutcome, RetrySelection,
};

/// The rules a lapsed claim is taken over with (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct RecoveryRules {
    verifiable_methods: Vec<String>,
    in_doubt: String,
}

/// What one replica's outbox keeps in memory.
#[derive(Debug)]
pub(crate) struct OutboxState {
    /// Marks this replica's claims (`claimed_by`): the ones it renews, and the only ones whose
    /// outcome it may record.
    replica: String,
    /// The recovery rules last given to [`OutboxStore::recover`]; until then, lapsed claims
    /// stay as they are (a replica recovers before it claims, so it has them when it claims).
    rules: Mutex<Option<RecoveryRules>>,
    /// Queue positions of claims whose transaction failed after it marked them (see
    /// [`release_unheld_claims`]).
    unheld_claims: Mutex<Vec<i64>>,
}

impl Default for OutboxState {
    fn default() -> Self {
        OutboxState {
            replica: format!("replica-{:016x}", rand::random::<u64>()),
            rules: Mutex::default(),
            unheld_claims: Mutex::default(),
        }
    }
}

impl PostgresStore {
    /// Makes this replica's claims look like those of a claim whose commit was cut off: the
    /// worker never got them.
    #[cfg(test)]
    pub(crate) async fn lose_claims_for_test(&self) {
        let connection = self.connection("test").await.unwrap();
        let rows = connection
            .query(
                "SELECT seq FROM outbox WHERE state = $1 AND claimed_by = $2",
                &[&IN_FLIGHT, &self.outbox_state.replica],
            )
            .await
            .unwrap();
        self.outbox_state
            .unheld_claims
            .lock()
            .unwrap()
            .extend(rows.iter().map(|row| row.get::<_, i64>(0)));
    }

    /// Extends the lease of every delivery this replica holds in flight; returns how many.
    pub(crate) async fn renew_leases(&self) -> Result<u64, StoreError> {
        let connection = self.connection("renew claims").await?;
        let until = now_ms().saturating_add(millis(self.claim_lease));
        connection
            .execute(
                "UPDATE outbox SET lease_until_ms = $1 WHERE state = $2 AND claimed_by = $3",
                &[&until, &IN_FLIGHT, &self.outbox_state.replica],
            )
            .await
            .map_err(query_error("renew claims"))
    }
}

const PENDING: i16 = DeliveryState::Pending as i16;
const IN_FLIGHT: i16 = DeliveryState::InFlight as i16;
const RETRY_WAIT: i16 = DeliveryState::RetryWait as i16;
const DELIVERED: i16 = DeliveryState::Delivered as i16;
const DEAD_LETTERED: i16 = DeliveryState::DeadLettered as i16;

const SELECT_RECORD: &str = "SELECT delivery_id, method, state, destinations, item_count,
    idempotency_key, attempt_count, replay_count, last_error, result, create_ms, update_ms,
    next_attempt_ms, complete_ms, expire_ms FROM outbox";

/// Owner filter on `$n`: NULL sees everything; an owner sees their own deliveries and those
/// stored without an owner.
fn visible_to(parameter: usize) -> String {
    format!("(${parameter}::text IS NULL OR owner = ${parameter} OR owner IS NULL)")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn error_json(error: &DeliveryError) -> String {
    serde_json::to_string(error).unwrap_or_default()
}

/// A [`DeliveryRecord`] from the columns of [`SELECT_RECORD`], starting at column `first`.
fn record_from_row(row: &Row, first: usize) -> DeliveryRecord {
    let column = |offset: usize| first + offset;
    let state = DeliveryState::from_i64(i64::from(row.get::<_, i16>(column(2))));
    let last_error: Option<String> = row.get(column(8));
    let next_attempt_ms: i64 = row.get(column(12));
    DeliveryRecord {
        delivery_id: row.get(column(0)),
        method: row.get(column(1)),
        state,
        destinations: row.get(column(3)),
        item_count: u32::try_from(row.get::<_, i64>(column(4))).unwrap_or(u32::MAX),
        idempotency_key: row.get(column(5)),
        attempt_count: u32::try_from(row.get::<_, i32>(column(6))).unwrap_or_default(),
        replay_count: u32::try_from(row.get::<_, i32>(column(7))).unwrap_or_default(),
        last_error: last_error.and_then(|text| serde_json::from_str(&text).ok()),
        result: row.get(column(9)),
        create_ms: row.get(column(10)),
        update_ms: row.get(column(11)),
        next_attempt_ms: matches!(state, DeliveryState::Pending | DeliveryState::RetryWait)
            .then_some(next_attempt_ms),
        complete_ms: row.get(column(13)),
        expire_ms: row.get(column(14)),
    }
}

/// Stores one idempotency record inside a transaction, replacing the owner's earlier one.
pub(crate) async fn store_record(
    tx: &tokio_postgres::Transaction<'_>,
    record: &IdempotencyRecord,
    now: i64,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO idempotency (owner, scope, key, request_hash, response, create_ms)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (owner, scope, key) DO UPDATE SET request_hash = EXCLUDED.request_hash,
            response = EXCLUDED.response, create_ms = EXCLUDED.create_ms",
        &[
            &record.owner,
            &record.scope,
            &record.key,
            &record.request_hash,
            &record.response,
            &now,
        ],
    )
    .await
    .map_err(fail)?;
    Ok(())
}

/// Applies the recovery rules, inside `tx`, to the in-flight deliveries whose lease ran out by
/// `now`, and to those `own_claims` (this replica's id) marks, if given.
async fn take_over_lapsed(
    tx: &tokio_postgres::Transaction<'_>,
    rules: &RecoveryRules,
    now: i64,
    own_claims: Option<&str>,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<Recovered, StoreError> {
    // Locked with SKIP LOCKED: two replicas taking over at once split the rows instead of
    // waiting on (or deadlocking with) each other.
    let rows = tx
        .query(
            "WITH lapsed AS (
                SELECT seq FROM outbox WHERE state = $1
                    AND (lease_until_ms <= $2 OR claimed_by = $7)
                FOR UPDATE SKIP LOCKED)
             UPDATE outbox o SET
                state = CASE WHEN o.replay_safe OR o.method = ANY($3)
                    THEN $4::smallint ELSE $5::smallint END,
                next_attempt_ms = $2,
                update_ms = $2,
                lease_until_ms = NULL,
                claimed_by = NULL,
                verify_since_ms = CASE WHEN NOT o.replay_safe AND o.method = ANY($3)
                    THEN COALESCE(o.verify_since_ms, o.update_ms) ELSE o.verify_since_ms END,
                last_error = CASE WHEN o.replay_safe OR o.method = ANY($3)
                    THEN o.last_error ELSE $6::text END,
                complete_ms = CASE WHEN o.replay_safe OR o.method = ANY($3)
                    THEN o.complete_ms ELSE $2::bigint END
             FROM lapsed WHERE o.seq = lapsed.seq
             RETURNING o.state",
            &[
                &IN_FLIGHT,
                &now,
                &rules.verifiable_methods,
                &PENDING,
                &DEAD_LETTERED,
                &rules.in_doubt,
                &own_claims,
            ],
        )
        .await
        .map_err(fail)?;
    let in_doubt = rows
        .iter()
        .filter(|row| row.get::<_, i16>(0) == DEAD_LETTERED)
        .count();
    Ok(Recovered {
        requeued: rows.len() - in_doubt,
        in_doubt,
    })
}

/// Puts back to pending, inside `tx`, the deliveries at `seqs` that are still in flight under
/// `replica`'s mark. They are those of a claim whose transaction failed after marking them:
/// when the connection breaks during the commit, the commit may have happened with nobody told,
/// and the worker, which got an error, never attempts them. This replica would then renew their
/// lease for as long as it runs and they would never be delivered. Nothing was sent for them,
/// so pending (and the attempt not counted) is exact. Runs in the next claim's transaction,
/// before it selects: no claim of this replica succeeded in between, so no delivery at those
/// positions can be one this replica is attempting.
async fn release_unheld_claims(
    tx: &tokio_postgres::Transaction<'_>,
    seqs: &[i64],
    replica: &str,
    now: i64,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<u64, StoreError> {
    tx.execute(
        "UPDATE outbox SET state = $1, attempt_count = GREATEST(attempt_count - 1, 0),
            next_attempt_ms = $2, lease_until_ms = NULL, claimed_by = NULL
         WHERE seq = ANY($3) AND state = $4 AND claimed_by = $5",
        &[&PENDING, &now, &seqs, &IN_FLIGHT, &replica],
    )
    .await
    .map_err(fail)
}

/// Locks `delivery_id` if `replica` still holds its claim, and returns its retry window's end and
/// `verify_since_ms`. `None` when the claim lapsed and was taken over (the delivery is another
/// replica's now, or recovered): the caller then records nothing.
async fn lock_own_claim(
    tx: &tokio_postgres::Transaction<'_>,
    delivery_id: &str,
    replica: &str,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<Option<(i64, Option<i64>)>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT expire_ms, verify_since_ms FROM outbox
             WHERE delivery_id = $1 AND state = $2 AND claimed_by = $3 FOR UPDATE",
            &[&delivery_id, &IN_FLIGHT, &replica],
        )
        .await
        .map_err(fail)?;
    if row.is_none() {
        tracing::warn!(
            delivery_id,
            "the outcome of an attempt is not recorded: its claim lapsed and was taken over"
        );
    }
    Ok(row.map(|row| (row.get(0), row.get(1))))
}

/// Dead-letters `delivery_id` with `error`.
async fn dead_letter(
    tx: &tokio_postgres::Transaction<'_>,
    delivery_id: &str,
    error: &DeliveryError,
    now: i64,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE outbox SET state = $1, last_error = $2, update_ms = $3, complete_ms = $3,
            lease_until_ms = NULL, claimed_by = NULL
         WHERE delivery_id = $4",
        &[&DEAD_LETTERED, &error_json(error), &now, &delivery_id],
    )
    .await
    .map_err(fail)?;
    Ok(())
}

/// Queues one delivery (its position, row and ordering keys) inside a transaction: the one
/// insert of the outbox, shared by [`OutboxStore::enqueue`] and the alert store.
pub(crate) async fn insert_delivery(
    tx: &tokio_postgres::Transaction<'_>,
    queued: &QueuedDelivery,
    now: i64,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<(), StoreError> {
    // Position, delivery and ordering keys in one statement: the head row's lock, which
    // serializes enqueues, is held for this statement and the commit only.
    let delivery = &queued.delivery;
    tx.execute(
        "WITH head AS (
            UPDATE outbox_head SET seq = seq + 1 WHERE id = 1 RETURNING seq),
         queued AS (
            INSERT INTO outbox (seq, delivery_id, method, request, destinations,
                item_count, idempotency_key, replay_safe, owner, state, create_ms,
                update_ms, next_attempt_ms, expire_ms, traceparent)
            SELECT head.seq, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $10, $11, $12
            FROM head
            RETURNING seq)
         INSERT INTO outbox_keys (key, seq)
         SELECT DISTINCT keys.key, queued.seq
         FROM queued, unnest($13::text[]) AS keys (key)",
        &[
            &queued.delivery_id,
            &delivery.method,
            &delivery.request,
            &delivery.destinations,
            &i64::from(delivery.item_count),
            &delivery.idempotency_key,
            &delivery.replay_safe,
            &delivery.owner,
            &PENDING,
            &now,
            &queued.expire_ms,
            &queued.traceparent,
            &delivery.ordering_keys,
        ],
    )
    .await
    .map_err(fail)?;
    Ok(())
}

#[async_trait::async_trait]
impl OutboxStore for PostgresStore {
    async fn enqueue(
        &self,
        queued: QueuedDelivery,
        remember: Option<IdempotencyRecord>,
    ) -> Result<(), StoreError> {
        in_transaction!(self, "enqueue a delivery", |tx| {
            let fail = query_error("enqueue a delivery");
            let now = now_ms();
            // The record first: it needs no queue position, so it stays out of the time the
            // head row is locked.
            if let Some(record) = &remember {
                store_record(&tx, record, now, &fail).await?;
            }
            insert_delivery(&tx, &queued, now, &fail).await
        })
    }

    async fn claim(&self, limit: usize) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let rules = self
            .outbox_state
            .rules
            .lock()
            .map(|rules| rules.clone())
            .ok()
            .flatten();
        let unheld = self
            .outbox_state
            .unheld_claims
            .lock()
            .map(|unheld| unheld.clone())
            .unwrap_or_default();
        let lease = millis(self.claim_lease);
        // The positions this claim marked, kept if its transaction fails (see
        // `release_unheld_claims`).
        let mut marked: Vec<i64> = Vec::new();
        let claimed: Result<Vec<ClaimedDelivery>, StoreError> = async {
            in_transaction!(self, "claim deliveries", |tx| {
                let fail = query_error("claim deliveries");
                let now = now_ms();
                if !unheld.is_empty() {
                    let released =
                        release_unheld_claims(&tx, &unheld, &self.outbox_state.replica, now, &fail)
                            .await?;
                    if released > 0 {
                        tracing::warn!(
                            released,
                            "put back deliveries of a claim whose commit was cut off"
                        );
                    }
                }
                if let Some(rules) = &rules {
                    let recovered = take_over_lapsed(&tx, rules, now, None, &fail).await?;
                    if recovered != Recovered::default() {
                        tracing::warn!(
                            requeued = recovered.requeued,
                            in_doubt = recovered.in_doubt,
                            "took over deliveries whose claim lapsed (their replica stopped)"
                        );
                    }
                }
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows = tx
                    .query(
                        "SELECT d.seq, d.delivery_id, d.method, d.request, d.attempt_count,
                            d.traceparent, d.verify_since_ms, d.owner FROM outbox d
                         WHERE d.state IN ($1, $2) AND d.next_attempt_ms <= $3
                           AND NOT EXISTS (
                             SELECT 1 FROM outbox_keys k
                             JOIN outbox_keys older ON older.key = k.key AND older.seq < k.seq
                             JOIN outbox o ON o.seq = older.seq AND o.state IN ($1, $2, $4)
                             WHERE k.seq = d.seq)
                         ORDER BY d.seq LIMIT $5
                         FOR UPDATE OF d SKIP LOCKED",
                        &[&PENDING, &RETRY_WAIT, &now, &IN_FLIGHT, &limit],
                    )
                    .await
                    .map_err(&fail)?;
                let seqs: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
                if !seqs.is_empty() {
                    marked.clone_from(&seqs);
                    tx.execute(
                        "UPDATE outbox SET state = $1, attempt_count = attempt_count + 1,
                            update_ms = $2, lease_until_ms = $3, claimed_by = $4
                         WHERE seq = ANY($5)",
                        &[
                            &IN_FLIGHT,
                            &now,
                            &now.saturating_add(lease),
                            &self.outbox_state.replica,
                            &seqs,
                        ],
                    )
                    .await
                    .map_err(&fail)?;
                }
                Ok(rows
                    .iter()
                    .map(|row| ClaimedDelivery {
                        delivery_id: row.get(1),
                        method: row.get(2),
                        request: row.get(3),
                        attempts: u32::try_from(row.get::<_, i32>(4))
                            .unwrap_or_default()
                            .saturating_add(1),
                        traceparent: row.get(5),
                        verify_since_ms: row.get(6),
                        owner: row.get(7),
                    })
                    .collect())
            })
        }
        .await;
        if let Ok(mut unheld_now) = self.outbox_state.unheld_claims.lock() {
            match &claimed {
                // The release committed with this claim.
                Ok(_) => unheld_now.retain(|seq| !unheld.contains(seq)),
                // Whether it committed is unknown: released or not, marked or not, none of
                // these is a delivery the worker attempts.
                Err(_) => {
                    for seq in marked {
                        if !unheld_now.contains(&seq) {
                            unheld_now.push(seq);
                        }
                    }
                }
            }
        }
        claimed
    }

    async fn record_attempt(
        &self,
        delivery_id: &str,
        record: AttemptRecord,
    ) -> Result<(), StoreError> {
        in_transaction!(self, "record an attempt", |tx| {
            let fail = query_error("record an attempt");
            let now = now_ms();
            let Some((expire_ms, stored_since)) =
                lock_own_claim(&tx, delivery_id, &self.outbox_state.replica, &fail).await?
            else {
                return Ok(());
            };
            match record {
                AttemptRecord::Delivered { result } => {
                    tx.execute(
                        "UPDATE outbox SET state = $1, result = $2, update_ms = $3,
                            complete_ms = $3, lease_until_ms = NULL, claimed_by = NULL
                         WHERE delivery_id = $4",
                        &[&DELIVERED, &result, &now, &delivery_id],
                    )
                    .await
                    .map_err(&fail)?;
                }
                AttemptRecord::DeadLetter { error } => {
                    dead_letter(&tx, delivery_id, &error, now, &fail).await?;
                }
                AttemptRecord::Retry {
                    error,
                    delay,
                    verify_since_ms,
                    unverified,
                } => {
                    let since = match (stored_since, verify_since_ms) {
                        (Some(stored), Some(new)) => Some(stored.min(new)),
                        (stored, new) => stored.or(new),
                    };
                    let next = now.saturating_add(millis(delay));
                    if next <= expire_ms {
                        tx.execute(
                            "UPDATE outbox SET state = $1, last_error = $2, update_ms = $3,
                                next_attempt_ms = $4, verify_since_ms = $5, lease_until_ms = NULL,
                                claimed_by = NULL
                             WHERE delivery_id = $6",
                            &[
                                &RETRY_WAIT,
                                &error_json(&error),
                                &now,
                                &next,
                                &since,
                                &delivery_id,
                            ],
                        )
                        .await
                        .map_err(&fail)?;
                    } else if since.is_some() {
                        dead_letter(&tx, delivery_id, &unverified, now, &fail).await?;
                    } else {
                        dead_letter(&tx, delivery_id, &error, now, &fail).await?;
                    }
                }
            }
            Ok(())
        })
    }

    async fn return_to_pending(
        &self,
        delivery_id: &str,
        error: DeliveryError,
    ) -> Result<(), StoreError> {
        in_transaction!(self, "return a delivery to pending", |tx| {
            let fail = query_error("return a delivery to pending");
            let now = now_ms();
            if lock_own_claim(&tx, delivery_id, &self.outbox_state.replica, &fail)
                .await?
                .is_none()
            {
                return Ok(());
            }
            tx.execute(
                "UPDATE outbox SET state = $1, last_error = $2, update_ms = $3,
                    next_attempt_ms = $3, lease_until_ms = NULL, claimed_by = NULL
                 WHERE delivery_id = $4",
                &[&PENDING, &error_json(&error), &now, &delivery_id],
            )
            .await
            .map_err(&fail)?;
            Ok(())
        })
    }

    async fn recover(
        &self,
        verifiable_methods: &[String],
        in_doubt: DeliveryError,
    ) -> Result<Recovered, StoreError> {
        let rules = RecoveryRules {
            verifiable_methods: verifiable_methods.to_vec(),
            in_doubt: error_json(&in_doubt),
        };
        if let Ok(mut stored) = self.outbox_state.rules.lock() {
            *stored = Some(rules.clone());
        }
        in_transaction!(self, "recover in-flight deliveries", |tx| {
            let fail = query_error("recover in-flight deliveries");
            let own_claims = Some(self.outbox_state.replica.as_str());
            take_over_lapsed(&tx, &rules, now_ms(), own_claims, &fail).await
        })
    }

    async fn get(
        &self,
        delivery_id: &str,
        visible_to_owner: OwnerFilter,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let fail = query_error("read a delivery");
        let connection = self.connection("read a delivery").await?;
        let row = connection
            .query_opt(
                &format!(
                    "{SELECT_RECORD} WHERE delivery_id = $1 AND {}",
                    visible_to(2)
                ),
                &[&delivery_id, &visible_to_owner],
            )
            .await
            .map_err(fail)?;
        Ok(row.map(|row| record_from_row(&row, 0)))
    }

    async fn dead_letters(
        &self,
        filter: DeadLetterFilter,
        after: i64,
        limit: usize,
    ) -> Result<DeadLetterPage, StoreError> {
        // One snapshot for the count and the page.
        let mut connection = self.connection("list dead letters").await?;
        let fail = query_error("list dead letters");
        let tx = connection
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(&fail)?;
        let condition = format!(
            "state = $1 AND ($2::text IS NULL OR method = $2)
             AND ($3::integer IS NULL OR $3 = ANY(destinations)) AND {}",
            visible_to(4)
        );
        let base: [&(dyn ToSql + Sync); 4] = [
            &DEAD_LETTERED,
            &filter.method,
            &filter.destination,
            &filter.visible_to,
        ];
        let total: i64 = tx
            .query_one(
                &format!("SELECT COUNT(*) FROM outbox WHERE {condition}"),
                &base,
            )
            .await
            .map_err(&fail)?
            .get(0);
        let fetch = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let mut parameters = base.to_vec();
        parameters.push(&after);
        parameters.push(&fetch);
        let rows = tx
            .query(
                &format!(
                    "SELECT seq, delivery_id, method, state, destinations, item_count,
                        idempotency_key, attempt_count, replay_count, last_error, result,
                        create_ms, update_ms, next_attempt_ms, complete_ms, expire_ms
                     FROM outbox WHERE {condition} AND seq > $5 ORDER BY seq LIMIT $6"
                ),
                &parameters,
            )
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(&fail)?;
        let more = rows.len() > limit;
        let mut deliveries = Vec::with_capacity(limit.min(rows.len()));
        let mut last_seq = None;
        for row in rows.iter().take(limit) {
            last_seq = Some(row.get::<_, i64>(0));
            deliveries.push(record_from_row(row, 1));
        }
        Ok(DeadLetterPage {
            deliveries,
            next_after: if more { last_seq } else { None },
            total,
        })
    }

    async fn requeue_dead_letters(
        &self,
        selection: RetrySelection,
        visible_to_owner: OwnerFilter,
        retry_window: Duration,
    ) -> Result<Vec<(String, RequeueOutcome)>, StoreError> {
        let window = millis(retry_window);
        in_transaction!(self, "requeue dead letters", |tx| {
            let fail = query_error("requeue dead letters");
            let now = now_ms();
            let ids: Vec<String> = match selection {
                RetrySelection::Ids(ids) => ids,
                RetrySelection::All { method } => tx
                    .query(
                        &format!(
                            "SELECT delivery_id FROM outbox WHERE state = $1
                             AND ($2::text IS NULL OR method = $2) AND {} ORDER BY seq",
                            visible_to(3)
                        ),
                        &[&DEAD_LETTERED, &method, &visible_to_owner],
                    )
                    .await
                    .map_err(&fail)?
                    .iter()
                    .map(|row| row.get(0))
                    .collect(),
            };
            let mut outcomes = Vec::with_capacity(ids.len());
            for id in ids {
                let changed = tx
                    .execute(
                        &format!(
                            "UPDATE outbox SET state = $1, replay_count = replay_count + 1,
                                next_attempt_ms = $2, update_ms = $2, expire_ms = $3,
                                complete_ms = NULL
                             WHERE delivery_id = $4 AND state = $5 AND {}",
                            visible_to(6)
                        ),
                        &[
                            &PENDING,
                            &now,
                            &now.saturating_add(window),
                            &id,
                            &DEAD_LETTERED,
                            &visible_to_owner,
                        ],
                    )
                    .await
                    .map_err(&fail)?;
                let outcome = if changed == 1 {
                    RequeueOutcome::Requeued
                } else {
                    let exists: bool = tx
                        .query_one(
                            &format!(
                                "SELECT EXISTS (SELECT 1 FROM outbox
                                 WHERE delivery_id = $1 AND {})",
                                visible_to(2)
                            ),
                            &[&id, &visible_to_owner],
                        )
                        .await
                        .map_err(&fail)?
                        .get(0);
                    if exists {
                        RequeueOutcome::NotDeadLettered
                    } else {
                        RequeueOutcome::NotFound
                    }
                };
                outcomes.push((id, outcome));
            }
            Ok(outcomes)
        })
    }

    async fn depth(&self) -> Result<OutboxDepth, StoreError> {
        let connection = self.connection("count deliveries").await?;
        let row = connection
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE state IN ($1, $2, $3)),
                        COUNT(*) FILTER (WHERE state = $4)
                 FROM outbox",
                &[&PENDING, &IN_FLIGHT, &RETRY_WAIT, &DEAD_LETTERED],
            )
            .await
            .map_err(query_error("count deliveries"))?;
        Ok(OutboxDepth {
            unfinished: row.get(0),
            dead_lettered: row.get(1),
        })
    }

    async fn oldest_unfinished_ms(&self) -> Result<Option<i64>, StoreError> {
        let connection = self.connection("find the oldest delivery").await?;
        let row = connection
            .query_one(
                "SELECT MIN(create_ms) FROM outbox WHERE state IN ($1, $2, $3)",
                &[&PENDING, &IN_FLIGHT, &RETRY_WAIT],
            )
            .await
            .map_err(query_error("find the oldest delivery"))?;
        Ok(row.get(0))
    }

    async fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        let connection = self.connection("find the next due delivery").await?;
        let row = connection
            .query_one(
                "SELECT MIN(next_attempt_ms) FROM outbox WHERE state IN ($1, $2)",
                &[&PENDING, &RETRY_WAIT],
            )
            .await
            .map_err(query_error("find the next due delivery"))?;
        Ok(row.get(0))
    }

    async fn prune(
        &self,
        delivered: Duration,
        dead_lettered: Duration,
    ) -> Result<usize, StoreError> {
        let connection = self.connection("prune deliveries").await?;
        let now = now_ms();
        let pruned = connection
            .execute(
                "DELETE FROM outbox WHERE (state = $1 AND complete_ms < $2)
                    OR (state = $3 AND complete_ms < $4)",
                &[
                    &DELIVERED,
                    &now.saturating_sub(millis(delivered)),
                    &DEAD_LETTERED,
                    &now.saturating_sub(millis(dead_lettered)),
                ],
            )
            .await
            .map_err(query_error("prune deliveries"))?;
        Ok(usize::try_from(pruned).unwrap_or(usize::MAX))
    }
}
