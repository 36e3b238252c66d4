//! The Segment-compatible HTTP intake: `POST /v1/track`, `/v1/identify` and `/v1/batch` (with
//! Segment's `/v1/t`, `/v1/i` and `/v1/import` aliases) on their own port
//! (`CXGW_SEGMENT_LISTEN_ADDR`), so a team points an existing Segment library at the gateway by
//! changing its host and nothing else.
//!
//! - **Who.** HTTP Basic auth with a write key as the user name (what every Segment library
//!   sends), or the body's `writeKey`. Each key is a file on a caller's entry of the callers file
//!   ([`keys`]), so the caller's permissions apply (`events:write` for track, `customers:write`
//!   for identify) and its idempotency scope and deliveries are its own.
//! - **What.** [`message`] turns each message into the gateway's own validated write: `track`
//!   into a `TrackEvent` (the Retainly event, then the surveys its name maps to), `identify`
//!   into an `UpsertCustomers` of one customer. The outbox delivers both through the very
//!   functions the gRPC RPCs use.
//! - **All or nothing.** A request is checked whole (size, JSON, every message, every
//!   permission) before anything is queued, so bad input is answered 400 (or 401, 403, 413) and
//!   never half-applied.
//! - **Acknowledged when durable.** The answer, `200 {"success":true}`, comes once every message
//!   is in the outbox, committed together with its `messageId` record; delivery then retries
//!   across upstream outages and restarts. Segment libraries fire and forget, so waiting for
//!   the upstreams (2.5 requests a second for Retently) would only make their queues overflow.
//!   A store failure half-way through a batch answers 503: the library sends the batch again and
//!   the messages already queued are recognised by their `messageId`.
//! - **Deduplicated.** `messageId` is a track's `TrackEvent` message id (one scope with the gRPC
//!   RPCs: the same id from either door is one event) and an identify's idempotency key; a
//!   repeat makes no second upstream call.

pub mod keys;
pub mod message;

use std::io::Read as _;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use self::keys::{Principal, WriteKeys};
use self::message::{Kind, MAX_BATCH_BYTES, MAX_MESSAGE_BYTES, Planned, Problem};
use crate::app::App;
use crate::domain::Owner;
use crate::domain::writes;
use crate::error::{Error, ErrorCode};
use crate::grpc::methods;
use crate::shutdown::Drain;

/// The idempotency scope of identify messages' `messageId`s (an identify is an
/// `UpsertCustomers`, but a `messageId` is not an UpsertCustomers idempotency key).
const IDENTIFY_SCOPE: &str = "segment:identify";

/// How long a request's body may take to arrive (500 KB at a slow mobile uplink's 20 KB/s is
/// about 25 s).
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Problems listed in one 400 answer (the first ones; the count stays exact).
const MAX_LISTED_PROBLEMS: usize = 100;

/// What the intake shares between requests.
pub struct Intake {
    app: Arc<App>,
    keys: WriteKeys,
}

impl Intake {
    pub fn new(app: Arc<App>, keys: WriteKeys) -> Self {
        Self { app, keys }
    }
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Track,
    Identify,
    Batch,
}

impl Endpoint {
    fn as_str(self) -> &'static str {
        match self {
            Endpoint::Track => "track",
            Endpoint::Identify => "identify",
            Endpoint::Batch => "batch",
        }
    }

    /// Segment's limit for the request's (uncompressed) body.
    fn max_body(self) -> usize {
        match self {
            Endpoint::Batch => MAX_BATCH_BYTES,
            Endpoint::Track | Endpoint::Identify => MAX_MESSAGE_BYTES,
        }
    }
}

/// The intake's routes.
pub fn router(intake: Arc<Intake>) -> Router {
    Router::new()
        .route("/v1/track", post(track))
        .route("/v1/t", post(track))
        .route("/v1/identify", post(identify))
        .route("/v1/i", post(identify))
        .route("/v1/batch", post(batch))
        .route("/v1/import", post(batch))
        .with_state(intake)
}

/// Serves the intake until the drain starts; in-flight requests finish first.
pub async fn serve(listener: TcpListener, intake: Arc<Intake>, drain: Drain) {
    let addr = listener.local_addr().ok();
    let served = axum::serve(listener, router(intake))
        .with_graceful_shutdown(drain.signaled())
        .await;
    if let Err(error) = served {
        tracing::error!(?addr, %error, "the segment intake stopped");
    }
}

async fn track(State(intake): State<Arc<Intake>>, headers: HeaderMap, body: Body) -> Response {
    handle(&intake, Endpoint::Track, &headers, body).await
}

async fn identify(State(intake): State<Arc<Intake>>, headers: HeaderMap, body: Body) -> Response {
    handle(&intake, Endpoint::Identify, &headers, body).await
}

