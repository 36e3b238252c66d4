//! The embedded engine: one SQLite database in the data directory, holding the outbox of
//! asynchronous writes, idempotency records, the feedback log, sync cursors, the survey record
//! of the cool-down and the alert evaluator's state. It implements
//! every store trait ([`super::OutboxStore`] and the others, one module each) and owns the
//! schema ([`schema`]).
//!
//! Writes go through one writer thread that runs every job queued since its last commit in one
//! transaction (group commit): a burst of acknowledgements costs one fsync, not one each, and
//! SQLite's single-writer rule is never contended. Each job runs inside its own savepoint, so one
//! failing job does not undo the others in the same group. Reads run on a small pool of read-only
//! connections through `spawn_blocking`; WAL mode lets them proceed while the writer commits.
//!
//! `synchronous = FULL`: a job's result is returned only after its commit reached the disk, which
//! is what "acknowledged" means for an asynchronous write.
//!
//! The store checks itself at open: `PRAGMA quick_check` refuses a damaged file (with the
//! recovery command in the error), and a marker file beside the database refuses a database that
//! went missing where one was created, unless the operator asks for a new one
//! ([`MissingStore::CreateNew`]). A fresh directory gets a new store and its marker.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::{StoreError, StoreErrorKind};

mod alerts;
mod cursors;
mod error_codes;
mod fatigue;
mod feedback_log;
mod idempotency;
mod leases;
mod outbox;
mod schema;
#[cfg(test)]
pub(crate) mod test_support;

/// Jobs queued for the writer beyond this make callers wait, which is the backpressure of the
/// whole write path (a full disk or a slow fsync slows acknowledgements instead of growing memory).
const WRITER_QUEUE: usize = 4096;

/// At most this many jobs share one transaction, so one commit never holds the write lock for long.
const MAX_GROUP: usize = 512;

/// Read connections kept open; reads beyond this open a fresh connection rather than wait.
const READ_POOL: usize = 4;

/// What a job hands back after running: called with the commit's error, if any, to answer the
/// caller only once the outcome is durable.
type Completion = Box<dyn FnOnce(Option<StoreError>) + Send>;
type WriteJob = Box<dyn FnOnce(&Transaction<'_>) -> Completion + Send>;

/// A handle to the SQLite engine; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    path: PathBuf,
    writer: mpsc::Sender<WriteJob>,
    readers: Mutex<Vec<Connection>>,
    /// Idempotency claims (see [`idempotency`]): in memory, since one process is the only one
    /// using the file, and a claim means nothing once its process is gone.
    claims: Mutex<idempotency::Claims>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn storage_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::unavailable(error.to_string())
}

/// The kind of a failure SQLite reported, from its typed result code.
fn sqlite_error(error: &rusqlite::Error) -> StoreError {
    let kind = match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => StoreErrorKind::Full,
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            StoreErrorKind::Corrupt
        }
        Some(rusqlite::ErrorCode::ConstraintViolation) => StoreErrorKind::Conflict,
        _ => match error {
            // A column that does not hold what the schema says.
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => StoreErrorKind::Corrupt,
            _ => StoreErrorKind::Unavailable,
        },
    };
    StoreError::new(kind, error.to_string())
}

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "gateway.db";

/// Left beside the database when the store is created, so a database file that later goes missing
/// (a volume mounted empty, a file deleted by hand) is noticed instead of silently replaced by an
/// empty store, which would lose the outbox, the dead letters and the idempotency memory.
pub const MARKER_FILE: &str = "gateway.db.marker";

/// Damage reports of `PRAGMA quick_check` read at most; the first ones name the problem.
const MAX_DAMAGE_REPORTS: usize = 100;

/// How [`SqliteStore::open_with`] treats a data directory whose marker says a store existed there but
/// whose database file is missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MissingStore {
    /// Refuse to start (the default): the operator restores the file or decides otherwise.
    #[default]
    Refuse,
    /// Create a new, empty store (the operator accepts that what the old one held is gone).
    CreateNew,
}

