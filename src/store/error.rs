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

impl StoreErrorKind {
    /// How long a caller is asked to wait (`RetryInfo`) before trying a call that met this
    /// failure again: about one health probe for a store that was out of reach or a collision
    /// (by then the replica knows whether the store is back, and the load balancer may have
    /// moved the caller), longer for what waits for an operator (room on the volume, a repair).
    pub fn retry_after(self) -> std::time::Duration {
        match self {
            StoreErrorKind::Unavailable | StoreErrorKind::Conflict => {
                std::time::Duration::from_secs(1)
            }
            StoreErrorKind::Full | StoreErrorKind::Corrupt => std::time::Duration::from_secs(30),
        }
    }
}

/// Callers of the gateway see every store failure as `UNAVAILABLE` with reason
/// `STORE_UNAVAILABLE` and a `RetryInfo`: whatever its kind, nothing was acknowledged, and the
/// call may succeed once the store answers again or the operator fixed it.
impl From<StoreError> for crate::error::Error {
    fn from(error: StoreError) -> Self {
        crate::error::Error::new(
            crate::error::ErrorCode::Unavailable,
            crate::error::Reason::StoreUnavailable,
            format!("the durable store failed: {}", error.message),
        )
        .with_retry_after(error.kind.retry_after())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorCode, Reason};

    #[test]
    fn every_store_failure_is_unavailable_with_a_retry_delay() {
        for (kind, delay) in [
            (StoreErrorKind::Unavailable, 1),
            (StoreErrorKind::Conflict, 1),
            (StoreErrorKind::Full, 30),
            (StoreErrorKind::Corrupt, 30),
        ] {
            let error = Error::from(StoreError::new(kind, "postgres: commit failed"));
            assert_eq!(error.code(), ErrorCode::Unavailable);
            assert_eq!(error.reason(), Reason::StoreUnavailable);
            assert_eq!(
                error.retry_after(),
                Some(std::time::Duration::from_secs(delay))
            );
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), tonic::Code::Unavailable);
            let details = tonic_types::StatusExt::get_error_details(&status);
            assert_eq!(
                details.retry_info().and_then(|info| info.retry_delay),
                Some(std::time::Duration::from_secs(delay)),
                "{kind:?}"
            );
        }
    }
}