async fn batch(State(intake): State<Arc<Intake>>, headers: HeaderMap, body: Body) -> Response {
    handle(&intake, Endpoint::Batch, &headers, body).await
}

/// An answer other than success, in Segment's shape plus what went wrong where.
struct Refusal {
    status: StatusCode,
    message: String,
    problems: Vec<Problem>,
    problem_count: usize,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            problems: Vec::new(),
            problem_count: 0,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        // `code` and `message` are what Segment's own API answers and its libraries report.
        let code = match self.status {
            StatusCode::BAD_REQUEST => "invalid_request",
            StatusCode::UNAUTHORIZED => "invalid_write_key",
            StatusCode::FORBIDDEN => "permission_denied",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_encoding",
            StatusCode::TOO_MANY_REQUESTS => "rate_limited",
            StatusCode::REQUEST_TIMEOUT => "request_timeout",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "internal",
        };
        let mut body = json!({"success": false, "code": code, "message": self.message});
        if self.problem_count > 0 {
            body["errors"] = json!(self.problems);
            body["error_count"] = json!(self.problem_count);
        }
        (self.status, axum::Json(body)).into_response()
    }
}

async fn handle(intake: &Intake, endpoint: Endpoint, headers: &HeaderMap, body: Body) -> Response {
    let span = tracing::info_span!(
        "segment intake",
        endpoint = endpoint.as_str(),
        caller = tracing::field::Empty,
        messages = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    let response = match tracing::Instrument::instrument(
        accept(intake, endpoint, headers, body, &span),
        span.clone(),
    )
    .await
    {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"success": true}))).into_response(),
        Err(refusal) => {
            tracing::debug!(
                parent: &span,
                status = refusal.status.as_u16(),
                message = %refusal.message,
                "segment request refused"
            );
            refusal.into_response()
        }
    };
    span.record("status", response.status().as_u16());
    crate::telemetry::metrics::metrics().segment_requests.add(
        1,
        &[
            opentelemetry::KeyValue::new("endpoint", endpoint.as_str()),
            opentelemetry::KeyValue::new("status", i64::from(response.status().as_u16())),
        ],
    );
    response
}

async fn accept(
    intake: &Intake,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    span: &tracing::Span,
) -> Result<(), Refusal> {
    // A key in the header is checked before the body is read: a wrong key costs no more than that.
    let from_header = match basic_auth_key(headers) {
        HeaderKey::Absent => None,
        HeaderKey::Malformed => return Err(unauthorized()),
        HeaderKey::Present(key) => Some(intake.keys.resolve(&key).ok_or_else(unauthorized)?),
    };
    let limit = endpoint.max_body();
    // A client that trickles its body would otherwise hold a connection and a task forever.
    let bytes = tokio::time::timeout(BODY_READ_TIMEOUT, read_body(headers, body, limit))
        .await
        .map_err(|_| {
            Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "the body took too long to arrive",
            )
        })??;
    let document: Value = serde_json::from_slice(&bytes)
        .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "invalid json"))?;
    let principal = match from_header {
        Some(principal) => principal,
        // Segment also takes the key as the body's `writeKey` (analytics-python sends both).
        None => match document.get("writeKey") {
            Some(Value::String(key)) if !key.is_empty() => {
                intake.keys.resolve(key).ok_or_else(unauthorized)?
            }
            _ if !intake.keys.authenticates() => Principal::Anonymous,
            _ => return Err(unauthorized()),
        },
    };
    let owner = match &principal {
        Principal::Anonymous => Owner::Anonymous,
        Principal::Caller(caller) => {
            span.record("caller", &**caller.name());
            Owner::Caller(Arc::clone(caller.name()))
        }
    };

    let (messages, implied): (Vec<&Value>, Option<Kind>) = match endpoint {
        Endpoint::Track => (vec![&document], Some(Kind::Track)),
        Endpoint::Identify => (vec![&document], Some(Kind::Identify)),
        Endpoint::Batch => match document.get("batch") {
            Some(Value::Array(items)) => (items.iter().collect(), None),
            _ => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "batch must be an array of messages",
                ));
            }
        },
    };
    span.record("messages", messages.len());

    // Everything is checked before anything is queued.
    // The event rules in force (reloaded while running) decide which campaigns an event names.
    let mappings = &intake.app.config.event_rules.current().mappings();
    let mut planned = Vec::with_capacity(messages.len());
    let mut problems = Vec::new();
    let mut problem_count = 0;
    for (index, message) in messages.iter().enumerate() {
        let index = (endpoint == Endpoint::Batch).then_some(index);
        if endpoint == Endpoint::Batch && encoded_len(message) > MAX_MESSAGE_BYTES {
            let at = index.map(|i| format!(" (batch[{i}])")).unwrap_or_default();
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a message is larger than {MAX_MESSAGE_BYTES} bytes{at}"),
            ));
        }
        match message::plan(mappings, message, implied) {
            Ok(plan) => planned.push(plan),
            Err(found) => {
                problem_count += found.len();
                for mut problem in found {
                    if problems.len() < MAX_LISTED_PROBLEMS {
                        problem.index = index;
                        problems.push(problem);
                    }
                }
            }
        }
    }
    if problem_count > 0 {
        let mut refusal = Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid input: nothing was accepted",
        );
        refusal.problems = problems;
        refusal.problem_count = problem_count;
        return Err(refusal);
    }
    if let Principal::Caller(caller) = &principal
        && let Some(missing) = planned
            .iter()
            .filter_map(Planned::permission)
            .find(|permission| !caller.may(*permission))
    {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "caller `{}` lacks permission `{missing}`: nothing was accepted",
                caller.name()
            ),
        ));
    }

    // Customers' lanes are queued side by side, so the store commits them in a few group
    // commits; within a lane, one after the other, so each customer's messages keep their order.
    let app = &intake.app;
    let owner = &owner;
    futures_util::future::try_join_all(lanes(planned).into_iter().map(|lane| async move {
        for plan in lane {
            queue(app, owner, plan).await?;
        }
        Ok::<(), Error>(())
    }))
    .await
    .map_err(store_refusal)?;
    Ok(())
}

