//! The survey cool-down across campaigns (the fatigue guard) and the event rules' throttles.
//!
//! Retently's campaign throttle "won't affect the schedule in other campaigns": a customer who
//! orders, opens a ticket and renews in one week gets three surveys. The gateway sends every
//! survey (SendSurvey and event rules alike), so it can keep one record of who it surveyed when
//! ([`crate::store::fatigue`]) and hold back a recipient surveyed within the cool-down, in any
//! campaign, before any upstream call. Keyed by the normalised email, the key Retently itself
//! uses for recipients.
//!
//! Order of a guarded send: reserve every recipient atomically (the store's one writer checks
//! and records in one transaction, so two concurrent sends to one customer cannot both pass),
//! send only the reserved ones, then release the reservation of a recipient the send certainly
//! did not survey (a typed failure that certainly did not apply, or Retently skipping them), so
//! a failed send does not block the next one.

use std::time::Duration;

use crate::app::App;
use crate::error::{Error, ErrorCode, Reason};
use crate::store::fatigue::{Claim, FatigueStore, Reservation, ReserveRequest, Surveyed};
use crate::upstream::CallContext;
use crate::upstream::failure::FailureClass;
use crate::upstream::retently::{CustomerInput, SurveyOutcome, SurveyRequest, SurveyStatus};

/// The scope of the cool-down across all campaigns.
const COOLDOWN_SCOPE: &str = "";
const DAY_MS: i64 = 24 * 3600 * 1000;

tokio::task_local! {
    /// The outbox delivery being attempted, whose id is the reservation token, so a retry of
    /// the delivery passes the reservation its earlier attempt made.
    static DELIVERY: String;
}

/// Runs `work` as (part of) the attempt of outbox delivery `delivery_id`.
pub async fn within_delivery<F: Future>(delivery_id: &str, work: F) -> F::Output {
    DELIVERY.scope(delivery_id.to_owned(), work).await
}

/// The reservation token of one send: within an outbox delivery, its id and what the send is
/// for (so a retry of the delivery passes its own reservation, while the other sends of the same
/// delivery, such as the other rules of one event, do not); otherwise a fresh one.
fn token(campaign_id: &str, limits: &Limits) -> String {
    DELIVERY
        .try_with(|delivery| {
            let rule = limits.origin.as_deref().unwrap_or_default();
            format!("{delivery}:{campaign_id}:{rule}")
        })
        .unwrap_or_else(|_| format!("sync:{:032x}", rand::random::<u128>()))
}

fn rule_scope(rule_id: &str) -> String {
    format!("rule:{rule_id}")
}

fn normalized(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Which throttle held a recipient back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleSource {
    SurveyCooldown,
    EventRule,
}

/// Why a recipient is not surveyed now, and from when they may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    pub source: ThrottleSource,
    pub eligible_at_ms: i64,
}

/// The limits of one send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// The cool-down in force for this send (the request's or rule's override, else the
    /// configured default). `Some(ZERO)` records the send without checking; `None` neither
    /// checks nor records.
    pub cooldown: Option<Duration>,
    /// An event rule's own throttle: its id and window.
    pub rule: Option<(String, Duration)>,
    /// The event rule sending, if any (one event's rules are separate sends).
    pub origin: Option<String>,
}

impl Limits {
    /// `override_` (a request's or rule's) or else `default`.
    pub fn resolve(default: Option<Duration>, override_: Option<Duration>) -> Option<Duration> {
        override_.or(default)
    }

    fn is_off(&self) -> bool {
        self.cooldown.is_none() && self.rule.is_none()
    }
}

/// What became of one recipient of a guarded send.
#[derive(Debug)]
pub enum Guarded {
    /// Sent upstream (or failed on the way): the upstream's answer.
    Sent(Result<SurveyOutcome, Error>),
    /// Held back by a throttle; no upstream call was made for them.
    Throttled(Throttle),
}

fn window_ms(window: Duration) -> i64 {
    i64::try_from(window.as_millis()).unwrap_or(i64::MAX)
}

