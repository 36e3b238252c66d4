//! Survey sends that met a failure after which Retently may have acted are resolved from its
//! sent-survey history (`GET /outbox`): one that went out is marked delivered without a second
//! send, one that did not is sent again, and none is left in doubt.

use std::collections::HashMap;
use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::delivery_service_client::DeliveryServiceClient;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;
use cx_sandbox::{Api, FaultConfig, SandboxConfig, SandboxHandle};
use tonic::transport::Channel;

use crate::ledger::finish_all;
use crate::support::{TestGateway, eventually, seeded_transactional_campaign};

const SENDS: usize = 12;

fn email(phase: &str, n: usize) -> String {
    format!("history-{phase}-{n}@example.com")
}

/// Queues one asynchronous send to every recipient of `phase` (they share one `POST /survey`,
/// so one failure meets them all); its delivery id.
async fn queue_send(channel: &Channel, campaign: &str, phase: &str) -> String {
    let mut client = SurveyServiceClient::new(channel.clone());
    client
        .send_survey(pb::SendSurveyRequest {
            survey_cooldown: Default::default(),
            campaign_id: campaign.to_owned(),
            recipients: (0..SENDS)
                .map(|n| pb::Recipient {
                    email: email(phase, n),
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
        .into_inner()
        .delivery_id
}

/// How many surveys the emulator's history holds per recipient of `phase`.
fn surveyed(handle: &SandboxHandle, phase: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for survey in handle.outbox() {
        if let Some(email) = survey["email"]
            .as_str()
            .filter(|email| email.starts_with(&format!("history-{phase}-")))
        {
            *counts.entry(email.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits until the delivery `id` made an attempt that failed and awaits the next one.
async fn waiting_to_retry(channel: &Channel, id: &str) {
    let mut deliveries = DeliveryServiceClient::new(channel.clone());
    loop {
        let delivery = deliveries
            .get_delivery(pb::GetDeliveryRequest {
                delivery_id: id.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .delivery
            .unwrap();
        if delivery.state == pb::DeliveryState::RetryWait as i32 {
            return;
        }
        assert_ne!(delivery.state, pb::DeliveryState::DeadLettered as i32);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_delivered_and_scheduled(finished: &[pb::Delivery]) {
    for delivery in finished {
        assert_eq!(
            delivery.state,
            pb::DeliveryState::Delivered as i32,
            "{delivery:?}"
        );
        let Some(pb::delivery::Result::SendSurvey(result)) = &delivery.result else {
            panic!("a survey result: {delivery:?}");
        };
        assert_eq!(result.results.len(), SENDS);
        assert!(
            result
                .results
                .iter()
                .all(|r| r.outcome == pb::RecipientOutcome::Scheduled as i32),
            "{result:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survey_sends_in_doubt_are_resolved_from_the_sent_survey_history() {
    let gateway = TestGateway::start_with(
        SandboxConfig {
            retently_requests_per_minute: 0,
            ..SandboxConfig::default()
        },
        vec![("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "100000".to_owned())],
    )
    .await;
    let handle = gateway.sandbox().handle().clone();
    let campaign = seeded_transactional_campaign();

    // Applied, then answered 500: found in the history, marked delivered, never sent again.
    handle.set_faults(
        Api::Retently,
        FaultConfig {
            error_rate: 1.0,
            error_statuses: vec![500],
            error_after_handling: true,
            ..FaultConfig::default()
        },
    );
    let applied = queue_send(&gateway.channel, &campaign, "applied").await;
    let counted = handle.clone();
    eventually("the send applied", Duration::from_secs(60), || {
        surveyed(&counted, "applied").len() == SENDS
    })
    .await;
    // Its 500 was decided on arrival: the attempt fails whatever comes next.
    handle.clear_faults(Api::Retently);
    let finished = finish_all(&gateway.channel, [&applied]).await;
    assert_delivered_and_scheduled(&finished);
    let counts = surveyed(&handle, "applied");
    assert!(
        counts.values().all(|n| *n == 1),
        "surveyed once: {counts:?}"
    );
    let sends_after_500 = handle
        .survey_sends()
        .iter()
        .flat_map(|send| send.recipients.clone())
        .filter(|email| email.starts_with("history-applied-"))
        .count();
    assert_eq!(
        sends_after_500, SENDS,
        "no recipient was sent a second time"
    );

    // Answered 500 before anything was applied: not in the history, so sent again, once.
    handle.set_faults(
        Api::Retently,
        FaultConfig {
            error_rate: 1.0,
            error_statuses: vec![500],
            ..FaultConfig::default()
        },
    );
    let lost = queue_send(&gateway.channel, &campaign, "lost").await;
    waiting_to_retry(&gateway.channel, &lost).await;
    assert!(surveyed(&handle, "lost").is_empty());
    handle.clear_faults(Api::Retently);
    let finished = finish_all(&gateway.channel, [&lost]).await;
    assert_delivered_and_scheduled(&finished);
    let counts = surveyed(&handle, "lost");
    assert_eq!(counts.len(), SENDS, "{counts:?}");
    assert!(
        counts.values().all(|n| *n == 1),
        "surveyed once: {counts:?}"
    );

    let history_reads = handle.requests_to(Api::Retently, "/api/v2/outbox");
    eprintln!(
        "fault ledger [survey sends after 500]: 2 sends to {SENDS} recipients each acknowledged, {SENDS} recipients found in the history (not sent again), {SENDS} sent again, 0 in doubt, {history_reads} history reads"
    );
    assert!(history_reads > 0);
    gateway.stop().await.unwrap();
}
