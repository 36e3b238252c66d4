//! Retainly behind the scheduler: [`RetainlyApi`] is what domain services call.
//!
//! Customer upserts coalesce into `POST /customers` calls of up to 10,000 customers (and at
//! most [`MAX_BATCH_BYTES`] of JSON, since 10,000 customers of 500 fields would make a body no
//! server accepts); the upstream answers for the whole request, so every caller of a batch gets
//! its outcome, except items a 422 names by index, which get their own rejection while the
//! others are sent again.
//!
//! # Idempotency
//! - Customer upserts (merge by id), customer deletes and array deletes: retried on any
//!   transient failure.
//! - `POST /arrays`: retried on any transient failure only when every item carries an `id`
//!   (then it is an upsert); items without one are appended, so a repeat could add them twice.
//! - `POST /events` starts workflows (messages to people): retried only when the upstream surely
//!   did not act — connect errors and 429/408. After a timeout, a dropped connection or a 5xx the
//!   caller gets `UNAVAILABLE`; repeating it is the domain layer's decision.

pub mod client;
pub mod error;
pub mod model;

use std::fmt;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::join_all;

use self::client::Batch;
pub use self::client::RetainlyClient;
pub use self::model::*;
use crate::config::RetainlyConfig;
use crate::error::{Error, ErrorCode, FieldViolation, Reason, Result};
use crate::store::BudgetStore;
use crate::upstream::batching;
use crate::upstream::context::CallContext;
use crate::upstream::scheduler::batch::{BatchHandle, BatchLimits, Batcher};
use crate::upstream::scheduler::fair::CallerShares;
use crate::upstream::scheduler::shared::SharedBudget;
use crate::upstream::scheduler::{Idempotency, Lane, LaneCounters, SchedulerSettings};

/// Objects per request, as documented.
pub const MAX_BATCH: usize = 10_000;
/// Largest coalesced `POST /customers` body.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Longest event name, as documented.
pub const MAX_EVENT_NAME: usize = 50;

struct Inner {
    client: RetainlyClient,
    lane: Lane,
    upserts: Batcher<(), RetainlyCustomer, ()>,
}

/// The Retainly workspace as domain services see it. Cheap to clone.
#[derive(Clone)]
pub struct RetainlyApi {
    inner: Arc<Inner>,
}

impl fmt::Debug for RetainlyApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainlyApi")
            .field("client", &self.inner.client)
            .field("lane", &self.inner.lane)
            .finish_non_exhaustive()
    }
}

impl RetainlyApi {
    /// Builds the client and the scheduler from the gateway's settings, sharing the budget
    /// between callers by `shares`. Must run inside a tokio runtime.
    /// With `budget`, the request budget is the one every replica shares in that store.
    pub fn from_config(
        config: &RetainlyConfig,
        shares: Arc<dyn CallerShares>,
        budget: Option<Arc<dyn BudgetStore>>,
    ) -> Result<Self> {
        let missing = |what: &str| {
            Error::new(
                ErrorCode::FailedPrecondition,
                Reason::UpstreamCredentialsMissing,
                format!("no retainly api {what} is configured"),
            )
            .with_metadata("upstream", client::UPSTREAM)
        };
        let key = config.api_key.as_ref().ok_or_else(|| missing("key"))?;
        let secret = config
            .api_secret
            .as_ref()
            .ok_or_else(|| missing("secret"))?;
        let client = RetainlyClient::new(config.base_url.clone(), key, secret)?;
        let shared = budget.map(|store| SharedBudget::new(store, client::UPSTREAM, key.expose()));
        Ok(Self::with_client(
            client,
            SchedulerSettings::new(config.requests_per_minute)
                .with_shares(shares)
                .with_shared_budget(shared),
        ))
    }

