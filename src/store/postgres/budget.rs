//! Upstream budgets shared by the replicas: table `upstream_budget` and the function
//! `cxgw_budget_acquire` (migration 4), which grants a slot in one statement.
//!
//! Each operation is one statement outside an explicit transaction, prepared once per pooled
//! connection, so it costs one round trip to the database: a grant, a refund and a
//! `Retry-After` each cost one.

use std::time::Duration;

use super::{PostgresStore, query_error};
use crate::store::StoreError;
use crate::store::budget::{BudgetAnswer, BudgetStore, GrantId};

const ACQUIRE: &str = "SELECT granted, grant_us, retry_us, ages_us, blocked_us
     FROM cxgw_budget_acquire($1, $2, $3)";

/// Removes one occurrence of the grant (two grants can share a microsecond).
const REFUND: &str = "UPDATE upstream_budget
     SET grants = grants[:array_position(grants, $2) - 1]
                  || grants[array_position(grants, $2) + 1:]
     WHERE account = $1 AND $2 = ANY (grants)";

const BLOCK: &str = "INSERT INTO upstream_budget AS b (account, blocked_until_us)
     VALUES ($1, floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint + $2)
     ON CONFLICT (account) DO UPDATE SET blocked_until_us =
         GREATEST(COALESCE(b.blocked_until_us, 0), EXCLUDED.blocked_until_us)";

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// A duration the database computed; negative values (none are expected) count as zero.
fn from_micros(micros: i64) -> Duration {
    Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

#[async_trait::async_trait]
impl BudgetStore for PostgresStore {
    async fn acquire(
        &self,
        account: &str,
        limit: u32,
        window: Duration,
    ) -> Result<BudgetAnswer, StoreError> {
        const OPERATION: &str = "take a slot of the shared upstream budget";
        let fail = query_error(OPERATION);
        let connection = self.connection(OPERATION).await?;
        let statement = connection.prepare_cached(ACQUIRE).await.map_err(&fail)?;
        let limit = i32::try_from(limit.max(1)).unwrap_or(i32::MAX);
        let row = connection
            .query_one(&statement, &[&account, &limit, &micros(window)])
            .await
            .map_err(&fail)?;
        let granted: bool = row.get(0);
        let grant: Option<i64> = row.get(1);
        let retry_us: i64 = row.get(2);
        let ages: Vec<i64> = row.get(3);
        let blocked_us: Option<i64> = row.get(4);
        Ok(BudgetAnswer {
            grant: if granted { grant.map(GrantId) } else { None },
            retry_in: from_micros(retry_us),
            ages: ages.into_iter().map(from_micros).collect(),
            blocked_for: blocked_us.map(from_micros),
        })
    }

    async fn refund(&self, account: &str, grant: GrantId) -> Result<(), StoreError> {
        const OPERATION: &str = "give back a slot of the shared upstream budget";
        let fail = query_error(OPERATION);
        let connection = self.connection(OPERATION).await?;
        let statement = connection.prepare_cached(REFUND).await.map_err(&fail)?;
        connection
            .execute(&statement, &[&account, &grant.0])
            .await
            .map_err(&fail)?;
        Ok(())
    }

    async fn block_for(&self, account: &str, pause: Duration) -> Result<(), StoreError> {
        const OPERATION: &str = "pause the shared upstream budget";
        let fail = query_error(OPERATION);
        let connection = self.connection(OPERATION).await?;
        let statement = connection.prepare_cached(BLOCK).await.map_err(&fail)?;
        connection
            .execute(&statement, &[&account, &micros(pause)])
            .await
            .map_err(&fail)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
