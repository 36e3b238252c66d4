//! Retention: a background task that deletes log entries older than the configured age and the
//! oldest ones beyond the configured count, in small chunks so the store's writer is never held
//! for long. Subscribers positioned before what it deleted get `CURSOR_EXPIRED`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::clock::Clock;
use super::log::FeedbackLog;
use super::stats::FeedbackStats;
use crate::backoff::{FailureStreak, failed_warn};
use crate::error::Error;
use crate::shutdown::{Drain, Rounds};

/// Entries deleted per store write.
const CHUNK: u64 = 5_000;

#[derive(Debug, Clone)]
pub struct RetentionSettings {
    /// Entries logged longer ago are deleted; `None` keeps them whatever their age.
    pub max_age: Option<Duration>,
    /// The oldest entries beyond this count are deleted; `None`: no count limit.
    pub max_entries: Option<u64>,
    /// How often retention is enforced.
    pub interval: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            max_age: Some(Duration::from_secs(30 * 24 * 3600)),
            max_entries: None,
            interval: Duration::from_secs(60),
        }
    }
}

/// Progress of the retention task, observable by tests and monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionProgress {
    /// Rounds completed.
    pub rounds: u64,
    /// Entries deleted since start.
    pub deleted: u64,
}

/// Enforces the policy once: deletes chunks until nothing more is due. Returns the count.
pub async fn enforce(
    log: &FeedbackLog,
    settings: &RetentionSettings,
    now_ms: i64,
) -> Result<u64, Error> {
    if settings.max_age.is_none() && settings.max_entries.is_none() {
        return Ok(0);
    }
    let cutoff = settings
        .max_age
        .map(|age| now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX)));
    let mut total = 0;
    loop {
        let deleted = log.prune_chunk(cutoff, settings.max_entries, CHUNK).await?;
        total += deleted;
        if deleted < CHUNK {
            return Ok(total);
        }
        // Let appends and reads between chunks.
        tokio::task::yield_now().await;
    }
}

/// Runs [`enforce`] every `interval` until draining starts. The first round comes one interval
/// after start, so a starting gateway spends its first moments serving, not cleaning up.
pub async fn run(
    log: FeedbackLog,
    settings: RetentionSettings,
    clock: Clock,
    stats: Arc<FeedbackStats>,
    drain: Drain,
    progress: watch::Sender<RetentionProgress>,
) {
    if settings.max_age.is_none() && settings.max_entries.is_none() {
        tracing::info!("feedback log retention is off: entries are kept forever");
        return;
    }
    let mut rounds = Rounds::every(settings.interval, drain);
    // Rounds come one interval apart whatever happens, so failures need no backoff here, only a
    // rate-limited warning.
    let mut failures = FailureStreak::for_store();
    while rounds.next().await {
        let deleted = match enforce(&log, &settings, clock.now_ms()).await {
            Ok(deleted) => {
                failures.succeeded();
                if deleted > 0 {
                    FeedbackStats::add(&stats.pruned, deleted);
                    tracing::info!(deleted, "feedback log retention deleted old entries");
                }
                deleted
            }
            Err(error) => {
                failed_warn!(
                    failures,
                    error,
                    "feedback log retention failed, retrying at the next round"
                );
                0
            }
        };
        progress.send_modify(|progress| {
            progress.rounds += 1;
            progress.deleted += deleted;
        });
    }
}
