//! The feedback log on PostgreSQL, one log for every replica. The tables are those of the
//! embedded engine: `feedback_log` (entries), `feedback_items` (the latest version of every
//! response) and the one-row `feedback_log_meta` (epoch, head, pruned bounds).
//!
//! Sequence numbers are not a `bigserial`: sequence values are handed out when a transaction
//! asks, not when it commits, so a reader could see 8 committed, move its cursor past 7, and
//! miss 7 when it commits later. An append instead locks the meta row first (`FOR UPDATE`),
//! takes its sequences from the head there and moves the head in the same transaction: appends
//! serialize on that row, so sequences become visible in order and without gaps. The lock also
//! makes deduplication exact across replicas: an append compares with the latest versions only
//! after the previous append committed (each statement of a read-committed transaction sees
//! what committed before it started).

use std::collections::HashMap;

use prost::bytes::Bytes;
use tokio_postgres::types::ToSql;

use super::{PostgresStore, in_transaction, query_error};
use crate::store::StoreError;
use crate::store::cursors::Checkpoint;
use crate::store::feedback_log::{
    AppendCounts, Appended, CustomerKey, EntryEncoder, EntryFields, EntryKind, FeedbackLogStore,
    FeedbackQuery, LogEntry, LogState, Observed, Origin, ReadOutcome, StoredFeedbackPage,
};
use crate::store::leases::{Fence, UnderLease};

const READ_STATE: &str =
    "SELECT epoch, head_seq, head_time_ms, pruned_seq, pruned_time_ms FROM feedback_log_meta";

fn state_from_row(row: &tokio_postgres::Row) -> LogState {
    LogState {
        epoch: row.get::<_, i64>(0).unsigned_abs(),
        head_seq: row.get(1),
        head_time_ms: row.get(2),
        pruned_seq: row.get(3),
        pruned_time_ms: row.get(4),
    }
}

/// A read-only transaction over one snapshot.
async fn snapshot<'a>(
    connection: &'a mut deadpool_postgres::Object,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<deadpool_postgres::Transaction<'a>, StoreError> {
    connection
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(fail)
}

/// The entries an append adds, column by column, for one multi-row insert.
#[derive(Default)]
struct NewEntries {
    seq: Vec<i64>,
    feedback_id: Vec<String>,
    kind: Vec<i32>,
    log_time_ms: Vec<i64>,
    campaign_id: Vec<String>,
    metric: Vec<i32>,
    score: Vec<Option<f64>>,
    score_category: Vec<i32>,
    has_comment: Vec<bool>,
    message: Vec<Vec<u8>>,
    traceparent: Vec<Option<String>>,
}

/// The latest version of one response after an append.
struct NewItem<'a> {
    observed: &'a Observed,
    last_seq: i64,
}

/// The `NOTIFY` channel of appends: a wake-up for the replicas that tail the log.
const APPENDS_CHANNEL: &str = "cxgw_feedback_appends";

