//! EventService against the real server.

use cx_gateway::pb;
use cx_gateway::pb::event_service_client::EventServiceClient;

use crate::support::TestGateway;

#[tokio::test]
async fn event_mappings_are_listed_in_name_order_page_by_page() {
    let gateway = TestGateway::start_with(
        cx_sandbox::SandboxConfig::default(),
        vec![(
            "CXGW_EVENT_MAPPINGS",
            "signup=c3;order_completed=c1,c2;churned=c4".to_owned(),
        )],
    )
    .await;
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let first = client
        .list_event_mappings(pb::ListEventMappingsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = first.mappings.iter().map(|m| m.event.as_str()).collect();
    assert_eq!(names, ["churned", "order_completed"]);
    assert_eq!(first.mappings[1].campaign_ids, ["c1", "c2"]);
    assert_eq!(first.total_size, 3);
    let second = client
        .list_event_mappings(pb::ListEventMappingsRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.mappings.len(), 1);
    assert_eq!(second.mappings[0].event, "signup");
    assert!(second.next_page_token.is_empty());

    let filtered = client
        .list_event_mappings(pb::ListEventMappingsRequest {
            event: "signup".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.total_size, 1);

    // A token from another filter is refused, naming the field.
    let error = client
        .list_event_mappings(pb::ListEventMappingsRequest {
            page_size: 2,
            page_token: first.next_page_token,
            event: "signup".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    gateway.stop().await.unwrap();
}
