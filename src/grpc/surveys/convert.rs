//! SurveyService messages ⇄ the Retently client's types, field by field as the contract's
//! comments map them. Conversions shared with other services live in [`crate::grpc::convert`],
//! and those the feedback pipeline needs too (feedback, properties, metrics, channels) in
//! [`crate::convert`].

use chrono::{DateTime, Utc};

use crate::convert::{
    channel_from_retently, json_struct, metric_from_retently, property_from_retently,
    timestamp_from_ms, timestamp_from_rfc3339,
};
use crate::error::{Error, ErrorCode, Reason};
use crate::grpc::convert::{property_to_retently, recipient_outcome};
use crate::pb;
use crate::upstream::retently::{self, CustomerInput, LabelOp, SurveyOutcome, email_key};

// ---- requests ----

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

/// A validated recipient as a Retently subscriber, keyed by its normalised email. Empty fields
/// and an empty tag list are left out: a survey send must not clear what the customer has.
pub fn recipient(recipient: &pb::Recipient) -> CustomerInput {
    CustomerInput {
        email: email_key(&recipient.email),
        first_name: non_empty(&recipient.first_name),
        last_name: non_empty(&recipient.last_name),
        company: non_empty(&recipient.company),
        job_title: None,
        tags: (!recipient.tags.is_empty()).then(|| recipient.tags.clone()),
        properties: recipient
            .properties
            .iter()
            .filter_map(property_to_retently)
            .collect(),
    }
}

/// `op`: `append` for APPEND, none for REPLACE.
pub fn label_op(mode: i32) -> Result<LabelOp, Error> {
    match pb::UpdateMode::try_from(mode) {
        Ok(pb::UpdateMode::Append) => Ok(LabelOp::Append),
        Ok(pb::UpdateMode::Replace) => Ok(LabelOp::Replace),
        // Validation refuses these before a request is run or queued.
        Ok(pb::UpdateMode::Unspecified) | Err(_) => Err(Error::invalid_argument(vec![
            crate::error::FieldViolation::new("mode", "must be APPEND or REPLACE"),
        ])),
    }
}

/// A topic as `{name, sentiment}`; an unspecified sentiment is left out (the upstream then uses
/// neutral).
pub fn topic(topic: &pb::FeedbackTopic) -> retently::Topic {
    let sentiment = match pb::Sentiment::try_from(topic.sentiment) {
        Ok(pb::Sentiment::Positive) => Some("positive"),
        Ok(pb::Sentiment::Neutral) => Some("neutral"),
        Ok(pb::Sentiment::Negative) => Some("negative"),
        Ok(pb::Sentiment::Unspecified) | Err(_) => None,
    };
    retently::Topic {
        name: topic.name.clone(),
        sentiment: sentiment.map(str::to_owned),
    }
}

/// The upstream `metric` path segment of a validated metric.
pub fn metric(metric: pb::Metric) -> Option<retently::Metric> {
    match metric {
        pb::Metric::Nps => Some(retently::Metric::Nps),
        pb::Metric::Csat => Some(retently::Metric::Csat),
        pb::Metric::Ces => Some(retently::Metric::Ces),
        pb::Metric::Star => Some(retently::Metric::Star),
        pb::Metric::Unspecified => None,
    }
}

/// The outbox `channel` filter value (`email`, `link`, `inapp`, `intercom`).
pub fn channel_filter(channel: pb::Channel) -> Option<&'static str> {
    match channel {
        pb::Channel::Email => Some("email"),
        pb::Channel::Link => Some("link"),
        pb::Channel::InApp => Some("inapp"),
        pb::Channel::Intercom => Some("intercom"),
        pb::Channel::Unspecified | pb::Channel::Other => None,
    }
}

/// The outbox `sentBy` filter value.
pub fn sent_by_filter(sent_by: pb::SentBy) -> Option<&'static str> {
    match sent_by {
        pb::SentBy::Campaign => Some("campaign"),
        pb::SentBy::Reminder => Some("reminder"),
        pb::SentBy::Manual => Some("manual"),
        pb::SentBy::Test => Some("test"),
        pb::SentBy::Imported => Some("imported"),
        pb::SentBy::Unspecified | pb::SentBy::Other => None,
    }
}

