//! The gateway on PostgreSQL (`CXGW_STORE=postgres`): two replicas share one database and one
//! emulator; one is SIGKILLed with deliveries on the wire, and the other takes its claims over.
//! Every acknowledged write arrives once or is dead-lettered as in doubt (never sent twice),
//! and the database URL, password included, appears in no log line of either replica.
//! Two replicas sending a survey to one customer at the same moment survey them once (the
//! cool-down's reservation is one atomic operation of the shared database).
//!
//! The kill lands mid-delivery by construction: the emulator lets a fifth of the events through
//! and holds every later one on the wire until the kill.
//!
//! Needs the test cluster of `scripts/postgres.sh` (`CXGW_TEST_POSTGRES_URL`); without it the
//! test passes as skipped, unless `CXGW_TEST_REQUIRE_POSTGRES=1` (scripts/test.sh) requires it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::delivery_service_client::DeliveryServiceClient;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Api, Sandbox, SandboxConfig};
use tokio::net::TcpListener;

use crate::child::ChildGateway;
use crate::replicas::fresh_database_url;
use crate::support::eventually;

const WRITES: usize = 600;

fn async_event(n: usize) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event: Some(pb::Event {
            customer_id: format!("pg-{n}"),
            name: "scale_out_test".to_owned(),
            message_id: format!("pg-msg-{n}"),
            ..Default::default()
        }),
        options: Some(pb::WriteOptions {
            mode: pb::DeliveryMode::Async as i32,
            idempotency_key: String::new(),
        }),
    }
}

