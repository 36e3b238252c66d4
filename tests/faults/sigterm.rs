//! SIGTERM while 64 deliveries are on the wire to an upstream that takes 1.5 s to answer: the
//! gateway first reports NOT_SERVING (health and `/readyz`) while it still serves, for the drain
//! delay; then it closes the listener and lets the deliveries on the wire finish within the grace.
//! After a restart nothing is in doubt and everything acknowledged arrived once.

use std::time::Duration;

use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Api, FaultConfig, Sandbox, SandboxConfig};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::child::ChildGateway;
use crate::ledger::{Ledger, acknowledge_events, dead_letters, finish_all, recorded_events};
use crate::support::eventually;

const EVENTS: usize = 400;
const DRAIN_DELAY: Duration = Duration::from_secs(2);
/// Deliveries the outbox runs at once (`OutboxSettings::concurrency`).
const OUTBOX_CONCURRENCY: u64 = 64;

fn settings() -> Vec<(&'static str, String)> {
    vec![
        ("CXGW_RETAINLY_REQUESTS_PER_MINUTE", "1000000".to_owned()),
        ("CXGW_DRAIN_DELAY", "2s".to_owned()),
        ("CXGW_SHUTDOWN_GRACE", "20s".to_owned()),
    ]
}

/// What one probe saw: the health status on a fresh connection, or `None` once nothing accepts.
async fn probe(addr: std::net::SocketAddr) -> Option<i32> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_latency_finishes_the_deliveries_on_the_wire() {
    let sandbox = Sandbox::new(SandboxConfig {
        retainly_requests_per_minute: 0,
        ..SandboxConfig::default()
    });
    let handle = sandbox.handle().clone();
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    handle.set_faults(
        Api::Retainly,
        FaultConfig {
            latency_ms: 1_500,
            ..FaultConfig::default()
        },
    );
    let data_dir = tempfile::tempdir().unwrap();
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    let acknowledged = acknowledge_events(&gateway.channel, "sigterm", EVENTS).await;
    assert_eq!(acknowledged.len(), EVENTS);
    eventually(
        "every delivery slot on the wire",
        Duration::from_secs(60),
        || handle.in_progress(Api::Retainly) >= OUTBOX_CONCURRENCY,
    )
    .await;
    let on_the_wire = handle.in_progress(Api::Retainly);

    let (grpc_addr, admin_addr) = (gateway.grpc_addr, gateway.admin_addr);
    let signalled = Instant::now();
    gateway.send_sigterm();
    let http = reqwest::Client::new();
    let mut not_serving_seen = 0;
    let mut ready_refused_seen = 0;
    let closed_after = loop {
        match probe(grpc_addr).await {
            Some(status) if status == ServingStatus::NotServing as i32 => not_serving_seen += 1,
            Some(status) => assert_eq!(
                status,
                ServingStatus::Serving as i32,
                "before the signal is handled"
            ),
            None => break signalled.elapsed(),
        }
        if let Ok(response) = http.get(format!("http://{admin_addr}/readyz")).send().await
            && response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
        {
            ready_refused_seen += 1;
        }
    };
    let (status, log) = gateway.wait_with_log();
    let stopped_after = signalled.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        not_serving_seen > 0 && ready_refused_seen > 0,
        "a probe saw NOT_SERVING ({not_serving_seen}) and /readyz 503 ({ready_refused_seen}) while the listener served"
    );
    assert!(
        closed_after >= DRAIN_DELAY,
        "the listener closed {closed_after:?} after SIGTERM, before the drain delay"
    );
    assert!(
        !log.iter().any(|line| line.contains("when the grace ended")),
        "a delivery was cut by the grace"
    );

    handle.clear_faults(Api::Retainly);
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    finish_all(&gateway.channel, acknowledged.values()).await;
    let ledger = Ledger::of_events(
        &acknowledged,
        &recorded_events(&sandbox),
        &dead_letters(&gateway.channel).await,
    );
    ledger.print(&format!(
        "SIGTERM with {on_the_wire} deliveries on the wire at 1.5 s latency: NOT_SERVING for {closed_after:.1?} before the listener closed, exit after {stopped_after:.1?}"
    ));
    assert_eq!(ledger.in_doubt, 0, "{ledger:?}");
    assert_eq!(ledger.delivered, EVENTS, "{ledger:?}");
    assert_eq!(
        ledger.failed + ledger.duplicated + ledger.lost,
        0,
        "{ledger:?}"
    );
    assert_eq!(gateway.terminate().code(), Some(0));
    emulator.stop().await;
}
