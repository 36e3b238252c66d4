//! In-process control and observation, for Rust tests that should not need to speak HTTP to the
//! admin API. Every method has an admin route twin (see the README).

use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;
use serde_json::Value;

use crate::Api;
use crate::config::WebhookConfig;
use crate::faults::{FaultConfig, FaultCounts};
use crate::retainly::model::{RetainlyCustomer, RetainlyEvent, id_key};
use crate::retently::model::{Campaign, Customer, Feedback, Template, normalize_email};
use crate::state::{HoldSpec, Shared, SurveySend, TraceparentSeen, WebhookStats};

/// Requests seen for one (API, route template, status). Status 0 means the connection was
/// dropped by fault injection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestCount {
    pub api: Api,
    pub route: String,
    pub status: u16,
    pub count: u64,
}

/// Everything counted since start or the last reset.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub requests: Vec<RequestCount>,
    pub rate_limited: PerApi<u64>,
    pub faults: PerApi<FaultCounts>,
    pub webhook: WebhookStats,
}

/// One value per API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerApi<T> {
    pub retently: T,
    pub retainly: T,
}

/// Cheap to clone: all clones control the same sandbox.
#[derive(Clone)]
pub struct SandboxHandle {
    pub(crate) shared: Arc<Shared>,
}

impl SandboxHandle {
    // ---- counters ----

    /// Every (API, route, status) seen, sorted.
    pub fn request_counts(&self) -> Vec<RequestCount> {
        self.shared
            .control()
            .stats
            .requests
            .iter()
            .map(|((api, route, status), count)| RequestCount {
                api: *api,
                route: route.clone(),
                status: *status,
                count: *count,
            })
            .collect()
    }

    /// Requests to `route` (a template such as `/api/v2/customers/{id}`) answered with `status`.
    pub fn request_count(&self, api: Api, route: &str, status: u16) -> u64 {
        self.shared
            .control()
            .stats
            .requests
            .get(&(api, route.to_owned(), status))
            .copied()
            .unwrap_or(0)
    }

    /// Requests to `route` whatever their outcome.
    pub fn requests_to(&self, api: Api, route: &str) -> u64 {
        self.shared
            .control()
            .stats
            .requests
            .iter()
            .filter(|((a, r, _), _)| *a == api && r == route)
            .map(|(_, count)| count)
            .sum()
    }

    /// All requests to `api` answered with `status` (any route).
    pub fn status_count(&self, api: Api, status: u16) -> u64 {
        self.shared
            .control()
            .stats
            .requests
            .iter()
            .filter(|((a, _, s), _)| *a == api && *s == status)
            .map(|(_, count)| count)
            .sum()
    }

    /// The W3C `traceparent` headers of the latest requests that sent one (at most 1,024),
    /// oldest first; cleared by [`SandboxHandle::reset_counters`].
    pub fn traceparents(&self) -> Vec<TraceparentSeen> {
        self.shared
            .control()
            .stats
            .traceparents
            .iter()
            .cloned()
            .collect()
    }

    /// Requests refused by the rate limit (not counting forced 429 bursts).
    pub fn rate_limited(&self, api: Api) -> u64 {
        self.shared.control().stats.rate_limited[api.index()]
    }

    pub fn fault_counts(&self, api: Api) -> FaultCounts {
        self.shared.control().fault_counts(api)
    }

    pub fn webhook_stats(&self) -> WebhookStats {
        self.shared.control().webhook_stats
    }

    pub fn stats(&self) -> StatsSnapshot {
        let requests = self.request_counts();
        let control = self.shared.control();
        StatsSnapshot {
            requests,
            rate_limited: PerApi {
                retently: control.stats.rate_limited[Api::Retently.index()],
                retainly: control.stats.rate_limited[Api::Retainly.index()],
            },
            faults: PerApi {
                retently: control.fault_counts(Api::Retently),
                retainly: control.fault_counts(Api::Retainly),
            },
            webhook: control.webhook_stats,
        }
    }

    /// Zeroes every counter and forgets the rate-limit windows (data is kept).
    pub fn reset_counters(&self) {
        let mut control = self.shared.control();
        control.stats = Default::default();
        control.webhook_stats = WebhookStats::default();
        for fault in &mut control.faults {
            fault.counts = FaultCounts::default();
        }
        for limiter in &mut control.limiters {
            limiter.clear();
        }
    }

    // ---- control ----

    pub fn set_faults(&self, api: Api, faults: FaultConfig) {
        self.shared.control().faults[api.index()].config = faults;
    }

    pub fn clear_faults(&self, api: Api) {
        self.set_faults(api, FaultConfig::default());
    }

    pub fn faults(&self, api: Api) -> FaultConfig {
        self.shared.control().faults[api.index()].config.clone()
    }

    /// Requests to `api` that arrived and are not answered yet: in the injected latency, held by
    /// the gate, or being handled.
    pub fn in_progress(&self, api: Api) -> u64 {
        self.shared.control().stats.in_progress[api.index()]
    }

    /// Lets the next `pass` requests to `api` through and then holds every later one before it
    /// is handled (the client sees no answer) until [`SandboxHandle::release`].
    pub fn hold_after(&self, api: Api, pass: u64) {
        self.hold(
            api,
            HoldSpec {
                pass,
                ..HoldSpec::default()
            },
        );
    }

