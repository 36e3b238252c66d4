//! `POST /survey`: transactional survey sends, with the campaign's throttle.
//!
//! Upstream does not publish the response of this endpoint. The sandbox answers with the usual
//! envelope and `data` keyed by each email exactly as sent:
//!
//! ```json
//! {"message":"Success.","code":200,"data":{
//!   "ann@example.com": {"status":"scheduled","surveyId":"…","customerId":"…","scheduledDate":"…"},
//!   "bob@example.com": {"status":"throttled","customerId":"…","lastSurveyedDate":"…"},
//!   "cy@example.com":  {"status":"unsubscribed","customerId":"…"}}}
//! ```

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use chrono::{Duration, Utc};
use serde_json::{Map, Value, json};

use super::customers::{CustomerInput, upsert_customer};
use super::envelope::{Envelope, RetentlyError, object_list, parse_body, success};
use super::model::CampaignKind;
use crate::state::{Shared, SurveySend};
use crate::time::iso;

/// The documented batch bounds.
pub(crate) const MAX_RECIPIENTS: usize = 100;
/// A longer delay is surely a mistake (days vs seconds); upstream's cap is unknown.
const MAX_DELAY_DAYS: u64 = 365;

pub(crate) async fn send(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Envelope>, RetentlyError> {
    send_survey(&shared, &body, true)
}

/// The deprecated `POST /api/v2/nps/customers/survey`: the help centre says campaign-side options
/// (throttle, delay) apply only through `/survey`, so this alias ignores them.
pub(crate) async fn send_deprecated(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Envelope>, RetentlyError> {
    send_survey(&shared, &body, false)
}

fn send_survey(
    shared: &Shared,
    body: &Bytes,
    campaign_options: bool,
) -> Result<Json<Envelope>, RetentlyError> {
    let body = parse_body(body)?;
    let campaign_id = match body.get("campaign") {
        None | Some(Value::Null) => {
            return Err(RetentlyError::bad_request(
                "The campaign field is required.",
            ));
        }
        Some(Value::String(id)) if !id.trim().is_empty() => id.trim().to_owned(),
        Some(Value::String(_)) => {
            return Err(RetentlyError::bad_request(
                "The campaign field is required.",
            ));
        }
        Some(_) => return Err(RetentlyError::bad_request("The campaign must be a string.")),
    };
    let delay_days = match body.get("delay") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(number)) => match number.as_u64() {
            Some(days) if days <= MAX_DELAY_DAYS => days,
            _ => {
                return Err(RetentlyError::bad_request(format!(
                    "The delay must be an integer number of days between 0 and {MAX_DELAY_DAYS}."
                )));
            }
        },
        Some(Value::String(text)) => match text.trim().parse::<u64>() {
            Ok(days) if days <= MAX_DELAY_DAYS => days,
            _ => {
                return Err(RetentlyError::bad_request(format!(
                    "The delay must be an integer number of days between 0 and {MAX_DELAY_DAYS}."
                )));
            }
        },
        Some(_) => {
            return Err(RetentlyError::bad_request(format!(
                "The delay must be an integer number of days between 0 and {MAX_DELAY_DAYS}."
            )));
        }
    };
    let items = object_list(&body, "subscribers")?;
    if items.is_empty() || items.len() > MAX_RECIPIENTS {
        return Err(RetentlyError::bad_request(format!(
            "The subscribers must contain between 1 and {MAX_RECIPIENTS} items."
        )));
    }

    let mut world = shared.world();
    let inputs = items
        .iter()
        .enumerate()
        .map(|(index, item)| CustomerInput::parse(item, &format!("subscribers.{index}."), &world))
        .collect::<Result<Vec<_>, _>>()?;
    let campaign_index = world
        .retently
        .campaigns
        .iter()
        .position(|campaign| campaign.id == campaign_id)
        .ok_or_else(|| RetentlyError::not_found("Campaign not found."))?;
    let campaign = world.retently.campaigns[campaign_index].clone();
    if campaign.kind != CampaignKind::Transactional {
        return Err(RetentlyError::bad_request(
            "The campaign is not a transactional campaign.",
        ));
    }
    if !campaign.is_active {
        return Err(RetentlyError::bad_request("The campaign is not active."));
    }

    let now = Utc::now();
    let delay = if campaign_options { delay_days } else { 0 };
    let send_at = now + Duration::days(i64::try_from(delay).unwrap_or(0));
    let throttle = if campaign_options {
        campaign.throttle_days
    } else {
        0
    };
    let mut data = Map::new();
    let mut recipients: Vec<String> = Vec::new();
    let mut scheduled: Vec<String> = Vec::new();
    // A recipient listed twice is one recipient: its data merges in order, and every listed
    // spelling of the address gets the same outcome.
    let mut outcomes: Vec<(String, Value)> = Vec::new();
    for input in &inputs {
        let (_, customer_id) = upsert_customer(&mut world, input, now);
        if let Some((_, outcome)) = outcomes.iter().find(|(email, _)| email == &input.email) {
            data.insert(input.email_as_sent.clone(), outcome.clone());
            continue;
        }
        recipients.push(input.email.clone());
        let unsubscribed = world
            .retently
            .customers
            .get(&customer_id)
            .is_some_and(|customer| customer.unsubscribed);
        let last = world
            .retently
            .outbox
            .iter()
            .filter(|survey| survey.campaign_id == campaign.id && survey.customer_id == customer_id)
            .map(|survey| survey.sent)
            .max();
        let outcome = if unsubscribed {
            json!({"status": "unsubscribed", "customerId": customer_id})
        } else if let Some(last) =
            last.filter(|last| throttle > 0 && now - *last < Duration::days(i64::from(throttle)))
        {
            json!({
                "status": "throttled",
                "customerId": customer_id,
                "lastSurveyedDate": iso(last),
                "throttleDays": throttle,
            })
        } else {
            let index =
                crate::seed::new_survey(&mut world, campaign_index, &customer_id, now, "campaign");
            let survey = &mut world.retently.outbox[index];
            survey.sent = send_at;
            scheduled.push(input.email.clone());
            json!({
                "status": "scheduled",
                "surveyId": survey.survey_id,
                "customerId": customer_id,
                "scheduledDate": iso(send_at),
            })
        };
        outcomes.push((input.email.clone(), outcome.clone()));
        data.insert(input.email_as_sent.clone(), outcome);
    }
    world.survey_sends.push(SurveySend {
        campaign_id: campaign.id.clone(),
        delay_days: u32::try_from(delay).unwrap_or(u32::MAX),
        recipients,
        scheduled,
        received_at: now,
    });
    Ok(success(Value::Object(data)))
}
