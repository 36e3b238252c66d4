//! Checkpoints on PostgreSQL: table `sync_cursors`.

use super::{PostgresStore, in_transaction, query_error};
use crate::store::StoreError;
use crate::store::cursors::{Checkpoint, CursorStore};

/// Writes `checkpoint` inside the caller's transaction.
pub(super) async fn put(
    tx: &tokio_postgres::Transaction<'_>,
    checkpoint: &Checkpoint,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO sync_cursors (name, value) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        &[&checkpoint.name, &checkpoint.value],
    )
    .await
    .map_err(fail)?;
    Ok(())
}

#[async_trait::async_trait]
impl CursorStore for PostgresStore {
    async fn get(&self, name: &str) -> Result<Option<String>, StoreError> {
        let connection = self.connection("read a checkpoint").await?;
        let row = connection
            .query_opt("SELECT value FROM sync_cursors WHERE name = $1", &[&name])
            .await
            .map_err(query_error("read a checkpoint"))?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn put(&self, checkpoint: Checkpoint) -> Result<(), StoreError> {
        in_transaction!(self, "write a checkpoint", |tx| {
            put(&tx, &checkpoint, &query_error("write a checkpoint")).await
        })
    }
}
