//! The feedback log in SQLite. Three tables:
//! - `feedback_log`: the entries. Each row keeps the complete encoded `SubscribeResponse`
//!   (`message`), so replaying from the log and fanning out live send the very same bytes and
//!   nothing is encoded per subscriber, plus the few fields filters look at.
//! - `feedback_items`: the latest version of every known response (its digest for
//!   deduplication, its encoded `Feedback` and lookup columns for queries).
//! - `feedback_log_meta`: one row: the log's random epoch (part of every cursor), the head
//!   (last sequence and log time) and how far retention has pruned.
//!
//! Appends run in the one writer thread, so sequences are handed out in commit order.

use prost::bytes::Bytes;
use rusqlite::{Connection, OptionalExtension as _, params};

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::cursors::Checkpoint;
use crate::store::feedback_log::{
    AppendCounts, Appended, CustomerKey, EntryEncoder, EntryFields, EntryKind, FeedbackLogStore,
    FeedbackQuery, LogEntry, LogState, Observed, Origin, ReadOutcome, StoredFeedbackPage,
};
use crate::store::leases::{Fence, UnderLease};

fn read_state(connection: &Connection) -> rusqlite::Result<LogState> {
    connection.query_row(
        "SELECT epoch, head_seq, head_time_ms, pruned_seq, pruned_time_ms FROM feedback_log_meta",
        [],
        |row| {
            Ok(LogState {
                epoch: row.get::<_, i64>(0)?.unsigned_abs(),
                head_seq: row.get(1)?,
                head_time_ms: row.get(2)?,
                pruned_seq: row.get(3)?,
                pruned_time_ms: row.get(4)?,
            })
        },
    )
}

/// The highest sequence to delete in this round, if any.
fn prune_boundary(
    connection: &Connection,
    cutoff_ms: Option<i64>,
    max_entries: Option<u64>,
    chunk: u64,
) -> rusqlite::Result<Option<i64>> {
    let mut boundary: Option<i64> = None;
    if let Some(cutoff) = cutoff_ms {
        // Log times are ordered like sequences, so this is the end of a prefix.
        boundary = last_seq_before(connection, cutoff)?;
    }
    if let Some(max) = max_entries {
        let count: i64 =
            connection.query_row("SELECT COUNT(*) FROM feedback_log", [], |row| row.get(0))?;
        let excess = count.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX));
        if excess > 0 {
            let by_count: Option<i64> = nth_oldest(connection, excess)?;
            boundary = boundary.max(by_count);
        }
    }
    let Some(boundary) = boundary else {
        return Ok(None);
    };
    let chunk_end = nth_oldest(connection, i64::try_from(chunk.max(1)).unwrap_or(i64::MAX))?;
    Ok(Some(match chunk_end {
        Some(end) => boundary.min(end),
        None => boundary,
    }))
}

/// The sequence of the `n`-th oldest entry (1-based).
fn nth_oldest(connection: &Connection, n: i64) -> rusqlite::Result<Option<i64>> {
    connection
        .query_row(
            "SELECT seq FROM feedback_log ORDER BY seq LIMIT 1 OFFSET ?1",
            [n - 1],
            |row| row.get(0),
        )
        .optional()
}

