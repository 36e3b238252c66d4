//! The one table of write RPCs. Each row declares a write: its method, its request and
//! response, its command and outcome in plain Rust (converted from the request and into the
//! response by `From` impls at the adapter's edge, `grpc::*::convert`), the function that
//! executes it (for SYNC calls and the outbox worker alike), whether sending it twice is
//! harmless, and the permission a caller needs. From the table come
//! the [`WriteRpc`] impls, the method names ([`methods`]), the outbox executor's dispatch
//! ([`deliver`]), the permission entries ([`WRITE_PERMISSIONS`]) and the decoding of a
//! delivered write's result ([`delivery_result`]), so adding a write RPC takes a row here and
//! its execution function.
//!
//! Optional columns, in this order: `replay_safe_of` (a per-request answer, see
//! [`WriteRpc::replay_safe`]), `remember` ([`WriteRpc::remember`]), `transient`
//! ([`WriteRpc::has_transient_failure`], given the outcome), `deliver` (an
//! outbox attempt of its own instead of a plain replay) and `result` (the `Delivery.result`
//! case). Rows under `aliases` are RPCs that queue the requests of another row (TrackEvents
//! queues one TrackEvent per event).

use std::sync::Arc;

use prost::Message as _;

use super::{WriteRpc, customers, events, replay, survey_delivery, surveys};
use crate::app::App;
use crate::auth::Permission;
use crate::domain::outbox::{Attempt, DeliveryAttempt};
use crate::error::Error;
use crate::pb;
use crate::upstream::CallContext;

