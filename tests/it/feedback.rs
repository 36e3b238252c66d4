//! FeedbackStream end to end: the sandbox's simulated responses reach subscribers through the
//! real poller (and webhook calls), the durable log and the fan-out.
//!
//! Waiting is driven by what the gateway sends: events, and heartbeats whose `sync_time` moves
//! once per completed poll (heartbeats are 100 ms apart in these tests). Nothing sleeps.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cx_gateway::feedback::StatsSnapshot;
use cx_gateway::pb;
use cx_gateway::pb::feedback_stream_client::FeedbackStreamClient;
use cx_sandbox::{Sandbox, SandboxConfig, SeedConfig, WebhookConfig};
use prost::Message as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt as _;

use crate::support::TestGateway;

/// Longest wait for anything the gateway is expected to send.
const PATIENCE: Duration = Duration::from_secs(30);

const SECRET: &str = "test-webhook-secret";
const SIGNING_SECRET: &str = "test-signing-secret";

/// A sandbox with campaigns and customers but no responses yet, and no rate limit (these tests
/// are about the pipeline, not the budget).
fn sandbox_config() -> SandboxConfig {
    SandboxConfig {
        retently_requests_per_minute: 0,
        seed: SeedConfig {
            feedback: 0,
            ..SeedConfig::default()
        },
        ..SandboxConfig::default()
    }
}

fn settings(extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut settings: Vec<(&'static str, String)> = vec![
        ("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "6000".to_owned()),
        ("CXGW_FEEDBACK_POLL_INTERVAL", "100ms".to_owned()),
        ("CXGW_FEEDBACK_RESCAN_INTERVAL", "0s".to_owned()),
        ("CXGW_FEEDBACK_HEARTBEAT_INTERVAL", "100ms".to_owned()),
    ];
    for (key, value) in extra {
        settings.retain(|(existing, _)| existing != key);
        settings.push((key, (*value).to_owned()));
    }
    settings
}

async fn subscribe(
    channel: &Channel,
    request: pb::SubscribeRequest,
) -> Streaming<pb::SubscribeResponse> {
    FeedbackStreamClient::new(channel.clone())
        .subscribe(request)
        .await
        .expect("subscribe")
        .into_inner()
}

/// The bearer token of the caller allowed to subscribe in the child-process tests.
const READER_TOKEN: &str = "feedback-reader-token-0123456789abcdef";

/// `CXGW_CALLERS` with one caller that may subscribe (its token kept as a SHA-256 digest).
fn reader_callers() -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, READER_TOKEN.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "[[caller]]\nname = \"stream-reader\"\ntoken_sha256 = [\"{hex}\"]\n\
         permissions = [\"feedback:subscribe\"]\n"
    )
}

/// Subscribes as the caller of [`reader_callers`].
async fn subscribe_as_reader(
    channel: &Channel,
    request: pb::SubscribeRequest,
) -> Streaming<pb::SubscribeResponse> {
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {READER_TOKEN}").parse().unwrap(),
    );
    FeedbackStreamClient::new(channel.clone())
        .subscribe(request)
        .await
        .expect("subscribe")
        .into_inner()
}

fn from_cursor(cursor: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        filter: None,
        start: Some(pb::subscribe_request::Start::Cursor(cursor.to_owned())),
    }
}

async fn message(stream: &mut Streaming<pb::SubscribeResponse>) -> pb::subscribe_response::Payload {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the gateway sent nothing in time")
        .expect("the stream failed")
        .expect("the stream ended")
        .payload
        .expect("a payload")
}

async fn next_event(stream: &mut Streaming<pb::SubscribeResponse>) -> pb::FeedbackEvent {
    loop {
        if let pb::subscribe_response::Payload::FeedbackEvent(event) = message(stream).await {
            return event;
        }
    }
}

async fn events(
    stream: &mut Streaming<pb::SubscribeResponse>,
    count: usize,
) -> Vec<pb::FeedbackEvent> {
    let mut events = Vec::with_capacity(count);
    while events.len() < count {
        events.push(next_event(stream).await);
    }
    events
}

/// Reads heartbeats until `polls` more polls have completed (their `sync_time` moved that many
/// times), failing on any event: nothing more is delivered meanwhile.
async fn expect_quiet(stream: &mut Streaming<pb::SubscribeResponse>, polls: usize) {
    let mut last: Option<prost_types::Timestamp> = None;
    let mut seen = 0;
    while seen <= polls {
        match message(stream).await {
            pb::subscribe_response::Payload::Heartbeat(heartbeat) => {
                if heartbeat.sync_time.is_some() && heartbeat.sync_time != last {
                    last = heartbeat.sync_time;
                    seen += 1;
                }
            }
            pb::subscribe_response::Payload::FeedbackEvent(event) => panic!(
                "unexpected event {} (sequence {})",
                event.feedback.map(|f| f.feedback_id).unwrap_or_default(),
                event.sequence
            ),
        }
    }
}

/// Waits for the first heartbeat showing a completed poll.
async fn synced(stream: &mut Streaming<pb::SubscribeResponse>) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let pb::subscribe_response::Payload::Heartbeat(heartbeat) = message(stream).await
                && heartbeat.sync_time.is_some()
            {
                return;
            }
        }
    })
    .await
    .expect("no poll completed in time");
}

