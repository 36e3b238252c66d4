//! The contract every engine keeps, as tests written once against the traits. An engine runs
//! them all with [`store_contract_tests!`], given an async function that returns a fresh, empty
//! store (and whatever must live as long as it, such as a temporary directory).
//!
//! The engines' clocks are their own: these tests never depend on how much time passes between
//! two operations, except where they wait for the wall clock to move past a millisecond.

use std::collections::HashMap;
use std::time::Duration;

use prost::bytes::Bytes;

use super::alerts::{AlertOutcome, PendingAlert, RateLimit};
use super::fatigue::{Claim, Reservation, ReserveRequest, Surveyed};
use super::feedback_log::{
    AppendCounts, CustomerKey, EntryFields, EntryKind, FeedbackQuery, Observed, Origin, ReadOutcome,
};
use super::idempotency::{ClaimOutcome, ClaimTerms, IdempotencyRecord, KeyClaim};
use super::leases::{Fence, UnderLease};
use super::outbox::{
    AttemptRecord, DeadLetterFilter, DeliveryError, DeliveryState, NewDelivery, QueuedDelivery,
    RequeueOutcome, RetrySelection,
};
use super::{
    AlertStore, Checkpoint, CursorStore, FatigueStore, FeedbackLogStore, IdempotencyStore,
    OutboxStore, Store,
};
use super::{StoreErrorKind, outbox::OutboxDepth};
use crate::error::{ErrorCode, Reason};

/// Generates one test per contract, each on a store made by `$fresh().await`, which returns
/// `(guard, Store)`, or `Option<(guard, Store)>` (`None`: skip); the guard is dropped after the
/// test. Two runtime threads, so the concurrent
/// contracts run their operations truly at once.
#[macro_export]
macro_rules! store_contract_tests {
    ($fresh:path) => {
        $crate::store_contract_tests!(@each $fresh;
            enqueued_deliveries_are_pending_and_seen_by_their_owner,
            claims_take_due_deliveries_oldest_first_and_mark_them_in_flight,
            claims_carry_each_delivery_s_owner,
            a_customer_s_deliveries_are_claimed_one_at_a_time_in_order,
            concurrent_claims_never_take_one_delivery_twice,
            retries_wait_for_their_delay_within_the_window,
            retries_past_the_window_are_dead_lettered_in_doubt_when_unverified,
            deliveries_refused_by_a_drain_return_to_pending,
            recovery_requeues_or_dead_letters_what_was_in_flight,
            dead_letters_are_listed_in_pages_and_requeued_by_who_may_see_them,
            the_outbox_reports_its_depth_age_and_next_due_time,
            finished_deliveries_are_pruned_after_their_retention,
            a_delivery_and_its_idempotency_record_commit_together,
            idempotency_records_belong_to_their_owner_and_age_out,
            an_idempotency_key_is_claimed_by_one_call_until_released_or_recorded,
            lapsed_idempotency_claims_are_reported_or_taken_over,
            concurrent_claims_of_one_idempotency_key_grant_exactly_one,
            appends_deduplicate_sequence_and_checkpoint_in_one_operation,
            concurrent_appends_get_gap_free_sequences_in_commit_order,
            log_reads_follow_sequences_bounds_and_retention,
            latest_versions_answer_queries_and_customer_histories,
            cursors_keep_the_last_value_per_name,
            writes_under_a_lease_apply_only_with_its_current_epoch,
            fatigue_reservations_block_inside_the_window_until_released,
            fatigue_release_puts_back_the_earlier_survey_time,
            fatigue_recipient_blocked_in_one_scope_reserves_none,
            fatigue_concurrent_reservations_of_one_email_grant_exactly_one,
            fatigue_seeding_keeps_the_later_time_and_marks_the_backfill_done,
            the_alert_checkpoint_starts_at_the_head_once,
            alerts_queue_once_per_rule_and_version_within_their_rate_limit,
            a_batch_of_alerts_that_cannot_be_stored_changes_nothing,
            alert_keys_are_pruned_after_their_keeping_time,
        );
    };
    (@each $fresh:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                // An engine that needs a server returns `None` when none is configured (see
                // store::postgres::testing): its tests then pass as skipped.
                let fresh: Option<(_, $crate::store::Store)> = $fresh().await.into();
                let Some((_guard, store)) = fresh else {
                    return;
                };
                $crate::store::contract::$name(&store).await;
            }
        )*
    };
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn delivery(id: &str, owner: &str, keys: &[&str], replay_safe: bool) -> QueuedDelivery {
    QueuedDelivery {
        delivery_id: id.to_owned(),
        delivery: NewDelivery {
            method: if replay_safe {
                "UpsertCustomers"
            } else {
                "TrackEvent"
            }
            .to_owned(),
            request: id.as_bytes().to_vec(),
            destinations: vec![1, 2],
            item_count: 3,
            ordering_keys: keys.iter().map(|key| (*key).to_owned()).collect(),
            idempotency_key: Some(format!("key-{id}")),
            replay_safe,
            owner: owner.to_owned(),
        },
        expire_ms: now_ms() + 3_600_000,
        traceparent: Some(format!("00-{id}")),
    }
}

fn failure(reason: Reason) -> DeliveryError {
    DeliveryError {
        code: ErrorCode::Unavailable,
        reason,
        message: format!("{} happened", reason.as_str()),
        metadata: HashMap::from([("status".to_owned(), "503".to_owned())]),
    }
}

async fn enqueue(store: &dyn OutboxStore, queued: QueuedDelivery) {
    store.enqueue(queued, None).await.unwrap();
}

async fn claimed_ids(store: &dyn OutboxStore, limit: usize) -> Vec<String> {
    store
        .claim(limit)
        .await
        .unwrap()
        .into_iter()
        .map(|claimed| claimed.delivery_id)
        .collect()
}

async fn state_of(store: &dyn OutboxStore, id: &str) -> DeliveryState {
    store.get(id, None).await.unwrap().unwrap().state
}

/// Returns once the wall clock has moved past the millisecond it was in.
async fn next_millisecond() {
    let start = now_ms();
    while now_ms() <= start {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub(crate) async fn enqueued_deliveries_are_pending_and_seen_by_their_owner(store: &Store) {
    let outbox = store.outbox().as_ref();
    let before = now_ms();
    let queued = delivery("dlv_a", "alpha", &["ann"], true);
    let expire_ms = queued.expire_ms;
    enqueue(outbox, queued).await;
    let record = outbox.get("dlv_a", None).await.unwrap().unwrap();
    assert_eq!(record.delivery_id, "dlv_a");
    assert_eq!(record.method, "UpsertCustomers");
    assert_eq!(record.state, DeliveryState::Pending);
    assert_eq!(record.destinations, vec![1, 2]);
    assert_eq!(record.item_count, 3);
    assert_eq!(record.idempotency_key.as_deref(), Some("key-dlv_a"));
    assert_eq!((record.attempt_count, record.replay_count), (0, 0));
    assert_eq!((record.last_error, record.result), (None, None));
    assert!(record.create_ms >= before);
    assert_eq!(record.next_attempt_ms, Some(record.create_ms));
    assert_eq!((record.complete_ms, record.expire_ms), (None, expire_ms));
    // Its owner and an admin see it; another caller does not, and an unknown id is nobody's.
    assert!(
        outbox
            .get("dlv_a", Some("alpha".into()))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        outbox
            .get("dlv_a", Some("beta".into()))
            .await
            .unwrap()
            .is_none()
    );
    assert!(outbox.get("dlv_nope", None).await.unwrap().is_none());
    // Delivery ids are unique.
    let error = outbox
        .enqueue(delivery("dlv_a", "alpha", &["bob"], true), None)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Conflict);
}

pub(crate) async fn claims_take_due_deliveries_oldest_first_and_mark_them_in_flight(store: &Store) {
    let outbox = store.outbox().as_ref();
    for (id, key) in [("dlv_1", "ann"), ("dlv_2", "bob"), ("dlv_3", "cid")] {
        enqueue(outbox, delivery(id, "", &[key], true)).await;
    }
    let first = outbox.claim(2).await.unwrap();
    assert_eq!(
        first
            .iter()
            .map(|c| c.delivery_id.as_str())
            .collect::<Vec<_>>(),
        ["dlv_1", "dlv_2"]
    );
    assert_eq!(first[0].method, "UpsertCustomers");
    assert_eq!(first[0].request, b"dlv_1");
    assert_eq!(first[0].attempts, 1);
    assert_eq!(first[0].traceparent.as_deref(), Some("00-dlv_1"));
    assert_eq!(first[0].verify_since_ms, None);
    let record = outbox.get("dlv_1", None).await.unwrap().unwrap();
    assert_eq!(record.state, DeliveryState::InFlight);
    assert_eq!(record.attempt_count, 1);
    assert_eq!(record.next_attempt_ms, None);
    // What is in flight is not claimed again.
    assert_eq!(claimed_ids(outbox, 10).await, ["dlv_3"]);
    assert!(claimed_ids(outbox, 10).await.is_empty());
}

/// A claimed delivery says who queued it, as stored, so its attempt runs on its owner's share
/// of the budget; the owner stays with it across retries.
pub(crate) async fn claims_carry_each_delivery_s_owner(store: &Store) {
    let outbox = store.outbox().as_ref();
    let owners = [("dlv_1", "alpha"), ("dlv_2", ""), ("dlv_3", ":gateway")];
    for (id, owner) in owners {
        enqueue(outbox, delivery(id, owner, &[id], true)).await;
    }
    let claimed = outbox.claim(10).await.unwrap();
    let found: Vec<(&str, Option<&str>)> = claimed
        .iter()
        .map(|c| (c.delivery_id.as_str(), c.owner.as_deref()))
        .collect();
    assert_eq!(
        found,
        [
            ("dlv_1", Some("alpha")),
            ("dlv_2", Some("")),
            ("dlv_3", Some(":gateway"))
        ]
    );
    outbox
        .record_attempt(
            "dlv_1",
            AttemptRecord::Retry {
                error: failure(Reason::CallerQuotaExceeded),
                delay: Duration::ZERO,
                verify_since_ms: None,
                unverified: failure(Reason::DeliveryInDoubt),
            },
        )
        .await
        .unwrap();
    next_millisecond().await;
    let again = outbox.claim(10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].delivery_id, "dlv_1");
    assert_eq!(again[0].owner.as_deref(), Some("alpha"));
    assert_eq!(again[0].attempts, 2);
}

