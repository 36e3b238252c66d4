//! The protobuf side of event rules and the survey cool-down: running the rules of a tracked
//! event, and converting rules, decisions and throttles to the contract's messages.

use std::time::Duration;

use crate::app::App;
use crate::convert::timestamp_from_ms;
use crate::domain::fatigue::{self, Guarded, Limits, Throttle, ThrottleSource};
use crate::error::Violations;
use crate::grpc::convert::recipient_outcome;
use crate::pb;
use crate::rules::{Attributes, Decision, Recorded, Rule, RuleSource};
use crate::upstream::CallContext;
use crate::upstream::retently::SurveyRequest;

/// Traits one event may carry for the filters.
const MAX_TRAITS: usize = 100;
/// Longest cool-down a SendSurvey may ask for.
const MAX_REQUEST_COOLDOWN_SECONDS: i64 = 365 * 24 * 3600;

pub fn throttle_to_pb(throttle: &Throttle) -> pb::Throttle {
    pb::Throttle {
        source: match throttle.source {
            ThrottleSource::SurveyCooldown => pb::ThrottleSource::SurveyCooldown,
            ThrottleSource::EventRule => pb::ThrottleSource::EventRule,
        } as i32,
        eligible_at: Some(timestamp_from_ms(throttle.eligible_at_ms)),
    }
}

/// The result of a recipient the guard held back.
pub fn throttled_result(index: usize, email: &str, throttle: &Throttle) -> pb::RecipientResult {
    pb::RecipientResult {
        index: i32::try_from(index).unwrap_or(i32::MAX),
        email: email.to_owned(),
        outcome: pb::RecipientOutcome::Throttled as i32,
        error: None,
        throttle: Some(throttle_to_pb(throttle)),
    }
}

fn duration_to_pb(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

pub fn rule_to_pb(rule: &Rule) -> pb::EventRule {
    pb::EventRule {
        rule_id: rule.id.clone(),
        source: match rule.source {
            RuleSource::File => pb::RuleSource::File,
            RuleSource::Environment => pb::RuleSource::Environment,
        } as i32,
        events: rule.events.clone(),
        campaign_id: rule.campaign_id.clone(),
        audience: rule
            .audience
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        sample_percent: rule.sample_percent,
        delay_days: rule.delay_days.and_then(|d| i32::try_from(d).ok()),
        throttle_days: rule.throttle_days.and_then(|d| i32::try_from(d).ok()),
        survey_cooldown: rule.cooldown.map(duration_to_pb),
    }
}

/// Checks `Event.traits` (`prefix` is the event's field path).
pub fn check_traits(v: &mut Violations, prefix: &str, event: &pb::Event) {
    if let Some(traits) = &event.traits {
        v.check(
            traits.fields.len() <= MAX_TRAITS,
            format!("{prefix}.traits"),
            "at most 100 fields",
        );
    }
}

/// Checks `SendSurveyRequest.survey_cooldown`.
pub fn check_cooldown(v: &mut Violations, request: &pb::SendSurveyRequest) {
    if let Some(cooldown) = &request.survey_cooldown {
        v.check(
            cooldown.nanos == 0 && (0..=MAX_REQUEST_COOLDOWN_SECONDS).contains(&cooldown.seconds),
            "survey_cooldown",
            "must be whole seconds between 0 and 365 days",
        );
    }
}

/// The guard's limits for a validated SendSurvey.
pub fn send_survey_limits(app: &App, request: &pb::SendSurveyRequest) -> Limits {
    let requested = request
        .survey_cooldown
        .as_ref()
        .map(|d| Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0)));
    Limits {
        cooldown: Limits::resolve(app.config.survey_cooldown, requested),
        rule: None,
        origin: None,
    }
}

fn skipped(rule: &Rule, decision: pb::RuleDecision) -> pb::TriggeredSurvey {
    pb::TriggeredSurvey {
        campaign_id: rule.campaign_id.clone(),
        outcome: pb::RecipientOutcome::Unspecified as i32,
        error: None,
        rule_id: rule.id.clone(),
        decision: decision as i32,
        throttle: None,
    }
}

/// Runs every rule naming the event, in rule order, and answers each one's decision. Rules are
/// taken one after another (not concurrently) so that when several pass for one customer the
/// survey cool-down lets the first in rule order through, the same way every time.
pub async fn trigger_surveys(
    app: &App,
    ctx: &CallContext,
    event: &pb::Event,
) -> Vec<pb::TriggeredSurvey> {
    let rules = app.config.event_rules.current();
    let attributes = Attributes {
        properties: event.properties.as_ref(),
        traits: event.traits.as_ref(),
    };
    let recipient = crate::domain::writes::events::recipient_from_event(event);
    let mut triggered = Vec::new();
    for rule in rules.matching(&event.name) {
        crate::rules::record(rule, Recorded::Matched);
        match rule.decide(&event.customer_id, &event.message_id, &attributes) {
            Decision::FilteredOut => {
                crate::rules::record(rule, Recorded::FilteredOut);
                triggered.push(skipped(rule, pb::RuleDecision::FilteredOut));
                continue;
            }
            Decision::SampledOut => {
                crate::rules::record(rule, Recorded::SampledOut);
                triggered.push(skipped(rule, pb::RuleDecision::SampledOut));
                continue;
            }
            Decision::Send => {}
        }
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
            recipient: recipient.clone(),
        };
        let entry = match fatigue::send_one_guarded(app, ctx, request, &limits).await {
            Guarded::Throttled(throttle) => {
                crate::rules::record(rule, Recorded::Throttled);
                pb::TriggeredSurvey {
                    outcome: pb::RecipientOutcome::Throttled as i32,
                    decision: pb::RuleDecision::Throttled as i32,
                    throttle: Some(throttle_to_pb(&throttle)),
                    ..skipped(rule, pb::RuleDecision::Throttled)
                }
            }
            Guarded::Sent(result) => {
                let (outcome, error) = recipient_outcome(&result);
                let recorded = if result.is_ok() {
                    Recorded::Sent
                } else {
                    Recorded::Failed
                };
                crate::rules::record(rule, recorded);
                pb::TriggeredSurvey {
                    outcome: outcome as i32,
                    error,
                    ..skipped(rule, pb::RuleDecision::Sent)
                }
            }
        };
        triggered.push(entry);
    }
    triggered
}
