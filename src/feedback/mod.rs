//! The feedback pipeline behind `FeedbackStream`: Retently responses are read by an incremental
//! poller (and, optionally, received from webhook calls), deduplicated into a durable log, and
//! fanned out to subscribers.
//!
//! ```text
//!  poller ──┐                       ┌──▶ broadcast ring ──▶ subscriber streams
//!           ├──▶ ingest ──▶ log ───┤         (live)          ▲
//!  webhook ─┘   (one appender)      └──▶ catch-up reads ──────┘
//! ```
//!
//! The pipeline stores and fans out encoded protobuf (each log entry keeps the exact
//! `SubscribeResponse` bytes every subscriber is sent), which is why it lives beside, not inside,
//! the protocol-free [`crate::domain`].
//!
//! # Layout
//!
//! - [`convert`]: Retently's feedback JSON to the contract's `Feedback`.
//! - [`log`]: the durable log, the latest version of every response, queries for
//!   `SurveyService.ListFeedback` ([`FeedbackLog::query`], [`FeedbackLog::covered_range`]).
//! - [`history`]: per-metric summaries and trends of one customer's responses
//!   (`SurveyService.GetCustomerFeedbackHistory`, read with [`FeedbackLog::customer_responses`]).
//! - [`ingest`]: the log's one appender: dedup, append, checkpoint, publish.
//! - [`hub`]: fan-out, start positions, catch-up from the log, heartbeats, drain.
//! - [`sync`]: the incremental poller and its upstream seam ([`sync::FeedbackSource`]).
//! - [`leader`]: the poller's lease, so replicas sharing a database run one poller in all.
//! - [`tail`]: on a shared database, publishes what other replicas append to this one's hub.
//! - [`webhook`]: authentication and reading of webhook export calls.
//! - [`retention`]: the task that deletes what the log no longer keeps.
//! - [`cursor`], [`filter`]: cursors and subscription filters.
//! - [`clock`], [`stats`]: the pipeline's wall clock and counters.

pub mod clock;
pub mod convert;
pub mod cursor;
pub mod filter;
pub mod history;
pub mod hub;
pub mod ingest;
pub mod leader;
pub mod log;
pub mod retention;
pub mod stats;
pub mod sync;
pub mod tail;
pub mod webhook;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

pub use self::clock::Clock;
pub use self::hub::{Hub, HubSettings, Start};
pub use self::ingest::Ingest;
pub use self::log::{CustomerKey, FeedbackLog, FeedbackQuery, FeedbackQueryPage};
pub use self::retention::{RetentionProgress, RetentionSettings};
pub use self::stats::{FeedbackStats, StatsSnapshot};
pub use self::sync::{CoveredRange, FeedbackSource, SyncSettings};
pub use self::webhook::{WebhookReceiver, WebhookSettings};
use crate::config::{FeedbackConfig, WebhookConfig};
use crate::error::Error;
use crate::shutdown::Drain;
use crate::store::Store;

/// Every setting of the pipeline.
#[derive(Debug, Clone, Default)]
pub struct FeedbackSettings {
    pub sync: Option<SyncSettings>,
    pub hub: HubSettings,
    pub retention: RetentionSettings,
    pub webhook: Option<WebhookSettings>,
}

impl FeedbackSettings {
    pub fn from_config(feedback: &FeedbackConfig, webhook: &WebhookConfig) -> FeedbackSettings {
        let non_zero = |duration: std::time::Duration| (!duration.is_zero()).then_some(duration);
        FeedbackSettings {
            sync: feedback.sync.then(|| SyncSettings {
                poll_interval: feedback.poll_interval,
                overlap: feedback.overlap,
                backfill: feedback.backfill,
                rescan_interval: non_zero(feedback.rescan_interval),
                rescan_window: feedback.rescan_window,
            }),
            hub: HubSettings {
                heartbeat_interval: feedback.heartbeat_interval,
                max_subscribers: feedback.max_subscribers,
                live_buffer: feedback.subscriber_buffer,
                ..HubSettings::default()
            },
            retention: RetentionSettings {
                max_age: non_zero(feedback.retention),
                max_entries: (feedback.retention_max_entries > 0)
                    .then_some(feedback.retention_max_entries),
                interval: feedback.retention_interval,
            },
            webhook: webhook.secret.as_ref().map(|secret| WebhookSettings {
                secret: secret.clone(),
                secret_header: webhook.secret_header.clone(),
                signing_secret: webhook.signing_secret.clone(),
                tolerance: webhook.tolerance,
                max_body_bytes: webhook.max_body_bytes,
            }),
        }
    }
}

/// A task the caller runs until draining starts (see [`crate::app::App::spawn_background`]).
pub type Worker = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The assembled pipeline; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Feedback {
    hub: Arc<Hub>,
    ingest: Ingest,
    webhook: Option<Arc<WebhookReceiver>>,
    stats: Arc<FeedbackStats>,
    retention: watch::Receiver<RetentionProgress>,
    /// Whether the poller runs (the sync lag is reported only then).
    syncing: bool,
    clock: Clock,
    /// When the pipeline opened (UNIX milliseconds): the sync lag counts from here until the
    /// poller knows its watermark.
    opened_ms: i64,
}

