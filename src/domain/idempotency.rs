//! Idempotency keys and event message ids: a repeat within the window returns the first call's
//! response and makes no second upstream call.
//!
//! Records live in the store, so a repeat after a restart, or on another replica, is still
//! recognised. A repeat that arrives while the first call is still running waits for it instead
//! of racing it to the upstream, in two steps:
//!
//! - within the process, an in-process gate per key: a repeat on the same replica waits for a
//!   wake-up, touching the store only once the first call ended;
//! - across processes, a claim in the store ([`IdempotencyStore::claim_key`]): the call that holds
//!   the key's claim runs, renewing the claim's lease while it runs ([`CLAIM_LEASE`]); a repeat
//!   on another replica finds the claim held and asks again with a growing pause (up to
//!   [`MAX_CLAIM_POLL`]) until the record is there or the claim is gone. The caller's deadline
//!   bounds the wait (the RPC ends and drops it).
//!
//! A claim whose lease ran out without a record belongs to a call whose replica stopped
//! mid-call; nobody knows whether it reached the upstream. The outbox's in-doubt rule decides:
//! a replay-safe write is run again by the repeat that finds it; any other repeat within the
//! window is answered `ABORTED` with reason `DELIVERY_IN_DOUBT`, never run again blindly (a new
//! idempotency key sends it again deliberately).
//!
//! Only calls that reached an upstream or the outbox are remembered; a call rejected before that
//! (bad input), a call that failed and one whose caller went away release the claim, and a
//! repeat runs anew, as within one process.
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
use crate::store::idempotency::{ClaimOutcome, ClaimTerms, KeyClaim};
use crate::store::{IdempotencyRecord, IdempotencyStore, Store};

/// How long a key's claim holds without a renewal. The running call renews it every third of
/// this, so a repeat on another replica waits about this long after the claim's replica died
/// before it learns the call is in doubt; short enough for a caller's retry, long enough to
/// outlast two missed renewals on a busy database.
pub const CLAIM_LEASE: Duration = Duration::from_secs(15);

/// The first pause of a repeat waiting for another replica's call; doubled after each look.
const FIRST_CLAIM_POLL: Duration = Duration::from_millis(20);

/// The longest pause between two looks at a claim another replica holds: an upstream call takes
/// about a second, so a waiter learns of its end within about one more.
pub const MAX_CLAIM_POLL: Duration = Duration::from_secs(1);

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

/// The answer to a repeat whose first call died mid-call on another replica.
fn interrupted() -> Error {
    Error::new(
        ErrorCode::Aborted,
        Reason::DeliveryInDoubt,
        "an earlier call with this idempotency key stopped mid-call with its replica and may \
         have reached the upstream, so it is not run again; send it with a new key to run it",
    )
}

/// The end of a claim's lease taken or renewed now.
fn lease_until_ms() -> i64 {
    now_ms().saturating_add(i64::try_from(CLAIM_LEASE.as_millis()).unwrap_or(i64::MAX))
}

/// A key's claim while its call runs: renews the lease every third of [`CLAIM_LEASE`], and
/// gives the claim up when the call ends ([`HeldClaim::release`]) or is dropped mid-call (the
/// caller went away), so a repeat runs anew as it would within one process.
struct HeldClaim {
    store: Arc<dyn IdempotencyStore>,
    claim: Option<KeyClaim>,
    renewal: tokio::task::JoinHandle<()>,
}

