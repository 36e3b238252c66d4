//! Segment messages (the HTTP Tracking API's JSON) turned into the gateway's own validated
//! writes, with every problem reported in Segment's field names.
//!
//! Field mapping:
//! - `track`: `userId` is the event's customer id (Retainly `customer_id`), `event` its name,
//!   `properties` its data (nulls dropped), `timestamp` (or `originalTimestamp`) its occur time,
//!   `messageId` its message id; the survey recipient's email is `properties.email`, else
//!   `context.traits.email`.
//! - `identify`: `userId` is the Retainly customer id, `traits.email` the Retently key;
//!   `firstName`/`first_name`, `lastName`/`last_name` (or `name` split at its first space),
//!   `company` (a string or `{ "name": … }`) and `tags` (strings) are the standard fields; every
//!   other trait becomes a typed property whose name is the trait's in snake_case (strings that
//!   are RFC 3339 instants become timestamps, whole numbers integers, lists of strings string
//!   lists; nulls, objects and other lists have no property type and are not stored).
//! - Messages without `userId` (only `anonymousId`) name no customer the gateway can key by:
//!   an anonymous `track` is acknowledged and not forwarded, an anonymous `identify` writes
//!   only to Retently, by `traits.email`, when there is one.
//! - `page`, `screen`, `group` and `alias` are acknowledged and not forwarded: neither upstream
//!   has anything they map to.

use serde_json::{Map, Value};

use crate::auth::Permission;
use crate::config::EventMappings;
use crate::domain::writes::DeliveryFacts;
use crate::error::Error;
use crate::grpc::customers::validation;
use crate::grpc::events;
use crate::pb;

/// Segment's limit for one message.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Segment's limit for one batch request.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;

/// What the endpoint says a message is when the message does not (`/v1/track`, `/v1/identify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Track,
    Identify,
}

/// One message, ready to be queued.
pub enum Planned {
    Track {
        request: pb::TrackEventRequest,
        facts: DeliveryFacts,
    },
    Identify {
        request: pb::UpsertCustomersRequest,
        facts: DeliveryFacts,
        message_id: Option<String>,
    },
    /// Valid, but nothing upstream to do (see the module doc).
    Acknowledged,
}

impl Planned {
    /// The customers it touches (the outbox delivers each customer's writes in order).
    pub fn ordering_keys(&self) -> &[String] {
        match self {
            Planned::Track { facts, .. } | Planned::Identify { facts, .. } => &facts.ordering_keys,
            Planned::Acknowledged => &[],
        }
    }

    /// The permission the caller needs for this message, the same as the RPC it stands for.
    pub fn permission(&self) -> Option<Permission> {
        match self {
            Planned::Track { .. } => Some(Permission::EventsWrite),
            Planned::Identify { .. } => Some(Permission::CustomersWrite),
            Planned::Acknowledged => None,
        }
    }
}

/// A problem with one message's input.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// The message's position in the batch (`None` outside a batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The Segment field at fault (`properties.plan`, `traits.email`, `userId`).
    pub field: String,
    pub description: String,
}

/// Checks one message and turns it into the write it stands for. `implied` is the endpoint's
/// type for `/v1/track` and `/v1/identify`; in a batch each message names its own `type`.
pub fn plan(
    mappings: &EventMappings,
    message: &Value,
    implied: Option<Kind>,
) -> Result<Planned, Vec<Problem>> {
    let problem = |field: &str, description: &str| {
        vec![Problem {
            index: None,
            field: field.to_owned(),
            description: description.to_owned(),
        }]
    };
    let Value::Object(fields) = message else {
        return Err(problem("", "must be a JSON object"));
    };
    let kind = match (fields.get("type"), implied) {
        (None, Some(kind)) => kind,
        (Some(Value::String(name)), implied) => match (name.as_str(), implied) {
            ("track", None | Some(Kind::Track)) => Kind::Track,
            ("identify", None | Some(Kind::Identify)) => Kind::Identify,
            ("page" | "screen" | "group" | "alias", None) => return Ok(Planned::Acknowledged),
            (_, Some(_)) => return Err(problem("type", "does not match the endpoint")),
            (_, None) => {
                return Err(problem(
                    "type",
                    "must be one of track, identify, page, screen, group, alias",
                ));
            }
        },
        (Some(_), _) => return Err(problem("type", "must be a string")),
        (None, None) => return Err(problem("type", "is required in a batch")),
    };
    let user_id = id_field(fields, "userId").map_err(|d| problem("userId", &d))?;
    let anonymous_id = id_field(fields, "anonymousId").map_err(|d| problem("anonymousId", &d))?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(problem("userId", "userId or anonymousId is required"));
    }
    let message_id = match fields.get("messageId") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if id.is_empty() => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => return Err(problem("messageId", "must be a string")),
    };
    let timestamp = timestamp(fields).map_err(|(field, d)| problem(field, &d))?;
    match kind {
        Kind::Track => plan_track(mappings, fields, user_id, message_id, timestamp),
        Kind::Identify => plan_identify(fields, user_id, message_id),
    }
}

