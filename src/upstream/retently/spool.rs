//! Survey batches shared by every replica on one database.
//!
//! One replica batches its own callers' survey sends into `POST /survey` calls of up to 100
//! recipients. Replicas that each batched their own share of a crowd would each send a partial
//! batch of their own (three replicas, 1,000 recipients: 12 calls where one replica makes 10).
//! So on a shared store every replica hands its single-recipient sends to one sender: it spools
//! the send ([`SurveySpoolStore`]) and waits for the answer, and the replica holding the
//! account's sender lease claims what is spooled, sends it through its own batcher (the same
//! natural batching, priorities and fair shares as one replica's callers get, each send
//! scheduled as its caller's) and records each recipient's answer.
//!
//! - **Wake-ups**: spooling wakes the sender and answering wakes the waiters (`LISTEN/NOTIFY`);
//!   both also look every [`POLL`], which is the truth when a wake-up is lost.
//! - **One round trip per waiter batch**: a replica collects the answers of all its waiting
//!   sends in one statement per wake-up.
//! - **Deadlines**: a send still spooled when its caller's deadline passes is withdrawn and the
//!   caller gets the budget's `RESOURCE_EXHAUSTED`, as in one replica's open batch; a claimed one
//!   is answered by the sender, whose batcher bounds its attempts by the same deadline.
//! - **Failure**: a sender that dies or loses its lease leaves its claimed sends unanswered; once
//!   another replica holds the lease (a new epoch), their waiters get `UNAVAILABLE`
//!   (`SURVEY_SENDER_LOST`, possibly applied: a repeat could survey twice, so the outbox checks
//!   the sent-survey history first). Sends still pending go out with the next sender. With the
//!   store unreachable nothing is spooled: the caller gets `UNAVAILABLE` with `RetryInfo`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{CustomerInput, RetentlyApi, SurveyOutcome, SurveyRequest};
use crate::backoff::FailureStreak;
use crate::error::{Error, ErrorCode, FieldViolation, Reason, Result};
use crate::shutdown::Drain;
use crate::store::LeaseStore;
use crate::store::leases::{Fence, UnderLease};
use crate::store::survey_spool::{SpoolAnswer, SpoolEntry, SurveySpoolStore};
use crate::upstream::context::{CallContext, Priority};
use crate::upstream::failure::FailureClass;

/// How often waiters and the sender look at the spool when no wake-up came.
const POLL: Duration = Duration::from_millis(250);
/// Pending sends the sender claims per statement.
const CLAIM_PAGE: usize = 500;
/// Answers recorded per statement.
const ANSWER_PAGE: usize = 500;
/// How long a waiter whose deadline passed still waits for the answer of a claimed send (the
/// sender bounds its attempts by the same deadline, so the answer is due about then).
const CLAIMED_GRACE: Duration = Duration::from_secs(10);
/// Answers older than this whose waiter never came for them (its replica died) are removed.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);
/// How often the sender removes them.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Backoff of the collector and the sender while the store fails.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where a survey send batches (as `SurveyKey`), in the spool.
#[derive(Debug, Serialize, Deserialize)]
struct SpooledKey {
    campaign_id: String,
    delay_days: Option<u32>,
}

/// A spooled send's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum SpooledAnswer {
    Sent {
        outcome: SurveyOutcome,
    },
    Failed {
        code: ErrorCode,
        reason: Reason,
        message: String,
        violations: Vec<(String, String)>,
        retry_after_ms: Option<u64>,
        metadata: HashMap<String, String>,
        failure_class: Option<String>,
    },
}

fn class_name(class: FailureClass) -> &'static str {
    match class {
        FailureClass::Refused => "refused",
        FailureClass::Unavailable => "unavailable",
        FailureClass::NotSent => "not_sent",
        FailureClass::PossiblyApplied => "possibly_applied",
        FailureClass::CredentialsRejected => "credentials_rejected",
        FailureClass::Permanent => "permanent",
    }
}

fn class_named(name: &str) -> Option<FailureClass> {
    [
        FailureClass::Refused,
        FailureClass::Unavailable,
        FailureClass::NotSent,
        FailureClass::PossiblyApplied,
        FailureClass::CredentialsRejected,
        FailureClass::Permanent,
    ]
    .into_iter()
    .find(|class| class_name(*class) == name)
}

