//! Upstream JSON decoding: the first byte picks a Retently record model (or an error body of
//! either upstream), the rest is the JSON the upstream answered. A record that decodes is
//! converted to the contract's message, as the RPCs and the feedback log do.
//!
//! Checked besides "no panic": a decoding error described for logs and callers never repeats an
//! email address found in the body (the descriptions must name positions, not content).
#![no_main]

use cx_gateway::feedback::convert as feedback_log;
use cx_gateway::convert as shared_convert;
use cx_gateway::grpc::customers::convert as customer_convert;
use cx_gateway::grpc::surveys::convert as survey_convert;
use cx_gateway::pb;
use cx_gateway::upstream::http::describe_json_error;
use cx_gateway::upstream::{retainly, retently};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&model, body)) = data.split_first() else {
        return;
    };
    match model % 12 {
        0 => decode::<retently::Customer>(body, |c| {
            std::hint::black_box(customer_convert::customer(&c));
        }),
        1 => decode::<retently::Company>(body, |c| {
            std::hint::black_box(customer_convert::company(&c));
        }),
        2 => decode::<retently::Feedback>(body, |feedback| {
            let _ = std::hint::black_box(shared_convert::feedback_to_pb(&feedback));
            let _ = std::hint::black_box(feedback_log::feedback_to_pb(&feedback));
        }),
        3 => decode::<retently::Campaign>(body, |c| {
            let _ = std::hint::black_box(c.is_transactional());
            let _ = std::hint::black_box(survey_convert::campaign(&c));
        }),
        4 => decode::<retently::Template>(body, |t| {
            std::hint::black_box(survey_convert::template(&t));
        }),
        5 => decode::<retently::Score>(body, |score| {
            for metric in [pb::Metric::Nps, pb::Metric::Csat, pb::Metric::Ces] {
                let _ = std::hint::black_box(survey_convert::score(&score, metric));
            }
        }),
        6 => decode::<retently::SentSurvey>(body, |s| {
            std::hint::black_box(survey_convert::sent_survey(&s));
        }),
        7 => decode::<retently::Report>(body, |r| {
            std::hint::black_box(survey_convert::report(&r));
        }),
        8 => decode::<retently::Property>(body, |p| {
            std::hint::black_box(shared_convert::property_from_retently(&p));
        }),
        9 => {
            // A webhook body is read through the same model from a JSON value.
            if let Ok(value) = serde_json::from_slice::<Value>(body) {
                let _ = std::hint::black_box(feedback_log::feedback_from_json(value));
            }
        }
        10 => {
            for status in [400, 401, 404, 422, 429, 500] {
                let status = reqwest_status(status);
                let _ = std::hint::black_box(retently::error::parse_rejection(status, body));
            }
        }
        11 => {
            for status in [400, 401, 422, 500] {
                let status = reqwest_status(status);
                let _ = std::hint::black_box(retainly::error::parse_rejection(status, body));
            }
        }
        _ => unreachable!(),
    }
});

/// Decodes as the upstream transport does (`serde_path_to_error` over a parsed value), then
/// either converts the record or describes the error.
fn decode<T: DeserializeOwned>(body: &[u8], convert: impl FnOnce(T)) {
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(error) => {
            let _ = std::hint::black_box(describe_json_error(&error));
            return;
        }
    };
    let emails = emails_in(&value);
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(record) => convert(record),
        Err(error) => {
            let description = format!("{}: {}", error.path(), describe_json_error(error.inner()));
            for email in emails {
                assert!(
                    !description.contains(&email),
                    "a decoding error repeats a value of the body: {description}"
                );
            }
        }
    }
}

/// Every string value of the body that looks like an email address.
fn emails_in(value: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::String(text) if text.len() >= 5 && text.contains('@') => {
                found.push(text.clone())
            }
            Value::Array(items) => stack.extend(items),
            Value::Object(fields) => stack.extend(fields.values()),
            _ => {}
        }
    }
    found
}

/// `parse_rejection` takes the HTTP status of the answer.
fn reqwest_status(code: u16) -> http::StatusCode {
    http::StatusCode::from_u16(code).expect("a valid status code")
}
