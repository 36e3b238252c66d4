//! Idempotency records in SQLite: table `idempotency`, unique per `(owner, scope, key)`.
//!
//! Claims live in memory: the database file has one process, so its claims are that
//! process's own, and after a crash no call of the old process is running any more.

use std::collections::HashMap;

use rusqlite::{OptionalExtension as _, params};

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::idempotency::{
    ClaimOutcome, ClaimTerms, IdempotencyRecord, IdempotencyStore, KeyClaim, StoredResponse,
};

/// The claims held now, per `(owner, scope, key)`.
#[derive(Debug, Default)]
pub(super) struct Claims(HashMap<(String, String, String), HeldClaim>);

#[derive(Debug)]
struct HeldClaim {
    holder: String,
    create_ms: i64,
    lease_until_ms: i64,
}

fn claim_key(claim: &KeyClaim) -> (String, String, String) {
    (claim.owner.clone(), claim.scope.clone(), claim.key.clone())
}

fn poisoned() -> StoreError {
    StoreError::unavailable("the idempotency claims are poisoned")
}

#[async_trait::async_trait]
impl IdempotencyStore for SqliteStore {
    async fn lookup(
        &self,
        owner: &str,
        scope: &str,
        key: &str,
        created_since_ms: i64,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let (owner, scope, key) = (owner.to_owned(), scope.to_owned(), key.to_owned());
        self.read(move |c| {
            // The owner's own record wins over one written before records had owners.
            c.query_row(
                "SELECT request_hash, response FROM idempotency
                 WHERE scope = ?1 AND key = ?2 AND create_ms >= ?3
                    AND (owner = ?4 OR owner IS NULL)
                 ORDER BY owner IS NULL LIMIT 1",
                params![scope, key, created_since_ms, owner],
                stored_response,
            )
            .optional()
        })
        .await
    }

    async fn record(&self, record: IdempotencyRecord) -> Result<(), StoreError> {
        self.write(move |tx| super::outbox::insert_idempotency(tx, &record))
            .await
    }

    async fn prune(&self, created_before_ms: i64) -> Result<usize, StoreError> {
        if let Ok(mut claims) = self.inner.claims.lock() {
            claims
                .0
                .retain(|_, held| held.create_ms >= created_before_ms);
        }
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM idempotency WHERE create_ms < ?1",
                [created_before_ms],
            )
        })
        .await
    }

    async fn claim_key(
        &self,
        claim: &KeyClaim,
        terms: ClaimTerms,
    ) -> Result<ClaimOutcome, StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        // Claim first, then read the record, in the order the networked engine needs.
        let claimed = {
            let mut claims = self.inner.claims.lock().map_err(|_| poisoned())?;
            let entry = claims.0.entry(claim_key(claim));
            match entry {
                std::collections::hash_map::Entry::Occupied(mut held) => {
                    let current = held.get();
                    let free = current.create_ms < terms.created_since_ms
                        || current.holder == claim.holder
                        || (terms.take_over_lapsed && current.lease_until_ms < now);
                    if free {
                        held.insert(HeldClaim {
                            holder: claim.holder.clone(),
                            create_ms: now,
                            lease_until_ms: terms.lease_until_ms,
                        });
                        Ok(())
                    } else {
                        Err(current.lease_until_ms)
                    }
                }
                std::collections::hash_map::Entry::Vacant(vacant) => {
                    vacant.insert(HeldClaim {
                        holder: claim.holder.clone(),
                        create_ms: now,
                        lease_until_ms: terms.lease_until_ms,
                    });
                    Ok(())
                }
            }
        };
        let (owner, scope, key) = claim_key(claim);
        let since = terms.created_since_ms;
        let recorded = self
            .read(move |c| {
                c.query_row(
                    "SELECT request_hash, response FROM idempotency
                     WHERE scope = ?1 AND key = ?2 AND create_ms >= ?3 AND owner = ?4",
                    params![scope, key, since, owner],
                    stored_response,
                )
                .optional()
            })
            .await;
        let recorded = match recorded {
            Ok(recorded) => recorded,
            Err(error) => {
                if claimed.is_ok() {
                    self.release_key_claim(claim).await?;
                }
                return Err(error);
            }
        };
        if let Some(stored) = recorded {
            if claimed.is_ok() {
                self.release_key_claim(claim).await?;
            }
            return Ok(ClaimOutcome::Recorded(stored));
        }
        Ok(match claimed {
            Ok(()) => ClaimOutcome::Claimed,
            Err(until) if until >= now => ClaimOutcome::Running,
            Err(_) => ClaimOutcome::Abandoned,
        })
    }

    async fn renew_key_claim(
        &self,
        claim: &KeyClaim,
        lease_until_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut claims = self.inner.claims.lock().map_err(|_| poisoned())?;
        match claims.0.get_mut(&claim_key(claim)) {
            Some(held) if held.holder == claim.holder => {
                held.lease_until_ms = lease_until_ms;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_key_claim(&self, claim: &KeyClaim) -> Result<(), StoreError> {
        let mut claims = self.inner.claims.lock().map_err(|_| poisoned())?;
        let key = claim_key(claim);
        if claims
            .0
            .get(&key)
            .is_some_and(|held| held.holder == claim.holder)
        {
            claims.0.remove(&key);
        }
        Ok(())
    }
}

/// A remembered response from its row (`request_hash, response`).
fn stored_response(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredResponse> {
    Ok(StoredResponse {
        request_hash: row.get(0)?,
        response: row.get(1)?,
    })
}