impl SpooledAnswer {
    fn of(result: &Result<SurveyOutcome>) -> SpooledAnswer {
        match result {
            Ok(outcome) => SpooledAnswer::Sent {
                outcome: outcome.clone(),
            },
            Err(error) => SpooledAnswer::Failed {
                code: error.code(),
                reason: error.reason(),
                message: error.message().to_owned(),
                violations: error
                    .violations()
                    .iter()
                    .map(|violation| (violation.field.clone(), violation.description.clone()))
                    .collect(),
                retry_after_ms: error
                    .retry_after()
                    .map(|delay| u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
                metadata: error.metadata().clone(),
                failure_class: error
                    .failure_class()
                    .map(|class| class_name(class).to_owned()),
            },
        }
    }

    fn into_result(self) -> Result<SurveyOutcome> {
        match self {
            SpooledAnswer::Sent { outcome } => Ok(outcome),
            SpooledAnswer::Failed {
                code,
                reason,
                message,
                violations,
                retry_after_ms,
                metadata,
                failure_class,
            } => {
                let mut error = Error::new(code, reason, message).with_violations(
                    violations
                        .into_iter()
                        .map(|(field, description)| FieldViolation::new(field, description))
                        .collect(),
                );
                if let Some(delay) = retry_after_ms {
                    error = error.with_retry_after(Duration::from_millis(delay));
                }
                for (key, value) in metadata {
                    error = error.with_metadata(key, value);
                }
                if let Some(class) = failure_class.as_deref().and_then(class_named) {
                    error = error.with_failure_class(class);
                }
                Err(error)
            }
        }
    }
}

/// The answer of a send whose sender lost its lease after claiming it.
fn sender_lost() -> Error {
    in_doubt("the replica sending this survey stopped before it answered")
}

/// An answer that cannot be read back (a replica of another version wrote it).
fn unreadable_answer() -> Error {
    in_doubt("the answer of the replica that sent this survey cannot be read")
}

/// `SURVEY_SENDER_LOST`: whether the survey went out is unknown.
fn in_doubt(what: &str) -> Error {
    Error::new(
        ErrorCode::Unavailable,
        Reason::SurveySenderLost,
        format!("{what}; the survey may have been sent"),
    )
    .with_metadata("upstream", super::client::UPSTREAM)
    .with_failure_class(FailureClass::PossiblyApplied)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map only moves senders in and out; a poisoned lock still holds a consistent one.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One account's survey spool as this replica sees it. Cheap to share.
pub struct SurveySpool {
    store: Arc<dyn SurveySpoolStore>,
    leases: Arc<dyn LeaseStore>,
    account: String,
    lease: String,
    /// This replica's waiting sends, by spool id.
    waiting: Mutex<HashMap<i64, oneshot::Sender<Result<SurveyOutcome>>>>,
    /// Wakes the collector when the first send starts waiting.
    started_waiting: tokio::sync::Notify,
}

impl std::fmt::Debug for SurveySpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SurveySpool({})", self.account)
    }
}

impl SurveySpool {
    /// The spool of `account` (a fingerprint, see [`crate::upstream::scheduler::shared`]), with
    /// its collector running for as long as the spool lives.
    pub fn start(
        store: Arc<dyn SurveySpoolStore>,
        leases: Arc<dyn LeaseStore>,
        account: &str,
    ) -> Arc<SurveySpool> {
        let spool = Arc::new(SurveySpool {
            store,
            leases,
            account: account.to_owned(),
            lease: format!("survey-sender:{account}"),
            waiting: Mutex::new(HashMap::new()),
            started_waiting: tokio::sync::Notify::new(),
        });
        let answered = spool.store.answered_wakeups();
        tokio::spawn(collect(Arc::downgrade(&spool), answered));
        spool
    }

