//! The Retainly tracking API at the host root: `/customers`, `/arrays` (POST and DELETE) and
//! `/events`. Authentication happens in the gate ([`crate::gate`]); these handlers parse,
//! validate every documented limit, then apply all or nothing.

pub mod model;
pub(crate) mod validate;

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::{Map, Value, json};

use self::model::{RetainlyCustomer, RetainlyEvent, id_key};
use self::validate::{
    MAX_ARRAY_FIELDS, MAX_EVENT_FIELDS, MAX_EVENT_NAME, MAX_FIELDS, Seg, Violations, check_fields,
    check_id, check_value, required_id, top_list,
};
use crate::state::{Shared, World};

/// The success body of customers and arrays calls: a JSON string (content unpublished).
fn ok() -> Response {
    (StatusCode::OK, Json(json!("ok"))).into_response()
}

/// `/customers` and `/arrays` answer malformed JSON with 422 in FastAPI's shape.
fn parse_detail_body(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|error| {
        let position = byte_offset(body, error.line(), error.column());
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": [{
                "loc": ["body", position],
                "msg": format!("JSON decode error: {error}"),
                "type": "value_error.jsondecode",
            }]})),
        )
            .into_response()
    })
}

/// serde_json reports 1-based line and column; FastAPI reports a character offset.
fn byte_offset(body: &Bytes, line: usize, column: usize) -> usize {
    let text = String::from_utf8_lossy(body);
    let before: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(|line| line.chars().count())
        .sum();
    before + column.saturating_sub(1)
}

/// `POST /customers`: upsert by `id`, supplied fields merged into stored ones.
pub(crate) async fn post_customers(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = match parse_detail_body(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let mut out = Violations::default();
    let Some(items) = top_list(&body, "customers", &mut out) else {
        return out.into_detail_response();
    };
    let mut world = shared.world();
    let mut accepted: Vec<(String, &Value, &Map<String, Value>)> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let mut path = vec![Seg::from("customers"), Seg::Index(index)];
        let Some(object) = item.as_object() else {
            out.push(&path, "value is not a valid dict", "type_error.dict");
            continue;
        };
        let Some(key) = required_id(object, "id", &path, &mut out) else {
            continue;
        };
        for (field, value) in object.iter().filter(|(field, _)| *field != "id") {
            path.push(Seg::Key(field.clone()));
            check_value(value, &mut path, 0, &mut out);
            path.pop();
        }
        // The limits apply to the customer as it will be after the merge, counting earlier
        // items of this request with the same id.
        let mut fields: Map<String, Value> = world
            .retainly
            .customers
            .get(&key)
            .map(|customer| customer.fields.clone())
            .unwrap_or_default();
        for (_, _, earlier) in accepted.iter().filter(|(earlier, _, _)| earlier == &key) {
            merge_fields(&mut fields, earlier);
        }
        merge_fields(&mut fields, object);
        check_customer_size(&fields, &path, &mut out);
        if let Some(id) = object.get("id") {
            accepted.push((key, id, object));
        }
    }
    if !out.is_empty() {
        return out.into_detail_response();
    }
    let now = Utc::now();
    for (key, id, object) in accepted {
        let customer = world
            .retainly
            .customers
            .entry(key)
            .or_insert_with(|| RetainlyCustomer {
                id: id.clone(),
                fields: Map::new(),
                created_at: now,
                updated_at: now,
            });
        merge_fields(&mut customer.fields, object);
        customer.updated_at = now;
    }
    ok()
}

fn merge_fields(fields: &mut Map<String, Value>, update: &Map<String, Value>) {
    for (field, value) in update.iter().filter(|(field, _)| *field != "id") {
        fields.insert(field.clone(), value.clone());
    }
}

fn check_customer_size(fields: &Map<String, Value>, path: &[Seg], out: &mut Violations) {
    if fields.len() > MAX_FIELDS {
        out.push(
            path,
            format!("ensure this customer has at most {MAX_FIELDS} fields"),
            "value_error.customer.max_fields",
        );
    }
    let arrays = fields.values().filter(|value| value.is_array()).count();
    if arrays > MAX_ARRAY_FIELDS {
        out.push(
            path,
            format!("ensure this customer has at most {MAX_ARRAY_FIELDS} array attributes"),
            "value_error.customer.max_array_fields",
        );
    }
}