/// The customer ids of the events the sandbox recorded, with how often each arrived.
fn recorded(sandbox: &Sandbox) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in sandbox.handle().retainly_events() {
        if let Some(id) = event.customer_id.as_str() {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_takes_over_the_deliveries_of_one_that_was_killed() {
    let Some(url) = fresh_database_url().await else {
        return;
    };
    let password = reqwest::Url::parse(&url)
        .unwrap()
        .password()
        .expect("the test cluster's url has a password")
        .to_owned();
    let secrets = tempfile::tempdir().unwrap();
    let url_file = secrets.path().join("postgres-url");
    std::fs::write(&url_file, format!("{url}\n")).unwrap();
    let settings = vec![
        ("CXGW_STORE", "postgres".to_owned()),
        ("CXGW_POSTGRES_URL_FILE", url_file.display().to_string()),
        // A dead replica's claims lapse after this (the live one renews its own).
        ("CXGW_POSTGRES_CLAIM_LEASE", "3s".to_owned()),
        // The test is about durability, not pacing: lift Retainly's budget.
        ("CXGW_RETAINLY_REQUESTS_PER_MINUTE", "1000000".to_owned()),
        ("CXGW_SHUTDOWN_GRACE", "2s".to_owned()),
    ];

    let sandbox = Sandbox::new(SandboxConfig::default());
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    sandbox
        .handle()
        .hold_after(Api::Retainly, (WRITES / 5) as u64);
    let data_a = tempfile::tempdir().unwrap();
    let data_b = tempfile::tempdir().unwrap();
    let replica_a = ChildGateway::start(&emulator, data_a.path(), &settings).await;
    let replica_b = ChildGateway::start(&emulator, data_b.path(), &settings).await;

    // Writes spread over both replicas.
    let clients = [
        EventServiceClient::new(replica_a.channel.clone()),
        EventServiceClient::new(replica_b.channel.clone()),
    ];
    let acknowledged = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let mut client = clients[worker % 2].clone();
        let acknowledged = Arc::clone(&acknowledged);
        tasks.push(tokio::spawn(async move {
            for n in (worker..WRITES).step_by(16) {
                let response = client.track_event(async_event(n)).await;
                let response = response.expect("the write is acknowledged").into_inner();
                assert!(response.delivery_id.starts_with("dlv_"));
                acknowledged.lock().unwrap().insert(format!("pg-{n}"));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), WRITES);

    let handle = sandbox.handle().clone();
    eventually(
        "deliveries held on the wire",
        Duration::from_secs(60),
        || handle.held(Api::Retainly) > 0,
    )
    .await;
    let before_kill = recorded(&sandbox).len();
    let log_a = Arc::clone(&replica_a.log);
    replica_a.kill();
    handle.release(Api::Retainly);
    assert!(before_kill < WRITES, "the kill came mid-delivery");

    // Replica B delivers the rest, A's lapsed claims included.
    let mut deliveries = DeliveryServiceClient::new(replica_b.channel.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut in_doubt: HashSet<String>;
    loop {
        let dead = deliveries
            .list_dead_letters(pb::ListDeadLettersRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Only deliveries in flight at the kill may be dead letters: in doubt, not sent again.
        for delivery in &dead.deliveries {
            let error = delivery.last_error.as_ref().unwrap();
            assert_eq!(error.reason, "DELIVERY_IN_DOUBT", "{delivery:?}");
        }
        in_doubt = dead
            .deliveries
            .iter()
            .map(|d| d.delivery_id.clone())
            .collect();
        let arrived = recorded(&sandbox).len();
        if arrived + in_doubt.len() >= WRITES || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let arrived = recorded(&sandbox);
    let duplicates: Vec<_> = arrived.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "delivered twice: {duplicates:?}");
    let missing = WRITES - arrived.len();
    assert!(
        missing <= in_doubt.len(),
        "{missing} acknowledged writes missing, only {} in doubt",
        in_doubt.len()
    );
    eprintln!(
        "postgres scale-out: {WRITES} acknowledged over 2 replicas, {before_kill} delivered \
         before SIGKILL, {} delivered in all, {} in doubt",
        arrived.len(),
        in_doubt.len()
    );

    let (status, log_b) = replica_b.terminate_with_log();
    assert_eq!(status.code(), Some(0));
    let log_a = log_a.lock().unwrap().clone();
    assert!(
        log_b
            .iter()
            .any(|line| line.contains("store open on postgres"))
    );
    for line in log_a.iter().chain(&log_b) {
        assert!(
            !line.contains(&password),
            "the password in a log line: {line}"
        );
        assert!(!line.contains(&url), "the database url in a log line");
    }
    emulator.stop().await;
}

/// The survey cool-down holds across replicas: a customer being surveyed through one replica
/// is held back when another replica sends them a survey at the same moment. The first send is
/// held on the wire in the emulator, so the second comes while it is certainly in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sending_to_one_customer_at_once_survey_them_once() {
    use cx_gateway::pb::survey_service_client::SurveyServiceClient;
    use cx_sandbox::HoldSpec;

    let Some(url) = fresh_database_url().await else {
        return;
    };
    let secrets = tempfile::tempdir().unwrap();
    let url_file = secrets.path().join("postgres-url");
    std::fs::write(&url_file, format!("{url}\n")).unwrap();
    let settings = vec![
        ("CXGW_STORE", "postgres".to_owned()),
        ("CXGW_POSTGRES_URL_FILE", url_file.display().to_string()),
        ("CXGW_SURVEY_COOLDOWN", "7d".to_owned()),
        ("CXGW_SHUTDOWN_GRACE", "2s".to_owned()),
    ];
    let sandbox = Sandbox::new(SandboxConfig::default());
    let campaign = |metric: &str| {
        sandbox
            .handle()
            .transactional_campaign(metric)
            .unwrap_or_else(|| panic!("the default seed has a transactional {metric} campaign"))
    };
    let (nps, csat) = (campaign("NPS"), campaign("CSAT"));
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    let data_a = tempfile::tempdir().unwrap();
    let data_b = tempfile::tempdir().unwrap();
    let replica_a = ChildGateway::start(&emulator, data_a.path(), &settings).await;
    let replica_b = ChildGateway::start(&emulator, data_b.path(), &settings).await;

    let handle = sandbox.handle().clone();
    handle.hold(
        Api::Retently,
        HoldSpec {
            route: Some("/api/v2/survey".to_owned()),
            ..HoldSpec::default()
        },
    );
    let send = |channel: tonic::transport::Channel, campaign_id: String| async move {
        SurveyServiceClient::new(channel)
            .send_survey(pb::SendSurveyRequest {
                campaign_id,
                recipients: vec![pb::Recipient {
                    email: "shared@example.com".to_owned(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    };
    let first = tokio::spawn(send(replica_a.channel.clone(), nps));
    eventually(
        "the first send is held on the wire",
        Duration::from_secs(30),
        || handle.held(Api::Retently) == 1,
    )
    .await;
    let second = send(replica_b.channel.clone(), csat).await;
    assert_eq!(
        second.results[0].outcome,
        pb::RecipientOutcome::Throttled as i32
    );
    assert_eq!(
        second.results[0].throttle.as_ref().unwrap().source,
        pb::ThrottleSource::SurveyCooldown as i32
    );
    assert_eq!(
        handle.held(Api::Retently),
        1,
        "no upstream call for the second send"
    );
    handle.release(Api::Retently);
    let first = first.await.unwrap();
    assert_eq!(
        first.results[0].outcome,
        pb::RecipientOutcome::Scheduled as i32
    );
    let recipients: Vec<String> = handle
        .survey_sends()
        .into_iter()
        .flat_map(|send| send.recipients)
        .collect();
    assert_eq!(recipients, ["shared@example.com"]);
    assert_eq!(replica_a.terminate().code(), Some(0));
    assert_eq!(replica_b.terminate().code(), Some(0));
    emulator.stop().await;
}
