//! Tests of what only a shared, networked engine has to get right: replicas starting, appending,
//! claiming and recording at the same time, and the URL staying secret. Interleavings are made
//! by construction: a test holds a lock in its own transaction and waits until PostgreSQL
//! reports the operation under test waiting behind it.

use std::time::Duration;

use super::testing::{admin_client, fresh_database, fresh_store, wait_for_lock_waiters};
use super::*;
use crate::error::{ErrorCode, Reason};
use crate::store::cursors::{Checkpoint, CursorStore};
use crate::store::feedback_log::{
    EntryEncoder, EntryFields, FeedbackLogStore, Observed, Origin, ReadOutcome,
};
use crate::store::idempotency::{IdempotencyRecord, IdempotencyStore};
use crate::store::outbox::{
    AttemptRecord, DeliveryError, DeliveryState, NewDelivery, OutboxStore, QueuedDelivery,
};

fn observed(id: &str, version: u8) -> Observed {
    Observed {
        feedback_id: id.to_owned(),
        create_time_ms: 1_000,
        customer_id: format!("cust-{id}"),
        email: format!("{id}@example.com"),
        fields: EntryFields {
            campaign_id: "camp-1".to_owned(),
            metric: 1,
            score: Some(9.0),
            score_category: 3,
            has_comment: false,
        },
        payload: vec![version],
        digest: [version; 32],
        traceparent: None,
    }
}

/// Encodes the sequence, so a test can check what the engine passed.
const ENCODE: EntryEncoder = |_epoch, sequence, _kind, _time, _payload| {
    prost::bytes::Bytes::from(sequence.to_be_bytes().to_vec())
};

fn delivery(id: &str, customer: &str, replay_safe: bool, method: &str) -> QueuedDelivery {
    QueuedDelivery {
        delivery_id: id.to_owned(),
        delivery: NewDelivery {
            method: method.to_owned(),
            request: vec![1, 2, 3],
            destinations: vec![2],
            item_count: 1,
            ordering_keys: vec![customer.to_owned()],
            idempotency_key: None,
            replay_safe,
            owner: "alpha".to_owned(),
        },
        expire_ms: chrono::Utc::now().timestamp_millis() + 3_600_000,
        traceparent: None,
    }
}

