//! The upstream scheduler: every attempt to one upstream account passes through its [`Lane`].
//!
//! A lane owns the account's budget ([`budget::SlidingWindow`]), two priority queues of waiting
//! attempts, the retry budget and the circuit breaker. A caller first asks the breaker (fail fast
//! while the upstream is down), then the budget: with a free slot and nobody waiting it goes at
//! once; otherwise it joins its class's queue — unless the estimated wait is longer than its
//! deadline (or than `max_queue_wait`, or the queue is full), in which case it is shed at once
//! with `RESOURCE_EXHAUSTED`/`UPSTREAM_BUDGET_EXHAUSTED` and a `RetryInfo` saying when the
//! budget would have room. The gateway therefore never sends the upstream more than it allows;
//! excess demand waits (bounded) or is refused here, never by a 429 upstream.
//!
//! Replicas on PostgreSQL share one budget per account instead ([`shared`]): the lane's
//! dispatcher asks the database for a slot for the waiter at the head of its queues, and every
//! caller waits in the queues; the window the lane keeps is then a copy of the shared one, for
//! estimates.
//!
//! One dispatcher task per lane hands out slots as they free, choosing between the classes so
//! interactive work goes first while background work gets at least one slot in
//! `background_share + 1` when both wait. Inside a class, callers share the slots by weight
//! ([`fair`]), and a caller with a hard quota is refused with `RESOURCE_EXHAUSTED`/
//! `CALLER_QUOTA_EXCEEDED` once it has started that many attempts in the quota window.
//!
//! # Layout
//! - [`budget`]: the sliding-window log that never allows more than N requests in any window.
//! - [`retry`]: full-jitter backoff, `Retry-After`, the retry budget.
//! - [`breaker`]: the circuit breaker.
//! - [`batch`]: coalescing of concurrent writes into one upstream call, with per-item results.
//! - [`cache`]: single-flight and the TTL cache for reads.
//! - [`fair`]: weighted fair queueing between callers and their quotas.
//! - [`shared`]: the budget shared by every replica on PostgreSQL, in place of the lane's own.

pub mod batch;
pub mod breaker;
pub mod budget;
pub mod cache;
pub mod fair;
pub mod retry;
pub mod shared;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use opentelemetry::KeyValue;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tracing::Instrument as _;

use self::breaker::{Admission, Breaker, BreakerConfig};
use self::budget::SlidingWindow;
use self::fair::{CallerShare, CallerShares, EqualShares, FairQueue, FlowKey};
use self::retry::{BackoffPolicy, RetryBudget, RetryBudgetConfig};
use self::shared::SharedBudget;
use crate::error::{Error, ErrorCode, Reason, Result};
use crate::store::budget::GrantId;
use crate::upstream::context::{CallContext, Priority, deadline_exceeded};

/// The `caller` metric label of attempts made without an authenticated caller (sandbox, trusted
/// mesh).
const ANONYMOUS_CALLER: &str = "anonymous";

/// Shortest wait after a refusal of the shared budget, so a refusal that names no time (none
/// is expected) cannot make the dispatcher ask the database in a busy loop.
const MIN_SHARED_RETRY: Duration = Duration::from_millis(1);

/// Time kept between an attempt's timeout and the caller's deadline to hand the answer back.
const REPLY_MARGIN: Duration = Duration::from_millis(10);

tokio::task_local! {
    /// The retry number of the attempt being run (0 for the first), for the HTTP span.
    static RETRY: u32;
}

/// The retry number of the current attempt: 0 outside a retry or outside the scheduler.
pub fn current_retry() -> u32 {
    RETRY.try_with(|retry| *retry).unwrap_or(0)
}

fn priority_name(priority: Priority) -> &'static str {
    match priority {
        Priority::Interactive => "interactive",
        Priority::Background => "background",
    }
}

