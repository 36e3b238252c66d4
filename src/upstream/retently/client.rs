//! The Retently HTTP client: one method per endpoint, one attempt per call. Scheduling,
//! retries, batching and caching live in [`super::RetentlyApi`]; this layer only speaks HTTP
//! and decodes bodies.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::error::parse_rejection;
use super::model::*;
use crate::config::Secret;
use crate::error::{Error, ErrorCode, Reason};
use crate::upstream::http::{Answer, Route, Transport};
use crate::upstream::scheduler::AttemptError;

pub const UPSTREAM: &str = "retently";

pub(crate) mod routes {
    use crate::upstream::http::Route;

    pub const LIST_CUSTOMERS: Route = Route::new("GET", "/api/v2/customers", "customer");
    pub const GET_CUSTOMER: Route = Route::new("GET", "/api/v2/customers/{id}", "customer");
    pub const UPSERT_CUSTOMERS: Route = Route::new("POST", "/api/v2/customers", "customer");
    pub const DELETE_CUSTOMERS: Route = Route::new("DELETE", "/api/v2/customers", "customer");
    pub const UNSUBSCRIBE: Route = Route::new("POST", "/api/v2/customers/unsubscribe", "customer");
    pub const RESUBSCRIBE: Route = Route::new("POST", "/api/v2/customers/resubscribe", "customer");
    pub const SURVEY: Route = Route::new("POST", "/api/v2/survey", "campaign");
    pub const LIST_FEEDBACK: Route = Route::new("GET", "/api/v2/feedback", "feedback");
    pub const GET_FEEDBACK: Route = Route::new("GET", "/api/v2/feedback/{id}", "feedback");
    pub const TAGS: Route = Route::new("POST", "/api/v2/response/tags", "feedback");
    pub const TOPICS: Route = Route::new("POST", "/api/v2/response/topics", "feedback");
    pub const SCORE: Route = Route::new("GET", "/api/v2/{metric}/score", "score");
    pub const CAMPAIGNS: Route = Route::new("GET", "/api/v2/campaigns", "campaign");
    pub const TEMPLATES: Route = Route::new("GET", "/api/v2/templates", "template");
    pub const TEMPLATE: Route = Route::new("GET", "/api/v2/templates/{id}", "template");
    pub const COMPANIES: Route = Route::new("GET", "/api/v2/companies", "company");
    pub const COMPANY: Route = Route::new("GET", "/api/v2/companies/{key}", "company");
    pub const OUTBOX: Route = Route::new("GET", "/api/v2/outbox", "survey");
    pub const REPORTS: Route = Route::new("GET", "/api/v2/reports", "campaign");
    pub const CAMPAIGN_REPORT: Route =
        Route::new("GET", "/api/v2/reports/{campaignId}", "campaign");
}

use routes::*;

/// Typed access to Retently's REST API for one account.
#[derive(Debug, Clone)]
pub struct RetentlyClient {
    transport: Transport,
}

