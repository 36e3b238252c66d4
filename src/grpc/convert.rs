//! Conversions shared by the adapters.

use crate::domain::outbox::DeliveryError;
use crate::error::Error;
use crate::pb;
use crate::upstream::retently;

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

/// The longest `ItemError.message` the contract allows.
const MAX_ITEM_MESSAGE_CHARS: usize = 1000;

/// A gateway error as the per-item `ItemError` of a response: its code, reason, message and
/// metadata, plus `field` when the upstream named the offending field (a 400/422 split per item).
pub fn error_to_item(error: &Error) -> pb::ItemError {
    let mut item = item_error(DeliveryError::from(error));
    if let Some(violation) = error.violations().first()
        && !violation.field.is_empty()
    {
        item.metadata
            .entry("field".to_owned())
            .or_insert_with(|| violation.field.clone());
    }
    if item.message.chars().count() > MAX_ITEM_MESSAGE_CHARS {
        item.message = item.message.chars().take(MAX_ITEM_MESSAGE_CHARS).collect();
    }
    item
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

/// An upstream RFC 3339 instant (`2019-07-28T04:33:13.217Z`); `None` when absent or unreadable,
/// since a missing date must not fail a whole read.
pub fn timestamp_from_rfc3339(text: Option<&str>) -> Option<prost_types::Timestamp> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text?.trim()).ok()?;
    Some(timestamp_from_ms(parsed.timestamp_millis()))
}

/// A Retently customer property, converted by its upstream `type`: `text`/`string` → string,
/// `date` → timestamp, `integer`, `boolean`, `collection` → string list; a value its type cannot
/// read, or an unknown type, stays a string so nothing is lost.
pub fn property_from_retently(property: &retently::Property) -> pb::Property {
    use pb::property_value::Kind;
    let text = property.value.clone().unwrap_or_default();
    let kind = property.kind.as_deref().unwrap_or("text");
    let value = match kind.to_ascii_lowercase().as_str() {
        "date" => timestamp_from_rfc3339(Some(&text)).map(Kind::TimestampValue),
        "integer" => text.trim().parse().ok().map(Kind::IntegerValue),
        "boolean" => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "y" => Some(Kind::BoolValue(true)),
            "false" | "0" | "no" | "n" => Some(Kind::BoolValue(false)),
            _ => None,
        },
        "collection" => Some(Kind::StringListValue(pb::StringList {
            values: text
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect(),
        })),
        _ => None,
    }
    .unwrap_or(Kind::StringValue(text));
    pb::Property {
        name: property
            .name
            .clone()
            .or_else(|| property.label.clone())
            .unwrap_or_default(),
        value: Some(pb::PropertyValue { kind: Some(value) }),
        label: property.label.clone().unwrap_or_default(),
    }
}
