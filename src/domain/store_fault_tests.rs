//! The outbox worker on a store that refuses writes: start-up recovery is retried while the
//! gateway reports not ready, and the claim loop backs off and rate-limits its error line instead
//! of spinning.
//!
//! The store is made to refuse writes with SQLite's `PRAGMA query_only` on the writer connection:
//! every write then fails inside SQLite (`SQLITE_READONLY`) the way it does on a full volume,
//! reads still work, and the pragma can be lifted again, all deterministically.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing_subscriber::layer::SubscriberExt as _;

use super::outbox::{
    Attempt, DeliveryAttempt, DeliveryState, Executor, NewDelivery, Outbox, OutboxSettings,
};
use super::tests::{record_of, report_body};
use crate::readiness::{Readiness, Stage};
use crate::shutdown;
use crate::store::SqliteStore;
use crate::store::outbox::QueuedDelivery;

fn delivery(body: &str, replay_safe: bool) -> NewDelivery {
    super::tests::delivery("TrackEvent", body, &[body], replay_safe)
}

/// Delivers everything, and reports each attempt's body.
struct RecordingExecutor {
    attempts: mpsc::UnboundedSender<String>,
}

#[tonic::async_trait]
impl Executor for RecordingExecutor {
    async fn execute(&self, delivery: DeliveryAttempt<'_>) -> Attempt {
        report_body(&self.attempts, &delivery);
        Attempt::Delivered {
            result: b"done".to_vec(),
        }
    }
}

/// Runs `outbox`'s worker with a [`RecordingExecutor`]; returns the bodies it attempts, its
/// readiness, the trigger that drains it and its task.
fn start_worker(
    outbox: &Outbox,
) -> (
    mpsc::UnboundedReceiver<String>,
    Readiness,
    shutdown::DrainTrigger,
    tokio::task::JoinHandle<()>,
) {
    let (attempts_tx, attempts) = mpsc::unbounded_channel();
    let readiness = Readiness::new();
    let (trigger, drain) = shutdown::channel();
    let worker = tokio::spawn(outbox.clone().run_worker(
        Arc::new(RecordingExecutor {
            attempts: attempts_tx,
        }),
        drain,
        readiness.clone(),
    ));
    (attempts, readiness, trigger, worker)
}

async fn refuse_writes(store: &SqliteStore, refuse: bool) {
    store.refuse_writes(refuse).await;
}

/// One captured log event: its message and its fields, as text.
#[derive(Debug, Clone)]
struct Line {
    message: String,
    fields: HashMap<String, String>,
    /// The (possibly paused) clock when it was logged.
    at: tokio::time::Instant,
}

impl Line {
    fn number(&self, field: &str) -> u64 {
        self.fields
            .get(field)
            .unwrap_or_else(|| panic!("no `{field}` in {self:?}"))
            .parse()
            .unwrap()
    }
}

/// Sends every event logged on this thread to a channel, so a test waits for lines instead of
/// polling for them.
struct Capture(mpsc::UnboundedSender<Line>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(HashMap<String, String>);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.insert(field.name().to_owned(), format!("{value:?}"));
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.insert(field.name().to_owned(), value.to_owned());
            }
        }
        let mut fields = Fields(HashMap::new());
        event.record(&mut fields);
        let mut fields = fields.0;
        let message = fields.remove("message").unwrap_or_default();
        let _ = self.0.send(Line {
            message,
            fields,
            at: tokio::time::Instant::now(),
        });
    }
}

fn capture_logs() -> (
    tracing::subscriber::DefaultGuard,
    mpsc::UnboundedReceiver<Line>,
) {
    let (lines_tx, lines) = mpsc::unbounded_channel();
    let subscriber = tracing_subscriber::registry().with(Capture(lines_tx));
    (tracing::subscriber::set_default(subscriber), lines)
}

