//! Stateful emulator of the Retently and Retainly REST APIs.
//!
//! The sandbox is the upstream of every integration test, every benchmark and
//! `cx-gateway serve --sandbox`. It follows the public API documents (not any client): the same
//! paths (current and legacy aliases), authentication forms, envelopes, pagination, validation
//! rules and limits, the Retently rate limit, and it adds what tests need: seeded realistic data,
//! simulated survey responses, a feedback webhook, fault injection and observation.
//!
//! Both APIs share one listener: Retently under `/api/v2/...`, Retainly at the root
//! (`/customers`, `/arrays`, `/events`), the admin API under `/_sandbox/...`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use cx_sandbox::{Api, Sandbox, SandboxConfig};
//! let sandbox = Sandbox::new(SandboxConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let handle = sandbox.handle().clone();
//! tokio::spawn(sandbox.serve(listener, std::future::pending()));
//! assert_eq!(handle.rate_limited(Api::Retently), 0);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`config`]: [`SandboxConfig`], [`SeedConfig`], [`WebhookConfig`].
//! - `state`: the shared state (data of both accounts, faults, limits, counters).
//! - `gate`: the middleware in front of each API: faults, auth, rate limit, counting.
//! - `retently`: the Retently routes (`customers`, `surveys`, `feedback`, `catalog`), the
//!   envelope and list parameters (`envelope`) and the records (`model`).
//! - `retainly`: the Retainly routes, the documented limits (`validate`) and the records
//!   (`model`).
//! - `seed`: generated seed data and simulated responses.
//! - `webhook`: feedback deliveries and their optional signature.
//! - `faults`: [`FaultConfig`] and the seeded fault decisions.
//! - `rate_limit`: the sliding-window limiter.
//! - `handle`: [`SandboxHandle`], in-process control and observation.
//! - `admin`: the `/_sandbox` HTTP twin of the handle.
//! - `time`, `ids`: timestamp formats and ObjectId-like ids.

// Handlers and the gate return early with a finished response as the error value; boxing every
// one of them would add noise for no benefit on these cold paths.
#![allow(clippy::result_large_err)]

mod admin;
pub mod config;
mod faults;
mod gate;
mod handle;
mod ids;
mod rate_limit;
mod retainly;
mod retently;
mod seed;
mod state;
mod time;
mod webhook;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;

pub use crate::config::{
    DEFAULT_RETAINLY_KEY, DEFAULT_RETAINLY_SECRET, DEFAULT_RETENTLY_API_KEY, SandboxConfig,
    SeedConfig, UnknownEmails, WebhookConfig,
};
pub use crate::faults::{FaultConfig, FaultCounts, SlowBody};
pub use crate::handle::{PerApi, RequestCount, SandboxHandle, StatsSnapshot};
pub use crate::retainly::model::{RetainlyCustomer, RetainlyEvent};
pub use crate::state::{HoldSpec, SurveySend, TraceparentSeen, WebhookStats};
pub use crate::webhook::{SIGNATURE_HEADER, delivery_body, signature};

/// One of the two emulated APIs; each has its own faults, rate limit and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    Retently,
    Retainly,
}

impl Api {
    pub(crate) fn index(self) -> usize {
        match self {
            Api::Retently => 0,
            Api::Retainly => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Api::Retently => "retently",
            Api::Retainly => "retainly",
        }
    }

    pub fn from_name(name: &str) -> Option<Api> {
        [Api::Retently, Api::Retainly]
            .into_iter()
            .find(|api| api.as_str().eq_ignore_ascii_case(name))
    }
}

/// A running (or ready to run) emulator. Cheap to clone: clones share all state.
#[derive(Clone)]
pub struct Sandbox {
    handle: SandboxHandle,
}

impl Sandbox {
    /// Builds the emulator and its seed data. Needs no runtime; background work starts in
    /// [`Sandbox::serve`].
    pub fn new(config: SandboxConfig) -> Sandbox {
        Sandbox {
            handle: SandboxHandle {
                shared: Arc::new(state::Shared::new(config)),
            },
        }
    }

    /// In-process control and observation.
    pub fn handle(&self) -> &SandboxHandle {
        &self.handle
    }

    /// Both APIs and the admin API.
    pub fn router(&self) -> Router {
        let shared = Arc::clone(&self.handle.shared);
        let retainly = Router::new()
            .route(
                "/customers",
                post(retainly::post_customers).delete(retainly::delete_customers),
            )
            .route(
                "/arrays",
                post(retainly::post_arrays).delete(retainly::delete_arrays),
            )
            .route("/events", post(retainly::post_event))
            .with_state(Arc::clone(&shared))
            .route_layer(axum::middleware::from_fn_with_state(
                Arc::clone(&shared),
                gate::retainly,
            ));
        Router::new()
            .merge(retently::router(shared))
            .merge(retainly)
            .merge(admin::router(self.handle.clone()))
            .fallback(not_found)
    }

    /// Serves until `shutdown` completes, then drains open connections. Also runs the background
    /// feedback simulation when configured.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let simulation = self
            .handle
            .shared
            .simulate_feedback_per_second
            .filter(|rate| rate.is_finite() && *rate > 0.0)
            .map(|rate| tokio::spawn(simulate_forever(self.handle.clone(), rate)));
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "sandbox listening");
        }
        let result = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await;
        if let Some(simulation) = simulation {
            simulation.abort();
        }
        result
    }
}

/// New responses at `rate` per second. Rates above 1,000/s are delivered in batches every
/// millisecond, since a timer cannot tick faster than that usefully.
async fn simulate_forever(handle: SandboxHandle, rate: f64) {
    let period = Duration::from_secs_f64((1.0 / rate).max(0.001));
    let per_tick = ((rate / 1000.0).ceil() as usize).max(1);
    let mut interval = tokio::time::interval(period);
    // Falling behind (a paused process, a busy machine) should not produce a burst afterwards.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        handle.simulate_feedback(per_tick);
    }
}

/// Unknown paths: Retently's envelope under `/api/v2`, a plain JSON 404 elsewhere.
async fn not_found(uri: Uri) -> Response {
    if uri.path().starts_with("/api/") {
        retently::envelope::RetentlyError::not_found("Not found.").into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"message": "not found"})),
        )
            .into_response()
    }
}
