//! Retainly's documented limits, checked once and reported in either error dialect: FastAPI's
//! `{"detail":[{"loc","msg","type"}]}` for `/customers` and `/arrays`, Laravel's
//! `{"errors":{"field":["msg"]}}` for `/events`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::model::id_key;

/// Objects per request (customers, array records, ids to delete).
pub(crate) const MAX_OBJECTS: usize = 10_000;
/// Fields of one customer, not counting `id`.
pub(crate) const MAX_FIELDS: usize = 500;
/// Array-typed fields of one customer.
pub(crate) const MAX_ARRAY_FIELDS: usize = 15;
/// Characters (not bytes) of a string value.
pub(crate) const MAX_STRING_CHARS: usize = 1000;
/// Characters of an event name.
pub(crate) const MAX_EVENT_NAME: usize = 50;
/// Fields of an event's `data`.
pub(crate) const MAX_EVENT_FIELDS: usize = 50;
/// Arrays may hold one more level of arrays (`purchases[].products[]`), no deeper.
const MAX_ARRAY_DEPTH: usize = 2;
/// A 10,000-item request full of mistakes would answer megabytes of errors; the first ones are
/// enough to fix a client.
const MAX_REPORTED: usize = 100;

/// One step of a path into the request body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

impl From<&str> for Seg {
    fn from(key: &str) -> Self {
        Seg::Key(key.to_owned())
    }
}

impl From<usize> for Seg {
    fn from(index: usize) -> Self {
        Seg::Index(index)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Violation {
    pub path: Vec<Seg>,
    pub msg: String,
    pub kind: &'static str,
}

/// Collects violations up to [`MAX_REPORTED`].
#[derive(Debug, Default)]
pub(crate) struct Violations(pub Vec<Violation>);

impl Violations {
    pub(crate) fn push(&mut self, path: &[Seg], msg: impl Into<String>, kind: &'static str) {
        if self.0.len() < MAX_REPORTED {
            self.0.push(Violation {
                path: path.to_vec(),
                msg: msg.into(),
                kind,
            });
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// FastAPI's body: `loc` starts with `"body"`.
    pub(crate) fn into_detail_response(self) -> Response {
        let detail: Vec<Value> = self
            .0
            .into_iter()
            .map(|violation| {
                let mut loc = vec![json!("body")];
                loc.extend(violation.path.into_iter().map(|seg| match seg {
                    Seg::Key(key) => json!(key),
                    Seg::Index(index) => json!(index),
                }));
                json!({"loc": loc, "msg": violation.msg, "type": violation.kind})
            })
            .collect();
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": detail})),
        )
            .into_response()
    }

    /// Laravel's body: dotted field names, several messages per field.
    pub(crate) fn into_errors_response(self) -> Response {
        let mut errors: Map<String, Value> = Map::new();
        for violation in self.0 {
            let field = violation
                .path
                .iter()
                .map(|seg| match seg {
                    Seg::Key(key) => key.clone(),
                    Seg::Index(index) => index.to_string(),
                })
                .collect::<Vec<_>>()
                .join(".");
            let messages = errors
                .entry(field)
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(messages) = messages {
                messages.push(json!(violation.msg));
            }
        }
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"errors": errors})),
        )
            .into_response()
    }
}

/// The body's top-level list `name`: present, an array, 1..=10,000 items.
pub(crate) fn top_list<'a>(
    body: &'a Value,
    name: &str,
    out: &mut Violations,
) -> Option<&'a Vec<Value>> {
    let Some(object) = body.as_object() else {
        out.push(&[], "value is not a valid dict", "type_error.dict");
        return None;
    };
    let path = [Seg::from(name)];
    match object.get(name) {
        None | Some(Value::Null) => {
            out.push(&path, "field required", "value_error.missing");
            None
        }
        Some(Value::Array(items)) if items.is_empty() => {
            out.push(
                &path,
                "ensure this value has at least 1 items",
                "value_error.list.min_items",
            );
            None
        }
        Some(Value::Array(items)) if items.len() > MAX_OBJECTS => {
            out.push(
                &path,
                format!("ensure this value has at most {MAX_OBJECTS} items"),
                "value_error.list.max_items",
            );
            None
        }
        Some(Value::Array(items)) => Some(items),
        Some(_) => {
            out.push(&path, "value is not a valid list", "type_error.list");
            None
        }
    }
}

