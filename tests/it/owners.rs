//! Callers kept apart: idempotency keys, event message ids and deliveries belong to the caller
//! that made them; only a `deliveries:admin` caller sees and requeues everyone's.

use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::customer_service_client::CustomerServiceClient;
use cx_gateway::pb::delivery_service_client::DeliveryServiceClient;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_sandbox::{Api, FaultConfig};
use serde_json::json;
use tonic::transport::Channel;

use crate::auth::{callers_file, dir, reason, start_with_callers, with_token, write_atomically};
use crate::support::eventually;

const ALPHA: &str = "tok-alpha-3e9d0c5b7a1f4e28b6d2";
const BETA: &str = "tok-beta-8c2a6f1d9e3b4a07c5e1";
const OPERATOR: &str = "tok-operator-1b7e4d9a2c6f8e30d4a9";

const WRITER: &[&str] = &[
    "events:write",
    "customers:write",
    "deliveries:read",
    "deliveries:retry",
];
const ADMIN: &[&str] = &["deliveries:read", "deliveries:retry", "deliveries:admin"];

fn tracked(customer_id: &str, name: &str, message_id: &str) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event: Some(pb::Event {
            customer_id: customer_id.to_owned(),
            name: name.to_owned(),
            message_id: message_id.to_owned(),
            ..Default::default()
        }),
        options: None,
    }
}

fn asynchronous(mut request: pb::TrackEventRequest) -> pb::TrackEventRequest {
    request.options = Some(pb::WriteOptions {
        mode: pb::DeliveryMode::Async as i32,
        idempotency_key: String::new(),
    });
    request
}

fn upsert(customer_id: &str, first_name: &str, key: &str) -> pb::UpsertCustomersRequest {
    pb::UpsertCustomersRequest {
        customers: vec![pb::Customer {
            customer_id: customer_id.to_owned(),
            first_name: first_name.to_owned(),
            ..Default::default()
        }],
        destinations: vec![pb::Destination::Retainly as i32],
        options: Some(pb::WriteOptions {
            mode: pb::DeliveryMode::Async as i32,
            idempotency_key: key.to_owned(),
        }),
    }
}

async fn get(
    channel: &Channel,
    token: &str,
    delivery_id: &str,
) -> Result<pb::Delivery, tonic::Status> {
    DeliveryServiceClient::new(channel.clone())
        .get_delivery(with_token(
            pb::GetDeliveryRequest {
                delivery_id: delivery_id.to_owned(),
            },
            Some(token),
        ))
        .await
        .map(|response| response.into_inner().delivery.unwrap())
}

/// The ids and total of the dead letters `token`'s caller sees.
async fn dead_letters(channel: &Channel, token: &str) -> (i64, Vec<String>) {
    let page = DeliveryServiceClient::new(channel.clone())
        .list_dead_letters(with_token(
            pb::ListDeadLettersRequest::default(),
            Some(token),
        ))
        .await
        .unwrap()
        .into_inner();
    let ids = page.deliveries.into_iter().map(|d| d.delivery_id).collect();
    (page.total_size, ids)
}

async fn retry(
    channel: &Channel,
    token: &str,
    request: pb::RetryDeadLettersRequest,
) -> pb::RetryDeadLettersResponse {
    DeliveryServiceClient::new(channel.clone())
        .retry_dead_letters(with_token(request, Some(token)))
        .await
        .unwrap()
        .into_inner()
}

async fn until_state(channel: &Channel, delivery_id: &str, state: pb::DeliveryState) {
    let poll = async {
        while get(channel, OPERATOR, delivery_id).await.unwrap().state != state as i32 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), poll)
        .await
        .unwrap_or_else(|_| panic!("{delivery_id} never reached {state:?}"));
}