/// The append itself, inside the caller's transaction (see [`FeedbackLogStore::append`]).
async fn append_in(
    tx: &tokio_postgres::Transaction<'_>,
    now_ms: i64,
    batches: &[(Origin, Vec<Observed>)],
    checkpoints: &[Checkpoint],
    encode: EntryEncoder,
) -> Result<Appended, StoreError> {
    let fail = query_error("append to the feedback log");
    // The lock that serializes appends (see the module doc).
    let state = state_from_row(
        &tx.query_one(&format!("{READ_STATE} FOR UPDATE"), &[])
            .await
            .map_err(&fail)?,
    );
    let ids: Vec<&str> = batches
        .iter()
        .flat_map(|(_, observations)| observations.iter())
        .map(|observed| observed.feedback_id.as_str())
        .collect();
    let mut known: HashMap<String, Vec<u8>> = tx
        .query(
            "SELECT feedback_id, digest FROM feedback_items WHERE feedback_id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(&fail)?
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut head_seq = state.head_seq;
    let mut head_time = state.head_time_ms;
    let mut new = NewEntries::default();
    let mut items: HashMap<&str, NewItem<'_>> = HashMap::new();
    let mut entries = Vec::new();
    let mut counts = Vec::with_capacity(batches.len());
    for (origin, observations) in batches {
        let mut batch = AppendCounts::default();
        for observed in observations {
            let kind = match known.get(&observed.feedback_id) {
                None => EntryKind::Created,
                Some(digest) if digest.as_slice() == observed.digest.as_slice() => {
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
            new.seq.push(head_seq);
            new.feedback_id.push(observed.feedback_id.clone());
            new.kind.push(kind.number());
            new.log_time_ms.push(head_time);
            new.campaign_id.push(fields.campaign_id.clone());
            new.metric.push(fields.metric);
            new.score.push(fields.score);
            new.score_category.push(fields.score_category);
            new.has_comment.push(fields.has_comment);
            new.message.push(message.to_vec());
            new.traceparent.push(observed.traceparent.clone());
            known.insert(observed.feedback_id.clone(), observed.digest.to_vec());
            items.insert(
                &observed.feedback_id,
                NewItem {
                    observed,
                    last_seq: head_seq,
                },
            );
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
    if !new.seq.is_empty() {
        tx.execute(
            "INSERT INTO feedback_log (seq, feedback_id, kind, log_time_ms, campaign_id,
                    metric, score, score_category, has_comment, message, traceparent)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::integer[],
                    $4::bigint[], $5::text[], $6::integer[], $7::double precision[],
                    $8::integer[], $9::boolean[], $10::bytea[], $11::text[])",
            &[
                &new.seq,
                &new.feedback_id,
                &new.kind,
                &new.log_time_ms,
                &new.campaign_id,
                &new.metric,
                &new.score,
                &new.score_category,
                &new.has_comment,
                &new.message,
                &new.traceparent,
            ],
        )
        .await
        .map_err(&fail)?;
        // One row per response: a response seen twice in one append keeps its last
        // version (an upsert may not touch one row twice).
        let mut item_ids = Vec::with_capacity(items.len());
        let mut digests = Vec::with_capacity(items.len());
        let mut last_seqs = Vec::with_capacity(items.len());
        let mut create_times = Vec::with_capacity(items.len());
        let mut campaigns = Vec::with_capacity(items.len());
        let mut customers = Vec::with_capacity(items.len());
        let mut emails = Vec::with_capacity(items.len());
        let mut payloads = Vec::with_capacity(items.len());
        for item in items.values() {
            let observed = item.observed;
            item_ids.push(observed.feedback_id.as_str());
            digests.push(observed.digest.as_slice());
            last_seqs.push(item.last_seq);
            create_times.push(observed.create_time_ms);
            campaigns.push(observed.fields.campaign_id.as_str());
            customers.push(observed.customer_id.as_str());
            emails.push(observed.email.as_str());
            payloads.push(observed.payload.as_slice());
        }
        tx.execute(
            "INSERT INTO feedback_items (feedback_id, digest, last_seq, create_time_ms,
                    campaign_id, customer_id, email, payload)
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[], $4::bigint[],
                    $5::text[], $6::text[], $7::text[], $8::bytea[])
                 ON CONFLICT (feedback_id) DO UPDATE SET
                    digest = EXCLUDED.digest, last_seq = EXCLUDED.last_seq,
                    create_time_ms = EXCLUDED.create_time_ms,
                    campaign_id = EXCLUDED.campaign_id, customer_id = EXCLUDED.customer_id,
                    email = EXCLUDED.email, payload = EXCLUDED.payload",
            &[
                &item_ids,
                &digests,
                &last_seqs,
                &create_times,
                &campaigns,
                &customers,
                &emails,
                &payloads,
            ],
        )
        .await
        .map_err(&fail)?;
        tx.execute(
            "UPDATE feedback_log_meta SET head_seq = $1, head_time_ms = $2",
            &[&head_seq, &head_time],
        )
        .await
        .map_err(&fail)?;
        // Delivered when this transaction commits: wakes the other replicas' tails.
        tx.execute("SELECT pg_notify($1, '')", &[&APPENDS_CHANNEL])
            .await
            .map_err(&fail)?;
    }
    for checkpoint in checkpoints {
        super::cursors::put(tx, checkpoint, &fail).await?;
    }
    Ok(Appended { entries, counts })
}

/// The sequence of the last entry logged before `time_ms`, if any (log times are ordered like
/// sequences, so everything up to it is a prefix of the log).
async fn last_logged_before(
    tx: &tokio_postgres::Transaction<'_>,
    time_ms: i64,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<Option<i64>, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT seq FROM feedback_log WHERE log_time_ms < $1
             ORDER BY log_time_ms DESC, seq DESC LIMIT 1",
            &[&time_ms],
        )
        .await
        .map_err(fail)?
        .map(|row| row.get(0)))
}

