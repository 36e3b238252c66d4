//! SurveyService messages ⇄ the write path's commands and outcomes and the Retently client's
//! types, field by field as the contract's comments map them. Conversions shared with other services live in [`crate::grpc::convert`],
//! and those the feedback pipeline needs too (feedback, properties, metrics, channels) in
//! [`crate::convert`].

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::convert::{
    channel_from_retently, json_struct, metric_from_retently, property_from_retently,
    timestamp_from_ms, timestamp_from_rfc3339,
};
use crate::domain::writes::customers::Customer;
use crate::domain::writes::surveys::{
    RecipientResult, SendSurvey, Sentiment, SetFeedbackTags, SetFeedbackTopics, Topic,
};
use crate::grpc::convert::{index, recipient_outcome};
use crate::pb;
use crate::upstream::retently::{self, LabelOp};

// ---- requests to commands ----

impl From<pb::Recipient> for Customer {
    /// A recipient is a Retently customer named by its email alone.
    fn from(recipient: pb::Recipient) -> Self {
        let pb::Recipient {
            email,
            first_name,
            last_name,
            company,
            tags,
            properties,
        } = recipient;
        Customer {
            customer_id: String::new(),
            email,
            first_name,
            last_name,
            company,
            tags,
            properties: properties.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::SendSurveyRequest> for SendSurvey {
    fn from(request: pb::SendSurveyRequest) -> Self {
        SendSurvey {
            campaign_id: request.campaign_id,
            recipients: request.recipients.into_iter().map(Into::into).collect(),
            delay_days: request.delay_days,
            // Validation allows whole, non-negative seconds only.
            survey_cooldown: request
                .survey_cooldown
                .map(|d| Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0))),
        }
    }
}

/// `op`: `append` for APPEND, none for REPLACE; `None` for a mode validation refuses.
fn label_op(mode: i32) -> Option<LabelOp> {
    match pb::UpdateMode::try_from(mode) {
        Ok(pb::UpdateMode::Append) => Some(LabelOp::Append),
        Ok(pb::UpdateMode::Replace) => Some(LabelOp::Replace),
        Ok(pb::UpdateMode::Unspecified) | Err(_) => None,
    }
}

impl From<pb::SetFeedbackTagsRequest> for SetFeedbackTags {
    fn from(request: pb::SetFeedbackTagsRequest) -> Self {
        SetFeedbackTags {
            feedback_id: request.feedback_id,
            tags: request.tags,
            op: label_op(request.mode),
        }
    }
}

impl From<pb::SetFeedbackTopicsRequest> for SetFeedbackTopics {
    fn from(request: pb::SetFeedbackTopicsRequest) -> Self {
        SetFeedbackTopics {
            feedback_id: request.feedback_id,
            topics: request.topics.into_iter().map(Into::into).collect(),
            op: label_op(request.mode),
        }
    }
}

impl From<pb::FeedbackTopic> for Topic {
    fn from(topic: pb::FeedbackTopic) -> Self {
        Topic {
            name: topic.name,
            sentiment: match pb::Sentiment::try_from(topic.sentiment) {
                Ok(pb::Sentiment::Positive) => Some(Sentiment::Positive),
                Ok(pb::Sentiment::Neutral) => Some(Sentiment::Neutral),
                Ok(pb::Sentiment::Negative) => Some(Sentiment::Negative),
                Ok(pb::Sentiment::Unspecified) | Err(_) => None,
            },
        }
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

/// A recipient's result as the contract reports it.
pub fn recipient_result(result: RecipientResult) -> pb::RecipientResult {
    let (outcome, error, throttle) = recipient_outcome(&result.outcome);
    pb::RecipientResult {
        index: index(result.index),
        email: result.email,
        outcome: outcome as i32,
        error,
        throttle,
    }
}

impl From<Vec<RecipientResult>> for pb::SendSurveyResponse {
    fn from(results: Vec<RecipientResult>) -> Self {
        pb::SendSurveyResponse {
            delivery_id: String::new(),
            results: results.into_iter().map(recipient_result).collect(),
        }
    }
}

impl From<()> for pb::SetFeedbackTagsResponse {
    fn from((): ()) -> Self {
        pb::SetFeedbackTagsResponse::default()
    }
}

impl From<()> for pb::SetFeedbackTopicsResponse {
    fn from((): ()) -> Self {
        pb::SetFeedbackTopicsResponse::default()
    }
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
    use crate::domain::writes::surveys::recipient;
    use crate::error::{Error, ErrorCode, Reason};
    use crate::upstream::failure::FailureClass;
    use crate::upstream::retently::{SurveyOutcome, SurveyStatus};

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
        let unavailable = |reason, class| -> Result<SurveyOutcome, Error> {
            Err(error(reason, ErrorCode::Unavailable).with_failure_class(class))
        };
        use pb::RecipientOutcome::{Failed, Scheduled, Throttled, Unknown};
        let cases = [
            (sent(SurveyStatus::Scheduled), Scheduled),
            (sent(SurveyStatus::Accepted), Scheduled),
            (sent(SurveyStatus::Throttled), Throttled),
            (sent(SurveyStatus::Unsubscribed), Failed),
            (sent(SurveyStatus::Other("paused".to_owned())), Failed),
            (
                unavailable(Reason::UpstreamTimeout, FailureClass::PossiblyApplied),
                Unknown,
            ),
            // A 500.
            (
                unavailable(Reason::UpstreamUnavailable, FailureClass::PossiblyApplied),
                Unknown,
            ),
            // A 503: Retently did not act.
            (
                unavailable(Reason::UpstreamUnavailable, FailureClass::Unavailable),
                Failed,
            ),
            (
                unavailable(Reason::UpstreamUnreachable, FailureClass::NotSent),
                Failed,
            ),
            (
                Err(error(
                    Reason::UpstreamBudgetExhausted,
                    ErrorCode::ResourceExhausted,
                )),
                Failed,
            ),
            (
                Err(error(Reason::UpstreamNotFound, ErrorCode::NotFound)),
                Failed,
            ),
        ];
        for (index, (outcome, expected)) in cases.into_iter().enumerate() {
            let result =
                crate::domain::writes::surveys::recipient_result(index, "A@example.com", outcome);
            let error = result.outcome.error().cloned();
            let result = recipient_result(result);
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
        let input = recipient(&Customer::from(pb::Recipient {
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
        }));
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