/// Why the store did not open. The first two are refusals an operator must act on; their messages
/// say what to do.
#[derive(Debug)]
pub enum OpenError {
    Damaged {
        path: PathBuf,
        /// Problems reported (at most [`MAX_DAMAGE_REPORTS`] are read).
        problems: usize,
        first: String,
    },
    Missing {
        path: PathBuf,
        marker: PathBuf,
    },
    Failed(StoreError),
}

impl From<StoreError> for OpenError {
    fn from(error: StoreError) -> Self {
        OpenError::Failed(error)
    }
}

impl std::error::Error for OpenError {}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Damaged {
                path,
                problems,
                first,
            } => {
                let recovered = path.with_file_name("gateway.recovered.db");
                let count = if *problems >= MAX_DAMAGE_REPORTS {
                    format!("{problems} or more problems")
                } else {
                    format!("{problems} problem(s)")
                };
                write!(
                    f,
                    "the store {} is damaged: quick_check found {count}, first: {first}; the \
                     gateway does not start on a damaged store. stop every gateway using it, \
                     recover what is readable with `sqlite3 {} .recover | sqlite3 {}` (with a \
                     sqlite3 that lacks .recover, such as Debian's: .dump in its place), move \
                     {DATABASE_FILE} and its -wal and -shm files aside, rename {} to \
                     {DATABASE_FILE} and start again (README: \"Store faults\")",
                    path.display(),
                    path.display(),
                    recovered.display(),
                    recovered.display(),
                )
            }
            OpenError::Missing { path, marker } => write!(
                f,
                "the store {} is missing, but {} shows a store was created in this directory: \
                 starting empty would lose its outbox, dead letters and idempotency records. \
                 restore {DATABASE_FILE} from a backup, or start once with `serve \
                 --allow-new-store` (or CXGW_ALLOW_NEW_STORE=true) to create a new, empty store",
                path.display(),
                marker.display()
            ),
            OpenError::Failed(error) => write!(f, "the durable store failed: {error}"),
        }
    }
}

impl SqliteStore {
    /// Opens `gateway.db` in `data_dir`, creating it only in a directory where no store was
    /// created before (see [`SqliteStore::open_with`]).
    pub fn open(data_dir: &Path) -> Result<SqliteStore, OpenError> {
        SqliteStore::open_with(data_dir, MissingStore::Refuse)
    }

