//! Nothing acknowledged is lost: a child gateway acknowledges thousands of asynchronous writes
//! while the sandbox injects faults, is killed with SIGKILL mid-delivery, restarts on the same
//! data directory, and the sandbox ends with the acknowledged set — each write once. The kill
//! lands mid-delivery by construction: the sandbox lets a fifth of the events through and holds
//! every later one on the wire until the kill.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::delivery_service_client::DeliveryServiceClient;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Api, FaultConfig, Sandbox, SandboxConfig};
use tokio::net::TcpListener;

use crate::child::ChildGateway;
use crate::support::eventually;

const WRITES: usize = 5_000;

fn settings() -> Vec<(&'static str, String)> {
    vec![
        // The test is about durability, not pacing: lift Retainly's budget.
        ("CXGW_RETAINLY_REQUESTS_PER_MINUTE", "1000000".to_owned()),
        ("CXGW_SHUTDOWN_GRACE", "2s".to_owned()),
    ]
}

fn async_event(n: usize) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event: Some(pb::Event {
            customer_id: format!("crash-{n}"),
            name: "crash_test".to_owned(),
            message_id: format!("crash-msg-{n}"),
            ..Default::default()
        }),
        options: Some(pb::WriteOptions {
            mode: pb::DeliveryMode::Async as i32,
            idempotency_key: String::new(),
        }),
    }
}

/// The customer ids of the events the sandbox recorded, with how often each arrived.
fn recorded(sandbox: &Sandbox) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in sandbox.handle().retainly_events() {
        if let Some(id) = event.customer_id.as_str() {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_and_are_delivered_once() {
    let sandbox = Sandbox::new(SandboxConfig::default());
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    // Refusals the gateway must ride out: 429 bursts, and latency so deliveries are in flight
    // when the process dies.
    sandbox.handle().set_faults(
        Api::Retainly,
        FaultConfig {
            burst_429: 300,
            latency_ms: 2,
            latency_jitter_ms: 5,
            ..FaultConfig::default()
        },
    );
    // A fifth of the events are handled; every later one is held, unanswered, until the kill.
    sandbox
        .handle()
        .hold_after(Api::Retainly, (WRITES / 5) as u64);
    let data_dir = tempfile::tempdir().unwrap();

    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    let client = EventServiceClient::new(gateway.channel.clone());
    let acknowledged = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let mut tasks = Vec::new();
    for worker in 0..32 {
        let mut client = client.clone();
        let acknowledged = Arc::clone(&acknowledged);
        tasks.push(tokio::spawn(async move {
            for n in (worker..WRITES).step_by(32) {
                let response = client.track_event(async_event(n)).await;
                if let Ok(response) = response {
                    assert!(response.into_inner().delivery_id.starts_with("dlv_"));
                    acknowledged.lock().unwrap().insert(format!("crash-{n}"));
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), WRITES, "every write was acknowledged");

    // Kill it while deliveries are under way: the fifth that passed has arrived, and the rest
    // cannot arrive before the kill since the sandbox holds them.
    let handle = sandbox.handle().clone();
    eventually(
        "deliveries held on the wire",
        Duration::from_secs(60),
        || handle.held(Api::Retainly) > 0,
    )
    .await;
    let before_kill = recorded(&sandbox).len();
    gateway.kill();
    handle.release(Api::Retainly);
    assert!(
        before_kill < WRITES,
        "the kill came mid-delivery ({before_kill} delivered)"
    );

    // Restart on the same data directory, with faults still on.
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    let mut deliveries = DeliveryServiceClient::new(gateway.channel.clone());
    let mut in_doubt: HashSet<String>;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let arrived = recorded(&sandbox);
        let dead = deliveries
            .list_dead_letters(pb::ListDeadLettersRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Only deliveries that were in flight at the kill may be dead letters: in doubt, not sent
        // again, because an event starts workflows each time it is recorded.
        for delivery in &dead.deliveries {
            let error = delivery.last_error.as_ref().unwrap();
            assert_eq!(error.reason, "DELIVERY_IN_DOUBT", "{delivery:?}");
        }
        in_doubt = dead
            .deliveries
            .iter()
            .map(|d| d.delivery_id.clone())
            .collect();
        if arrived.len() + in_doubt.len() >= WRITES || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let arrived = recorded(&sandbox);
    let duplicates: Vec<_> = arrived.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "delivered twice: {duplicates:?}");
    let unexpected: Vec<_> = arrived
        .keys()
        .filter(|id| !acknowledged.contains(*id))
        .collect();
    assert!(unexpected.is_empty(), "never acknowledged: {unexpected:?}");
    let missing = WRITES - arrived.len();
    assert!(
        missing <= in_doubt.len(),
        "{missing} acknowledged writes missing, only {} in doubt",
        in_doubt.len()
    );
    eprintln!(
        "crash test: {WRITES} acknowledged, {before_kill} delivered before SIGKILL, {} delivered in all, {} in doubt after the restart",
        arrived.len(),
        in_doubt.len()
    );
    assert_eq!(gateway.terminate().code(), Some(0));
    emulator.stop().await;
}