/// `DELETE /customers`: `{"customers_ids":[…]}`; unknown ids are not an error.
pub(crate) async fn delete_customers(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = match parse_detail_body(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let mut out = Violations::default();
    let Some(ids) = top_list(&body, "customers_ids", &mut out) else {
        return out.into_detail_response();
    };
    let keys: Vec<Option<String>> = ids
        .iter()
        .enumerate()
        .map(|(index, id)| {
            check_id(
                id,
                &[Seg::from("customers_ids"), Seg::Index(index)],
                &mut out,
            )
        })
        .collect();
    if !out.is_empty() {
        return out.into_detail_response();
    }
    let mut world = shared.world();
    for key in keys.into_iter().flatten() {
        world.retainly.customers.remove(&key);
    }
    ok()
}

/// One validated record of `POST /arrays`.
struct ArrayRecord<'a> {
    customer_key: String,
    customer_id: &'a Value,
    field: String,
    items: &'a [Value],
}

/// `POST /arrays`: per record, upsert items of one array field by item `id`; items without an
/// id are appended; a missing customer is created.
pub(crate) async fn post_arrays(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = match parse_detail_body(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let mut out = Violations::default();
    let Some(items) = top_list(&body, "records", &mut out) else {
        return out.into_detail_response();
    };
    let mut world = shared.world();
    let mut records: Vec<ArrayRecord<'_>> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let mut path = vec![Seg::from("records"), Seg::Index(index)];
        let Some(object) = item.as_object() else {
            out.push(&path, "value is not a valid dict", "type_error.dict");
            continue;
        };
        let key = required_id(object, "customer_id", &path, &mut out);
        let field = required_field_name(object, &path, &mut out);
        path.push(Seg::from("data"));
        let data = match object.get("data") {
            None | Some(Value::Null) => {
                out.push(&path, "field required", "value_error.missing");
                None
            }
            Some(Value::Array(data)) => Some(data),
            Some(_) => {
                out.push(&path, "value is not a valid list", "type_error.list");
                None
            }
        };
        if let Some(data) = data {
            for (position, entry) in data.iter().enumerate() {
                path.push(Seg::Index(position));
                match entry.as_object() {
                    None => out.push(&path, "value is not a valid dict", "type_error.dict"),
                    Some(fields) => {
                        if let Some(id) = fields.get("id").filter(|id| !id.is_null()) {
                            path.push(Seg::from("id"));
                            check_id(id, &path, &mut out);
                            path.pop();
                        }
                        // `data` is the customer's array itself: one array level entered.
                        check_fields(fields, &mut path, 1, &mut out);
                    }
                }
                path.pop();
            }
        }
        path.pop();
        if let (Some(key), Some(field), Some(data), Some(customer_id)) =
            (key, field, data, object.get("customer_id"))
        {
            check_array_target(&world, &records, &key, &field, &path, &mut out);
            records.push(ArrayRecord {
                customer_key: key,
                customer_id,
                field,
                items: data,
            });
        }
    }
    if !out.is_empty() {
        return out.into_detail_response();
    }
    let now = Utc::now();
    for record in records {
        let customer = world
            .retainly
            .customers
            .entry(record.customer_key)
            .or_insert_with(|| RetainlyCustomer {
                id: record.customer_id.clone(),
                fields: Map::new(),
                created_at: now,
                updated_at: now,
            });
        let array = customer
            .fields
            .entry(record.field)
            .or_insert_with(|| Value::Array(Vec::new()));
        if !array.is_array() {
            // Only `null` gets here (other scalars were refused): an empty field becomes an array.
            *array = Value::Array(Vec::new());
        }
        if let Value::Array(stored) = array {
            for item in record.items {
                upsert_item(stored, item);
            }
        }
        customer.updated_at = now;
    }
    ok()
}

fn required_field_name(
    object: &Map<String, Value>,
    path: &[Seg],
    out: &mut Violations,
) -> Option<String> {
    let mut path = path.to_vec();
    path.push(Seg::from("field"));
    match object.get("field") {
        None | Some(Value::Null) => {
            out.push(&path, "field required", "value_error.missing");
            None
        }
        Some(Value::String(field)) if field.trim().is_empty() || field == "id" => {
            out.push(&path, "not a valid array field key", "value_error.field");
            None
        }
        Some(Value::String(field)) => Some(field.clone()),
        Some(_) => {
            out.push(&path, "str type expected", "type_error.str");
            None
        }
    }
}

