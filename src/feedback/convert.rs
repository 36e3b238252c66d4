//! Retently's feedback object (the upstream client's [`retently::Feedback`]: an item of
//! `GET /api/v2/feedback`, or the `feedback` of a webhook call) to the contract's `Feedback`.
//!
//! The poller and the webhook receiver both go through [`feedback_to_pb`], so the same upstream
//! object always gives the same message, byte for byte; that is what deduplication compares.
//! Only `id` and `createdDate` are required: without them a response can be neither
//! deduplicated nor placed in time. `SurveyService` can use the same function for
//! `GetFeedback`/`ListFeedback`.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::Value;

use crate::pb;
use crate::upstream::retently;

/// Longest feedback id accepted; upstream ids are 24 hex characters.
const MAX_ID_LEN: usize = 64;

/// Why an upstream item could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("the feedback item is not a feedback object")]
    NotFeedback,
    #[error("the feedback item has no usable id")]
    MissingId,
    #[error("the feedback item has no usable createdDate")]
    MissingCreatedDate,
}

/// Reads a feedback object from raw JSON (a webhook body) through the upstream client's model,
/// so it is read exactly as the poller reads it.
pub fn feedback_from_json(value: Value) -> Result<pb::Feedback, ConvertError> {
    let feedback: retently::Feedback =
        serde_json::from_value(value).map_err(|_| ConvertError::NotFeedback)?;
    feedback_to_pb(&feedback)
}

/// The contract's message for one upstream response.
pub fn feedback_to_pb(feedback: &retently::Feedback) -> Result<pb::Feedback, ConvertError> {
    let id = feedback.id.trim();
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ConvertError::MissingId);
    }
    let create_time = feedback
        .created_date
        .as_deref()
        .and_then(parse_instant)
        .ok_or(ConvertError::MissingCreatedDate)?;
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    let metric = metric(feedback.metrics_type.as_deref().unwrap_or_default());
    let score = feedback.score.filter(|score| score.is_finite());
    Ok(pb::Feedback {
        feedback_id: id.to_owned(),
        survey_id: text(&feedback.survey_id),
        campaign_id: text(&feedback.campaign_id),
        campaign_name: text(&feedback.campaign_name),
        metric: metric as i32,
        channel: channel(feedback.channel.as_deref().unwrap_or_default()) as i32,
        score,
        score_category: score_category(metric, score) as i32,
        comment: text(&feedback.comment),
        checkbox: feedback.checkbox,
        additional_questions: structs(&feedback.additional_questions),
        create_time: Some(timestamp(create_time)),
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
        customer_properties: feedback.custom_props.iter().filter_map(property).collect(),
        topics: feedback.feedback_topics.iter().filter_map(topic).collect(),
        tags: feedback.feedback_tags.clone(),
        tags_new: feedback.feedback_tags_new.clone(),
        notes: structs(&feedback.notes),
        status: text(&feedback.status),
        assignee: text(&feedback.assigned),
        rating_category: text(&feedback.rating_category),
        resolved: feedback.resolved,
        bogus: feedback.is_bogus,
        submitted: feedback.is_submitted,
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

/// ISO 8601 / RFC 3339 (without a zone it is read as UTC), or UNIX time in seconds (or
/// milliseconds, for values too large to be seconds).
pub fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
        return Some(instant.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, format) {
            return Some(naive.and_utc());
        }
    }
    let unix: i64 = text.parse().ok()?;
    // 10^11 seconds is the year 5138: anything larger is milliseconds.
    if unix.abs() < 100_000_000_000 {
        DateTime::from_timestamp(unix, 0)
    } else {
        DateTime::from_timestamp_millis(unix)
    }
}

fn timestamp(instant: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: instant.timestamp(),
        // Sub-second nanoseconds are below 10^9 and fit in i32.
        nanos: i32::try_from(instant.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Objects of a list as `google.protobuf.Struct`; a non-object item is kept as `{"value": …}`
/// so nothing the upstream sent is dropped.
fn structs(items: &[Value]) -> Vec<prost_types::Struct> {
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

fn struct_of(fields: &serde_json::Map<String, Value>) -> prost_types::Struct {
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

fn topic(topic: &retently::Topic) -> Option<pb::FeedbackTopic> {
    let sentiment = match topic
        .sentiment
        .as_deref()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "positive" => pb::Sentiment::Positive,
        "neutral" => pb::Sentiment::Neutral,
        "negative" => pb::Sentiment::Negative,
        _ => pb::Sentiment::Unspecified,
    };
    (!topic.name.is_empty()).then(|| pb::FeedbackTopic {
        name: topic.name.clone(),
        sentiment: sentiment as i32,
    })
}

/// A customer property by its upstream `type` (text, date, integer, boolean, collection); a
/// value that does not read as its type is kept as text.
fn property(property: &retently::Property) -> Option<pb::Property> {
    let label = property.label.clone().unwrap_or_default();
    let name = match property.name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => snake_case(&label),
    };
    if name.is_empty() {
        return None;
    }
    let kind = property
        .kind
        .as_deref()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let value = property.value.as_deref().map(|raw| pb::PropertyValue {
        kind: Some(property_kind(&kind, raw)),
    });
    Some(pb::Property { name, value, label })
}

fn property_kind(kind: &str, raw: &str) -> pb::property_value::Kind {
    use pb::property_value::Kind;
    let as_text = || Kind::StringValue(raw.to_owned());
    match kind {
        "date" => parse_instant(raw)
            .map_or_else(as_text, |instant| Kind::TimestampValue(timestamp(instant))),
        "integer" => raw
            .trim()
            .parse::<i64>()
            .map_or_else(|_| as_text(), Kind::IntegerValue),
        "boolean" => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "y" => Kind::BoolValue(true),
            "false" | "0" | "no" | "n" => Kind::BoolValue(false),
            _ => as_text(),
        },
        "collection" => Kind::StringListValue(pb::StringList {
            values: raw
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect(),
        }),
        "number" | "decimal" | "float" => raw
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|number| number.is_finite())
            .map_or_else(as_text, Kind::NumberValue),
        _ => as_text(),
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
            "assigned": "agent@example.com",
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
        let feedback = feedback_from_json(sample()).unwrap();
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
            feedback_from_json(item.clone()),
            Err(ConvertError::MissingCreatedDate)
        );
        item["createdDate"] = json!(1_564_288_393);
        assert!(feedback_from_json(item.clone()).is_ok());
        item["id"] = json!("");
        assert_eq!(feedback_from_json(item), Err(ConvertError::MissingId));
        assert_eq!(
            feedback_from_json(json!("text")),
            Err(ConvertError::NotFeedback)
        );
    }

    #[test]
    fn the_same_object_always_gives_the_same_bytes() {
        use prost::Message as _;
        let first = feedback_from_json(sample()).unwrap().encode_to_vec();
        let second = feedback_from_json(sample()).unwrap().encode_to_vec();
        assert_eq!(first, second);
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
            assert_eq!(
                score_category(metric, Some(score)),
                expected,
                "{metric:?} {score}"
            );
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
        let feedback = feedback_from_json(item).unwrap();
        assert_eq!(feedback.score, None);
        assert_eq!(
            feedback.score_category,
            pb::ScoreCategory::Unspecified as i32
        );
    }
}
