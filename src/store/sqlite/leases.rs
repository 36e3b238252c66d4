//! Leases on the embedded engine: trivial, because the embedded store belongs to exactly one
//! gateway process. Every lease is this process's, always with the same epoch, so the code that
//! runs under a lease (the feedback poller) has one path for both engines.

use std::time::Duration;

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::leases::{Fence, LeaseStore};

/// The one epoch of every lease: no other holder can ever take one.
pub(super) const EMBEDDED_EPOCH: i64 = 1;

/// Nothing can take a lease over, so its length only paces the holder's renewals, which are
/// free: an hour keeps them out of the way.
const EMBEDDED_LEASE_TTL: Duration = Duration::from_secs(3600);

#[async_trait::async_trait]
impl LeaseStore for SqliteStore {
    fn lease_ttl(&self) -> Duration {
        EMBEDDED_LEASE_TTL
    }

    async fn acquire_lease(&self, lease: &str, _holder: &str) -> Result<Option<Fence>, StoreError> {
        Ok(Some(Fence {
            lease: lease.to_owned(),
            epoch: EMBEDDED_EPOCH,
        }))
    }

    async fn release_lease(&self, _fence: &Fence) -> Result<(), StoreError> {
        Ok(())
    }
}