/// The target field must be (or become) an array, and a new array field must fit the limit of
/// array attributes and of fields.
fn check_array_target(
    world: &World,
    earlier: &[ArrayRecord<'_>],
    key: &str,
    field: &str,
    path: &[Seg],
    out: &mut Violations,
) {
    let mut fields: Map<String, Value> = world
        .retainly
        .customers
        .get(key)
        .map(|customer| customer.fields.clone())
        .unwrap_or_default();
    for record in earlier.iter().filter(|record| record.customer_key == key) {
        fields
            .entry(record.field.clone())
            .or_insert_with(|| Value::Array(Vec::new()));
    }
    match fields.get(field) {
        Some(Value::Array(_)) | Some(Value::Null) => {}
        Some(_) => {
            let mut path = path.to_vec();
            path.push(Seg::from("field"));
            out.push(
                &path,
                "the customer field is not an array attribute",
                "type_error.array_field",
            );
        }
        None => {
            fields.insert(field.to_owned(), Value::Array(Vec::new()));
            check_customer_size(&fields, path, out);
        }
    }
}

/// Replaces the stored item with the same id, or appends.
fn upsert_item(stored: &mut Vec<Value>, item: &Value) {
    let key = item.get("id").and_then(id_key);
    if let Some(key) = &key
        && let Some(existing) = stored
            .iter_mut()
            .find(|existing| existing.get("id").and_then(id_key).as_ref() == Some(key))
    {
        *existing = item.clone();
        return;
    }
    stored.push(item.clone());
}

/// `DELETE /arrays`: removes items by id; a missing customer, field or item is not an error.
pub(crate) async fn delete_arrays(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = match parse_detail_body(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let mut out = Violations::default();
    let Some(items) = top_list(&body, "records", &mut out) else {
        return out.into_detail_response();
    };
    let mut deletions: Vec<(String, String, Vec<String>)> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let path = vec![Seg::from("records"), Seg::Index(index)];
        let Some(object) = item.as_object() else {
            out.push(&path, "value is not a valid dict", "type_error.dict");
            continue;
        };
        let key = required_id(object, "customer_id", &path, &mut out);
        let field = required_field_name(object, &path, &mut out);
        let mut ids_path = path.clone();
        ids_path.push(Seg::from("ids"));
        let ids: Option<Vec<String>> = match object.get("ids") {
            None | Some(Value::Null) => {
                out.push(&ids_path, "field required", "value_error.missing");
                None
            }
            Some(Value::Array(ids)) => {
                let keys: Vec<Option<String>> = ids
                    .iter()
                    .enumerate()
                    .map(|(position, id)| {
                        let mut path = ids_path.clone();
                        path.push(Seg::Index(position));
                        check_id(id, &path, &mut out)
                    })
                    .collect();
                keys.into_iter().collect()
            }
            Some(_) => {
                out.push(&ids_path, "value is not a valid list", "type_error.list");
                None
            }
        };
        if let (Some(key), Some(field), Some(ids)) = (key, field, ids) {
            deletions.push((key, field, ids));
        }
    }
    if !out.is_empty() {
        return out.into_detail_response();
    }
    let now = Utc::now();
    let mut world = shared.world();
    for (key, field, ids) in deletions {
        let Some(customer) = world.retainly.customers.get_mut(&key) else {
            continue;
        };
        if let Some(Value::Array(stored)) = customer.fields.get_mut(&field) {
            let before = stored.len();
            stored.retain(|item| {
                item.get("id")
                    .and_then(id_key)
                    .is_none_or(|item_key| !ids.contains(&item_key))
            });
            if stored.len() != before {
                customer.updated_at = now;
            }
        }
    }
    ok()
}

/// `POST /events`: recorded in arrival order; the customer need not exist (events do not create
/// customers, and `data` does not change customer fields).
pub(crate) async fn post_event(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(_) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!("Invalid JSON data in request body: Syntax error")),
            )
                .into_response();
        }
    };
    let mut out = Violations::default();
    let Some(object) = body.as_object() else {
        out.push(
            &[Seg::from("body")],
            "The body must be an object.",
            "object",
        );
        return out.into_errors_response();
    };
    let customer_id = match object.get("customer_id") {
        None | Some(Value::Null) => {
            out.push(
                &[Seg::from("customer_id")],
                "The customer id field is required.",
                "required",
            );
            None
        }
        Some(id) if id_key(id).is_some() => Some(id.clone()),
        Some(_) => {
            out.push(
                &[Seg::from("customer_id")],
                "The customer id must be an integer or a string.",
                "type",
            );
            None
        }
    };
    let event = match object.get("event") {
        None | Some(Value::Null) => {
            out.push(
                &[Seg::from("event")],
                "The event field is required.",
                "required",
            );
            None
        }
        Some(Value::String(event)) if event.trim().is_empty() => {
            out.push(
                &[Seg::from("event")],
                "The event field is required.",
                "required",
            );
            None
        }
        Some(Value::String(event)) if event.chars().count() > MAX_EVENT_NAME => {
            out.push(
                &[Seg::from("event")],
                format!("The event may not be greater than {MAX_EVENT_NAME} characters."),
                "max",
            );
            None
        }
        Some(Value::String(event)) => Some(event.clone()),
        Some(_) => {
            out.push(
                &[Seg::from("event")],
                "The event must be a string.",
                "string",
            );
            None
        }
    };
    let data = match object.get("data") {
        None | Some(Value::Null) => None,
        Some(Value::Object(fields)) => {
            if fields.len() > MAX_EVENT_FIELDS {
                out.push(
                    &[Seg::from("data")],
                    format!("The data may not have more than {MAX_EVENT_FIELDS} items."),
                    "max",
                );
            }
            let mut violations = Violations::default();
            let mut path = vec![Seg::from("data")];
            for (key, value) in fields {
                path.push(Seg::Key(key.clone()));
                check_value(value, &mut path, 0, &mut violations);
                path.pop();
            }
            // Laravel words its messages after the field.
            for violation in violations.0 {
                let message = laravel_message(&violation.path, violation.kind);
                out.push(&violation.path, message, violation.kind);
            }
            Some(Value::Object(fields.clone()))
        }
        Some(_) => {
            out.push(&[Seg::from("data")], "The data must be an object.", "array");
            None
        }
    };
    if !out.is_empty() {
        return out.into_errors_response();
    }
    let (Some(customer_id), Some(event)) = (customer_id, event) else {
        // Both are present when no violation was recorded.
        return out.into_errors_response();
    };
    let mut world = shared.world();
    let seq = world.retainly.events.len() as u64 + 1;
    world.retainly.events.push(RetainlyEvent {
        seq,
        customer_id,
        event,
        data,
        received_at: Utc::now(),
    });
    StatusCode::OK.into_response()
}

