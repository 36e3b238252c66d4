//! The admin API under `/_sandbox`: the HTTP twin of [`crate::SandboxHandle`]. No auth (the
//! sandbox listens on loopback in every supported setup); errors are `{"error": "..."}`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::faults::{FaultConfig, validate};
use crate::{Api, SandboxHandle, WebhookConfig};

pub(crate) fn router(handle: SandboxHandle) -> Router {
    Router::new()
        .route("/_sandbox/stats", get(stats))
        .route("/_sandbox/stats/reset", post(reset))
        .route("/_sandbox/traceparents", get(traceparents))
        .route(
            "/_sandbox/faults/{api}",
            get(get_faults).put(put_faults).delete(delete_faults),
        )
        .route(
            "/_sandbox/rate-limit/{api}",
            get(get_rate_limit).put(put_rate_limit),
        )
        .route(
            "/_sandbox/webhook",
            get(get_webhook).put(put_webhook).delete(delete_webhook),
        )
        .route("/_sandbox/feedback/simulate", post(simulate))
        .route("/_sandbox/retently/customers", get(retently_customers))
        .route("/_sandbox/retently/feedback", get(retently_feedback))
        .route("/_sandbox/retently/outbox", get(retently_outbox))
        .route("/_sandbox/retently/surveys", get(survey_sends))
        .route("/_sandbox/retently/campaigns", get(retently_campaigns))
        .route("/_sandbox/retainly/customers", get(retainly_customers))
        .route("/_sandbox/retainly/customers/{id}", get(retainly_customer))
        .route("/_sandbox/retainly/events", get(retainly_events))
        .with_state(handle)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn api(name: &str) -> Result<Api, Response> {
    Api::from_name(name).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            format!("unknown api {name:?}: use retently or retainly"),
        )
    })
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|cause| error(StatusCode::BAD_REQUEST, format!("invalid body: {cause}")))
}

async fn stats(State(handle): State<SandboxHandle>) -> Json<Value> {
    Json(json!(handle.stats()))
}

async fn traceparents(State(handle): State<SandboxHandle>) -> Json<Value> {
    Json(json!({ "traceparents": handle.traceparents() }))
}

async fn reset(State(handle): State<SandboxHandle>) -> StatusCode {
    handle.reset_counters();
    StatusCode::NO_CONTENT
}

async fn get_faults(State(handle): State<SandboxHandle>, Path(name): Path<String>) -> Response {
    match api(&name) {
        Ok(api) => Json(json!(handle.faults(api))).into_response(),
        Err(response) => response,
    }
}

async fn put_faults(
    State(handle): State<SandboxHandle>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let api = match api(&name) {
        Ok(api) => api,
        Err(response) => return response,
    };
    let faults: FaultConfig = match parse(&body) {
        Ok(faults) => faults,
        Err(response) => return response,
    };
    if let Err(message) = validate(&faults) {
        return error(StatusCode::BAD_REQUEST, message);
    }
    handle.set_faults(api, faults.clone());
    Json(json!(faults)).into_response()
}