    /// Opens `gateway.db` in `data_dir` after checking it: a damaged database, or a missing one
    /// where the marker shows a store was created (unless `missing` says to create a new one), is
    /// refused. Creates the directory, the database and the marker when the directory holds
    /// neither, and applies pending migrations.
    pub fn open_with(data_dir: &Path, missing: MissingStore) -> Result<SqliteStore, OpenError> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            storage_error(format!(
                "cannot create the data directory {}: {error}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DATABASE_FILE);
        let marker = data_dir.join(MARKER_FILE);
        let exists = file_exists(&path)?;
        let marked = file_exists(&marker)?;
        if marked && !exists {
            match missing {
                MissingStore::Refuse => return Err(OpenError::Missing { path, marker }),
                MissingStore::CreateNew => tracing::warn!(
                    path = %path.display(),
                    "creating a new, empty store in place of a missing one, as asked"
                ),
            }
        }
        let mut connection = Connection::open(&path).map_err(|error| damage_or(&path, error))?;
        if exists {
            check_integrity(&connection, &path)?;
            if marked && !has_schema(&connection).map_err(|error| damage_or(&path, error))? {
                // An emptied file (truncated, or replaced by an empty one) is as missing as a
                // deleted one.
                if missing == MissingStore::Refuse {
                    return Err(OpenError::Missing { path, marker });
                }
            }
        }
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;
                 PRAGMA busy_timeout = 5000;",
            )
            .map_err(|error| damage_or(&path, error))?;
        schema::migrate(&mut connection).map_err(|error| damage_or(&path, error))?;
        // Written once the schema is durable, so a start that fails before leaves no marker behind
        // a store that never held anything. A store from a version without markers gains one.
        if !marked {
            write_marker(data_dir, &marker)?;
        }

        let (writer, jobs) = mpsc::channel::<WriteJob>(WRITER_QUEUE);
        std::thread::Builder::new()
            .name("cxgw-store-writer".to_owned())
            .spawn(move || write_loop(connection, jobs))
            .map_err(storage_error)?;
        Ok(SqliteStore {
            inner: Arc::new(StoreInner {
                path,
                writer,
                readers: Mutex::new(Vec::new()),
                claims: Mutex::default(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `job` in the writer's transaction and returns once it is durably committed.
    pub(crate) async fn write<R, F>(&self, job: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> rusqlite::Result<R> + Send + 'static,
    {
        let (reply, result) = oneshot::channel::<Result<R, StoreError>>();
        let boxed: WriteJob = Box::new(move |tx: &Transaction<'_>| {
            let outcome = run_in_savepoint(tx, job);
            Box::new(move |commit_error: Option<StoreError>| {
                let answer = match (outcome, commit_error) {
                    (_, Some(error)) => Err(error),
                    (Ok(value), None) => Ok(value),
                    (Err(error), None) => Err(sqlite_error(&error)),
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
        wait_for_commit(result)
            .await
            .map_err(|_| storage_error("the write was not committed"))?
    }

    /// The first column of the one row that `sql` (a statement without parameters) returns.
    pub(crate) async fn read_value<T>(&self, sql: &'static str) -> Result<T, StoreError>
    where
        T: rusqlite::types::FromSql + Send + 'static,
    {
        self.read(move |connection| connection.query_row(sql, [], |row| row.get(0)))
            .await
    }

    /// Runs `job` on a read connection (a consistent snapshot for the duration of the job).
    pub(crate) async fn read<R, F>(&self, job: F) -> Result<R, StoreError>
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
        .map_err(|error| sqlite_error(&error))
    }
}

/// Waits for the writer thread's answer.
#[cfg(not(test))]
async fn wait_for_commit<T>(reply: oneshot::Receiver<T>) -> Result<T, oneshot::error::RecvError> {
    reply.await
}

/// Waits for the writer thread's answer on a blocking-pool thread. Unit tests run on a paused
/// clock, which jumps to the next timer whenever the runtime idles; the runtime cannot see the
/// writer thread, so a write would let time jump by however long a fsync takes relative to the
/// runtime's idle check, which depends on the machine. A task waiting in `spawn_blocking` holds
/// the clock still, so tests see time move only where they move it.
#[cfg(test)]
async fn wait_for_commit<T: Send + 'static>(
    reply: oneshot::Receiver<T>,
) -> Result<T, oneshot::error::RecvError> {
    tokio::task::spawn_blocking(move || reply.blocking_recv())
        .await
        .unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()))
}

fn file_exists(path: &Path) -> Result<bool, OpenError> {
    path.try_exists().map_err(|error| {
        OpenError::Failed(storage_error(format!(
            "cannot look for {}: {error}",
            path.display()
        )))
    })
}

/// SQLite reports a file that is not a database, or whose pages do not parse, with typed codes:
/// those are damage, anything else (permissions, I/O) is a plain failure.
fn damage_or(path: &Path, error: rusqlite::Error) -> OpenError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            OpenError::Damaged {
                path: path.to_path_buf(),
                problems: 1,
                first: error.to_string(),
            }
        }
        _ => OpenError::Failed(sqlite_error(&error)),
    }
}

/// `PRAGMA quick_check`: every page of every table and index is read and its structure checked
/// (not the agreement of indexes with their tables, which `integrity_check` adds at several times
/// the cost). It reads the whole file once: about a second per few hundred megabytes.
fn check_integrity(connection: &Connection, path: &Path) -> Result<(), OpenError> {
    let started = std::time::Instant::now();
    let reports = (|| {
        let mut statement =
            connection.prepare(&format!("PRAGMA quick_check({MAX_DAMAGE_REPORTS})"))?;
        statement
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<String>>>()
    })()
    .map_err(|error| damage_or(path, error))?;
    if reports.len() == 1 && reports[0] == "ok" {
        tracing::info!(
            path = %path.display(),
            elapsed_ms = started.elapsed().as_millis(),
            "store integrity checked"
        );
        return Ok(());
    }
    Err(OpenError::Damaged {
        path: path.to_path_buf(),
        problems: reports.len(),
        first: reports.into_iter().next().unwrap_or_default(),
    })
}

/// Whether the migrations ever ran on this database.
fn has_schema(connection: &Connection) -> rusqlite::Result<bool> {
    connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE name = 'schema_migrations')",
        [],
        |row| row.get(0),
    )
}

/// Writes the marker durably: the file, then the directory entry.
fn write_marker(data_dir: &Path, marker: &Path) -> Result<(), OpenError> {
    use std::io::Write as _;
    let written = (|| {
        let mut file = std::fs::File::create(marker)?;
        writeln!(
            file,
            "cx-gateway created a store ({DATABASE_FILE}) in this directory at {}.\n\
             While this file exists the gateway refuses to start without {DATABASE_FILE}, instead \
             of silently creating an empty one.",
            chrono::Utc::now().to_rfc3339()
        )?;
        file.sync_all()?;
        std::fs::File::open(data_dir)?.sync_all()
    })();
    written.map_err(|error| {
        OpenError::Failed(storage_error(format!(
            "cannot write the store marker {}: {error}",
            marker.display()
        )))
    })
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
            sqlite_error(&error)
        });
        for complete in completions {
            complete(commit_error.clone());
        }
    }
}

