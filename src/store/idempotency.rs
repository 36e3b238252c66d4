//! Idempotency records as stored: the remembered response of a call per `(owner, scope, key)`,
//! and the claims that let one call of a key run while its repeats (on any replica) wait. The
//! window, the lease and what a repeat does while it waits are the domain's
//! ([`crate::domain::idempotency`]).

use super::StoreError;

/// One remembered call. Created now (the engine's clock) when stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// As [`crate::domain::Owner::stored`] spells it.
    pub owner: String,
    /// The RPC (or event kind) the key belongs to.
    pub scope: String,
    pub key: String,
    /// The SHA-256 of the request, to tell a true repeat from a reused key.
    pub request_hash: Vec<u8>,
    pub response: Vec<u8>,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub request_hash: Vec<u8>,
    pub response: Vec<u8>,
}

/// Remembered responses. Each method is atomic and durable before it returns `Ok`.
#[async_trait::async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// The record of `(owner, scope, key)` created at or after `created_since_ms`; when none, a
    /// record of `(scope, key)` stored without an owner (written before records had owners).
    async fn lookup(
        &self,
        owner: &str,
        scope: &str,
        key: &str,
        created_since_ms: i64,
    ) -> Result<Option<StoredResponse>, StoreError>;

    /// Stores `record`, replacing the owner's earlier record of the same scope and key.
    /// (To store one together with a delivery, see [`super::OutboxStore::enqueue`].)
    async fn record(&self, record: IdempotencyRecord) -> Result<(), StoreError>;

    /// Deletes records created before `created_before_ms`, and claims made before it (past
    /// the window whatever their lease); returns how many records.
    async fn prune(&self, created_before_ms: i64) -> Result<usize, StoreError>;

    // Claims serialise the calls of one key across every process sharing the engine: the call
    // holding a key's claim runs, the others wait for its record.

    /// Claims `claim`'s key unless the key has a record within the window (checked after the
    /// claim is attempted, so a record committed by a racing holder that just finished is
    /// seen) or another call holds it. A claim by the same holder is renewed. An outcome other
    /// than [`ClaimOutcome::Claimed`] leaves no claim of `claim.holder` behind.
    async fn claim_key(
        &self,
        claim: &KeyClaim,
        terms: ClaimTerms,
    ) -> Result<ClaimOutcome, StoreError>;

    /// Extends the lease of a claim `claim.holder` holds; false when it holds none (the claim
    /// lapsed and was taken over, or was released).
    async fn renew_key_claim(
        &self,
        claim: &KeyClaim,
        lease_until_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Gives up a claim `claim.holder` holds (the call ended, with or without a record); a
    /// claim held by another holder is left alone.
    async fn release_key_claim(&self, claim: &KeyClaim) -> Result<(), StoreError>;
}

/// One key's claim: the call that holds it runs; calls that find it held wait for its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClaim {
    /// As [`crate::domain::Owner::stored`] spells it.
    pub owner: String,
    pub scope: String,
    pub key: String,
    /// Names the one call that holds the claim (unique per call, across replicas).
    pub holder: String,
}

/// What [`IdempotencyStore::claim_key`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key's record, created within the window: the call is a repeat, nothing to run.
    Recorded(StoredResponse),
    /// The caller holds the key now and runs the call.
    Claimed,
    /// Another call holds the key under a live lease: wait for its record.
    Running,
    /// Another call held the key and its lease ran out without a record (its replica stopped
    /// mid-call); not taken over because the caller did not ask to.
    Abandoned,
}

/// What a claim attempt asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimTerms {
    /// Until when the claim holds without a renewal (UNIX ms).
    pub lease_until_ms: i64,
    /// Records and claims created before this instant are past the window: a record is not
    /// answered with, a claim no longer holds the key.
    pub created_since_ms: i64,
    /// Whether a claim whose lease ran out is taken over ([`ClaimOutcome::Claimed`]) rather
    /// than reported ([`ClaimOutcome::Abandoned`]).
    pub take_over_lapsed: bool,
}
