//! Idempotency and delivery across replicas on one PostgreSQL database (harness: `replicas.rs`).
//!
//! - Repeats of one idempotency key sent to two replicas at once make one upstream call and get
//!   one answer; a later repeat on a third replica gets it too. The first call is held on the
//!   wire by the emulator (SYNC) or held before its commit by a row lock the test takes in the
//!   database (ASYNC), and the repeat is released only once its replica reports that it waits
//!   for the first: the race happens by construction.
//! - 5,000 acknowledged asynchronous events over 3 replicas, one replica SIGKILLed while it has
//!   deliveries on the wire (the emulator holds every delivery after the first fifth, and the
//!   kill comes once each replica holds claims): each event arrives once or is a
//!   `DELIVERY_IN_DOUBT` dead letter, none is lost, and each customer's events arrive in the
//!   order they were acknowledged, whichever replica acknowledged them.
//!
//! Needs the test cluster of `scripts/postgres.sh`; skipped without it unless
//! `CXGW_TEST_REQUIRE_POSTGRES=1`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::delivery_service_client::DeliveryServiceClient;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Api, HoldSpec, Sandbox, SandboxConfig};
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::child::ChildGateway;
use crate::replicas::SharedDatabase;
use crate::support::eventually;

/// The debug line a replica logs when a repeat finds its key held by another replica's call.
const WAITING: &str = "waiting for the call that holds this idempotency key on another replica";

async fn emulator(sandbox: &Sandbox) -> EmbeddedSandbox {
    EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap()
}

fn event(
    customer: &str,
    message_id: &str,
    n: u64,
    mode: pb::DeliveryMode,
) -> pb::TrackEventRequest {
    let mut properties = prost_types::Struct::default();
    properties.fields.insert(
        "n".to_owned(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(n as f64)),
        },
    );
    pb::TrackEventRequest {
        event: Some(pb::Event {
            customer_id: customer.to_owned(),
            name: "scale_out_replicas".to_owned(),
            message_id: message_id.to_owned(),
            properties: Some(properties),
            ..Default::default()
        }),
        options: Some(pb::WriteOptions {
            mode: mode as i32,
            idempotency_key: String::new(),
        }),
    }
}

/// Sends `request` as a careful caller does: an `UNAVAILABLE` answer (the replica could not
/// reach the database in time, as happens on a loaded machine) is retried with the same message
/// id, which makes the retry safe. Returns the answer and how many retries it took.
async fn track_retrying(
    channel: Channel,
    request: pb::TrackEventRequest,
) -> (pb::TrackEventResponse, u32) {
    let mut client = EventServiceClient::new(channel);
    let mut retries = 0;
    loop {
        match client.track_event(request.clone()).await {
            Ok(response) => return (response.into_inner(), retries),
            Err(status) if status.code() == tonic::Code::Unavailable && retries < 20 => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("the event is not accepted: {status:?}"),
        }
    }
}

async fn track(channel: Channel, request: pb::TrackEventRequest) -> pb::TrackEventResponse {
    EventServiceClient::new(channel)
        .track_event(request)
        .await
        .expect("the event is accepted")
        .into_inner()
}

/// How many times `replica` logged that a repeat waits for another replica's call.
fn waits_logged(replica: &ChildGateway) -> usize {
    replica
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains(WAITING))
        .count()
}