pub(crate) async fn a_customer_s_deliveries_are_claimed_one_at_a_time_in_order(store: &Store) {
    let outbox = store.outbox().as_ref();
    enqueue(outbox, delivery("dlv_1", "", &["ann", "bob"], true)).await;
    enqueue(outbox, delivery("dlv_2", "", &["bob"], true)).await;
    enqueue(outbox, delivery("dlv_3", "", &["cid"], true)).await;
    enqueue(outbox, delivery("dlv_4", "", &["ann"], true)).await;
    // Later deliveries sharing a customer wait for every older unfinished one.
    assert_eq!(claimed_ids(outbox, 10).await, ["dlv_1", "dlv_3"]);
    outbox
        .record_attempt(
            "dlv_1",
            AttemptRecord::Delivered {
                result: b"ok".to_vec(),
            },
        )
        .await
        .unwrap();
    assert_eq!(claimed_ids(outbox, 10).await, ["dlv_2", "dlv_4"]);
    let delivered = outbox.get("dlv_1", None).await.unwrap().unwrap();
    assert_eq!(delivered.state, DeliveryState::Delivered);
    assert_eq!(delivered.result.as_deref(), Some(&b"ok"[..]));
    assert!(delivered.complete_ms.is_some());
}

/// Holds for any interleaving: claims that run at once (several workers, several replicas)
/// split the due deliveries between them.
pub(crate) async fn concurrent_claims_never_take_one_delivery_twice(store: &Store) {
    const DELIVERIES: usize = 60;
    for n in 0..DELIVERIES {
        let id = format!("dlv_{n:03}");
        enqueue(store.outbox().as_ref(), delivery(&id, "", &[&id], true)).await;
    }
    let claimers = (0..6).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut taken = Vec::new();
            loop {
                let claimed = claimed_ids(store.outbox().as_ref(), 4).await;
                if claimed.is_empty() {
                    return taken;
                }
                taken.extend(claimed);
            }
        })
    });
    let mut taken = Vec::new();
    for claimer in claimers {
        taken.extend(claimer.await.unwrap());
    }
    let unique: std::collections::HashSet<&String> = taken.iter().collect();
    assert_eq!((taken.len(), unique.len()), (DELIVERIES, DELIVERIES));
}

pub(crate) async fn retries_wait_for_their_delay_within_the_window(store: &Store) {
    let outbox = store.outbox().as_ref();
    enqueue(outbox, delivery("dlv_1", "", &["ann"], true)).await;
    enqueue(outbox, delivery("dlv_2", "", &["ann"], true)).await;
    assert_eq!(claimed_ids(outbox, 10).await, ["dlv_1"]);
    let retry = |delay| AttemptRecord::Retry {
        error: failure(Reason::UpstreamUnavailable),
        delay,
        verify_since_ms: None,
        unverified: failure(Reason::DeliveryInDoubt),
    };
    outbox
        .record_attempt("dlv_1", retry(Duration::from_secs(600)))
        .await
        .unwrap();
    let waiting = outbox.get("dlv_1", None).await.unwrap().unwrap();
    assert_eq!(waiting.state, DeliveryState::RetryWait);
    assert_eq!(
        waiting.last_error,
        Some(failure(Reason::UpstreamUnavailable))
    );
    let due = waiting.next_attempt_ms.unwrap();
    assert_eq!(due, waiting.update_ms + 600_000);
    // Not due yet, and it still holds its customer's later delivery back.
    assert!(claimed_ids(outbox, 10).await.is_empty());
    let blocked = outbox.get("dlv_2", None).await.unwrap().unwrap();
    assert_eq!(outbox.next_due_ms().await.unwrap(), blocked.next_attempt_ms);

    enqueue(outbox, delivery("dlv_3", "", &["bob"], true)).await;
    assert_eq!(claimed_ids(outbox, 10).await, ["dlv_3"]);
    outbox
        .record_attempt("dlv_3", retry(Duration::ZERO))
        .await
        .unwrap();
    let again = outbox.claim(10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].delivery_id.as_str(), again[0].attempts),
        ("dlv_3", 2)
    );
}

pub(crate) async fn retries_past_the_window_are_dead_lettered_in_doubt_when_unverified(
    store: &Store,
) {
    let outbox = store.outbox().as_ref();
    for id in ["dlv_plain", "dlv_unresolved", "dlv_later"] {
        let mut queued = delivery(id, "", &[id], false);
        // A window that ends before any retry could be due.
        queued.expire_ms = now_ms() + 60_000;
        enqueue(outbox, queued).await;
    }
    assert_eq!(claimed_ids(outbox, 10).await.len(), 3);
    let retry_after = |delay: Duration, since: Option<i64>| AttemptRecord::Retry {
        error: failure(Reason::UpstreamUnavailable),
        delay,
        verify_since_ms: since,
        unverified: failure(Reason::DeliveryInDoubt),
    };
    let retry = |since: Option<i64>| retry_after(Duration::from_secs(3600), since);
    outbox
        .record_attempt("dlv_plain", retry(None))
        .await
        .unwrap();
    outbox
        .record_attempt("dlv_unresolved", retry(Some(42)))
        .await
        .unwrap();
    let plain = outbox.get("dlv_plain", None).await.unwrap().unwrap();
    assert_eq!(plain.state, DeliveryState::DeadLettered);
    assert_eq!(plain.last_error, Some(failure(Reason::UpstreamUnavailable)));
    assert!(plain.complete_ms.is_some());
    let unresolved = outbox.get("dlv_unresolved", None).await.unwrap().unwrap();
    assert_eq!(unresolved.state, DeliveryState::DeadLettered);
    assert_eq!(
        unresolved.last_error,
        Some(failure(Reason::DeliveryInDoubt))
    );

    // A verify time stored by an earlier attempt outlives a later plain failure.
    outbox
        .record_attempt("dlv_later", retry_after(Duration::ZERO, Some(42)))
        .await
        .unwrap();
    let claimed = outbox.claim(10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].verify_since_ms, Some(42));
    // Kept at its earliest value.
    outbox
        .record_attempt("dlv_later", retry_after(Duration::ZERO, Some(99)))
        .await
        .unwrap();
    assert_eq!(outbox.claim(10).await.unwrap()[0].verify_since_ms, Some(42));
    outbox
        .record_attempt("dlv_later", retry(None))
        .await
        .unwrap();
    let later = outbox.get("dlv_later", None).await.unwrap().unwrap();
    assert_eq!(later.state, DeliveryState::DeadLettered);
    assert_eq!(later.last_error, Some(failure(Reason::DeliveryInDoubt)));
}