/// `userId` / `anonymousId`: a string, or a number (some libraries send numeric ids).
fn id_field(fields: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if id.is_empty() => Ok(None),
        Some(Value::String(id)) => Ok(Some(id.clone())),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(_) => Err("must be a string".to_owned()),
    }
}

fn timestamp(
    fields: &Map<String, Value>,
) -> Result<Option<prost_types::Timestamp>, (&'static str, String)> {
    for name in ["timestamp", "originalTimestamp"] {
        match fields.get(name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(text)) => {
                let parsed = chrono::DateTime::parse_from_rfc3339(text)
                    .map_err(|_| (name, "must be an ISO 8601 date-time with a zone".to_owned()))?;
                return Ok(Some(prost_types::Timestamp {
                    seconds: parsed.timestamp(),
                    nanos: i32::try_from(parsed.timestamp_subsec_nanos()).unwrap_or(0),
                }));
            }
            Some(_) => return Err((name, "must be a string".to_owned())),
        }
    }
    Ok(None)
}

fn object<'a>(
    fields: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, Vec<Problem>> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(inner)) => Ok(Some(inner)),
        Some(_) => Err(vec![Problem {
            index: None,
            field: name.to_owned(),
            description: "must be an object".to_owned(),
        }]),
    }
}

fn text<'a>(fields: &'a Map<String, Value>, names: &[&str]) -> Option<&'a str> {
    names.iter().find_map(|name| match fields.get(*name) {
        Some(Value::String(text)) if !text.trim().is_empty() => Some(text.trim()),
        _ => None,
    })
}

fn context_email(fields: &Map<String, Value>) -> Option<String> {
    let traits = fields.get("context")?.get("traits")?.as_object()?;
    text(traits, &["email"]).map(str::to_owned)
}