/// Reserves `emails` under `limits` at `now_ms`: for each, `None` when reserved (or no limit
/// applies), or the throttle that holds them back.
async fn admit(
    store: &dyn FatigueStore,
    token: &str,
    now_ms: i64,
    emails: &[String],
    limits: &Limits,
) -> Result<Vec<Option<Throttle>>, Error> {
    if limits.is_off() {
        return Ok(vec![None; emails.len()]);
    }
    let mut claims = Vec::new();
    if let Some(cooldown) = limits.cooldown {
        // A zero cool-down records the send without checking: nothing is surveyed after
        // i64::MAX.
        let not_since_ms = if cooldown.is_zero() {
            i64::MAX
        } else {
            now_ms.saturating_sub(window_ms(cooldown))
        };
        claims.push(Claim {
            scope: COOLDOWN_SCOPE.to_owned(),
            not_since_ms,
        });
    }
    if let Some((rule_id, window)) = &limits.rule {
        claims.push(Claim {
            scope: rule_scope(rule_id),
            not_since_ms: now_ms.saturating_sub(window_ms(*window)),
        });
    }
    let requests = emails
        .iter()
        .map(|email| ReserveRequest {
            email: normalized(email),
            claims: claims.clone(),
        })
        .collect();
    let answers = store.reserve(token, now_ms, requests).await?;
    Ok(answers
        .into_iter()
        .map(|answer| match answer {
            Reservation::Granted => None,
            Reservation::Blocked { scope, surveyed_ms } => {
                let (source, window) = if scope == COOLDOWN_SCOPE {
                    (ThrottleSource::SurveyCooldown, limits.cooldown)
                } else {
                    (
                        ThrottleSource::EventRule,
                        limits.rule.as_ref().map(|(_, w)| *w),
                    )
                };
                Some(Throttle {
                    source,
                    eligible_at_ms: surveyed_ms.saturating_add(window.map_or(DAY_MS, window_ms)),
                })
            }
        })
        .collect())
}

/// Whether `result` certainly did not survey the recipient, so their reservation goes back:
/// a failure whose class says it did not apply, or Retently skipping them by name.
fn certainly_not_surveyed(result: &Result<SurveyOutcome, Error>) -> bool {
    match result {
        Ok(outcome) => matches!(
            outcome.status,
            SurveyStatus::Throttled | SurveyStatus::Unsubscribed
        ),
        Err(error) => error.failure_class() != Some(FailureClass::PossiblyApplied),
    }
}

/// Sends one campaign to `recipients` through the guard: throttled recipients get
/// [`Guarded::Throttled`] and no upstream call; the others are sent as one request (the
/// scheduler batches them) and their reservations settled by the answer. Results are in
/// recipient order.
pub async fn send_guarded(
    app: &App,
    ctx: &CallContext,
    campaign_id: &str,
    delay_days: Option<u32>,
    recipients: Vec<CustomerInput>,
    limits: &Limits,
) -> Vec<Guarded> {
    let store = app.store.fatigue().as_ref();
    let token = token(campaign_id, limits);
    let emails: Vec<String> = recipients.iter().map(|r| r.email.clone()).collect();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let admitted = match admit(store, &token, now_ms, &emails, limits).await {
        Ok(admitted) => admitted,
        Err(error) => {
            // Without the record the guard cannot promise anything: fail closed, retryably.
            let error = Error::new(
                ErrorCode::Unavailable,
                Reason::SurveyCooldownUnavailable,
                format!("the survey cool-down record cannot be read: {error}"),
            );
            return emails
                .iter()
                .map(|_| Guarded::Sent(Err(error.clone())))
                .collect();
        }
    };
    let mut results: Vec<Option<Guarded>> = admitted
        .iter()
        .map(|throttle| throttle.map(Guarded::Throttled))
        .collect();
    let (indexes, free): (Vec<usize>, Vec<CustomerInput>) = recipients
        .into_iter()
        .enumerate()
        .filter(|(index, _)| admitted[*index].is_none())
        .unzip();
    let sent = app
        .retently
        .send_surveys(ctx, campaign_id, delay_days, free)
        .await;
    for (index, result) in indexes.into_iter().zip(sent) {
        if !limits.is_off() && certainly_not_surveyed(&result) {
            let email = normalized(&emails[index]);
            if let Err(error) = store.release(&token, &email).await {
                // The recipient stays held until the cool-down passes: a missed survey, never a
                // second one.
                tracing::warn!(%error, "cannot release a survey cool-down reservation");
            }
        }
        results[index] = Some(Guarded::Sent(result));
    }
    results
        .into_iter()
        .map(|result| {
            result.unwrap_or_else(|| {
                Guarded::Sent(Err(Error::internal(
                    "a recipient was neither sent nor held",
                )))
            })
        })
        .collect()
}

