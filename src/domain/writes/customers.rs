//! The execution of CustomerService writes: what a SYNC call runs now and what the outbox worker
//! replays later (at background priority) for an ASYNC one. Each takes a validated request and
//! answers with one outcome per item and destination; only a passed deadline fails the call.

use std::future::Future;

use futures_util::future::join_all;
use tokio::time::Instant;

use crate::app::App;
use crate::error::{Error, ErrorCode, FieldViolation, Reason, Result};
use crate::grpc::customers::convert::{self, applied, failed};
use crate::grpc::customers::validation::MAX_ITEMS;
use crate::pb;
use crate::upstream::batching::split_rejection;
use crate::upstream::retently::{EmailOutcome, MAX_CHANGE_BATCH};
use crate::upstream::{CallContext, Priority};

/// How many times array records are sent again without the records Retainly rejected by index.
const MAX_SPLIT_ROUNDS: usize = 3;

/// The destinations of a validated request, in request order.
fn destinations(values: &[i32]) -> Vec<pb::Destination> {
    values
        .iter()
        .filter_map(|value| pb::Destination::try_from(*value).ok())
        .filter(|destination| *destination != pb::Destination::Unspecified)
        .collect()
}

/// Normalised as validation normalised it: Retently keys customers by the trimmed, lower-cased
/// address.
fn normalised_email(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

/// The contract answers DEADLINE_EXCEEDED when the deadline passes before every outcome is known,
/// rather than reporting items as failed that may well have been applied: an item the scheduler
/// gave up on for lack of time, or one whose upstream call was still unanswered (timed out, cut
/// off) when the deadline came.
fn unknown_at_deadline<'a>(
    ctx: &CallContext,
    errors: impl IntoIterator<Item = &'a Error>,
) -> Result<()> {
    let passed = ctx
        .deadline
        .is_some_and(|deadline| Instant::now() >= deadline);
    for error in errors {
        let unknown = error.code() == ErrorCode::DeadlineExceeded
            || (passed && error.code() == ErrorCode::Unavailable);
        if unknown {
            return Err(Error::new(
                ErrorCode::DeadlineExceeded,
                Reason::DeadlineExceeded,
                "the deadline passed before every outcome was known; some writes may have been \
                 applied, repeat the call with the same idempotency key",
            ));
        }
    }
    Ok(())
}

/// One slot per item and destination, filled as the upstream calls answer.
struct Results {
    order: Vec<pb::Destination>,
    results: Vec<pb::CustomerWriteResult>,
}

impl Results {
    fn new(order: Vec<pb::Destination>, items: impl Iterator<Item = (String, String)>) -> Self {
        let results = items
            .enumerate()
            .map(|(index, (customer_id, email))| pb::CustomerWriteResult {
                index: i32::try_from(index).unwrap_or(i32::MAX),
                customer_id,
                email,
                outcomes: Vec::with_capacity(order.len()),
            })
            .collect();
        Self { order, results }
    }

    fn wants(&self, destination: pb::Destination) -> bool {
        self.order.contains(&destination)
    }

    /// Puts each destination's outcomes in the order the request listed the destinations.
    fn finish(
        mut self,
        mut per_destination: Vec<(pb::Destination, Vec<pb::DestinationOutcome>)>,
    ) -> Vec<pb::CustomerWriteResult> {
        for destination in &self.order {
            if let Some(position) = per_destination.iter().position(|(d, _)| d == destination) {
                let (_, outcomes) = per_destination.swap_remove(position);
                for (result, outcome) in self.results.iter_mut().zip(outcomes) {
                    result.outcomes.push(outcome);
                }
            }
        }
        self.results
    }
}

/// Retently's answer for one address of a delete or (un)subscribe.
fn email_outcome(outcome: &Result<EmailOutcome>) -> pb::DestinationOutcome {
    match outcome {
        Ok(outcome) => pb::DestinationOutcome {
            retently_id: outcome.id.clone().unwrap_or_default(),
            ..applied(pb::Destination::Retently, pb::WriteOutcome::Applied)
        },
        Err(error) => failed(pb::Destination::Retently, error),
    }
}

