//! The SQLite schema: migrations, applied at open. Each has a unique name recorded in
//! `schema_migrations` once applied, so independent concerns (outbox, feedback log) add their
//! tables without coordinating version numbers, and a newer gateway upgrades an older data directory
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
    OUTBOX,
    IDEMPOTENCY,
    FEEDBACK_LOG,
    OUTBOX_TRACEPARENT,
    CALLER_SCOPE,
    OUTBOX_VERIFY_SINCE,
    FEEDBACK_ITEMS_LOOKUP,
    super::error_codes::MIGRATION,
    super::fatigue::MIGRATION,
    super::alerts::MIGRATION,
];

/// The outbox of asynchronous writes, and the ordering keys (customers) of each delivery.
const OUTBOX: (&str, &str) = (
    "0002_outbox",
    "CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        delivery_id TEXT NOT NULL UNIQUE,
        method TEXT NOT NULL,
        request BLOB NOT NULL,
        destinations TEXT NOT NULL,
        item_count INTEGER NOT NULL,
        idempotency_key TEXT,
        replay_safe INTEGER NOT NULL,
        state INTEGER NOT NULL,
        attempt_count INTEGER NOT NULL DEFAULT 0,
        replay_count INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        result BLOB,
        create_ms INTEGER NOT NULL,
        update_ms INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL,
        complete_ms INTEGER,
        expire_ms INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX outbox_by_state ON outbox (state, next_attempt_ms);
    CREATE TABLE outbox_keys (
        key TEXT NOT NULL,
        seq INTEGER NOT NULL REFERENCES outbox (seq) ON DELETE CASCADE,
        PRIMARY KEY (key, seq)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX outbox_keys_by_seq ON outbox_keys (seq);",
);

/// The W3C `traceparent` of the span that queued each delivery (NULL when traces were not
/// exported), so its delivery can link to the trace of the call that was acknowledged.
const OUTBOX_TRACEPARENT: (&str, &str) = (
    "0011_outbox_traceparent",
    "ALTER TABLE outbox ADD COLUMN traceparent TEXT;",
);

/// When a delivery's earliest attempt that may have reached the upstream without a clear answer
/// started (UNIX ms), for writes whose upstream keeps a history to check (survey sends): the
/// next attempt first reads that history since then and sends only what is not in it. NULL when
/// there is nothing to check.
const OUTBOX_VERIFY_SINCE: (&str, &str) = (
    "0014_outbox_verify_since",
    "ALTER TABLE outbox ADD COLUMN verify_since_ms INTEGER;",
);

const IDEMPOTENCY: (&str, &str) = (
    "0003_idempotency",
    "CREATE TABLE idempotency (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        request_hash BLOB NOT NULL,
        response BLOB NOT NULL,
        create_ms INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    ) STRICT;
    CREATE INDEX idempotency_by_age ON idempotency (create_ms);",
);

/// Scopes idempotency records and deliveries to their owner (see [`Owner`]). SQLite cannot change
/// a primary key in place, so the idempotency table is rebuilt with the owner in its unique key;
/// existing records and deliveries keep a NULL owner (made before owners existed).
const CALLER_SCOPE: (&str, &str) = (
    "0012_caller_scope",
    "CREATE TABLE idempotency_by_owner (
        owner TEXT,
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        request_hash BLOB NOT NULL,
        response BLOB NOT NULL,
        create_ms INTEGER NOT NULL
    ) STRICT;
    INSERT INTO idempotency_by_owner (owner, scope, key, request_hash, response, create_ms)
        SELECT NULL, scope, key, request_hash, response, create_ms FROM idempotency;
    DROP TABLE idempotency;
    ALTER TABLE idempotency_by_owner RENAME TO idempotency;
    CREATE UNIQUE INDEX idempotency_by_key ON idempotency (owner, scope, key);
    CREATE INDEX idempotency_by_age ON idempotency (create_ms);
    ALTER TABLE outbox ADD COLUMN owner TEXT;",
);

const FEEDBACK_LOG: (&str, &str) = (
    "0010_feedback_log",
    "CREATE TABLE feedback_log (
        seq INTEGER PRIMARY KEY,
        feedback_id TEXT NOT NULL,
        kind INTEGER NOT NULL,
        log_time_ms INTEGER NOT NULL,
        campaign_id TEXT NOT NULL,
        metric INTEGER NOT NULL,
        score REAL,
        score_category INTEGER NOT NULL,
        has_comment INTEGER NOT NULL,
        message BLOB NOT NULL
    ) STRICT;
    CREATE INDEX feedback_log_by_time ON feedback_log (log_time_ms);
    CREATE TABLE feedback_items (
        feedback_id TEXT PRIMARY KEY,
        digest BLOB NOT NULL,
        last_seq INTEGER NOT NULL,
        create_time_ms INTEGER NOT NULL,
        campaign_id TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        email TEXT NOT NULL COLLATE NOCASE,
        payload BLOB NOT NULL
    ) STRICT;
    CREATE INDEX feedback_items_by_creation ON feedback_items (create_time_ms, feedback_id);
    CREATE TABLE feedback_log_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch INTEGER NOT NULL,
        head_seq INTEGER NOT NULL,
        head_time_ms INTEGER NOT NULL,
        pruned_seq INTEGER NOT NULL,
        pruned_time_ms INTEGER NOT NULL,
        items_horizon_ms INTEGER NOT NULL
    ) STRICT;
    INSERT INTO feedback_log_meta
        (id, epoch, head_seq, head_time_ms, pruned_seq, pruned_time_ms, items_horizon_ms)
        VALUES (1, random() & 9223372036854775807, 0, 0, 0, 0, 0);",
);

/// Lookup indexes for the questions the log answers: one customer's history (by email or by
/// Retently customer id) and `ListFeedback` filtered by campaign, each ending in the creation
/// time and id so a page is a range scan in either order. The email index inherits the
/// column's NOCASE collation, so case-insensitive lookups use it. The log's coverage is kept
/// durably beside the poller's checkpoint (see [`super::sync::SyncState`]), written in the same
/// transaction as the entries it vouches for.
const FEEDBACK_ITEMS_LOOKUP: (&str, &str) = (
    "0015_feedback_items_lookup",
    "CREATE INDEX feedback_items_by_email
        ON feedback_items (email, create_time_ms, feedback_id);
    CREATE INDEX feedback_items_by_customer
        ON feedback_items (customer_id, create_time_ms, feedback_id);
    CREATE INDEX feedback_items_by_campaign
        ON feedback_items (campaign_id, create_time_ms, feedback_id);",
);

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
