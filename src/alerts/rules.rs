//! The alert rules file (`CXGW_ALERT_RULES_FILE`): what a rule matches and where it sends.
//!
//! ```toml
//! [[rule]]
//! name = "nps-detractors"               # 1..64 of a-z A-Z 0-9 - _ . ; part of every alert's key
//! on = ["created"]                       # created and/or updated responses (default: created)
//! metrics = ["NPS"]                      # NPS, CSAT, CES, STAR (default: any)
//! categories = ["detractor"]             # promoter, passive, detractor (default: any)
//! score_min = 0                          # inclusive bounds on the score (default: none)
//! score_max = 6
//! campaigns = ["5f…"]                    # Retently campaign ids (default: any)
//! tags = ["churn-risk"]                  # any of these on the response or the customer
//! comment = "present"                    # present or absent (default: either)
//! comment_contains = ["cancel", "refund"] # any of these words, case-insensitive
//! customer_properties = { plan = "enterprise" } # every one must hold
//! format = "signed-json"                 # signed-json or slack
//! url = "https://alerts.internal/hook"   # or url_file = "/etc/cx/slack-url" (a Slack URL is a secret)
//! secret_file = "/etc/cx/alert-secret"   # HMAC-SHA256 key of signed-json
//! rate_limit = { count = 10, per = "1h" } # at most 10 alerts of this rule per hour
//! ```
//!
//! Every condition given must hold. The file is read whole: a file that does not parse, names a
//! rule twice or points at a secret file that cannot be read is refused as a whole and the rules
//! in force stay (see [`RuleSet::reload`]). Secrets and URLs are read when the file is loaded and
//! are never logged or stored with the deliveries: a delivery names its rule, and the rule in
//! force when it is sent says where and how.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use crate::config::{Secret, valid_name};
use crate::feedback::filter::score_in_range;
use crate::pb;
use crate::swapped::Swapped;

/// Which log entries a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A response the gateway sees for the first time.
    Created,
    /// A changed version of a known response.
    Updated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommentCondition {
    Present,
    Absent,
}

/// How an alert is put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The alert as JSON, signed with HMAC-SHA256 over the timestamp and the body (`Cx-Signature`).
    SignedJson,
    /// A Slack incoming-webhook message (text and blocks).
    Slack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

/// A rule as the file spells it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default)]
    on: Option<Vec<EventKind>>,
    #[serde(default)]
    metrics: Vec<String>,
    #[serde(default)]
    categories: Vec<String>,
    score_min: Option<f64>,
    score_max: Option<f64>,
    #[serde(default)]
    campaigns: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    comment: Option<CommentCondition>,
    #[serde(default)]
    comment_contains: Vec<String>,
    #[serde(default)]
    customer_properties: BTreeMap<String, toml::Value>,
    format: Format,
    url: Option<String>,
    url_file: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    rate_limit: Option<RawRateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    count: u32,
    per: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<RawRule>,
}

/// One rule, validated.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    on: Vec<EventKind>,
    metrics: Vec<i32>,
    categories: Vec<i32>,
    score_min: Option<f64>,
    score_max: Option<f64>,
    campaigns: HashSet<String>,
    tags: Vec<String>,
    comment: Option<CommentCondition>,
    /// Lower-cased.
    comment_contains: Vec<String>,
    /// Property name and the value it must have, as text (see [`property_text`]).
    customer_properties: Vec<(String, String)>,
    pub format: Format,
    /// Where alerts go; may itself be a secret (a Slack webhook URL), so never logged.
    pub url: Secret,
    /// The HMAC key of [`Format::SignedJson`].
    pub secret: Option<Secret>,
    pub rate_limit: Option<RateLimit>,
}

