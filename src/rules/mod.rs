//! Event rules: which tracked events send which Retently survey, to whom, how often.
//!
//! Rules come from a TOML file (`CXGW_EVENT_RULES_FILE`) and from the simple form
//! `CXGW_EVENT_MAPPINGS` (`event=campaign,...`), which becomes one unfiltered rule per event and
//! campaign. Both are in force together, the file's rules first; an environment mapping of an
//! event and campaign that a file rule also covers is dropped, so the file's rule (with its
//! audience and limits) decides alone.
//!
//! A rule decides in a fixed order: audience filter, sample, then (at send time, in
//! [`crate::domain::fatigue`]) its own throttle and the survey cool-down across campaigns.
//!
//! The file is reloaded on change and on SIGHUP by [`crate::reload`]; a file that fails
//! validation is refused whole (logged, counted, shown by ListEventMappings) and the rules in
//! force stay.

pub mod filter;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use serde::Deserialize;

use crate::config::{EventMappings, valid_name};

pub use filter::{Attributes, Filter};

/// Rules in one file at most; more is a generated file gone wrong.
const MAX_RULES: usize = 1000;
/// Event names one rule may list.
const MAX_EVENTS_PER_RULE: usize = 50;
/// Retainly's (and so the gateway's) event name limit.
const MAX_EVENT_NAME: usize = 50;
/// Longest delay Retently accepts, in days.
const MAX_DELAY_DAYS: u32 = 365;
/// Longest rule throttle, in days (ten years: "once per customer" in practice).
const MAX_THROTTLE_DAYS: u32 = 3650;
/// Longest survey cool-down a rule may set.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(365 * 24 * 3600);
/// Sampling resolution: a percentage is decided to four decimal places.
const SAMPLE_BUCKETS: u64 = 1_000_000;

/// Where a rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSource {
    File,
    Environment,
}

/// One rule in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub source: RuleSource,
    pub events: Vec<String>,
    pub campaign_id: String,
    /// `None`: everyone.
    pub audience: Option<Filter>,
    /// 0..=100.
    pub sample_percent: f64,
    pub delay_days: Option<u32>,
    pub throttle_days: Option<u32>,
    /// Overrides `CXGW_SURVEY_COOLDOWN` for this rule's sends; `Some(ZERO)` switches the guard
    /// off for them.
    pub cooldown: Option<Duration>,
}

/// What a rule decided before any send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    FilteredOut,
    SampledOut,
    /// Passed audience and sample; the throttles decide at send time.
    Send,
}

impl Rule {
    /// The audience filter, then the sample.
    pub fn decide(
        &self,
        customer_id: &str,
        message_id: &str,
        attributes: &Attributes<'_>,
    ) -> Decision {
        if let Some(audience) = &self.audience
            && !audience.matches(attributes)
        {
            return Decision::FilteredOut;
        }
        if !self.sampled_in(customer_id, message_id) {
            return Decision::SampledOut;
        }
        Decision::Send
    }

    /// Whether the sample takes this event: a SHA-256 of the rule, the customer and the event's
    /// message id picks a bucket, so the same event retried decides the same on every replica
    /// and after every restart, while different rules sample independently. An event without a
    /// message id is decided by the customer alone (always the same for that customer).
    pub fn sampled_in(&self, customer_id: &str, message_id: &str) -> bool {
        if self.sample_percent >= 100.0 {
            return true;
        }
        if self.sample_percent <= 0.0 {
            return false;
        }
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [self.id.as_str(), customer_id, message_id] {
            context.update(part.as_bytes());
            // A separator no id contains, so ("ab", "c") and ("a", "bc") differ.
            context.update(&[0]);
        }
        let digest = context.finish();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        let bucket = u64::from_be_bytes(first) % SAMPLE_BUCKETS;
        // Percent to buckets: 20% takes buckets 0..200,000.
        let taken = (self.sample_percent * (SAMPLE_BUCKETS as f64 / 100.0)).round() as u64;
        bucket < taken
    }
}

