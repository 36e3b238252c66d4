//! Driving one coalesced batch through the lane, and splitting the upstream's answer back to
//! the callers — shared by the Retently and Retainly batchers.

use std::collections::HashSet;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use opentelemetry::trace::{SpanId, TraceId};
use serde::Serialize;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::error::{Error, ErrorCode, FieldViolation, Result};
use crate::upstream::context::CallContext;
use crate::upstream::scheduler::batch::{BatchHandle, Batcher, Pending};
use crate::upstream::scheduler::{AttemptError, Idempotency, Lane};

/// How many times a batch is re-sent without the items the upstream rejected by index.
const MAX_ROUNDS: usize = 3;
/// Callers a batch's span links to at most; `batch.callers` counts them all. A full Retainly
/// batch can run for thousands of callers, and a span's links stay in memory until it ends.
const MAX_LINKS: usize = 32;
/// Scheduler yields a batch waits at most for runnable callers to join before it is sealed.
const SETTLE_YIELDS: usize = 16;
/// Under load, how long a batch waits for the next caller of the wave it expects before it
/// gives up on the rest, and how long it waits for the wave at most. Small next to an
/// upstream round trip, large enough for a caller's next request to cross the gRPC hop.
const WAVE_QUIET: Duration = Duration::from_millis(2);
const WAVE_MAX: Duration = Duration::from_millis(5);

/// Adds one caller's `item` to `batcher`'s batch of `key` and waits for the item's own
/// outcome. A new batch is driven by `run` (usually through [`drive`]); `identity` names the
/// item among its batch mates, and its encoded size counts toward the batch's byte limit. A
/// caller whose deadline passes while its item still waits in an open batch gets the lane's
/// budget error for its priority.
pub async fn submit_one<K, I, O, R>(
    lane: &Lane,
    batcher: &Batcher<K, I, O>,
    key: K,
    item: I,
    ctx: &CallContext,
    identity: String,
    run: R,
) -> Result<O>
where
    K: Eq + Hash + Clone + Send + 'static,
    I: Serialize + Send + 'static,
    O: Send + 'static,
    R: FnOnce(BatchHandle<K, I, O>) -> BoxFuture<'static, ()>,
{
    // The size only decides where batches split; an item that cannot be measured counts as a
    // small one.
    let bytes = serde_json::to_vec(&item).map_or(256, |bytes| bytes.len());
    let priority = ctx.priority;
    batcher
        .submit(key, item, ctx, Some(identity), bytes, run, || {
            lane.budget_error_for(priority)
        })
        .await
}

/// Runs a batch: waits for its turn and a budget slot, seals it, sends it with `send`, and
/// answers every item. When the upstream rejects the whole request because of some items
/// (`400/422` naming `<list_field>[i]`), those items get the rejection (fields rebased to the
/// item) and the others are sent again, so one caller's bad input does not fail its batch mates.
pub async fn drive<K, I, O, S, Fut>(
    lane: Lane,
    handle: BatchHandle<K, I, O>,
    idempotency: Idempotency,
    list_field: &'static str,
    send: S,
) where
    K: Eq + std::hash::Hash + Clone,
    I: Clone,
    S: Fn(Arc<Vec<I>>, Duration) -> Fut,
    Fut: Future<Output = Result<Vec<Result<O>>, AttemptError>>,
{
    // One span per flushed batch: from its opening to the last answer, with its size once
    // sealed. It is in the trace of the call that opened the batch, and links to the span of
    // every caller whose items it carries (see `link_callers`).
    let span = tracing::info_span!(
        "upstream.batch",
        upstream = lane.upstream(),
        items = list_field,
        batch.size = tracing::field::Empty,
        batch.callers = tracing::field::Empty,
    );
    drive_batch(lane, handle, idempotency, list_field, send, span.clone())
        .instrument(span)
        .await;
}

