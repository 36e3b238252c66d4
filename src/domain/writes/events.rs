//! The execution of EventService's writes: the event to Retainly, then the Retently surveys its
//! event rules send. Shared by SYNC calls and the outbox worker.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::surveys::{RecipientOutcome, recipient_outcome};
use crate::app::App;
use crate::convert::json_value;
use crate::domain::fatigue::{self, Guarded, Limits, Throttle};
use crate::error::Error;
use crate::rules::{Attributes, Decision, Recorded, Rule};
use crate::upstream::CallContext;
use crate::upstream::retainly::{RetainlyEvent, RetainlyId};
use crate::upstream::retently::{CustomerInput, PropertyInput, PropertyType, SurveyRequest};

/// The data key that carries `occur_time` (Retainly has no event time field).
pub const OCCURRED_AT: &str = "occurred_at";

/// A customer event, as validation accepted it (email normalised). Its properties and traits
/// stay `google.protobuf.Struct` values: the event rules' filters read them in that form, the
/// same for the gRPC and Segment intakes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub customer_id: String,
    /// Empty when not given (then no survey can be sent).
    pub email: String,
    pub name: String,
    pub properties: Option<prost_types::Struct>,
    /// When the event happened, in Unix milliseconds; `None` when not given.
    pub occurred_at_ms: Option<i64>,
    /// The caller's deduplication id (empty when not given); rules sample by it.
    pub message_id: String,
    pub traits: Option<prost_types::Struct>,
}

/// What one event rule naming the event came to.
#[derive(Debug, Clone)]
pub enum RuleOutcome {
    /// The rule's audience filter left the customer out.
    FilteredOut,
    /// The rule's sample left the customer out.
    SampledOut,
    /// The survey cool-down or the rule's own throttle held the survey back.
    Throttled(Throttle),
    /// The survey was sent; what Retently made of it.
    Sent(RecipientOutcome),
}

/// One event rule's survey: the rule, its campaign and what came of it.
#[derive(Debug, Clone)]
pub struct TriggeredSurvey {
    pub rule_id: String,
    pub campaign_id: String,
    pub outcome: RuleOutcome,
}

/// Records the event at Retainly, then sends the surveys its name maps to. Shared by SYNC calls
/// and the outbox worker. `None` is a request without its event, which validation refuses.
pub(crate) async fn track_event(
    app: &App,
    event: Option<Event>,
    ctx: CallContext,
) -> Result<Vec<TriggeredSurvey>, Error> {
    let Some(event) = event else {
        return Err(Error::internal("a validated event is missing"));
    };
    // Retainly first: if recording the event fails, no survey is sent, so the call can be
    // repeated as a whole.
    app.retainly
        .track_event(&ctx, retainly_event(&event))
        .await?;
    Ok(trigger_surveys(app, &ctx, &event).await)
}

/// Runs every rule naming the event, in rule order, and answers each one's decision. Rules are
/// taken one after another (not concurrently) so that when several pass for one customer the
/// survey cool-down lets the first in rule order through, the same way every time.
pub async fn trigger_surveys(app: &App, ctx: &CallContext, event: &Event) -> Vec<TriggeredSurvey> {
    let rules = app.config.event_rules.current();
    let attributes = Attributes {
        properties: event.properties.as_ref(),
        traits: event.traits.as_ref(),
    };
    let recipient = recipient_from_event(event);
    let mut triggered = Vec::new();
    for rule in rules.matching(&event.name) {
        crate::rules::record(rule, Recorded::Matched);
        let outcome = match rule.decide(&event.customer_id, &event.message_id, &attributes) {
            Decision::FilteredOut => {
                crate::rules::record(rule, Recorded::FilteredOut);
                RuleOutcome::FilteredOut
            }
            Decision::SampledOut => {
                crate::rules::record(rule, Recorded::SampledOut);
                RuleOutcome::SampledOut
            }
            Decision::Send => send_for_rule(app, ctx, rule, recipient.clone()).await,
        };
        triggered.push(TriggeredSurvey {
            rule_id: rule.id.clone(),
            campaign_id: rule.campaign_id.clone(),
            outcome,
        });
    }
    triggered
}

/// The survey of one rule that passed, through the cool-down and the rule's throttle.
async fn send_for_rule(
    app: &App,
    ctx: &CallContext,
    rule: &Rule,
    recipient: CustomerInput,
) -> RuleOutcome {
    let limits = Limits {
        cooldown: Limits::resolve(app.config.survey_cooldown, rule.cooldown),
        rule: rule
            .throttle_days
            .map(|days| (rule.id.clone(), fatigue::days(days))),
        origin: Some(rule.id.clone()),
    };
    let request = SurveyRequest {
        campaign_id: rule.campaign_id.clone(),
        delay_days: rule.delay_days,
        recipient,
    };
    match fatigue::send_one_guarded(app, ctx, request, &limits).await {
        Guarded::Throttled(throttle) => {
            crate::rules::record(rule, Recorded::Throttled);
            RuleOutcome::Throttled(throttle)
        }
        Guarded::Sent(result) => {
            let recorded = if result.is_ok() {
                Recorded::Sent
            } else {
                Recorded::Failed
            };
            crate::rules::record(rule, recorded);
            RuleOutcome::Sent(recipient_outcome(result))
        }
    }
}

/// The Retainly event a validated event becomes: its properties as the event data, plus
/// `occurred_at` when `occur_time` is set (Retainly has no event time field).
pub fn retainly_event(event: &Event) -> RetainlyEvent {
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
    if let Some(ms) = event.occurred_at_ms {
        let occurred = chrono::DateTime::from_timestamp_millis(ms)
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
pub fn recipient_from_event(event: &Event) -> CustomerInput {
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