/// The rules in force, with where they came from.
#[derive(Debug, Clone)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// A digest of the rules file and the environment mappings.
    pub version: String,
    pub loaded_at: DateTime<Utc>,
}

impl RuleSet {
    /// The rules an event of this name triggers, in rule order.
    pub fn matching<'a>(&'a self, event: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules
            .iter()
            .filter(move |rule| rule.events.iter().any(|name| name == event))
    }

    /// Each event name and the campaigns its rules may send, in rule order (what validation
    /// and the mapping list need).
    pub fn mappings(&self) -> EventMappings {
        let mut mappings = EventMappings::new();
        for rule in &self.rules {
            for event in &rule.events {
                let campaigns = mappings.entry(event.clone()).or_default();
                if !campaigns.contains(&rule.campaign_id) {
                    campaigns.push(rule.campaign_id.clone());
                }
            }
        }
        mappings
    }
}

/// A rule as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    events: Vec<String>,
    campaign: String,
    audience: Option<filter::RawFilter>,
    sample_percent: Option<f64>,
    delay_days: Option<u32>,
    throttle_days: Option<u32>,
    /// A duration like `14d` or `72h`; `0s` switches the cool-down off for this rule.
    cooldown: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<RawRule>,
}

/// Parses and validates a rules file; the first problem found is the error.
pub fn parse_file(text: &str) -> Result<Vec<Rule>, String> {
    let raw: RawFile =
        toml::from_str(text).map_err(|error| format!("not a valid rules file: {error}"))?;
    if raw.rule.len() > MAX_RULES {
        return Err(format!(
            "at most {MAX_RULES} rules, found {}",
            raw.rule.len()
        ));
    }
    let mut ids = HashSet::new();
    raw.rule
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            let at = format!("rule[{index}]");
            if !valid_name(&raw.id) {
                return Err(format!(
                    "{at}.id: must be 1 to 64 ASCII letters, digits, `-`, `_` or `.`"
                ));
            }
            let at = format!("rule[{index}] ({})", raw.id);
            if !ids.insert(raw.id.clone()) {
                return Err(format!("{at}.id: another rule has this id"));
            }
            if raw.events.is_empty() || raw.events.len() > MAX_EVENTS_PER_RULE {
                return Err(format!(
                    "{at}.events: must list 1 to {MAX_EVENTS_PER_RULE} event names"
                ));
            }
            for event in &raw.events {
                if event.is_empty() || event.chars().count() > MAX_EVENT_NAME {
                    return Err(format!(
                        "{at}.events: `{event}` must be 1 to {MAX_EVENT_NAME} characters"
                    ));
                }
            }
            if !(1..=64).contains(&raw.campaign.len())
                || !raw
                    .campaign
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
            {
                return Err(format!(
                    "{at}.campaign: must be 1 to 64 ASCII letters, digits, `-` or `_`"
                ));
            }
            let sample_percent = raw.sample_percent.unwrap_or(100.0);
            if !(0.0..=100.0).contains(&sample_percent) {
                return Err(format!("{at}.sample_percent: must be between 0 and 100"));
            }
            if raw.delay_days.is_some_and(|d| d > MAX_DELAY_DAYS) {
                return Err(format!("{at}.delay_days: at most {MAX_DELAY_DAYS}"));
            }
            if raw
                .throttle_days
                .is_some_and(|d| d == 0 || d > MAX_THROTTLE_DAYS)
            {
                return Err(format!(
                    "{at}.throttle_days: must be 1 to {MAX_THROTTLE_DAYS}"
                ));
            }
            let cooldown = match &raw.cooldown {
                None => None,
                Some(text) => {
                    let cooldown = humantime::parse_duration(text.trim()).map_err(|error| {
                        format!(
                            "{at}.cooldown: `{text}` is not a duration like 14d or 72h: {error}"
                        )
                    })?;
                    if cooldown > MAX_COOLDOWN {
                        return Err(format!("{at}.cooldown: at most 365 days"));
                    }
                    Some(cooldown)
                }
            };
            let audience = raw
                .audience
                .map(|audience| audience.check(&format!("{at}.audience")))
                .transpose()?;
            Ok(Rule {
                id: raw.id,
                source: RuleSource::File,
                events: raw.events,
                campaign_id: raw.campaign,
                audience,
                sample_percent,
                delay_days: raw.delay_days,
                throttle_days: raw.throttle_days,
                cooldown,
            })
        })
        .collect()
}