fn laravel_message(path: &[Seg], kind: &str) -> String {
    let field = path
        .iter()
        .map(|seg| match seg {
            Seg::Key(key) => key.clone(),
            Seg::Index(index) => index.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".");
    match kind {
        "value_error.any_str.max_length" => format!(
            "The {field} may not be greater than {} characters.",
            validate::MAX_STRING_CHARS
        ),
        "type_error.associative_array" => {
            format!("The {field} may not be an associative array.")
        }
        "value_error.array.nesting" => {
            format!("The {field} may have only 1 nesting layer of arrays.")
        }
        _ => format!("The {field} is invalid."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_upsert_by_id_with_1_and_one_string_the_same() {
        let mut stored = vec![json!({"id": 1, "amount": 1}), json!({"amount": 2})];
        upsert_item(&mut stored, &json!({"id": "1", "amount": 10}));
        upsert_item(&mut stored, &json!({"amount": 3}));
        upsert_item(&mut stored, &json!({"id": 2, "amount": 4}));
        assert_eq!(
            stored,
            vec![
                json!({"id": "1", "amount": 10}),
                json!({"amount": 2}),
                json!({"amount": 3}),
                json!({"id": 2, "amount": 4}),
            ]
        );
    }

    #[test]
    fn offsets_count_characters_across_lines() {
        let body = Bytes::from_static(b"{\n  \"a\": x}");
        assert_eq!(byte_offset(&body, 2, 8), 9);
    }
}
