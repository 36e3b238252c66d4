//! Lane tests with a paused clock: callers share the budget by weight, and quotas refuse.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::*;
use crate::error::{ErrorCode, Reason};
use crate::upstream::CallContext;
use crate::upstream::scheduler::tests::call_logging;
use crate::upstream::scheduler::{AttemptError, Idempotency, Lane, SchedulerSettings};

#[derive(Debug, Default)]
struct Table(HashMap<&'static str, CallerShare>);

impl CallerShares for Table {
    fn share(&self, caller: &str) -> CallerShare {
        self.0.get(caller).copied().unwrap_or_default()
    }
}

/// A lane of `limit` requests per second, with the given shares.
fn lane(limit: u32, shares: Table) -> Lane {
    Lane::new(
        "retently",
        SchedulerSettings {
            window: Duration::from_secs(1),
            jitter_margin: Duration::ZERO,
            quota_window: Duration::from_secs(1),
            shares: Arc::new(shares),
            ..SchedulerSettings::new(limit)
        },
    )
}

/// One call of `caller` that finishes at once; returns how long it waited for its slot.
async fn call(lane: &Lane, caller: &str, deadline: Duration) -> crate::error::Result<Duration> {
    let ctx = CallContext::interactive_within(deadline).with_caller(caller);
    let asked = Instant::now();
    lane.call(&ctx, Idempotency::Idempotent, |_| async move {
        Ok::<_, AttemptError>(asked.elapsed())
    })
    .await
}

/// Shares that give `caller` a weight and a quota; everyone else gets the defaults.
fn one_share(caller: &'static str, weight: u32, quota_per_minute: Option<u32>) -> Table {
    Table(HashMap::from([(
        caller,
        CallerShare {
            weight,
            quota_per_minute,
        },
    )]))
}

#[tokio::test(start_paused = true)]
async fn a_flooding_caller_cannot_delay_a_trickling_one() {
    let lane = lane(5, Table::default());
    // A asks for ten times the budget of one window at once, with 3 s to spare.
    let mut flood = JoinSet::new();
    for _ in 0..50 {
        let lane = lane.clone();
        flood.spawn(async move { call(&lane, "flood", Duration::from_secs(3)).await });
    }
    tokio::task::yield_now().await;
    // B asks once every 400 ms while A's backlog drains.
    let mut waits = Vec::new();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        waits.push(
            call(&lane, "trickle", Duration::from_secs(3))
                .await
                .expect("the trickle is always served"),
        );
    }
    let mut served = 0;
    let mut shed = 0;
    while let Some(result) = flood.join_next().await {
        match result.unwrap() {
            Ok(_) => served += 1,
            Err(error) => {
                assert_eq!(error.code(), ErrorCode::ResourceExhausted);
                assert_eq!(error.reason(), Reason::UpstreamBudgetExhausted);
                assert!(error.retry_after().is_some());
                shed += 1;
            }
        }
    }
    // B never waits longer than one window for its slot, whatever A's backlog.
    let longest = waits.iter().max().copied().unwrap();
    assert!(
        longest <= Duration::from_secs(1),
        "trickle waited {longest:?}"
    );
    // A's excess was refused rather than queued behind.
    assert!(shed >= 25, "served {served}, shed {shed}");
    assert_eq!(served + shed, 50);
}

#[tokio::test(start_paused = true)]
async fn weights_split_the_budget_when_both_flood() {
    let shares = one_share("heavy", 3, None);
    let lane = lane(4, shares);
    // Take the first window's slots so that everyone below queues.
    for _ in 0..4 {
        call(&lane, "warmup", Duration::from_secs(1)).await.unwrap();
    }
    let grants = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = JoinSet::new();
    for i in 0..40 {
        let caller = if i % 2 == 0 { "heavy" } else { "light" };
        let lane = lane.clone();
        let grants = Arc::clone(&grants);
        tasks.spawn(async move {
            let ctx = CallContext::interactive_within(Duration::from_secs(60)).with_caller(caller);
            call_logging(&lane, &ctx, &grants, || caller).await
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    let grants = grants.lock().unwrap().clone();
    // The first 16 grants while both had backlogs: 3 to 1.
    let heavy = grants[..16].iter().filter(|c| **c == "heavy").count();
    assert_eq!(heavy, 12, "{grants:?}");
}

#[tokio::test(start_paused = true)]
async fn a_quota_refuses_with_retry_info_and_frees_with_the_window() {
    let shares = one_share("capped", 1, Some(3));
    let lane = lane(100, shares);
    for _ in 0..3 {
        call(&lane, "capped", Duration::from_secs(5)).await.unwrap();
    }
    let error = call(&lane, "capped", Duration::from_secs(5))
        .await
        .expect_err("over quota");
    assert_eq!(error.code(), ErrorCode::ResourceExhausted);
    assert_eq!(error.reason(), Reason::CallerQuotaExceeded);
    assert_eq!(error.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(error.metadata()["caller"], "capped");
    assert_eq!(error.metadata()["quota"], "3");
    // Others are not affected.
    call(&lane, "other", Duration::from_secs(5)).await.unwrap();
    assert_eq!(lane.counters().quota_rejections, 1);

    tokio::time::sleep(Duration::from_secs(1)).await;
    call(&lane, "capped", Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_attempt_shed_for_budget_does_not_spend_quota() {
    let shares = one_share("capped", 1, Some(2));
    let lane = lane(1, shares);
    call(&lane, "capped", Duration::from_secs(5)).await.unwrap();
    // The budget is spent for a second; a 100 ms deadline cannot wait for it.
    let error = call(&lane, "capped", Duration::from_millis(100))
        .await
        .expect_err("no budget in time");
    assert_eq!(error.reason(), Reason::UpstreamBudgetExhausted);
    // The quota still has its second slot.
    call(&lane, "capped", Duration::from_secs(5)).await.unwrap();
}
