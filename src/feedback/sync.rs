//! The incremental poller of Retently's feedback list, one per Retently account.
//!
//! Each poll asks `GET /feedback` for responses created at or after the checkpoint minus an
//! overlap window (`startDate`, `sort=createdDate`, `limit=1000`) and pages until done. The
//! checkpoint is the latest `createdDate` seen (the upstream's own clock, so the gateway's clock
//! skew does not matter); the overlap catches responses that share a timestamp with the
//! checkpoint or became visible late. Responses seen again are deduplicated by the log, so an
//! idle poll costs one upstream request and appends nothing.
//!
//! Retently has no "updated since" filter, and a response's `createdDate` never changes when its
//! tags, topics or status do. Changes to responses inside the overlap window are seen by every
//! poll; to see changes to older ones, a rescan of a longer recent window
//! ([`SyncSettings::rescan_window`]) runs every [`SyncSettings::rescan_interval`].
//!
//! Every request runs through the upstream scheduler at background priority, so the poller uses
//! the share of the budget its interval implies (one request per idle poll) and yields to
//! interactive callers. Its state (checkpoint, covered range, watermark) is a JSON value in
//! `sync_cursors`, written in the same transaction as the responses of each page.
//!
//! Replicas sharing one database run one poller in all: a replica polls only while it holds the
//! poller's lease ([`super::leader`]), reads the state from the store each time it takes the
//! lease, and writes every page and checkpoint under the lease's fence, so a replica that lost
//! the lease can neither append nor move the checkpoint back. A replica that takes the lease
//! over polls at once (after its own first interval since start).
//!
//! Each poll (and rescan) is a root span `feedback.sync.poll` — it runs on its own, under no
//! RPC — whose upstream attempts are its children, with what it read: requests, items found,
//! new, updated, unchanged and malformed ones, and its outcome; the same counts feed the
//! `cxgw.feedback.sync.*` metrics.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use super::clock::Clock;
use super::convert::{ConvertError, feedback_to_pb};
use super::hub::Hub;
use super::ingest::{Checkpoint, Ingest};
use super::leader::{Leadership, Term};
use super::log::{Observed, Origin};
use super::stats::FeedbackStats;
use crate::backoff::{FailureStreak, failed_warn};
use crate::error::Error;
use crate::shutdown::Drain;
use crate::store::Store;
use crate::store::leases::UnderLease;
use crate::upstream::CallContext;
use crate::upstream::retently::{self, FeedbackQuery, PageRequest, RetentlyApi};

/// The name of the poller's row in `sync_cursors`, and of its lease.
pub const CURSOR_NAME: &str = "feedback.retently";

/// Retently's largest page.
pub const PAGE_LIMIT: u32 = 1000;

/// One request of the feedback list, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// `startDate`: responses created at or after this instant.
    pub start: DateTime<Utc>,
    /// `page`, from 1.
    pub page: u32,
    /// `limit`.
    pub limit: u32,
}

/// One page of the feedback list.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    /// `data.responses`.
    pub items: Vec<retently::Feedback>,
    /// `data.page`.
    pub page: u32,
    /// `data.pages` (0 when there is nothing).
    pub pages: u32,
}

/// Where the poller reads feedback from: Retently's `GET /feedback` through the scheduler at
/// background priority, sorted by `createdDate` ascending.
pub trait FeedbackSource: Send + Sync + 'static {
    fn list_feedback(
        &self,
        query: ListQuery,
    ) -> Pin<Box<dyn Future<Output = Result<ListPage, Error>> + Send + '_>>;
}

#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Time between the end of one poll and the start of the next.
    pub poll_interval: Duration,
    /// How far before the checkpoint each poll starts.
    pub overlap: Duration,
    /// How far back the very first poll of an empty data directory starts.
    pub backfill: Duration,
    /// How often the recent window is read again to see changed responses; `None`: never.
    pub rescan_interval: Option<Duration>,
    pub rescan_window: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            poll_interval: Duration::from_secs(10),
            overlap: Duration::from_secs(300),
            backfill: Duration::from_secs(24 * 3600),
            rescan_interval: Some(Duration::from_secs(15 * 60)),
            rescan_window: Duration::from_secs(24 * 3600),
        }
    }
}