pub(crate) async fn deliveries_refused_by_a_drain_return_to_pending(store: &Store) {
    let outbox = store.outbox().as_ref();
    enqueue(outbox, delivery("dlv_1", "", &["ann"], false)).await;
    assert_eq!(claimed_ids(outbox, 10).await, ["dlv_1"]);
    outbox
        .return_to_pending("dlv_1", failure(Reason::GatewayDraining))
        .await
        .unwrap();
    let record = outbox.get("dlv_1", None).await.unwrap().unwrap();
    assert_eq!(record.state, DeliveryState::Pending);
    assert_eq!(record.last_error, Some(failure(Reason::GatewayDraining)));
    assert_eq!(record.attempt_count, 1);
    let again = outbox.claim(10).await.unwrap();
    assert_eq!(again[0].attempts, 2);
}

pub(crate) async fn recovery_requeues_or_dead_letters_what_was_in_flight(store: &Store) {
    let outbox = store.outbox().as_ref();
    enqueue(outbox, delivery("dlv_safe", "", &["ann"], true)).await;
    let mut survey = delivery("dlv_survey", "", &["bob"], false);
    survey.delivery.method = "SendSurvey".to_owned();
    enqueue(outbox, survey).await;
    enqueue(outbox, delivery("dlv_event", "", &["cid"], false)).await;
    enqueue(outbox, delivery("dlv_waiting", "", &["dan"], false)).await;
    assert_eq!(claimed_ids(outbox, 3).await.len(), 3);
    let claimed_at = outbox
        .get("dlv_survey", None)
        .await
        .unwrap()
        .unwrap()
        .update_ms;

    let recovered = outbox
        .recover(&["SendSurvey".to_owned()], failure(Reason::DeliveryInDoubt))
        .await
        .unwrap();
    assert_eq!((recovered.requeued, recovered.in_doubt), (2, 1));
    assert_eq!(state_of(outbox, "dlv_safe").await, DeliveryState::Pending);
    assert_eq!(
        state_of(outbox, "dlv_waiting").await,
        DeliveryState::Pending
    );
    let event = outbox.get("dlv_event", None).await.unwrap().unwrap();
    assert_eq!(event.state, DeliveryState::DeadLettered);
    assert_eq!(event.last_error, Some(failure(Reason::DeliveryInDoubt)));
    let claimed = outbox.claim(10).await.unwrap();
    let survey = claimed
        .iter()
        .find(|claimed| claimed.delivery_id == "dlv_survey")
        .unwrap();
    // Checked from the claim of the attempt that was cut.
    assert_eq!(survey.verify_since_ms, Some(claimed_at));
    assert_eq!(claimed.len(), 3);
}

pub(crate) async fn dead_letters_are_listed_in_pages_and_requeued_by_who_may_see_them(
    store: &Store,
) {
    let outbox = store.outbox().as_ref();
    for (id, owner) in [
        ("dlv_1", "alpha"),
        ("dlv_2", "beta"),
        ("dlv_3", "alpha"),
        ("dlv_4", "alpha"),
    ] {
        enqueue(outbox, delivery(id, owner, &[id], false)).await;
    }
    let mut live = delivery("dlv_live", "alpha", &["live"], true);
    live.delivery.destinations = vec![1];
    enqueue(outbox, live).await;
    for id in claimed_ids(outbox, 4).await {
        outbox
            .record_attempt(
                &id,
                AttemptRecord::DeadLetter {
                    error: failure(Reason::UpstreamItemRejected),
                },
            )
            .await
            .unwrap();
    }
    let alpha = || DeadLetterFilter {
        visible_to: Some("alpha".to_owned()),
        ..DeadLetterFilter::default()
    };
    let first = outbox.dead_letters(alpha(), 0, 2).await.unwrap();
    let ids = |page: &super::outbox::DeadLetterPage| {
        page.deliveries
            .iter()
            .map(|d| d.delivery_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (ids(&first), first.total),
        (vec!["dlv_1".into(), "dlv_3".into()], 3)
    );
    let second = outbox
        .dead_letters(alpha(), first.next_after.unwrap(), 2)
        .await
        .unwrap();
    assert_eq!(
        (ids(&second), second.next_after),
        (vec!["dlv_4".into()], None)
    );
    let by_destination = outbox
        .dead_letters(
            DeadLetterFilter {
                destination: Some(2),
                method: Some("TrackEvent".to_owned()),
                visible_to: None,
            },
            0,
            10,
        )
        .await
        .unwrap();
    assert_eq!(by_destination.total, 4);
    let none = outbox
        .dead_letters(
            DeadLetterFilter {
                method: Some("UpsertCustomers".to_owned()),
                ..DeadLetterFilter::default()
            },
            0,
            10,
        )
        .await
        .unwrap();
    assert_eq!((none.total, none.deliveries.len()), (0, 0));

    let outcomes = outbox
        .requeue_dead_letters(
            RetrySelection::Ids(vec![
                "dlv_1".into(),
                "dlv_2".into(),
                "dlv_live".into(),
                "dlv_nope".into(),
            ]),
            Some("alpha".to_owned()),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            ("dlv_1".to_owned(), RequeueOutcome::Requeued),
            // Another caller's delivery is reported as not found, never as existing.
            ("dlv_2".to_owned(), RequeueOutcome::NotFound),
            ("dlv_live".to_owned(), RequeueOutcome::NotDeadLettered),
            ("dlv_nope".to_owned(), RequeueOutcome::NotFound),
        ]
    );
    let requeued = outbox.get("dlv_1", None).await.unwrap().unwrap();
    assert_eq!(requeued.state, DeliveryState::Pending);
    assert_eq!(requeued.replay_count, 1);
    assert_eq!(requeued.complete_ms, None);
    assert_eq!(
        requeued.expire_ms,
        requeued.next_attempt_ms.unwrap() + 600_000
    );
    let all = outbox
        .requeue_dead_letters(
            RetrySelection::All { method: None },
            None,
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    assert_eq!(
        all,
        vec![
            ("dlv_2".to_owned(), RequeueOutcome::Requeued),
            ("dlv_3".to_owned(), RequeueOutcome::Requeued),
            ("dlv_4".to_owned(), RequeueOutcome::Requeued),
        ]
    );
}

pub(crate) async fn the_outbox_reports_its_depth_age_and_next_due_time(store: &Store) {
    let outbox = store.outbox().as_ref();
    assert_eq!(outbox.depth().await.unwrap(), OutboxDepth::default());
    assert_eq!(outbox.oldest_unfinished_ms().await.unwrap(), None);
    assert_eq!(outbox.next_due_ms().await.unwrap(), None);
    enqueue(outbox, delivery("dlv_1", "", &["ann"], true)).await;
    enqueue(outbox, delivery("dlv_2", "", &["bob"], true)).await;
    enqueue(outbox, delivery("dlv_3", "", &["cid"], true)).await;
    let first = outbox.get("dlv_1", None).await.unwrap().unwrap();
    let second = outbox.get("dlv_2", None).await.unwrap().unwrap();
    assert_eq!(
        outbox.oldest_unfinished_ms().await.unwrap(),
        Some(first.create_ms)
    );
    assert_eq!(outbox.next_due_ms().await.unwrap(), Some(first.create_ms));
    assert_eq!(claimed_ids(outbox, 2).await, ["dlv_1", "dlv_2"]);
    // In flight still counts as unfinished, but is not due.
    assert_eq!(
        outbox.oldest_unfinished_ms().await.unwrap(),
        Some(first.create_ms)
    );
    let third = outbox.get("dlv_3", None).await.unwrap().unwrap();
    assert_eq!(outbox.next_due_ms().await.unwrap(), third.next_attempt_ms);
    outbox
        .record_attempt(
            "dlv_1",
            AttemptRecord::DeadLetter {
                error: failure(Reason::UpstreamItemRejected),
            },
        )
        .await
        .unwrap();
    outbox
        .record_attempt("dlv_2", AttemptRecord::Delivered { result: Vec::new() })
        .await
        .unwrap();
    assert_eq!(
        outbox.depth().await.unwrap(),
        OutboxDepth {
            unfinished: 1,
            dead_lettered: 1
        }
    );
    assert!(outbox.oldest_unfinished_ms().await.unwrap() >= Some(second.create_ms));
}

pub(crate) async fn finished_deliveries_are_pruned_after_their_retention(store: &Store) {
    let outbox = store.outbox().as_ref();
    for id in ["dlv_done", "dlv_dead", "dlv_open"] {
        enqueue(outbox, delivery(id, "", &[id], true)).await;
    }
    assert_eq!(claimed_ids(outbox, 2).await, ["dlv_done", "dlv_dead"]);
    outbox
        .record_attempt("dlv_done", AttemptRecord::Delivered { result: Vec::new() })
        .await
        .unwrap();
    outbox
        .record_attempt(
            "dlv_dead",
            AttemptRecord::DeadLetter {
                error: failure(Reason::UpstreamItemRejected),
            },
        )
        .await
        .unwrap();
    let day = Duration::from_secs(86_400);
    assert_eq!(outbox.prune(day, day).await.unwrap(), 0);
    next_millisecond().await;
    // Dead letters are kept longer than deliveries.
    assert_eq!(outbox.prune(Duration::ZERO, day).await.unwrap(), 1);
    assert!(outbox.get("dlv_done", None).await.unwrap().is_none());
    assert_eq!(
        outbox.prune(Duration::ZERO, Duration::ZERO).await.unwrap(),
        1
    );
    assert!(outbox.get("dlv_dead", None).await.unwrap().is_none());
    assert_eq!(state_of(outbox, "dlv_open").await, DeliveryState::Pending);
}

pub(crate) async fn a_delivery_and_its_idempotency_record_commit_together(store: &Store) {
    let record = |key: &str| IdempotencyRecord {
        owner: "alpha".to_owned(),
        scope: "TrackEvent".to_owned(),
        key: key.to_owned(),
        request_hash: vec![1, 2],
        response: b"queued".to_vec(),
    };
    store
        .outbox()
        .enqueue(
            delivery("dlv_1", "alpha", &["ann"], false),
            Some(record("k-1")),
        )
        .await
        .unwrap();
    let found = store
        .idempotency()
        .lookup("alpha", "TrackEvent", "k-1", 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.request_hash, found.response),
        (vec![1, 2], b"queued".to_vec())
    );
    // An enqueue that fails leaves no record behind.
    let error = store
        .outbox()
        .enqueue(
            delivery("dlv_1", "alpha", &["ann"], false),
            Some(record("k-2")),
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Conflict);
    assert_eq!(
        store
            .idempotency()
            .lookup("alpha", "TrackEvent", "k-2", 0)
            .await
            .unwrap(),
        None
    );
}