/// Sends address changes in calls of Retently's size, so one failed call fails only its own
/// addresses; one outcome per address, in order.
async fn change_emails<F, Fut>(
    ctx: &CallContext,
    emails: Vec<String>,
    change: F,
) -> Result<Vec<Result<EmailOutcome>>>
where
    F: Fn(Vec<String>) -> Fut,
    Fut: Future<Output = Result<Vec<Result<EmailOutcome>>>>,
{
    let chunks: Vec<Vec<String>> = emails
        .chunks(MAX_CHANGE_BATCH)
        .map(<[String]>::to_vec)
        .collect();
    let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
    let answers = join_all(chunks.into_iter().map(change)).await;
    let mut outcomes = Vec::with_capacity(emails.len());
    for (size, answer) in sizes.into_iter().zip(answers) {
        match answer {
            Ok(chunk) if chunk.len() == size => outcomes.extend(chunk),
            Ok(_) => outcomes.extend((0..size).map(|_| {
                Err(Error::internal(
                    "the upstream answered a batch with a different number of results",
                ))
            })),
            Err(error) => outcomes.extend((0..size).map(|_| Err(error.clone()))),
        }
    }
    unknown_at_deadline(ctx, outcomes.iter().filter_map(|o| o.as_ref().err()))?;
    Ok(outcomes)
}

pub(crate) async fn execute_upsert_customers(
    app: &App,
    request: pb::UpsertCustomersRequest,
    ctx: CallContext,
) -> Result<pb::UpsertCustomersResponse> {
    let results = Results::new(
        destinations(&request.destinations),
        request
            .customers
            .iter()
            .map(|c| (c.customer_id.clone(), c.email.clone())),
    );
    let retently = async {
        if !results.wants(pb::Destination::Retently) {
            return None;
        }
        let inputs = request
            .customers
            .iter()
            .map(|c| convert::retently_customer(c, normalised_email(&c.email)))
            .collect();
        Some(app.retently.upsert_customers(&ctx, inputs).await)
    };
    let retainly = async {
        if !results.wants(pb::Destination::Retainly) {
            return None;
        }
        let customers = request
            .customers
            .iter()
            .map(|c| {
                let email = (!c.email.is_empty()).then(|| normalised_email(&c.email));
                convert::retainly_customer(c, email)
            })
            .collect();
        Some(app.retainly.upsert_customers(&ctx, customers).await)
    };
    let (retently, retainly) = tokio::join!(retently, retainly);
    let errors = retently
        .iter()
        .flatten()
        .filter_map(|r| r.as_ref().err())
        .chain(retainly.iter().flatten().filter_map(|r| r.as_ref().err()));
    unknown_at_deadline(&ctx, errors)?;
    let mut per_destination = Vec::new();
    if let Some(outcomes) = retently {
        let outcomes = outcomes
            .iter()
            .map(|outcome| match outcome {
                Ok(upsert) => pb::DestinationOutcome {
                    retently_id: upsert.id.clone().unwrap_or_default(),
                    ..applied(
                        pb::Destination::Retently,
                        convert::upsert_outcome(&upsert.status),
                    )
                },
                Err(error) => failed(pb::Destination::Retently, error),
            })
            .collect();
        per_destination.push((pb::Destination::Retently, outcomes));
    }
    if let Some(outcomes) = retainly {
        let outcomes = outcomes
            .iter()
            .map(|outcome| match outcome {
                Ok(()) => applied(pb::Destination::Retainly, pb::WriteOutcome::Applied),
                Err(error) => failed(pb::Destination::Retainly, error),
            })
            .collect();
        per_destination.push((pb::Destination::Retainly, outcomes));
    }
    Ok(pb::UpsertCustomersResponse {
        delivery_id: String::new(),
        results: results.finish(per_destination),
    })
}

