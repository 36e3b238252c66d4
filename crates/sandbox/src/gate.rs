//! The middleware in front of each emulated API, in the order a request meets it:
//! injected faults (latency, forced 429, dropped connection, 5xx), authentication, the rate
//! limit, the hold gate of tests, the handler, then the response faults (5xx or drop after
//! handling, slow body). Every outcome
//! is counted per route template and status.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::json;
use tokio::time::Instant;

use crate::Api;
use crate::faults::SlowBody;
use crate::rate_limit::retry_after_seconds;
use crate::retently::envelope::RetentlyError;
use crate::state::Shared;

/// Status recorded for a request whose connection was dropped: it got no status at all.
pub(crate) const DROPPED: u16 = 0;

pub(crate) async fn retently(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    gate(shared, Api::Retently, request, next).await
}

pub(crate) async fn retainly(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    gate(shared, Api::Retainly, request, next).await
}

async fn gate(shared: Arc<Shared>, api: Api, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| request.uri().path().to_owned());
    if let Some(traceparent) = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
    {
        let mut control = shared.control();
        let seen = &mut control.stats.traceparents;
        if seen.len() == crate::state::MAX_TRACEPARENTS {
            seen.pop_front();
        }
        seen.push_back(crate::state::TraceparentSeen {
            api,
            route: route.clone(),
            traceparent: traceparent.to_owned(),
        });
    }
    // Counted until the answer is ready, or until the client goes away and the request with it.
    let _in_progress = InProgress::start(&shared, api);
    let plan = shared.control().faults[api.index()].plan();
    if plan.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(plan.latency_ms)).await;
    }
    if let Some(retry_after) = plan.forced_429 {
        let response = too_many_requests(api, retry_after);
        return record(&shared, api, route, response);
    }
    if plan.drop_before {
        record_status(&shared, api, route, DROPPED);
        return dropped();
    }
    if let Some(status) = plan.error_status {
        let response = server_error(api, status);
        return record(&shared, api, route, response);
    }
    let key = match authenticate(&shared, api, &request) {
        Ok(key) => key,
        Err(response) => return record(&shared, api, route, response),
    };
    let admitted = shared.control().limiters[api.index()].check(&key, Instant::now());
    if let Err(wait) = admitted {
        shared.control().stats.rate_limited[api.index()] += 1;
        let response = too_many_requests(api, retry_after_seconds(wait));
        return record(&shared, api, route, response);
    }
    let mut held = shared.control().holds[api.index()].admit(&route);
    if let Some(hold) = held.as_mut().filter(|hold| !hold.after_handling) {
        // An error means the sandbox is gone; the request then goes on.
        let _ = hold.open.wait_for(|open| *open).await;
    }
    let response = next.run(request).await;
    if let Some(hold) = held.as_mut().filter(|hold| hold.after_handling) {
        let _ = hold.open.wait_for(|open| *open).await;
    }
    if let Some(status) = plan.error_after {
        // The request was handled (its effect applied) and then failed, as when an upstream
        // commits and its reply is lost in a proxy or a crash.
        let response = server_error(api, status);
        return record(&shared, api, route, response);
    }
    if plan.drop_after {
        record_status(&shared, api, route, DROPPED);
        return dropped();
    }
    let response = match plan.slow_body {
        Some(slow) => {
            shared.control().faults[api.index()].counts.slow_bodies += 1;
            slow_body(response, slow).await
        }
        None => response,
    };
    record(&shared, api, route, response)
}

/// One request counted in `Stats::in_progress` while it lives.
struct InProgress {
    shared: Arc<Shared>,
    api: Api,
}

impl InProgress {
    fn start(shared: &Arc<Shared>, api: Api) -> InProgress {
        shared.control().stats.in_progress[api.index()] += 1;
        InProgress {
            shared: Arc::clone(shared),
            api,
        }
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let mut control = self.shared.control();
        let count = &mut control.stats.in_progress[self.api.index()];
        *count = count.saturating_sub(1);
    }
}

fn record(shared: &Shared, api: Api, route: String, response: Response) -> Response {
    record_status(shared, api, route, response.status().as_u16());
    response
}

fn record_status(shared: &Shared, api: Api, route: String, status: u16) {
    *shared
        .control()
        .stats
        .requests
        .entry((api, route, status))
        .or_default() += 1;
}

