//! The embedded durable store: one SQLite database in the data directory, holding the outbox of
//! asynchronous writes, idempotency records, the feedback log and sync cursors.
//!
//! Writes go through one writer thread that runs every job queued since its last commit in one
//! transaction (group commit): a burst of acknowledgements costs one fsync, not one each, and
//! SQLite's single-writer rule is never contended. Each job runs inside its own savepoint, so one
//! failing job does not undo the others in the same group. Reads run on a small pool of read-only
//! connections through `spawn_blocking`; WAL mode lets them proceed while the writer commits.
//!
//! `synchronous = FULL`: a job's result is returned only after its commit reached the disk, which
//! is what "acknowledged" means for an asynchronous write.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, ErrorCode};

mod schema;

/// Jobs queued for the writer beyond this make callers wait, which is the backpressure of the
/// whole write path (a full disk or a slow fsync slows acknowledgements instead of growing memory).
const WRITER_QUEUE: usize = 4096;

/// At most this many jobs share one transaction, so one commit never holds the write lock for long.
const MAX_GROUP: usize = 512;

/// Read connections kept open; reads beyond this open a fresh connection rather than wait.
const READ_POOL: usize = 4;

/// What a job hands back after running: called with the commit's error, if any, to answer the
/// caller only once the outcome is durable.
type Completion = Box<dyn FnOnce(Option<String>) + Send>;
type WriteJob = Box<dyn FnOnce(&Transaction<'_>) -> Completion + Send>;

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    path: PathBuf,
    writer: mpsc::Sender<WriteJob>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn storage_error(error: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::Unavailable,
        "STORE_UNAVAILABLE",
        format!("the durable store failed: {error}"),
    )
}

impl Store {
    /// Opens (creating if needed) `gateway.db` in `data_dir` and applies pending migrations.
    pub fn open(data_dir: &Path) -> Result<Store, Error> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            storage_error(format!(
                "cannot create the data directory {}: {error}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join("gateway.db");
        let mut connection = Connection::open(&path).map_err(storage_error)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;
                 PRAGMA busy_timeout = 5000;",
            )
            .map_err(storage_error)?;
        schema::migrate(&mut connection).map_err(storage_error)?;

        let (writer, jobs) = mpsc::channel::<WriteJob>(WRITER_QUEUE);
        std::thread::Builder::new()
            .name("cxgw-store-writer".to_owned())
            .spawn(move || write_loop(connection, jobs))
            .map_err(storage_error)?;
        Ok(Store {
            inner: Arc::new(StoreInner {
                path,
                writer,
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `job` in the writer's transaction and returns once it is durably committed.
    pub async fn write<R, F>(&self, job: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> rusqlite::Result<R> + Send + 'static,
    {
        let (reply, result) = oneshot::channel::<Result<R, String>>();
        let boxed: WriteJob = Box::new(move |tx: &Transaction<'_>| {
            let outcome = run_in_savepoint(tx, job);
            Box::new(move |commit_error: Option<String>| {
                let answer = match (outcome, commit_error) {
                    (_, Some(error)) => Err(error),
                    (Ok(value), None) => Ok(value),
                    (Err(error), None) => Err(error.to_string()),
                };
                let _ = reply.send(answer);
            })
        });
        self.inner
            .writer
            .send(boxed)
            .await
            .map_err(|_| storage_error("the writer thread has stopped"))?;
        // A job dropped without running (the writer could not open a transaction) closes `reply`.
        result
            .await
            .map_err(|_| storage_error("the write was not committed"))?
            .map_err(storage_error)
    }

    /// Runs `job` on a read connection (a consistent snapshot for the duration of the job).
    pub async fn read<R, F>(&self, job: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let connection = match inner.readers.lock().ok().and_then(|mut pool| pool.pop()) {
                Some(connection) => connection,
                None => open_reader(&inner.path)?,
            };
            let outcome = job(&connection);
            if let Ok(mut pool) = inner.readers.lock()
                && pool.len() < READ_POOL
            {
                pool.push(connection);
            }
            outcome
        })
        .await
        .map_err(|error| storage_error(format!("a read task failed: {error}")))?
        .map_err(storage_error)
    }
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.execute_batch("PRAGMA busy_timeout = 5000;")?;
    Ok(connection)
}

fn run_in_savepoint<R>(
    tx: &Transaction<'_>,
    job: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<R>,
) -> rusqlite::Result<R> {
    tx.execute_batch("SAVEPOINT job")?;
    match job(tx) {
        Ok(value) => {
            tx.execute_batch("RELEASE job")?;
            Ok(value)
        }
        Err(error) => {
            tx.execute_batch("ROLLBACK TO job; RELEASE job")?;
            Err(error)
        }
    }
}

fn write_loop(mut connection: Connection, mut jobs: mpsc::Receiver<WriteJob>) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let tx = match connection.transaction() {
            Ok(tx) => tx,
            Err(error) => {
                tracing::error!(%error, jobs = batch.len(), "cannot begin a store transaction");
                // Dropping the jobs tells their callers the write was not committed.
                batch.clear();
                continue;
            }
        };
        let completions: Vec<Completion> = batch.drain(..).map(|job| job(&tx)).collect();
        let commit_error = tx.commit().err().map(|error| {
            tracing::error!(%error, jobs = completions.len(), "a store commit failed");
            error.to_string()
        });
        for complete in completions {
            complete(commit_error.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_are_visible_to_reads_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let count = 200;
        let writes = (0..count).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(move |tx| {
                        tx.execute(
                            "INSERT INTO sync_cursors (name, value) VALUES (?1, ?2)",
                            (format!("cursor-{i}"), i.to_string()),
                        )
                    })
                    .await
            })
        });
        for write in writes {
            assert_eq!(write.await.unwrap().unwrap(), 1);
        }
        let stored: i64 = store
            .read(|c| c.query_row("SELECT COUNT(*) FROM sync_cursors", [], |row| row.get(0)))
            .await
            .unwrap();
        assert_eq!(stored, count);
        drop(store);

        let reopened = Store::open(dir.path()).unwrap();
        let value: String = reopened
            .read(|c| {
                c.query_row(
                    "SELECT value FROM sync_cursors WHERE name = 'cursor-7'",
                    [],
                    |row| row.get(0),
                )
            })
            .await
            .unwrap();
        assert_eq!(value, "7");
    }

    #[tokio::test]
    async fn a_failing_job_does_not_undo_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = store.write(|tx| {
            tx.execute(
                "INSERT INTO sync_cursors (name, value) VALUES ('a', '1')",
                [],
            )
        });
        let bad = store.write(|tx| {
            tx.execute(
                "INSERT INTO sync_cursors (name, value) VALUES ('b', '1')",
                [],
            )?;
            tx.execute("INSERT INTO no_such_table VALUES (1)", [])
        });
        let (good, bad) = tokio::join!(good, bad);
        good.unwrap();
        let error = bad.unwrap_err();
        assert_eq!(error.code(), ErrorCode::Unavailable);
        let names: Vec<String> = store
            .read(|c| {
                let mut statement = c.prepare("SELECT name FROM sync_cursors ORDER BY name")?;
                statement
                    .query_map([], |row| row.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()
            })
            .await
            .unwrap();
        assert_eq!(names, vec!["a".to_owned()]);
    }
}
