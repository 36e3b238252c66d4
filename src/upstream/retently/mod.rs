//! Retently behind the scheduler: [`RetentlyApi`] is what domain services call.
//!
//! Every method takes a [`CallContext`] and goes through the account's [`Lane`] (budget,
//! priorities, retries, breaker). On top of that:
//! - survey sends to the same (campaign, delay) coalesce into `POST /survey` calls of up to 100
//!   recipients, and customer upserts into `POST /customers` calls of up to
//!   [`MAX_UPSERT_BATCH`]; each caller gets its own recipient's outcome;
//! - identical in-flight reads share one call; campaigns, templates, a template by id, scores
//!   and reports are cached for `cache_ttl`.
//!
//! # Idempotency (what is retried after a failure that may have been applied)
//! - Reads, customer upserts (keyed by email), deletes, unsubscribes, resubscribes and tag/topic
//!   *replacement*: retried on any transient failure.
//! - `POST /survey`: a repeat would send a second survey, so it is retried only when the
//!   upstream surely did not act — nothing sent (connect, DNS, TLS) or refused up front (429,
//!   408, 503). After a timeout, a dropped connection, a 500, 502 or 504 the caller gets
//!   `UNAVAILABLE` and the domain layer decides (the outbox checks the sent-survey history before
//!   sending again). Tag/topic *appends* follow the same rule, without a history to check.

pub mod client;
pub mod error;
pub mod model;
pub mod spool;

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::join_all;

pub use self::client::{CustomerChange, RetentlyClient};
pub use self::model::*;
use crate::config::{RetentlyConfig, Secret};
use crate::error::{Error, ErrorCode, FieldViolation, Reason, Result};
use crate::store::BudgetStore;
use crate::upstream::batching;
use crate::upstream::context::CallContext;
use crate::upstream::scheduler::batch::{BatchHandle, BatchLimits, Batcher};
use crate::upstream::scheduler::cache::{Caching, Reads};
use crate::upstream::scheduler::fair::CallerShares;
use crate::upstream::scheduler::shared::SharedBudget;
use crate::upstream::scheduler::{
    AttemptError, Idempotency, Lane, LaneCounters, SchedulerSettings,
};

/// Recipients per `POST /survey`, as documented (1–100).
pub const MAX_SURVEY_BATCH: usize = 100;
/// Customers per coalesced `POST /customers`. The current API documents no cap; the legacy
/// guidelines capped writes at 100 per request, so 100 is the size known to be accepted.
pub const MAX_UPSERT_BATCH: usize = 100;
/// Addresses per delete/unsubscribe/resubscribe call (same reasoning as upserts).
pub const MAX_CHANGE_BATCH: usize = 100;
/// Extra calls one unsubscribe/resubscribe batch may spend finding the addresses for which the
/// upstream refused it as a whole (see `RetentlyApi::isolate`): a few unknown addresses' worth,
/// so one bad batch cannot spend a large part of the 150/min budget.
const MAX_ISOLATION_CALLS: usize = 32;

/// Whether a refused batch of this change is searched for the addresses that caused it. Only
/// the opt-out changes, for which the docs report whole-batch failures.
fn isolates_refusals(change: CustomerChange) -> bool {
    matches!(
        change,
        CustomerChange::Unsubscribe | CustomerChange::Resubscribe
    )
}

/// Whether the upstream refused a call because of what it holds (an unknown or invalid address)
/// rather than failing it (outage, budget, deadline, credentials), so a smaller batch may pass.
fn refused_for_items(error: &Error) -> bool {
    matches!(
        error.code(),
        ErrorCode::NotFound | ErrorCode::InvalidArgument
    )
}
/// Encoded size a coalesced batch stays under; a few KB per customer with properties.
const MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// Where survey sends coalesce: one campaign with one delay (`None`: the campaign's own delay,
/// which differs from an explicit 0).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SurveyKey {
    campaign_id: String,
    delay_days: Option<u32>,
}

struct Inner {
    client: RetentlyClient,
    lane: Lane,
    surveys: Batcher<SurveyKey, CustomerInput, SurveyOutcome>,
    upserts: Batcher<(), CustomerInput, CustomerUpsert>,
    campaigns: Reads<(), Arc<[Campaign]>>,
    templates: Reads<(), Arc<[Template]>>,
    template: Reads<String, Template>,
    scores: Reads<Metric, Score>,
    reports: Reads<Option<String>, Arc<[Report]>>,
    customer: Reads<String, Customer>,
    customers: Reads<String, Page<Customer>>,
    feedback_item: Reads<String, Feedback>,
    feedback: Reads<String, Page<Feedback>>,
    company: Reads<String, Company>,
    companies: Reads<String, Page<Company>>,
    outbox: Reads<String, Page<SentSurvey>>,
}