/// Splits messages into lanes that share no customer (no ordering key), each in request order.
fn lanes(planned: Vec<Planned>) -> Vec<Vec<Planned>> {
    // Union-find over message positions: two messages with a key in common share a lane.
    let mut parent: Vec<usize> = (0..planned.len()).collect();
    fn root(parent: &mut [usize], mut at: usize) -> usize {
        while parent[at] != at {
            parent[at] = parent[parent[at]];
            at = parent[at];
        }
        at
    }
    let mut first_with_key: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::new();
    for (index, plan) in planned.iter().enumerate() {
        for key in plan.ordering_keys() {
            match first_with_key.get(key.as_str()) {
                Some(&other) => {
                    let (a, b) = (root(&mut parent, index), root(&mut parent, other));
                    parent[a.max(b)] = a.min(b);
                }
                None => {
                    first_with_key.insert(key, index);
                }
            }
        }
    }
    let roots: Vec<usize> = (0..planned.len())
        .map(|index| root(&mut parent, index))
        .collect();
    let mut lanes: std::collections::BTreeMap<usize, Vec<Planned>> =
        std::collections::BTreeMap::new();
    for (plan, lane) in planned.into_iter().zip(roots) {
        lanes.entry(lane).or_default().push(plan);
    }
    lanes.into_values().collect()
}

/// What became of one accepted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Now in the outbox.
    Queued,
    /// Its `messageId` was seen before: nothing new is queued.
    Duplicate,
    /// Valid, with nothing upstream to do.
    Acknowledged,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Queued => "queued",
            Outcome::Duplicate => "duplicate",
            Outcome::Acknowledged => "acknowledged",
        }
    }
}

/// Queues `request` for `method` under `key` in `scope`: `true` when the key was queued before
/// with the same content.
async fn enqueue<R: writes::WriteRpc + prost::Message>(
    app: &Arc<App>,
    owner: &Owner,
    (method, scope): (&'static str, &'static str),
    request: R,
    key: Option<String>,
    facts: writes::DeliveryFacts,
) -> Result<bool, Error> {
    let encoded = request.encode_to_vec();
    writes::enqueue::<R>(app, owner.clone(), method, scope, encoded, key, facts)
        .await
        .map(|written| written.repeated)
}

/// Queues one planned message in the outbox, deduplicated by its `messageId`.
async fn queue(app: &Arc<App>, owner: &Owner, plan: Planned) -> Result<Outcome, Error> {
    let (kind, queued) = match plan {
        Planned::Acknowledged => {
            record_message("other", Outcome::Acknowledged);
            return Ok(Outcome::Acknowledged);
        }
        Planned::Track { request, facts } => {
            let key = request
                .event
                .as_ref()
                .map(|event| event.message_id.clone())
                .filter(|id| !id.is_empty());
            let queued = enqueue(
                app,
                owner,
                (methods::TRACK_EVENT, methods::TRACK_EVENT),
                request,
                key,
                facts,
            );
            ("track", queued.await)
        }
        Planned::Identify {
            request,
            facts,
            message_id,
        } => {
            let queued = enqueue(
                app,
                owner,
                (methods::UPSERT_CUSTOMERS, IDENTIFY_SCOPE),
                request,
                message_id,
                facts,
            );
            ("identify", queued.await)
        }
    };
    let outcome = match queued {
        Ok(false) => Outcome::Queued,
        Ok(true) => Outcome::Duplicate,
        // A `messageId` seen before with other content: Segment's rule is that the id names the
        // message, so this one is a duplicate too.
        Err(error) if error.code() == ErrorCode::FailedPrecondition => {
            tracing::debug!(
                kind,
                "segment message id seen before with other content, dropped"
            );
            Outcome::Duplicate
        }
        Err(error) => return Err(error),
    };
    record_message(kind, outcome);
    Ok(outcome)
}

