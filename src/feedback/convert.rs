//! Retently's feedback object (an item of `GET /api/v2/feedback` `data.responses`, or the
//! `feedback` of a webhook call) to the contract's `Feedback` message.
//!
//! The upstream documents the field names but not every type (see `retently-api.md` §7.7), so
//! reading is tolerant: numbers may arrive as strings, strings as numbers, lists as
//! comma-separated text, and unknown fields are ignored. Only `id` and `createdDate` are
//! required: without them an item can be neither deduplicated nor placed in time.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use crate::pb;

/// Longest feedback id accepted; upstream ids are 24 hex characters.
const MAX_ID_LEN: usize = 64;

/// Why an upstream item could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("the feedback item is not a json object")]
    NotAnObject,
    #[error("the feedback item has no usable id")]
    MissingId,
    #[error("the feedback item has no usable createdDate")]
    MissingCreatedDate,
}

/// Reads one Retently feedback object.
pub fn feedback_from_retently(value: &Value) -> Result<pb::Feedback, ConvertError> {
    let object = value.as_object().ok_or(ConvertError::NotAnObject)?;
    let feedback_id = text(object, &["id", "_id"]);
    if feedback_id.is_empty() || feedback_id.len() > MAX_ID_LEN {
        return Err(ConvertError::MissingId);
    }
    let create_time = object
        .get("createdDate")
        .and_then(parse_instant)
        .ok_or(ConvertError::MissingCreatedDate)?;
    let metric = metric(&text(object, &["metricsType", "metric"]));
    let score = object.get("score").and_then(number);
    Ok(pb::Feedback {
        feedback_id,
        survey_id: text(object, &["surveyId"]),
        campaign_id: text(object, &["campaignId"]),
        campaign_name: text(object, &["campaignName"]),
        metric: metric as i32,
        channel: channel(&text(object, &["channel"])) as i32,
        score,
        score_category: score_category(metric, score) as i32,
        comment: text(object, &["comment"]),
        checkbox: object.get("checkbox").is_some_and(truthy),
        additional_questions: structs(object.get("additionalQuestions")),
        create_time: Some(timestamp(create_time)),
        retently_customer_id: text(object, &["customerId"]),
        email: text(object, &["email"]),
        first_name: text(object, &["firstName", "first_name"]),
        last_name: text(object, &["lastName", "last_name"]),
        company_name: text(object, &["companyName"]),
        company_id: text(object, &["companyId"]),
        job_title: text(object, &["jobTitle"]),
        country: text(object, &["country"]),
        state: text(object, &["state"]),
        city: text(object, &["city"]),
        customer_tags: strings(object.get("tags")),
        customer_properties: properties(object.get("customProps")),
        topics: topics(object.get("feedbackTopics")),
        tags: strings(object.get("feedbackTags")),
        tags_new: strings(object.get("feedbackTagsNew")),
        notes: structs(object.get("notes")),
        status: text(object, &["status"]),
        assignee: assignee(object.get("assigned")),
        rating_category: text(object, &["ratingCategory"]),
        resolved: object.get("resolved").is_some_and(truthy),
        bogus: object.get("isBogus").is_some_and(truthy),
        submitted: object.get("isSubmitted").is_some_and(truthy),
    })
}

/// The gateway's classification of a score on its metric's scale (see `ScoreCategory` in the
/// contract): NPS 9..10 / 7..8 / 0..6; CSAT and STAR 4..5 / 3 / 1..2; CES 5..7 / 4 / 1..3.
pub fn score_category(metric: pb::Metric, score: Option<f64>) -> pb::ScoreCategory {
    let Some(score) = score.filter(|score| score.is_finite()) else {
        return pb::ScoreCategory::Unspecified;
    };
    let (promoter_from, passive_from) = match metric {
        pb::Metric::Nps => (9.0, 7.0),
        pb::Metric::Csat | pb::Metric::Star => (4.0, 3.0),
        pb::Metric::Ces => (5.0, 4.0),
        pb::Metric::Unspecified => return pb::ScoreCategory::Unspecified,
    };
    if score >= promoter_from {
        pb::ScoreCategory::Promoter
    } else if score >= passive_from {
        pb::ScoreCategory::Passive
    } else {
        pb::ScoreCategory::Detractor
    }
}

