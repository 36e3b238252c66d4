//! Alert rules end to end: responses simulated in the sandbox reach the real poller and log, the
//! evaluator queues alerts in the outbox, and a local HTTP receiver in the test gets them, signed
//! or in Slack's format, once, through receiver failures, dead letters and a SIGKILL.
//!
//! The receiver announces every request it gets (a watch channel), so tests wait for requests,
//! not for time; the SIGKILL lands while the receiver holds the first request unanswered.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use cx_gateway::pb;
use cx_gateway::pb::delivery_service_client::DeliveryServiceClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Sandbox, SandboxConfig, SeedConfig};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::auth::{callers_file, with_token, write_atomically};
use crate::child::ChildGateway;
use crate::support::{Options, TestGateway, finished_delivery};
use crate::telemetry::Collector;

const PATIENCE: Duration = Duration::from_secs(60);
const SECRET: &str = "alert-signing-secret-5b1e9c";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    alert_id: String,
    signature: Option<String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// How the receiver answers.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Accept,
    /// 500 for this many requests, then 200.
    FailFirst(usize),
    AlwaysFail,
    /// Holds the first request unanswered until released, then accepts.
    HoldFirst,
}

struct ReceiverState {
    behaviour: Behaviour,
    requests: Mutex<Vec<Received>>,
    arrived: watch::Sender<usize>,
    answered: AtomicUsize,
    release: Notify,
}

/// A local HTTP receiver of alerts.
#[derive(Clone)]
struct Receiver {
    state: Arc<ReceiverState>,
    addr: SocketAddr,
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let index = {
        let mut requests = state.requests.lock().unwrap();
        requests.push(Received {
            path: uri.path().to_owned(),
            alert_id: header("cx-alert-id").unwrap_or_default(),
            signature: header("cx-signature"),
            body: body.to_vec(),
        });
        requests.len()
    };
    state.arrived.send_replace(index);
    let status = match state.behaviour {
        Behaviour::Accept => StatusCode::OK,
        Behaviour::FailFirst(failures) if index <= failures => StatusCode::INTERNAL_SERVER_ERROR,
        Behaviour::FailFirst(_) => StatusCode::OK,
        Behaviour::AlwaysFail => StatusCode::INTERNAL_SERVER_ERROR,
        Behaviour::HoldFirst => {
            if index == 1 {
                state.release.notified().await;
            }
            StatusCode::OK
        }
    };
    state.answered.fetch_add(1, Ordering::SeqCst);
    status
}

impl Receiver {
    async fn start(behaviour: Behaviour) -> Receiver {
        let state = Arc::new(ReceiverState {
            behaviour,
            requests: Mutex::new(Vec::new()),
            arrived: watch::channel(0).0,
            answered: AtomicUsize::new(0),
            release: Notify::new(),
        });
        let app = axum::Router::new()
            .fallback(axum::routing::post(receive))
            .with_state(Arc::clone(&state));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { state, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<Received> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Waits until at least `count` requests arrived.
    async fn wait_for(&self, count: usize) -> Vec<Received> {
        let mut arrived = self.state.arrived.subscribe();
        tokio::time::timeout(PATIENCE, arrived.wait_for(|n| *n >= count))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{count} alert requests expected, {} arrived",
                    self.requests().len()
                )
            })
            .unwrap();
        self.requests()
    }
}

