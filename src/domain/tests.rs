//! Outbox and idempotency against a real store in a temporary directory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::idempotency::{Fresh, Idempotency, request_hash};
use super::outbox::{
    Attempt, DeliveryAttempt, DeliveryError, DeliveryRecord, DeliveryState, Executor, NewDelivery,
    Outbox, OutboxSettings, RetrySelection,
};
use super::{Owner, Visibility};
use crate::error::{ErrorCode, Reason};
use crate::shutdown;
use crate::store::{SqliteStore, Store};

/// A write of `body` for `method`, ordered by `keys`.
pub(super) fn delivery(method: &str, body: &str, keys: &[&str], replay_safe: bool) -> NewDelivery {
    NewDelivery {
        method: method.to_owned(),
        request: body.as_bytes().to_vec(),
        destinations: vec![2],
        item_count: 1,
        ordering_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        idempotency_key: None,
        replay_safe,
        owner: Owner::Anonymous,
    }
}

fn transient() -> DeliveryError {
    DeliveryError {
        code: ErrorCode::Unavailable,
        reason: Reason::UpstreamUnavailable,
        message: "upstream answered 503".to_owned(),
        metadata: HashMap::new(),
    }
}

/// Records each attempt and answers from a script: the first `fail_first[body]` attempts of a
/// body are transient failures.
struct ScriptedExecutor {
    attempts: mpsc::UnboundedSender<String>,
    fail_first: Mutex<HashMap<String, u32>>,
}

#[tonic::async_trait]
impl Executor for ScriptedExecutor {
    async fn execute(&self, delivery: DeliveryAttempt<'_>) -> Attempt {
        let body = report_body(&self.attempts, &delivery);
        let mut fail_first = self.fail_first.lock().unwrap();
        match fail_first.get_mut(&body) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Attempt::Retry {
                    error: transient(),
                    retry_after: None,
                }
            }
            _ => Attempt::Delivered {
                result: format!("done:{body}").into_bytes(),
            },
        }
    }
}

/// Queues a write of `body` (see [`delivery`]) and returns its id.
async fn queue(
    outbox: &Outbox,
    method: &str,
    body: &str,
    keys: &[&str],
    replay_safe: bool,
) -> String {
    enqueue(outbox, delivery(method, body, keys, replay_safe)).await
}

/// A [`ScriptedExecutor`] failing the first attempts of bodies as `fail_first` says, and the
/// bodies it is asked to deliver.
fn scripted(
    fail_first: &[(&str, u32)],
) -> (Arc<ScriptedExecutor>, mpsc::UnboundedReceiver<String>) {
    let (attempts_tx, attempts) = mpsc::unbounded_channel();
    let fail_first = fail_first
        .iter()
        .map(|(body, count)| ((*body).to_owned(), *count))
        .collect();
    let executor = ScriptedExecutor {
        attempts: attempts_tx,
        fail_first: Mutex::new(fail_first),
    };
    (Arc::new(executor), attempts)
}

/// A call's first run answering `response`, remembered or not.
async fn fresh(response: &[u8], remember: bool) -> Result<Fresh, crate::error::Error> {
    Ok(Fresh {
        response: response.to_vec(),
        remember,
    })
}

/// An outbox in a temporary directory (removed when the returned guard is dropped).
fn open_outbox(settings: OutboxSettings) -> (tempfile::TempDir, Outbox) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, Outbox::new(store, settings))
}

/// Queues `delivery` and returns its id.
async fn enqueue(outbox: &Outbox, delivery: NewDelivery) -> String {
    outbox.enqueue(delivery).await.unwrap()
}

/// An outbox worker in its own task, and the trigger that drains it.
struct Worker {
    trigger: shutdown::DrainTrigger,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    fn start(outbox: &Outbox, executor: Arc<dyn Executor>) -> Worker {
        let (trigger, drain) = shutdown::channel();
        let task = tokio::spawn(outbox.clone().run_worker(
            executor,
            drain,
            crate::readiness::Readiness::new(),
        ));
        Worker { trigger, task }
    }

    /// Drains the worker and waits until it has stopped.
    async fn stop(self) {
        self.trigger.start();
        self.task.await.unwrap();
    }
}

