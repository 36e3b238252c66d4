//! Reading Retainly's error bodies: FastAPI's `{"detail":[{"loc","msg","type"}]}` on
//! `/customers` and `/arrays`, Laravel's `{"errors":{"field":["msg"]}}` on `/events` (which also
//! reports bad credentials as a 422), a bare string for malformed JSON, and
//! `{"message":"forbidden"}` for auth failures.

use reqwest::StatusCode;
use serde_json::Value;

use crate::error::FieldViolation;
use crate::upstream::http::Rejection;
use crate::upstream::retently::error::field_path;

pub fn parse_rejection(_status: StatusCode, body: &[u8]) -> Rejection {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Rejection::default();
    };
    let mut rejection = Rejection::default();
    match &value {
        Value::String(text) => rejection.message = Some(text.clone()),
        Value::Object(object) => {
            rejection.message = object
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if let Some(Value::Array(details)) = object.get("detail") {
                for detail in details {
                    let field = detail
                        .get("loc")
                        .and_then(Value::as_array)
                        .map(|loc| loc_path(loc))
                        .unwrap_or_default();
                    let message = detail
                        .get("msg")
                        .and_then(Value::as_str)
                        .unwrap_or("invalid value");
                    rejection
                        .violations
                        .push(FieldViolation::new(field, message));
                }
            }
            if let Some(Value::Object(errors)) = object.get("errors") {
                for (field, messages) in errors {
                    if matches!(field.as_str(), "key" | "secret" | "api-key" | "api-secret") {
                        rejection.credentials = true;
                        continue;
                    }
                    let field = field_path(field);
                    match messages {
                        Value::Array(messages) => rejection.violations.extend(
                            messages
                                .iter()
                                .filter_map(Value::as_str)
                                .map(|message| FieldViolation::new(&field, message)),
                        ),
                        Value::String(message) => {
                            rejection
                                .violations
                                .push(FieldViolation::new(&field, message));
                        }
                        _ => {}
                    }
                }
            }
        }
        _ => {}
    }
    rejection
}

/// `["body", "customers", 3, "tags", 0]` → `customers[3].tags[0]`.
fn loc_path(loc: &[Value]) -> String {
    let mut out = String::new();
    for (position, segment) in loc.iter().enumerate() {
        match segment {
            Value::String(key) if position == 0 && key == "body" => {}
            Value::String(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Value::Number(index) => {
                out.push('[');
                out.push_str(&index.to_string());
                out.push(']');
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fastapi_details_become_field_paths() {
        let rejection = parse_rejection(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"detail":[{"loc":["body","customers",3,"tags",0],"msg":"too long","type":"value_error"}]}"#,
        );
        assert_eq!(
            rejection.violations,
            vec![FieldViolation::new("customers[3].tags[0]", "too long")]
        );
        assert!(!rejection.credentials);
    }

    #[test]
    fn laravel_errors_and_credential_failures() {
        let rejection = parse_rejection(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"errors":{"event":["The event may not be greater than 50 characters."]}}"#,
        );
        assert_eq!(rejection.violations[0].field, "event");
        let rejection = parse_rejection(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"errors":{"key":["The key is invalid."]}}"#,
        );
        assert!(rejection.credentials);
        assert!(rejection.violations.is_empty());
    }

    #[test]
    fn string_bodies_are_messages() {
        let rejection = parse_rejection(
            StatusCode::BAD_REQUEST,
            br#""Invalid JSON data in request body: Syntax error""#,
        );
        assert_eq!(
            rejection.message.as_deref(),
            Some("Invalid JSON data in request body: Syntax error")
        );
    }
}
