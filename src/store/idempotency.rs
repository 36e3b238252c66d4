//! Idempotency records as stored: the remembered response of a call per `(owner, scope, key)`.
//! The window and the gate that serialises repeats are the domain's
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

    /// Deletes records created before `created_before_ms`; returns how many.
    async fn prune(&self, created_before_ms: i64) -> Result<usize, StoreError>;
}
