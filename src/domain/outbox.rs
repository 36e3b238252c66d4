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
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::backoff::{Backoff, FailureStreak, LogLimit, failed_error};
use crate::domain::{Owner, Visibility};
use crate::error::{Error, ErrorCode, Reason};
use crate::readiness::Readiness;
use crate::shutdown::Drain;
use crate::store::outbox::{
    AttemptRecord, ClaimedDelivery, DeadLetterFilter, OutboxStore, QueuedDelivery, RequeueOutcome,
};
use crate::store::{IdempotencyRecord, Store};

pub use crate::store::outbox::{
    DeadLetterPage, DeliveryError, DeliveryRecord, DeliveryState, RetrySelection,
};

impl From<&Error> for DeliveryError {
    fn from(error: &Error) -> Self {
        DeliveryError {
            code: error.code(),
            reason: error.reason(),
            message: error.message().to_owned(),
            metadata: error.metadata().clone(),
        }
    }
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
        metadata.insert("cause".to_owned(), cause.reason.as_str().to_owned());
    }
    DeliveryError {
        code: ErrorCode::Aborted,
        reason: Reason::DeliveryInDoubt,
        message: message.to_owned(),
        metadata,
    }
}

const IN_DOUBT_AFTER_FAILURE: &str = "the upstream may have applied this write before it failed; \
    it was not sent again (requeue it once checked)";
const IN_DOUBT_UNVERIFIED: &str = "the upstream may have applied this write and its history \
    could not be checked within the retry window; it was not sent again (requeue it once checked)";

/// One attempt of a claimed delivery, as an [`Executor`] gets it.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryAttempt<'a> {
    /// The RPC it came from, which tells how to read `request`.
    pub method: &'a str,
    pub request: &'a [u8],
    /// Goes into the result the RPC reports.
    pub delivery_id: &'a str,
    /// An earlier attempt (or one cut by a stop) may have applied part of it from then on: the
    /// upstream's history is checked first (see [`Attempt::Unresolved`]).
    pub verify_since_ms: Option<i64>,
    /// Who queued it: a caller's delivery runs on that caller's quota and fair share.
    pub owner: &'a Owner,
}

