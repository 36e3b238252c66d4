//! Field validators shared by the adapters. Each records a violation with the exact field path
//! (`customers[3].properties[1].value`) and returns the normalised value when there is one, so an
//! adapter collects every problem of a request before answering, and no upstream call is made for
//! a request with any.

use std::collections::HashSet;

use crate::error::Violations;
use crate::pb;

/// Retainly's (and so the gateway's) longest string value.
pub const MAX_STRING_CHARS: usize = 1000;
pub const MAX_EMAIL_CHARS: usize = 254;
pub const MAX_CUSTOMER_ID_CHARS: usize = 128;
pub const MAX_KEY_CHARS: usize = 128;
/// Retainly: items of an array value may hold one further level of arrays.
const MAX_ARRAY_NESTING: usize = 2;

pub fn chars(value: &str) -> usize {
    value.chars().count()
}

/// A string of at most `max` characters (empty allowed).
pub fn max_len(v: &mut Violations, field: impl Into<String>, value: &str, max: usize) -> bool {
    v.check(
        chars(value) <= max,
        field,
        &format!("must be at most {max} characters"),
    )
}

/// A required string of 1..=`max` characters.
pub fn required(v: &mut Violations, field: impl Into<String>, value: &str, max: usize) -> bool {
    let field = field.into();
    if value.is_empty() {
        v.add(field, "is required");
        false
    } else {
        max_len(v, field, value, max)
    }
}

/// Validates and normalises an email address: trimmed and lower-cased, because Retently keys
/// customers by email case-insensitively and one customer must not become two.
pub fn email(v: &mut Violations, field: impl Into<String>, value: &str) -> Option<String> {
    let field = field.into();
    let normalised = value.trim().to_ascii_lowercase();
    if normalised.is_empty() {
        v.add(field, "is required");
        return None;
    }
    if chars(&normalised) > MAX_EMAIL_CHARS {
        v.add(
            field,
            format!("must be at most {MAX_EMAIL_CHARS} characters"),
        );
        return None;
    }
    if !is_email(&normalised) {
        v.add(field, "must be an email address like name@example.com");
        return None;
    }
    Some(normalised)
}

/// A pragmatic address check (RFC 5321 lengths, one `@`, a dotted domain of letters, digits and
/// hyphens, no spaces or control characters); deliverability is the upstream's business.
fn is_email(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| {
            c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c) || !c.is_ascii()
        });
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        });
    local_ok && domain_ok
}

/// The caller's customer id (Retainly `id`): 1..128 characters, no control characters.
pub fn customer_id(v: &mut Violations, field: impl Into<String>, value: &str) -> bool {
    let field = field.into();
    if !required(v, field.clone(), value, MAX_CUSTOMER_ID_CHARS) {
        return false;
    }
    v.check(
        !value.chars().any(char::is_control),
        field,
        "must not contain control characters",
    )
}

/// A field or property key: 1..100 of lowercase letters, digits and `_`, starting with a letter.
pub fn key_name(v: &mut Violations, field: impl Into<String>, value: &str) -> bool {
    let field = field.into();
    if !required(v, field.clone(), value, 100) {
        return false;
    }
    let mut chars = value.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    v.check(
        ok,
        field,
        "must be lowercase letters, digits and _, starting with a letter",
    )
}

