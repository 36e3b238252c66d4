//! What every write RPC's adapter does: validate the request, then hand it to the one write
//! path ([`writes::run`]), which converts it to its command and runs its execution function.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::domain::writes::values::Destination;
use crate::domain::writes::{self, DeliveryFacts, DeliveryMode, WriteRpc};
use crate::error::{Error, Violations};
use crate::pb;

/// A valid write: how to deliver it and what the outbox records about it.
pub struct ValidWrite {
    pub mode: pb::DeliveryMode,
    pub key: Option<String>,
    pub facts: DeliveryFacts,
}

impl ValidWrite {
    /// The outcome of a write's validation: every violation recorded in `v`, or the write of
    /// `item_count` items to `destinations` in the mode and under the key its options gave.
    pub fn checked(
        v: Violations,
        (mode, key): (pb::DeliveryMode, Option<String>),
        destinations: Vec<Destination>,
        item_count: usize,
        ordering_keys: Vec<String>,
    ) -> Result<Self, Error> {
        v.into_result()?;
        Ok(Self {
            mode,
            key,
            facts: DeliveryFacts {
                destinations,
                item_count,
                ordering_keys,
            },
        })
    }
}

/// Serves a write RPC: the caller's context and owner, `validate`, then the write path (whose
/// execution function the outbox worker replays for ASYNC calls).
pub async fn serve<R: WriteRpc>(
    app: &Arc<App>,
    request: Request<R>,
    validate: impl FnOnce(&R) -> Result<ValidWrite, Error>,
) -> Result<Response<R::Response>, Status> {
    let ctx = crate::auth::interactive_context(&request);
    let owner = crate::auth::owner_of(&request);
    let request = request.into_inner();
    let write = validate(&request)?;
    let written = writes::run(
        app,
        owner,
        request,
        write.mode.into(),
        write.key,
        write.facts,
        ctx,
    )
    .await?;
    Ok(Response::new(written.response))
}

impl From<pb::DeliveryMode> for DeliveryMode {
    /// ASYNC queues; SYNC and unset run now.
    fn from(mode: pb::DeliveryMode) -> Self {
        match mode {
            pb::DeliveryMode::Async => DeliveryMode::Async,
            pb::DeliveryMode::Sync | pb::DeliveryMode::Unspecified => DeliveryMode::Sync,
        }
    }
}
