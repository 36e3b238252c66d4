//! Domain logic in plain Rust: nothing here knows protobuf or HTTP.
//!
//! - [`outbox`]: the durable queue of asynchronous writes and its delivery worker.
//! - [`idempotency`]: remembered responses for idempotency keys and event message ids.
//! - [`fatigue`]: the survey cool-down across campaigns and the event rules' throttles.
//! - [`writes`]: the write path every write RPC takes after validation, its table of write
//!   RPCs, and the execution of customers, surveys and events.

pub mod fatigue;
pub mod idempotency;
pub mod outbox;
pub mod writes;

use std::sync::Arc;

/// Whose idempotency records and deliveries a call makes and sees, the way payment APIs scope
/// idempotency keys per account: two callers that happen to pick the same key or message id
/// never meet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// No callers are configured (trusted mesh, `serve --sandbox`): the gateway cannot tell
    /// callers apart, so all calls share one scope.
    Anonymous,
    /// A caller of the callers file, by its name.
    Caller(Arc<str>),
    /// The gateway itself (alert deliveries): seen only by callers who see every delivery.
    Gateway,
}

impl Owner {
    /// The value stored in the `owner` columns. Caller names are never empty and never hold a
    /// `:` (the callers file refuses both), so neither the empty string nor `:gateway` can
    /// collide with a caller.
    pub fn stored(&self) -> &str {
        match self {
            Owner::Anonymous => "",
            Owner::Caller(name) => name,
            Owner::Gateway => ":gateway",
        }
    }

    /// The owner a stored `owner` column names (the inverse of [`Owner::stored`]). A delivery
    /// stored without one was queued before deliveries had owners, when every call shared one
    /// scope: it reads as anonymous.
    pub fn from_stored(stored: Option<&str>) -> Owner {
        match stored {
            None | Some("") => Owner::Anonymous,
            Some(":gateway") => Owner::Gateway,
            Some(name) => Owner::Caller(Arc::from(name)),
        }
    }
}

/// Which deliveries a call may see and requeue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    /// Every delivery: an admin caller, or no callers configured.
    All,
    /// The deliveries this owner made, plus those queued before deliveries had owners.
    Own(Owner),
}

impl Visibility {
    /// The owner to filter by, `None` for every delivery ([`crate::store::outbox::OwnerFilter`]).
    pub(crate) fn owner_filter(&self) -> Option<String> {
        match self {
            Visibility::All => None,
            Visibility::Own(owner) => Some(owner.stored().to_owned()),
        }
    }
}

#[cfg(test)]
mod store_fault_tests;
#[cfg(test)]
mod tests;