/// An instant in UNIX milliseconds.
pub fn instant(millis: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(millis)
}

// ---- survey send results ----

/// The recipient's result, classified as every survey send is (see
/// [`crate::grpc::convert::recipient_outcome`]), and for a failed or unknown one its error.
pub fn recipient_result(
    index: usize,
    email: &str,
    outcome: Result<SurveyOutcome, Error>,
) -> (pb::RecipientResult, Option<Error>) {
    let (kind, item) = recipient_outcome(&outcome);
    let error = match outcome {
        Err(error) => Some(error),
        // The upstream answered for the recipient without scheduling it.
        Ok(sent) => item.as_ref().map(|item| {
            let reason = if sent.status == retently::SurveyStatus::Unsubscribed {
                Reason::RecipientUnsubscribed
            } else {
                Reason::UpstreamItemRejected
            };
            Error::new(ErrorCode::FailedPrecondition, reason, item.message.clone())
                .with_metadata("upstream", "retently")
        }),
    };
    let result = pb::RecipientResult {
        index: i32::try_from(index).unwrap_or(i32::MAX),
        email: email.to_owned(),
        outcome: kind as i32,
        error: item,
    };
    (result, error)
}

// ---- reads ----

/// `regular`, `transactional`, anything else is OTHER.
fn campaign_type(raw: Option<&str>) -> pb::CampaignType {
    match raw.unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "" => pb::CampaignType::Unspecified,
        "regular" => pb::CampaignType::Regular,
        "transactional" => pb::CampaignType::Transactional,
        _ => pb::CampaignType::Other,
    }
}

pub fn campaign(campaign: &retently::Campaign) -> pb::Campaign {
    pb::Campaign {
        campaign_id: campaign.id.clone(),
        name: campaign.name.clone().unwrap_or_default(),
        active: campaign.is_active,
        template_id: campaign.template_id.clone().unwrap_or_default(),
        metric: metric_from_retently(campaign.metric.as_deref()) as i32,
        r#type: campaign_type(campaign.kind.as_deref()) as i32,
        channel: channel_from_retently(campaign.channel.as_deref()) as i32,
    }
}

pub fn template(template: &retently::Template) -> pb::Template {
    pb::Template {
        template_id: template.id.clone(),
        name: template.name.clone().unwrap_or_default(),
        channel: channel_from_retently(template.channel.as_deref()) as i32,
        metric: metric_from_retently(template.metric.as_deref()) as i32,
    }
}

/// `metric` is the one asked for, used when the answer does not say (`metricsType`).
pub fn score(score: &retently::Score, metric: pb::Metric) -> pb::GetScoreResponse {
    let answered = metric_from_retently(score.metrics_type.as_deref());
    let metric = if answered == pb::Metric::Unspecified {
        metric
    } else {
        answered
    };
    pb::GetScoreResponse {
        metric: metric as i32,
        score: score.score,
        promoters_count: score.promoters_count,
        passives_count: score.passives_count,
        detractors_count: score.detractors_count,
        promoters_percent: score.promoters as f64,
        passives_percent: score.passives as f64,
        detractors_percent: score.detractors as f64,
        total_responses: score.total_responses,
        fetch_time: score.fetched_at.and_then(system_time),
    }
}

fn system_time(time: std::time::SystemTime) -> Option<prost_types::Timestamp> {
    let since_epoch = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(timestamp_from_ms(
        i64::try_from(since_epoch.as_millis()).ok()?,
    ))
}

fn sent_by(raw: Option<&str>) -> pb::SentBy {
    match raw.unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "" => pb::SentBy::Unspecified,
        "campaign" => pb::SentBy::Campaign,
        "reminder" => pb::SentBy::Reminder,
        "manual" => pb::SentBy::Manual,
        "test" => pb::SentBy::Test,
        "imported" => pb::SentBy::Imported,
        _ => pb::SentBy::Other,
    }
}