/// Tuning of one upstream's scheduler. [`SchedulerSettings::new`] gives production defaults for
/// a budget; tests shorten the window and the delays.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// Requests the upstream allows per `window`.
    pub requests_per_window: u32,
    /// The upstream's counting window (60 s for a per-minute limit).
    pub window: Duration,
    /// Added to `window` when spacing grants: two requests granted `window + margin` apart can
    /// arrive up to `margin` closer together (network jitter, a slow connection set-up) and
    /// still never fall into one upstream window. 1 s against a 60 s window costs under 2 % of
    /// throughput.
    pub jitter_margin: Duration,
    /// Waiting attempts per priority class before new ones are shed.
    pub max_queue: usize,
    /// Longest an attempt may wait for budget, whatever its deadline; callers without a
    /// deadline are shed beyond it too, so nothing waits unboundedly.
    pub max_queue_wait: Duration,
    /// Per-attempt HTTP timeout when the caller's remaining time is longer (or unset).
    pub max_attempt_timeout: Duration,
    /// An attempt is not started with less time than this left before the deadline: it could
    /// not finish, and it would spend a slot of the budget for nothing.
    pub min_attempt_time: Duration,
    /// Interactive grants in a row before a waiting background attempt gets one (4 → 4:1).
    pub background_share: u32,
    pub backoff: BackoffPolicy,
    pub retry_budget: RetryBudgetConfig,
    pub breaker: BreakerConfig,
    /// How long campaigns, templates, scores and reports are served from cache.
    pub cache_ttl: Duration,
    /// Cached reads kept at most (template ids are caller-chosen, so the cache is bounded).
    pub cache_capacity: usize,
    /// Each caller's weight and quota (the callers file); everyone equal by default.
    pub shares: Arc<dyn CallerShares>,
    /// The window of `CallerShare::quota_per_minute`: a minute, shortened only by tests.
    pub quota_window: Duration,
    /// The budget every replica shares (PostgreSQL), in place of this lane's own; `None` for
    /// one replica on the embedded store.
    pub shared_budget: Option<SharedBudget>,
}

impl SchedulerSettings {
    /// Production defaults for a budget of `requests_per_minute`.
    pub fn new(requests_per_minute: u32) -> Self {
        Self {
            requests_per_window: requests_per_minute,
            window: Duration::from_secs(60),
            jitter_margin: Duration::from_secs(1),
            max_queue: 4096,
            max_queue_wait: Duration::from_secs(120),
            max_attempt_timeout: Duration::from_secs(15),
            min_attempt_time: Duration::from_millis(50),
            background_share: 4,
            backoff: BackoffPolicy::default(),
            retry_budget: RetryBudgetConfig::default(),
            breaker: BreakerConfig::default(),
            cache_ttl: Duration::from_secs(30),
            cache_capacity: 1024,
            shares: Arc::new(EqualShares),
            quota_window: Duration::from_secs(60),
            shared_budget: None,
        }
    }

    /// The same settings with the upstream's counting window set to `window`. The jitter margin
    /// stays 1 s (it covers how much later one request can arrive than another after their
    /// grants, which does not shrink with the window), but at most a quarter of a window
    /// shorter than 4 s.
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self.jitter_margin = (window / 4).min(Duration::from_secs(1));
        self
    }

    /// The same settings with the budget shared by every replica in `budget`.
    pub fn with_shared_budget(mut self, budget: Option<SharedBudget>) -> Self {
        self.shared_budget = budget;
        self
    }

    /// The same settings with callers' weights and quotas from `shares`.
    pub fn with_shares(mut self, shares: Arc<dyn CallerShares>) -> Self {
        self.shares = shares;
        self
    }
}

/// Whether an operation may be sent again after a failure that might have been applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Repeating it leaves the upstream as one success would (reads, upserts, deletes).
    Idempotent,
    /// Repeating it could act twice (a survey send, a workflow-starting event): it is retried
    /// only when the upstream surely did not act on it — the connection was never made, or the
    /// upstream refused it up front (429, 408).
    UnsafeToRepeat,
}

pub use crate::upstream::failure::FailureClass;

/// A failed attempt: the error to report, and what the scheduler needs to decide on a retry.
#[derive(Debug, Clone)]
pub struct AttemptError {
    pub error: Error,
    pub class: FailureClass,
    /// The upstream's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
}

impl AttemptError {
    pub fn permanent(error: Error) -> Self {
        Self {
            error,
            class: FailureClass::Permanent,
            retry_after: None,
        }
    }
}

/// A granted slot of the budget: the holder may send one request now.
#[derive(Debug)]
pub struct Permit {
    granted_at: Instant,
    /// The slot of the shared budget, given back with an unused permit.
    shared_grant: Option<GrantId>,
    probe: bool,
    /// The caller's quota slot this attempt took, given back with an unused permit.
    quota: Option<QuotaCharge>,
}

/// One attempt counted against a caller's quota.
#[derive(Debug, Clone)]
struct QuotaCharge {
    caller: Arc<str>,
    at: Instant,
}

/// An attempt waiting for a slot; the dispatcher sends it the grant.
#[derive(Debug)]
struct Waiter {
    id: u64,
    grant: oneshot::Sender<Grant>,
}

/// What the dispatcher hands a waiter.
#[derive(Debug)]
enum Grant {
    /// A slot taken at `at` (and its name in the shared budget, if there is one).
    Slot {
        at: Instant,
        shared: Option<GrantId>,
    },
    /// No slot could be asked for (the shared budget is unreachable): nothing was sent.
    Refused(Error),
}

/// A granted slot as [`Lane::acquire`] returns it.
#[derive(Debug)]
struct Slot {
    at: Instant,
    shared: Option<GrantId>,
    quota: Option<QuotaCharge>,
}

