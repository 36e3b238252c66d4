//! The hub: fans log entries out to subscribers.
//!
//! Live entries go through one `tokio::sync::broadcast` ring of `Arc<LogEntry>` whose messages
//! were encoded once, when they entered the log; every subscriber sends those same bytes. The
//! ring is the subscribers' shared bounded buffer: its memory does not depend on how many
//! subscribers there are or how slow they are, and no publish ever waits for a subscriber.
//!
//! A subscriber's stream is pulled by the transport: it takes the next entry only when hyper
//! asks tonic for more body, which happens only when the HTTP/2 stream has send capacity (the
//! peer's flow-control window). A subscriber that reads slowly therefore stops pulling; the
//! ring moves on without it and, when it pulls again, its receiver reports that it lagged. It
//! then continues from the durable log (slower, never lossy), one bounded page at a time, and
//! switches back to the ring when it has caught up. If retention deleted entries it had not read
//! yet, its stream ends with `OUT_OF_RANGE` / `CURSOR_EXPIRED` rather than skip them.
//!
//! What one subscriber can hold is thus bounded: one catch-up page
//! ([`HubSettings::catch_up_bytes`]), tonic's encoding buffer (about 32 KiB) and hyper's
//! per-stream send buffer (h2 caps it at about 400 KiB), whatever the event rate.
//!
//! No gap, no duplicate at the switch between log and ring: a subscriber first takes a fresh
//! receiver, then reads the log up to the published head; every entry published after the
//! receiver was taken is in the receiver, and entries are taken from it only if their sequence
//! is exactly one more than the subscriber's position (older ones are skipped, a jump means it
//! lagged and reads the log again). Sequences are gap-free, so this check is exact.
//!
//! Several replicas on one database share one log, and each replica's hub publishes every entry
//! of it, whoever appended it: the entries this replica's ingest task appends as soon as they
//! commit, the others' when the log tail ([`super::tail`]) reads them. Publishing is serialized
//! and strictly in sequence order: entries at or below the published head are skipped, and
//! entries missing before a local append are read from the log and published first. The ring
//! therefore carries the same gap-free sequence on every replica, and a cursor issued by one
//! replica means the same position on any other.
//!
//! Telemetry: a subscription is the RPC's server span, which lasts as long as the stream. What
//! the stream delivers is reported on it as events, one per *batch* (a catch-up page, or a run
//! of live entries sent without waiting), never one per message: `feedback.batch` with the
//! item count, first and last sequence and source, `feedback.catch_up` / `feedback.caught_up`
//! around each read from the log. Heartbeats are no events. When no trace is exported (or the
//! span is not sampled) none of this costs more than a flag test per message.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::Stream;
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt as _;
use prost::Message as _;
use prost::bytes::Bytes;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::time::Instant;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::clock::Clock;
use super::cursor::{Cursor, CursorError};
use super::filter::Filter;
use super::log::{FeedbackLog, LogEntry, LogState, ReadOutcome};
use super::stats::FeedbackStats;
use crate::convert::timestamp_from_ms;
use crate::error::{Error, ErrorCode, FieldViolation, Reason};
use crate::pb;
use crate::shutdown::Drain;

/// Tuning of the fan-out.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// A Heartbeat is sent after this long without another message (the contract says 15 s).
    pub heartbeat_interval: Duration,
    /// Streams served at once; more are refused with `TOO_MANY_SUBSCRIBERS`.
    pub max_subscribers: usize,
    /// Entries of the live ring: how far a subscriber may fall behind before it continues from
    /// the log. Memory is this many entries in total, not per subscriber.
    pub live_buffer: usize,
    /// Entries per catch-up read.
    pub catch_up_entries: usize,
    /// Bytes per catch-up read (beyond its first entry): what one catching-up subscriber holds.
    pub catch_up_bytes: usize,
    /// Catch-up reads running at once, so many lagging subscribers cannot flood the store.
    pub catch_up_readers: usize,
}