/// Sends the body of `delivery` to `attempts` (a test that stopped listening is fine), and
/// returns it.
pub(super) fn report_body(
    attempts: &mpsc::UnboundedSender<String>,
    delivery: &DeliveryAttempt<'_>,
) -> String {
    let body = String::from_utf8_lossy(delivery.request).into_owned();
    let _ = attempts.send(body.clone());
    body
}

/// The record of delivery `id`, which exists.
pub(super) async fn record_of(outbox: &Outbox, id: &str) -> DeliveryRecord {
    outbox.get(id, &Visibility::All).await.unwrap().unwrap()
}

fn fast_settings() -> OutboxSettings {
    OutboxSettings {
        base_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        ..OutboxSettings::default()
    }
}

/// Waits, outcome by outcome, until `id` is in `state`.
async fn wait_for_state(outbox: &Outbox, id: &str, state: DeliveryState) {
    let mut outcomes = outbox.outcomes();
    loop {
        if outbox
            .get(id, &Visibility::All)
            .await
            .unwrap()
            .map(|r| r.state)
            == Some(state)
        {
            return;
        }
        tokio::time::timeout(Duration::from_secs(30), outcomes.changed())
            .await
            .unwrap_or_else(|_| panic!("{id} never reached {state:?}"))
            .unwrap();
    }
}

/// Refuses each body's first attempt, `quota-*` bodies with its caller's quota and the others
/// with an upstream 503, both asking to come back in a minute; records who each attempt ran as.
struct QuotaExecutor {
    owners: Mutex<Vec<(String, Owner)>>,
}

#[tonic::async_trait]
impl Executor for QuotaExecutor {
    async fn execute(&self, delivery: DeliveryAttempt<'_>) -> Attempt {
        let DeliveryAttempt { request, owner, .. } = delivery;
        let body = String::from_utf8_lossy(request).into_owned();
        let mut owners = self.owners.lock().unwrap();
        let first = !owners.iter().any(|(seen, _)| *seen == body);
        owners.push((body.clone(), owner.clone()));
        if !first {
            return Attempt::Delivered { result: Vec::new() };
        }
        let error = if body.starts_with("quota") {
            DeliveryError {
                code: ErrorCode::ResourceExhausted,
                reason: Reason::CallerQuotaExceeded,
                message: "caller web has used its quota".to_owned(),
                metadata: HashMap::new(),
            }
        } else {
            transient()
        };
        Attempt::Retry {
            error,
            retry_after: Some(Duration::from_secs(60)),
        }
    }
}

/// A delivery refused by its caller's quota is attempted again as that caller, within the
/// longest backoff (a reload may have raised the quota), and is not dead-lettered; an upstream's
/// own Retry-After is waited out in full.
#[tokio::test]
async fn a_delivery_refused_by_its_caller_s_quota_is_retried_as_its_caller() {
    let (_dir, outbox) = open_outbox(fast_settings());
    let executor = Arc::new(QuotaExecutor {
        owners: Mutex::new(Vec::new()),
    });
    let mut refused = delivery("TrackEvent", "quota-1", &["ann"], false);
    refused.owner = caller("web");
    let refused = enqueue(&outbox, refused).await;
    let busy = queue(&outbox, "TrackEvent", "busy-1", &["bob"], false).await;
    let worker = Worker::start(&outbox, Arc::clone(&executor) as Arc<dyn Executor>);
    wait_for_state(&outbox, &refused, DeliveryState::Delivered).await;
    wait_for_state(&outbox, &busy, DeliveryState::RetryWait).await;
    worker.stop().await;

    let record = record_of(&outbox, &refused).await;
    assert_eq!(record.attempt_count, 2);
    let last_error = record.last_error.unwrap();
    assert_eq!(last_error.reason, Reason::CallerQuotaExceeded);
    assert_eq!(last_error.code, ErrorCode::ResourceExhausted);
    let owners = executor.owners.lock().unwrap().clone();
    let runs_of = |body: &str| -> Vec<Owner> {
        owners
            .iter()
            .filter(|(seen, _)| seen == body)
            .map(|(_, owner)| owner.clone())
            .collect()
    };
    assert_eq!(runs_of("quota-1"), [caller("web"), caller("web")]);
    assert_eq!(runs_of("busy-1"), [Owner::Anonymous]);
    let waiting = record_of(&outbox, &busy).await;
    let due_in = waiting.next_attempt_ms.unwrap() - waiting.update_ms;
    assert!(
        due_in >= 59_000,
        "an upstream's minute was cut to {due_in} ms"
    );
}