fn error(reason: Reason) -> DeliveryError {
    DeliveryError {
        code: ErrorCode::Unavailable,
        reason,
        message: "test".to_owned(),
        metadata: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    let starts = (0..4).map(|_| {
        let settings = settings.clone();
        tokio::spawn(async move { PostgresStore::connect(&settings).await })
    });
    let mut stores = Vec::new();
    for start in starts {
        stores.push(start.await.unwrap().expect("every replica starts"));
    }
    let client = admin_client(settings.url.expose()).await;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let expected: Vec<i32> = migrations::MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(versions, expected);
    // A later start finds nothing to do.
    assert!(migrations::migrate(&stores[0]).await.unwrap().is_empty());
}

/// The trap of a `bigserial`: a later append committing first. Here the first append is held
/// inside its transaction (the test locks a row it must update); the second must wait for it
/// instead of committing the next sequence first, and a reader sees neither until both commit,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_get_sequences_in_commit_order_across_replicas() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    let replica_a = PostgresStore::connect(&settings).await.unwrap();
    let replica_b = PostgresStore::connect(&settings).await.unwrap();
    replica_a
        .append(
            1_000,
            vec![(Origin::Poll, vec![observed("f-1", 1)])],
            vec![],
            ENCODE,
        )
        .await
        .unwrap();

    // Hold the row of f-1 so that replica A's append of its new version stops half-way: after
    // it took sequence 2, before it commits.
    let mut holder = admin_client(settings.url.expose()).await;
    let hold = holder.transaction().await.unwrap();
    hold.execute(
        "SELECT 1 FROM feedback_items WHERE feedback_id = 'f-1' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let first = tokio::spawn({
        let replica_a = replica_a.clone();
        async move {
            replica_a
                .append(
                    2_000,
                    vec![(Origin::Poll, vec![observed("f-1", 2)])],
                    vec![],
                    ENCODE,
                )
                .await
        }
    });
    wait_for_lock_waiters(&settings, 1).await;
    let second = tokio::spawn({
        let replica_b = replica_b.clone();
        async move {
            replica_b
                .append(
                    2_000,
                    vec![(Origin::Webhook, vec![observed("f-2", 1)])],
                    vec![Checkpoint {
                        name: "webhook".to_owned(),
                        value: "f-2".to_owned(),
                    }],
                    ENCODE,
                )
                .await
        }
    });
    // Replica B waits for replica A's append rather than committing sequence 3 before 2.
    wait_for_lock_waiters(&settings, 2).await;
    assert!(!second.is_finished());
    match replica_b
        .read_after(1, i64::MAX, 100, 1 << 20)
        .await
        .unwrap()
    {
        ReadOutcome::Entries(entries) => assert!(entries.is_empty()),
        ReadOutcome::Expired => panic!("nothing was pruned"),
    }
    assert_eq!(CursorStore::get(&replica_b, "webhook").await.unwrap(), None);

    hold.rollback().await.unwrap();
    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();
    let sequences = |appended: &crate::store::feedback_log::Appended| {
        appended
            .entries
            .iter()
            .map(|entry| entry.sequence)
            .collect::<Vec<_>>()
    };
    assert_eq!(sequences(&first), vec![2]);
    assert_eq!(sequences(&second), vec![3]);
    let ReadOutcome::Entries(entries) = replica_a
        .read_after(0, i64::MAX, 100, 1 << 20)
        .await
        .unwrap()
    else {
        panic!("nothing was pruned");
    };
    let read: Vec<(i64, Vec<u8>)> = entries
        .iter()
        .map(|entry| (entry.sequence, entry.message.to_vec()))
        .collect();
    assert_eq!(
        read,
        (1..=3)
            .map(|sequence: i64| (sequence, sequence.to_be_bytes().to_vec()))
            .collect::<Vec<_>>()
    );
    assert_eq!(replica_a.state().await.unwrap().head_seq, 3);
    assert_eq!(
        CursorStore::get(&replica_a, "webhook")
            .await
            .unwrap()
            .as_deref(),
        Some("f-2")
    );
}

/// A response seen by two replicas at once (the poller on one, a webhook on the other) is
/// logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_seen_by_two_replicas_is_logged_once() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    let replica_a = PostgresStore::connect(&settings).await.unwrap();
    let replica_b = PostgresStore::connect(&settings).await.unwrap();
    let (a, b) = tokio::join!(
        replica_a.append(
            1_000,
            vec![(Origin::Poll, vec![observed("f-9", 1)])],
            vec![],
            ENCODE
        ),
        replica_b.append(
            1_000,
            vec![(Origin::Webhook, vec![observed("f-9", 1)])],
            vec![],
            ENCODE
        ),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.entries.len() + b.entries.len(), 1);
    assert_eq!(a.counts[0].created + b.counts[0].created, 1);
    assert_eq!(a.counts[0].unchanged + b.counts[0].unchanged, 1);
    assert_eq!(replica_a.state().await.unwrap().head_seq, 1);
}

/// A delivery another replica is claiming right now is skipped without waiting, and still
/// holds back the younger delivery of the same customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_skip_rows_another_replica_holds_and_keep_customer_order() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    let replica = PostgresStore::connect(&settings).await.unwrap();
    for (id, customer) in [("d-1", "c-1"), ("d-2", "c-1"), ("d-3", "c-2")] {
        replica
            .enqueue(delivery(id, customer, true, "UpsertCustomers"), None)
            .await
            .unwrap();
    }
    // Another replica in the middle of claiming d-1.
    let mut other = admin_client(settings.url.expose()).await;
    let other_claim = other.transaction().await.unwrap();
    other_claim
        .execute(
            "SELECT 1 FROM outbox WHERE delivery_id = 'd-1' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let claimed = tokio::time::timeout(Duration::from_secs(60), replica.claim(10))
        .await
        .expect("a claim never waits for another replica's rows")
        .unwrap();
    let ids: Vec<&str> = claimed.iter().map(|c| c.delivery_id.as_str()).collect();
    assert_eq!(ids, vec!["d-3"]);
    other_claim.rollback().await.unwrap();
    let claimed = replica.claim(10).await.unwrap();
    let ids: Vec<&str> = claimed.iter().map(|c| c.delivery_id.as_str()).collect();
    assert_eq!(ids, vec!["d-1"]);
    replica
        .record_attempt("d-1", AttemptRecord::Delivered { result: vec![7] })
        .await
        .unwrap();
    let claimed = replica.claim(10).await.unwrap();
    let ids: Vec<&str> = claimed.iter().map(|c| c.delivery_id.as_str()).collect();
    assert_eq!(ids, vec!["d-2"]);
}