fn metric(raw: &str) -> pb::Metric {
    match raw.trim().to_ascii_uppercase().as_str() {
        "NPS" => pb::Metric::Nps,
        "CSAT" => pb::Metric::Csat,
        "CES" => pb::Metric::Ces,
        "STAR" | "5STAR" | "5-STAR" | "5_STAR" => pb::Metric::Star,
        _ => pb::Metric::Unspecified,
    }
}

fn channel(raw: &str) -> pb::Channel {
    match raw.trim().to_ascii_lowercase().as_str() {
        "" => pb::Channel::Unspecified,
        "email" => pb::Channel::Email,
        "link" => pb::Channel::Link,
        "in-app" | "inapp" | "in_app" => pb::Channel::InApp,
        "intercom" => pb::Channel::Intercom,
        _ => pb::Channel::Other,
    }
}

/// The first of `keys` present as text (numbers and booleans are written out); empty if none.
fn text(object: &Map<String, Value>, keys: &[&str]) -> String {
    keys.iter()
        .find_map(|key| object.get(*key).and_then(scalar_text))
        .unwrap_or_default()
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn number(value: &Value) -> Option<f64> {
    let number = match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    number.is_finite().then_some(number)
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Bool(flag) => *flag,
        Value::Number(number) => number.as_f64().is_some_and(|n| n != 0.0),
        Value::String(text) => matches!(
            text.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "y"
        ),
        _ => false,
    }
}

/// ISO 8601 / RFC 3339 (with or without a zone; without one it is read as UTC), or UNIX time in
/// seconds (or milliseconds, for values too large to be seconds).
fn parse_instant(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::String(text) => {
            let text = text.trim();
            if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
                return Some(instant.with_timezone(&Utc));
            }
            for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
                if let Ok(naive) = NaiveDateTime::parse_from_str(text, format) {
                    return Some(naive.and_utc());
                }
            }
            text.parse::<i64>().ok().and_then(unix_instant)
        }
        Value::Number(number) => number.as_i64().and_then(unix_instant),
        _ => None,
    }
}

fn unix_instant(value: i64) -> Option<DateTime<Utc>> {
    // 10^11 seconds is the year 5138: anything larger is milliseconds.
    if value.abs() < 100_000_000_000 {
        DateTime::from_timestamp(value, 0)
    } else {
        DateTime::from_timestamp_millis(value)
    }
}

pub(crate) fn timestamp(instant: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: instant.timestamp(),
        // Sub-second nanoseconds are below 10^9 and fit in i32.
        nanos: i32::try_from(instant.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A list of strings from an array (non-string scalars written out) or comma-separated text.
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(scalar_text)
            .filter(|item| !item.is_empty())
            .collect(),
        Some(Value::String(text)) => text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Objects of an array as `google.protobuf.Struct`; a non-object item is kept as `{"value": …}`
/// so nothing the upstream sent is dropped.
fn structs(value: Option<&Value>) -> Vec<prost_types::Struct> {
    let Some(Value::Array(items)) = value else {
        return Vec::new();
    };
    items
        .iter()
        .map(|item| match item {
            Value::Object(fields) => struct_of(fields),
            other => prost_types::Struct {
                fields: [("value".to_owned(), struct_value(other))].into(),
            },
        })
        .collect()
}

fn struct_of(fields: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: fields
            .iter()
            .map(|(key, value)| (key.clone(), struct_value(value)))
            .collect(),
    }
}

fn struct_value(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(prost_types::NullValue::NullValue as i32),
        Value::Bool(flag) => Kind::BoolValue(*flag),
        Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(0.0)),
        Value::String(text) => Kind::StringValue(text.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(struct_value).collect(),
        }),
        Value::Object(fields) => Kind::StructValue(struct_of(fields)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn topics(value: Option<&Value>) -> Vec<pb::FeedbackTopic> {
    let Some(Value::Array(items)) = value else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match item {
            Value::Object(fields) => {
                let name = text(fields, &["name"]);
                let sentiment = match text(fields, &["sentiment"]).to_ascii_lowercase().as_str() {
                    "positive" => pb::Sentiment::Positive,
                    "neutral" => pb::Sentiment::Neutral,
                    "negative" => pb::Sentiment::Negative,
                    _ => pb::Sentiment::Unspecified,
                };
                (!name.is_empty()).then_some(pb::FeedbackTopic {
                    name,
                    sentiment: sentiment as i32,
                })
            }
            Value::String(name) if !name.is_empty() => Some(pb::FeedbackTopic {
                name: name.clone(),
                sentiment: pb::Sentiment::Unspecified as i32,
            }),
            _ => None,
        })
        .collect()
}

