//! The PostgreSQL schema, as numbered migrations applied in order at start.
//!
//! Replicas start together (a rollout, a scale-up), so the migrations run inside one
//! transaction that first takes a transaction-scoped advisory lock: the first replica applies
//! what is missing, the others wait for its commit and then find nothing left to do. DDL is
//! transactional in PostgreSQL, so a replica that dies half-way leaves the schema as it was.
//! A version applied by a newer gateway and unknown to this one is left alone: migrations only
//! add, so an older replica keeps working beside a newer one during a rolling upgrade.
//!
//! Never edit a published migration; append a new one with the next version.

use super::{PostgresStore, query_error};
use crate::store::StoreError;

/// One schema change.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The key of the advisory lock that serializes migrations across replicas ("cxgwmigr").
const MIGRATION_LOCK: i64 = 0x6378_6777_6d69_6772;

/// Every migration, in the order they apply.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "store",
        sql: "
    -- The outbox's queue position, handed out inside the enqueue transaction under this row's
    -- lock: positions follow commit order, so a delivery acknowledged later never overtakes an
    -- earlier one for the same customer (a sequence would hand out positions in start order).
    CREATE TABLE outbox_head (
        id smallint PRIMARY KEY CHECK (id = 1),
        seq bigint NOT NULL
    );
    INSERT INTO outbox_head (id, seq) VALUES (1, 0);
    CREATE TABLE outbox (
        seq bigint PRIMARY KEY,
        delivery_id text NOT NULL UNIQUE,
        method text NOT NULL,
        request bytea NOT NULL,
        destinations integer[] NOT NULL,
        item_count bigint NOT NULL,
        idempotency_key text,
        replay_safe boolean NOT NULL,
        owner text,
        state smallint NOT NULL,
        attempt_count integer NOT NULL DEFAULT 0,
        replay_count integer NOT NULL DEFAULT 0,
        last_error text,
        result bytea,
        create_ms bigint NOT NULL,
        update_ms bigint NOT NULL,
        next_attempt_ms bigint NOT NULL,
        complete_ms bigint,
        expire_ms bigint NOT NULL,
        traceparent text,
        verify_since_ms bigint,
        -- Until when the replica that claimed an in-flight delivery holds it; after that any
        -- replica takes it over with the recovery rules.
        lease_until_ms bigint,
        -- The replica holding the claim: it alone renews the lease and records the outcome.
        claimed_by text
    );
    CREATE INDEX outbox_due ON outbox (next_attempt_ms) WHERE state IN (1, 3);
    CREATE INDEX outbox_in_flight ON outbox (lease_until_ms) WHERE state = 2;
    CREATE INDEX outbox_finished ON outbox (state, complete_ms) WHERE state IN (4, 5);
    CREATE TABLE outbox_keys (
        key text NOT NULL,
        seq bigint NOT NULL REFERENCES outbox (seq) ON DELETE CASCADE,
        PRIMARY KEY (key, seq)
    );
    CREATE INDEX outbox_keys_by_seq ON outbox_keys (seq);
    CREATE TABLE idempotency (
        owner text NOT NULL,
        scope text NOT NULL,
        key text NOT NULL,
        request_hash bytea NOT NULL,
        response bytea NOT NULL,
        create_ms bigint NOT NULL,
        PRIMARY KEY (owner, scope, key)
    );
    CREATE INDEX idempotency_by_age ON idempotency (create_ms);
    -- Named positions of background pollers.
    CREATE TABLE sync_cursors (
        name text PRIMARY KEY,
        value text NOT NULL
    );
    -- The feedback log (see feedback_log.rs). Ids compare byte by byte (\"C\"), as in the
    -- embedded engine, whatever the database's collation: they are keyset positions.
    CREATE TABLE feedback_log (
        seq bigint PRIMARY KEY,
        feedback_id text COLLATE \"C\" NOT NULL,
        kind integer NOT NULL,
        log_time_ms bigint NOT NULL,
        campaign_id text NOT NULL,
        metric integer NOT NULL,
        score double precision,
        score_category integer NOT NULL,
        has_comment boolean NOT NULL,
        message bytea NOT NULL
    );
    CREATE INDEX feedback_log_by_time ON feedback_log (log_time_ms);
    CREATE TABLE feedback_items (
        feedback_id text COLLATE \"C\" PRIMARY KEY,
        digest bytea NOT NULL,
        last_seq bigint NOT NULL,
        create_time_ms bigint NOT NULL,
        campaign_id text NOT NULL,
        customer_id text NOT NULL,
        email text NOT NULL,
        payload bytea NOT NULL
    );
    CREATE INDEX feedback_items_by_creation ON feedback_items (create_time_ms, feedback_id);
    CREATE INDEX feedback_items_by_email
        ON feedback_items (lower(email), create_time_ms, feedback_id);
    CREATE INDEX feedback_items_by_customer
        ON feedback_items (customer_id, create_time_ms, feedback_id);
    CREATE INDEX feedback_items_by_campaign
        ON feedback_items (campaign_id, create_time_ms, feedback_id);
    -- One row: the log's random epoch (part of every cursor), its head and pruned bounds. The
    -- head is the counter appends take their sequences from under this row's lock.
    CREATE TABLE feedback_log_meta (
        id smallint PRIMARY KEY CHECK (id = 1),
        epoch bigint NOT NULL,
        head_seq bigint NOT NULL,
        head_time_ms bigint NOT NULL,
        pruned_seq bigint NOT NULL,
        pruned_time_ms bigint NOT NULL,
        items_horizon_ms bigint NOT NULL
    );
    INSERT INTO feedback_log_meta
        (id, epoch, head_seq, head_time_ms, pruned_seq, pruned_time_ms, items_horizon_ms)
        VALUES (1, 1 + floor(random() * 9223372036854774000)::bigint, 0, 0, 0, 0, 0);
    ",
    },
    Migration {
        version: 2,
        name: "alerts",
        sql: "
    -- The alert evaluator's checkpoint in the feedback log, and one key per alert raised
    -- (rule, response, version; delivery_id NULL when its rule's rate limit dropped it).
    CREATE TABLE alert_checkpoint (
        id smallint PRIMARY KEY CHECK (id = 1),
        seq bigint NOT NULL
    );
    CREATE TABLE alert_keys (
        rule text NOT NULL,
        feedback_id text NOT NULL,
        version text NOT NULL,
        delivery_id text,
        create_ms bigint NOT NULL,
        PRIMARY KEY (rule, feedback_id, version)
    );
    CREATE INDEX alert_keys_by_rule ON alert_keys (rule, create_ms);
    CREATE INDEX alert_keys_by_time ON alert_keys (create_ms);
    -- The traceparent of the span that ingested each entry, which alert deliveries link to.
    ALTER TABLE feedback_log ADD COLUMN traceparent text;
    ",
    },
    Migration {
        version: 3,
        name: "survey_fatigue",
        sql: "
    -- Who was surveyed when, per scope (see fatigue.rs). `token` names the reservation that
    -- wrote `surveyed_ms`; `previous_ms` is the time the entry held before it, put back when the
    -- reservation is released.
    CREATE TABLE survey_fatigue (
        scope text NOT NULL,
        email text NOT NULL,
        surveyed_ms bigint NOT NULL,
        token text,
        previous_ms bigint,
        PRIMARY KEY (scope, email)
    );
    CREATE INDEX survey_fatigue_by_email ON survey_fatigue (email, token);
    ",
    },
    Migration {
        version: 4,
        name: "upstream_budget",
        sql: "
    -- One upstream request budget for every replica (see budget.rs): per account, the grant
    -- times of the current window (microseconds since the epoch by the database's clock,
    -- oldest first) and the end of an upstream Retry-After.
    CREATE TABLE upstream_budget (
        account text PRIMARY KEY,
        grants bigint[] NOT NULL DEFAULT '{}',
        blocked_until_us bigint
    );
    -- Takes one slot of a budget of p_limit grants in any p_window_us, in one statement (one
    -- round trip): under the account row's lock it evicts the grants that left the window,
    -- checks the count and the Retry-After, and appends the new grant. The clock is read once
    -- the lock is held, so grants are appended in time order whoever waited for the lock.
    CREATE FUNCTION cxgw_budget_acquire(p_account text, p_limit integer, p_window_us bigint)
    RETURNS TABLE (granted boolean, grant_us bigint, retry_us bigint, ages_us bigint[],
                   blocked_us bigint)
    LANGUAGE plpgsql AS $$
    DECLARE
        v_grants bigint[];
        v_blocked bigint;
        v_now bigint;
        v_count integer;
    BEGIN
        SELECT b.grants, b.blocked_until_us INTO v_grants, v_blocked
            FROM upstream_budget b WHERE b.account = p_account FOR UPDATE;
        IF NOT FOUND THEN
            -- The first grant of an account; a racing replica's insert is waited for.
            INSERT INTO upstream_budget (account) VALUES (p_account)
                ON CONFLICT (account) DO NOTHING;
            SELECT b.grants, b.blocked_until_us INTO v_grants, v_blocked
                FROM upstream_budget b WHERE b.account = p_account FOR UPDATE;
        END IF;
        v_now := floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
        v_grants := ARRAY(SELECT g FROM unnest(v_grants) AS g
                          WHERE g + p_window_us > v_now ORDER BY g);
        IF v_blocked IS NOT NULL AND v_blocked <= v_now THEN
            v_blocked := NULL;
        END IF;
        v_count := cardinality(v_grants);
        IF v_blocked IS NULL AND v_count < p_limit THEN
            v_grants := v_grants || v_now;
            granted := true;
            grant_us := v_now;
            retry_us := 0;
        ELSE
            granted := false;
            grant_us := NULL;
            -- With the window full, a slot frees when the grant p_limit places before the
            -- next one leaves it (more than p_limit grants remain when the limit was lowered).
            retry_us := CASE WHEN v_count >= p_limit
                             THEN v_grants[v_count - p_limit + 1] + p_window_us - v_now
                             ELSE 0 END;
            IF v_blocked IS NOT NULL THEN
                retry_us := GREATEST(retry_us, v_blocked - v_now);
            END IF;
        END IF;
        UPDATE upstream_budget SET grants = v_grants, blocked_until_us = v_blocked
            WHERE account = p_account;
        ages_us := ARRAY(SELECT v_now - g FROM unnest(v_grants) WITH ORDINALITY AS t (g, n)
                         ORDER BY n);
        blocked_us := v_blocked - v_now;
        RETURN NEXT;
    END
    $$;
    ",
    },
    Migration {
        version: 5,
        name: "leases",
        sql: "
    -- Leases with fencing tokens (see leases.rs): the holder of `name` until `expires_at` (the
    -- database's clock), and the epoch that grows each time the lease changes hands, which the
    -- holder's writes must still find here to be applied.
    CREATE TABLE leases (
        name text PRIMARY KEY,
        holder text NOT NULL,
        epoch bigint NOT NULL,
        expires_at timestamptz NOT NULL
    );
    ",
    },
    Migration {
        version: 6,
        name: "idempotency_claims",
        sql: "
    -- The call running under an idempotency key, on whichever replica (see idempotency.rs):
    -- `holder` names the call, which renews `lease_until_ms` while it runs; a repeat finding a
    -- live claim waits for the key's record. Apart from `idempotency`, so a replica that
    -- predates claims still reads only finished records there.
    CREATE TABLE idempotency_claims (
        owner text NOT NULL,
        scope text NOT NULL,
        key text NOT NULL,
        holder text NOT NULL,
        create_ms bigint NOT NULL,
        lease_until_ms bigint NOT NULL,
        PRIMARY KEY (owner, scope, key)
    );
    CREATE INDEX idempotency_claims_by_age ON idempotency_claims (create_ms);
    ",
    },
    Migration {
        version: 7,
        name: "survey_spool",
        sql: "
    -- Single-recipient survey sends of every replica waiting for the account's one sender (see
    -- survey_spool.rs): pending while `epoch` is NULL, claimed under the sender lease's epoch,
    -- settled once `answer` is set; the waiting replica removes its entry when it reads it.
    CREATE TABLE survey_spool (
        id bigserial PRIMARY KEY,
        account text NOT NULL,
        batch_key text NOT NULL,
        item text NOT NULL,
        interactive boolean NOT NULL,
        caller text,
        deadline_ms bigint,
        created_ms bigint NOT NULL,
        epoch bigint,
        answer text
    );
    CREATE INDEX survey_spool_pending ON survey_spool (account, id) WHERE epoch IS NULL;
    ",
    },
];

/// Applies the migrations this database lacks; returns the versions applied by this call.
pub async fn migrate(store: &PostgresStore) -> Result<Vec<i32>, StoreError> {
    const OPERATION: &str = "migrate the schema";
    let query = query_error(OPERATION);
    let mut connection = store.connection(OPERATION).await?;
    let transaction = connection.transaction().await.map_err(&query)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(&query)?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(&query)?;
    let applied: Vec<i32> = transaction
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(&query)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut newly_applied = Vec::new();
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        transaction
            .batch_execute(migration.sql)
            .await
            .map_err(&query)?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&migration.version, &migration.name],
            )
            .await
            .map_err(&query)?;
        newly_applied.push(migration.version);
    }
    transaction.commit().await.map_err(&query)?;
    if !newly_applied.is_empty() {
        tracing::info!(versions = ?newly_applied, "postgres schema migrated");
    }
    Ok(newly_applied)
}
