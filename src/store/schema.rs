//! Schema migrations, applied at open. Each has a unique name recorded in `schema_migrations`
//! once applied, so independent parts of the gateway (outbox, feedback log) add their tables
//! without coordinating version numbers, and a newer gateway upgrades an older data directory
//! in place. Never edit a published migration; append a new one.

use rusqlite::Connection;

/// `(name, sql)`, applied in this order when not yet recorded.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_sync_cursors",
        // Named positions of background pollers.
        "CREATE TABLE sync_cursors (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;",
    ),
    crate::domain::outbox::MIGRATION,
    crate::domain::idempotency::MIGRATION,
    crate::feedback::log::MIGRATION,
    crate::domain::outbox::TRACE_CONTEXT_MIGRATION,
    crate::domain::outbox::VERIFY_MIGRATION,
];

pub fn migrate(connection: &mut Connection) -> rusqlite::Result<()> {
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            name TEXT PRIMARY KEY,
            applied_at_ms INTEGER NOT NULL
        ) STRICT;",
    )?;
    for (name, sql) in MIGRATIONS {
        let tx = connection.transaction()?;
        let applied: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE name = ?1)",
            [name],
            |row| row.get(0),
        )?;
        if !applied {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (name, applied_at_ms) VALUES (?1, ?2)",
                (name, chrono::Utc::now().timestamp_millis()),
            )?;
        }
        tx.commit()?;
    }
    Ok(())
}
