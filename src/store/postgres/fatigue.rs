//! The survey record on PostgreSQL: table `survey_fatigue`, shared by every replica.
//!
//! Every write of an entry (reserve, release, seed) first takes a transaction-scoped advisory
//! lock per (scope, email) it touches, all at once in ascending key order: two replicas sending
//! to one customer serialize on that customer, so the second reservation's check reads what the
//! first one recorded (each statement of a read-committed transaction sees what committed before
//! it started), and transactions that touch overlapping recipients in any order never deadlock.
//! A row lock could not do this alone: an entry that does not exist yet has no row to lock.
//! The locks end with the transaction, so they hold also behind a pooler in transaction mode.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{PostgresStore, in_transaction, query_error};
use crate::store::StoreError;
use crate::store::cursors::Checkpoint;
use crate::store::fatigue::{
    BACKFILL_CHECKPOINT, FatigueStore, Reservation, ReserveRequest, Surveyed,
};

/// The first key of the survey record's advisory locks ("fatg"); the two-key form never meets
/// the one-key locks the migrations take.
pub(super) const LOCK_CLASS: i32 = 0x6661_7467;

/// The second key of the lock of one entry: FNV-1a of scope and email, fixed across builds so
/// that replicas of different versions agree. Two entries sharing a key merely wait for each
/// other.
pub(super) fn lock_key(scope: &str, email: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in scope.bytes().chain([0]).chain(email.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// Locks the entries `keys` names until the transaction ends, in ascending order (the set's).
async fn lock_entries(
    tx: &tokio_postgres::Transaction<'_>,
    keys: BTreeSet<i32>,
    fail: &impl Fn(tokio_postgres::Error) -> StoreError,
) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let keys: Vec<i32> = keys.into_iter().collect();
    // unnest yields the array in order and nothing reorders it before the locks are taken.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, key) FROM unnest($2::integer[]) AS keys (key)",
        &[&LOCK_CLASS, &keys],
    )
    .await
    .map_err(fail)?;
    Ok(())
}

/// An entry as a reservation sees it: when it was surveyed, under which token.
type Held = (i64, Option<String>);

#[async_trait::async_trait]
impl FatigueStore for PostgresStore {
    async fn reserve(
        &self,
        token: &str,
        now_ms: i64,
        requests: Vec<ReserveRequest>,
    ) -> Result<Vec<Reservation>, StoreError> {
        in_transaction!(self, "reserve survey recipients", |tx| {
            let fail = query_error("reserve survey recipients");
            let entries: BTreeSet<(&str, &str)> = requests
                .iter()
                .flat_map(|request| {
                    request
                        .claims
                        .iter()
                        .map(|claim| (claim.scope.as_str(), request.email.as_str()))
                })
                .collect();
            lock_entries(
                &tx,
                entries
                    .iter()
                    .map(|(scope, email)| lock_key(scope, email))
                    .collect(),
                &fail,
            )
            .await?;
            let (scopes, emails): (Vec<&str>, Vec<&str>) = entries.iter().copied().unzip();
            let mut held: HashMap<(String, String), Held> = tx
                .query(
                    "SELECT f.scope, f.email, f.surveyed_ms, f.token FROM survey_fatigue f
                     JOIN unnest($1::text[], $2::text[]) AS wanted (scope, email)
                       ON f.scope = wanted.scope AND f.email = wanted.email",
                    &[&scopes, &emails],
                )
                .await
                .map_err(&fail)?
                .iter()
                .map(|row| ((row.get(0), row.get(1)), (row.get(2), row.get(3))))
                .collect();
            // Decided in list order against the entries as the earlier grants leave them, then
            // written at once: a grant's upsert gives the same row whether applied once or again
            // under the same token and time, so each entry is written once.
            let mut granted: BTreeSet<(String, String)> = BTreeSet::new();
            let mut answers = Vec::with_capacity(requests.len());
            for request in &requests {
                let blocked = request.claims.iter().find_map(|claim| {
                    let key = (claim.scope.clone(), request.email.clone());
                    match held.get(&key) {
                        Some((surveyed_ms, holder))
                            if *surveyed_ms > claim.not_since_ms
                                && holder.as_deref() != Some(token) =>
                        {
                            Some(Reservation::Blocked {
                                scope: claim.scope.clone(),
                                surveyed_ms: *surveyed_ms,
                            })
                        }
                        _ => None,
                    }
                });
                if let Some(blocked) = blocked {
                    answers.push(blocked);
                    continue;
                }
                for claim in &request.claims {
                    let key = (claim.scope.clone(), request.email.clone());
                    held.insert(key.clone(), (now_ms, Some(token.to_owned())));
                    granted.insert(key);
                }
                answers.push(Reservation::Granted);
            }
            if !granted.is_empty() {
                let (scopes, emails): (Vec<String>, Vec<String>) = granted.into_iter().unzip();
                tx.execute(
                    "INSERT INTO survey_fatigue (scope, email, surveyed_ms, token)
                     SELECT scope, email, $3::bigint, $4::text
                     FROM unnest($1::text[], $2::text[]) AS granted (scope, email)
                     ON CONFLICT (scope, email) DO UPDATE SET
                       previous_ms = CASE
                         WHEN survey_fatigue.token IS NOT DISTINCT FROM EXCLUDED.token
                         THEN survey_fatigue.previous_ms
                         ELSE survey_fatigue.surveyed_ms END,
                       surveyed_ms = EXCLUDED.surveyed_ms,
                       token = EXCLUDED.token",
                    &[&scopes, &emails, &now_ms, &token],
                )
                .await
                .map_err(&fail)?;
            }
            Ok(answers)
        })
    }