#[tokio::test]
async fn queued_writes_are_delivered_in_order_per_customer() {
    let (_dir, outbox) = open_outbox(fast_settings());
    // The first write to alice fails twice; the second must still come after it.
    let (executor, mut attempts) = scripted(&[("alice-1", 2)]);
    let first = queue(&outbox, "UpsertCustomers", "alice-1", &["alice"], true).await;
    let second = queue(&outbox, "UpsertCustomers", "alice-2", &["alice"], true).await;
    let other = queue(&outbox, "UpsertCustomers", "bob-1", &["bob"], true).await;
    let worker = Worker::start(&outbox, executor);

    wait_for_state(&outbox, &second, DeliveryState::Delivered).await;
    wait_for_state(&outbox, &other, DeliveryState::Delivered).await;
    worker.stop().await;

    let mut seen = Vec::new();
    while let Ok(body) = attempts.try_recv() {
        seen.push(body);
    }
    let alice: Vec<&String> = seen.iter().filter(|b| b.starts_with("alice")).collect();
    assert_eq!(alice, ["alice-1", "alice-1", "alice-1", "alice-2"]);
    let record = record_of(&outbox, &first).await;
    assert_eq!(record.state, DeliveryState::Delivered);
    assert_eq!(record.attempt_count, 3);
    assert_eq!(record.result.as_deref(), Some(&b"done:alice-1"[..]));
}

#[tokio::test]
async fn deliveries_past_their_window_are_dead_lettered_and_can_be_requeued() {
    let (_dir, outbox) = open_outbox(OutboxSettings {
        retry_window: Duration::ZERO,
        ..fast_settings()
    });
    let (executor, _attempts) = scripted(&[("carol-1", 1)]);
    let id = queue(&outbox, "TrackEvent", "carol-1", &["carol"], false).await;
    let worker = Worker::start(&outbox, executor);
    wait_for_state(&outbox, &id, DeliveryState::DeadLettered).await;

    let page = outbox
        .dead_letters(None, None, &Visibility::All, 0, 10)
        .await
        .unwrap();
    assert_eq!(page.total, 1);
    assert_eq!(page.deliveries[0].delivery_id, id);
    assert_eq!(
        page.deliveries[0].last_error.as_ref().unwrap().reason,
        Reason::UpstreamUnavailable
    );

    let results = outbox
        .retry_dead_letters(
            RetrySelection::Ids(vec![id.clone(), "dlv_missing".to_owned()]),
            &Visibility::All,
        )
        .await
        .unwrap();
    assert!(results[0].requeued);
    assert_eq!(
        results[1].error.as_ref().unwrap().reason,
        Reason::DeliveryNotFound
    );
    // The retry window is zero, but a requeued delivery gets one attempt now: it succeeds.
    wait_for_state(&outbox, &id, DeliveryState::Delivered).await;
    assert_eq!(record_of(&outbox, &id).await.replay_count, 1);
    worker.stop().await;
}

#[tokio::test]
async fn the_oldest_unfinished_delivery_is_reported_until_none_waits() {
    let (_dir, outbox) = open_outbox(OutboxSettings {
        retry_window: Duration::ZERO,
        ..fast_settings()
    });
    assert_eq!(outbox.oldest_pending_ms().await.unwrap(), None);
    let first = queue(&outbox, "TrackEvent", "erin-1", &["erin"], false).await;
    let second = queue(&outbox, "TrackEvent", "finn-1", &["finn"], false).await;
    let first_ms = record_of(&outbox, &first).await.create_ms;
    let second_ms = record_of(&outbox, &second).await.create_ms;
    assert!(first_ms <= second_ms);
    assert_eq!(outbox.oldest_pending_ms().await.unwrap(), Some(first_ms));

    // One is delivered, the other dead-lettered: neither waits any more.
    let (executor, _attempts) = scripted(&[("erin-1", 1)]);
    let worker = Worker::start(&outbox, executor);
    wait_for_state(&outbox, &first, DeliveryState::DeadLettered).await;
    wait_for_state(&outbox, &second, DeliveryState::Delivered).await;
    assert_eq!(outbox.oldest_pending_ms().await.unwrap(), None);
    worker.stop().await;
}

