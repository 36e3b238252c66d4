//! The admin HTTP port: liveness and readiness for probes and load balancers that cannot speak
//! gRPC health, `/metrics` in the Prometheus text format, the feedback pipeline's counters and
//! the Retently webhook receiver.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::feedback::Feedback;
use crate::feedback::webhook::{ReceiveError, Rejection, SIGNATURE_HEADER, WebhookReceiver};
use crate::readiness::{Readiness, Stage};
use crate::shutdown::Drain;

#[derive(Clone)]
struct AdminState {
    /// Set from the moment shutdown begins, before the drain delay.
    stopping: Drain,
    readiness: Readiness,
}

/// `stopping` turns `/readyz` to 503; it is set when shutdown begins, before anything closes.
pub fn router(stopping: Drain, readiness: Readiness) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus_metrics))
        .with_state(AdminState {
            stopping,
            readiness,
        })
}

/// The process is up and its runtime answers.
async fn livez() -> &'static str {
    "ok\n"
}

/// Ready once start-up work is done (outbox recovery), while the store answers and until
/// shutdown begins, so load balancers send calls only to a replica that delivers and commits,
/// and stop sending them before the drain.
async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.stopping.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if state.readiness.stage() != Stage::Ready {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    } else if !state.readiness.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// Every metric series, collected at scrape time.
async fn prometheus_metrics() -> axum::response::Response {
    use axum::response::IntoResponse as _;
    // Collection runs the gauges' probes, some of which read the store: off the async threads.
    let text = tokio::task::spawn_blocking(|| crate::telemetry::metrics().prometheus_text()).await;
    match text {
        Ok(Ok(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::telemetry::prometheus::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot serve metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot collect metrics\n",
            )
                .into_response()
        }
        Err(error) => {
            tracing::warn!(%error, "the metrics task failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot collect metrics\n",
            )
                .into_response()
        }
    }
}

/// The feedback pipeline's routes: its counters, and the Retently webhook receiver when a
/// shared secret is configured (`POST /webhooks/retently`; without a secret the path is 404).
pub fn feedback_routes(feedback: &Feedback) -> Router {
    let stats = Arc::clone(feedback.stats());
    let mut router = Router::new().route(
        "/feedback/stats",
        get(move || {
            let stats = Arc::clone(&stats);
            async move { Json(stats.snapshot()) }
        }),
    );
    if let Some(receiver) = feedback.webhook() {
        router = router.merge(
            Router::new()
                .route("/webhooks/retently", post(retently_webhook))
                .with_state(receiver),
        );
    }
    router
}

/// One Retently webhook export call; see [`crate::feedback::webhook`] for what is accepted.
/// Answers 200 once the responses are durably in the log, 401/400/413 for refused calls (never
/// echoing what was sent) and 503 when the log cannot take them (the sender should retry).
async fn retently_webhook(
    State(receiver): State<Arc<WebhookReceiver>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let limit = receiver.settings().max_body_bytes;
    let declared_too_large = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
        .is_some_and(|length| length > limit);
    let bytes = if declared_too_large {
        None
    } else {
        // An error here is a body over the limit (or a sender that hung up mid-way).
        axum::body::to_bytes(body, limit).await.ok()
    };
    let outcome = match bytes {
        None => Err(receiver.reject(Rejection::TooLarge)),
        Some(bytes) => {
            let secret = headers
                .get(receiver.settings().secret_header.as_str())
                .map(HeaderValue::as_bytes);
            let signature = headers.get(SIGNATURE_HEADER).map(HeaderValue::as_bytes);
            receiver.receive(secret, signature, &bytes).await
        }
    };
    match outcome {
        Ok(receipt) => (StatusCode::OK, Json(serde_json::json!(receipt))).into_response(),
        Err(ReceiveError::Rejected(rejection)) => (
            StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::BAD_REQUEST),
            Json(serde_json::json!({"error": rejection.reason()})),
        )
            .into_response(),
        Err(ReceiveError::Failed(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(serde_json::json!({"error": "unavailable"})),
        )
            .into_response(),
    }
}
