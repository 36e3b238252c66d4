//! EventService against the real server and the sandbox.

use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_sandbox::{Api, SandboxConfig};
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use tonic_types::StatusExt as _;

use crate::support::{TestGateway, eventually, seeded_transactional_campaign};

fn text(value: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    }
}

fn event(customer_id: &str, email: &str, name: &str, props: &[(&str, Value)]) -> pb::Event {
    pb::Event {
        customer_id: customer_id.to_owned(),
        email: email.to_owned(),
        name: name.to_owned(),
        properties: Some(Struct {
            fields: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }),
        ..Default::default()
    }
}

async fn gateway_with_mapping() -> (TestGateway, String) {
    let campaign = seeded_transactional_campaign();
    let gateway = TestGateway::start_with(
        SandboxConfig::default(),
        vec![("CXGW_EVENT_MAPPINGS", format!("order_completed={campaign}"))],
    )
    .await;
    (gateway, campaign)
}

#[tokio::test]
async fn an_unmapped_event_goes_to_retainly_only() {
    let (gateway, _) = gateway_with_mapping().await;
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let response = client
        .track_event(pb::TrackEventRequest {
            event: Some(event(
                "cust-1",
                "",
                "page_viewed",
                &[("page", text("/pricing"))],
            )),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.triggered_surveys.is_empty());
    assert!(!response.duplicate);
    let events = gateway.sandbox().handle().retainly_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "page_viewed");
    assert_eq!(events[0].customer_id, serde_json::json!("cust-1"));
    assert_eq!(
        events[0].data.as_ref().unwrap()["page"],
        serde_json::json!("/pricing")
    );
    assert!(gateway.sandbox().handle().survey_sends().is_empty());
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_mapped_event_triggers_a_survey_with_the_event_properties() {
    let (gateway, campaign) = gateway_with_mapping().await;
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let response = client
        .track_event(pb::TrackEventRequest {
            event: Some(event(
                "cust-2",
                " Buyer@Example.com ",
                "order_completed",
                &[("firstName", text("Ada")), ("plan", text("pro"))],
            )),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.triggered_surveys.len(), 1);
    assert_eq!(response.triggered_surveys[0].campaign_id, campaign);
    assert_eq!(
        response.triggered_surveys[0].outcome,
        pb::RecipientOutcome::Scheduled as i32
    );
    let sandbox = gateway.sandbox().handle();
    let sends = sandbox.survey_sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].campaign_id, campaign);
    assert_eq!(sends[0].recipients, ["buyer@example.com"]);
    let customer = sandbox.retently_customer("buyer@example.com").unwrap();
    assert_eq!(customer["firstName"], "Ada");
    assert_eq!(sandbox.retainly_events().len(), 1);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_mapped_event_without_an_email_is_rejected_before_any_upstream_call() {
    let (gateway, _) = gateway_with_mapping().await;
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let status = client
        .track_event(pb::TrackEventRequest {
            event: Some(event("cust-3", "", "order_completed", &[])),
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let details = status.get_error_details();
    let fields: Vec<&str> = details
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["event.email"]);
    assert!(gateway.sandbox().handle().request_counts().is_empty());
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_repeated_message_id_is_answered_from_the_first_call() {
    let (gateway, _) = gateway_with_mapping().await;
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let mut tracked = event("cust-4", "", "signed_up", &[]);
    tracked.message_id = "msg-0001".to_owned();
    let request = pb::TrackEventRequest {
        event: Some(tracked),
        options: None,
    };
    let first = client
        .track_event(request.clone())
        .await
        .unwrap()
        .into_inner();
    let second = client.track_event(request).await.unwrap().into_inner();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(gateway.sandbox().handle().retainly_events().len(), 1);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn an_async_event_is_acknowledged_then_delivered() {
    let (gateway, _) = gateway_with_mapping().await;
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let response = client
        .track_event(pb::TrackEventRequest {
            event: Some(event("cust-5", "", "trial_started", &[])),
            options: Some(pb::WriteOptions {
                mode: pb::DeliveryMode::Async as i32,
                idempotency_key: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.delivery_id.starts_with("dlv_"));
    let sandbox = gateway.sandbox().handle().clone();
    eventually(
        "the event to reach the sandbox",
        Duration::from_secs(30),
        || sandbox.retainly_events().len() == 1,
    )
    .await;
    let delivery = crate::support::finished_delivery(&gateway.channel, &response.delivery_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    assert!(matches!(
        delivery.result,
        Some(pb::delivery::Result::TrackEvent(ref r)) if r.delivery_id == response.delivery_id
    ));
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_bulk_stream_counts_accepted_duplicate_and_rejected_events() {
    let (gateway, _) = gateway_with_mapping().await;
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let with_id = |id: &str, customer: &str| {
        let mut e = event(customer, "", "bulk_event", &[]);
        e.message_id = id.to_owned();
        e
    };
    let messages = vec![
        pb::TrackEventsRequest {
            events: vec![
                with_id("m1", "c1"),
                with_id("m2", "c2"),
                with_id("m1", "c1"),
            ],
        },
        pb::TrackEventsRequest {
            // Invalid: no customer id, and a name longer than 50 characters.
            events: vec![event("", "", &"x".repeat(51), &[]), with_id("m3", "c3")],
        },
    ];
    let summary = client
        .track_events(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted_count, 3);
    assert_eq!(summary.duplicate_count, 1);
    assert_eq!(summary.rejected_count, 1);
    assert_eq!(summary.rejected[0].index, 3);
    let sandbox = gateway.sandbox().handle().clone();
    eventually(
        "three events at the sandbox",
        Duration::from_secs(30),
        || sandbox.retainly_events().len() == 3,
    )
    .await;
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_retainly_refusal_fails_a_sync_call_and_sends_no_survey() {
    let (gateway, _) = gateway_with_mapping().await;
    let sandbox = gateway.sandbox().handle().clone();
    sandbox.set_faults(
        Api::Retainly,
        cx_sandbox::FaultConfig {
            burst_429: 100,
            ..Default::default()
        },
    );
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let request = tonic::Request::new(pb::TrackEventRequest {
        event: Some(event("cust-6", "x@example.com", "order_completed", &[])),
        options: None,
    });
    let status = client.track_event(request).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::ResourceExhausted
                | tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
        ),
        "{status:?}"
    );
    assert!(sandbox.survey_sends().is_empty());
    gateway.stop().await.unwrap();
}

/// Names and keys that Retainly would store as they are, but that no caller can mean: each is
/// refused with its own field, and nothing reaches an upstream.
#[tokio::test]
async fn control_characters_and_unbounded_keys_are_refused_before_any_upstream_call() {
    let gateway = TestGateway::start().await;
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let number = Value {
        kind: Some(Kind::NumberValue(1.0)),
    };
    let long_key = "k".repeat(1200);
    let cases: Vec<(pb::Event, &str)> = vec![
        (event("c-1", "", "signed\u{0}up", &[]), "event.name"),
        (event("c-1", "", "signed\u{200B}up", &[]), "event.name"),
        (
            event("c-1", "", "signed_up", &[("", number.clone())]),
            "event.properties",
        ),
        (
            event("c-1", "", "signed_up", &[("a\u{0}b", number.clone())]),
            "event.properties",
        ),
        (
            event(
                "c-1",
                "",
                "signed_up",
                &[(long_key.as_str(), number.clone())],
            ),
            "event.properties",
        ),
        (
            event("c-1", "ann\u{202E}@example.com", "signed_up", &[]),
            "event.email",
        ),
        (
            event("c-1", "ännа@example.com", "signed_up", &[]),
            "event.email",
        ),
    ];
    for (bad, field) in cases {
        let status = client
            .track_event(pb::TrackEventRequest {
                event: Some(bad.clone()),
                options: None,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
        let details = status.get_error_details();
        let fields: Vec<&str> = details
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, [field], "{bad:?}");
    }
    assert!(gateway.sandbox().handle().request_counts().is_empty());
    gateway.stop().await.unwrap();
}
