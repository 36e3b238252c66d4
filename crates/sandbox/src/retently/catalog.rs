//! Account-level resources: campaigns, templates, companies, the outbox, reports and `/ping`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::Uri;
use chrono::{Duration, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use super::envelope::{Envelope, Params, RetentlyError, SortValue, success};
use super::model::{Campaign, Company, Score, SentSurvey, Template, normalize_email};
use crate::ids::is_object_id;
use crate::state::Shared;

/// `{"campaigns":[…]}` as connectors read it, plus the envelope and a `data` duplicate for
/// clients that expect one.
/// `{"campaigns":[…]}` plus the envelope and a `data` duplicate, keys in that order.
#[derive(Serialize)]
pub(crate) struct CampaignsBody {
    message: &'static str,
    code: u16,
    campaigns: Vec<Value>,
    data: Vec<Value>,
}

/// `{"data":[…],"templates":[…]}` plus the envelope.
#[derive(Serialize)]
pub(crate) struct TemplatesBody {
    message: &'static str,
    code: u16,
    data: Vec<Value>,
    templates: Vec<Value>,
}

pub(crate) async fn campaigns(State(shared): State<Arc<Shared>>) -> Json<CampaignsBody> {
    let world = shared.world();
    let campaigns: Vec<Value> = world
        .retently
        .campaigns
        .iter()
        .map(Campaign::to_json)
        .collect();
    Json(CampaignsBody {
        message: "Success.",
        code: 200,
        data: campaigns.clone(),
        campaigns,
    })
}

/// Both readings of the templates envelope: `data` and `templates`.
pub(crate) async fn templates(State(shared): State<Arc<Shared>>) -> Json<TemplatesBody> {
    let world = shared.world();
    let templates: Vec<Value> = world
        .retently
        .templates
        .iter()
        .map(Template::to_json)
        .collect();
    Json(TemplatesBody {
        message: "Success.",
        code: 200,
        data: templates.clone(),
        templates,
    })
}

pub(crate) async fn template(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Envelope>, RetentlyError> {
    if !is_object_id(&id) {
        return Err(RetentlyError::bad_request("The template id is invalid."));
    }
    let world = shared.world();
    let template = world
        .retently
        .templates
        .iter()
        .find(|template| template.id == id)
        .ok_or_else(|| RetentlyError::not_found("Template not found."))?;
    Ok(success(template.to_json()))
}

const COMPANY_SORTS: &[&str] = &["createdDate", "companyName", "domain"];

pub(crate) async fn companies(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Json<Envelope>, RetentlyError> {
    let params = Params::from_uri(&uri)?;
    let paging = params.paging("-createdDate", COMPANY_SORTS)?;
    let range = params.date_range()?;
    let world = shared.world();
    let store = &world.retently;
    let companies: Vec<&Company> = store
        .companies
        .iter()
        .filter(|company| range.contains(company.created))
        .collect();
    let data = paging.page(
        "companies",
        companies,
        |company| {
            let primary = match paging.field.as_str() {
                "companyName" => SortValue::Text(company.name.to_lowercase()),
                "domain" => SortValue::Text(company.domain.clone()),
                _ => SortValue::Time(company.created),
            };
            (primary, company.id.clone())
        },
        |company| store.company_json(company),
    );
    Ok(success(data))
}

/// By id when the segment looks like one, by domain (case-insensitively) otherwise. The body is
/// the company object under `data` (upstream's shape is not published).
pub(crate) async fn company(
    State(shared): State<Arc<Shared>>,
    Path(key): Path<String>,
) -> Result<Json<Envelope>, RetentlyError> {
    let world = shared.world();
    let store = &world.retently;
    let found = if is_object_id(&key) {
        store.company_by_id(&key)
    } else {
        let domain = key.trim().to_ascii_lowercase();
        store
            .companies
            .iter()
            .find(|company| company.domain.eq_ignore_ascii_case(&domain))
    };
    let company = found.ok_or_else(|| RetentlyError::not_found("Company not found."))?;
    Ok(success(store.company_json(company)))
}

const OUTBOX_SORTS: &[&str] = &["surveyCreatedDate", "sentDate", "email"];
const CHANNELS: &[&str] = &["email", "link", "inapp", "in-app", "intercom"];
const SENT_BY: &[&str] = &["campaign", "reminder", "manual", "test", "imported"];

/// Sent surveys. `startDate`/`endDate` filter on the send date.
pub(crate) async fn outbox(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Json<Envelope>, RetentlyError> {
    let params = Params::from_uri(&uri)?;
    let paging = params.paging("-surveyCreatedDate", OUTBOX_SORTS)?;
    let range = params.date_range()?;
    let email = params.get("email").map(normalize_email);
    let campaign_id = params.get("campaignId");
    let channel = params.get("channel").map(str::to_ascii_lowercase);
    if let Some(channel) = &channel
        && !CHANNELS.contains(&channel.as_str())
    {
        return Err(RetentlyError::bad_request(
            "The channel must be one of: email, link, inapp, intercom.",
        ));
    }
    let sent_by = params.get("sentBy").map(str::to_ascii_lowercase);
    if let Some(sent_by) = &sent_by
        && !SENT_BY.contains(&sent_by.as_str())
    {
        return Err(RetentlyError::bad_request(
            "The sentBy must be one of: campaign, reminder, manual, test, imported.",
        ));
    }
    // `inapp` and `in-app` name the same channel.
    let channel = channel.map(|channel| channel.replace('-', ""));
    let now = Utc::now();
    let world = shared.world();
    let surveys: Vec<&SentSurvey> = world
        .retently
        .outbox
        .iter()
        .filter(|survey| email.as_ref().is_none_or(|email| &survey.email == email))
        .filter(|survey| campaign_id.is_none_or(|id| survey.campaign_id == id))
        .filter(|survey| {
            channel
                .as_ref()
                .is_none_or(|channel| &survey.channel.replace('-', "") == channel)
        })
        .filter(|survey| sent_by.as_ref().is_none_or(|by| &survey.sent_by == by))
        .filter(|survey| range.contains(survey.sent))
        .collect();
    let data = paging.page(
        "surveys",
        surveys,
        |survey| {
            let primary = match paging.field.as_str() {
                "sentDate" => SortValue::Time(survey.sent),
                "email" => SortValue::Text(survey.email.clone()),
                _ => SortValue::Time(survey.created),
            };
            (primary, survey.survey_id.clone())
        },
        |survey| survey.to_json(now),
    );
    Ok(success(data))
}

/// Reports of every campaign.
pub(crate) async fn reports(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Json<Envelope>, RetentlyError> {
    report_list(&shared, None, &uri)
}

pub(crate) async fn campaign_report(
    State(shared): State<Arc<Shared>>,
    Path(campaign_id): Path<String>,
    uri: Uri,
) -> Result<Json<Envelope>, RetentlyError> {
    if !is_object_id(&campaign_id) {
        return Err(RetentlyError::bad_request("The campaign id is invalid."));
    }
    report_list(&shared, Some(&campaign_id), &uri)
}

/// `data` is an array of per-campaign reports. `trend` has one point per day with responses in
/// the range (default: the last 30 days); `last` sums the range; `deliveryStats` counts the
/// campaign's outbox over all time.
fn report_list(
    shared: &Shared,
    campaign_id: Option<&str>,
    uri: &Uri,
) -> Result<Json<Envelope>, RetentlyError> {
    let params = Params::from_uri(uri)?;
    let mut range = params.date_range()?;
    let now = Utc::now();
    if range.start.is_none() && range.end.is_none() {
        range.start = Some(now - Duration::days(30));
    }
    let world = shared.world();
    let store = &world.retently;
    let campaigns: Vec<&Campaign> = store
        .campaigns
        .iter()
        .filter(|campaign| campaign_id.is_none_or(|id| campaign.id == id))
        .collect();
    if campaign_id.is_some() && campaigns.is_empty() {
        return Err(RetentlyError::not_found("Campaign not found."));
    }
    let reports: Vec<Value> = campaigns
        .into_iter()
        .map(|campaign| {
            let responses: Vec<_> = store
                .feedback
                .iter()
                .filter(|item| item.campaign_id == campaign.id && range.contains(item.created))
                .collect();
            let mut days: BTreeMap<String, Score> = BTreeMap::new();
            for item in &responses {
                days.entry(item.created.format("%Y-%m-%d").to_string())
                    .or_insert_with(|| Score::compute(campaign.metric, std::iter::empty()))
                    .add(item.score);
            }
            let trend: Vec<Value> = days
                .iter()
                .map(|(day, score)| {
                    let mut point = score.summary_json();
                    if let Some(point) = point.as_object_mut() {
                        point.insert("day".to_owned(), json!(day));
                    }
                    point
                })
                .collect();
            let last = Score::compute(campaign.metric, responses.iter().copied());
            let sent: Vec<&SentSurvey> = store
                .outbox
                .iter()
                .filter(|survey| survey.campaign_id == campaign.id)
                .collect();
            json!({
                "campaignId": campaign.id,
                "name": campaign.name,
                "isActive": campaign.is_active,
                "metric": campaign.metric.upper(),
                "questionsStats": [],
                "trend": trend,
                "last": last.summary_json(),
                "deliveryStats": {
                    "totalCount": sent.len(),
                    "opened": sent.iter().filter(|s| s.opened.is_some()).count(),
                    "responded": sent.iter().filter(|s| s.responded.is_some()).count(),
                    "optedOut": sent.iter().filter(|s| s.opted_out).count(),
                    "isBounced": sent.iter().filter(|s| s.bounced).count(),
                },
            })
        })
        .collect();
    Ok(success(Value::Array(reports)))
}

/// A credential probe: 200 with the account status.
pub(crate) async fn ping() -> Json<Envelope> {
    success(json!({"status": "active", "account": "Retently sandbox"}))
}