/// The Retently account as domain services see it. Cheap to clone.
#[derive(Clone)]
pub struct RetentlyApi {
    inner: Arc<Inner>,
    /// On a store shared by several replicas: where survey sends go to be batched by one of
    /// them (see [`spool`]).
    spool: Option<Arc<spool::SurveySpool>>,
}

impl fmt::Debug for RetentlyApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetentlyApi")
            .field("client", &self.inner.client)
            .field("lane", &self.inner.lane)
            .finish_non_exhaustive()
    }
}

impl RetentlyApi {
    /// Builds the client and the scheduler from the gateway's settings, sharing the budget
    /// between callers by `shares`. Must run inside a tokio runtime (the scheduler spawns its
    /// dispatcher).
    /// With `budget`, the request budget is the one every replica shares in that store.
    pub fn from_config(
        config: &RetentlyConfig,
        shares: Arc<dyn CallerShares>,
        budget: Option<Arc<dyn BudgetStore>>,
    ) -> Result<Self> {
        let api_key = config.api_key.as_ref().ok_or_else(|| {
            Error::new(
                ErrorCode::FailedPrecondition,
                Reason::UpstreamCredentialsMissing,
                "no retently api key is configured",
            )
            .with_metadata("upstream", client::UPSTREAM)
        })?;
        let shared =
            budget.map(|store| SharedBudget::new(store, client::UPSTREAM, api_key.expose()));
        Self::new(
            config.base_url.clone(),
            api_key,
            SchedulerSettings::new(config.requests_per_minute)
                .with_window(config.rate_window)
                .with_shares(shares)
                .with_shared_budget(shared),
        )
    }

    pub fn new(
        base_url: reqwest::Url,
        api_key: &Secret,
        settings: SchedulerSettings,
    ) -> Result<Self> {
        let client = RetentlyClient::new(base_url, api_key)?;
        Ok(Self::with_client(client, settings))
    }

    pub fn with_client(client: RetentlyClient, settings: SchedulerSettings) -> Self {
        let ttl = settings.cache_ttl;
        let capacity = settings.cache_capacity;
        let limits = |max_items| BatchLimits {
            max_items,
            max_bytes: MAX_BATCH_BYTES,
        };
        let inner = Inner {
            lane: Lane::new(client::UPSTREAM, settings),
            client,
            surveys: Batcher::new(limits(MAX_SURVEY_BATCH)),
            upserts: Batcher::new(limits(MAX_UPSERT_BATCH)),
            campaigns: Reads::new(client::UPSTREAM, ttl, capacity),
            templates: Reads::new(client::UPSTREAM, ttl, capacity),
            template: Reads::new(client::UPSTREAM, ttl, capacity),
            scores: Reads::new(client::UPSTREAM, ttl, capacity),
            reports: Reads::new(client::UPSTREAM, ttl, capacity),
            customer: Reads::new(client::UPSTREAM, ttl, capacity),
            customers: Reads::new(client::UPSTREAM, ttl, capacity),
            feedback_item: Reads::new(client::UPSTREAM, ttl, capacity),
            feedback: Reads::new(client::UPSTREAM, ttl, capacity),
            company: Reads::new(client::UPSTREAM, ttl, capacity),
            companies: Reads::new(client::UPSTREAM, ttl, capacity),
            outbox: Reads::new(client::UPSTREAM, ttl, capacity),
        };
        Self {
            inner: Arc::new(inner),
            spool: None,
        }
    }

    /// The same account, its single-recipient survey sends batched across replicas through
    /// `spool` (see [`spool`]); [`spool::run_sender`] must run for them to go out.
    pub fn with_survey_spool(mut self, spool: Arc<spool::SurveySpool>) -> Self {
        self.spool = Some(spool);
        self
    }

    /// The survey spool, when sends are batched across replicas.
    pub fn survey_spool(&self) -> Option<&Arc<spool::SurveySpool>> {
        self.spool.as_ref()
    }

    /// What the scheduler has done so far (grants, sheds, retries, 429s seen).
    pub fn counters(&self) -> LaneCounters {
        self.inner.lane.counters()
    }