pub(crate) async fn execute_delete_customers(
    app: &App,
    request: pb::DeleteCustomersRequest,
    ctx: CallContext,
) -> Result<pb::DeleteCustomersResponse> {
    let results = Results::new(
        destinations(&request.destinations),
        request
            .customers
            .iter()
            .map(|c| (c.customer_id.clone(), c.email.clone())),
    );
    let retently = async {
        if !results.wants(pb::Destination::Retently) {
            return None;
        }
        let emails = request
            .customers
            .iter()
            .map(|c| normalised_email(&c.email))
            .collect();
        Some(
            change_emails(&ctx, emails, |chunk| {
                let ctx = ctx.clone();
                async move { app.retently.delete_customers(&ctx, chunk).await }
            })
            .await,
        )
    };
    let retainly = async {
        if !results.wants(pb::Destination::Retainly) {
            return None;
        }
        let ids = request
            .customers
            .iter()
            .map(|c| c.customer_id.clone().into())
            .collect();
        Some(app.retainly.delete_customers(&ctx, ids).await)
    };
    let (retently, retainly) = tokio::join!(retently, retainly);
    if let Some(Err(error)) = &retainly {
        unknown_at_deadline(&ctx, [error])?;
    }
    let mut per_destination = Vec::new();
    if let Some(outcomes) = retently {
        per_destination.push((
            pb::Destination::Retently,
            outcomes?.iter().map(email_outcome).collect(),
        ));
    }
    if let Some(answer) = retainly {
        // One answer for the whole call: every customer shares it. Retainly deletes of unknown
        // ids succeed, so there is nothing per customer to tell apart.
        let outcome = match answer {
            Ok(()) => applied(pb::Destination::Retainly, pb::WriteOutcome::Applied),
            Err(error) => failed(pb::Destination::Retainly, &error),
        };
        per_destination.push((
            pb::Destination::Retainly,
            vec![outcome; request.customers.len()],
        ));
    }
    Ok(pb::DeleteCustomersResponse {
        delivery_id: String::new(),
        results: results.finish(per_destination),
    })
}

/// Unsubscribe (`Some(message)`) or resubscribe (`None`): one RETENTLY outcome per address.
async fn subscription_change(
    app: &App,
    emails: &[String],
    message: Option<String>,
    ctx: CallContext,
) -> Result<Vec<pb::CustomerWriteResult>> {
    let results = Results::new(
        vec![pb::Destination::Retently],
        emails.iter().map(|email| (String::new(), email.clone())),
    );
    let normalised = emails.iter().map(|email| normalised_email(email)).collect();
    let outcomes = change_emails(&ctx, normalised, |chunk| {
        let ctx = ctx.clone();
        let message = message.clone();
        async move {
            match message {
                Some(message) => {
                    // An empty note is "not set" in proto3 and is not sent.
                    let message = (!message.is_empty()).then_some(message);
                    app.retently
                        .unsubscribe_customers(&ctx, chunk, message)
                        .await
                }
                None => app.retently.resubscribe_customers(&ctx, chunk).await,
            }
        }
    })
    .await?;
    Ok(results.finish(vec![(
        pb::Destination::Retently,
        outcomes.iter().map(email_outcome).collect(),
    )]))
}

pub(crate) async fn execute_unsubscribe_customers(
    app: &App,
    request: pb::UnsubscribeCustomersRequest,
    ctx: CallContext,
) -> Result<pb::UnsubscribeCustomersResponse> {
    let results = subscription_change(app, &request.emails, Some(request.message), ctx).await?;
    Ok(pb::UnsubscribeCustomersResponse {
        delivery_id: String::new(),
        results,
    })
}

pub(crate) async fn execute_resubscribe_customers(
    app: &App,
    request: pb::ResubscribeCustomersRequest,
    ctx: CallContext,
) -> Result<pb::ResubscribeCustomersResponse> {
    let results = subscription_change(app, &request.emails, None, ctx).await?;
    Ok(pb::ResubscribeCustomersResponse {
        delivery_id: String::new(),
        results,
    })
}

