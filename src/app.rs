//! What every service shares, built once by `server::run`: settings, the durable store, the
//! drain signal and the background workers (outbox delivery, feedback sync).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::config::StoreSelection;
use crate::domain::idempotency::Idempotency;
use crate::domain::outbox::{Outbox, OutboxSettings};
use crate::readiness::Readiness;
use crate::shutdown::Drain;
use crate::store::postgres::PostgresStore;
use crate::store::{BudgetStore, LeaseStore, MissingStore, Store, SurveySpoolStore};
use crate::upstream::retently::spool::SurveySpool;
use crate::upstream::scheduler::fair::{CallerShares, EqualShares};
use crate::upstream::scheduler::shared::account_name;
use crate::upstream::{RetainlyApi, RetentlyApi};

pub struct App {
    pub config: Arc<Config>,
    pub store: Store,
    pub outbox: Outbox,
    pub idempotency: Idempotency,
    /// The Retently account behind its scheduler (budget, batching, caching, retries).
    pub retently: RetentlyApi,
    /// The Retainly workspace behind its scheduler.
    pub retainly: RetainlyApi,
    pub drain: Drain,
    /// Whether start-up work is done (outbox recovery) and the store answers; `/readyz` and
    /// health report it.
    pub readiness: Readiness,
    /// Workers that run until draining starts; each must watch `drain` and return promptly.
    background: Mutex<JoinSet<()>>,
    /// Holds the temporary data directory of sandbox mode; removed when the app is dropped.
    _temporary_data_dir: Option<tempfile::TempDir>,
}

impl App {
    /// Opens the store (the embedded one in the configured data directory, or in a fresh
    /// temporary one when none is configured (sandbox mode); or the PostgreSQL database), and
    /// builds the upstream clients. Must run inside the runtime (the schedulers spawn their
    /// dispatchers).
    pub async fn open(config: Config, drain: Drain) -> anyhow::Result<App> {
        // One replica on the embedded store keeps its upstream budgets in memory; replicas on
        // PostgreSQL share them there.
        let mut shared_budget: Option<Arc<dyn BudgetStore>> = None;
        // Replicas on PostgreSQL also hand their survey sends to one of them, unless told not to.
        let mut survey_spool: Option<(Arc<dyn SurveySpoolStore>, Arc<dyn LeaseStore>)> = None;
        let (store, temporary) = match &config.store {
            StoreSelection::Embedded => {
                let (store, temporary) = open_embedded(&config)?;
                (store, temporary)
            }
            StoreSelection::Postgres(settings) => {
                // The error names what failed, never the URL (see store::postgres).
                let engine = PostgresStore::connect(settings)
                    .await
                    .context("cannot open the postgres store")?;
                tracing::info!(pool_size = settings.pool_size, "store open on postgres");
                let probe = Arc::new(engine.clone());
                shared_budget = Some(Arc::new(engine.clone()));
                if settings.shared_survey_batches {
                    survey_spool = Some((Arc::new(engine.clone()), Arc::new(engine.clone())));
                }
                let store = Store::from_engine(engine, "postgres").with_health_probe(probe);
                (store, None)
            }
        };
        let outbox = Outbox::new(
            store.clone(),
            OutboxSettings {
                retry_window: config.writes.retry_window,
                base_backoff: config.writes.base_backoff,
                max_backoff: config.writes.max_backoff,
                drain_grace: config.shutdown_grace,
                // Retently's history of sent surveys tells whether a cut send went out.
                verifiable_methods: vec![crate::grpc::methods::SEND_SURVEY.to_owned()],
                ..OutboxSettings::default()
            },
        );
        let idempotency = Idempotency::new(store.clone(), config.writes.idempotency_window);
        // Callers share each upstream budget by the weights and quotas of the callers file, read
        // at every admission so a reload applies at once.
        let shares: Arc<dyn CallerShares> = match &config.auth.callers {
            Some(registry) => Arc::new(registry.clone()),
            None => Arc::new(EqualShares),
        };
        let mut retently =
            RetentlyApi::from_config(&config.retently, Arc::clone(&shares), shared_budget.clone())?;
        if let (Some((spool, leases)), Some(api_key)) = (survey_spool, &config.retently.api_key) {
            let account = account_name(
                crate::upstream::retently::client::UPSTREAM,
                api_key.expose(),
            );
            retently = retently.with_survey_spool(SurveySpool::start(spool, leases, &account));
        }
        let retainly = RetainlyApi::from_config(&config.retainly, shares, shared_budget)?;
        Ok(App {
            retently,
            retainly,
            config: Arc::new(config),
            store,
            outbox,
            idempotency,
            drain,
            readiness: Readiness::new(),
            background: Mutex::new(JoinSet::new()),
            _temporary_data_dir: temporary,
        })
    }

    /// Runs `worker` until it returns; workers are expected to stop when `drain` fires.
    pub fn spawn_background(&self, worker: impl Future<Output = ()> + Send + 'static) {
        if let Ok(mut set) = self.background.lock() {
            set.spawn(worker);
        }
    }

    /// Waits for the background workers to stop, at most `within`; those still running are
    /// aborted (their work is durable and resumes at the next start).
    pub async fn stop_background(&self, within: Duration) {
        let mut set = match self.background.lock() {
            Ok(mut set) => std::mem::take(&mut *set),
            Err(_) => return,
        };
        let joined =
            tokio::time::timeout(within, async { while set.join_next().await.is_some() {} }).await;
        if joined.is_err() {
            tracing::warn!(
                remaining = set.len(),
                "background workers did not stop in time, aborting them"
            );
            set.abort_all();
        }
    }
}

/// The embedded store in the configured data directory, or in a fresh temporary one (sandbox
/// mode), which the returned guard removes when dropped.
fn open_embedded(config: &Config) -> anyhow::Result<(Store, Option<tempfile::TempDir>)> {
    let (temporary, data_dir): (Option<tempfile::TempDir>, PathBuf) = match &config.data_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("cx-gateway-")
                .tempdir()
                .context("cannot create a temporary data directory")?;
            let path = dir.path().to_path_buf();
            (Some(dir), path)
        }
    };
    let missing = if config.allow_new_store {
        MissingStore::CreateNew
    } else {
        MissingStore::Refuse
    };
    let store = Store::open_with(&data_dir, missing)
        .with_context(|| format!("cannot open the store in {}", data_dir.display()))?;
    tracing::info!(data_dir = %data_dir.display(), temporary = temporary.is_some(), "store open");
    Ok((store, temporary))
}