    /// Spools one recipient's send and waits for its answer. `budget_error` is what a caller
    /// whose deadline passed before any sender took the send gets.
    pub(super) async fn send(
        &self,
        ctx: &CallContext,
        request: SurveyRequest,
        budget_error: impl FnOnce() -> Error,
    ) -> Result<SurveyOutcome> {
        let key = SpooledKey {
            campaign_id: request.campaign_id,
            delay_days: request.delay_days,
        };
        let encode = |value: serde_json::Result<String>| {
            value.map_err(|error| Error::internal(format!("cannot spool a survey send: {error}")))
        };
        let deadline_ms = ctx.remaining(Instant::now()).map(|remaining| {
            now_ms().saturating_add(i64::try_from(remaining.as_millis()).unwrap_or(i64::MAX))
        });
        let entry = SpoolEntry {
            account: self.account.clone(),
            key: encode(serde_json::to_string(&key))?,
            item: encode(serde_json::to_string(&request.recipient))?,
            interactive: ctx.priority == Priority::Interactive,
            caller: ctx.caller.as_deref().map(str::to_owned),
            deadline_ms,
        };
        let id = self.store.spool(&entry).await?;
        let (answer_tx, mut answer) = oneshot::channel();
        let first = {
            let mut waiting = lock(&self.waiting);
            waiting.insert(id, answer_tx);
            waiting.len() == 1
        };
        if first {
            self.started_waiting.notify_one();
        }
        // Takes the send out of the spool if the caller goes away while it is still pending.
        let mut guard = Waiting {
            spool: self,
            id: Some(id),
        };
        let result = match ctx.deadline {
            Some(deadline) => {
                tokio::select! {
                    answer = &mut answer => answer.ok(),
                    () = tokio::time::sleep_until(deadline) => {
                        if self.store.withdraw_spooled(id).await.unwrap_or(false) {
                            guard.settled();
                            return Err(budget_error());
                        }
                        tokio::time::timeout(CLAIMED_GRACE, answer).await.ok().and_then(Result::ok)
                    }
                }
            }
            None => answer.await.ok(),
        };
        guard.settled();
        result.unwrap_or_else(|| Err(sender_lost()))
    }
}

/// A send this replica waits for; dropped before it is settled (the caller went away), it is
/// withdrawn from the spool if no sender claimed it yet.
struct Waiting<'a> {
    spool: &'a SurveySpool,
    id: Option<i64>,
}

impl Waiting<'_> {
    fn settled(&mut self) {
        if let Some(id) = self.id.take() {
            lock(&self.spool.waiting).remove(&id);
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            lock(&self.spool.waiting).remove(&id);
            let store = Arc::clone(&self.spool.store);
            // A claimed send goes out anyway, like one sealed in a batch here; its answer is
            // removed by the pruning. Without a runtime (it is shutting down) the entry stays
            // for the next sender, as when the replica dies.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = store.withdraw_spooled(id).await;
                });
            }
        }
    }
}

/// Hands each waiting send of this replica its answer, in one statement per wake-up.
async fn collect(spool: Weak<SurveySpool>, mut answered: watch::Receiver<u64>) {
    let mut failures = FailureStreak::new(RETRY_FIRST, RETRY_MAX);
    loop {
        let Some(current) = spool.upgrade() else {
            return;
        };
        let ids: Vec<i64> = lock(&current.waiting).keys().copied().collect();
        if ids.is_empty() {
            // Looks again now and then, so the task ends soon after the spool is dropped.
            let _ = tokio::time::timeout(POLL, current.started_waiting.notified()).await;
            continue;
        }
        match current.store.collect_spooled(&current.lease, &ids).await {
            Ok(settled) => {
                failures.succeeded();
                let mut waiting = lock(&current.waiting);
                for (id, answer) in settled {
                    let result = match answer {
                        SpoolAnswer::Answered(text) => serde_json::from_str::<SpooledAnswer>(&text)
                            .map_or_else(|_| Err(unreadable_answer()), SpooledAnswer::into_result),
                        SpoolAnswer::SenderLost => Err(sender_lost()),
                    };
                    if let Some(waiter) = waiting.remove(&id) {
                        let _ = waiter.send(result);
                    }
                }
            }
            Err(error) => {
                let failure = failures.failed();
                if failure.log.is_some() {
                    tracing::warn!(%error, "cannot collect the answers of spooled survey sends");
                }
                drop(current);
                tokio::time::sleep(failure.delay).await;
                continue;
            }
        }
        drop(current);
        let _ = tokio::time::timeout(POLL, answered.changed()).await;
    }
}