pub fn sent_survey(survey: &retently::SentSurvey) -> pb::SentSurvey {
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    let attributes = survey.attributes.clone().unwrap_or_default();
    pb::SentSurvey {
        survey_id: text(&survey.survey_id),
        feedback_id: text(&survey.response_id),
        email: text(&survey.email),
        retently_customer_id: text(&survey.customer_id),
        first_name: text(&survey.first_name),
        last_name: text(&survey.last_name),
        company_name: text(&survey.company_name),
        company_id: text(&survey.company_id),
        send_time: timestamp_from_rfc3339(survey.sent_date.as_deref()),
        channel: channel_from_retently(survey.channel.as_deref()) as i32,
        campaign_id: text(&survey.campaign_id),
        campaign_name: text(&survey.campaign),
        template_id: text(&survey.survey_template_id),
        subject: text(&survey.subject),
        sent_by: sent_by(survey.sent_by.as_deref()) as i32,
        status: text(&survey.status),
        progress: survey
            .detailed_status
            .as_ref()
            .map(|status| pb::SentSurveyProgress {
                opened: status.is_opened,
                open_time: timestamp_from_rfc3339(status.opened_date.as_deref()),
                responded: status.is_responded,
                respond_time: timestamp_from_rfc3339(status.responded_date.as_deref()),
                has_feedback: status.has_feedback,
                opted_out: status.is_opted_out,
                bounced: status.is_bounced,
            }),
        person_tags: survey.person_tags.clone(),
        customer_tags: attributes.customer_tags,
        customer_properties: attributes
            .custom_props
            .iter()
            .map(property_from_retently)
            .collect(),
        provider_message_id: text(&survey.mandrill_message_id),
        additional_recipients: survey
            .additional_recipients
            .iter()
            .map(json_struct)
            .collect(),
    }
}

fn report_score(summary: &retently::ReportSummary) -> pb::ReportScore {
    pb::ReportScore {
        promoters: summary.promoters,
        passives: summary.passives,
        detractors: summary.detractors,
        total: summary.total,
        score: summary.score.unwrap_or(0.0),
    }
}

/// A trend day: `YYYY-MM-DD`, or the date part of an ISO instant.
fn day(raw: Option<&str>) -> Option<pb::Date> {
    use chrono::Datelike as _;
    let raw = raw?.trim();
    let date = chrono::NaiveDate::parse_from_str(raw.get(..10)?, "%Y-%m-%d").ok()?;
    Some(pb::Date {
        year: date.year(),
        month: i32::try_from(date.month()).ok()?,
        day: i32::try_from(date.day()).ok()?,
    })
}

