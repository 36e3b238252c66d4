//! Retently records and request types. Decoding tolerates the documented variations (camelCase
//! and snake_case names, numbers as strings, `null` lists) and rejects what is really malformed
//! with an error naming the field.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::upstream::de;

/// One page of a list endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// 1-based page number.
    pub page: u32,
    /// Number of pages, when the upstream said.
    pub pages: Option<u32>,
    /// Page size used.
    pub limit: u32,
    /// Total records matching, when the upstream said.
    pub total: Option<u64>,
    pub sort: Option<String>,
}

impl<T> Page<T> {
    /// Whether a next page exists: by `pages` when known, else a full page suggests more.
    pub fn has_more(&self) -> bool {
        match self.pages {
            Some(pages) => self.page < pages,
            None => self.items.len() as u32 >= self.limit && !self.items.is_empty(),
        }
    }
}

/// Paging of a list request. `limit` above 1,000 is clamped by the upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// 1-based; `None` means 1.
    pub page: Option<u32>,
    /// `None` means the upstream's default (20).
    pub limit: Option<u32>,
    /// One field, `-` prefix for descending (`-createdDate`).
    pub sort: Option<String>,
}

/// The most records one list call may ask for.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// A customer property as the upstream returns it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Property {
    #[serde(default, deserialize_with = "de::opt_string")]
    pub label: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub name: Option<String>,
    #[serde(rename = "type", default, deserialize_with = "de::opt_string")]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub value: Option<String>,
}

/// A Retently customer (`subscribers` item).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Customer {
    #[serde(deserialize_with = "de::string")]
    pub id: String,
    #[serde(deserialize_with = "de::string")]
    pub email: String,
    #[serde(default, alias = "first_name", deserialize_with = "de::opt_string")]
    pub first_name: Option<String>,
    #[serde(default, alias = "last_name", deserialize_with = "de::opt_string")]
    pub last_name: Option<String>,
    #[serde(
        default,
        alias = "company_name",
        alias = "company",
        deserialize_with = "de::opt_string"
    )]
    pub company_name: Option<String>,
    #[serde(default, alias = "company_id", deserialize_with = "de::opt_string")]
    pub company_id: Option<String>,
    #[serde(default, alias = "job_title", deserialize_with = "de::opt_string")]
    pub job_title: Option<String>,
    #[serde(default, deserialize_with = "de::string_list")]
    pub tags: Vec<String>,
    #[serde(default, alias = "created_date", deserialize_with = "de::opt_string")]
    pub created_date: Option<String>,
    #[serde(default, alias = "updated_date", deserialize_with = "de::opt_string")]
    pub updated_date: Option<String>,
    #[serde(default, deserialize_with = "de::list")]
    pub properties: Vec<Property>,
    #[serde(default, deserialize_with = "de::flag")]
    pub unsubscribed: bool,
}

/// The kind of a property value in a write, as the help centre lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PropertyType {
    String,
    Date,
    Integer,
    Boolean,
    Collection,
}

/// A property to set on a customer. `value: None` removes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropertyInput {
    /// Display name; the upstream derives the snake_case key from it.
    pub label: String,
    /// `None` keeps an existing property's type (new ones become strings).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<PropertyType>,
    pub value: Option<String>,
}

/// A customer to create or update (keyed by email upstream), also a survey recipient.
// Deserialize: a survey send spooled for another replica is read back (see `spool`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomerInput {
    pub email: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub company: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_title: Option<String>,
    /// `None` leaves tags unchanged; `Some` replaces them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<PropertyInput>,
}

impl CustomerInput {
    pub fn new(email: impl Into<String>) -> Self {
        Self {
            email: email.into(),
            ..Self::default()
        }
    }
}

/// The identity the upstream keys customers by: the email, trimmed and case-folded.
pub fn email_key(email: &str) -> String {
    email.trim().to_lowercase()
}

/// What an upsert did to one customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpsertStatus {
    Created,
    Updated,
    /// A status this client does not know; kept verbatim.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerUpsert {
    pub email: String,
    pub status: UpsertStatus,
    pub id: Option<String>,
}

/// What a delete, unsubscribe or resubscribe did to one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailOutcome {
    pub email: String,
    /// `deleted`, `unsubscribed`, `resubscribed`, `failed`, … as the upstream said; `accepted`
    /// when it gave no per-address detail.
    pub status: String,
    pub id: Option<String>,
    pub reason: Option<String>,
}