fn record_message(kind: &'static str, outcome: Outcome) {
    crate::telemetry::metrics::metrics().segment_messages.add(
        1,
        &[
            opentelemetry::KeyValue::new("type", kind),
            opentelemetry::KeyValue::new("outcome", outcome.as_str()),
        ],
    );
}

/// A failure to queue: the library should send the request again later (its retry is safe,
/// see the module doc).
fn store_refusal(error: Error) -> Refusal {
    tracing::warn!(%error, "cannot queue segment messages");
    let status = match error.code() {
        ErrorCode::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable | ErrorCode::DeadlineExceeded | ErrorCode::Cancelled => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Refusal::new(status, "the messages could not be stored, send them again")
}

fn unauthorized() -> Refusal {
    Refusal::new(StatusCode::UNAUTHORIZED, "invalid write key")
}

/// The write key of an `Authorization: Basic` header: base64 of `key:` (the key is the user
/// name; a password is ignored).
enum HeaderKey {
    Absent,
    Malformed,
    Present(String),
}

fn basic_auth_key(headers: &HeaderMap) -> HeaderKey {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return HeaderKey::Absent;
    };
    let Some((scheme, encoded)) = value.to_str().ok().and_then(|v| v.trim().split_once(' ')) else {
        return HeaderKey::Malformed;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return HeaderKey::Malformed;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    match decoded {
        Some(text) => {
            let key = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
            if key.is_empty() {
                HeaderKey::Malformed
            } else {
                HeaderKey::Present(key.to_owned())
            }
        }
        None => HeaderKey::Malformed,
    }
}

fn too_large(limit: usize) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request is larger than {limit} bytes"),
    )
}

/// The request body, gunzipped when `Content-Encoding: gzip`; at most `limit` bytes both as
/// received and once decompressed (Segment's limits are on the JSON).
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, Refusal> {
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or_default().trim().to_ascii_lowercase())
    {
        None => false,
        Some(encoding) if encoding.is_empty() || encoding == "identity" => false,
        Some(encoding) if encoding == "gzip" => true,
        Some(_) => {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content-encoding must be gzip or identity",
            ));
        }
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large(limit));
    }
    let mut received = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "unreadable body"))?;
        if received.len() + chunk.len() > limit {
            return Err(too_large(limit));
        }
        received.extend_from_slice(&chunk);
    }
    if !gzip {
        return Ok(received);
    }
    let mut decoded = Vec::new();
    // One byte more than allowed tells "exactly at the limit" from "over it".
    let limit_plus_one = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::GzDecoder::new(received.as_slice())
        .take(limit_plus_one)
        .read_to_end(&mut decoded)
        .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "invalid gzip body"))?;
    if decoded.len() > limit {
        return Err(too_large(limit));
    }
    Ok(decoded)
}

/// A message's size as JSON, the measure of Segment's per-message limit.
fn encoded_len(message: &Value) -> usize {
    serde_json::to_vec(message).map_or(usize::MAX, |bytes| bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::writes::DeliveryFacts;
    use crate::pb;

    /// A planned track whose `item_count` tags its request position.
    fn plan(position: usize, keys: &[&str]) -> Planned {
        Planned::Track {
            request: pb::TrackEventRequest::default(),
            facts: DeliveryFacts {
                destinations: Vec::new(),
                item_count: position,
                ordering_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            },
        }
    }

    fn positions(lanes: &[Vec<Planned>]) -> Vec<Vec<usize>> {
        lanes
            .iter()
            .map(|lane| {
                lane.iter()
                    .map(|plan| match plan {
                        Planned::Track { facts, .. } => facts.item_count,
                        _ => usize::MAX,
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn lanes_keep_each_customers_messages_together_and_in_order() {
        // Message 3 links the customers of 0 and 1 (an identify with an email and a user id);
        // 2 and 4 share nobody with them.
        let planned = vec![
            plan(0, &["retainly:u1"]),
            plan(1, &["retently:a@x"]),
            plan(2, &["retainly:u2"]),
            plan(3, &["retently:a@x", "retainly:u1"]),
            plan(4, &["retainly:u3"]),
            plan(5, &["retainly:u1"]),
            Planned::Acknowledged,
        ];
        let lanes = lanes(planned);
        assert_eq!(
            positions(&lanes),
            vec![vec![0, 1, 3, 5], vec![2], vec![4], vec![usize::MAX]]
        );
    }
}