    pub fn with_client(client: RetainlyClient, settings: SchedulerSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                lane: Lane::new(client::UPSTREAM, settings),
                upserts: Batcher::new(BatchLimits {
                    max_items: MAX_BATCH,
                    max_bytes: MAX_BATCH_BYTES,
                }),
            }),
        }
    }

    pub fn counters(&self) -> LaneCounters {
        self.inner.lane.counters()
    }

    /// Stops sending background work (see [`crate::upstream::scheduler::Lane::close_background`]).
    pub fn close_background(&self) {
        self.inner.lane.close_background();
    }

    /// Creates or updates one customer; concurrent upserts share `POST /customers` calls.
    pub async fn upsert_customer(
        &self,
        ctx: &CallContext,
        customer: RetainlyCustomer,
    ) -> Result<()> {
        if customer.fields.contains_key("id") {
            return Err(Error::invalid_argument(vec![FieldViolation::new(
                "fields.id",
                "the id is given separately and must not be a field",
            )]));
        }
        let identity = customer.id.to_string();
        let inner = Arc::clone(&self.inner);
        batching::submit_one(
            &self.inner.lane,
            &self.inner.upserts,
            (),
            customer,
            ctx,
            identity,
            move |handle| upsert_batch(inner, handle).boxed(),
        )
        .await
    }

    /// Upserts several customers; one result per customer, in order.
    pub async fn upsert_customers(
        &self,
        ctx: &CallContext,
        customers: Vec<RetainlyCustomer>,
    ) -> Vec<Result<()>> {
        join_all(
            customers
                .into_iter()
                .map(|customer| self.upsert_customer(ctx, customer)),
        )
        .await
    }

    /// Deletes customers by id (missing ones are not an error).
    pub async fn delete_customers(&self, ctx: &CallContext, ids: Vec<RetainlyId>) -> Result<()> {
        self.send_in_chunks(ctx, &ids, idempotent, Batch::DeleteCustomers)
            .await
    }

    /// Changes items of customers' array fields.
    pub async fn change_arrays(&self, ctx: &CallContext, change: ArrayChange) -> Result<()> {
        match &change {
            ArrayChange::Upsert(records) => {
                self.send_in_chunks(ctx, records, upsert_idempotency, Batch::UpsertArrayItems)
                    .await
            }
            ArrayChange::Delete(records) => {
                self.send_in_chunks(ctx, records, idempotent, Batch::DeleteArrayItems)
                    .await
            }
        }
    }

    /// Sends `items` in chunks of at most [`MAX_BATCH`], one lane call each, stopping at the
    /// first chunk that fails.
    async fn send_in_chunks<'a, T>(
        &self,
        ctx: &CallContext,
        items: &'a [T],
        idempotency: fn(&[T]) -> Idempotency,
        batch: fn(&'a [T]) -> Batch<'a>,
    ) -> Result<()> {
        let client = &self.inner.client;
        for chunk in items.chunks(MAX_BATCH) {
            self.inner
                .lane
                .call(ctx, idempotency(chunk), |timeout| {
                    client.send_batch(batch(chunk), timeout)
                })
                .await?;
        }
        Ok(())
    }

    /// Records an event, starting the workflows that begin with it.
    pub async fn track_event(&self, ctx: &CallContext, event: RetainlyEvent) -> Result<()> {
        let name = event.event.trim();
        if name.is_empty() || name.chars().count() > MAX_EVENT_NAME {
            return Err(Error::invalid_argument(vec![FieldViolation::new(
                "event",
                format!("must be 1 to {MAX_EVENT_NAME} characters"),
            )]));
        }
        let client = self.inner.client.clone();
        self.inner
            .lane
            .call(ctx, Idempotency::UnsafeToRepeat, |timeout| {
                let client = client.clone();
                let event = event.clone();
                async move { client.track_event(&event, timeout).await }
            })
            .await
    }
}

/// An array item without an id is appended again by a repeated request; with ids, a repeat
/// updates the same items.
fn upsert_idempotency(chunk: &[ArrayRecord]) -> Idempotency {
    if chunk
        .iter()
        .all(|record| record.data.iter().all(|item| item.contains_key("id")))
    {
        Idempotency::Idempotent
    } else {
        Idempotency::UnsafeToRepeat
    }
}

/// The idempotency of a batch that a repeat cannot change further (a delete).
fn idempotent<T>(_: &[T]) -> Idempotency {
    Idempotency::Idempotent
}

async fn upsert_batch(inner: Arc<Inner>, handle: BatchHandle<(), RetainlyCustomer, ()>) {
    let client = inner.client.clone();
    batching::drive(
        inner.lane.clone(),
        handle,
        Idempotency::Idempotent,
        "customers",
        move |customers, timeout| {
            let client = client.clone();
            async move { client.upsert_customers(&customers, timeout).await }
        },
    )
    .await;
}