/// Replays queued writes. Implemented by the gRPC layer, which owns the request encoding.
#[tonic::async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Attempts the delivery once.
    async fn execute(&self, delivery: DeliveryAttempt<'_>) -> Attempt;
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryResult {
    pub delivery_id: String,
    pub requeued: bool,
    /// Why it was not requeued.
    pub error: Option<DeliveryError>,
}

/// A write to queue, as the write path describes it: owned by the domain's [`Owner`]. The
/// customers it touches (`ordering_keys`) order it; see the module doc.
pub type NewDelivery = crate::store::outbox::NewDelivery<Owner>;

#[derive(Clone)]
pub struct Outbox {
    store: Arc<dyn OutboxStore>,
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

/// A fresh delivery id: 128 random bits, so ids are unguessable and never collide in practice.
pub fn new_delivery_id() -> String {
    let bits: u128 = rand::rng().random();
    format!("dlv_{bits:032x}")
}

impl Outbox {
    pub fn new(store: Store, settings: OutboxSettings) -> Outbox {
        Outbox {
            store: Arc::clone(store.outbox()),
            settings: Arc::new(settings),
            wake: Arc::new(Notify::new()),
            outcomes: Arc::new(watch::channel(0).0),
        }
    }

    /// Wakes the worker after deliveries were queued by an operation of another store concern
    /// (the alert store's, which queues alerts together with its own state).
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

    /// Queues `delivery` and returns once it is durable. `remember` (the idempotency record of
    /// the call) is committed in the same transaction, so a crash never keeps one without the
    /// other.
    pub async fn enqueue_with(
        &self,
        delivery_id: String,
        delivery: NewDelivery,
        remember: Option<IdempotencyRecord>,
    ) -> Result<String, Error> {
        let expire_ms = now_ms().saturating_add(millis(self.settings.retry_window));
        let method = delivery.method.clone();
        let span = tracing::info_span!(
            "outbox.enqueue",
            method = %method,
            items = delivery.item_count,
        );
        let traceparent = crate::telemetry::propagation::traceparent(&span);
        let queued = QueuedDelivery {
            delivery_id: delivery_id.clone(),
            delivery: delivery.map_owner(|owner| owner.stored().to_owned()),
            expire_ms,
            traceparent,
        };
        self.store
            .enqueue(queued, remember)
            .instrument(span)
            .await?;
        crate::telemetry::metrics()
            .outbox_enqueued
            .add(1, &[opentelemetry::KeyValue::new("method", method)]);
        self.wake.notify_one();
        Ok(delivery_id)
    }

    pub async fn enqueue(&self, delivery: NewDelivery) -> Result<String, Error> {
        self.enqueue_with(new_delivery_id(), delivery, None).await
    }

    /// The delivery with this id, if `visibility` lets the caller see it.
    pub async fn get(
        &self,
        delivery_id: &str,
        visibility: &Visibility,
    ) -> Result<Option<DeliveryRecord>, Error> {
        Ok(self
            .store
            .get(delivery_id, visibility.owner_filter())
            .await?)
    }

    /// Dead letters `visibility` lets the caller see, in the order they were acknowledged, after
    /// `after` (a position from a previous page, 0 for the first).
    pub async fn dead_letters(
        &self,
        method: Option<String>,
        destination: Option<i32>,
        visibility: &Visibility,
        after: i64,
        limit: usize,
    ) -> Result<DeadLetterPage, Error> {
        let filter = DeadLetterFilter {
            method,
            destination,
            visible_to: visibility.owner_filter(),
        };
        Ok(self.store.dead_letters(filter, after, limit).await?)
    }

    /// Requeues the dead letters `visibility` lets the caller see: a fresh retry window,
    /// attempts from now. An id the caller may not see is reported as not found, so ids of other
    /// callers' deliveries cannot be probed.
    pub async fn retry_dead_letters(
        &self,
        selection: RetrySelection,
        visibility: &Visibility,
    ) -> Result<Vec<RetryResult>, Error> {
        let outcomes = self
            .store
            .requeue_dead_letters(
                selection,
                visibility.owner_filter(),
                self.settings.retry_window,
            )
            .await?;
        self.wake.notify_one();
        Ok(outcomes
            .into_iter()
            .map(|(delivery_id, outcome)| RetryResult {
                delivery_id,
                requeued: outcome == RequeueOutcome::Requeued,
                error: match outcome {
                    RequeueOutcome::Requeued => None,
                    RequeueOutcome::NotDeadLettered => Some(DeliveryError {
                        code: ErrorCode::FailedPrecondition,
                        reason: Reason::DeliveryNotDeadLettered,
                        message: "the delivery is not in the dead-letter list".to_owned(),
                        metadata: HashMap::new(),
                    }),
                    RequeueOutcome::NotFound => Some(DeliveryError {
                        code: ErrorCode::NotFound,
                        reason: Reason::DeliveryNotFound,
                        message: "no delivery has this id".to_owned(),
                        metadata: HashMap::new(),
                    }),
                },
            })
            .collect())
    }

    /// Number of deliveries not finished yet, and of dead letters.
    pub async fn depth(&self) -> Result<(i64, i64), Error> {
        let depth = self.store.depth().await?;
        Ok((depth.unfinished, depth.dead_lettered))
    }

    /// When the oldest delivery not finished yet was accepted (milliseconds since the epoch), or
    /// `None` when nothing is waiting: its age is how far behind delivery runs, which the depth
    /// alone cannot tell (a deep queue that drains fast is healthy, one old entry is not).
    pub async fn oldest_pending_ms(&self) -> Result<Option<i64>, Error> {
        Ok(self.store.oldest_unfinished_ms().await?)
    }

    /// Puts deliveries that were in flight when the gateway stopped back in the queue, or in the
    /// dead-letter list when sending them again could duplicate them (see the module doc).
    pub async fn recover(&self) -> Result<(usize, usize), Error> {
        let in_doubt = in_doubt_error(
            None,
            "the gateway stopped while this write was being sent; the upstream may have applied \
             it, so it was not sent again (requeue it once checked)",
        );
        let recovered = self
            .store
            .recover(&self.settings.verifiable_methods, in_doubt)
            .await?;
        Ok((recovered.requeued, recovered.in_doubt))
    }

    /// Puts a delivery whose attempt was refused by a drain back in the queue, due at once: the
    /// next start sends it.
    async fn requeue(&self, delivery_id: String, error: DeliveryError) -> Result<(), Error> {
        Ok(self.store.return_to_pending(&delivery_id, error).await?)
    }

    /// Claims up to `limit` deliveries that are due and not blocked by an older unfinished
    /// delivery for the same customer, marking them in flight (durably) before they are sent.
    async fn claim(&self, limit: usize) -> Result<Vec<ClaimedDelivery>, Error> {
        Ok(self.store.claim(limit).await?)
    }

    /// When the next delivery becomes due, if any is waiting.
    async fn next_due_ms(&self) -> Result<Option<i64>, Error> {
        Ok(self.store.next_due_ms().await?)
    }

    /// Records an attempt's outcome: what it means for the delivery is decided here, the retry
    /// window is checked by the store in the same transaction as the update.
    async fn complete(
        &self,
        delivery_id: String,
        attempts: u32,
        attempt: Attempt,
    ) -> Result<(), Error> {
        let delay = |error: &DeliveryError, retry_after: Option<Duration>| {
            let mut hint = retry_after.unwrap_or_default();
            // A caller's quota is the gateway's own rule, which a reload of the callers file can
            // raise at once: a delivery it refused asks again within the longest backoff rather
            // than waiting out the whole quota window (its refusals cost no upstream request).
            if error.reason == Reason::CallerQuotaExceeded {
                hint = hint.min(self.settings.max_backoff);
            }
            hint.max(backoff(&self.settings, attempts))
        };
        let record = match attempt {
            Attempt::Delivered { result } => AttemptRecord::Delivered { result },
            Attempt::Failed { error } => AttemptRecord::DeadLetter { error },
            Attempt::InDoubt { error } => AttemptRecord::DeadLetter {
                error: in_doubt_error(Some(&error), IN_DOUBT_AFTER_FAILURE),
            },
            // Past the window, an earlier attempt that may have applied it and was never checked
            // leaves a doubt that outlives this attempt's plain failure.
            Attempt::Retry { error, retry_after } => AttemptRecord::Retry {
                unverified: in_doubt_error(Some(&error), IN_DOUBT_UNVERIFIED),
                delay: delay(&error, retry_after),
                error,
                verify_since_ms: None,
            },
            Attempt::Unresolved {
                error,
                since_ms,
                retry_after,
            } => AttemptRecord::Retry {
                unverified: in_doubt_error(Some(&error), IN_DOUBT_UNVERIFIED),
                delay: delay(&error, retry_after),
                error,
                verify_since_ms: Some(since_ms),
            },
        };
        Ok(self.store.record_attempt(&delivery_id, record).await?)
    }

    /// Deletes finished deliveries past their retention.
    pub async fn prune(&self) -> Result<usize, Error> {
        Ok(self
            .store
            .prune(
                self.settings.delivered_retention,
                self.settings.dead_letter_retention,
            )
            .await?)
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
                    let delay = failed_error!(
                        streak,
                        error,
                        retry_in_ms,
                        "cannot recover in-flight deliveries, not ready until this succeeds"
                    )
                    .delay;
                    // After the line, so whoever sees the stage change finds the reason logged.
                    readiness.mark_retrying();
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
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
                        let delay =
                            failed_error!(claims, error, retry_in_ms, "cannot claim deliveries")
                                .delay;
                        // A delivery queued meanwhile proves the store takes writes again.
                        tokio::select! {
                            () = self.wake.notified() => {}
                            () = tokio::time::sleep(delay) => {}
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
                    let failure = failed_error!(reads, error, "cannot read the outbox");
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
        claimed: ClaimedDelivery,
        drain: Drain,
        outcome_log: Arc<LogLimit>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let ClaimedDelivery {
            delivery_id,
            method,
            request,
            attempts,
            traceparent,
            verify_since_ms,
            owner,
        } = claimed;
        let owner = Owner::from_stored(owner.as_deref());
        let outbox = self.clone();
        // Each attempt is a trace of its own: the call that queued it has long returned.
        // It links to the span that queued it, so the two traces are one click apart.
        let span = tracing::info_span!(
            parent: None,
            "outbox.delivery",
            otel.kind = "consumer",
            method = %method,
            attempt = attempts,
            caller = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        if let Owner::Caller(name) = &owner {
            span.record("caller", &**name);
        }
        if let Some(enqueued) = traceparent
            .as_deref()
            .and_then(crate::telemetry::propagation::parse_traceparent)
        {
            span.add_link(enqueued);
        }
        async move {
            let attempt = executor
                .execute(DeliveryAttempt {
                    method: &method,
                    request: &request,
                    delivery_id: &delivery_id,
                    verify_since_ms,
                    owner: &owner,
                })
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
