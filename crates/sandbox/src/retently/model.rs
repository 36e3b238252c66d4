//! The Retently account's state and how each record looks on the wire.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::time::iso;

/// A survey metric. The wire spelling of values (`NPS`, `CSAT`, `CES`, `STAR`) follows the
/// upper-case `cxMetrics` keys and `metricsType`; the score path uses the lower-case form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    Nps,
    Csat,
    Ces,
    Star,
}

impl Metric {
    pub const ALL: [Metric; 4] = [Metric::Nps, Metric::Csat, Metric::Ces, Metric::Star];

    pub fn upper(self) -> &'static str {
        match self {
            Metric::Nps => "NPS",
            Metric::Csat => "CSAT",
            Metric::Ces => "CES",
            Metric::Star => "STAR",
        }
    }

    pub fn lower(self) -> &'static str {
        match self {
            Metric::Nps => "nps",
            Metric::Csat => "csat",
            Metric::Ces => "ces",
            Metric::Star => "star",
        }
    }

    pub fn from_path(raw: &str) -> Option<Metric> {
        Metric::ALL
            .into_iter()
            .find(|metric| metric.lower().eq_ignore_ascii_case(raw))
    }

    /// The answer scale: NPS 0–10, CSAT 1–5, CES 1–7, 5-STAR 1–5.
    pub fn scale(self) -> (i64, i64) {
        match self {
            Metric::Nps => (0, 10),
            Metric::Csat | Metric::Star => (1, 5),
            Metric::Ces => (1, 7),
        }
    }

    /// Which third of the scale an answer falls in. NPS: 9–10 promoter, 7–8 passive, 0–6
    /// detractor. CSAT and 5-STAR: 4–5 positive, 3 neutral, 1–2 negative. CES (1–7, 7 = easiest):
    /// 5–7 positive, 4 neutral, 1–3 negative.
    pub fn category(self, score: i64) -> Category {
        let (positive_from, neutral_from) = match self {
            Metric::Nps => (9, 7),
            Metric::Csat | Metric::Star => (4, 3),
            Metric::Ces => (5, 4),
        };
        if score >= positive_from {
            Category::Positive
        } else if score >= neutral_from {
            Category::Neutral
        } else {
            Category::Negative
        }
    }
}

/// Promoter / passive / detractor, or their CSAT/CES/STAR equivalents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Positive,
    Neutral,
    Negative,
}

impl Category {
    /// `ratingCategory` of a feedback item.
    pub fn rating(self) -> &'static str {
        match self {
            Category::Positive => "Positive",
            Category::Neutral => "Neutral",
            Category::Negative => "Negative",
        }
    }
}

/// A customer property as stored and returned: `{label, name, type, value}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    pub label: String,
    pub name: String,
    pub kind: String,
    pub value: String,
}

impl Property {
    pub fn to_json(&self) -> Value {
        json!({"label": self.label, "name": self.name, "type": self.kind, "value": self.value})
    }
}

#[derive(Debug, Clone)]
pub struct Customer {
    pub id: String,
    /// Trimmed and lower-cased: Retently keys customers by email, case-insensitively.
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub company_name: Option<String>,
    pub company_id: Option<String>,
    pub job_title: Option<String>,
    pub country: Option<String>,
    pub state: Option<String>,
    pub city: Option<String>,
    pub tags: Vec<String>,
    pub properties: Vec<Property>,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    pub unsubscribed: bool,
    pub unsubscribe_message: Option<String>,
}