/// Sends `records` with `send`; when Retainly rejects the call because of some records (a 422
/// whose every violation names `records[i]`), those records fail with their own violations and
/// the others are sent again. One result per record, in order.
async fn send_records<T, F, Fut>(records: Vec<T>, send: F) -> Vec<Result<()>>
where
    T: Clone,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut results: Vec<Option<Result<()>>> = vec![None; records.len()];
    // (position in the request, record) of the records still to send.
    let mut pending: Vec<(usize, T)> = records.into_iter().enumerate().collect();
    for _ in 0..MAX_SPLIT_ROUNDS {
        if pending.is_empty() {
            break;
        }
        let batch = pending.iter().map(|(_, record)| record.clone()).collect();
        let error = match send(batch).await {
            Ok(()) => {
                for (position, _) in pending.drain(..) {
                    results[position] = Some(Ok(()));
                }
                break;
            }
            Err(error) => error,
        };
        let Some(rejected) = rejected_records(&error, pending.len()) else {
            for (position, _) in pending.drain(..) {
                results[position] = Some(Err(error.clone()));
            }
            break;
        };
        let mut keep = Vec::with_capacity(pending.len());
        for (index, (position, record)) in pending.into_iter().enumerate() {
            match rejected.iter().find(|(rejected, _)| *rejected == index) {
                Some((_, violations)) => {
                    results[position] = Some(Err(record_error(&error, violations.clone())));
                }
                None => keep.push((position, record)),
            }
        }
        pending = keep;
    }
    let unsent = Error::internal("records were rejected too many times; the rest was not sent");
    results
        .into_iter()
        .map(|result| result.unwrap_or_else(|| Err(unsent.clone())))
        .collect()
}

/// For an INVALID_ARGUMENT whose every violation names `records[i]` (`i < len`), the violations
/// per record index, with fields in the contract's terms relative to the record (the batching
/// of the scheduler splits its rejections the same way).
fn rejected_records(error: &Error, len: usize) -> Option<Vec<(usize, Vec<FieldViolation>)>> {
    let mut per_record = split_rejection(error, "records", len)?;
    for violation in per_record.iter_mut().flat_map(|(_, violations)| violations) {
        violation.field = contract_field(&violation.field);
    }
    Some(per_record)
}

/// Retainly's names within a record (`data[2].amount`, `ids[0]`) in the contract's
/// (`items[2].fields.amount`, `item_ids[0]`).
fn contract_field(field: &str) -> String {
    if let Some(rest) = field.strip_prefix("data[")
        && let Some((index, rest)) = rest.split_once(']')
    {
        return match rest.strip_prefix('.') {
            Some(inner) => format!("items[{index}].fields.{inner}"),
            None => format!("items[{index}]{rest}"),
        };
    }
    match field.strip_prefix("ids") {
        Some(rest) => format!("item_ids{rest}"),
        None => field.to_owned(),
    }
}

/// The error one rejected record gets: the upstream's rejection with only its own violations.
fn record_error(error: &Error, violations: Vec<FieldViolation>) -> Error {
    let detail = violations
        .iter()
        .map(|v| match v.field.as_str() {
            "" => v.description.clone(),
            field => format!("{field}: {}", v.description),
        })
        .collect::<Vec<_>>()
        .join("; ");
    let mut rejected = Error::new(
        error.code(),
        error.reason(),
        format!("retainly rejected this record: {detail}"),
    )
    .with_violations(violations);
    for (key, value) in error.metadata() {
        rejected = rejected.with_metadata(key.clone(), value.clone());
    }
    rejected
}

/// The shared error when every record failed with the same transient error (one failed call),
/// `None` when any record was applied or rejected on its own.
fn failed_as_a_whole(outcomes: &[Result<()>]) -> Option<Error> {
    let mut errors = outcomes.iter().map(|outcome| outcome.as_ref().err());
    let first = errors.next()??;
    let transient = matches!(
        first.code(),
        ErrorCode::Unavailable | ErrorCode::ResourceExhausted | ErrorCode::DeadlineExceeded
    );
    let shared = errors.all(|error| {
        error.is_some_and(|e| e.code() == first.code() && e.reason() == first.reason())
    });
    (transient && shared).then(|| first.clone())
}