    async fn release(&self, token: &str, email: &str) -> Result<(), StoreError> {
        in_transaction!(self, "release survey recipients", |tx| {
            let fail = query_error("release survey recipients");
            let scopes: Vec<String> = tx
                .query(
                    "SELECT scope FROM survey_fatigue WHERE email = $1 AND token = $2",
                    &[&email, &token],
                )
                .await
                .map_err(&fail)?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if scopes.is_empty() {
                return Ok(());
            }
            lock_entries(
                &tx,
                scopes.iter().map(|scope| lock_key(scope, email)).collect(),
                &fail,
            )
            .await?;
            // Under the locks, an entry another send reserved meanwhile no longer carries this
            // token and is left alone.
            tx.execute(
                "DELETE FROM survey_fatigue
                 WHERE email = $1 AND token = $2 AND previous_ms IS NULL",
                &[&email, &token],
            )
            .await
            .map_err(&fail)?;
            tx.execute(
                "UPDATE survey_fatigue
                 SET surveyed_ms = previous_ms, previous_ms = NULL, token = NULL
                 WHERE email = $1 AND token = $2",
                &[&email, &token],
            )
            .await
            .map_err(&fail)?;
            Ok(())
        })
    }

    async fn backfilled(&self) -> Result<bool, StoreError> {
        let connection = self.connection("read the backfill checkpoint").await?;
        let row = connection
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM sync_cursors WHERE name = $1)",
                &[&BACKFILL_CHECKPOINT],
            )
            .await
            .map_err(query_error("read the backfill checkpoint"))?;
        Ok(row.get(0))
    }

    async fn seed(&self, surveyed: Vec<Surveyed>, done: bool) -> Result<(), StoreError> {
        in_transaction!(self, "seed the survey record", |tx| {
            let fail = query_error("seed the survey record");
            // One row per email, its latest send (an upsert may not touch one row twice).
            let mut latest: BTreeMap<&str, i64> = BTreeMap::new();
            for survey in &surveyed {
                let sent = latest
                    .entry(survey.email.as_str())
                    .or_insert(survey.sent_ms);
                *sent = (*sent).max(survey.sent_ms);
            }
            if !latest.is_empty() {
                lock_entries(
                    &tx,
                    latest.keys().map(|email| lock_key("", email)).collect(),
                    &fail,
                )
                .await?;
                let (emails, sent): (Vec<&str>, Vec<i64>) = latest.into_iter().unzip();
                tx.execute(
                    "INSERT INTO survey_fatigue (scope, email, surveyed_ms)
                     SELECT '', email, sent_ms
                     FROM unnest($1::text[], $2::bigint[]) AS seeded (email, sent_ms)
                     ON CONFLICT (scope, email) DO UPDATE SET
                       surveyed_ms = GREATEST(survey_fatigue.surveyed_ms, EXCLUDED.surveyed_ms)",
                    &[&emails, &sent],
                )
                .await
                .map_err(&fail)?;
            }
            if done {
                let checkpoint = Checkpoint {
                    name: BACKFILL_CHECKPOINT.to_owned(),
                    value: chrono::Utc::now().to_rfc3339(),
                };
                super::cursors::put(&tx, &checkpoint, &fail).await?;
            }
            Ok(())
        })
    }

    async fn last_surveyed(&self, scope: &str, email: &str) -> Result<Option<i64>, StoreError> {
        let connection = self.connection("read the survey record").await?;
        let row = connection
            .query_opt(
                "SELECT surveyed_ms FROM survey_fatigue WHERE scope = $1 AND email = $2",
                &[&scope, &email],
            )
            .await
            .map_err(query_error("read the survey record"))?;
        Ok(row.map(|row| row.get(0)))
    }
}