impl Customer {
    pub fn to_json(&self) -> Value {
        json!({
            "email": self.email,
            "id": self.id,
            "firstName": self.first_name,
            "lastName": self.last_name,
            "companyName": self.company_name,
            "companyId": self.company_id,
            "jobTitle": self.job_title,
            "tags": self.tags,
            "createdDate": iso(self.created),
            "updatedDate": iso(self.updated),
            "properties": self.properties.iter().map(Property::to_json).collect::<Vec<_>>(),
            "unsubscribed": self.unsubscribed,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignKind {
    Regular,
    Transactional,
}

impl CampaignKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignKind::Regular => "regular",
            CampaignKind::Transactional => "transactional",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Campaign {
    pub id: String,
    pub name: String,
    pub is_active: bool,
    pub template_id: Option<String>,
    pub metric: Metric,
    pub kind: CampaignKind,
    pub channel: String,
    /// A customer surveyed in this campaign within this many days is skipped; 0 = no throttle.
    pub throttle_days: u32,
    pub created: DateTime<Utc>,
}

impl Campaign {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "isActive": self.is_active,
            "templateId": self.template_id,
            "metric": self.metric.upper(),
            "type": self.kind.as_str(),
            "channel": self.channel,
            "throttleDays": self.throttle_days,
            "createdDate": iso(self.created),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub channel: String,
    pub metric: Metric,
    pub subject: String,
    pub created: DateTime<Utc>,
}

impl Template {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "channel": self.channel,
            "metric": self.metric.upper(),
            "subject": self.subject,
            "createdDate": iso(self.created),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Company {
    pub id: String,
    pub domain: String,
    pub name: String,
    pub industry: Option<String>,
    pub tags: Vec<String>,
    pub created: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Topic {
    pub name: String,
    pub sentiment: String,
}

impl Topic {
    pub fn to_json(&self) -> Value {
        json!({"name": self.name, "sentiment": self.sentiment})
    }
}

/// One survey response. Customer fields are a snapshot taken when the response arrived.
#[derive(Debug, Clone)]
pub struct Feedback {
    pub id: String,
    pub survey_id: String,
    pub customer_id: String,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub company_name: Option<String>,
    pub company_id: Option<String>,
    pub job_title: Option<String>,
    pub country: Option<String>,
    pub state: Option<String>,
    pub city: Option<String>,
    pub tags: Vec<String>,
    pub custom_props: Vec<Property>,
    pub campaign_id: String,
    pub campaign_name: String,
    pub metric: Metric,
    pub created: DateTime<Utc>,
    pub score: i64,
    pub comment: String,
    pub checkbox: bool,
    pub feedback_tags: Vec<String>,
    pub topics: Vec<Topic>,
    pub status: String,
    pub assigned: Option<String>,
    pub resolved: bool,
    pub channel: String,
}

impl Feedback {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "surveyId": self.survey_id,
            "customerId": self.customer_id,
            "email": self.email,
            "firstName": self.first_name,
            "lastName": self.last_name,
            "companyName": self.company_name,
            "companyId": self.company_id,
            "jobTitle": self.job_title,
            "country": self.country,
            "state": self.state,
            "city": self.city,
            "tags": self.tags,
            "customProps": self.custom_props.iter().map(Property::to_json).collect::<Vec<_>>(),
            "campaignId": self.campaign_id,
            "campaignName": self.campaign_name,
            "createdDate": iso(self.created),
            "score": self.score,
            "comment": self.comment,
            "checkbox": self.checkbox,
            "additionalQuestions": [],
            "feedbackTopics": self.topics.iter().map(Topic::to_json).collect::<Vec<_>>(),
            "feedbackTags": self.feedback_tags,
            "feedbackTagsNew": self.feedback_tags,
            "notes": [],
            "status": self.status,
            "assigned": self.assigned,
            "ratingCategory": self.metric.category(self.score).rating(),
            "resolved": self.resolved,
            "channel": self.channel,
            "metricsType": self.metric.upper(),
            "isBogus": false,
            "isSubmitted": true,
        })
    }
}

/// One sent (or scheduled) survey, as listed by the outbox.
#[derive(Debug, Clone)]
pub struct SentSurvey {
    pub survey_id: String,
    pub response_id: Option<String>,
    pub customer_id: String,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub company_name: Option<String>,
    pub company_id: Option<String>,
    pub tags: Vec<String>,
    pub custom_props: Vec<Property>,
    pub campaign_id: String,
    pub campaign_name: String,
    pub template_id: Option<String>,
    pub subject: String,
    pub channel: String,
    pub sent_by: String,
    /// When the survey was created (the `/survey` call, or the campaign run).
    pub created: DateTime<Utc>,
    /// When it is (or was) sent: `created` plus the requested delay.
    pub sent: DateTime<Utc>,
    pub opened: Option<DateTime<Utc>>,
    pub responded: Option<DateTime<Utc>>,
    pub opted_out: bool,
    pub bounced: bool,
    pub message_id: String,
}

impl SentSurvey {
    /// `SCHEDULED` until the send time, then the furthest state reached.
    pub fn status(&self, now: DateTime<Utc>) -> &'static str {
        if self.bounced {
            "BOUNCED"
        } else if self.responded.is_some() {
            "RESPONDED"
        } else if self.opted_out {
            "OPTED_OUT"
        } else if self.opened.is_some() {
            "OPENED"
        } else if self.sent > now {
            "SCHEDULED"
        } else {
            "SENT"
        }
    }

    pub fn to_json(&self, now: DateTime<Utc>) -> Value {
        json!({
            "surveyId": self.survey_id,
            "responseId": self.response_id,
            "email": self.email,
            "customerId": self.customer_id,
            "firstName": self.first_name,
            "lastName": self.last_name,
            "companyName": self.company_name,
            "companyId": self.company_id,
            "surveyCreatedDate": iso(self.created),
            "sentDate": iso(self.sent),
            "channel": self.channel,
            "campaign": self.campaign_name,
            "campaignId": self.campaign_id,
            "surveyTemplateId": self.template_id,
            "subject": self.subject,
            "sentBy": self.sent_by,
            "status": self.status(now),
            "personTags": if self.tags.is_empty() { Value::Null } else { json!(self.tags) },
            "attributes": {
                "customerTags": self.tags,
                "customProps": self.custom_props.iter().map(Property::to_json).collect::<Vec<_>>(),
            },
            "detailedStatus": {
                "isOpened": self.opened.is_some(),
                "openedDate": self.opened.map(iso),
                "isResponded": self.responded.is_some(),
                "respondedDate": self.responded.map(iso),
                "hasFeedback": self.response_id.is_some(),
                "isOptedOut": self.opted_out,
                "isBounced": self.bounced,
            },
            "mandrillMessageId": self.message_id,
            "additionalRecipients": [],
        })
    }
}

/// Everything a Retently account holds.
#[derive(Debug, Default)]
pub struct RetentlyStore {
    /// Ordered by id so that random picks from a seeded generator are reproducible.
    pub customers: BTreeMap<String, Customer>,
    /// Normalised email → customer id.
    pub by_email: HashMap<String, String>,
    pub campaigns: Vec<Campaign>,
    pub templates: Vec<Template>,
    pub companies: Vec<Company>,
    /// In arrival order.
    pub feedback: Vec<Feedback>,
    pub feedback_index: HashMap<String, usize>,
    /// In creation order.
    pub outbox: Vec<SentSurvey>,
}

impl RetentlyStore {
    pub fn customer_by_email(&self, email: &str) -> Option<&Customer> {
        self.by_email
            .get(&normalize_email(email))
            .and_then(|id| self.customers.get(id))
    }

    pub fn campaign(&self, id: &str) -> Option<&Campaign> {
        self.campaigns.iter().find(|campaign| campaign.id == id)
    }

    pub fn company_by_id(&self, id: &str) -> Option<&Company> {
        self.companies.iter().find(|company| company.id == id)
    }

    pub fn push_feedback(&mut self, feedback: Feedback) {
        self.feedback_index
            .insert(feedback.id.clone(), self.feedback.len());
        self.feedback.push(feedback);
    }

    pub fn feedback_by_id(&self, id: &str) -> Option<&Feedback> {
        self.feedback_index
            .get(id)
            .and_then(|index| self.feedback.get(*index))
    }

    pub fn feedback_by_id_mut(&mut self, id: &str) -> Option<&mut Feedback> {
        let index = *self.feedback_index.get(id)?;
        self.feedback.get_mut(index)
    }

    /// A company as listed: `cxMetrics` computed from its customers' responses.
    pub fn company_json(&self, company: &Company) -> Value {
        let contacts = self
            .customers
            .values()
            .filter(|customer| customer.company_id.as_deref() == Some(company.id.as_str()))
            .count();
        let mut metrics = serde_json::Map::new();
        for metric in Metric::ALL {
            let score = Score::compute(
                metric,
                self.feedback.iter().filter(|feedback| {
                    feedback.metric == metric
                        && feedback.company_id.as_deref() == Some(company.id.as_str())
                }),
            );
            let value = if score.total == 0 {
                Value::Null
            } else {
                score.score_value()
            };
            metrics.insert(metric.upper().to_owned(), value);
        }
        json!({
            "id": company.id,
            "createdDate": iso(company.created),
            "domain": company.domain,
            "companyName": company.name,
            "industryName": company.industry,
            "tags": company.tags,
            "cxMetrics": metrics,
            "contactsCount": contacts,
        })
    }
}

/// Trimmed and lower-cased, the form customers are keyed by.
pub fn normalize_email(raw: &str) -> String {
    raw.trim().to_lowercase()
}

/// Label → snake_case key: "New Property" → `new_property`.
pub fn snake_case(label: &str) -> String {
    let mut out = String::with_capacity(label.len());
    let mut pending_separator = false;
    for c in label.trim().chars() {
        if c.is_alphanumeric() {
            if pending_separator && !out.is_empty() {
                out.push('_');
            }
            pending_separator = false;
            out.extend(c.to_lowercase());
        } else {
            pending_separator = true;
        }
    }
    out
}

/// A metric's score over a set of responses.
///
/// * NPS: rounded `% promoters` − rounded `% detractors`, an integer from −100 to 100.
/// * CSAT: `% positive` (4–5 of 5), an integer from 0 to 100.
/// * CES: `% positive` (5–7 of 7), an integer from 0 to 100.
/// * 5-STAR: the mean number of stars, rounded to one decimal.
///
/// The category percentages are rounded to integers independently, so they may not add up to 100.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub metric: Metric,
    pub positive: u64,
    pub neutral: u64,
    pub negative: u64,
    pub total: u64,
    pub sum: i64,
}

impl Score {
    pub fn compute<'a>(metric: Metric, feedback: impl Iterator<Item = &'a Feedback>) -> Score {
        let mut score = Score {
            metric,
            positive: 0,
            neutral: 0,
            negative: 0,
            total: 0,
            sum: 0,
        };
        for item in feedback {
            score.add(item.score);
        }
        score
    }

