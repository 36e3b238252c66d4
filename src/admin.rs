//! The admin HTTP port: liveness and readiness for probes and load balancers that cannot speak
//! gRPC health, and `/metrics` in the Prometheus text format.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::shutdown::Drain;

#[derive(Clone)]
struct AdminState {
    drain: Drain,
}

pub fn router(drain: Drain) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus_metrics))
        .with_state(AdminState { drain })
}

/// The process is up and its runtime answers.
async fn livez() -> &'static str {
    "ok\n"
}

/// Ready until draining starts, so load balancers stop sending new calls first.
async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.drain.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
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
