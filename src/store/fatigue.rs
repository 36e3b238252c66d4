//! Who the gateway surveyed when: the durable record behind the survey cool-down across
//! campaigns and the event rules' own throttles.
//!
//! One row per (scope, email): scope `""` is the cool-down across all campaigns, `rule:<id>` a
//! rule's throttle. A send first *reserves* its recipients: "record this send for these emails
//! unless one of them was surveyed since T", checked and written in one transaction of the
//! store's single writer, so two concurrent sends to one customer cannot both pass (there is
//! no read-then-write window between them). A reservation carries a token (the outbox delivery
//! id, or a fresh one for a synchronous call): the same token passes its own reservation again,
//! so an outbox retry of a send is not throttled by its own first attempt. A send that
//! certainly did not survey the recipient releases its reservation, which puts back the time
//! the row held before.

use rusqlite::OptionalExtension as _;

use crate::error::Error;
use crate::store::Store;

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

/// The `sync_cursors` row that marks the backfill from Retently's history done.
const BACKFILL_CURSOR: &str = "survey_fatigue_backfill";

/// One scope a recipient must be free in: not surveyed after `not_since_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub scope: String,
    pub not_since_ms: i64,
}

/// One recipient's reservation: all of `claims` or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    /// Normalised (trimmed, lowercase).
    pub email: String,
    pub claims: Vec<Claim>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Recorded as surveyed now under the token.
    Granted,
    /// Surveyed at `surveyed_ms` in `scope`, after the claim's bound; nothing was recorded.
    Blocked { scope: String, surveyed_ms: i64 },
}

/// The survey record; cheap to clone.
#[derive(Debug, Clone)]
pub struct FatigueStore {
    store: Store,
}

impl FatigueStore {
    pub fn new(store: Store) -> FatigueStore {
        FatigueStore { store }
    }

    /// Reserves each request's claims at `now_ms` under `token`, in order, in one transaction:
    /// a request is granted only when every claim is free (or held by the same token), and then
    /// all its claims are recorded. Requests earlier in the list are seen by later ones (the
    /// same email twice is granted once, unless the token matches).
    pub async fn reserve(
        &self,
        token: String,
        now_ms: i64,
        requests: Vec<ReserveRequest>,
    ) -> Result<Vec<Reservation>, Error> {
        self.store
            .write(move |tx| {
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

    /// Undoes `token`'s reservations of `email` in every scope (the send certainly did not
    /// survey them): each row gets back the time it held before, or goes when it held none.
    pub async fn release(&self, token: String, email: String) -> Result<(), Error> {
        self.store
            .write(move |tx| {
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

    /// Whether the one-time backfill from Retently's history is done.
    pub async fn backfilled(&self) -> Result<bool, Error> {
        self.store
            .read(|connection| {
                connection.query_row(
                    "SELECT EXISTS (SELECT 1 FROM sync_cursors WHERE name = ?1)",
                    [BACKFILL_CURSOR],
                    |row| row.get(0),
                )
            })
            .await
    }

    /// Records surveys Retently sent (`(email, sent_ms)`, emails normalised) in the cool-down
    /// scope, keeping a later time already recorded; with `done`, marks the backfill finished in
    /// the same transaction.
    pub async fn seed(&self, surveyed: Vec<(String, i64)>, done: bool) -> Result<(), Error> {
        self.store
            .write(move |tx| {
                for (email, sent_ms) in &surveyed {
                    tx.execute(
                        "INSERT INTO survey_fatigue (scope, email, surveyed_ms) VALUES ('', ?1, ?2)
                         ON CONFLICT (scope, email) DO UPDATE SET
                           surveyed_ms = MAX(survey_fatigue.surveyed_ms, excluded.surveyed_ms)",
                        (email, sent_ms),
                    )?;
                }
                if done {
                    tx.execute(
                        "INSERT OR REPLACE INTO sync_cursors (name, value) VALUES (?1, ?2)",
                        (BACKFILL_CURSOR, chrono::Utc::now().to_rfc3339()),
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// When `email` was last recorded as surveyed in `scope`, if ever.
    pub async fn last_surveyed(&self, scope: String, email: String) -> Result<Option<i64>, Error> {
        self.store
            .read(move |connection| {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(email: &str, scopes: &[(&str, i64)]) -> ReserveRequest {
        ReserveRequest {
            email: email.to_owned(),
            claims: scopes
                .iter()
                .map(|(scope, since)| Claim {
                    scope: (*scope).to_owned(),
                    not_since_ms: *since,
                })
                .collect(),
        }
    }

    async fn open() -> (tempfile::TempDir, FatigueStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, FatigueStore::new(store))
    }

    #[tokio::test]
    async fn a_second_reservation_inside_the_window_is_blocked_until_released() {
        let (_dir, fatigue) = open().await;
        let first = fatigue
            .reserve("a".into(), 1_000, vec![request("ann@x.io", &[("", 0)])])
            .await
            .unwrap();
        assert_eq!(first, vec![Reservation::Granted]);
        let second = fatigue
            .reserve("b".into(), 2_000, vec![request("ann@x.io", &[("", 500)])])
            .await
            .unwrap();
        assert_eq!(
            second,
            vec![Reservation::Blocked {
                scope: String::new(),
                surveyed_ms: 1_000
            }]
        );
        // The same token passes its own reservation (an outbox retry).
        let again = fatigue
            .reserve("a".into(), 3_000, vec![request("ann@x.io", &[("", 2_500)])])
            .await
            .unwrap();
        assert_eq!(again, vec![Reservation::Granted]);
        fatigue
            .release("a".into(), "ann@x.io".into())
            .await
            .unwrap();
        assert_eq!(
            fatigue
                .last_surveyed(String::new(), "ann@x.io".into())
                .await
                .unwrap(),
            None
        );
        let third = fatigue
            .reserve("b".into(), 4_000, vec![request("ann@x.io", &[("", 3_500)])])
            .await
            .unwrap();
        assert_eq!(third, vec![Reservation::Granted]);
    }

    #[tokio::test]
    async fn a_release_puts_back_the_earlier_survey_time() {
        let (_dir, fatigue) = open().await;
        fatigue
            .reserve("old".into(), 1_000, vec![request("bo@x.io", &[("", 0)])])
            .await
            .unwrap();
        // Outside a 500 ms window: granted over the old record.
        fatigue
            .reserve(
                "new".into(),
                5_000,
                vec![request("bo@x.io", &[("", 4_500)])],
            )
            .await
            .unwrap();
        fatigue
            .release("new".into(), "bo@x.io".into())
            .await
            .unwrap();
        assert_eq!(
            fatigue
                .last_surveyed(String::new(), "bo@x.io".into())
                .await
                .unwrap(),
            Some(1_000)
        );
    }

    #[tokio::test]
    async fn a_recipient_blocked_in_one_scope_reserves_none() {
        let (_dir, fatigue) = open().await;
        fatigue
            .reserve(
                "a".into(),
                1_000,
                vec![request("cy@x.io", &[("rule:r1", 0)])],
            )
            .await
            .unwrap();
        let answer = fatigue
            .reserve(
                "b".into(),
                2_000,
                vec![request("cy@x.io", &[("", 0), ("rule:r1", 0)])],
            )
            .await
            .unwrap();
        assert_eq!(
            answer,
            vec![Reservation::Blocked {
                scope: "rule:r1".into(),
                surveyed_ms: 1_000
            }]
        );
        // The global scope was not taken by the blocked request.
        assert_eq!(
            fatigue
                .last_surveyed(String::new(), "cy@x.io".into())
                .await
                .unwrap(),
            None
        );
    }
}
