//! Replicas whose PostgreSQL database becomes unreachable and returns, without a restart.
//!
//! The test cluster is shared by other tests, so it is never stopped: the replicas reach it
//! through a loopback relay in this test, which can be switched down (every open connection cut,
//! every new one reset) and up again.
//!
//! What proves that no write is acknowledged while the database is down is a matter of
//! construction, not timing: the relay reports the instant from which no byte passes (every
//! connection it forwarded is closed) and the instant it lets bytes through again. A call sent
//! after the first and answered before the second cannot have committed anything, so it must be
//! refused; a call acknowledged across either edge may have committed, and then it must be
//! delivered like every other acknowledged one.
//!
//! Needs the test cluster of `scripts/postgres.sh` (`CXGW_TEST_POSTGRES_URL`); without it the
//! tests pass as skipped, unless `CXGW_TEST_REQUIRE_POSTGRES=1` requires it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cx_gateway::pb;
use cx_gateway::pb::delivery_service_client::DeliveryServiceClient;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_gateway::pb::feedback_stream_client::FeedbackStreamClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Sandbox, SandboxConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

use crate::child::ChildGateway;
use crate::replicas::SharedDatabase;
use crate::support::eventually;

/// How long the database stays away in the load test (the figure).
const OUTAGE: Duration = Duration::from_secs(10);

/// Generous bounds for what a busy 2-core machine does in about a second.
const SETTLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct RelayState {
    up: bool,
    /// Forwarded connections not closed yet.
    open: usize,
}

/// A loopback TCP relay to PostgreSQL that can be switched down and up.
struct Relay {
    addr: SocketAddr,
    state: Arc<watch::Sender<RelayState>>,
    accept: tokio::task::JoinHandle<()>,
}

/// Counts a forwarded connection as open until dropped.
struct Open(Arc<watch::Sender<RelayState>>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|state| state.open -= 1);
    }
}

/// Closes with a reset rather than a FIN, as a dead path or a killed server does.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(watch::channel(RelayState { up: true, open: 0 }).0);
        let shared = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                // Checked and counted in one step, so a connection is either refused or counted
                // before `down` starts waiting for the open ones to close.
                let accepted = shared.send_if_modified(|state| {
                    if state.up {
                        state.open += 1;
                    }
                    state.up
                });
                if !accepted {
                    reset(client);
                    continue;
                }
                let open = Open(Arc::clone(&shared));
                let mut switched = shared.subscribe();
                tokio::spawn(async move {
                    let _open = open;
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        biased;
                        _ = switched.wait_for(|state| !state.up) => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                    reset(client);
                    reset(server);
                });
            }
        });
        Relay {
            addr,
            state,
            accept,
        }
    }

    /// Cuts every connection and refuses new ones; returns once every forwarded connection is
    /// closed, the instant from which no byte passes.
    async fn down(&self) -> Instant {
        self.state.send_modify(|state| state.up = false);
        let mut state = self.state.subscribe();
        state.wait_for(|state| state.open == 0).await.unwrap();
        Instant::now()
    }

    /// Lets connections through again; returns the instant before the first byte can pass.
    fn up(&self) -> Instant {
        let before = Instant::now();
        self.state.send_modify(|state| state.up = true);
        before
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The test database reached through `relay`: its URL (password included) in a file, as
/// `CXGW_POSTGRES_URL_FILE` expects.
fn relayed_url_file(database: &SharedDatabase, relay: &Relay, dir: &tempfile::TempDir) -> String {
    let mut url = reqwest::Url::parse(&database.url).unwrap();
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(relay.addr.port())).unwrap();
    let path = dir.path().join("relayed-postgres-url");
    std::fs::write(&path, format!("{url}\n")).unwrap();
    path.display().to_string()
}

fn cluster_addr(database: &SharedDatabase) -> SocketAddr {
    let url = reqwest::Url::parse(&database.url).unwrap();
    let host = url.host_str().unwrap();
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{}", url.port().unwrap_or(5432))
        .parse()
        .unwrap()
}

/// The overall health status of one replica as its `Watch` stream reports it, with the instant
/// each change arrived.
struct HealthWatch {
    latest: watch::Receiver<i32>,
    changes: Arc<Mutex<Vec<(Instant, i32)>>>,
}

