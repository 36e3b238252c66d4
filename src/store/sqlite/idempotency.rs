//! Idempotency records in SQLite: table `idempotency`, unique per `(owner, scope, key)`.

use rusqlite::{OptionalExtension as _, params};

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::idempotency::{IdempotencyRecord, IdempotencyStore, StoredResponse};

#[async_trait::async_trait]
impl IdempotencyStore for SqliteStore {
    async fn lookup(
        &self,
        owner: &str,
        scope: &str,
        key: &str,
        created_since_ms: i64,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let (owner, scope, key) = (owner.to_owned(), scope.to_owned(), key.to_owned());
        self.read(move |c| {
            // The owner's own record wins over one written before records had owners.
            c.query_row(
                "SELECT request_hash, response FROM idempotency
                 WHERE scope = ?1 AND key = ?2 AND create_ms >= ?3
                    AND (owner = ?4 OR owner IS NULL)
                 ORDER BY owner IS NULL LIMIT 1",
                params![scope, key, created_since_ms, owner],
                |row| {
                    Ok(StoredResponse {
                        request_hash: row.get(0)?,
                        response: row.get(1)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn record(&self, record: IdempotencyRecord) -> Result<(), StoreError> {
        self.write(move |tx| super::outbox::insert_idempotency(tx, &record))
            .await
    }

    async fn prune(&self, created_before_ms: i64) -> Result<usize, StoreError> {
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM idempotency WHERE create_ms < ?1",
                [created_before_ms],
            )
        })
        .await
    }
}