impl Rule {
    /// Whether an entry of `kind` carrying `feedback` is an alert of this rule.
    pub fn matches(&self, kind: EventKind, feedback: &pb::Feedback) -> bool {
        if !self.on.contains(&kind) {
            return false;
        }
        if !self.metrics.is_empty() && !self.metrics.contains(&feedback.metric) {
            return false;
        }
        if !self.categories.is_empty() && !self.categories.contains(&feedback.score_category) {
            return false;
        }
        if !score_in_range(feedback.score, self.score_min, self.score_max) {
            return false;
        }
        if !self.campaigns.is_empty() && !self.campaigns.contains(&feedback.campaign_id) {
            return false;
        }
        if !self.tags.is_empty()
            && !self.tags.iter().any(|tag| {
                feedback.tags.iter().any(|t| t.eq_ignore_ascii_case(tag))
                    || feedback
                        .customer_tags
                        .iter()
                        .any(|t| t.eq_ignore_ascii_case(tag))
            })
        {
            return false;
        }
        let has_comment = !feedback.comment.trim().is_empty();
        match self.comment {
            Some(CommentCondition::Present) if !has_comment => return false,
            Some(CommentCondition::Absent) if has_comment => return false,
            _ => {}
        }
        if !self.comment_contains.is_empty() {
            let comment = feedback.comment.to_lowercase();
            if !self
                .comment_contains
                .iter()
                .any(|word| comment.contains(word.as_str()))
            {
                return false;
            }
        }
        self.customer_properties.iter().all(|(name, wanted)| {
            feedback
                .customer_properties
                .iter()
                .filter(|property| property.name == *name)
                .any(|property| property_holds(property, wanted))
        })
    }
}

/// Whether a customer property has the wanted value: equal text (case-insensitive), or for a
/// list, one item equal.
fn property_holds(property: &pb::Property, wanted: &str) -> bool {
    use pb::property_value::Kind;
    let Some(kind) = property
        .value
        .as_ref()
        .and_then(|value| value.kind.as_ref())
    else {
        return false;
    };
    match kind {
        Kind::StringValue(text) => text.eq_ignore_ascii_case(wanted),
        Kind::IntegerValue(number) => number.to_string() == wanted,
        Kind::NumberValue(number) => wanted.parse::<f64>().is_ok_and(|w| w == *number),
        Kind::BoolValue(flag) => flag.to_string() == wanted,
        Kind::StringListValue(list) => list.values.iter().any(|v| v.eq_ignore_ascii_case(wanted)),
        Kind::DateValue(_) | Kind::TimestampValue(_) => false,
    }
}

/// The text a rule compares a customer property with: TOML strings as they are, numbers and
/// booleans as written.
fn property_text(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(text) => Some(text.clone()),
        toml::Value::Integer(number) => Some(number.to_string()),
        toml::Value::Float(number) => Some(number.to_string()),
        toml::Value::Boolean(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn metric_number(name: &str) -> Option<i32> {
    Some(match name.to_ascii_uppercase().as_str() {
        "NPS" => pb::Metric::Nps as i32,
        "CSAT" => pb::Metric::Csat as i32,
        "CES" => pb::Metric::Ces as i32,
        "STAR" => pb::Metric::Star as i32,
        _ => return None,
    })
}

fn category_number(name: &str) -> Option<i32> {
    Some(match name.to_ascii_lowercase().as_str() {
        "promoter" => pb::ScoreCategory::Promoter as i32,
        "passive" => pb::ScoreCategory::Passive as i32,
        "detractor" => pb::ScoreCategory::Detractor as i32,
        _ => return None,
    })
}

/// The numbers `number` gives each of `names`; an unknown name is the rule's error, listing the
/// `known` ones.
fn numbers(
    rule: &str,
    names: &[String],
    number: fn(&str) -> Option<i32>,
    what: &str,
    known: &str,
) -> Result<Vec<i32>, String> {
    names
        .iter()
        .map(|name| {
            number(name).ok_or_else(|| format!("rule `{rule}`: unknown {what} `{name}` ({known})"))
        })
        .collect()
}

fn read_secret_file(rule: &str, field: &str, path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        format!(
            "rule `{rule}`: cannot read {field} `{}`: {error}",
            path.display()
        )
    })?;
    let value = text.trim();
    if value.is_empty() {
        return Err(format!(
            "rule `{rule}`: {field} `{}` is empty",
            path.display()
        ));
    }
    Ok(Secret::new(value))
}

