//! The lane's view of a budget shared by every replica ([`crate::store::BudgetStore`]).
//!
//! With a shared budget the lane's dispatcher asks the store for a slot for the waiter at the
//! head of its queues only, one round trip per grant; a refusal names when a slot can free and
//! the dispatcher waits locally until then. Priorities and fair shares between this replica's
//! callers stay the lane's own, over the slots the replica is granted. The store's answers
//! also refresh the lane's copy of the window, from which it estimates waits (shedding,
//! `RetryInfo`). When the store cannot be reached, nothing is sent: the waiters get
//! `UNAVAILABLE` with a `RetryInfo`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, ErrorCode, Reason};
use crate::store::BudgetStore;
use crate::store::budget::{BudgetAnswer, GrantId};
use crate::upstream::failure::FailureClass;

/// How soon a caller refused for an unreachable budget store is told to come back.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One upstream account's budget in a [`BudgetStore`]. Cheap to clone.
#[derive(Clone)]
pub struct SharedBudget {
    store: Arc<dyn BudgetStore>,
    account: Arc<str>,
}

impl fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBudget")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl SharedBudget {
    /// The budget of the account that `credential` authenticates on `upstream`. The account is
    /// named by a fingerprint of the credential (replicas configured alike share it, two
    /// accounts on one database do not), never by the credential itself.
    pub fn new(store: Arc<dyn BudgetStore>, upstream: &str, credential: &str) -> SharedBudget {
        SharedBudget {
            store,
            account: Arc::from(account_name(upstream, credential)),
        }
    }

    /// The name of the account's row in the store (no secret).
    pub fn account(&self) -> &str {
        &self.account
    }

    pub(super) async fn acquire(
        &self,
        limit: u32,
        window: Duration,
    ) -> Result<BudgetAnswer, crate::store::StoreError> {
        self.store.acquire(&self.account, limit, window).await
    }

    /// Gives back an unused slot; a failure only leaves the slot spent until it leaves the
    /// window, which errs on the safe side.
    pub(super) async fn refund(&self, grant: GrantId) {
        if let Err(error) = self.store.refund(&self.account, grant).await {
            tracing::debug!(account = %self.account, %error, "cannot give back an unused budget slot");
        }
    }

    /// Stops every replica for `pause` (an upstream `Retry-After`); on failure this replica
    /// still honours it.
    pub(super) async fn block_for(&self, pause: Duration) {
        if let Err(error) = self.store.block_for(&self.account, pause).await {
            tracing::warn!(
                account = %self.account,
                %error,
                "cannot share an upstream retry-after with the other replicas"
            );
        }
    }
}

/// The name of the account that `credential` authenticates on `upstream` in shared state: a
/// fingerprint of the credential (replicas configured alike agree on it, two accounts on one
/// database do not), never the credential itself.
pub fn account_name(upstream: &str, credential: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("cx-gateway upstream budget\0{upstream}\0{credential}").as_bytes(),
    );
    let fingerprint: String = digest.as_ref()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("{upstream}:{fingerprint}")
}

/// The refusal of a call whose slot could not be asked for: no request was sent.
pub(super) fn unreachable(upstream: &'static str, error: &crate::store::StoreError) -> Error {
    Error::new(
        ErrorCode::Unavailable,
        Reason::StoreUnavailable,
        format!("the shared {upstream} request budget cannot be reached: {error}"),
    )
    .with_retry_after(STORE_RETRY_AFTER)
    .with_metadata("upstream", upstream)
    .with_failure_class(FailureClass::NotSent)
}

/// An in-memory [`BudgetStore`] for lane tests: the same semantics as the database's, on the
/// (pausable) tokio clock.
#[cfg(test)]
pub(crate) mod memory {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use tokio::time::Instant;

    use crate::store::StoreError;
    use crate::store::budget::{BudgetAnswer, BudgetStore, GrantId};

    #[derive(Debug, Default)]
    struct Account {
        grants: Vec<Instant>,
        blocked_until: Option<Instant>,
    }

    #[derive(Debug)]
    pub(crate) struct MemoryBudget {
        epoch: Instant,
        accounts: Mutex<HashMap<String, Account>>,
        /// While set, every operation fails as an unreachable database does.
        pub(crate) down: AtomicBool,
        /// Operations asked of the store (round trips, for a database).
        pub(crate) operations: AtomicU64,
    }

    impl MemoryBudget {
        pub(crate) fn new() -> MemoryBudget {
            MemoryBudget {
                epoch: Instant::now(),
                accounts: Mutex::default(),
                down: AtomicBool::new(false),
                operations: AtomicU64::new(0),
            }
        }

        fn check(&self) -> Result<(), StoreError> {
            self.operations.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::unavailable("memory budget: down"));
            }
            Ok(())
        }

        fn id(&self, at: Instant) -> GrantId {
            GrantId(i64::try_from((at - self.epoch).as_micros()).unwrap())
        }
    }

    #[async_trait::async_trait]
    impl BudgetStore for MemoryBudget {
        async fn acquire(
            &self,
            account: &str,
            limit: u32,
            window: Duration,
        ) -> Result<BudgetAnswer, StoreError> {
            self.check()?;
            let now = Instant::now();
            let mut accounts = self.accounts.lock().unwrap();
            let state = accounts.entry(account.to_owned()).or_default();
            state.grants.retain(|&at| at + window > now);
            state.blocked_until = state.blocked_until.filter(|&until| until > now);
            let limit = limit.max(1) as usize;
            let count = state.grants.len();
            let grant = if state.blocked_until.is_none() && count < limit {
                state.grants.push(now);
                Some(self.id(now))
            } else {
                None
            };
            let mut retry_in = Duration::ZERO;
            if grant.is_none() && count >= limit {
                retry_in = state.grants[count - limit] + window - now;
            }
            if let Some(until) = state.blocked_until {
                retry_in = retry_in.max(until - now);
            }
            Ok(BudgetAnswer {
                grant,
                retry_in,
                ages: state.grants.iter().map(|&at| now - at).collect(),
                blocked_for: state.blocked_until.map(|until| until - now),
            })
        }

        async fn refund(&self, account: &str, grant: GrantId) -> Result<(), StoreError> {
            self.check()?;
            let mut accounts = self.accounts.lock().unwrap();
            if let Some(state) = accounts.get_mut(account)
                && let Some(position) = state.grants.iter().position(|&at| self.id(at) == grant)
            {
                state.grants.remove(position);
            }
            Ok(())
        }

        async fn block_for(&self, account: &str, pause: Duration) -> Result<(), StoreError> {
            self.check()?;
            let until = Instant::now() + pause;
            let mut accounts = self.accounts.lock().unwrap();
            let state = accounts.entry(account.to_owned()).or_default();
            if state.blocked_until.is_none_or(|current| current < until) {
                state.blocked_until = Some(until);
            }
            Ok(())
        }
    }
}