impl RetentlyClient {
    /// The key is sent as `Authorization: api_key=KEY` on every request, in a header value
    /// marked sensitive so that no debug output or log of the client shows it.
    pub fn new(base_url: reqwest::Url, api_key: &Secret) -> Result<Self, Error> {
        let mut value =
            HeaderValue::from_str(&format!("api_key={}", api_key.expose())).map_err(|_| {
                Error::new(
                    ErrorCode::FailedPrecondition,
                    Reason::UpstreamCredentialsInvalid,
                    "the retently api key contains characters not allowed in an http header",
                )
                .with_metadata("upstream", UPSTREAM)
            })?;
        value.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value);
        Ok(Self {
            transport: Transport::new(UPSTREAM, base_url, headers, parse_rejection)?,
        })
    }

    /// `GET` `route` with its `{placeholders}` filled by `args` (see [`segments`]).
    async fn get(
        &self,
        route: Route,
        args: &[&str],
        query: &[(&str, String)],
        timeout: Duration,
    ) -> Result<(StatusCode, Value), AttemptError> {
        let answer = self
            .transport
            .send(route, &segments(route, args), query, None, timeout)
            .await?;
        self.body(route, &answer)
    }

    /// Sends `body` to `route`; no write route has placeholders.
    async fn write(
        &self,
        route: Route,
        body: &Value,
        timeout: Duration,
    ) -> Result<(StatusCode, Value), AttemptError> {
        let bytes = serde_json::to_vec(body).map_err(|error| {
            AttemptError::permanent(Error::internal(format!(
                "cannot encode {route} body: {error}"
            )))
        })?;
        let answer = self
            .transport
            .send(route, &segments(route, &[]), &[], Some(bytes), timeout)
            .await?;
        self.body(route, &answer)
    }

    fn body(&self, route: Route, answer: &Answer) -> Result<(StatusCode, Value), AttemptError> {
        self.transport
            .json(route, answer)
            .map(|value| (answer.status, value))
            .map_err(AttemptError::permanent)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        route: Route,
        status: StatusCode,
        path: &str,
        value: Value,
    ) -> Result<T, AttemptError> {
        self.transport
            .decode(route, status, path, value)
            .map_err(AttemptError::permanent)
    }

    fn malformed(&self, route: Route, status: StatusCode, what: impl Into<String>) -> AttemptError {
        AttemptError::permanent(self.transport.malformed(route, status, what.into()))
    }

    /// Finds the record list at the first of `paths` that holds an array.
    fn records<T: DeserializeOwned>(
        &self,
        route: Route,
        status: StatusCode,
        body: &Value,
        paths: &[&[&str]],
    ) -> Result<Vec<T>, AttemptError> {
        for path in paths {
            if let Some(Value::Array(items)) = lookup(body, path) {
                let name = path.join(".");
                return items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| {
                        self.decode(route, status, &format!("{name}[{index}]"), item.clone())
                    })
                    .collect();
            }
        }
        let expected = paths.first().map(|path| path.join(".")).unwrap_or_default();
        Err(self.malformed(
            route,
            status,
            format!("no record list (expected `{expected}`)"),
        ))
    }

    /// A list page: records at `data.<key>` (or top-level `<key>`), metadata inside `data` or
    /// at the top level.
    fn page<T: DeserializeOwned>(
        &self,
        route: Route,
        status: StatusCode,
        body: &Value,
        key: &str,
        request: &PageRequest,
    ) -> Result<Page<T>, AttemptError> {
        let items: Vec<T> = self.records(route, status, body, &[&["data", key], &[key]])?;
        let meta = |name: &str| -> Option<u64> {
            let data = body.get("data").filter(|data| data.is_object());
            data.and_then(|data| data.get(name))
                .or_else(|| body.get(name))
                .and_then(number)
        };
        let limit = meta("limit")
            .map(|limit| limit as u32)
            .or(request.limit)
            .unwrap_or(20);
        let sort = body
            .get("data")
            .and_then(|data| data.get("sort"))
            .or_else(|| body.get("sort"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Page {
            items,
            page: meta("page")
                .map(|page| page as u32)
                .or(request.page)
                .unwrap_or(1),
            pages: meta("pages").map(|pages| pages as u32),
            limit,
            total: meta("total"),
            sort,
        })
    }

    /// A single record: `data` itself, or the first item of `data.<key>`.
    fn single<T: DeserializeOwned>(
        &self,
        route: Route,
        status: StatusCode,
        body: Value,
        key: &str,
    ) -> Result<T, AttemptError> {
        let Some(data) = body.get("data") else {
            return Err(self.malformed(route, status, "no `data` object"));
        };
        match data.get(key) {
            Some(Value::Array(items)) => match items.first() {
                Some(item) => self.decode(route, status, &format!("data.{key}[0]"), item.clone()),
                None => Err(self.malformed(route, status, format!("`data.{key}` is empty"))),
            },
            _ if data.is_object() => self.decode(route, status, "data", data.clone()),
            _ => Err(self.malformed(route, status, "`data` is not an object")),
        }
    }

    /// `GET` one list page: `filters` and then the paging parameters as the query, records
    /// under `key` (see [`Self::page`]).
    async fn get_page<T: DeserializeOwned>(
        &self,
        route: Route,
        mut filters: Vec<(&'static str, String)>,
        key: &str,
        request: &PageRequest,
        timeout: Duration,
    ) -> Result<Page<T>, AttemptError> {
        page_params(request, &mut filters);
        let (status, body) = self.get(route, &[], &filters, timeout).await?;
        self.page(route, status, &body, key, request)
    }

    /// `GET` one record (see [`Self::single`]).
    async fn get_single<T: DeserializeOwned>(
        &self,
        route: Route,
        args: &[&str],
        key: &str,
        timeout: Duration,
    ) -> Result<T, AttemptError> {
        let (status, body) = self.get(route, args, &[], timeout).await?;
        self.single(route, status, body, key)
    }

    /// `GET` a whole collection: top-level `<key>` (documented), else `data`, `data.data`,
    /// `data.<key>`.
    async fn get_collection<T: DeserializeOwned>(
        &self,
        route: Route,
        key: &str,
        timeout: Duration,
    ) -> Result<Vec<T>, AttemptError> {
        let (status, body) = self.get(route, &[], &[], timeout).await?;
        self.records(
            route,
            status,
            &body,
            &[&[key], &["data"], &["data", "data"], &["data", key]],
        )
    }

    /// Replaces (or, with `append`, adds to) one kind of label of a response, sent as the
    /// body's `field` (`tags`, `topics`).
    async fn set_labels(
        &self,
        route: Route,
        field: &str,
        feedback_id: &str,
        labels: Value,
        op: LabelOp,
        timeout: Duration,
    ) -> Result<(), AttemptError> {
        let mut body = Map::new();
        body.insert("id".to_owned(), json!(feedback_id));
        body.insert(field.to_owned(), labels);
        if op == LabelOp::Append {
            body.insert("op".to_owned(), json!("append"));
        }
        self.write(route, &Value::Object(body), timeout)
            .await
            .map(drop)
    }

    // ---- customers ----

    pub async fn list_customers(
        &self,
        query: &CustomerQuery,
        timeout: Duration,
    ) -> Result<Page<Customer>, AttemptError> {
        let mut params = filter_params([("email", &query.email)]);
        date_param("startDate", query.created_from, &mut params);
        date_param("endDate", query.created_to, &mut params);
        self.get_page(LIST_CUSTOMERS, params, "subscribers", &query.page, timeout)
            .await
    }

    pub async fn get_customer(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Customer, AttemptError> {
        self.get_single(GET_CUSTOMER, &[id], "subscribers", timeout)
            .await
    }

    /// `POST /customers` with every input; one result per input, in order.
    pub async fn upsert_customers(
        &self,
        customers: &[CustomerInput],
        timeout: Duration,
    ) -> Result<Vec<Result<CustomerUpsert, Error>>, AttemptError> {
        let body = json!({ "subscribers": customers });
        let (status, body) = self.write(UPSERT_CUSTOMERS, &body, timeout).await?;
        let outcomes = self.per_email(
            UPSERT_CUSTOMERS,
            status,
            &body,
            customers.iter().map(|c| c.email.as_str()),
        )?;
        Ok(outcomes
            .into_iter()
            .zip(customers)
            .map(|(outcome, input)| {
                let outcome = outcome?;
                Ok(CustomerUpsert {
                    email: input.email.clone(),
                    status: match outcome.status.as_str() {
                        "created" => UpsertStatus::Created,
                        "updated" => UpsertStatus::Updated,
                        other => UpsertStatus::Other(other.to_owned()),
                    },
                    id: outcome.id,
                })
            })
            .collect())
    }

    /// `DELETE /customers`, `POST /customers/unsubscribe` or `/resubscribe` for `emails`.
    pub async fn change_customers(
        &self,
        change: CustomerChange,
        emails: &[String],
        message: Option<&str>,
        timeout: Duration,
    ) -> Result<Vec<Result<EmailOutcome, Error>>, AttemptError> {
        let subscribers: Vec<Value> = emails
            .iter()
            .map(|email| json!({ "email": email }))
            .collect();
        let mut body = Map::new();
        body.insert("subscribers".to_owned(), Value::Array(subscribers));
        if let Some(message) = message {
            body.insert("message".to_owned(), Value::String(message.to_owned()));
        }
        let route = match change {
            CustomerChange::Delete => DELETE_CUSTOMERS,
            CustomerChange::Unsubscribe => UNSUBSCRIBE,
            CustomerChange::Resubscribe => RESUBSCRIBE,
        };
        let (status, body) = self.write(route, &Value::Object(body), timeout).await?;
        self.per_email(route, status, &body, emails.iter().map(String::as_str))
    }

    /// Splits a `data` keyed by email (or a list of objects with `email`) into one outcome
    /// per requested address, in request order. A `failed` entry becomes that address's error;
    /// an address the upstream did not mention was accepted without detail.
    fn per_email<'a>(
        &self,
        route: Route,
        status: StatusCode,
        body: &Value,
        emails: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<Result<EmailOutcome, Error>>, AttemptError> {
        let data = body.get("data").unwrap_or(&Value::Null);
        let entries: Vec<(String, &Value)> = match data {
            Value::Object(map) => map
                .iter()
                .map(|(key, value)| (email_key(key), value))
                .collect(),
            Value::Array(items) => items
                .iter()
                .filter_map(|item| {
                    let email = item.get("email")?.as_str()?;
                    Some((email_key(email), item))
                })
                .collect(),
            Value::Null | Value::String(_) | Value::Bool(_) => Vec::new(),
            Value::Number(_) => {
                return Err(self.malformed(route, status, "`data` is a number"));
            }
        };
        emails
            .map(|email| {
                let key = email_key(email);
                let Some((_, entry)) = entries.iter().find(|(candidate, _)| *candidate == key)
                else {
                    return Ok(Ok(EmailOutcome {
                        email: email.to_owned(),
                        status: "accepted".to_owned(),
                        id: None,
                        reason: None,
                    }));
                };
                let text = |name: &str| -> Option<String> {
                    match entry.get(name)? {
                        Value::String(text) => Some(text.clone()),
                        Value::Number(number) => Some(number.to_string()),
                        _ => None,
                    }
                };
                let Some(state) = text("status") else {
                    return Err(self.malformed(
                        route,
                        status,
                        "data.<email>.status: missing or not a string",
                    ));
                };
                let reason = text("reason").or_else(|| text("message"));
                if state.eq_ignore_ascii_case("failed") || state.eq_ignore_ascii_case("error") {
                    return Ok(Err(item_rejected(route, reason.as_deref())));
                }
                Ok(Ok(EmailOutcome {
                    email: email.to_owned(),
                    status: state,
                    id: text("id").or_else(|| text("customerId")),
                    reason,
                }))
            })
            .collect()
    }

    // ---- surveys ----

    /// `POST /survey` to `campaign_id` for `recipients` (1–100); one outcome per recipient.
    /// `delay_days` is sent as `delay` when given, 0 included (no delay, whatever the campaign's
    /// setting).
    pub async fn send_survey(
        &self,
        campaign_id: &str,
        delay_days: Option<u32>,
        recipients: &[CustomerInput],
        timeout: Duration,
    ) -> Result<Vec<Result<SurveyOutcome, Error>>, AttemptError> {
        let mut body = json!({ "campaign": campaign_id, "subscribers": recipients });
        if let (Some(days), Some(object)) = (delay_days, body.as_object_mut()) {
            object.insert("delay".to_owned(), json!(days));
        }
        let (status, response) = self.write(SURVEY, &body, timeout).await?;
        let data = response.get("data").unwrap_or(&Value::Null);
        let outcomes = self.per_email(
            SURVEY,
            status,
            &response,
            recipients.iter().map(|r| r.email.as_str()),
        )?;
        Ok(outcomes
            .into_iter()
            .map(|outcome| {
                let outcome = outcome?;
                let detail = data
                    .as_object()
                    .and_then(|map| {
                        map.iter()
                            .find(|(key, _)| email_key(key) == email_key(&outcome.email))
                    })
                    .map(|(_, value)| value);
                let field = |name: &str| {
                    detail
                        .and_then(|detail| detail.get(name))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                };
                Ok(SurveyOutcome {
                    status: match outcome.status.as_str() {
                        "scheduled" | "sent" | "queued" => SurveyStatus::Scheduled,
                        "throttled" => SurveyStatus::Throttled,
                        "unsubscribed" => SurveyStatus::Unsubscribed,
                        "accepted" => SurveyStatus::Accepted,
                        other => SurveyStatus::Other(other.to_owned()),
                    },
                    survey_id: field("surveyId").or_else(|| field("id")),
                    customer_id: field("customerId").or(outcome.id),
                    scheduled_date: field("scheduledDate"),
                    email: outcome.email,
                })
            })
            .collect())
    }

    // ---- feedback ----

    pub async fn list_feedback(
        &self,
        query: &FeedbackQuery,
        timeout: Duration,
    ) -> Result<Page<Feedback>, AttemptError> {
        let mut params = filter_params([
            ("email", &query.email),
            ("customerId", &query.customer_id),
            ("campaignId", &query.campaign_id),
        ]);
        date_param("startDate", query.start_date, &mut params);
        date_param("endDate", query.end_date, &mut params);
        self.get_page(LIST_FEEDBACK, params, "responses", &query.page, timeout)
            .await
    }

    pub async fn get_feedback(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Feedback, AttemptError> {
        self.get_single(GET_FEEDBACK, &[id], "responses", timeout)
            .await
    }

    /// Sets tags (`append` adds, `replace` overwrites) on a response.
    pub async fn set_tags(
        &self,
        feedback_id: &str,
        tags: &[String],
        op: LabelOp,
        timeout: Duration,
    ) -> Result<(), AttemptError> {
        self.set_labels(TAGS, "tags", feedback_id, json!(tags), op, timeout)
            .await
    }

    pub async fn set_topics(
        &self,
        feedback_id: &str,
        topics: &[Topic],
        op: LabelOp,
        timeout: Duration,
    ) -> Result<(), AttemptError> {
        self.set_labels(TOPICS, "topics", feedback_id, json!(topics), op, timeout)
            .await
    }

    // ---- scores, campaigns, templates ----

    pub async fn score(&self, metric: Metric, timeout: Duration) -> Result<Score, AttemptError> {
        self.get_single(SCORE, &[metric.path()], "score", timeout)
            .await
    }

    pub async fn campaigns(&self, timeout: Duration) -> Result<Vec<Campaign>, AttemptError> {
        self.get_collection(CAMPAIGNS, "campaigns", timeout).await
    }

    pub async fn templates(&self, timeout: Duration) -> Result<Vec<Template>, AttemptError> {
        self.get_collection(TEMPLATES, "templates", timeout).await
    }

    pub async fn template(&self, id: &str, timeout: Duration) -> Result<Template, AttemptError> {
        self.get_single(TEMPLATE, &[id], "templates", timeout).await
    }

    // ---- companies, outbox, reports ----

    pub async fn list_companies(
        &self,
        query: &CompanyQuery,
        timeout: Duration,
    ) -> Result<Page<Company>, AttemptError> {
        self.get_page(COMPANIES, Vec::new(), "companies", &query.page, timeout)
            .await
    }

    /// One company by its id or its domain.
    pub async fn company(
        &self,
        id_or_domain: &str,
        timeout: Duration,
    ) -> Result<Company, AttemptError> {
        self.get_single(COMPANY, &[id_or_domain], "companies", timeout)
            .await
    }

    pub async fn outbox(
        &self,
        query: &OutboxQuery,
        timeout: Duration,
    ) -> Result<Page<SentSurvey>, AttemptError> {
        let mut params = filter_params([
            ("email", &query.email),
            ("campaignId", &query.campaign_id),
            ("channel", &query.channel),
            ("sentBy", &query.sent_by),
        ]);
        date_param("startDate", query.start_date, &mut params);
        date_param("endDate", query.end_date, &mut params);
        self.get_page(OUTBOX, params, "surveys", &query.page, timeout)
            .await
    }

    /// Reports of every campaign, or of one.
    pub async fn reports(
        &self,
        campaign_id: Option<&str>,
        timeout: Duration,
    ) -> Result<Vec<Report>, AttemptError> {
        let route = match campaign_id {
            Some(_) => CAMPAIGN_REPORT,
            None => REPORTS,
        };
        let (status, body) = self
            .get(route, campaign_id.as_slice(), &[], timeout)
            .await?;
        if let Some(data) = body.get("data").filter(|data| data.is_object()) {
            // A single campaign's report may come as one object.
            if campaign_id.is_some() && data.get("campaignId").is_some() {
                return Ok(vec![self.decode(route, status, "data", data.clone())?]);
            }
        }
        self.records(
            route,
            status,
            &body,
            &[&["data"], &["data", "data"], &["reports"]],
        )
    }
}

/// Which bulk change of customers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CustomerChange {
    Delete,
    Unsubscribe,
    Resubscribe,
}

/// The path segments of `route`, its `{placeholders}` filled by `args` in order. Every route
/// of this client is called with as many values as it has placeholders.
fn segments<'a>(route: Route, args: &[&'a str]) -> Vec<&'a str> {
    let mut args = args.iter();
    let segments = route
        .template
        .split('/')
        .filter(|segment| !segment.is_empty())
        .map(|segment| {
            if segment.starts_with('{') {
                args.next().copied().unwrap_or(segment)
            } else {
                segment
            }
        })
        .collect();
    debug_assert!(
        args.next().is_none(),
        "{route}: more values than placeholders"
    );
    segments
}

