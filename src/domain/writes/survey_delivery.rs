//! The outbox's delivery of a queued SendSurvey, which resolves its own doubts.
//!
//! A survey send must not reach a recipient twice, so after a failure that may have been
//! applied (a timeout, a reset, a 500/502/504, or a stop while the request was on the wire) it
//! is not simply sent again. Retently keeps the history of sent surveys (`GET /outbox`), so the
//! next attempt reads it, for the campaign, since the first attempt that may have acted: a
//! recipient found there was surveyed (reported SCHEDULED), and only the others are sent. The
//! delivery is parked as in doubt only when that history cannot be read within the retry
//! window.

use std::collections::HashSet;
use std::time::Duration;

use prost::Message as _;

use crate::app::App;
use crate::domain::outbox::{Attempt, DeliveryError};
use crate::domain::writes::{WriteRpc, is_transient, possibly_applied};
use crate::error::{Error, ErrorCode, Reason};
use crate::upstream::CallContext;
use crate::upstream::retently::{OutboxQuery, PageRequest};

use super::surveys::{RecipientOutcome, RecipientResult, SendSurvey, send_each};

/// How far before the attempt's start the history is read: Retently stamps the send with its
/// own clock, which may run behind the gateway's. A survey of the same campaign to the same
/// recipient a minute earlier is counted as this one, which at worst skips a second survey the
/// campaign's throttle would usually refuse anyway.
const CLOCK_MARGIN: Duration = Duration::from_secs(60);
/// Records per history page (the documented maximum).
const HISTORY_PAGE: u32 = 1000;
/// Pages of history read at most; a campaign that sent more since the attempt cannot be checked
/// at a reasonable cost, and the delivery stays in doubt.
const MAX_HISTORY_PAGES: u32 = 10;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn normalized(email: &str) -> String {
    email.trim().to_lowercase()
}

/// One attempt of a queued SendSurvey (see the module doc); `R` is its queued request.
pub(crate) async fn deliver_send_survey<R>(
    app: &App,
    request: &[u8],
    delivery_id: &str,
    verify_since_ms: Option<i64>,
    ctx: CallContext,
) -> Attempt
where
    R: WriteRpc<Command = SendSurvey, Outcome = Vec<RecipientResult>>,
{
    let request = match super::decode_queued::<R>(request) {
        Ok(request) => request.command(),
        Err(failed) => return failed,
    };
    let started_ms = now_ms();
    let surveyed = match verify_since_ms {
        None => HashSet::new(),
        Some(since_ms) => match surveyed_since(app, &ctx, &request, since_ms).await {
            Ok(surveyed) => surveyed,
            // The doubt stays recorded in the delivery: the next attempt checks again.
            Err(error) if is_transient(&error) => {
                return Attempt::Retry {
                    retry_after: error.retry_after(),
                    error: DeliveryError::from(&error),
                };
            }
            Err(error) => {
                return Attempt::InDoubt {
                    error: DeliveryError::from(&error),
                };
            }
        },
    };
    let (found, unsent): (Vec<_>, Vec<_>) = request
        .recipients
        .iter()
        .cloned()
        .enumerate()
        .partition(|(_, recipient)| surveyed.contains(&normalized(&recipient.email)));
    let mut results: Vec<RecipientResult> = found
        .into_iter()
        .map(|(index, recipient)| RecipientResult {
            index,
            email: recipient.email,
            outcome: RecipientOutcome::Scheduled,
        })
        .collect();
    if !unsent.is_empty() {
        let (indexes, recipients): (Vec<usize>, Vec<_>) = unsent.into_iter().unzip();
        let sent = send_each(
            app,
            SendSurvey {
                recipients,
                ..request.clone()
            },
            ctx,
        )
        .await;
        for (index, mut result) in indexes.into_iter().zip(sent) {
            result.index = index;
            results.push(result);
        }
    }
    results.sort_by_key(|result| result.index);
    settle::<R>(results, started_ms, verify_since_ms, delivery_id)
}

/// The attempt's outcome from every recipient's result: delivered when nothing is left to do
/// and something reached Retently, failed when every recipient was refused for good; otherwise
/// attempted again, checking the history first if anything may have gone out.
fn settle<R>(
    results: Vec<RecipientResult>,
    started_ms: i64,
    verify_since_ms: Option<i64>,
    delivery_id: &str,
) -> Attempt
where
    R: WriteRpc<Outcome = Vec<RecipientResult>>,
{
    let doubtful = results
        .iter()
        .filter_map(|result| result.outcome.error())
        .find(|error| possibly_applied(error));
    let retryable = results
        .iter()
        .filter_map(|result| result.outcome.error())
        .find(|error| !possibly_applied(error) && is_transient(error));
    let reached = results.iter().any(|result| result.outcome.taken());
    // Every recipient refused for good (an unknown campaign, all unsubscribed): the send as a
    // whole failed, and the dead letters are where an operator sees it.
    let refused = results
        .iter()
        .find_map(|result| result.outcome.error())
        .filter(|_| !reached && doubtful.is_none() && retryable.is_none());
    if let Some(error) = refused {
        return Attempt::Failed {
            error: DeliveryError::from(error),
        };
    }
    match (doubtful, retryable) {
        (None, None) => {
            let mut response = R::respond(results);
            R::set_delivery_id(&mut response, delivery_id.to_owned());
            Attempt::Delivered {
                result: response.encode_to_vec(),
            }
        }
        // Nothing may have gone out and nothing did: a plain retry sends it all again.
        (None, Some(error)) if !reached && verify_since_ms.is_none() => Attempt::Retry {
            retry_after: error.retry_after(),
            error: DeliveryError::from(error),
        },
        (doubtful, retryable) => {
            let error = doubtful.or(retryable).cloned().unwrap_or_else(|| {
                Error::new(
                    ErrorCode::Unavailable,
                    Reason::PartialDelivery,
                    "some recipients are not surveyed yet",
                )
            });
            Attempt::Unresolved {
                retry_after: error.retry_after(),
                error: DeliveryError::from(&error),
                since_ms: started_ms,
            }
        }
    }
}