#[tokio::test]
async fn recovery_requeues_safe_writes_and_dead_letters_those_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let (store, bundle) = SqliteStore::open_for_test(dir.path());
    let outbox = Outbox::new(bundle, fast_settings());
    let safe = queue(&outbox, "UpsertCustomers", "dave", &["dave"], true).await;
    let unsafe_ = queue(&outbox, "TrackEvent", "erin", &["erin"], false).await;
    // Simulate a crash after both were claimed and sent.
    store.mark_in_flight(None, None).await;
    let (requeued, in_doubt) = outbox.recover().await.unwrap();
    assert_eq!((requeued, in_doubt), (1, 1));
    assert_eq!(
        record_of(&outbox, &safe).await.state,
        DeliveryState::Pending
    );
    let doubtful = record_of(&outbox, &unsafe_).await;
    assert_eq!(doubtful.state, DeliveryState::DeadLettered);
    assert_eq!(doubtful.last_error.unwrap().reason, Reason::DeliveryInDoubt);
}

#[tokio::test]
async fn recovery_verifies_writes_whose_upstream_keeps_a_history() {
    let dir = tempfile::tempdir().unwrap();
    let (store, bundle) = SqliteStore::open_for_test(dir.path());
    let outbox = Outbox::new(
        bundle,
        OutboxSettings {
            verifiable_methods: vec!["SendSurvey".to_owned()],
            ..fast_settings()
        },
    );
    let survey = queue(&outbox, "SendSurvey", "fay", &["fay"], false).await;
    let event = queue(&outbox, "TrackEvent", "gil", &["gil"], false).await;
    store.mark_in_flight(None, Some(1234)).await;
    assert_eq!(outbox.recover().await.unwrap(), (1, 1));
    assert_eq!(
        record_of(&outbox, &survey).await.state,
        DeliveryState::Pending
    );
    assert_eq!(
        record_of(&outbox, &event).await.state,
        DeliveryState::DeadLettered
    );

    // Its next attempt is told to check the history from the claim that was cut.
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let executor = Arc::new(SequenceExecutor {
        script: Mutex::new(Vec::new()),
        seen: seen_tx,
    });
    let worker = Worker::start(&outbox, executor);
    wait_for_state(&outbox, &survey, DeliveryState::Delivered).await;
    assert_eq!(seen.recv().await.unwrap(), Some(1234));
    worker.stop().await;
}

/// Answers from a script of attempts, in order, and records the `verify_since_ms` of each.
struct SequenceExecutor {
    script: Mutex<Vec<Attempt>>,
    seen: mpsc::UnboundedSender<Option<i64>>,
}

#[tonic::async_trait]
impl Executor for SequenceExecutor {
    async fn execute(&self, delivery: DeliveryAttempt<'_>) -> Attempt {
        let DeliveryAttempt {
            verify_since_ms, ..
        } = delivery;
        let _ = self.seen.send(verify_since_ms);
        let mut script = self.script.lock().unwrap();
        if script.is_empty() {
            Attempt::Delivered { result: Vec::new() }
        } else {
            script.remove(0)
        }
    }
}

#[tokio::test]
async fn an_unresolved_write_is_checked_from_its_first_doubtful_attempt() {
    let (_dir, outbox) = open_outbox(fast_settings());
    let unresolved = |since_ms| Attempt::Unresolved {
        error: transient(),
        since_ms,
        retry_after: None,
    };
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let executor = Arc::new(SequenceExecutor {
        script: Mutex::new(vec![unresolved(100), unresolved(200)]),
        seen: seen_tx,
    });
    let id = queue(&outbox, "SendSurvey", "hal", &["hal"], false).await;
    let worker = Worker::start(&outbox, executor);
    wait_for_state(&outbox, &id, DeliveryState::Delivered).await;
    let mut since = Vec::new();
    while let Ok(value) = seen.try_recv() {
        since.push(value);
    }
    // The second doubtful attempt does not move the start of the check forward.
    assert_eq!(since, [None, Some(100), Some(100)]);
    worker.stop().await;
}