/// One survey of one recipient through the guard (event rules).
pub async fn send_one_guarded(
    app: &App,
    ctx: &CallContext,
    request: SurveyRequest,
    limits: &Limits,
) -> Guarded {
    send_guarded(
        app,
        ctx,
        &request.campaign_id,
        request.delay_days,
        vec![request.recipient],
        limits,
    )
    .await
    .pop()
    .unwrap_or_else(|| Guarded::Sent(Err(Error::internal("no result for the recipient"))))
}

/// A rule's throttle window in days as a duration.
pub fn days(days: u32) -> Duration {
    Duration::from_secs(u64::from(days) * 24 * 3600)
}

/// Sent surveys read per history page (Retently's maximum).
const BACKFILL_PAGE: u32 = 1000;

/// Seeds the cool-down record once from Retently's history of sent surveys (`GET /outbox`) of
/// the last `window`, at background priority, so surveys sent before the guard was switched on
/// (or by other tools) count. Runs until done, backing off on failures; marked done in the store,
/// so it runs once per store. A later time already recorded wins.
pub async fn backfill(app: std::sync::Arc<App>, window: Duration) {
    use crate::upstream::retently::{OutboxQuery, PageRequest};
    let store = app.store.fatigue();
    let drain = app.drain.clone();
    let mut backoff = crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        if drain.is_draining() {
            return;
        }
        match store.backfilled().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot read whether the survey cool-down backfill is done");
                if sleep_or_drain(&drain, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        }
        let start = chrono::Utc::now() - chrono::Duration::from_std(window).unwrap_or_default();
        let ctx = CallContext::background();
        let mut page = 1;
        let mut seeded = 0usize;
        let finished = loop {
            let found = app
                .retently
                .outbox(
                    &ctx,
                    OutboxQuery {
                        start_date: Some(start),
                        page: PageRequest {
                            page: Some(page),
                            limit: Some(BACKFILL_PAGE),
                            sort: None,
                        },
                        ..OutboxQuery::default()
                    },
                )
                .await;
            let found = match found {
                Ok(found) => found,
                Err(error) => break Err(error),
            };
            let surveyed: Vec<Surveyed> = found
                .items
                .iter()
                .filter_map(|survey| {
                    let email = normalized(survey.email.as_deref()?);
                    let sent = survey
                        .sent_date
                        .as_deref()
                        .or(survey.survey_created_date.as_deref())?;
                    let sent_ms = chrono::DateTime::parse_from_rfc3339(sent)
                        .ok()?
                        .timestamp_millis();
                    (!email.is_empty()).then_some(Surveyed { email, sent_ms })
                })
                .collect();
            let last = match found.pages {
                Some(pages) => page >= pages,
                None => found.items.len() < BACKFILL_PAGE as usize,
            };
            seeded += surveyed.len();
            if let Err(error) = store.seed(surveyed, last).await {
                break Err(Error::from(error));
            }
            if last {
                break Ok(());
            }
            if drain.is_draining() {
                return;
            }
            page += 1;
        };
        match finished {
            Ok(()) => {
                tracing::info!(
                    surveys = seeded,
                    "survey cool-down seeded from the retently history"
                );
                return;
            }
            Err(error) => {
                tracing::warn!(%error, page, "survey cool-down backfill failed, trying again");
                if sleep_or_drain(&drain, backoff.next_delay()).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps `delay`; `true` when draining started meanwhile.
async fn sleep_or_drain(drain: &crate::shutdown::Drain, delay: Duration) -> bool {
    tokio::select! {
        () = drain.clone().signaled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}