/// A transactional survey request for one recipient.
#[derive(Debug, Clone, PartialEq)]
pub struct SurveyRequest {
    /// A transactional campaign's id.
    pub campaign_id: String,
    /// Days before the survey goes out; `None` means the campaign's own setting.
    pub delay_days: Option<u32>,
    pub recipient: CustomerInput,
}

/// What happened to one recipient of a transactional survey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SurveyStatus {
    /// Will be (or was) sent.
    Scheduled,
    /// Skipped: surveyed in this campaign within its throttle period.
    Throttled,
    /// Skipped: the customer opted out.
    Unsubscribed,
    /// The upstream accepted the call without per-recipient detail.
    Accepted,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurveyOutcome {
    pub email: String,
    pub status: SurveyStatus,
    pub survey_id: Option<String>,
    pub customer_id: Option<String>,
    pub scheduled_date: Option<String>,
}

/// A topic on a response.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Topic {
    #[serde(deserialize_with = "de::string")]
    pub name: String,
    /// Left out of requests when `None`, so the upstream applies its default (neutral).
    #[serde(
        default,
        deserialize_with = "de::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub sentiment: Option<String>,
}

/// Whether tags/topics replace the response's current ones or are added to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOp {
    Replace,
    Append,
}

/// A survey response.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Feedback {
    #[serde(deserialize_with = "de::string")]
    pub id: String,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub survey_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub customer_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub email: Option<String>,
    #[serde(default, alias = "first_name", deserialize_with = "de::opt_string")]
    pub first_name: Option<String>,
    #[serde(default, alias = "last_name", deserialize_with = "de::opt_string")]
    pub last_name: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub company_name: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub company_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub job_title: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub country: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub state: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub city: Option<String>,
    #[serde(default, deserialize_with = "de::string_list")]
    pub tags: Vec<String>,
    #[serde(default, deserialize_with = "de::list")]
    pub custom_props: Vec<Property>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub campaign_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub campaign_name: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub created_date: Option<String>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub score: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub comment: Option<String>,
    #[serde(default, deserialize_with = "de::flag")]
    pub checkbox: bool,
    #[serde(default, deserialize_with = "de::list")]
    pub additional_questions: Vec<Value>,
    #[serde(default, deserialize_with = "de::list")]
    pub feedback_topics: Vec<Topic>,
    #[serde(default, deserialize_with = "de::string_list")]
    pub feedback_tags: Vec<String>,
    #[serde(default, deserialize_with = "de::string_list")]
    pub feedback_tags_new: Vec<String>,
    #[serde(default, deserialize_with = "de::list")]
    pub notes: Vec<Value>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub assigned: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub rating_category: Option<String>,
    #[serde(default, deserialize_with = "de::flag")]
    pub resolved: bool,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub channel: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub metrics_type: Option<String>,
    #[serde(default, deserialize_with = "de::flag")]
    pub is_bogus: bool,
    #[serde(default, deserialize_with = "de::flag")]
    pub is_submitted: bool,
}

/// The CX metric of a score, campaign or response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    Nps,
    Csat,
    Ces,
    Star,
}

impl Metric {
    /// The path segment of `GET /api/v2/{metric}/score`.
    pub fn path(self) -> &'static str {
        match self {
            Metric::Nps => "nps",
            Metric::Csat => "csat",
            Metric::Ces => "ces",
            Metric::Star => "star",
        }
    }
}

/// The latest score of one metric. Percentages are whole numbers; `score` is the metric's
/// headline number (NPS −100..100, CSAT/CES share of positive answers, STAR mean rating).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawScore")]
pub struct Score {
    /// Older bodies call it `nps`, newer ones `score` (the emulator sends both).
    pub score: f64,
    pub score_sum: Option<f64>,
    pub metrics_type: Option<String>,
    pub promoters: i64,
    pub passives: i64,
    pub detractors: i64,
    pub promoters_count: i64,
    pub passives_count: i64,
    pub detractors_count: i64,
    pub total_responses: i64,
    /// When the gateway read it from the upstream (set by the API handle, not in the body), so
    /// a cached score can say how old it is.
    pub fetched_at: Option<std::time::SystemTime>,
}