impl HeldClaim {
    fn hold(store: Arc<dyn IdempotencyStore>, claim: KeyClaim) -> HeldClaim {
        let renewal = tokio::spawn({
            let store = Arc::clone(&store);
            let claim = claim.clone();
            async move {
                let every = CLAIM_LEASE / 3;
                let mut ticker =
                    tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    match store.renew_key_claim(&claim, lease_until_ms()).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(
                                scope = %claim.scope,
                                "an idempotency claim lapsed while its call ran"
                            );
                            return;
                        }
                        // Retried at the next tick; two misses still leave a third of the lease.
                        Err(error) => {
                            tracing::warn!(%error, scope = %claim.scope, "cannot renew an idempotency claim");
                        }
                    }
                }
            }
        });
        HeldClaim {
            store,
            claim: Some(claim),
            renewal,
        }
    }

    /// Gives the claim up now. A failure leaves it to lapse; a repeat then treats the call as
    /// interrupted, which is the safe side.
    async fn release(mut self) {
        self.renewal.abort();
        if let Some(claim) = self.claim.take()
            && let Err(error) = self.store.release_key_claim(&claim).await
        {
            tracing::warn!(%error, scope = %claim.scope, "cannot release an idempotency claim");
        }
    }
}

impl Drop for HeldClaim {
    fn drop(&mut self) {
        self.renewal.abort();
        if let Some(claim) = self.claim.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let store = Arc::clone(&self.store);
            runtime.spawn(async move {
                if let Err(error) = store.release_key_claim(&claim).await {
                    tracing::warn!(%error, scope = %claim.scope, "cannot release an idempotency claim");
                }
            });
        }
    }
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
    /// (or waits for the running first call, on this replica or another, and returns its),
    /// marked as a repeat. `replay_safe` tells whether running the call again is harmless when
    /// the call that held the key died mid-call (see the module doc).
    pub async fn run<F>(
        &self,
        owner: &Owner,
        scope: &str,
        key: &str,
        hash: Vec<u8>,
        replay_safe: bool,
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
        // and opened the gate; the claim reads the record again under the gate, which keeps it
        // from running twice, and serialises the call with its repeats on other replicas.
        let claim = KeyClaim {
            owner: owner.stored().to_owned(),
            scope: scope.to_owned(),
            key: key.to_owned(),
            holder: format!("call-{:032x}", rand::random::<u128>()),
        };
        if let Some(stored) = self.claim_key(&claim, replay_safe).await? {
            return if stored.request_hash == hash {
                Ok(Remembered {
                    response: stored.response,
                    repeated: true,
                })
            } else {
                Err(reused())
            };
        }
        let held = HeldClaim::hold(Arc::clone(&self.store), claim);
        let fresh = first.await;
        let fresh = match fresh {
            Ok(fresh) => fresh,
            Err(error) => {
                held.release().await;
                return Err(error);
            }
        };
        if fresh.remember {
            let recorded = self
                .store
                .record(Self::record_job(
                    owner,
                    scope,
                    key,
                    hash,
                    fresh.response.clone(),
                ))
                .await;
            if let Err(error) = recorded {
                held.release().await;
                return Err(error.into());
            }
        }
        held.release().await;
        Ok(Remembered {
            response: fresh.response,
            repeated: false,
        })
    }

    /// Claims `claim`'s key in the store, waiting while another replica's call holds it.
    /// `Some(record)` when the key has a record by then (the call is a repeat), `None` once
    /// this call holds the key.
    async fn claim_key(
        &self,
        claim: &KeyClaim,
        replay_safe: bool,
    ) -> Result<Option<crate::store::idempotency::StoredResponse>, Error> {
        let mut pause = FIRST_CLAIM_POLL;
        let mut waited = false;
        loop {
            let terms = ClaimTerms {
                lease_until_ms: lease_until_ms(),
                created_since_ms: self.oldest_ms(),
                take_over_lapsed: replay_safe,
            };
            match self.store.claim_key(claim, terms).await? {
                ClaimOutcome::Recorded(stored) => return Ok(Some(stored)),
                ClaimOutcome::Claimed => return Ok(None),
                ClaimOutcome::Running => {
                    if !waited {
                        waited = true;
                        tracing::debug!(
                            scope = %claim.scope,
                            "waiting for the call that holds this idempotency key on another replica"
                        );
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_CLAIM_POLL);
                }
                ClaimOutcome::Abandoned => return Err(interrupted()),
            }
        }
    }

    /// Forgets records (and claims) older than the window.
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
