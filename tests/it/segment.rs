//! The Segment intake against the real server and the sandbox: Segment's HTTP Tracking API
//! shapes, write keys, size limits, all-or-nothing batches and `messageId` deduplication.

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cx_sandbox::SandboxConfig;
use serde_json::{Value, json};

use crate::auth::{dir, write_atomically};
use crate::support::{TestGateway, eventually, seeded_transactional_campaign};

const WEB_KEY: &str = "wk-web-canary-7d21c95b0e4f";
const READER_KEY: &str = "wk-reader-canary-39aa61f0d2";
const WRONG_KEY: &str = "wk-wrong-canary-c4e8b1a7f3";
const WAIT: Duration = Duration::from_secs(20);

/// A gateway with the intake on, two callers with write keys (one allowed to write, one only to
/// read) and `Order Placed` mapped to the sandbox's transactional campaign.
struct Intake {
    gateway: TestGateway,
    url: String,
    campaign: String,
    _dir: crate::auth::Dir,
}

fn hex_sha256(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

async fn start() -> Intake {
    let dir = dir();
    let web_key = dir.path.join("web.key");
    let reader_key = dir.path.join("reader.key");
    std::fs::write(&web_key, format!("{WEB_KEY}\n")).unwrap();
    std::fs::write(&reader_key, READER_KEY).unwrap();
    let callers = dir.path.join("callers.toml");
    write_atomically(
        &callers,
        &format!(
            "[[caller]]\nname = \"web\"\npermissions = [\"events:write\", \"customers:write\"]\n\
             segment_write_key_files = [\"{}\"]\n\n\
             [[caller]]\nname = \"reader\"\ntoken_sha256 = \"{}\"\npermissions = [\"read\"]\n\
             segment_write_key_files = [\"{}\"]\n",
            display(&web_key),
            hex_sha256("grpc-reader-token"),
            display(&reader_key)
        ),
    );
    let campaign = seeded_transactional_campaign();
    let gateway = TestGateway::start_with(
        SandboxConfig::default(),
        vec![
            ("CXGW_CALLERS_FILE", display(&callers)),
            ("CXGW_SEGMENT_LISTEN_ADDR", "127.0.0.1:0".to_owned()),
            ("CXGW_EVENT_MAPPINGS", format!("Order Placed={campaign}")),
        ],
    )
    .await;
    let url = format!("http://{}", gateway.segment_addr.expect("the intake is on"));
    Intake {
        gateway,
        url,
        campaign,
        _dir: dir,
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn basic(key: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// What a POST got back: the status and the JSON body (raw text kept for leak checks).
struct Answer {
    status: u16,
    body: Value,
    text: String,
}

impl Intake {
    async fn post_raw(
        &self,
        path: &str,
        key: Option<&str>,
        body: Vec<u8>,
        encoding: Option<&str>,
    ) -> Answer {
        let mut request = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.header("authorization", basic(key));
        }
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, body, text }
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> Answer {
        self.post_raw(path, key, serde_json::to_vec(body).unwrap(), None)
            .await
    }

    fn retainly_events(&self, customer: &str) -> Vec<cx_sandbox::RetainlyEvent> {
        self.gateway
            .sandbox()
            .handle()
            .retainly_events()
            .into_iter()
            .filter(|event| event.customer_id == json!(customer))
            .collect()
    }

    /// Waits until `customer` has `count` Retainly events.
    async fn events_arrive(&self, customer: &str, count: usize) -> Vec<cx_sandbox::RetainlyEvent> {
        eventually(&format!("{count} events of {customer}"), WAIT, || {
            self.retainly_events(customer).len() >= count
        })
        .await;
        self.retainly_events(customer)
    }
}

fn track(user: &str, event: &str, message_id: &str) -> Value {
    json!({
        "userId": user,
        "event": event,
        "messageId": message_id,
        "timestamp": "2026-01-02T03:04:05.000Z",
        "properties": {"plan": "pro", "total": 42.5, "coupon": null},
        "context": {"library": {"name": "test"}},
    })
}

fn ok(answer: &Answer) {
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body, json!({"success": true}));
}

#[tokio::test]
async fn track_identify_and_batch_reach_both_upstreams() {
    let intake = start().await;
    let handle = intake.gateway.sandbox().handle();

    ok(&intake
        .post(
            "/v1/identify",
            Some(WEB_KEY),
            &json!({"userId": "u-1", "messageId": "id-1", "traits": {
                "email": "ann@example.com", "firstName": "Ann", "lastName": "Lee",
                "plan": "pro", "createdAt": "2025-03-01T10:00:00Z"
            }}),
        )
        .await);
    ok(&intake
        .post(
            "/v1/t",
            Some(WEB_KEY),
            &json!({"userId": "u-1", "event": "Order Placed", "messageId": "tr-1",
                    "properties": {"email": "ann@example.com", "total": 12}}),
        )
        .await);
    ok(&intake
        .post(
            "/v1/batch",
            Some(WEB_KEY),
            &json!({"batch": [
                {"type": "identify", "userId": "u-2", "messageId": "id-2",
                 "traits": {"email": "bo@example.com", "name": "Bo Ek"}},
                {"type": "track", "userId": "u-2", "event": "Signed Up", "messageId": "tr-2"},
                {"type": "page", "userId": "u-2", "name": "Home", "messageId": "pg-1"},
            ], "sentAt": "2026-01-02T03:04:05.000Z"}),
        )
        .await);

    let events = intake.events_arrive("u-1", 1).await;
    assert_eq!(events[0].event, "Order Placed");
    assert_eq!(
        events[0].data.as_ref().unwrap()["total"].as_f64(),
        Some(12.0)
    );
    assert_eq!(intake.events_arrive("u-2", 1).await[0].event, "Signed Up");
    eventually("the mapped survey", WAIT, || {
        handle.survey_sends().iter().any(|send| {
            send.campaign_id == intake.campaign && send.recipients == ["ann@example.com"]
        })
    })
    .await;
    eventually("both customers at both upstreams", WAIT, || {
        handle.retently_customer("ann@example.com").is_some()
            && handle.retently_customer("bo@example.com").is_some()
            && handle.retainly_customer(&json!("u-1")).is_some()
            && handle.retainly_customer(&json!("u-2")).is_some()
    })
    .await;
    let ann = handle.retainly_customer(&json!("u-1")).unwrap();
    assert_eq!(ann.fields["first_name"], json!("Ann"));
    assert_eq!(ann.fields["plan"], json!("pro"));
    assert!(ann.fields.contains_key("created_at"), "{:?}", ann.fields);
    let bo = handle.retently_customer("bo@example.com").unwrap();
    assert_eq!(bo["firstName"], json!("Bo"), "{bo}");
    // The page view has nothing to go to.
    assert_eq!(intake.retainly_events("u-2").len(), 1);
    intake.gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_repeated_message_id_makes_no_second_upstream_call() {
    let intake = start().await;
    let first = track("u-dup", "Trial Started", "dup-1");
    ok(&intake.post("/v1/track", Some(WEB_KEY), &first).await);
    // The same message again, alone and inside a batch (what a library's retry sends).
    ok(&intake.post("/v1/track", Some(WEB_KEY), &first).await);
    let mut in_batch = first.clone();
    in_batch["type"] = json!("track");
    ok(&intake
        .post("/v1/batch", Some(WEB_KEY), &json!({"batch": [in_batch]}))
        .await);
    // A repeated id with other content is a duplicate too (Segment's rule: the id names it).
    let mut altered = first.clone();
    altered["properties"]["plan"] = json!("basic");
    ok(&intake.post("/v1/track", Some(WEB_KEY), &altered).await);
    // A new message of the same customer: the outbox delivers one customer's events in order,
    // so once this one arrived any duplicate queued before it would have arrived too.
    ok(&intake
        .post(
            "/v1/track",
            Some(WEB_KEY),
            &track("u-dup", "Trial Ended", "dup-2"),
        )
        .await);
    let events = intake.events_arrive("u-dup", 2).await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["Trial Started", "Trial Ended"]);
    assert_eq!(events[0].data.as_ref().unwrap()["plan"], json!("pro"));
    // The repeats are counted as duplicates.
    let metrics = reqwest::get(format!("http://{}/metrics", intake.gateway.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("cxgw_segment_messages_total{")
                && line.contains("outcome=\"duplicate\"")
                && line.contains("type=\"track\"")),
        "{metrics}"
    );
    intake.gateway.stop().await.unwrap();
}

#[tokio::test]
async fn write_keys_decide_who_may_send_what() {
    let intake = start().await;
    let message = track("u-auth", "Opened", "auth-1");

    for (key, header) in [
        (None, None),
        (Some(WRONG_KEY), None),
        (None, Some("Bearer x")),
    ] {
        let mut request = reqwest::Client::new()
            .post(format!("{}/v1/track", intake.url))
            .body(serde_json::to_vec(&message).unwrap());
        if let Some(key) = key {
            request = request.header("authorization", basic(key));
        }
        if let Some(header) = header {
            request = request.header("authorization", header);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 401);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["success"], json!(false));
        assert_eq!(body["message"], json!("invalid write key"));
        assert_eq!(body["code"], json!("invalid_write_key"));
    }
    // A key of a caller without `events:write`.
    let refused = intake.post("/v1/track", Some(READER_KEY), &message).await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    assert!(refused.text.contains("events:write"), "{}", refused.text);

    // The body's `writeKey`, as analytics-python also sends it.
    let mut with_key = json!({"batch": [message.clone()]});
    with_key["batch"][0]["type"] = json!("track");
    with_key["writeKey"] = json!(WEB_KEY);
    ok(&intake.post("/v1/batch", None, &with_key).await);
    with_key["writeKey"] = json!(WRONG_KEY);
    assert_eq!(intake.post("/v1/batch", None, &with_key).await.status, 401);

    let events = intake.events_arrive("u-auth", 1).await;
    assert_eq!(events.len(), 1, "only the accepted message was delivered");
    intake.gateway.stop().await.unwrap();
}

#[tokio::test]
async fn segment_size_limits_are_enforced_before_anything_is_queued() {
    let intake = start().await;
    // Retainly takes strings of up to 1,000 characters, so the padding is spread over fields.
    let padded = |user: &str, id: &str, bytes: usize| {
        let mut message = track(user, "Padded", id);
        for field in 0..bytes.div_ceil(1000) {
            let len = (bytes - field * 1000).min(1000);
            message["properties"][format!("pad{field}")] = json!("x".repeat(len));
        }
        message["type"] = json!("track");
        message
    };
    // One message over 32 KB.
    let big = intake
        .post(
            "/v1/track",
            Some(WEB_KEY),
            &padded("u-size", "s-1", 33 * 1024),
        )
        .await;
    assert_eq!(big.status, 413, "{}", big.text);
    assert_eq!(big.body["success"], json!(false));
    // A batch of small messages over 500 KB in all.
    let many: Vec<Value> = (0..40)
        .map(|i| padded("u-size", &format!("m-{i}"), 900).clone())
        .chain((0..40).map(|i| padded("u-size", &format!("n-{i}"), 12 * 1000)))
        .collect();
    let too_big = intake
        .post("/v1/batch", Some(WEB_KEY), &json!({ "batch": many }))
        .await;
    assert_eq!(too_big.status, 413, "{}", too_big.text);
    // A batch under 500 KB with one message over 32 KB.
    let one_big =
        json!({"batch": [padded("u-size", "s-2", 100), padded("u-size", "s-3", 40 * 1024)]});
    let answer = intake.post("/v1/batch", Some(WEB_KEY), &one_big).await;
    assert_eq!(answer.status, 413, "{}", answer.text);
    assert!(answer.text.contains("batch[1]"), "{}", answer.text);
    // Compressed, the limits apply to the JSON: a small gzip body that inflates past 500 KB.
    let bomb =
        gzip(&serde_json::to_vec(&json!({"batch": [], "pad": "y".repeat(600 * 1024)})).unwrap());
    assert!(bomb.len() < 10 * 1024);
    let answer = intake
        .post_raw("/v1/batch", Some(WEB_KEY), bomb, Some("gzip"))
        .await;
    assert_eq!(answer.status, 413, "{}", answer.text);
    // A gzip batch within the limits is accepted (analytics-python's `gzip=True`).
    let fine =
        gzip(&serde_json::to_vec(&json!({"batch": [padded("u-size", "s-4", 20 * 1024)]})).unwrap());
    ok(&intake
        .post_raw("/v1/batch", Some(WEB_KEY), fine, Some("gzip"))
        .await);
    let events = intake.events_arrive("u-size", 1).await;
    assert_eq!(
        events.len(),
        1,
        "nothing of the refused requests was queued"
    );
    let data = events[0].data.as_ref().unwrap().as_object().unwrap();
    let padding: usize = data
        .iter()
        .filter(|(key, _)| key.starts_with("pad"))
        .map(|(_, value)| value.as_str().unwrap().len())
        .sum();
    assert_eq!(padding, 20 * 1024);
    intake.gateway.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_whole_with_segment_style_answers() {
    let intake = start().await;
    let answer = intake
        .post_raw("/v1/batch", Some(WEB_KEY), b"{\"batch\": [".to_vec(), None)
        .await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.body,
        json!({"success": false, "code": "invalid_request", "message": "invalid json"})
    );
    let answer = intake
        .post(
            "/v1/batch",
            Some(WEB_KEY),
            &json!({"batch": {"type": "track"}}),
        )
        .await;
    assert_eq!(answer.status, 400, "{}", answer.text);

    // Valid messages first, then two bad ones: nothing of the batch is applied.
    let batch = json!({"batch": [
        {"type": "track", "userId": "u-bad", "event": "First", "messageId": "b-1"},
        {"type": "identify", "userId": "u-bad", "messageId": "b-2", "traits": {"email": "ann@"}},
        {"type": "track", "userId": "u-bad", "event": "Order Placed", "messageId": "b-3"},
        {"type": "track", "event": "Nobody", "messageId": "b-4"},
    ]});
    let answer = intake.post("/v1/batch", Some(WEB_KEY), &batch).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert_eq!(answer.body["success"], json!(false));
    let errors: Vec<(u64, &str)> = answer.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].as_u64().unwrap(), e["field"].as_str().unwrap()))
        .collect();
    // The identify's email, the mapped event without a recipient, the message without a user.
    assert_eq!(
        errors,
        [(1, "traits.email"), (2, "properties.email"), (3, "userId")]
    );
    assert_eq!(answer.body["error_count"], json!(3));

    // The same customer's next event arrives alone: the valid part of the batch never queued.
    ok(&intake
        .post("/v1/track", Some(WEB_KEY), &track("u-bad", "Later", "b-5"))
        .await);
    let events = intake.events_arrive("u-bad", 1).await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["Later"]);
    assert!(
        intake
            .gateway
            .sandbox()
            .handle()
            .retainly_customer(&json!("u-bad"))
            .is_none()
    );
    intake.gateway.stop().await.unwrap();
}