#[async_trait::async_trait]
impl FeedbackLogStore for PostgresStore {
    async fn state(&self) -> Result<LogState, StoreError> {
        let connection = self.connection("read the log state").await?;
        let row = connection
            .query_one(READ_STATE, &[])
            .await
            .map_err(query_error("read the log state"))?;
        Ok(state_from_row(&row))
    }

    async fn append(
        &self,
        now_ms: i64,
        batches: Vec<(Origin, Vec<Observed>)>,
        checkpoints: Vec<Checkpoint>,
        encode: EntryEncoder,
    ) -> Result<Appended, StoreError> {
        in_transaction!(self, "append to the feedback log", |tx| {
            append_in(&tx, now_ms, &batches, &checkpoints, encode).await
        })
    }

    async fn append_fenced(
        &self,
        fence: &Fence,
        now_ms: i64,
        batches: Vec<(Origin, Vec<Observed>)>,
        checkpoints: Vec<Checkpoint>,
        encode: EntryEncoder,
    ) -> Result<UnderLease<Appended>, StoreError> {
        in_transaction!(self, "append to the feedback log", |tx| {
            // Checked first: the lease row stays share-locked until the commit, so no
            // takeover lands between this check and the append (see `leases`).
            let fail = query_error("append to the feedback log");
            if !super::leases::holds(&tx, fence, &fail).await? {
                return Ok(UnderLease::LeaseLost);
            }
            let appended = append_in(&tx, now_ms, &batches, &checkpoints, encode).await?;
            Ok(UnderLease::Done(appended))
        })
    }