/// Two replicas claiming at once take every due delivery exactly once between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_claim_each_delivery_once() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    let replica_a = PostgresStore::connect(&settings).await.unwrap();
    let replica_b = PostgresStore::connect(&settings).await.unwrap();
    for n in 0..200 {
        replica_a
            .enqueue(
                delivery(&format!("d-{n}"), &format!("c-{n}"), true, "TrackEvent"),
                None,
            )
            .await
            .unwrap();
    }
    let drain = |replica: PostgresStore| async move {
        let mut taken = Vec::new();
        loop {
            let claimed = replica.claim(7).await.unwrap();
            if claimed.is_empty() {
                return taken;
            }
            taken.extend(claimed.into_iter().map(|c| c.delivery_id));
        }
    };
    let (a, b) = tokio::join!(
        tokio::spawn(drain(replica_a.clone())),
        tokio::spawn(drain(replica_b.clone()))
    );
    let mut all: Vec<String> = a.unwrap().into_iter().chain(b.unwrap()).collect();
    all.sort();
    let mut expected: Vec<String> = (0..200).map(|n| format!("d-{n}")).collect();
    expected.sort();
    assert_eq!(all, expected);
}

/// A replica that dies leaves its claims; once their lease has run out another replica takes
/// them over with the recovery rules, and a live replica's claims are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_claims_are_taken_over_with_the_recovery_rules() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    // The dying replica's claims lapse at once; the live one's never do during the test.
    let dying = PostgresStore::connect(&PostgresSettings {
        claim_lease: Duration::ZERO,
        ..settings.clone()
    })
    .await
    .unwrap();
    let live = PostgresStore::connect(&PostgresSettings {
        claim_lease: Duration::from_secs(3600),
        ..settings.clone()
    })
    .await
    .unwrap();
    let in_doubt = error(Reason::DeliveryInDoubt);
    let verifiable = vec!["SendSurvey".to_owned()];
    dying.recover(&verifiable, in_doubt.clone()).await.unwrap();
    live.recover(&verifiable, in_doubt.clone()).await.unwrap();
    live.enqueue(delivery("live", "c-4", false, "TrackEvent"), None)
        .await
        .unwrap();
    assert_eq!(live.claim(1).await.unwrap().len(), 1);
    dying
        .enqueue(delivery("safe", "c-1", true, "UpsertCustomers"), None)
        .await
        .unwrap();
    dying
        .enqueue(delivery("event", "c-2", false, "TrackEvent"), None)
        .await
        .unwrap();
    dying
        .enqueue(delivery("survey", "c-3", false, "SendSurvey"), None)
        .await
        .unwrap();
    assert_eq!(dying.claim(10).await.unwrap().len(), 3);
    drop(dying);

    // A replica starting now recovers only what lapsed.
    let starting = PostgresStore::connect(&settings).await.unwrap();
    let recovered = starting
        .recover(&verifiable, in_doubt.clone())
        .await
        .unwrap();
    assert_eq!(recovered.requeued, 2);
    assert_eq!(recovered.in_doubt, 1);
    let state = |id: &'static str| {
        let starting = starting.clone();
        async move {
            OutboxStore::get(&starting, id, None)
                .await
                .unwrap()
                .expect("the delivery exists")
        }
    };
    assert_eq!(state("safe").await.state, DeliveryState::Pending);
    assert_eq!(state("survey").await.state, DeliveryState::Pending);
    let event = state("event").await;
    assert_eq!(event.state, DeliveryState::DeadLettered);
    assert_eq!(event.last_error, Some(in_doubt));
    assert_eq!(state("live").await.state, DeliveryState::InFlight);
    // The survey send is claimed again with its history to check from the lapsed attempt on.
    let claimed = starting.claim(10).await.unwrap();
    let survey = claimed
        .iter()
        .find(|c| c.delivery_id == "survey")
        .expect("the survey send is due again");
    assert!(survey.verify_since_ms.is_some());
    assert_eq!(survey.attempts, 2);
}

