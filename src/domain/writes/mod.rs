//! The one path every write RPC takes after validation: SYNC or ASYNC, with or without an
//! idempotency key.
//!
//! - SYNC: the write runs now at interactive priority; with a key, its response is remembered
//!   (once anything reached an upstream) and a repeat returns it.
//! - ASYNC: the validated request is queued in the outbox, as its protobuf encoding (a format made
//!   for evolution, so a queue written by one version is read by the next), and the call returns
//!   a `delivery_id` once that is durable. The outbox worker later replays the request through the
//!   very same execution function at background priority ([`WriteExecutor`]). With a key, the
//!   idempotency record is committed in the same transaction as the queued delivery.
//!
//! Every write RPC is declared once, in the table of `rpcs.rs`, which generates its
//! [`WriteRpc`] impl, its method name, its permission and the outbox executor's dispatch. The
//! execution functions live beside it, one module per service ([`customers`], [`surveys`],
//! [`survey_delivery`], [`events`]), in plain Rust: each takes a command and answers an
//! outcome; the request and response messages are converted at the adapter's edge, by the
//! `From` impls the table names.

use std::sync::Arc;

use prost::Message;

use crate::app::App;
use crate::auth::CallerRegistry;
pub mod customers;
pub mod events;
mod rpcs;
pub mod survey_delivery;
pub mod surveys;
pub mod values;

pub use self::rpcs::{WRITE_PERMISSIONS, delivery_result, methods};

use self::values::Destination;
use crate::domain::Owner;
use crate::domain::idempotency::{Fresh, Idempotency, request_hash};
use crate::domain::outbox::{
    Attempt, DeliveryAttempt, DeliveryError, Executor, NewDelivery, new_delivery_id,
};
use crate::error::{Error, ErrorCode, Reason};
use crate::upstream::CallContext;
use crate::upstream::failure::{DeliveryDecision, FailureClass, delivery_decision};

/// A write RPC's request type and what the write path needs to know about it.
pub trait WriteRpc: Message + Default + Clone + Send + 'static {
    type Response: Message + Default + Send + 'static;
    /// The request in plain Rust, as its execution function takes it.
    type Command: Send;
    /// What the execution function answers, before it becomes the response.
    type Outcome: Send;
    /// Full gRPC method name, as `Delivery.method` reports it.
    const METHOD: &'static str;
    /// Whether sending it twice is harmless (see the outbox's module doc on crash safety).
    const REPLAY_SAFE: bool;

    /// Whether sending this request twice is harmless. [`Self::REPLAY_SAFE`] unless the answer
    /// depends on the request (appending tags is not replay-safe, replacing them is).
    fn replay_safe(&self) -> bool {
        Self::REPLAY_SAFE
    }

    /// Whether a SYNC outcome is remembered under its idempotency key. An outcome that only
    /// reports that nothing reached the upstream (every item shed by the budget) is not, so a
    /// repeat, which the RetryInfo invites, runs anew.
    fn remember(_outcome: &Self::Outcome) -> bool {
        true
    }

    /// The validated (or queued) request as its command.
    fn command(self) -> Self::Command;
    /// Runs the command now (SYNC calls and the outbox worker alike).
    fn execute(
        app: &App,
        command: Self::Command,
        ctx: CallContext,
    ) -> impl Future<Output = Result<Self::Outcome, Error>> + Send;
    /// The response the outcome becomes.
    fn respond(outcome: Self::Outcome) -> Self::Response;

    /// The request without its `options`, which are not part of what is written.
    fn without_options(self) -> Self;
    fn set_delivery_id(response: &mut Self::Response, delivery_id: String);
    /// Whether the outcome holds an item that failed in a way a later attempt may fix; an
    /// asynchronous delivery whose operation is replay-safe is then attempted again.
    fn has_transient_failure(_outcome: &Self::Outcome) -> bool {
        false
    }
}

/// Whether a write runs while the caller waits or is queued in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Sync,
    Async,
}

/// What the outbox records about a write besides its request.
pub struct DeliveryFacts {
    pub destinations: Vec<Destination>,
    pub item_count: usize,
    /// The customers it touches, for per-customer ordering.
    pub ordering_keys: Vec<String>,
}

/// A write's response, and whether it repeats an earlier call's (same idempotency key).
pub struct Written<T> {
    pub response: T,
    pub repeated: bool,
}