pub(crate) async fn idempotency_records_belong_to_their_owner_and_age_out(store: &Store) {
    let records: &dyn IdempotencyStore = store.idempotency().as_ref();
    let record = |owner: &str, response: &[u8]| IdempotencyRecord {
        owner: owner.to_owned(),
        scope: "TrackEvent".to_owned(),
        key: "k-1".to_owned(),
        request_hash: vec![7],
        response: response.to_vec(),
    };
    let before = now_ms();
    records.record(record("alpha", b"first")).await.unwrap();
    records.record(record("", b"anonymous")).await.unwrap();
    let lookup = |owner: &'static str, scope: &'static str, since: i64| async move {
        records
            .lookup(owner, scope, "k-1", since)
            .await
            .unwrap()
            .map(|found| found.response)
    };
    assert_eq!(
        lookup("alpha", "TrackEvent", before).await,
        Some(b"first".to_vec())
    );
    assert_eq!(
        lookup("", "TrackEvent", before).await,
        Some(b"anonymous".to_vec())
    );
    assert_eq!(lookup("beta", "TrackEvent", before).await, None);
    assert_eq!(lookup("alpha", "SendSurvey", before).await, None);
    // Outside the window it is not found.
    assert_eq!(lookup("alpha", "TrackEvent", now_ms() + 60_000).await, None);
    // Recording again replaces the owner's record.
    records.record(record("alpha", b"second")).await.unwrap();
    assert_eq!(
        lookup("alpha", "TrackEvent", before).await,
        Some(b"second".to_vec())
    );
    assert_eq!(records.prune(before).await.unwrap(), 0);
    next_millisecond().await;
    assert_eq!(records.prune(now_ms()).await.unwrap(), 2);
    assert_eq!(lookup("alpha", "TrackEvent", 0).await, None);
}

fn key_claim(holder: &str) -> KeyClaim {
    KeyClaim {
        owner: "alpha".to_owned(),
        scope: "TrackEvent".to_owned(),
        key: "k-1".to_owned(),
        holder: holder.to_owned(),
    }
}

/// Terms of a claim made now: a minute's lease, a window that started `window_ms` ago.
fn claim_terms(window_ms: i64, take_over_lapsed: bool) -> ClaimTerms {
    ClaimTerms {
        lease_until_ms: now_ms() + 60_000,
        created_since_ms: now_ms() - window_ms,
        take_over_lapsed,
    }
}

pub(crate) async fn an_idempotency_key_is_claimed_by_one_call_until_released_or_recorded(
    store: &Store,
) {
    let records: &dyn IdempotencyStore = store.idempotency().as_ref();
    let terms = || claim_terms(3_600_000, false);
    let first = key_claim("call-1");
    assert_eq!(
        records.claim_key(&first, terms()).await.unwrap(),
        ClaimOutcome::Claimed
    );
    // Its holder asking again keeps it; another call finds it running.
    assert_eq!(
        records.claim_key(&first, terms()).await.unwrap(),
        ClaimOutcome::Claimed
    );
    assert_eq!(
        records
            .claim_key(&key_claim("call-2"), terms())
            .await
            .unwrap(),
        ClaimOutcome::Running
    );
    assert!(
        records
            .renew_key_claim(&first, now_ms() + 60_000)
            .await
            .unwrap()
    );
    assert!(
        !records
            .renew_key_claim(&key_claim("call-2"), now_ms() + 60_000)
            .await
            .unwrap()
    );
    // Another owner's, scope's or key's claims are apart.
    for other in [
        KeyClaim {
            owner: "beta".to_owned(),
            ..key_claim("call-3")
        },
        KeyClaim {
            scope: "SendSurvey".to_owned(),
            ..key_claim("call-3")
        },
        KeyClaim {
            key: "k-2".to_owned(),
            ..key_claim("call-3")
        },
    ] {
        assert_eq!(
            records.claim_key(&other, terms()).await.unwrap(),
            ClaimOutcome::Claimed
        );
    }
    // Released by another call: still held. Released by its holder: free.
    records
        .release_key_claim(&key_claim("call-2"))
        .await
        .unwrap();
    assert_eq!(
        records
            .claim_key(&key_claim("call-2"), terms())
            .await
            .unwrap(),
        ClaimOutcome::Running
    );
    records.release_key_claim(&first).await.unwrap();
    assert!(
        !records
            .renew_key_claim(&first, now_ms() + 60_000)
            .await
            .unwrap()
    );
    let second = key_claim("call-2");
    assert_eq!(
        records.claim_key(&second, terms()).await.unwrap(),
        ClaimOutcome::Claimed
    );
    // Once the key has a record, every claim gets the record, its holder's included, and a
    // claim answered with the record holds nothing afterwards.
    records
        .record(IdempotencyRecord {
            owner: "alpha".to_owned(),
            scope: "TrackEvent".to_owned(),
            key: "k-1".to_owned(),
            request_hash: vec![9],
            response: b"answer".to_vec(),
        })
        .await
        .unwrap();
    records.release_key_claim(&second).await.unwrap();
    let recorded = records
        .claim_key(&key_claim("call-4"), terms())
        .await
        .unwrap();
    let ClaimOutcome::Recorded(stored) = recorded else {
        panic!("expected the record, got {recorded:?}");
    };
    assert_eq!(
        (stored.request_hash, stored.response),
        (vec![9], b"answer".to_vec())
    );
    assert!(
        !records
            .renew_key_claim(&key_claim("call-4"), now_ms() + 60_000)
            .await
            .unwrap()
    );
    // A record before the window does not answer: the key is free again.
    next_millisecond().await;
    assert_eq!(
        records
            .claim_key(
                &key_claim("call-5"),
                ClaimTerms {
                    created_since_ms: now_ms() + 1,
                    ..terms()
                }
            )
            .await
            .unwrap(),
        ClaimOutcome::Claimed
    );
    // Pruning forgets claims made before the window, with the records.
    next_millisecond().await;
    assert_eq!(records.prune(now_ms()).await.unwrap(), 1);
    assert_eq!(
        records
            .claim_key(&key_claim("call-6"), terms())
            .await
            .unwrap(),
        ClaimOutcome::Claimed
    );
}

