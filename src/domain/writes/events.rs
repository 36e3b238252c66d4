//! The execution of EventService's writes: the event to Retainly, then the Retently surveys its
//! name maps to. Shared by SYNC calls and the outbox worker.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::app::App;
use crate::convert::timestamp_to_ms;
use crate::error::Error;
use crate::grpc::convert::{json_value, recipient_outcome};
use crate::pb;
use crate::upstream::CallContext;
use crate::upstream::retainly::{RetainlyEvent, RetainlyId};
use crate::upstream::retently::{CustomerInput, PropertyInput, PropertyType, SurveyRequest};

/// The data key that carries `occur_time` (Retainly has no event time field).
pub const OCCURRED_AT: &str = "occurred_at";

/// Records the event at Retainly, then sends the surveys its name maps to. Shared by SYNC calls
/// and the outbox worker.
pub(crate) async fn execute_track_event(
    app: &App,
    request: pb::TrackEventRequest,
    ctx: CallContext,
) -> Result<pb::TrackEventResponse, Error> {
    let Some(event) = request.event else {
        return Err(Error::internal("a validated event is missing"));
    };
    let campaigns = app
        .config
        .event_mappings
        .get(&event.name)
        .cloned()
        .unwrap_or_default();
    // Retainly first: if recording the event fails, no survey is sent, so the call can be
    // repeated as a whole.
    app.retainly
        .track_event(&ctx, retainly_event(&event))
        .await?;

    let recipient = recipient_from_event(&event);
    let sends = campaigns.iter().map(|campaign_id| {
        app.retently.send_survey(
            &ctx,
            SurveyRequest {
                campaign_id: campaign_id.clone(),
                delay_days: None,
                recipient: recipient.clone(),
            },
        )
    });
    let results = futures_util::future::join_all(sends).await;
    let triggered_surveys = campaigns
        .into_iter()
        .zip(results)
        .map(|(campaign_id, result)| {
            let (outcome, error) = recipient_outcome(&result);
            pb::TriggeredSurvey {
                campaign_id,
                outcome: outcome as i32,
                error,
            }
        })
        .collect();
    Ok(pb::TrackEventResponse {
        delivery_id: String::new(),
        duplicate: false,
        triggered_surveys,
    })
}

/// The Retainly event a validated event becomes: its properties as the event data, plus
/// `occurred_at` when `occur_time` is set (Retainly has no event time field).
pub fn retainly_event(event: &pb::Event) -> RetainlyEvent {
    let mut data: Map<String, Value> = event
        .properties
        .as_ref()
        .map(|properties| {
            properties
                .fields
                .iter()
                .map(|(key, value)| (key.clone(), json_value(value)))
                .collect()
        })
        .unwrap_or_default();
    if let Some(time) = &event.occur_time {
        let occurred = chrono::DateTime::from_timestamp_millis(timestamp_to_ms(time))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        data.insert(OCCURRED_AT.to_owned(), Value::String(occurred));
    }
    RetainlyEvent {
        customer_id: RetainlyId::Text(event.customer_id.clone()),
        event: event.name.clone(),
        data: (!data.is_empty()).then_some(data),
    }
}

/// The survey recipient an event describes, as Segment's Retently destination reads a track
/// event: names, company and tags from their usual keys, other top-level scalars as properties.
pub fn recipient_from_event(event: &pb::Event) -> CustomerInput {
    use prost_types::value::Kind;
    let fields: BTreeMap<&str, &prost_types::Value> = event
        .properties
        .as_ref()
        .map(|p| p.fields.iter().map(|(k, v)| (k.as_str(), v)).collect())
        .unwrap_or_default();
    let text = |keys: &[&str]| {
        keys.iter()
            .find_map(|key| match fields.get(key).and_then(|v| v.kind.as_ref()) {
                Some(Kind::StringValue(text)) if !text.is_empty() => Some(text.clone()),
                _ => None,
            })
    };
    let standard = [
        "first_name",
        "firstName",
        "last_name",
        "lastName",
        "company",
        "companyName",
        "tags",
    ];
    let tags = match fields.get("tags").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(text)) => Some(
            text.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        Some(Kind::ListValue(list)) => Some(
            list.values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(Kind::StringValue(t)) if !t.is_empty() => Some(t.clone()),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    };
    let properties = fields
        .iter()
        .filter(|(key, _)| !standard.contains(key))
        .filter_map(|(key, value)| {
            let (kind, text) = match value.kind.as_ref()? {
                Kind::StringValue(text) => (PropertyType::String, text.clone()),
                Kind::BoolValue(flag) => (PropertyType::Boolean, flag.to_string()),
                Kind::NumberValue(number) if number.fract() == 0.0 && number.abs() < 9.0e15 => {
                    (PropertyType::Integer, format!("{number:.0}"))
                }
                Kind::NumberValue(number) => (PropertyType::String, number.to_string()),
                _ => return None,
            };
            Some(PropertyInput {
                label: (*key).to_owned(),
                kind: Some(kind),
                value: Some(text),
            })
        })
        .collect();
    CustomerInput {
        email: event.email.clone(),
        first_name: text(&["first_name", "firstName"]),
        last_name: text(&["last_name", "lastName"]),
        company: text(&["company", "companyName"]),
        tags,
        properties,
        ..CustomerInput::default()
    }
}