macro_rules! write_rpcs {
    (
        rpcs: [$(
            $(#[$doc:meta])*
            $name:ident = $path:literal {
                request: $request:ty => $response:ty,
                command: $command:ty => $outcome:ty,
                execute: $execute:path,
                replay_safe: $replay_safe:literal,
                permission: $permission:ident,
                $(replay_safe_of: $replay_safe_of:path,)?
                $(remember: $remember:path,)?
                $(transient: $transient:path,)?
                $(deliver: $deliver:path,)?
                $(result: $result:ident,)?
            }
        )*]
        aliases: [$(
            $(#[$alias_doc:meta])*
            $alias:ident = $alias_path:literal {
                queues: $queued:ty,
                permission: $alias_permission:ident,
                $(result: $alias_result:ident,)?
            }
        )*]
    ) => {
        /// Full gRPC method names of the write RPCs, as `Delivery.method` reports them.
        pub mod methods {
            $($(#[$doc])* pub const $name: &str = $path;)*
            $($(#[$alias_doc])* pub const $alias: &str = $alias_path;)*

            /// Every write RPC.
            pub const WRITES: &[&str] = &[$($name,)* $($alias,)*];
        }

        $(
            impl WriteRpc for $request {
                type Response = $response;
                type Command = $command;
                type Outcome = $outcome;
                const METHOD: &'static str = methods::$name;
                const REPLAY_SAFE: bool = $replay_safe;

                $(fn replay_safe(&self) -> bool {
                    $replay_safe_of(&self.clone().command())
                })?

                $(fn remember(outcome: &Self::Outcome) -> bool {
                    $remember(outcome)
                })?

                fn command(self) -> Self::Command {
                    <$command>::from(self)
                }

                fn execute(
                    app: &App,
                    command: Self::Command,
                    ctx: CallContext,
                ) -> impl Future<Output = Result<Self::Outcome, Error>> + Send {
                    $execute(app, command, ctx)
                }

                fn respond(outcome: Self::Outcome) -> Self::Response {
                    <$response>::from(outcome)
                }

                fn without_options(mut self) -> Self {
                    self.options = None;
                    self
                }

                fn set_delivery_id(response: &mut Self::Response, delivery_id: String) {
                    response.delivery_id = delivery_id;
                }

                $(fn has_transient_failure(outcome: &Self::Outcome) -> bool {
                    $transient(outcome)
                })?
            }
        )*

        /// One outbox attempt of a queued write, made with `ctx` (the context of
        /// its owner, see [`super::delivery_context`]); `None` for a method this build does not
        /// know.
        pub(crate) async fn deliver(
            app: &Arc<App>,
            delivery: DeliveryAttempt<'_>,
            ctx: CallContext,
        ) -> Option<Attempt> {
            let DeliveryAttempt {
                method,
                request,
                delivery_id,
                verify_since_ms,
                ..
            } = delivery;
            // Not every row reads the verification window; only `deliver` columns do.
            let _ = verify_since_ms;
            Some(match method {
                $(methods::$name => {
                    write_rpcs!(@deliver app, request, delivery_id, verify_since_ms, ctx,
                        $request $(, $deliver)?)
                })*
                $(methods::$alias => {
                    write_rpcs!(@deliver app, request, delivery_id, verify_since_ms, ctx, $queued)
                })*
                _ => return None,
            })
        }

        /// The permission each write RPC needs, by full path (the rest of the contract is in
        /// [`crate::auth::permissions`]).
        pub const WRITE_PERMISSIONS: &[(&str, Permission)] = &[
            $((methods::$name, Permission::$permission),)*
            $((methods::$alias, Permission::$alias_permission),)*
        ];

        /// The stored response of a delivered write, as the `Delivery.result` case of its
        /// method; `None` for a method without one or bytes that do not decode.
        pub fn delivery_result(method: &str, bytes: &[u8]) -> Option<pb::delivery::Result> {
            use pb::delivery::Result as R;
            $($(if method == methods::$name {
                return <$response>::decode(bytes).ok().map(R::$result);
            })?)*
            $($(if method == methods::$alias {
                return <<$queued as WriteRpc>::Response>::decode(bytes)
                    .ok()
                    .map(R::$alias_result);
            })?)*
            None
        }
    };
    (@deliver $app:ident, $request:ident, $delivery_id:ident, $verify:ident, $ctx:ident,
        $type:ty, $deliver:path) => {
        $deliver($app, $request, $delivery_id, $verify, $ctx).await
    };
    (@deliver $app:ident, $request:ident, $delivery_id:ident, $verify:ident, $ctx:ident,
        $type:ty) => {
        replay::<$type>($app, $request, $delivery_id, $ctx).await
    };
}

write_rpcs! {
    rpcs: [
        // Upserts, deletes and (un)subscribes leave the upstream as one success would when
        // repeated.
        UPSERT_CUSTOMERS = "/cx.gateway.v1.CustomerService/UpsertCustomers" {
            request: pb::UpsertCustomersRequest => pb::UpsertCustomersResponse,
            command: customers::UpsertCustomers => Vec<customers::CustomerWriteResult>,
            execute: customers::upsert_customers,
            replay_safe: true,
            permission: CustomersWrite,
            transient: customers::customer_results_transient,
            result: UpsertCustomers,
        }
        DELETE_CUSTOMERS = "/cx.gateway.v1.CustomerService/DeleteCustomers" {
            request: pb::DeleteCustomersRequest => pb::DeleteCustomersResponse,
            command: customers::DeleteCustomers => Vec<customers::CustomerWriteResult>,
            execute: customers::delete_customers,
            replay_safe: true,
            permission: CustomersDelete,
            transient: customers::customer_results_transient,
            result: DeleteCustomers,
        }
        UNSUBSCRIBE_CUSTOMERS = "/cx.gateway.v1.CustomerService/UnsubscribeCustomers" {
            request: pb::UnsubscribeCustomersRequest => pb::UnsubscribeCustomersResponse,
            command: customers::UnsubscribeCustomers => Vec<customers::CustomerWriteResult>,
            execute: customers::unsubscribe_customers,
            replay_safe: true,
            permission: CustomersWrite,
            transient: customers::customer_results_transient,
            result: UnsubscribeCustomers,
        }
        RESUBSCRIBE_CUSTOMERS = "/cx.gateway.v1.CustomerService/ResubscribeCustomers" {
            request: pb::ResubscribeCustomersRequest => pb::ResubscribeCustomersResponse,
            command: customers::ResubscribeCustomers => Vec<customers::CustomerWriteResult>,
            execute: customers::resubscribe_customers,
            replay_safe: true,
            permission: CustomersWrite,
            transient: customers::customer_results_transient,
            result: ResubscribeCustomers,
        }
        // Array items without an `item_id` are appended, so a repeat could add them twice.
        UPSERT_CUSTOMER_ARRAY_ITEMS = "/cx.gateway.v1.CustomerService/UpsertCustomerArrayItems" {
            request: pb::UpsertCustomerArrayItemsRequest => pb::UpsertCustomerArrayItemsResponse,
            command: customers::UpsertArrayItems => Vec<customers::ArrayRecordResult>,
            execute: customers::upsert_array_items,
            replay_safe: false,
            permission: CustomersWrite,
            transient: customers::record_results_transient,
            result: UpsertCustomerArrayItems,
        }
        // Removing items from a customer's array edits the customer; it does not delete it.
        DELETE_CUSTOMER_ARRAY_ITEMS = "/cx.gateway.v1.CustomerService/DeleteCustomerArrayItems" {
            request: pb::DeleteCustomerArrayItemsRequest => pb::DeleteCustomerArrayItemsResponse,
            command: customers::DeleteArrayItems => Vec<customers::ArrayRecordResult>,
            execute: customers::delete_array_items,
            replay_safe: true,
            permission: CustomersWrite,
            transient: customers::record_results_transient,
            result: DeleteCustomerArrayItems,
        }
        // A second send would survey the recipients twice; the outbox checks Retently's
        // history before an attempt that follows one in doubt.
        SEND_SURVEY = "/cx.gateway.v1.SurveyService/SendSurvey" {
            request: pb::SendSurveyRequest => pb::SendSurveyResponse,
            command: surveys::SendSurvey => Vec<surveys::RecipientResult>,
            execute: surveys::send_survey,
            replay_safe: false,
            permission: SurveysSend,
            remember: surveys::remember_send,
            deliver: survey_delivery::deliver_send_survey::<pb::SendSurveyRequest>,
            result: SendSurvey,
        }
        // Appends are not replay-safe, replacements are.
        SET_FEEDBACK_TAGS = "/cx.gateway.v1.SurveyService/SetFeedbackTags" {
            request: pb::SetFeedbackTagsRequest => pb::SetFeedbackTagsResponse,
            command: surveys::SetFeedbackTags => (),
            execute: surveys::set_feedback_tags,
            replay_safe: false,
            permission: FeedbackWrite,
            replay_safe_of: surveys::replaces_tags,
        }
        SET_FEEDBACK_TOPICS = "/cx.gateway.v1.SurveyService/SetFeedbackTopics" {
            request: pb::SetFeedbackTopicsRequest => pb::SetFeedbackTopicsResponse,
            command: surveys::SetFeedbackTopics => (),
            execute: surveys::set_feedback_topics,
            replay_safe: false,
            permission: FeedbackWrite,
            replay_safe_of: surveys::replaces_topics,
        }
        // A Retainly event starts workflows each time it is recorded.
        TRACK_EVENT = "/cx.gateway.v1.EventService/TrackEvent" {
            request: pb::TrackEventRequest => pb::TrackEventResponse,
            command: Option<events::Event> => Vec<events::TriggeredSurvey>,
            execute: events::track_event,
            replay_safe: false,
            permission: EventsWrite,
            result: TrackEvent,
        }
    ]
    aliases: [
        TRACK_EVENTS = "/cx.gateway.v1.EventService/TrackEvents" {
            queues: pb::TrackEventRequest,
            permission: EventsWrite,
            result: TrackEvent,
        }
    ]
}

#[cfg(test)]
mod tests {
    use super::surveys::{RecipientOutcome, RecipientResult};
    use super::*;
    use crate::error::{ErrorCode, Reason};

    fn failed(reason: Reason) -> RecipientResult {
        RecipientResult {
            index: 0,
            email: String::new(),
            outcome: RecipientOutcome::Failed(Error::new(ErrorCode::Unavailable, reason, "x")),
        }
    }

    #[test]
    fn sends_that_never_left_the_gateway_are_not_remembered() {
        let shed = vec![
            failed(Reason::UpstreamBudgetExhausted),
            failed(Reason::UpstreamCircuitOpen),
        ];
        assert!(!pb::SendSurveyRequest::remember(&shed));
        let refused = vec![failed(Reason::UpstreamNotFound)];
        assert!(pb::SendSurveyRequest::remember(&refused));
        let mixed = vec![
            failed(Reason::UpstreamBudgetExhausted),
            RecipientResult {
                index: 1,
                email: String::new(),
                outcome: RecipientOutcome::Scheduled,
            },
        ];
        assert!(pb::SendSurveyRequest::remember(&mixed));
    }

    #[test]
    fn destinations_are_stored_as_the_contract_numbers_them() {
        use super::super::values::Destination;
        assert_eq!(
            Destination::Retently.stored(),
            pb::Destination::Retently as i32
        );
        assert_eq!(
            Destination::Retainly.stored(),
            pb::Destination::Retainly as i32
        );
    }

    #[test]
    fn only_replacements_are_replay_safe() {
        let tags = |mode: pb::UpdateMode| pb::SetFeedbackTagsRequest {
            mode: mode as i32,
            ..Default::default()
        };
        assert!(tags(pb::UpdateMode::Replace).replay_safe());
        assert!(!tags(pb::UpdateMode::Append).replay_safe());
        let topics = pb::SetFeedbackTopicsRequest {
            mode: pb::UpdateMode::Append as i32,
            ..Default::default()
        };
        assert!(!topics.replay_safe());
        assert!(!pb::SendSurveyRequest::default().replay_safe());
    }
}