impl Default for HubSettings {
    fn default() -> Self {
        HubSettings {
            heartbeat_interval: Duration::from_secs(15),
            max_subscribers: 10_000,
            live_buffer: 1024,
            catch_up_entries: 256,
            catch_up_bytes: 64 * 1024,
            catch_up_readers: 4,
        }
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only entries that enter the log after the call.
    Latest,
    /// Every retained entry.
    Earliest,
    /// Strictly after this position.
    After(Cursor),
    /// Entries logged at or after this instant (UNIX milliseconds).
    Time(i64),
}

/// The encoded `SubscribeResponse` messages of one subscription; ends with an error status
/// (shutdown, expired position, deadline) or when the caller goes away.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

pub struct Hub {
    log: FeedbackLog,
    live: broadcast::Sender<Arc<LogEntry>>,
    /// The last published sequence: every entry up to it is in the log and was sent to the ring.
    head: watch::Sender<i64>,
    /// The sync watermark (UNIX milliseconds), once known.
    sync_time_ms: watch::Sender<Option<i64>>,
    readers: Semaphore,
    /// Held while publishing: the ingest task and the log tail both publish, one at a time.
    publishing: tokio::sync::Mutex<()>,
    subscribers: AtomicUsize,
    settings: HubSettings,
    drain: Drain,
    clock: Clock,
    stats: Arc<FeedbackStats>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("head", &*self.head.borrow())
            .field("subscribers", &self.subscribers.load(Ordering::Relaxed))
            .finish()
    }
}

impl Hub {
    pub fn new(
        log: FeedbackLog,
        state: LogState,
        settings: HubSettings,
        drain: Drain,
        clock: Clock,
        stats: Arc<FeedbackStats>,
    ) -> Arc<Hub> {
        let (live, _) = broadcast::channel(settings.live_buffer.max(1));
        Arc::new(Hub {
            log,
            live,
            head: watch::Sender::new(state.head_seq),
            sync_time_ms: watch::Sender::new(None),
            readers: Semaphore::new(settings.catch_up_readers.max(1)),
            publishing: tokio::sync::Mutex::new(()),
            subscribers: AtomicUsize::new(0),
            settings,
            drain,
            clock,
            stats,
        })
    }

