//! The skeleton every service plugs into: health, reflection, deadlines and drain.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as ReflectionV1Client;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest as V1Request;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse as V1Response;
use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as ReflectionV1AlphaClient;
use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as V1AlphaRequest;
use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as V1AlphaResponse;

use crate::support::TestGateway;

const GATEWAY_SERVICES: [&str; 5] = [
    "cx.gateway.v1.CustomerService",
    "cx.gateway.v1.SurveyService",
    "cx.gateway.v1.EventService",
    "cx.gateway.v1.FeedbackStream",
    "cx.gateway.v1.DeliveryService",
];

async fn check(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test]
async fn health_reports_every_service_serving() {
    let gateway = TestGateway::start().await;
    let mut health = HealthClient::new(gateway.channel.clone());
    assert_eq!(check(&mut health, "").await, ServingStatus::Serving as i32);
    for service in GATEWAY_SERVICES {
        assert_eq!(
            check(&mut health, service).await,
            ServingStatus::Serving as i32,
            "{service}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "cx.gateway.v1.NoSuchService".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_every_service() {
    let gateway = TestGateway::start().await;

    let mut v1 = ReflectionV1Client::new(gateway.channel.clone());
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(V1Request::ListServices(String::new())),
    };
    let mut responses = v1
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(V1Response::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a list of services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in GATEWAY_SERVICES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut v1alpha = ReflectionV1AlphaClient::new(gateway.channel.clone());
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(V1AlphaRequest::FileContainingSymbol(
            "google.rpc.BadRequest".to_owned(),
        )),
    };
    let mut responses = v1alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap().message_response;
    assert!(
        matches!(response, Some(V1AlphaResponse::FileDescriptorResponse(ref files)) if !files.file_descriptor_proto.is_empty()),
        "error details must be resolvable by reflection clients: {response:?}"
    );
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn draining_turns_health_not_serving_and_returns_within_the_grace_period() {
    let mut gateway = TestGateway::start_with(
        cx_sandbox::SandboxConfig::default(),
        vec![("CXGW_SHUTDOWN_GRACE", "2s".to_owned())],
    )
    .await;
    let mut health = HealthClient::new(gateway.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first: HealthCheckResponse = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    gateway.begin_shutdown();
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // The open watch stream holds the connection; the grace period ends it and run returns.
    tokio::time::timeout(Duration::from_secs(30), gateway.stop())
        .await
        .expect("run returns after the grace period")
        .unwrap();
}

#[tokio::test]
async fn admin_port_answers_liveness_and_readiness() {
    let gateway = TestGateway::start().await;
    let client = reqwest::Client::new();
    for path in ["livez", "readyz"] {
        let response = client
            .get(format!("http://{}/{path}", gateway.admin_addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK, "{path}");
    }
    gateway.stop().await.unwrap();
}

/// A call past its deadline is DEADLINE_EXCEEDED (tonic would say CANCELLED). The deadline here
/// is the gateway's default for calls without one: a client-sent `grpc-timeout` also arms the
/// client's own timer, which races the server's answer; the header path is unit-tested in
/// `grpc::deadline`.
#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded_not_cancelled() {
    let gateway = TestGateway::start_with(
        cx_sandbox::SandboxConfig::default(),
        vec![("CXGW_DEFAULT_DEADLINE", "300ms".to_owned())],
    )
    .await;
    gateway.sandbox().handle().set_faults(
        cx_sandbox::Api::Retainly,
        cx_sandbox::FaultConfig {
            latency_ms: 5_000,
            ..Default::default()
        },
    );
    let mut client =
        cx_gateway::pb::event_service_client::EventServiceClient::new(gateway.channel.clone());
    let status = client
        .track_event(cx_gateway::pb::TrackEventRequest {
            event: Some(cx_gateway::pb::Event {
                customer_id: "slow-1".to_owned(),
                name: "slow_event".to_owned(),
                ..Default::default()
            }),
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    gateway.stop().await.unwrap();
}