fn plan_track(
    mappings: &EventMappings,
    fields: &Map<String, Value>,
    user_id: Option<String>,
    message_id: Option<String>,
    occur_time: Option<prost_types::Timestamp>,
) -> Result<Planned, Vec<Problem>> {
    let name = match fields.get("event") {
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(vec![Problem {
                index: None,
                field: "event".to_owned(),
                description: "is required".to_owned(),
            }]);
        }
        Some(_) => {
            return Err(vec![Problem {
                index: None,
                field: "event".to_owned(),
                description: "must be a string".to_owned(),
            }]);
        }
    };
    let properties = object(fields, "properties")?;
    let Some(customer_id) = user_id else {
        return Ok(Planned::Acknowledged);
    };
    let email = properties
        .and_then(|p| text(p, &["email"]).map(str::to_owned))
        .or_else(|| context_email(fields))
        .unwrap_or_default();
    // Nulls are how Segment libraries say "not set"; Retainly has no null value.
    let data: Map<String, Value> = properties
        .map(|p| {
            p.iter()
                .filter(|(_, value)| !value.is_null())
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    let request = pb::TrackEventRequest {
        event: Some(pb::Event {
            customer_id,
            email,
            name,
            properties: (!data.is_empty())
                .then(|| crate::convert::json_struct(&Value::Object(data))),
            occur_time,
            message_id: message_id.unwrap_or_default(),
            // Rule filters see the message's properties; `context.traits` is not carried.
            traits: None,
        }),
        options: None,
    };
    match events::check_track_event(mappings, &request) {
        Ok(event) => Ok(Planned::Track {
            facts: events::event_facts(mappings, event.clone()),
            request: pb::TrackEventRequest {
                event: Some(event),
                options: None,
            },
        }),
        Err(error) => Err(problems(&error, track_field)),
    }
}

/// The Segment field a TrackEvent violation is about.
fn track_field(field: &str) -> String {
    let field = field.strip_prefix("event.").unwrap_or(field);
    match field {
        "customer_id" => "userId".to_owned(),
        "name" => "event".to_owned(),
        "email" => "properties.email".to_owned(),
        "occur_time" => "timestamp".to_owned(),
        "message_id" => "messageId".to_owned(),
        other => other.to_owned(),
    }
}

fn problems(error: &Error, rename: impl Fn(&str) -> String) -> Vec<Problem> {
    let violations = error.violations();
    if violations.is_empty() {
        return vec![Problem {
            index: None,
            field: String::new(),
            description: error.message().to_owned(),
        }];
    }
    violations
        .iter()
        .map(|violation| Problem {
            index: None,
            field: rename(&violation.field),
            description: violation.description.clone(),
        })
        .collect()
}

/// Traits with a place of their own on the customer (or none at all: `id` is `userId`).
const STANDARD_TRAITS: [&str; 10] = [
    "email",
    "firstName",
    "first_name",
    "lastName",
    "last_name",
    "name",
    "company",
    "tags",
    "id",
    "userId",
];

fn plan_identify(
    fields: &Map<String, Value>,
    user_id: Option<String>,
    message_id: Option<String>,
) -> Result<Planned, Vec<Problem>> {
    let empty = Map::new();
    let traits = match object(fields, "traits")? {
        Some(traits) => traits,
        None => fields
            .get("context")
            .and_then(|c| c.get("traits"))
            .and_then(Value::as_object)
            .unwrap_or(&empty),
    };
    let email = text(traits, &["email"]).map(str::to_owned);
    if user_id.is_none() && email.is_none() {
        return Ok(Planned::Acknowledged);
    }
    let (mut first_name, mut last_name) = (
        text(traits, &["firstName", "first_name"]).map(str::to_owned),
        text(traits, &["lastName", "last_name"]).map(str::to_owned),
    );
    if first_name.is_none()
        && last_name.is_none()
        && let Some(name) = text(traits, &["name"])
    {
        let (first, last) = name.split_once(' ').unwrap_or((name, ""));
        first_name = Some(first.trim().to_owned());
        last_name = Some(last.trim().to_owned()).filter(|l| !l.is_empty());
    }
    let company = match traits.get("company") {
        Some(Value::String(name)) => name.trim().to_owned(),
        Some(Value::Object(company)) => text(company, &["name"]).unwrap_or_default().to_owned(),
        _ => String::new(),
    };
    let tags = match traits.get("tags") {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    // Each property's trait, to name it in a problem.
    let mut sources = Vec::new();
    let mut properties = Vec::new();
    for (key, value) in traits {
        if STANDARD_TRAITS.contains(&key.as_str()) {
            continue;
        }
        if let Some(value) = property_value(value) {
            sources.push(key.clone());
            properties.push(pb::Property {
                name: snake_case(key),
                value: Some(value),
                label: String::new(),
            });
        }
    }
    let mut destinations = Vec::new();
    if email.is_some() {
        destinations.push(pb::Destination::Retently as i32);
    }
    if user_id.is_some() {
        destinations.push(pb::Destination::Retainly as i32);
    }
    let request = pb::UpsertCustomersRequest {
        customers: vec![pb::Customer {
            customer_id: user_id.unwrap_or_default(),
            email: email.unwrap_or_default(),
            first_name: first_name.unwrap_or_default(),
            last_name: last_name.unwrap_or_default(),
            company,
            tags,
            properties,
            ..pb::Customer::default()
        }],
        destinations,
        options: None,
    };
    match validation::upsert_customers(&request) {
        Ok(write) => Ok(Planned::Identify {
            request,
            facts: write.facts,
            message_id,
        }),
        Err(error) => Err(problems(&error, |field| identify_field(field, &sources))),
    }
}

/// The Segment field an UpsertCustomers violation is about.
fn identify_field(field: &str, sources: &[String]) -> String {
    let field = field.strip_prefix("customers[0].").unwrap_or(field);
    if let Some(rest) = field.strip_prefix("properties[") {
        let index = rest.split(']').next().and_then(|n| n.parse::<usize>().ok());
        if let Some(source) = index.and_then(|i| sources.get(i)) {
            return format!("traits.{source}");
        }
        return "traits".to_owned();
    }
    match field {
        "customer_id" => "userId".to_owned(),
        "email" => "traits.email".to_owned(),
        "first_name" => "traits.firstName".to_owned(),
        "last_name" => "traits.lastName".to_owned(),
        "company" => "traits.company".to_owned(),
        other if other.starts_with("tags") => format!("traits.{other}"),
        other => other.to_owned(),
    }
}

/// A trait's value as a typed property, when it has a property type.
fn property_value(value: &Value) -> Option<pb::PropertyValue> {
    use pb::property_value::Kind;
    /// The largest integer every JSON parser reads exactly (2^53 - 1).
    const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;
    let kind = match value {
        Value::String(text) => match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(instant) => Kind::TimestampValue(prost_types::Timestamp {
                seconds: instant.timestamp(),
                nanos: i32::try_from(instant.timestamp_subsec_nanos()).unwrap_or(0),
            }),
            Err(_) => Kind::StringValue(text.clone()),
        },
        Value::Bool(flag) => Kind::BoolValue(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(whole) => Kind::IntegerValue(whole),
            None => {
                let float = number.as_f64()?;
                if float.fract() == 0.0 && float.abs() <= MAX_SAFE_INTEGER {
                    // A whole number within the exactly readable range.
                    #[allow(clippy::cast_possible_truncation)]
                    Kind::IntegerValue(float as i64)
                } else {
                    Kind::NumberValue(float)
                }
            }
        },
        Value::Array(items) if items.iter().all(Value::is_string) => {
            Kind::StringListValue(pb::StringList {
                values: items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
            })
        }
        Value::Null | Value::Object(_) | Value::Array(_) => return None,
    };
    Some(pb::PropertyValue { kind: Some(kind) })
}

/// `createdAt` → `created_at`, `Plan Name` → `plan_name`: the property naming Retently and
/// Retainly share.
fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut previous_lower = false;
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            if previous_lower {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
            previous_lower = false;
        } else if c.is_ascii_alphanumeric() {
            out.push(c);
            previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        } else {
            if !out.ends_with('_') && !out.is_empty() {
                out.push('_');
            }
            previous_lower = false;
        }
    }
    out.trim_end_matches('_').to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mappings() -> EventMappings {
        [("Order Placed".to_owned(), vec!["c1".to_owned()])].into()
    }

    #[test]
    fn trait_names_become_snake_case() {
        for (name, snake) in [
            ("createdAt", "created_at"),
            ("Plan Name", "plan_name"),
            ("plan", "plan"),
            ("utm-source", "utm_source"),
            ("logins30d", "logins30d"),
        ] {
            assert_eq!(snake_case(name), snake, "{name}");
        }
    }

    #[test]
    fn identify_maps_traits_to_a_customer_at_both_destinations() {
        let planned = plan(
            &mappings(),
            &json!({"userId": "u1", "messageId": "m1", "traits": {
                "email": "Ann@Example.com", "name": "Ann Lee", "company": {"name": "Acme"},
                "plan": "pro", "logins": 12, "createdAt": "2024-05-01T10:00:00Z",
                "address": {"city": "Oslo"}, "nothing": null, "tags": ["vip"]
            }}),
            Some(Kind::Identify),
        );
        let Ok(Planned::Identify {
            request,
            message_id,
            facts,
        }) = planned
        else {
            panic!("not an identify");
        };
        assert_eq!(message_id.as_deref(), Some("m1"));
        assert_eq!(facts.destinations.len(), 2);
        let customer = &request.customers[0];
        assert_eq!(customer.customer_id, "u1");
        assert_eq!(customer.first_name, "Ann");
        assert_eq!(customer.last_name, "Lee");
        assert_eq!(customer.company, "Acme");
        assert_eq!(customer.tags, ["vip"]);
        let names: Vec<&str> = customer
            .properties
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["created_at", "logins", "plan"]);
    }

    #[test]
    fn problems_use_segment_field_names() {
        let Err(problems) = plan(
            &mappings(),
            &json!({"userId": "u1", "event": "Order Placed", "properties": {"total": 3}}),
            Some(Kind::Track),
        ) else {
            panic!("a mapped event without an email must be refused");
        };
        assert_eq!(problems[0].field, "properties.email");

        let Err(problems) = plan(
            &mappings(),
            &json!({"type": "identify", "userId": "u1", "traits": {"email": "not-an-email"}}),
            None,
        ) else {
            panic!("a bad email must be refused");
        };
        assert_eq!(problems[0].field, "traits.email");

        let Err(problems) = plan(&mappings(), &json!({"event": "x"}), Some(Kind::Track)) else {
            panic!("no user");
        };
        assert_eq!(problems[0].field, "userId");

        let Err(problems) = plan(&mappings(), &json!({"type": "jump", "userId": "u"}), None) else {
            panic!("unknown type");
        };
        assert_eq!(problems[0].field, "type");
    }

    #[test]
    fn anonymous_and_unmapped_types_are_acknowledged_only() {
        for message in [
            json!({"type": "track", "anonymousId": "a1", "event": "Viewed"}),
            json!({"type": "identify", "anonymousId": "a1", "traits": {"plan": "x"}}),
            json!({"type": "page", "userId": "u1", "name": "Home"}),
        ] {
            assert!(matches!(
                plan(&mappings(), &message, None),
                Ok(Planned::Acknowledged)
            ));
        }
    }
}