/// Compares `batches` with what the log knows and appends the new and changed ones, all inside
/// the caller's transaction.
fn append(
    tx: &Connection,
    now_ms: i64,
    batches: &[(Origin, Vec<Observed>)],
    encode: EntryEncoder,
) -> rusqlite::Result<Appended> {
    let state = read_state(tx)?;
    let mut head_seq = state.head_seq;
    let mut head_time = state.head_time_ms;
    let mut entries = Vec::new();
    let mut counts = Vec::with_capacity(batches.len());
    let mut known =
        tx.prepare_cached("SELECT digest FROM feedback_items WHERE feedback_id = ?1")?;
    let mut insert_entry = tx.prepare_cached(
        "INSERT INTO feedback_log (seq, feedback_id, kind, log_time_ms, campaign_id, metric,
                                   score, score_category, has_comment, message, traceparent)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    let mut upsert_item = tx.prepare_cached(
        "INSERT INTO feedback_items (feedback_id, digest, last_seq, create_time_ms, campaign_id,
                                     customer_id, email, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (feedback_id) DO UPDATE SET
             digest = excluded.digest, last_seq = excluded.last_seq,
             create_time_ms = excluded.create_time_ms, campaign_id = excluded.campaign_id,
             customer_id = excluded.customer_id, email = excluded.email,
             payload = excluded.payload",
    )?;
    for (origin, observations) in batches {
        let mut batch = AppendCounts::default();
        for observed in observations {
            let digest: Option<Vec<u8>> = known
                .query_row([&observed.feedback_id], |row| row.get(0))
                .optional()?;
            let kind = match digest {
                None => EntryKind::Created,
                Some(digest) if digest == observed.digest => {
                    batch.unchanged += 1;
                    continue;
                }
                Some(_) if *origin == Origin::Webhook => {
                    batch.ignored += 1;
                    continue;
                }
                Some(_) => EntryKind::Updated,
            };
            head_seq += 1;
            head_time = head_time.max(now_ms);
            let message = encode(state.epoch, head_seq, kind, head_time, &observed.payload);
            let fields = &observed.fields;
            insert_entry.execute(params![
                head_seq,
                observed.feedback_id,
                kind.number(),
                head_time,
                fields.campaign_id,
                fields.metric,
                fields.score,
                fields.score_category,
                fields.has_comment,
                message.as_ref(),
                observed.traceparent,
            ])?;
            upsert_item.execute(params![
                observed.feedback_id,
                observed.digest.as_slice(),
                head_seq,
                observed.create_time_ms,
                fields.campaign_id,
                observed.customer_id,
                observed.email,
                observed.payload,
            ])?;
            match kind {
                EntryKind::Updated => batch.updated += 1,
                EntryKind::Created => batch.created += 1,
            }
            entries.push(LogEntry {
                sequence: head_seq,
                log_time_ms: head_time,
                fields: fields.clone(),
                message,
                traceparent: observed.traceparent.clone(),
            });
        }
        counts.push(batch);
    }
    if head_seq != state.head_seq {
        tx.execute(
            "UPDATE feedback_log_meta SET head_seq = ?1, head_time_ms = ?2",
            [head_seq, head_time],
        )?;
    }
    Ok(Appended { entries, counts })
}