#[tokio::test]
async fn two_callers_never_share_keys_message_ids_or_deliveries() {
    let dir = dir();
    let callers = dir.path.join("callers.toml");
    write_atomically(
        &callers,
        &callers_file(
            &[
                ("alpha", ALPHA, WRITER),
                ("beta", BETA, WRITER),
                ("operator", OPERATOR, ADMIN),
            ],
            &[],
        ),
    );
    let gateway = start_with_callers(&callers, Vec::new()).await;
    let channel = &gateway.channel;
    let sandbox = gateway.sandbox().handle().clone();
    let mut events = EventServiceClient::new(channel.clone());

    // The same message id from two callers is two events, even with the very same content.
    let alpha_first = events
        .track_event(with_token(
            tracked("c-1", "signed_up", "msg-1"),
            Some(ALPHA),
        ))
        .await
        .unwrap()
        .into_inner();
    let beta_same = events
        .track_event(with_token(tracked("c-1", "signed_up", "msg-1"), Some(BETA)))
        .await
        .unwrap()
        .into_inner();
    assert!(!alpha_first.duplicate);
    assert!(!beta_same.duplicate, "beta was answered from alpha's call");
    assert_eq!(sandbox.retainly_events().len(), 2);
    // Within one caller the message id still deduplicates and refuses another event.
    let alpha_again = events
        .track_event(with_token(
            tracked("c-1", "signed_up", "msg-1"),
            Some(ALPHA),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(alpha_again.duplicate);
    let beta_other = events
        .track_event(with_token(
            tracked("c-2", "trial_started", "msg-1"),
            Some(BETA),
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&beta_other), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(sandbox.retainly_events().len(), 2);

    // An idempotency key alpha used is free for beta, with another request.
    let mut customers = CustomerServiceClient::new(channel.clone());
    let alpha_upsert = customers
        .upsert_customers(with_token(upsert("c-a", "Ann", "key-1"), Some(ALPHA)))
        .await
        .unwrap()
        .into_inner();
    let beta_upsert = customers
        .upsert_customers(with_token(upsert("c-b", "Bo", "key-1"), Some(BETA)))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(alpha_upsert.delivery_id, beta_upsert.delivery_id);
    let beta_repeat = customers
        .upsert_customers(with_token(upsert("c-b", "Bo", "key-1"), Some(BETA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beta_repeat.delivery_id, beta_upsert.delivery_id);
    eventually(
        "both upserts at the sandbox",
        Duration::from_secs(30),
        || {
            sandbox.retainly_customer(&json!("c-a")).is_some()
                && sandbox.retainly_customer(&json!("c-b")).is_some()
        },
    )
    .await;

    // A delivery is seen by its caller and the operator, and is not found by anyone else.
    let alpha_delivery = &alpha_upsert.delivery_id;
    get(channel, ALPHA, alpha_delivery).await.unwrap();
    get(channel, OPERATOR, alpha_delivery).await.unwrap();
    let hidden = get(channel, BETA, alpha_delivery).await.unwrap_err();
    assert_eq!(hidden.code(), tonic::Code::NotFound);
    assert_eq!(reason(&hidden), "DELIVERY_NOT_FOUND");

    // One dead letter each: an event Retainly may have applied (502) is never sent twice.
    sandbox.set_faults(
        Api::Retainly,
        FaultConfig {
            error_rate: 1.0,
            error_statuses: vec![502],
            ..Default::default()
        },
    );
    let alpha_dead = events
        .track_event(with_token(
            asynchronous(tracked("c-3", "doubtful", "")),
            Some(ALPHA),
        ))
        .await
        .unwrap()
        .into_inner()
        .delivery_id;
    let beta_dead = events
        .track_event(with_token(
            asynchronous(tracked("c-4", "doubtful", "")),
            Some(BETA),
        ))
        .await
        .unwrap()
        .into_inner()
        .delivery_id;
    until_state(channel, &alpha_dead, pb::DeliveryState::DeadLettered).await;
    until_state(channel, &beta_dead, pb::DeliveryState::DeadLettered).await;
    sandbox.set_faults(Api::Retainly, FaultConfig::default());

    assert_eq!(
        dead_letters(channel, ALPHA).await,
        (1, vec![alpha_dead.clone()])
    );
    assert_eq!(
        dead_letters(channel, BETA).await,
        (1, vec![beta_dead.clone()])
    );
    assert_eq!(
        dead_letters(channel, OPERATOR).await,
        (2, vec![alpha_dead.clone(), beta_dead.clone()])
    );

    // Beta cannot requeue alpha's dead letter, and "all" means all of its own.
    let refused = retry(
        channel,
        BETA,
        pb::RetryDeadLettersRequest {
            delivery_ids: vec![alpha_dead.clone()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(refused.requeued_count, 0);
    assert_eq!(
        refused.results[0].error.as_ref().unwrap().reason,
        "DELIVERY_NOT_FOUND"
    );
    let own = retry(
        channel,
        BETA,
        pb::RetryDeadLettersRequest {
            all: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(own.requeued_count, 1);
    assert_eq!(own.results[0].delivery_id, beta_dead);
    until_state(channel, &beta_dead, pb::DeliveryState::Delivered).await;
    assert_eq!(
        get(channel, OPERATOR, &alpha_dead).await.unwrap().state,
        pb::DeliveryState::DeadLettered as i32
    );
    // The operator requeues anyone's.
    let operator = retry(
        channel,
        OPERATOR,
        pb::RetryDeadLettersRequest {
            delivery_ids: vec![alpha_dead.clone()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(operator.requeued_count, 1);
    until_state(channel, &alpha_dead, pb::DeliveryState::Delivered).await;
    gateway.stop().await.unwrap();
}