/// `assigned` is a team member: seen as a name or email string; an object is read by its email,
/// then its name.
fn assignee(value: Option<&Value>) -> String {
    match value {
        Some(Value::Object(fields)) => text(fields, &["email", "name", "id"]),
        Some(other) => scalar_text(other).unwrap_or_default(),
        None => String::new(),
    }
}

fn properties(value: Option<&Value>) -> Vec<pb::Property> {
    let Some(Value::Array(items)) = value else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let fields = item.as_object()?;
            let label = text(fields, &["label"]);
            let mut name = text(fields, &["name"]);
            if name.is_empty() {
                name = snake_case(&label);
            }
            if name.is_empty() {
                return None;
            }
            let kind = text(fields, &["type"]).to_ascii_lowercase();
            let value = fields
                .get("value")
                .filter(|value| !value.is_null())
                .map(|value| pb::PropertyValue {
                    kind: Some(property_kind(&kind, value)),
                });
            Some(pb::Property { name, value, label })
        })
        .collect()
}

/// A property value by its upstream `type` (text, date, integer, boolean, collection); a value
/// that does not read as its type is kept as text.
fn property_kind(kind: &str, value: &Value) -> pb::property_value::Kind {
    use pb::property_value::Kind;
    let as_text = || Kind::StringValue(scalar_text(value).unwrap_or_else(|| value.to_string()));
    match kind {
        "date" => parse_instant(value).map_or_else(as_text, |instant| {
            Kind::TimestampValue(timestamp(instant))
        }),
        "integer" => match value {
            Value::Number(number) if number.is_i64() => {
                number.as_i64().map_or_else(as_text, Kind::IntegerValue)
            }
            Value::String(text) => text
                .trim()
                .parse::<i64>()
                .map_or_else(|_| as_text(), Kind::IntegerValue),
            _ => as_text(),
        },
        "boolean" => match value {
            Value::Bool(flag) => Kind::BoolValue(*flag),
            Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "y" => Kind::BoolValue(true),
                "false" | "0" | "no" | "n" => Kind::BoolValue(false),
                _ => as_text(),
            },
            Value::Number(number) => Kind::BoolValue(number.as_f64().is_some_and(|n| n != 0.0)),
            _ => as_text(),
        },
        "collection" => Kind::StringListValue(pb::StringList {
            values: strings(Some(value)),
        }),
        "number" | "decimal" | "float" => number(value).map_or_else(as_text, Kind::NumberValue),
        _ => match value {
            Value::Array(_) => Kind::StringListValue(pb::StringList {
                values: strings(Some(value)),
            }),
            _ => as_text(),
        },
    }
}