async fn delete_faults(State(handle): State<SandboxHandle>, Path(name): Path<String>) -> Response {
    match api(&name) {
        Ok(api) => {
            handle.clear_faults(api);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(response) => response,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RateLimitBody {
    requests_per_window: u32,
}

async fn get_rate_limit(State(handle): State<SandboxHandle>, Path(name): Path<String>) -> Response {
    match api(&name) {
        Ok(api) => Json(json!({"requestsPerWindow": handle.rate_limit(api)})).into_response(),
        Err(response) => response,
    }
}

async fn put_rate_limit(
    State(handle): State<SandboxHandle>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let api = match api(&name) {
        Ok(api) => api,
        Err(response) => return response,
    };
    match parse::<RateLimitBody>(&body) {
        Ok(limit) => {
            handle.set_rate_limit(api, limit.requests_per_window);
            Json(json!({"requestsPerWindow": limit.requests_per_window})).into_response()
        }
        Err(response) => response,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WebhookBody {
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    signing_secret: Option<String>,
    #[serde(default)]
    body_template: Option<Value>,
}

/// Shows the target and header names, never header values or the secret.
async fn get_webhook(State(handle): State<SandboxHandle>) -> Json<Value> {
    let webhook = handle.shared.control().webhook.clone();
    Json(match webhook {
        None => json!({"webhook": null}),
        Some(webhook) => json!({"webhook": {
            "url": webhook.url,
            "headers": webhook.headers.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>(),
            "signed": webhook.signing_secret.is_some(),
            "bodyTemplate": webhook.body_template,
        }}),
    })
}

async fn put_webhook(State(handle): State<SandboxHandle>, body: Bytes) -> Response {
    let body: WebhookBody = match parse(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    if reqwest::Url::parse(&body.url)
        .map(|url| !matches!(url.scheme(), "http" | "https"))
        .unwrap_or(true)
    {
        return error(StatusCode::BAD_REQUEST, "url must be an http or https URL");
    }
    handle.set_webhook(Some(WebhookConfig {
        url: body.url,
        headers: body.headers.into_iter().collect(),
        signing_secret: body.signing_secret,
        body_template: body.body_template,
    }));
    StatusCode::NO_CONTENT.into_response()
}

async fn delete_webhook(State(handle): State<SandboxHandle>) -> StatusCode {
    handle.set_webhook(None);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulateBody {
    count: usize,
}

/// At most this many per call, so one request cannot stall the emulator.
const MAX_SIMULATE: usize = 10_000;

async fn simulate(State(handle): State<SandboxHandle>, body: Bytes) -> Response {
    let body: SimulateBody = match parse(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    if body.count > MAX_SIMULATE {
        return error(
            StatusCode::BAD_REQUEST,
            format!("count must be at most {MAX_SIMULATE}"),
        );
    }
    let feedback = handle.simulate_feedback(body.count);
    Json(json!({"feedback": feedback})).into_response()
}

#[derive(Deserialize)]
struct EmailQuery {
    email: Option<String>,
}

async fn retently_customers(
    State(handle): State<SandboxHandle>,
    Query(query): Query<EmailQuery>,
) -> Response {
    match query.email {
        Some(email) => match handle.retently_customer(&email) {
            Some(customer) => Json(json!({"customers": [customer]})).into_response(),
            None => error(StatusCode::NOT_FOUND, "no customer with that email"),
        },
        None => Json(json!({"customers": handle.retently_customers()})).into_response(),
    }
}

async fn retently_feedback(State(handle): State<SandboxHandle>) -> Json<Value> {
    Json(json!({"feedback": handle.feedback()}))
}

async fn retently_outbox(State(handle): State<SandboxHandle>) -> Json<Value> {
    Json(json!({"surveys": handle.outbox()}))
}

async fn survey_sends(State(handle): State<SandboxHandle>) -> Json<Value> {
    Json(json!({"sends": handle.survey_sends()}))
}

async fn retently_campaigns(State(handle): State<SandboxHandle>) -> Json<Value> {
    Json(json!({"campaigns": handle.campaigns()}))
}

async fn retainly_customers(State(handle): State<SandboxHandle>) -> Json<Value> {
    Json(json!({"customers": handle.retainly_customers()}))
}

/// The path segment is the id as text, which names the same customer as the number.
async fn retainly_customer(
    State(handle): State<SandboxHandle>,
    Path(id): Path<String>,
) -> Response {
    match handle.retainly_customer(&Value::String(id)) {
        Some(customer) => Json(json!(customer)).into_response(),
        None => error(StatusCode::NOT_FOUND, "no customer with that id"),
    }
}

async fn retainly_events(State(handle): State<SandboxHandle>) -> Json<Value> {
    Json(json!({"events": handle.retainly_events()}))
}
