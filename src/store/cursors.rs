//! Named positions of background pollers (checkpoints), stored as text.

use super::StoreError;

/// A named sync position. Written together with the log entries it vouches for (see
/// [`super::FeedbackLogStore::append`]) or on its own ([`CursorStore::put`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub name: String,
    pub value: String,
}

/// Checkpoints by name. Each method is atomic and durable before it returns `Ok`.
#[async_trait::async_trait]
pub trait CursorStore: Send + Sync + 'static {
    /// The value last stored under `name`.
    async fn get(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Stores `checkpoint`, replacing the value under its name.
    async fn put(&self, checkpoint: Checkpoint) -> Result<(), StoreError>;
}
