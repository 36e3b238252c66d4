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
/// ASCII only: Retently keys customers by address, and a non-ASCII look-alike, a bidi override
/// or a zero-width character would make a second customer that looks like the first (an
/// internationalised domain is sent in its `xn--` form).
fn is_email(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
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

/// Characters that change how text is displayed without being visible: bidi embeddings,
/// overrides, isolates and marks, zero-width spaces and joiners, the soft hyphen, the word
/// joiner and the BOM. A key or name holding one shows up in Retainly and Retently looking like
/// another.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// A name that goes to an upstream as it is (an event name): no control or invisible
/// characters.
pub fn printable(v: &mut Violations, field: impl Into<String>, value: &str) -> bool {
    v.check(
        !value.chars().any(|c| c.is_control() || is_invisible(c)),
        field,
        "must not contain control or invisible (bidi, zero-width) characters",
    )
}

/// Longest key of a Retainly data object (event data, array item fields).
pub const MAX_DATA_KEY_CHARS: usize = 100;

/// A key of a free-form object sent to Retainly (event properties, array item fields and the
/// objects inside their lists): 1..100 characters, no control or invisible characters. A bad key
/// is reported on the object (`parent`), not in a path of its own, so the key's bytes are never
/// echoed back.
pub fn data_key(v: &mut Violations, parent: &str, key: &str) -> bool {
    let ok = !key.is_empty()
        && chars(key) <= MAX_DATA_KEY_CHARS
        && !key.chars().any(|c| c.is_control() || is_invisible(c));
    v.check(
        ok,
        parent,
        "has a key that is empty, longer than 100 characters, or holds control or invisible (bidi, zero-width) characters",
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
        // Output only, ignored in requests; bounded so a request cannot carry megabytes of it
        // into the outbox.
        max_len(v, format!("{at}.label"), &property.label, MAX_STRING_CHARS);
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

/// Whether `value` has the shape of a Retently record id. Retently's ids look like 24-hex
/// MongoDB ObjectIds, but the docs only infer that, and their own examples hold a 23-character
/// id and one with a `y`; so any 1..64 ASCII letters, digits, `-` and `_` pass. That still keeps
/// out what cannot be an id: whitespace, `.` and `..` (a URL resolves them to another path:
/// `/feedback/..` would read the list endpoint), `/`, `%`, `?`, control and non-ASCII characters.
pub fn is_retently_id(value: &str) -> bool {
    (1..=MAX_RETENTLY_ID_CHARS).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

const RETENTLY_ID_SHAPE: &str = "must be a record id: 1 to 64 ASCII letters, digits, - or _";

/// A required Retently record id (one that goes into a URL path like `/templates/{id}`, or names
/// a campaign); a malformed one would only spend upstream budget on a 404.
pub fn retently_path_id(v: &mut Violations, field: impl Into<String>, value: &str) -> bool {
    let field = field.into();
    if value.is_empty() {
        v.add(field, "is required");
        return false;
    }
    v.check(is_retently_id(value), field, RETENTLY_ID_SHAPE)
}

/// An optional Retently record id used as a filter: empty, or the shape of an id.
pub fn retently_id_filter(v: &mut Violations, field: impl Into<String>, value: &str) -> bool {
    value.is_empty() || v.check(is_retently_id(value), field, RETENTLY_ID_SHAPE)
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
                if data_key(v, field, key) {
                    retainly_value(v, &format!("{field}.{key}"), inner, list_depth, false);
                }
            }
        }
    }
}

/// The fields a validator's violations name, in order; empty when the request is valid (for the
/// validators' table tests).
#[cfg(test)]
pub(crate) fn violated_fields<T>(outcome: Result<T, crate::error::Error>) -> Vec<String> {
    match outcome {
        Ok(_) => Vec::new(),
        Err(error) => error.violations().iter().map(|v| v.field.clone()).collect(),
    }
}

/// A filter on an enum field: `None` when left unspecified (no filter), its number when it names
/// a value of `E`; an unknown number is a violation of `field`.
pub fn enum_filter<E>(
    v: &mut Violations,
    field: impl Into<String>,
    value: i32,
    unknown: &'static str,
) -> Option<i32>
where
    E: TryFrom<i32> + Default + PartialEq,
{
    match E::try_from(value) {
        Ok(known) if known == E::default() => None,
        Ok(_) => Some(value),
        Err(_) => {
            v.add(field, unknown);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the validator `check` answers, and the violations it recorded.
    fn checked<T>(check: impl FnOnce(&mut Violations) -> T) -> (T, Violations) {
        let mut v = Violations::new();
        let answer = check(&mut v);
        (answer, v)
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        let (answer, v) = checked(|v| email(v, "e", "  Alice.Smith@Example.COM "));
        assert_eq!(answer.as_deref(), Some("alice.smith@example.com"));
        assert!(v.is_empty());
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
            let (answer, v) = checked(|v| email(v, "e", bad));
            assert_eq!(answer, None, "{bad}");
            assert!(!v.is_empty());
        }
    }

    #[test]
    fn emails_with_non_ascii_bidi_or_zero_width_characters_are_refused() {
        for bad in [
            "алиса@example.com",
            "alice@exämple.com",
            "ali\u{200B}ce@example.com",
            "alice\u{202E}@example.com",
            "alice@example.com\u{FEFF}",
            "alice@exa\u{2066}mple.com",
            "al\u{0}ice@example.com",
        ] {
            let (answer, v) = checked(|v| email(v, "e", bad));
            assert_eq!((answer, v.len()), (None, 1), "{bad:?}");
        }
        let (answer, v) = checked(|v| email(v, "e", "o'brien+tag@xn--bcher-kva.example"));
        assert!(answer.is_some() && v.is_empty());
    }

    #[test]
    fn data_keys_are_bounded_and_visible() {
        for good in ["amount", "Plan Name", "ключ", &"k".repeat(100)] {
            let mut v = Violations::new();
            assert!(data_key(&mut v, "p", good), "{good:?}");
        }
        for bad in [
            String::new(),
            "a\u{0}b".to_owned(),
            "tab\there".to_owned(),
            "k".repeat(101),
            "k".repeat(1200),
            "zero\u{200B}width".to_owned(),
            "\u{202E}reversed".to_owned(),
            "soft\u{00AD}hyphen".to_owned(),
        ] {
            let (accepted, v) = checked(|v| data_key(v, "p", &bad));
            assert_eq!((accepted, v.len()), (false, 1), "{bad:?}");
        }
    }

    #[test]
    fn object_keys_inside_lists_are_checked() {
        use prost_types::value::Kind;
        use prost_types::{ListValue, Struct, Value};
        let item = |key: &str| Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![Value {
                    kind: Some(Kind::StructValue(Struct {
                        fields: [(
                            key.to_owned(),
                            Value {
                                kind: Some(Kind::BoolValue(true)),
                            },
                        )]
                        .into_iter()
                        .collect(),
                    })),
                }],
            })),
        };
        for bad in ["", "a\u{0}", &"x".repeat(1200)] {
            let v = checked(|v| retainly_value(v, "x", &item(bad), 0, false)).1;
            assert_eq!(v.len(), 1, "{bad:?}");
        }
        let v = checked(|v| retainly_value(v, "x", &item("name"), 0, false)).1;
        assert!(v.is_empty());
    }

    #[test]
    fn names_sent_as_they_are_have_no_control_or_invisible_characters() {
        for bad in [
            "sign\u{0}ed_up",
            "signed\u{200D}up",
            "\u{2067}signed_up",
            "a\nb",
        ] {
            assert!(!checked(|v| printable(v, "name", bad)).0, "{bad:?}");
        }
        assert!(checked(|v| printable(v, "name", "Order Completed ✓")).0);
    }

    #[test]
    fn retently_ids_are_tolerant_of_the_documented_shapes_only() {
        // A real ObjectId, the docs' 23-character typo and their id with a `y`, and short ids.
        for good in [
            "5a9d595701c85b37224ab2d0",
            "5a9d595701c85b38114b5a1",
            "5f1ec45y27b8313876299999",
            "abc",
            "tmpl_01-x",
        ] {
            let mut v = Violations::new();
            assert!(retently_path_id(&mut v, "id", good), "{good}");
            assert!(retently_id_filter(&mut v, "id", good), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            ".",
            "..",
            "../customers",
            "a/b",
            "a b",
            "%2e%2e",
            "a?x=1",
            "id\u{0}",
            "ïd",
            &long,
        ] {
            let mut v = Violations::new();
            assert!(!retently_path_id(&mut v, "id", bad), "{bad:?}");
            assert!(!retently_id_filter(&mut v, "id", bad), "{bad:?}");
            assert_eq!(v.len(), 2);
        }
        let mut v = Violations::new();
        assert!(!retently_path_id(&mut v, "id", ""));
        assert!(retently_id_filter(&mut v, "id", ""));
    }

    #[test]
    fn property_labels_are_bounded() {
        let property = |label: String| pb::Property {
            name: "plan".to_owned(),
            value: Some(pb::PropertyValue {
                kind: Some(pb::property_value::Kind::BoolValue(true)),
            }),
            label,
        };
        let mut v = Violations::new();
        properties(&mut v, "p", &[property("x".repeat(1000))]);
        assert!(v.is_empty());
        properties(&mut v, "p", &[property("x".repeat(1001))]);
        assert_eq!(v.len(), 1);
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
            let v = checked(|v| retainly_value(v, "x", &bad, 0, false)).1;
            assert!(!v.is_empty(), "{bad:?}");
        }
    }
}
