//! One upstream request budget shared by every replica: the grant times of the current window
//! per upstream account, kept by the engine and granted by the engine's clock, so replicas whose
//! clocks disagree still never exceed the window together.
//!
//! Only the PostgreSQL engine implements it: the embedded store serves one replica, whose lane
//! keeps the budget in memory (see [`crate::upstream::scheduler::budget`]).

use std::time::Duration;

use super::StoreError;

/// A slot granted by [`BudgetStore::acquire`], named so it can be given back unused. It is the
/// grant's time on the engine's clock (microseconds since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantId(pub i64);

/// What the shared budget answered to one request for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetAnswer {
    /// The slot taken, or `None` when refused.
    pub grant: Option<GrantId>,
    /// When refused: how long until a slot can free, because the oldest grant that fills the
    /// window leaves it or the upstream's `Retry-After` ends. Zero when granted.
    pub retry_in: Duration,
    /// How long ago each grant now in the window was made, oldest first (the new grant, made
    /// now, included): what the lane estimates waits from.
    pub ages: Vec<Duration>,
    /// How long an upstream `Retry-After` still stops every replica, if one does.
    pub blocked_for: Option<Duration>,
}

/// The shared budgets of upstream accounts. Each method is one atomic operation of the engine.
#[async_trait::async_trait]
pub trait BudgetStore: Send + Sync + 'static {
    /// Takes one slot of `account`'s budget of `limit` requests in any `window` (the jitter
    /// margin included), unless the window is full or a `Retry-After` holds. Evicting expired
    /// grants, checking and appending happen atomically with the engine's clock, so concurrent
    /// callers from any number of replicas never put more than `limit` grants in one window.
    async fn acquire(
        &self,
        account: &str,
        limit: u32,
        window: Duration,
    ) -> Result<BudgetAnswer, StoreError>;

    /// Gives back a slot that was granted and never used.
    async fn refund(&self, account: &str, grant: GrantId) -> Result<(), StoreError>;

    /// Honours an upstream `Retry-After` for every replica: nothing of `account` is granted for
    /// `pause` from now (a later end already set is kept).
    async fn block_for(&self, account: &str, pause: Duration) -> Result<(), StoreError>;
}
