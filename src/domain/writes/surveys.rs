//! The execution of SurveyService's writes: SendSurvey (with the campaign check before it),
//! SetFeedbackTags and SetFeedbackTopics. Shared by SYNC calls and the outbox worker.

use std::time::Duration;

use super::customers::{Customer, retently_customer};
use crate::app::App;
use crate::domain::fatigue::{Guarded, Limits, Throttle};
use crate::error::{Error, ErrorCode, FieldViolation, Reason};
use crate::upstream::CallContext;
use crate::upstream::retently::{
    self, CustomerInput, LabelOp, SurveyOutcome, SurveyStatus, email_key,
};

// ---- commands ----

/// SendSurvey: one campaign's survey to every recipient.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendSurvey {
    pub campaign_id: String,
    /// Keyed by email; their `customer_id` is not used.
    pub recipients: Vec<Customer>,
    /// Days Retently waits before sending; `None` for its default.
    pub delay_days: Option<i32>,
    /// The caller's survey cool-down instead of the configured one.
    pub survey_cooldown: Option<Duration>,
}

/// A topic's sentiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sentiment {
    Positive,
    Neutral,
    Negative,
}

/// A topic on a survey response; without a sentiment Retently applies neutral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub name: String,
    pub sentiment: Option<Sentiment>,
}

/// SetFeedbackTags. `op` is `None` for a mode the contract does not know (validation refuses it
/// before anything runs or is queued).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetFeedbackTags {
    pub feedback_id: String,
    pub tags: Vec<String>,
    pub op: Option<LabelOp>,
}

/// SetFeedbackTopics; `op` as in [`SetFeedbackTags`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetFeedbackTopics {
    pub feedback_id: String,
    pub topics: Vec<Topic>,
    pub op: Option<LabelOp>,
}

// ---- outcomes ----

/// What one recipient's survey send came to: an answer is SCHEDULED or THROTTLED; a failure
/// after which the upstream may have acted is UNKNOWN (never resent); any other failure is
/// FAILED.
#[derive(Debug, Clone)]
pub enum RecipientOutcome {
    Scheduled,
    /// Held back: by the gateway's cool-down or an event rule's throttle (with when the
    /// recipient may be surveyed again), or by the campaign's own throttle at Retently (`None`).
    Throttled(Option<Throttle>),
    Failed(Error),
    Unknown(Error),
}

impl RecipientOutcome {
    /// The error of a failed or unknown send.
    pub fn error(&self) -> Option<&Error> {
        match self {
            RecipientOutcome::Failed(error) | RecipientOutcome::Unknown(error) => Some(error),
            RecipientOutcome::Scheduled | RecipientOutcome::Throttled(_) => None,
        }
    }

    /// Whether the send reached Retently and was taken (scheduled or throttled there).
    pub fn taken(&self) -> bool {
        matches!(
            self,
            RecipientOutcome::Scheduled | RecipientOutcome::Throttled(_)
        )
    }
}

/// One recipient's result; `index` is its position in the command.
#[derive(Debug, Clone)]
pub struct RecipientResult {
    pub index: usize,
    pub email: String,
    pub outcome: RecipientOutcome,
}

/// What one recipient's survey send came to (see [`RecipientOutcome`]).
pub fn recipient_outcome(result: Result<SurveyOutcome, Error>) -> RecipientOutcome {
    let refused = |reason, message: String| {
        RecipientOutcome::Failed(
            Error::new(ErrorCode::FailedPrecondition, reason, message)
                .with_metadata("upstream", "retently"),
        )
    };
    match result {
        Ok(outcome) => match outcome.status {
            SurveyStatus::Scheduled | SurveyStatus::Accepted => RecipientOutcome::Scheduled,
            SurveyStatus::Throttled => RecipientOutcome::Throttled(None),
            SurveyStatus::Unsubscribed => refused(
                Reason::RecipientUnsubscribed,
                "the recipient opted out of surveys".to_owned(),
            ),
            SurveyStatus::Other(status) => refused(
                Reason::UpstreamItemRejected,
                format!("retently answered `{status}` for this recipient"),
            ),
        },
        Err(error) if super::possibly_applied(&error) => RecipientOutcome::Unknown(error),
        Err(error) => RecipientOutcome::Failed(error),
    }
}

/// The recipient's result, classified as every survey send is ([`recipient_outcome`]).
pub fn recipient_result(
    index: usize,
    email: &str,
    outcome: Result<SurveyOutcome, Error>,
) -> RecipientResult {
    RecipientResult {
        index,
        email: email.to_owned(),
        outcome: recipient_outcome(outcome),
    }
}

// ---- to Retently ----

/// A validated recipient as a Retently subscriber, keyed by its normalised email. Empty fields
/// and an empty tag list are left out: a survey send must not clear what the customer has.
pub fn recipient(recipient: &Customer) -> CustomerInput {
    retently_customer(recipient, email_key(&recipient.email))
}

/// A topic as `{name, sentiment}`; an unspecified sentiment is left out (the upstream then uses
/// neutral).
pub fn topic(topic: &Topic) -> retently::Topic {
    let sentiment = topic.sentiment.map(|sentiment| match sentiment {
        Sentiment::Positive => "positive",
        Sentiment::Neutral => "neutral",
        Sentiment::Negative => "negative",
    });
    retently::Topic {
        name: topic.name.clone(),
        sentiment: sentiment.map(str::to_owned),
    }
}