    pub fn add(&mut self, answer: i64) {
        match self.metric.category(answer) {
            Category::Positive => self.positive += 1,
            Category::Neutral => self.neutral += 1,
            Category::Negative => self.negative += 1,
        }
        self.total += 1;
        self.sum += answer;
    }

    fn percent(&self, count: u64) -> i64 {
        if self.total == 0 {
            return 0;
        }
        // Counts are far below 2^52, so the float is exact before rounding.
        ((count as f64) * 100.0 / (self.total as f64)).round() as i64
    }

    /// The headline number (see the type's doc).
    pub fn score_value(&self) -> Value {
        if self.total == 0 {
            return json!(0);
        }
        match self.metric {
            // The documented example (62 % promoters, 23 % detractors, NPS 39 where the exact
            // difference is 38.5) shows the score is the difference of the rounded shares.
            Metric::Nps => json!(self.percent(self.positive) - self.percent(self.negative)),
            Metric::Csat | Metric::Ces => json!(self.percent(self.positive)),
            Metric::Star => {
                let mean = self.sum as f64 / self.total as f64;
                json!((mean * 10.0).round() / 10.0)
            }
        }
    }

    pub fn to_json(&self) -> Value {
        let score = self.score_value();
        let mut body = json!({
            "score": score,
            "scoreSum": self.sum,
            "metricsType": self.metric.upper(),
            "promoters": self.percent(self.positive),
            "passives": self.percent(self.neutral),
            "detractors": self.percent(self.negative),
            "promotersCount": self.positive,
            "passivesCount": self.neutral,
            "detractorsCount": self.negative,
            "totalResponses": self.total,
        });
        if self.metric == Metric::Nps
            && let Some(object) = body.as_object_mut()
        {
            object.insert("nps".to_owned(), score);
        }
        body
    }

