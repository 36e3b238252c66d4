//! Lane tests with a paused clock: budget, queueing and shedding, priorities, retries, breaker.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::error::{ErrorCode, Reason};

fn settings(limit: u32) -> SchedulerSettings {
    SchedulerSettings {
        jitter_margin: Duration::ZERO,
        backoff: BackoffPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            max_attempts: 4,
        },
        ..SchedulerSettings::new(limit)
    }
}

/// A lane of `limit` requests a window whose callers may queue up to `max_queue_wait`.
fn queued_lane(upstream: &'static str, limit: u32, max_queue_wait: Duration) -> Lane {
    Lane::new(
        upstream,
        SchedulerSettings {
            max_queue_wait,
            ..settings(limit)
        },
    )
}

/// One idempotent call on `lane` whose attempt succeeds.
async fn call_ok(lane: &Lane, ctx: &CallContext) -> Result<()> {
    lane.call(ctx, Idempotency::Idempotent, |_| async {
        Ok::<_, AttemptError>(())
    })
    .await
}

fn transient() -> AttemptError {
    AttemptError {
        error: Error::new(
            ErrorCode::Unavailable,
            Reason::UpstreamUnavailable,
            "retently failed",
        ),
        class: FailureClass::PossiblyApplied,
        retry_after: None,
    }
}

