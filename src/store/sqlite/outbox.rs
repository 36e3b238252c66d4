//! The outbox in SQLite: `outbox` (one row per delivery, `seq` its acknowledgement order) and
//! `outbox_keys` (its ordering keys).

use std::time::Duration;

use rusqlite::{OptionalExtension as _, Row, Transaction, params};

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::idempotency::IdempotencyRecord;
use crate::store::outbox::{
    AttemptRecord, ClaimedDelivery, DeadLetterFilter, DeadLetterPage, DeliveryError,
    DeliveryRecord, DeliveryState, OutboxDepth, OutboxStore, OwnerFilter, QueuedDelivery,
    Recovered, RequeueOutcome, RetrySelection,
};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
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

fn dead_letter(
    tx: &Transaction<'_>,
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

/// Schedules the next attempt at `next`; `verify_since_ms` is kept at its earliest value.
fn retry_later(
    tx: &Transaction<'_>,
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

/// Inserts an idempotency record inside the caller's transaction.
pub(super) fn insert_idempotency(
    tx: &Transaction<'_>,
    record: &IdempotencyRecord,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO idempotency
            (owner, scope, key, request_hash, response, create_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            record.owner,
            record.scope,
            record.key,
            record.request_hash,
            record.response,
            now_ms()
        ],
    )?;
    Ok(())
}

/// Inserts a delivery, its ordering keys and the call's idempotency record inside the caller's
/// transaction.
pub(super) fn insert_delivery(
    tx: &Transaction<'_>,
    queued: &QueuedDelivery,
    remember: Option<&IdempotencyRecord>,
) -> rusqlite::Result<()> {
    let now = now_ms();
    let QueuedDelivery {
        delivery_id,
        delivery,
        expire_ms,
        traceparent,
    } = queued;
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
            delivery.owner,
        ],
    )?;
    let seq = tx.last_insert_rowid();
    let mut insert_key =
        tx.prepare_cached("INSERT OR IGNORE INTO outbox_keys (key, seq) VALUES (?1, ?2)")?;
    for key in &delivery.ordering_keys {
        insert_key.execute(params![key, seq])?;
    }
    if let Some(record) = remember {
        insert_idempotency(tx, record)?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl OutboxStore for SqliteStore {
    async fn enqueue(
        &self,
        queued: QueuedDelivery,
        remember: Option<IdempotencyRecord>,
    ) -> Result<(), StoreError> {
        self.write(move |tx| insert_delivery(tx, &queued, remember.as_ref()))
            .await
    }

    async fn claim(&self, limit: usize) -> Result<Vec<ClaimedDelivery>, StoreError> {
        self.write(move |tx| {
            let now = now_ms();
            let mut statement = tx.prepare_cached(
                "SELECT d.seq, d.delivery_id, d.method, d.request, d.attempt_count,
                    d.traceparent, d.verify_since_ms, d.owner FROM outbox d
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
                            ClaimedDelivery {
                                delivery_id: row.get(1)?,
                                method: row.get(2)?,
                                request: row.get(3)?,
                                attempts: row.get::<_, u32>(4)? + 1,
                                traceparent: row.get(5)?,
                                verify_since_ms: row.get(6)?,
                                owner: row.get(7)?,
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

    async fn record_attempt(
        &self,
        delivery_id: &str,
        record: AttemptRecord,
    ) -> Result<(), StoreError> {
        let delivery_id = delivery_id.to_owned();
        self.write(move |tx| {
            let now = now_ms();
            match record {
                AttemptRecord::Delivered { result } => {
                    tx.execute(
                        "UPDATE outbox SET state = 4, result = ?1, update_ms = ?2, complete_ms = ?2
                         WHERE delivery_id = ?3",
                        params![result, now, delivery_id],
                    )?;
                }
                AttemptRecord::DeadLetter { error } => {
                    dead_letter(tx, &delivery_id, &error, now)?;
                }
                AttemptRecord::Retry {
                    error,
                    delay,
                    verify_since_ms,
                    unverified,
                } => {
                    let (expire_ms, stored_since): (i64, Option<i64>) = tx.query_row(
                        "SELECT expire_ms, verify_since_ms FROM outbox WHERE delivery_id = ?1",
                        [&delivery_id],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )?;
                    let next = now.saturating_add(millis(delay));
                    if next <= expire_ms {
                        retry_later(tx, &delivery_id, &error, now, next, verify_since_ms)?;
                    } else if stored_since.or(verify_since_ms).is_some() {
                        dead_letter(tx, &delivery_id, &unverified, now)?;
                    } else {
                        dead_letter(tx, &delivery_id, &error, now)?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    async fn return_to_pending(
        &self,
        delivery_id: &str,
        error: DeliveryError,
    ) -> Result<(), StoreError> {
        let delivery_id = delivery_id.to_owned();
        self.write(move |tx| {
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

    async fn recover(
        &self,
        verifiable_methods: &[String],
        in_doubt: DeliveryError,
    ) -> Result<Recovered, StoreError> {
        let verifiable = verifiable_methods.to_vec();
        let in_doubt = error_json(&in_doubt);
        self.write(move |tx| {
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
            Ok(Recovered { requeued, in_doubt })
        })
        .await
    }

    async fn get(
        &self,
        delivery_id: &str,
        visible_to: OwnerFilter,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let id = delivery_id.to_owned();
        self.read(move |c| {
            c.query_row(
                &format!("{SELECT_RECORD} WHERE delivery_id = ?1 AND {VISIBLE_TO_2}"),
                params![id, visible_to],
                record_from_row,
            )
            .optional()
        })
        .await
    }

    async fn dead_letters(
        &self,
        filter: DeadLetterFilter,
        after: i64,
        limit: usize,
    ) -> Result<DeadLetterPage, StoreError> {
        let DeadLetterFilter {
            method,
            destination,
            visible_to,
        } = filter;
        self.read(move |c| {
            // One read transaction: the count and the page come from one snapshot.
            let c = c.unchecked_transaction()?;
            let filter = "state = ?1 AND (?2 IS NULL OR method = ?2)
                AND (?3 IS NULL OR (',' || destinations || ',') LIKE ('%,' || ?3 || ',%'))
                AND (?4 IS NULL OR owner = ?4 OR owner IS NULL)";
            let total: i64 = c.query_row(
                &format!("SELECT COUNT(*) FROM outbox WHERE {filter}"),
                params![
                    DeliveryState::DeadLettered as i64,
                    method,
                    destination,
                    visible_to
                ],
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
                        visible_to,
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

    async fn requeue_dead_letters(
        &self,
        selection: RetrySelection,
        visible_to: OwnerFilter,
        retry_window: Duration,
    ) -> Result<Vec<(String, RequeueOutcome)>, StoreError> {
        let window = millis(retry_window);
        self.write(move |tx| {
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
                            params![DeliveryState::DeadLettered as i64, method, visible_to],
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
                        visible_to,
                    ],
                )?;
                let outcome = if changed == 1 {
                    RequeueOutcome::Requeued
                } else {
                    let exists: bool = tx.query_row(
                        &format!(
                            "SELECT EXISTS (SELECT 1 FROM outbox
                             WHERE delivery_id = ?1 AND {VISIBLE_TO_2})"
                        ),
                        params![&id, visible_to],
                        |row| row.get(0),
                    )?;
                    if exists {
                        RequeueOutcome::NotDeadLettered
                    } else {
                        RequeueOutcome::NotFound
                    }
                };
                results.push((id, outcome));
            }
            Ok(results)
        })
        .await
    }

    async fn depth(&self) -> Result<OutboxDepth, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT
                    COALESCE(SUM(state IN (1, 2, 3)), 0),
                    COALESCE(SUM(state = 5), 0)
                 FROM outbox",
                [],
                |row| {
                    Ok(OutboxDepth {
                        unfinished: row.get(0)?,
                        dead_lettered: row.get(1)?,
                    })
                },
            )
        })
        .await
    }

    async fn oldest_unfinished_ms(&self) -> Result<Option<i64>, StoreError> {
        self.read_value("SELECT MIN(create_ms) FROM outbox WHERE state IN (1, 2, 3)")
            .await
    }

    async fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        self.read_value("SELECT MIN(next_attempt_ms) FROM outbox WHERE state IN (1, 3)")
            .await
    }

    async fn prune(
        &self,
        delivered: Duration,
        dead_lettered: Duration,
    ) -> Result<usize, StoreError> {
        let (delivered, dead) = (millis(delivered), millis(dead_lettered));
        self.write(move |tx| {
            let now = now_ms();
            tx.execute(
                "DELETE FROM outbox WHERE (state = 4 AND complete_ms < ?1)
                    OR (state = 5 AND complete_ms < ?2)",
                params![now.saturating_sub(delivered), now.saturating_sub(dead)],
            )
        })
        .await
    }
}
