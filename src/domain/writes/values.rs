//! The values writes carry, in plain Rust: where a write goes, and the typed properties of
//! customers and survey recipients with their upstream forms (Retently's typed text, Retainly's
//! plain JSON).

use serde_json::{Number, Value};

use crate::upstream::retently::{PropertyInput, PropertyType};

/// An upstream a write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Retently,
    Retainly,
}

impl Destination {
    /// The number the outbox stores for it: the contract's `Destination` number, which
    /// `Delivery.destinations` reports as it is.
    pub fn stored(self) -> i32 {
        match self {
            Destination::Retently => 1,
            Destination::Retainly => 2,
        }
    }
}

/// A named custom property of a customer or recipient.
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    pub name: String,
    /// `None` only for a property the validators refuse before anything is sent.
    pub value: Option<PropertyValue>,
}

/// A property's typed value.
#[derive(Debug, Clone, PartialEq)]
pub enum PropertyValue {
    Text(String),
    Number(f64),
    Integer(i64),
    Bool(bool),
    Date(Date),
    Timestamp(Timestamp),
    TextList(Vec<String>),
}

/// A calendar date, as validation checked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Date {
    pub year: i32,
    pub month: i32,
    pub day: i32,
}

/// An instant as seconds and nanoseconds since the Unix epoch; nanoseconds out of range make it
/// unrepresentable (see [`instant_text`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: i32,
}

/// A property as Retently's `{label, type, value}`: the key goes out as the label, which
/// Retently turns into the same snake_case name. `None` for a property without a value (the
/// validators refuse those before anything is sent).
pub fn property_to_retently(property: &Property) -> Option<PropertyInput> {
    let (kind, value) = match property.value.as_ref()? {
        PropertyValue::Text(text) => (PropertyType::String, text.clone()),
        // Retently has no decimal type; Rust's `Display` of a double is the shortest text that
        // reads back as the same number.
        PropertyValue::Number(number) => (PropertyType::String, number.to_string()),
        PropertyValue::Integer(number) => (PropertyType::Integer, number.to_string()),
        PropertyValue::Bool(flag) => (PropertyType::Boolean, flag.to_string()),
        PropertyValue::Date(date) => (PropertyType::Date, date_text(date)),
        PropertyValue::Timestamp(timestamp) => (PropertyType::Date, instant_text(timestamp)?),
        PropertyValue::TextList(list) => (PropertyType::Collection, list.join(",")),
    };
    Some(PropertyInput {
        label: property.name.clone(),
        kind: Some(kind),
        value: Some(value),
    })
}

/// A property value as the plain JSON Retainly stores.
pub fn retainly_value(value: &PropertyValue) -> Option<Value> {
    Some(match value {
        PropertyValue::Text(text) => Value::String(text.clone()),
        PropertyValue::Number(number) => Value::Number(Number::from_f64(*number)?),
        PropertyValue::Integer(number) => Value::Number(Number::from(*number)),
        PropertyValue::Bool(flag) => Value::Bool(*flag),
        PropertyValue::Date(date) => Value::String(date_text(date)),
        PropertyValue::Timestamp(timestamp) => Value::String(instant_text(timestamp)?),
        PropertyValue::TextList(list) => {
            Value::Array(list.iter().cloned().map(Value::String).collect())
        }
    })
}

/// A calendar date as `YYYY-MM-DD`, the form both upstreams read.
pub fn date_text(date: &Date) -> String {
    format!("{:04}-{:02}-{:02}", date.year, date.month, date.day)
}

/// RFC 3339 UTC with milliseconds (`2022-02-25T21:00:00.000Z`), the form both upstreams show.
pub fn instant_text(timestamp: &Timestamp) -> Option<String> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    let instant = chrono::DateTime::<chrono::Utc>::from_timestamp(timestamp.seconds, nanos)?;
    Some(instant.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Empty strings are "not set" in the contract, and a write never clears a stored value by
/// omission: they are left out of the upstream request.
pub(crate) fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}