    /// The compact form used inside reports: `{promoters, passives, detractors, total, score}`.
    pub fn summary_json(&self) -> Value {
        json!({
            "promoters": self.positive,
            "passives": self.neutral,
            "detractors": self.negative,
            "total": self.total,
            "score": self.score_value(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score_of(metric: Metric, answers: &[i64]) -> Score {
        let mut score = Score {
            metric,
            positive: 0,
            neutral: 0,
            negative: 0,
            total: 0,
            sum: 0,
        };
        for answer in answers {
            score.add(*answer);
        }
        score
    }

    #[test]
    fn nps_matches_the_documented_example() {
        // The documented example: 8 promoters, 2 passives, 3 detractors → 62/15/23 and NPS 39.
        let mut answers = vec![10; 8];
        answers.extend([7, 8, 0, 3, 6]);
        let score = score_of(Metric::Nps, &answers);
        let body = score.to_json();
        assert_eq!(body["promoters"], 62);
        assert_eq!(body["passives"], 15);
        assert_eq!(body["detractors"], 23);
        assert_eq!(body["promotersCount"], 8);
        assert_eq!(body["totalResponses"], 13);
        assert_eq!(body["nps"], body["score"]);
        assert_eq!(body["score"], 39);
        assert_eq!(body["metricsType"], "NPS");
    }

    #[test]
    fn csat_ces_and_star_formulas() {
        let csat = score_of(Metric::Csat, &[5, 4, 3, 1]);
        assert_eq!(csat.to_json()["score"], 50);
        assert!(csat.to_json().get("nps").is_none());
        let ces = score_of(Metric::Ces, &[7, 5, 4, 2]);
        assert_eq!(ces.to_json()["score"], 50);
        assert_eq!(ces.to_json()["passivesCount"], 1);
        let star = score_of(Metric::Star, &[5, 4, 4]);
        assert_eq!(star.to_json()["score"], 4.3);
        assert_eq!(star.to_json()["scoreSum"], 13);
        let empty = score_of(Metric::Nps, &[]);
        assert_eq!(empty.to_json()["score"], 0);
        assert_eq!(empty.to_json()["promoters"], 0);
    }

    #[test]
    fn labels_become_snake_case() {
        assert_eq!(snake_case("New Property"), "new_property");
        assert_eq!(snake_case("  Subscription  name "), "subscription_name");
        assert_eq!(snake_case("MRR (USD)"), "mrr_usd");
    }
}