    /// Stops sending background work (see [`crate::upstream::scheduler::Lane::close_background`]).
    pub fn close_background(&self) {
        self.inner.lane.close_background();
    }

    // ---- surveys ----

    /// Sends a transactional survey to one recipient. Concurrent sends to the same campaign and
    /// delay share `POST /survey` calls (those of every replica, with a survey spool).
    pub async fn send_survey(
        &self,
        ctx: &CallContext,
        request: SurveyRequest,
    ) -> Result<SurveyOutcome> {
        check_survey(&request)?;
        match &self.spool {
            Some(spool) => {
                let lane = &self.inner.lane;
                let priority = ctx.priority;
                spool
                    .send(ctx, request, || lane.budget_error_for(priority))
                    .await
            }
            None => self.send_survey_here(ctx, request).await,
        }
    }

    /// Sends a survey through this replica's own batcher.
    async fn send_survey_here(
        &self,
        ctx: &CallContext,
        request: SurveyRequest,
    ) -> Result<SurveyOutcome> {
        check_survey(&request)?;
        let key = SurveyKey {
            campaign_id: request.campaign_id,
            delay_days: request.delay_days,
        };
        let identity = email_key(&request.recipient.email);
        let inner = Arc::clone(&self.inner);
        batching::submit_one(
            &self.inner.lane,
            &self.inner.surveys,
            key,
            request.recipient,
            ctx,
            identity,
            move |handle| survey_batch(inner, handle).boxed(),
        )
        .await
    }

    /// Sends one campaign's survey to several recipients; one outcome per recipient, in order.
    pub async fn send_surveys(
        &self,
        ctx: &CallContext,
        campaign_id: &str,
        delay_days: Option<u32>,
        recipients: Vec<CustomerInput>,
    ) -> Vec<Result<SurveyOutcome>> {
        join_all(recipients.into_iter().map(|recipient| {
            self.send_survey(
                ctx,
                SurveyRequest {
                    campaign_id: campaign_id.to_owned(),
                    delay_days,
                    recipient,
                },
            )
        }))
        .await
    }

    // ---- customers ----

    /// Creates or updates one customer (by email). Concurrent upserts share `POST /customers`
    /// calls.
    pub async fn upsert_customer(
        &self,
        ctx: &CallContext,
        customer: CustomerInput,
    ) -> Result<CustomerUpsert> {
        check_email(&customer.email, "email")?;
        let identity = email_key(&customer.email);
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
        customers: Vec<CustomerInput>,
    ) -> Vec<Result<CustomerUpsert>> {
        join_all(
            customers
                .into_iter()
                .map(|customer| self.upsert_customer(ctx, customer)),
        )
        .await
    }

    pub async fn list_customers(
        &self,
        ctx: &CallContext,
        query: CustomerQuery,
    ) -> Result<Page<Customer>> {
        let key = format!("{query:?}");
        self.read(
            &self.inner.customers,
            ctx,
            key,
            Caching::SingleFlightOnly,
            query,
            |client, query, timeout| async move { client.list_customers(&query, timeout).await },
        )
        .await
    }

    pub async fn get_customer(&self, ctx: &CallContext, id: &str) -> Result<Customer> {
        check_id(id, "id")?;
        let id = id.to_owned();
        self.read(
            &self.inner.customer,
            ctx,
            id.clone(),
            Caching::SingleFlightOnly,
            id,
            |client, id, timeout| async move { client.get_customer(&id, timeout).await },
        )
        .await
    }

    /// Deletes customers by email; one outcome per address (`failed`/`not_found` ones are
    /// `NOT_FOUND` errors).
    pub async fn delete_customers(
        &self,
        ctx: &CallContext,
        emails: Vec<String>,
    ) -> Result<Vec<Result<EmailOutcome>>> {
        self.change(ctx, CustomerChange::Delete, emails, None).await
    }

    /// Opts customers out of surveys, with an optional opt-out message.
    pub async fn unsubscribe_customers(
        &self,
        ctx: &CallContext,
        emails: Vec<String>,
        message: Option<String>,
    ) -> Result<Vec<Result<EmailOutcome>>> {
        self.change(ctx, CustomerChange::Unsubscribe, emails, message)
            .await
    }

    pub async fn resubscribe_customers(
        &self,
        ctx: &CallContext,
        emails: Vec<String>,
    ) -> Result<Vec<Result<EmailOutcome>>> {
        self.change(ctx, CustomerChange::Resubscribe, emails, None)
            .await
    }

