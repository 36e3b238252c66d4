//! What tests do to a SQLite store that no gateway operation does: stage the state a crash or an
//! older version leaves behind, make the database refuse writes, and look at rows directly.

use std::path::Path;

use super::SqliteStore;
use crate::store::Store;
use crate::store::outbox::QueuedDelivery;

impl SqliteStore {
    /// The engine and the store over it, for tests that also reach into the engine.
    pub(crate) fn open_for_test(data_dir: &Path) -> (SqliteStore, Store) {
        let engine = SqliteStore::open(data_dir).expect("the test store opens");
        let store = Store::from_engine(engine.clone(), "sqlite:test");
        (engine, store)
    }

    /// Marks deliveries in flight (the one with `delivery_id`, or all) as a run that stopped
    /// mid-send leaves them, claimed at `claimed_at_ms` when given.
    pub(crate) async fn mark_in_flight(
        &self,
        delivery_id: Option<&str>,
        claimed_at_ms: Option<i64>,
    ) {
        let id = delivery_id.map(str::to_owned);
        self.write(move |tx| {
            tx.execute(
                "UPDATE outbox SET state = 2, update_ms = COALESCE(?2, update_ms)
                 WHERE ?1 IS NULL OR delivery_id = ?1",
                rusqlite::params![id, claimed_at_ms],
            )
        })
        .await
        .expect("the test write commits");
    }

    /// Dead-letters every delivery, those queued anonymously as a version from before owners
    /// stored them (without an owner).
    pub(crate) async fn dead_letter_all_as_before_owners(&self) {
        self.write(|tx| {
            tx.execute(
                "UPDATE outbox SET state = 5, owner = CASE WHEN owner = '' THEN NULL ELSE owner END",
                [],
            )
        })
        .await
        .expect("the test write commits");
    }

    /// Makes every idempotency record ownerless, as written before records had owners.
    pub(crate) async fn forget_idempotency_owners(&self) {
        self.write(|tx| tx.execute("UPDATE idempotency SET owner = NULL", []))
            .await
            .expect("the test write commits");
    }

    /// Stores an ownerless idempotency record of `(scope, key)` created at `create_ms`.
    pub(crate) async fn insert_idempotency_at(&self, scope: &str, key: &str, create_ms: i64) {
        let (scope, key) = (scope.to_owned(), key.to_owned());
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO idempotency (scope, key, request_hash, response, create_ms)
                 VALUES (?1, ?2, x'00', x'00', ?3)",
                rusqlite::params![scope, key, create_ms],
            )
        })
        .await
        .expect("the test write commits");
    }

    /// The keys of every idempotency record, in order.
    pub(crate) async fn idempotency_keys(&self) -> Vec<String> {
        self.read(|c| {
            let mut statement = c.prepare("SELECT key FROM idempotency ORDER BY key")?;
            statement
                .query_map([], |row| row.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()
        })
        .await
        .expect("the test read succeeds")
    }

    /// Makes the database refuse (or accept again) every write, the way a full volume does.
    pub(crate) async fn refuse_writes(&self, refuse: bool) {
        self.write(move |tx| tx.pragma_update(None, "query_only", refuse))
            .await
            .expect("the test write commits");
    }

    /// Enqueues `queued` and, in the same transaction, makes the database refuse every later
    /// write: the write that fills the volume, acknowledged, with no write after it succeeding.
    pub(crate) async fn enqueue_then_refuse_writes(&self, queued: QueuedDelivery) {
        self.write(move |tx| {
            super::outbox::insert_delivery(tx, &queued, None)?;
            tx.pragma_update(None, "query_only", true)
        })
        .await
        .expect("the test write commits");
    }

    /// Returns once every write queued before it has committed (the writer runs jobs in order).
    pub(crate) async fn writes_queued_so_far(&self) {
        self.write(|_| Ok(()))
            .await
            .expect("the test write commits");
    }
}