#[tokio::test]
async fn doubts_left_at_the_end_of_the_window_are_dead_lettered_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::new(
        Store::open(dir.path()).unwrap(),
        OutboxSettings {
            retry_window: Duration::ZERO,
            ..fast_settings()
        },
    );
    let (seen_tx, _seen) = mpsc::unbounded_channel();
    let executor = Arc::new(SequenceExecutor {
        script: Mutex::new(vec![
            Attempt::InDoubt { error: transient() },
            Attempt::Unresolved {
                error: transient(),
                since_ms: 5,
                retry_after: None,
            },
        ]),
        seen: seen_tx,
    });
    let event = queue(&outbox, "TrackEvent", "ivy", &["ivy"], false).await;
    let worker = Worker::start(&outbox, executor);
    wait_for_state(&outbox, &event, DeliveryState::DeadLettered).await;
    let survey = queue(&outbox, "SendSurvey", "jo", &["jo"], false).await;
    wait_for_state(&outbox, &survey, DeliveryState::DeadLettered).await;
    for id in [&event, &survey] {
        let error = record_of(&outbox, id).await.last_error.unwrap();
        assert_eq!(error.reason, Reason::DeliveryInDoubt, "{id}");
        assert_eq!(
            error.metadata["cause"],
            Reason::UpstreamUnavailable.as_str(),
            "{id}"
        );
    }
    worker.stop().await;
}

/// Holds every attempt until released, then answers `answer`.
struct GatedExecutor {
    started: mpsc::UnboundedSender<String>,
    release: Arc<tokio::sync::Notify>,
    answer: fn() -> Attempt,
}

#[tonic::async_trait]
impl Executor for GatedExecutor {
    async fn execute(&self, delivery: DeliveryAttempt<'_>) -> Attempt {
        report_body(&self.started, &delivery);
        self.release.notified().await;
        (self.answer)()
    }
}

#[tokio::test]
async fn a_drain_lets_started_deliveries_finish_and_requeues_what_was_refused() {
    for (answer, expected) in [
        (
            (|| Attempt::Delivered { result: Vec::new() }) as fn() -> Attempt,
            DeliveryState::Delivered,
        ),
        // What the lanes answer during a drain: refused before it was sent.
        (
            || Attempt::Retry {
                error: transient(),
                retry_after: Some(Duration::from_secs(3600)),
            },
            DeliveryState::Pending,
        ),
    ] {
        let (_dir, outbox) = open_outbox(fast_settings());
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Notify::new());
        let executor = Arc::new(GatedExecutor {
            started: started_tx,
            release: Arc::clone(&release),
            answer,
        });
        let id = queue(&outbox, "TrackEvent", "kim", &["kim"], false).await;
        let worker = Worker::start(&outbox, executor);
        assert_eq!(started.recv().await.unwrap(), "kim");
        // Draining starts while the attempt is under way: the worker waits for it.
        worker.trigger.start();
        tokio::task::yield_now().await;
        assert!(!worker.task.is_finished());
        release.notify_one();
        worker.task.await.unwrap();
        let record = record_of(&outbox, &id).await;
        assert_eq!(record.state, expected);
        if expected == DeliveryState::Pending {
            assert!(record.next_attempt_ms.unwrap() <= chrono::Utc::now().timestamp_millis());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_drain_leaves_a_delivery_on_the_wire_in_flight_when_the_grace_ends() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::new(
        Store::open(dir.path()).unwrap(),
        OutboxSettings {
            drain_grace: Duration::from_secs(2),
            ..fast_settings()
        },
    );
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let executor = Arc::new(GatedExecutor {
        started: started_tx,
        release: Arc::new(tokio::sync::Notify::new()),
        answer: || Attempt::Delivered { result: Vec::new() },
    });
    let id = queue(&outbox, "TrackEvent", "lee", &["lee"], false).await;
    let worker = Worker::start(&outbox, executor);
    assert_eq!(started.recv().await.unwrap(), "lee");
    worker.stop().await;
    assert_eq!(record_of(&outbox, &id).await.state, DeliveryState::InFlight);
}

#[tokio::test]
async fn idempotency_returns_the_first_response_and_refuses_a_reused_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let idempotency = Idempotency::new(store, Duration::from_secs(3600));
    let calls = Arc::new(Mutex::new(0));
    let hash = request_hash(b"request-a");

    let run = |hash: Vec<u8>| {
        let calls = Arc::clone(&calls);
        let idempotency = idempotency.clone();
        async move {
            idempotency
                .run(
                    &Owner::Anonymous,
                    "UpsertCustomers",
                    "key-1",
                    hash,
                    true,
                    async move {
                        tokio::task::yield_now().await;
                        *calls.lock().unwrap() += 1;
                        Ok(Fresh {
                            response: b"first".to_vec(),
                            remember: true,
                        })
                    },
                )
                .await
        }
    };
    // Concurrent repeats: one runs, the others wait for it.
    let (a, b, c) = tokio::join!(run(hash.clone()), run(hash.clone()), run(hash.clone()));
    let mut repeats = 0;
    for outcome in [a, b, c] {
        let outcome = outcome.unwrap();
        assert_eq!(outcome.response, b"first");
        repeats += usize::from(outcome.repeated);
    }
    assert_eq!(
        repeats, 2,
        "one call ran, two were answered from its record"
    );
    assert_eq!(*calls.lock().unwrap(), 1);

    let error = run(request_hash(b"request-b")).await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::FailedPrecondition);
    assert_eq!(error.reason(), Reason::IdempotencyKeyReused);
}

