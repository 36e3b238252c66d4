//! Lanes on one shared budget (an in-memory store with the database's semantics), with a
//! paused clock: several replicas' lanes together stay inside the window, a `Retry-After` seen
//! by one stops the others, and an unreachable store sends nothing.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::shared::SharedBudget;
use super::shared::memory::MemoryBudget;
use super::tests::max_in_any_window;
use super::*;
use crate::error::{ErrorCode, Reason};

fn shared_settings(limit: u32, store: &Arc<MemoryBudget>) -> SchedulerSettings {
    let store: Arc<dyn crate::store::BudgetStore> = store.clone();
    SchedulerSettings {
        jitter_margin: Duration::ZERO,
        max_queue_wait: Duration::from_secs(600),
        ..SchedulerSettings::new(limit)
    }
    .with_shared_budget(Some(SharedBudget::new(store, "retently", "key-1")))
}

async fn send(lane: &Lane, sent: &Arc<Mutex<Vec<Instant>>>, within: Duration) -> Result<()> {
    let ctx = CallContext::interactive_within(within);
    lane.call(&ctx, Idempotency::Idempotent, |_| {
        let sent = Arc::clone(sent);
        async move {
            sent.lock().unwrap().push(Instant::now());
            Ok::<_, AttemptError>(())
        }
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn three_replicas_share_one_window() {
    let store = Arc::new(MemoryBudget::new());
    let lanes: Vec<Lane> = (0..3)
        .map(|_| Lane::new("retently", shared_settings(5, &store)))
        .collect();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for n in 0..30 {
        let lane = lanes[n % 3].clone();
        let sent = Arc::clone(&sent);
        tasks.push(tokio::spawn(async move {
            send(&lane, &sent, Duration::from_secs(500)).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 30);
    // Alone, each lane would allow 5 a minute: 15 in the first minute between the three.
    assert_eq!(max_in_any_window(&sent, Duration::from_secs(60)), 5);
    let granted: u64 = lanes.iter().map(|lane| lane.counters().granted).sum();
    assert_eq!(granted, 30);
    // One grant costs one operation of the store, plus one refused ask per lane and window.
    let operations = store.operations.load(Ordering::SeqCst);
    assert!(operations >= 30, "{operations}");
    assert!(operations <= 30 + 3 * 6, "{operations}");
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_seen_by_one_replica_pauses_the_others() {
    let store = Arc::new(MemoryBudget::new());
    let first = Lane::new("retently", shared_settings(100, &store));
    let second = Lane::new("retently", shared_settings(100, &store));
    let ctx = CallContext::interactive_within(Duration::from_secs(60));
    let start = Instant::now();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let refused_once = {
        let attempts = Arc::clone(&attempts);
        first.call(&ctx, Idempotency::UnsafeToRepeat, move |_| {
            let attempts = Arc::clone(&attempts);
            async move {
                let mut attempts = attempts.lock().unwrap();
                attempts.push(Instant::now());
                if attempts.len() == 1 {
                    return Err(AttemptError {
                        error: Error::new(
                            ErrorCode::ResourceExhausted,
                            Reason::UpstreamRateLimited,
                            "retently answered 429",
                        ),
                        class: FailureClass::Refused,
                        retry_after: Some(Duration::from_secs(7)),
                    });
                }
                Ok(())
            }
        })
    };
    // The first lane's call is refused and waits out the pause before its retry; meanwhile the
    // second lane's call must wait as well, although its own lane never saw a 429.
    let sent = Arc::new(Mutex::new(Vec::new()));
    let (first_result, second_result) = tokio::join!(refused_once, async {
        // Let the first call get its 429 and share it before this one asks.
        while attempts.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        send(&second, &sent, Duration::from_secs(60)).await
    });
    first_result.unwrap();
    second_result.unwrap();
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0] >= start + Duration::from_secs(7),
        "the other replica waited for the retry-after: {:?}",
        sent[0] - start
    );
    let attempts = attempts.lock().unwrap().clone();
    assert!(attempts[1] >= start + Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_budget_sends_nothing_and_says_when_to_retry() {
    let store = Arc::new(MemoryBudget::new());
    store.down.store(true, Ordering::SeqCst);
    let lane = Lane::new("retently", shared_settings(5, &store));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let error = send(&lane, &sent, Duration::from_secs(30))
        .await
        .expect_err("no slot without the shared budget");
    assert_eq!(error.code(), ErrorCode::Unavailable);
    assert_eq!(error.reason(), Reason::StoreUnavailable);
    assert!(error.retry_after().is_some());
    assert!(sent.lock().unwrap().is_empty(), "nothing went upstream");
    // Back again: calls go through.
    store.down.store(false, Ordering::SeqCst);
    send(&lane, &sent, Duration::from_secs(30)).await.unwrap();
    assert_eq!(sent.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_unused_shared_slot_is_given_back() {
    let store = Arc::new(MemoryBudget::new());
    let lane = Lane::new("retently", shared_settings(1, &store));
    let ctx = CallContext::interactive_within(Duration::from_secs(30));
    let permit = lane.admit(&ctx).await.unwrap();
    lane.refund(permit);
    // The refund runs on its own task; the next call finds the slot free without a window.
    let sent = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    send(&lane, &sent, Duration::from_secs(30)).await.unwrap();
    assert_eq!(sent.lock().unwrap()[0] - start, Duration::ZERO);
}
