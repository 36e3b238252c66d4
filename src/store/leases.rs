//! Leases with fencing tokens: which replica runs a task that must run exactly once across the
//! replicas sharing a store (the feedback poller of one Retently account), and the token its
//! writes carry so that a replica that lost the lease (paused, cut off, presumed dead) can no
//! longer write.
//!
//! A lease is a named row with a holder, an expiry on the engine's own clock (so the replicas'
//! clock skew does not matter) and an epoch that grows by one each time the lease passes to
//! another holder. The epoch is the fencing token: writes made under a lease name the epoch
//! ([`Fence`]) and the engine applies them only while it is still the lease's current one,
//! checked in the write's own transaction (see
//! [`FeedbackLogStore::append_fenced`](super::FeedbackLogStore::append_fenced)). Expiry only
//! decides when another replica may take over; safety comes from the epoch alone.

use std::time::Duration;

use super::StoreError;

/// A lease as held by one holder: its name and the epoch its writes must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub lease: String,
    /// Grows each time the lease passes to another holder; constant while one holder renews.
    pub epoch: i64,
}

/// What a write made under a lease did.
#[derive(Debug, Clone, PartialEq)]
pub enum UnderLease<T> {
    /// The fence still held the lease; the write is committed.
    Done(T),
    /// Another holder took the lease since the fence was granted: nothing was written.
    LeaseLost,
}

/// Leases by name. Each method is atomic.
#[async_trait::async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// How long a lease lasts after its last acquisition or renewal; a holder renews it every
    /// third of this, and a standby asks for it as often.
    fn lease_ttl(&self) -> Duration;

    /// Takes `lease` for `holder` when it is free or has expired (the epoch then grows if the
    /// holder changes), or renews it when `holder` holds it already (same epoch). `None` when
    /// another holder's lease still runs.
    async fn acquire_lease(&self, lease: &str, holder: &str) -> Result<Option<Fence>, StoreError>;

    /// Ends the lease at once if `fence` still holds it, so another replica takes over without
    /// waiting for it to expire (a replica that drains).
    async fn release_lease(&self, fence: &Fence) -> Result<(), StoreError>;
}
