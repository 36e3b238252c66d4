//! The durable feedback log: one entry per new response (CREATED) and per changed version of one
//! (UPDATED), in a strictly increasing, gap-free sequence.
//!
//! Three tables (migration [`MIGRATION`]):
//! - `feedback_log`: the entries. Each row keeps the complete encoded `SubscribeResponse`
//!   (`message`), so replaying from the log and fanning out live send the very same bytes and
//!   nothing is encoded per subscriber, plus the few fields filters look at.
//! - `feedback_items`: the latest version of every known response (its digest for
//!   deduplication, its encoded `Feedback` and lookup columns for [`FeedbackLog::query`]).
//! - `feedback_log_meta`: one row: the log's random epoch (part of every cursor), the head
//!   (last sequence and log time) and how far retention has pruned.
//!
//! Appends happen only in [`append`], inside a store write job run by the ingest task, so the
//! head counter, the entries and the sync checkpoint change in one transaction. Log times never
//! go backwards (a wall clock that steps back is clamped to the head's time), which keeps
//! `log_time` ordered like the sequence and lets retention delete prefixes.

use prost::Message as _;
use prost::bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, Transaction, params};

use super::cursor::Cursor;
use super::filter::EntryFields;
use crate::error::{Error, ErrorCode};
use crate::pb;
use crate::store::Store;

pub const MIGRATION: (&str, &str) = (
    "0010_feedback_log",
    "CREATE TABLE feedback_log (
        seq INTEGER PRIMARY KEY,
        feedback_id TEXT NOT NULL,
        kind INTEGER NOT NULL,
        log_time_ms INTEGER NOT NULL,
        campaign_id TEXT NOT NULL,
        metric INTEGER NOT NULL,
        score REAL,
        score_category INTEGER NOT NULL,
        has_comment INTEGER NOT NULL,
        message BLOB NOT NULL
    ) STRICT;
    CREATE INDEX feedback_log_by_time ON feedback_log (log_time_ms);
    CREATE TABLE feedback_items (
        feedback_id TEXT PRIMARY KEY,
        digest BLOB NOT NULL,
        last_seq INTEGER NOT NULL,
        create_time_ms INTEGER NOT NULL,
        campaign_id TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        email TEXT NOT NULL COLLATE NOCASE,
        payload BLOB NOT NULL
    ) STRICT;
    CREATE INDEX feedback_items_by_creation ON feedback_items (create_time_ms, feedback_id);
    CREATE TABLE feedback_log_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch INTEGER NOT NULL,
        head_seq INTEGER NOT NULL,
        head_time_ms INTEGER NOT NULL,
        pruned_seq INTEGER NOT NULL,
        pruned_time_ms INTEGER NOT NULL,
        items_horizon_ms INTEGER NOT NULL
    ) STRICT;
    INSERT INTO feedback_log_meta
        (id, epoch, head_seq, head_time_ms, pruned_seq, pruned_time_ms, items_horizon_ms)
        VALUES (1, random() & 9223372036854775807, 0, 0, 0, 0, 0);",
);

/// Lookup indexes for the questions the log answers: one customer's history (by email or by
/// Retently customer id) and `ListFeedback` filtered by campaign, each ending in the creation
/// time and id so a page is a range scan in either order. The email index inherits the
/// column's NOCASE collation, so case-insensitive lookups use it. The log's coverage is kept
/// durably beside the poller's checkpoint (see [`super::sync::SyncState`]), written in the same
/// transaction as the entries it vouches for.
pub const INDEX_MIGRATION: (&str, &str) = (
    "0015_feedback_items_lookup",
    "CREATE INDEX feedback_items_by_email
        ON feedback_items (email, create_time_ms, feedback_id);
    CREATE INDEX feedback_items_by_customer
        ON feedback_items (customer_id, create_time_ms, feedback_id);
    CREATE INDEX feedback_items_by_campaign
        ON feedback_items (campaign_id, create_time_ms, feedback_id);",
);

/// Where an observation came from. Retently's webhook export announces new responses; changes
/// to known ones are taken from the poller only, so a late or replayed webhook call can never
/// turn a response back into an older version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Poll,
    Webhook,
}

/// A response as read from the upstream, encoded and digested once, ready to be compared with
/// the log and appended.
#[derive(Debug, Clone)]
pub struct Observed {
    pub feedback_id: String,
    pub create_time_ms: i64,
    pub customer_id: String,
    pub email: String,
    pub fields: EntryFields,
    /// The encoded `cx.gateway.v1.Feedback`.
    pub payload: Vec<u8>,
    pub digest: [u8; 32],
    /// The `traceparent` of the span that ingested it (a poll, a webhook call), kept with its
    /// log entry so work that follows from the entry (alerts) links back to it.
    pub traceparent: Option<String>,
}

