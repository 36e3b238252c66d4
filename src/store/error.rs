//! The store's own error: what went wrong, typed, so callers decide on the kind and never on an
//! engine's message.

/// What kind of failure a store operation met. Every engine maps its own errors onto these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreErrorKind {
    /// The engine could not be reached or did not answer (I/O, a lost connection, a stopped
    /// writer, a busy database past its timeout); the same operation may succeed later.
    Unavailable,
    /// The engine refused the write for lack of space (a full disk, a quota).
    Full,
    /// The data read back is damaged or not what the schema promises.
    Corrupt,
    /// The operation collided with stored data (a unique key, a concurrent writer) and was not
    /// applied.
    Conflict,
}

impl StoreErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreErrorKind::Unavailable => "unavailable",
            StoreErrorKind::Full => "full",
            StoreErrorKind::Corrupt => "corrupt",
            StoreErrorKind::Conflict => "conflict",
        }
    }
}

/// A failed store operation: its kind and the engine's description (never a secret: engines
/// describe the failure, not the connection string or the data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> StoreError {
        StoreError {
            kind,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> StoreError {
        StoreError::new(StoreErrorKind::Unavailable, message)
    }

    pub fn corrupt(message: impl Into<String>) -> StoreError {
        StoreError::new(StoreErrorKind::Corrupt, message)
    }

    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Callers of the gateway see every store failure as `UNAVAILABLE` with reason
/// `STORE_UNAVAILABLE`: whatever its kind, the call may succeed once the operator fixed the store.
impl From<StoreError> for crate::error::Error {
    fn from(error: StoreError) -> Self {
        crate::error::Error::new(
            crate::error::ErrorCode::Unavailable,
            crate::error::Reason::StoreUnavailable,
            format!("the durable store failed: {}", error.message),
        )
    }
}