impl HealthWatch {
    async fn start(channel: Channel) -> HealthWatch {
        let mut stream = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let (latest, receiver) = watch::channel(ServingStatus::Unknown as i32);
        let changes = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&changes);
        tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                recorded
                    .lock()
                    .unwrap()
                    .push((Instant::now(), message.status));
                latest.send_replace(message.status);
            }
        });
        HealthWatch {
            latest: receiver,
            changes,
        }
    }

    async fn until(&mut self, status: ServingStatus) {
        tokio::time::timeout(SETTLE, self.latest.wait_for(|now| *now == status as i32))
            .await
            .unwrap_or_else(|_| panic!("the replica reports {status:?}"))
            .unwrap();
    }

    fn changes(&self) -> Vec<(Instant, i32)> {
        self.changes.lock().unwrap().clone()
    }
}

async fn readyz(replica: &ChildGateway) -> (u16, String) {
    let response = reqwest::get(format!("http://{}/readyz", replica.admin_addr))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn metrics(replica: &ChildGateway) -> String {
    reqwest::get(format!("http://{}/metrics", replica.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of a series without labels, or of the first one whose labels contain `label`.
fn sample(text: &str, name: &str, label: Option<&str>) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = match label {
            None => rest.strip_prefix(' ')?,
            Some(label) => {
                let labels = rest.strip_prefix('{')?;
                let (labels, value) = labels.split_once("} ")?;
                labels.contains(label).then_some(value)?
            }
        };
        value.trim().parse().ok()
    })
}

fn event(customer: &str, mode: pb::DeliveryMode) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event: Some(pb::Event {
            customer_id: customer.to_owned(),
            name: "failover_test".to_owned(),
            message_id: format!("msg-{customer}"),
            ..Default::default()
        }),
        options: Some(pb::WriteOptions {
            mode: mode as i32,
            idempotency_key: String::new(),
        }),
    }
}

/// A refusal as the contract promises it while the store is away: UNAVAILABLE, reason
/// STORE_UNAVAILABLE, and a RetryInfo.
fn assert_store_unavailable(status: &tonic::Status) {
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().map(|info| info.reason.as_str()),
        Some("STORE_UNAVAILABLE"),
        "{status:?}"
    );
    assert!(
        details
            .retry_info()
            .is_some_and(|retry| retry.retry_delay.is_some()),
        "no RetryInfo: {status:?}"
    );
}

