//! The shared budget's grant statement on a real PostgreSQL (skipped without the test cluster).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::budget::{BudgetStore, GrantId};
use crate::store::postgres::PostgresStore;
use crate::store::postgres::testing::fresh_database;

/// Largest number of grants (microsecond times) inside any half-open interval of `window`.
fn max_in_any_window(grants: &mut [i64], window: Duration) -> usize {
    grants.sort_unstable();
    let window = i64::try_from(window.as_micros()).unwrap();
    let mut best = 0;
    for (i, &start) in grants.iter().enumerate() {
        let count = grants[i..]
            .iter()
            .take_while(|&&t| t < start + window)
            .count();
        best = best.max(count);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_grants_from_several_pools_never_exceed_the_window() {
    let Some(mut settings) = fresh_database().await else {
        return;
    };
    // Three pools stand for three replicas: they share nothing but the database. Two
    // connections each, so a busy machine is not asked for two dozen log-ins at once.
    settings.pool_size = 2;
    let mut pools = Vec::new();
    for _ in 0..3 {
        pools.push(PostgresStore::connect(&settings).await.unwrap());
    }
    const LIMIT: u32 = 5;
    const WANTED: usize = 16;
    let window = Duration::from_millis(400);
    let grants = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (index, pool) in pools.iter().enumerate() {
        for _ in 0..6 {
            let pool = pool.clone();
            let grants = Arc::clone(&grants);
            tasks.push(tokio::spawn(async move {
                let mut refused = 0u32;
                while grants.lock().unwrap().len() < WANTED {
                    let answer = pool.acquire("retently:test", LIMIT, window).await.unwrap();
                    match answer.grant {
                        Some(GrantId(at)) => {
                            grants.lock().unwrap().push(at);
                            assert!(answer.ages.len() <= LIMIT as usize, "{answer:?}");
                        }
                        None => {
                            refused += 1;
                            assert!(answer.retry_in > Duration::ZERO, "{answer:?}");
                            assert!(answer.retry_in <= window, "{answer:?}");
                            // Waiting as long as the answer says is the lane's protocol too.
                            tokio::time::sleep(answer.retry_in).await;
                        }
                    }
                }
                (index, refused)
            }));
        }
    }
    let mut refusals = 0;
    for task in tasks {
        refusals += task.await.unwrap().1;
    }
    let mut grants = grants.lock().unwrap().clone();
    assert!(grants.len() >= WANTED, "{}", grants.len());
    assert!(refusals > 0, "the 18 callers contended for the budget");
    assert_eq!(
        max_in_any_window(&mut grants, window),
        LIMIT as usize,
        "never more than the limit in one window, and the limit was reached: {grants:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_and_retry_after_pauses_are_shared() {
    let Some(settings) = fresh_database().await else {
        return;
    };
    let first = PostgresStore::connect(&settings).await.unwrap();
    let second = PostgresStore::connect(&settings).await.unwrap();
    let window = Duration::from_secs(60);

    let one = first.acquire("retently:a", 2, window).await.unwrap();
    let two = second.acquire("retently:a", 2, window).await.unwrap();
    assert!(one.grant.is_some() && two.grant.is_some());
    assert_eq!(two.ages.len(), 2);
    assert!(two.ages[0] >= two.ages[1], "oldest first: {two:?}");
    let full = first.acquire("retently:a", 2, window).await.unwrap();
    assert_eq!(full.grant, None);
    // The oldest grant leaves the window about a minute from now.
    assert!(full.retry_in > Duration::from_secs(59), "{full:?}");
    assert!(full.retry_in <= window, "{full:?}");
    // Another account has a budget of its own.
    assert!(
        first
            .acquire("retainly:a", 2, window)
            .await
            .unwrap()
            .grant
            .is_some()
    );

    // A slot given back on one replica is free for the other.
    second
        .refund("retently:a", two.grant.unwrap())
        .await
        .unwrap();
    let again = first.acquire("retently:a", 2, window).await.unwrap();
    assert!(again.grant.is_some(), "{again:?}");

    // A Retry-After seen by one replica stops the other, even with slots free.
    first
        .block_for("retainly:a", Duration::from_secs(30))
        .await
        .unwrap();
    let blocked = second.acquire("retainly:a", 2, window).await.unwrap();
    assert_eq!(blocked.grant, None);
    assert!(blocked.retry_in > Duration::from_secs(29), "{blocked:?}");
    assert!(
        blocked
            .blocked_for
            .is_some_and(|b| b > Duration::from_secs(29))
    );
    // A shorter pause does not cut a longer one short.
    second
        .block_for("retainly:a", Duration::from_secs(1))
        .await
        .unwrap();
    let still = first.acquire("retainly:a", 2, window).await.unwrap();
    assert!(still.retry_in > Duration::from_secs(28), "{still:?}");
    // A pause of an account never seen before creates its row.
    first
        .block_for("retently:new", Duration::from_millis(200))
        .await
        .unwrap();
    let paused = second.acquire("retently:new", 2, window).await.unwrap();
    assert_eq!(paused.grant, None);
    tokio::time::sleep(paused.retry_in).await;
    let resumed = second.acquire("retently:new", 2, window).await.unwrap();
    assert!(resumed.grant.is_some(), "{resumed:?}");
    assert_eq!(resumed.blocked_for, None);
}
