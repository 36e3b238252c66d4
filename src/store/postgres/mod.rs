//! The PostgreSQL engine of the store, for several gateway replicas sharing one database.
//!
//! One bounded pool of connections (`deadpool-postgres` over `tokio-postgres`) serves every
//! concern; each store operation is one transaction on one pooled connection, so what the
//! traits promise to do atomically commits atomically. PostgreSQL acknowledges a commit only
//! once it is on disk (`synchronous_commit = on`, its default), which is what "acknowledged"
//! means for an asynchronous write.
//!
//! The URL is a secret (it usually carries the password): it lives in a [`Secret`], is parsed
//! once, and no error or log line built here contains it or any part of it.
//!
//! # Layout
//! - [`migrations`]: the versioned schema, applied at start by one replica at a time.
//! - `alerts`: the alert evaluator's checkpoint and alert keys.
//! - `budget`: the upstream request budgets every replica shares, one grant per round trip.
//! - `cursors`: the pollers' checkpoints.
//! - `fatigue`: the survey record behind the cool-down, reserved race-free across replicas.
//! - [`feedback_log`]: the shared feedback log, numbered in commit order without gaps.
//! - `leases`: leases with fencing tokens (the one feedback poller across replicas).
//! - `notify`: the listening connection that wakes the replicas' log tails after appends.
//! - `health`: the probe behind readiness, on a connection of its own.
//! - [`outbox`]: deliveries claimed across replicas under a lease.
//! - [`idempotency`]: records that replicas racing on one key resolve to one winner.
//! - `survey_spool`: single-recipient survey sends handed to the account's one sender.

use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::Secret;
use crate::store::{StoreError, StoreErrorKind};

mod alerts;
mod budget;
mod cursors;
mod fatigue;
pub mod feedback_log;
mod health;
pub mod idempotency;
mod leases;
pub mod migrations;
mod notify;
pub mod outbox;
mod survey_spool;

#[cfg(test)]
pub(crate) mod testing;

/// Connections kept at most by default. The whole upstream budget is 2.5 requests per second, so
/// a replica's database work is small; the bound keeps N replicas well inside PostgreSQL's
/// default `max_connections` of 100.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// See [`PostgresSettings::claim_lease`]. Renewed every third of it, so it only has to outlast a
/// short loss of the database; a dead replica's deliveries are taken over about this long
/// after its death.
pub const DEFAULT_CLAIM_LEASE: Duration = Duration::from_secs(30);

/// See [`PostgresSettings::poller_lease`]: with the standbys asking every third of it, the
/// poller of a replica that died runs on another one within about 4 s.
pub const DEFAULT_POLLER_LEASE: Duration = Duration::from_secs(3);

/// Lease renewals come no more often than this, whatever the lease.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

/// How long an operation waits for a pooled connection, and how long opening one may take,
/// before the store reports itself unavailable (the caller gets `UNAVAILABLE` and retries)
/// rather than holding an RPC for as long as the database is away.
const POOL_WAIT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long sent data may stay unacknowledged by the database host before the connection is
/// dropped (Linux `TCP_USER_TIMEOUT`), unless the URL sets it: without it, an operation on a
/// connection whose network path died waits for the kernel's retransmissions, about 15 minutes,
/// instead of failing as unavailable.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// A `postgres://` URL or a libpq key/value string. With `sslmode=require` the connection
    /// must use TLS; with `prefer` (libpq's default) TLS is tried first. The server's certificate
    /// is always verified (against `ca_file` if set, else the system's trust store), so a server
    /// whose certificate does not verify is refused, never used unencrypted in its place.
    pub url: Secret,
    /// PEM file with the CA certificates the server's certificate must chain to (a private CA
    /// such as a CloudNativePG cluster's), in place of the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// The most connections this replica holds open.
    pub pool_size: usize,
    /// How long a delivery claimed by this replica stays its own without a renewal; past it,
    /// any replica takes it over as one whose replica died. The replica renews its claims
    /// every third of this while it runs.
    pub claim_lease: Duration,
    /// How long the feedback poller's lease lasts without a renewal (see
    /// [`crate::store::leases`]): its holder renews it every third of this, the other replicas
    /// ask for it as often, and one of them takes it over at most this long after the holder
    /// died.
    pub poller_lease: Duration,
    /// Whether the replicas hand their single-recipient survey sends to one of them, so they
    /// share `POST /survey` batches as one replica's callers do (see
    /// [`crate::upstream::retently::spool`]); without it each replica batches its own.
    pub shared_survey_batches: bool,
}