pub(crate) async fn lapsed_idempotency_claims_are_reported_or_taken_over(store: &Store) {
    let records: &dyn IdempotencyStore = store.idempotency().as_ref();
    let lapsed = ClaimTerms {
        lease_until_ms: now_ms() - 1,
        ..claim_terms(3_600_000, false)
    };
    assert_eq!(
        records.claim_key(&key_claim("died"), lapsed).await.unwrap(),
        ClaimOutcome::Claimed
    );
    // Not taken over: reported as abandoned, and it stays so for later repeats.
    for _ in 0..2 {
        assert_eq!(
            records
                .claim_key(&key_claim("repeat"), claim_terms(3_600_000, false))
                .await
                .unwrap(),
            ClaimOutcome::Abandoned
        );
    }
    // Taken over on request: the new holder holds it, the old one lost it.
    let taker = key_claim("taker");
    assert_eq!(
        records
            .claim_key(&taker, claim_terms(3_600_000, true))
            .await
            .unwrap(),
        ClaimOutcome::Claimed
    );
    assert!(
        !records
            .renew_key_claim(&key_claim("died"), now_ms() + 60_000)
            .await
            .unwrap()
    );
    assert_eq!(
        records
            .claim_key(&key_claim("repeat"), claim_terms(3_600_000, true))
            .await
            .unwrap(),
        ClaimOutcome::Running
    );
    // A claim made before the window no longer holds the key, lapsed or not.
    next_millisecond().await;
    assert_eq!(
        records
            .claim_key(&key_claim("later"), claim_terms(0, false))
            .await
            .unwrap(),
        ClaimOutcome::Claimed
    );
}

pub(crate) async fn concurrent_claims_of_one_idempotency_key_grant_exactly_one(store: &Store) {
    let attempts = (0..16).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .idempotency()
                .claim_key(
                    &key_claim(&format!("call-{n}")),
                    claim_terms(3_600_000, true),
                )
                .await
                .unwrap()
        })
    });
    let mut outcomes = Vec::new();
    for attempt in attempts.collect::<Vec<_>>() {
        outcomes.push(attempt.await.unwrap());
    }
    let claimed = outcomes
        .iter()
        .filter(|outcome| **outcome == ClaimOutcome::Claimed)
        .count();
    assert_eq!(claimed, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, ClaimOutcome::Claimed | ClaimOutcome::Running))
    );
}

fn observed(id: &str, version: u8, create_time_ms: i64, email: &str, campaign: &str) -> Observed {
    Observed {
        feedback_id: id.to_owned(),
        create_time_ms,
        customer_id: format!("cust-{email}"),
        email: email.to_owned(),
        fields: EntryFields {
            campaign_id: campaign.to_owned(),
            metric: 1,
            score: Some(f64::from(version)),
            score_category: 2,
            has_comment: version.is_multiple_of(2),
        },
        payload: format!("{id}@{version}").into_bytes(),
        digest: [version; 32],
        // Odd versions were ingested under a trace, even ones without.
        traceparent: (version % 2 == 1).then(|| format!("trace-{id}-{version}")),
    }
}

/// A test encoding that shows every input the store passed.
fn encode(epoch: u64, sequence: i64, kind: EntryKind, log_time_ms: i64, payload: &[u8]) -> Bytes {
    let payload = String::from_utf8_lossy(payload);
    Bytes::from(format!(
        "{epoch}/{sequence}/{kind:?}/{log_time_ms}/{payload}"
    ))
}

fn messages(entries: &[super::feedback_log::LogEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|entry| String::from_utf8_lossy(&entry.message).into_owned())
        .collect()
}

pub(crate) async fn appends_deduplicate_sequence_and_checkpoint_in_one_operation(store: &Store) {
    let log: &dyn FeedbackLogStore = store.feedback_log().as_ref();
    let empty = log.state().await.unwrap();
    assert_eq!((empty.head_seq, empty.pruned_seq), (0, 0));
    let epoch = empty.epoch;
    let checkpoint = |value: &str| Checkpoint {
        name: "feedback_sync".to_owned(),
        value: value.to_owned(),
    };
    let first = log
        .append(
            1_000,
            vec![
                (
                    Origin::Poll,
                    vec![
                        observed("f1", 1, 10, "a@x", "c1"),
                        observed("f2", 1, 20, "b@x", "c1"),
                    ],
                ),
                (Origin::Webhook, vec![observed("f3", 1, 30, "a@x", "c2")]),
            ],
            vec![checkpoint("page-1")],
            encode,
        )
        .await
        .unwrap();
    assert_eq!(
        messages(&first.entries),
        [
            format!("{epoch}/1/Created/1000/f1@1"),
            format!("{epoch}/2/Created/1000/f2@1"),
            format!("{epoch}/3/Created/1000/f3@1"),
        ]
    );
    assert_eq!(
        first.entries[0].fields,
        observed("f1", 1, 10, "a@x", "c1").fields
    );
    assert_eq!(
        first.counts,
        [
            AppendCounts {
                created: 2,
                ..AppendCounts::default()
            },
            AppendCounts {
                created: 1,
                ..AppendCounts::default()
            },
        ]
    );
    assert_eq!(
        store
            .cursors()
            .get("feedback_sync")
            .await
            .unwrap()
            .as_deref(),
        Some("page-1")
    );
    // A clock that stepped back does not move log times back.
    let second = log
        .append(
            500,
            vec![
                (
                    Origin::Webhook,
                    vec![
                        observed("f1", 2, 10, "a@x", "c1"),
                        observed("f4", 1, 40, "c@x", "c1"),
                    ],
                ),
                (
                    Origin::Poll,
                    vec![
                        observed("f2", 1, 20, "b@x", "c1"),
                        observed("f3", 2, 30, "a@x", "c2"),
                    ],
                ),
            ],
            vec![checkpoint("page-2")],
            encode,
        )
        .await
        .unwrap();
    assert_eq!(
        messages(&second.entries),
        [
            format!("{epoch}/4/Created/1000/f4@1"),
            format!("{epoch}/5/Updated/1000/f3@2"),
        ]
    );
    assert_eq!(
        second.counts,
        [
            AppendCounts {
                created: 1,
                ignored: 1,
                ..AppendCounts::default()
            },
            AppendCounts {
                updated: 1,
                unchanged: 1,
                ..AppendCounts::default()
            },
        ]
    );
    let state = log.state().await.unwrap();
    assert_eq!(
        (state.epoch, state.head_seq, state.head_time_ms),
        (epoch, 5, 1_000)
    );
    assert_eq!(
        store
            .cursors()
            .get("feedback_sync")
            .await
            .unwrap()
            .as_deref(),
        Some("page-2")
    );
    // Nothing new: no entry, the head stays, the checkpoint still moves.
    let idle = log
        .append(
            2_000,
            vec![(Origin::Poll, vec![observed("f4", 1, 40, "c@x", "c1")])],
            vec![checkpoint("page-3")],
            encode,
        )
        .await
        .unwrap();
    assert!(idle.entries.is_empty());
    assert_eq!(log.state().await.unwrap().head_seq, 5);
    assert_eq!(
        store
            .cursors()
            .get("feedback_sync")
            .await
            .unwrap()
            .as_deref(),
        Some("page-3")
    );
}

/// Holds for any interleaving: appends that run at once get consecutive sequences, and a reader
/// finds every entry up to the head (no sequence handed out to a commit that lands later).
pub(crate) async fn concurrent_appends_get_gap_free_sequences_in_commit_order(store: &Store) {
    const APPENDS: i64 = 40;
    let appends = (0..APPENDS).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            let appended = store
                .feedback_log()
                .append(
                    n,
                    vec![(
                        Origin::Poll,
                        vec![observed(&format!("f{n}"), 1, n, "a@x", "c1")],
                    )],
                    Vec::new(),
                    encode,
                )
                .await
                .unwrap();
            assert_eq!(appended.entries.len(), 1);
            appended.entries[0].sequence
        })
    });
    let mut sequences_taken = Vec::new();
    for append in appends {
        sequences_taken.push(append.await.unwrap());
    }
    sequences_taken.sort_unstable();
    assert_eq!(sequences_taken, (1..=APPENDS).collect::<Vec<_>>());
    let log = store.feedback_log();
    assert_eq!(log.state().await.unwrap().head_seq, APPENDS);
    let read = sequences(log.read_after(0, APPENDS, 1_000, usize::MAX).await.unwrap());
    assert_eq!(read, (1..=APPENDS).collect::<Vec<_>>());
}