/// Collects everything written through `tracing` while it is the default subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn write_keys_never_appear_in_logs_or_answers() {
    // One thread (tokio's default test runtime), so the server's tasks log to this thread's
    // default subscriber; TRACE captures every event and span of every crate.
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let intake = start().await;
    let mut answers = vec![
        intake
            .post("/v1/track", Some(WRONG_KEY), &track("u-leak", "A", "l-1"))
            .await,
        intake
            .post("/v1/track", Some(READER_KEY), &track("u-leak", "A", "l-2"))
            .await,
        intake
            .post("/v1/track", Some(WEB_KEY), &json!({"userId": 5}))
            .await,
        intake
            .post(
                "/v1/batch",
                None,
                &json!({"writeKey": WRONG_KEY, "batch": []}),
            )
            .await,
    ];
    answers.push(
        intake
            .post("/v1/track", Some(WEB_KEY), &track("u-leak", "A", "l-3"))
            .await,
    );
    intake.events_arrive("u-leak", 1).await;
    intake.gateway.stop().await.unwrap();

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    // The capture works: the intake's span and its caller are there.
    assert!(logs.contains("segment intake"), "{logs}");
    assert!(
        logs.contains("caller=\"web\"") || logs.contains("caller=web"),
        "{logs}"
    );
    for key in [WEB_KEY, READER_KEY, WRONG_KEY] {
        assert!(!logs.contains(key), "a write key leaked into the logs");
        assert!(
            !logs.contains(&key[..12]),
            "part of a write key leaked into the logs"
        );
        let encoded = basic(key);
        assert!(!logs.contains(&encoded[6..]), "an encoded write key leaked");
        for answer in &answers {
            assert!(!answer.text.contains(key), "{}", answer.text);
        }
    }
}