/// The events the emulator recorded for `customer`.
fn events_of(sandbox: &Sandbox, customer: &str) -> usize {
    sandbox
        .handle()
        .retainly_events()
        .iter()
        .filter(|event| event.customer_id.as_str() == Some(customer))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_replicas_concurrent_repeats_of_one_key_make_one_upstream_call() {
    let Some(mut database) = SharedDatabase::create().await else {
        return;
    };
    let sandbox = Sandbox::new(SandboxConfig::default());
    let emulator = emulator(&sandbox).await;
    let debug = [(
        "CXGW_LOG",
        "info,cx_gateway::domain::idempotency=debug".to_owned(),
    )];
    let replicas = database.start_replicas(3, &emulator, &debug).await;
    let handle = sandbox.handle().clone();

    // SYNC: the first call is held on the wire while its repeat reaches another replica.
    let request = || event("repeat-sync", "msg-sync", 1, pb::DeliveryMode::Sync);
    handle.hold(Api::Retainly, HoldSpec::default());
    let first = tokio::spawn(track(replicas[0].channel.clone(), request()));
    eventually(
        "the first call held on the wire",
        Duration::from_secs(30),
        || handle.held(Api::Retainly) == 1,
    )
    .await;
    let second = tokio::spawn(track(replicas[1].channel.clone(), request()));
    eventually(
        "the repeat waiting for the first call",
        Duration::from_secs(30),
        || waits_logged(&replicas[1]) == 1,
    )
    .await;
    assert_eq!(handle.held(Api::Retainly), 1, "the repeat made no call");
    handle.release(Api::Retainly);
    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(
        pb::TrackEventResponse {
            duplicate: false,
            ..second
        },
        first
    );
    let third = track(replicas[2].channel.clone(), request()).await;
    assert!(third.duplicate);
    assert_eq!(
        pb::TrackEventResponse {
            duplicate: false,
            ..third
        },
        first
    );
    assert_eq!(events_of(&sandbox, "repeat-sync"), 1);

    // ASYNC (message-id dedupe): the first call's enqueue waits for the outbox's head row,
    // which the test holds locked, while its repeat reaches another replica.
    let (mut client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let lock = client.transaction().await.unwrap();
    lock.execute("SELECT seq FROM outbox_head FOR UPDATE", &[])
        .await
        .unwrap();
    let request = || event("repeat-async", "msg-async", 2, pb::DeliveryMode::Async);
    let first = tokio::spawn(track(replicas[1].channel.clone(), request()));
    // The repeat goes out only once the first call holds the key: its claim commits before its
    // enqueue reaches the locked row, so a claim row in the table means the first call is the
    // holder (otherwise the repeat could claim first and the roles would swap).
    let claim_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let claims: i64 = lock
            .query_one(
                "SELECT count(*) FROM idempotency_claims WHERE key LIKE '%msg-async%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if claims == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < claim_deadline,
            "timed out waiting for the first call's claim"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waits_before = waits_logged(&replicas[2]);
    let second = tokio::spawn(track(replicas[2].channel.clone(), request()));
    eventually(
        "the async repeat waiting for the first call",
        Duration::from_secs(30),
        || waits_logged(&replicas[2]) > waits_before,
    )
    .await;
    lock.rollback().await.unwrap();
    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert!(first.delivery_id.starts_with("dlv_"));
    assert_eq!(second.delivery_id, first.delivery_id);
    assert!(!first.duplicate);
    assert!(second.duplicate);
    let third = track(replicas[0].channel.clone(), request()).await;
    assert_eq!(third.delivery_id, first.delivery_id);
    assert!(third.duplicate);
    let mut deliveries = DeliveryServiceClient::new(replicas[0].channel.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let delivery = deliveries
            .get_delivery(pb::GetDeliveryRequest {
                delivery_id: first.delivery_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .delivery
            .unwrap();
        if delivery.state == pb::DeliveryState::Delivered as i32 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queued event is delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(events_of(&sandbox, "repeat-async"), 1);
    let queued: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 1, "one delivery for the three calls");

    for replica in replicas {
        assert_eq!(replica.terminate().code(), Some(0));
    }
    emulator.stop().await;
}

const CUSTOMERS: u64 = 500;
const EVENTS_PER_CUSTOMER: u64 = 10;
const EVENTS: u64 = CUSTOMERS * EVENTS_PER_CUSTOMER;
/// Callers sending at once; each sends its customers' events one after the other, so a
/// customer's events are acknowledged in the order of `n`.
const SENDERS: u64 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_replicas_5000_events_survive_a_sigkill_once_each_in_customer_order() {
    let Some(mut database) = SharedDatabase::create().await else {
        return;
    };
    let sandbox = Sandbox::new(SandboxConfig::default());
    let emulator = emulator(&sandbox).await;
    let handle = sandbox.handle().clone();
    handle.hold_after(Api::Retainly, EVENTS / 5);
    let settings = [
        // A dead replica's claims lapse after this (the live ones renew theirs).
        ("CXGW_POSTGRES_CLAIM_LEASE", "3s".to_owned()),
        // The test is about durability and order, not pacing: lift Retainly's budget.
        ("CXGW_RETAINLY_REQUESTS_PER_MINUTE", "1000000".to_owned()),
    ];
    let mut replicas = database.start_replicas(3, &emulator, &settings).await;
    let started = std::time::Instant::now();

    // Event `n` of a customer goes to replica `(customer + n) % 3`: every customer's events are
    // spread over all three.
    let channels: Vec<Channel> = replicas.iter().map(|r| r.channel.clone()).collect();
    let acknowledged: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    let retried = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let channels = channels.clone();
        let acknowledged = Arc::clone(&acknowledged);
        let retried = Arc::clone(&retried);
        senders.push(tokio::spawn(async move {
            for n in 0..EVENTS_PER_CUSTOMER {
                for customer in (sender..CUSTOMERS).step_by(SENDERS as usize) {
                    let channel = channels[((customer + n) % 3) as usize].clone();
                    let request = event(
                        &format!("c-{customer}"),
                        &format!("m-{customer}-{n}"),
                        n,
                        pb::DeliveryMode::Async,
                    );
                    let (response, retries) = track_retrying(channel, request).await;
                    // A retry may find its first attempt committed: then it is answered as a
                    // duplicate with the first attempt's delivery.
                    assert!(!response.duplicate || retries > 0);
                    retried.fetch_add(u64::from(retries), Ordering::Relaxed);
                    acknowledged
                        .lock()
                        .unwrap()
                        .insert(response.delivery_id, (customer, n));
                }
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len() as u64, EVENTS);
    let acknowledging = started.elapsed();

    // The kill lands while every replica holds claims, whose requests the emulator holds.
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let claimants: i64 = client
            .query_one(
                "SELECT count(DISTINCT claimed_by) FROM outbox WHERE state = 2",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if claimants == 3 && handle.held(Api::Retainly) > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "every replica holds deliveries on the wire"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered_before_kill = handle.retainly_events().len();
    replicas.remove(0).kill();
    handle.release(Api::Retainly);

    // The survivors deliver the rest and take the dead replica's lapsed claims over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let finished: i64 = client
            .query_one("SELECT count(*) FROM outbox WHERE state IN (4, 5)", &[])
            .await
            .unwrap()
            .get(0);
        if finished as u64 == EVENTS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "every delivery finished ({finished} of {EVENTS})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut deliveries = DeliveryServiceClient::new(replicas[0].channel.clone());
    let mut in_doubt = HashSet::new();
    let mut page_token = String::new();
    loop {
        let page = deliveries
            .list_dead_letters(pb::ListDeadLettersRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for delivery in &page.deliveries {
            let error = delivery.last_error.as_ref().unwrap();
            assert_eq!(error.reason, "DELIVERY_IN_DOUBT", "{delivery:?}");
            in_doubt.insert(acknowledged[&delivery.delivery_id]);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(
        !in_doubt.is_empty(),
        "the killed replica had deliveries in flight"
    );

    // Arrivals per customer, in arrival order.
    let mut arrivals: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut events = handle.retainly_events();
    events.sort_by_key(|event| event.seq);
    for event in &events {
        let customer = event.customer_id.as_str().unwrap();
        let customer: u64 = customer.trim_start_matches("c-").parse().unwrap();
        let n = event.data.as_ref().unwrap()["n"].as_f64().unwrap() as u64;
        arrivals.entry(customer).or_default().push(n);
    }
    let mut delivered = HashSet::new();
    for (customer, ns) in &arrivals {
        assert!(
            ns.windows(2).all(|pair| pair[0] < pair[1]),
            "customer {customer}'s events arrived out of order or twice: {ns:?}"
        );
        delivered.extend(ns.iter().map(|n| (*customer, *n)));
    }
    assert_eq!(events.len(), delivered.len(), "no event arrived twice");
    assert!(
        delivered.is_disjoint(&in_doubt),
        "an in-doubt event also arrived"
    );
    let every: HashSet<(u64, u64)> = acknowledged.values().copied().collect();
    let accounted: HashSet<(u64, u64)> = delivered.union(&in_doubt).copied().collect();
    assert_eq!(
        accounted, every,
        "every acknowledged event arrived or is in doubt"
    );
    eprintln!(
        "scale-out replicas: {EVENTS} events acknowledged over 3 replicas in {acknowledging:?}, \
         {delivered_before_kill} arrived before the SIGKILL, {} arrived in all, {} in doubt, \
         {:?} in all, {} sends retried after UNAVAILABLE",
        delivered.len(),
        in_doubt.len(),
        started.elapsed(),
        retried.load(Ordering::Relaxed)
    );
    for replica in replicas {
        assert_eq!(replica.terminate().code(), Some(0));
    }
    emulator.stop().await;
}
