//! The Retainly HTTP client: one method per endpoint, one attempt per call.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;
use serde_json::json;

use super::error::parse_rejection;
use super::model::*;
use crate::config::Secret;
use crate::error::{Error, ErrorCode, Reason};
use crate::upstream::http::{Route, Transport};
use crate::upstream::scheduler::AttemptError;

pub const UPSTREAM: &str = "retainly";

// Every endpoint acts on customers: a 404 from any of them is about a customer.
const UPSERT_CUSTOMERS: Route = Route::new("POST", "/customers", "customer");
const DELETE_CUSTOMERS: Route = Route::new("DELETE", "/customers", "customer");
const UPSERT_ARRAYS: Route = Route::new("POST", "/arrays", "customer");
const DELETE_ARRAYS: Route = Route::new("DELETE", "/arrays", "customer");
const EVENTS: Route = Route::new("POST", "/events", "customer");

/// A request of one of the batch endpoints, 1–10,000 entries each.
#[derive(Debug, Clone, Copy)]
pub enum Batch<'a> {
    /// `DELETE /customers`; unknown ids are not an error.
    DeleteCustomers(&'a [RetainlyId]),
    /// `POST /arrays`.
    UpsertArrayItems(&'a [ArrayRecord]),
    /// `DELETE /arrays`; missing customers or fields are not an error.
    DeleteArrayItems(&'a [ArrayDeletion]),
}

/// Typed access to Retainly's tracking API for one workspace.
#[derive(Debug, Clone)]
pub struct RetainlyClient {
    transport: Transport,
}

impl RetainlyClient {
    /// Key and secret travel as the documented `key` and `secret` headers, marked sensitive.
    pub fn new(
        base_url: reqwest::Url,
        api_key: &Secret,
        api_secret: &Secret,
    ) -> Result<Self, Error> {
        let mut headers = HeaderMap::new();
        for (name, secret) in [("key", api_key), ("secret", api_secret)] {
            let mut value = HeaderValue::from_str(secret.expose()).map_err(|_| {
                Error::new(
                    ErrorCode::FailedPrecondition,
                    Reason::UpstreamCredentialsInvalid,
                    format!(
                        "the retainly api {name} contains characters not allowed in an http header"
                    ),
                )
                .with_metadata("upstream", UPSTREAM)
            })?;
            value.set_sensitive(true);
            headers.insert(HeaderName::from_static(name), value);
        }
        Ok(Self {
            transport: Transport::new(UPSTREAM, base_url, headers, parse_rejection)?,
        })
    }

    async fn write(
        &self,
        route: Route,
        segment: &str,
        body: &impl Serialize,
        timeout: Duration,
    ) -> Result<(), AttemptError> {
        let bytes = serde_json::to_vec(body).map_err(|error| {
            AttemptError::permanent(Error::internal(format!(
                "cannot encode {route} body: {error}"
            )))
        })?;
        // Success bodies are a JSON string ("ok") or empty; their content is undocumented and
        // carries nothing the gateway uses.
        self.transport
            .send(route, &[segment], &[], Some(bytes), timeout)
            .await
            .map(drop)
    }

    /// `POST /customers` (1–10,000 customers). The upstream answers for the whole request, so
    /// every customer gets the same outcome.
    pub async fn upsert_customers(
        &self,
        customers: &[RetainlyCustomer],
        timeout: Duration,
    ) -> Result<Vec<Result<(), Error>>, AttemptError> {
        self.write(
            UPSERT_CUSTOMERS,
            "customers",
            &json!({ "customers": customers }),
            timeout,
        )
        .await?;
        Ok(customers.iter().map(|_| Ok(())).collect())
    }

    /// Sends one batch of ids or array records (see [`Batch`]).
    pub async fn send_batch(
        &self,
        batch: Batch<'_>,
        timeout: Duration,
    ) -> Result<(), AttemptError> {
        let (route, segment, body) = match batch {
            Batch::DeleteCustomers(ids) => (
                DELETE_CUSTOMERS,
                "customers",
                json!({ "customers_ids": ids }),
            ),
            Batch::UpsertArrayItems(records) => {
                (UPSERT_ARRAYS, "arrays", json!({ "records": records }))
            }
            Batch::DeleteArrayItems(records) => {
                (DELETE_ARRAYS, "arrays", json!({ "records": records }))
            }
        };
        self.write(route, segment, &body, timeout).await
    }

    /// `POST /events`.
    pub async fn track_event(
        &self,
        event: &RetainlyEvent,
        timeout: Duration,
    ) -> Result<(), AttemptError> {
        self.write(EVENTS, "events", event, timeout).await
    }
}
