//! Feedback (survey responses): list, get, tags and topics, and the latest score per metric.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::Uri;
use serde_json::{Map, Value, json};

use super::envelope::{
    Envelope, Params, RetentlyError, SortValue, optional_string, parse_body, success,
};
use super::model::{Feedback, Metric, Score, Topic, normalize_email};
use crate::ids::is_object_id;
use crate::state::Shared;

const SORTS: &[&str] = &["createdDate", "score", "email"];

pub(crate) async fn list(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Json<Envelope>, RetentlyError> {
    let params = Params::from_uri(&uri)?;
    let paging = params.paging("-createdDate", SORTS)?;
    let range = params.date_range()?;
    let email = params.get("email").map(normalize_email);
    let customer_id = params.get("customerId");
    let campaign_id = params.get("campaignId");
    let world = shared.world();
    let items: Vec<&Feedback> = world
        .retently
        .feedback
        .iter()
        .filter(|item| email.as_ref().is_none_or(|email| &item.email == email))
        .filter(|item| customer_id.is_none_or(|id| item.customer_id == id))
        .filter(|item| campaign_id.is_none_or(|id| item.campaign_id == id))
        .filter(|item| range.contains(item.created))
        .collect();
    let data = paging.page(
        "responses",
        items,
        |item| sort_key(item, &paging.field),
        |item| item.to_json(),
    );
    Ok(success(data))
}

fn sort_key(item: &Feedback, field: &str) -> (SortValue, String) {
    let primary = match field {
        "score" => SortValue::Int(item.score),
        "email" => SortValue::Text(item.email.clone()),
        _ => SortValue::Time(item.created),
    };
    (primary, item.id.clone())
}

/// `GET /feedback/{id}`. The docs' path template says `{feedbackId|campaignId}`: a campaign id
/// answers that campaign's responses as a list (same parameters as `GET /feedback`).
pub(crate) async fn get(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<Envelope>, RetentlyError> {
    if !is_object_id(&id) {
        return Err(RetentlyError::bad_request("The feedback id is invalid."));
    }
    let params = Params::from_uri(&uri)?;
    let world = shared.world();
    if let Some(item) = world.retently.feedback_by_id(&id) {
        return Ok(success(item.to_json()));
    }
    if world.retently.campaign(&id).is_some() {
        let paging = params.paging("-createdDate", SORTS)?;
        let range = params.date_range()?;
        let items: Vec<&Feedback> = world
            .retently
            .feedback
            .iter()
            .filter(|item| item.campaign_id == id && range.contains(item.created))
            .collect();
        let data = paging.page(
            "responses",
            items,
            |item| sort_key(item, &paging.field),
            |item| item.to_json(),
        );
        return Ok(success(data));
    }
    Err(RetentlyError::not_found("Feedback not found."))
}

/// `op` of the tags and topics calls: missing or empty replaces, `append` adds.
fn append_mode(body: &Map<String, Value>) -> Result<bool, RetentlyError> {
    match optional_string(body, &["op"], "")?.as_deref() {
        None | Some("") | Some("replace") => Ok(false),
        Some("append") => Ok(true),
        Some(_) => Err(RetentlyError::bad_request(
            "The op must be empty (replace) or append.",
        )),
    }
}

fn response_id(body: &Map<String, Value>) -> Result<String, RetentlyError> {
    let id = optional_string(body, &["id"], "")?
        .filter(|id| !id.is_empty())
        .ok_or_else(|| RetentlyError::bad_request("The id field is required."))?;
    if !is_object_id(&id) {
        return Err(RetentlyError::bad_request("The id is invalid."));
    }
    Ok(id)
}

pub(crate) async fn set_tags(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Envelope>, RetentlyError> {
    let body = parse_body(&body)?;
    let id = response_id(&body)?;
    let append = append_mode(&body)?;
    let tags: Vec<String> = match body.get("tags") {
        None | Some(Value::Null) => {
            return Err(RetentlyError::bad_request("The tags field is required."));
        }
        Some(Value::Array(tags)) => tags
            .iter()
            .enumerate()
            .map(|(index, tag)| {
                tag.as_str()
                    .map(|tag| tag.trim().to_owned())
                    .ok_or_else(|| {
                        RetentlyError::bad_request(format!("The tags.{index} must be a string."))
                    })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(RetentlyError::bad_request(
                "The tags must be an array of strings.",
            ));
        }
    };
    let mut world = shared.world();
    let item = world
        .retently
        .feedback_by_id_mut(&id)
        .ok_or_else(|| RetentlyError::not_found("Feedback not found."))?;
    if !append {
        item.feedback_tags.clear();
    }
    for tag in tags.into_iter().filter(|tag| !tag.is_empty()) {
        if !item.feedback_tags.contains(&tag) {
            item.feedback_tags.push(tag);
        }
    }
    Ok(success(
        json!({"id": item.id, "feedbackTags": item.feedback_tags}),
    ))
}

pub(crate) async fn set_topics(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Envelope>, RetentlyError> {
    let body = parse_body(&body)?;
    let id = response_id(&body)?;
    let append = append_mode(&body)?;
    let topics: Vec<Topic> = match body.get("topics") {
        None | Some(Value::Null) => {
            return Err(RetentlyError::bad_request("The topics field is required."));
        }
        Some(Value::Array(topics)) => topics
            .iter()
            .enumerate()
            .map(|(index, topic)| parse_topic(topic, index))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(RetentlyError::bad_request("The topics must be an array.")),
    };
    let mut world = shared.world();
    let item = world
        .retently
        .feedback_by_id_mut(&id)
        .ok_or_else(|| RetentlyError::not_found("Feedback not found."))?;
    if !append {
        item.topics.clear();
    }
    for topic in topics {
        // Appending a topic already present updates its sentiment.
        match item
            .topics
            .iter_mut()
            .find(|stored| stored.name.eq_ignore_ascii_case(&topic.name))
        {
            Some(stored) => stored.sentiment = topic.sentiment,
            None => item.topics.push(topic),
        }
    }
    let topics: Vec<Value> = item.topics.iter().map(Topic::to_json).collect();
    Ok(success(json!({"id": item.id, "feedbackTopics": topics})))
}

fn parse_topic(raw: &Value, index: usize) -> Result<Topic, RetentlyError> {
    let path = format!("topics.{index}.");
    let object = raw.as_object().ok_or_else(|| {
        RetentlyError::bad_request(format!("The topics.{index} must be an object."))
    })?;
    let name = optional_string(object, &["name"], &path)?
        .filter(|name| !name.is_empty())
        .ok_or_else(|| RetentlyError::bad_request(format!("The {path}name field is required.")))?;
    let sentiment = optional_string(object, &["sentiment"], &path)?
        .filter(|sentiment| !sentiment.is_empty())
        .map(|sentiment| sentiment.to_ascii_lowercase())
        .unwrap_or_else(|| "neutral".to_owned());
    if !["positive", "neutral", "negative"].contains(&sentiment.as_str()) {
        return Err(RetentlyError::bad_request(format!(
            "The {path}sentiment must be one of: positive, neutral, negative."
        )));
    }
    Ok(Topic { name, sentiment })
}

/// `GET /{metric}/score`: computed over every stored response of campaigns of that metric.
/// `campaignId`, `startDate` and `endDate` narrow it (a sandbox extension).
pub(crate) async fn score(
    State(shared): State<Arc<Shared>>,
    Path(metric): Path<String>,
    uri: Uri,
) -> Result<Json<Envelope>, RetentlyError> {
    let metric = Metric::from_path(&metric)
        .ok_or_else(|| RetentlyError::not_found("Unknown metric: use nps, csat, ces or star."))?;
    score_of(&shared, metric, &uri)
}

/// The legacy `GET /api/v2/nps/score`.
pub(crate) async fn nps_score(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Json<Envelope>, RetentlyError> {
    score_of(&shared, Metric::Nps, &uri)
}

fn score_of(shared: &Shared, metric: Metric, uri: &Uri) -> Result<Json<Envelope>, RetentlyError> {
    let params = Params::from_uri(uri)?;
    let range = params.date_range()?;
    let campaign_id = params.get("campaignId");
    let world = shared.world();
    let score = Score::compute(
        metric,
        world.retently.feedback.iter().filter(|item| {
            item.metric == metric
                && range.contains(item.created)
                && campaign_id.is_none_or(|id| item.campaign_id == id)
        }),
    );
    Ok(success(score.to_json()))
}
