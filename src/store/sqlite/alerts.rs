//! The alert evaluator's state in SQLite: `alert_checkpoint` (one row) and `alert_keys` (one row
//! per alert raised, queued or rate limited). Deliveries go into the outbox through the outbox's
//! own insert.

use std::time::Duration;

use rusqlite::{OptionalExtension as _, params};

use super::SqliteStore;
use super::outbox::insert_delivery;
use crate::store::StoreError;
use crate::store::alerts::{AlertOutcome, AlertStore, PendingAlert};

/// Schema of the evaluator's state. Also gives each feedback log entry the `traceparent` of its
/// ingestion, which an alert's delivery span links to.
pub(super) const MIGRATION: (&str, &str) = (
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

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl AlertStore for SqliteStore {
    async fn checkpoint(&self) -> Result<Option<i64>, StoreError> {
        self.read(|connection| {
            connection
                .query_row("SELECT seq FROM alert_checkpoint", [], |row| row.get(0))
                .optional()
        })
        .await
    }

    async fn checkpoint_or_start_at(&self, head: i64) -> Result<i64, StoreError> {
        self.write(move |tx| {
            tx.execute(
                "INSERT OR IGNORE INTO alert_checkpoint (id, seq) VALUES (1, ?1)",
                [head],
            )?;
            tx.query_row("SELECT seq FROM alert_checkpoint", [], |row| row.get(0))
        })
        .await
    }

    async fn queue_alerts(
        &self,
        alerts: Vec<PendingAlert>,
        checkpoint: i64,
    ) -> Result<Vec<AlertOutcome>, StoreError> {
        self.write(move |tx| {
            let now = now_ms();
            let mut known = tx.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM alert_keys
                 WHERE rule = ?1 AND feedback_id = ?2 AND version = ?3)",
            )?;
            let mut queued_within = tx.prepare_cached(
                "SELECT COUNT(*) FROM alert_keys WHERE rule = ?1
                 AND create_ms > ?2 AND delivery_id IS NOT NULL",
            )?;
            let mut insert_key = tx.prepare_cached(
                "INSERT INTO alert_keys (rule, feedback_id, version, delivery_id, create_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut outcomes = Vec::with_capacity(alerts.len());
            for alert in alerts {
                let duplicate: bool = known.query_row(
                    params![alert.rule, alert.feedback_id, alert.version],
                    |row| row.get(0),
                )?;
                if duplicate {
                    outcomes.push(AlertOutcome::Duplicate);
                    continue;
                }
                let limited = match alert.rate_limit {
                    None => false,
                    Some(limit) => {
                        let queued: i64 = queued_within.query_row(
                            params![alert.rule, now.saturating_sub(millis(limit.per))],
                            |row| row.get(0),
                        )?;
                        queued >= i64::from(limit.count)
                    }
                };
                let delivery_id = (!limited).then_some(alert.delivery.delivery_id.as_str());
                insert_key.execute(params![
                    alert.rule,
                    alert.feedback_id,
                    alert.version,
                    delivery_id,
                    now
                ])?;
                if limited {
                    outcomes.push(AlertOutcome::RateLimited);
                } else {
                    insert_delivery(tx, &alert.delivery, None)?;
                    outcomes.push(AlertOutcome::Queued(alert.delivery.delivery_id));
                }
            }
            tx.execute(
                "INSERT INTO alert_checkpoint (id, seq) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET seq = max(seq, excluded.seq)",
                [checkpoint],
            )?;
            Ok(outcomes)
        })
        .await
    }

    async fn prune(&self, older_than: Duration) -> Result<usize, StoreError> {
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM alert_keys WHERE create_ms < ?1",
                [now_ms().saturating_sub(millis(older_than))],
            )
        })
        .await
    }
}