/// Two replicas recording the same key at once: one record wins, the other replica gets the
/// winner's response back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_on_one_key_resolve_to_one_winner() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    let replica_a = PostgresStore::connect(&settings).await.unwrap();
    let replica_b = PostgresStore::connect(&settings).await.unwrap();
    let record = |response: u8| IdempotencyRecord {
        owner: "alpha".to_owned(),
        scope: "TrackEvent".to_owned(),
        key: "k-1".to_owned(),
        request_hash: vec![1],
        response: vec![response],
    };
    let since = chrono::Utc::now().timestamp_millis() - 60_000;
    // Replica A is inside its transaction, key written, not yet committed.
    let mut connection = replica_a.connection("test").await.unwrap();
    let a_insert = connection.transaction().await.unwrap();
    a_insert
        .execute(
            "INSERT INTO idempotency (owner, scope, key, request_hash, response, create_ms)
             VALUES ('alpha', 'TrackEvent', 'k-1', '\\x01', '\\x0a', $1)",
            &[&chrono::Utc::now().timestamp_millis()],
        )
        .await
        .unwrap();
    let b = tokio::spawn({
        let replica_b = replica_b.clone();
        async move { replica_b.record_first(record(11), since).await }
    });
    wait_for_lock_waiters(&settings, 1).await;
    a_insert.commit().await.unwrap();
    let outcome = b.await.unwrap().unwrap();
    assert_eq!(
        outcome,
        idempotency::FirstRecord::Existing(crate::store::idempotency::StoredResponse {
            request_hash: vec![1],
            response: vec![10],
        })
    );
    let stored = replica_b
        .lookup("alpha", "TrackEvent", "k-1", since)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.response, vec![10]);
    // A record older than the window is replaced.
    assert_eq!(
        replica_b.record_first(record(12), i64::MAX).await.unwrap(),
        idempotency::FirstRecord::Stored
    );
}

/// The URL's password appears in no error and no debug output, whether the URL is malformed,
/// the password is wrong or the server is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_url_stays_secret() {
    let Some(cluster) = super::testing::cluster_url() else {
        return;
    };
    const PASSWORD: &str = "s3cret-Pa55word";
    let mut wrong = reqwest::Url::parse(&cluster).unwrap();
    wrong.set_password(Some(PASSWORD)).unwrap();
    let mut nobody = wrong.clone();
    // A port nothing listens on: the test cluster's own, on a host address it does not bind.
    nobody.set_host(Some("127.0.0.2")).unwrap();
    let urls = [
        wrong.to_string(),
        nobody.to_string(),
        format!("postgres://cxgw:{PASSWORD}@127.0.0.1:notaport/db"),
        format!("host=127.0.0.1 password={PASSWORD} sslmode=bogus"),
    ];
    for url in urls {
        let settings = PostgresSettings {
            pool_size: 1,
            ..PostgresSettings::new(Secret::new(url))
        };
        assert!(!format!("{settings:?}").contains(PASSWORD));
        let error = PostgresStore::connect(&settings)
            .await
            .expect_err("the connection fails");
        let text = format!("{error} {error:?}");
        assert!(!text.contains(PASSWORD), "{text}");
        assert_eq!(error.kind(), crate::store::StoreErrorKind::Unavailable);
    }
}

/// `sslmode=require` makes the client insist on TLS: against a server without it, the
/// connection is refused rather than made in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_by_the_url_is_never_skipped() {
    let Some(cluster) = super::testing::cluster_url() else {
        return;
    };
    let mut url = reqwest::Url::parse(&cluster).unwrap();
    url.query_pairs_mut().append_pair("sslmode", "require");
    let settings = PostgresSettings::new(Secret::new(url.to_string()));
    let error = PostgresStore::connect(&settings)
        .await
        .expect_err("the server offers no TLS");
    assert_eq!(error.kind(), crate::store::StoreErrorKind::Unavailable);
    // The same URL without the requirement connects.
    let plain = PostgresStore::connect(&PostgresSettings::new(Secret::new(cluster)))
        .await
        .expect("a plain connection");
    plain.ping().await.unwrap();
}

