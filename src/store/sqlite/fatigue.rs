//! The survey record in SQLite: table `survey_fatigue`. A reservation is one job of the single
//! writer, so its checks and writes share one transaction.

use rusqlite::OptionalExtension as _;

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::cursors::Checkpoint;
use crate::store::fatigue::{
    BACKFILL_CHECKPOINT, FatigueStore, Reservation, ReserveRequest, Surveyed,
};

/// `(name, sql)` for the schema's list. `token` names the reservation that wrote
/// `surveyed_ms`; `previous_ms` is the time the entry held before it, put back on release.
pub const MIGRATION: (&str, &str) = (
    "0016_survey_fatigue",
    "CREATE TABLE survey_fatigue (
        scope TEXT NOT NULL,
        email TEXT NOT NULL,
        surveyed_ms INTEGER NOT NULL,
        token TEXT,
        previous_ms INTEGER,
        PRIMARY KEY (scope, email)
    ) STRICT;",
);

#[async_trait::async_trait]
impl FatigueStore for SqliteStore {
    async fn reserve(
        &self,
        token: &str,
        now_ms: i64,
        requests: Vec<ReserveRequest>,
    ) -> Result<Vec<Reservation>, StoreError> {
        let token = token.to_owned();
        self.write(move |tx| {
            let mut answers = Vec::with_capacity(requests.len());
            for request in requests {
                let mut blocked = None;
                for claim in &request.claims {
                    let held: Option<(i64, Option<String>)> = tx
                        .query_row(
                            "SELECT surveyed_ms, token FROM survey_fatigue
                             WHERE scope = ?1 AND email = ?2",
                            (&claim.scope, &request.email),
                            |row| Ok((row.get(0)?, row.get(1)?)),
                        )
                        .optional()?;
                    if let Some((surveyed_ms, holder)) = held
                        && surveyed_ms > claim.not_since_ms
                        && holder.as_deref() != Some(token.as_str())
                    {
                        blocked = Some(Reservation::Blocked {
                            scope: claim.scope.clone(),
                            surveyed_ms,
                        });
                        break;
                    }
                }
                if let Some(blocked) = blocked {
                    answers.push(blocked);
                    continue;
                }
                for claim in &request.claims {
                    tx.execute(
                        "INSERT INTO survey_fatigue (scope, email, surveyed_ms, token)
                         VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (scope, email) DO UPDATE SET
                           previous_ms = CASE WHEN survey_fatigue.token IS excluded.token
                             THEN survey_fatigue.previous_ms
                             ELSE survey_fatigue.surveyed_ms END,
                           surveyed_ms = excluded.surveyed_ms,
                           token = excluded.token",
                        (&claim.scope, &request.email, now_ms, &token),
                    )?;
                }
                answers.push(Reservation::Granted);
            }
            Ok(answers)
        })
        .await
    }

    async fn release(&self, token: &str, email: &str) -> Result<(), StoreError> {
        let (token, email) = (token.to_owned(), email.to_owned());
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM survey_fatigue
                 WHERE email = ?1 AND token = ?2 AND previous_ms IS NULL",
                (&email, &token),
            )?;
            tx.execute(
                "UPDATE survey_fatigue
                 SET surveyed_ms = previous_ms, previous_ms = NULL, token = NULL
                 WHERE email = ?1 AND token = ?2",
                (&email, &token),
            )?;
            Ok(())
        })
        .await
    }

    async fn backfilled(&self) -> Result<bool, StoreError> {
        self.read(|connection| {
            connection.query_row(
                "SELECT EXISTS (SELECT 1 FROM sync_cursors WHERE name = ?1)",
                [BACKFILL_CHECKPOINT],
                |row| row.get(0),
            )
        })
        .await
    }

    async fn seed(&self, surveyed: Vec<Surveyed>, done: bool) -> Result<(), StoreError> {
        self.write(move |tx| {
            for survey in &surveyed {
                tx.execute(
                    "INSERT INTO survey_fatigue (scope, email, surveyed_ms) VALUES ('', ?1, ?2)
                     ON CONFLICT (scope, email) DO UPDATE SET
                       surveyed_ms = MAX(survey_fatigue.surveyed_ms, excluded.surveyed_ms)",
                    (&survey.email, survey.sent_ms),
                )?;
            }
            if done {
                super::cursors::put(
                    tx,
                    &Checkpoint {
                        name: BACKFILL_CHECKPOINT.to_owned(),
                        value: chrono::Utc::now().to_rfc3339(),
                    },
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn last_surveyed(&self, scope: &str, email: &str) -> Result<Option<i64>, StoreError> {
        let (scope, email) = (scope.to_owned(), email.to_owned());
        self.read(move |connection| {
            connection
                .query_row(
                    "SELECT surveyed_ms FROM survey_fatigue WHERE scope = ?1 AND email = ?2",
                    (&scope, &email),
                    |row| row.get(0),
                )
                .optional()
        })
        .await
    }
}