/// Destinations: at least one, known, no repeats.
pub fn destinations(v: &mut Violations, field: &str, values: &[i32]) -> Vec<pb::Destination> {
    if values.is_empty() {
        v.add(field, "at least one destination is required");
        return Vec::new();
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(values.len());
    for (index, value) in values.iter().enumerate() {
        match pb::Destination::try_from(*value) {
            Ok(pb::Destination::Unspecified) | Err(_) => {
                v.add(format!("{field}[{index}]"), "must be RETENTLY or RETAINLY");
            }
            Ok(destination) => {
                if seen.insert(destination) {
                    out.push(destination);
                } else {
                    v.add(format!("{field}[{index}]"), "is repeated");
                }
            }
        }
    }
    out
}

/// The mode and idempotency key of a write.
pub fn write_options(
    v: &mut Violations,
    options: Option<&pb::WriteOptions>,
) -> (pb::DeliveryMode, Option<String>) {
    let Some(options) = options else {
        return (pb::DeliveryMode::Sync, None);
    };
    let mode = match pb::DeliveryMode::try_from(options.mode) {
        Ok(pb::DeliveryMode::Unspecified) => pb::DeliveryMode::Sync,
        Ok(mode) => mode,
        Err(_) => {
            v.add("options.mode", "must be SYNC or ASYNC");
            pb::DeliveryMode::Sync
        }
    };
    let key = &options.idempotency_key;
    if key.is_empty() {
        return (mode, None);
    }
    let printable = key.bytes().all(|b| (0x21..=0x7e).contains(&b));
    let ok = key.len() <= MAX_KEY_CHARS && printable;
    v.check(
        ok,
        "options.idempotency_key",
        "must be at most 128 characters of printable ASCII without spaces",
    );
    (mode, ok.then(|| key.clone()))
}

/// A batch size within `1..=max`.
pub fn batch_len(v: &mut Violations, field: &str, len: usize, max: usize) -> bool {
    v.check(
        (1..=max).contains(&len),
        field,
        &format!("must hold 1 to {max} items"),
    )
}

/// Seconds since the epoch of an optional timestamp, checking it is a valid instant.
pub fn timestamp(
    v: &mut Violations,
    field: &str,
    value: Option<&prost_types::Timestamp>,
) -> Option<i64> {
    let value = value?;
    if !(0..1_000_000_000).contains(&value.nanos) || !(0..=253_402_300_799).contains(&value.seconds)
    {
        v.add(field, "must be a valid instant between 1970 and 9999");
        return None;
    }
    Some(value.seconds)
}

/// A `[start, end)` range: both valid and start before end.
pub fn time_range(
    v: &mut Violations,
    start_field: &str,
    start: Option<&prost_types::Timestamp>,
    end_field: &str,
    end: Option<&prost_types::Timestamp>,
) -> (Option<i64>, Option<i64>) {
    let start = timestamp(v, start_field, start);
    let end = timestamp(v, end_field, end);
    if let (Some(s), Some(e)) = (start, end)
        && s >= e
    {
        v.add(end_field, format!("must be after {start_field}"));
    }
    (start, end)
}

/// A calendar date that exists.
pub fn date(v: &mut Violations, field: &str, value: &pb::Date) -> bool {
    let ok = chrono::NaiveDate::from_ymd_opt(
        value.year,
        u32::try_from(value.month).unwrap_or(0),
        u32::try_from(value.day).unwrap_or(0),
    )
    .is_some_and(|_| (1..=9999).contains(&value.year));
    v.check(ok, field, "must be a valid calendar date")
}

/// Standard customer fields that a property must not shadow.
const RESERVED_PROPERTIES: [&str; 6] =
    ["id", "email", "first_name", "last_name", "company", "tags"];
pub const MAX_PROPERTIES: usize = 494;
pub const MAX_LIST_PROPERTIES: usize = 14;
pub const MAX_LIST_ITEMS: usize = 100;
pub const MAX_TAGS: usize = 100;

/// A customer's typed properties: names unique and not reserved, every value valid, and within
/// Retainly's field and array-field limits.
pub fn properties(v: &mut Violations, field: &str, properties: &[pb::Property]) {
    if properties.len() > MAX_PROPERTIES {
        v.add(field, format!("at most {MAX_PROPERTIES} properties"));
        return;
    }
    let mut names = HashSet::new();
    let mut lists = 0;
    for (index, property) in properties.iter().enumerate() {
        let at = format!("{field}[{index}]");
        if key_name(v, format!("{at}.name"), &property.name) {
            if RESERVED_PROPERTIES.contains(&property.name.as_str()) {
                v.add(
                    format!("{at}.name"),
                    "is a standard customer field; use the field itself",
                );
            } else if !names.insert(property.name.as_str()) {
                v.add(format!("{at}.name"), "is repeated");
            }
        }
        let kind = property
            .value
            .as_ref()
            .and_then(|value| value.kind.as_ref());
        use pb::property_value::Kind;
        match kind {
            None => v.add(format!("{at}.value"), "is required"),
            Some(Kind::StringValue(text)) => {
                max_len(
                    v,
                    format!("{at}.value.string_value"),
                    text,
                    MAX_STRING_CHARS,
                );
            }
            Some(Kind::NumberValue(number)) => {
                v.check(
                    number.is_finite(),
                    format!("{at}.value.number_value"),
                    "must be finite",
                );
            }
            Some(Kind::IntegerValue(number)) => {
                v.check(
                    number.unsigned_abs() < (1 << 53),
                    format!("{at}.value.integer_value"),
                    "must be within +-(2^53 - 1)",
                );
            }
            Some(Kind::BoolValue(_)) => {}
            Some(Kind::DateValue(d)) => {
                date(v, &format!("{at}.value.date_value"), d);
            }
            Some(Kind::TimestampValue(t)) => {
                timestamp(v, &format!("{at}.value.timestamp_value"), Some(t));
            }
            Some(Kind::StringListValue(list)) => {
                lists += 1;
                let list_field = format!("{at}.value.string_list_value.values");
                if list.values.len() > MAX_LIST_ITEMS {
                    v.add(
                        list_field.clone(),
                        format!("at most {MAX_LIST_ITEMS} items"),
                    );
                }
                for (i, item) in list.values.iter().enumerate() {
                    let item_field = format!("{list_field}[{i}]");
                    if max_len(v, item_field.clone(), item, MAX_STRING_CHARS) {
                        v.check(
                            !item.contains(','),
                            item_field,
                            "must not contain a comma (Retently collections are comma-separated)",
                        );
                    }
                }
            }
        }
    }
    if lists > MAX_LIST_PROPERTIES {
        v.add(
            field,
            format!("at most {MAX_LIST_PROPERTIES} string-list properties (Retainly allows 15 array fields, one is tags)"),
        );
    }
}

/// Tags: at most 100, each 1..1,000 characters.
pub fn tags(v: &mut Violations, field: &str, tags: &[String]) {
    if tags.len() > MAX_TAGS {
        v.add(field, format!("at most {MAX_TAGS} tags"));
    }
    for (index, tag) in tags.iter().enumerate() {
        required(v, format!("{field}[{index}]"), tag, MAX_STRING_CHARS);
    }
}

/// Longest Retently record id the gateway passes on (upstream ids are 24 hex characters).
pub const MAX_RETENTLY_ID_CHARS: usize = 64;

/// A Retently record id that goes into a URL path (`/templates/{id}`): 1..64 characters, without
/// control characters, and not `.` or `..`, which a URL resolves to another path (`/feedback/..`
/// would read the list endpoint).
pub fn retently_path_id(v: &mut Violations, field: impl Into<String>, value: &str) -> bool {
    let field = field.into();
    if !required(v, field.clone(), value, MAX_RETENTLY_ID_CHARS) {
        return false;
    }
    v.check(
        value != "." && value != ".." && !value.chars().any(char::is_control),
        field,
        "must be a record id (not . or .., no control characters)",
    )
}

/// A value Retainly accepts in a customer field, array item or event data: scalars, lists of
/// scalars or objects; objects only inside lists; at most one further level of lists inside
/// such objects; strings at most 1,000 characters.
pub fn retainly_value(
    v: &mut Violations,
    field: &str,
    value: &prost_types::Value,
    list_depth: usize,
    inside_list: bool,
) {
    use prost_types::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) | Some(Kind::BoolValue(_)) => {}
        Some(Kind::NumberValue(number)) => {
            v.check(number.is_finite(), field, "must be finite");
        }
        Some(Kind::StringValue(text)) => {
            max_len(v, field, text, MAX_STRING_CHARS);
        }
        Some(Kind::ListValue(list)) => {
            if list_depth >= MAX_ARRAY_NESTING {
                v.add(
                    field,
                    "nests arrays deeper than Retainly allows (one level inside array items)",
                );
                return;
            }
            for (index, item) in list.values.iter().enumerate() {
                retainly_value(v, &format!("{field}[{index}]"), item, list_depth + 1, true);
            }
        }
        Some(Kind::StructValue(object)) => {
            if !inside_list {
                v.add(
                    field,
                    "must not be an object (Retainly allows objects only as array items)",
                );
                return;
            }
            for (key, inner) in &object.fields {
                retainly_value(v, &format!("{field}.{key}"), inner, list_depth, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        let mut v = Violations::new();
        assert_eq!(
            email(&mut v, "e", "  Alice.Smith@Example.COM "),
            Some("alice.smith@example.com".to_owned())
        );
        for bad in [
            "",
            "alice",
            "alice@",
            "@example.com",
            "a b@example.com",
            "alice@example",
            "a..b@example.com",
            "alice@-x.com",
        ] {
            let mut v = Violations::new();
            assert_eq!(email(&mut v, "e", bad), None, "{bad}");
            assert!(!v.is_empty());
        }
        assert!(v.is_empty());
    }

    #[test]
    fn retainly_nesting_rules() {
        use prost_types::value::Kind;
        use prost_types::{ListValue, Struct, Value};
        let string = |s: &str| Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        let list = |values: Vec<Value>| Value {
            kind: Some(Kind::ListValue(ListValue { values })),
        };
        let object = |pairs: Vec<(&str, Value)>| Value {
            kind: Some(Kind::StructValue(Struct {
                fields: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            })),
        };
        let allowed = list(vec![object(vec![(
            "products",
            list(vec![object(vec![("name", string("apple"))])]),
        )])]);
        let mut v = Violations::new();
        retainly_value(&mut v, "x", &allowed, 0, false);
        assert!(v.is_empty());

        let too_deep = list(vec![object(vec![(
            "a",
            list(vec![object(vec![("b", list(vec![string("c")]))])]),
        )])]);
        let bare_object = object(vec![("a", string("b"))]);
        let long = string(&"x".repeat(1001));
        for bad in [too_deep, bare_object, long] {
            let mut v = Violations::new();
            retainly_value(&mut v, "x", &bad, 0, false);
            assert!(!v.is_empty(), "{bad:?}");
        }
    }
}