#[tokio::test]
async fn a_fresh_store_is_empty_and_migrated() {
    let Some(store) = fresh_store().await else {
        return;
    };
    let state = store.state().await.unwrap();
    assert_eq!(state.head_seq, 0);
    assert_ne!(state.epoch, 0);
    assert_eq!(store.depth().await.unwrap().unfinished, 0);
}

/// A replica's late outcome of a claim another replica took over is not recorded: the delivery
/// is the other replica's by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_outcome_of_a_lapsed_claim_is_not_recorded() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    let paused = PostgresStore::connect(&PostgresSettings {
        claim_lease: Duration::ZERO,
        ..settings.clone()
    })
    .await
    .unwrap();
    let other = PostgresStore::connect(&settings).await.unwrap();
    let in_doubt = error(Reason::DeliveryInDoubt);
    paused
        .enqueue(delivery("d-1", "c-1", true, "UpsertCustomers"), None)
        .await
        .unwrap();
    assert_eq!(paused.claim(1).await.unwrap().len(), 1);
    // The paused replica's claim lapsed: the other replica takes the delivery over and sends it.
    other.recover(&[], in_doubt).await.unwrap();
    assert_eq!(other.claim(1).await.unwrap()[0].delivery_id, "d-1");
    paused
        .record_attempt("d-1", AttemptRecord::Delivered { result: vec![1] })
        .await
        .unwrap();
    paused
        .return_to_pending("d-1", error(Reason::GatewayDraining))
        .await
        .unwrap();
    let record = OutboxStore::get(&other, "d-1", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.state, DeliveryState::InFlight);
    assert_eq!(record.attempt_count, 2);
    other
        .record_attempt("d-1", AttemptRecord::Delivered { result: vec![2] })
        .await
        .unwrap();
    let record = OutboxStore::get(&other, "d-1", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.state, DeliveryState::Delivered);
    assert_eq!(record.result, Some(vec![2]));
}

/// A live replica renews its claims, so another replica does not take them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_claims_stay_with_their_replica() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    let holder = PostgresStore::connect(&settings).await.unwrap();
    let other = PostgresStore::connect(&settings).await.unwrap();
    holder
        .enqueue(delivery("d-1", "c-1", true, "UpsertCustomers"), None)
        .await
        .unwrap();
    holder
        .enqueue(delivery("d-2", "c-2", true, "UpsertCustomers"), None)
        .await
        .unwrap();
    assert_eq!(holder.claim(1).await.unwrap()[0].delivery_id, "d-1");
    assert_eq!(other.claim(1).await.unwrap()[0].delivery_id, "d-2");
    // Both leases as good as run out; only the holder renews.
    admin_client(settings.url.expose())
        .await
        .execute("UPDATE outbox SET lease_until_ms = 0", &[])
        .await
        .unwrap();
    assert_eq!(holder.renew_leases().await.unwrap(), 1);
    let recovered = other
        .recover(&[], error(Reason::DeliveryInDoubt))
        .await
        .unwrap();
    // Only d-2 lapsed (its replica did not renew it).
    assert_eq!(recovered.requeued, 1);
    let d1 = OutboxStore::get(&other, "d-1", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d1.state, DeliveryState::InFlight);
    let d2 = OutboxStore::get(&other, "d-2", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d2.state, DeliveryState::Pending);
}

