//! Validation of SurveyService requests: every problem is recorded with its exact field path
//! before anything is sent or queued, and what the calls need is returned normalised.

use std::collections::HashMap;
use std::collections::HashSet;

use crate::domain::writes::values::Destination;
use crate::error::{Error, Violations};
use crate::grpc::validate::{self, MAX_EMAIL_CHARS, MAX_STRING_CHARS};
use crate::pb;
use crate::upstream::retently::email_key;

/// Recipients per SendSurvey call.
pub const MAX_RECIPIENTS: usize = 10_000;
/// Longest delay Retently accepts, in days.
const MAX_DELAY_DAYS: i32 = 365;
/// Tags or topics per SetFeedbackTags / SetFeedbackTopics call.
const MAX_LABELS: usize = 100;

pub use crate::grpc::write::ValidWrite;

/// The outbox ordering key of a Retently customer: survey sends upsert the recipient, so they
/// are ordered with the other writes to the same address.
fn customer_key(email: &str) -> String {
    format!("retently:{}", email_key(email))
}

/// The outbox ordering key of a survey response: an append followed by a replacement must reach
/// Retently in that order.
fn feedback_key(feedback_id: &str) -> String {
    format!("retently-feedback:{feedback_id}")
}

// Runs in a `validate` span under the call's server span (the request is not recorded).
#[tracing::instrument(name = "validate", skip_all)]
pub fn send_survey(request: &pb::SendSurveyRequest) -> Result<ValidWrite, Error> {
    let mut v = Violations::new();
    validate::retently_path_id(&mut v, "campaign_id", &request.campaign_id);
    validate::batch_len(
        &mut v,
        "recipients",
        request.recipients.len(),
        MAX_RECIPIENTS,
    );
    let mut first_index: HashMap<String, usize> = HashMap::new();
    let mut ordering_keys = Vec::with_capacity(request.recipients.len());
    for (index, recipient) in request.recipients.iter().enumerate() {
        let at = format!("recipients[{index}]");
        if let Some(email) = validate::email(&mut v, format!("{at}.email"), &recipient.email) {
            match first_index.get(&email) {
                Some(first) => v.add(
                    format!("{at}.email"),
                    format!("repeats recipients[{first}].email; each address once per request"),
                ),
                None => {
                    ordering_keys.push(customer_key(&email));
                    first_index.insert(email, index);
                }
            }
        }
        for (field, value) in [
            ("first_name", &recipient.first_name),
            ("last_name", &recipient.last_name),
            ("company", &recipient.company),
        ] {
            validate::max_len(&mut v, format!("{at}.{field}"), value, MAX_STRING_CHARS);
        }
        validate::tags(&mut v, &format!("{at}.tags"), &recipient.tags);
        validate::properties(&mut v, &format!("{at}.properties"), &recipient.properties);
    }
    crate::grpc::rules::check_cooldown(&mut v, request);
    if let Some(days) = request.delay_days {
        v.check(
            (0..=MAX_DELAY_DAYS).contains(&days),
            "delay_days",
            "must be between 0 and 365",
        );
    }
    let options = validate::write_options(&mut v, request.options.as_ref());
    ValidWrite::checked(
        v,
        options,
        vec![Destination::Retently],
        request.recipients.len(),
        ordering_keys,
    )
}

/// APPEND or REPLACE; with APPEND at least one entry.
fn update_mode(v: &mut Violations, mode: i32, entries: usize, list: &str) {
    match pb::UpdateMode::try_from(mode) {
        Ok(pb::UpdateMode::Append) => {
            v.check(
                entries > 0,
                list,
                "must hold at least one entry to append",
            );
        }
        Ok(pb::UpdateMode::Replace) => {}
        Ok(pb::UpdateMode::Unspecified) | Err(_) => v.add(
            "mode",
            "must be APPEND or REPLACE (replacing drops the existing entries, so it is never implied)",
        ),
    }
}

/// 1..1,000 characters and unique within the list.
fn label<'a>(v: &mut Violations, field: String, value: &'a str, seen: &mut HashSet<&'a str>) {
    if validate::required(v, field.clone(), value, MAX_STRING_CHARS) && !seen.insert(value) {
        v.add(field, "is repeated");
    }
}

/// A tag or topic change: the response's id, at most 100 labels in `list` (each named by
/// `label_of` at its index, unique, and checked further by `check`), and the mode. The change
/// touches one item: the survey response.
fn label_change<'a, T>(
    list: &str,
    entries: &'a [T],
    label_of: impl Fn(usize, &'a T) -> (String, &'a str),
    check: impl Fn(&mut Violations, usize, &T),
    (feedback_id, mode, options): (&str, i32, Option<&pb::WriteOptions>),
) -> Result<ValidWrite, Error> {
    let mut v = Violations::new();
    validate::retently_path_id(&mut v, "feedback_id", feedback_id);
    if entries.len() > MAX_LABELS {
        v.add(list, format!("at most {MAX_LABELS} {list}"));
    }
    let mut seen = HashSet::new();
    for (index, entry) in entries.iter().enumerate() {
        let (field, value) = label_of(index, entry);
        label(&mut v, field, value, &mut seen);
        check(&mut v, index, entry);
    }
    update_mode(&mut v, mode, entries.len(), list);
    let options = validate::write_options(&mut v, options);
    ValidWrite::checked(
        v,
        options,
        vec![Destination::Retently],
        1,
        vec![feedback_key(feedback_id)],
    )
}

#[tracing::instrument(name = "validate", skip_all)]
pub fn set_feedback_tags(request: &pb::SetFeedbackTagsRequest) -> Result<ValidWrite, Error> {
    label_change(
        "tags",
        &request.tags,
        |index, tag| (format!("tags[{index}]"), tag.as_str()),
        |_, _, _| {},
        (&request.feedback_id, request.mode, request.options.as_ref()),
    )
}

#[tracing::instrument(name = "validate", skip_all)]
pub fn set_feedback_topics(request: &pb::SetFeedbackTopicsRequest) -> Result<ValidWrite, Error> {
    label_change(
        "topics",
        &request.topics,
        |index, topic| (format!("topics[{index}].name"), topic.name.as_str()),
        |v, index, topic| {
            v.check(
                pb::Sentiment::try_from(topic.sentiment).is_ok(),
                format!("topics[{index}].sentiment"),
                "must be a known sentiment",
            );
        },
        (&request.feedback_id, request.mode, request.options.as_ref()),
    )
}

/// An enum field that must hold one of its known values; `None` when it does not.
pub fn known<E: TryFrom<i32>>(v: &mut Violations, field: &str, value: i32) -> Option<E> {
    let known = E::try_from(value).ok();
    v.check(known.is_some(), field, "is not a known value");
    known
}

/// An optional id filter: empty, or the shape of a Retently record id.
pub fn id_filter(v: &mut Violations, field: &str, value: &str) {
    validate::retently_id_filter(v, field, value);
}

/// An optional email filter: at most 254 characters.
pub fn email_filter(v: &mut Violations, field: &str, value: &str) {
    validate::max_len(v, field, value, MAX_EMAIL_CHARS);
}

#[cfg(test)]
mod tables;
