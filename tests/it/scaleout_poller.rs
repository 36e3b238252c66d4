//! One feedback poller and one log across replicas: three gateway processes on one PostgreSQL
//! database and one emulator.
//!
//! - Idle, the three replicas make one poll per interval in all, not three (the emulator counts
//!   the `/feedback` requests).
//! - The poller's replica SIGKILLed: another replica takes the lease over and polls within 5 s;
//!   a subscriber on the third replica receives every response exactly once, in one gap-free
//!   sequence, across the takeover; the dead replica's subscriber resumes on another replica by
//!   its cursor with no gap and no duplicate.
//!
//! The kill falls in the middle of a poll by construction: the emulator holds every `/feedback`
//! request on the wire from the first poll's end on, the old leader's next one is held when it
//! is killed (and dies with it), and the next request to arrive at the gate is the new leader's
//! first poll, whose arrival is timed from the kill.
//!
//! Needs the test cluster of `scripts/postgres.sh` (`CXGW_TEST_POSTGRES_URL`); without it the
//! tests pass as skipped, unless `CXGW_TEST_REQUIRE_POSTGRES=1` (scripts/test.sh) requires it.

use std::collections::HashSet;
use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::feedback_stream_client::FeedbackStreamClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Api, HoldSpec, Sandbox, SandboxConfig, SeedConfig};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::Streaming;

use crate::child::ChildGateway;
use crate::replicas::SharedDatabase;
use crate::support::eventually;

const FEEDBACK_ROUTE: &str = "/api/v2/feedback";

/// Longest wait for anything the replicas are expected to do.
const PATIENCE: Duration = Duration::from_secs(60);

/// The bound on a takeover: another replica polls within this of the leader's death.
const TAKEOVER_BOUND: Duration = Duration::from_secs(5);

/// Campaigns and customers to answer surveys, no responses yet, no rate limit (these tests
/// count requests, they do not exercise the budget).
async fn emulator() -> (Sandbox, EmbeddedSandbox) {
    let sandbox = Sandbox::new(SandboxConfig {
        retently_requests_per_minute: 0,
        seed: SeedConfig {
            feedback: 0,
            ..SeedConfig::default()
        },
        ..SandboxConfig::default()
    });
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    (sandbox, emulator)
}

fn settings(poll_interval: &str, lease: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "6000".to_owned()),
        ("CXGW_FEEDBACK_POLL_INTERVAL", poll_interval.to_owned()),
        ("CXGW_FEEDBACK_RESCAN_INTERVAL", "0s".to_owned()),
        ("CXGW_FEEDBACK_HEARTBEAT_INTERVAL", "1s".to_owned()),
        ("CXGW_POSTGRES_POLLER_LEASE", lease.to_owned()),
    ]
}

fn polls(sandbox: &Sandbox) -> u64 {
    sandbox.handle().requests_to(Api::Retently, FEEDBACK_ROUTE)
}

/// The epochs this replica's log says it took the poller's lease with.
fn leads(replica: &ChildGateway) -> Vec<i64> {
    replica
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("feedback poller leads"))
        .filter_map(|line| {
            let parsed: Value = serde_json::from_str(line).ok()?;
            parsed["epoch"].as_i64()
        })
        .collect()
}

async fn subscribe(
    replica: &ChildGateway,
    start: pb::subscribe_request::Start,
) -> Streaming<pb::SubscribeResponse> {
    FeedbackStreamClient::new(replica.channel.clone())
        .subscribe(pb::SubscribeRequest {
            filter: None,
            start: Some(start),
        })
        .await
        .expect("subscribe")
        .into_inner()
}

fn earliest() -> pb::subscribe_request::Start {
    pb::subscribe_request::Start::Position(pb::StreamPosition::Earliest as i32)
}

/// What one subscriber received: (sequence, feedback id) of each event, and the last cursor
/// (of an event or a heartbeat).
#[derive(Default)]
struct Received {
    events: Vec<(i64, String)>,
    cursor: String,
}

impl Received {
    /// Reads until `count` events arrived in all.
    async fn until(&mut self, stream: &mut Streaming<pb::SubscribeResponse>, count: usize) {
        let reading = async {
            while self.events.len() < count {
                let message = stream
                    .message()
                    .await
                    .expect("the stream works")
                    .expect("the stream goes on");
                match message.payload.expect("a payload") {
                    pb::subscribe_response::Payload::FeedbackEvent(event) => {
                        let id = event.feedback.expect("a response").feedback_id;
                        self.events.push((event.sequence, id));
                        self.cursor = event.cursor;
                    }
                    pb::subscribe_response::Payload::Heartbeat(heartbeat) => {
                        self.cursor = heartbeat.cursor;
                    }
                }
            }
        };
        tokio::time::timeout(PATIENCE, reading)
            .await
            .unwrap_or_else(|_| panic!("{} of {count} events arrived in time", self.events.len()));
    }

    fn ids(&self) -> Vec<String> {
        self.events.iter().map(|(_, id)| id.clone()).collect()
    }

    fn sequences(&self) -> Vec<i64> {
        self.events.iter().map(|(sequence, _)| *sequence).collect()
    }
}