/// The poller's lease across replicas: one holder at a time; once it has expired (its holder
/// paused or died) another replica takes it with the next epoch, and from then on the old
/// holder can neither renew it, nor append, nor move the checkpoint back, while the new one
/// can. Expiry is made by construction (the row's expiry moved into the past), not waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_over_fences_out_its_old_holder() {
    use crate::store::leases::{LeaseStore, UnderLease};
    let Some(settings) = fresh_database().await else {
        return;
    };
    let replica_a = PostgresStore::connect(&settings).await.unwrap();
    let replica_b = PostgresStore::connect(&settings).await.unwrap();
    const LEASE: &str = "feedback.retently";
    let old = replica_a
        .acquire_lease(LEASE, "replica-a")
        .await
        .unwrap()
        .expect("the free lease is granted");
    assert_eq!(
        replica_b.acquire_lease(LEASE, "replica-b").await.unwrap(),
        None,
        "a running lease stays with its holder"
    );
    let page = |id: &str, value: &str| {
        (
            vec![(Origin::Poll, vec![observed(id, 1)])],
            vec![Checkpoint {
                name: LEASE.to_owned(),
                value: value.to_owned(),
            }],
        )
    };
    let (batches, checkpoints) = page("f1", "checkpoint-1");
    assert!(matches!(
        replica_a
            .append_fenced(&old, 1_000, batches, checkpoints, ENCODE)
            .await
            .unwrap(),
        UnderLease::Done(_)
    ));

    // Replica A pauses past its lease.
    admin_client(settings.url.expose())
        .await
        .execute(
            "UPDATE leases SET expires_at = clock_timestamp() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let new = replica_b
        .acquire_lease(LEASE, "replica-b")
        .await
        .unwrap()
        .expect("an expired lease is taken over");
    assert_eq!(new.epoch, old.epoch + 1);

    // Replica A wakes up: its renewal fails, and so do its writes.
    assert_eq!(
        replica_a.acquire_lease(LEASE, "replica-a").await.unwrap(),
        None
    );
    let (batches, checkpoints) = page("f-late", "checkpoint-0");
    assert!(matches!(
        replica_a
            .append_fenced(&old, 2_000, batches, checkpoints, ENCODE)
            .await
            .unwrap(),
        UnderLease::LeaseLost
    ));
    assert_eq!(replica_b.state().await.unwrap().head_seq, 1);
    assert_eq!(
        CursorStore::get(&replica_b, LEASE)
            .await
            .unwrap()
            .as_deref(),
        Some("checkpoint-1")
    );
    let (batches, checkpoints) = page("f2", "checkpoint-2");
    assert!(matches!(
        replica_b
            .append_fenced(&new, 3_000, batches, checkpoints, ENCODE)
            .await
            .unwrap(),
        UnderLease::Done(_)
    ));
    assert_eq!(
        CursorStore::get(&replica_a, LEASE)
            .await
            .unwrap()
            .as_deref(),
        Some("checkpoint-2")
    );

    // A release hands the lease over at once; only the current epoch can release it.
    replica_a.release_lease(&old).await.unwrap();
    assert_eq!(
        replica_a.acquire_lease(LEASE, "replica-a").await.unwrap(),
        None
    );
    replica_b.release_lease(&new).await.unwrap();
    let back = replica_a
        .acquire_lease(LEASE, "replica-a")
        .await
        .unwrap()
        .expect("a released lease is free");
    assert_eq!(back.epoch, new.epoch + 1);
}

/// A takeover waits for a write of the old holder that already passed its fence check, so the
/// new holder reads the state only after that write: the old holder's transaction holds the
/// lease's row (here a transaction standing in for it, between its check and its commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waits_for_the_old_holder_s_write_in_progress() {
    use crate::store::leases::LeaseStore;
    let Some(settings) = fresh_database().await else {
        return;
    };
    let replica_a = PostgresStore::connect(&settings).await.unwrap();
    let replica_b = PostgresStore::connect(&settings).await.unwrap();
    let old = replica_a
        .acquire_lease("feedback.retently", "replica-a")
        .await
        .unwrap()
        .unwrap();
    // The holder's lease runs out while it is paused; it wakes up and its write passes the
    // fence check (nobody took over yet).
    admin_client(settings.url.expose())
        .await
        .execute("UPDATE leases SET expires_at = '-infinity'", &[])
        .await
        .unwrap();
    let mut writer = admin_client(settings.url.expose()).await;
    let write = writer.transaction().await.unwrap();
    let epoch: i64 = write
        .query_one(
            "SELECT epoch FROM leases WHERE name = 'feedback.retently' FOR SHARE",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(epoch, old.epoch);
    let takeover = tokio::spawn(async move {
        replica_b
            .acquire_lease("feedback.retently", "replica-b")
            .await
            .unwrap()
    });
    wait_for_lock_waiters(&settings, 1).await;
    assert!(!takeover.is_finished());
    write.commit().await.unwrap();
    let new = takeover.await.unwrap().expect("taken over after the write");
    assert_eq!(new.epoch, old.epoch + 1);
}