/// Quota windows kept before idle ones are dropped (callers come from the callers file, so this
/// is only reached after many reloads that renamed callers).
const MAX_QUOTA_WINDOWS: usize = 1024;

#[derive(Debug)]
struct LaneState {
    budget: SlidingWindow,
    interactive: FairQueue,
    background: FairQueue,
    /// Attempts started per caller in the quota window, for callers with a quota.
    quotas: HashMap<Arc<str>, SlidingWindow>,
    /// Interactive grants since background work last got one while it was waiting.
    interactive_streak: u32,
    breaker: Breaker,
    retry_budget: RetryBudget,
    rng: StdRng,
    next_waiter: u64,
    counters: LaneCounters,
    /// Set when the gateway drains: background work (outbox deliveries) is no longer sent, so
    /// nothing new leaves that the drain could cut in the middle.
    background_closed: bool,
}

/// What a lane has done since it started (for tests, metrics and the admin port).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneCounters {
    /// Slots granted, i.e. requests sent (or about to be).
    pub granted: u64,
    /// Attempts shed because the budget had no room in time.
    pub shed: u64,
    /// Retries made.
    pub retries: u64,
    /// Attempts refused by the open circuit.
    pub circuit_rejections: u64,
    /// 429 answers received from the upstream.
    pub upstream_rate_limited: u64,
    /// Attempts refused because their caller had used its quota.
    pub quota_rejections: u64,
}

/// `wait` rounded up to whole seconds, as RetryInfo carries it: callers sleep at least until
/// there is room.
fn whole_seconds(wait: Duration) -> Duration {
    Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
}

impl LaneState {
    /// Number of grants that would precede a new attempt of `priority` under the weighting, for
    /// a caller behind everyone already waiting in its class.
    fn ahead(&self, priority: Priority, share: u32) -> usize {
        let in_class = self.queue_ref(priority).len();
        self.with_other_class(priority, in_class, share)
    }

    /// Number of grants that would precede a new attempt of caller `flow` (at `weight`): in its
    /// class only what fair queueing serves first, plus the other class's share of the grants.
    fn ahead_of(&self, priority: Priority, flow: &FlowKey, weight: u32, share: u32) -> usize {
        let in_class = self.queue_ref(priority).ahead(flow, weight);
        self.with_other_class(priority, in_class, share)
    }

    fn with_other_class(&self, priority: Priority, in_class: usize, share: u32) -> usize {
        let share = share.max(1) as usize;
        match priority {
            Priority::Interactive => in_class + self.background.len().min(in_class / share),
            Priority::Background => in_class + self.interactive.len().min((in_class + 1) * share),
        }
    }

    fn queue_ref(&self, priority: Priority) -> &FairQueue {
        match priority {
            Priority::Interactive => &self.interactive,
            Priority::Background => &self.background,
        }
    }

    /// The class to serve next, following the weighting.
    fn next_class(&mut self, share: u32) -> Option<Priority> {
        let interactive = self.interactive.has_live();
        let background = self.background.has_live();
        match (interactive, background) {
            (false, false) => None,
            (true, false) => Some(Priority::Interactive),
            (false, true) => Some(Priority::Background),
            (true, true) if self.interactive_streak >= share => Some(Priority::Background),
            (true, true) => Some(Priority::Interactive),
        }
    }

    fn queue(&mut self, priority: Priority) -> &mut FairQueue {
        match priority {
            Priority::Interactive => &mut self.interactive,
            Priority::Background => &mut self.background,
        }
    }
}

struct Shared {
    upstream: &'static str,
    settings: SchedulerSettings,
    state: Mutex<LaneState>,
    /// Wakes the dispatcher: a waiter arrived, or the lane is gone.
    wake: Arc<Notify>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the dispatcher notice that the last handle is gone and exit.
        self.wake.notify_one();
    }
}

