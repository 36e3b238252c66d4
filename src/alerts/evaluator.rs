//! The alert evaluator: tails the feedback log from its own durable checkpoint, matches each entry
//! against the rules in force, and queues the alerts in the outbox together with the checkpoint's
//! move ([`AlertStore::queue_alerts`]), so a stop anywhere loses no alert and raises none twice.
//!
//! It reads the log, not the live fan-out: the log is the truth, entries appended while it was
//! down or behind are read on its next turn, and the hub's head only wakes it.

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;

use crate::alerts::metrics::{AlertOutcomeLabel, count};
use crate::alerts::payload::{AlertRecord, FeedbackFacts};
use crate::alerts::rules::{EventKind, RuleSet};
use crate::backoff::{FailureStreak, failed_error};
use crate::domain::Owner;
use crate::domain::outbox::{Outbox, new_delivery_id};
use crate::error::Error;
use crate::feedback::log::ReadOutcome;
use crate::feedback::{FeedbackLog, Hub};
use crate::pb;
use crate::shutdown::Drain;
use crate::store::AlertStore;
use crate::store::alerts::{AlertOutcome, PendingAlert, RateLimit};
use crate::store::outbox::{NewDelivery, QueuedDelivery};

/// Entries evaluated per transaction: bounds one commit's work and the memory of one turn.
const BATCH_ENTRIES: usize = 256;
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How often alert keys past their keeping time are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub struct Evaluator {
    pub log: FeedbackLog,
    pub hub: Arc<Hub>,
    pub rules: RuleSet,
    pub store: Arc<dyn AlertStore>,
    pub outbox: Outbox,
    /// Alert keys are kept this long (the feedback log's retention: a response can only come
    /// back as new once the log forgot it); `None` keeps them.
    pub keep_keys: Option<Duration>,
    pub drain: Drain,
}