/// Retently's label-to-name rule: lowercase words joined by `_`.
fn snake_case(label: &str) -> String {
    label
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join("_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "id": "5a9d595701c85b37224ab2d0",
            "surveyId": "5a9d595701c85b37224ab2d1",
            "customerId": "5a9d595701c85b37224ab2d2",
            "email": "ada@example.com",
            "firstName": "Ada",
            "lastName": null,
            "companyName": "Analytical",
            "tags": ["vip", "beta"],
            "customProps": [
                {"label": "Plan name", "name": "plan_name", "type": "text", "value": "gold"},
                {"label": "Seats", "type": "integer", "value": "12"},
                {"label": "Renewal", "name": "renewal", "type": "date", "value": "2024-03-01T00:00:00.000Z"},
                {"label": "Active", "name": "active", "type": "boolean", "value": "Yes"},
                {"label": "Teams", "name": "teams", "type": "collection", "value": "a, b"}
            ],
            "campaignId": "c1",
            "campaignName": "Onboarding",
            "createdDate": "2019-07-28T04:33:13.217Z",
            "score": 9,
            "comment": "great",
            "checkbox": true,
            "additionalQuestions": [{"q": "why", "a": 1}, "loose"],
            "feedbackTopics": [{"name": "Speed", "sentiment": "positive"}],
            "feedbackTags": ["urgent"],
            "feedbackTagsNew": "x,y",
            "notes": [],
            "status": "open",
            "assigned": {"email": "agent@example.com"},
            "ratingCategory": "Positive",
            "resolved": false,
            "channel": "in-app",
            "metricsType": "NPS",
            "isBogus": false,
            "isSubmitted": true
        })
    }

    #[test]
    fn reads_every_documented_field() {
        let feedback = feedback_from_retently(&sample()).unwrap();
        assert_eq!(feedback.feedback_id, "5a9d595701c85b37224ab2d0");
        assert_eq!(feedback.metric, pb::Metric::Nps as i32);
        assert_eq!(feedback.channel, pb::Channel::InApp as i32);
        assert_eq!(feedback.score, Some(9.0));
        assert_eq!(feedback.score_category, pb::ScoreCategory::Promoter as i32);
        assert_eq!(feedback.last_name, "");
        assert_eq!(feedback.customer_tags, vec!["vip", "beta"]);
        assert_eq!(feedback.tags, vec!["urgent"]);
        assert_eq!(feedback.tags_new, vec!["x", "y"]);
        assert_eq!(feedback.assignee, "agent@example.com");
        assert!(feedback.checkbox && feedback.submitted && !feedback.resolved);
        let created = feedback.create_time.unwrap();
        assert_eq!(created.seconds, 1_564_288_393);
        assert_eq!(created.nanos, 217_000_000);
        assert_eq!(feedback.additional_questions.len(), 2);
        assert_eq!(feedback.topics[0].sentiment, pb::Sentiment::Positive as i32);
        let kinds: Vec<_> = feedback
            .customer_properties
            .iter()
            .map(|p| (p.name.as_str(), p.value.clone().unwrap().kind.unwrap()))
            .collect();
        use pb::property_value::Kind;
        assert_eq!(kinds[0], ("plan_name", Kind::StringValue("gold".into())));
        assert_eq!(kinds[1], ("seats", Kind::IntegerValue(12)));
        assert!(matches!(kinds[2].1, Kind::TimestampValue(_)));
        assert_eq!(kinds[3], ("active", Kind::BoolValue(true)));
        assert_eq!(
            kinds[4].1,
            Kind::StringListValue(pb::StringList {
                values: vec!["a".into(), "b".into()]
            })
        );
    }

    #[test]
    fn id_and_creation_date_are_required() {
        let mut item = sample();
        item["createdDate"] = json!("yesterday");
        assert_eq!(
            feedback_from_retently(&item),
            Err(ConvertError::MissingCreatedDate)
        );
        item["createdDate"] = json!(1_564_288_393);
        assert!(feedback_from_retently(&item).is_ok());
        item["id"] = json!("");
        assert_eq!(feedback_from_retently(&item), Err(ConvertError::MissingId));
        assert_eq!(
            feedback_from_retently(&json!([1])),
            Err(ConvertError::NotAnObject)
        );
    }

    #[test]
    fn categories_follow_each_metric_scale() {
        use pb::Metric::*;
        use pb::ScoreCategory::*;
        for (metric, score, expected) in [
            (Nps, 10.0, Promoter),
            (Nps, 9.0, Promoter),
            (Nps, 8.0, Passive),
            (Nps, 7.0, Passive),
            (Nps, 6.0, Detractor),
            (Nps, 0.0, Detractor),
            (Csat, 4.0, Promoter),
            (Csat, 3.0, Passive),
            (Csat, 2.0, Detractor),
            (Star, 5.0, Promoter),
            (Ces, 5.0, Promoter),
            (Ces, 4.0, Passive),
            (Ces, 3.0, Detractor),
        ] {
            assert_eq!(score_category(metric, Some(score)), expected, "{metric:?} {score}");
        }
        assert_eq!(score_category(Nps, None), pb::ScoreCategory::Unspecified);
        assert_eq!(
            score_category(pb::Metric::Unspecified, Some(9.0)),
            pb::ScoreCategory::Unspecified
        );
    }

    #[test]
    fn a_missing_score_stays_unset() {
        let mut item = sample();
        item["score"] = Value::Null;
        let feedback = feedback_from_retently(&item).unwrap();
        assert_eq!(feedback.score, None);
        assert_eq!(feedback.score_category, pb::ScoreCategory::Unspecified as i32);
    }
}