/// An append on one replica wakes the log tail of another: the `NOTIFY` sent by the appending
/// transaction reaches the other replica's listening connection once it commits, and an
/// append that adds nothing sends none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_wake_the_other_replicas_tails() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    let replica_a = PostgresStore::connect(&settings).await.unwrap();
    let replica_b = PostgresStore::connect(&settings).await.unwrap();
    let mut wakeups = replica_b.append_wakeups().expect("replicas share the log");
    // The first wake-up says the connection listens (appends before it were not announced).
    tokio::time::timeout(Duration::from_secs(30), wakeups.changed())
        .await
        .expect("listening in time")
        .unwrap();
    let listening = *wakeups.borrow_and_update();
    replica_a
        .append(
            1_000,
            vec![(Origin::Poll, vec![observed("f1", 1)])],
            Vec::new(),
            ENCODE,
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), wakeups.changed())
        .await
        .expect("woken by the append")
        .unwrap();
    assert_eq!(*wakeups.borrow_and_update(), listening + 1);
    // The same response again appends nothing; a later real append is the next wake-up.
    replica_a
        .append(
            2_000,
            vec![(Origin::Poll, vec![observed("f1", 1)])],
            Vec::new(),
            ENCODE,
        )
        .await
        .unwrap();
    replica_a
        .append(
            3_000,
            vec![(Origin::Poll, vec![observed("f2", 1)])],
            Vec::new(),
            ENCODE,
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), wakeups.changed())
        .await
        .expect("woken by the second append")
        .unwrap();
    assert_eq!(*wakeups.borrow_and_update(), listening + 2);
}

/// A claim whose commit happened with the answer cut off (the connection broke during the
/// commit) left deliveries in flight under this replica's mark that its worker never got: the
/// next claim puts them back and hands them out, uncounted and never as in doubt (nothing was
/// sent), instead of this replica renewing their lease forever.
#[tokio::test]
async fn deliveries_of_a_claim_whose_answer_was_lost_are_claimed_again() {
    let Some(store) = fresh_store().await else {
        return;
    };
    store
        .recover(&[], error(Reason::DeliveryInDoubt))
        .await
        .unwrap();
    for (id, customer) in [("d-1", "c-1"), ("d-2", "c-2")] {
        store
            .enqueue(delivery(id, customer, false, "TrackEvent"), None)
            .await
            .unwrap();
    }
    assert_eq!(store.claim(10).await.unwrap().len(), 2);
    store.lose_claims_for_test().await;
    // Lease renewals keep them (they are marked as this replica's) ...
    assert_eq!(store.renew_leases().await.unwrap(), 2);
    // ... and the next claim puts them back first.
    let again = store.claim(10).await.unwrap();
    let mut ids: Vec<_> = again.iter().map(|d| d.delivery_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["d-1", "d-2"]);
    assert!(
        again.iter().all(|d| d.attempts == 1),
        "the cut-off claim is no attempt: {again:?}"
    );
    // Held now: not released again, not claimed twice.
    assert!(store.claim(10).await.unwrap().is_empty());
    let d1 = OutboxStore::get(&store, "d-1", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d1.state, DeliveryState::InFlight);
    assert_eq!(d1.attempt_count, 1);
}

/// The store contract every engine keeps, on a fresh PostgreSQL database.
mod contract {
    async fn fresh() -> Option<((), crate::store::Store)> {
        let store = super::fresh_store().await?;
        Some(((), crate::store::Store::from_engine(store, "postgres")))
    }

    crate::store_contract_tests!(fresh);
}