/// Runs this replica's part in sending the account's spooled surveys: asks for the sender lease
/// every third of its length and, while it holds it, claims spooled sends, sends each through
/// `retently`'s own batcher as its caller's and records the answers. On draining it stops
/// claiming, records the answers of what it already claimed, and then gives the lease up.
pub async fn run_sender(spool: Arc<SurveySpool>, retently: RetentlyApi, drain: Drain) {
    let holder = crate::feedback::leader::replica_name();
    let every = spool.leases.lease_ttl() / 3;
    let mut spooled = spool.store.spooled_wakeups();
    let (answers_tx, answers_rx) = mpsc::unbounded_channel();
    let recorder = tokio::spawn(record_answers(Arc::clone(&spool.store), answers_rx));
    let mut sends = JoinSet::new();
    let mut failures = FailureStreak::new(every, RETRY_MAX.max(every));
    let mut leading: Option<Fence> = None;
    let mut next_prune = Instant::now();
    'lease: while !drain.is_draining() {
        let asked = Instant::now();
        let fence = match spool.leases.acquire_lease(&spool.lease, &holder).await {
            Ok(fence) => {
                failures.succeeded();
                fence
            }
            Err(error) => {
                let failure = failures.failed();
                if failure.log.is_some() {
                    tracing::warn!(%error, "cannot ask for the survey sender lease");
                }
                tokio::select! {
                    () = drain.clone().signaled() => break 'lease,
                    () = tokio::time::sleep(failure.delay) => continue 'lease,
                }
            }
        };
        match (&leading, &fence) {
            (None, Some(fence)) => {
                tracing::info!(replica = %holder, epoch = fence.epoch, "survey sender leads")
            }
            (Some(_), None) => tracing::warn!(replica = %holder, "survey sender lost its lease"),
            _ => {}
        }
        leading = fence;
        let renew_at = asked + every;
        let Some(fence) = leading.clone() else {
            tokio::select! {
                () = drain.clone().signaled() => break 'lease,
                () = tokio::time::sleep_until(renew_at) => continue 'lease,
            }
        };
        // Claims until the lease is due for renewal.
        while Instant::now() < renew_at && !drain.is_draining() {
            while sends.try_join_next().is_some() {}
            match spool
                .store
                .claim_spooled(&fence, &spool.account, CLAIM_PAGE)
                .await
            {
                Ok(UnderLease::Done(claimed)) => {
                    let full = claimed.len() == CLAIM_PAGE;
                    for (id, entry) in claimed {
                        let retently = retently.clone();
                        let answers = answers_tx.clone();
                        sends.spawn(async move {
                            let result = send_claimed(&retently, entry).await;
                            let answer = serde_json::to_string(&SpooledAnswer::of(&result))
                                .unwrap_or_else(|_| "{}".to_owned());
                            let _ = answers.send((id, answer));
                        });
                    }
                    if full {
                        continue;
                    }
                }
                Ok(UnderLease::LeaseLost) => {
                    tracing::warn!(replica = %holder, epoch = fence.epoch, "survey sender lost its lease");
                    leading = None;
                    continue 'lease;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot claim spooled survey sends");
                }
            }
            if Instant::now() >= next_prune {
                next_prune = Instant::now() + PRUNE_EVERY;
                let older_than = now_ms() - i64::try_from(ORPHAN_AGE.as_millis()).unwrap_or(0);
                if let Err(error) = spool.store.prune_spooled(&spool.account, older_than).await {
                    tracing::debug!(%error, "cannot prune spooled survey answers");
                }
            }
            tokio::select! {
                () = drain.clone().signaled() => {}
                () = tokio::time::sleep_until(renew_at.min(Instant::now() + POLL)) => {}
                _ = spooled.changed() => {}
            }
        }
    }
    // The lease is kept (renewed) until what was claimed is answered: a successor's epoch would
    // settle those sends as lost while they are still being sent.
    loop {
        tokio::select! {
            joined = sends.join_next() => if joined.is_none() { break },
            () = tokio::time::sleep(every) => {
                if leading.is_some()
                    && let Err(error) = spool.leases.acquire_lease(&spool.lease, &holder).await
                {
                    tracing::debug!(%error, "cannot renew the survey sender lease while draining");
                }
            }
        }
    }
    drop(answers_tx);
    let _ = recorder.await;
    if let Some(fence) = leading {
        // The next replica takes over at once instead of after the lease's expiry.
        if let Err(error) = spool.leases.release_lease(&fence).await {
            tracing::debug!(%error, "cannot give the survey sender lease up");
        }
    }
}