/// How often each customer's event reached the emulator.
fn recorded(sandbox: &Sandbox) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in sandbox.handle().retainly_events() {
        if let Some(id) = event.customer_id.as_str() {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

fn assert_no_secret(replicas: &[ChildGateway], database: &SharedDatabase) {
    let password = database.password();
    for replica in replicas {
        for line in replica.log.lock().unwrap().iter() {
            assert!(!line.contains(&password), "the password in a log line");
        }
    }
}

fn logged(replica: &ChildGateway, message: &str) -> bool {
    replica
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|line| line.contains(message))
}

/// Waits until `count` writes were acknowledged in all.
async fn until_acks(acknowledged: &watch::Sender<usize>, count: usize) {
    let mut acks = acknowledged.subscribe();
    tokio::time::timeout(SETTLE * 2, acks.wait_for(|acked| *acked >= count))
        .await
        .expect("writes are acknowledged")
        .unwrap();
}

/// One write: when it was sent, when its answer came, and the answer.
struct Call {
    customer: String,
    replica: usize,
    sent: Instant,
    answered: Instant,
    outcome: Result<(), tonic::Status>,
}

/// Three replicas under a load of asynchronous TrackEvents lose their database for 10 s: no
/// write is acknowledged without a commit, every refusal is UNAVAILABLE with RetryInfo, all three
/// report NOT_SERVING and then SERVING again by themselves, and every acknowledged write reaches
/// the upstream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_lose_their_database_acknowledge_nothing_and_recover_by_themselves() {
    let Some(mut database) = SharedDatabase::create().await else {
        return;
    };
    let relay = Relay::start(cluster_addr(&database)).await;
    let secrets = tempfile::tempdir().unwrap();
    let extra = [
        (
            "CXGW_POSTGRES_URL_FILE",
            relayed_url_file(&database, &relay, &secrets),
        ),
        // The test is about durability, not pacing: lift Retainly's budget.
        ("CXGW_RETAINLY_REQUESTS_PER_MINUTE", "1000000".to_owned()),
    ];
    let sandbox = Sandbox::new(SandboxConfig::default());
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    let mut replicas = database.start_replicas(3, &emulator, &extra).await;
    let pids: Vec<u32> = replicas.iter().map(|r| r.process.id()).collect();
    let mut health = Vec::new();
    for replica in &replicas {
        let mut watch = HealthWatch::start(replica.channel.clone()).await;
        watch.until(ServingStatus::Serving).await;
        health.push(watch);
    }

    // Writers, two per replica, each sending new events one after the other; a refused one waits
    // as its RetryInfo asks (capped at a second), as a client would.
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let acknowledged = Arc::new(watch::channel(0_usize).0);
    let next = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = watch::channel(false);
    let mut writers = Vec::new();
    for writer in 0..6 {
        let replica = writer % replicas.len();
        let mut client = EventServiceClient::new(replicas[replica].channel.clone());
        let (calls, acknowledged, next, stopped) = (
            Arc::clone(&calls),
            Arc::clone(&acknowledged),
            Arc::clone(&next),
            stopped.clone(),
        );
        writers.push(tokio::spawn(async move {
            while !*stopped.borrow() {
                let customer = format!("fo-{}", next.fetch_add(1, Ordering::SeqCst));
                let mut request = tonic::Request::new(event(&customer, pb::DeliveryMode::Async));
                request.set_timeout(Duration::from_secs(30));
                let sent = Instant::now();
                let outcome = client.track_event(request).await.map(|_| ());
                let answered = Instant::now();
                let pause = match &outcome {
                    Ok(()) => {
                        acknowledged.send_modify(|count| *count += 1);
                        None
                    }
                    Err(status) => Some(
                        status
                            .get_error_details()
                            .retry_info()
                            .and_then(|retry| retry.retry_delay)
                            .unwrap_or(Duration::from_secs(1))
                            .min(Duration::from_secs(1)),
                    ),
                };
                calls.lock().unwrap().push(Call {
                    customer,
                    replica,
                    sent,
                    answered,
                    outcome,
                });
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                }
            }
        }));
    }
    until_acks(&acknowledged, 150).await;

    // The database goes away under load.
    let down_started = Instant::now();
    let cut = relay.down().await;
    for watch in &mut health {
        watch.until(ServingStatus::NotServing).await;
    }
    for replica in &mut replicas {
        let (status, body) = readyz(replica).await;
        assert_eq!((status, body.as_str()), (503, "store unreachable\n"));
        assert!(replica.process.try_wait().unwrap().is_none());
    }
    let text = metrics(&replicas[0]).await;
    assert_eq!(sample(&text, "cxgw_store_reachable", None), Some(0.0));
    assert!(
        sample(
            &text,
            "cxgw_store_health_checks_total",
            Some("outcome=\"failed\"")
        )
        .is_some_and(|failed| failed >= 2.0)
    );
    // Down for the 10 s, and at least until every replica said so.
    tokio::time::sleep_until((cut + OUTAGE).into()).await;
    let restored = relay.up();

    for watch in &mut health {
        watch.until(ServingStatus::Serving).await;
    }
    for replica in &replicas {
        assert_eq!(readyz(replica).await, (200, "ready\n".to_owned()));
    }
    assert_eq!(
        sample(&metrics(&replicas[0]).await, "cxgw_store_reachable", None),
        Some(1.0)
    );
    let before_restore = *acknowledged.borrow();
    until_acks(&acknowledged, before_restore + 150).await;
    stop.send_replace(true);
    for writer in writers {
        writer.await.unwrap();
    }

    let calls = std::mem::take(&mut *calls.lock().unwrap());
    // Every refusal, at any time, is the contract's: UNAVAILABLE with RetryInfo.
    for call in &calls {
        if let Err(status) = &call.outcome {
            assert_store_unavailable(status);
        }
    }
    // No call both sent and answered while no byte could reach the database was acknowledged.
    let within: Vec<&Call> = calls
        .iter()
        .filter(|call| call.sent > cut && call.answered < restored)
        .collect();
    assert!(
        within.len() >= 6,
        "each writer was refused while the database was away: {}",
        within.len()
    );
    for call in &within {
        assert!(
            call.outcome.is_err(),
            "{} was acknowledged while the database was unreachable",
            call.customer
        );
    }
    // Every replica acknowledged writes again afterwards, as the same process.
    for (index, replica) in replicas.iter_mut().enumerate() {
        assert!(
            calls
                .iter()
                .any(|call| call.replica == index && call.sent > restored && call.outcome.is_ok()),
            "replica {index} acknowledges writes again"
        );
        assert!(replica.process.try_wait().unwrap().is_none());
        assert_eq!(replica.process.id(), pids[index], "no restart");
    }
    // Health went NOT_SERVING while the database was away and SERVING after it returned.
    for (index, watch) in health.iter().enumerate() {
        let changes = watch.changes();
        let lost = changes
            .iter()
            .find(|(_, status)| *status == ServingStatus::NotServing as i32)
            .map(|(at, _)| *at)
            .unwrap_or_else(|| panic!("replica {index} never reported NOT_SERVING"));
        assert!(lost > down_started && lost < restored, "replica {index}");
        assert!(
            changes
                .iter()
                .any(|(at, status)| *at > restored && *status == ServingStatus::Serving as i32),
            "replica {index} reported SERVING again"
        );
    }

    // Every acknowledged write is delivered, once.
    let acked: Vec<&str> = calls
        .iter()
        .filter(|call| call.outcome.is_ok())
        .map(|call| call.customer.as_str())
        .collect();
    let handle = sandbox.clone();
    eventually(
        "every acknowledged write delivered",
        Duration::from_secs(180),
        || {
            let arrived = recorded(&handle);
            acked.iter().all(|customer| arrived.contains_key(*customer))
        },
    )
    .await;
    let arrived = recorded(&sandbox);
    let duplicated: Vec<_> = arrived.iter().filter(|(_, count)| **count > 1).collect();
    assert!(duplicated.is_empty(), "delivered twice: {duplicated:?}");
    let sent: std::collections::HashSet<&str> =
        calls.iter().map(|call| call.customer.as_str()).collect();
    assert!(
        arrived
            .keys()
            .all(|customer| sent.contains(customer.as_str()))
    );
    let dead = DeliveryServiceClient::new(replicas[0].channel.clone())
        .list_dead_letters(pb::ListDeadLettersRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(dead.deliveries.is_empty(), "{:?}", dead.deliveries);
    let refused = calls.iter().filter(|call| call.outcome.is_err()).count();
    eprintln!(
        "postgres fail-over: {} writes, {} acknowledged, {} refused ({} while the database was \
         away), {} delivered ({} of them refused answers whose commit landed), 0 lost, 0 \
         duplicated; not serving after {:?}",
        calls.len(),
        acked.len(),
        refused,
        within.len(),
        arrived.len(),
        arrived.len() - acked.len(),
        health
            .iter()
            .filter_map(|watch| watch
                .changes()
                .iter()
                .find(|(_, status)| *status == ServingStatus::NotServing as i32)
                .map(|(at, _)| at.saturating_duration_since(cut)))
            .max()
            .unwrap_or_default(),
    );

    for replica in &replicas {
        assert!(logged(replica, "the store cannot be reached"));
        assert!(logged(replica, "the store answers again"));
    }
    assert_no_secret(&replicas, &database);
    for replica in replicas {
        assert_eq!(replica.terminate().code(), Some(0));
    }
    emulator.stop().await;
}