    /// Holds the requests to `api` that `spec` names, unanswered, until
    /// [`SandboxHandle::release`]; a client that goes away meanwhile takes its request with it.
    pub fn hold(&self, api: Api, spec: HoldSpec) {
        self.shared.control().holds[api.index()].set(spec);
    }

    /// Requests to `api` held since [`SandboxHandle::hold_after`], released ones included.
    pub fn held(&self, api: Api) -> u64 {
        self.shared.control().holds[api.index()].held
    }

    /// Lets the held requests to `api` go on (each is then handled) and stops holding.
    pub fn release(&self, api: Api) {
        self.shared.control().holds[api.index()].release();
    }

    /// Requests per key per window; 0 switches the limit off.
    pub fn set_rate_limit(&self, api: Api, requests_per_window: u32) {
        self.shared.control().limiters[api.index()].set_limit(requests_per_window);
    }

    pub fn rate_limit(&self, api: Api) -> u32 {
        self.shared.control().limiters[api.index()].limit()
    }

    /// Where new feedback is pushed; `None` stops deliveries.
    pub fn set_webhook(&self, webhook: Option<WebhookConfig>) {
        self.shared.control().webhook = webhook;
    }

    /// `count` new survey responses arriving now (each also pushed to the webhook). Returns them
    /// as `GET /feedback` lists them; fewer than `count` only if there is no campaign or no
    /// customer to answer.
    pub fn simulate_feedback(&self, count: usize) -> Vec<Value> {
        let items: Vec<Value> = {
            let mut world = self.shared.world();
            let created = crate::seed::simulate(&mut world, count, Utc::now());
            created
                .into_iter()
                .filter_map(|index| world.retently.feedback.get(index).map(Feedback::to_json))
                .collect()
        };
        crate::webhook::deliver(&self.shared, &items);
        items
    }

    // ---- Retently data ----

    /// A customer as `GET /customers?email=` shows it.
    pub fn retently_customer(&self, email: &str) -> Option<Value> {
        self.shared
            .world()
            .retently
            .customer_by_email(&normalize_email(email))
            .map(Customer::to_json)
    }

    /// Every customer, oldest first.
    pub fn retently_customers(&self) -> Vec<Value> {
        let world = self.shared.world();
        let mut customers: Vec<&Customer> = world.retently.customers.values().collect();
        customers.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        customers.into_iter().map(Customer::to_json).collect()
    }

    /// Every response in arrival order.
    pub fn feedback(&self) -> Vec<Value> {
        self.shared
            .world()
            .retently
            .feedback
            .iter()
            .map(Feedback::to_json)
            .collect()
    }

    /// Every sent or scheduled survey in creation order.
    pub fn outbox(&self) -> Vec<Value> {
        let now = Utc::now();
        self.shared
            .world()
            .retently
            .outbox
            .iter()
            .map(|survey| survey.to_json(now))
            .collect()
    }

    pub fn campaigns(&self) -> Vec<Value> {
        self.shared
            .world()
            .retently
            .campaigns
            .iter()
            .map(Campaign::to_json)
            .collect()
    }

    pub fn templates(&self) -> Vec<Value> {
        self.shared
            .world()
            .retently
            .templates
            .iter()
            .map(Template::to_json)
            .collect()
    }

    /// The id of the first active transactional campaign of `metric` (`"NPS"`, `"CSAT"`, `"CES"`,
    /// `"STAR"`, any case), if the seed has one.
    pub fn transactional_campaign(&self, metric: &str) -> Option<String> {
        self.shared
            .world()
            .retently
            .campaigns
            .iter()
            .find(|campaign| {
                campaign.is_active
                    && campaign.kind == crate::retently::model::CampaignKind::Transactional
                    && campaign.metric.upper().eq_ignore_ascii_case(metric)
            })
            .map(|campaign| campaign.id.clone())
    }

    /// Accepted `POST /survey` calls in order.
    pub fn survey_sends(&self) -> Vec<SurveySend> {
        self.shared.world().survey_sends.clone()
    }

    // ---- Retainly data ----

    /// Every customer, in no particular order.
    pub fn retainly_customers(&self) -> Vec<RetainlyCustomer> {
        let world = self.shared.world();
        let mut customers: Vec<RetainlyCustomer> =
            world.retainly.customers.values().cloned().collect();
        customers.sort_by_key(|customer| customer.id.to_string());
        customers
    }

    /// One customer by id (`1` and `"1"` name the same customer).
    pub fn retainly_customer(&self, id: &Value) -> Option<RetainlyCustomer> {
        let key = id_key(id)?;
        self.shared.world().retainly.customers.get(&key).cloned()
    }

    /// The items of one array field of one customer.
    pub fn retainly_array(&self, id: &Value, field: &str) -> Option<Vec<Value>> {
        self.retainly_customer(id)?
            .fields
            .get(field)?
            .as_array()
            .cloned()
    }

    /// Every event in arrival order.
    pub fn retainly_events(&self) -> Vec<RetainlyEvent> {
        self.shared.world().retainly.events.clone()
    }
}
