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
    crate::domain::idempotency::OWNER_MIGRATION,
    crate::domain::outbox::VERIFY_MIGRATION,
    crate::feedback::log::INDEX_MIGRATION,
    crate::store::alerts::MIGRATION,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory written by a gateway from before deliveries and idempotency records had
    /// owners keeps its records, now ownerless, after the upgrade.
    #[test]
    fn the_owner_migration_keeps_existing_records() {
        let mut connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch(
                "CREATE TABLE schema_migrations (
                    name TEXT PRIMARY KEY, applied_at_ms INTEGER NOT NULL) STRICT;",
            )
            .unwrap();
        // A data directory as the gateway left it just before the owner migration.
        let owner_migration = MIGRATIONS
            .iter()
            .position(|(name, _)| *name == "0012_caller_scope")
            .unwrap();
        for (name, sql) in &MIGRATIONS[..owner_migration] {
            connection.execute_batch(sql).unwrap();
            connection
                .execute(
                    "INSERT INTO schema_migrations (name, applied_at_ms) VALUES (?1, 0)",
                    [name],
                )
                .unwrap();
        }
        connection
            .execute_batch(
                "INSERT INTO idempotency (scope, key, request_hash, response, create_ms)
                    VALUES ('TrackEvent', 'k-1', x'01', x'02', 5);
                 INSERT INTO outbox (delivery_id, method, request, destinations, item_count,
                    replay_safe, state, create_ms, update_ms, next_attempt_ms, expire_ms)
                    VALUES ('dlv_old', 'TrackEvent', x'03', '2', 1, 0, 1, 5, 5, 5, 9);",
            )
            .unwrap();

        migrate(&mut connection).unwrap();

        let record: (Option<String>, String, String, Vec<u8>, i64) = connection
            .query_row(
                "SELECT owner, scope, key, response, create_ms FROM idempotency",
                [],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                    ))
                },
            )
            .unwrap();
        assert_eq!(
            record,
            (None, "TrackEvent".into(), "k-1".into(), vec![2], 5)
        );
        let delivery: (String, Option<String>) = connection
            .query_row("SELECT delivery_id, owner FROM outbox", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .unwrap();
        assert_eq!(delivery, ("dlv_old".into(), None));
        // Two callers may now hold the same key; one caller may not hold it twice.
        let insert =
            "INSERT INTO idempotency (owner, scope, key, request_hash, response, create_ms)
            VALUES (?1, 'TrackEvent', 'k-1', x'01', x'02', 6)";
        connection.execute(insert, ["alpha"]).unwrap();
        connection.execute(insert, ["beta"]).unwrap();
        assert!(connection.execute(insert, ["beta"]).is_err());
        // Applying again changes nothing.
        migrate(&mut connection).unwrap();
    }
}