/// Sends one claimed send through this replica's batcher, as its caller's.
async fn send_claimed(retently: &RetentlyApi, entry: SpoolEntry) -> Result<SurveyOutcome> {
    let unreadable =
        |_| Error::internal("a spooled survey send cannot be read (written by another version)");
    let key: SpooledKey = serde_json::from_str(&entry.key).map_err(unreadable)?;
    let recipient: CustomerInput = serde_json::from_str(&entry.item).map_err(unreadable)?;
    let mut ctx = if entry.interactive {
        CallContext::interactive(None)
    } else {
        CallContext::background()
    };
    ctx.deadline = entry.deadline_ms.map(|deadline_ms| {
        let remaining = u64::try_from(deadline_ms.saturating_sub(now_ms())).unwrap_or(0);
        Instant::now() + Duration::from_millis(remaining)
    });
    if let Some(caller) = entry.caller {
        ctx = ctx.with_caller(caller);
    }
    retently
        .send_survey_here(
            &ctx,
            SurveyRequest {
                campaign_id: key.campaign_id,
                delay_days: key.delay_days,
                recipient,
            },
        )
        .await
}

/// Records answers as they come, many per statement; a failed statement is retried with the
/// same answers, so none is lost while the store is away.
async fn record_answers(
    store: Arc<dyn SurveySpoolStore>,
    mut answers: mpsc::UnboundedReceiver<(i64, String)>,
) {
    let mut failures = FailureStreak::new(RETRY_FIRST, RETRY_MAX);
    let mut batch = Vec::with_capacity(ANSWER_PAGE);
    loop {
        if batch.is_empty() && answers.recv_many(&mut batch, ANSWER_PAGE).await == 0 {
            return;
        }
        while batch.len() < ANSWER_PAGE {
            match answers.try_recv() {
                Ok(answer) => batch.push(answer),
                Err(_) => break,
            }
        }
        match store.answer_spooled(&batch).await {
            Ok(()) => {
                failures.succeeded();
                batch.clear();
            }
            Err(error) => {
                let failure = failures.failed();
                if failure.log.is_some() {
                    tracing::warn!(%error, pending = batch.len(), "cannot record survey answers");
                }
                tokio::time::sleep(failure.delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::testing::fresh_store;

    fn outcome() -> SurveyOutcome {
        SurveyOutcome {
            email: "ana@example.com".to_owned(),
            status: super::super::SurveyStatus::Other("queued".to_owned()),
            survey_id: Some("s-1".to_owned()),
            customer_id: None,
            scheduled_date: Some("2026-12-08".to_owned()),
        }
    }

    fn round_trip(result: &Result<SurveyOutcome>) -> Result<SurveyOutcome> {
        let text = serde_json::to_string(&SpooledAnswer::of(result)).unwrap();
        serde_json::from_str::<SpooledAnswer>(&text)
            .unwrap()
            .into_result()
    }

    #[test]
    fn an_answer_reads_back_as_the_sender_s_result() {
        assert_eq!(round_trip(&Ok(outcome())).unwrap(), outcome());
        let error = Error::new(
            ErrorCode::Unavailable,
            Reason::UpstreamTimeout,
            "retently did not answer within 15000 ms",
        )
        .with_violations(vec![FieldViolation::new("recipient.email", "bad")])
        .with_retry_after(Duration::from_millis(1500))
        .with_metadata("upstream", "retently")
        .with_failure_class(FailureClass::PossiblyApplied);
        let back = round_trip(&Err(error.clone())).unwrap_err();
        assert_eq!(back.code(), error.code());
        assert_eq!(back.reason(), error.reason());
        assert_eq!(back.message(), error.message());
        assert_eq!(back.violations(), error.violations());
        assert_eq!(back.retry_after(), error.retry_after());
        assert_eq!(back.metadata(), error.metadata());
        assert_eq!(back.failure_class(), Some(FailureClass::PossiblyApplied));
    }

    fn request(email: &str) -> SurveyRequest {
        SurveyRequest {
            campaign_id: "c-1".to_owned(),
            delay_days: Some(2),
            recipient: CustomerInput::new(email),
        }
    }

    fn budget_error() -> Error {
        Error::new(
            ErrorCode::ResourceExhausted,
            Reason::UpstreamBudgetExhausted,
            "no budget in time",
        )
    }

    /// The spool of the test account on `store`, its collector running.
    fn spool_on(store: &crate::store::postgres::PostgresStore) -> Arc<SurveySpool> {
        SurveySpool::start(
            Arc::new(store.clone()),
            Arc::new(store.clone()),
            "retently:test",
        )
    }

    /// One send made through `spool` by a caller in `ctx`, waiting for its answer.
    fn send_in_background(
        spool: &Arc<SurveySpool>,
        ctx: CallContext,
    ) -> tokio::task::JoinHandle<Result<SurveyOutcome>> {
        let spool = Arc::clone(spool);
        tokio::spawn(async move {
            spool
                .send(&ctx, request("ana@example.com"), budget_error)
                .await
        })
    }

    /// Plays the sender by hand: takes the lease and claims what is spooled.
    async fn claim_all(
        store: &crate::store::postgres::PostgresStore,
        lease: &str,
    ) -> Vec<(i64, SpoolEntry)> {
        let fence = store
            .acquire_lease(lease, "test-sender")
            .await
            .unwrap()
            .unwrap();
        loop {
            match store
                .claim_spooled(&fence, "retently:test", 10)
                .await
                .unwrap()
            {
                UnderLease::Done(claimed) if !claimed.is_empty() => return claimed,
                UnderLease::Done(_) => tokio::task::yield_now().await,
                UnderLease::LeaseLost => panic!("the test holds the lease"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_send_gets_the_sender_s_answer() {
        let Some(store) = fresh_store().await else {
            return;
        };
        let spool = spool_on(&store);
        let waiting = send_in_background(&spool, CallContext::background().with_caller("billing"));
        let claimed = claim_all(&store, &spool.lease).await;
        assert_eq!(claimed.len(), 1);
        let (id, entry) = &claimed[0];
        assert_eq!(entry.caller.as_deref(), Some("billing"));
        assert!(!entry.interactive);
        assert_eq!(entry.deadline_ms, None);
        let key: SpooledKey = serde_json::from_str(&entry.key).unwrap();
        assert_eq!((key.campaign_id.as_str(), key.delay_days), ("c-1", Some(2)));
        let answer = serde_json::to_string(&SpooledAnswer::of(&Ok(outcome()))).unwrap();
        store.answer_spooled(&[(*id, answer)]).await.unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), outcome());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_no_sender_took_by_the_deadline_is_withdrawn_with_the_budget_error() {
        let Some(store) = fresh_store().await else {
            return;
        };
        let spool = spool_on(&store);
        // No sender runs: whenever the deadline passes, the send is still pending.
        let ctx = CallContext::interactive_within(Duration::from_millis(200));
        let error = spool
            .send(&ctx, request("ana@example.com"), budget_error)
            .await
            .unwrap_err();
        assert_eq!(error.reason(), Reason::UpstreamBudgetExhausted);
        let fence = store
            .acquire_lease(&spool.lease, "test-sender")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store
                .claim_spooled(&fence, "retently:test", 10)
                .await
                .unwrap(),
            UnderLease::Done(Vec::new()),
            "nothing is left for a later sender"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_whose_sender_lost_the_lease_is_answered_in_doubt() {
        let Some(store) = fresh_store().await else {
            return;
        };
        let spool = spool_on(&store);
        let waiting = send_in_background(&spool, CallContext::background());
        claim_all(&store, &spool.lease).await;
        // The sender releases its lease and another replica takes it: a new epoch.
        let fence = store
            .acquire_lease(&spool.lease, "test-sender")
            .await
            .unwrap()
            .unwrap();
        store.release_lease(&fence).await.unwrap();
        store
            .acquire_lease(&spool.lease, "successor")
            .await
            .unwrap()
            .unwrap();
        let error = waiting.await.unwrap().unwrap_err();
        assert_eq!(error.code(), ErrorCode::Unavailable);
        assert_eq!(error.reason(), Reason::SurveySenderLost);
        assert_eq!(error.failure_class(), Some(FailureClass::PossiblyApplied));
    }
}
