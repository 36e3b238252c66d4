//! Refusals the upstream makes without acting (503, 429) and plain latency: every acknowledged
//! write is delivered once, within the retry window, whatever its kind; nothing is parked.

use cx_sandbox::{Api, FaultConfig, SandboxConfig};

use crate::ledger::{Ledger, acknowledge_events, dead_letters, finish_all, recorded_events};
use crate::support::TestGateway;

async fn gateway() -> TestGateway {
    TestGateway::start_with(
        SandboxConfig {
            retainly_requests_per_minute: 0,
            ..SandboxConfig::default()
        },
        // The scenarios are about failures, not pacing.
        vec![("CXGW_RETAINLY_REQUESTS_PER_MINUTE", "1000000".to_owned())],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_percent_503_storm_dead_letters_nothing() {
    const EVENTS: usize = 300;
    let gateway = gateway().await;
    let handle = gateway.sandbox().handle().clone();
    handle.set_faults(
        Api::Retainly,
        FaultConfig {
            error_rate: 0.3,
            error_statuses: vec![503],
            ..FaultConfig::default()
        },
    );
    let acknowledged = acknowledge_events(&gateway.channel, "storm", EVENTS).await;
    assert_eq!(acknowledged.len(), EVENTS, "every write was acknowledged");
    finish_all(&gateway.channel, acknowledged.values()).await;

    let refused = handle.request_count(Api::Retainly, "/events", 503);
    let ledger = Ledger::of_events(
        &acknowledged,
        &recorded_events(gateway.sandbox()),
        &dead_letters(&gateway.channel).await,
    );
    ledger.print(&format!("503 at 30%, {refused} refusals"));
    assert!(refused >= 30, "the storm happened: {refused} answers 503");
    assert_eq!(ledger.delivered, EVENTS, "{ledger:?}");
    assert_eq!(ledger.in_doubt + ledger.failed, 0, "{ledger:?}");
    assert_eq!(ledger.duplicated + ledger.lost, 0, "{ledger:?}");
    gateway.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_bursts_and_latency_are_ridden_out() {
    const EVENTS: usize = 200;
    let gateway = gateway().await;
    let handle = gateway.sandbox().handle().clone();
    handle.set_faults(
        Api::Retainly,
        FaultConfig {
            burst_429: 150,
            latency_ms: 20,
            latency_jitter_ms: 30,
            ..FaultConfig::default()
        },
    );
    let acknowledged = acknowledge_events(&gateway.channel, "burst", EVENTS).await;
    assert_eq!(acknowledged.len(), EVENTS);
    finish_all(&gateway.channel, acknowledged.values()).await;
    let ledger = Ledger::of_events(
        &acknowledged,
        &recorded_events(gateway.sandbox()),
        &dead_letters(&gateway.channel).await,
    );
    ledger.print("150 forced 429s, 20-50 ms latency");
    assert_eq!(handle.fault_counts(Api::Retainly).forced_429, 150);
    assert_eq!(ledger.delivered, EVENTS, "{ledger:?}");
    assert_eq!(
        ledger.in_doubt + ledger.failed + ledger.duplicated + ledger.lost,
        0,
        "{ledger:?}"
    );
    gateway.stop().await.unwrap();
}