fn record_results(
    records: impl Iterator<Item = (String, String)>,
    outcomes: Vec<Result<()>>,
) -> Vec<pb::ArrayRecordResult> {
    records
        .zip(outcomes)
        .enumerate()
        .map(|(index, ((customer_id, field), outcome))| {
            let (outcome, error) = match outcome {
                Ok(()) => (pb::WriteOutcome::Applied, None),
                Err(error) => (
                    pb::WriteOutcome::Failed,
                    Some(crate::grpc::convert::error_to_item(&error)),
                ),
            };
            pb::ArrayRecordResult {
                index: i32::try_from(index).unwrap_or(i32::MAX),
                customer_id,
                field,
                outcome: outcome as i32,
                error,
            }
        })
        .collect()
}

pub(crate) async fn execute_upsert_array_items(
    app: &App,
    request: pb::UpsertCustomerArrayItemsRequest,
    ctx: CallContext,
) -> Result<pb::UpsertCustomerArrayItemsResponse> {
    let records = request.records.iter().map(convert::array_record).collect();
    let outcomes = send_records(records, |batch| {
        let ctx = ctx.clone();
        async move { app.retainly.upsert_array_items(&ctx, batch).await }
    })
    .await;
    unknown_at_deadline(&ctx, outcomes.iter().filter_map(|o| o.as_ref().err()))?;
    // This write must not run twice (items without an id are appended), so the outbox is not
    // allowed to repeat it on a failed item. When it replays the write (at background priority)
    // and the call failed as a whole, the failure is the call's error instead: the outbox then
    // retries what surely did not reach Retainly and dead-letters, in doubt, what may have. A
    // caller waiting in SYNC mode gets per-record outcomes, as the contract says.
    if ctx.priority == Priority::Background
        && let Some(error) = failed_as_a_whole(&outcomes)
    {
        return Err(error);
    }
    Ok(pb::UpsertCustomerArrayItemsResponse {
        delivery_id: String::new(),
        results: record_results(
            request
                .records
                .into_iter()
                .map(|r| (r.customer_id, r.field)),
            outcomes,
        ),
    })
}

pub(crate) async fn execute_delete_array_items(
    app: &App,
    request: pb::DeleteCustomerArrayItemsRequest,
    ctx: CallContext,
) -> Result<pb::DeleteCustomerArrayItemsResponse> {
    let records = request
        .records
        .iter()
        .map(convert::array_deletion)
        .collect();
    let outcomes = send_records(records, |batch| {
        let ctx = ctx.clone();
        async move { app.retainly.delete_array_items(&ctx, batch).await }
    })
    .await;
    unknown_at_deadline(&ctx, outcomes.iter().filter_map(|o| o.as_ref().err()))?;
    Ok(pb::DeleteCustomerArrayItemsResponse {
        delivery_id: String::new(),
        results: record_results(
            request
                .records
                .into_iter()
                .map(|r| (r.customer_id, r.field)),
            outcomes,
        ),
    })
}

// Validation bounds every write to what one Retainly call takes, so `send_records` sends each
// request whole and the indices Retainly reports are the request's own.
const _: () = assert!(MAX_ITEMS <= crate::upstream::retainly::MAX_BATCH);

/// Whether a per-item failure may pass on a later attempt (the outbox then retries the write):
/// the same rule the outbox applies to a failed call.
fn is_transient(error: Option<&pb::ItemError>) -> bool {
    use tonic::Code;
    error.is_some_and(|error| {
        // Responses carry the reason as its wire string; decide on the typed reason it names.
        let credentials = matches!(
            Reason::parse(&error.reason),
            Some(Reason::UpstreamCredentialsRejected | Reason::UpstreamCredentialsInvalid)
        );
        credentials
            || [
                Code::Unavailable,
                Code::ResourceExhausted,
                Code::DeadlineExceeded,
                Code::Aborted,
                Code::Cancelled,
            ]
            .iter()
            .any(|code| *code as i32 == error.code)
    })
}

pub(crate) fn customer_results_transient(results: &[pb::CustomerWriteResult]) -> bool {
    results
        .iter()
        .flat_map(|result| &result.outcomes)
        .any(|outcome| is_transient(outcome.error.as_ref()))
}

