//! Idempotency keys and event message ids: a repeat within the window returns the first call's
//! response and makes no second upstream call.
//!
//! Records live in the store, so a repeat after a restart is still recognised. A repeat that
//! arrives while the first call is still running waits for it (an in-process gate per key)
//! instead of racing it to the upstream. Only calls that reached an upstream or the outbox are
//! remembered; a call rejected before that (bad input) runs anew when repeated.
//!
//! Records belong to the [`Owner`] that made them: another caller using the same key is a
//! fresh call. Records written before owners existed (migration `0012_caller_scope`) have none
//! and match every caller until they age out of the window, so a retry across the upgrade is
//! still recognised instead of writing twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::backoff::{FailureStreak, failed_warn};
use crate::domain::Owner;
use crate::error::{Error, ErrorCode, Reason};
use crate::shutdown::{Drain, Rounds};
use crate::store::{IdempotencyRecord, IdempotencyStore, Store};

/// The SHA-256 of a request's encoding (without its options), to tell a true repeat from a
/// reused key.
pub fn request_hash(encoded: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, encoded)
        .as_ref()
        .to_vec()
}

/// Calls in progress per `(owner, scope, key)`, each with the gate its repeats wait on.
type RunningCalls = Arc<Mutex<HashMap<GateKey, Arc<Notify>>>>;
type GateKey = (Owner, String, String);

/// Removes a key from the running set and wakes whoever waits on it.
struct Gate {
    running: RunningCalls,
    key: GateKey,
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock()
            && let Some(notify) = running.remove(&self.key)
        {
            notify.notify_waiters();
        }
    }
}

/// A response, and whether it is the remembered one of an earlier call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub response: Vec<u8>,
    pub repeated: bool,
}

/// What a first call produced.
pub struct Fresh {
    pub response: Vec<u8>,
    /// False when nothing reached an upstream or the outbox, so a repeat should run anew.
    pub remember: bool,
}

#[derive(Clone)]
pub struct Idempotency {
    store: Arc<dyn IdempotencyStore>,
    window: Duration,
    running: RunningCalls,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn reused() -> Error {
    Error::new(
        ErrorCode::FailedPrecondition,
        Reason::IdempotencyKeyReused,
        "this idempotency key was already used for a different request",
    )
}

impl Idempotency {
    pub fn new(store: Store, window: Duration) -> Idempotency {
        Idempotency {
            store: Arc::clone(store.idempotency()),
            window,
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// The remembered response for `(owner, scope, key)`, if any within the window; an error if
    /// the key was used for a different request. The owner's own record wins over one written
    /// before records had owners.
    pub async fn lookup(
        &self,
        owner: &Owner,
        scope: &str,
        key: &str,
        hash: &[u8],
    ) -> Result<Option<Vec<u8>>, Error> {
        let found = self
            .store
            .lookup(owner.stored(), scope, key, self.oldest_ms())
            .await?;
        match found {
            None => Ok(None),
            Some(stored) if stored.request_hash == hash => Ok(Some(stored.response)),
            Some(_) => Err(reused()),
        }
    }

    /// The record of a call, for callers that commit it together with other writes (the
    /// outbox enqueue of an ASYNC call).
    pub fn record_job(
        owner: &Owner,
        scope: &str,
        key: &str,
        hash: Vec<u8>,
        response: Vec<u8>,
    ) -> IdempotencyRecord {
        IdempotencyRecord {
            owner: owner.stored().to_owned(),
            scope: scope.to_owned(),
            key: key.to_owned(),
            request_hash: hash,
            response,
        }
    }

    /// Records created before this instant are past the window.
    fn oldest_ms(&self) -> i64 {
        now_ms().saturating_sub(i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX))
    }

    /// Runs `first` unless `(owner, scope, key)` was seen: then returns the remembered response
    /// (or waits for the running first call and returns its), marked as a repeat.
    pub async fn run<F>(
        &self,
        owner: &Owner,
        scope: &str,
        key: &str,
        hash: Vec<u8>,
        first: F,
    ) -> Result<Remembered, Error>
    where
        F: Future<Output = Result<Fresh, Error>>,
    {
        let gate_key = (owner.clone(), scope.to_owned(), key.to_owned());
        loop {
            if let Some(response) = self.lookup(owner, scope, key, &hash).await? {
                return Ok(Remembered {
                    response,
                    repeated: true,
                });
            }
            let waiting = {
                let Ok(mut running) = self.running.lock() else {
                    return Err(Error::internal("the idempotency gate is poisoned"));
                };
                match running.get(&gate_key) {
                    Some(notify) => Some(Arc::clone(notify)),
                    None => {
                        running.insert(gate_key.clone(), Arc::new(Notify::new()));
                        None
                    }
                }
            };
            match waiting {
                Some(notify) => {
                    let notified = notify.notified();
                    // Re-check after registering, so a finish between lookup and here is not missed.
                    let still_running = self
                        .running
                        .lock()
                        .map(|running| running.contains_key(&gate_key))
                        .unwrap_or(false);
                    if still_running {
                        notified.await;
                    }
                }
                None => break,
            }
        }

        // Opens the gate however this call ends, including when the caller goes away mid-call.
        let _gate = Gate {
            running: Arc::clone(&self.running),
            key: gate_key,
        };
        // A call that finished between the lookup above and claiming the gate left its record
        // and opened the gate; looking again under the gate keeps it from running twice.
        if let Some(response) = self.lookup(owner, scope, key, &hash).await? {
            return Ok(Remembered {
                response,
                repeated: true,
            });
        }
        let fresh = first.await?;
        if fresh.remember {
            self.store
                .record(Self::record_job(
                    owner,
                    scope,
                    key,
                    hash,
                    fresh.response.clone(),
                ))
                .await?;
        }
        Ok(Remembered {
            response: fresh.response,
            repeated: false,
        })
    }

    /// Forgets records older than the window.
    pub async fn prune(&self) -> Result<usize, Error> {
        Ok(self.store.prune(self.oldest_ms()).await?)
    }

    /// Forgets records older than the window every `every` until draining starts, so the table
    /// holds one window of calls rather than every call ever made. A failed round (a full store
    /// cannot even log a delete) waits for the next one; its warning is rate-limited.
    pub async fn run_purge(self, every: Duration, drain: Drain) {
        let mut rounds = Rounds::every(every, drain);
        let mut failures = FailureStreak::for_store();
        while rounds.next().await {
            match self.prune().await {
                Ok(purged) => {
                    failures.succeeded();
                    if purged > 0 {
                        tracing::debug!(purged, "forgot expired idempotency records");
                    }
                }
                Err(error) => {
                    failed_warn!(
                        failures,
                        error,
                        "cannot purge expired idempotency records, retrying at the next round"
                    );
                }
            }
        }
    }
}
