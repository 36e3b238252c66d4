//! Conversions shared by the adapters; those the feedback pipeline needs too live in
//! [`crate::convert`].

use crate::domain::outbox::DeliveryError;
use crate::domain::writes::surveys::RecipientOutcome;
use crate::domain::writes::values::{Date, Property, PropertyValue, Timestamp};
use crate::error::Error;
use crate::grpc::rules::throttle_to_pb;
use crate::pb;

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

/// A position in a request as the contract's `int32` index.
pub fn index(position: usize) -> i32 {
    i32::try_from(position).unwrap_or(i32::MAX)
}

/// What one recipient's survey send came to, as the contract reports it: the outcome, the
/// error of a failed or unknown send, and the throttle that held it back.
pub fn recipient_outcome(
    outcome: &RecipientOutcome,
) -> (
    pb::RecipientOutcome,
    Option<pb::ItemError>,
    Option<pb::Throttle>,
) {
    match outcome {
        RecipientOutcome::Scheduled => (pb::RecipientOutcome::Scheduled, None, None),
        RecipientOutcome::Throttled(throttle) => (
            pb::RecipientOutcome::Throttled,
            None,
            throttle.as_ref().map(throttle_to_pb),
        ),
        RecipientOutcome::Failed(error) => (
            pb::RecipientOutcome::Failed,
            Some(error_to_item(error)),
            None,
        ),
        RecipientOutcome::Unknown(error) => (
            pb::RecipientOutcome::Unknown,
            Some(error_to_item(error)),
            None,
        ),
    }
}

/// A property as the write path carries it.
impl From<pb::Property> for Property {
    fn from(property: pb::Property) -> Self {
        use pb::property_value::Kind;
        let value = property
            .value
            .and_then(|value| value.kind)
            .map(|kind| match kind {
                Kind::StringValue(text) => PropertyValue::Text(text),
                Kind::NumberValue(number) => PropertyValue::Number(number),
                Kind::IntegerValue(number) => PropertyValue::Integer(number),
                Kind::BoolValue(flag) => PropertyValue::Bool(flag),
                Kind::DateValue(date) => PropertyValue::Date(Date {
                    year: date.year,
                    month: date.month,
                    day: date.day,
                }),
                Kind::TimestampValue(timestamp) => PropertyValue::Timestamp(Timestamp {
                    seconds: timestamp.seconds,
                    nanos: timestamp.nanos,
                }),
                Kind::StringListValue(list) => PropertyValue::TextList(list.values),
            });
        Property {
            name: property.name,
            value,
        }
    }
}
