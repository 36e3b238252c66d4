//! Tests of the assembled pipeline against a real store in a temporary directory: dedup, fan-out,
//! resume, catch-up, heartbeats and retention (paused clock), the poller against a scripted
//! source, and the webhook receiver.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use prost::Message as _;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::hub::EventStream;
use super::log::{Observed, Origin};
use super::sync::{ListPage, ListQuery};
use super::*;
use crate::error::{Error, ErrorCode, Reason};
use crate::pb;
use crate::shutdown::{self, DrainTrigger};
use crate::upstream::retently;

struct Fixture {
    feedback: Feedback,
    store: Store,
    trigger: DrainTrigger,
    workers: JoinSet<()>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(settings: FeedbackSettings) -> Fixture {
        Self::with(settings, None, Clock::system()).await
    }

    /// A pipeline whose poller reads `source` (no retention).
    async fn polling(source: &Arc<ScriptedSource>, clock: Clock) -> Fixture {
        let settings = FeedbackSettings {
            sync: Some(sync_settings()),
            retention: no_retention(),
            ..FeedbackSettings::default()
        };
        let source = Arc::clone(source) as Arc<dyn FeedbackSource>;
        Fixture::with(settings, Some(source), clock).await
    }

    async fn with(
        settings: FeedbackSettings,
        source: Option<Arc<dyn FeedbackSource>>,
        clock: Clock,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (trigger, drain) = shutdown::channel();
        let (feedback, workers) = Feedback::open(store.clone(), settings, source, clock, drain)
            .await
            .unwrap();
        let mut set = JoinSet::new();
        for worker in workers {
            set.spawn(worker);
        }
        Fixture {
            feedback,
            store,
            trigger,
            workers: set,
            _dir: dir,
        }
    }

    fn hub(&self) -> &Arc<Hub> {
        self.feedback.hub()
    }

    async fn observe(&self, origin: Origin, items: &[pb::Feedback]) -> log::AppendCounts {
        self.feedback
            .ingest()
            .submit(origin, items.iter().map(Observed::new).collect(), None)
            .await
            .unwrap()
    }

    async fn observe_one(&self, origin: Origin, item: &pb::Feedback) -> log::AppendCounts {
        self.observe(origin, std::slice::from_ref(item)).await
    }

    /// Polls in `count` responses `{prefix}0`, `{prefix}1`, … of campaign `c`, all scored 5.
    async fn observe_polled(&self, prefix: &str, count: usize) -> log::AppendCounts {
        let items: Vec<pb::Feedback> = (0..count)
            .map(|i| response(&format!("{prefix}{i}"), "c", 5.0, "", &[]))
            .collect();
        self.observe(Origin::Poll, &items).await
    }

    /// A subscription to everything from `start` that the hub refuses: why.
    async fn refused_subscription(&self, start: Start) -> Error {
        match self
            .hub()
            .subscribe(filter::Filter::default(), start, None)
            .await
        {
            Ok(_) => panic!("the subscription was accepted"),
            Err(error) => error,
        }
    }

    /// Subscribes to everything, from now on.
    async fn subscribe_latest(&self) -> EventStream {
        self.subscribe(filter::Filter::default(), Start::Latest)
            .await
    }

    async fn subscribe(&self, filter: filter::Filter, start: Start) -> EventStream {
        self.hub().subscribe(filter, start, None).await.unwrap()
    }
}