/// The next captured line whose message is `message`.
async fn next_line(lines: &mut mpsc::UnboundedReceiver<Line>, message: &str) -> Line {
    loop {
        let line = lines.recv().await.expect("the capture is open");
        if line.message == message {
            return line;
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn failed_recovery_is_retried_while_not_ready_and_nothing_is_claimed_before() {
    let (_guard, mut lines) = capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let (store, bundle) = SqliteStore::open_for_test(dir.path());
    let outbox = Outbox::new(bundle, OutboxSettings::default());
    let in_flight = outbox.enqueue(delivery("replay-safe", true)).await.unwrap();
    let waiting = outbox.enqueue(delivery("queued", false)).await.unwrap();
    // The last run stopped while the first was being sent.
    store.mark_in_flight(Some(&in_flight), None).await;
    refuse_writes(&store, true).await;

    let (mut attempts, readiness, trigger, worker) = start_worker(&outbox);
    assert_eq!(readiness.first_attempt().await, Stage::Retrying);
    let first = next_line(
        &mut lines,
        "cannot recover in-flight deliveries, not ready until this succeeds",
    )
    .await;
    assert_eq!(first.number("suppressed"), 0);
    assert_eq!(first.number("failures"), 1);
    assert!(!readiness.is_ready());
    assert!(
        attempts.try_recv().is_err(),
        "nothing is sent before recovery"
    );
    assert_eq!(
        record_of(&outbox, &in_flight).await.state,
        DeliveryState::InFlight
    );

    // The volume has room again: the next retry recovers, the gateway becomes ready, and both
    // deliveries go out.
    refuse_writes(&store, false).await;
    tokio::time::timeout(Duration::from_secs(60), readiness.ready())
        .await
        .expect("recovery is retried until it succeeds");
    let mut sent = vec![
        attempts.recv().await.unwrap(),
        attempts.recv().await.unwrap(),
    ];
    sent.sort();
    assert_eq!(sent, ["queued", "replay-safe"]);
    let mut outcomes = outbox.outcomes();
    for id in [&in_flight, &waiting] {
        while record_of(&outbox, id).await.state != DeliveryState::Delivered {
            tokio::time::timeout(Duration::from_secs(30), outcomes.changed())
                .await
                .unwrap()
                .unwrap();
        }
    }
    trigger.start();
    worker.await.unwrap();
}

/// Paused clock: the worker's backoff sleeps are skipped by the runtime, and no other timer
/// exists in this test, so the times seen here are exactly the delays the worker chose.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_claim_loop_backs_off_on_a_store_that_refuses_writes_and_logs_rate_limited() {
    let (_guard, mut lines) = capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let (store, bundle) = SqliteStore::open_for_test(dir.path());
    let outbox = Outbox::new(bundle, OutboxSettings::default());
    let (mut attempts, readiness, trigger, worker) = start_worker(&outbox);
    readiness.ready().await;

    // The write that fills the volume: it is acknowledged, and no write after it succeeds, so
    // every claim of it fails.
    let id = super::outbox::new_delivery_id();
    let stuck = delivery("stuck", true);
    store
        .enqueue_then_refuse_writes(QueuedDelivery {
            delivery_id: id.clone(),
            delivery: crate::store::outbox::NewDelivery {
                method: stuck.method,
                request: stuck.request,
                destinations: stuck.destinations,
                item_count: stuck.item_count,
                ordering_keys: stuck.ordering_keys,
                idempotency_key: None,
                replay_safe: stuck.replay_safe,
                owner: stuck.owner.stored().to_owned(),
            },
            expire_ms: chrono::Utc::now().timestamp_millis() + 3_600_000,
            traceparent: None,
        })
        .await;

    let first = next_line(&mut lines, "cannot claim deliveries").await;
    assert_eq!(first.number("failures"), 1);
    assert_eq!(first.number("suppressed"), 0);
    let mut previous = first.clone();
    for _ in 0..3 {
        let line = next_line(&mut lines, "cannot claim deliveries").await;
        // At most one line per 10 s, counting the failures it left out...
        assert!(
            line.at - previous.at >= crate::backoff::LOG_EVERY,
            "{:?} after the previous line",
            line.at - previous.at
        );
        assert_eq!(
            line.number("suppressed"),
            line.number("failures") - previous.number("failures") - 1,
            "{line:?}"
        );
        previous = line;
    }
    // ...and the attempts themselves spaced by a growing delay: about 12 in the first 30 s and
    // then one per 5-10 s (a loop without backoff makes thousands a second).
    let elapsed = previous.at - first.at;
    let failures = previous.number("failures");
    assert!(elapsed >= Duration::from_secs(30), "{elapsed:?}");
    let most = 8 + elapsed.as_secs() / 5;
    assert!(
        (4..=most).contains(&failures),
        "{failures} failed claims in {elapsed:?}"
    );
    assert!(attempts.try_recv().is_err());

    // Room again: within one backoff delay the delivery goes out.
    let healed_at = tokio::time::Instant::now();
    refuse_writes(&store, false).await;
    assert_eq!(attempts.recv().await.unwrap(), "stuck");
    assert!(tokio::time::Instant::now() - healed_at <= Duration::from_secs(10));
    next_line(&mut lines, "claiming deliveries works again").await;
    let mut outcomes = outbox.outcomes();
    while record_of(&outbox, &id).await.state != DeliveryState::Delivered {
        outcomes.changed().await.unwrap();
    }
    trigger.start();
    worker.await.unwrap();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn idempotency_records_past_their_window_are_purged_each_round() {
    let dir = tempfile::tempdir().unwrap();
    let (store, bundle) = SqliteStore::open_for_test(dir.path());
    let idempotency = super::idempotency::Idempotency::new(bundle, Duration::from_secs(3600));
    let now = chrono::Utc::now().timestamp_millis();
    store
        .insert_idempotency_at("TrackEvent", "old", now - 2 * 3_600_000)
        .await;
    store.insert_idempotency_at("TrackEvent", "new", now).await;
    let keys = || store.idempotency_keys();
    let (trigger, drain) = shutdown::channel();
    let purge = tokio::spawn(idempotency.run_purge(Duration::from_secs(600), drain));
    // Before the first round nothing is deleted.
    assert_eq!(keys().await, ["new", "old"]);
    // Just past the first round: the purge task woke first and queued its delete with the store's
    // writer, which runs jobs in order, so an empty write queued now returns after it.
    tokio::time::sleep(Duration::from_secs(600) + Duration::from_millis(1)).await;
    store.writes_queued_so_far().await;
    assert_eq!(keys().await, ["new"]);
    trigger.start();
    purge.await.unwrap();
}
