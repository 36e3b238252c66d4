//! Reading Retently's error bodies: the `{message, code, data}` envelope with a Laravel-style
//! message ("The subscribers.3.email field is required."), or an `errors` map.

use reqwest::StatusCode;
use serde_json::Value;

use crate::error::FieldViolation;
use crate::upstream::http::Rejection;

/// Extracts field violations from a 4xx body. A message naming a field path
/// (`subscribers.3.email`) becomes a violation of `subscribers[3].email`.
pub fn parse_rejection(status: StatusCode, body: &[u8]) -> Rejection {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Rejection::default();
    };
    let message = value
        .get("message")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|message| !message.is_empty())
        .map(str::to_owned);
    let mut violations = Vec::new();
    for container in [value.get("errors"), value.get("data")] {
        if let Some(Value::Object(fields)) = container {
            for (field, messages) in fields {
                let field = field_path(field);
                match messages {
                    Value::String(text) => violations.push(FieldViolation::new(&field, text)),
                    Value::Array(texts) => violations.extend(
                        texts
                            .iter()
                            .filter_map(Value::as_str)
                            .map(|text| FieldViolation::new(&field, text)),
                    ),
                    _ => {}
                }
            }
        }
    }
    if violations.is_empty()
        && matches!(status.as_u16(), 400 | 422)
        && let Some(message) = &message
    {
        let field = field_in_message(message).unwrap_or_default();
        violations.push(FieldViolation::new(field, message.clone()));
    }
    Rejection {
        violations,
        message,
        credentials: false,
    }
}

/// `The subscribers.3.email field is required.` → `subscribers[3].email`.
fn field_in_message(message: &str) -> Option<String> {
    let rest = message.strip_prefix("The ")?;
    let token = rest.split_whitespace().next()?;
    let looks_like_a_field = token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
        && token.chars().any(|c| c.is_ascii_alphabetic());
    looks_like_a_field.then(|| field_path(token))
}

/// Dotted paths with numeric segments as indexes: `subscribers.3.email` → `subscribers[3].email`.
pub fn field_path(dotted: &str) -> String {
    let mut out = String::new();
    for segment in dotted.split('.').filter(|s| !s.is_empty()) {
        if segment.chars().all(|c| c.is_ascii_digit()) {
            out.push('[');
            out.push_str(segment);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laravel_messages_name_the_field() {
        let rejection = parse_rejection(
            StatusCode::BAD_REQUEST,
            br#"{"message":"The subscribers.3.email field is required.","code":400,"data":null}"#,
        );
        assert_eq!(
            rejection.violations,
            vec![FieldViolation::new(
                "subscribers[3].email",
                "The subscribers.3.email field is required."
            )]
        );
        let rejection = parse_rejection(
            StatusCode::BAD_REQUEST,
            br#"{"message":"Too vague to parse.","code":400,"data":null}"#,
        );
        assert_eq!(rejection.violations[0].field, "");
    }

    #[test]
    fn error_maps_become_violations() {
        let rejection = parse_rejection(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"message":"invalid","errors":{"subscribers.0.email":["bad email","too long"]}}"#,
        );
        assert_eq!(rejection.violations.len(), 2);
        assert_eq!(rejection.violations[1].field, "subscribers[0].email");
    }

    #[test]
    fn non_json_bodies_are_tolerated() {
        let rejection = parse_rejection(StatusCode::BAD_REQUEST, b"<html>bad gateway</html>");
        assert!(rejection.violations.is_empty());
        assert!(rejection.message.is_none());
    }
}