impl Feedback {
    /// Opens the log in `store` and builds the pipeline. Returns it with its workers (ingest,
    /// retention, and the poller when `source` is given and sync is on) for the caller to run.
    /// Reads the log's identity first (see [`FeedbackLog::open`]).
    pub async fn open(
        store: Store,
        settings: FeedbackSettings,
        source: Option<Arc<dyn FeedbackSource>>,
        clock: Clock,
        drain: Drain,
    ) -> Result<(Feedback, Vec<Worker>), Error> {
        let stats = Arc::new(FeedbackStats::default());
        let (log, state) = FeedbackLog::open(store.clone()).await?;
        tracing::info!(
            head = state.head_seq,
            pruned = state.pruned_seq,
            "feedback log open"
        );
        let hub = Hub::new(
            log.clone(),
            state,
            settings.hub.clone(),
            drain.clone(),
            clock,
            Arc::clone(&stats),
        );
        let (ingest, ingest_task) = Ingest::new(
            store.clone(),
            Arc::clone(&hub),
            clock,
            Arc::clone(&stats),
            drain.clone(),
        );
        let (progress, retention) = watch::channel(RetentionProgress::default());
        let mut workers: Vec<Worker> = vec![
            Box::pin(ingest_task),
            Box::pin(retention::run(
                log,
                settings.retention.clone(),
                clock,
                Arc::clone(&stats),
                drain.clone(),
                progress,
            )),
        ];
        // Other replicas append to a shared log: this replica's subscribers get their entries
        // from the tail.
        if let Some(wakeups) = store.feedback_log().append_wakeups() {
            workers.push(Box::pin(tail::run(
                Arc::clone(&hub),
                store.clone(),
                wakeups,
                drain.clone(),
            )));
        }
        let syncing = settings.sync.is_some() && source.is_some();
        match (settings.sync.clone(), source) {
            (Some(sync), Some(source)) => {
                let leadership = leader::Leadership::new(
                    Arc::clone(store.leases()),
                    sync::CURSOR_NAME,
                    leader::replica_name(),
                    Arc::clone(&stats),
                    drain.clone(),
                );
                let poller = sync::Poller {
                    source,
                    ingest: ingest.clone(),
                    hub: Arc::clone(&hub),
                    store,
                    settings: sync,
                    clock,
                    stats: Arc::clone(&stats),
                    drain,
                    leadership,
                };
                workers.push(Box::pin(poller.run()));
            }
            (Some(_), None) => {
                tracing::warn!("no retently client, the feedback sync does not run");
            }
            (None, _) => tracing::info!("feedback sync is off"),
        }
        let webhook = match settings.webhook {
            Some(webhook) => Some(Arc::new(WebhookReceiver::new(
                webhook,
                ingest.clone(),
                clock,
                Arc::clone(&stats),
            )?)),
            None => None,
        };
        Ok((
            Feedback {
                hub,
                ingest,
                webhook,
                stats,
                retention,
                syncing,
                clock,
                opened_ms: clock.now_ms(),
            },
            workers,
        ))
    }

    /// Reports the pipeline to the process's metrics until it is dropped: its counters
    /// ([`FeedbackStats::register_metrics`]), the sync lag, and a zero for every series of the
    /// sync and subscriber counters, so that rates and alerts have a series from the start.
    pub fn register_metrics(&self) {
        use crate::telemetry::metrics::{Observed, metrics, register_float_probe};
        use opentelemetry::KeyValue;
        FeedbackStats::register_metrics(&self.stats);
        let metrics = metrics();
        metrics.subscriber_overflows.add(0, &[]);
        for cause in ["overflow", "replay"] {
            metrics
                .subscriber_catch_ups
                .add(0, &[KeyValue::new("cause", cause)]);
        }
        if !self.syncing {
            return;
        }
        for kind in ["incremental", "rescan"] {
            for outcome in ["ok", "failed"] {
                metrics.feedback_polls.add(
                    0,
                    &[
                        KeyValue::new("kind", kind),
                        KeyValue::new("outcome", outcome),
                    ],
                );
            }
        }
        for outcome in ["new", "updated", "unchanged", "malformed"] {
            metrics
                .feedback_items
                .add(0, &[KeyValue::new("outcome", outcome)]);
        }
        let hub = Arc::downgrade(&self.hub);
        let clock = self.clock;
        let opened_ms = self.opened_ms;
        register_float_probe(Observed::FeedbackSyncLag, move |readings| {
            let Some(hub) = hub.upgrade() else {
                return false;
            };
            // The watermark is the start of the last complete incremental poll, on this
            // gateway's clock: everything recorded upstream before it is in the log.
            let since = hub.sync_time_ms().unwrap_or(opened_ms);
            let lag_ms = clock.now_ms().saturating_sub(since).max(0);
            readings.push((lag_ms as f64 / 1000.0, Vec::new()));
            true
        });
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The log, for `SurveyService.ListFeedback` (see [`FeedbackLog::covered_range`] and
    /// [`FeedbackLog::query`]).
    pub fn log(&self) -> &FeedbackLog {
        self.hub.log()
    }

    /// Other observers of responses (e.g. a `GetFeedback` read) may hand versions to the log.
    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    /// The webhook receiver, when `CXGW_WEBHOOK_SECRET` is set.
    pub fn webhook(&self) -> Option<Arc<WebhookReceiver>> {
        self.webhook.clone()
    }

    pub fn stats(&self) -> &Arc<FeedbackStats> {
        &self.stats
    }

    /// Rounds and deletions of the retention task.
    pub fn retention_progress(&self) -> watch::Receiver<RetentionProgress> {
        self.retention.clone()
    }
}
