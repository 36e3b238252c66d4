//! The alert evaluator's state on PostgreSQL: `alert_checkpoint` (one row) and `alert_keys`.
//! Deliveries go into the outbox through the outbox's own insert. Queueing takes the checkpoint
//! row's lock first, so evaluators of several replicas queue one batch at a time and a rule's
//! rate limit counts every replica's alerts.

use std::time::Duration;

use super::outbox::insert_delivery;
use super::{PostgresStore, in_transaction, query_error};
use crate::store::StoreError;
use crate::store::alerts::{AlertOutcome, AlertStore, PendingAlert};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl AlertStore for PostgresStore {
    async fn checkpoint(&self) -> Result<Option<i64>, StoreError> {
        let connection = self.connection("read the alert checkpoint").await?;
        let row = connection
            .query_opt("SELECT seq FROM alert_checkpoint", &[])
            .await
            .map_err(query_error("read the alert checkpoint"))?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn checkpoint_or_start_at(&self, head: i64) -> Result<i64, StoreError> {
        in_transaction!(self, "start the alert checkpoint", |tx| {
            let fail = query_error("start the alert checkpoint");
            tx.execute(
                "INSERT INTO alert_checkpoint (id, seq) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
                &[&head],
            )
            .await
            .map_err(&fail)?;
            let row = tx
                .query_one("SELECT seq FROM alert_checkpoint", &[])
                .await
                .map_err(&fail)?;
            Ok(row.get::<_, i64>(0))
        })
    }

    async fn queue_alerts(
        &self,
        alerts: Vec<PendingAlert>,
        checkpoint: i64,
    ) -> Result<Vec<AlertOutcome>, StoreError> {
        in_transaction!(self, "queue alerts", |tx| {
            let fail = query_error("queue alerts");
            let now = now_ms();
            // The checkpoint row's lock serializes batches across replicas.
            tx.execute(
                "INSERT INTO alert_checkpoint (id, seq) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET seq = GREATEST(alert_checkpoint.seq, EXCLUDED.seq)",
                &[&checkpoint],
            )
            .await
            .map_err(&fail)?;
            let mut outcomes = Vec::with_capacity(alerts.len());
            for alert in alerts {
                let known = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM alert_keys
                         WHERE rule = $1 AND feedback_id = $2 AND version = $3)",
                        &[&alert.rule, &alert.feedback_id, &alert.version],
                    )
                    .await
                    .map_err(&fail)?;
                if known.get::<_, bool>(0) {
                    outcomes.push(AlertOutcome::Duplicate);
                    continue;
                }
                let limited = match alert.rate_limit {
                    None => false,
                    Some(limit) => {
                        let since = now.saturating_sub(millis(limit.per));
                        let queued = tx
                            .query_one(
                                "SELECT COUNT(*) FROM alert_keys WHERE rule = $1
                                 AND create_ms > $2 AND delivery_id IS NOT NULL",
                                &[&alert.rule, &since],
                            )
                            .await
                            .map_err(&fail)?;
                        queued.get::<_, i64>(0) >= i64::from(limit.count)
                    }
                };
                let delivery_id = (!limited).then_some(alert.delivery.delivery_id.as_str());
                tx.execute(
                    "INSERT INTO alert_keys (rule, feedback_id, version, delivery_id, create_ms)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &alert.rule,
                        &alert.feedback_id,
                        &alert.version,
                        &delivery_id,
                        &now,
                    ],
                )
                .await
                .map_err(&fail)?;
                if limited {
                    outcomes.push(AlertOutcome::RateLimited);
                } else {
                    insert_delivery(&tx, &alert.delivery, now, &fail).await?;
                    outcomes.push(AlertOutcome::Queued(alert.delivery.delivery_id));
                }
            }
            Ok(outcomes)
        })
    }

    async fn prune(&self, older_than: Duration) -> Result<usize, StoreError> {
        in_transaction!(self, "prune alert keys", |tx| {
            let before = now_ms().saturating_sub(millis(older_than));
            let deleted = tx
                .execute("DELETE FROM alert_keys WHERE create_ms < $1", &[&before])
                .await
                .map_err(query_error("prune alert keys"))?;
            Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
        })
    }
}
