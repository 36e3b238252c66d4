//! Checkpoints in SQLite: table `sync_cursors`.

use rusqlite::{OptionalExtension as _, Transaction};

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::cursors::{Checkpoint, CursorStore};

/// Writes `checkpoint` inside the caller's transaction.
pub(super) fn put(tx: &Transaction<'_>, checkpoint: &Checkpoint) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO sync_cursors (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (&checkpoint.name, &checkpoint.value),
    )?;
    Ok(())
}

#[async_trait::async_trait]
impl CursorStore for SqliteStore {
    async fn get(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_owned();
        self.read(move |connection| {
            connection
                .query_row(
                    "SELECT value FROM sync_cursors WHERE name = ?1",
                    [name],
                    |row| row.get(0),
                )
                .optional()
        })
        .await
    }

    async fn put(&self, checkpoint: Checkpoint) -> Result<(), StoreError> {
        self.write(move |tx| put(tx, &checkpoint)).await
    }
}
