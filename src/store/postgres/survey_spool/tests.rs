//! The survey spool on a real PostgreSQL (skipped without the test cluster). Two stores on one
//! database stand for two replicas.

use std::time::Duration;

use crate::store::LeaseStore;
use crate::store::leases::{Fence, UnderLease};
use crate::store::postgres::PostgresStore;
use crate::store::postgres::testing::fresh_database;
use crate::store::survey_spool::{SpoolAnswer, SpoolEntry, SurveySpoolStore};

const ACCOUNT: &str = "retently:0011223344556677";
const LEASE: &str = "survey-sender:retently:0011223344556677";

async fn two_replicas() -> Option<(PostgresStore, PostgresStore)> {
    let mut settings = fresh_database().await?;
    settings.pool_size = 2;
    settings.poller_lease = Duration::from_secs(1);
    let first = PostgresStore::connect(&settings).await.unwrap();
    let second = PostgresStore::connect(&settings).await.unwrap();
    Some((first, second))
}

fn entry(account: &str, n: u32) -> SpoolEntry {
    SpoolEntry {
        account: account.to_owned(),
        key: r#"{"campaign_id":"c-1","delay_days":null}"#.to_owned(),
        item: format!(r#"{{"email":"r{n}@example.com"}}"#),
        interactive: n.is_multiple_of(2),
        caller: (n == 1).then(|| "billing".to_owned()),
        deadline_ms: (n == 2).then_some(1_900_000_000_000),
    }
}

/// Waits for the next wake-up of `wakeups` (bounded, so a broken test fails).
async fn woken(wakeups: &mut tokio::sync::watch::Receiver<u64>) {
    tokio::time::timeout(Duration::from_secs(30), wakeups.changed())
        .await
        .expect("a wake-up comes")
        .unwrap();
}

fn claimed(outcome: UnderLease<Vec<(i64, SpoolEntry)>>) -> Vec<(i64, SpoolEntry)> {
    match outcome {
        UnderLease::Done(claimed) => claimed,
        UnderLease::LeaseLost => panic!("the lease holder claims"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holder_claims_each_send_once_oldest_first() {
    let Some((sender, other)) = two_replicas().await else {
        return;
    };
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(other.spool(&entry(ACCOUNT, n)).await.unwrap());
    }
    let elsewhere = other
        .spool(&entry("retently:ffeeddccbbaa9988", 9))
        .await
        .unwrap();
    let fence = sender
        .acquire_lease(LEASE, "sender")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.acquire_lease(LEASE, "other").await.unwrap(), None);

    let first = claimed(sender.claim_spooled(&fence, ACCOUNT, 3).await.unwrap());
    assert_eq!(
        first.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        ids[..3]
    );
    // What was spooled comes back as it was written.
    assert_eq!(first[1].1, entry(ACCOUNT, 1));
    assert_eq!(first[2].1, entry(ACCOUNT, 2));
    let rest = claimed(sender.claim_spooled(&fence, ACCOUNT, 3).await.unwrap());
    assert_eq!(rest.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids[3..]);
    assert!(
        claimed(sender.claim_spooled(&fence, ACCOUNT, 3).await.unwrap()).is_empty(),
        "each send is claimed once, and another account's is not"
    );
    // A fence the lease no longer has claims nothing.
    let stale = Fence {
        lease: LEASE.to_owned(),
        epoch: fence.epoch + 1,
    };
    assert_eq!(
        other.claim_spooled(&stale, ACCOUNT, 10).await.unwrap(),
        UnderLease::LeaseLost
    );
    // The other account's send is still there for its own sender.
    assert!(other.withdraw_spooled(elsewhere).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_reach_the_waiter_and_a_lost_sender_s_claims_settle_as_lost() {
    let Some((sender, waiter)) = two_replicas().await else {
        return;
    };
    let mut answered = waiter.answered_wakeups();
    let mut spooled = sender.spooled_wakeups();
    // Each listening connection announces itself once when it starts listening.
    woken(&mut answered).await;
    woken(&mut spooled).await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(waiter.spool(&entry(ACCOUNT, n)).await.unwrap());
    }
    // Spooling wakes the sender.
    woken(&mut spooled).await;
    let fence = sender
        .acquire_lease(LEASE, "sender")
        .await
        .unwrap()
        .unwrap();
    let taken = claimed(sender.claim_spooled(&fence, ACCOUNT, 3).await.unwrap());
    assert_eq!(taken.len(), 3);
    sender
        .answer_spooled(&[(ids[0], "{\"answer\":0}".to_owned())])
        .await
        .unwrap();
    // Answering wakes the waiters.
    woken(&mut answered).await;

    // Only the answered one is settled while its sender holds the lease.
    assert_eq!(
        waiter.collect_spooled(LEASE, &ids).await.unwrap(),
        vec![(ids[0], SpoolAnswer::Answered("{\"answer\":0}".to_owned()))]
    );
    assert!(
        waiter
            .collect_spooled(LEASE, &ids)
            .await
            .unwrap()
            .is_empty(),
        "a collected answer is gone"
    );
    // A claimed send cannot be withdrawn; a pending one can.
    assert!(!waiter.withdraw_spooled(ids[1]).await.unwrap());
    assert!(waiter.withdraw_spooled(ids[3]).await.unwrap());
    assert!(!waiter.withdraw_spooled(ids[3]).await.unwrap());

    // The sender goes away and another replica takes the lease: its unanswered claims are
    // settled as lost, and an answer it records late changes nothing.
    sender.release_lease(&fence).await.unwrap();
    let successor = waiter
        .acquire_lease(LEASE, "waiter")
        .await
        .unwrap()
        .unwrap();
    assert!(successor.epoch > fence.epoch);
    let mut settled = waiter.collect_spooled(LEASE, &ids).await.unwrap();
    settled.sort_by_key(|(id, _)| *id);
    assert_eq!(
        settled,
        vec![
            (ids[1], SpoolAnswer::SenderLost),
            (ids[2], SpoolAnswer::SenderLost)
        ]
    );
    sender
        .answer_spooled(&[(ids[1], "{\"late\":true}".to_owned())])
        .await
        .unwrap();
    assert!(
        waiter
            .collect_spooled(LEASE, &ids)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_removes_old_claimed_sends_only() {
    let Some((sender, _other)) = two_replicas().await else {
        return;
    };
    let claimed_id = sender.spool(&entry(ACCOUNT, 0)).await.unwrap();
    let fence = sender
        .acquire_lease(LEASE, "sender")
        .await
        .unwrap()
        .unwrap();
    claimed(sender.claim_spooled(&fence, ACCOUNT, 1).await.unwrap());
    let pending_id = sender.spool(&entry(ACCOUNT, 1)).await.unwrap();
    let future_ms = chrono::Utc::now().timestamp_millis() + 60_000;
    assert_eq!(sender.prune_spooled(ACCOUNT, 0).await.unwrap(), 0);
    assert_eq!(sender.prune_spooled(ACCOUNT, future_ms).await.unwrap(), 1);
    assert!(sender.withdraw_spooled(pending_id).await.unwrap());
    assert!(!sender.withdraw_spooled(claimed_id).await.unwrap());
}
