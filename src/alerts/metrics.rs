//! The per-rule counters of alerting (`cxgw.alerts`) and the reload counter of the rules file.

use opentelemetry::KeyValue;

/// The `outcome` label of `cxgw.alerts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertOutcomeLabel {
    Matched,
    RateLimited,
    Sent,
    Failed,
}

impl AlertOutcomeLabel {
    pub const ALL: [AlertOutcomeLabel; 4] = [
        AlertOutcomeLabel::Matched,
        AlertOutcomeLabel::RateLimited,
        AlertOutcomeLabel::Sent,
        AlertOutcomeLabel::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            AlertOutcomeLabel::Matched => "matched",
            AlertOutcomeLabel::RateLimited => "rate_limited",
            AlertOutcomeLabel::Sent => "sent",
            AlertOutcomeLabel::Failed => "failed",
        }
    }
}

pub fn count(rule: &str, outcome: AlertOutcomeLabel) {
    add(rule, outcome, 1);
}

/// Adds zero to every series of `rule`, so rates and alerts on them have a series from the start.
pub fn register_rule(rule: &str) {
    for outcome in AlertOutcomeLabel::ALL {
        add(rule, outcome, 0);
    }
}

fn add(rule: &str, outcome: AlertOutcomeLabel, value: u64) {
    crate::telemetry::metrics().alerts.add(
        value,
        &[
            KeyValue::new("rule", rule.to_owned()),
            KeyValue::new("outcome", outcome.as_str()),
        ],
    );
}

/// Counts a reload of the rules file: `replaced` or `rejected`.
pub fn count_reload(rejected: bool) {
    crate::telemetry::metrics().alert_rule_reloads.add(
        1,
        &[KeyValue::new(
            "outcome",
            if rejected { "rejected" } else { "replaced" },
        )],
    );
}
