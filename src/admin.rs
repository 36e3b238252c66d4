//! The admin HTTP port: liveness and readiness for probes and load balancers that cannot speak
//! gRPC health.

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