/// The wire form of [`Score`]: the headline number under `score`, `nps`, or both.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawScore {
    #[serde(default, deserialize_with = "de::opt_f64")]
    score: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    nps: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_f64")]
    score_sum: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_string")]
    metrics_type: Option<String>,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    promoters: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    passives: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    detractors: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    promoters_count: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    passives_count: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    detractors_count: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    total_responses: i64,
}

impl TryFrom<RawScore> for Score {
    type Error = &'static str;

    fn try_from(raw: RawScore) -> Result<Self, Self::Error> {
        Ok(Score {
            score: raw
                .score
                .or(raw.nps)
                .ok_or("missing field `score` (or `nps`)")?,
            score_sum: raw.score_sum,
            metrics_type: raw.metrics_type,
            promoters: raw.promoters,
            passives: raw.passives,
            detractors: raw.detractors,
            promoters_count: raw.promoters_count,
            passives_count: raw.passives_count,
            detractors_count: raw.detractors_count,
            total_responses: raw.total_responses,
            fetched_at: None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Campaign {
    #[serde(alias = "_id", deserialize_with = "de::string")]
    pub id: String,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "de::flag")]
    pub is_active: bool,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub template_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub metric: Option<String>,
    /// `regular`, `transactional`, …
    #[serde(rename = "type", default, deserialize_with = "de::opt_string")]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub channel: Option<String>,
}

impl Campaign {
    pub fn is_transactional(&self) -> bool {
        self.kind
            .as_deref()
            .is_some_and(|kind| kind.eq_ignore_ascii_case("transactional"))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    #[serde(alias = "_id", deserialize_with = "de::string")]
    pub id: String,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub channel: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub metric: Option<String>,
}

/// Per-metric scores of a company (`null` when it has no responses of that metric), under
/// upper-case names (`NPS`) or lower-case ones.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub struct CxMetrics {
    #[serde(alias = "nps", default, deserialize_with = "de::opt_f64")]
    pub nps: Option<f64>,
    #[serde(alias = "csat", default, deserialize_with = "de::opt_f64")]
    pub csat: Option<f64>,
    #[serde(alias = "ces", default, deserialize_with = "de::opt_f64")]
    pub ces: Option<f64>,
    #[serde(alias = "star", default, deserialize_with = "de::opt_f64")]
    pub star: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Company {
    #[serde(deserialize_with = "de::string")]
    pub id: String,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub created_date: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub domain: Option<String>,
    #[serde(default, alias = "name", deserialize_with = "de::opt_string")]
    pub company_name: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub industry_name: Option<String>,
    #[serde(default, deserialize_with = "de::string_list")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub cx_metrics: Option<CxMetrics>,
    #[serde(default, deserialize_with = "de::opt_i64")]
    pub contacts_count: Option<i64>,
}

/// Delivery state of a sent survey.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DetailedStatus {
    #[serde(default, deserialize_with = "de::flag")]
    pub is_opened: bool,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub opened_date: Option<String>,
    #[serde(default, deserialize_with = "de::flag")]
    pub is_responded: bool,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub responded_date: Option<String>,
    #[serde(default, deserialize_with = "de::flag")]
    pub has_feedback: bool,
    #[serde(default, deserialize_with = "de::flag")]
    pub is_opted_out: bool,
    #[serde(default, deserialize_with = "de::flag")]
    pub is_bounced: bool,
}

/// An outbox record: one survey sent (or scheduled).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SentSurvey {
    #[serde(default, deserialize_with = "de::opt_string")]
    pub survey_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub response_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub email: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub customer_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub first_name: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub last_name: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub company_name: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub company_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub survey_created_date: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub sent_date: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub channel: Option<String>,
    /// The campaign's name.
    #[serde(default, deserialize_with = "de::opt_string")]
    pub campaign: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub campaign_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub survey_template_id: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub subject: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub sent_by: Option<String>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "de::string_list")]
    pub person_tags: Vec<String>,
    #[serde(default)]
    pub detailed_status: Option<DetailedStatus>,
    #[serde(default)]
    pub attributes: Option<SentSurveyAttributes>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub mandrill_message_id: Option<String>,
    /// Item shape not documented upstream.
    #[serde(default, deserialize_with = "de::list")]
    pub additional_recipients: Vec<Value>,
}

