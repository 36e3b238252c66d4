//! Leases on PostgreSQL: table `leases`, one row per lease (see [`crate::store::leases`]).
//!
//! Expiry is on the database's clock (`clock_timestamp()`), so the replicas' clocks never have
//! to agree. Taking a lease over and checking a fence meet on the lease's row: a fenced write
//! reads it `FOR SHARE` in its own transaction, so a takeover waits for a write that already
//! passed its check to commit, and a write that comes after the takeover finds the new epoch.
//! The new holder thus reads the poller's state only after every write of the old one.

use std::time::Duration;

use super::{PostgresStore, in_transaction, query_error};
use crate::store::StoreError;
use crate::store::leases::{Fence, LeaseStore};

/// Whether `fence` still holds its lease, checked inside the caller's transaction; the row
/// stays share-locked until that transaction ends, so no takeover commits in between.
pub(super) async fn holds(
    tx: &tokio_postgres::Transaction<'_>,
    fence: &Fence,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<bool, StoreError> {
    let epoch: Option<i64> = tx
        .query_opt(
            "SELECT epoch FROM leases WHERE name = $1 FOR SHARE",
            &[&fence.lease],
        )
        .await
        .map_err(fail)?
        .map(|row| row.get(0));
    Ok(epoch == Some(fence.epoch))
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl LeaseStore for PostgresStore {
    fn lease_ttl(&self) -> Duration {
        self.poller_lease
    }

    async fn acquire_lease(&self, lease: &str, holder: &str) -> Result<Option<Fence>, StoreError> {
        const OPERATION: &str = "acquire a lease";
        let connection = self.connection(OPERATION).await?;
        // One statement: a free or expired lease passes to `holder` (the epoch grows if the
        // holder changes), the holder's own is extended, another's running one is left alone
        // (the update's condition fails and no row comes back).
        let row = connection
            .query_opt(
                "INSERT INTO leases AS current (name, holder, epoch, expires_at)
                 VALUES ($1, $2, 1, clock_timestamp() + $3::bigint * interval '1 millisecond')
                 ON CONFLICT (name) DO UPDATE SET
                    epoch = CASE WHEN current.holder = EXCLUDED.holder THEN current.epoch
                                 ELSE current.epoch + 1 END,
                    holder = EXCLUDED.holder,
                    expires_at = EXCLUDED.expires_at
                 WHERE current.holder = EXCLUDED.holder
                    OR current.expires_at <= clock_timestamp()
                 RETURNING epoch",
                &[&lease, &holder, &millis(self.poller_lease)],
            )
            .await
            .map_err(query_error(OPERATION))?;
        Ok(row.map(|row| Fence {
            lease: lease.to_owned(),
            epoch: row.get(0),
        }))
    }

    async fn release_lease(&self, fence: &Fence) -> Result<(), StoreError> {
        in_transaction!(self, "release a lease", |tx| {
            tx.execute(
                "UPDATE leases SET expires_at = '-infinity' WHERE name = $1 AND epoch = $2",
                &[&fence.lease, &fence.epoch],
            )
            .await
            .map_err(query_error("release a lease"))?;
            Ok(())
        })
    }
}
