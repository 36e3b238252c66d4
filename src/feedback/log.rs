//! The durable feedback log: one entry per new response (CREATED) and per changed version of one
//! (UPDATED), in a strictly increasing, gap-free sequence.
//!
//! The store keeps it ([`crate::store::FeedbackLogStore`]): the entries, each with its complete
//! encoded `SubscribeResponse` (so replaying from the log and fanning out live send the very
//! same bytes and nothing is encoded per subscriber) and the few fields filters look at; the
//! latest version of every known response; the log's random epoch (part of every cursor), head
//! and retention bounds.
//!
//! Appends happen only in the ingest task, as one store operation, so the head counter, the
//! entries and the sync checkpoint change in one transaction. Log times never
//! go backwards (a wall clock that steps back is clamped to the head's time), which keeps
//! `log_time` ordered like the sequence and lets retention delete prefixes.

use prost::Message as _;
use prost::bytes::Bytes;

use super::cursor::Cursor;
use super::filter::EntryFields;
use crate::error::{Error, ErrorCode, Reason};
use crate::pb;
use crate::store::Store;
use crate::store::feedback_log::EntryKind;

pub use crate::store::feedback_log::{
    AppendCounts, Appended, CustomerKey, FeedbackQuery, LogEntry, LogState, Observed, Origin,
    ReadOutcome,
};

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

/// The log as the rest of the gateway reads it; cheap to clone.
#[derive(Debug, Clone)]
pub struct FeedbackLog {
    store: Store,
    epoch: u64,
}

fn store_error(error: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::Unavailable,
        Reason::StoreUnavailable,
        format!("the feedback log failed: {error}"),
    )
}

impl FeedbackLog {
    /// Reads the log's identity (the store created it with its schema); meant for start-up.
    pub async fn open(store: Store) -> Result<(FeedbackLog, LogState), Error> {
        let state = store.feedback_log().state().await?;
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
        Ok(self.store.feedback_log().state().await?)
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
        Ok(self
            .store
            .feedback_log()
            .read_after(after, up_to, max_entries, max_bytes)
            .await?)
    }

    /// The sequence just before the first entry logged at or after `time_ms`, and whether
    /// retention already deleted entries logged at or after it.
    pub async fn position_before(&self, time_ms: i64) -> Result<(i64, bool), Error> {
        Ok(self.store.feedback_log().position_before(time_ms).await?)
    }

    /// The oldest retained entry's sequence and log time, if any.
    pub async fn oldest(&self) -> Result<Option<(i64, i64)>, Error> {
        Ok(self.store.feedback_log().oldest().await?)
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
        Ok(self
            .store
            .feedback_log()
            .prune_chunk(cutoff_ms, max_entries, chunk)
            .await?)
    }

    /// Responses created before this instant may have been forgotten by retention.
    pub async fn items_horizon_ms(&self) -> Result<i64, Error> {
        Ok(self.store.feedback_log().items_horizon_ms().await?)
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
            .feedback_log()
            .customer_responses(customer)
            .await?
            .iter()
            .map(|payload| pb::Feedback::decode(payload.as_slice()).map_err(store_error))
            .collect()
    }

    /// The latest known version of the responses matching `query` (see [`FeedbackQuery`]).
    pub async fn query(&self, query: FeedbackQuery) -> Result<FeedbackQueryPage, Error> {
        let page = self.store.feedback_log().query(query).await?;
        let items = page
            .payloads
            .iter()
            .map(|payload| pb::Feedback::decode(payload.as_slice()).map_err(store_error))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FeedbackQueryPage {
            items,
            total: page.total,
            next: page.next,
        })
    }
}

/// The message of one entry, as the store asks for it while appending (see
/// [`crate::store::feedback_log::EntryEncoder`]).
pub fn encode_entry(
    epoch: u64,
    sequence: i64,
    kind: EntryKind,
    log_time_ms: i64,
    payload: &[u8],
) -> Bytes {
    let kind = match kind {
        EntryKind::Created => pb::FeedbackEventKind::Created,
        EntryKind::Updated => pb::FeedbackEventKind::Updated,
    };
    encode_event(Cursor { epoch, sequence }, kind, log_time_ms, payload)
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

/// One page of [`FeedbackLog::query`].
#[derive(Debug, Clone, Default)]
pub struct FeedbackQueryPage {
    pub items: Vec<pb::Feedback>,
    /// Matching responses in total, ignoring `after` and `limit`.
    pub total: i64,
    /// The keyset position of the last item, when more may follow.
    pub next: Option<(i64, String)>,
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
