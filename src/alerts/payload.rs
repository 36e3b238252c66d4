//! What an alert says: the record queued in the outbox, and the two bodies rendered from it at
//! send time (signed JSON, Slack message).
//!
//! The queued record holds the facts of the response (score, comment, customer) and the rule's
//! name, never a URL or a secret; the rule in force when the alert is sent decides where and in
//! which format it goes, so an operator who fixes a receiver's URL can requeue dead letters.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::rules::EventKind;
use crate::pb;

/// The outbox method of alert deliveries (their `Delivery.method`).
pub const ALERT_METHOD: &str = "cx-gateway/Alert";

/// The respondent, as an alert shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub email: String,
    pub retently_customer_id: String,
    pub first_name: String,
    pub last_name: String,
    pub company_name: String,
    pub tags: Vec<String>,
}

/// The response, as an alert shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackFacts {
    pub id: String,
    pub campaign_id: String,
    pub campaign_name: String,
    /// NPS, CSAT, CES, STAR (empty when unknown).
    pub metric: String,
    pub score: Option<f64>,
    /// promoter, passive, detractor (empty without a score).
    pub category: String,
    pub comment: String,
    /// RFC 3339, UTC.
    pub create_time: String,
    pub tags: Vec<String>,
    pub customer: Customer,
}

/// One alert as queued: which rule, which log entry, what it says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub rule: String,
    pub event: EventKind,
    /// The feedback log sequence of the entry that matched.
    pub log_sequence: i64,
    pub feedback: FeedbackFacts,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Updated => "updated",
        }
    }
}

fn metric_name(metric: i32) -> &'static str {
    match pb::Metric::try_from(metric) {
        Ok(pb::Metric::Nps) => "NPS",
        Ok(pb::Metric::Csat) => "CSAT",
        Ok(pb::Metric::Ces) => "CES",
        Ok(pb::Metric::Star) => "STAR",
        _ => "",
    }
}

fn category_name(category: i32) -> &'static str {
    match pb::ScoreCategory::try_from(category) {
        Ok(pb::ScoreCategory::Promoter) => "promoter",
        Ok(pb::ScoreCategory::Passive) => "passive",
        Ok(pb::ScoreCategory::Detractor) => "detractor",
        _ => "",
    }
}

impl FeedbackFacts {
    pub fn of(feedback: &pb::Feedback) -> FeedbackFacts {
        let create_time = feedback
            .create_time
            .as_ref()
            .map(crate::convert::timestamp_to_ms)
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        FeedbackFacts {
            id: feedback.feedback_id.clone(),
            campaign_id: feedback.campaign_id.clone(),
            campaign_name: feedback.campaign_name.clone(),
            metric: metric_name(feedback.metric).to_owned(),
            score: feedback.score,
            category: category_name(feedback.score_category).to_owned(),
            comment: feedback.comment.clone(),
            create_time,
            tags: feedback.tags.clone(),
            customer: Customer {
                email: feedback.email.clone(),
                retently_customer_id: feedback.retently_customer_id.clone(),
                first_name: feedback.first_name.clone(),
                last_name: feedback.last_name.clone(),
                company_name: feedback.company_name.clone(),
                tags: feedback.customer_tags.clone(),
            },
        }
    }
}

fn score_text(score: Option<f64>) -> String {
    match score {
        Some(score) => format!("{score}"),
        None => "no score".to_owned(),
    }
}

impl AlertRecord {
    /// The signed-json body: the alert id (the delivery id, also in `Cx-Alert-Id`, by which a
    /// receiver drops a repeated delivery), the rule, the event and the response.
    pub fn json_body(&self, alert_id: &str) -> Vec<u8> {
        let body = json!({
            "id": alert_id,
            "type": "feedback.alert",
            "rule": self.rule,
            "event": self.event.as_str(),
            "log_sequence": self.log_sequence,
            "feedback": self.feedback,
        });
        body.to_string().into_bytes()
    }