/// The Retently account through its scheduler, at background priority: the poller waits for
/// budget left by interactive callers, within the scheduler's queue bound.
impl FeedbackSource for RetentlyApi {
    fn list_feedback(
        &self,
        query: ListQuery,
    ) -> Pin<Box<dyn Future<Output = Result<ListPage, Error>> + Send + '_>> {
        Box::pin(async move {
            let page = RetentlyApi::list_feedback(
                self,
                &CallContext::background().with_caller("feedback-sync"),
                FeedbackQuery {
                    start_date: Some(query.start),
                    page: PageRequest {
                        page: Some(query.page),
                        limit: Some(query.limit),
                        sort: Some("createdDate".to_owned()),
                    },
                    ..FeedbackQuery::default()
                },
            )
            .await?;
            Ok(ListPage {
                pages: page.pages.unwrap_or(if page.has_more() {
                    page.page.saturating_add(1)
                } else {
                    page.page
                }),
                page: page.page,
                items: page.items,
            })
        })
    }
}

/// The poller's durable state (JSON in `sync_cursors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// The latest `createdDate` seen (UNIX milliseconds, the upstream's clock).
    pub checkpoint_ms: i64,
    /// Where the first poll of this data directory started: every response created since is
    /// in the log.
    pub covered_from_ms: i64,
    /// The start of the last complete poll: responses Retently recorded before it have been
    /// read. `None` before the first one.
    pub synced_to_ms: Option<i64>,
    /// When the last complete rescan started.
    pub rescanned_at_ms: Option<i64>,
}

impl SyncState {
    pub async fn load(store: &Store) -> Result<Option<SyncState>, Error> {
        let raw = store.cursors().get(CURSOR_NAME).await?;
        Ok(raw.and_then(|raw| match serde_json::from_str(&raw) {
            Ok(state) => Some(state),
            Err(error) => {
                tracing::warn!(%error, "unreadable feedback sync state, starting over");
                None
            }
        }))
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            name: CURSOR_NAME.to_owned(),
            // Serialising a struct of integers cannot fail.
            value: serde_json::to_string(self).unwrap_or_default(),
        }
    }
}

/// Creation times the log mirrors completely, up to the sync watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoveredRange {
    /// Every response created at or after this instant (UNIX milliseconds)...
    pub from_ms: i64,
    /// ...and before this one is in the log.
    pub to_ms: i64,
}

impl CoveredRange {
    /// Whether every response created in `[from_ms, before_ms)` is in the log.
    pub fn contains(&self, from_ms: i64, before_ms: i64) -> bool {
        from_ms >= self.from_ms && before_ms <= self.to_ms
    }
}

/// The poller. Runs until draining starts.
pub struct Poller {
    pub source: Arc<dyn FeedbackSource>,
    pub ingest: Ingest,
    pub hub: Arc<Hub>,
    pub store: Store,
    pub settings: SyncSettings,
    pub clock: Clock,
    pub stats: Arc<FeedbackStats>,
    pub drain: Drain,
    /// The poller polls only while this replica holds the lease.
    pub leadership: Leadership,
}

/// What a completed read of the list stands for.
#[derive(Debug, Clone, Copy)]
struct Read {
    /// It started at the checkpoint (minus the overlap): it moves the sync watermark.
    incremental: bool,
    /// It covered the whole rescan window.
    rescan: bool,
}

impl Read {
    /// The `kind` attribute of the poll's span and metrics.
    fn kind(self) -> &'static str {
        if self.incremental {
            "incremental"
        } else {
            "rescan"
        }
    }
}

/// One poll: the list read from `start_ms` on, begun at `started_ms` (the instant the sync and
/// rescan watermarks move to once it completes), and what the read stands for.
#[derive(Debug, Clone, Copy)]
struct Pass {
    start_ms: i64,
    started_ms: i64,
    read: Read,
}

/// What one poll did, for its span and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollTally {
    /// Upstream list requests (pages) made.
    pub requests: u64,
    /// Items the upstream listed.
    pub found: u64,
    /// Items appended to the log as new responses.
    pub new: u64,
    /// Items appended as new versions of known responses.
    pub updated: u64,
    pub unchanged: u64,
    /// Items skipped as unreadable.
    pub malformed: u64,
    /// Draining started, or the poller lost its lease, before the poll finished.
    pub interrupted: bool,
}