async fn drive_batch<K, I, O, S, Fut>(
    lane: Lane,
    mut handle: BatchHandle<K, I, O>,
    idempotency: Idempotency,
    list_field: &'static str,
    send: S,
    span: tracing::Span,
) where
    K: Eq + std::hash::Hash + Clone,
    I: Clone,
    S: Fn(Arc<Vec<I>>, Duration) -> Fut,
    Fut: Future<Output = Result<Vec<Result<O>>, AttemptError>>,
{
    if !handle.wait_turn().await {
        return;
    }
    let Some(waiting) = handle.waiting_context() else {
        return;
    };
    let permit = match lane.admit(&waiting).await {
        Ok(permit) => permit,
        Err(error) => {
            handle.fail_all(&error);
            return;
        }
    };
    handle.settle(SETTLE_YIELDS).await;
    handle.gather(WAVE_QUIET, WAVE_MAX).await;
    let min_time = lane.settings().min_attempt_time;
    let (items, ctx) = handle.seal(min_time, || lane.budget_error_for(waiting.priority));
    let Some(ctx) = ctx else {
        lane.refund(permit);
        return;
    };
    let mut items = items;
    span.record("batch.size", items.len());
    link_callers(&span, &items);
    crate::telemetry::metrics().batch_size.record(
        items.len() as u64,
        &[
            opentelemetry::KeyValue::new("upstream", lane.upstream()),
            opentelemetry::KeyValue::new("items", list_field),
        ],
    );
    let mut permit = Some(permit);
    for _ in 0..MAX_ROUNDS {
        let inputs = Arc::new(
            items
                .iter()
                .map(|pending| pending.item.clone())
                .collect::<Vec<I>>(),
        );
        let attempt = |timeout| send(Arc::clone(&inputs), timeout);
        let result = match permit.take() {
            Some(permit) => lane.run_admitted(permit, &ctx, idempotency, attempt).await,
            None => lane.call(&ctx, idempotency, attempt).await,
        };
        match result {
            Ok(outcomes) => {
                answer(items, outcomes);
                return;
            }
            Err(error) => match split_rejection(&error, list_field, items.len()) {
                Some(rejected) if rejected.len() < items.len() => {
                    items = reject_some(items, rejected, &error);
                }
                Some(rejected) => {
                    reject_some(items, rejected, &error);
                    return;
                }
                None => {
                    fail(items, &error);
                    return;
                }
            },
        }
    }
    fail(
        items,
        &Error::internal("a batch was rejected too many times; its items were not sent"),
    );
}

/// Links the batch's span to its callers' spans (each once, at most [`MAX_LINKS`]) and records
/// how many distinct callers it carries. A caller sending several items is one caller.
fn link_callers<I, O>(span: &tracing::Span, items: &[Pending<I, O>]) {
    let mut seen: HashSet<(TraceId, SpanId)> = HashSet::new();
    for caller in items.iter().filter_map(Pending::caller) {
        if seen.insert((caller.trace_id(), caller.span_id())) && seen.len() <= MAX_LINKS {
            span.add_link(caller.clone());
        }
    }
    if !seen.is_empty() {
        span.record("batch.callers", seen.len());
    }
}

fn answer<I, O>(items: Vec<Pending<I, O>>, outcomes: Vec<Result<O>>) {
    if outcomes.len() != items.len() {
        let error =
            Error::internal("the upstream answered a batch with a different number of results");
        fail(items, &error);
        return;
    }
    for (pending, outcome) in items.into_iter().zip(outcomes) {
        pending.reply(outcome);
    }
}

fn fail<I, O>(items: Vec<Pending<I, O>>, error: &Error) {
    for pending in items {
        pending.reply(Err(error.clone()));
    }
}

/// Answers the rejected items and returns the others.
fn reject_some<I, O>(
    items: Vec<Pending<I, O>>,
    mut rejected: Vec<(usize, Vec<FieldViolation>)>,
    error: &Error,
) -> Vec<Pending<I, O>> {
    let mut keep = Vec::new();
    for (index, pending) in items.into_iter().enumerate() {
        match rejected.iter().position(|(rejected, _)| *rejected == index) {
            Some(position) => {
                let (_, violations) = rejected.swap_remove(position);
                pending.reply(Err(rebased(error, violations)));
            }
            None => keep.push(pending),
        }
    }
    keep
}

