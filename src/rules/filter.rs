//! Audience filters of event rules: conditions on the event's properties and the customer's
//! traits, combined with all-of and any-of to any depth.
//!
//! A missing attribute fails every condition except `exists = false`: a rule for "country is
//! not US" does not survey customers whose country nobody knows.

use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use prost_types::Struct;
use prost_types::value::Kind;
use serde::Deserialize;

/// How deep all-of / any-of may nest; deeper files are refused (a typo, not an audience).
const MAX_DEPTH: usize = 8;
/// Values of one `in` list at most.
const MAX_IN_VALUES: usize = 1000;

/// Where a condition reads its attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A top-level field of `Event.properties`.
    Property,
    /// A top-level field of `Event.traits`.
    Trait,
}

/// A literal of a rules file: what `eq`, `ne` and `in` compare with.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Text(String),
    Number(f64),
    Flag(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operator {
    Eq(Literal),
    Ne(Literal),
    In(Vec<Literal>),
    Exists(bool),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
    /// Strictly before this instant (the attribute is an RFC 3339 time or a `YYYY-MM-DD` date).
    Before(DateTime<Utc>),
    /// At or after this instant.
    After(DateTime<Utc>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Condition {
        subject: Subject,
        name: String,
        operator: Operator,
    },
}

/// What an event offers the filters.
pub struct Attributes<'a> {
    pub properties: Option<&'a Struct>,
    pub traits: Option<&'a Struct>,
}

impl Filter {
    pub fn matches(&self, attributes: &Attributes<'_>) -> bool {
        match self {
            Filter::All(filters) => filters.iter().all(|f| f.matches(attributes)),
            Filter::Any(filters) => filters.iter().any(|f| f.matches(attributes)),
            Filter::Condition {
                subject,
                name,
                operator,
            } => {
                let source = match subject {
                    Subject::Property => attributes.properties,
                    Subject::Trait => attributes.traits,
                };
                let value = source
                    .and_then(|s| s.fields.get(name))
                    .and_then(|v| v.kind.as_ref())
                    .filter(|kind| !matches!(kind, Kind::NullValue(_)));
                operator.holds(value)
            }
        }
    }
}

impl Operator {
    fn holds(&self, value: Option<&Kind>) -> bool {
        let Some(value) = value else {
            return matches!(self, Operator::Exists(false));
        };
        match self {
            Operator::Exists(wanted) => *wanted,
            Operator::Eq(literal) => literal.equals(value),
            Operator::Ne(literal) => !literal.equals(value),
            Operator::In(literals) => literals.iter().any(|l| l.equals(value)),
            Operator::Gt(bound) => number(value).is_some_and(|n| n > *bound),
            Operator::Gte(bound) => number(value).is_some_and(|n| n >= *bound),
            Operator::Lt(bound) => number(value).is_some_and(|n| n < *bound),
            Operator::Lte(bound) => number(value).is_some_and(|n| n <= *bound),
            Operator::Before(bound) => instant(value).is_some_and(|t| t < *bound),
            Operator::After(bound) => instant(value).is_some_and(|t| t >= *bound),
        }
    }
}

impl Literal {
    /// Equal values of the same type; a number also equals a string that spells it (Segment
    /// libraries send numbers as either).
    fn equals(&self, value: &Kind) -> bool {
        match (self, value) {
            (Literal::Text(a), Kind::StringValue(b)) => a == b,
            (Literal::Number(a), Kind::NumberValue(b)) => a == b,
            (Literal::Number(a), Kind::StringValue(b)) => b.trim().parse::<f64>() == Ok(*a),
            (Literal::Flag(a), Kind::BoolValue(b)) => a == b,
            _ => false,
        }
    }
}

fn number(value: &Kind) -> Option<f64> {
    match value {
        Kind::NumberValue(n) => Some(*n),
        Kind::StringValue(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn instant(value: &Kind) -> Option<DateTime<Utc>> {
    match value {
        Kind::StringValue(text) => parse_instant(text),
        _ => None,
    }
}

/// An RFC 3339 time, or a calendar date meaning its first instant in UTC.
pub fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|time| time.and_utc())
}

/// One node of an audience as written in the file: either `all` / `any`, or a condition naming
/// `property` or `trait` and exactly one operator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilter {
    all: Option<Vec<RawFilter>>,
    any: Option<Vec<RawFilter>>,
    property: Option<String>,
    #[serde(rename = "trait")]
    trait_name: Option<String>,
    eq: Option<toml::Value>,
    ne: Option<toml::Value>,
    #[serde(rename = "in")]
    in_values: Option<Vec<toml::Value>>,
    exists: Option<bool>,
    gt: Option<f64>,
    gte: Option<f64>,
    lt: Option<f64>,
    lte: Option<f64>,
    before: Option<toml::Value>,
    after: Option<toml::Value>,
}

impl RawFilter {
    /// The typed filter, or why it is invalid (`at` names the node, such as
    /// `rule[2].audience.all[0]`).
    pub fn check(self, at: &str) -> Result<Filter, String> {
        self.check_at(at, 0)
    }

    fn check_at(self, at: &str, depth: usize) -> Result<Filter, String> {
        if depth > MAX_DEPTH {
            return Err(format!("{at}: all/any nest deeper than {MAX_DEPTH} levels"));
        }
        let groups = usize::from(self.all.is_some()) + usize::from(self.any.is_some());
        let subjects =
            usize::from(self.property.is_some()) + usize::from(self.trait_name.is_some());
        if groups > 0 {
            if groups > 1 || subjects > 0 || self.has_operator() {
                return Err(format!(
                    "{at}: a group has exactly one of `all` or `any` and nothing else"
                ));
            }
            let (kind, children) = match (self.all, self.any) {
                (Some(children), _) => ("all", children),
                (None, Some(children)) => ("any", children),
                (None, None) => return Err(format!("{at}: empty group")),
            };
            if children.is_empty() {
                return Err(format!("{at}.{kind}: must hold at least one condition"));
            }
            let children = children
                .into_iter()
                .enumerate()
                .map(|(i, child)| child.check_at(&format!("{at}.{kind}[{i}]"), depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(if kind == "all" {
                Filter::All(children)
            } else {
                Filter::Any(children)
            });
        }
        let (subject, name) = match (self.property.clone(), self.trait_name.clone()) {
            (Some(name), None) => (Subject::Property, name),
            (None, Some(name)) => (Subject::Trait, name),
            _ => {
                return Err(format!(
                    "{at}: a condition names exactly one of `property` or `trait`"
                ));
            }
        };
        if name.is_empty() || name.chars().count() > 100 {
            return Err(format!(
                "{at}: the attribute name must be 1 to 100 characters"
            ));
        }
        let operator = self.operator(at)?;
        Ok(Filter::Condition {
            subject,
            name,
            operator,
        })
    }

    fn has_operator(&self) -> bool {
        self.eq.is_some()
            || self.ne.is_some()
            || self.in_values.is_some()
            || self.exists.is_some()
            || self.gt.is_some()
            || self.gte.is_some()
            || self.lt.is_some()
            || self.lte.is_some()
            || self.before.is_some()
            || self.after.is_some()
    }

    fn operator(self, at: &str) -> Result<Operator, String> {
        let mut found = Vec::new();
        if let Some(v) = self.eq {
            found.push(Operator::Eq(literal(at, "eq", v)?));
        }
        if let Some(v) = self.ne {
            found.push(Operator::Ne(literal(at, "ne", v)?));
        }
        if let Some(values) = self.in_values {
            if values.is_empty() || values.len() > MAX_IN_VALUES {
                return Err(format!("{at}.in: must list 1 to {MAX_IN_VALUES} values"));
            }
            let values = values
                .into_iter()
                .map(|v| literal(at, "in", v))
                .collect::<Result<Vec<_>, _>>()?;
            found.push(Operator::In(values));
        }
        if let Some(v) = self.exists {
            found.push(Operator::Exists(v));
        }
        let bounds = [
            (self.gt, Operator::Gt as fn(f64) -> Operator),
            (self.gte, Operator::Gte),
            (self.lt, Operator::Lt),
            (self.lte, Operator::Lte),
        ];
        for (bound, make) in bounds {
            if let Some(bound) = bound {
                if !bound.is_finite() {
                    return Err(format!("{at}: a numeric bound must be a finite number"));
                }
                found.push(make(bound));
            }
        }
        if let Some(v) = self.before {
            found.push(Operator::Before(date(at, "before", v)?));
        }
        if let Some(v) = self.after {
            found.push(Operator::After(date(at, "after", v)?));
        }
        if found.len() != 1 {
            return Err(format!(
                "{at}: a condition has exactly one operator of eq, ne, in, exists, gt, gte, lt, \
                 lte, before, after (found {})",
                found.len()
            ));
        }
        found
            .pop()
            .ok_or_else(|| format!("{at}: a condition needs an operator"))
    }
}

fn literal(at: &str, op: &str, value: toml::Value) -> Result<Literal, String> {
    match value {
        toml::Value::String(text) => Ok(Literal::Text(text)),
        toml::Value::Integer(n) => Ok(Literal::Number(n as f64)),
        toml::Value::Float(n) if n.is_finite() => Ok(Literal::Number(n)),
        toml::Value::Boolean(flag) => Ok(Literal::Flag(flag)),
        _ => Err(format!(
            "{at}.{op}: compares with a string, a number or a boolean"
        )),
    }
}

fn date(at: &str, op: &str, value: toml::Value) -> Result<DateTime<Utc>, String> {
    let parsed = match &value {
        toml::Value::String(text) => parse_instant(text),
        // TOML's own date and date-time literals.
        toml::Value::Datetime(datetime) => parse_instant(&datetime.to_string()),
        _ => None,
    };
    parsed.ok_or_else(|| {
        format!("{at}.{op}: must be an RFC 3339 time or a YYYY-MM-DD date, got `{value}`")
    })
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Text(text) => write!(f, "{text:?}"),
            Literal::Number(n) => write!(f, "{n}"),
            Literal::Flag(flag) => write!(f, "{flag}"),
        }
    }
}

/// `open`, the items separated by commas, `close`.
fn write_list<T: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    open: &str,
    items: &[T],
    close: &str,
) -> fmt::Result {
    f.write_str(open)?;
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{item}")?;
    }
    f.write_str(close)
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::All(children) => write_list(f, "all(", children, ")"),
            Filter::Any(children) => write_list(f, "any(", children, ")"),
            Filter::Condition {
                subject,
                name,
                operator,
            } => {
                let subject = match subject {
                    Subject::Property => "property",
                    Subject::Trait => "trait",
                };
                write!(f, "{subject}.{name} ")?;
                match operator {
                    Operator::Eq(l) => write!(f, "eq {l}"),
                    Operator::Ne(l) => write!(f, "ne {l}"),
                    Operator::In(ls) => write_list(f, "in [", ls, "]"),
                    Operator::Exists(b) => write!(f, "exists {b}"),
                    Operator::Gt(n) => write!(f, "gt {n}"),
                    Operator::Gte(n) => write!(f, "gte {n}"),
                    Operator::Lt(n) => write!(f, "lt {n}"),
                    Operator::Lte(n) => write!(f, "lte {n}"),
                    Operator::Before(t) => write!(f, "before {}", t.to_rfc3339()),
                    Operator::After(t) => write!(f, "after {}", t.to_rfc3339()),
                }
            }
        }
    }
}