fn ids(events: &[pb::FeedbackEvent]) -> Vec<String> {
    events
        .iter()
        .map(|event| event.feedback.as_ref().unwrap().feedback_id.clone())
        .collect()
}

fn simulated_ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn stats(admin: SocketAddr) -> StatsSnapshot {
    reqwest::get(format!("http://{admin}/feedback/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn assert_log_order(events: &[pb::FeedbackEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[0].sequence < pair[1].sequence,
            "sequences must increase"
        );
        let created = |event: &pb::FeedbackEvent| {
            let time = event.feedback.as_ref().unwrap().create_time.unwrap();
            (time.seconds, time.nanos)
        };
        assert!(
            created(&pair[0]) <= created(&pair[1]),
            "the poller reads oldest first"
        );
    }
}

#[tokio::test]
async fn simulated_responses_reach_subscribers_once_in_order_and_filters_apply() {
    let gateway = TestGateway::start_with(sandbox_config(), settings(&[])).await;
    let mut all = subscribe(&gateway.channel, pb::SubscribeRequest::default()).await;
    synced(&mut all).await;
    let nps_with_comment = pb::FeedbackFilter {
        metric: pb::Metric::Nps as i32,
        has_comment: Some(true),
        ..Default::default()
    };
    let mut filtered = subscribe(
        &gateway.channel,
        pb::SubscribeRequest {
            filter: Some(nps_with_comment),
            start: None,
        },
    )
    .await;

    let mut simulated = Vec::new();
    for _ in 0..4 {
        simulated.extend(gateway.sandbox().handle().simulate_feedback(10));
    }
    let received = events(&mut all, simulated.len()).await;
    let mut expected = simulated_ids(&simulated);
    let mut got = ids(&received);
    assert_eq!(
        got.iter().collect::<HashSet<_>>().len(),
        got.len(),
        "no duplicates"
    );
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "every simulated response, once");
    assert_log_order(&received);
    assert!(
        received
            .iter()
            .all(|event| event.kind == pb::FeedbackEventKind::Created as i32)
    );
    expect_quiet(&mut all, 3).await;

    let matching: Vec<String> = received
        .iter()
        .filter(|event| {
            let feedback = event.feedback.as_ref().unwrap();
            feedback.metric == pb::Metric::Nps as i32 && !feedback.comment.trim().is_empty()
        })
        .map(|event| event.feedback.as_ref().unwrap().feedback_id.clone())
        .collect();
    assert!(
        !matching.is_empty(),
        "the sandbox simulates NPS responses with comments"
    );
    let filtered_events = events(&mut filtered, matching.len()).await;
    assert_eq!(
        ids(&filtered_events),
        matching,
        "the same entries in the same order"
    );
    expect_quiet(&mut filtered, 2).await;

    // A replay of everything with a score filter gives the matching subset of the same log.
    let mut detractors = subscribe(
        &gateway.channel,
        pb::SubscribeRequest {
            filter: Some(pb::FeedbackFilter {
                max_score: Some(6.0),
                metric: pb::Metric::Nps as i32,
                ..Default::default()
            }),
            start: Some(pb::subscribe_request::Start::Position(
                pb::StreamPosition::Earliest as i32,
            )),
        },
    )
    .await;
    let low: Vec<String> = received
        .iter()
        .filter(|event| {
            let feedback = event.feedback.as_ref().unwrap();
            feedback.metric == pb::Metric::Nps as i32 && feedback.score.unwrap() <= 6.0
        })
        .map(|event| event.feedback.as_ref().unwrap().feedback_id.clone())
        .collect();
    let replayed = events(&mut detractors, low.len()).await;
    assert_eq!(ids(&replayed), low);
    assert!(
        replayed
            .iter()
            .all(|event| event.feedback.as_ref().unwrap().score_category
                == pb::ScoreCategory::Detractor as i32)
    );
    expect_quiet(&mut detractors, 1).await;

    let invalid = FeedbackStreamClient::new(gateway.channel.clone())
        .subscribe(from_cursor("not-a-cursor"))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    // Start times the log cannot hold: before 1970, and far ahead (milliseconds sent as seconds).
    for seconds in [-86_400, chrono::Utc::now().timestamp() * 1000] {
        let invalid = FeedbackStreamClient::new(gateway.channel.clone())
            .subscribe(pb::SubscribeRequest {
                filter: None,
                start: Some(pb::subscribe_request::Start::StartTime(
                    prost_types::Timestamp { seconds, nanos: 0 },
                )),
            })
            .await
            .unwrap_err();
        assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{seconds}");
        let details = invalid.get_error_details();
        assert_eq!(
            details.bad_request().unwrap().field_violations[0].field,
            "start_time"
        );
    }
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn resuming_after_a_disconnect_delivers_exactly_the_missed_responses() {
    let gateway = TestGateway::start_with(sandbox_config(), settings(&[])).await;
    let handle = gateway.sandbox().handle().clone();
    // Stays connected throughout, to know when responses are in the log.
    let mut monitor = subscribe(&gateway.channel, pb::SubscribeRequest::default()).await;
    synced(&mut monitor).await;
    let mut first = subscribe(&gateway.channel, pb::SubscribeRequest::default()).await;
    let before = handle.simulate_feedback(3);
    let seen = events(&mut first, 3).await;
    events(&mut monitor, 3).await;
    let cursor = seen.last().unwrap().cursor.clone();
    drop(first);

    let missed = handle.simulate_feedback(4);
    let logged = events(&mut monitor, 4).await;
    let mut resumed = subscribe(&gateway.channel, from_cursor(&cursor)).await;
    let replayed = events(&mut resumed, 4).await;
    assert_eq!(ids(&replayed), ids(&logged));
    let mut missed_ids = simulated_ids(&missed);
    let mut replayed_ids = ids(&replayed);
    missed_ids.sort();
    replayed_ids.sort();
    assert_eq!(replayed_ids, missed_ids);
    assert!(
        replayed_ids
            .iter()
            .all(|id| !simulated_ids(&before).contains(id))
    );

    // Live after the replay, with no gap or repeat at the switch.
    let after = handle.simulate_feedback(2);
    let live = events(&mut resumed, 2).await;
    let mut live_ids = ids(&live);
    let mut after_ids = simulated_ids(&after);
    live_ids.sort();
    after_ids.sort();
    assert_eq!(live_ids, after_ids);
    assert_eq!(live[0].sequence, replayed.last().unwrap().sequence + 1);
    expect_quiet(&mut resumed, 2).await;
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_tag_change_is_one_updated_event() {
    let gateway = TestGateway::start_with(sandbox_config(), settings(&[])).await;
    let mut stream = subscribe(&gateway.channel, pb::SubscribeRequest::default()).await;
    synced(&mut stream).await;
    let simulated = gateway.sandbox().handle().simulate_feedback(1);
    let id = simulated_ids(&simulated).remove(0);
    let created = next_event(&mut stream).await;
    assert_eq!(created.kind, pb::FeedbackEventKind::Created as i32);
    expect_quiet(&mut stream, 2).await;

    let response = reqwest::Client::new()
        .post(format!(
            "{}api/v2/response/tags",
            gateway.sandbox.base_url()
        ))
        .header(
            "Authorization",
            format!("api_key={}", cx_sandbox::DEFAULT_RETENTLY_API_KEY),
        )
        .json(&json!({"id": id, "tags": ["escalated", "vip"]}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let updated = next_event(&mut stream).await;
    assert_eq!(updated.kind, pb::FeedbackEventKind::Updated as i32);
    let feedback = updated.feedback.unwrap();
    assert_eq!(feedback.feedback_id, id);
    assert_eq!(feedback.tags, vec!["escalated", "vip"]);
    assert_eq!(updated.sequence, created.sequence + 1);
    expect_quiet(&mut stream, 3).await;
    let stats = stats(gateway.admin_addr).await;
    assert_eq!((stats.created, stats.updated), (1, 1));
    gateway.stop().await.unwrap();
}

fn webhook_settings(extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut all = vec![
        ("CXGW_WEBHOOK_SECRET", SECRET),
        ("CXGW_WEBHOOK_SIGNING_SECRET", SIGNING_SECRET),
    ];
    all.extend_from_slice(extra);
    settings(&all)
}

fn sandbox_webhook(admin: SocketAddr) -> WebhookConfig {
    let mut webhook = WebhookConfig::new(format!("http://{admin}/webhooks/retently"));
    webhook.headers = vec![("x-cx-webhook-secret".to_owned(), SECRET.to_owned())];
    webhook.signing_secret = Some(SIGNING_SECRET.to_owned());
    webhook
}

/// Posts a webhook call as the sandbox would, with the given secret and signing secret.
async fn post_webhook(
    admin: SocketAddr,
    body: &[u8],
    secret: Option<&str>,
    signing: Option<&str>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("http://{admin}/webhooks/retently"))
        .header("content-type", "application/json");
    if let Some(secret) = secret {
        request = request.header("x-cx-webhook-secret", secret);
    }
    if let Some(signing) = signing {
        let now = chrono::Utc::now().timestamp();
        request = request.header(
            cx_sandbox::SIGNATURE_HEADER,
            cx_sandbox::signature(signing, now, body),
        );
    }
    request.body(body.to_vec()).send().await.unwrap()
}

#[tokio::test]
async fn webhooks_deliver_without_a_poll_and_forged_calls_are_rejected() {
    // The first poll comes an hour after start: whatever arrives meanwhile came through the
    // webhook.
    let gateway = TestGateway::start_with(
        sandbox_config(),
        webhook_settings(&[("CXGW_FEEDBACK_POLL_INTERVAL", "1h")]),
    )
    .await;
    let admin = gateway.admin_addr;
    let mut stream = subscribe(&gateway.channel, pb::SubscribeRequest::default()).await;
    assert!(matches!(
        message(&mut stream).await,
        pb::subscribe_response::Payload::Heartbeat(_)
    ));

    // Forged, unsigned, stale and malformed calls: refused, counted, nothing logged.
    let handle = gateway.sandbox().handle().clone();
    let item = json!({"id": "0123456789abcdef01234567", "createdDate": "2024-05-01T10:00:00.000Z"});
    let body = json!({"event": "feedback.created", "feedback": item}).to_string();
    let body = body.as_bytes();
    for (secret, signing, status) in [
        (None, Some(SIGNING_SECRET), 401),
        (Some("guessed"), Some(SIGNING_SECRET), 401),
        (Some(SECRET), None, 401),
        (Some(SECRET), Some("forged-signing-secret"), 401),
    ] {
        let response = post_webhook(admin, body, secret, signing).await;
        assert_eq!(response.status().as_u16(), status, "{secret:?} {signing:?}");
        let text = response.text().await.unwrap();
        assert!(
            !text.contains("0123456789abcdef01234567"),
            "never echoes the body"
        );
    }
    let stale_time = chrono::Utc::now().timestamp() - 3600;
    let stale = reqwest::Client::new()
        .post(format!("http://{admin}/webhooks/retently"))
        .header("x-cx-webhook-secret", SECRET)
        .header(
            cx_sandbox::SIGNATURE_HEADER,
            cx_sandbox::signature(SIGNING_SECRET, stale_time, body),
        )
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status().as_u16(), 401);
    let malformed = post_webhook(
        admin,
        b"{\"feedback\": 7}",
        Some(SECRET),
        Some(SIGNING_SECRET),
    )
    .await;
    assert_eq!(malformed.status().as_u16(), 400);
    let counted = stats(admin).await;
    assert_eq!(counted.webhook_rejected_unauthenticated, 2);
    assert_eq!(counted.webhook_rejected_signature, 2);
    assert_eq!(counted.webhook_rejected_stale, 1);
    assert_eq!(counted.webhook_rejected_malformed, 1);
    assert_eq!(counted.created, 0);
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The same counters are metrics (their values are per process, and a test process may run
    // several gateways, so only the series is checked here).
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("cxgw_feedback_events")
                && line.contains("kind=\"webhook_rejected_signature\"")),
        "no feedback metrics in:\n{metrics}"
    );

    // The sandbox's own deliveries get through.
    handle.set_webhook(Some(sandbox_webhook(admin)));
    let simulated = handle.simulate_feedback(2);
    let delivered = events(&mut stream, 2).await;
    let mut expected = simulated_ids(&simulated);
    let mut got = ids(&delivered);
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    let after = stats(admin).await;
    assert_eq!(after.polls, 0, "no poll ran: the webhook delivered them");
    assert_eq!(
        handle.requests_to(cx_sandbox::Api::Retently, "/api/v2/feedback"),
        0
    );
    assert_eq!(after.webhook_accepted, 2);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_webhook_and_the_poller_seeing_the_same_response_give_one_event() {
    let gateway = TestGateway::start_with(sandbox_config(), webhook_settings(&[])).await;
    let admin = gateway.admin_addr;
    let handle = gateway.sandbox().handle().clone();
    let mut stream = subscribe(&gateway.channel, pb::SubscribeRequest::default()).await;
    synced(&mut stream).await;

    // Both paths race for each response; whichever wins, there is one event per response.
    handle.set_webhook(Some(sandbox_webhook(admin)));
    let simulated = handle.simulate_feedback(3);
    let delivered = events(&mut stream, 3).await;
    let mut expected = simulated_ids(&simulated);
    let mut got = ids(&delivered);
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    expect_quiet(&mut stream, 3).await;
    assert_eq!(handle.webhook_stats().delivered, 3);
    let both = stats(admin).await;
    assert_eq!(both.created, 3);
    assert_eq!(both.webhook_accepted, 3);
    assert!(
        both.unchanged + both.ignored >= 3,
        "each response was seen a second time: {both:?}"
    );

    // The poller first, then a late webhook call with the same response: still one event.
    handle.set_webhook(None);
    let polled = handle.simulate_feedback(1);
    let event = next_event(&mut stream).await;
    assert_eq!(ids(&[event]), simulated_ids(&polled));
    let late = cx_sandbox::delivery_body(&sandbox_webhook(admin), &polled[0]).to_string();
    let response = post_webhook(admin, late.as_bytes(), Some(SECRET), Some(SIGNING_SECRET)).await;
    assert_eq!(response.status().as_u16(), 200);
    let receipt: Value = response.json().await.unwrap();
    assert_eq!(receipt, json!({"received": 1, "created": 0}));
    expect_quiet(&mut stream, 2).await;
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_streams_with_a_final_cursor_to_resume_from() {
    let mut gateway = TestGateway::start_with(sandbox_config(), settings(&[])).await;
    let mut stream = subscribe(&gateway.channel, pb::SubscribeRequest::default()).await;
    synced(&mut stream).await;
    gateway.sandbox().handle().simulate_feedback(2);
    let received = events(&mut stream, 2).await;
    gateway.begin_shutdown();
    // Heartbeats until the end; the last message before the status is the final one.
    let mut last_heartbeat = None;
    let status = loop {
        match tokio::time::timeout(PATIENCE, stream.message())
            .await
            .unwrap()
        {
            Ok(Some(message)) => match message.payload.unwrap() {
                pb::subscribe_response::Payload::Heartbeat(heartbeat) => {
                    last_heartbeat = Some(heartbeat);
                }
                other => panic!("unexpected {other:?}"),
            },
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    let cursor = last_heartbeat.expect("a final heartbeat").cursor;
    assert_eq!(
        cursor, received[1].cursor,
        "the final cursor is the stream's position"
    );
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let details = tonic_types::StatusExt::get_error_details(&status);
    assert_eq!(details.error_info().unwrap().reason, "SERVER_SHUTTING_DOWN");
    assert!(details.retry_info().is_some());
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn an_idle_poll_costs_one_upstream_request() {
    // Counters are read while the poller's next request waits in the sandbox's hold gate: every
    // poll before it has finished and been counted on both sides, and it has not been counted on
    // either, however slow the machine is.
    let gateway = TestGateway::start_with(
        sandbox_config(),
        settings(&[
            ("CXGW_FEEDBACK_POLL_INTERVAL", "500ms"),
            ("CXGW_FEEDBACK_HEARTBEAT_INTERVAL", "50ms"),
        ]),
    )
    .await;
    let admin = gateway.admin_addr;
    let handle = gateway.sandbox().handle().clone();
    let mut stream = subscribe(&gateway.channel, pb::SubscribeRequest::default()).await;
    handle.simulate_feedback(5);
    events(&mut stream, 5).await;
    expect_quiet(&mut stream, 0).await;
    let between_polls = || async {
        handle.hold_after(cx_sandbox::Api::Retently, 0);
        crate::support::eventually("the poller's next request is held", PATIENCE, || {
            handle.held(cx_sandbox::Api::Retently) == 1
        })
        .await;
        let counted = (
            stats(admin).await,
            handle.requests_to(cx_sandbox::Api::Retently, "/api/v2/feedback"),
        );
        handle.release(cx_sandbox::Api::Retently);
        counted
    };
    let (before, upstream_before) = between_polls().await;
    expect_quiet(&mut stream, 10).await;
    let (after, upstream_after) = between_polls().await;
    let polls = after.polls - before.polls;
    assert!(polls >= 10, "{polls}");
    assert_eq!(after.poll_requests - before.poll_requests, polls);
    assert_eq!(upstream_after - upstream_before, polls);
    assert_eq!(
        after.unchanged - before.unchanged,
        5 * polls,
        "each saw the overlap again"
    );
    println!(
        "idle polls: {polls}, upstream requests: {}",
        upstream_after - upstream_before
    );
    gateway.stop().await.unwrap();
}

// ---- the gateway as a child process ----

/// A `cx-gateway serve` process against a sandbox of this test.
struct ChildGateway {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
}

impl ChildGateway {
    async fn start(sandbox_url: &str, data_dir: &Path, extra: &[(&str, &str)]) -> ChildGateway {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cx-gateway"));
        command
            .arg("serve")
            .env_clear()
            .env("CXGW_GRPC_ADDR", "127.0.0.1:0")
            .env("CXGW_ADMIN_ADDR", "127.0.0.1:0")
            .env("CXGW_DATA_DIR", data_dir)
            .env("CXGW_LOG_FORMAT", "json")
            .env("CXGW_LOG", "info")
            .env("CXGW_RETENTLY_BASE_URL", sandbox_url)
            .env(
                "CXGW_RETENTLY_API_KEY",
                cx_sandbox::DEFAULT_RETENTLY_API_KEY,
            )
            .env("CXGW_RETAINLY_BASE_URL", sandbox_url)
            .env("CXGW_RETAINLY_API_KEY", cx_sandbox::DEFAULT_RETAINLY_KEY)
            .env(
                "CXGW_RETAINLY_API_SECRET",
                cx_sandbox::DEFAULT_RETAINLY_SECRET,
            )
            .env("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "6000")
            .env("CXGW_FEEDBACK_POLL_INTERVAL", "100ms")
            .env("CXGW_FEEDBACK_RESCAN_INTERVAL", "0s")
            .env("CXGW_FEEDBACK_HEARTBEAT_INTERVAL", "100ms")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (key, value) in extra {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start cx-gateway");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (grpc, admin) = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let Ok(record) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if record["message"] == "gateway serving" {
                    let address = |field: &str| record[field].as_str().unwrap().parse().unwrap();
                    return (address("grpc_addr"), address("admin_addr"));
                }
            }
            panic!("cx-gateway exited before serving");
        })
        .await
        .expect("cx-gateway did not start in time");
        // Keep reading its output so the pipe never fills and blocks it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ChildGateway { child, grpc, admin }
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// SIGKILL: no drain, no final write.
    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

async fn start_sandbox() -> cx_gateway::sandbox_mode::EmbeddedSandbox {
    cx_gateway::sandbox_mode::EmbeddedSandbox::spawn(
        Sandbox::new(sandbox_config()),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_killed_gateway_resumes_without_loss_or_duplicates() {
    let sandbox = start_sandbox().await;
    let handle = sandbox.sandbox().handle().clone();
    let url = sandbox.base_url().to_string();
    let data = tempfile::tempdir().unwrap();

    // `serve` authenticates callers: the stream is subscribed as a caller allowed to.
    let callers = reader_callers();
    let auth = [("CXGW_CALLERS", callers.as_str())];
    let gateway = ChildGateway::start(&url, data.path(), &auth).await;
    let channel = gateway.channel().await;
    let anonymous = FeedbackStreamClient::new(channel.clone())
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    let mut stream = subscribe_as_reader(&channel, pb::SubscribeRequest::default()).await;
    synced(&mut stream).await;
    let first = handle.simulate_feedback(5);
    let received = events(&mut stream, 5).await;
    let mut expected = simulated_ids(&first);
    let mut got = ids(&received);
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    // The subscriber processed only three before the crash.
    let processed = received[..3].to_vec();
    let cursor = processed.last().unwrap().cursor.clone();
    gateway.kill().await;
    drop(stream);

    // Responses keep arriving while the gateway is down.
    let while_down = handle.simulate_feedback(3);
    let gateway = ChildGateway::start(&url, data.path(), &auth).await;
    let channel = gateway.channel().await;
    let mut resumed = subscribe_as_reader(&channel, from_cursor(&cursor)).await;
    let rest = events(&mut resumed, 5).await;
    let mut after_crash = ids(&rest);
    let mut expected: Vec<String> = ids(&received[3..]);
    expected.extend(simulated_ids(&while_down));
    after_crash.sort();
    expected.sort();
    assert_eq!(
        after_crash, expected,
        "exactly what the subscriber had not processed"
    );
    assert_eq!(rest[0].sequence, processed.last().unwrap().sequence + 1);
    assert_log_order(&rest[2..]);
    expect_quiet(&mut resumed, 3).await;
    let stats = stats(gateway.admin).await;
    assert_eq!(
        stats.created, 3,
        "only the new responses were new after the restart"
    );
    gateway.kill().await;
    sandbox.stop().await;
}

// ---- memory with a stalled subscriber ----

fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// An HTTP/2 client written by hand that subscribes and then never reads its socket: the
/// worst kind of stalled subscriber (its TCP window closes, so everything sent to it waits in
/// the gateway). It grants the largest flow-control windows so HTTP/2 never holds the gateway
/// back either.
async fn stalled_subscriber(addr: SocketAddr) -> TcpStream {
    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE = 2^31 - 1.
    frame(&mut out, 0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]);
    // WINDOW_UPDATE of the connection up to 2^31 - 1.
    frame(
        &mut out,
        0x8,
        0,
        0,
        &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
    );
    let authority = addr.to_string();
    let mut headers = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/cx.gateway.v1.FeedbackStream/Subscribe"),
        (":authority", authority.as_str()),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        // HPACK literal without indexing, new name, no Huffman coding.
        headers.push(0);
        headers.push(name.len() as u8);
        headers.extend_from_slice(name.as_bytes());
        headers.push(value.len() as u8);
        headers.extend_from_slice(value.as_bytes());
    }
    frame(&mut out, 0x1, 0x4, 1, &headers);
    let request = pb::SubscribeRequest::default().encode_to_vec();
    let mut data = vec![0];
    data.extend_from_slice(&(request.len() as u32).to_be_bytes());
    data.extend_from_slice(&request);
    frame(&mut out, 0x0, 0x1, 1, &data);
    stream.write_all(&out).await.unwrap();
    stream
}

/// Active subscribers: each follows one of `campaigns` campaigns and counts what it receives.
struct Readers {
    received: Vec<Arc<AtomicU64>>,
    progress: Arc<Notify>,
}

impl Readers {
    async fn start(channels: &[Channel], count: usize, campaigns: usize) -> Readers {
        let progress = Arc::new(Notify::new());
        let mut received = Vec::with_capacity(count);
        for index in 0..count {
            let counter = Arc::new(AtomicU64::new(0));
            received.push(Arc::clone(&counter));
            let mut stream = subscribe(
                &channels[index % channels.len()],
                pb::SubscribeRequest {
                    filter: Some(pb::FeedbackFilter {
                        campaign_ids: vec![format!("campaign-{}", index % campaigns)],
                        ..Default::default()
                    }),
                    start: None,
                },
            )
            .await;
            let progress = Arc::clone(&progress);
            tokio::spawn(async move {
                while let Ok(Some(message)) = stream.message().await {
                    if let Some(pb::subscribe_response::Payload::FeedbackEvent(_)) = message.payload
                    {
                        counter.fetch_add(1, Ordering::Relaxed);
                        progress.notify_waiters();
                    }
                }
            });
        }
        Readers { received, progress }
    }

    async fn wait_for(&self, expected: &[u64]) {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let notified = self.progress.notified();
                if self
                    .received
                    .iter()
                    .zip(expected)
                    .all(|(counter, expected)| counter.load(Ordering::Relaxed) >= *expected)
                {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("every active subscriber received its events");
    }
}

#[tokio::test]
async fn a_stalled_subscriber_does_not_grow_memory_while_a_thousand_others_receive() {
    const SUBSCRIBERS: usize = 1000;
    // Each response matches the four subscribers following its campaign.
    const CAMPAIGNS: usize = 250;
    const ROUNDS: usize = 90;
    const PER_ROUND: usize = 40;
    // Large responses: what the stalled subscriber is not sent adds up quickly.
    const COMMENT: usize = 16 * 1024;

    let sandbox = start_sandbox().await;
    let url = sandbox.base_url().to_string();
    let data = tempfile::tempdir().unwrap();
    let gateway = ChildGateway::start(
        &url,
        data.path(),
        &[
            ("CXGW_WEBHOOK_SECRET", SECRET),
            // Authentication is not what this test is about.
            ("CXGW_TRUSTED_MESH", "true"),
            // Responses come from webhook calls of this test; the poller idles.
            ("CXGW_FEEDBACK_POLL_INTERVAL", "1h"),
            ("CXGW_FEEDBACK_HEARTBEAT_INTERVAL", "15s"),
            ("CXGW_FEEDBACK_SUBSCRIBER_BUFFER", "256"),
            ("CXGW_WEBHOOK_MAX_BODY_BYTES", "4194304"),
            // Keep the stalled connection open for the whole test (a dead peer is otherwise
            // found by keep-alive pings within 40 s).
            ("CXGW_HTTP2_KEEPALIVE_INTERVAL", "1h"),
        ],
    )
    .await;
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(gateway.channel().await);
    }
    let readers = Readers::start(&channels, SUBSCRIBERS, CAMPAIGNS).await;
    let _stalled = stalled_subscriber(gateway.grpc).await;

    let comment = "x".repeat(COMMENT);
    let mut expected = vec![0u64; SUBSCRIBERS];
    let mut next_id = 0u64;
    let mut published_bytes = 0usize;
    let mut baseline = 0;
    for round in 0..ROUNDS {
        let mut items = Vec::with_capacity(PER_ROUND);
        for _ in 0..PER_ROUND {
            let campaign = (next_id as usize) % CAMPAIGNS;
            items.push(json!({
                "id": format!("{next_id:024x}"),
                "createdDate": chrono::Utc::now().to_rfc3339(),
                "campaignId": format!("campaign-{campaign}"),
                "metricsType": "NPS",
                "score": 3,
                "comment": comment,
            }));
            for (index, count) in expected.iter_mut().enumerate() {
                if index % CAMPAIGNS == campaign {
                    *count += 1;
                }
            }
            next_id += 1;
        }
        let body = json!({"event": "feedback.created", "feedback": items}).to_string();
        published_bytes += body.len();
        let response = post_webhook(gateway.admin, body.as_bytes(), Some(SECRET), None).await;
        assert_eq!(response.status().as_u16(), 200);
        readers.wait_for(&expected).await;
        if round == ROUNDS / 6 {
            // Warm: the live buffer is full, the stalled connection's buffers too.
            baseline = resident_bytes(gateway.pid());
        }
    }
    let after = resident_bytes(gateway.pid());
    let growth = after.saturating_sub(baseline);
    let published_after_baseline = published_bytes * (ROUNDS - ROUNDS / 6 - 1) / ROUNDS;
    println!(
        "rss baseline {} MiB, after {} MiB, growth {} KiB, published after baseline {} MiB, \
         events {next_id}, deliveries {}",
        baseline >> 20,
        after >> 20,
        growth >> 10,
        published_after_baseline >> 20,
        expected.iter().sum::<u64>()
    );
    // Everything published after the baseline would sit in the gateway if the stalled
    // subscriber's share were buffered; the bound is a small fraction of it.
    assert!(
        growth < 16 * 1024 * 1024,
        "resident memory grew by {growth} bytes"
    );
    assert!(published_after_baseline > 40 * 1024 * 1024);
    let counts = stats(gateway.admin).await;
    assert_eq!(counts.subscribers, SUBSCRIBERS as u64 + 1);
    assert_eq!(counts.created, next_id);
    gateway.kill().await;
    sandbox.stop().await;
}

#[tokio::test]
async fn stream_events_go_uncompressed_even_to_a_client_accepting_gzip() {
    use cx_gateway::pb::survey_service_client::SurveyServiceClient;
    use tonic::codec::CompressionEncoding;

    let gateway = TestGateway::start_with(sandbox_config(), settings(&[])).await;
    // A unary call from the same client is compressed: the client does ask for gzip.
    let campaigns = SurveyServiceClient::new(gateway.channel.clone())
        .accept_compressed(CompressionEncoding::Gzip)
        .list_campaigns(pb::ListCampaignsRequest::default())
        .await
        .expect("list campaigns");
    assert_eq!(
        campaigns
            .metadata()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );

    // The same events go to every subscriber as encoded once: never compressed per stream.
    let response = FeedbackStreamClient::new(gateway.channel.clone())
        .accept_compressed(CompressionEncoding::Gzip)
        .subscribe(pb::SubscribeRequest::default())
        .await
        .expect("subscribe");
    assert_eq!(response.metadata().get("grpc-encoding"), None);
    let mut stream = response.into_inner();
    synced(&mut stream).await;
    let simulated = gateway.sandbox().handle().simulate_feedback(2);
    let ids = simulated_ids(&simulated);
    let delivered = [next_event(&mut stream).await, next_event(&mut stream).await];
    let delivered: Vec<&str> = delivered
        .iter()
        .map(|event| event.feedback.as_ref().unwrap().feedback_id.as_str())
        .collect();
    assert_eq!(delivered, ids);
}

// ---- memory given back after slow subscribers leave ----

/// Publishes `rounds` webhook calls of `per_round` responses (all for `campaign-0`) with a
/// `comment_bytes` comment each; returns the last id used.
async fn publish(
    admin: SocketAddr,
    mut last_id: u64,
    rounds: usize,
    per_round: usize,
    comment_bytes: usize,
) -> u64 {
    let comment = "y".repeat(comment_bytes);
    for _ in 0..rounds {
        let items: Vec<Value> = (0..per_round)
            .map(|_| {
                last_id += 1;
                json!({
                    "id": format!("{last_id:024x}"),
                    "createdDate": chrono::Utc::now().to_rfc3339(),
                    "campaignId": "campaign-0",
                    "metricsType": "NPS",
                    "score": 9,
                    "comment": comment,
                })
            })
            .collect();
        let body = json!({"event": "feedback.created", "feedback": items}).to_string();
        let response = post_webhook(admin, body.as_bytes(), Some(SECRET), None).await;
        assert_eq!(response.status().as_u16(), 200);
    }
    last_id
}

#[tokio::test]
async fn memory_held_for_a_thousand_stalled_readers_is_given_back_when_they_leave() {
    const READERS: usize = 1000;
    // Enough per reader to fill what HTTP/2 buffers for one stream (about 400 KiB).
    const ROUNDS: usize = 20;
    const PER_ROUND: usize = 10;
    const COMMENT: usize = 8 * 1024;
    const MIB: u64 = 1024 * 1024;

    let sandbox = start_sandbox().await;
    let url = sandbox.base_url().to_string();
    let data = tempfile::tempdir().unwrap();
    let gateway = ChildGateway::start(
        &url,
        data.path(),
        &[
            ("CXGW_WEBHOOK_SECRET", SECRET),
            // Authentication is not what this test is about.
            ("CXGW_TRUSTED_MESH", "true"),
            // Responses come from webhook calls of this test; the poller idles.
            ("CXGW_FEEDBACK_POLL_INTERVAL", "1h"),
            ("CXGW_FEEDBACK_HEARTBEAT_INTERVAL", "15s"),
            ("CXGW_WEBHOOK_MAX_BODY_BYTES", "4194304"),
            // Stalled connections stay until the test closes them.
            ("CXGW_HTTP2_KEEPALIVE_INTERVAL", "1h"),
        ],
    )
    .await;
    // One live reader proves events flow, and warms every path the stalled readers use.
    let channel = gateway.channel().await;
    let watcher = Readers::start(std::slice::from_ref(&channel), 1, 1).await;
    let mut last_id = publish(gateway.admin, 0, 2, PER_ROUND, COMMENT).await;
    watcher.wait_for(&[last_id]).await;
    let baseline = resident_bytes(gateway.pid());

    // Readers that never read their socket: slow by construction, so the gateway holds what it
    // sends them.
    let mut stalled = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        stalled.push(stalled_subscriber(gateway.grpc).await);
    }
    last_id = publish(gateway.admin, last_id, ROUNDS, PER_ROUND, COMMENT).await;
    // The live reader has everything, so every stalled stream was offered it too.
    watcher.wait_for(&[last_id]).await;
    assert_eq!(stats(gateway.admin).await.subscribers, READERS as u64 + 1);
    let held = resident_bytes(gateway.pid());

    drop(stalled);
    tokio::time::timeout(PATIENCE, async {
        while stats(gateway.admin).await.subscribers != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the gateway noticed every stalled reader leave");
    last_id = publish(gateway.admin, last_id, 1, PER_ROUND, COMMENT).await;
    watcher.wait_for(&[last_id]).await;
    let left = resident_bytes(gateway.pid());
    // The allocator hands freed pages back on its own clock (jemalloc's decay, about 10 s) and
    // says so through no signal, so this watches resident memory, with a generous limit.
    let bound = baseline + 32 * MIB;
    let returned = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let now = resident_bytes(gateway.pid());
            if now < bound {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    let settled = returned.unwrap_or_else(|_| resident_bytes(gateway.pid()));
    println!(
        "rss baseline {} MiB, with {READERS} stalled readers {} MiB, when they left {} MiB, \
         settled {} MiB",
        baseline / MIB,
        held / MIB,
        left / MIB,
        settled / MIB,
    );
    assert!(
        held > baseline + 150 * MIB,
        "the stalled readers made the gateway hold memory ({} MiB over the baseline)",
        (held - baseline) / MIB
    );
    assert!(
        settled < bound,
        "resident memory stayed at {} MiB after the readers left (baseline {} MiB)",
        settled / MIB,
        baseline / MIB
    );
    gateway.kill().await;
    sandbox.stop().await;
}