const CAPPED_KEY: &str = "wk-capped-canary-5b08e2d7c1";
const CAPPED_TOKEN: &str = "tok-capped-4f1a9c3e7b2d6058";
/// The capped caller's upstream requests per quota window (a minute).
const QUOTA: usize = 3;

/// The callers file of the quota test: one caller, with a Segment write key and a token, whose
/// quota is `quota` requests a minute.
fn capped_callers(key_file: &Path, quota: usize) -> String {
    format!(
        "[[caller]]\nname = \"capped\"\ntoken_sha256 = \"{}\"\n\
         permissions = [\"events:write\", \"deliveries:read\"]\nquota_per_minute = {quota}\n\
         segment_write_key_files = [\"{}\"]\n",
        hex_sha256(CAPPED_TOKEN),
        display(key_file)
    )
}

/// An ASYNC TrackEvent of the capped caller; returns its delivery id.
async fn track_async(channel: &tonic::transport::Channel, user: &str, message_id: &str) -> String {
    use cx_gateway::pb;
    let request = pb::TrackEventRequest {
        event: Some(pb::Event {
            customer_id: user.to_owned(),
            name: "Page Viewed".to_owned(),
            message_id: message_id.to_owned(),
            ..Default::default()
        }),
        options: Some(pb::WriteOptions {
            mode: pb::DeliveryMode::Async as i32,
            idempotency_key: String::new(),
        }),
    };
    pb::event_service_client::EventServiceClient::new(channel.clone())
        .track_event(crate::auth::with_token(request, Some(CAPPED_TOKEN)))
        .await
        .unwrap()
        .into_inner()
        .delivery_id
}

