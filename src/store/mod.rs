//! Storage: every SQL statement and the whole schema of the gateway, behind narrow async traits
//! per concern, so the rest of the gateway never sees an engine.
//!
//! - [`OutboxStore`] ([`outbox`]): the durable outbox of asynchronous writes: enqueue (with the
//!   call's idempotency record), claim with ordering, attempt outcomes, recovery, dead letters.
//! - [`IdempotencyStore`] ([`idempotency`]): remembered responses of idempotent calls.
//! - [`FeedbackLogStore`] ([`feedback_log`]): the deduplicated feedback log, its latest versions
//!   of every response, retention and the reads behind `FeedbackStream` and `ListFeedback`.
//! - [`CursorStore`] ([`cursors`]): named checkpoints of background pollers.
//! - [`FatigueStore`] ([`fatigue`]): who was surveyed when, behind the survey cool-down and the
//!   event rules' throttles.
//! - [`AlertStore`] ([`alerts`]): the alert evaluator's checkpoint, alert keys and rate limit
//!   counts, and the queueing of its alerts in the outbox.
//! - [`LeaseStore`] ([`leases`]): leases with fencing tokens, so that one replica runs the
//!   feedback poller.
//! - [`BudgetStore`] ([`budget`]): upstream request budgets shared by replicas (PostgreSQL only;
//!   one embedded replica keeps its budget in memory).
//! - [`SurveySpoolStore`] ([`survey_spool`]): survey sends handed from every replica to the one
//!   that batches them (PostgreSQL only).
//!
//! Each trait method is one atomic operation (a transaction of the engine), described by what
//! it does, never by a borrowed connection, so a networked engine implements the same traits.
//! Failures are a [`StoreError`] of a typed [`StoreErrorKind`].
//!
//! Engines: [`sqlite`], the embedded default (one SQLite file in the data directory, group
//! commit through one writer thread); [`postgres`], one PostgreSQL database shared by several
//! replicas. [`Store`] bundles one engine's implementations as trait
//! objects; that is what the domain holds. A networked engine also gives a [`HealthProbe`]
//! ([`health`]), whose answers drive readiness.

use std::path::Path;
use std::sync::Arc;

pub mod alerts;
pub mod budget;
pub mod cursors;
mod error;
pub mod fatigue;
pub mod feedback_log;
pub mod health;
pub mod idempotency;
pub mod leases;
pub mod outbox;
pub mod postgres;
pub mod sqlite;
pub mod survey_spool;

/// The engines' shared contract tests; see [`store_contract_tests!`](crate::store_contract_tests).
#[cfg(test)]
pub(crate) mod contract;

pub use alerts::AlertStore;
pub use budget::BudgetStore;
pub use cursors::{Checkpoint, CursorStore};
pub use error::{StoreError, StoreErrorKind};
pub use fatigue::FatigueStore;
pub use feedback_log::FeedbackLogStore;
pub use health::HealthProbe;
pub use idempotency::{IdempotencyRecord, IdempotencyStore};
pub use leases::LeaseStore;
pub use outbox::OutboxStore;
pub use sqlite::{DATABASE_FILE, MARKER_FILE, MissingStore, OpenError, SqliteStore};
pub use survey_spool::SurveySpoolStore;

/// An engine that holds every concern.
pub trait Engine:
    OutboxStore
    + IdempotencyStore
    + FeedbackLogStore
    + CursorStore
    + FatigueStore
    + AlertStore
    + LeaseStore
{
}

impl<
    E: OutboxStore
        + IdempotencyStore
        + FeedbackLogStore
        + CursorStore
        + FatigueStore
        + AlertStore
        + LeaseStore,
> Engine for E
{
}

/// The store the gateway runs on: one engine, seen through its per-concern traits. Cheap to
/// clone.
#[derive(Clone)]
pub struct Store {
    outbox: Arc<dyn OutboxStore>,
    idempotency: Arc<dyn IdempotencyStore>,
    feedback_log: Arc<dyn FeedbackLogStore>,
    cursors: Arc<dyn CursorStore>,
    fatigue: Arc<dyn FatigueStore>,
    alerts: Arc<dyn AlertStore>,
    leases: Arc<dyn LeaseStore>,
    /// How to tell whether the engine can be reached; `None` for the embedded one, whose file
    /// is always at hand.
    health: Option<Arc<dyn HealthProbe>>,
    /// Names the engine and where its data lives, for logs (never a secret).
    description: Arc<str>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("engine", &self.description)
            .finish()
    }
}

impl Store {
    /// Opens the embedded SQLite store in `data_dir` (see [`SqliteStore::open`]).
    pub fn open(data_dir: &Path) -> Result<Store, OpenError> {
        Store::open_with(data_dir, MissingStore::Refuse)
    }

    /// Opens the embedded SQLite store in `data_dir` (see [`SqliteStore::open_with`]).
    pub fn open_with(data_dir: &Path, missing: MissingStore) -> Result<Store, OpenError> {
        let engine = SqliteStore::open_with(data_dir, missing)?;
        let description = format!("sqlite:{}", engine.path().display());
        Ok(Store::from_engine(engine, description))
    }

    /// The store backed by `engine`; `description` names it in logs and must hold no secret.
    pub fn from_engine<E: Engine>(engine: E, description: impl Into<Arc<str>>) -> Store {
        let engine = Arc::new(engine);
        Store {
            outbox: Arc::clone(&engine) as Arc<dyn OutboxStore>,
            idempotency: Arc::clone(&engine) as Arc<dyn IdempotencyStore>,
            feedback_log: Arc::clone(&engine) as Arc<dyn FeedbackLogStore>,
            cursors: Arc::clone(&engine) as Arc<dyn CursorStore>,
            fatigue: Arc::clone(&engine) as Arc<dyn FatigueStore>,
            alerts: Arc::clone(&engine) as Arc<dyn AlertStore>,
            leases: engine as Arc<dyn LeaseStore>,
            health: None,
            description: description.into(),
        }
    }

    /// The store with `probe` telling whether its engine can be reached (see [`health`]).
    pub fn with_health_probe(mut self, probe: Arc<dyn HealthProbe>) -> Store {
        self.health = Some(probe);
        self
    }

    pub fn health_probe(&self) -> Option<&Arc<dyn HealthProbe>> {
        self.health.as_ref()
    }

    pub fn outbox(&self) -> &Arc<dyn OutboxStore> {
        &self.outbox
    }

    pub fn idempotency(&self) -> &Arc<dyn IdempotencyStore> {
        &self.idempotency
    }

    pub fn feedback_log(&self) -> &Arc<dyn FeedbackLogStore> {
        &self.feedback_log
    }

    pub fn cursors(&self) -> &Arc<dyn CursorStore> {
        &self.cursors
    }

    pub fn fatigue(&self) -> &Arc<dyn FatigueStore> {
        &self.fatigue
    }

    pub fn alerts(&self) -> &Arc<dyn AlertStore> {
        &self.alerts
    }

    pub fn leases(&self) -> &Arc<dyn LeaseStore> {
        &self.leases
    }

    pub fn description(&self) -> &str {
        &self.description
    }
}