#[tokio::test]
async fn calls_that_reached_nothing_are_not_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let idempotency = Idempotency::new(store, Duration::from_secs(3600));
    let hash = request_hash(b"request");
    let first = idempotency
        .run(
            &Owner::Anonymous,
            "SendSurvey",
            "k",
            hash.clone(),
            false,
            fresh(b"rejected", false),
        )
        .await
        .unwrap();
    assert_eq!(first.response, b"rejected");
    let second = idempotency
        .run(
            &Owner::Anonymous,
            "SendSurvey",
            "k",
            hash,
            false,
            fresh(b"ran again", true),
        )
        .await
        .unwrap();
    assert_eq!(second.response, b"ran again");
    assert!(!second.repeated);
}

fn caller(name: &str) -> Owner {
    Owner::Caller(Arc::from(name))
}

#[tokio::test]
async fn idempotency_keys_belong_to_the_caller_that_used_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let idempotency = Idempotency::new(store.clone(), Duration::from_secs(3600));
    let run = |owner: Owner, request: &'static [u8], response: &'static [u8]| {
        let idempotency = idempotency.clone();
        async move {
            idempotency
                .run(
                    &owner,
                    "TrackEvent",
                    "shared-key",
                    request_hash(request),
                    false,
                    fresh(response, true),
                )
                .await
        }
    };
    let first = run(caller("alpha"), b"alpha's event", b"alpha's answer")
        .await
        .unwrap();
    assert!(!first.repeated);
    // Another caller with the same key and another request is a fresh call, not a reused key.
    let other = run(caller("beta"), b"beta's event", b"beta's answer")
        .await
        .unwrap();
    assert_eq!(other.response, b"beta's answer");
    assert!(!other.repeated);
    // Nor does it receive alpha's answer for the very same request.
    let same_request = run(caller("gamma"), b"alpha's event", b"gamma's answer")
        .await
        .unwrap();
    assert_eq!(same_request.response, b"gamma's answer");
    assert!(!same_request.repeated);
    // Within one caller, keys still deduplicate and refuse reuse.
    let repeat = run(caller("alpha"), b"alpha's event", b"unused")
        .await
        .unwrap();
    assert_eq!(repeat.response, b"alpha's answer");
    assert!(repeat.repeated);
    let reused = run(caller("beta"), b"something else", b"unused")
        .await
        .unwrap_err();
    assert_eq!(reused.reason(), Reason::IdempotencyKeyReused);
    // Anonymous calls (no callers configured) form one more scope of their own.
    let anonymous = run(Owner::Anonymous, b"alpha's event", b"anonymous answer")
        .await
        .unwrap();
    assert!(!anonymous.repeated);
}

