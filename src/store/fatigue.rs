//! Who the gateway surveyed when: the durable record behind the survey cool-down across
//! campaigns and the event rules' own throttles.
//!
//! One entry per (scope, email): scope `""` is the cool-down across all campaigns, `rule:<id>` a
//! rule's throttle. A send first *reserves* its recipients: "record this send for these emails
//! unless one of them was surveyed since T", checked and written in ONE atomic operation of the
//! engine, so two concurrent sends to one customer cannot both pass (there is no read-then-write
//! window between them). A reservation carries a token (the outbox delivery id, or a fresh one
//! for a synchronous call): the same token passes its own reservation again, so an outbox retry
//! of a send is not throttled by its own first attempt. A send that certainly did not survey the
//! recipient releases its reservation, which puts back the time the entry held before.

use super::StoreError;

/// The checkpoint name ([`super::CursorStore`]) that marks the backfill from Retently's history
/// done; [`FatigueStore::seed`] writes it in the same operation as the last page it seeds.
pub const BACKFILL_CHECKPOINT: &str = "survey_fatigue_backfill";

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

/// A survey Retently sent, for the backfill: the normalised email and when it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Surveyed {
    pub email: String,
    pub sent_ms: i64,
}

/// The survey record. Each method is atomic and durable before it returns `Ok`.
#[async_trait::async_trait]
pub trait FatigueStore: Send + Sync + 'static {
    /// Reserves each request's claims at `now_ms` under `token`, in order, in one atomic
    /// operation: a request is granted only when every claim is free (not surveyed after its
    /// bound, or held by the same token), and then all its claims are recorded with `now_ms`
    /// (keeping the time they held before, for [`FatigueStore::release`]). Requests are
    /// checked and recorded in list order; one answer per request, in order.
    async fn reserve(
        &self,
        token: &str,
        now_ms: i64,
        requests: Vec<ReserveRequest>,
    ) -> Result<Vec<Reservation>, StoreError>;

    /// Undoes `token`'s reservations of `email` in every scope (the send certainly did not
    /// survey them): each entry gets back the time it held before, or goes when it held none.
    async fn release(&self, token: &str, email: &str) -> Result<(), StoreError>;

    /// Whether the one-time backfill from Retently's history is done ([`BACKFILL_CHECKPOINT`]).
    async fn backfilled(&self) -> Result<bool, StoreError>;

    /// Records surveys Retently sent in the cool-down scope, keeping a later time already
    /// recorded; with `done`, marks the backfill finished in the same operation.
    async fn seed(&self, surveyed: Vec<Surveyed>, done: bool) -> Result<(), StoreError>;

    /// When `email` was last recorded as surveyed in `scope`, if ever.
    async fn last_surveyed(&self, scope: &str, email: &str) -> Result<Option<i64>, StoreError>;
}