/// The file's rules, then one rule per environment mapping not covered by them.
fn combine(mut rules: Vec<Rule>, environment: &EventMappings) -> Vec<Rule> {
    let covered: HashSet<(String, String)> = rules
        .iter()
        .flat_map(|rule| {
            rule.events
                .iter()
                .map(|event| (event.clone(), rule.campaign_id.clone()))
        })
        .collect();
    for (event, campaigns) in environment {
        for campaign in campaigns {
            if covered.contains(&(event.clone(), campaign.clone())) {
                continue;
            }
            rules.push(Rule {
                id: format!("env:{event}:{campaign}"),
                source: RuleSource::Environment,
                events: vec![event.clone()],
                campaign_id: campaign.clone(),
                audience: None,
                sample_percent: 100.0,
                delay_days: None,
                throttle_days: None,
                cooldown: None,
            });
        }
    }
    rules
}

fn version(file: Option<&[u8]>, environment: &EventMappings) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(file.unwrap_or_default());
    context.update(&[0]);
    for (event, campaigns) in environment {
        context.update(event.as_bytes());
        context.update(b"=");
        context.update(campaigns.join(",").as_bytes());
        context.update(b";");
    }
    context
        .finish()
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    Replaced { rules: usize },
    Unchanged,
}

struct State {
    current: Arc<RuleSet>,
    /// The file's bytes at the last read (taken or refused), so an unchanged file is neither
    /// parsed nor counted again at every poll.
    last_read: Option<Vec<u8>>,
    /// Why the last read was refused; `None` when it was taken.
    refused: Option<String>,
}

/// The rules in force, swapped whole by a reload; cheap to read on every event.
pub struct EventRules {
    file: Option<PathBuf>,
    environment: EventMappings,
    state: RwLock<State>,
}

impl std::fmt::Debug for EventRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRules")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
}

fn build(bytes: Option<&[u8]>, environment: &EventMappings) -> Result<RuleSet, String> {
    let file_rules = match bytes {
        None => Vec::new(),
        Some(bytes) => {
            let text =
                std::str::from_utf8(bytes).map_err(|_| "the rules file is not UTF-8".to_owned())?;
            parse_file(text)?
        }
    };
    Ok(RuleSet {
        rules: combine(file_rules, environment),
        version: version(bytes, environment),
        loaded_at: Utc::now(),
    })
}

impl EventRules {
    /// Loads the rules at start: a rules file that cannot be read or fails validation stops the
    /// gateway (there are no last good rules yet).
    pub fn load(file: Option<PathBuf>, environment: EventMappings) -> Result<EventRules, String> {
        let bytes = file.as_deref().map(read).transpose()?;
        let set = build(bytes.as_deref(), &environment)?;
        Ok(EventRules {
            file,
            environment,
            state: RwLock::new(State {
                current: Arc::new(set),
                last_read: bytes,
                refused: None,
            }),
        })
    }

    /// Rules from the environment mappings only (no file).
    pub fn from_mappings(environment: EventMappings) -> EventRules {
        let set = RuleSet {
            rules: combine(Vec::new(), &environment),
            version: version(None, &environment),
            loaded_at: Utc::now(),
        };
        EventRules {
            file: None,
            environment,
            state: RwLock::new(State {
                current: Arc::new(set),
                last_read: None,
                refused: None,
            }),
        }
    }

    pub fn current(&self) -> Arc<RuleSet> {
        Arc::clone(
            &self
                .state
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .current,
        )
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Why the rules file was last refused, while it still is.
    pub fn refused(&self) -> Option<String> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .refused
            .clone()
    }