#[tokio::test]
async fn records_made_before_owners_existed_still_answer_every_caller() {
    let dir = tempfile::tempdir().unwrap();
    let (store, bundle) = SqliteStore::open_for_test(dir.path());
    let idempotency = Idempotency::new(bundle.clone(), Duration::from_secs(3600));
    let hash = request_hash(b"queued before the upgrade");
    let legacy = Idempotency::record_job(
        &Owner::Anonymous,
        "TrackEvent",
        "old-key",
        hash.clone(),
        b"first answer".to_vec(),
    );
    bundle.idempotency().record(legacy).await.unwrap();
    store.forget_idempotency_owners().await;
    // A retry across the upgrade is recognised, whoever makes it: it never writes twice.
    let repeat = idempotency
        .run(
            &caller("alpha"),
            "TrackEvent",
            "old-key",
            hash,
            false,
            fresh(b"second write", true),
        )
        .await
        .unwrap();
    assert!(repeat.repeated);
    assert_eq!(repeat.response, b"first answer");
}

#[tokio::test]
async fn deliveries_are_seen_and_requeued_by_their_owner_or_an_admin() {
    let dir = tempfile::tempdir().unwrap();
    let (store, bundle) = SqliteStore::open_for_test(dir.path());
    let outbox = Outbox::new(bundle, fast_settings());
    let queue = |owner: Owner, body: &str| {
        let outbox = outbox.clone();
        let mut new = delivery("TrackEvent", body, &[body], false);
        new.owner = owner;
        async move { enqueue(&outbox, new).await }
    };
    let alpha = queue(caller("alpha"), "alpha-1").await;
    let beta = queue(caller("beta"), "beta-1").await;
    let legacy = queue(Owner::Anonymous, "legacy-1").await;
    store.dead_letter_all_as_before_owners().await;

    let sees = |visibility: Visibility| {
        let outbox = outbox.clone();
        async move {
            let page = outbox
                .dead_letters(None, None, &visibility, 0, 10)
                .await
                .unwrap();
            let ids: Vec<String> = page.deliveries.into_iter().map(|d| d.delivery_id).collect();
            (page.total, ids)
        }
    };
    let own_alpha = Visibility::Own(caller("alpha"));
    let own_beta = Visibility::Own(caller("beta"));
    assert_eq!(
        sees(own_alpha.clone()).await,
        (2, vec![alpha.clone(), legacy.clone()])
    );
    assert_eq!(
        sees(own_beta.clone()).await,
        (2, vec![beta.clone(), legacy.clone()])
    );
    assert_eq!(
        sees(Visibility::All).await,
        (3, vec![alpha.clone(), beta.clone(), legacy.clone()])
    );
    assert!(outbox.get(&alpha, &own_beta).await.unwrap().is_none());
    assert!(outbox.get(&alpha, &own_alpha).await.unwrap().is_some());
    assert!(
        outbox
            .get(&alpha, &Visibility::All)
            .await
            .unwrap()
            .is_some()
    );

    // Beta cannot requeue alpha's delivery, nor learn that it exists.
    let refused = outbox
        .retry_dead_letters(RetrySelection::Ids(vec![alpha.clone()]), &own_beta)
        .await
        .unwrap();
    assert!(!refused[0].requeued);
    assert_eq!(
        refused[0].error.as_ref().unwrap().reason,
        Reason::DeliveryNotFound
    );
    // "All" means all of beta's own (and the ownerless ones).
    let all = outbox
        .retry_dead_letters(RetrySelection::All { method: None }, &own_beta)
        .await
        .unwrap();
    let requeued: Vec<&str> = all.iter().map(|r| r.delivery_id.as_str()).collect();
    assert_eq!(requeued, vec![beta.as_str(), legacy.as_str()]);
    let alpha_state = record_of(&outbox, &alpha).await;
    assert_eq!(alpha_state.state, DeliveryState::DeadLettered);
    // An admin reaches every caller's deliveries.
    let admin = outbox
        .retry_dead_letters(RetrySelection::Ids(vec![alpha.clone()]), &Visibility::All)
        .await
        .unwrap();
    assert!(admin[0].requeued);
}