/// The version key of one response version: a digest of its content, so the same version logged
/// again (after retention forgot it) has the same key.
fn version_of(feedback: &pb::Feedback) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, &feedback.encode_to_vec());
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Evaluator {
    /// Sets the checkpoint to the log's head the first time alerting runs on this store. Run
    /// before the feedback workers start, so the first responses they log are evaluated.
    pub async fn start_position(&self) -> Result<i64, Error> {
        let state = self.log.state().await?;
        Ok(self.store.checkpoint_or_start_at(state.head_seq).await?)
    }

    /// Queues `alerts` and moves the checkpoint to `checkpoint` in one store operation, then
    /// wakes the outbox's worker if anything was queued.
    async fn queue(
        &self,
        alerts: Vec<PendingAlert>,
        checkpoint: i64,
    ) -> Result<Vec<AlertOutcome>, Error> {
        let outcomes = self.store.queue_alerts(alerts, checkpoint).await?;
        if outcomes
            .iter()
            .any(|outcome| matches!(outcome, AlertOutcome::Queued(_)))
        {
            self.outbox.notify();
        }
        Ok(outcomes)
    }

    /// Evaluates until draining starts; store failures are retried with backoff.
    pub async fn run(self) {
        let mut head = self.hub.head_watch();
        let mut streak = FailureStreak::for_store();
        let mut last_prune = tokio::time::Instant::now();
        loop {
            if self.drain.is_draining() {
                return;
            }
            match self.turn().await {
                Ok(true) => {
                    streak.succeeded();
                    continue;
                }
                Ok(false) => {
                    let failures = streak.succeeded();
                    if failures > 0 {
                        tracing::info!(failures, "alert evaluation works again");
                    }
                }
                Err(error) => {
                    let delay =
                        failed_error!(streak, error, retry_in_ms, "cannot evaluate alert rules")
                            .delay;
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.drain.clone().signaled() => return,
                    }
                    continue;
                }
            }
            if let Some(keep) = self.keep_keys
                && last_prune.elapsed() >= PRUNE_EVERY
            {
                last_prune = tokio::time::Instant::now();
                if let Err(error) = self.store.prune(keep).await {
                    tracing::warn!(%error, "cannot prune alert keys");
                }
            }
            // Caught up: wait for the next append (or a periodic look, which also runs the
            // pruning above when nothing is logged for a long time).
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(PRUNE_EVERY) => {}
                () = self.drain.clone().signaled() => return,
            }
        }
    }

    /// Evaluates one batch after the checkpoint. `true` when it moved (there may be more).
    async fn turn(&self) -> Result<bool, Error> {
        let checkpoint = match self.store.checkpoint().await? {
            Some(checkpoint) => checkpoint,
            None => self.start_position().await?,
        };
        let entries = match self
            .log
            .read_after(checkpoint, i64::MAX, BATCH_ENTRIES, BATCH_BYTES)
            .await?
        {
            ReadOutcome::Entries(entries) => entries,
            ReadOutcome::Expired => {
                let pruned = self.log.state().await?.pruned_seq;
                tracing::warn!(
                    checkpoint,
                    pruned,
                    "feedback log entries were deleted by retention before alert rules saw them"
                );
                self.queue(Vec::new(), pruned).await?;
                return Ok(true);
            }
        };
        let Some(last) = entries.last().map(|entry| entry.sequence) else {
            return Ok(false);
        };
        let rules = self.rules.current();
        let expire_ms = self
            .outbox
            .expire_ms_from(chrono::Utc::now().timestamp_millis());
        let mut pending = Vec::new();
        for entry in &entries {
            let Ok(message) = pb::SubscribeResponse::decode(entry.message.clone()) else {
                tracing::warn!(
                    sequence = entry.sequence,
                    "a feedback log entry cannot be decoded, alert rules skip it"
                );
                continue;
            };
            let Some(pb::subscribe_response::Payload::FeedbackEvent(event)) = message.payload
            else {
                continue;
            };
            let kind = match pb::FeedbackEventKind::try_from(event.kind) {
                Ok(pb::FeedbackEventKind::Created) => EventKind::Created,
                Ok(pb::FeedbackEventKind::Updated) => EventKind::Updated,
                _ => continue,
            };
            let Some(feedback) = event.feedback else {
                continue;
            };
            let mut version = None;
            for rule in rules.iter().filter(|rule| rule.matches(kind, &feedback)) {
                let record = AlertRecord {
                    rule: rule.name.clone(),
                    event: kind,
                    log_sequence: entry.sequence,
                    feedback: FeedbackFacts::of(&feedback),
                };
                let request = serde_json::to_vec(&record)
                    .map_err(|error| Error::internal(format!("cannot encode an alert: {error}")))?;
                pending.push(PendingAlert {
                    rule: rule.name.clone(),
                    feedback_id: feedback.feedback_id.clone(),
                    version: version.get_or_insert_with(|| version_of(&feedback)).clone(),
                    rate_limit: rule.rate_limit.map(|limit| RateLimit {
                        count: limit.count,
                        per: limit.per,
                    }),
                    delivery: QueuedDelivery {
                        delivery_id: new_delivery_id(),
                        delivery: NewDelivery {
                            method: crate::alerts::ALERT_METHOD.to_owned(),
                            request,
                            destinations: Vec::new(),
                            item_count: 1,
                            // Alerts are independent of each other: one a receiver keeps
                            // failing must not hold back the rest for the retry window.
                            ordering_keys: Vec::new(),
                            idempotency_key: None,
                            // Receivers drop a repeated alert by its id (`Cx-Alert-Id`).
                            replay_safe: true,
                            // Only callers who see every delivery see alerts.
                            owner: Owner::Gateway.stored().to_owned(),
                        },
                        expire_ms,
                        // The delivery's span links to the span that ingested the response.
                        traceparent: entry.traceparent.clone(),
                    },
                });
            }
        }
        let rules_of: Vec<String> = pending.iter().map(|alert| alert.rule.clone()).collect();
        let outcomes = self.queue(pending, last).await?;
        for (rule, outcome) in rules_of.iter().zip(&outcomes) {
            // Counted once committed, and only for new matches: a batch evaluated again after a
            // failed commit, or an entry already alerted, counts nothing twice.
            match outcome {
                AlertOutcome::Queued(delivery_id) => {
                    count(rule, AlertOutcomeLabel::Matched);
                    tracing::info!(rule = %rule, %delivery_id, "alert queued");
                }
                AlertOutcome::RateLimited => {
                    count(rule, AlertOutcomeLabel::Matched);
                    count(rule, AlertOutcomeLabel::RateLimited);
                    tracing::info!(rule = %rule, "alert dropped by the rule's rate limit");
                }
                AlertOutcome::Duplicate => {}
            }
        }
        Ok(true)
    }
}