    /// Reads the file again and puts its rules in force if it changed and is valid; a refused
    /// file leaves the rules in force and is counted once per distinct content.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let Some(path) = &self.file else {
            return Ok(Reloaded::Unchanged);
        };
        let bytes = read(path);
        if let Ok(bytes) = &bytes {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            if state.last_read.as_ref() == Some(bytes) {
                return match &state.refused {
                    Some(reason) => Err(reason.clone()),
                    None => Ok(Reloaded::Unchanged),
                };
            }
        }
        // Parsed outside the lock: events keep reading the rules in force meanwhile. Reloads
        // come from one task, so no other reload runs between this read and the write below.
        let built = bytes.map(|bytes| {
            let set = build(Some(&bytes), &self.environment);
            (bytes, set)
        });
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let built = built.and_then(|(bytes, set)| {
            state.last_read = Some(bytes);
            set
        });
        match built {
            Ok(set) => {
                let rules = set.rules.len();
                state.current = Arc::new(set);
                state.refused = None;
                reloads().add(1, &[KeyValue::new("outcome", "replaced")]);
                Ok(Reloaded::Replaced { rules })
            }
            Err(reason) => {
                if state.refused.as_ref() != Some(&reason) {
                    reloads().add(1, &[KeyValue::new("outcome", "refused")]);
                }
                state.refused = Some(reason.clone());
                Err(reason)
            }
        }
    }
}

/// What each rule decided, for the counter and the span event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Matched,
    FilteredOut,
    SampledOut,
    Throttled,
    Sent,
    /// The send was attempted and failed (or its outcome is unknown).
    Failed,
}

impl Recorded {
    pub fn as_str(self) -> &'static str {
        match self {
            Recorded::Matched => "matched",
            Recorded::FilteredOut => "filtered_out",
            Recorded::SampledOut => "sampled_out",
            Recorded::Throttled => "throttled",
            Recorded::Sent => "sent",
            Recorded::Failed => "failed",
        }
    }
}

/// Records one decision of `rule`: a counter by rule and decision (rule ids come from the
/// configuration, so the label is bounded) and an `event_rule.decision` event on the current
/// span (the RPC's, or the outbox delivery's).
pub fn record(rule: &Rule, decision: Recorded) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    decisions().add(
        1,
        &[
            KeyValue::new("rule", rule.id.clone()),
            KeyValue::new("decision", decision.as_str()),
        ],
    );
    tracing::Span::current().add_event(
        "event_rule.decision",
        vec![
            KeyValue::new("event_rule.id", rule.id.clone()),
            KeyValue::new("event_rule.campaign_id", rule.campaign_id.clone()),
            KeyValue::new("event_rule.decision", decision.as_str()),
        ],
    );
    tracing::debug!(
        rule = %rule.id,
        campaign_id = %rule.campaign_id,
        decision = decision.as_str(),
        "event rule decided"
    );
}

/// The counter `cell` holds, made on first use with `name` and `description`.
fn counter(
    cell: &'static OnceLock<Counter<u64>>,
    name: &'static str,
    description: &'static str,
) -> &'static Counter<u64> {
    cell.get_or_init(|| {
        crate::telemetry::metrics::metrics()
            .meter()
            .u64_counter(name)
            .with_description(description)
            .build()
    })
}

fn decisions() -> &'static Counter<u64> {
    static COUNTER: OnceLock<Counter<u64>> = OnceLock::new();
    counter(
        &COUNTER,
        "cxgw.rules.decisions",
        "Event rule decisions by rule and decision: matched (the event name matched), \
         filtered_out, sampled_out, throttled (rule throttle or survey cool-down), sent, \
         failed (the send failed or its outcome is unknown)",
    )
}

fn reloads() -> &'static Counter<u64> {
    static COUNTER: OnceLock<Counter<u64>> = OnceLock::new();
    counter(
        &COUNTER,
        "cxgw.rules.reloads",
        "Reloads of the event rules file by outcome: replaced (new rules in force), \
         refused (the file failed validation; the previous rules stay)",
    )
}

#[cfg(test)]
mod tests;
