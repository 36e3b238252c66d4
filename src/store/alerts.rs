//! The alert evaluator's durable state: its checkpoint in the feedback log, the key of every alert
//! it raised (one per rule, response and version), and the per-rule counts its rate limits read.
//!
//! [`AlertStore::commit`] queues a batch's alerts in the outbox, records their keys and moves the
//! checkpoint in one transaction: a crash before the commit re-evaluates the batch (nothing was
//! queued), a crash after it finds the checkpoint past the batch (nothing is queued twice), and an
//! entry evaluated again anyway (a checkpoint moved back by hand, a response logged again after
//! retention forgot it) meets its key and is skipped.

use std::time::Duration;

use rusqlite::{OptionalExtension as _, params};

use crate::domain::Owner;
use crate::domain::outbox::{NewDelivery, Outbox, insert_delivery, new_delivery_id};
use crate::error::Error;
use crate::store::Store;

/// Schema of the evaluator's state; registered with the store's migrations. Also gives each
/// feedback log entry the `traceparent` of its ingestion, which an alert's delivery span links to.
pub const MIGRATION: (&str, &str) = (
    "0017_alerts",
    "CREATE TABLE alert_checkpoint (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE alert_keys (
        rule TEXT NOT NULL,
        feedback_id TEXT NOT NULL,
        version TEXT NOT NULL,
        delivery_id TEXT,
        create_ms INTEGER NOT NULL,
        PRIMARY KEY (rule, feedback_id, version)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX alert_keys_by_rule ON alert_keys (rule, create_ms);
    CREATE INDEX alert_keys_by_time ON alert_keys (create_ms);
    ALTER TABLE feedback_log ADD COLUMN traceparent TEXT;",
);

/// An alert a rule raised for one log entry, not yet queued.
#[derive(Debug, Clone)]
pub struct PendingAlert {
    pub rule: String,
    pub feedback_id: String,
    /// Tells versions of one response apart (a digest of the version's content), so a rule that
    /// watches updates alerts once per version.
    pub version: String,
    /// The encoded alert the sender puts on the wire.
    pub request: Vec<u8>,
    pub rate_limit: Option<(u32, Duration)>,
    /// The `traceparent` the delivery's span links to.
    pub traceparent: Option<String>,
}

/// What became of a pending alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertOutcome {
    /// Queued in the outbox under this delivery id.
    Queued(String),
    /// This rule already alerted for this version of the response.
    Duplicate,
    /// The rule's rate limit was reached; the alert is dropped (and remembered, so it is not
    /// raised later either).
    RateLimited,
}