/// The scheduler of one upstream account. Cheap to clone.
#[derive(Clone)]
pub struct Lane {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl Lane {
    /// Creates the lane and spawns its dispatcher, so it must be called inside a tokio runtime.
    pub fn new(upstream: &'static str, settings: SchedulerSettings) -> Self {
        let state = LaneState {
            budget: SlidingWindow::new(
                settings.requests_per_window,
                settings.window + settings.jitter_margin,
            ),
            interactive: FairQueue::default(),
            background: FairQueue::default(),
            quotas: HashMap::new(),
            interactive_streak: 0,
            breaker: Breaker::new(settings.breaker.clone()),
            retry_budget: RetryBudget::new(settings.retry_budget.clone()),
            rng: StdRng::from_os_rng(),
            next_waiter: 0,
            counters: LaneCounters::default(),
            background_closed: false,
        };
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            upstream,
            settings,
            state: Mutex::new(state),
            wake: Arc::clone(&wake),
        });
        match shared.settings.shared_budget.clone() {
            Some(budget) => {
                tokio::spawn(dispatch_shared(Arc::downgrade(&shared), wake, budget));
            }
            None => {
                tokio::spawn(dispatch(Arc::downgrade(&shared), wake));
            }
        }
        register_probes(&shared);
        Self { shared }
    }

    pub fn upstream(&self) -> &'static str {
        self.shared.upstream
    }

    pub fn settings(&self) -> &SchedulerSettings {
        &self.shared.settings
    }

    pub fn counters(&self) -> LaneCounters {
        self.lock().counters
    }

    fn lock(&self) -> MutexGuard<'_, LaneState> {
        // The state is plain data updated in short critical sections without calls that can
        // panic halfway, so a poisoned lock still holds consistent state.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops sending background work: waiting background attempts and any that arrive later are
    /// refused with [`Lane::draining`], which says the request never left. Attempts already
    /// granted go on. Called once the gateway starts to drain.
    pub fn close_background(&self) {
        let waiting = {
            let mut state = self.lock();
            state.background_closed = true;
            std::mem::take(&mut state.background)
        };
        // Dropping the waiters closes their grant channels, which wakes them.
        drop(waiting);
        self.shared.wake.notify_one();
    }

    /// The refusal of background work during a drain; no request was sent.
    fn draining(&self) -> Error {
        Error::new(
            ErrorCode::Unavailable,
            Reason::GatewayDraining,
            format!(
                "the gateway is shutting down; nothing more is sent to {}",
                self.shared.upstream
            ),
        )
        .with_metadata("upstream", self.shared.upstream)
        .with_failure_class(FailureClass::NotSent)
    }

    /// A refusal by this lane, before anything is sent: the caller may come back after
    /// `retry_after` (a second at the least).
    fn refusal(
        &self,
        (code, reason): (ErrorCode, Reason),
        message: String,
        retry_after: Duration,
    ) -> Error {
        Error::new(code, reason, message)
            .with_retry_after(retry_after.max(Duration::from_secs(1)))
            .with_metadata("upstream", self.shared.upstream)
    }

    /// The error for an attempt that cannot get a slot in time.
    fn budget_exhausted(&self, wait: Duration) -> Error {
        self.refusal(
            (
                ErrorCode::ResourceExhausted,
                Reason::UpstreamBudgetExhausted,
            ),
            format!(
                "the {} request budget has no room in time for this call",
                self.shared.upstream
            ),
            whole_seconds(wait),
        )
    }

    /// The budget error for a caller that waited until its deadline, with the current estimate.
    pub fn budget_error_for(&self, priority: Priority) -> Error {
        let now = Instant::now();
        let mut state = self.lock();
        state.counters.shed += 1;
        let ahead = state.ahead(priority, self.shared.settings.background_share);
        let wait = state.budget.estimate(now, ahead) - now;
        drop(state);
        self.budget_exhausted(wait)
    }

    /// Asks the breaker and then the budget for one attempt slot, in a `scheduler.wait` span
    /// whose length is how long the budget held the call.
    pub async fn admit(&self, ctx: &CallContext) -> Result<Permit> {
        let upstream = self.shared.upstream;
        let priority = priority_name(ctx.priority);
        let span = tracing::info_span!(
            "scheduler.wait",
            upstream,
            priority,
            outcome = tracing::field::Empty,
        );
        let started = Instant::now();
        let result = self.admit_inner(ctx).instrument(span.clone()).await;
        let outcome = match &result {
            Ok(_) => "granted",
            Err(error) => match error.reason() {
                Reason::UpstreamCircuitOpen => "circuit_open",
                Reason::DeadlineExceeded => "deadline_exceeded",
                _ => "shed",
            },
        };
        span.record("outcome", outcome);
        // The caller is a bounded label: names come from the callers file (or the gateway's own
        // background work), never from what a request sends.
        let caller = ctx.caller.as_deref().unwrap_or(ANONYMOUS_CALLER);
        crate::telemetry::metrics().scheduler_wait.record(
            started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("upstream", upstream),
                KeyValue::new("priority", priority),
                KeyValue::new("outcome", outcome),
                KeyValue::new("caller", caller.to_owned()),
            ],
        );
        result
    }

    async fn admit_inner(&self, ctx: &CallContext) -> Result<Permit> {
        let probe = {
            let mut state = self.lock();
            match state.breaker.admit(Instant::now()) {
                Admission::Allowed => false,
                Admission::Probe => true,
                Admission::Rejected { retry_after } => {
                    state.counters.circuit_rejections += 1;
                    return Err(self.circuit_open(retry_after));
                }
            }
        };
        match self.acquire(ctx).await {
            Ok(slot) => Ok(Permit {
                granted_at: slot.at,
                shared_grant: slot.shared,
                probe,
                quota: slot.quota,
            }),
            Err(error) => {
                if probe {
                    self.lock().breaker.on_inconclusive(Instant::now());
                }
                Err(error)
            }
        }
    }

    fn circuit_open(&self, retry_after: Duration) -> Error {
        self.refusal(
            (ErrorCode::Unavailable, Reason::UpstreamCircuitOpen),
            format!(
                "{} is failing; calls are refused until a probe succeeds",
                self.shared.upstream
            ),
            retry_after,
        )
    }

    /// The error for a caller that has started its whole quota in the current window.
    fn quota_exceeded(&self, caller: &str, limit: u32, wait: Duration) -> Error {
        self.refusal(
            (ErrorCode::ResourceExhausted, Reason::CallerQuotaExceeded),
            format!(
                "caller {caller} has used its quota of {limit} {} requests per {}",
                self.shared.upstream,
                humantime::format_duration(self.shared.settings.quota_window)
            ),
            whole_seconds(wait),
        )
        .with_metadata("caller", caller)
        .with_metadata("quota", limit.to_string())
    }

    /// Counts one attempt against the caller's quota, or refuses it.
    fn charge_quota(
        &self,
        state: &mut LaneState,
        caller: Option<&Arc<str>>,
        share: CallerShare,
        now: Instant,
    ) -> Result<Option<QuotaCharge>> {
        let (Some(caller), Some(limit)) = (caller, share.quota_per_minute) else {
            return Ok(None);
        };
        let window = self.shared.settings.quota_window;
        if state.quotas.len() >= MAX_QUOTA_WINDOWS && !state.quotas.contains_key(caller) {
            state.quotas.retain(|_, log| log.in_window(now) > 0);
        }
        let log = state
            .quotas
            .entry(Arc::clone(caller))
            .or_insert_with(|| SlidingWindow::new(limit, window));
        if log.limit() != limit.max(1) as usize {
            // The quota changed with a reload: start counting afresh against the new one.
            *log = SlidingWindow::new(limit, window);
        }
        match log.try_acquire(now) {
            Ok(()) => Ok(Some(QuotaCharge {
                caller: Arc::clone(caller),
                at: now,
            })),
            Err(free_at) => {
                state.counters.quota_rejections += 1;
                Err(self.quota_exceeded(caller, limit, free_at - now))
            }
        }
    }

    fn refund_quota(state: &mut LaneState, charge: Option<&QuotaCharge>) {
        if let Some(charge) = charge
            && let Some(log) = state.quotas.get_mut(&charge.caller)
        {
            log.refund(charge.at);
        }
    }

    /// Waits for a budget slot, or sheds.
    async fn acquire(&self, ctx: &CallContext) -> Result<Slot> {
        let settings = &self.shared.settings;
        let now = Instant::now();
        let wait_limit = match ctx.remaining(now) {
            Some(remaining) => remaining
                .saturating_sub(settings.min_attempt_time)
                .min(settings.max_queue_wait),
            None => settings.max_queue_wait,
        };
        let share = ctx
            .caller
            .as_deref()
            .map_or_else(CallerShare::default, |caller| settings.shares.share(caller));
        let flow: FlowKey = ctx.caller.clone();
        let (id, mut granted, charge) = {
            let mut state = self.lock();
            if ctx.priority == Priority::Background && state.background_closed {
                return Err(self.draining());
            }
            let charge = self.charge_quota(&mut state, ctx.caller.as_ref(), share, now)?;
            let ahead =
                state.ahead_of(ctx.priority, &flow, share.weight, settings.background_share);
            // Straight through only when nobody waits at all: a free slot with waiters is the
            // dispatcher's to hand out by weight, or interactive arrivals could starve
            // background work that is already queued (and newcomers jump other callers). A
            // shared budget is only asked by the dispatcher, one slot at a time.
            let nobody_waits = !state.interactive.has_live() && !state.background.has_live();
            if settings.shared_budget.is_none()
                && nobody_waits
                && state.budget.try_acquire(now).is_ok()
            {
                state.counters.granted += 1;
                return Ok(Slot {
                    at: now,
                    shared: None,
                    quota: charge,
                });
            }
            let wait = state.budget.estimate(now, ahead) - now;
            if wait > wait_limit || state.queue(ctx.priority).len() >= settings.max_queue {
                state.counters.shed += 1;
                Self::refund_quota(&mut state, charge.as_ref());
                drop(state);
                tracing::debug!(
                    upstream = self.shared.upstream,
                    caller = ctx.caller.as_deref(),
                    wait_ms = wait.as_millis() as u64,
                    "shedding call: upstream budget has no room in time"
                );
                return Err(self.budget_exhausted(wait));
            }
            let id = state.next_waiter;
            state.next_waiter += 1;
            let (grant, granted) = oneshot::channel();
            state
                .queue(ctx.priority)
                .push(flow.clone(), share.weight, Waiter { id, grant });
            (id, granted, charge)
        };
        self.shared.wake.notify_one();
        tokio::select! {
            result = &mut granted => match result {
                Ok(grant) => self.granted(grant, charge),
                Err(_) => {
                    let mut state = self.lock();
                    Self::refund_quota(&mut state, charge.as_ref());
                    if ctx.priority == Priority::Background && state.background_closed {
                        return Err(self.draining());
                    }
                    Err(Error::internal(format!("{} scheduler stopped", self.shared.upstream)))
                }
            },
            () = tokio::time::sleep_until(now + wait_limit) => {
                granted.close();
                // The dispatcher may have granted just before the close; the wait limit keeps
                // `min_attempt_time` in reserve, so the slot is still worth using.
                if let Ok(grant) = granted.try_recv() {
                    return self.granted(grant, charge);
                }
                let now = Instant::now();
                let mut state = self.lock();
                state.queue(ctx.priority).remove(id);
                Self::refund_quota(&mut state, charge.as_ref());
                state.counters.shed += 1;
                let ahead =
                    state.ahead_of(ctx.priority, &flow, share.weight, settings.background_share);
                let wait = state.budget.estimate(now, ahead) - now;
                drop(state);
                self.shared.wake.notify_one();
                Err(self.budget_exhausted(wait))
            }
        }
    }

    /// The slot the dispatcher handed over, or its refusal (then the quota slot is given back).
    fn granted(&self, grant: Grant, charge: Option<QuotaCharge>) -> Result<Slot> {
        match grant {
            Grant::Slot { at, shared } => Ok(Slot {
                at,
                shared,
                quota: charge,
            }),
            Grant::Refused(error) => {
                Self::refund_quota(&mut self.lock(), charge.as_ref());
                Err(error)
            }
        }
    }

    /// Runs one operation: admission, attempts with retries, breaker bookkeeping.
    pub async fn call<T, F, Fut>(
        &self,
        ctx: &CallContext,
        idempotency: Idempotency,
        attempt: F,
    ) -> Result<T>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let permit = self.admit(ctx).await?;
        self.run_admitted(permit, ctx, idempotency, attempt).await
    }

    /// Like [`Lane::call`], for a caller that already holds the first attempt's permit (a batch
    /// seals its items only once it has one).
    pub async fn run_admitted<T, F, Fut>(
        &self,
        mut permit: Permit,
        ctx: &CallContext,
        idempotency: Idempotency,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        self.lock().retry_budget.record_call(Instant::now());
        let mut retry = 0u32;
        loop {
            let now = Instant::now();
            let max_attempt = self.shared.settings.max_attempt_timeout;
            let timeout = match ctx.remaining(now) {
                Some(remaining) if remaining < self.shared.settings.min_attempt_time => {
                    // Too late to start: give the slot back rather than waste it.
                    self.release_unused(permit);
                    return Err(deadline_exceeded(self.shared.upstream));
                }
                // The attempt ends a little before the deadline so the caller learns why
                // (a timeout upstream) rather than only that its time ran out.
                Some(remaining) => remaining.saturating_sub(REPLY_MARGIN).min(max_attempt),
                None => max_attempt,
            };
            // Whether the caller's deadline, not the gateway's own attempt limit, cut this attempt.
            let bounded_by_deadline = timeout < max_attempt;
            let mut guard = ProbeGuard {
                lane: self,
                probe: permit.probe,
                settled: false,
            };
            let outcome = RETRY.scope(retry, attempt(timeout)).await;
            let failure = match outcome {
                Ok(value) => {
                    guard.settle(None);
                    return Ok(value);
                }
                Err(failure) => failure,
            };
            guard.settle(Some(&failure));
            if failure.class == FailureClass::Refused
                && let (Some(after), Some(budget)) =
                    (failure.retry_after, &self.shared.settings.shared_budget)
            {
                // Every replica holds off, not just this one: the upstream counts the account.
                budget.block_for(after).await;
            }
            let Some(delay) = self.retry_delay(ctx, idempotency, &failure, retry) else {
                // The class goes with the error, so whoever decides next (the outbox) knows what
                // the upstream can have done.
                let error = failure.error.with_failure_class(failure.class);
                // A timeout cut short by the caller's deadline is DEADLINE_EXCEEDED (AIP-193),
                // still saying which upstream did not answer in its reason and metadata.
                if bounded_by_deadline && error.reason() == Reason::UpstreamTimeout {
                    return Err(error.with_code(ErrorCode::DeadlineExceeded));
                }
                return Err(error);
            };
            tracing::debug!(
                upstream = self.shared.upstream,
                retry,
                delay_ms = delay.as_millis() as u64,
                status = failure.error.metadata().get("status").map(String::as_str),
                "retrying upstream call"
            );
            tokio::time::sleep(delay).await;
            retry += 1;
            permit = self.admit(ctx).await?;
        }
    }

    fn release_unused(&self, permit: Permit) {
        if let (Some(grant), Some(budget)) =
            (permit.shared_grant, &self.shared.settings.shared_budget)
        {
            let budget = budget.clone();
            // Giving the slot back is not worth holding the caller for a round trip.
            tokio::spawn(async move { budget.refund(grant).await });
        }
        let mut state = self.lock();
        state.budget.refund(permit.granted_at);
        Self::refund_quota(&mut state, permit.quota.as_ref());
        state.counters.granted -= 1;
        if permit.probe {
            state.breaker.on_inconclusive(Instant::now());
        }
    }

    /// Gives back a permit whose request will not be sent (its batch emptied meanwhile).
    pub fn refund(&self, permit: Permit) {
        self.release_unused(permit);
        self.shared.wake.notify_one();
    }

    /// The delay before the next attempt, or `None` when the failure is final.
    fn retry_delay(
        &self,
        ctx: &CallContext,
        idempotency: Idempotency,
        failure: &AttemptError,
        retry: u32,
    ) -> Option<Duration> {
        let repeatable = match failure.class {
            FailureClass::Refused | FailureClass::Unavailable | FailureClass::NotSent => true,
            FailureClass::PossiblyApplied => idempotency == Idempotency::Idempotent,
            FailureClass::CredentialsRejected | FailureClass::Permanent => false,
        };
        let settings = &self.shared.settings;
        if !repeatable || retry + 1 >= settings.backoff.max_attempts {
            return None;
        }
        let now = Instant::now();
        let mut state = self.lock();
        let delay = settings
            .backoff
            .delay(retry, failure.retry_after, &mut state.rng);
        if let Some(remaining) = ctx.remaining(now)
            && delay + settings.min_attempt_time > remaining
        {
            return None;
        }
        if !state.retry_budget.try_retry(now) {
            tracing::debug!(
                upstream = self.shared.upstream,
                "retry budget spent; failing call"
            );
            return None;
        }
        state.counters.retries += 1;
        Some(delay)
    }
}