impl Observed {
    pub fn new(feedback: &pb::Feedback) -> Observed {
        let payload = feedback.encode_to_vec();
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &payload).as_ref());
        Observed {
            feedback_id: feedback.feedback_id.clone(),
            create_time_ms: feedback
                .create_time
                .as_ref()
                .map_or(0, crate::convert::timestamp_to_ms),
            customer_id: feedback.retently_customer_id.clone(),
            email: feedback.email.clone(),
            fields: EntryFields::of(feedback),
            payload,
            digest,
            traceparent: None,
        }
    }
}

/// One entry of the log, as appended or as read back.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub sequence: i64,
    pub log_time_ms: i64,
    pub fields: EntryFields,
    /// The encoded `SubscribeResponse` carrying this entry's `FeedbackEvent`.
    pub message: Bytes,
}

/// What one batch of observations did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendCounts {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Webhook observations of responses already known (changes come from the poller).
    pub ignored: u64,
}

/// The log's fixed identity and its current bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogState {
    pub epoch: u64,
    pub head_seq: i64,
    pub head_time_ms: i64,
    /// Every entry up to this sequence has been deleted by retention (0: none).
    pub pruned_seq: i64,
    /// Log time of the last deleted entry.
    pub pruned_time_ms: i64,
}

/// A catch-up read.
#[derive(Debug)]
pub enum ReadOutcome {
    Entries(Vec<LogEntry>),
    /// Entries right after the requested position were deleted by retention.
    Expired,
}

/// The log as the rest of the gateway reads it; cheap to clone.
#[derive(Debug, Clone)]
pub struct FeedbackLog {
    store: Store,
    epoch: u64,
}

fn store_error(error: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::Unavailable,
        "STORE_UNAVAILABLE",
        format!("the feedback log failed: {error}"),
    )
}