fn run_query(
    connection: &Connection,
    query: &FeedbackQuery,
) -> rusqlite::Result<StoredFeedbackPage> {
    let mut conditions: Vec<&str> = Vec::new();
    let mut values: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(campaign) = &query.campaign_id {
        conditions.push("campaign_id = ?");
        values.push(campaign.clone().into());
    }
    if let Some(customer) = &query.retently_customer_id {
        conditions.push("customer_id = ?");
        values.push(customer.clone().into());
    }
    if let Some(email) = &query.email {
        conditions.push("email = ?");
        values.push(email.clone().into());
    }
    if let Some(from) = query.created_from_ms {
        conditions.push("create_time_ms >= ?");
        values.push(from.into());
    }
    if let Some(before) = query.created_before_ms {
        conditions.push("create_time_ms < ?");
        values.push(before.into());
    }
    let filter = if conditions.is_empty() {
        String::from("1")
    } else {
        conditions.join(" AND ")
    };
    let total: i64 = connection.query_row(
        &format!("SELECT COUNT(*) FROM feedback_items WHERE {filter}"),
        rusqlite::params_from_iter(values.iter()),
        |row| row.get(0),
    )?;
    let (order, keyset) = if query.newest_first {
        (
            "create_time_ms DESC, feedback_id DESC",
            "(create_time_ms, feedback_id) < (?, ?)",
        )
    } else {
        (
            "create_time_ms ASC, feedback_id ASC",
            "(create_time_ms, feedback_id) > (?, ?)",
        )
    };
    let mut page_filter = filter;
    if let Some((time, id)) = &query.after {
        page_filter = format!("{page_filter} AND {keyset}");
        values.push((*time).into());
        values.push(id.clone().into());
    }
    let limit = query.limit.max(1);
    values.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
    values.push(i64::try_from(query.offset).unwrap_or(i64::MAX).into());
    let mut statement = connection.prepare(&format!(
        "SELECT create_time_ms, feedback_id, payload FROM feedback_items
         WHERE {page_filter} ORDER BY {order} LIMIT ? OFFSET ?"
    ))?;
    let rows: Vec<(i64, String, Vec<u8>)> = statement
        .query_map(rusqlite::params_from_iter(values.iter()), |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let full = rows.len() == limit;
    let mut payloads = Vec::with_capacity(rows.len());
    let mut next = None;
    for (time, id, payload) in rows {
        payloads.push(payload);
        next = Some((time, id));
    }
    Ok(StoredFeedbackPage {
        payloads,
        total,
        next: if full { next } else { None },
    })
}

#[async_trait::async_trait]
impl FeedbackLogStore for SqliteStore {
    async fn state(&self) -> Result<LogState, StoreError> {
        self.read(read_state).await
    }

    async fn append(
        &self,
        now_ms: i64,
        batches: Vec<(Origin, Vec<Observed>)>,
        checkpoints: Vec<Checkpoint>,
        encode: EntryEncoder,
    ) -> Result<Appended, StoreError> {
        self.write(move |tx| {
            let appended = append(tx, now_ms, &batches, encode)?;
            for checkpoint in &checkpoints {
                super::cursors::put(tx, checkpoint)?;
            }
            Ok(appended)
        })
        .await
    }

    async fn append_fenced(
        &self,
        fence: &Fence,
        now_ms: i64,
        batches: Vec<(Origin, Vec<Observed>)>,
        checkpoints: Vec<Checkpoint>,
        encode: EntryEncoder,
    ) -> Result<UnderLease<Appended>, StoreError> {
        // Every lease of the embedded store keeps one epoch forever (see `leases`): a fence of
        // another one was never granted here.
        if fence.epoch != super::leases::EMBEDDED_EPOCH {
            return Ok(UnderLease::LeaseLost);
        }
        let appended = self.append(now_ms, batches, checkpoints, encode).await?;
        Ok(UnderLease::Done(appended))
    }

    async fn read_after(
        &self,
        after: i64,
        up_to: i64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<ReadOutcome, StoreError> {
        self.read(move |connection| {
            // One read transaction: the pruning check and the rows come from one snapshot.
            let tx = connection.unchecked_transaction()?;
            let state = read_state(&tx)?;
            if state.pruned_seq > after {
                return Ok(ReadOutcome::Expired);
            }
            let mut statement = tx.prepare_cached(
                "SELECT seq, log_time_ms, campaign_id, metric, score, score_category,
                        has_comment, message, traceparent
                 FROM feedback_log WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
            )?;
            let limit = i64::try_from(max_entries).unwrap_or(i64::MAX);
            let mut rows = statement.query(params![after, up_to, limit])?;
            let mut entries = Vec::new();
            let mut bytes = 0usize;
            while let Some(row) = rows.next()? {
                let message: Vec<u8> = row.get(7)?;
                bytes += message.len();
                entries.push(LogEntry {
                    sequence: row.get(0)?,
                    log_time_ms: row.get(1)?,
                    fields: EntryFields {
                        campaign_id: row.get(2)?,
                        metric: row.get(3)?,
                        score: row.get(4)?,
                        score_category: row.get(5)?,
                        has_comment: row.get(6)?,
                    },
                    message: Bytes::from(message),
                    traceparent: row.get(8)?,
                });
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok(ReadOutcome::Entries(entries))
        })
        .await
    }

    async fn position_before(&self, time_ms: i64) -> Result<(i64, bool), StoreError> {
        self.read(move |connection| {
            let tx = connection.unchecked_transaction()?;
            let state = read_state(&tx)?;
            let expired = state.pruned_seq > 0 && state.pruned_time_ms >= time_ms;
            let before = last_seq_before(&tx, time_ms)?;
            Ok((before.unwrap_or(state.pruned_seq), expired))
        })
        .await
    }

    async fn oldest(&self) -> Result<Option<(i64, i64)>, StoreError> {
        self.read(|connection| {
            connection
                .query_row(
                    "SELECT seq, log_time_ms FROM feedback_log ORDER BY seq LIMIT 1",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
        })
        .await
    }

    async fn prune_chunk(
        &self,
        cutoff_ms: Option<i64>,
        max_entries: Option<u64>,
        chunk: u64,
    ) -> Result<u64, StoreError> {
        // Found on a read connection first, so a round with nothing to delete never waits for
        // the writer; the write below deletes only up to an entry that still exists.
        let boundary = self
            .read(move |connection| prune_boundary(connection, cutoff_ms, max_entries, chunk))
            .await?;
        let Some(boundary) = boundary else {
            return Ok(0);
        };
        self.write(move |tx| {
            let last: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT seq, log_time_ms FROM feedback_log WHERE seq <= ?1
                     ORDER BY seq DESC LIMIT 1",
                    [boundary],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let Some((seq, time)) = last else {
                return Ok(0u64);
            };
            let deleted = tx.execute("DELETE FROM feedback_log WHERE seq <= ?1", [seq])?;
            tx.execute(
                "UPDATE feedback_log_meta
                 SET pruned_seq = max(pruned_seq, ?1),
                     pruned_time_ms = max(pruned_time_ms, ?2)",
                [seq, time],
            )?;
            if let Some(cutoff) = cutoff_ms {
                let forgotten = tx.execute(
                    "DELETE FROM feedback_items WHERE create_time_ms < ?1
                     AND last_seq <= (SELECT pruned_seq FROM feedback_log_meta)",
                    [cutoff],
                )?;
                if forgotten > 0 {
                    tx.execute(
                        "UPDATE feedback_log_meta
                         SET items_horizon_ms = max(items_horizon_ms, ?1)",
                        [cutoff],
                    )?;
                }
            }
            Ok(deleted as u64)
        })
        .await
    }

    async fn items_horizon_ms(&self) -> Result<i64, StoreError> {
        self.read(|connection| {
            connection.query_row(
                "SELECT items_horizon_ms FROM feedback_log_meta",
                [],
                |row| row.get(0),
            )
        })
        .await
    }

    async fn customer_responses(&self, customer: CustomerKey) -> Result<Vec<Vec<u8>>, StoreError> {
        self.read(move |connection| {
            let (column, value) = match &customer {
                CustomerKey::Email(email) => ("email", email.as_str()),
                CustomerKey::RetentlyId(id) => ("customer_id", id.as_str()),
            };
            let mut statement = connection.prepare_cached(&format!(
                "SELECT payload FROM feedback_items WHERE {column} = ?1
                 ORDER BY create_time_ms DESC, feedback_id DESC"
            ))?;
            statement
                .query_map([value], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()
        })
        .await
    }

    async fn query(&self, query: FeedbackQuery) -> Result<StoredFeedbackPage, StoreError> {
        self.read(move |connection| run_query(connection, &query))
            .await
    }
}

/// The last entry logged before `time_ms`. Log times are ordered like sequences, so everything
/// up to it is a prefix of the log.
fn last_seq_before(connection: &Connection, time_ms: i64) -> rusqlite::Result<Option<i64>> {
    connection
        .query_row(
            "SELECT seq FROM feedback_log WHERE log_time_ms < ?1
             ORDER BY log_time_ms DESC, seq DESC LIMIT 1",
            [time_ms],
            |row| row.get(0),
        )
        .optional()
}