impl Rule {
    fn from_raw(raw: RawRule) -> Result<Rule, String> {
        let name = raw.name;
        if !valid_name(&name) {
            return Err(format!(
                "rule `{name}`: a name is 1 to 64 of a-z, A-Z, 0-9, `-`, `_`, `.`"
            ));
        }
        let on = raw.on.unwrap_or_else(|| vec![EventKind::Created]);
        if on.is_empty() {
            return Err(format!(
                "rule `{name}`: `on` lists no event (created, updated)"
            ));
        }
        let metrics = numbers(
            &name,
            &raw.metrics,
            metric_number,
            "metric",
            "NPS, CSAT, CES, STAR",
        )?;
        let categories = numbers(
            &name,
            &raw.categories,
            category_number,
            "category",
            "promoter, passive, detractor",
        )?;
        if let (Some(min), Some(max)) = (raw.score_min, raw.score_max)
            && min > max
        {
            return Err(format!(
                "rule `{name}`: score_min {min} is above score_max {max}"
            ));
        }
        let customer_properties =
            raw.customer_properties
                .iter()
                .map(|(key, value)| {
                    property_text(value).map(|text| (key.clone(), text)).ok_or_else(|| {
                    format!(
                        "rule `{name}`: customer property `{key}` must be a string, number or \
                         boolean"
                    )
                })
                })
                .collect::<Result<Vec<_>, _>>()?;
        let url = match (raw.url, &raw.url_file) {
            (Some(url), None) => Secret::new(url),
            (None, Some(path)) => read_secret_file(&name, "url_file", path)?,
            _ => {
                return Err(format!(
                    "rule `{name}`: give exactly one of `url` and `url_file`"
                ));
            }
        };
        match Url::parse(url.expose()) {
            // The URL is not repeated: it may be a secret (a Slack webhook).
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
            _ => return Err(format!("rule `{name}`: the url is not an http(s) URL")),
        }
        let secret = match (raw.format, &raw.secret_file) {
            (Format::SignedJson, Some(path)) => Some(read_secret_file(&name, "secret_file", path)?),
            (Format::SignedJson, None) => {
                return Err(format!(
                    "rule `{name}`: format signed-json needs `secret_file`"
                ));
            }
            (Format::Slack, Some(_)) => {
                return Err(format!(
                    "rule `{name}`: format slack is not signed; remove `secret_file`"
                ));
            }
            (Format::Slack, None) => None,
        };
        let rate_limit = match raw.rate_limit {
            None => None,
            Some(limit) => {
                let per = humantime::parse_duration(&limit.per).map_err(|error| {
                    format!("rule `{name}`: rate_limit.per `{}`: {error}", limit.per)
                })?;
                if limit.count == 0 || per.is_zero() {
                    return Err(format!(
                        "rule `{name}`: rate_limit needs a count and a period above zero"
                    ));
                }
                Some(RateLimit {
                    count: limit.count,
                    per,
                })
            }
        };
        Ok(Rule {
            name,
            on,
            metrics,
            categories,
            score_min: raw.score_min,
            score_max: raw.score_max,
            campaigns: raw.campaigns.into_iter().collect(),
            tags: raw.tags,
            comment: raw.comment,
            comment_contains: raw
                .comment_contains
                .iter()
                .map(|word| word.to_lowercase())
                .collect(),
            customer_properties,
            format: raw.format,
            url,
            secret,
            rate_limit,
        })
    }
}

/// Every rule of one version of the file.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Arc<Rule>>,
}

