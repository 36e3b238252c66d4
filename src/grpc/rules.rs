//! The protobuf side of event rules and the survey cool-down: checking what they read, and
//! converting rules, decisions and throttles to the contract's messages (the rules run in the
//! write path, [`crate::domain::writes::events`]).

use std::time::Duration;

use crate::convert::timestamp_from_ms;
use crate::domain::fatigue::{Throttle, ThrottleSource};
use crate::domain::writes::events::{RuleOutcome, TriggeredSurvey};
use crate::error::Violations;
use crate::grpc::convert::recipient_outcome;
use crate::pb;
use crate::rules::{Rule, RuleSource};

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

/// One event rule's survey as the contract reports it.
pub fn triggered_survey_to_pb(triggered: TriggeredSurvey) -> pb::TriggeredSurvey {
    let entry = |decision: pb::RuleDecision| pb::TriggeredSurvey {
        campaign_id: triggered.campaign_id.clone(),
        outcome: pb::RecipientOutcome::Unspecified as i32,
        error: None,
        rule_id: triggered.rule_id.clone(),
        decision: decision as i32,
        throttle: None,
    };
    match &triggered.outcome {
        RuleOutcome::FilteredOut => entry(pb::RuleDecision::FilteredOut),
        RuleOutcome::SampledOut => entry(pb::RuleDecision::SampledOut),
        RuleOutcome::Throttled(throttle) => pb::TriggeredSurvey {
            outcome: pb::RecipientOutcome::Throttled as i32,
            throttle: Some(throttle_to_pb(throttle)),
            ..entry(pb::RuleDecision::Throttled)
        },
        RuleOutcome::Sent(outcome) => {
            let (outcome, error, throttle) = recipient_outcome(outcome);
            pb::TriggeredSurvey {
                outcome: outcome as i32,
                error,
                throttle,
                ..entry(pb::RuleDecision::Sent)
            }
        }
    }
}

impl From<Vec<TriggeredSurvey>> for pb::TrackEventResponse {
    fn from(triggered: Vec<TriggeredSurvey>) -> Self {
        pb::TrackEventResponse {
            delivery_id: String::new(),
            duplicate: false,
            triggered_surveys: triggered.into_iter().map(triggered_survey_to_pb).collect(),
        }
    }
}