    /// Each call opens a listening connection of its own, outside the pool, which lives as
    /// long as the receiver.
    fn append_wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(super::notify::listen(self, APPENDS_CHANNEL))
    }

    async fn read_after(
        &self,
        after: i64,
        up_to: i64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<ReadOutcome, StoreError> {
        let fail = query_error("read the feedback log");
        let mut connection = self.connection("read the feedback log").await?;
        // The pruning check and the rows from one snapshot.
        let tx = snapshot(&mut connection, &fail).await?;
        let state = state_from_row(&tx.query_one(READ_STATE, &[]).await.map_err(&fail)?);
        if state.pruned_seq > after {
            return Ok(ReadOutcome::Expired);
        }
        let limit = i64::try_from(max_entries).unwrap_or(i64::MAX);
        let rows = tx
            .query(
                "SELECT seq, log_time_ms, campaign_id, metric, score, score_category,
                        has_comment, message, traceparent
                 FROM feedback_log WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                &[&after, &up_to, &limit],
            )
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(&fail)?;
        let mut entries = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for row in rows {
            let message: Vec<u8> = row.get(7);
            bytes += message.len();
            entries.push(LogEntry {
                sequence: row.get(0),
                log_time_ms: row.get(1),
                fields: EntryFields {
                    campaign_id: row.get(2),
                    metric: row.get(3),
                    score: row.get(4),
                    score_category: row.get(5),
                    has_comment: row.get(6),
                },
                message: Bytes::from(message),
                traceparent: row.get(8),
            });
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(ReadOutcome::Entries(entries))
    }

    async fn position_before(&self, time_ms: i64) -> Result<(i64, bool), StoreError> {
        let fail = query_error("find a log position");
        let mut connection = self.connection("find a log position").await?;
        let tx = snapshot(&mut connection, &fail).await?;
        let state = state_from_row(&tx.query_one(READ_STATE, &[]).await.map_err(&fail)?);
        let expired = state.pruned_seq > 0 && state.pruned_time_ms >= time_ms;
        let before = last_logged_before(&tx, time_ms, &fail).await?;
        tx.commit().await.map_err(&fail)?;
        Ok((before.unwrap_or(state.pruned_seq), expired))
    }

    async fn oldest(&self) -> Result<Option<(i64, i64)>, StoreError> {
        let connection = self.connection("find the oldest entry").await?;
        let row = connection
            .query_opt(
                "SELECT seq, log_time_ms FROM feedback_log ORDER BY seq LIMIT 1",
                &[],
            )
            .await
            .map_err(query_error("find the oldest entry"))?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    }

    async fn prune_chunk(
        &self,
        cutoff_ms: Option<i64>,
        max_entries: Option<u64>,
        chunk: u64,
    ) -> Result<u64, StoreError> {
        in_transaction!(self, "prune the feedback log", |tx| {
            let fail = query_error("prune the feedback log");
            let mut boundary: Option<i64> = None;
            if let Some(cutoff) = cutoff_ms {
                // Log times are ordered like sequences, so this is the end of a prefix.
                boundary = last_logged_before(&tx, cutoff, &fail).await?;
            }
            let nth_oldest = async |n: i64| -> Result<Option<i64>, StoreError> {
                Ok(tx
                    .query_opt(
                        "SELECT seq FROM feedback_log ORDER BY seq LIMIT 1 OFFSET $1",
                        &[&(n - 1)],
                    )
                    .await
                    .map_err(&fail)?
                    .map(|row| row.get(0)))
            };
            if let Some(max) = max_entries {
                let count: i64 = tx
                    .query_one("SELECT COUNT(*) FROM feedback_log", &[])
                    .await
                    .map_err(&fail)?
                    .get(0);
                let excess = count.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX));
                if excess > 0 {
                    boundary = boundary.max(nth_oldest(excess).await?);
                }
            }
            let Some(boundary) = boundary else {
                return Ok(0);
            };
            let chunk_end = nth_oldest(i64::try_from(chunk.max(1)).unwrap_or(i64::MAX)).await?;
            let boundary = chunk_end.map_or(boundary, |end| boundary.min(end));
            let Some(last) = tx
                .query_opt(
                    "SELECT seq, log_time_ms FROM feedback_log WHERE seq <= $1
                     ORDER BY seq DESC LIMIT 1",
                    &[&boundary],
                )
                .await
                .map_err(&fail)?
            else {
                return Ok(0);
            };
            let (seq, time): (i64, i64) = (last.get(0), last.get(1));
            let deleted = tx
                .execute("DELETE FROM feedback_log WHERE seq <= $1", &[&seq])
                .await
                .map_err(&fail)?;
            tx.execute(
                "UPDATE feedback_log_meta SET pruned_seq = GREATEST(pruned_seq, $1),
                    pruned_time_ms = GREATEST(pruned_time_ms, $2)",
                &[&seq, &time],
            )
            .await
            .map_err(&fail)?;
            if let Some(cutoff) = cutoff_ms {
                let forgotten = tx
                    .execute(
                        "DELETE FROM feedback_items WHERE create_time_ms < $1
                         AND last_seq <= (SELECT pruned_seq FROM feedback_log_meta)",
                        &[&cutoff],
                    )
                    .await
                    .map_err(&fail)?;
                if forgotten > 0 {
                    tx.execute(
                        "UPDATE feedback_log_meta
                         SET items_horizon_ms = GREATEST(items_horizon_ms, $1)",
                        &[&cutoff],
                    )
                    .await
                    .map_err(&fail)?;
                }
            }
            Ok(deleted)
        })
    }

    async fn items_horizon_ms(&self) -> Result<i64, StoreError> {
        let connection = self.connection("read the items horizon").await?;
        let row = connection
            .query_one("SELECT items_horizon_ms FROM feedback_log_meta", &[])
            .await
            .map_err(query_error("read the items horizon"))?;
        Ok(row.get(0))
    }

    async fn customer_responses(&self, customer: CustomerKey) -> Result<Vec<Vec<u8>>, StoreError> {
        let connection = self.connection("read a customer's responses").await?;
        let (condition, value) = match &customer {
            CustomerKey::Email(email) => ("lower(email) = lower($1)", email.as_str()),
            CustomerKey::RetentlyId(id) => ("customer_id = $1", id.as_str()),
        };
        let rows = connection
            .query(
                &format!(
                    "SELECT payload FROM feedback_items WHERE {condition}
                     ORDER BY create_time_ms DESC, feedback_id DESC"
                ),
                &[&value],
            )
            .await
            .map_err(query_error("read a customer's responses"))?;
        Ok(rows.into_iter().map(|row| row.get(0)).collect())
    }

    async fn query(&self, query: FeedbackQuery) -> Result<StoredFeedbackPage, StoreError> {
        let fail = query_error("query the feedback log");
        let mut connection = self.connection("query the feedback log").await?;
        let tx = snapshot(&mut connection, &fail).await?;
        let mut conditions: Vec<String> = Vec::new();
        let mut values: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut condition = |sql: &str, value: Box<dyn ToSql + Sync + Send>| {
            values.push(value);
            conditions.push(sql.replace('?', &format!("${}", values.len())));
        };
        if let Some(campaign) = &query.campaign_id {
            condition("campaign_id = ?", Box::new(campaign.clone()));
        }
        if let Some(customer) = &query.retently_customer_id {
            condition("customer_id = ?", Box::new(customer.clone()));
        }
        if let Some(email) = &query.email {
            condition("lower(email) = lower(?)", Box::new(email.clone()));
        }
        if let Some(from) = query.created_from_ms {
            condition("create_time_ms >= ?", Box::new(from));
        }
        if let Some(before) = query.created_before_ms {
            condition("create_time_ms < ?", Box::new(before));
        }
        let filter = if conditions.is_empty() {
            String::from("TRUE")
        } else {
            conditions.join(" AND ")
        };
        fn parameters(values: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
            values
                .iter()
                .map(|value| value.as_ref() as &(dyn ToSql + Sync))
                .collect()
        }
        let total: i64 = tx
            .query_one(
                &format!("SELECT COUNT(*) FROM feedback_items WHERE {filter}"),
                &parameters(&values),
            )
            .await
            .map_err(&fail)?
            .get(0);
        let (order, comparison) = if query.newest_first {
            ("create_time_ms DESC, feedback_id DESC", "<")
        } else {
            ("create_time_ms ASC, feedback_id ASC", ">")
        };
        let mut page_filter = filter;
        if let Some((time, id)) = &query.after {
            values.push(Box::new(*time));
            values.push(Box::new(id.clone()));
            page_filter = format!(
                "{page_filter} AND (create_time_ms, feedback_id) {comparison} (${}, ${})",
                values.len() - 1,
                values.len()
            );
        }
        let limit = query.limit.max(1);
        values.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
        values.push(Box::new(i64::try_from(query.offset).unwrap_or(i64::MAX)));
        let rows = tx
            .query(
                &format!(
                    "SELECT create_time_ms, feedback_id, payload FROM feedback_items
                     WHERE {page_filter} ORDER BY {order} LIMIT ${} OFFSET ${}",
                    values.len() - 1,
                    values.len()
                ),
                &parameters(&values),
            )
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(&fail)?;
        let full = rows.len() == limit;
        let mut payloads = Vec::with_capacity(rows.len());
        let mut next = None;
        for row in rows {
            payloads.push(row.get(2));
            next = Some((row.get(0), row.get(1)));
        }
        Ok(StoredFeedbackPage {
            payloads,
            total,
            next: if full { next } else { None },
        })
    }
}