impl PostgresSettings {
    pub fn new(url: Secret) -> PostgresSettings {
        PostgresSettings {
            url,
            ca_file: None,
            pool_size: DEFAULT_POOL_SIZE,
            claim_lease: DEFAULT_CLAIM_LEASE,
            poller_lease: DEFAULT_POLLER_LEASE,
            shared_survey_batches: true,
        }
    }
}

/// A failed operation as a [`StoreError`], its kind taken from the SQLSTATE class (typed), its
/// text naming the operation and the server's message, never the URL or the credentials (the
/// server's messages name tables and constraints; the client's own errors, I/O and TLS, carry
/// no connection parameters).
pub(crate) fn query_failed(operation: &str, error: &tokio_postgres::Error) -> StoreError {
    match error.as_db_error() {
        Some(db) => StoreError::new(
            kind_of(db.code()),
            format!(
                "postgres: {operation} failed: {} ({})",
                db.message(),
                db.code().code()
            ),
        ),
        // No SQLSTATE: the connection broke or could not be made.
        None => StoreError::unavailable(format!("postgres: {operation} failed: {error}")),
    }
}

/// [`query_failed`] as a `map_err` argument.
pub(crate) fn query_error(operation: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |error| query_failed(operation, &error)
}

fn pool_failed(operation: &str, error: &deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(error) => query_failed(operation, error),
        other => StoreError::unavailable(format!("postgres: {operation} failed: {other}")),
    }
}

fn kind_of(code: &SqlState) -> StoreErrorKind {
    match &code.code()[..2] {
        // Integrity constraints (a unique key), serialization failures and deadlocks.
        "23" | "40" => StoreErrorKind::Conflict,
        // Insufficient resources: disk full, out of memory, too many connections.
        "53" => StoreErrorKind::Full,
        // Internal errors, among them data and index corruption.
        "XX" => StoreErrorKind::Corrupt,
        // Connection exceptions, the server shutting down or starting (operator intervention),
        // system I/O errors, and the rest: the operation may succeed later.
        _ => StoreErrorKind::Unavailable,
    }
}

/// Runs `$body` (an async block's body using the transaction `$tx`, evaluating to
/// `Result<_, StoreError>`) in one transaction on a pooled connection and commits it; any error
/// rolls it back. `$operation` names it in errors.
macro_rules! in_transaction {
    ($store:expr, $operation:expr, |$tx:ident| $body:block) => {{
        let operation: &'static str = $operation;
        let fail = $crate::store::postgres::query_error(operation);
        let mut connection = $store.connection(operation).await?;
        let $tx = connection.transaction().await.map_err(&fail)?;
        let result: Result<_, $crate::store::StoreError> = async { $body }.await;
        let value = result?;
        $tx.commit().await.map_err(&fail)?;
        Ok(value)
    }};
}
pub(crate) use in_transaction;