impl Rules {
    /// Parses and validates the text of a rules file, reading the secret files it names. Errors
    /// name the rule and the field, and never contain a secret or a URL.
    pub fn parse(text: &str) -> Result<Rules, String> {
        let raw: RawFile = toml::from_str(text).map_err(|error| {
            // toml's message quotes the offending line, which may hold a URL: keep only the
            // position and the kind of problem.
            let position = error
                .span()
                .and_then(|span| text.get(..span.start))
                .map(|before| format!(" at line {}", before.matches('\n').count() + 1))
                .unwrap_or_default();
            format!(
                "the file is not a valid rules file{position}: {}",
                error.message()
            )
        })?;
        let mut names = HashSet::new();
        let mut rules = Vec::with_capacity(raw.rule.len());
        for raw in raw.rule {
            if !names.insert(raw.name.clone()) {
                return Err(format!("rule `{}` is defined twice", raw.name));
            }
            rules.push(Arc::new(Rule::from_raw(raw)?));
        }
        Ok(Rules { rules })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.rules.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Rule>> {
        self.rules.iter().find(|rule| rule.name == name)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    Unchanged,
    Replaced { rules: usize },
}

/// The rules in force, swapped whole on reload (an evaluation sees one version of the file). The
/// digest is over the file and the secret files it names, to skip reloads that change nothing.
#[derive(Clone)]
pub struct RuleSet {
    path: PathBuf,
    rules: Swapped<Rules>,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("path", &self.path)
            .field("rules", &self.current().len())
            .finish()
    }
}

/// Reads the file and its secret files; the digest covers all of them, so rotating a secret file
/// alone is a change too.
fn load(path: &Path) -> Result<(Rules, [u8; 32]), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read `{}`: {error}", path.display()))?;
    let rules = Rules::parse(&text)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(text.as_bytes());
    for rule in rules.iter() {
        context.update(&[0]);
        context.update(rule.url.expose().as_bytes());
        context.update(&[0]);
        if let Some(secret) = &rule.secret {
            context.update(secret.expose().as_bytes());
        }
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(context.finish().as_ref());
    Ok((rules, digest))
}

impl RuleSet {
    /// Loads the file; a start with a bad file is refused (unlike a reload).
    pub fn load(path: PathBuf) -> Result<RuleSet, String> {
        let (rules, digest) = load(&path)?;
        Ok(RuleSet {
            path,
            rules: Swapped::new(rules, digest),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rules in force.
    pub fn current(&self) -> Arc<Rules> {
        self.rules.current()
    }

    /// Reads the file again and swaps the rules in if anything changed. A file that does not load
    /// leaves the rules in force (a typo must not silence every alert); the caller logs and counts
    /// the refusal.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let (rules, digest) = load(&self.path)?;
        let count = rules.len();
        Ok(if self.rules.replace(rules, digest) {
            Reloaded::Replaced { rules: count }
        } else {
            Reloaded::Unchanged
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feedback(metric: pb::Metric, score: f64, comment: &str) -> pb::Feedback {
        let category = match (metric, score) {
            (pb::Metric::Nps, s) if s <= 6.0 => pb::ScoreCategory::Detractor,
            (pb::Metric::Nps, s) if s <= 8.0 => pb::ScoreCategory::Passive,
            _ => pb::ScoreCategory::Promoter,
        };
        pb::Feedback {
            feedback_id: "f1".into(),
            campaign_id: "c1".into(),
            metric: metric as i32,
            score: Some(score),
            score_category: category as i32,
            comment: comment.into(),
            tags: vec!["Churn-Risk".into()],
            customer_properties: vec![pb::Property {
                name: "plan".into(),
                value: Some(pb::PropertyValue {
                    kind: Some(pb::property_value::Kind::StringValue("Enterprise".into())),
                }),
                label: String::new(),
            }],
            ..Default::default()
        }
    }

    fn rules(body: &str) -> Rules {
        Rules::parse(&format!(
            "[[rule]]\nname = \"r\"\nformat = \"slack\"\nurl = \"http://127.0.0.1:1/x\"\n{body}"
        ))
        .unwrap()
    }

    #[test]
    fn every_condition_must_hold() {
        let rules = rules(
            "metrics = [\"nps\"]\ncategories = [\"detractor\"]\nscore_max = 6\n\
             campaigns = [\"c1\"]\ntags = [\"churn-risk\"]\ncomment = \"present\"\n\
             comment_contains = [\"CANCEL\"]\ncustomer_properties = { plan = \"enterprise\" }\n",
        );
        let rule = rules.get("r").unwrap();
        let detractor = feedback(pb::Metric::Nps, 3.0, "I will cancel");
        assert!(rule.matches(EventKind::Created, &detractor));
        // Updates are not matched unless asked for.
        assert!(!rule.matches(EventKind::Updated, &detractor));
        assert!(!rule.matches(
            EventKind::Created,
            &feedback(pb::Metric::Nps, 9.0, "cancel")
        ));
        assert!(!rule.matches(
            EventKind::Created,
            &feedback(pb::Metric::Csat, 1.0, "cancel")
        ));
        assert!(!rule.matches(EventKind::Created, &feedback(pb::Metric::Nps, 3.0, "fine")));
        let mut other_campaign = detractor.clone();
        other_campaign.campaign_id = "c2".into();
        assert!(!rule.matches(EventKind::Created, &other_campaign));
        let mut untagged = detractor.clone();
        untagged.tags.clear();
        assert!(!rule.matches(EventKind::Created, &untagged));
        let mut other_plan = detractor.clone();
        other_plan.customer_properties.clear();
        assert!(!rule.matches(EventKind::Created, &other_plan));
        let mut no_score = detractor;
        no_score.score = None;
        assert!(!rule.matches(EventKind::Created, &no_score));
    }

    #[test]
    fn updates_and_absent_comments_match_when_asked_for() {
        let rules = rules("on = [\"updated\"]\ncomment = \"absent\"\n");
        let rule = rules.get("r").unwrap();
        assert!(rule.matches(EventKind::Updated, &feedback(pb::Metric::Nps, 9.0, "")));
        assert!(!rule.matches(EventKind::Updated, &feedback(pb::Metric::Nps, 9.0, "hi")));
        assert!(!rule.matches(EventKind::Created, &feedback(pb::Metric::Nps, 9.0, "")));
    }

    #[test]
    fn bad_files_are_refused_with_the_rule_named_and_no_url_repeated() {
        let base = "format = \"slack\"\nurl = \"https://hooks.example/T0/B0/sekrit\"\n";
        for (body, expected) in [
            ("name = \"a b\"\n", "a name is"),
            ("name = \"r\"\nmetrics = [\"XYZ\"]\n", "unknown metric"),
            (
                "name = \"r\"\nscore_min = 7\nscore_max = 3\n",
                "above score_max",
            ),
            (
                "name = \"r\"\nrate_limit = { count = 0, per = \"1h\" }\n",
                "above zero",
            ),
            ("name = \"r\"\nsecret_file = \"/x\"\n", "not signed"),
            ("name = \"r\"\nbogus = 1\n", "not a valid rules file"),
        ] {
            let error = Rules::parse(&format!("[[rule]]\n{base}{body}")).unwrap_err();
            assert!(error.contains(expected), "{error}");
            assert!(!error.contains("sekrit"), "{error}");
        }
        let unknown = Rules::parse(&format!("[[rule]]\n{base}name = \"r\"\nbogus = 1\n"));
        assert!(
            unknown.unwrap_err().contains("at line 5"),
            "the line is named"
        );
        let twice = format!("[[rule]]\nname = \"r\"\n{base}[[rule]]\nname = \"r\"\n{base}");
        assert!(Rules::parse(&twice).unwrap_err().contains("defined twice"));
        let unsigned = "[[rule]]\nname = \"r\"\nformat = \"signed-json\"\nurl = \"http://a/\"\n";
        assert!(Rules::parse(unsigned).unwrap_err().contains("secret_file"));
    }

    #[test]
    fn a_reload_keeps_the_last_good_rules_and_sees_secret_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "one\n").unwrap();
        let path = dir.path().join("rules.toml");
        let good = format!(
            "[[rule]]\nname = \"r\"\nformat = \"signed-json\"\nurl = \"http://a/\"\n\
             secret_file = \"{}\"\n",
            secret.display()
        );
        std::fs::write(&path, &good).unwrap();
        let set = RuleSet::load(path.clone()).unwrap();
        assert_eq!(set.reload().unwrap(), Reloaded::Unchanged);
        std::fs::write(&path, "[[rule]]\nname = ").unwrap();
        assert!(set.reload().is_err());
        assert_eq!(
            set.current().len(),
            1,
            "a bad file keeps the rules in force"
        );
        std::fs::write(&path, &good).unwrap();
        std::fs::write(&secret, "two\n").unwrap();
        assert_eq!(set.reload().unwrap(), Reloaded::Replaced { rules: 1 });
        let current = set.current();
        let rule = current.get("r").unwrap();
        assert_eq!(rule.secret.as_ref().unwrap().expose(), "two");
    }
}