/// Returns the credential the rate limit is kept under, or the API's auth failure.
fn authenticate(shared: &Shared, api: Api, request: &Request) -> Result<String, Response> {
    match api {
        Api::Retently => retently_key(shared, request)
            .ok_or_else(|| RetentlyError::unauthorized().into_response()),
        Api::Retainly => retainly_key(shared, request.headers(), request.uri().path()),
    }
}

/// Any of the accepted forms: `Authorization: api_key=K`, `Authorization: Bearer K`,
/// `X-Api-Key: K`, `?api_key=K`. OAuth access tokens are not emulated: a bearer token is valid
/// when it is one of the configured keys.
fn retently_key(shared: &Shared, request: &Request) -> Option<String> {
    let headers = request.headers();
    let mut candidates: Vec<String> = Vec::new();
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    {
        let value = value.trim();
        if let Some(key) = value.strip_prefix("api_key=") {
            candidates.push(key.to_owned());
        } else if value.len() > 7 && value[..7].eq_ignore_ascii_case("bearer ") {
            candidates.push(value[7..].trim().to_owned());
        }
    }
    if let Some(key) = headers
        .get("x-api-key")
        .and_then(|value| value.to_str().ok())
    {
        candidates.push(key.trim().to_owned());
    }
    if request.uri().query().is_some()
        && let Ok(pairs) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(request.uri())
    {
        candidates.extend(
            pairs
                .0
                .into_iter()
                .filter(|(name, _)| name == "api_key")
                .map(|(_, key)| key),
        );
    }
    candidates
        .into_iter()
        .find(|candidate| shared.retently_keys.iter().any(|key| key == candidate))
}

/// `key` + `secret`, or the `api-key` + `api-secret` pair the doc's later examples use. Failure:
/// 403 `{"message":"forbidden"}` on customers/arrays, 422 `{"errors":{…}}` on events.
fn retainly_key(shared: &Shared, headers: &HeaderMap, path: &str) -> Result<String, Response> {
    let header = |names: [&str; 2]| {
        names.iter().find_map(|name| {
            headers
                .get(*name)
                .and_then(|value| value.to_str().ok())
                .map(str::trim)
                .filter(|value| !value.is_empty())
                .map(str::to_owned)
        })
    };
    let key = header(["key", "api-key"]);
    let secret = header(["secret", "api-secret"]);
    if let (Some(key), Some(secret)) = (&key, &secret)
        && shared
            .retainly_credentials
            .iter()
            .any(|(known_key, known_secret)| known_key == key && known_secret == secret)
    {
        return Ok(key.clone());
    }
    if path == "/events" {
        let mut errors = serde_json::Map::new();
        if key.is_none() {
            errors.insert("key".to_owned(), json!(["The key field is required."]));
        }
        if secret.is_none() {
            errors.insert(
                "secret".to_owned(),
                json!(["The secret field is required."]),
            );
        }
        if errors.is_empty() {
            errors.insert("key".to_owned(), json!(["The key or secret is invalid."]));
        }
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"errors": errors})),
        )
            .into_response());
    }
    Err((StatusCode::FORBIDDEN, Json(json!({"message": "forbidden"}))).into_response())
}

fn too_many_requests(api: Api, retry_after: u64) -> Response {
    match api {
        Api::Retently => RetentlyError::too_many_requests(retry_after).into_response(),
        Api::Retainly => {
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"message": "Too many requests."})),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            response
        }
    }
}

fn server_error(api: Api, status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = status.canonical_reason().unwrap_or("Server Error");
    match api {
        Api::Retently => RetentlyError::new(status, reason).into_response(),
        Api::Retainly => (status, Json(json!({"message": reason}))).into_response(),
    }
}

/// A response whose body fails before its first byte: hyper then aborts the connection, so the
/// client sees the connection close with no (complete) response.
fn dropped() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other(
            "connection dropped by fault injection",
        ))
    });
    Response::new(Body::from_stream(stream))
}

/// Re-sends the body in chunks of `chunk_bytes` with `chunk_delay_ms` between them.
async fn slow_body(response: Response, slow: SlowBody) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return dropped();
    };
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let delay = Duration::from_millis(slow.chunk_delay_ms);
    let chunks: Vec<Bytes> = bytes
        .chunks(slow.chunk_bytes.max(1))
        .map(Bytes::copy_from_slice)
        .collect();
    let stream = futures_util::stream::iter(chunks.into_iter().enumerate()).then(
        move |(index, chunk)| async move {
            if index > 0 {
                tokio::time::sleep(delay).await;
            }
            Ok::<Bytes, Infallible>(chunk)
        },
    );
    Response::from_parts(parts, Body::from_stream(stream))
}