/// Runs a validated write in the mode the caller chose (a SYNC one within `ctx`), and tells
/// whether the response is a remembered one; its idempotency key and delivery belong to
/// `owner`.
pub async fn run<R: WriteRpc>(
    app: &Arc<App>,
    owner: Owner,
    request: R,
    mode: DeliveryMode,
    idempotency_key: Option<String>,
    facts: DeliveryFacts,
    ctx: CallContext,
) -> Result<Written<R::Response>, Error> {
    let request = request.without_options();
    let encoded = request.encode_to_vec();
    match (mode, idempotency_key) {
        (DeliveryMode::Async, key) => {
            let replay_safe = request.replay_safe();
            let queued = Queued {
                method: R::METHOD,
                scope: R::METHOD,
                owner,
                encoded,
                replay_safe,
            };
            enqueue_as::<R>(app, queued, key, facts).await
        }
        (_, None) => Ok(Written {
            response: R::respond(R::execute(app, request.command(), ctx).await?),
            repeated: false,
        }),
        (_, Some(key)) => {
            let hash = request_hash(&encoded);
            let replay_safe = request.replay_safe();
            let remembered = app
                .idempotency
                .run(&owner, R::METHOD, &key, hash, replay_safe, async move {
                    let outcome = R::execute(app, request.command(), ctx).await?;
                    Ok(Fresh {
                        remember: R::remember(&outcome),
                        response: R::respond(outcome).encode_to_vec(),
                    })
                })
                .await?;
            Ok(Written {
                response: decode_response::<R>(&remembered.response)?,
                repeated: remembered.repeated,
            })
        }
    }
}

/// Queues an encoded request of `R` under `method` (the RPC it came from, which may carry
/// several `R`s, as TrackEvents does), deduplicated within `scope` and `owner`.
pub async fn enqueue<R: WriteRpc>(
    app: &Arc<App>,
    owner: Owner,
    method: &'static str,
    scope: &'static str,
    encoded: Vec<u8>,
    key: Option<String>,
    facts: DeliveryFacts,
) -> Result<Written<R::Response>, Error> {
    let queued = Queued {
        method,
        scope,
        owner,
        encoded,
        replay_safe: R::REPLAY_SAFE,
    };
    enqueue_as::<R>(app, queued, key, facts).await
}

/// An encoded request on its way into the outbox.
struct Queued {
    /// The RPC it came from.
    method: &'static str,
    /// The RPCs whose idempotency keys it shares.
    scope: &'static str,
    owner: Owner,
    encoded: Vec<u8>,
    /// See [`WriteRpc::replay_safe`].
    replay_safe: bool,
}

async fn enqueue_as<R: WriteRpc>(
    app: &Arc<App>,
    queued: Queued,
    key: Option<String>,
    facts: DeliveryFacts,
) -> Result<Written<R::Response>, Error> {
    let Queued {
        method,
        scope,
        owner,
        encoded,
        replay_safe,
    } = queued;
    let delivery_id = new_delivery_id();
    let mut response = R::Response::default();
    R::set_delivery_id(&mut response, delivery_id.clone());
    let response_bytes = response.encode_to_vec();
    let delivery = NewDelivery {
        method: method.to_owned(),
        request: encoded.clone(),
        destinations: facts.destinations.iter().map(|d| d.stored()).collect(),
        item_count: u32::try_from(facts.item_count).unwrap_or(u32::MAX),
        ordering_keys: facts.ordering_keys,
        idempotency_key: key.clone(),
        replay_safe,
        owner: owner.clone(),
    };
    let Some(key) = key else {
        app.outbox.enqueue_with(delivery_id, delivery, None).await?;
        return Ok(Written {
            response,
            repeated: false,
        });
    };
    let hash = request_hash(&encoded);
    let outbox = app.outbox.clone();
    let record = Idempotency::record_job(&owner, scope, &key, hash.clone(), response_bytes.clone());
    // The gate serialises concurrent repeats; the record itself is committed with the delivery,
    // so `remember: false` here (it is already stored).
    let stored = app
        .idempotency
        .run(&owner, scope, &key, hash, replay_safe, async move {
            outbox
                .enqueue_with(delivery_id, delivery, Some(record))
                .await?;
            Ok(Fresh {
                response: response_bytes,
                remember: false,
            })
        })
        .await?;
    Ok(Written {
        response: decode_response::<R>(&stored.response)?,
        repeated: stored.repeated,
    })
}

fn decode_response<R: WriteRpc>(bytes: &[u8]) -> Result<R::Response, Error> {
    R::Response::decode(bytes)
        .map_err(|error| Error::internal(format!("a remembered response does not decode: {error}")))
}

/// Whether a failed attempt may succeed later without anyone changing the request (see
/// [`delivery_decision`], the one place that decides).
pub(crate) fn is_transient(error: &Error) -> bool {
    delivery_decision(error, true) == DeliveryDecision::Retry
}

/// Whether a failed call may nonetheless have been applied upstream: the request was written
/// and no clear answer came back (a timeout, a reset, a 500, 502 or 504).
pub fn possibly_applied(error: &Error) -> bool {
    error.failure_class() == Some(FailureClass::PossiblyApplied)
}

/// A queued request of `R`, or the failed attempt of one that does not decode.
pub(crate) fn decode_queued<R: WriteRpc>(request: &[u8]) -> Result<R, Attempt> {
    R::decode(request).map_err(|error| Attempt::Failed {
        error: DeliveryError::from(&Error::internal(format!(
            "the queued request does not decode: {error}"
        ))),
    })
}

