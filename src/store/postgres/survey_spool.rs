//! The survey spool (table `survey_spool`, migration 7; see [`crate::store::survey_spool`]).
//!
//! A pending entry has no `epoch`; a claim sets the sender lease's epoch, checked against the
//! lease row in the claim's own transaction; an answer fills `answer`. Spooling and answering
//! `NOTIFY` their channels in their own transactions, so the wake-up comes with the commit.

use tokio::sync::watch;

use super::{PostgresStore, in_transaction, query_error};
use crate::store::StoreError;
use crate::store::leases::{Fence, UnderLease};
use crate::store::survey_spool::{SpoolAnswer, SpoolEntry, SurveySpoolStore};

/// Wakes the sender when entries are spooled.
const SPOOLED_CHANNEL: &str = "cxgw_survey_spooled";
/// Wakes the waiters when answers are recorded.
const ANSWERED_CHANNEL: &str = "cxgw_survey_answered";

#[async_trait::async_trait]
impl SurveySpoolStore for PostgresStore {
    async fn spool(&self, entry: &SpoolEntry) -> Result<i64, StoreError> {
        in_transaction!(self, "spool a survey send", |tx| {
            let fail = query_error("spool a survey send");
            let row = tx
                .query_one(
                    "INSERT INTO survey_spool
                        (account, batch_key, item, interactive, caller, deadline_ms, created_ms)
                     VALUES ($1, $2, $3, $4, $5, $6,
                        (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                     RETURNING id",
                    &[
                        &entry.account,
                        &entry.key,
                        &entry.item,
                        &entry.interactive,
                        &entry.caller,
                        &entry.deadline_ms,
                    ],
                )
                .await
                .map_err(&fail)?;
            tx.execute("SELECT pg_notify($1, '')", &[&SPOOLED_CHANNEL])
                .await
                .map_err(&fail)?;
            Ok(row.get(0))
        })
    }

    async fn claim_spooled(
        &self,
        fence: &Fence,
        account: &str,
        limit: usize,
    ) -> Result<UnderLease<Vec<(i64, SpoolEntry)>>, StoreError> {
        in_transaction!(self, "claim spooled survey sends", |tx| {
            let fail = query_error("claim spooled survey sends");
            // The lease row stays share-locked until the commit, so no takeover lands between
            // this check and the claim (see `leases`).
            if !super::leases::holds(&tx, fence, &fail).await? {
                return Ok(UnderLease::LeaseLost);
            }
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = tx
                .query(
                    "UPDATE survey_spool SET epoch = $2
                     WHERE id IN (
                        SELECT id FROM survey_spool
                        WHERE account = $1 AND epoch IS NULL
                        ORDER BY id LIMIT $3
                        FOR UPDATE SKIP LOCKED)
                     RETURNING id, batch_key, item, interactive, caller, deadline_ms",
                    &[&account, &fence.epoch, &limit],
                )
                .await
                .map_err(&fail)?;
            let mut claimed: Vec<(i64, SpoolEntry)> = rows
                .iter()
                .map(|row| {
                    (
                        row.get(0),
                        SpoolEntry {
                            account: account.to_owned(),
                            key: row.get(1),
                            item: row.get(2),
                            interactive: row.get(3),
                            caller: row.get(4),
                            deadline_ms: row.get(5),
                        },
                    )
                })
                .collect();
            claimed.sort_unstable_by_key(|(id, _)| *id);
            Ok(UnderLease::Done(claimed))
        })
    }

    async fn answer_spooled(&self, answers: &[(i64, String)]) -> Result<(), StoreError> {
        if answers.is_empty() {
            return Ok(());
        }
        let (ids, texts): (Vec<i64>, Vec<&str>) = answers
            .iter()
            .map(|(id, answer)| (*id, answer.as_str()))
            .unzip();
        in_transaction!(self, "answer spooled survey sends", |tx| {
            let fail = query_error("answer spooled survey sends");
            tx.execute(
                "UPDATE survey_spool AS s SET answer = a.answer
                 FROM unnest($1::bigint[], $2::text[]) AS a (id, answer)
                 WHERE s.id = a.id",
                &[&ids, &texts],
            )
            .await
            .map_err(&fail)?;
            tx.execute("SELECT pg_notify($1, '')", &[&ANSWERED_CHANNEL])
                .await
                .map_err(&fail)?;
            Ok(())
        })
    }

    async fn collect_spooled(
        &self,
        lease: &str,
        ids: &[i64],
    ) -> Result<Vec<(i64, SpoolAnswer)>, StoreError> {
        const OPERATION: &str = "collect answers of spooled survey sends";
        let connection = self.connection(OPERATION).await?;
        let rows = connection
            .query(
                "DELETE FROM survey_spool AS s
                 WHERE s.id = ANY ($1)
                    AND (s.answer IS NOT NULL
                         OR (s.epoch IS NOT NULL AND s.epoch IS DISTINCT FROM
                             (SELECT l.epoch FROM leases AS l WHERE l.name = $2)))
                 RETURNING s.id, s.answer",
                &[&ids, &lease],
            )
            .await
            .map_err(query_error(OPERATION))?;
        Ok(rows
            .iter()
            .map(|row| {
                let answer: Option<String> = row.get(1);
                (
                    row.get(0),
                    answer.map_or(SpoolAnswer::SenderLost, SpoolAnswer::Answered),
                )
            })
            .collect())
    }

    async fn withdraw_spooled(&self, id: i64) -> Result<bool, StoreError> {
        const OPERATION: &str = "withdraw a spooled survey send";
        let connection = self.connection(OPERATION).await?;
        let removed = connection
            .execute(
                "DELETE FROM survey_spool WHERE id = $1 AND epoch IS NULL",
                &[&id],
            )
            .await
            .map_err(query_error(OPERATION))?;
        Ok(removed == 1)
    }

    async fn prune_spooled(&self, account: &str, older_than_ms: i64) -> Result<u64, StoreError> {
        const OPERATION: &str = "prune spooled survey sends";
        let connection = self.connection(OPERATION).await?;
        connection
            .execute(
                "DELETE FROM survey_spool
                 WHERE account = $1 AND epoch IS NOT NULL AND created_ms < $2",
                &[&account, &older_than_ms],
            )
            .await
            .map_err(query_error(OPERATION))
    }

    fn spooled_wakeups(&self) -> watch::Receiver<u64> {
        super::notify::listen(self, SPOOLED_CHANNEL)
    }

    fn answered_wakeups(&self) -> watch::Receiver<u64> {
        super::notify::listen(self, ANSWERED_CHANNEL)
    }
}

#[cfg(test)]
mod tests;