fn response(id: &str, campaign: &str, score: f64, comment: &str, tags: &[&str]) -> pb::Feedback {
    let metric = pb::Metric::Nps;
    pb::Feedback {
        feedback_id: id.to_owned(),
        campaign_id: campaign.to_owned(),
        metric: metric as i32,
        score: Some(score),
        score_category: crate::convert::score_category(metric, Some(score)) as i32,
        comment: comment.to_owned(),
        tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
        create_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// What a stream sent, decoded.
#[derive(Debug, PartialEq)]
enum Sent {
    Event {
        kind: i32,
        id: String,
        sequence: i64,
        cursor: String,
    },
    Heartbeat {
        sequence: i64,
        cursor: String,
    },
}

async fn next(stream: &mut EventStream) -> Result<Sent, crate::error::Error> {
    let bytes = stream.next().await.expect("the stream ended")?;
    let message = pb::SubscribeResponse::decode(bytes).unwrap();
    Ok(match message.payload.unwrap() {
        pb::subscribe_response::Payload::FeedbackEvent(event) => Sent::Event {
            kind: event.kind,
            id: event.feedback.unwrap().feedback_id,
            sequence: event.sequence,
            cursor: event.cursor,
        },
        pb::subscribe_response::Payload::Heartbeat(heartbeat) => Sent::Heartbeat {
            sequence: heartbeat.sequence,
            cursor: heartbeat.cursor,
        },
    })
}

/// The next feedback event's (id, sequence), skipping heartbeats.
async fn next_event(stream: &mut EventStream) -> (String, i64) {
    loop {
        if let Sent::Event { id, sequence, .. } = next(stream).await.unwrap() {
            return (id, sequence);
        }
    }
}

fn created() -> i32 {
    pb::FeedbackEventKind::Created as i32
}

#[tokio::test]
async fn new_changed_and_repeated_responses_are_told_apart() {
    let fixture = Fixture::new(FeedbackSettings::default()).await;
    let mut stream = fixture.subscribe_latest().await;
    assert!(matches!(
        next(&mut stream).await.unwrap(),
        Sent::Heartbeat { sequence: 0, .. }
    ));

    let a = response("a", "c1", 9.0, "", &[]);
    let counts = fixture.observe_one(Origin::Poll, &a).await;
    assert_eq!(counts.created, 1);
    assert_eq!(fixture.observe_one(Origin::Poll, &a).await.unchanged, 1);
    assert_eq!(fixture.observe_one(Origin::Webhook, &a).await.unchanged, 1);

    let tagged = response("a", "c1", 9.0, "", &["vip"]);
    // A webhook never reports a change: only the poller does.
    assert_eq!(
        fixture.observe_one(Origin::Webhook, &tagged).await.ignored,
        1
    );
    assert_eq!(fixture.observe_one(Origin::Poll, &tagged).await.updated, 1);
    assert_eq!(fixture.observe(Origin::Poll, &[tagged]).await.unchanged, 1);
    let b = response("b", "c1", 3.0, "slow", &[]);
    assert_eq!(fixture.observe(Origin::Webhook, &[b]).await.created, 1);

    let mut kinds = Vec::new();
    for _ in 0..3 {
        match next(&mut stream).await.unwrap() {
            Sent::Event {
                kind, id, sequence, ..
            } => kinds.push((kind, id, sequence)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        kinds,
        vec![
            (created(), "a".to_owned(), 1),
            (pb::FeedbackEventKind::Updated as i32, "a".to_owned(), 2),
            (created(), "b".to_owned(), 3),
        ]
    );
    let stats = fixture.feedback.stats().snapshot();
    assert_eq!((stats.created, stats.updated, stats.ignored), (2, 1, 1));
}

#[tokio::test]
async fn filters_are_applied_and_heartbeats_carry_the_position() {
    let fixture = Fixture::new(FeedbackSettings::default()).await;
    let detractors_with_comments = filter::Filter {
        score_categories: vec![pb::ScoreCategory::Detractor as i32],
        has_comment: Some(true),
        ..Default::default()
    };
    let mut filtered = fixture
        .subscribe(detractors_with_comments, Start::Latest)
        .await;
    next(&mut filtered).await.unwrap();
    fixture
        .observe(
            Origin::Poll,
            &[
                response("p", "c1", 10.0, "love it", &[]),
                response("d1", "c1", 2.0, "", &[]),
                response("d2", "c2", 1.0, "broken", &[]),
                response("x", "c1", 8.0, "ok", &[]),
            ],
        )
        .await;
    assert_eq!(next_event(&mut filtered).await, ("d2".to_owned(), 3));

    let by_campaign = filter::Filter {
        campaign_ids: vec!["c2".into()],
        ..Default::default()
    };
    let mut replay = fixture.subscribe(by_campaign, Start::Earliest).await;
    assert!(matches!(
        next(&mut replay).await.unwrap(),
        Sent::Heartbeat { sequence: 0, .. }
    ));
    assert_eq!(next_event(&mut replay).await, ("d2".to_owned(), 3));
}

#[tokio::test]
async fn resuming_from_a_cursor_delivers_exactly_what_was_missed() {
    let fixture = Fixture::new(FeedbackSettings::default()).await;
    let mut first = fixture.subscribe_latest().await;
    next(&mut first).await.unwrap();
    fixture.observe_polled("r", 5).await;
    let mut cursor = String::new();
    for expected in 1..=2 {
        let Sent::Event {
            sequence,
            cursor: at,
            ..
        } = next(&mut first).await.unwrap()
        else {
            panic!("expected an event");
        };
        assert_eq!(sequence, expected);
        cursor = at;
    }
    drop(first);

    // More arrive while disconnected; the resumed stream replays 3..=5 from the log, then
    // 6..=8 live, each exactly once.
    let more: Vec<pb::Feedback> = (5..8)
        .map(|i| response(&format!("r{i}"), "c", 5.0, "", &[]))
        .collect();
    fixture.observe(Origin::Poll, &more).await;
    let mut resumed = fixture
        .subscribe(
            filter::Filter::default(),
            Start::After(cursor::Cursor::decode(&cursor).unwrap()),
        )
        .await;
    assert!(matches!(
        next(&mut resumed).await.unwrap(),
        Sent::Heartbeat { sequence: 2, .. }
    ));
    let live: Vec<pb::Feedback> = (8..11)
        .map(|i| response(&format!("r{i}"), "c", 5.0, "", &[]))
        .collect();
    let ingest = fixture.feedback.ingest().clone();
    let feeder = tokio::spawn(async move {
        ingest
            .submit(Origin::Poll, live.iter().map(Observed::new).collect(), None)
            .await
    });
    let mut sequences = Vec::new();
    for _ in 3..=11 {
        sequences.push(next_event(&mut resumed).await.1);
    }
    feeder.await.unwrap().unwrap();
    assert_eq!(sequences, (3..=11).collect::<Vec<_>>());
}

#[tokio::test]
async fn cursors_of_another_log_or_ahead_of_it_are_invalid() {
    let fixture = Fixture::new(FeedbackSettings::default()).await;
    let epoch = fixture.hub().log().epoch();
    for cursor in [
        cursor::Cursor {
            epoch: epoch ^ 1,
            sequence: 0,
        },
        cursor::Cursor { epoch, sequence: 1 },
    ] {
        let error = fixture.refused_subscription(Start::After(cursor)).await;
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
        assert_eq!(error.violations()[0].field, "cursor");
    }
}

/// Entries another appender committed (a replica sharing the database) reach this hub's
/// subscribers once and in sequence order: before a local append that follows them, or when the
/// log tail reads the log; and a cursor issued by that replica, ahead of what this hub published
/// so far, resumes here instead of being refused.
#[tokio::test]
async fn entries_appended_by_other_replicas_are_published_in_order_once() {
    let fixture = Fixture::new(FeedbackSettings::default()).await;
    let elsewhere = |ids: &[&str]| {
        let observations: Vec<Observed> = ids
            .iter()
            .map(|id| Observed::new(&response(id, "c", 5.0, "", &[])))
            .collect();
        let store = fixture.store.clone();
        async move {
            store
                .feedback_log()
                .append(
                    1_000,
                    vec![(Origin::Webhook, observations)],
                    Vec::new(),
                    log::encode_entry,
                )
                .await
                .unwrap()
        }
    };
    let mut stream = fixture
        .subscribe(filter::Filter::default(), Start::Latest)
        .await;
    next(&mut stream).await.unwrap();
    elsewhere(&["r1", "r2"]).await;
    assert_eq!(fixture.hub().head(), 0, "not published by this hub yet");
    fixture
        .observe(Origin::Webhook, &[response("r3", "c", 5.0, "", &[])])
        .await;
    let mut received = Vec::new();
    for _ in 0..3 {
        received.push(next_event(&mut stream).await);
    }
    elsewhere(&["r4"]).await;
    fixture.hub().publish_from_log().await.unwrap();
    received.push(next_event(&mut stream).await);
    assert_eq!(
        received,
        [("r1", 1), ("r2", 2), ("r3", 3), ("r4", 4)]
            .map(|(id, sequence)| (id.to_owned(), sequence))
    );

    // A cursor at sequence 6, from a replica that published r5 and r6 already.
    elsewhere(&["r5", "r6", "r7"]).await;
    let cursor = fixture.hub().log().cursor(6);
    let mut resumed = fixture
        .subscribe(filter::Filter::default(), Start::After(cursor))
        .await;
    assert!(matches!(
        next(&mut resumed).await.unwrap(),
        Sent::Heartbeat { sequence: 6, .. }
    ));
    assert_eq!(next_event(&mut resumed).await, ("r7".to_owned(), 7));
    // The first stream gets r5..r7 once, from the ring.
    for expected in 5..=7 {
        assert_eq!(next_event(&mut stream).await.1, expected);
    }
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_continues_from_the_log_without_loss() {
    let settings = FeedbackSettings {
        hub: HubSettings {
            live_buffer: 4,
            catch_up_entries: 7,
            ..HubSettings::default()
        },
        ..FeedbackSettings::default()
    };
    let fixture = Fixture::new(settings).await;
    let mut slow = fixture.subscribe_latest().await;
    next(&mut slow).await.unwrap();
    // 100 entries while the subscriber does not read: the ring holds 4.
    for chunk in 0..10 {
        fixture.observe_polled(&format!("s{chunk}-"), 10).await;
    }
    let overflows = || sample("cxgw_feedback_subscriber_overflows_total", "");
    let catch_ups = || {
        sample(
            "cxgw_feedback_subscriber_catch_ups_total",
            "{cause=\"overflow\"}",
        )
    };
    let (overflows_before, catch_ups_before) = (overflows(), catch_ups());
    let mut sequences = Vec::new();
    while sequences.len() < 100 {
        sequences.push(next_event(&mut slow).await.1);
    }
    assert_eq!(sequences, (1..=100).collect::<Vec<_>>());
    assert!(fixture.feedback.stats().snapshot().catch_ups >= 1);
    // Asked for more, the subscriber finds it has caught up and waits on the ring.
    assert!(futures_util::FutureExt::now_or_never(slow.next()).is_none());
    // The overflow and the completed catch-up are counted (metrics are process-wide: compared
    // with what they were before).
    assert!(overflows() >= overflows_before + 1.0);
    assert!(catch_ups() >= catch_ups_before + 1.0);
    // Caught up: the next entry arrives live.
    fixture
        .observe(Origin::Poll, &[response("late", "c", 5.0, "", &[])])
        .await;
    assert_eq!(next_event(&mut slow).await, ("late".to_owned(), 101));
}

/// The value of the sample `name` + `labels` (as rendered) in the process's `/metrics` text, 0
/// when the series does not exist yet.
fn sample(name: &str, labels: &str) -> f64 {
    let text = crate::telemetry::metrics().prometheus_text().unwrap();
    let prefix = format!("{name}{labels} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0.0, |value| value.parse().unwrap())
}

#[tokio::test]
async fn the_subscriber_limit_is_enforced_and_released() {
    let settings = FeedbackSettings {
        hub: HubSettings {
            max_subscribers: 2,
            ..HubSettings::default()
        },
        ..FeedbackSettings::default()
    };
    let fixture = Fixture::new(settings).await;
    let first = fixture.subscribe_latest().await;
    let _second = fixture.subscribe_latest().await;
    let error = fixture.refused_subscription(Start::Latest).await;
    assert_eq!(error.code(), ErrorCode::ResourceExhausted);
    assert_eq!(error.reason(), Reason::TooManySubscribers);
    assert!(error.retry_after().is_some());
    drop(first);
    let _third = fixture.subscribe_latest().await;
}

#[tokio::test(start_paused = true)]
async fn idle_streams_get_a_heartbeat_every_interval() {
    let settings = FeedbackSettings {
        hub: HubSettings {
            heartbeat_interval: Duration::from_secs(15),
            ..HubSettings::default()
        },
        retention: no_retention(),
        ..FeedbackSettings::default()
    };
    let fixture = Fixture::with(settings, None, Clock::following_tokio()).await;
    let mut stream = fixture.subscribe_latest().await;
    let started = Instant::now();
    assert!(matches!(
        next(&mut stream).await.unwrap(),
        Sent::Heartbeat { .. }
    ));
    assert_eq!(started.elapsed(), Duration::ZERO, "the first one at once");
    assert!(matches!(
        next(&mut stream).await.unwrap(),
        Sent::Heartbeat { sequence: 0, .. }
    ));
    assert_eq!(started.elapsed(), Duration::from_secs(15));

    tokio::time::advance(Duration::from_secs(5)).await;
    fixture
        .observe(Origin::Poll, &[response("a", "c", 5.0, "", &[])])
        .await;
    let event_at = Instant::now();
    assert_eq!(next_event(&mut stream).await, ("a".to_owned(), 1));
    // The interval counts from the last message of any kind.
    let Sent::Heartbeat { sequence, cursor } = next(&mut stream).await.unwrap() else {
        panic!("expected a heartbeat");
    };
    assert_eq!(event_at.elapsed(), Duration::from_secs(15));
    assert_eq!(sequence, 1);
    assert_eq!(cursor::Cursor::decode(&cursor).unwrap().sequence, 1);
}

#[tokio::test]
async fn draining_ends_streams_with_a_final_cursor() {
    let fixture = Fixture::new(FeedbackSettings::default()).await;
    fixture
        .observe(Origin::Poll, &[response("a", "c", 5.0, "", &[])])
        .await;
    let mut stream = fixture.subscribe_latest().await;
    next(&mut stream).await.unwrap();
    fixture.trigger.start();
    assert!(matches!(
        next(&mut stream).await.unwrap(),
        Sent::Heartbeat { sequence: 1, .. }
    ));
    let error = next(&mut stream).await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::Unavailable);
    assert_eq!(error.reason(), Reason::ServerShuttingDown);
    assert!(error.retry_after().is_some());
    assert!(stream.next().await.is_none());
    // New subscriptions are refused, and the workers stop.
    let refused = fixture.refused_subscription(Start::Latest).await;
    assert_eq!(refused.reason(), Reason::ServerShuttingDown);
    let mut workers = fixture.workers;
    while workers.join_next().await.is_some() {}
}

#[tokio::test(start_paused = true)]
async fn retention_by_age_deletes_old_entries_and_expired_positions_fail() {
    let clock = Clock::following_tokio();
    let fixture = Fixture::with(
        FeedbackSettings {
            retention: no_retention(),
            ..FeedbackSettings::default()
        },
        None,
        clock,
    )
    .await;
    fixture.observe_polled("old", 3).await;
    let t0 = fixture.hub().log().state().await.unwrap().head_time_ms;
    tokio::time::advance(Duration::from_secs(1800)).await;
    fixture
        .observe(
            Origin::Poll,
            &[
                response("new0", "c", 5.0, "", &[]),
                response("new1", "c", 5.0, "", &[]),
            ],
        )
        .await;
    tokio::time::advance(Duration::from_secs(1860)).await;
    // The task's first round comes one interval after it starts: at t0 + 1 h 2 min, when the
    // first three entries are over an hour old and the other two are not.
    let (progress_sender, mut progress) = tokio::sync::watch::channel(RetentionProgress::default());
    let (_trigger, drain) = shutdown::channel();
    tokio::spawn(retention::run(
        fixture.hub().log().clone(),
        RetentionSettings {
            max_age: Some(Duration::from_secs(3600)),
            max_entries: None,
            interval: Duration::from_secs(60),
        },
        clock,
        Arc::clone(fixture.feedback.stats()),
        drain,
        progress_sender,
    ));
    let done = progress
        .wait_for(|progress| progress.rounds >= 1)
        .await
        .unwrap()
        .deleted;
    assert_eq!(done, 3);
    let log = fixture.hub().log();
    assert_eq!(log.oldest().await.unwrap().unwrap().0, 4);
    assert_eq!(fixture.feedback.stats().snapshot().pruned, 3);

    let expired = fixture
        .refused_subscription(Start::After(log.cursor(1)))
        .await;
    assert_eq!(expired.code(), ErrorCode::OutOfRange);
    assert_eq!(expired.reason(), Reason::CursorExpired);
    assert_eq!(
        expired.metadata().get("oldest_cursor"),
        Some(&log.cursor(3).encode())
    );
    assert!(expired.metadata().contains_key("oldest_time"));
    let by_time = fixture.refused_subscription(Start::Time(t0)).await;
    assert_eq!(by_time.reason(), Reason::CursorExpired);

    // Resuming from oldest_cursor, or from the start, or after the new entries' time works.
    for start in [
        Start::After(log.cursor(3)),
        Start::Earliest,
        Start::Time(t0 + 1),
    ] {
        let mut stream = fixture.subscribe(filter::Filter::default(), start).await;
        assert_eq!(next_event(&mut stream).await, ("new0".to_owned(), 4));
        assert_eq!(next_event(&mut stream).await, ("new1".to_owned(), 5));
    }
}

#[tokio::test]
async fn retention_by_count_keeps_the_newest_entries() {
    let no_retention = RetentionSettings {
        max_age: None,
        max_entries: None,
        interval: Duration::from_secs(3600),
    };
    let fixture = Fixture::new(FeedbackSettings {
        retention: no_retention,
        ..FeedbackSettings::default()
    })
    .await;
    fixture.observe_polled("n", 10).await;
    let settings = RetentionSettings {
        max_age: None,
        max_entries: Some(4),
        interval: Duration::from_secs(3600),
    };
    let log = fixture.hub().log();
    assert_eq!(retention::enforce(log, &settings, 0).await.unwrap(), 6);
    assert_eq!(retention::enforce(log, &settings, 0).await.unwrap(), 0);
    assert_eq!(log.oldest().await.unwrap().unwrap().0, 7);
    assert_eq!(log.state().await.unwrap().pruned_seq, 6);
}

#[tokio::test]
async fn a_subscriber_overtaken_by_retention_ends_with_how_to_resume() {
    let fixture = Fixture::new(FeedbackSettings {
        hub: HubSettings {
            live_buffer: 2,
            catch_up_entries: 2,
            ..HubSettings::default()
        },
        ..FeedbackSettings::default()
    })
    .await;
    let mut stream = fixture.subscribe_latest().await;
    next(&mut stream).await.unwrap();
    fixture.observe_polled("n", 10).await;
    // The subscriber reads one entry, then retention deletes everything but the last two.
    assert_eq!(next_event(&mut stream).await.1, 1);
    let settings = RetentionSettings {
        max_age: None,
        max_entries: Some(2),
        interval: Duration::from_secs(3600),
    };
    retention::enforce(fixture.hub().log(), &settings, 0)
        .await
        .unwrap();
    let error = loop {
        match next(&mut stream).await {
            Ok(Sent::Event { sequence, .. }) => assert!(sequence <= 2, "{sequence}"),
            Ok(Sent::Heartbeat { .. }) => {}
            Err(error) => break error,
        }
    };
    assert_eq!(error.reason(), Reason::CursorExpired);
    let log = fixture.hub().log();
    assert_eq!(
        error.metadata().get("oldest_cursor"),
        Some(&log.cursor(8).encode())
    );
    assert!(error.metadata().contains_key("resume_cursor"));
}

/// A feedback list that serves a fixed set of responses the way Retently does: created at or
/// after `startDate`, oldest first, in pages.
#[derive(Default)]
struct ScriptedSource {
    items: Mutex<Vec<retently::Feedback>>,
    queries: Mutex<Vec<ListQuery>>,
    fail: Mutex<bool>,
    asked: Notify,
}

impl ScriptedSource {
    fn add(&self, id: &str, created: &str, tags: &[&str]) {
        let item: retently::Feedback = serde_json::from_value(json!({
            "id": id,
            "createdDate": created,
            "campaignId": "c",
            "metricsType": "NPS",
            "score": 9,
            "feedbackTags": tags,
        }))
        .unwrap();
        let mut items = self.items.lock().unwrap();
        items.retain(|existing| existing.id != id);
        items.push(item);
    }

    fn queries(&self) -> Vec<ListQuery> {
        self.queries.lock().unwrap().clone()
    }
}

impl FeedbackSource for ScriptedSource {
    fn list_feedback(
        &self,
        query: ListQuery,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<ListPage, crate::error::Error>> + Send + '_>,
    > {
        Box::pin(async move {
            self.queries.lock().unwrap().push(query.clone());
            self.asked.notify_waiters();
            if *self.fail.lock().unwrap() {
                return Err(crate::error::Error::new(
                    ErrorCode::Unavailable,
                    Reason::UpstreamUnavailable,
                    "scripted failure",
                ));
            }
            let mut matching: Vec<retently::Feedback> = self
                .items
                .lock()
                .unwrap()
                .iter()
                .filter(|item| {
                    chrono::DateTime::parse_from_rfc3339(item.created_date.as_deref().unwrap())
                        .is_ok_and(|created| created >= query.start)
                })
                .cloned()
                .collect();
            matching.sort_by_key(|item| item.created_date.clone());
            let limit = query.limit as usize;
            let pages = matching.len().div_ceil(limit) as u32;
            let items = matching
                .into_iter()
                .skip((query.page as usize - 1) * limit)
                .take(limit)
                .collect();
            Ok(ListPage {
                items,
                page: query.page,
                pages,
            })
        })
    }
}

/// No retention task: in paused-clock tests its timer would be what the clock jumps to while a
/// store write is pending.
fn no_retention() -> RetentionSettings {
    RetentionSettings {
        max_age: None,
        max_entries: None,
        interval: Duration::from_secs(3600),
    }
}

fn sync_settings() -> SyncSettings {
    SyncSettings {
        poll_interval: Duration::from_secs(10),
        overlap: Duration::from_secs(300),
        backfill: Duration::from_secs(3600),
        rescan_interval: None,
        rescan_window: Duration::from_secs(3600),
    }
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test(start_paused = true)]
async fn the_poller_pages_checkpoints_and_costs_one_request_when_idle() {
    let clock = Clock::following_tokio();
    let now = clock.now_ms();
    let source = Arc::new(ScriptedSource::default());
    // 1,500 responses a second apart in the backfill window: two pages of 1,000.
    for i in 0..1500 {
        source.add(&format!("f{i:04}"), &iso(now - 3_000_000 + i * 1000), &[]);
    }
    // One before the backfill window, never asked for.
    source.add("ancient", &iso(now - 7_200_000), &[]);
    let fixture = Fixture::polling(&source, clock).await;
    let mut synced = fixture.hub().sync_watch();
    synced.wait_for(Option::is_some).await.unwrap();
    assert_eq!(fixture.hub().head(), 1500);
    let first = source.queries();
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!((first[0].page, first[1].page), (1, 2));
    assert!(first.iter().all(|query| query.limit == 1000));
    // The first poll comes one interval (10 s) after start; the backfill reaches back from then.
    let started = now + 10_000;
    assert_eq!(first[0].start.timestamp_millis(), started - 3_600_000);

    // The checkpoint is the last creation date; later polls start one overlap before it and,
    // with nothing new, cost one request each.
    for _ in 0..3 {
        synced.changed().await.unwrap();
    }
    let queries = source.queries();
    assert_eq!(queries.len(), 5);
    let checkpoint = now - 3_000_000 + 1_499_000;
    assert_eq!(queries[4].start.timestamp_millis(), checkpoint - 300_000);
    assert_eq!(fixture.hub().head(), 1500);
    let state = sync::SyncState::load(&fixture.store)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.checkpoint_ms, checkpoint);

    // A new response and a changed one inside the overlap: one CREATED, one UPDATED.
    source.add("fresh", &iso(checkpoint + 10), &[]);
    source.add("f1499", &iso(checkpoint), &["vip"]);
    synced.changed().await.unwrap();
    assert_eq!(fixture.hub().head(), 1502);
    let stats = fixture.feedback.stats().snapshot();
    assert_eq!((stats.created, stats.updated), (1501, 1));
    let covered = fixture.hub().log().covered_range().await.unwrap().unwrap();
    assert_eq!(covered.from_ms, started - 3_600_000);
    assert!(covered.to_ms > now);
}

#[tokio::test(start_paused = true)]
async fn rescans_see_changes_to_responses_older_than_the_overlap() {
    let clock = Clock::following_tokio();
    let now = clock.now_ms();
    let source = Arc::new(ScriptedSource::default());
    source.add("old", &iso(now - 1_800_000), &[]);
    source.add("recent", &iso(now - 1000), &[]);
    let fixture = Fixture::with(
        FeedbackSettings {
            sync: Some(SyncSettings {
                rescan_interval: Some(Duration::from_secs(60)),
                ..sync_settings()
            }),
            retention: no_retention(),
            ..FeedbackSettings::default()
        },
        Some(Arc::clone(&source) as Arc<dyn FeedbackSource>),
        clock,
    )
    .await;
    let mut synced = fixture.hub().sync_watch();
    synced.wait_for(Option::is_some).await.unwrap();
    // The first poll reads the whole backfill window, which counts as the first rescan.
    assert_eq!(source.queries().len(), 1);
    assert_eq!(fixture.feedback.stats().snapshot().rescans, 1);
    assert_eq!(fixture.hub().head(), 2);

    // A change to a response half an hour old is outside every poll's overlap...
    source.add("old", &iso(now - 1_800_000), &["vip"]);
    synced.changed().await.unwrap();
    assert_eq!(fixture.hub().head(), 2);
    // ...and seen by the next rescan, which reads the last hour again.
    let mut head = fixture.hub().head_watch();
    head.wait_for(|head| *head == 3).await.unwrap();
    let stats = fixture.feedback.stats().snapshot();
    assert_eq!((stats.updated, stats.rescans), (1, 2));
    let rescan = source
        .queries()
        .into_iter()
        .rev()
        .find(|query| query.start.timestamp_millis() < now - 1_000_000)
        .expect("a rescan query");
    assert!(rescan.start.timestamp_millis() <= now);
}

/// A poller over a source holding one response, whose queries fail until `fail` is cleared.
async fn failing_source() -> (Arc<ScriptedSource>, Fixture) {
    let clock = Clock::following_tokio();
    let now = clock.now_ms();
    let source = Arc::new(ScriptedSource::default());
    source.add("a", &iso(now - 1000), &[]);
    *source.fail.lock().unwrap() = true;
    let fixture = Fixture::polling(&source, clock).await;
    (source, fixture)
}

#[tokio::test(start_paused = true)]
async fn a_failed_poll_does_not_move_the_checkpoint() {
    let (source, fixture) = failing_source().await;
    while source.queries().len() < 2 {
        source.asked.notified().await;
    }
    assert_eq!(fixture.hub().head(), 0);
    assert!(fixture.feedback.stats().snapshot().poll_failures >= 1);
    let queries = source.queries();
    assert_eq!(queries[0].start, queries[1].start);
    *source.fail.lock().unwrap() = false;
    let mut synced = fixture.hub().sync_watch();
    synced.wait_for(Option::is_some).await.unwrap();
    assert_eq!(fixture.hub().head(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_sync_lag_grows_while_polls_fail_and_drops_when_one_completes() {
    let (source, fixture) = failing_source().await;
    fixture.feedback.register_metrics();
    let lag = || sample("cxgw_feedback_sync_lag_seconds", "");
    let polls = |outcome: &str| {
        sample(
            "cxgw_feedback_sync_polls_total",
            &format!("{{kind=\"incremental\",outcome=\"{outcome}\"}}"),
        )
    };
    let new_items = || sample("cxgw_feedback_sync_items_total", "{outcome=\"new\"}");
    let (failed_before, ok_before, new_before) = (polls("failed"), polls("ok"), new_items());
    // Polls 10 s apart, the first 10 s after start: three failures take 30 s, during which
    // nothing is known to be synced.
    while source.queries().len() < 3 {
        source.asked.notified().await;
    }
    assert!(lag() >= 30.0, "{}", lag());
    assert!(polls("failed") >= failed_before + 3.0);

    *source.fail.lock().unwrap() = false;
    let mut synced = fixture.hub().sync_watch();
    synced.wait_for(Option::is_some).await.unwrap();
    // The watermark is the start of the poll that just completed.
    assert!(lag() < 10.0, "{}", lag());
    assert!(polls("ok") >= ok_before + 1.0);
    assert!(new_items() >= new_before + 1.0);
    let text = crate::telemetry::metrics().prometheus_text().unwrap();
    assert!(
        text.contains("# TYPE cxgw_feedback_sync_lag_seconds gauge"),
        "{text}"
    );
}

fn receiver_settings(signing: Option<&str>) -> WebhookSettings {
    WebhookSettings {
        secret: crate::config::Secret::new("shared-secret"),
        secret_header: webhook::DEFAULT_SECRET_HEADER.to_owned(),
        signing_secret: signing.map(crate::config::Secret::new),
        tolerance: Duration::from_secs(300),
        max_body_bytes: 64 * 1024,
    }
}

#[tokio::test]
async fn webhook_calls_are_authenticated_before_anything_is_stored() {
    let fixture = Fixture::new(FeedbackSettings {
        webhook: Some(receiver_settings(Some("whsec"))),
        ..FeedbackSettings::default()
    })
    .await;
    let receiver = fixture.feedback.webhook().unwrap();
    let body = json!({"event": "feedback.created", "feedback": {
        "id": "w1", "createdDate": "2024-05-01T10:00:00.000Z", "score": 4, "metricsType": "CSAT"
    }})
    .to_string();
    let now = chrono::Utc::now().timestamp();
    let signature = cx_sandbox::signature("whsec", now, body.as_bytes());
    let forged = cx_sandbox::signature("guess", now, body.as_bytes());
    let stale = cx_sandbox::signature("whsec", now - 3600, body.as_bytes());
    let garbage: &[u8] = b"{\"feedback\": 3}";
    let garbage_signature = cx_sandbox::signature("whsec", now, garbage);
    let secret: Option<&[u8]> = Some(b"shared-secret");
    use webhook::Rejection::*;
    // (shared secret, signature, body, why the call is refused)
    let refused = [
        (None, Some(&signature), body.as_bytes(), Unauthenticated),
        (
            Some(&b"shared-secreT"[..]),
            Some(&signature),
            body.as_bytes(),
            Unauthenticated,
        ),
        (secret, None, body.as_bytes(), BadSignature),
        (secret, Some(&forged), body.as_bytes(), BadSignature),
        (secret, Some(&stale), body.as_bytes(), Stale),
        (secret, Some(&garbage_signature), garbage, Malformed),
    ];
    for (secret, signature, body, expected) in refused {
        let signature = signature.map(String::as_bytes);
        match receiver.receive(secret, signature, body).await {
            Err(webhook::ReceiveError::Rejected(rejection)) => assert_eq!(rejection, expected),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    assert_eq!(fixture.hub().head(), 0, "nothing refused reached the log");

    let receipt = receiver
        .receive(
            Some(b"shared-secret"),
            Some(signature.as_bytes()),
            body.as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!((receipt.received, receipt.created), (1, 1));
    assert_eq!(fixture.hub().head(), 1);
    let stats = fixture.feedback.stats().snapshot();
    assert_eq!(stats.webhook_rejected_unauthenticated, 2);
    assert_eq!(stats.webhook_rejected_signature, 2);
    assert_eq!(stats.webhook_rejected_stale, 1);
    assert_eq!(stats.webhook_rejected_malformed, 1);
    assert_eq!(stats.webhook_accepted, 1);
}

#[tokio::test]
async fn queries_serve_the_latest_versions_by_creation_time() {
    let fixture = Fixture::new(FeedbackSettings::default()).await;
    let mut items = Vec::new();
    for i in 0..5i64 {
        let mut item = response(
            &format!("q{i}"),
            if i % 2 == 0 { "even" } else { "odd" },
            5.0,
            "",
            &[],
        );
        item.create_time = Some(prost_types::Timestamp {
            seconds: 1_700_000_000 + i,
            nanos: 0,
        });
        item.email = format!("User{i}@Example.com");
        items.push(item);
    }
    fixture.observe(Origin::Poll, &items).await;
    let mut changed = items[0].clone();
    changed.tags = vec!["vip".into()];
    fixture.observe(Origin::Poll, &[changed]).await;

    let log = fixture.hub().log();
    let page = log
        .query(FeedbackQuery {
            campaign_id: Some("even".into()),
            newest_first: true,
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = page.items.iter().map(|f| f.feedback_id.as_str()).collect();
    assert_eq!(ids, vec!["q4", "q2"]);
    assert_eq!(page.total, 3);
    let rest = log
        .query(FeedbackQuery {
            campaign_id: Some("even".into()),
            newest_first: true,
            limit: 2,
            after: page.next,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].tags, vec!["vip"], "the latest version");
    assert!(rest.next.is_none());
    let by_email = log
        .query(FeedbackQuery {
            email: Some("user3@example.com".into()),
            created_from_ms: Some(1_700_000_000_000),
            created_before_ms: Some(1_700_000_004_000),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_email.items.len(), 1);
    assert_eq!(by_email.items[0].feedback_id, "q3");
    assert!(log.covered_range().await.unwrap().is_none(), "no sync ran");
}