async fn delivery(
    channel: &tonic::transport::Channel,
    delivery_id: &str,
) -> cx_gateway::pb::Delivery {
    use cx_gateway::pb;
    pb::delivery_service_client::DeliveryServiceClient::new(channel.clone())
        .get_delivery(crate::auth::with_token(
            pb::GetDeliveryRequest {
                delivery_id: delivery_id.to_owned(),
            },
            Some(CAPPED_TOKEN),
        ))
        .await
        .unwrap()
        .into_inner()
        .delivery
        .unwrap()
}

fn last_reason(delivery: &cx_gateway::pb::Delivery) -> &str {
    delivery
        .last_error
        .as_ref()
        .map_or("", |error| error.reason.as_str())
}

/// Queued writes run as the caller that queued them: a Segment write key's caller and an ASYNC
/// TrackEvent spend the caller's quota. Past the quota the upstream sees nothing more; the excess
/// waits (retried, CALLER_QUOTA_EXCEEDED in `last_error`, never dead-lettered) and every message
/// is delivered once when the quota frees (here a reload of the callers file raises it, which
/// starts the count afresh, so no test waits out the minute).
#[tokio::test]
async fn queued_writes_spend_their_callers_quota_and_wait_for_it() {
    let dir = dir();
    let key_file = dir.path.join("capped.key");
    std::fs::write(&key_file, CAPPED_KEY).unwrap();
    let callers = dir.path.join("callers.toml");
    write_atomically(&callers, &capped_callers(&key_file, QUOTA));
    let gateway = TestGateway::start_with(
        SandboxConfig::default(),
        vec![
            ("CXGW_CALLERS_FILE", display(&callers)),
            ("CXGW_RELOAD_INTERVAL", "50ms".to_owned()),
            ("CXGW_SEGMENT_LISTEN_ADDR", "127.0.0.1:0".to_owned()),
            // Refused deliveries ask again quickly, so their refusals are seen while they wait.
            ("CXGW_OUTBOX_BASE_BACKOFF", "20ms".to_owned()),
            ("CXGW_OUTBOX_MAX_BACKOFF", "200ms".to_owned()),
        ],
    )
    .await;
    let intake = Intake {
        url: format!("http://{}", gateway.segment_addr.expect("the intake is on")),
        gateway,
        campaign: String::new(),
        _dir: dir,
    };
    let channel = intake.gateway.channel.clone();
    let users: Vec<String> = (1..=6).map(|n| format!("q-{n}")).collect();
    let events_of_users = || {
        intake
            .gateway
            .sandbox()
            .handle()
            .retainly_events()
            .into_iter()
            .filter(|event| users.iter().any(|user| event.customer_id == json!(user)))
            .count()
    };

    // The quota's worth through the intake: each track is one Retainly request.
    let batch: Vec<Value> = users[..QUOTA]
        .iter()
        .enumerate()
        .map(|(n, user)| {
            let mut message = track(user, "Page Viewed", &format!("m-{n}"));
            message["type"] = json!("track");
            message
        })
        .collect();
    ok(&intake
        .post("/v1/batch", Some(CAPPED_KEY), &json!({"batch": batch}))
        .await);
    eventually("the quota's worth of events", WAIT, || {
        events_of_users() == QUOTA
    })
    .await;

    // Over the quota, by both doors.
    let queued = [
        track_async(&channel, &users[3], "m-3").await,
        track_async(&channel, &users[4], "m-4").await,
    ];
    ok(&intake
        .post(
            "/v1/track",
            Some(CAPPED_KEY),
            &track(&users[5], "Page Viewed", "m-5"),
        )
        .await);
    for id in &queued {
        let refused = tokio::time::timeout(WAIT, async {
            loop {
                let found = delivery(&channel, id).await;
                if last_reason(&found) == "CALLER_QUOTA_EXCEEDED" {
                    return found;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the excess is refused by the caller's quota");
        assert_ne!(
            refused.state(),
            cx_gateway::pb::DeliveryState::DeadLettered,
            "a delivery over its caller's quota waits, it is not given up"
        );
    }
    // Refused before anything left: the upstream saw the quota's worth and no more.
    assert_eq!(events_of_users(), QUOTA);

    // The quota frees: every message is delivered, once.
    write_atomically(&callers, &capped_callers(&key_file, 100));
    eventually("every event", WAIT, || events_of_users() == users.len()).await;
    for user in &users {
        assert_eq!(intake.retainly_events(user).len(), 1, "{user}");
    }
    for id in &queued {
        let found = delivery(&channel, id).await;
        assert_eq!(found.state(), cx_gateway::pb::DeliveryState::Delivered);
        assert_eq!(last_reason(&found), "CALLER_QUOTA_EXCEEDED");
        assert!(found.attempt_count >= 2, "{found:?}");
    }
    intake.gateway.stop().await.unwrap();
}