pub fn report(report: &retently::Report) -> pb::CampaignReport {
    let mut trend: Vec<pb::ReportTrendPoint> = report
        .trend
        .iter()
        .map(|point| pb::ReportTrendPoint {
            day: day(point.day.as_deref()),
            score: Some(report_score(point)),
        })
        .collect();
    // The contract promises oldest first; the upstream does not document its order.
    trend.sort_by_key(|point| point.day.as_ref().map(|d| (d.year, d.month, d.day)));
    pb::CampaignReport {
        campaign_id: report.campaign_id.clone(),
        name: report.name.clone().unwrap_or_default(),
        active: report.is_active,
        metric: metric_from_retently(report.metric.as_deref()) as i32,
        question_stats: report.questions_stats.iter().map(json_struct).collect(),
        trend,
        latest: report.last.as_ref().map(report_score),
        delivery_stats: report
            .delivery_stats
            .as_ref()
            .map(|stats| pb::ReportDeliveryStats {
                sent_count: stats.total_count,
                opened_count: stats.opened,
                responded_count: stats.responded,
                opted_out_count: stats.opted_out,
                bounced_count: stats.is_bounced,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::failure::FailureClass;
    use crate::upstream::retently::SurveyStatus;

    fn error(reason: Reason, code: ErrorCode) -> Error {
        Error::new(code, reason, "x")
    }

    #[test]
    fn outcomes_follow_what_the_upstream_may_have_done() {
        let sent = |status| {
            Ok(SurveyOutcome {
                email: "a@example.com".to_owned(),
                status,
                survey_id: None,
                customer_id: None,
                scheduled_date: None,
            })
        };
        let cases = [
            (
                sent(SurveyStatus::Scheduled),
                pb::RecipientOutcome::Scheduled,
            ),
            (
                sent(SurveyStatus::Accepted),
                pb::RecipientOutcome::Scheduled,
            ),
            (
                sent(SurveyStatus::Throttled),
                pb::RecipientOutcome::Throttled,
            ),
            (
                sent(SurveyStatus::Unsubscribed),
                pb::RecipientOutcome::Failed,
            ),
            (
                sent(SurveyStatus::Other("paused".to_owned())),
                pb::RecipientOutcome::Failed,
            ),
            (
                Err(error(Reason::UpstreamTimeout, ErrorCode::Unavailable)
                    .with_failure_class(FailureClass::PossiblyApplied)),
                pb::RecipientOutcome::Unknown,
            ),
            // A 500.
            (
                Err(error(Reason::UpstreamUnavailable, ErrorCode::Unavailable)
                    .with_failure_class(FailureClass::PossiblyApplied)),
                pb::RecipientOutcome::Unknown,
            ),
            // A 503: Retently did not act.
            (
                Err(error(Reason::UpstreamUnavailable, ErrorCode::Unavailable)
                    .with_failure_class(FailureClass::Unavailable)),
                pb::RecipientOutcome::Failed,
            ),
            (
                Err(error(Reason::UpstreamUnreachable, ErrorCode::Unavailable)
                    .with_failure_class(FailureClass::NotSent)),
                pb::RecipientOutcome::Failed,
            ),
            (
                Err(error(
                    Reason::UpstreamBudgetExhausted,
                    ErrorCode::ResourceExhausted,
                )),
                pb::RecipientOutcome::Failed,
            ),
            (
                Err(error(Reason::UpstreamNotFound, ErrorCode::NotFound)),
                pb::RecipientOutcome::Failed,
            ),
        ];
        for (index, (outcome, expected)) in cases.into_iter().enumerate() {
            let (result, error) = recipient_result(index, "A@example.com", outcome);
            assert_eq!(result.outcome, expected as i32, "case {index}");
            assert_eq!(result.index, index as i32);
            assert_eq!(result.email, "A@example.com");
            let taken = matches!(
                expected,
                pb::RecipientOutcome::Scheduled | pb::RecipientOutcome::Throttled
            );
            assert_eq!(result.error.is_none(), taken, "case {index}");
            assert_eq!(error.is_none(), taken, "case {index}");
        }
    }

    #[test]
    fn recipients_leave_out_what_they_do_not_set() {
        let input = recipient(&pb::Recipient {
            email: " Ann@Example.COM ".to_owned(),
            first_name: "Ann".to_owned(),
            properties: vec![pb::Property {
                name: "plan".to_owned(),
                value: Some(pb::PropertyValue {
                    kind: Some(pb::property_value::Kind::StringListValue(pb::StringList {
                        values: vec!["a".to_owned(), "b".to_owned()],
                    })),
                }),
                label: String::new(),
            }],
            ..Default::default()
        });
        assert_eq!(input.email, "ann@example.com");
        assert_eq!(input.first_name.as_deref(), Some("Ann"));
        assert_eq!(input.last_name, None);
        assert_eq!(input.tags, None);
        assert_eq!(input.properties[0].label, "plan");
        assert_eq!(input.properties[0].value.as_deref(), Some("a,b"));
    }

    #[test]
    fn report_days_are_dates_oldest_first() {
        let summary = |day: &str| retently::ReportSummary {
            day: Some(day.to_owned()),
            total: 1,
            score: Some(50.0),
            ..Default::default()
        };
        let converted = report(&retently::Report {
            campaign_id: "c".to_owned(),
            name: None,
            is_active: true,
            metric: Some("NPS".to_owned()),
            questions_stats: vec![serde_json::json!({"q": 1}), serde_json::json!(3)],
            trend: vec![summary("2024-03-02"), summary("2024-02-29T00:00:00.000Z")],
            last: None,
            delivery_stats: None,
        });
        let days: Vec<(i32, i32, i32)> = converted
            .trend
            .iter()
            .map(|p| {
                let d = p.day.as_ref().unwrap();
                (d.year, d.month, d.day)
            })
            .collect();
        assert_eq!(days, [(2024, 2, 29), (2024, 3, 2)]);
        assert_eq!(converted.metric, pb::Metric::Nps as i32);
        assert_eq!(converted.question_stats.len(), 2);
        assert!(converted.question_stats[1].fields.contains_key("value"));
    }
}