    async fn change(
        &self,
        ctx: &CallContext,
        change: CustomerChange,
        emails: Vec<String>,
        message: Option<String>,
    ) -> Result<Vec<Result<EmailOutcome>>> {
        for (index, email) in emails.iter().enumerate() {
            check_email(email, &format!("emails[{index}]"))?;
        }
        let mut outcomes = Vec::with_capacity(emails.len());
        for chunk in emails.chunks(MAX_CHANGE_BATCH) {
            match self
                .change_call(ctx, change, chunk, message.as_deref())
                .await
            {
                Ok(answers) => outcomes.extend(answers),
                Err(error) if isolates_refusals(change) && refused_for_items(&error) => {
                    outcomes.extend(
                        self.isolate(ctx, change, chunk, message.as_deref(), error)
                            .await,
                    );
                }
                Err(error) => return Err(error),
            }
        }
        Ok(outcomes)
    }

    /// One call for `chunk`: one outcome per address, or the error of the call as a whole.
    async fn change_call(
        &self,
        ctx: &CallContext,
        change: CustomerChange,
        chunk: &[String],
        message: Option<&str>,
    ) -> Result<Vec<Result<EmailOutcome>>> {
        let client = self.inner.client.clone();
        self.inner
            .lane
            .call(ctx, Idempotency::Idempotent, |timeout| {
                let client = client.clone();
                async move {
                    client
                        .change_customers(change, chunk, message, timeout)
                        .await
                }
            })
            .await
    }