/// The store contract, on a fresh SQLite store in a temporary directory.
#[cfg(test)]
mod contract {
    async fn fresh() -> (tempfile::TempDir, crate::store::Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        (dir, store)
    }

    crate::store_contract_tests!(fresh);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the cursor `name` as a fresh open of the store in `dir` reads it.
    async fn cursor_after_reopen(dir: &Path, name: &'static str) -> String {
        let reopened = SqliteStore::open(dir).unwrap();
        reopened
            .read(move |c| {
                c.query_row(
                    "SELECT value FROM sync_cursors WHERE name = ?1",
                    [name],
                    |row| row.get(0),
                )
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn writes_are_visible_to_reads_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
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
            .read_value("SELECT COUNT(*) FROM sync_cursors")
            .await
            .unwrap();
        assert_eq!(stored, count);
        drop(store);

        assert_eq!(cursor_after_reopen(dir.path(), "cursor-7").await, "7");
    }

    /// Opens a store, writes to it and closes it, leaving everything in the main file (no WAL), as
    /// a stopped gateway leaves it.
    async fn stopped_store(dir: &Path) -> PathBuf {
        let store = SqliteStore::open(dir).unwrap();
        for i in 0..50 {
            store
                .write(move |tx| {
                    tx.execute(
                        "INSERT INTO sync_cursors (name, value) VALUES (?1, ?2)",
                        (format!("cursor-{i}"), "x".repeat(200)),
                    )
                })
                .await
                .unwrap();
        }
        let path = store.path().to_path_buf();
        drop(store);
        let connection = Connection::open(&path).unwrap();
        connection
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
        path
    }

    /// Overwrites page `page` (1-based) of the database file with bytes no page can hold.
    fn damage_page(path: &Path, page: u64) {
        use std::io::{Seek as _, SeekFrom, Write as _};
        let page_size: i64 = Connection::open(path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .unwrap();
        let page_size = u64::try_from(page_size).unwrap();
        let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.seek(SeekFrom::Start((page - 1) * page_size)).unwrap();
        file.write_all(&vec![0xA5; usize::try_from(page_size).unwrap()])
            .unwrap();
        file.sync_all().unwrap();
    }

    fn root_page(path: &Path, name: &str) -> u64 {
        let page: i64 = Connection::open(path)
            .unwrap()
            .query_row(
                "SELECT rootpage FROM sqlite_schema WHERE name = ?1",
                [name],
                |row| row.get(0),
            )
            .unwrap();
        u64::try_from(page).unwrap()
    }

    #[tokio::test]
    async fn a_damaged_store_is_refused_with_the_command_to_recover_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = stopped_store(dir.path()).await;
        // An index page: the outbox's rows are intact, and `.recover` rebuilds indexes.
        damage_page(&path, root_page(&path, "outbox_by_state"));
        let error = SqliteStore::open(dir.path()).unwrap_err();
        let OpenError::Damaged { problems, .. } = &error else {
            panic!("expected a damaged store, got {error}");
        };
        assert!(*problems >= 1);
        let message = error.to_string();
        assert!(message.contains("quick_check found"), "{message}");
        assert!(
            message.contains(&format!("sqlite3 {} .recover", path.display())),
            "{message}"
        );
        // Refused again on the next start: nothing was repaired or recreated behind the scenes.
        assert!(matches!(
            SqliteStore::open(dir.path()),
            Err(OpenError::Damaged { .. })
        ));
    }

    #[tokio::test]
    async fn a_store_whose_header_is_destroyed_is_refused_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = stopped_store(dir.path()).await;
        damage_page(&path, 1);
        let error = SqliteStore::open(dir.path()).unwrap_err();
        assert!(matches!(error, OpenError::Damaged { .. }), "{error}");
        assert!(error.to_string().contains(".recover"), "{error}");
    }

    #[tokio::test]
    async fn a_missing_store_is_refused_where_one_was_created_unless_asked_to_create_one() {
        let dir = tempfile::tempdir().unwrap();
        // A fresh directory just works, and the store leaves its marker.
        let path = stopped_store(dir.path()).await;
        assert!(dir.path().join(MARKER_FILE).exists());

        std::fs::remove_file(&path).unwrap();
        let error = SqliteStore::open(dir.path()).unwrap_err();
        assert!(matches!(error, OpenError::Missing { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains("--allow-new-store"), "{message}");
        assert!(message.contains("CXGW_ALLOW_NEW_STORE=true"), "{message}");
        assert!(!path.exists(), "a refused start must not create the file");

        // An emptied file is as missing as a deleted one.
        std::fs::File::create(&path).unwrap();
        assert!(matches!(
            SqliteStore::open(dir.path()),
            Err(OpenError::Missing { .. })
        ));

        // Asked explicitly: a new, empty store, usable at once.
        let store = SqliteStore::open_with(dir.path(), MissingStore::CreateNew).unwrap();
        let cursors: i64 = store
            .read(|c| c.query_row("SELECT COUNT(*) FROM sync_cursors", [], |row| row.get(0)))
            .await
            .unwrap();
        assert_eq!(cursors, 0);
        store
            .write(|tx| {
                tx.execute(
                    "INSERT INTO sync_cursors (name, value) VALUES ('new', '1')",
                    [],
                )
            })
            .await
            .unwrap();
        drop(store);
        // From then on it is the store of this directory, opened without the flag.
        assert_eq!(cursor_after_reopen(dir.path(), "new").await, "1");
    }

    #[tokio::test]
    async fn a_store_from_before_markers_gains_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = stopped_store(dir.path()).await;
        std::fs::remove_file(dir.path().join(MARKER_FILE)).unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        assert!(dir.path().join(MARKER_FILE).exists());
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            SqliteStore::open(dir.path()),
            Err(OpenError::Missing { .. })
        ));
    }

    /// Paused-clock tests see time move only where they move it, whatever a fsync costs.
    #[tokio::test(start_paused = true)]
    async fn writes_hold_a_paused_clock_still() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        // A timer the clock would jump to if the runtime idled while the writer commits.
        let timer = tokio::spawn(tokio::time::sleep(std::time::Duration::from_secs(3600)));
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            store
                .write(|tx| {
                    tx.execute(
                        "INSERT INTO sync_cursors (name, value) VALUES ('n', '1')
                         ON CONFLICT (name) DO UPDATE SET value = value + 1",
                        [],
                    )
                })
                .await
                .unwrap();
        }
        assert_eq!(start.elapsed(), std::time::Duration::ZERO);
        timer.abort();
    }

    #[tokio::test]
    async fn a_failing_job_does_not_undo_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
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
        assert_eq!(error.kind(), StoreErrorKind::Unavailable);
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
