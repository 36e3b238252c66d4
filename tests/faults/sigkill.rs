//! SIGKILL while deliveries are certainly on the wire (the emulator holds them), then a restart
//! on the same data directory: events that were on the wire are in doubt (the upstream had them),
//! none other; survey sends that were on the wire are resolved from Retently's history; nothing is
//! sent twice and nothing acknowledged is lost.

use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Api, HoldSpec, Sandbox, SandboxConfig};
use tokio::net::TcpListener;

use crate::child::ChildGateway;
use crate::ledger::{Ledger, acknowledge_events, dead_letters, finish_all, recorded_events};
use crate::support::{eventually, seeded_transactional_campaign};

const EVENTS: usize = 300;
const SURVEYS: usize = 6;
/// Deliveries the outbox runs at once (`OutboxSettings::concurrency`): the kill comes when all of
/// them are on the wire, so every delivery in flight is one the upstream holds.
const OUTBOX_CONCURRENCY: u64 = 64;

fn settings() -> Vec<(&'static str, String)> {
    vec![
        ("CXGW_RETAINLY_REQUESTS_PER_MINUTE", "1000000".to_owned()),
        ("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "100000".to_owned()),
        ("CXGW_SHUTDOWN_GRACE", "2s".to_owned()),
    ]
}

fn survey_email(n: usize) -> String {
    format!("sigkill-{n}@example.com")
}

fn surveys_of_ours(sandbox: &Sandbox) -> usize {
    sandbox
        .handle()
        .outbox()
        .iter()
        .filter(|survey| {
            survey["email"]
                .as_str()
                .is_some_and(|email| email.starts_with("sigkill-"))
        })
        .count()
}

async fn start_emulator(sandbox: &Sandbox) -> EmbeddedSandbox {
    EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap()
}

fn unlimited_sandbox() -> Sandbox {
    Sandbox::new(SandboxConfig {
        retently_requests_per_minute: 0,
        retainly_requests_per_minute: 0,
        ..SandboxConfig::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_delivery_leaves_in_doubt_only_the_events_on_the_wire() {
    let sandbox = unlimited_sandbox();
    let handle = sandbox.handle().clone();
    let emulator = start_emulator(&sandbox).await;
    // A third of the events go through; every later one is held before Retainly handles it.
    handle.hold_after(Api::Retainly, EVENTS as u64 / 3);
    let data_dir = tempfile::tempdir().unwrap();
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    let acknowledged = acknowledge_events(&gateway.channel, "sigkill", EVENTS).await;
    assert_eq!(acknowledged.len(), EVENTS, "every write was acknowledged");

    // Every delivery slot is taken by a request on the wire: the kill cannot miss one.
    eventually(
        "every delivery slot on the wire",
        Duration::from_secs(120),
        || handle.in_progress(Api::Retainly) == OUTBOX_CONCURRENCY,
    )
    .await;
    let delivered_before = recorded_events(&sandbox).len();
    gateway.kill();
    let on_the_wire = handle.held(Api::Retainly);
    handle.release(Api::Retainly);

    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    finish_all(&gateway.channel, acknowledged.values()).await;
    let ledger = Ledger::of_events(
        &acknowledged,
        &recorded_events(&sandbox),
        &dead_letters(&gateway.channel).await,
    );
    ledger.print(&format!(
        "SIGKILL with {on_the_wire} events on the wire, {delivered_before} delivered before"
    ));
    assert!(delivered_before < EVENTS);
    // Each in doubt is an event Retainly had received (it would have applied it, had the gate
    // let it); everything else arrived once.
    assert_eq!(ledger.in_doubt as u64, on_the_wire, "{ledger:?}");
    assert_eq!(ledger.delivered + ledger.in_doubt, EVENTS, "{ledger:?}");
    assert_eq!(
        ledger.failed + ledger.duplicated + ledger.lost,
        0,
        "{ledger:?}"
    );
    assert_eq!(gateway.terminate().code(), Some(0));
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survey_sends_cut_by_sigkill_are_resolved_from_the_history() {
    let sandbox = unlimited_sandbox();
    let handle = sandbox.handle().clone();
    let emulator = start_emulator(&sandbox).await;
    // Survey sends are applied and their answers held: sent, with the gateway none the wiser.
    handle.hold(
        Api::Retently,
        HoldSpec {
            route: Some("/api/v2/survey".to_owned()),
            pass: 0,
            after_handling: true,
        },
    );
    let data_dir = tempfile::tempdir().unwrap();
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    let campaign = seeded_transactional_campaign();
    let mut surveys = SurveyServiceClient::new(gateway.channel.clone());
    // One delivery for every recipient: its recipients share one `POST /survey`.
    let response = surveys
        .send_survey(pb::SendSurveyRequest {
            survey_cooldown: Default::default(),
            campaign_id: campaign.clone(),
            recipients: (0..SURVEYS)
                .map(|n| pb::Recipient {
                    email: survey_email(n),
                    ..Default::default()
                })
                .collect(),
            delay_days: None,
            options: Some(pb::WriteOptions {
                mode: pb::DeliveryMode::Async as i32,
                idempotency_key: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let deliveries = [response.delivery_id];
    eventually("every send applied", Duration::from_secs(60), || {
        surveys_of_ours(&sandbox) == SURVEYS
    })
    .await;
    gateway.kill();
    handle.release(Api::Retently);

    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    let finished = finish_all(&gateway.channel, deliveries.iter()).await;
    let dead = dead_letters(&gateway.channel).await;
    eprintln!(
        "fault ledger [SIGKILL with a send to {SURVEYS} recipients applied, answer unsent]: 1 acknowledged, {} delivered, {} in doubt, {} surveys in the history",
        finished
            .iter()
            .filter(|d| d.state == pb::DeliveryState::Delivered as i32)
            .count(),
        dead.len(),
        surveys_of_ours(&sandbox)
    );
    for delivery in &finished {
        assert_eq!(
            delivery.state,
            pb::DeliveryState::Delivered as i32,
            "{delivery:?}"
        );
        let Some(pb::delivery::Result::SendSurvey(result)) = &delivery.result else {
            panic!("a survey result: {delivery:?}");
        };
        assert!(
            result
                .results
                .iter()
                .all(|r| r.outcome == pb::RecipientOutcome::Scheduled as i32),
            "{result:?}"
        );
    }
    assert_eq!(
        surveys_of_ours(&sandbox),
        SURVEYS,
        "each recipient surveyed once"
    );
    assert_eq!(gateway.terminate().code(), Some(0));
    emulator.stop().await;
}