pub(crate) fn record_results_transient(results: &[pb::ArrayRecordResult]) -> bool {
    results
        .iter()
        .any(|result| is_transient(result.error.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    fn invalid(fields: &[&str]) -> Error {
        Error::new(
            ErrorCode::InvalidArgument,
            Reason::UpstreamInvalidArgument,
            "rejected",
        )
        .with_violations(
            fields
                .iter()
                .map(|f| FieldViolation::new(*f, "bad"))
                .collect(),
        )
        .with_metadata("upstream", "retainly")
    }

    #[tokio::test]
    async fn rejected_records_fail_alone_and_the_rest_is_sent_again() {
        let calls = Mutex::new(Vec::new());
        let outcomes = send_records(vec!["a", "b", "c"], |batch| {
            calls.lock().unwrap().push(batch.clone());
            async move {
                match batch.as_slice() {
                    ["a", "b", "c"] => Err(invalid(&["records[1].data[0].amount"])),
                    ["a", "c"] => Ok(()),
                    other => panic!("unexpected batch {other:?}"),
                }
            }
        })
        .await;
        assert_eq!(calls.lock().unwrap().len(), 2);
        assert!(outcomes[0].is_ok() && outcomes[2].is_ok());
        let error = outcomes[1].as_ref().unwrap_err();
        assert_eq!(error.violations()[0].field, "items[0].fields.amount");
        assert_eq!(error.metadata()["upstream"], "retainly");
    }

    #[tokio::test]
    async fn other_failures_fail_every_record() {
        let unavailable = Error::new(ErrorCode::Unavailable, Reason::UpstreamUnavailable, "down");
        let outcomes = send_records(vec![1, 2], |_| {
            let error = unavailable.clone();
            async move { Err(error) }
        })
        .await;
        assert!(
            outcomes
                .iter()
                .all(|o| o.as_ref().unwrap_err().code() == ErrorCode::Unavailable)
        );
        // A violation outside the records is about the call, not a record.
        let outcomes = send_records(vec![1, 2], |_| async { Err(invalid(&["records"])) }).await;
        assert!(outcomes.iter().all(Result::is_err));
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_unknown_at_the_deadline_fail_the_call() {
        let unavailable = Error::new(ErrorCode::Unavailable, Reason::UpstreamTimeout, "no answer");
        let rejected = invalid(&["records[0]"]);
        let later = CallContext::interactive_within(Duration::from_secs(1));
        assert!(unknown_at_deadline(&later, [&unavailable, &rejected]).is_ok());
        let passed = CallContext::interactive(Some(Instant::now()));
        let error = unknown_at_deadline(&passed, [&rejected, &unavailable]).unwrap_err();
        assert_eq!(error.code(), ErrorCode::DeadlineExceeded);
        // Known outcomes stay per item even after the deadline.
        assert!(unknown_at_deadline(&passed, [&rejected]).is_ok());
        // The scheduler's own verdict counts whenever it comes.
        let gave_up = Error::new(
            ErrorCode::DeadlineExceeded,
            Reason::DeadlineExceeded,
            "too late",
        );
        assert!(unknown_at_deadline(&later, [&gave_up]).is_err());
        assert!(unknown_at_deadline(&CallContext::background(), [&unavailable]).is_ok());
    }

    #[test]
    fn only_a_whole_failed_call_is_the_error_of_a_replay() {
        let down = Error::new(ErrorCode::Unavailable, Reason::UpstreamUnavailable, "down");
        assert!(failed_as_a_whole(&[Err(down.clone()), Err(down.clone())]).is_some());
        assert!(failed_as_a_whole(&[Err(down.clone()), Ok(())]).is_none());
        assert!(failed_as_a_whole(&[Err(invalid(&["records[0]"])), Err(down)]).is_none());
        assert!(failed_as_a_whole(&[Err(invalid(&["records[0]"]))]).is_none());
    }

    #[test]
    fn retainly_fields_are_named_in_contract_terms() {
        assert_eq!(contract_field("data[2].amount"), "items[2].fields.amount");
        assert_eq!(contract_field("data[2]"), "items[2]");
        assert_eq!(contract_field("ids[0]"), "item_ids[0]");
        assert_eq!(contract_field("field"), "field");
    }
}
