//! The execution of CustomerService writes: what a SYNC call runs now and what the outbox worker
//! replays later (at background priority) for an ASYNC one. Each takes a validated command and
//! answers with one outcome per item and destination; only a passed deadline fails the call.

use std::future::Future;

use futures_util::future::join_all;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::values::{Destination, Property, non_empty, property_to_retently, retainly_value};
use crate::app::App;
use crate::error::{Error, ErrorCode, FieldViolation, Reason, Result};
use crate::upstream::batching::split_rejection;
use crate::upstream::retainly::{
    ArrayChange, ArrayDeletion, ArrayRecord, RetainlyCustomer, RetainlyId,
};
use crate::upstream::retently::{CustomerInput, EmailOutcome, MAX_CHANGE_BATCH, UpsertStatus};
use crate::upstream::{CallContext, Priority};

/// Customers, addresses or array records per write: what one Retainly call takes at most
/// (asserted below), so a write is never split across calls.
pub const MAX_ITEMS: usize = 10_000;

/// How many times array records are sent again without the records Retainly rejected by index.
const MAX_SPLIT_ROUNDS: usize = 3;

// ---- commands ----

/// A customer to upsert, as validation accepted it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Customer {
    /// Retainly's key; may be empty when the customer goes to Retently only.
    pub customer_id: String,
    /// Retently's key; may be empty when the customer goes to Retainly only.
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub company: String,
    pub tags: Vec<String>,
    pub properties: Vec<Property>,
}

/// A customer named by its keys at both upstreams.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomerRef {
    pub customer_id: String,
    pub email: String,
}

/// UpsertCustomers: every customer to every destination, in the order given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpsertCustomers {
    pub destinations: Vec<Destination>,
    pub customers: Vec<Customer>,
}

/// DeleteCustomers: every customer from every destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteCustomers {
    pub destinations: Vec<Destination>,
    pub customers: Vec<CustomerRef>,
}

/// UnsubscribeCustomers at Retently, with the optional note (empty: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnsubscribeCustomers {
    pub emails: Vec<String>,
    pub message: String,
}

/// ResubscribeCustomers at Retently.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResubscribeCustomers {
    pub emails: Vec<String>,
}

/// One item of a customer's array field; an empty `item_id` appends it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArrayItem {
    pub item_id: String,
    pub fields: Map<String, Value>,
}

/// Items for one array field of one customer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArrayItems {
    pub customer_id: String,
    pub field: String,
    pub items: Vec<ArrayItem>,
}

/// Item ids to remove from one array field of one customer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArrayItemIds {
    pub customer_id: String,
    pub field: String,
    pub item_ids: Vec<String>,
}

/// UpsertCustomerArrayItems.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpsertArrayItems {
    pub records: Vec<ArrayItems>,
}

/// DeleteCustomerArrayItems.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteArrayItems {
    pub records: Vec<ArrayItemIds>,
}

// ---- outcomes ----

/// What a write did at one destination that took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Done; the upstream did not say more.
    Applied,
    Created,
    Updated,
}

/// A destination that took the item: what it did and, at Retently, the customer's id there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: WriteOutcome,
    /// Empty when unknown or not at Retently.
    pub retently_id: String,
}

/// One destination's answer for one item.
#[derive(Debug, Clone)]
pub struct DestinationOutcome {
    pub destination: Destination,
    pub result: Result<Applied>,
}

/// One customer's outcomes, one per destination in the order the command listed them; its
/// position is the customer's position in the command.
#[derive(Debug, Clone)]
pub struct CustomerWriteResult {
    pub customer_id: String,
    pub email: String,
    pub outcomes: Vec<DestinationOutcome>,
}

/// One array record's outcome; its position is the record's position in the command.
#[derive(Debug, Clone)]
pub struct ArrayRecordResult {
    pub customer_id: String,
    pub field: String,
    pub result: Result<()>,
}

// ---- to the upstreams ----

/// The Retently subscriber of a validated customer, keyed by its normalised `email`.
pub fn retently_customer(customer: &Customer, email: String) -> CustomerInput {
    CustomerInput {
        email,
        first_name: non_empty(&customer.first_name),
        last_name: non_empty(&customer.last_name),
        company: non_empty(&customer.company),
        // Output only in the contract: never sent.
        job_title: None,
        tags: (!customer.tags.is_empty()).then(|| customer.tags.clone()),
        properties: customer
            .properties
            .iter()
            .filter_map(property_to_retently)
            .collect(),
    }
}