/// The longest wait between polls while they keep failing.
const MAX_FAILED_POLL_DELAY: Duration = Duration::from_secs(120);

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Poller {
    pub async fn run(self) {
        // Polls come one interval apart, the first one interval after start: a gateway that
        // just started serves its first calls before it spends CPU, store reads and budget on
        // the sync, and after a restart the sync is no later than it is in steady state.
        tokio::select! {
            () = tokio::time::sleep(self.settings.poll_interval) => {}
            () = self.drain.clone().signaled() => return,
        }
        loop {
            let Some(term) = self.leadership.acquire().await else {
                return;
            };
            self.lead(&term).await;
            self.leadership.end(term).await;
            if self.drain.is_draining() {
                return;
            }
        }
    }

    /// Polls while `term` lasts (or until draining starts), from the state in the store.
    async fn lead(&self, term: &Term) {
        // A poll that fails again and again (upstream down, store full) waits longer each time, up
        // to this, and its warning is rate-limited.
        let mut failures = FailureStreak::new(
            self.settings.poll_interval,
            self.settings.poll_interval.max(MAX_FAILED_POLL_DELAY),
        );
        let mut state = loop {
            match SyncState::load(&self.store).await {
                Ok(Some(state)) => break state,
                Ok(None) => {
                    let start = self
                        .clock
                        .now_ms()
                        .saturating_sub(ms(self.settings.backfill));
                    break SyncState {
                        checkpoint_ms: start,
                        covered_from_ms: start,
                        synced_to_ms: None,
                        rescanned_at_ms: None,
                    };
                }
                Err(error) => {
                    let failure = failed_warn!(
                        failures,
                        error,
                        "cannot read the feedback sync state, retrying"
                    );
                    if self.pause_for(failure.delay, term).await {
                        return;
                    }
                }
            }
        };
        failures.succeeded();
        self.hub.set_sync_time(state.synced_to_ms);
        tracing::info!(
            checkpoint_ms = state.checkpoint_ms,
            interval = %humantime::format_duration(self.settings.poll_interval),
            "feedback sync started"
        );
        loop {
            if self.drain.is_draining() || term.is_lost() {
                return;
            }
            let started_ms = self.clock.now_ms();
            // Nothing created before the covered range is wanted (the first polls after start).
            let start_ms = state
                .checkpoint_ms
                .saturating_sub(ms(self.settings.overlap))
                .max(state.covered_from_ms);
            // A poll reaching back over the whole rescan window (the first ones after start)
            // is a rescan too.
            let covers_rescan = self.settings.rescan_interval.is_some()
                && start_ms <= started_ms.saturating_sub(ms(self.settings.rescan_window));
            let read = Read {
                incremental: true,
                rescan: covers_rescan,
            };
            let mut retry_in = None;
            let polled = self
                .traced_poll(
                    &mut state,
                    Pass {
                        start_ms,
                        started_ms,
                        read,
                    },
                    term,
                )
                .await;
            if term.is_lost() {
                return;
            }
            match polled {
                Ok(()) => {
                    let failed = failures.succeeded();
                    if failed > 0 {
                        tracing::info!(failures = failed, "feedback polls work again");
                    }
                    FeedbackStats::add(&self.stats.polls, 1);
                    if covers_rescan {
                        FeedbackStats::add(&self.stats.rescans, 1);
                    }
                    self.hub.set_sync_time(state.synced_to_ms);
                }
                Err(error) => {
                    FeedbackStats::add(&self.stats.poll_failures, 1);
                    let failure = failed_warn!(
                        failures,
                        error,
                        retry_in_ms,
                        "feedback poll failed, retrying later"
                    );
                    retry_in = Some(failure.delay);
                }
            }
            if let Some(every) = self.settings.rescan_interval {
                let due = state
                    .rescanned_at_ms
                    .is_none_or(|last| started_ms.saturating_sub(last) >= ms(every));
                if due && !self.drain.is_draining() {
                    let from = started_ms
                        .saturating_sub(ms(self.settings.rescan_window))
                        .max(state.covered_from_ms);
                    let read = Read {
                        incremental: false,
                        rescan: true,
                    };
                    match self
                        .traced_poll(
                            &mut state,
                            Pass {
                                start_ms: from,
                                started_ms,
                                read,
                            },
                            term,
                        )
                        .await
                    {
                        Ok(()) => FeedbackStats::add(&self.stats.rescans, 1),
                        Err(error) => {
                            FeedbackStats::add(&self.stats.poll_failures, 1);
                            tracing::warn!(%error, "feedback rescan failed, retrying later");
                        }
                    }
                }
            }
            let wait = retry_in.map_or(self.settings.poll_interval, |delay| {
                delay.max(self.settings.poll_interval)
            });
            if self.pause_for(wait, term).await {
                return;
            }
        }
    }

    /// Waits `wait`; `true` when draining started or the term ended meanwhile.
    async fn pause_for(&self, wait: Duration, term: &Term) -> bool {
        tokio::select! {
            () = tokio::time::sleep(wait) => self.drain.is_draining() || term.is_lost(),
            () = self.drain.clone().signaled() => true,
            () = term.lost() => true,
        }
    }

    /// [`Poller::poll`] in its own root span, recording what it did on the span and in the
    /// metrics.
    async fn traced_poll(
        &self,
        state: &mut SyncState,
        pass: Pass,
        term: &Term,
    ) -> Result<(), Error> {
        let kind = pass.read.kind();
        let span = tracing::info_span!(
            parent: None,
            "feedback.sync.poll",
            feedback.poll.kind = kind,
            feedback.poll.requests = tracing::field::Empty,
            feedback.items.found = tracing::field::Empty,
            feedback.items.new = tracing::field::Empty,
            feedback.items.updated = tracing::field::Empty,
            feedback.items.unchanged = tracing::field::Empty,
            feedback.items.malformed = tracing::field::Empty,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let mut tally = PollTally::default();
        let result = self
            .poll(state, pass, term, &mut tally)
            .instrument(span.clone())
            .await;
        let outcome = match &result {
            Ok(()) if tally.interrupted => "interrupted",
            Ok(()) => "ok",
            Err(error) => {
                // The reason is a fixed code; the message may quote the upstream.
                span.record("error.type", error.reason().as_str());
                span.record("otel.status_code", "ERROR");
                "failed"
            }
        };
        span.record("feedback.poll.requests", tally.requests);
        span.record("feedback.items.found", tally.found);
        span.record("feedback.items.new", tally.new);
        span.record("feedback.items.updated", tally.updated);
        span.record("feedback.items.unchanged", tally.unchanged);
        span.record("feedback.items.malformed", tally.malformed);
        span.record("outcome", outcome);
        let metrics = crate::telemetry::metrics();
        metrics.feedback_polls.add(
            1,
            &[
                KeyValue::new("kind", kind),
                KeyValue::new("outcome", outcome),
            ],
        );
        for (outcome, count) in [
            ("new", tally.new),
            ("updated", tally.updated),
            ("unchanged", tally.unchanged),
            ("malformed", tally.malformed),
        ] {
            if count > 0 {
                metrics
                    .feedback_items
                    .add(count, &[KeyValue::new("outcome", outcome)]);
            }
        }
        result
    }

    /// Reads every page from `start_ms` on and hands each to the log with the advanced state,
    /// under the term's fence. Stops early (`interrupted`) when draining starts or the term
    /// ends.
    async fn poll(
        &self,
        state: &mut SyncState,
        pass: Pass,
        term: &Term,
        tally: &mut PollTally,
    ) -> Result<(), Error> {
        let Pass {
            start_ms,
            started_ms,
            read,
        } = pass;
        let start = DateTime::from_timestamp_millis(start_ms).unwrap_or_default();
        let mut page = 1u32;
        loop {
            let query = ListQuery {
                start,
                page,
                limit: PAGE_LIMIT,
            };
            FeedbackStats::add(&self.stats.poll_requests, 1);
            tally.requests += 1;
            let listed = tokio::select! {
                biased;
                () = self.drain.clone().signaled() => {
                    tally.interrupted = true;
                    return Ok(());
                }
                () = term.lost() => {
                    tally.interrupted = true;
                    return Ok(());
                }
                listed = self.source.list_feedback(query) => listed?,
            };
            tally.found += listed.items.len() as u64;
            // The state advances only once the page is stored, so a failed write is read again.
            let mut next = *state;
            let mut observations = Vec::with_capacity(listed.items.len());
            for item in &listed.items {
                match feedback_to_pb(item) {
                    Ok(feedback) => {
                        let observed = Observed::new(&feedback);
                        next.checkpoint_ms = next.checkpoint_ms.max(observed.create_time_ms);
                        observations.push(observed);
                    }
                    Err(error) => {
                        tally.malformed += 1;
                        self.malformed(error);
                    }
                }
            }
            let last = page >= listed.pages || listed.items.len() < PAGE_LIMIT as usize;
            if last {
                if read.rescan {
                    next.rescanned_at_ms = Some(started_ms);
                }
                if read.incremental {
                    next.synced_to_ms = Some(started_ms);
                }
            }
            let submitted = self
                .ingest
                .submit_fenced(
                    Origin::Poll,
                    observations,
                    Some(next.checkpoint()),
                    term.fence().clone(),
                )
                .await?;
            let UnderLease::Done(counts) = submitted else {
                term.taken_over();
                tally.interrupted = true;
                return Ok(());
            };
            tally.new += counts.created;
            tally.updated += counts.updated;
            tally.unchanged += counts.unchanged;
            *state = next;
            if last {
                return Ok(());
            }
            page += 1;
        }
    }

    fn malformed(&self, error: ConvertError) {
        FeedbackStats::add(&self.stats.malformed_items, 1);
        // The item itself may hold personal data; only the kind of problem is logged.
        tracing::warn!(%error, "skipping an unreadable feedback item");
    }
}