/// A lease is granted to a holder and renewed with the same epoch; a write under it applies only
/// while its epoch is the lease's current one, and one with another epoch neither appends nor
/// moves the checkpoint (on PostgreSQL a takeover makes the old epoch such a one; the embedded
/// engine never grants another).
pub(crate) async fn writes_under_a_lease_apply_only_with_its_current_epoch(store: &Store) {
    let leases = store.leases();
    let fence = leases
        .acquire_lease("feedback.retently", "replica-a")
        .await
        .unwrap()
        .expect("a free lease is granted");
    assert_eq!(fence.lease, "feedback.retently");
    let renewed = leases
        .acquire_lease("feedback.retently", "replica-a")
        .await
        .unwrap();
    assert_eq!(renewed.as_ref(), Some(&fence), "a renewal keeps the epoch");
    assert!(!leases.lease_ttl().is_zero());
    let checkpoint = |value: &str| Checkpoint {
        name: "feedback.retently".to_owned(),
        value: value.to_owned(),
    };
    let log = store.feedback_log();
    let appended = log
        .append_fenced(
            &fence,
            1_000,
            vec![(Origin::Poll, vec![observed("f1", 1, 10, "a@x", "c1")])],
            vec![checkpoint("page-2")],
            encode,
        )
        .await
        .unwrap();
    let UnderLease::Done(appended) = appended else {
        panic!("the holder's write is refused");
    };
    assert_eq!(
        appended
            .entries
            .iter()
            .map(|e| e.sequence)
            .collect::<Vec<_>>(),
        [1]
    );

    let stale = Fence {
        epoch: fence.epoch - 1,
        ..fence.clone()
    };
    let refused = log
        .append_fenced(
            &stale,
            2_000,
            vec![(Origin::Poll, vec![observed("f2", 1, 20, "a@x", "c1")])],
            vec![checkpoint("page-1")],
            encode,
        )
        .await
        .unwrap();
    assert!(matches!(refused, UnderLease::LeaseLost));
    assert_eq!(log.state().await.unwrap().head_seq, 1);
    assert_eq!(
        store
            .cursors()
            .get("feedback.retently")
            .await
            .unwrap()
            .as_deref(),
        Some("page-2"),
        "a stale epoch cannot move the checkpoint back"
    );
    let ReadOutcome::Entries(entries) = log.read_after(0, 10, 10, usize::MAX).await.unwrap() else {
        panic!("nothing was pruned");
    };
    assert_eq!(entries.len(), 1);
    // Giving the lease up and taking it again works (a replica that drained and came back).
    leases.release_lease(&fence).await.unwrap();
    assert!(
        leases
            .acquire_lease("feedback.retently", "replica-a")
            .await
            .unwrap()
            .is_some()
    );
}

/// Appends `count` new responses, one per call, logged at `1_000 * sequence`.
async fn fill_log(log: &dyn FeedbackLogStore, count: i64) {
    for sequence in 1..=count {
        log.append(
            1_000 * sequence,
            vec![(
                Origin::Poll,
                vec![observed(&format!("f{sequence}"), 1, sequence, "a@x", "c1")],
            )],
            Vec::new(),
            encode,
        )
        .await
        .unwrap();
    }
}

fn sequences(outcome: ReadOutcome) -> Vec<i64> {
    match outcome {
        ReadOutcome::Entries(entries) => entries.iter().map(|entry| entry.sequence).collect(),
        ReadOutcome::Expired => panic!("expected entries, the position expired"),
    }
}