/// The Retainly customer of a validated customer: `id` plus the standard fields that are set and
/// one top-level field per property.
pub fn retainly_customer(customer: &Customer, email: Option<String>) -> RetainlyCustomer {
    let mut fields = Map::new();
    if let Some(email) = email {
        fields.insert("email".to_owned(), Value::String(email));
    }
    for (key, value) in [
        ("first_name", &customer.first_name),
        ("last_name", &customer.last_name),
        ("company", &customer.company),
    ] {
        if let Some(value) = non_empty(value) {
            fields.insert(key.to_owned(), Value::String(value));
        }
    }
    if !customer.tags.is_empty() {
        fields.insert(
            "tags".to_owned(),
            Value::Array(customer.tags.iter().cloned().map(Value::String).collect()),
        );
    }
    for property in &customer.properties {
        if let Some(value) = property.value.as_ref().and_then(retainly_value) {
            fields.insert(property.name.clone(), value);
        }
    }
    RetainlyCustomer {
        id: RetainlyId::Text(customer.customer_id.clone()),
        fields,
    }
}

/// `{customer_id, field, data}`; an item's id goes first as `id`, beside its fields.
pub fn array_record(record: &ArrayItems) -> ArrayRecord {
    ArrayRecord {
        customer_id: RetainlyId::Text(record.customer_id.clone()),
        field: record.field.clone(),
        data: record
            .items
            .iter()
            .map(|item| {
                let mut object = Map::new();
                if !item.item_id.is_empty() {
                    object.insert("id".to_owned(), Value::String(item.item_id.clone()));
                }
                for (key, value) in &item.fields {
                    object.insert(key.clone(), value.clone());
                }
                object
            })
            .collect(),
    }
}

/// `{customer_id, field, ids}` with the ids as JSON strings.
pub fn array_deletion(record: &ArrayItemIds) -> ArrayDeletion {
    ArrayDeletion {
        customer_id: RetainlyId::Text(record.customer_id.clone()),
        field: record.field.clone(),
        ids: record.item_ids.iter().cloned().map(Value::String).collect(),
    }
}

/// What a Retently upsert did: `created`/`updated` as said, anything else only "applied".
pub fn upsert_outcome(status: &UpsertStatus) -> WriteOutcome {
    match status {
        UpsertStatus::Created => WriteOutcome::Created,
        UpsertStatus::Updated => WriteOutcome::Updated,
        UpsertStatus::Other(_) => WriteOutcome::Applied,
    }
}

// ---- execution ----

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

/// Applied, with nothing more known than that.
const JUST_APPLIED: Applied = Applied {
    outcome: WriteOutcome::Applied,
    retently_id: String::new(),
};

/// One destination's outcomes from its answers, one per item: `applied` reads what a success
/// did.
fn answered<T>(
    destination: Destination,
    answers: &[Result<T>],
    applied: impl Fn(&T) -> Applied,
) -> (Destination, Vec<DestinationOutcome>) {
    let outcomes = answers
        .iter()
        .map(|answer| DestinationOutcome {
            destination,
            result: answer.as_ref().map(&applied).map_err(Clone::clone),
        })
        .collect();
    (destination, outcomes)
}

/// Runs `call` when `wanted`; `None`, with no call made, otherwise.
async fn only_if<T>(wanted: bool, call: impl Future<Output = T>) -> Option<T> {
    if wanted { Some(call.await) } else { None }
}

/// A customer's keys at both upstreams: `(customer_id, email)`.
trait Keyed {
    fn keys(&self) -> (&str, &str);
}

impl Keyed for Customer {
    fn keys(&self) -> (&str, &str) {
        (&self.customer_id, &self.email)
    }
}

impl Keyed for CustomerRef {
    fn keys(&self) -> (&str, &str) {
        (&self.customer_id, &self.email)
    }
}

/// One slot per item and destination, filled as the upstream calls answer.
struct Results {
    order: Vec<Destination>,
    results: Vec<CustomerWriteResult>,
}