impl FeedbackLog {
    /// Reads the log's identity (the migration created it). Blocking, like [`Store::open`], and
    /// meant for start-up: the gateway does not yield to its first callers half-started.
    pub fn open(store: Store) -> Result<(FeedbackLog, LogState), Error> {
        let connection = Connection::open_with_flags(
            store.path(),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(store_error)?;
        let state = read_state(&connection).map_err(store_error)?;
        Ok((
            FeedbackLog {
                store,
                epoch: state.epoch,
            },
            state,
        ))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn cursor(&self, sequence: i64) -> Cursor {
        Cursor {
            epoch: self.epoch,
            sequence,
        }
    }

    pub async fn state(&self) -> Result<LogState, Error> {
        self.store.read(read_state).await
    }

    /// Entries after `after`, up to `up_to` inclusive, oldest first; at most `max_entries` and,
    /// beyond the first entry, at most about `max_bytes` of messages.
    pub async fn read_after(
        &self,
        after: i64,
        up_to: i64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<ReadOutcome, Error> {
        self.store
            .read(move |connection| {
                // One read transaction: the pruning check and the rows come from one snapshot.
                let tx = connection.unchecked_transaction()?;
                let state = read_state(&tx)?;
                if state.pruned_seq > after {
                    return Ok(ReadOutcome::Expired);
                }
                let mut statement = tx.prepare_cached(
                    "SELECT seq, log_time_ms, campaign_id, metric, score, score_category,
                            has_comment, message
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
                    });
                    if bytes >= max_bytes {
                        break;
                    }
                }
                Ok(ReadOutcome::Entries(entries))
            })
            .await
    }

    /// The sequence just before the first entry logged at or after `time_ms`, and whether
    /// retention already deleted entries logged at or after it.
    pub async fn position_before(&self, time_ms: i64) -> Result<(i64, bool), Error> {
        self.store
            .read(move |connection| {
                let tx = connection.unchecked_transaction()?;
                let state = read_state(&tx)?;
                let expired = state.pruned_seq > 0 && state.pruned_time_ms >= time_ms;
                let before: Option<i64> = tx
                    .query_row(
                        "SELECT seq FROM feedback_log WHERE log_time_ms < ?1
                         ORDER BY log_time_ms DESC, seq DESC LIMIT 1",
                        [time_ms],
                        |row| row.get(0),
                    )
                    .optional()?;
                Ok((before.unwrap_or(state.pruned_seq), expired))
            })
            .await
    }

    /// The oldest retained entry's sequence and log time, if any.
    pub async fn oldest(&self) -> Result<Option<(i64, i64)>, Error> {
        self.store
            .read(|connection| {
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

    /// Deletes one chunk of entries that retention no longer keeps: those logged before
    /// `cutoff_ms`, and the oldest beyond `max_entries`; at most `chunk` per call so the writer
    /// is never held for long. In the same transaction, forgets responses created before
    /// `cutoff_ms` whose every entry is gone. Returns how many entries were deleted; a round
    /// with nothing to delete only reads.
    pub async fn prune_chunk(
        &self,
        cutoff_ms: Option<i64>,
        max_entries: Option<u64>,
        chunk: u64,
    ) -> Result<u64, Error> {
        let boundary = self
            .store
            .read(move |connection| prune_boundary(connection, cutoff_ms, max_entries, chunk))
            .await?;
        let Some(boundary) = boundary else {
            return Ok(0);
        };
        self.store
            .write(move |tx| {
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

    /// Responses created before this instant may have been forgotten by retention.
    pub async fn items_horizon_ms(&self) -> Result<i64, Error> {
        self.store
            .read(|connection| {
                connection.query_row(
                    "SELECT items_horizon_ms FROM feedback_log_meta",
                    [],
                    |row| row.get(0),
                )
            })
            .await
    }

    /// The creation times the log mirrors completely: every response Retently recorded in
    /// `[from_ms, to_ms)` is in [`FeedbackLog::query`]'s results, in the version the sync last
    /// read (changes are seen within the rescan window; older responses keep the version they
    /// had when they left it). `None` before the first complete poll.
    pub async fn covered_range(&self) -> Result<Option<super::sync::CoveredRange>, Error> {
        let Some(state) = super::sync::SyncState::load(&self.store).await? else {
            return Ok(None);
        };
        let horizon = self.items_horizon_ms().await?;
        Ok(state.synced_to_ms.map(|to_ms| super::sync::CoveredRange {
            from_ms: state.covered_from_ms.max(horizon),
            to_ms,
        }))
    }

    /// Every response of one customer the log holds, in its latest version, newest first (by
    /// creation time, then id, both descending).
    pub async fn customer_responses(
        &self,
        customer: CustomerKey,
    ) -> Result<Vec<pb::Feedback>, Error> {
        self.store
            .read(move |connection| {
                let (column, value) = match &customer {
                    CustomerKey::Email(email) => ("email", email.as_str()),
                    CustomerKey::RetentlyId(id) => ("customer_id", id.as_str()),
                };
                let mut statement = connection.prepare_cached(&format!(
                    "SELECT payload FROM feedback_items WHERE {column} = ?1
                     ORDER BY create_time_ms DESC, feedback_id DESC"
                ))?;
                let payloads: Vec<Vec<u8>> = statement
                    .query_map([value], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                Ok(payloads)
            })
            .await?
            .iter()
            .map(|payload| pb::Feedback::decode(payload.as_slice()).map_err(store_error))
            .collect()
    }

    /// The latest known version of the responses matching `query` (see [`FeedbackQuery`]).
    pub async fn query(&self, query: FeedbackQuery) -> Result<FeedbackQueryPage, Error> {
        self.store
            .read(move |connection| run_query(connection, &query))
            .await?
            .map_err(store_error)
    }
}

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
        boundary = connection
            .query_row(
                "SELECT seq FROM feedback_log WHERE log_time_ms < ?1
                 ORDER BY log_time_ms DESC, seq DESC LIMIT 1",
                [cutoff],
                |row| row.get(0),
            )
            .optional()?;
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

/// Compares `observations` with what the log knows and appends the new and changed ones, all
/// inside the caller's transaction; `now_ms` is the log time of the new entries unless the head
/// is later. Returns the appended entries in sequence order and per-batch counts.
pub(crate) fn append(
    tx: &Transaction<'_>,
    now_ms: i64,
    batches: &[(Origin, Vec<Observed>)],
) -> rusqlite::Result<(Vec<LogEntry>, Vec<AppendCounts>)> {
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
                None => pb::FeedbackEventKind::Created,
                Some(digest) if digest == observed.digest => {
                    batch.unchanged += 1;
                    continue;
                }
                Some(_) if *origin == Origin::Webhook => {
                    batch.ignored += 1;
                    continue;
                }
                Some(_) => pb::FeedbackEventKind::Updated,
            };
            head_seq += 1;
            head_time = head_time.max(now_ms);
            let message = encode_event(
                Cursor {
                    epoch: state.epoch,
                    sequence: head_seq,
                },
                kind,
                head_time,
                &observed.payload,
            );
            let fields = &observed.fields;
            insert_entry.execute(params![
                head_seq,
                observed.feedback_id,
                kind as i32,
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
                pb::FeedbackEventKind::Updated => batch.updated += 1,
                _ => batch.created += 1,
            }
            entries.push(LogEntry {
                sequence: head_seq,
                log_time_ms: head_time,
                fields: fields.clone(),
                message,
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
    Ok((entries, counts))
}

/// The `SubscribeResponse { feedback_event: FeedbackEvent { kind, feedback, cursor, sequence,
/// log_time } }` of one entry, written field by field around the already encoded `Feedback` so
/// the payload is copied, not decoded and encoded again. The bytes are exactly what prost
/// produces for the same message (checked by a test).
pub fn encode_event(
    cursor: Cursor,
    kind: pb::FeedbackEventKind,
    log_time_ms: i64,
    payload: &[u8],
) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    let cursor_text = cursor.encode();
    let log_time = crate::convert::timestamp_from_ms(log_time_ms);
    let kind = kind as i32;
    let mut event = Vec::with_capacity(payload.len() + 64);
    if kind != 0 {
        prost::encoding::int32::encode(1, &kind, &mut event);
    }
    encode_key(2, WireType::LengthDelimited, &mut event);
    encode_varint(payload.len() as u64, &mut event);
    event.extend_from_slice(payload);
    prost::encoding::string::encode(3, &cursor_text, &mut event);
    if cursor.sequence != 0 {
        prost::encoding::int64::encode(4, &cursor.sequence, &mut event);
    }
    prost::encoding::message::encode(5, &log_time, &mut event);
    let mut message = Vec::with_capacity(event.len() + 1 + encoded_len_varint(event.len() as u64));
    encode_key(1, WireType::LengthDelimited, &mut message);
    encode_varint(event.len() as u64, &mut message);
    message.extend_from_slice(&event);
    Bytes::from(message)
}

/// How a customer is named in a history read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerKey {
    /// The respondent's email, compared case-insensitively.
    Email(String),
    /// The respondent's Retently customer id.
    RetentlyId(String),
}

/// A read of the latest known versions, for serving `SurveyService.ListFeedback` from the log
/// when [`super::sync::covered_range`] covers the requested creation times. Every set condition
/// must hold.
#[derive(Debug, Clone, Default)]
pub struct FeedbackQuery {
    pub campaign_id: Option<String>,
    pub retently_customer_id: Option<String>,
    /// Compared case-insensitively.
    pub email: Option<String>,
    /// Created at or after (UNIX milliseconds).
    pub created_from_ms: Option<i64>,
    /// Created strictly before (UNIX milliseconds).
    pub created_before_ms: Option<i64>,
    pub newest_first: bool,
    /// Keyset position: the `(create_time_ms, feedback_id)` of the last item of the previous
    /// page; the page starts right after it in the chosen order.
    pub after: Option<(i64, String)>,
    /// Matching responses to skip after `after`: the upstream's page-number paging, which
    /// `ListFeedback` tokens carry whichever side answered the previous page.
    pub offset: usize,
    pub limit: usize,
}

/// One page of [`FeedbackLog::query`].
#[derive(Debug, Clone, Default)]
pub struct FeedbackQueryPage {
    pub items: Vec<pb::Feedback>,
    /// Matching responses in total, ignoring `after` and `limit`.
    pub total: i64,
    /// The keyset position of the last item, when more may follow.
    pub next: Option<(i64, String)>,
}

fn run_query(
    connection: &Connection,
    query: &FeedbackQuery,
) -> rusqlite::Result<Result<FeedbackQueryPage, prost::DecodeError>> {
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
    let mut items = Vec::with_capacity(rows.len());
    let mut next = None;
    for (time, id, payload) in rows {
        match pb::Feedback::decode(payload.as_slice()) {
            Ok(feedback) => items.push(feedback),
            Err(error) => return Ok(Err(error)),
        }
        next = Some((time, id));
    }
    Ok(Ok(FeedbackQueryPage {
        items,
        total,
        next: if full { next } else { None },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_encoded_events_equal_prost_encoding() {
        let feedback = pb::Feedback {
            feedback_id: "f1".into(),
            comment: "hello".into(),
            score: Some(7.0),
            ..Default::default()
        };
        let cursor = Cursor {
            epoch: 42,
            sequence: 300,
        };
        let bytes = encode_event(
            cursor,
            pb::FeedbackEventKind::Updated,
            1_700_000_000_123,
            &feedback.encode_to_vec(),
        );
        let expected = pb::SubscribeResponse {
            payload: Some(pb::subscribe_response::Payload::FeedbackEvent(
                pb::FeedbackEvent {
                    kind: pb::FeedbackEventKind::Updated as i32,
                    feedback: Some(feedback),
                    cursor: cursor.encode(),
                    sequence: 300,
                    log_time: Some(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 123_000_000,
                    }),
                },
            )),
        };
        assert_eq!(bytes.as_ref(), expected.encode_to_vec().as_slice());
        assert_eq!(pb::SubscribeResponse::decode(bytes).unwrap(), expected);
    }
}