/// Reports an attempt's outcome to the breaker exactly once, even if the caller is cancelled.
struct ProbeGuard<'a> {
    lane: &'a Lane,
    probe: bool,
    settled: bool,
}

impl ProbeGuard<'_> {
    fn settle(&mut self, failure: Option<&AttemptError>) {
        self.settled = true;
        let now = Instant::now();
        let mut state = self.lane.lock();
        match failure.map(|f| f.class) {
            None | Some(FailureClass::Permanent | FailureClass::CredentialsRejected) => {
                state.breaker.on_success()
            }
            Some(
                FailureClass::PossiblyApplied | FailureClass::Unavailable | FailureClass::NotSent,
            ) => state.breaker.on_failure(now),
            Some(FailureClass::Refused) => {
                state.counters.upstream_rate_limited += 1;
                state.breaker.on_inconclusive(now);
                if let Some(after) = failure.and_then(|f| f.retry_after) {
                    // The upstream's count differs from ours (another client on the account, a
                    // restart that forgot the log): stop everyone, not just this caller.
                    state.budget.block_until(now + after);
                }
            }
        }
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.lane.lock().breaker.on_inconclusive(Instant::now());
        }
    }
}

/// Reports the lane's budget, queues and decisions to the metrics until the lane is dropped.
fn register_probes(shared: &Arc<Shared>) {
    use crate::telemetry::metrics::{Observed, Reading, register_probe};
    let probe = |kind: Observed, read: fn(&Shared, &mut LaneState, &mut Vec<Reading>)| {
        let lane = Arc::downgrade(shared);
        register_probe(kind, move |readings| {
            let Some(shared) = lane.upgrade() else {
                return false;
            };
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            read(&shared, &mut state, readings);
            true
        });
    };
    probe(Observed::BudgetAvailable, |shared, state, readings| {
        let available = state.budget.available(Instant::now());
        readings.push((
            available as u64,
            vec![KeyValue::new("upstream", shared.upstream)],
        ));
    });
    probe(Observed::SchedulerQueueDepth, |shared, state, readings| {
        for (priority, depth) in [
            (Priority::Interactive, state.interactive.len()),
            (Priority::Background, state.background.len()),
        ] {
            readings.push((
                depth as u64,
                vec![
                    KeyValue::new("upstream", shared.upstream),
                    KeyValue::new("priority", priority_name(priority)),
                ],
            ));
        }
    });
    probe(Observed::SchedulerEvents, |shared, state, readings| {
        let counters = state.counters;
        for (event, value) in [
            ("granted", counters.granted),
            ("shed", counters.shed),
            ("retried", counters.retries),
            ("circuit_rejected", counters.circuit_rejections),
            ("upstream_rate_limited", counters.upstream_rate_limited),
        ] {
            readings.push((
                value,
                vec![
                    KeyValue::new("upstream", shared.upstream),
                    KeyValue::new("event", event),
                ],
            ));
        }
    });
}

