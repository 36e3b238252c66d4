//! Reading upstream responses into the log: the shared conversion of
//! [`crate::convert::feedback_to_pb`] (the one `SurveyService` uses too), plus what the log
//! needs on top of it.
//!
//! The poller and the webhook receiver both read through here, so the same upstream object
//! always gives the same message, byte for byte; that is what deduplication compares. A webhook
//! body is read through the upstream client's own model, exactly as a list page is. Only `id`
//! and `createdDate` are required: without them a response can be neither deduplicated nor
//! placed in time.

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

/// Reads a feedback object from raw JSON (a webhook body).
pub fn feedback_from_json(value: Value) -> Result<pb::Feedback, ConvertError> {
    let feedback: retently::Feedback =
        serde_json::from_value(value).map_err(|_| ConvertError::NotFeedback)?;
    feedback_to_pb(&feedback)
}

/// The contract's message for one upstream response, if it can go into the log.
pub fn feedback_to_pb(feedback: &retently::Feedback) -> Result<pb::Feedback, ConvertError> {
    let id = feedback.id.trim();
    if id.is_empty() || id.len() > MAX_ID_LEN || id.len() != feedback.id.len() {
        return Err(ConvertError::MissingId);
    }
    let converted = crate::convert::feedback_to_pb(feedback);
    if converted.create_time.is_none() {
        return Err(ConvertError::MissingCreatedDate);
    }
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use serde_json::json;

    use super::*;

    fn sample() -> Value {
        json!({
            "id": "5a9d595701c85b37224ab2d0",
            "email": "ada@example.com",
            "tags": ["vip"],
            "customProps": [{"label": "Plan", "name": "plan", "type": "text", "value": "gold"}],
            "campaignId": "c1",
            "createdDate": "2019-07-28T04:33:13.217Z",
            "score": 9,
            "comment": "great",
            "additionalQuestions": [{"q": "why", "a": 1}],
            "feedbackTopics": [{"name": "Speed", "sentiment": "positive"}],
            "feedbackTags": ["urgent"],
            "feedbackTagsNew": "x,y",
            "notes": [{"text": "called back", "at": 3}],
            "metricsType": "NPS",
            "isSubmitted": true
        })
    }

    #[test]
    fn webhook_json_reads_like_a_list_item() {
        let feedback = feedback_from_json(sample()).unwrap();
        assert_eq!(feedback.feedback_id, "5a9d595701c85b37224ab2d0");
        assert_eq!(feedback.score_category, pb::ScoreCategory::Promoter as i32);
        assert_eq!(feedback.tags_new, vec!["x", "y"]);
        let created = feedback.create_time.unwrap();
        assert_eq!(
            (created.seconds, created.nanos),
            (1_564_288_393, 217_000_000)
        );
        let listed: retently::Feedback = serde_json::from_value(sample()).unwrap();
        assert_eq!(feedback_to_pb(&listed).unwrap(), feedback);
    }

    #[test]
    fn id_and_creation_date_are_required() {
        let mut item = sample();
        item["createdDate"] = json!("yesterday");
        assert_eq!(
            feedback_from_json(item.clone()),
            Err(ConvertError::MissingCreatedDate)
        );
        item["createdDate"] = Value::Null;
        assert_eq!(
            feedback_from_json(item.clone()),
            Err(ConvertError::MissingCreatedDate)
        );
        item["createdDate"] = json!("2024-01-01T00:00:00Z");
        item["id"] = json!("");
        assert_eq!(feedback_from_json(item), Err(ConvertError::MissingId));
        assert_eq!(
            feedback_from_json(json!("text")),
            Err(ConvertError::NotFeedback)
        );
    }

    #[test]
    fn the_same_object_always_gives_the_same_bytes() {
        // Objects inside (notes, additional questions) become maps with ordered keys, so the
        // encoding, and with it the digest, does not depend on the order fields arrived in.
        let first = feedback_from_json(sample()).unwrap().encode_to_vec();
        let mut reordered = sample();
        reordered["notes"] = json!([{"at": 3, "text": "called back"}]);
        let second = feedback_from_json(reordered).unwrap().encode_to_vec();
        assert_eq!(first, second);
    }
}