fn alert(feedback_id: &str, delivery_id: &str) -> crate::store::alerts::PendingAlert {
    crate::store::alerts::PendingAlert {
        rule: "detractors".to_owned(),
        feedback_id: feedback_id.to_owned(),
        version: "v1".to_owned(),
        rate_limit: Some(crate::store::alerts::RateLimit {
            count: 1,
            per: Duration::from_secs(3600),
        }),
        delivery: delivery(delivery_id, "", true, "cx-gateway/Alert"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_queueing_alerts_at_once_keep_keys_and_rate_limits_exact() {
    use crate::store::alerts::{AlertOutcome, AlertStore};
    let Some(settings) = fresh_database().await else {
        return;
    };
    let replica_a = PostgresStore::connect(&settings).await.unwrap();
    let replica_b = PostgresStore::connect(&settings).await.unwrap();
    replica_a.checkpoint_or_start_at(0).await.unwrap();

    // Hold the checkpoint so that both replicas' batches are under way at once.
    let mut holder = admin_client(settings.url.expose()).await;
    let hold = holder.transaction().await.unwrap();
    hold.execute("SELECT 1 FROM alert_checkpoint FOR UPDATE", &[])
        .await
        .unwrap();
    let queue = |replica: &PostgresStore, alerts, checkpoint| {
        let replica = replica.clone();
        tokio::spawn(async move { replica.queue_alerts(alerts, checkpoint).await })
    };
    // The same response on both, and a second response the rule's limit of one leaves out.
    let first = queue(&replica_a, vec![alert("f-1", "alert-a1")], 5);
    let second = queue(
        &replica_b,
        vec![alert("f-1", "alert-b1"), alert("f-2", "alert-b2")],
        4,
    );
    wait_for_lock_waiters(&settings, 2).await;
    hold.commit().await.unwrap();
    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();

    let queued = match (first.as_slice(), second.as_slice()) {
        // A first: B's copy of f-1 is known, and f-2 is over the limit.
        ([AlertOutcome::Queued(id)], [AlertOutcome::Duplicate, AlertOutcome::RateLimited]) => {
            id.clone()
        }
        // B first: A's copy of f-1 is known.
        ([AlertOutcome::Duplicate], [AlertOutcome::Queued(id), AlertOutcome::RateLimited]) => {
            id.clone()
        }
        other => panic!("unexpected outcomes {other:?}"),
    };
    // Exactly one alert reached the outbox, and the checkpoint kept the later position.
    assert_eq!(OutboxStore::depth(&replica_b).await.unwrap().unfinished, 1);
    let claimed = replica_b.claim(10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].delivery_id, queued);
    assert_eq!(replica_a.checkpoint().await.unwrap(), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reserving_overlapping_recipients_grant_each_once_without_deadlock() {
    use crate::store::fatigue::{Claim, FatigueStore, Reservation, ReserveRequest};
    let Some(settings) = fresh_database().await else {
        return;
    };
    let replica_a = PostgresStore::connect(&settings).await.unwrap();
    let replica_b = PostgresStore::connect(&settings).await.unwrap();
    let request = |email: &str| ReserveRequest {
        email: email.to_owned(),
        claims: vec![Claim {
            scope: String::new(),
            not_since_ms: 0,
        }],
    };

    // Hold both recipients' entries, so that the two sends, which name them in opposite
    // orders, are both under way before either takes one: taken in the order named, each
    // would take one entry and wait for the other's.
    let mut holder = admin_client(settings.url.expose()).await;
    let hold = holder.transaction().await.unwrap();
    for email in ["ann@x.io", "bo@x.io"] {
        hold.execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[
                &super::fatigue::LOCK_CLASS,
                &super::fatigue::lock_key("", email),
            ],
        )
        .await
        .unwrap();
    }
    let reserve = |replica: &PostgresStore, token: &'static str, emails: [&str; 2]| {
        let replica = replica.clone();
        let requests = emails.map(request).to_vec();
        tokio::spawn(async move { replica.reserve(token, 1_000, requests).await })
    };
    let first = reserve(&replica_a, "send-a", ["ann@x.io", "bo@x.io"]);
    let second = reserve(&replica_b, "send-b", ["bo@x.io", "ann@x.io"]);
    wait_for_lock_waiters(&settings, 2).await;
    hold.commit().await.unwrap();
    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();

    // Whichever ran first took both; the other was held back from both by it.
    let blocked = Reservation::Blocked {
        scope: String::new(),
        surveyed_ms: 1_000,
    };
    let granted = [Reservation::Granted, Reservation::Granted];
    assert!(
        (first == granted && second == [blocked.clone(), blocked.clone()])
            || (second == granted && first == [blocked.clone(), blocked]),
        "unexpected answers {first:?} {second:?}"
    );
    assert_eq!(
        replica_b.last_surveyed("", "ann@x.io").await.unwrap(),
        Some(1_000)
    );
}
