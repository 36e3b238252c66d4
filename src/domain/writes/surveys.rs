//! The execution of SurveyService's writes: SendSurvey (with the campaign check before it),
//! SetFeedbackTags and SetFeedbackTopics. Shared by SYNC calls and the outbox worker.

use crate::app::App;
use crate::error::{Error, ErrorCode, Reason};
use crate::grpc::surveys::convert;
use crate::pb;
use crate::upstream::CallContext;

/// Whether a SendSurvey response is remembered under its idempotency key. A send where every
/// recipient failed before its request left the gateway (budget, circuit, connection refused)
/// or was refused up front (429) is not: a repeat under the same key, as the RetryInfo
/// invites, runs anew.
pub(crate) fn remember_send(response: &pb::SendSurveyResponse) -> bool {
    !response.results.iter().all(|result| {
        result.outcome == pb::RecipientOutcome::Failed as i32
            && result.error.as_ref().is_some_and(|error| {
                // The response carries each reason as its wire string; decide on the typed
                // reason it names.
                matches!(
                    Reason::parse(&error.reason),
                    Some(
                        Reason::UpstreamBudgetExhausted
                            | Reason::UpstreamCircuitOpen
                            | Reason::UpstreamUnreachable
                            | Reason::UpstreamRateLimited
                            | Reason::DeadlineExceeded
                    )
                )
            })
    })
}

/// Whether a tag change is replay-safe: replacing the tags is, appending them is not.
pub(crate) fn replaces_tags(request: &pb::SetFeedbackTagsRequest) -> bool {
    request.mode == pb::UpdateMode::Replace as i32
}

/// Whether a topic change is replay-safe: replacing the topics is, appending them is not.
pub(crate) fn replaces_topics(request: &pb::SetFeedbackTopicsRequest) -> bool {
    request.mode == pb::UpdateMode::Replace as i32
}

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

/// Sends `request` and returns each recipient's result with, for a failed or unknown one, its
/// error, in request order.
pub(crate) async fn send_each(
    app: &App,
    request: pb::SendSurveyRequest,
    ctx: CallContext,
) -> Vec<(pb::RecipientResult, Option<Error>)> {
    let delay = request.delay_days.and_then(|days| u32::try_from(days).ok());
    let recipients = request.recipients.iter().map(convert::recipient).collect();
    let outcomes = app
        .retently
        .send_surveys(&ctx, &request.campaign_id, delay, recipients)
        .await;
    request
        .recipients
        .iter()
        .zip(outcomes)
        .enumerate()
        .map(|(index, (recipient, outcome))| {
            convert::recipient_result(index, &recipient.email, outcome)
        })
        .collect()
}

/// Sends a validated SendSurvey request now: one result per recipient, in request order.
pub(crate) async fn execute_send_survey(
    app: &App,
    request: pb::SendSurveyRequest,
    ctx: CallContext,
) -> Result<pb::SendSurveyResponse, Error> {
    Ok(pb::SendSurveyResponse {
        delivery_id: String::new(),
        results: send_each(app, request, ctx)
            .await
            .into_iter()
            .map(|(result, _)| result)
            .collect(),
    })
}

pub(crate) async fn execute_set_feedback_tags(
    app: &App,
    request: pb::SetFeedbackTagsRequest,
    ctx: CallContext,
) -> Result<pb::SetFeedbackTagsResponse, Error> {
    let op = convert::label_op(request.mode)?;
    app.retently
        .set_response_tags(&ctx, &request.feedback_id, request.tags, op)
        .await?;
    Ok(pb::SetFeedbackTagsResponse::default())
}

pub(crate) async fn execute_set_feedback_topics(
    app: &App,
    request: pb::SetFeedbackTopicsRequest,
    ctx: CallContext,
) -> Result<pb::SetFeedbackTopicsResponse, Error> {
    let op = convert::label_op(request.mode)?;
    let topics = request.topics.iter().map(convert::topic).collect();
    app.retently
        .set_response_topics(&ctx, &request.feedback_id, topics, op)
        .await?;
    Ok(pb::SetFeedbackTopicsResponse::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::writes::WriteRpc;

    fn failed(reason: Reason) -> pb::RecipientResult {
        pb::RecipientResult {
            outcome: pb::RecipientOutcome::Failed as i32,
            error: Some(pb::ItemError {
                reason: reason.as_str().to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn sends_that_never_left_the_gateway_are_not_remembered() {
        let response = |results| pb::SendSurveyResponse {
            delivery_id: String::new(),
            results,
        };
        let shed = response(vec![
            failed(Reason::UpstreamBudgetExhausted),
            failed(Reason::UpstreamCircuitOpen),
        ]);
        assert!(!pb::SendSurveyRequest::remember(&shed));
        let refused = response(vec![failed(Reason::UpstreamNotFound)]);
        assert!(pb::SendSurveyRequest::remember(&refused));
        let mixed = response(vec![
            failed(Reason::UpstreamBudgetExhausted),
            pb::RecipientResult {
                outcome: pb::RecipientOutcome::Scheduled as i32,
                ..Default::default()
            },
        ]);
        assert!(pb::SendSurveyRequest::remember(&mixed));
    }

    #[test]
    fn only_replacements_are_replay_safe() {
        let tags = |mode: pb::UpdateMode| pb::SetFeedbackTagsRequest {
            mode: mode as i32,
            ..Default::default()
        };
        assert!(tags(pb::UpdateMode::Replace).replay_safe());
        assert!(!tags(pb::UpdateMode::Append).replay_safe());
        let topics = pb::SetFeedbackTopicsRequest {
            mode: pb::UpdateMode::Append as i32,
            ..Default::default()
        };
        assert!(!topics.replay_safe());
        assert!(!pb::SendSurveyRequest::default().replay_safe());
    }
}
