//! Failures after which the upstream may have acted (500, 504, a connection dropped after the
//! request was written): an event, which must not start its workflows twice, is not sent again.
//! Exactly the deliveries whose attempt met such a failure end in doubt; the rest are delivered.

use cx_sandbox::{Api, FaultConfig, SandboxConfig};

use crate::ledger::{Ledger, acknowledge_events, dead_letters, finish_all, recorded_events};
use crate::support::TestGateway;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_are_exactly_the_attempts_that_may_have_been_applied() {
    const EVENTS: usize = 300;
    let gateway = TestGateway::start_with(
        SandboxConfig {
            retainly_requests_per_minute: 0,
            ..SandboxConfig::default()
        },
        vec![("CXGW_RETAINLY_REQUESTS_PER_MINUTE", "1000000".to_owned())],
    )
    .await;
    let handle = gateway.sandbox().handle().clone();
    // 503 is in the mix to show the line: it is retried, the others are not.
    handle.set_faults(
        Api::Retainly,
        FaultConfig {
            error_rate: 0.3,
            error_statuses: vec![500, 503, 504],
            drop_rate: 0.05,
            ..FaultConfig::default()
        },
    );
    let acknowledged = acknowledge_events(&gateway.channel, "doubt", EVENTS).await;
    assert_eq!(acknowledged.len(), EVENTS);
    finish_all(&gateway.channel, acknowledged.values()).await;

    let possibly_applied = handle.request_count(Api::Retainly, "/events", 500)
        + handle.request_count(Api::Retainly, "/events", 504)
        + handle.request_count(Api::Retainly, "/events", 0);
    let refused = handle.request_count(Api::Retainly, "/events", 503);
    let dead = dead_letters(&gateway.channel).await;
    let ledger = Ledger::of_events(&acknowledged, &recorded_events(gateway.sandbox()), &dead);
    ledger.print(&format!(
        "500/503/504 at 30% and 5% drops: {possibly_applied} possibly applied attempts, {refused} refusals"
    ));
    assert!(possibly_applied > 0 && refused > 0, "both kinds happened");
    assert_eq!(ledger.in_doubt as u64, possibly_applied, "{ledger:?}");
    assert_eq!(ledger.delivered + ledger.in_doubt, EVENTS, "{ledger:?}");
    assert_eq!(
        ledger.failed + ledger.duplicated + ledger.lost,
        0,
        "{ledger:?}"
    );
    for delivery in dead.values() {
        let error = delivery.last_error.as_ref().unwrap();
        assert!(
            ["UPSTREAM_UNAVAILABLE", "UPSTREAM_CONNECTION_FAILED"]
                .contains(&error.metadata["cause"].as_str()),
            "{error:?}"
        );
        assert_ne!(error.metadata["status"], "503", "{error:?}");
    }
    gateway.stop().await.unwrap();
}