    pub fn log(&self) -> &FeedbackLog {
        &self.log
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    /// The last published sequence.
    pub fn head(&self) -> i64 {
        *self.head.borrow()
    }

    /// Publishes entries this replica just committed, in sequence order (the ingest task, this
    /// replica's one appender, calls it after each commit). Entries other replicas appended
    /// before them are read from the log and published first; if that read fails, the log tail
    /// publishes them all at its next read.
    pub(crate) async fn publish(&self, entries: Vec<LogEntry>) {
        let Some(first) = entries.first().map(|entry| entry.sequence) else {
            return;
        };
        let _publishing = self.publishing.lock().await;
        if first > self.head() + 1 {
            if let Err(error) = self.publish_log_until(first - 1).await {
                tracing::warn!(
                    %error,
                    head = self.head(),
                    first,
                    "cannot read the entries other replicas appended, the log tail publishes \
                     them later"
                );
                return;
            }
            if first > self.head() + 1 {
                return;
            }
        }
        self.send_in_order(entries);
    }

    /// Publishes every entry of the log after the published head: those other replicas
    /// appended (the log tail), or those a subscriber's cursor from another replica names.
    pub(crate) async fn publish_from_log(&self) -> Result<(), Error> {
        let _publishing = self.publishing.lock().await;
        self.publish_log_until(i64::MAX).await
    }

    /// Reads and publishes the log after the head up to `up_to`; the caller holds `publishing`.
    async fn publish_log_until(&self, up_to: i64) -> Result<(), Error> {
        loop {
            let head = self.head();
            if head >= up_to {
                return Ok(());
            }
            let read = self
                .log
                .read_after(
                    head,
                    up_to,
                    self.settings.catch_up_entries.max(1),
                    self.settings.catch_up_bytes,
                )
                .await?;
            match read {
                ReadOutcome::Entries(entries) if entries.is_empty() => return Ok(()),
                ReadOutcome::Entries(entries) => self.send_in_order(entries),
                ReadOutcome::Expired => {
                    // Retention deleted entries this replica never published. The head moves
                    // past them: a live subscriber sees the jump, reads the log and ends with
                    // CURSOR_EXPIRED, as one that fell behind retention does.
                    let pruned = self.log.state().await?.pruned_seq;
                    if pruned <= head {
                        return Ok(());
                    }
                    self.head.send_replace(pruned);
                }
            }
        }
    }

    /// Sends entries that follow the head to the ring; the caller holds `publishing`.
    fn send_in_order(&self, entries: Vec<LogEntry>) {
        for entry in entries {
            if entry.sequence <= self.head() {
                continue;
            }
            // The head moves first: a subscriber that starts now either finds the entry in the
            // log (up to the head) or receives it from the ring, and skips the second copy.
            self.head.send_replace(entry.sequence);
            // An error only means nobody listens right now.
            let _ = self.live.send(Arc::new(entry));
        }
    }

    pub(crate) fn set_sync_time(&self, sync_time_ms: Option<i64>) {
        if sync_time_ms.is_some() {
            self.sync_time_ms.send_replace(sync_time_ms);
        }
    }

    pub fn sync_time_ms(&self) -> Option<i64> {
        *self.sync_time_ms.borrow()
    }

    /// Changes each time a poll completes.
    pub fn sync_watch(&self) -> watch::Receiver<Option<i64>> {
        self.sync_time_ms.subscribe()
    }

    /// Changes each time entries are published.
    pub fn head_watch(&self) -> watch::Receiver<i64> {
        self.head.subscribe()
    }

    /// Opens a subscription. Fails at once for a bad or expired start position or when the
    /// gateway serves its maximum number of subscribers. `deadline` is the caller's own, if it
    /// sent one: the stream then ends with `DEADLINE_EXCEEDED` when it passes.
    pub async fn subscribe(
        self: &Arc<Self>,
        filter: Filter,
        start: Start,
        deadline: Option<Instant>,
    ) -> Result<EventStream, Error> {
        if self.drain.is_draining() {
            return Err(shutting_down());
        }
        let slot = Slot::acquire(self)?;
        // The receiver is taken before the head is read; see the module comment.
        let receiver = self.live.subscribe();
        let head = self.head();
        let position = self.resolve(start, head).await?;
        FeedbackStats::add(&self.stats.subscriptions, 1);
        // The span current here is the RPC's server span (the caller's subscription).
        let mut trace = Trace::new(tracing::Span::current(), start, position);
        let catching_up = position < head;
        if catching_up {
            trace.catch_up_started(Cause::Replay, position, head);
        }
        let subscriber = Subscriber {
            hub: Arc::clone(self),
            filter,
            position,
            receiver,
            catching_up,
            cause: Cause::Replay,
            trace,
            page: VecDeque::new(),
            last_sent: Instant::now(),
            started: false,
            ending: None,
            done: false,
            deadline,
            _slot: slot,
        };
        Ok(Box::pin(futures_util::stream::unfold(
            subscriber,
            Subscriber::next,
        )))
    }

    async fn resolve(&self, start: Start, head: i64) -> Result<i64, Error> {
        match start {
            Start::Latest => Ok(head),
            Start::Earliest => Ok(self.log.state().await?.pruned_seq.min(head)),
            Start::After(cursor) => {
                // A cursor issued by another replica may be ahead of what this one published
                // so far: publish the log up to now first.
                let head = if cursor.epoch == self.log.epoch() && cursor.sequence > head {
                    self.publish_from_log().await?;
                    self.head()
                } else {
                    head
                };
                let violation = if cursor.epoch != self.log.epoch() {
                    Some(CursorError::OtherLog)
                } else if cursor.sequence > head {
                    Some(CursorError::Ahead)
                } else {
                    None
                };
                if let Some(violation) = violation {
                    return Err(Error::invalid_argument(vec![FieldViolation::new(
                        "cursor",
                        violation.to_string(),
                    )]));
                }
                if cursor.sequence < self.log.state().await?.pruned_seq {
                    return Err(self.expired_error(None).await);
                }
                Ok(cursor.sequence)
            }
            Start::Time(time_ms) => {
                let (before, expired) = self.log.position_before(time_ms).await?;
                if expired {
                    return Err(self.expired_error(None).await);
                }
                let head = if before > head {
                    self.publish_from_log().await?;
                    self.head()
                } else {
                    head
                };
                Ok(before.min(head))
            }
        }
    }

    /// `OUT_OF_RANGE` / `CURSOR_EXPIRED` with where the retained log starts, so the caller can
    /// resume from `oldest_cursor` (accepting the gap) or from `oldest_time`.
    async fn expired_error(&self, resume: Option<i64>) -> Error {
        let mut error = Error::new(
            ErrorCode::OutOfRange,
            Reason::CursorExpired,
            "the start position is older than the oldest retained feedback log entry; \
             resume from oldest_cursor to accept the gap",
        );
        if let Ok(state) = self.log.state().await {
            let oldest_time = match self.log.oldest().await {
                Ok(Some((_, time))) => time,
                _ => state.head_time_ms,
            };
            error = error
                .with_metadata("oldest_cursor", self.log.cursor(state.pruned_seq).encode())
                .with_metadata("oldest_time", rfc3339(oldest_time));
        }
        if let Some(resume) = resume {
            error = error.with_metadata("resume_cursor", self.log.cursor(resume).encode());
        }
        error
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn shutting_down() -> Error {
    Error::new(
        ErrorCode::Unavailable,
        Reason::ServerShuttingDown,
        "the gateway is shutting down; resume from the cursor of the last message",
    )
    .with_retry_after(Duration::from_secs(1))
}

/// One of the `max_subscribers` places; given back when the stream is dropped.
struct Slot {
    hub: Arc<Hub>,
}

impl Slot {
    fn acquire(hub: &Arc<Hub>) -> Result<Slot, Error> {
        let max = hub.settings.max_subscribers;
        let taken = hub.subscribers.fetch_add(1, Ordering::AcqRel);
        if taken >= max {
            hub.subscribers.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::new(
                ErrorCode::ResourceExhausted,
                Reason::TooManySubscribers,
                format!("the gateway already serves its maximum of {max} feedback subscribers"),
            )
            .with_retry_after(Duration::from_secs(5)));
        }
        FeedbackStats::add(&hub.stats.subscribers, 1);
        Ok(Slot {
            hub: Arc::clone(hub),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.hub.subscribers.fetch_sub(1, Ordering::AcqRel);
        self.hub.stats.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The state of one subscription, advanced one message at a time by [`Subscriber::next`].
struct Subscriber {
    hub: Arc<Hub>,
    filter: Filter,
    /// Every entry up to this sequence has been examined (sent or filtered out).
    position: i64,
    receiver: broadcast::Receiver<Arc<LogEntry>>,
    catching_up: bool,
    /// Why the current (or last) catch-up started.
    cause: Cause,
    trace: Trace,
    /// The current catch-up page, oldest first.
    page: VecDeque<LogEntry>,
    last_sent: Instant,
    started: bool,
    /// The status that ends the stream after the message being returned.
    ending: Option<Error>,
    done: bool,
    deadline: Option<Instant>,
    _slot: Slot,
}

type Step = Option<(Result<Bytes, Error>, Subscriber)>;

impl Subscriber {
    async fn next(mut self) -> Step {
        if self.done {
            return None;
        }
        if let Some(error) = self.ending.take() {
            self.done = true;
            return Some((Err(error), self));
        }
        if !self.started {
            // The first message is a Heartbeat marking the start position.
            self.started = true;
            return self.heartbeat();
        }
        loop {
            if self.hub.drain.is_draining() {
                self.ending = Some(shutting_down());
                return self.heartbeat();
            }
            let now = Instant::now();
            if self.deadline.is_some_and(|deadline| now >= deadline) {
                return self.end(Error::new(
                    ErrorCode::DeadlineExceeded,
                    Reason::DeadlineExceeded,
                    "the call's deadline passed",
                ));
            }
            let heartbeat_at = self.last_sent + self.hub.settings.heartbeat_interval;
            if now >= heartbeat_at {
                return self.heartbeat();
            }
            if self.catching_up {
                if let Some(entry) = self.page.pop_front() {
                    if entry.sequence <= self.position {
                        continue;
                    }
                    self.position = entry.sequence;
                    if self.filter.matches(&entry.fields) {
                        self.trace.delivered(Source::CatchUp, entry.sequence);
                        return self.send(entry.message);
                    }
                    continue;
                }
                // A page is one batch.
                self.trace.flush();
                let target = self.hub.head();
                if self.position >= target {
                    self.caught_up();
                    continue;
                }
                match self.read_page(target).await {
                    Ok(true) => continue,
                    Ok(false) => {
                        let error = self.hub.expired_error(Some(self.position)).await;
                        return self.end(error);
                    }
                    Err(error) => return self.end(error),
                }
            }
            // A live batch ends where the subscriber would wait.
            if self.trace.pending() && self.receiver.is_empty() {
                self.trace.flush();
            }
            let drain = self.hub.drain.clone();
            let deadline = self.deadline;
            let received = tokio::select! {
                biased;
                () = drain.signaled() => None,
                () = tokio::time::sleep_until(heartbeat_at) => None,
                () = sleep_until_some(deadline) => None,
                received = self.receiver.recv() => Some(received),
            };
            match received {
                None => continue,
                Some(Ok(entry)) => {
                    if entry.sequence <= self.position {
                        continue;
                    }
                    if entry.sequence != self.position + 1 {
                        self.fall_behind();
                        continue;
                    }
                    self.position = entry.sequence;
                    if self.filter.matches(&entry.fields) {
                        self.trace.delivered(Source::Live, entry.sequence);
                        return self.send(entry.message.clone());
                    }
                }
                Some(Err(RecvError::Lagged(_))) => self.fall_behind(),
                Some(Err(RecvError::Closed)) => return self.end(shutting_down()),
            }
        }
    }

    /// Continue from the log: a fresh receiver (so the stale backlog is dropped) and catch-up.
    fn fall_behind(&mut self) {
        self.receiver = self.hub.live.subscribe();
        self.catching_up = true;
        self.cause = Cause::Overflow;
        self.page.clear();
        FeedbackStats::add(&self.hub.stats.catch_ups, 1);
        crate::telemetry::metrics().subscriber_overflows.add(1, &[]);
        self.trace
            .catch_up_started(Cause::Overflow, self.position, self.hub.head());
    }

    /// Back on the live ring after reading the log.
    fn caught_up(&mut self) {
        self.catching_up = false;
        crate::telemetry::metrics()
            .subscriber_catch_ups
            .add(1, &[KeyValue::new("cause", self.cause.name())]);
        self.trace.caught_up(self.cause, self.position);
    }

    /// Reads the next page after the position; `false` when retention deleted what comes next.
    async fn read_page(&mut self, target: i64) -> Result<bool, Error> {
        let hub = Arc::clone(&self.hub);
        let drain = hub.drain.clone();
        let _permit = tokio::select! {
            biased;
            () = drain.signaled() => return Ok(true),
            permit = hub.readers.acquire() => permit.map_err(|_| shutting_down())?,
        };
        let settings = &hub.settings;
        match hub
            .log
            .read_after(
                self.position,
                target,
                settings.catch_up_entries.max(1),
                settings.catch_up_bytes,
            )
            .await?
        {
            ReadOutcome::Expired => Ok(false),
            ReadOutcome::Entries(entries) if entries.is_empty() => {
                // Sequences are gap-free and nothing was pruned, so this cannot happen; if it
                // did, waiting on the ring is the safe way on.
                tracing::warn!(
                    position = self.position,
                    target,
                    "feedback log read found no entries below the head"
                );
                self.caught_up();
                Ok(true)
            }
            ReadOutcome::Entries(entries) => {
                self.page = entries.into();
                Ok(true)
            }
        }
    }

    fn send(mut self, message: Bytes) -> Step {
        self.last_sent = Instant::now();
        Some((Ok(message), self))
    }

    fn end(mut self, error: Error) -> Step {
        self.done = true;
        Some((Err(error), self))
    }

    fn heartbeat(mut self) -> Step {
        self.trace.flush();
        let interval = self.hub.settings.heartbeat_interval;
        let heartbeat = pb::Heartbeat {
            server_time: Some(timestamp_from_ms(self.hub.clock.now_ms())),
            cursor: self.hub.log.cursor(self.position).encode(),
            sequence: self.position,
            interval: Some(prost_types::Duration {
                seconds: i64::try_from(interval.as_secs()).unwrap_or(i64::MAX),
                // Sub-second nanoseconds are below 10^9 and fit in i32.
                nanos: i32::try_from(interval.subsec_nanos()).unwrap_or(0),
            }),
            sync_time: self.hub.sync_time_ms().map(timestamp_from_ms),
        };
        let message = pb::SubscribeResponse {
            payload: Some(pb::subscribe_response::Payload::Heartbeat(heartbeat)),
        };
        self.send(Bytes::from(message.encode_to_vec()))
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Why a subscriber reads from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// It fell behind the live ring.
    Overflow,
    /// Its start position is in the past.
    Replay,
}

impl Cause {
    fn name(self) -> &'static str {
        match self {
            Cause::Overflow => "overflow",
            Cause::Replay => "replay",
        }
    }
}

/// Where a delivered entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    CatchUp,
    Live,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::CatchUp => "catch_up",
            Source::Live => "live",
        }
    }
}

/// Span events a subscription records at most. Events stay in memory until the span ends, and
/// a stream may last for days with 10,000 of them open: beyond this, batches are only counted
/// (the totals are span attributes when the stream ends).
const MAX_SPAN_EVENTS: u32 = 16;

/// A live batch is reported after this many items even if more are ready at once.
const MAX_BATCH_ITEMS: u64 = 1000;

/// What one subscription delivers, reported on the span it was opened in (see the module
/// documentation). Inert unless that span is exported.
struct Trace {
    span: tracing::Span,
    on: bool,
    /// Span events recorded so far.
    events: u32,
    /// The batch being collected: its source, size and sequences.
    source: Source,
    items: u64,
    first: i64,
    last: i64,
    delivered: u64,
    batches: u64,
    catch_ups: u64,
}

impl Trace {
    fn new(span: tracing::Span, start: Start, position: i64) -> Trace {
        // Checked once per subscription: a span that is not exported (no collector, not
        // sampled, or no span at all) makes every other call here a flag test.
        let on = crate::telemetry::traces_exported() && span.context().span().is_recording();
        if on {
            let start = match start {
                Start::Latest => "latest",
                Start::Earliest => "earliest",
                Start::After(_) => "cursor",
                Start::Time(_) => "time",
            };
            span.set_attribute("feedback.start", start);
            span.set_attribute("feedback.sequence.start", position);
        }
        Trace {
            span,
            on,
            events: 0,
            source: Source::Live,
            items: 0,
            first: 0,
            last: 0,
            delivered: 0,
            batches: 0,
            catch_ups: 0,
        }
    }

    fn pending(&self) -> bool {
        self.items > 0
    }

    fn delivered(&mut self, source: Source, sequence: i64) {
        if !self.on {
            return;
        }
        if self.items > 0 && self.source != source {
            self.flush();
        }
        if self.items == 0 {
            self.source = source;
            self.first = sequence;
        }
        self.items += 1;
        self.last = sequence;
        if self.items >= MAX_BATCH_ITEMS {
            self.flush();
        }
    }

    /// Reports the batch collected so far, if any.
    fn flush(&mut self) {
        if self.items == 0 {
            return;
        }
        self.batches += 1;
        self.delivered += self.items;
        let attributes = vec![
            KeyValue::new("feedback.items", self.items as i64),
            KeyValue::new("feedback.sequence.first", self.first),
            KeyValue::new("feedback.sequence.last", self.last),
            KeyValue::new("feedback.source", self.source.name()),
        ];
        self.items = 0;
        self.event("feedback.batch", attributes);
    }

    fn catch_up_started(&mut self, cause: Cause, from: i64, head: i64) {
        if !self.on {
            return;
        }
        self.flush();
        self.catch_ups += 1;
        self.event(
            "feedback.catch_up",
            vec![
                KeyValue::new("feedback.catch_up.cause", cause.name()),
                KeyValue::new("feedback.sequence.from", from),
                KeyValue::new("feedback.sequence.head", head),
            ],
        );
    }

    fn caught_up(&mut self, cause: Cause, position: i64) {
        if !self.on {
            return;
        }
        self.flush();
        self.event(
            "feedback.caught_up",
            vec![
                KeyValue::new("feedback.catch_up.cause", cause.name()),
                KeyValue::new("feedback.sequence.to", position),
            ],
        );
    }

    fn event(&mut self, name: &'static str, attributes: Vec<KeyValue>) {
        if self.events < MAX_SPAN_EVENTS {
            self.events += 1;
            self.span.add_event(name, attributes);
        }
    }
}

impl Drop for Trace {
    /// The stream ended: the last batch, and the totals (which also cover the batches beyond
    /// [`MAX_SPAN_EVENTS`]).
    fn drop(&mut self) {
        if !self.on {
            return;
        }
        self.flush();
        self.span
            .set_attribute("feedback.items.delivered", self.delivered as i64);
        self.span
            .set_attribute("feedback.batches", self.batches as i64);
        self.span
            .set_attribute("feedback.catch_ups", self.catch_ups as i64);
    }
}
