//! Conversions to and from the contract's `pb` types that the gRPC adapters, the write path and
//! the feedback pipeline share: instants, `google.protobuf.Value` as JSON, and Retently survey
//! responses as `Feedback` (with their properties, metrics, channels and sentiments). No side
//! owns them, so here none imports another; what only one adapter needs stays in
//! `grpc::convert` or `feedback::convert`.

use crate::pb;
use crate::upstream::retently;

/// Milliseconds since the Unix epoch as a `Timestamp`.
pub fn timestamp_from_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        // The remainder of a division by 1000 fits in i32.
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A `Timestamp` as milliseconds since the Unix epoch (finer parts dropped, overflow saturated).
pub fn timestamp_to_ms(timestamp: &prost_types::Timestamp) -> i64 {
    timestamp
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(timestamp.nanos / 1_000_000))
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

/// A metric as the upstream spells it in `metric`/`metricsType` (`NPS`, `CSAT`, `CES`, `STAR`,
/// any case); unknown or absent values are unspecified.
pub fn metric_from_retently(raw: Option<&str>) -> pb::Metric {
    match raw.unwrap_or_default().trim().to_ascii_uppercase().as_str() {
        "NPS" => pb::Metric::Nps,
        "CSAT" => pb::Metric::Csat,
        "CES" => pb::Metric::Ces,
        "STAR" | "5STAR" | "5-STAR" | "5_STAR" => pb::Metric::Star,
        _ => pb::Metric::Unspecified,
    }
}

/// A channel as the upstream spells it (`email`, `link`, `in-app`/`inapp`, `intercom`).
pub fn channel_from_retently(raw: Option<&str>) -> pb::Channel {
    match raw.unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "" => pb::Channel::Unspecified,
        "email" => pb::Channel::Email,
        "link" => pb::Channel::Link,
        "in-app" | "inapp" | "in_app" => pb::Channel::InApp,
        "intercom" => pb::Channel::Intercom,
        _ => pb::Channel::Other,
    }
}

/// A topic sentiment (`positive`, `neutral`, `negative`).
pub fn sentiment_from_retently(raw: Option<&str>) -> pb::Sentiment {
    match raw.unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "positive" => pb::Sentiment::Positive,
        "neutral" => pb::Sentiment::Neutral,
        "negative" => pb::Sentiment::Negative,
        _ => pb::Sentiment::Unspecified,
    }
}

/// The gateway's classification of an answer on its metric's scale (see `ScoreCategory` in the
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

/// An upstream object whose shape is not documented, passed through as a `Struct`; an item that
/// is not an object is kept as `{"value": item}` so nothing the upstream sent is dropped.
pub fn json_struct(value: &serde_json::Value) -> prost_types::Struct {
    match value {
        serde_json::Value::Object(fields) => prost_types::Struct {
            fields: fields
                .iter()
                .map(|(key, value)| (key.clone(), json_to_value(value)))
                .collect(),
        },
        other => prost_types::Struct {
            fields: [("value".to_owned(), json_to_value(other))].into(),
        },
    }
}

fn json_to_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    let kind = match value {
        Value::Null => Kind::NullValue(prost_types::NullValue::NullValue as i32),
        Value::Bool(flag) => Kind::BoolValue(*flag),
        // Every JSON number has an f64 reading (large integers lose precision, as in any JSON
        // parser that reads doubles).
        Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(f64::NAN)),
        Value::String(text) => Kind::StringValue(text.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(json_struct(value)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// One Retently survey response as the contract's `Feedback`, with `score_category` derived from
/// the metric and the score. Shared by SurveyService and FeedbackStream.
pub fn feedback_to_pb(feedback: &retently::Feedback) -> pb::Feedback {
    let metric = metric_from_retently(feedback.metrics_type.as_deref());
    let score = feedback.score.filter(|score| score.is_finite());
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    pb::Feedback {
        feedback_id: feedback.id.clone(),
        survey_id: text(&feedback.survey_id),
        campaign_id: text(&feedback.campaign_id),
        campaign_name: text(&feedback.campaign_name),
        metric: metric as i32,
        channel: channel_from_retently(feedback.channel.as_deref()) as i32,
        score,
        score_category: score_category(metric, score) as i32,
        comment: text(&feedback.comment),
        checkbox: feedback.checkbox,
        additional_questions: feedback
            .additional_questions
            .iter()
            .map(json_struct)
            .collect(),
        create_time: timestamp_from_rfc3339(feedback.created_date.as_deref()),
        retently_customer_id: text(&feedback.customer_id),
        email: text(&feedback.email),
        first_name: text(&feedback.first_name),
        last_name: text(&feedback.last_name),
        company_name: text(&feedback.company_name),
        company_id: text(&feedback.company_id),
        job_title: text(&feedback.job_title),
        country: text(&feedback.country),
        state: text(&feedback.state),
        city: text(&feedback.city),
        customer_tags: feedback.tags.clone(),
        customer_properties: feedback
            .custom_props
            .iter()
            .map(property_from_retently)
            .collect(),
        topics: feedback
            .feedback_topics
            .iter()
            .map(|topic| pb::FeedbackTopic {
                name: topic.name.clone(),
                sentiment: sentiment_from_retently(topic.sentiment.as_deref()) as i32,
            })
            .collect(),
        tags: feedback.feedback_tags.clone(),
        tags_new: feedback.feedback_tags_new.clone(),
        notes: feedback.notes.iter().map(json_struct).collect(),
        status: text(&feedback.status),
        assignee: text(&feedback.assigned),
        rating_category: text(&feedback.rating_category),
        resolved: feedback.resolved,
        bogus: feedback.is_bogus,
        submitted: feedback.is_submitted,
    }
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
