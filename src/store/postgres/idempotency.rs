//! Idempotency records on PostgreSQL: table `idempotency`, unique per `(owner, scope, key)`,
//! shared by every replica, so a repeat sent to another replica finds the same record.
//!
//! Claims (table `idempotency_claims`, same key) make concurrent repeats on several replicas
//! run once: a claim is one upsert that takes the key only when it is free (no claim, a claim
//! from before the window, this holder's own, or, if asked, one whose lease ran out). Racing
//! upserts of one key are serialised by the primary key's lock, so exactly one takes it. The
//! record is read after the upsert, in a new statement (read committed: a fresh snapshot), so a
//! holder that stored its record and released its claim while this claim waited on that claim's
//! row is seen as recorded rather than run again. Both statements commit on their own: a claim
//! costs two round trips.

use super::outbox::store_record;
use super::{PostgresStore, in_transaction, query_error};
use crate::store::StoreError;
use crate::store::idempotency::{
    ClaimOutcome, ClaimTerms, IdempotencyRecord, IdempotencyStore, KeyClaim, StoredResponse,
};

/// What [`PostgresStore::record_first`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstRecord {
    /// This call's record now holds the key.
    Stored,
    /// Another call recorded the key first, within the window: its record, which every
    /// caller racing on the key is to answer with.
    Existing(StoredResponse),
}

impl PostgresStore {
    /// Stores `record` unless the key already holds a record created at or after
    /// `created_since_ms`; of two replicas racing on one key, exactly one stores and the other
    /// gets that winner's record back. The insert waits for a racing insert of the same key to
    /// commit or roll back (the unique key's lock), so the loser always sees the winner.
    pub async fn record_first(
        &self,
        record: IdempotencyRecord,
        created_since_ms: i64,
    ) -> Result<FirstRecord, StoreError> {
        in_transaction!(self, "record an idempotent response", |tx| {
            let fail = query_error("record an idempotent response");
            let now = chrono::Utc::now().timestamp_millis();
            let stored = tx
                .execute(
                    "INSERT INTO idempotency (owner, scope, key, request_hash, response, create_ms)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (owner, scope, key) DO UPDATE SET
                        request_hash = EXCLUDED.request_hash, response = EXCLUDED.response,
                        create_ms = EXCLUDED.create_ms
                     WHERE idempotency.create_ms < $7",
                    &[
                        &record.owner,
                        &record.scope,
                        &record.key,
                        &record.request_hash,
                        &record.response,
                        &now,
                        &created_since_ms,
                    ],
                )
                .await
                .map_err(&fail)?;
            if stored == 1 {
                return Ok(FirstRecord::Stored);
            }
            // A new statement sees the winner's commit (read committed).
            let row = tx
                .query_one(
                    "SELECT request_hash, response FROM idempotency
                     WHERE owner = $1 AND scope = $2 AND key = $3",
                    &[&record.owner, &record.scope, &record.key],
                )
                .await
                .map_err(&fail)?;
            Ok(FirstRecord::Existing(StoredResponse {
                request_hash: row.get(0),
                response: row.get(1),
            }))
        })
    }
}

/// Removes `claim` if its holder still has it.
async fn delete_claim(
    connection: &tokio_postgres::Client,
    claim: &KeyClaim,
) -> Result<u64, tokio_postgres::Error> {
    connection
        .execute(
            "DELETE FROM idempotency_claims
             WHERE owner = $1 AND scope = $2 AND key = $3 AND holder = $4",
            &[&claim.owner, &claim.scope, &claim.key, &claim.holder],
        )
        .await
}

#[async_trait::async_trait]
impl IdempotencyStore for PostgresStore {
    async fn lookup(
        &self,
        owner: &str,
        scope: &str,
        key: &str,
        created_since_ms: i64,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let connection = self.connection("look up an idempotency record").await?;
        let row = connection
            .query_opt(
                "SELECT request_hash, response FROM idempotency
                 WHERE owner = $1 AND scope = $2 AND key = $3 AND create_ms >= $4",
                &[&owner, &scope, &key, &created_since_ms],
            )
            .await
            .map_err(query_error("look up an idempotency record"))?;
        Ok(row.map(|row| StoredResponse {
            request_hash: row.get(0),
            response: row.get(1),
        }))
    }

    async fn record(&self, record: IdempotencyRecord) -> Result<(), StoreError> {
        in_transaction!(self, "record an idempotent response", |tx| {
            let fail = query_error("record an idempotent response");
            let now = chrono::Utc::now().timestamp_millis();
            store_record(&tx, &record, now, &fail).await
        })
    }

