//! Conversions shared by the adapters.

use crate::domain::outbox::DeliveryError;
use crate::pb;

pub fn timestamp_from_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        // The remainder of a division by 1000 fits in i32.
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn timestamp_to_ms(timestamp: &prost_types::Timestamp) -> i64 {
    timestamp
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(timestamp.nanos / 1_000_000))
}

pub fn item_error(error: DeliveryError) -> pb::ItemError {
    pb::ItemError {
        code: error.code,
        reason: error.reason,
        message: error.message,
        metadata: error.metadata,
    }
}

/// A gateway error as the per-item `ItemError` of a response.
pub fn error_to_item(error: &crate::error::Error) -> pb::ItemError {
    item_error(DeliveryError::from(error))
}

/// What one recipient's survey send came to, as the contract reports it: an answer is
/// SCHEDULED or THROTTLED; a failure after which the upstream may have acted is UNKNOWN (never
/// resent); any other failure is FAILED.
pub fn recipient_outcome(
    result: &Result<crate::upstream::retently::SurveyOutcome, crate::error::Error>,
) -> (pb::RecipientOutcome, Option<pb::ItemError>) {
    use crate::upstream::retently::SurveyStatus;
    match result {
        Ok(outcome) => match &outcome.status {
            SurveyStatus::Scheduled | SurveyStatus::Accepted => {
                (pb::RecipientOutcome::Scheduled, None)
            }
            SurveyStatus::Throttled => (pb::RecipientOutcome::Throttled, None),
            SurveyStatus::Unsubscribed => (
                pb::RecipientOutcome::Failed,
                Some(error_to_item(
                    &crate::error::Error::new(
                        crate::error::ErrorCode::FailedPrecondition,
                        "RECIPIENT_UNSUBSCRIBED",
                        "the recipient opted out of surveys",
                    )
                    .with_metadata("upstream", "retently"),
                )),
            ),
            SurveyStatus::Other(status) => (
                pb::RecipientOutcome::Failed,
                Some(error_to_item(
                    &crate::error::Error::new(
                        crate::error::ErrorCode::FailedPrecondition,
                        "UPSTREAM_ITEM_REJECTED",
                        format!("retently answered `{status}` for this recipient"),
                    )
                    .with_metadata("upstream", "retently"),
                )),
            ),
        },
        Err(error) if crate::grpc::writes::possibly_applied(error) => {
            (pb::RecipientOutcome::Unknown, Some(error_to_item(error)))
        }
        Err(error) => (pb::RecipientOutcome::Failed, Some(error_to_item(error))),
    }
}