/// The filters that are set, by their query names, in the order given.
fn filter_params<'a>(
    filters: impl IntoIterator<Item = (&'static str, &'a Option<String>)>,
) -> Vec<(&'static str, String)> {
    filters
        .into_iter()
        .filter_map(|(name, value)| Some((name, value.clone()?)))
        .collect()
}

fn lookup<'a>(body: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(body, |value, key| value.get(key))
}

/// A non-negative whole number, possibly sent as a string.
fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Number(number) => number.as_u64().or_else(|| {
            number
                .as_f64()
                .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                .map(|f| f as u64)
        }),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// The upstream refused one address of a batch (for example it already exists, or is unknown).
fn item_rejected(route: Route, reason: Option<&str>) -> Error {
    let reason = reason.unwrap_or("unspecified");
    let code = match reason {
        "not_found" | "not found" => ErrorCode::NotFound,
        "exists" | "already_exists" => ErrorCode::AlreadyExists,
        _ => ErrorCode::FailedPrecondition,
    };
    Error::new(
        code,
        Reason::UpstreamItemRejected,
        format!("retently refused this customer: {reason}"),
    )
    .with_metadata("upstream", UPSTREAM)
    .with_metadata("status", "200")
    .with_metadata("route", route.to_string())
    .with_metadata("upstream_reason", reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_fill_placeholders_in_order() {
        assert_eq!(segments(LIST_CUSTOMERS, &[]), ["api", "v2", "customers"]);
        assert_eq!(
            segments(GET_CUSTOMER, &["c-1"]),
            ["api", "v2", "customers", "c-1"]
        );
        assert_eq!(segments(SCORE, &["nps"]), ["api", "v2", "nps", "score"]);
        assert_eq!(
            segments(UNSUBSCRIBE, &[]),
            ["api", "v2", "customers", "unsubscribe"]
        );
    }

    #[test]
    fn only_set_filters_become_parameters() {
        let (email, none) = (Some("a@b.c".to_owned()), None);
        assert_eq!(
            filter_params([("email", &email), ("campaignId", &none), ("sentBy", &email)]),
            [
                ("email", "a@b.c".to_owned()),
                ("sentBy", "a@b.c".to_owned())
            ]
        );
    }
}