impl Results {
    fn new(order: Vec<Destination>, items: impl Iterator<Item = (String, String)>) -> Self {
        let results = items
            .map(|(customer_id, email)| CustomerWriteResult {
                customer_id,
                email,
                outcomes: Vec::with_capacity(order.len()),
            })
            .collect();
        Self { order, results }
    }

    /// The slots of customers named by both keys.
    fn of_customers(order: Vec<Destination>, customers: &[impl Keyed]) -> Self {
        Self::new(
            order,
            customers.iter().map(|customer| {
                let (customer_id, email) = customer.keys();
                (customer_id.to_owned(), email.to_owned())
            }),
        )
    }

    fn wants(&self, destination: Destination) -> bool {
        self.order.contains(&destination)
    }

    /// Puts each destination's outcomes in the order the request listed the destinations.
    fn finish(
        mut self,
        mut per_destination: Vec<(Destination, Vec<DestinationOutcome>)>,
    ) -> Vec<CustomerWriteResult> {
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

/// Retently's answers for the addresses of a delete or (un)subscribe.
fn email_outcomes(answers: &[Result<EmailOutcome>]) -> (Destination, Vec<DestinationOutcome>) {
    answered(Destination::Retently, answers, |outcome| Applied {
        outcome: WriteOutcome::Applied,
        retently_id: outcome.id.clone().unwrap_or_default(),
    })
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

pub(crate) async fn upsert_customers(
    app: &App,
    command: UpsertCustomers,
    ctx: CallContext,
) -> Result<Vec<CustomerWriteResult>> {
    let customers = &command.customers;
    let results = Results::of_customers(command.destinations, customers);
    let retently = only_if(results.wants(Destination::Retently), async {
        let inputs = customers
            .iter()
            .map(|c| retently_customer(c, normalised_email(&c.email)))
            .collect();
        app.retently.upsert_customers(&ctx, inputs).await
    });
    let retainly = only_if(results.wants(Destination::Retainly), async {
        let inputs = customers
            .iter()
            .map(|c| {
                let email = (!c.email.is_empty()).then(|| normalised_email(&c.email));
                retainly_customer(c, email)
            })
            .collect();
        app.retainly.upsert_customers(&ctx, inputs).await
    });
    let (retently, retainly) = tokio::join!(retently, retainly);
    let errors = retently
        .iter()
        .flatten()
        .filter_map(|r| r.as_ref().err())
        .chain(retainly.iter().flatten().filter_map(|r| r.as_ref().err()));
    unknown_at_deadline(&ctx, errors)?;
    let mut per_destination = Vec::new();
    if let Some(answers) = retently {
        per_destination.push(answered(Destination::Retently, &answers, |upsert| {
            Applied {
                outcome: upsert_outcome(&upsert.status),
                retently_id: upsert.id.clone().unwrap_or_default(),
            }
        }));
    }
    if let Some(answers) = retainly {
        per_destination.push(answered(Destination::Retainly, &answers, |()| JUST_APPLIED));
    }
    Ok(results.finish(per_destination))
}

pub(crate) async fn delete_customers(
    app: &App,
    command: DeleteCustomers,
    ctx: CallContext,
) -> Result<Vec<CustomerWriteResult>> {
    let customers = &command.customers;
    let results = Results::of_customers(command.destinations, customers);
    let retently = only_if(results.wants(Destination::Retently), async {
        let emails = customers
            .iter()
            .map(|c| normalised_email(&c.email))
            .collect();
        change_emails(&ctx, emails, |chunk| {
            let ctx = ctx.clone();
            async move { app.retently.delete_customers(&ctx, chunk).await }
        })
        .await
    });
    let retainly = only_if(results.wants(Destination::Retainly), async {
        let ids = customers
            .iter()
            .map(|c| c.customer_id.clone().into())
            .collect();
        app.retainly.delete_customers(&ctx, ids).await
    });
    let (retently, retainly) = tokio::join!(retently, retainly);
    if let Some(Err(error)) = &retainly {
        unknown_at_deadline(&ctx, [error])?;
    }
    let mut per_destination = Vec::new();
    if let Some(answers) = retently {
        per_destination.push(email_outcomes(&answers?));
    }
    if let Some(answer) = retainly {
        // One answer for the whole call: every customer shares it. Retainly deletes of unknown
        // ids succeed, so there is nothing per customer to tell apart.
        let shared = vec![answer; customers.len()];
        per_destination.push(answered(Destination::Retainly, &shared, |()| JUST_APPLIED));
    }
    Ok(results.finish(per_destination))
}

/// Unsubscribe (`Some(message)`) or resubscribe (`None`): one RETENTLY outcome per address.
async fn subscription_change(
    app: &App,
    emails: &[String],
    message: Option<String>,
    ctx: CallContext,
) -> Result<Vec<CustomerWriteResult>> {
    let results = Results::new(
        vec![Destination::Retently],
        emails.iter().map(|email| (String::new(), email.clone())),
    );
    let normalised = emails.iter().map(|email| normalised_email(email)).collect();
    let outcomes = change_emails(&ctx, normalised, |chunk| {
        let ctx = ctx.clone();
        let message = message.clone();
        async move {
            match message {
                Some(message) => {
                    // An empty note is "not set" in the contract and is not sent.
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
    Ok(results.finish(vec![email_outcomes(&outcomes)]))
}

pub(crate) async fn unsubscribe_customers(
    app: &App,
    command: UnsubscribeCustomers,
    ctx: CallContext,
) -> Result<Vec<CustomerWriteResult>> {
    subscription_change(app, &command.emails, Some(command.message), ctx).await
}

pub(crate) async fn resubscribe_customers(
    app: &App,
    command: ResubscribeCustomers,
    ctx: CallContext,
) -> Result<Vec<CustomerWriteResult>> {
    subscription_change(app, &command.emails, None, ctx).await
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
) -> Vec<ArrayRecordResult> {
    records
        .zip(outcomes)
        .map(|((customer_id, field), result)| ArrayRecordResult {
            customer_id,
            field,
            result,
        })
        .collect()
}

pub(crate) async fn upsert_array_items(
    app: &App,
    command: UpsertArrayItems,
    ctx: CallContext,
) -> Result<Vec<ArrayRecordResult>> {
    let records = command.records.iter().map(array_record).collect();
    let outcomes = send_records(records, |batch| {
        let ctx = ctx.clone();
        async move {
            let change = ArrayChange::Upsert(batch);
            app.retainly.change_arrays(&ctx, change).await
        }
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
    Ok(record_results(
        command
            .records
            .into_iter()
            .map(|r| (r.customer_id, r.field)),
        outcomes,
    ))
}

pub(crate) async fn delete_array_items(
    app: &App,
    command: DeleteArrayItems,
    ctx: CallContext,
) -> Result<Vec<ArrayRecordResult>> {
    let records = command.records.iter().map(array_deletion).collect();
    let outcomes = send_records(records, |batch| {
        let ctx = ctx.clone();
        async move {
            let change = ArrayChange::Delete(batch);
            app.retainly.change_arrays(&ctx, change).await
        }
    })
    .await;
    unknown_at_deadline(&ctx, outcomes.iter().filter_map(|o| o.as_ref().err()))?;
    Ok(record_results(
        command
            .records
            .into_iter()
            .map(|r| (r.customer_id, r.field)),
        outcomes,
    ))
}

// Validation bounds every write to what one Retainly call takes, so `send_records` sends each
// request whole and the indices Retainly reports are the request's own.
const _: () = assert!(MAX_ITEMS <= crate::upstream::retainly::MAX_BATCH);

/// Whether a per-item failure may pass on a later attempt (the outbox then retries the write):
/// the same rule the outbox applies to a failed call.
fn is_transient(error: &Error) -> bool {
    matches!(
        error.reason(),
        Reason::UpstreamCredentialsRejected | Reason::UpstreamCredentialsInvalid
    ) || matches!(
        error.code(),
        ErrorCode::Unavailable
            | ErrorCode::ResourceExhausted
            | ErrorCode::DeadlineExceeded
            | ErrorCode::Aborted
            | ErrorCode::Cancelled
    )
}

pub(crate) fn customer_results_transient(results: &[CustomerWriteResult]) -> bool {
    results
        .iter()
        .flat_map(|result| &result.outcomes)
        .any(|outcome| outcome.result.as_ref().is_err_and(is_transient))
}

pub(crate) fn record_results_transient(results: &[ArrayRecordResult]) -> bool {
    results
        .iter()
        .any(|result| result.result.as_ref().is_err_and(is_transient))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    fn invalid(fields: &[&str]) -> Error {
        crate::upstream::batching::rejection("retainly", fields)
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