pub(crate) async fn log_reads_follow_sequences_bounds_and_retention(store: &Store) {
    let log: &dyn FeedbackLogStore = store.feedback_log().as_ref();
    assert_eq!(log.oldest().await.unwrap(), None);
    fill_log(log, 6).await;
    assert_eq!(
        sequences(log.read_after(0, 6, 100, usize::MAX).await.unwrap()),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        sequences(log.read_after(2, 4, 100, usize::MAX).await.unwrap()),
        [3, 4]
    );
    assert_eq!(
        sequences(log.read_after(0, 6, 2, usize::MAX).await.unwrap()),
        [1, 2]
    );
    // The byte budget stops after the entry that reaches it, never before the first.
    assert_eq!(sequences(log.read_after(0, 6, 100, 1).await.unwrap()), [1]);
    let ReadOutcome::Entries(entries) = log.read_after(4, 5, 10, usize::MAX).await.unwrap() else {
        panic!("expected entries");
    };
    assert_eq!(entries[0].log_time_ms, 5_000);
    assert_eq!(entries[0].fields, observed("f5", 1, 5, "a@x", "c1").fields);
    // The ingestion's trace is kept with the entry.
    assert_eq!(entries[0].traceparent.as_deref(), Some("trace-f5-1"));
    assert_eq!(log.position_before(3_000).await.unwrap(), (2, false));
    assert_eq!(log.position_before(500).await.unwrap(), (0, false));
    assert_eq!(log.oldest().await.unwrap(), Some((1, 1_000)));

    // Nothing to delete: nothing changes.
    assert_eq!(log.prune_chunk(Some(500), None, 10).await.unwrap(), 0);
    // By age, one chunk at a time.
    assert_eq!(log.prune_chunk(Some(3_500), None, 2).await.unwrap(), 2);
    assert_eq!(log.prune_chunk(Some(3_500), None, 2).await.unwrap(), 1);
    let state = log.state().await.unwrap();
    assert_eq!((state.pruned_seq, state.pruned_time_ms), (3, 3_000));
    assert!(matches!(
        log.read_after(1, 6, 10, usize::MAX).await.unwrap(),
        ReadOutcome::Expired
    ));
    assert_eq!(
        sequences(log.read_after(3, 6, 10, usize::MAX).await.unwrap()),
        [4, 5, 6]
    );
    assert_eq!(log.position_before(2_000).await.unwrap(), (3, true));
    assert_eq!(log.oldest().await.unwrap(), Some((4, 4_000)));
    // Responses created before the cutoff whose entries are all gone are forgotten.
    assert_eq!(log.items_horizon_ms().await.unwrap(), 3_500);
    let page = log
        .query(FeedbackQuery {
            limit: 10,
            ..FeedbackQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.total, 3);
    // By count: the newest `max_entries` stay.
    assert_eq!(log.prune_chunk(None, Some(1), 10).await.unwrap(), 2);
    assert_eq!(log.oldest().await.unwrap(), Some((6, 6_000)));
    // The head never moves back.
    assert_eq!(log.state().await.unwrap().head_seq, 6);
}

pub(crate) async fn latest_versions_answer_queries_and_customer_histories(store: &Store) {
    let log: &dyn FeedbackLogStore = store.feedback_log().as_ref();
    log.append(
        1_000,
        vec![(
            Origin::Poll,
            vec![
                observed("f1", 1, 100, "Ann@X.com", "c1"),
                observed("f2", 1, 200, "bob@x.com", "c1"),
                observed("f3", 1, 200, "ann@x.com", "c2"),
                observed("f4", 1, 400, "cid@x.com", "c1"),
            ],
        )],
        Vec::new(),
        encode,
    )
    .await
    .unwrap();
    // The latest version replaces the earlier one.
    log.append(
        2_000,
        vec![(
            Origin::Poll,
            vec![observed("f1", 2, 100, "Ann@X.com", "c1")],
        )],
        Vec::new(),
        encode,
    )
    .await
    .unwrap();
    let text = |payloads: Vec<Vec<u8>>| {
        payloads
            .into_iter()
            .map(|payload| String::from_utf8(payload).unwrap())
            .collect::<Vec<_>>()
    };
    let history = log
        .customer_responses(CustomerKey::Email("ANN@x.com".to_owned()))
        .await
        .unwrap();
    assert_eq!(text(history), ["f3@1", "f1@2"]);
    let by_id = log
        .customer_responses(CustomerKey::RetentlyId("cust-bob@x.com".to_owned()))
        .await
        .unwrap();
    assert_eq!(text(by_id), ["f2@1"]);

    let query = |query: FeedbackQuery| async move { log.query(query).await.unwrap() };
    let first = query(FeedbackQuery {
        limit: 2,
        ..FeedbackQuery::default()
    })
    .await;
    assert_eq!(
        (text(first.payloads), first.total),
        (vec!["f1@2".into(), "f2@1".into()], 4)
    );
    assert_eq!(first.next, Some((200, "f2".to_owned())));
    let rest = query(FeedbackQuery {
        limit: 2,
        after: first.next,
        ..FeedbackQuery::default()
    })
    .await;
    assert_eq!(text(rest.payloads), ["f3@1", "f4@1"]);
    let newest = query(FeedbackQuery {
        limit: 10,
        newest_first: true,
        campaign_id: Some("c1".to_owned()),
        created_from_ms: Some(100),
        created_before_ms: Some(400),
        ..FeedbackQuery::default()
    })
    .await;
    assert_eq!(
        (text(newest.payloads), newest.total, newest.next),
        (vec!["f2@1".into(), "f1@2".into()], 2, None)
    );
    let offset = query(FeedbackQuery {
        limit: 1,
        offset: 1,
        email: Some("ann@x.com".to_owned()),
        ..FeedbackQuery::default()
    })
    .await;
    assert_eq!(
        (text(offset.payloads), offset.total),
        (vec!["f3@1".into()], 2)
    );
    let customer = query(FeedbackQuery {
        limit: 10,
        retently_customer_id: Some("cust-cid@x.com".to_owned()),
        ..FeedbackQuery::default()
    })
    .await;
    assert_eq!(text(customer.payloads), ["f4@1"]);
}

pub(crate) async fn cursors_keep_the_last_value_per_name(store: &Store) {
    let cursors: &dyn CursorStore = store.cursors().as_ref();
    assert_eq!(cursors.get("poller").await.unwrap(), None);
    for value in ["1", "2"] {
        cursors
            .put(Checkpoint {
                name: "poller".to_owned(),
                value: value.to_owned(),
            })
            .await
            .unwrap();
    }
    cursors
        .put(Checkpoint {
            name: "other".to_owned(),
            value: "x".to_owned(),
        })
        .await
        .unwrap();
    assert_eq!(cursors.get("poller").await.unwrap().as_deref(), Some("2"));
    assert_eq!(cursors.get("other").await.unwrap().as_deref(), Some("x"));
}

fn reserve_request(email: &str, scopes: &[(&str, i64)]) -> ReserveRequest {
    ReserveRequest {
        email: email.to_owned(),
        claims: scopes
            .iter()
            .map(|(scope, not_since_ms)| Claim {
                scope: (*scope).to_owned(),
                not_since_ms: *not_since_ms,
            })
            .collect(),
    }
}

pub(crate) async fn fatigue_reservations_block_inside_the_window_until_released(store: &Store) {
    let fatigue: &dyn FatigueStore = store.fatigue().as_ref();
    let first = fatigue
        .reserve("a", 1_000, vec![reserve_request("ann@x.io", &[("", 0)])])
        .await
        .unwrap();
    assert_eq!(first, vec![Reservation::Granted]);
    assert_eq!(
        fatigue.last_surveyed("", "ann@x.io").await.unwrap(),
        Some(1_000)
    );
    let second = fatigue
        .reserve("b", 2_000, vec![reserve_request("ann@x.io", &[("", 500)])])
        .await
        .unwrap();
    assert_eq!(
        second,
        vec![Reservation::Blocked {
            scope: String::new(),
            surveyed_ms: 1_000
        }]
    );
    // The same token passes its own reservation (an outbox retry).
    let again = fatigue
        .reserve(
            "a",
            3_000,
            vec![reserve_request("ann@x.io", &[("", 2_500)])],
        )
        .await
        .unwrap();
    assert_eq!(again, vec![Reservation::Granted]);
    // Releasing a reservation that held no earlier time removes it.
    fatigue.release("a", "ann@x.io").await.unwrap();
    assert_eq!(fatigue.last_surveyed("", "ann@x.io").await.unwrap(), None);
    let third = fatigue
        .reserve(
            "b",
            4_000,
            vec![reserve_request("ann@x.io", &[("", 3_500)])],
        )
        .await
        .unwrap();
    assert_eq!(third, vec![Reservation::Granted]);
    // Another token's release leaves the reservation alone.
    fatigue.release("a", "ann@x.io").await.unwrap();
    assert_eq!(
        fatigue.last_surveyed("", "ann@x.io").await.unwrap(),
        Some(4_000)
    );
}

pub(crate) async fn fatigue_release_puts_back_the_earlier_survey_time(store: &Store) {
    let fatigue: &dyn FatigueStore = store.fatigue().as_ref();
    fatigue
        .reserve("old", 1_000, vec![reserve_request("bo@x.io", &[("", 0)])])
        .await
        .unwrap();
    // Outside a 500 ms window: granted over the old record.
    let granted = fatigue
        .reserve(
            "new",
            5_000,
            vec![reserve_request("bo@x.io", &[("", 4_500)])],
        )
        .await
        .unwrap();
    assert_eq!(granted, vec![Reservation::Granted]);
    // A retry under the same token keeps the time from before its first attempt.
    fatigue
        .reserve(
            "new",
            6_000,
            vec![reserve_request("bo@x.io", &[("", 5_500)])],
        )
        .await
        .unwrap();
    fatigue.release("new", "bo@x.io").await.unwrap();
    assert_eq!(
        fatigue.last_surveyed("", "bo@x.io").await.unwrap(),
        Some(1_000)
    );
    // The put-back time belongs to no reservation: a later release changes nothing.
    fatigue.release("old", "bo@x.io").await.unwrap();
    assert_eq!(
        fatigue.last_surveyed("", "bo@x.io").await.unwrap(),
        Some(1_000)
    );
}

pub(crate) async fn fatigue_recipient_blocked_in_one_scope_reserves_none(store: &Store) {
    let fatigue: &dyn FatigueStore = store.fatigue().as_ref();
    fatigue
        .reserve(
            "a",
            1_000,
            vec![reserve_request("cy@x.io", &[("rule:r1", 0)])],
        )
        .await
        .unwrap();
    let answer = fatigue
        .reserve(
            "b",
            2_000,
            vec![reserve_request("cy@x.io", &[("", 0), ("rule:r1", 0)])],
        )
        .await
        .unwrap();
    assert_eq!(
        answer,
        vec![Reservation::Blocked {
            scope: "rule:r1".into(),
            surveyed_ms: 1_000
        }]
    );
    // The cool-down scope was not taken by the blocked request.
    assert_eq!(fatigue.last_surveyed("", "cy@x.io").await.unwrap(), None);
    // Scopes are separate: the cool-down alone is free.
    let free = fatigue
        .reserve("b", 2_000, vec![reserve_request("cy@x.io", &[("", 0)])])
        .await
        .unwrap();
    assert_eq!(free, vec![Reservation::Granted]);
}

/// Sends to one customer at once: the check and the write are one operation, so exactly one
/// passes whatever the interleaving.
pub(crate) async fn fatigue_concurrent_reservations_of_one_email_grant_exactly_one(store: &Store) {
    const SENDS: usize = 16;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(SENDS));
    let tasks: Vec<_> = (0..SENDS)
        .map(|n| {
            let fatigue = std::sync::Arc::clone(store.fatigue());
            let start = std::sync::Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                fatigue
                    .reserve(
                        &format!("send-{n}"),
                        10_000,
                        vec![reserve_request("eve@x.io", &[("", 0)])],
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.len(), 1);
        if answer[0] == Reservation::Granted {
            granted += 1;
        }
    }
    assert_eq!(granted, 1, "one of {SENDS} concurrent sends passes");
}

pub(crate) async fn fatigue_seeding_keeps_the_later_time_and_marks_the_backfill_done(
    store: &Store,
) {
    let fatigue: &dyn FatigueStore = store.fatigue().as_ref();
    assert!(!fatigue.backfilled().await.unwrap());
    fatigue
        .reserve("a", 9_000, vec![reserve_request("fay@x.io", &[("", 0)])])
        .await
        .unwrap();
    let surveyed = |email: &str, sent_ms| Surveyed {
        email: email.to_owned(),
        sent_ms,
    };
    fatigue
        .seed(
            vec![surveyed("fay@x.io", 5_000), surveyed("gus@x.io", 5_000)],
            false,
        )
        .await
        .unwrap();
    assert!(!fatigue.backfilled().await.unwrap(), "not the last page");
    fatigue
        .seed(vec![surveyed("gus@x.io", 7_000)], true)
        .await
        .unwrap();
    assert!(fatigue.backfilled().await.unwrap());
    // A later time already recorded wins; a later seeded time replaces an earlier one.
    assert_eq!(
        fatigue.last_surveyed("", "fay@x.io").await.unwrap(),
        Some(9_000)
    );
    assert_eq!(
        fatigue.last_surveyed("", "gus@x.io").await.unwrap(),
        Some(7_000)
    );
    // A seeded survey holds back a send inside its window.
    let blocked = fatigue
        .reserve(
            "b",
            8_000,
            vec![reserve_request("gus@x.io", &[("", 6_000)])],
        )
        .await
        .unwrap();
    assert_eq!(
        blocked,
        vec![Reservation::Blocked {
            scope: String::new(),
            surveyed_ms: 7_000
        }]
    );
    assert!(
        store
            .cursors()
            .get(super::fatigue::BACKFILL_CHECKPOINT)
            .await
            .unwrap()
            .is_some()
    );
}

fn pending_alert(
    rule: &str,
    feedback_id: &str,
    delivery_id: &str,
    limit: Option<u32>,
) -> PendingAlert {
    PendingAlert {
        rule: rule.to_owned(),
        feedback_id: feedback_id.to_owned(),
        version: "v1".to_owned(),
        rate_limit: limit.map(|count| RateLimit {
            count,
            per: Duration::from_secs(3600),
        }),
        delivery: QueuedDelivery {
            delivery_id: delivery_id.to_owned(),
            delivery: NewDelivery {
                method: "cx-gateway/Alert".to_owned(),
                request: format!("{rule}/{feedback_id}").into_bytes(),
                destinations: Vec::new(),
                item_count: 1,
                ordering_keys: Vec::new(),
                idempotency_key: None,
                replay_safe: true,
                owner: ":gateway".to_owned(),
            },
            expire_ms: now_ms() + 3_600_000,
            traceparent: Some(format!("trace-{delivery_id}")),
        },
    }
}

pub(crate) async fn the_alert_checkpoint_starts_at_the_head_once(store: &Store) {
    let alerts: &dyn AlertStore = store.alerts().as_ref();
    assert_eq!(alerts.checkpoint().await.unwrap(), None);
    assert_eq!(alerts.checkpoint_or_start_at(5).await.unwrap(), 5);
    // Set once: a later start keeps the evaluator where it was.
    assert_eq!(alerts.checkpoint_or_start_at(0).await.unwrap(), 5);
    assert_eq!(alerts.checkpoint_or_start_at(9).await.unwrap(), 5);
    assert_eq!(alerts.checkpoint().await.unwrap(), Some(5));
}

pub(crate) async fn alerts_queue_once_per_rule_and_version_within_their_rate_limit(store: &Store) {
    let alerts: &dyn AlertStore = store.alerts().as_ref();
    let outbox: &dyn OutboxStore = store.outbox().as_ref();
    let outcomes = alerts
        .queue_alerts(
            vec![
                pending_alert("a", "f1", "alert_1", Some(2)),
                pending_alert("a", "f1", "alert_2", Some(2)),
                pending_alert("b", "f1", "alert_3", None),
                pending_alert("a", "f2", "alert_4", Some(2)),
                pending_alert("a", "f3", "alert_5", Some(2)),
            ],
            9,
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            AlertOutcome::Queued("alert_1".to_owned()),
            AlertOutcome::Duplicate,
            AlertOutcome::Queued("alert_3".to_owned()),
            AlertOutcome::Queued("alert_4".to_owned()),
            AlertOutcome::RateLimited,
        ]
    );
    assert_eq!(alerts.checkpoint().await.unwrap(), Some(9));
    // Queued alerts are deliveries like any other: pending, due now, in queue order.
    let queued = outbox.get("alert_1", None).await.unwrap().unwrap();
    assert_eq!(queued.state, DeliveryState::Pending);
    assert_eq!(queued.method, "cx-gateway/Alert");
    assert!(outbox.get("alert_2", None).await.unwrap().is_none());
    assert!(outbox.get("alert_5", None).await.unwrap().is_none());
    // Owned by the gateway: a caller does not see them.
    assert!(
        outbox
            .get("alert_1", Some("alpha".to_owned()))
            .await
            .unwrap()
            .is_none()
    );
    let claimed = outbox.claim(10).await.unwrap();
    let claimed_ids: Vec<&str> = claimed.iter().map(|c| c.delivery_id.as_str()).collect();
    assert_eq!(claimed_ids, ["alert_1", "alert_3", "alert_4"]);
    assert_eq!(claimed[0].request, b"a/f1");
    assert_eq!(claimed[0].traceparent.as_deref(), Some("trace-alert_1"));

    // The same entries evaluated again queue nothing, the rate-limited one included, and the
    // checkpoint never moves back.
    let again = alerts
        .queue_alerts(
            vec![
                pending_alert("a", "f1", "alert_6", Some(2)),
                pending_alert("a", "f3", "alert_7", Some(2)),
            ],
            7,
        )
        .await
        .unwrap();
    assert_eq!(again, [AlertOutcome::Duplicate, AlertOutcome::Duplicate]);
    assert_eq!(alerts.checkpoint().await.unwrap(), Some(9));
    // Another version of a response alerts again, within the rule's limit.
    let mut updated = pending_alert("b", "f1", "alert_8", None);
    updated.version = "v2".to_owned();
    assert_eq!(
        alerts.queue_alerts(vec![updated], 10).await.unwrap(),
        [AlertOutcome::Queued("alert_8".to_owned())]
    );
    assert_eq!(
        alerts
            .queue_alerts(vec![pending_alert("a", "f4", "alert_9", Some(2))], 11)
            .await
            .unwrap(),
        [AlertOutcome::RateLimited]
    );
    assert_eq!(outbox.depth().await.unwrap().unfinished, 4);
}

