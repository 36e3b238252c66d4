//! The Retently API under `/api/v2`, with the legacy `/api/v2/nps/...` aliases. Authentication
//! and the rate limit happen in the gate ([`crate::gate`]).

mod catalog;
mod customers;
pub(crate) mod envelope;
mod feedback;
pub mod model;
mod surveys;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::state::Shared;

/// Every emulated route. Not emulated (404): `DELETE /feedback`, `POST /import`,
/// `DELETE /outbox`, trends, suppressions and `POST /sync-attributes`, whose bodies upstream does
/// not publish.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v2/ping", get(catalog::ping))
        // Customers.
        .route(
            "/api/v2/customers",
            get(customers::list)
                .post(customers::upsert)
                .delete(customers::delete),
        )
        .route(
            "/api/v2/nps/customers",
            get(customers::list).post(customers::upsert),
        )
        .route("/api/v2/customers/{id}", get(customers::get))
        .route("/api/v2/nps/customers/{id}", get(customers::get))
        .route(
            "/api/v2/customers/unsubscribe",
            post(customers::unsubscribe),
        )
        .route(
            "/api/v2/customers/resubscribe",
            post(customers::resubscribe),
        )
        // Transactional surveys.
        .route("/api/v2/survey", post(surveys::send))
        .route(
            "/api/v2/nps/customers/survey",
            post(surveys::send_deprecated),
        )
        // Feedback.
        .route("/api/v2/feedback", get(feedback::list))
        .route("/api/v2/nps/customers/response", get(feedback::list))
        .route("/api/v2/feedback/{id}", get(feedback::get))
        .route("/api/v2/response/tags", post(feedback::set_tags))
        .route(
            "/api/v2/nps/customers/response/tags",
            post(feedback::set_tags),
        )
        .route("/api/v2/response/topics", post(feedback::set_topics))
        .route("/api/v2/{metric}/score", get(feedback::score))
        .route("/api/v2/nps/score", get(feedback::nps_score))
        // Campaigns, templates, companies.
        .route("/api/v2/campaigns", get(catalog::campaigns))
        .route("/api/v2/nps/campaigns", get(catalog::campaigns))
        .route("/api/v2/templates", get(catalog::templates))
        .route("/api/v2/nps/templates", get(catalog::templates))
        .route("/api/v2/templates/{id}", get(catalog::template))
        .route("/api/v2/companies", get(catalog::companies))
        .route("/api/v2/companies/{key}", get(catalog::company))
        // Outbox and reports.
        .route("/api/v2/outbox", get(catalog::outbox))
        .route("/api/v2/nps/outbox", get(catalog::outbox))
        .route("/api/v2/reports", get(catalog::reports))
        .route("/api/v2/reports/", get(catalog::reports))
        .route(
            "/api/v2/reports/{campaign_id}",
            get(catalog::campaign_report),
        )
        .with_state(Arc::clone(&shared))
        .route_layer(axum::middleware::from_fn_with_state(
            shared,
            crate::gate::retently,
        ))
}