/// A rules file (and its secret file) in `dir`.
fn rules_file(dir: &Path, rules: &str) -> PathBuf {
    let secret = dir.join("alert-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let path = dir.join("alert-rules.toml");
    std::fs::write(
        &path,
        rules.replace("{secret}", &secret.display().to_string()),
    )
    .unwrap();
    path
}

/// A sandbox with campaigns and customers but no responses, without a rate limit.
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

fn settings(rules: &Path, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut settings: Vec<(&'static str, String)> = vec![
        ("CXGW_ALERT_RULES_FILE", rules.display().to_string()),
        ("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "6000".to_owned()),
        ("CXGW_FEEDBACK_POLL_INTERVAL", "100ms".to_owned()),
        ("CXGW_FEEDBACK_RESCAN_INTERVAL", "0s".to_owned()),
        // Short retries, so five failures take milliseconds.
        ("CXGW_OUTBOX_BASE_BACKOFF", "10ms".to_owned()),
        ("CXGW_OUTBOX_MAX_BACKOFF", "40ms".to_owned()),
    ];
    for (key, value) in extra {
        settings.retain(|(existing, _)| existing != key);
        settings.push((key, (*value).to_owned()));
    }
    settings
}

async fn start(rules: &Path, extra: &[(&'static str, &str)]) -> TestGateway {
    TestGateway::start_with_options(Options {
        sandbox: sandbox_config(),
        settings: settings(rules, extra),
        client_tls: None,
    })
    .await
}

/// HMAC-SHA256 of `"<t>.<body>"`, as the receiver recomputes it.
fn valid_signature(header: &str, body: &[u8]) -> bool {
    let fields: std::collections::HashMap<&str, &str> = header
        .split(',')
        .filter_map(|part| part.split_once('='))
        .collect();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let signed = [fields["t"].as_bytes(), b".", body].concat();
    let expected: String = ring::hmac::sign(&key, &signed)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fields["v1"] == expected
}

fn is_nps_detractor(item: &Value) -> bool {
    item["metricsType"] == "NPS" && item["score"].as_i64().is_some_and(|score| score <= 6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detractor_reaches_the_receiver_once_signed_and_in_slack_format() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_file(
        dir.path(),
        &format!(
            "[[rule]]\nname = \"detractors\"\nmetrics = [\"NPS\"]\ncategories = [\"detractor\"]\n\
             format = \"signed-json\"\nurl = \"{}\"\nsecret_file = \"{{secret}}\"\n\n\
             [[rule]]\nname = \"detractors-slack\"\nmetrics = [\"NPS\"]\nscore_max = 6\n\
             format = \"slack\"\nurl = \"{}\"\n",
            receiver.url("/signed"),
            receiver.url("/slack"),
        ),
    );
    let gateway = start(&rules, &[]).await;
    // Responses arrive until one is an NPS detractor (the seeded generator makes one soon).
    let mut simulated = Vec::new();
    while !simulated.iter().any(is_nps_detractor) {
        simulated.extend(gateway.sandbox().handle().simulate_feedback(5));
        assert!(simulated.len() < 500, "the sandbox simulates detractors");
    }
    let mut expected: Vec<String> = simulated
        .iter()
        .filter(|item| is_nps_detractor(item))
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect();
    expected.sort();

    let received = receiver.wait_for(expected.len() * 2).await;
    // Every alert delivered: nothing more can be on its way.
    for alert_id in received.iter().map(|r| r.alert_id.clone()) {
        let delivery = finished_delivery(&gateway.channel, &alert_id).await;
        assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
        assert_eq!(delivery.method, "cx-gateway/Alert");
    }
    // Polls overlap (every response is read again by the next poll), which must not raise an
    // alert twice.
    let received = receiver.requests();
    assert_eq!(received.len(), expected.len() * 2, "{received:?}");

    let signed: Vec<&Received> = received.iter().filter(|r| r.path == "/signed").collect();
    let mut ids: Vec<String> = signed
        .iter()
        .map(|r| r.json()["feedback"]["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, expected, "each detractor once");
    for request in &signed {
        let body = request.json();
        assert_eq!(body["id"], request.alert_id.as_str());
        assert_eq!(body["rule"], "detractors");
        assert_eq!(body["event"], "created");
        assert_eq!(body["feedback"]["category"], "detractor");
        let header = request.signature.as_deref().expect("signed");
        assert!(valid_signature(header, &request.body), "{header}");
    }

    let slack: Vec<&Received> = received.iter().filter(|r| r.path == "/slack").collect();
    assert_eq!(slack.len(), expected.len());
    for request in &slack {
        assert!(request.signature.is_none());
        let body = request.json();
        let id = body["blocks"].to_string();
        let item = simulated
            .iter()
            .find(|item| id.contains(item["id"].as_str().unwrap()))
            .expect("the message names its response");
        let text = body["text"].as_str().unwrap();
        let score = item["score"].as_i64().unwrap();
        assert!(text.contains(&format!("NPS detractor {score}")), "{text}");
        assert!(
            text.contains(item["email"].as_str().unwrap()),
            "the customer: {text}"
        );
        let blocks = body["blocks"].to_string();
        assert!(blocks.contains(&format!("*Score*\\n{score}")), "{blocks}");
        let comment = item["comment"].as_str().unwrap();
        if !comment.is_empty() {
            let first_words: String = comment.chars().take(12).collect();
            assert!(
                text.contains(&first_words) || text.contains(&first_words.replace('&', "&amp;")),
                "the comment: {text}"
            );
        }
    }

    // The README's verification recipe, run on a real delivery: it accepts it, and rejects a
    // forged signature, a changed body and a replay outside the tolerance.
    let request = signed[0];
    std::fs::write(dir.path().join("body"), &request.body).unwrap();
    std::fs::write(
        dir.path().join("header"),
        request.signature.as_deref().unwrap(),
    )
    .unwrap();
    let output = std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/verify_alert.py"))
        .arg(dir.path().join("alert-secret"))
        .arg(dir.path().join("header"))
        .arg(dir.path().join("body"))
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for case in [
        "valid: accepted",
        "forged: rejected",
        "tampered: rejected",
        "replayed: rejected",
    ] {
        assert!(stdout.contains(case), "{stdout}");
    }
    gateway.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_five_times_gets_the_alert_once() {
    let receiver = Receiver::start(Behaviour::FailFirst(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_file(
        dir.path(),
        &format!(
            "[[rule]]\nname = \"all\"\nformat = \"signed-json\"\nurl = \"{}\"\n\
             secret_file = \"{{secret}}\"\n",
            receiver.url("/hook")
        ),
    );
    let gateway = start(&rules, &[]).await;
    gateway.sandbox().handle().simulate_feedback(1);
    let received = receiver.wait_for(6).await;
    let alert_id = received[0].alert_id.clone();
    let delivery = finished_delivery(&gateway.channel, &alert_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(delivery.attempt_count, 6);
    let received = receiver.requests();
    assert_eq!(received.len(), 6, "five failures and one success");
    assert!(received.iter().all(|r| r.alert_id == alert_id), "one alert");
    for request in &received {
        assert!(valid_signature(
            request.signature.as_deref().unwrap(),
            &request.body
        ));
    }
    gateway.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_succeeds_ends_in_a_dead_letter_only_admins_see() {
    const ADMIN: &str = "tok-alert-admin-6d1f0b2e9c";
    const READER: &str = "tok-alert-reader-2a7c4e8d1b";
    let receiver = Receiver::start(Behaviour::AlwaysFail).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_file(
        dir.path(),
        &format!(
            "[[rule]]\nname = \"all\"\nformat = \"slack\"\nurl = \"{}\"\n",
            receiver.url("/hook")
        ),
    );
    let callers = callers_file(
        &[
            (
                "operator",
                ADMIN,
                &["deliveries:read", "deliveries:retry", "deliveries:admin"][..],
            ),
            ("reader", READER, &["deliveries:read"][..]),
        ],
        &[],
    );
    let gateway = start(
        &rules,
        &[
            ("CXGW_OUTBOX_RETRY_WINDOW", "1s"),
            ("CXGW_CALLERS", &callers),
        ],
    )
    .await;
    gateway.sandbox().handle().simulate_feedback(1);
    let received = receiver.wait_for(1).await;
    let alert_id = received[0].alert_id.clone();
    let mut deliveries = DeliveryServiceClient::new(gateway.channel.clone());
    let delivery = tokio::time::timeout(PATIENCE, async {
        loop {
            let delivery = deliveries
                .get_delivery(with_token(
                    pb::GetDeliveryRequest {
                        delivery_id: alert_id.clone(),
                    },
                    Some(ADMIN),
                ))
                .await
                .unwrap()
                .into_inner()
                .delivery
                .unwrap();
            if delivery.state == pb::DeliveryState::DeadLettered as i32 {
                return delivery;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("dead-lettered once the retry window is over");
    let error = delivery.last_error.unwrap();
    assert_eq!(error.reason, "ALERT_RECEIVER_FAILED");
    assert_eq!(error.metadata["status"], "500");
    assert!(delivery.attempt_count >= 2, "retried before giving up");
    assert!(receiver.requests().iter().all(|r| r.alert_id == alert_id));

    let dead = |token: &'static str| {
        let mut deliveries = deliveries.clone();
        async move {
            deliveries
                .list_dead_letters(with_token(
                    pb::ListDeadLettersRequest::default(),
                    Some(token),
                ))
                .await
                .unwrap()
                .into_inner()
                .deliveries
                .into_iter()
                .map(|d| d.delivery_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(dead(ADMIN).await, vec![alert_id.clone()]);
    assert!(
        dead(READER).await.is_empty(),
        "the gateway's own deliveries"
    );
    // Once the receiver is fixed, an operator requeues the alerts' dead letters by their method.
    let retried = deliveries
        .retry_dead_letters(with_token(
            pb::RetryDeadLettersRequest {
                delivery_ids: Vec::new(),
                all: true,
                method: "cx-gateway/Alert".to_owned(),
            },
            Some(ADMIN),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.requeued_count, 1);
    gateway.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_cut_by_sigkill_is_delivered_once_after_the_restart() {
    let receiver = Receiver::start(Behaviour::HoldFirst).await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let rules = rules_file(
        dir.path(),
        &format!(
            "[[rule]]\nname = \"all\"\nformat = \"signed-json\"\nurl = \"{}\"\n\
             secret_file = \"{{secret}}\"\n",
            receiver.url("/hook")
        ),
    );
    let sandbox = Sandbox::new(sandbox_config());
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    let settings = settings(&rules, &[]);
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings).await;
    sandbox.handle().simulate_feedback(1);
    // The alert is on the wire, held unanswered: the gateway dies between sending and hearing.
    let held = receiver.wait_for(1).await;
    let alert_id = held[0].alert_id.clone();
    gateway.kill();
    receiver.state.release.notify_one();

    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings).await;
    let received = receiver.wait_for(2).await;
    let delivery = finished_delivery(&gateway.channel, &alert_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    let received_after = receiver.requests();
    assert_eq!(received_after.len(), 2, "{received:?}");
    assert!(
        received_after.iter().all(|r| r.alert_id == alert_id),
        "the same alert, sent again under its id after the restart: {received_after:?}"
    );
    assert_eq!(received_after[0].body, received_after[1].body);
    assert_eq!(gateway.terminate().code(), Some(0));
    emulator.stop().await;
}

/// The value of the `/metrics` series `name` whose labels include every one of `labels`.
async fn metric(admin: SocketAddr, name: &str, labels: &[&str]) -> Option<f64> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Waits until the series reaches `at_least` (the reload task reports through no other signal).
async fn metric_reaches(admin: SocketAddr, name: &str, labels: &[&str], at_least: f64) {
    let wait = async {
        while metric(admin, name, labels).await.unwrap_or(0.0) < at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("{name} {labels:?} never reached {at_least}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rules_file_keeps_the_rules_in_force_until_a_good_one_replaces_them() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let rule = |name: &str| {
        format!(
            "[[rule]]\nname = \"{name}\"\nformat = \"slack\"\nurl = \"{}\"\n",
            receiver.url(&format!("/{name}"))
        )
    };
    let rules = rules_file(dir.path(), &rule("first"));
    let gateway = start(&rules, &[("CXGW_RELOAD_INTERVAL", "50ms")]).await;
    let admin = gateway.admin_addr;
    const RELOADS: &str = "cxgw_alerts_rules_reloads_total";

    // A broken file (and one whose secret file is missing) is refused and counted.
    write_atomically(&rules, "[[rule]]\nname = ");
    metric_reaches(admin, RELOADS, &["outcome=\"rejected\""], 1.0).await;
    write_atomically(
        &rules,
        &(rule("first").replace("slack", "signed-json") + "secret_file = \"/nonexistent\"\n"),
    );
    metric_reaches(admin, RELOADS, &["outcome=\"rejected\""], 2.0).await;
    gateway.sandbox().handle().simulate_feedback(1);
    let received = receiver.wait_for(1).await;
    assert_eq!(
        received[0].path, "/first",
        "the last good rules stay in force"
    );
    metric_reaches(
        admin,
        "cxgw_alerts_total",
        &["rule=\"first\"", "outcome=\"sent\""],
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            admin,
            "cxgw_alerts_total",
            &["rule=\"first\"", "outcome=\"matched\""]
        )
        .await,
        Some(1.0)
    );

    write_atomically(&rules, &rule("second"));
    metric_reaches(admin, RELOADS, &["outcome=\"replaced\""], 1.0).await;
    gateway.sandbox().handle().simulate_feedback(1);
    let received = receiver.wait_for(2).await;
    assert_eq!(received[1].path, "/second", "the new rules apply");
    assert_eq!(received.len(), 2);
    gateway.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_alert_attempt_is_a_span_linked_to_the_ingestion_of_its_response() {
    let (collector, endpoint) = Collector::start().await;
    let receiver = Receiver::start(Behaviour::FailFirst(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let rules = rules_file(
        dir.path(),
        &format!(
            "[[rule]]\nname = \"all\"\nformat = \"slack\"\nurl = \"{}\"\n",
            receiver.url("/hook")
        ),
    );
    let sandbox = Sandbox::new(sandbox_config());
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    let mut settings = settings(&rules, &[]);
    settings.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings).await;
    sandbox.handle().simulate_feedback(1);
    let received = receiver.wait_for(2).await;
    let delivery = finished_delivery(&gateway.channel, &received[0].alert_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    assert!(gateway.terminate().success());

    let spans = collector.spans();
    let attempts: Vec<_> = spans
        .iter()
        .filter(|span| span.name == "outbox.delivery")
        .collect();
    assert_eq!(
        attempts.len(),
        2,
        "one span per attempt (a failure, then the success)"
    );
    for attempt in attempts {
        assert!(attempt.parent_span_id.is_empty(), "a trace of its own");
        assert_eq!(attempt.links.len(), 1);
        let link = &attempt.links[0];
        let ingestion = spans
            .iter()
            .find(|span| span.span_id == link.span_id && span.trace_id == link.trace_id)
            .expect("the linked span was exported");
        assert_eq!(ingestion.name, "feedback.sync.poll");
    }
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_sends_at_most_its_rate_limit_and_counts_the_rest() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_file(
        dir.path(),
        &format!(
            "[[rule]]\nname = \"limited\"\nformat = \"slack\"\nurl = \"{}\"\n\
             rate_limit = {{ count = 2, per = \"1h\" }}\n",
            receiver.url("/hook")
        ),
    );
    let gateway = start(&rules, &[]).await;
    let admin = gateway.admin_addr;
    gateway.sandbox().handle().simulate_feedback(5);
    let labels = |outcome: &'static str| [r#"rule="limited""#, outcome];
    metric_reaches(
        admin,
        "cxgw_alerts_total",
        &labels(r#"outcome="matched""#),
        5.0,
    )
    .await;
    let received = receiver.wait_for(2).await;
    for request in &received {
        let delivery = finished_delivery(&gateway.channel, &request.alert_id).await;
        assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    }
    assert_eq!(receiver.requests().len(), 2, "two alerts within the limit");
    assert_eq!(
        metric(
            admin,
            "cxgw_alerts_total",
            &labels(r#"outcome="rate_limited""#)
        )
        .await,
        Some(3.0)
    );
    assert_eq!(
        metric(admin, "cxgw_alerts_total", &labels(r#"outcome="sent""#)).await,
        Some(2.0)
    );
    gateway.stop().await.unwrap();
}
