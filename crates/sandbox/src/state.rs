//! The shared state behind every handler and the in-process handle.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;

use crate::Api;
use crate::config::{SandboxConfig, WebhookConfig};
use crate::faults::{FaultCounts, FaultState};
use crate::ids::IdGen;
use crate::rate_limit::SlidingWindow;
use crate::retainly::model::RetainlyStore;
use crate::retently::model::RetentlyStore;

/// One recorded `POST /survey` call that was accepted.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SurveySend {
    pub campaign_id: String,
    /// The requested delay in days (0 when absent).
    pub delay_days: u32,
    /// Recipient emails (normalised) in request order, duplicates removed.
    pub recipients: Vec<String>,
    /// Those actually scheduled (the others were throttled or unsubscribed).
    pub scheduled: Vec<String>,
    pub received_at: DateTime<Utc>,
}

/// The data of both upstream accounts. Guarded by one mutex: every handler holds it for a short,
/// await-free critical section, so a lock per collection would add ordering hazards for no
/// measurable gain at the request rates of tests and benchmarks.
pub(crate) struct World {
    pub retently: RetentlyStore,
    pub retainly: RetainlyStore,
    pub ids: IdGen,
    /// The generator of seed and simulated data.
    pub rng: StdRng,
    pub survey_sends: Vec<SurveySend>,
}

/// Request counts, keyed by API, route template and status; status 0 marks a dropped connection.
#[derive(Default)]
pub(crate) struct Stats {
    pub requests: BTreeMap<(Api, String, u16), u64>,
    pub rate_limited: [u64; 2],
    /// Requests that arrived and are not answered yet (in the injected latency, held, or being
    /// handled), per API.
    pub in_progress: [u64; 2],
    /// The W3C `traceparent` of the latest requests that carried one, oldest first.
    pub traceparents: std::collections::VecDeque<TraceparentSeen>,
}

/// A request that carried a W3C `traceparent` header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceparentSeen {
    pub api: Api,
    /// The route template, as in the request counts.
    pub route: String,
    pub traceparent: String,
}

/// Traceparents kept: enough for a test scenario, bounded for a long-running emulator.
pub(crate) const MAX_TRACEPARENTS: usize = 1024;

/// Webhook deliveries since the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WebhookStats {
    /// Answered with a 2xx.
    pub delivered: u64,
    /// Answered with another status, or not answered at all.
    pub failed: u64,
}

/// What the hold gate holds (see [`crate::SandboxHandle::hold`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldSpec {
    /// Only requests to this route template (`/api/v2/survey`); every route when `None`.
    pub route: Option<String>,
    /// Requests let through before holding starts.
    pub pass: u64,
    /// Hold the answer of a handled request (its effect applied) instead of the request before
    /// it is handled.
    pub after_handling: bool,
}

/// A gate that lets a number of requests through and holds every later one, unanswered, until
/// it is released: tests use it to stop or kill a client while its requests are certainly on
/// the wire.
pub(crate) struct Hold {
    /// `None` when the gate is open.
    spec: Option<HoldSpec>,
    /// Requests held since the gate was set (released ones included).
    pub held: u64,
    open: tokio::sync::watch::Sender<bool>,
}

/// Where a held request waits, and whether before or after its handler.
pub(crate) struct Held {
    pub open: tokio::sync::watch::Receiver<bool>,
    pub after_handling: bool,
}

impl Hold {
    fn new() -> Hold {
        Hold {
            spec: None,
            held: 0,
            open: tokio::sync::watch::channel(true).0,
        }
    }

    pub(crate) fn set(&mut self, spec: HoldSpec) {
        self.spec = Some(spec);
        self.held = 0;
        self.open.send_replace(false);
    }

    /// Lets every held request go on and stops holding.
    pub(crate) fn release(&mut self) {
        self.spec = None;
        self.open.send_replace(true);
    }

    /// `None` to go on at once, or where to wait.
    pub(crate) fn admit(&mut self, route: &str) -> Option<Held> {
        let spec = self.spec.as_mut()?;
        if spec.route.as_deref().is_some_and(|only| only != route) {
            return None;
        }
        if spec.pass > 0 {
            spec.pass -= 1;
            return None;
        }
        self.held += 1;
        Some(Held {
            open: self.open.subscribe(),
            after_handling: spec.after_handling,
        })
    }
}

/// Operational state: faults, limits, counters, webhook target. Separate from [`World`] so that
/// counting a request never waits for a data operation.
pub(crate) struct Control {
    pub faults: [FaultState; 2],
    pub limiters: [SlidingWindow; 2],
    pub stats: Stats,
    pub webhook: Option<WebhookConfig>,
    pub webhook_stats: WebhookStats,
    pub holds: [Hold; 2],
}

impl Control {
    pub(crate) fn fault_counts(&self, api: Api) -> FaultCounts {
        self.faults[api.index()].counts.clone()
    }
}

pub(crate) struct Shared {
    pub retently_keys: Vec<String>,
    pub retainly_credentials: Vec<(String, String)>,
    pub simulate_feedback_per_second: Option<f64>,
    pub unknown_subscription_emails: crate::config::UnknownEmails,
    pub world: Mutex<World>,
    pub control: Mutex<Control>,
    /// Client of webhook deliveries; `None` if it could not be built (deliveries then count as
    /// failed).
    pub webhook_client: Option<reqwest::Client>,
}

impl Shared {
    pub(crate) fn new(config: SandboxConfig) -> Shared {
        let seed = config.seed.rng_seed;
        let mut world = World {
            retently: RetentlyStore::default(),
            retainly: RetainlyStore::default(),
            ids: IdGen::new(seed),
            rng: StdRng::seed_from_u64(seed),
            survey_sends: Vec::new(),
        };
        crate::seed::seed(&mut world, &config.seed, Utc::now());
        let control = Control {
            faults: [
                FaultState::new(seed.wrapping_add(1)),
                FaultState::new(seed.wrapping_add(2)),
            ],
            limiters: [
                SlidingWindow::new(
                    config.retently_requests_per_minute,
                    config.rate_limit_window,
                ),
                SlidingWindow::new(
                    config.retainly_requests_per_minute,
                    config.rate_limit_window,
                ),
            ],
            stats: Stats::default(),
            webhook: config.webhook,
            webhook_stats: WebhookStats::default(),
            holds: [Hold::new(), Hold::new()],
        };
        Shared {
            retently_keys: config.retently_api_keys,
            retainly_credentials: config.retainly_credentials,
            simulate_feedback_per_second: config.simulate_feedback_per_second,
            unknown_subscription_emails: config.unknown_subscription_emails,
            world: Mutex::new(world),
            control: Mutex::new(control),
            webhook_client: crate::webhook::client(),
        }
    }

    /// A panic while holding a lock leaves data that is still consistent per record (each
    /// mutation is a single insert or field update), so a poisoned lock is used as is rather than
    /// taking the whole emulator down.
    pub(crate) fn world(&self) -> MutexGuard<'_, World> {
        self.world
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn control(&self) -> MutexGuard<'_, Control> {
        self.control
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