/// The evaluator's state in the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct AlertStore {
    store: Store,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl AlertStore {
    pub fn new(store: Store) -> AlertStore {
        AlertStore { store }
    }

    /// The checkpoint; on the very first start it is set to `head`, so alerting begins with the
    /// responses logged from then on instead of raising alerts for the whole retained log.
    pub async fn checkpoint_or_start_at(&self, head: i64) -> Result<i64, Error> {
        self.store
            .write(move |tx| {
                tx.execute(
                    "INSERT OR IGNORE INTO alert_checkpoint (id, seq) VALUES (1, ?1)",
                    [head],
                )?;
                tx.query_row("SELECT seq FROM alert_checkpoint", [], |row| row.get(0))
            })
            .await
    }

    /// The checkpoint, if the evaluator ever started.
    pub async fn checkpoint(&self) -> Result<Option<i64>, Error> {
        self.store
            .read(|c| {
                c.query_row("SELECT seq FROM alert_checkpoint", [], |row| row.get(0))
                    .optional()
            })
            .await
    }

    /// Queues `alerts` in `outbox` (skipping those already raised and those over their rule's
    /// rate limit) and moves the checkpoint to `checkpoint`, in one transaction. Returns what
    /// became of each alert, in order. Alerts are owned by the gateway, so only callers who see
    /// every delivery see them.
    pub async fn commit(
        &self,
        outbox: &Outbox,
        alerts: Vec<PendingAlert>,
        checkpoint: i64,
    ) -> Result<Vec<AlertOutcome>, Error> {
        let now = now_ms();
        let expire_ms = outbox.expire_ms_from(now);
        let outcomes = self
            .store
            .write(move |tx| {
                let mut outcomes = Vec::with_capacity(alerts.len());
                for alert in alerts {
                    let known: bool = tx.query_row(
                        "SELECT EXISTS (SELECT 1 FROM alert_keys
                         WHERE rule = ?1 AND feedback_id = ?2 AND version = ?3)",
                        params![alert.rule, alert.feedback_id, alert.version],
                        |row| row.get(0),
                    )?;
                    if known {
                        outcomes.push(AlertOutcome::Duplicate);
                        continue;
                    }
                    let limited = match alert.rate_limit {
                        None => false,
                        Some((count, per)) => {
                            let sent: i64 = tx.query_row(
                                "SELECT COUNT(*) FROM alert_keys WHERE rule = ?1
                                 AND create_ms > ?2 AND delivery_id IS NOT NULL",
                                params![alert.rule, now.saturating_sub(millis(per))],
                                |row| row.get(0),
                            )?;
                            sent >= i64::from(count)
                        }
                    };
                    let delivery_id = (!limited).then(new_delivery_id);
                    tx.execute(
                        "INSERT INTO alert_keys (rule, feedback_id, version, delivery_id, create_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![alert.rule, alert.feedback_id, alert.version, delivery_id, now],
                    )?;
                    match delivery_id {
                        None => outcomes.push(AlertOutcome::RateLimited),
                        Some(delivery_id) => {
                            let delivery = NewDelivery {
                                method: crate::alerts::ALERT_METHOD.to_owned(),
                                request: alert.request,
                                destinations: Vec::new(),
                                item_count: 1,
                                // Alerts are independent of each other: one a receiver keeps
                                // failing must not hold back the rest for the retry window.
                                ordering_keys: Vec::new(),
                                idempotency_key: None,
                                // Receivers drop a repeated alert by its id (`Cx-Alert-Id`).
                                replay_safe: true,
                                owner: Owner::Gateway,
                            };
                            insert_delivery(
                                tx,
                                &delivery_id,
                                &delivery,
                                now,
                                expire_ms,
                                alert.traceparent.as_deref(),
                            )?;
                            outcomes.push(AlertOutcome::Queued(delivery_id));
                        }
                    }
                }
                tx.execute(
                    "INSERT INTO alert_checkpoint (id, seq) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET seq = max(seq, excluded.seq)",
                    [checkpoint],
                )?;
                Ok(outcomes)
            })
            .await?;
        if outcomes
            .iter()
            .any(|outcome| matches!(outcome, AlertOutcome::Queued(_)))
        {
            outbox.notify();
        }
        Ok(outcomes)
    }

    /// The ingestion `traceparent` of the log entries in `(after, up_to]` that have one.
    pub async fn ingestion_traces(
        &self,
        after: i64,
        up_to: i64,
    ) -> Result<std::collections::HashMap<i64, String>, Error> {
        self.store
            .read(move |c| {
                let mut statement = c.prepare_cached(
                    "SELECT seq, traceparent FROM feedback_log
                     WHERE seq > ?1 AND seq <= ?2 AND traceparent IS NOT NULL",
                )?;
                statement
                    .query_map([after, up_to], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect()
            })
            .await
    }

    /// Forgets the keys of alerts raised before `before_ms`; returns how many.
    pub async fn prune(&self, before_ms: i64) -> Result<usize, Error> {
        self.store
            .write(move |tx| tx.execute("DELETE FROM alert_keys WHERE create_ms < ?1", [before_ms]))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::outbox::OutboxSettings;

    fn alert(rule: &str, feedback: &str, limit: Option<u32>) -> PendingAlert {
        PendingAlert {
            rule: rule.into(),
            feedback_id: feedback.into(),
            version: "v1".into(),
            request: b"{}".to_vec(),
            rate_limit: limit.map(|count| (count, Duration::from_secs(3600))),
            traceparent: None,
        }
    }

    #[tokio::test]
    async fn one_delivery_per_rule_and_version_within_the_rate_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let outbox = Outbox::new(store.clone(), OutboxSettings::default());
        let alerts = AlertStore::new(store);
        assert_eq!(alerts.checkpoint().await.unwrap(), None);
        assert_eq!(alerts.checkpoint_or_start_at(5).await.unwrap(), 5);
        assert_eq!(alerts.checkpoint_or_start_at(0).await.unwrap(), 5);

        let outcomes = alerts
            .commit(
                &outbox,
                vec![
                    alert("a", "f1", Some(2)),
                    alert("a", "f1", Some(2)),
                    alert("b", "f1", None),
                    alert("a", "f2", Some(2)),
                    alert("a", "f3", Some(2)),
                ],
                9,
            )
            .await
            .unwrap();
        assert!(matches!(outcomes[0], AlertOutcome::Queued(_)));
        assert_eq!(outcomes[1], AlertOutcome::Duplicate);
        assert!(matches!(outcomes[2], AlertOutcome::Queued(_)));
        assert!(matches!(outcomes[3], AlertOutcome::Queued(_)));
        assert_eq!(outcomes[4], AlertOutcome::RateLimited);
        assert_eq!(alerts.checkpoint().await.unwrap(), Some(9));
        let (pending, _) = outbox.depth().await.unwrap();
        assert_eq!(pending, 3);

        // The same entries evaluated again (a checkpoint that never moves back) queue nothing.
        let again = alerts
            .commit(
                &outbox,
                vec![alert("a", "f1", Some(2)), alert("a", "f3", Some(2))],
                7,
            )
            .await
            .unwrap();
        assert_eq!(
            again,
            vec![AlertOutcome::Duplicate, AlertOutcome::Duplicate]
        );
        assert_eq!(alerts.checkpoint().await.unwrap(), Some(9));
        assert_eq!(outbox.depth().await.unwrap().0, 3);
    }
}