/// Hands out slots to waiters as the budget frees them. Exits when the lane is dropped.
async fn dispatch(lane: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next_wake = {
            let Some(shared) = lane.upgrade() else {
                return;
            };
            let share = shared.settings.background_share;
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                let Some(class) = state.next_class(share) else {
                    break None;
                };
                let now = Instant::now();
                match state.budget.try_acquire(now) {
                    Ok(()) => {
                        let Some(waiter) = state.queue(class).pop() else {
                            state.budget.refund(now);
                            continue;
                        };
                        if waiter
                            .grant
                            .send(Grant::Slot {
                                at: now,
                                shared: None,
                            })
                            .is_err()
                        {
                            state.budget.refund(now);
                            continue;
                        }
                        state.counters.granted += 1;
                        state.interactive_streak = match class {
                            Priority::Interactive if state.background.has_live() => {
                                state.interactive_streak + 1
                            }
                            _ => 0,
                        };
                    }
                    Err(at) => break Some(at),
                }
            }
        };
        match next_wake {
            None => wake.notified().await,
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
        }
    }
}

/// Hands out slots of the shared budget to waiters: asks the store for one slot whenever
/// someone waits, gives it to the waiter the weighting picks, and after a refusal waits the time
/// the store named. Exits when the lane is dropped.
async fn dispatch_shared(lane: Weak<Shared>, wake: Arc<Notify>, budget: SharedBudget) {
    loop {
        let Some(shared) = lane.upgrade() else {
            return;
        };
        let settings = &shared.settings;
        let share = settings.background_share;
        let waiting = {
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.next_class(share).is_some()
        };
        if !waiting {
            drop(shared);
            wake.notified().await;
            continue;
        }
        let answer = budget
            .acquire(
                settings.requests_per_window,
                settings.window + settings.jitter_margin,
            )
            .await;
        let now = Instant::now();
        // Decided under the lock, acted on after it (no guard is held across an await).
        let next = {
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            hand_out(&shared, &mut state, answer, now)
        };
        drop(shared);
        match next {
            AfterAsk::AskAgain => {}
            AfterAsk::Wait(retry_in) => {
                // Nothing frees before then, whoever arrives meanwhile.
                tokio::time::sleep(retry_in.max(MIN_SHARED_RETRY)).await;
            }
            AfterAsk::GiveBack(grant) => budget.refund(grant).await,
        }
    }
}