pub(crate) async fn a_batch_of_alerts_that_cannot_be_stored_changes_nothing(store: &Store) {
    let alerts: &dyn AlertStore = store.alerts().as_ref();
    let outbox: &dyn OutboxStore = store.outbox().as_ref();
    alerts.checkpoint_or_start_at(3).await.unwrap();
    // A delivery id already taken makes the second alert's insert fail.
    outbox
        .enqueue(delivery("taken", "", &[], true), None)
        .await
        .unwrap();
    let refused = alerts
        .queue_alerts(
            vec![
                pending_alert("a", "f1", "alert_1", None),
                pending_alert("a", "f2", "taken", None),
            ],
            8,
        )
        .await;
    assert!(refused.is_err());
    assert_eq!(alerts.checkpoint().await.unwrap(), Some(3));
    assert!(outbox.get("alert_1", None).await.unwrap().is_none());
    // No key was kept either: the batch evaluated again queues both.
    assert_eq!(
        alerts
            .queue_alerts(
                vec![
                    pending_alert("a", "f1", "alert_1", None),
                    pending_alert("a", "f2", "alert_2", None),
                ],
                8,
            )
            .await
            .unwrap(),
        [
            AlertOutcome::Queued("alert_1".to_owned()),
            AlertOutcome::Queued("alert_2".to_owned()),
        ]
    );
    assert_eq!(alerts.checkpoint().await.unwrap(), Some(8));
}

pub(crate) async fn alert_keys_are_pruned_after_their_keeping_time(store: &Store) {
    let alerts: &dyn AlertStore = store.alerts().as_ref();
    alerts
        .queue_alerts(vec![pending_alert("a", "f1", "alert_1", Some(1))], 1)
        .await
        .unwrap();
    assert_eq!(alerts.prune(Duration::from_secs(3600)).await.unwrap(), 0);
    next_millisecond().await;
    assert_eq!(alerts.prune(Duration::ZERO).await.unwrap(), 1);
    // Forgotten: the same response alerts again, and the rate limit counts from scratch.
    assert_eq!(
        alerts
            .queue_alerts(vec![pending_alert("a", "f1", "alert_2", Some(1))], 2)
            .await
            .unwrap(),
        [AlertOutcome::Queued("alert_2".to_owned())]
    );
}