/// The PostgreSQL engine: a pool of connections to one migrated database; cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// How long a claimed delivery stays with the replica that claimed it (see [`outbox`]).
    claim_lease: Duration,
    outbox_state: Arc<outbox::OutboxState>,
    /// See [`PostgresSettings::poller_lease`].
    poller_lease: Duration,
    /// How to open a connection of its own, outside the pool (the `LISTEN` connection). Holds
    /// the password: never logged.
    connect: Arc<(tokio_postgres::Config, MakeRustlsConnect)>,
    /// The health probe's own connection (see `health`).
    probe: Arc<health::ProbeConnection>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PostgresStore")
            .field("pool_size", &status.max_size)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, then brings the schema up to date (one replica at a time, see [`migrations`]).
    /// Fails when the database cannot be reached: a replica does not start without its store.
    pub async fn connect(settings: &PostgresSettings) -> Result<PostgresStore, StoreError> {
        let store = PostgresStore::connect_lazily(settings)?;
        migrations::migrate(&store).await?;
        store.spawn_lease_renewal();
        Ok(store)
    }

    /// The pool, without touching the database yet.
    fn connect_lazily(settings: &PostgresSettings) -> Result<PostgresStore, StoreError> {
        let mut config = tokio_postgres::Config::from_str(settings.url.expose()).map_err(|_| {
            // The parser's message can quote the URL; say only what to fix.
            StoreError::new(
                StoreErrorKind::Unavailable,
                "postgres: the database url is not a valid postgres:// URL or key=value \
                 connection string",
            )
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("cx-gateway");
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        let tls = MakeRustlsConnect::new(tls_config(settings.ca_file.as_deref())?);
        let connect = Arc::new((config.clone(), tls.clone()));
        let probe = Arc::new(health::ProbeConnection::new(config.clone(), tls.clone()));
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                // A connection that broke is noticed by its next query, which fails with
                // `Unavailable`; checking each one out with a round trip would double the cost
                // of every operation for nothing.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|error| {
                StoreError::unavailable(format!("postgres: cannot build the pool: {error}"))
            })?;
        Ok(PostgresStore {
            pool,
            claim_lease: settings.claim_lease,
            outbox_state: Arc::default(),
            poller_lease: settings.poller_lease,
            connect,
            probe,
        })
    }

    /// Renews this replica's claims every third of the lease, for as long as any handle of the
    /// store exists. A renewal that fails (the database is away) is retried at the next tick;
    /// two missed in a row still leave a third of the lease.
    fn spawn_lease_renewal(&self) {
        let interval = (self.claim_lease / 3).max(MIN_RENEWAL_INTERVAL);
        let alive = Arc::downgrade(&self.outbox_state);
        let pool = self.pool.clone();
        let claim_lease = self.claim_lease;
        let poller_lease = self.poller_lease;
        let connect = Arc::clone(&self.connect);
        let probe = Arc::clone(&self.probe);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(outbox_state) = alive.upgrade() else {
                    return;
                };
                let store = PostgresStore {
                    pool: pool.clone(),
                    claim_lease,
                    outbox_state,
                    poller_lease,
                    connect: Arc::clone(&connect),
                    probe: Arc::clone(&probe),
                };
                if let Err(error) = store.renew_leases().await {
                    tracing::warn!(%error, "cannot renew the claims of in-flight deliveries");
                }
            }
        });
    }

    /// A pooled connection.
    pub(crate) async fn connection(
        &self,
        operation: &'static str,
    ) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|error| pool_failed(operation, &error))
    }

    /// Whether the database answers now (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let connection = self.connection("ping").await?;
        connection
            .simple_query("SELECT 1")
            .await
            .map_err(query_error("ping"))?;
        Ok(())
    }
}

/// TLS for the database connection: rustls with ring (as everywhere in the gateway), verifying
/// the server against `ca_file` or the platform's trust store.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    use rustls_platform_verifier::BuilderVerifierExt as _;

    let tls_failed =
        |detail: String| StoreError::unavailable(format!("postgres: cannot set up tls: {detail}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| tls_failed(error.to_string()))?;
    let config = match ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certificates = CertificateDer::pem_file_iter(path)
                .map_err(|error| tls_failed(format!("cannot read {}: {error}", path.display())))?;
            for certificate in certificates {
                let certificate = certificate.map_err(|error| {
                    tls_failed(format!("cannot read {}: {error}", path.display()))
                })?;
                roots
                    .add(certificate)
                    .map_err(|error| tls_failed(error.to_string()))?;
            }
            if roots.is_empty() {
                return Err(tls_failed(format!(
                    "{} holds no certificate",
                    path.display()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .with_platform_verifier()
            .map_err(|error| tls_failed(error.to_string()))?
            .with_no_client_auth(),
    };
    Ok(config)
}

#[cfg(test)]
mod tests;
