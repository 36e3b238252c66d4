//! Conversions shared by the adapters; those the feedback pipeline needs too live in
//! [`crate::convert`].

use crate::domain::outbox::DeliveryError;
use crate::error::{Error, Reason};
use crate::pb;
use crate::upstream::retently;

pub fn item_error(error: DeliveryError) -> pb::ItemError {
    pb::ItemError {
        code: error.code.grpc_code() as i32,
        reason: error.reason.as_str().to_owned(),
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
                        Reason::RecipientUnsubscribed,
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
                        Reason::UpstreamItemRejected,
                        format!("retently answered `{status}` for this recipient"),
                    )
                    .with_metadata("upstream", "retently"),
                )),
            ),
        },
        Err(error) if crate::domain::writes::possibly_applied(error) => {
            (pb::RecipientOutcome::Unknown, Some(error_to_item(error)))
        }
        Err(error) => (pb::RecipientOutcome::Failed, Some(error_to_item(error))),
    }
}

// ---- Retently writes ----

/// A property as Retently's `{label, type, value}`: the key goes out as the label, which
/// Retently turns into the same snake_case name. `None` for a property without a value (the
/// validators refuse those before anything is sent).
pub fn property_to_retently(property: &pb::Property) -> Option<retently::PropertyInput> {
    use pb::property_value::Kind;
    use retently::PropertyType;
    let (kind, value) = match property.value.as_ref()?.kind.as_ref()? {
        Kind::StringValue(text) => (PropertyType::String, text.clone()),
        // Retently has no decimal type; Rust's `Display` of a double is the shortest text that
        // reads back as the same number.
        Kind::NumberValue(number) => (PropertyType::String, number.to_string()),
        Kind::IntegerValue(number) => (PropertyType::Integer, number.to_string()),
        Kind::BoolValue(flag) => (PropertyType::Boolean, flag.to_string()),
        Kind::DateValue(date) => (PropertyType::Date, date_text(date)),
        Kind::TimestampValue(timestamp) => (PropertyType::Date, instant_text(timestamp)?),
        Kind::StringListValue(list) => (PropertyType::Collection, list.values.join(",")),
    };
    Some(retently::PropertyInput {
        label: property.name.clone(),
        kind: Some(kind),
        value: Some(value),
    })
}

/// A calendar date as `YYYY-MM-DD`, the form both upstreams read.
pub fn date_text(date: &pb::Date) -> String {
    format!("{:04}-{:02}-{:02}", date.year, date.month, date.day)
}

/// RFC 3339 UTC with milliseconds (`2022-02-25T21:00:00.000Z`), the form both upstreams show.
pub fn instant_text(timestamp: &prost_types::Timestamp) -> Option<String> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    let instant = chrono::DateTime::<chrono::Utc>::from_timestamp(timestamp.seconds, nanos)?;
    Some(instant.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Largest integer a double holds exactly (2^53 - 1).
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// A `google.protobuf.Value` as JSON. Struct numbers are doubles; whole ones within the safe
/// range go out as integers so `123` stays `123` rather than becoming `123.0` upstream.
pub fn json_value(value: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    use serde_json::{Number, Value};
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(flag)) => Value::Bool(*flag),
        Some(Kind::NumberValue(number)) => {
            if number.fract() == 0.0 && number.abs() <= MAX_SAFE_INTEGER {
                // Exact: a whole double within ±2^53 converts to i64 without loss.
                Value::Number(Number::from(*number as i64))
            } else {
                Number::from_f64(*number).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(text)) => Value::String(text.clone()),
        Some(Kind::ListValue(list)) => Value::Array(list.values.iter().map(json_value).collect()),
        Some(Kind::StructValue(object)) => Value::Object(
            object
                .fields
                .iter()
                .map(|(key, value)| (key.clone(), json_value(value)))
                .collect(),
        ),
    }
}