/// A required customer or item id: an integer or a non-empty string.
pub(crate) fn required_id(
    object: &Map<String, Value>,
    name: &str,
    path: &[Seg],
    out: &mut Violations,
) -> Option<String> {
    let mut path = path.to_vec();
    path.push(Seg::from(name));
    match object.get(name) {
        None | Some(Value::Null) => {
            out.push(&path, "field required", "value_error.missing");
            None
        }
        Some(id) => check_id(id, &path, out),
    }
}

pub(crate) fn check_id(id: &Value, path: &[Seg], out: &mut Violations) -> Option<String> {
    let key = id_key(id);
    if key.is_none() {
        out.push(
            path,
            "value is not a valid integer or non-empty string",
            "type_error.id",
        );
    }
    key
}

/// One attribute value: no object as a value, arrays nested at most one level, strings of at
/// most 1,000 characters. Objects are allowed only as array items, and their fields follow the
/// same rules. `depth` is the number of arrays already entered.
pub(crate) fn check_value(value: &Value, path: &mut Vec<Seg>, depth: usize, out: &mut Violations) {
    match value {
        Value::String(text) => {
            if text.chars().count() > MAX_STRING_CHARS {
                out.push(
                    path,
                    format!("ensure this value has at most {MAX_STRING_CHARS} characters"),
                    "value_error.any_str.max_length",
                );
            }
        }
        Value::Object(_) => out.push(
            path,
            "attribute value could not be an associative array",
            "type_error.associative_array",
        ),
        Value::Array(items) => {
            if depth >= MAX_ARRAY_DEPTH {
                out.push(
                    path,
                    "array items could have only 1 nesting layer of arrays",
                    "value_error.array.nesting",
                );
                return;
            }
            for (index, item) in items.iter().enumerate() {
                path.push(Seg::Index(index));
                match item {
                    Value::Object(fields) => check_fields(fields, path, depth + 1, out),
                    other => check_value(other, path, depth + 1, out),
                }
                path.pop();
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// The fields of an array item object.
pub(crate) fn check_fields(
    fields: &Map<String, Value>,
    path: &mut Vec<Seg>,
    depth: usize,
    out: &mut Violations,
) {
    for (key, value) in fields {
        path.push(Seg::Key(key.clone()));
        check_value(value, path, depth, out);
        path.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violations_of(value: Value) -> Vec<Violation> {
        let mut out = Violations::default();
        check_value(&value, &mut vec![Seg::from("f")], 0, &mut out);
        out.0
    }

    #[test]
    fn the_documented_example_shapes_are_valid() {
        assert!(violations_of(json!(["one", "two"])).is_empty());
        assert!(violations_of(json!([{"s": "v", "nested": [{"b": true}, {"n": 1}]}])).is_empty());
        assert!(violations_of(json!("2022-02-25T21:00:00.000Z")).is_empty());
        assert!(violations_of(json!(null)).is_empty());
    }

    #[test]
    fn limits_are_enforced_with_precise_paths() {
        let deep = violations_of(json!([{"a": [{"b": [1]}]}]));
        assert_eq!(deep.len(), 1);
        assert_eq!(
            deep[0].path,
            vec![
                Seg::from("f"),
                Seg::Index(0),
                Seg::from("a"),
                Seg::Index(0),
                Seg::from("b")
            ]
        );
        assert_eq!(deep[0].kind, "value_error.array.nesting");
        let object = violations_of(json!({"x": 1}));
        assert_eq!(object[0].kind, "type_error.associative_array");
        let nested_object = violations_of(json!([{"x": {"y": 1}}]));
        assert_eq!(nested_object[0].path.len(), 3);
        let long = violations_of(json!("é".repeat(1001)));
        assert_eq!(long[0].kind, "value_error.any_str.max_length");
        assert!(violations_of(json!("é".repeat(1000))).is_empty());
    }

    #[test]
    fn errors_are_rendered_in_both_dialects() {
        let mut out = Violations::default();
        out.push(
            &[Seg::from("data"), Seg::from("a"), Seg::Index(0)],
            "m1",
            "t",
        );
        out.push(
            &[Seg::from("data"), Seg::from("a"), Seg::Index(0)],
            "m2",
            "t",
        );
        assert!(!out.is_empty());
        let response = out.into_errors_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