/// The error one item gets: the upstream's rejection with only its own violations.
fn rebased(error: &Error, violations: Vec<FieldViolation>) -> Error {
    let message = match violations.as_slice() {
        [only] if only.field.is_empty() => {
            format!("the upstream rejected this item: {}", only.description)
        }
        [only] => format!(
            "the upstream rejected this item: {}: {}",
            only.field, only.description
        ),
        many => format!("the upstream rejected {} fields of this item", many.len()),
    };
    let mut rebased = Error::new(error.code(), error.reason(), message).with_violations(violations);
    for (key, value) in error.metadata() {
        rebased = rebased.with_metadata(key.clone(), value.clone());
    }
    rebased
}

/// For an `INVALID_ARGUMENT` whose every violation names `<list_field>[i]`, the violations per
/// item index with fields relative to the item. `None` when the rejection is not per item.
pub(crate) fn split_rejection(
    error: &Error,
    list_field: &str,
    len: usize,
) -> Option<Vec<(usize, Vec<FieldViolation>)>> {
    if error.code() != ErrorCode::InvalidArgument || error.violations().is_empty() {
        return None;
    }
    let mut per_item: Vec<(usize, Vec<FieldViolation>)> = Vec::new();
    for violation in error.violations() {
        let rest = violation
            .field
            .strip_prefix(list_field)?
            .strip_prefix('[')?;
        let (index, rest) = rest.split_once(']')?;
        let index: usize = index.parse().ok()?;
        if index >= len {
            return None;
        }
        let field = rest.strip_prefix('.').unwrap_or(rest).to_owned();
        let description = violation.description.clone();
        let violation = FieldViolation::new(field, description);
        match per_item.iter_mut().find(|(i, _)| *i == index) {
            Some((_, violations)) => violations.push(violation),
            None => per_item.push((index, vec![violation])),
        }
    }
    Some(per_item)
}

/// `upstream`'s rejection of a call, naming `fields`, as its client reports a 400/422.
#[cfg(test)]
pub(crate) fn rejection(upstream: &str, fields: &[&str]) -> Error {
    Error::new(
        ErrorCode::InvalidArgument,
        crate::error::Reason::UpstreamInvalidArgument,
        "rejected",
    )
    .with_violations(
        fields
            .iter()
            .map(|f| FieldViolation::new(*f, "bad"))
            .collect(),
    )
    .with_metadata("upstream", upstream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;

    fn invalid(fields: &[&str]) -> Error {
        rejection("retently", fields)
    }

    #[test]
    fn violations_naming_items_are_split_per_item() {
        let split = split_rejection(
            &invalid(&[
                "subscribers[2].email",
                "subscribers[0].properties[1].value",
                "subscribers[2].tags",
            ]),
            "subscribers",
            3,
        )
        .unwrap();
        assert_eq!(split.len(), 2);
        assert_eq!(split[0].0, 2);
        assert_eq!(split[0].1[0].field, "email");
        assert_eq!(split[0].1[1].field, "tags");
        assert_eq!(split[1].1[0].field, "properties[1].value");
    }

    #[test]
    fn rejections_not_about_items_are_not_split() {
        assert!(split_rejection(&invalid(&["campaign"]), "subscribers", 3).is_none());
        assert!(split_rejection(&invalid(&["subscribers[5].email"]), "subscribers", 3).is_none());
        let unavailable = Error::new(ErrorCode::Unavailable, Reason::UpstreamUnavailable, "down");
        assert!(split_rejection(&unavailable, "subscribers", 3).is_none());
    }

    #[test]
    fn rebased_errors_keep_code_reason_and_metadata() {
        let error = rebased(&invalid(&["x"]), vec![FieldViolation::new("email", "bad")]);
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
        assert_eq!(error.reason(), Reason::UpstreamInvalidArgument);
        assert_eq!(error.metadata()["upstream"], "retently");
        assert_eq!(
            error.message(),
            "the upstream rejected this item: email: bad"
        );
    }
}