/// The customer data recorded with a sent survey.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SentSurveyAttributes {
    #[serde(default, deserialize_with = "de::string_list")]
    pub customer_tags: Vec<String>,
    #[serde(default, deserialize_with = "de::list")]
    pub custom_props: Vec<Property>,
}

/// Counts of a report's period (`last`) or of one day (`trend`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ReportSummary {
    #[serde(default, deserialize_with = "de::opt_string")]
    pub day: Option<String>,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    pub promoters: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    pub passives: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    pub detractors: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    pub total: i64,
    #[serde(default, deserialize_with = "de::opt_f64")]
    pub score: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStats {
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    pub total_count: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    pub opened: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    pub responded: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    pub opted_out: i64,
    #[serde(default, deserialize_with = "de::i64_or_zero")]
    pub is_bounced: i64,
}

/// A campaign's report.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    #[serde(alias = "id", deserialize_with = "de::string")]
    pub campaign_id: String,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "de::flag")]
    pub is_active: bool,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub metric: Option<String>,
    #[serde(default, deserialize_with = "de::list")]
    pub questions_stats: Vec<Value>,
    #[serde(default, deserialize_with = "de::list")]
    pub trend: Vec<ReportSummary>,
    #[serde(default)]
    pub last: Option<ReportSummary>,
    #[serde(default)]
    pub delivery_stats: Option<DeliveryStats>,
}

/// Filters of `GET /customers`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CustomerQuery {
    pub email: Option<String>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub page: PageRequest,
}

/// Filters of `GET /feedback`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeedbackQuery {
    pub email: Option<String>,
    pub customer_id: Option<String>,
    pub campaign_id: Option<String>,
    /// `startDate`: responses created at or after.
    pub start_date: Option<DateTime<Utc>>,
    /// `endDate`: responses created at or before.
    pub end_date: Option<DateTime<Utc>>,
    pub page: PageRequest,
}

/// Filters of `GET /companies`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompanyQuery {
    pub page: PageRequest,
}

/// Filters of `GET /outbox`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxQuery {
    pub email: Option<String>,
    pub campaign_id: Option<String>,
    /// `email`, `link`, `inapp`, `intercom`.
    pub channel: Option<String>,
    /// `campaign`, `reminder`, `manual`, `test`, `imported`.
    pub sent_by: Option<String>,
    pub start_date: Option<DateTime<Utc>>,
    pub end_date: Option<DateTime<Utc>>,
    pub page: PageRequest,
}

/// Query parameters shared by the list endpoints.
pub(crate) fn page_params(page: &PageRequest, params: &mut Vec<(&'static str, String)>) {
    if let Some(number) = page.page {
        params.push(("page", number.max(1).to_string()));
    }
    if let Some(limit) = page.limit {
        params.push(("limit", limit.clamp(1, MAX_PAGE_SIZE).to_string()));
    }
    if let Some(sort) = &page.sort {
        params.push(("sort", sort.clone()));
    }
}

/// `startDate`/`endDate` as ISO 8601 instants (a form the upstream documents) with milliseconds,
/// the precision of its own timestamps, so a range can end exactly after a given record.
pub(crate) fn date_param(
    name: &'static str,
    date: Option<DateTime<Utc>>,
    params: &mut Vec<(&'static str, String)>,
) {
    if let Some(date) = date {
        params.push((name, date.to_rfc3339_opts(SecondsFormat::Millis, true)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn company_metrics_decode_under_either_case() {
        let upper: CxMetrics =
            serde_json::from_str(r#"{"NPS": 40, "CSAT": "87.5", "CES": null}"#).unwrap();
        assert_eq!(
            upper,
            CxMetrics {
                nps: Some(40.0),
                csat: Some(87.5),
                ces: None,
                star: None,
            }
        );
        let lower: CxMetrics = serde_json::from_str(r#"{"star": 4.5, "ces": 5}"#).unwrap();
        assert_eq!(
            (lower.star, lower.ces, lower.nps),
            (Some(4.5), Some(5.0), None)
        );
        assert!(serde_json::from_str::<CxMetrics>(r#"{"NPS": "high"}"#).is_err());
    }
}