/// Replays one queued write through its execution function, with `ctx` (its owner's, see
/// [`delivery_context`]), and classifies the outcome.
pub async fn replay<R: WriteRpc>(
    app: &App,
    request: &[u8],
    delivery_id: &str,
    ctx: CallContext,
) -> Attempt {
    let request = match decode_queued::<R>(request) {
        Ok(request) => request,
        Err(failed) => return failed,
    };
    let replay_safe = request.replay_safe();
    match R::execute(app, request.command(), ctx).await {
        Ok(outcome) => {
            if replay_safe && R::has_transient_failure(&outcome) {
                return Attempt::Retry {
                    error: DeliveryError {
                        code: ErrorCode::Unavailable,
                        reason: Reason::PartialDelivery,
                        message: "some items failed transiently and are attempted again".to_owned(),
                        metadata: Default::default(),
                    },
                    retry_after: None,
                };
            }
            let mut response = R::respond(outcome);
            R::set_delivery_id(&mut response, delivery_id.to_owned());
            Attempt::Delivered {
                result: response.encode_to_vec(),
            }
        }
        Err(error) => attempt_failed(&error, replay_safe),
    }
}

/// The outbox's attempt for a failed write, as [`delivery_decision`] decides.
pub(crate) fn attempt_failed(error: &Error, replay_safe: bool) -> Attempt {
    match delivery_decision(error, replay_safe) {
        DeliveryDecision::Retry => Attempt::Retry {
            retry_after: error.retry_after(),
            error: DeliveryError::from(error),
        },
        // An operation that must not run twice is not sent again when the upstream may have
        // applied it; the delivery goes to the dead letters for an operator to check.
        DeliveryDecision::InDoubt => Attempt::InDoubt {
            error: DeliveryError::from(error),
        },
        DeliveryDecision::Failed => Attempt::Failed {
            error: DeliveryError::from(error),
        },
    }
}

/// The upstream context a queued write of `owner` runs with: background priority, and for a
/// caller of the callers file that caller, so the write spends the caller's quota and competes
/// at the caller's weight, as the call would have in SYNC mode. The gateway's own deliveries
/// and anonymous ones (no callers configured) share the background flow.
///
/// A caller no longer in the callers file has no share left to apply: its deliveries run in the
/// background flow too. They are still delivered, not dead-lettered: the write was accepted
/// from a caller allowed to make it, and an acknowledged write reaches the upstream (a caller
/// renamed or retired by a reload must not lose what it queued).
pub(crate) fn delivery_context(callers: Option<&CallerRegistry>, owner: &Owner) -> CallContext {
    let background = CallContext::background();
    match owner {
        Owner::Caller(name) => {
            let known = callers.is_some_and(|callers| callers.current().by_name(name).is_some());
            if known {
                background.with_caller(Arc::clone(name))
            } else {
                background
            }
        }
        Owner::Anonymous | Owner::Gateway => background,
    }
}

/// The outbox's executor: dispatches each queued write to its RPC's execution function.
pub struct WriteExecutor {
    pub app: Arc<App>,
}

#[tonic::async_trait]
impl Executor for WriteExecutor {
    async fn execute(&self, delivery: DeliveryAttempt<'_>) -> Attempt {
        let ctx = delivery_context(self.app.config.auth.callers.as_ref(), delivery.owner);
        // The delivery id names the attempt's survey cool-down reservations: a retry of the
        // delivery passes the reservations its earlier attempt made.
        let attempt = rpcs::deliver(&self.app, delivery, ctx);
        match crate::domain::fatigue::within_delivery(delivery.delivery_id, attempt).await {
            Some(attempt) => attempt,
            None => Attempt::Failed {
                error: DeliveryError::from(&Error::new(
                    ErrorCode::Unimplemented,
                    Reason::NotImplemented,
                    format!("{} cannot be delivered by this build", delivery.method),
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::CallersSource;
    use crate::config::Secret;
    use crate::upstream::Priority;

    fn registry(names: &[&str]) -> CallerRegistry {
        let text: String = names
            .iter()
            .map(|name| {
                format!(
                    "[[caller]]\nname = \"{name}\"\nclient_subjects = [\"{name}.svc\"]\n\
                     permissions = []\nweight = 3\n"
                )
            })
            .collect();
        CallerRegistry::load(CallersSource::Inline(Secret::new(text))).unwrap()
    }

    /// A caller's queued write reaches the scheduler as that caller (whose weight and quota the
    /// lane looks up by name), at background priority; everyone else's as the background flow.
    #[test]
    fn queued_writes_run_as_their_owner_while_it_is_a_caller() {
        let callers = registry(&["web", "billing"]);
        let web = Owner::Caller(Arc::from("web"));
        let ctx = delivery_context(Some(&callers), &web);
        assert_eq!(ctx.caller.as_deref(), Some("web"));
        assert_eq!(ctx.priority, Priority::Background);
        assert_eq!(ctx.deadline, None);
        for owner in [Owner::Gateway, Owner::Anonymous] {
            let ctx = delivery_context(Some(&callers), &owner);
            assert_eq!(ctx.caller, None, "{owner:?}");
            assert_eq!(ctx.priority, Priority::Background);
        }
        // Removed from the callers file: still delivered, in the background flow.
        let retired = Owner::Caller(Arc::from("retired"));
        assert_eq!(delivery_context(Some(&callers), &retired).caller, None);
        // Authentication turned off since: no caller's share applies.
        assert_eq!(delivery_context(None, &web).caller, None);
    }
}