/// What the shared dispatcher does after an answer of the store.
enum AfterAsk {
    AskAgain,
    Wait(Duration),
    /// A slot nobody was left to take.
    GiveBack(GrantId),
}

/// Applies one answer of the shared budget: hands the slot to the waiter the weighting picks,
/// or, when the store could not be reached, refuses every waiter (fail closed).
fn hand_out(
    shared: &Shared,
    state: &mut LaneState,
    answer: std::result::Result<crate::store::budget::BudgetAnswer, crate::store::StoreError>,
    now: Instant,
) -> AfterAsk {
    let share = shared.settings.background_share;
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => {
            // Without the shared count no request may go, so every waiter hears now that
            // nothing was sent, rather than waiting out its deadline.
            let refusal = shared::unreachable(shared.upstream, &error);
            tracing::warn!(
                upstream = shared.upstream,
                %error,
                "shared upstream budget unreachable; refusing waiting calls"
            );
            for class in [Priority::Interactive, Priority::Background] {
                while let Some(waiter) = state.queue(class).pop() {
                    state.counters.shed += 1;
                    let _ = waiter.grant.send(Grant::Refused(refusal.clone()));
                }
            }
            return AfterAsk::AskAgain;
        }
    };
    state.budget.mirror(now, &answer.ages, answer.blocked_for);
    let Some(grant) = answer.grant else {
        return AfterAsk::Wait(answer.retry_in);
    };
    while let Some(class) = state.next_class(share) {
        let Some(waiter) = state.queue(class).pop() else {
            continue;
        };
        let slot = Grant::Slot {
            at: now,
            shared: Some(grant),
        };
        if waiter.grant.send(slot).is_err() {
            continue;
        }
        state.counters.granted += 1;
        state.interactive_streak = match class {
            Priority::Interactive if state.background.has_live() => state.interactive_streak + 1,
            _ => 0,
        };
        return AfterAsk::AskAgain;
    }
    // Everyone left while the store answered.
    AfterAsk::GiveBack(grant)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod shared_tests;
