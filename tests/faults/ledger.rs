//! The ledger of a scenario: what the gateway acknowledged, what the emulator recorded, and the
//! dead letters, reconciled.

use std::collections::{HashMap, HashSet};

use cx_gateway::pb;
use cx_gateway::pb::delivery_service_client::DeliveryServiceClient;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_sandbox::Sandbox;
use tonic::transport::Channel;

/// An asynchronous TrackEvent for customer `{prefix}-{n}`.
pub fn async_event(prefix: &str, n: usize) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event: Some(pb::Event {
            customer_id: format!("{prefix}-{n}"),
            name: "fault_suite".to_owned(),
            message_id: format!("{prefix}-msg-{n}"),
            ..Default::default()
        }),
        options: Some(pb::WriteOptions {
            mode: pb::DeliveryMode::Async as i32,
            idempotency_key: String::new(),
        }),
    }
}

/// Sends `count` asynchronous events from 16 concurrent callers; the customer ids of those the
/// gateway acknowledged, with their delivery ids.
pub async fn acknowledge_events(
    channel: &Channel,
    prefix: &'static str,
    count: usize,
) -> HashMap<String, String> {
    const CALLERS: usize = 16;
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        let mut client = EventServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for n in (caller..count).step_by(CALLERS) {
                if let Ok(response) = client.track_event(async_event(prefix, n)).await {
                    acknowledged.push((format!("{prefix}-{n}"), response.into_inner().delivery_id));
                }
            }
            acknowledged
        }));
    }
    let mut acknowledged = HashMap::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }
    acknowledged
}

/// The customer ids of the events the emulator recorded, with how often each arrived.
pub fn recorded_events(sandbox: &Sandbox) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in sandbox.handle().retainly_events() {
        if let Some(id) = event.customer_id.as_str() {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// Every dead letter, by delivery id.
pub async fn dead_letters(channel: &Channel) -> HashMap<String, pb::Delivery> {
    let mut client = DeliveryServiceClient::new(channel.clone());
    let mut all = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_dead_letters(pb::ListDeadLettersRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for delivery in page.deliveries {
            all.insert(delivery.delivery_id.clone(), delivery);
        }
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// Waits until every delivery in `ids` is DELIVERED or DEAD_LETTERED; their final records.
pub async fn finish_all<'a>(
    channel: &Channel,
    ids: impl IntoIterator<Item = &'a String>,
) -> Vec<pb::Delivery> {
    let mut finished = Vec::new();
    for id in ids {
        finished.push(crate::support::finished_delivery(channel, id).await);
    }
    finished
}

/// The reconciliation of one scenario.
#[derive(Debug, Default)]
pub struct Ledger {
    pub acknowledged: usize,
    /// Recorded upstream and finished as delivered.
    pub delivered: usize,
    pub in_doubt: usize,
    /// In doubt, and the upstream did apply it (the request arrived and was handled after its
    /// answer could no longer reach the gateway).
    pub in_doubt_applied: usize,
    /// Dead letters for any other reason.
    pub failed: usize,
    /// Writes the upstream recorded more than once.
    pub duplicated: usize,
    /// Acknowledged writes neither recorded upstream nor in doubt.
    pub lost: usize,
}

impl Ledger {
    /// Reconciles acknowledged events (customer id → delivery id) with what the emulator recorded
    /// and the dead letters.
    pub fn of_events(
        acknowledged: &HashMap<String, String>,
        recorded: &HashMap<String, usize>,
        dead: &HashMap<String, pb::Delivery>,
    ) -> Ledger {
        let in_doubt: HashSet<&String> = dead
            .values()
            .filter(|d| d.last_error.as_ref().unwrap().reason == "DELIVERY_IN_DOUBT")
            .map(|d| &d.delivery_id)
            .collect();
        let unexpected: Vec<&String> = recorded
            .keys()
            .filter(|id| !acknowledged.contains_key(*id))
            .collect();
        assert!(unexpected.is_empty(), "never acknowledged: {unexpected:?}");
        let in_doubt_applied = acknowledged
            .iter()
            .filter(|(customer, delivery)| {
                in_doubt.contains(delivery) && recorded.contains_key(*customer)
            })
            .count();
        Ledger {
            acknowledged: acknowledged.len(),
            delivered: recorded.len() - in_doubt_applied,
            in_doubt: in_doubt.len(),
            in_doubt_applied,
            failed: dead.len() - in_doubt.len(),
            duplicated: recorded.values().filter(|n| **n > 1).count(),
            lost: acknowledged
                .iter()
                .filter(|(customer, delivery)| {
                    !recorded.contains_key(*customer) && !in_doubt.contains(delivery)
                })
                .count(),
        }
    }

    pub fn print(&self, scenario: &str) {
        eprintln!(
            "fault ledger [{scenario}]: {} acknowledged, {} delivered, {} in doubt ({} of them applied upstream), {} failed, {} duplicated, {} lost",
            self.acknowledged,
            self.delivered,
            self.in_doubt,
            self.in_doubt_applied,
            self.failed,
            self.duplicated,
            self.lost
        );
    }
}