    /// A Slack incoming-webhook message: `text` (the notification line, and what clients without
    /// blocks show) and `blocks` with the score, the customer and the comment.
    pub fn slack_body(&self, alert_id: &str) -> Vec<u8> {
        let facts = &self.feedback;
        let customer = &facts.customer;
        let name = format!("{} {}", customer.first_name, customer.last_name)
            .trim()
            .to_owned();
        let who = match (name.is_empty(), customer.email.is_empty()) {
            (false, false) => format!("{name} <{}>", customer.email),
            (false, true) => name,
            (true, false) => customer.email.clone(),
            (true, true) => "an unknown customer".to_owned(),
        };
        let who = if customer.company_name.is_empty() {
            who
        } else {
            format!("{who}, {}", customer.company_name)
        };
        let headline = format!(
            "{} {} {} from {}",
            if facts.metric.is_empty() {
                "Survey"
            } else {
                &facts.metric
            },
            if facts.category.is_empty() {
                "response"
            } else {
                &facts.category
            },
            score_text(facts.score),
            who
        );
        let comment = if facts.comment.trim().is_empty() {
            "_no comment_".to_owned()
        } else {
            facts
                .comment
                .lines()
                .map(|line| format!("&gt; {}", escape(line)))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut text = headline.clone();
        if !facts.comment.trim().is_empty() {
            text.push_str(": ");
            text.push_str(&facts.comment);
        }
        let body: Value = json!({
            "text": escape(&text),
            "blocks": [
                {
                    "type": "section",
                    "text": {"type": "mrkdwn", "text": format!("*{}*", escape(&headline))},
                },
                {
                    "type": "section",
                    "fields": [
                        {"type": "mrkdwn", "text": format!("*Score*\n{}", score_text(facts.score))},
                        {"type": "mrkdwn", "text": format!("*Customer*\n{}", escape(&who))},
                        {"type": "mrkdwn", "text": format!("*Campaign*\n{}", escape(&facts.campaign_name))},
                        {"type": "mrkdwn", "text": format!("*Event*\n{}", self.event.as_str())},
                    ],
                },
                {
                    "type": "section",
                    "text": {"type": "mrkdwn", "text": comment},
                },
                {
                    "type": "context",
                    "elements": [{
                        "type": "mrkdwn",
                        "text": format!(
                            "rule {} · response {} · alert {}",
                            escape(&self.rule), escape(&facts.id), alert_id
                        ),
                    }],
                },
            ],
        });
        body.to_string().into_bytes()
    }
}

/// Slack's escaping of `&`, `<` and `>` in message text (its control characters).
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AlertRecord {
        AlertRecord {
            rule: "nps-detractors".into(),
            event: EventKind::Created,
            log_sequence: 7,
            feedback: FeedbackFacts {
                id: "f1".into(),
                campaign_id: "c1".into(),
                campaign_name: "Onboarding".into(),
                metric: "NPS".into(),
                score: Some(2.0),
                category: "detractor".into(),
                comment: "Slow <support> & bugs".into(),
                create_time: "2026-01-02T03:04:05.000Z".into(),
                tags: vec![],
                customer: Customer {
                    email: "ann@example.com".into(),
                    retently_customer_id: "r1".into(),
                    first_name: "Ann".into(),
                    last_name: "Lee".into(),
                    company_name: String::new(),
                    tags: vec![],
                },
            },
        }
    }

    #[test]
    fn the_slack_message_carries_score_comment_and_customer_escaped() {
        let body: Value = serde_json::from_slice(&record().slack_body("dlv_1")).unwrap();
        let text = body["text"].as_str().unwrap();
        assert!(text.contains("NPS detractor 2"), "{text}");
        assert!(text.contains("Ann Lee &lt;ann@example.com&gt;"), "{text}");
        assert!(text.contains("Slow &lt;support&gt; &amp; bugs"), "{text}");
        let blocks = body["blocks"].to_string();
        assert!(blocks.contains("*Score*\\n2"), "{blocks}");
        assert!(blocks.contains("&gt; Slow &lt;support&gt;"), "{blocks}");
    }

    #[test]
    fn the_json_body_names_the_alert_and_round_trips_the_facts() {
        let record = record();
        let body: Value = serde_json::from_slice(&record.json_body("dlv_1")).unwrap();
        assert_eq!(body["id"], "dlv_1");
        assert_eq!(body["event"], "created");
        let facts: FeedbackFacts = serde_json::from_value(body["feedback"].clone()).unwrap();
        assert_eq!(facts, record.feedback);
    }
}