/// The normalised emails among `request`'s recipients that Retently's history shows surveyed in
/// the request's campaign since `since_ms` (less [`CLOCK_MARGIN`]).
async fn surveyed_since(
    app: &App,
    ctx: &CallContext,
    request: &SendSurvey,
    since_ms: i64,
) -> Result<HashSet<String>, Error> {
    let wanted: HashSet<String> = request
        .recipients
        .iter()
        .map(|recipient| normalized(&recipient.email))
        .collect();
    let margin = i64::try_from(CLOCK_MARGIN.as_millis()).unwrap_or(i64::MAX);
    let start = chrono::DateTime::from_timestamp_millis(since_ms.saturating_sub(margin));
    // One recipient: the history of that address alone, usually a single short page.
    let email = match wanted.iter().collect::<Vec<_>>().as_slice() {
        [only] => Some((*only).clone()),
        _ => None,
    };
    let mut surveyed = HashSet::new();
    for page in 1..=MAX_HISTORY_PAGES {
        let found = app
            .retently
            .outbox(
                ctx,
                OutboxQuery {
                    email: email.clone(),
                    campaign_id: Some(request.campaign_id.clone()),
                    start_date: start,
                    page: PageRequest {
                        page: Some(page),
                        limit: Some(HISTORY_PAGE),
                        sort: None,
                    },
                    ..OutboxQuery::default()
                },
            )
            .await?;
        surveyed.extend(
            found
                .items
                .iter()
                .filter(|survey| {
                    survey
                        .campaign_id
                        .as_deref()
                        .is_none_or(|id| id == request.campaign_id)
                })
                .filter_map(|survey| survey.email.as_deref().map(normalized))
                .filter(|email| wanted.contains(email)),
        );
        let last = match found.pages {
            Some(pages) => page >= pages,
            None => found.items.len() < HISTORY_PAGE as usize,
        };
        if last || surveyed.len() == wanted.len() {
            return Ok(surveyed);
        }
    }
    Err(Error::new(
        ErrorCode::FailedPrecondition,
        Reason::SurveyHistoryTooLong,
        format!(
            "the campaign sent more than {} surveys since the attempt; the history was not checked",
            MAX_HISTORY_PAGES * HISTORY_PAGE
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use crate::upstream::failure::FailureClass;

    fn result(index: usize, outcome: RecipientOutcome) -> RecipientResult {
        RecipientResult {
            index,
            email: format!("r{index}@example.com"),
            outcome,
        }
    }

    /// Settles a first attempt (started at 10, nothing in doubt before) of delivery `dlv_1`,
    /// whose response is stored as SendSurvey's.
    fn settle(results: Vec<RecipientResult>) -> Attempt {
        super::settle::<pb::SendSurveyRequest>(results, 10, None, "dlv_1")
    }

    fn upstream_error(class: FailureClass) -> Error {
        crate::upstream::failure::upstream_failure(class)
    }

    #[test]
    fn an_attempt_is_settled_by_what_its_recipients_came_to() {
        use RecipientOutcome::{Failed, Scheduled, Throttled, Unknown};
        let done = settle(vec![result(0, Scheduled), result(1, Throttled(None))]);
        let Attempt::Delivered { result: bytes } = done else {
            panic!("delivered: {done:?}");
        };
        let response = pb::SendSurveyResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(response.delivery_id, "dlv_1");
        assert_eq!(response.results.len(), 2);

        // A 503 for everyone: nothing went out, a plain retry.
        let refused = settle(vec![result(
            0,
            Failed(upstream_error(FailureClass::Unavailable)),
        )]);
        assert!(matches!(refused, Attempt::Retry { .. }), "{refused:?}");

        // A 500: the history is checked from this attempt's start next time.
        let doubt = settle(vec![result(
            0,
            Unknown(upstream_error(FailureClass::PossiblyApplied)),
        )]);
        assert!(
            matches!(doubt, Attempt::Unresolved { since_ms: 10, .. }),
            "{doubt:?}"
        );

        // One recipient surveyed, one refused: checked next time so the first is not resent.
        let partial = settle(vec![
            result(0, Scheduled),
            result(1, Failed(upstream_error(FailureClass::Refused))),
        ]);
        assert!(matches!(partial, Attempt::Unresolved { .. }), "{partial:?}");

        // Refused for good, every recipient: the send failed.
        let unknown_campaign = settle(vec![result(
            0,
            Failed(upstream_error(FailureClass::Permanent)),
        )]);
        assert!(
            matches!(unknown_campaign, Attempt::Failed { .. }),
            "{unknown_campaign:?}"
        );

        // A recipient refused for good does not hold the delivery back.
        let rejected = settle(vec![
            result(0, Scheduled),
            result(1, Failed(upstream_error(FailureClass::Permanent))),
        ]);
        assert!(
            matches!(rejected, Attempt::Delivered { .. }),
            "{rejected:?}"
        );
    }
}