/// One replica without its database: the readiness probes and each kind of call that needs the
/// store answer as the contract says (health NOT_SERVING with liveness SERVING, `/readyz` 503,
/// async, idempotent and DeliveryService calls UNAVAILABLE with RetryInfo and no upstream call),
/// and all of it works again once the database returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_its_database_is_not_ready_and_refuses_what_needs_it() {
    let Some(mut database) = SharedDatabase::create().await else {
        return;
    };
    let relay = Relay::start(cluster_addr(&database)).await;
    let secrets = tempfile::tempdir().unwrap();
    let extra = [
        (
            "CXGW_POSTGRES_URL_FILE",
            relayed_url_file(&database, &relay, &secrets),
        ),
        // The poller meets the outage within the test's few seconds of it.
        ("CXGW_FEEDBACK_POLL_INTERVAL", "200ms".to_owned()),
        ("CXGW_FEEDBACK_RESCAN_INTERVAL", "0s".to_owned()),
        ("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "6000".to_owned()),
    ];
    // No seeded responses: the one the test adds is the first the stream carries.
    let sandbox = Sandbox::new(SandboxConfig {
        seed: cx_sandbox::SeedConfig {
            feedback: 0,
            ..cx_sandbox::SeedConfig::default()
        },
        ..SandboxConfig::default()
    });
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    let replica = database.start_replica(&emulator, &extra).await;
    let mut health = HealthWatch::start(replica.channel.clone()).await;
    health.until(ServingStatus::Serving).await;
    let mut events = EventServiceClient::new(replica.channel.clone());
    let mut deliveries = DeliveryServiceClient::new(replica.channel.clone());
    // A subscriber from before the outage, live from now on.
    let mut stream = FeedbackStreamClient::new(replica.channel.clone())
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let queued = events
        .track_event(event("before", pb::DeliveryMode::Async))
        .await
        .unwrap()
        .into_inner()
        .delivery_id;
    let handle = sandbox.clone();
    eventually("the queued event delivered", SETTLE, || {
        recorded(&handle).contains_key("before")
    })
    .await;

    // The poller is past its start (it has polled), so the outage meets its polling loop.
    let stats = || async {
        reqwest::get(format!("http://{}/feedback/stats", replica.admin_addr))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    while stats().await["polls"].as_u64() < Some(1) {
        assert!(tokio::time::Instant::now() < deadline, "the poller polls");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    relay.down().await;
    health.until(ServingStatus::NotServing).await;
    // Alive, not ready: nothing restarts it.
    let liveness = HealthClient::new(replica.channel.clone())
        .check(HealthCheckRequest {
            service: "liveness".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(liveness.status, ServingStatus::Serving as i32);
    assert_eq!(
        readyz(&replica).await,
        (503, "store unreachable\n".to_owned())
    );
    let upstream_before = sandbox.handle().retainly_events().len();
    let refused = events
        .track_event(event("async-while-down", pb::DeliveryMode::Async))
        .await
        .unwrap_err();
    assert_store_unavailable(&refused);
    // A synchronous write with a message id needs the idempotency record before the upstream.
    let refused = events
        .track_event(event("sync-while-down", pb::DeliveryMode::Sync))
        .await
        .unwrap_err();
    assert_store_unavailable(&refused);
    let refused = deliveries
        .get_delivery(pb::GetDeliveryRequest {
            delivery_id: queued.clone(),
        })
        .await
        .unwrap_err();
    assert_store_unavailable(&refused);
    let refused = deliveries
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap_err();
    assert_store_unavailable(&refused);
    assert_eq!(
        sandbox.handle().retainly_events().len(),
        upstream_before,
        "no upstream call for a refused write"
    );
    // The poller meets the outage too (its polls fail while the log cannot take them).
    let deadline = tokio::time::Instant::now() + SETTLE;
    while stats().await["poll_failures"].as_u64() < Some(1) {
        if tokio::time::Instant::now() > deadline {
            let log = replica.log.lock().unwrap().clone();
            panic!(
                "no poll failed while the database was away; the log:\n{}",
                log.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = metrics(&replica).await;
    assert_eq!(sample(&text, "cxgw_store_reachable", None), Some(0.0));
    // The scrape-time read of the store sees it too.
    assert_eq!(sample(&text, "cxgw_store_available", None), Some(0.0));

    relay.up();
    health.until(ServingStatus::Serving).await;
    assert_eq!(readyz(&replica).await, (200, "ready\n".to_owned()));
    let delivery = deliveries
        .get_delivery(pb::GetDeliveryRequest {
            delivery_id: queued,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(delivery.delivery.is_some());
    // The refused synchronous write left nothing behind: sent again, it runs once.
    let again = events
        .track_event(event("sync-while-down", pb::DeliveryMode::Sync))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.duplicate);
    events
        .track_event(event("async-after", pb::DeliveryMode::Async))
        .await
        .unwrap();
    let handle = sandbox.clone();
    eventually("the writes after the return delivered", SETTLE, || {
        let arrived = recorded(&handle);
        arrived.contains_key("sync-while-down") && arrived.contains_key("async-after")
    })
    .await;
    let arrived = recorded(&sandbox);
    assert!(!arrived.contains_key("async-while-down"));
    assert_eq!(arrived["sync-while-down"], 1);
    // The poller resumed by itself, and the stream opened before the outage carries what it
    // logs now.
    let response = sandbox.handle().simulate_feedback(1);
    let expected = response[0]["id"].as_str().unwrap().to_owned();
    let received = tokio::time::timeout(SETTLE, async {
        loop {
            let message = stream
                .message()
                .await
                .unwrap()
                .expect("the stream stays open");
            if let Some(pb::subscribe_response::Payload::FeedbackEvent(event)) = message.payload {
                return event.feedback.unwrap().feedback_id;
            }
        }
    })
    .await
    .expect("the new response reaches the subscriber");
    assert_eq!(received, expected);

    assert_no_secret(std::slice::from_ref(&replica), &database);
    assert_eq!(replica.terminate().code(), Some(0));
    emulator.stop().await;
}
