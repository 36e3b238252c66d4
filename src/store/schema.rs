//! Schema migrations, applied in order at open; `PRAGMA user_version` records how far a database
//! has come, so a newer gateway upgrades an older data directory in place and never goes back.

use rusqlite::Connection;

/// Each entry upgrades the schema by one version; never edit a published entry, append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: sync cursors (named positions of background pollers).
    "CREATE TABLE sync_cursors (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;",
];

pub fn migrate(connection: &mut Connection) -> rusqlite::Result<()> {
    let current: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let current = usize::try_from(current).unwrap_or(usize::MAX);
    if current > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the data directory was written by a newer gateway (schema {current}, this build knows {})",
            MIGRATIONS.len()
        )));
    }
    for (version, sql) in (1_i64..).zip(MIGRATIONS).skip(current) {
        let tx = connection.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
    }
    Ok(())
}