fn simulated(sandbox: &Sandbox, count: usize) -> Vec<String> {
    let items = sandbox.handle().simulate_feedback(count);
    assert_eq!(items.len(), count, "the emulator can simulate responses");
    items
        .iter()
        .map(|item| item["id"].as_str().expect("an id").to_owned())
        .collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_poller_idle_replicas_make_one_poll_per_interval_in_all() {
    let Some(mut database) = SharedDatabase::create().await else {
        return;
    };
    let (sandbox, emulator) = emulator().await;
    // The default lease (3 s): what is counted is the polls, not how fast a takeover is.
    let replicas = database
        .start_replicas(3, &emulator, &settings("1s", "3s"))
        .await;
    eventually("the first poll", PATIENCE, || polls(&sandbox) >= 1).await;

    // One interval is the time from the end of one poll to the start of the next, so one poller
    // makes at most window / interval + 1 polls in a window; three would make about three
    // times as many.
    let first = polls(&sandbox);
    let since = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let counted = polls(&sandbox) - first;
    let window = since.elapsed().as_secs_f64();
    let most = window.floor() as u64 + 1;
    eprintln!("three idle replicas: {counted} polls in {window:.1} s of 1 s intervals");
    assert!(
        (2..=most).contains(&counted),
        "{counted} polls in {window:.1} s of 1 s intervals (at most {most} for one poller)"
    );
    let leaders: Vec<usize> = (0..replicas.len())
        .filter(|&index| !leads(&replicas[index]).is_empty())
        .collect();
    assert!(!leaders.is_empty(), "a replica says it leads");

    // Which replica leads shows in `/feedback/stats` and in the metrics: one of the three.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut leading = Vec::new();
        for replica in &replicas {
            let stats: Value =
                reqwest::get(format!("http://{}/feedback/stats", replica.admin_addr))
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
            let metrics = reqwest::get(format!("http://{}/metrics", replica.admin_addr))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let gauge = metrics
                .lines()
                .find(|line| line.starts_with("cxgw_feedback_poller_leader"))
                .and_then(|line| line.split_whitespace().last())
                .map(str::to_owned);
            leading.push((stats["poller_leading"].as_u64(), gauge));
        }
        let one = leading
            .iter()
            .filter(|(stats, _)| *stats == Some(1))
            .count()
            == 1
            && leading
                .iter()
                .all(|(stats, gauge)| gauge.as_deref() == stats.map(|v| v.to_string()).as_deref());
        if one {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "one replica reports it leads: {leading:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(replicas);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_poller_takes_over_within_5s_and_streams_stay_exact() {
    let Some(mut database) = SharedDatabase::create().await else {
        return;
    };
    let (sandbox, emulator) = emulator().await;
    let mut all_ids = simulated(&sandbox, 20);
    let mut replicas = database
        .start_replicas(3, &emulator, &settings("2s", "1s"))
        .await;
    let mut streams = Vec::new();
    for replica in &replicas {
        streams.push(subscribe(replica, earliest()).await);
    }
    let mut received: Vec<Received> = (0..3).map(|_| Received::default()).collect();
    for (stream, got) in streams.iter_mut().zip(&mut received) {
        got.until(stream, 20).await;
    }
    let leaders: Vec<usize> = (0..3)
        .filter(|&index| !leads(&replicas[index]).is_empty())
        .collect();
    assert_eq!(leaders.len(), 1, "one replica leads: {leaders:?}");
    let leader = leaders[0];
    let old_epoch = *leads(&replicas[leader]).last().unwrap();

    // Every later poll waits at the emulator's gate; responses the old leader will never see
    // arrive; its next poll reaches the gate, and it is killed with that request on the wire.
    let handle = sandbox.handle().clone();
    handle.hold(
        Api::Retently,
        HoldSpec {
            route: Some(FEEDBACK_ROUTE.to_owned()),
            ..HoldSpec::default()
        },
    );
    all_ids.extend(simulated(&sandbox, 15));
    eventually("the old leader's next poll at the gate", PATIENCE, || {
        handle.held(Api::Retently) >= 1
    })
    .await;
    let dead = replicas.remove(leader);
    drop(streams.remove(leader));
    let dead_received = received.remove(leader);
    let killed = Instant::now();
    dead.kill();

    // The next poll to arrive is the new leader's first.
    eventually("a poll by the new leader", PATIENCE, || {
        handle.held(Api::Retently) >= 2
    })
    .await;
    let takeover = killed.elapsed();
    handle.release(Api::Retently);
    eprintln!("first poll by the new leader {takeover:?} after the kill (lease 1 s)");
    assert!(
        takeover < TAKEOVER_BOUND,
        "the first poll after the kill came {takeover:?} after it"
    );
    let new_leaders: Vec<usize> = (0..2)
        .filter(|&index| {
            leads(&replicas[index])
                .iter()
                .any(|&epoch| epoch > old_epoch)
        })
        .collect();
    assert_eq!(
        new_leaders.len(),
        1,
        "one survivor took the lease over with a new epoch"
    );
    let third = 1 - new_leaders[0];

    // More after the takeover, polled by the new leader.
    all_ids.extend(simulated(&sandbox, 10));
    let total = all_ids.len();
    for (stream, got) in streams.iter_mut().zip(&mut received) {
        got.until(stream, total).await;
    }
    // Every survivor's subscriber (the third replica's above all) got every response once, in
    // one gap-free sequence.
    for got in &received {
        assert_eq!(got.sequences(), (1..=total as i64).collect::<Vec<_>>());
        assert_eq!(sorted(got.ids()), sorted(all_ids.clone()));
    }

    // The dead replica's subscriber resumes on the third replica by its cursor.
    assert_eq!(dead_received.events.len(), 20);
    let mut resumed = subscribe(
        &replicas[third],
        pb::subscribe_request::Start::Cursor(dead_received.cursor.clone()),
    )
    .await;
    let mut rest = Received::default();
    rest.until(&mut resumed, total - 20).await;
    assert_eq!(rest.sequences(), (21..=total as i64).collect::<Vec<_>>());
    let mut together: Vec<String> = dead_received.ids();
    together.extend(rest.ids());
    assert_eq!(
        together.iter().collect::<HashSet<_>>().len(),
        total,
        "no duplicate across the resume"
    );
    assert_eq!(sorted(together), sorted(all_ids));
}