/// The label operation, or the error validation answers for an unknown mode.
fn label_op(op: Option<LabelOp>) -> Result<LabelOp, Error> {
    op.ok_or_else(|| {
        Error::invalid_argument(vec![FieldViolation::new(
            "mode",
            "must be APPEND or REPLACE",
        )])
    })
}

// ---- decisions ----

/// Whether a SendSurvey outcome is remembered under its idempotency key. A send where every
/// recipient failed before its request left the gateway (budget, circuit, connection refused)
/// or was refused up front (429) is not: a repeat under the same key, as the RetryInfo
/// invites, runs anew.
pub(crate) fn remember_send(results: &[RecipientResult]) -> bool {
    !results.iter().all(|result| match &result.outcome {
        RecipientOutcome::Failed(error) => matches!(
            error.reason(),
            Reason::UpstreamBudgetExhausted
                | Reason::UpstreamCircuitOpen
                | Reason::UpstreamUnreachable
                | Reason::UpstreamRateLimited
                | Reason::DeadlineExceeded
        ),
        _ => false,
    })
}

/// Whether a tag change is replay-safe: replacing the tags is, appending them is not.
pub(crate) fn replaces_tags(command: &SetFeedbackTags) -> bool {
    command.op == Some(LabelOp::Replace)
}

/// Whether a topic change is replay-safe: replacing the topics is, appending them is not.
pub(crate) fn replaces_topics(command: &SetFeedbackTopics) -> bool {
    command.op == Some(LabelOp::Replace)
}

/// The guard's limits for a validated SendSurvey.
pub fn send_survey_limits(app: &App, command: &SendSurvey) -> Limits {
    Limits {
        cooldown: Limits::resolve(app.config.survey_cooldown, command.survey_cooldown),
        rule: None,
        origin: None,
    }
}

// ---- execution ----

/// Longest a SendSurvey waits for the campaign list to check its `campaign_id`.
const CAMPAIGN_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `NOT_FOUND` (with no `/survey` call made) when Retently has no campaign with this id.
/// When the campaign list cannot be read in time (an outage, an exhausted budget) the send goes
/// ahead unchecked, so an asynchronous send is still queued, and the upstream decides.
pub(crate) async fn check_campaign(
    app: &App,
    ctx: &CallContext,
    campaign_id: &str,
) -> Result<(), Error> {
    // The read itself carries no deadline: a read in flight is shared only with callers whose
    // deadline it outlives, so reads bound by each caller's own deadline would not be shared,
    // and a crowd of concurrent sends would each read the list. Each send waits for it at most
    // CAMPAIGN_CHECK_WAIT (or its own deadline) while the one shared read goes on.
    let mut read_ctx = ctx.clone();
    read_ctx.deadline = None;
    let limit = tokio::time::Instant::now() + CAMPAIGN_CHECK_WAIT;
    let wait_until = ctx.deadline.map_or(limit, |deadline| deadline.min(limit));
    let checked = tokio::time::timeout_at(
        wait_until,
        app.retently.campaign_exists(&read_ctx, campaign_id),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Error::new(
            ErrorCode::DeadlineExceeded,
            Reason::CampaignCheckTimeout,
            "the campaign list was not read in time",
        ))
    });
    match checked {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::new(
            ErrorCode::NotFound,
            Reason::CampaignNotFound,
            "no retently campaign has this campaign_id",
        )
        .with_metadata("campaign_id", campaign_id)),
        Err(error) => {
            tracing::debug!(%error, "cannot read the campaigns, sending without checking campaign_id");
            Ok(())
        }
    }
}

/// Sends `command` and returns each recipient's result, in command order.
pub(crate) async fn send_each(
    app: &App,
    command: SendSurvey,
    ctx: CallContext,
) -> Vec<RecipientResult> {
    let delay = command.delay_days.and_then(|days| u32::try_from(days).ok());
    let recipients = command.recipients.iter().map(recipient).collect();
    // Through the survey cool-down: a recipient inside it gets THROTTLED and no upstream call.
    let limits = send_survey_limits(app, &command);
    let outcomes = crate::domain::fatigue::send_guarded(
        app,
        &ctx,
        &command.campaign_id,
        delay,
        recipients,
        &limits,
    )
    .await;
    command
        .recipients
        .iter()
        .zip(outcomes)
        .enumerate()
        .map(|(index, (recipient, outcome))| match outcome {
            Guarded::Sent(outcome) => recipient_result(index, &recipient.email, outcome),
            Guarded::Throttled(throttle) => RecipientResult {
                index,
                email: recipient.email.clone(),
                outcome: RecipientOutcome::Throttled(Some(throttle)),
            },
        })
        .collect()
}

/// Sends a validated SendSurvey now: one result per recipient, in command order.
pub(crate) async fn send_survey(
    app: &App,
    command: SendSurvey,
    ctx: CallContext,
) -> Result<Vec<RecipientResult>, Error> {
    Ok(send_each(app, command, ctx).await)
}

pub(crate) async fn set_feedback_tags(
    app: &App,
    command: SetFeedbackTags,
    ctx: CallContext,
) -> Result<(), Error> {
    let op = label_op(command.op)?;
    (app.retently)
        .set_response_tags(&ctx, &command.feedback_id, command.tags, op)
        .await
}

pub(crate) async fn set_feedback_topics(
    app: &App,
    command: SetFeedbackTopics,
    ctx: CallContext,
) -> Result<(), Error> {
    let topics = command.topics.iter().map(topic).collect();
    (app.retently)
        .set_response_topics(&ctx, &command.feedback_id, topics, label_op(command.op)?)
        .await
}