    async fn prune(&self, created_before_ms: i64) -> Result<usize, StoreError> {
        in_transaction!(self, "prune idempotency records", |tx| {
            let fail = query_error("prune idempotency records");
            let pruned = tx
                .execute(
                    "DELETE FROM idempotency WHERE create_ms < $1",
                    &[&created_before_ms],
                )
                .await
                .map_err(&fail)?;
            tx.execute(
                "DELETE FROM idempotency_claims WHERE create_ms < $1",
                &[&created_before_ms],
            )
            .await
            .map_err(&fail)?;
            Ok(usize::try_from(pruned).unwrap_or(usize::MAX))
        })
    }

    async fn claim_key(
        &self,
        claim: &KeyClaim,
        terms: ClaimTerms,
    ) -> Result<ClaimOutcome, StoreError> {
        // Each statement commits on its own (two round trips, not four): the upsert must commit
        // before the record is read anyway for the read to see a racing holder's record, and
        // a claim left behind by a failure between them only delays repeats by its lease (the
        // record, once there, answers before any claim is looked at).
        let fail = query_error("claim an idempotency key");
        let connection = self.connection("claim an idempotency key").await?;
        let now = chrono::Utc::now().timestamp_millis();
        // The existing claim's lease comes back when the upsert leaves it alone, from the
        // same statement: read separately, it could be gone by then.
        let row = connection
            .query_one(
                "WITH taken AS (
                        INSERT INTO idempotency_claims AS c
                            (owner, scope, key, holder, create_ms, lease_until_ms)
                        VALUES ($1, $2, $3, $4, $5, $6)
                        ON CONFLICT (owner, scope, key) DO UPDATE SET
                            holder = EXCLUDED.holder, create_ms = EXCLUDED.create_ms,
                            lease_until_ms = EXCLUDED.lease_until_ms
                        WHERE c.create_ms < $7 OR c.holder = EXCLUDED.holder
                            OR ($8 AND c.lease_until_ms < $5)
                        RETURNING 1)
                     SELECT EXISTS (SELECT 1 FROM taken),
                        (SELECT lease_until_ms FROM idempotency_claims
                         WHERE owner = $1 AND scope = $2 AND key = $3)",
                &[
                    &claim.owner,
                    &claim.scope,
                    &claim.key,
                    &claim.holder,
                    &now,
                    &terms.lease_until_ms,
                    &terms.created_since_ms,
                    &terms.take_over_lapsed,
                ],
            )
            .await
            .map_err(&fail)?;
        let claimed: bool = row.get(0);
        let held_until: Option<i64> = row.get(1);
        let recorded = connection
            .query_opt(
                "SELECT request_hash, response FROM idempotency
                     WHERE owner = $1 AND scope = $2 AND key = $3 AND create_ms >= $4",
                &[
                    &claim.owner,
                    &claim.scope,
                    &claim.key,
                    &terms.created_since_ms,
                ],
            )
            .await
            .map_err(&fail)?;
        if let Some(row) = recorded {
            if claimed {
                // Not a call to run after all: leave no claim behind.
                delete_claim(&connection, claim).await.map_err(&fail)?;
            }
            return Ok(ClaimOutcome::Recorded(StoredResponse {
                request_hash: row.get(0),
                response: row.get(1),
            }));
        }
        Ok(match (claimed, held_until) {
            (true, _) => ClaimOutcome::Claimed,
            // Released between the upsert and the read: free again, the caller asks anew.
            (false, None) => ClaimOutcome::Running,
            (false, Some(until)) if until >= now => ClaimOutcome::Running,
            (false, Some(_)) => ClaimOutcome::Abandoned,
        })
    }

    async fn renew_key_claim(
        &self,
        claim: &KeyClaim,
        lease_until_ms: i64,
    ) -> Result<bool, StoreError> {
        let connection = self.connection("renew an idempotency claim").await?;
        let renewed = connection
            .execute(
                "UPDATE idempotency_claims SET lease_until_ms = $5
                 WHERE owner = $1 AND scope = $2 AND key = $3 AND holder = $4",
                &[
                    &claim.owner,
                    &claim.scope,
                    &claim.key,
                    &claim.holder,
                    &lease_until_ms,
                ],
            )
            .await
            .map_err(query_error("renew an idempotency claim"))?;
        Ok(renewed == 1)
    }

    async fn release_key_claim(&self, claim: &KeyClaim) -> Result<(), StoreError> {
        let connection = self.connection("release an idempotency claim").await?;
        delete_claim(&connection, claim)
            .await
            .map_err(query_error("release an idempotency claim"))?;
        Ok(())
    }
}
