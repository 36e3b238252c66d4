//! Idempotency records on PostgreSQL: table `idempotency`, unique per `(owner, scope, key)`,
//! shared by every replica, so a repeat sent to another replica finds the same record.

use super::outbox::store_record;
use super::{PostgresStore, in_transaction, query_error};
use crate::store::StoreError;
use crate::store::idempotency::{IdempotencyRecord, IdempotencyStore, StoredResponse};

/// What [`PostgresStore::record_first`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstRecord {
    /// This call's record now holds the key.
    Stored,
    /// Another call recorded the key first, within the window: its record, which every
    /// caller racing on the key is to answer with.
    Existing(StoredResponse),
}

impl PostgresStore {
    /// Stores `record` unless the key already holds a record created at or after
    /// `created_since_ms`; of two replicas racing on one key, exactly one stores and the other
    /// gets that winner's record back. The insert waits for a racing insert of the same key to
    /// commit or roll back (the unique key's lock), so the loser always sees the winner.
    pub async fn record_first(
        &self,
        record: IdempotencyRecord,
        created_since_ms: i64,
    ) -> Result<FirstRecord, StoreError> {
        in_transaction!(self, "record an idempotent response", |tx| {
            let fail = query_error("record an idempotent response");
            let now = chrono::Utc::now().timestamp_millis();
            let stored = tx
                .execute(
                    "INSERT INTO idempotency (owner, scope, key, request_hash, response, create_ms)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (owner, scope, key) DO UPDATE SET
                        request_hash = EXCLUDED.request_hash, response = EXCLUDED.response,
                        create_ms = EXCLUDED.create_ms
                     WHERE idempotency.create_ms < $7",
                    &[
                        &record.owner,
                        &record.scope,
                        &record.key,
                        &record.request_hash,
                        &record.response,
                        &now,
                        &created_since_ms,
                    ],
                )
                .await
                .map_err(&fail)?;
            if stored == 1 {
                return Ok(FirstRecord::Stored);
            }
            // A new statement sees the winner's commit (read committed).
            let row = tx
                .query_one(
                    "SELECT request_hash, response FROM idempotency
                     WHERE owner = $1 AND scope = $2 AND key = $3",
                    &[&record.owner, &record.scope, &record.key],
                )
                .await
                .map_err(&fail)?;
            Ok(FirstRecord::Existing(StoredResponse {
                request_hash: row.get(0),
                response: row.get(1),
            }))
        })
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for PostgresStore {
    async fn lookup(
        &self,
        owner: &str,
        scope: &str,
        key: &str,
        created_since_ms: i64,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let connection = self.connection("look up an idempotency record").await?;
        let row = connection
            .query_opt(
                "SELECT request_hash, response FROM idempotency
                 WHERE owner = $1 AND scope = $2 AND key = $3 AND create_ms >= $4",
                &[&owner, &scope, &key, &created_since_ms],
            )
            .await
            .map_err(query_error("look up an idempotency record"))?;
        Ok(row.map(|row| StoredResponse {
            request_hash: row.get(0),
            response: row.get(1),
        }))
    }

    async fn record(&self, record: IdempotencyRecord) -> Result<(), StoreError> {
        in_transaction!(self, "record an idempotent response", |tx| {
            let fail = query_error("record an idempotent response");
            let now = chrono::Utc::now().timestamp_millis();
            store_record(&tx, &record, now, &fail).await
        })
    }

    async fn prune(&self, created_before_ms: i64) -> Result<usize, StoreError> {
        let connection = self.connection("prune idempotency records").await?;
        let pruned = connection
            .execute(
                "DELETE FROM idempotency WHERE create_ms < $1",
                &[&created_before_ms],
            )
            .await
            .map_err(query_error("prune idempotency records"))?;
        Ok(usize::try_from(pruned).unwrap_or(usize::MAX))
    }
}