/// Largest number of grants inside any half-open interval of length `window` (the grants in
/// any order).
pub(super) fn max_in_any_window(grants: &[Instant], window: Duration) -> usize {
    let mut sorted = grants.to_vec();
    sorted.sort();
    (0..sorted.len())
        .map(|i| {
            sorted[i..]
                .iter()
                .take_while(|&&t| t < sorted[i] + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// One idempotent call on `lane` whose attempt, once granted, appends `mark()` to `log`.
pub(super) async fn call_logging<T>(
    lane: &Lane,
    ctx: &CallContext,
    log: &Arc<Mutex<Vec<T>>>,
    mark: impl Fn() -> T,
) -> Result<()> {
    let mark = &mark;
    lane.call(ctx, Idempotency::Idempotent, |_| async move {
        log.lock().unwrap().push(mark());
        Ok::<_, AttemptError>(())
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn queued_calls_never_exceed_the_budget_in_any_window() {
    let lane = queued_lane("retently", 5, Duration::from_secs(300));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let lane = lane.clone();
        let sent = Arc::clone(&sent);
        tasks.push(tokio::spawn(async move {
            let ctx = CallContext::interactive_within(Duration::from_secs(200));
            call_logging(&lane, &ctx, &sent, Instant::now).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 20);
    assert!(max_in_any_window(&sent, Duration::from_secs(60)) <= 5);
    assert_eq!(lane.counters().granted, 20);
}

#[tokio::test(start_paused = true)]
async fn sheds_at_once_when_the_wait_exceeds_the_deadline_and_queues_otherwise() {
    let lane = Lane::new("retently", settings(3));
    for _ in 0..3 {
        call_ok(&lane, &CallContext::interactive(None))
            .await
            .unwrap();
    }
    let start = Instant::now();
    let short = CallContext::interactive_within(Duration::from_secs(10));
    let error = call_ok(&lane, &short)
        .await
        .expect_err("no room within 10 s");
    assert_eq!(Instant::now(), start, "shed without waiting");
    assert_eq!(error.code(), ErrorCode::ResourceExhausted);
    assert_eq!(error.reason(), Reason::UpstreamBudgetExhausted);
    assert_eq!(error.retry_after(), Some(Duration::from_secs(60)));
    assert_eq!(error.metadata()["upstream"], "retently");

    let long = CallContext::interactive_within(Duration::from_secs(70));
    call_ok(&lane, &long)
        .await
        .expect("queued until a slot freed");
    assert_eq!(Instant::now() - start, Duration::from_secs(60));
    assert_eq!(lane.counters().shed, 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_sheds() {
    let lane = Lane::new(
        "retently",
        SchedulerSettings {
            max_queue: 2,
            max_queue_wait: Duration::from_secs(300),
            ..settings(1)
        },
    );
    call_ok(&lane, &CallContext::interactive(None))
        .await
        .unwrap();
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let lane = lane.clone();
            tokio::spawn(async move { call_ok(&lane, &CallContext::interactive(None)).await })
        })
        .collect();
    tokio::task::yield_now().await;
    let error = call_ok(&lane, &CallContext::interactive(None))
        .await
        .expect_err("queue is full");
    assert_eq!(error.reason(), Reason::UpstreamBudgetExhausted);
    for task in waiting {
        task.await.unwrap().expect("queued calls still run");
    }
}

#[tokio::test(start_paused = true)]
async fn interactive_goes_first_and_background_does_not_starve() {
    let lane = Lane::new(
        "retently",
        SchedulerSettings {
            window: Duration::from_secs(1),
            ..settings(1)
        },
    );
    // Use the only slot so everyone below queues.
    call_ok(&lane, &CallContext::interactive(None))
        .await
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (priority, count) in [(Priority::Background, 3), (Priority::Interactive, 12)] {
        for _ in 0..count {
            let lane = lane.clone();
            let order = Arc::clone(&order);
            let ctx = CallContext {
                priority,
                deadline: None,
                caller: None,
            };
            tasks.push(tokio::spawn(async move {
                call_logging(&lane, &ctx, &order, || priority).await
            }));
        }
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let order = order.lock().unwrap().clone();
    let first_background = order
        .iter()
        .position(|p| *p == Priority::Background)
        .unwrap();
    // The first grant after the queue formed goes to interactive work...
    assert_eq!(order[0], Priority::Interactive);
    // ...but background gets one slot in every five while both wait.
    assert_eq!(first_background, 4, "{order:?}");
    let backgrounds: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, p)| **p == Priority::Background)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(backgrounds, vec![4, 9, 14], "{order:?}");
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_only_when_safe() {
    let lane = Lane::new("retently", settings(100));
    let attempts = AtomicU32::new(0);
    let ctx = CallContext::interactive(None);
    let flaky = |_| {
        let n = attempts.fetch_add(1, Ordering::SeqCst);
        async move { if n == 0 { Err(transient()) } else { Ok(n) } }
    };
    assert_eq!(
        lane.call(&ctx, Idempotency::Idempotent, flaky)
            .await
            .unwrap(),
        1
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 2);

    attempts.store(0, Ordering::SeqCst);
    let error = lane
        .call(&ctx, Idempotency::UnsafeToRepeat, flaky)
        .await
        .expect_err("a 5xx on a survey send is not repeated");
    assert_eq!(error.code(), ErrorCode::Unavailable);
    assert_eq!(attempts.load(Ordering::SeqCst), 1);

    attempts.store(0, Ordering::SeqCst);
    let never_sent = |_| {
        let n = attempts.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(AttemptError {
                    class: FailureClass::NotSent,
                    ..transient()
                })
            } else {
                Ok(n)
            }
        }
    };
    assert_eq!(
        lane.call(&ctx, Idempotency::UnsafeToRepeat, never_sent)
            .await
            .unwrap(),
        1,
        "a connect error is safe to repeat even for a survey send"
    );
}

#[tokio::test(start_paused = true)]
async fn permanent_failures_are_not_retried_and_attempts_are_capped() {
    let ctx = CallContext::interactive(None);
    let lane = Lane::new("retently", settings(100));
    let attempts = AtomicU32::new(0);
    let bad = |_| {
        attempts.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(AttemptError::permanent(Error::internal("bad"))) }
    };
    lane.call(&ctx, Idempotency::Idempotent, bad)
        .await
        .unwrap_err();
    assert_eq!(attempts.load(Ordering::SeqCst), 1);

    attempts.store(0, Ordering::SeqCst);
    let down = |_| {
        attempts.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(transient()) }
    };
    lane.call(&ctx, Idempotency::Idempotent, down)
        .await
        .unwrap_err();
    assert_eq!(attempts.load(Ordering::SeqCst), 4, "max_attempts");
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_pauses_the_whole_lane() {
    let lane = Lane::new("retently", settings(100));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let ctx = CallContext::interactive_within(Duration::from_secs(30));
    let limited = |_| {
        let attempts = Arc::clone(&attempts);
        async move {
            let mut attempts = attempts.lock().unwrap();
            attempts.push(Instant::now());
            if attempts.len() == 1 {
                Err(AttemptError {
                    error: Error::new(
                        ErrorCode::ResourceExhausted,
                        Reason::UpstreamRateLimited,
                        "429",
                    ),
                    class: FailureClass::Refused,
                    retry_after: Some(Duration::from_secs(7)),
                })
            } else {
                Ok(())
            }
        }
    };
    lane.call(&ctx, Idempotency::UnsafeToRepeat, limited)
        .await
        .expect("retried after the upstream's delay");
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2);
    assert!(attempts[1] - start >= Duration::from_secs(7));
    assert!(attempts[1] - start <= Duration::from_secs(8));
    assert_eq!(lane.counters().upstream_rate_limited, 1);

    // While blocked, other callers wait too instead of provoking another 429.
    let blocked = Lane::new("retently", settings(100));
    blocked
        .lock()
        .budget
        .block_until(Instant::now() + Duration::from_secs(5));
    let before = Instant::now();
    call_ok(&blocked, &ctx).await.unwrap();
    assert_eq!(Instant::now() - before, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_deadline_returns_the_error_at_once() {
    let lane = Lane::new("retently", settings(100));
    let ctx = CallContext::interactive_within(Duration::from_secs(2));
    let start = Instant::now();
    let error = lane
        .call(&ctx, Idempotency::Idempotent, |_| async {
            Err::<(), _>(AttemptError {
                error: Error::new(
                    ErrorCode::ResourceExhausted,
                    Reason::UpstreamRateLimited,
                    "429",
                )
                .with_retry_after(Duration::from_secs(30)),
                class: FailureClass::Refused,
                retry_after: Some(Duration::from_secs(30)),
            })
        })
        .await
        .expect_err("cannot wait 30 s");
    assert_eq!(Instant::now(), start);
    assert_eq!(error.retry_after(), Some(Duration::from_secs(30)));
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_caps_retries() {
    let lane = Lane::new(
        "retently",
        SchedulerSettings {
            retry_budget: RetryBudgetConfig {
                ratio: 0.1,
                floor: 1,
                window: Duration::from_secs(60),
            },
            breaker: BreakerConfig {
                threshold: 1000,
                ..BreakerConfig::default()
            },
            ..settings(1000)
        },
    );
    let attempts = AtomicU32::new(0);
    let ctx = CallContext::interactive(None);
    for _ in 0..20 {
        let _ = lane
            .call(&ctx, Idempotency::Idempotent, |_| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(transient()) }
            })
            .await;
    }
    // 20 calls; the budget allows 1 + 10 % of 20 = 3 retries in the window.
    assert_eq!(attempts.load(Ordering::SeqCst), 23);
    assert_eq!(lane.counters().retries, 3);
}

#[tokio::test(start_paused = true)]
async fn the_breaker_fails_fast_then_probes() {
    let mut settings = settings(1000);
    settings.breaker = BreakerConfig {
        threshold: 2,
        open_for: Duration::from_secs(5),
        max_open_for: Duration::from_secs(60),
    };
    // No retries: each call is one attempt, so the failures counted are the calls made.
    settings.backoff = BackoffPolicy {
        max_attempts: 1,
        ..BackoffPolicy::default()
    };
    let lane = Lane::new("retainly", settings);
    let attempts = AtomicU32::new(0);
    let ctx = CallContext::interactive(None);
    let down = |_| {
        attempts.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(transient()) }
    };
    for _ in 0..2 {
        lane.call(&ctx, Idempotency::Idempotent, down)
            .await
            .unwrap_err();
    }
    let error = lane
        .call(&ctx, Idempotency::Idempotent, down)
        .await
        .expect_err("open");
    assert_eq!(error.code(), ErrorCode::Unavailable);
    assert_eq!(error.reason(), Reason::UpstreamCircuitOpen);
    assert_eq!(error.retry_after(), Some(Duration::from_secs(5)));
    assert_eq!(attempts.load(Ordering::SeqCst), 2, "no attempt while open");
    let granted = lane.counters().granted;

    tokio::time::advance(Duration::from_secs(5)).await;
    call_ok(&lane, &ctx).await.expect("the probe goes through");
    assert_eq!(
        lane.counters().granted,
        granted + 1,
        "the probe took a slot"
    );
    call_ok(&lane, &ctx).await.expect("closed again");
}

#[tokio::test(start_paused = true)]
async fn a_caller_leaving_the_queue_gives_its_place_back() {
    let lane = Lane::new("retently", settings(1));
    call_ok(&lane, &CallContext::interactive(None))
        .await
        .unwrap();
    // Queued with a 61 s deadline, then dropped by its caller before a slot frees.
    let leaver = {
        let lane = lane.clone();
        tokio::spawn(async move {
            call_ok(
                &lane,
                &CallContext::interactive_within(Duration::from_secs(61)),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    leaver.abort();
    let _ = leaver.await;
    let start = Instant::now();
    call_ok(
        &lane,
        &CallContext::interactive_within(Duration::from_secs(120)),
    )
    .await
    .expect("gets the slot the leaver would have had");
    assert_eq!(lane.counters().granted, 2);
    assert_eq!(Instant::now() - start, Duration::from_secs(59));
}

#[tokio::test(start_paused = true)]
async fn a_drain_refuses_background_work_that_was_not_sent_and_lets_interactive_work_go() {
    let lane = queued_lane("retainly", 1, Duration::from_secs(300));
    call_ok(&lane, &CallContext::background()).await.unwrap();
    // The budget is spent: the next background call waits in the queue.
    let waiting = tokio::spawn({
        let lane = lane.clone();
        async move { call_ok(&lane, &CallContext::background()).await }
    });
    while lane.lock().background.len() == 0 {
        tokio::task::yield_now().await;
    }
    let start = Instant::now();
    lane.close_background();
    let error = waiting.await.unwrap().expect_err("refused by the drain");
    assert_eq!(Instant::now(), start, "refused at once, not after its wait");
    assert_eq!(error.reason(), Reason::GatewayDraining);
    assert_eq!(error.failure_class(), Some(FailureClass::NotSent));
    let later = call_ok(&lane, &CallContext::background())
        .await
        .expect_err("new background work is refused too");
    assert_eq!(later.reason(), Reason::GatewayDraining);
    call_ok(
        &lane,
        &CallContext::interactive_within(Duration::from_secs(120)),
    )
    .await
    .expect("interactive calls still go");
}

#[tokio::test(start_paused = true)]
async fn the_failure_class_travels_with_the_error() {
    let lane = Lane::new("retently", settings(100));
    let error = lane
        .call(
            &CallContext::background(),
            Idempotency::UnsafeToRepeat,
            |_| async { Err::<(), _>(transient()) },
        )
        .await
        .expect_err("a possibly applied failure is not repeated");
    assert_eq!(error.failure_class(), Some(FailureClass::PossiblyApplied));
    // A 503 is repeated even for an operation that must not run twice: nothing was applied.
    let attempts = Arc::new(AtomicU32::new(0));
    let error = lane
        .call(&CallContext::background(), Idempotency::UnsafeToRepeat, {
            let attempts = Arc::clone(&attempts);
            move |_| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async {
                    Err::<(), _>(AttemptError {
                        error: Error::new(
                            ErrorCode::Unavailable,
                            Reason::UpstreamUnavailable,
                            "503",
                        ),
                        class: FailureClass::Unavailable,
                        retry_after: None,
                    })
                }
            }
        })
        .await
        .expect_err("503 every time");
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    assert_eq!(error.failure_class(), Some(FailureClass::Unavailable));
}

#[tokio::test(start_paused = true)]
async fn without_a_deadline_the_queue_wait_is_still_bounded() {
    let lane = queued_lane("retainly", 1, Duration::from_secs(30));
    call_ok(&lane, &CallContext::background()).await.unwrap();
    let error = call_ok(&lane, &CallContext::background())
        .await
        .expect_err("a 60 s wait is over the 30 s bound");
    assert_eq!(error.code(), ErrorCode::ResourceExhausted);
}