    /// After the upstream refused a whole batch because of some of its addresses (the docs say
    /// an unsubscribe may fail as a whole when an address was never a customer, and do not say
    /// which one), finds them by halving: each half is sent again, a refused half is halved
    /// again, down to single addresses, which fail alone; every other address is applied. The
    /// changes are idempotent, so sending an address again is safe. At most
    /// [`MAX_ISOLATION_CALLS`] extra calls (a few unknown addresses among 100 need about 14
    /// each); a refused group left when they are spent fails with the batch's error.
    async fn isolate(
        &self,
        ctx: &CallContext,
        change: CustomerChange,
        chunk: &[String],
        message: Option<&str>,
        refusal: Error,
    ) -> Vec<Result<EmailOutcome>> {
        let mut outcomes: Vec<Option<Result<EmailOutcome>>> = vec![None; chunk.len()];
        let mut refused = vec![(0..chunk.len(), refusal)];
        let mut calls = 0;
        while let Some((range, error)) = refused.pop() {
            if range.len() == 1 || calls + 2 > MAX_ISOLATION_CALLS {
                for slot in &mut outcomes[range] {
                    *slot = Some(Err(error.clone()));
                }
                continue;
            }
            calls += 2;
            let middle = range.start + range.len() / 2;
            for half in [range.start..middle, middle..range.end] {
                match self
                    .change_call(ctx, change, &chunk[half.clone()], message)
                    .await
                {
                    Ok(answers) if answers.len() == half.len() => {
                        for (slot, answer) in outcomes[half].iter_mut().zip(answers) {
                            *slot = Some(answer);
                        }
                    }
                    Ok(_) => {
                        let error = Error::internal(
                            "the upstream answered a batch with a different number of results",
                        );
                        for slot in &mut outcomes[half] {
                            *slot = Some(Err(error.clone()));
                        }
                    }
                    Err(error) if refused_for_items(&error) => refused.push((half, error)),
                    Err(error) => {
                        for slot in &mut outcomes[half] {
                            *slot = Some(Err(error.clone()));
                        }
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| Err(Error::internal("an address was left unanswered")))
            })
            .collect()
    }

    // ---- feedback ----

    pub async fn list_feedback(
        &self,
        ctx: &CallContext,
        query: FeedbackQuery,
    ) -> Result<Page<Feedback>> {
        let key = format!("{query:?}");
        self.read(
            &self.inner.feedback,
            ctx,
            key,
            Caching::SingleFlightOnly,
            query,
            |client, query, timeout| async move { client.list_feedback(&query, timeout).await },
        )
        .await
    }

    pub async fn get_feedback(&self, ctx: &CallContext, id: &str) -> Result<Feedback> {
        check_id(id, "id")?;
        let id = id.to_owned();
        self.read(
            &self.inner.feedback_item,
            ctx,
            id.clone(),
            Caching::SingleFlightOnly,
            id,
            |client, id, timeout| async move { client.get_feedback(&id, timeout).await },
        )
        .await
    }

    /// Replaces (or appends to) a response's tags.
    pub async fn set_response_tags(
        &self,
        ctx: &CallContext,
        feedback_id: &str,
        tags: Vec<String>,
        op: LabelOp,
    ) -> Result<()> {
        check_id(feedback_id, "feedback_id")?;
        let client = self.inner.client.clone();
        self.inner
            .lane
            .call(ctx, label_idempotency(op), |timeout| {
                let client = client.clone();
                let tags = tags.clone();
                async move { client.set_tags(feedback_id, &tags, op, timeout).await }
            })
            .await
    }

    /// Replaces (or appends to) a response's topics.
    pub async fn set_response_topics(
        &self,
        ctx: &CallContext,
        feedback_id: &str,
        topics: Vec<Topic>,
        op: LabelOp,
    ) -> Result<()> {
        check_id(feedback_id, "feedback_id")?;
        let client = self.inner.client.clone();
        self.inner
            .lane
            .call(ctx, label_idempotency(op), |timeout| {
                let client = client.clone();
                let topics = topics.clone();
                async move { client.set_topics(feedback_id, &topics, op, timeout).await }
            })
            .await
    }

    // ---- cached reads ----

    /// The latest score of `metric` (cached for the TTL).
    pub async fn score(&self, ctx: &CallContext, metric: Metric) -> Result<Score> {
        self.read(
            &self.inner.scores,
            ctx,
            metric,
            Caching::Cached,
            metric,
            |client, metric, timeout| async move {
                let mut score = client.score(metric, timeout).await?;
                score.fetched_at = Some(std::time::SystemTime::now());
                Ok(score)
            },
        )
        .await
    }

    /// Every campaign (cached for the TTL).
    pub async fn campaigns(&self, ctx: &CallContext) -> Result<Arc<[Campaign]>> {
        self.read(
            &self.inner.campaigns,
            ctx,
            (),
            Caching::Cached,
            (),
            |client, (), timeout| async move { client.campaigns(timeout).await.map(Arc::from) },
        )
        .await
    }

    /// Whether a campaign with this id exists: looked up in the cached campaigns, which are
    /// read again once when they do not hold it (the campaign may be newer than the cache).
    pub async fn campaign_exists(&self, ctx: &CallContext, id: &str) -> Result<bool> {
        if self.campaigns(ctx).await?.iter().any(|c| c.id == id) {
            return Ok(true);
        }
        let fresh = self
            .read(
                &self.inner.campaigns,
                ctx,
                (),
                Caching::Refresh,
                (),
                |client, (), timeout| async move { client.campaigns(timeout).await.map(Arc::from) },
            )
            .await?;
        Ok(fresh.iter().any(|c| c.id == id))
    }

    /// Every template (cached for the TTL).
    pub async fn templates(&self, ctx: &CallContext) -> Result<Arc<[Template]>> {
        self.read(
            &self.inner.templates,
            ctx,
            (),
            Caching::Cached,
            (),
            |client, (), timeout| async move { client.templates(timeout).await.map(Arc::from) },
        )
        .await
    }

    /// One template (cached for the TTL).
    pub async fn template(&self, ctx: &CallContext, id: &str) -> Result<Template> {
        check_id(id, "id")?;
        let id = id.to_owned();
        self.read(
            &self.inner.template,
            ctx,
            id.clone(),
            Caching::Cached,
            id,
            |client, id, timeout| async move { client.template(&id, timeout).await },
        )
        .await
    }

    /// Reports of every campaign, or of one (cached for the TTL).
    pub async fn reports(
        &self,
        ctx: &CallContext,
        campaign_id: Option<&str>,
    ) -> Result<Arc<[Report]>> {
        if let Some(id) = campaign_id {
            check_id(id, "campaign_id")?;
        }
        let campaign_id = campaign_id.map(str::to_owned);
        self.read(
            &self.inner.reports,
            ctx,
            campaign_id.clone(),
            Caching::Cached,
            campaign_id,
            |client, campaign_id, timeout| async move {
                client
                    .reports(campaign_id.as_deref(), timeout)
                    .await
                    .map(Arc::from)
            },
        )
        .await
    }

    // ---- companies, outbox ----

    pub async fn list_companies(
        &self,
        ctx: &CallContext,
        query: CompanyQuery,
    ) -> Result<Page<Company>> {
        let key = format!("{query:?}");
        self.read(
            &self.inner.companies,
            ctx,
            key,
            Caching::SingleFlightOnly,
            query,
            |client, query, timeout| async move { client.list_companies(&query, timeout).await },
        )
        .await
    }

    /// One company by id or domain.
    pub async fn company(&self, ctx: &CallContext, id_or_domain: &str) -> Result<Company> {
        check_id(id_or_domain, "id_or_domain")?;
        let key = id_or_domain.to_owned();
        self.read(
            &self.inner.company,
            ctx,
            key.clone(),
            Caching::SingleFlightOnly,
            key,
            |client, key, timeout| async move { client.company(&key, timeout).await },
        )
        .await
    }

    /// Sent surveys.
    pub async fn outbox(&self, ctx: &CallContext, query: OutboxQuery) -> Result<Page<SentSurvey>> {
        let key = format!("{query:?}");
        self.read(
            &self.inner.outbox,
            ctx,
            key,
            Caching::SingleFlightOnly,
            query,
            |client, query, timeout| async move { client.outbox(&query, timeout).await },
        )
        .await
    }

    /// One read through `reads` and the lane: served from the cache (with `Caching::Cached`)
    /// or an identical in-flight read under `key`, else fetched by `fetch` with its own copy of
    /// `request` per attempt. Reads change nothing upstream, so the lane retries them on any
    /// transient failure. The fetch runs in its own task (see [`Reads::get`]), hence the
    /// `'static` bounds and the owned client and request.
    async fn read<K, R, V, F, Fut>(
        &self,
        reads: &Reads<K, V>,
        ctx: &CallContext,
        key: K,
        caching: Caching,
        request: R,
        fetch: F,
    ) -> Result<V>
    where
        K: Eq + Hash + Clone + Send + 'static,
        V: Clone + Send + Sync + 'static,
        R: Clone + Send + Sync + 'static,
        F: Fn(RetentlyClient, R, Duration) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<V, AttemptError>> + Send,
    {
        let inner = Arc::clone(&self.inner);
        let read_ctx = ctx.clone();
        reads
            .get(key, ctx, caching, move || {
                async move {
                    inner
                        .lane
                        .call(&read_ctx, Idempotency::Idempotent, |timeout| {
                            fetch(inner.client.clone(), request.clone(), timeout)
                        })
                        .await
                }
                .boxed()
            })
            .await
    }
}

fn label_idempotency(op: LabelOp) -> Idempotency {
    match op {
        LabelOp::Replace => Idempotency::Idempotent,
        LabelOp::Append => Idempotency::UnsafeToRepeat,
    }
}

async fn survey_batch(
    inner: Arc<Inner>,
    handle: BatchHandle<SurveyKey, CustomerInput, SurveyOutcome>,
) {
    let key = handle.key().clone();
    let client = inner.client.clone();
    batching::drive(
        inner.lane.clone(),
        handle,
        Idempotency::UnsafeToRepeat,
        "subscribers",
        move |recipients, timeout| {
            let client = client.clone();
            let key = key.clone();
            async move {
                client
                    .send_survey(&key.campaign_id, key.delay_days, &recipients, timeout)
                    .await
            }
        },
    )
    .await;
}

async fn upsert_batch(inner: Arc<Inner>, handle: BatchHandle<(), CustomerInput, CustomerUpsert>) {
    let client = inner.client.clone();
    batching::drive(
        inner.lane.clone(),
        handle,
        Idempotency::Idempotent,
        "subscribers",
        move |customers, timeout| {
            let client = client.clone();
            async move { client.upsert_customers(&customers, timeout).await }
        },
    )
    .await;
}

/// What a survey send needs before it is batched or spooled.
fn check_survey(request: &SurveyRequest) -> Result<()> {
    check_email(&request.recipient.email, "recipient.email")?;
    if request.campaign_id.trim().is_empty() {
        return Err(Error::invalid_argument(vec![FieldViolation::new(
            "campaign_id",
            "must not be empty",
        )]));
    }
    Ok(())
}

/// The one check made before spending budget: without an address there is nothing to key on.
fn check_email(email: &str, field: &str) -> Result<()> {
    let email = email.trim();
    if email.is_empty() || !email.contains('@') {
        return Err(Error::invalid_argument(vec![FieldViolation::new(
            field,
            "must be an email address",
        )]));
    }
    Ok(())
}

fn check_id(id: &str, field: &str) -> Result<()> {
    if id.trim().is_empty() {
        return Err(Error::invalid_argument(vec![FieldViolation::new(
            field,
            "must not be empty",
        )]));
    }
    Ok(())
}
