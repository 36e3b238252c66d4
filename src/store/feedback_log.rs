//! The feedback log as stored: entries in a strictly increasing, gap-free sequence (one per new
//! response and per changed version of one), the latest version of every known response, and
//! the log's identity and bounds. How it is fed, fanned out and pruned is the feedback
//! pipeline's ([`crate::feedback`]).

use prost::bytes::Bytes;

use super::StoreError;
use super::cursors::Checkpoint;
use super::leases::{Fence, UnderLease};

/// What a subscription filter looks at; stored beside each entry and carried by live entries.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryFields {
    pub campaign_id: String,
    /// `pb::Metric` as its number.
    pub metric: i32,
    pub score: Option<f64>,
    /// `pb::ScoreCategory` as its number.
    pub score_category: i32,
    pub has_comment: bool,
}

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
    /// The W3C `traceparent` of the span that ingested it (a poll, a webhook call), kept with
    /// its log entry so work that follows from the entry (alerts) links back to it.
    pub traceparent: Option<String>,
}

/// Whether an entry is a response's first version or a changed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Created,
    Updated,
}

impl EntryKind {
    /// The stored number: that of `cx.gateway.v1.FeedbackEventKind`.
    pub fn number(self) -> i32 {
        match self {
            EntryKind::Created => crate::pb::FeedbackEventKind::Created as i32,
            EntryKind::Updated => crate::pb::FeedbackEventKind::Updated as i32,
        }
    }
}

/// Encodes the message an entry keeps (the `SubscribeResponse` replayed and fanned out as is),
/// given the log's epoch, the entry's sequence and kind, its log time and the response's
/// payload. The store calls it while appending, once it has assigned the sequence.
pub type EntryEncoder =
    fn(epoch: u64, sequence: i64, kind: EntryKind, log_time_ms: i64, payload: &[u8]) -> Bytes;

/// One entry of the log, as appended or as read back.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub sequence: i64,
    pub log_time_ms: i64,
    pub fields: EntryFields,
    /// The encoded `SubscribeResponse` carrying this entry's `FeedbackEvent`.
    pub message: Bytes,
    /// The `traceparent` of the span that ingested the response, if traces were exported.
    pub traceparent: Option<String>,
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

/// What [`FeedbackLogStore::append`] appended: the entries in sequence order, and counts per
/// batch in the order of the batches.
#[derive(Debug, Clone, Default)]
pub struct Appended {
    pub entries: Vec<LogEntry>,
    pub counts: Vec<AppendCounts>,
}

/// The log's fixed identity and its current bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogState {
    /// Random, fixed when the log was created; part of every cursor.
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

/// How a customer is named in a history read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerKey {
    /// The respondent's email, compared case-insensitively.
    Email(String),
    /// The respondent's Retently customer id.
    RetentlyId(String),
}

/// A read of the latest known versions, for serving `SurveyService.ListFeedback` from the log
/// when the sync's covered range covers the requested creation times. Every set condition must
/// hold.
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

/// One page of [`FeedbackLogStore::query`]: encoded `cx.gateway.v1.Feedback` payloads.
#[derive(Debug, Clone, Default)]
pub struct StoredFeedbackPage {
    pub payloads: Vec<Vec<u8>>,
    /// Matching responses in total, ignoring `after`, `offset` and `limit`.
    pub total: i64,
    /// The keyset position of the last item, when the page is full (more may follow).
    pub next: Option<(i64, String)>,
}

/// The durable feedback log. Each method is atomic; reads see one consistent snapshot.
#[async_trait::async_trait]
pub trait FeedbackLogStore: Send + Sync + 'static {
    /// The log's identity and bounds.
    async fn state(&self) -> Result<LogState, StoreError>;

    /// In one transaction: compares each observation with the latest known version (by
    /// `feedback_id` and digest) and appends an entry for each new response (created) and, from
    /// the poller only, each changed one (updated), with consecutive sequences after the head;
    /// stores the latest versions; moves the head; and writes `checkpoints`. The entries' log
    /// time is `now_ms`, or the head's time if that is later (log times never go backwards).
    /// Appends must be serialised by the engine: sequences are handed out in commit order, so a
    /// reader that saw sequence `n` committed never finds a smaller one appear later.
    async fn append(
        &self,
        now_ms: i64,
        batches: Vec<(Origin, Vec<Observed>)>,
        checkpoints: Vec<Checkpoint>,
        encode: EntryEncoder,
    ) -> Result<Appended, StoreError>;

    /// [`FeedbackLogStore::append`] made under a lease (the poller's pages and checkpoints):
    /// in the same transaction, checks first that `fence` is still the lease's current epoch,
    /// and appends nothing and writes no checkpoint when another holder took the lease since
    /// ([`UnderLease::LeaseLost`]). A holder that lost its lease therefore can neither append
    /// nor move the checkpoint back, however long it was paused.
    async fn append_fenced(
        &self,
        fence: &Fence,
        now_ms: i64,
        batches: Vec<(Origin, Vec<Observed>)>,
        checkpoints: Vec<Checkpoint>,
        encode: EntryEncoder,
    ) -> Result<UnderLease<Appended>, StoreError>;

    /// A signal that changes after other processes appended to the log (several replicas on
    /// one database); `None` when this process is the log's only appender (the embedded
    /// store). A wake-up only: what was appended is read from the log, and a reader that must
    /// not miss anything also reads it every so often, as a wake-up may be lost.
    fn append_wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Entries after `after`, up to `up_to` inclusive, oldest first; at most `max_entries` and,
    /// beyond the first entry, at most about `max_bytes` of messages. `Expired` when retention
    /// deleted entries right after `after` (checked in the same snapshot).
    async fn read_after(
        &self,
        after: i64,
        up_to: i64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<ReadOutcome, StoreError>;

    /// The sequence just before the first entry logged at or after `time_ms` (the pruned
    /// sequence when none is left before it), and whether retention already deleted entries
    /// logged at or after it.
    async fn position_before(&self, time_ms: i64) -> Result<(i64, bool), StoreError>;

    /// The oldest retained entry's sequence and log time, if any.
    async fn oldest(&self) -> Result<Option<(i64, i64)>, StoreError>;

    /// Deletes one chunk of the oldest entries: those logged before `cutoff_ms` and those beyond
    /// the newest `max_entries`, at most `chunk` entries; moves the pruned bounds. In the same
    /// transaction, forgets responses created before `cutoff_ms` whose every entry is gone and
    /// moves the items horizon to `cutoff_ms`. Returns how many entries were deleted; a round
    /// with nothing to delete writes nothing.
    async fn prune_chunk(
        &self,
        cutoff_ms: Option<i64>,
        max_entries: Option<u64>,
        chunk: u64,
    ) -> Result<u64, StoreError>;

    /// Responses created before this instant may have been forgotten by retention.
    async fn items_horizon_ms(&self) -> Result<i64, StoreError>;

    /// The latest version of every known response of one customer, newest first (by creation
    /// time, then id, descending), as encoded payloads.
    async fn customer_responses(&self, customer: CustomerKey) -> Result<Vec<Vec<u8>>, StoreError>;

    /// The latest known versions matching `query` (see [`FeedbackQuery`]), ordered by creation
    /// time then id, oldest first unless `newest_first`.
    async fn query(&self, query: FeedbackQuery) -> Result<StoredFeedbackPage, StoreError>;
}
