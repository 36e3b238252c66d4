//! cx-gateway: one gRPC door to the Retently and Retainly customer-experience APIs.
//!
//! Internal services call four protobuf services (`CustomerService`, `SurveyService`,
//! `EventService`, `FeedbackStream`, plus `DeliveryService` for asynchronous writes); the gateway
//! validates, schedules every upstream call under one shared budget, and translates to the
//! Retently and Retainly REST APIs.
//!
//! # Layout
//!
//! In the order a request flows, from the caller to the upstream:
//!
//! - **Edge.** [`server`]: `run(listeners, config, shutdown)` builds every service, the tower
//!   stack, health, reflection and the admin port, and drains gracefully. In the stack:
//!   [`tls`] (TLS and mutual TLS, certificates rotating in place), [`auth`] (callers, their
//!   permissions and shares; the layer that authenticates each call), [`telemetry::grpc`] (one
//!   span and the metrics per call), [`grpc::deadline`] (every call gets a deadline) and
//!   [`grpc::codec`] (decode failures become the gateway's errors).
//! - **Adapters.** [`grpc`]: one module per service: validate ([`grpc::validate`]), convert,
//!   call, convert back, with errors mapped once through [`error`]. Conversions the feedback
//!   pipeline needs too are in [`convert`]; generated code is in [`pb`].
//! - **Domain.** The write path, [`domain::writes`]: the `WriteRpc` contract, SYNC and ASYNC
//!   execution, idempotency keys, replay through the outbox executor, and one table
//!   (`domain/writes/rpcs.rs`) that declares every write RPC (method, request, execution
//!   function, replay safety, permission). The per-service execution is beside it, in plain
//!   Rust commands and outcomes (the adapters convert requests and responses at their edge):
//!   [`domain::writes::customers`], [`domain::writes::surveys`] (with the outbox's survey
//!   delivery in [`domain::writes::survey_delivery`]) and [`domain::writes::events`], over the
//!   values of [`domain::writes::values`]. Under
//!   it: the durable [`domain::outbox`] of asynchronous writes and its delivery worker, and
//!   [`domain::idempotency`] (remembered responses). Every failure carries a typed
//!   [`error::Reason`] (its `ErrorInfo.reason`) and, from an upstream attempt, the
//!   [`upstream::failure::FailureClass`] that decides retries.
//! - **Scheduler.** [`upstream::scheduler`]: one lane per upstream account: the budget,
//!   priorities, batching, single-flight reads and caching, retries, the circuit breaker.
//! - **Clients.** [`upstream`]: the typed [`upstream::retently`] and [`upstream::retainly`]
//!   clients behind the scheduler, over the shared HTTP plumbing ([`upstream::http`]) that
//!   classifies each failure once ([`upstream::failure`]).
//!
//! Then the feedback pipeline behind `FeedbackStream`, from the upstream back to the caller:
//!
//! - [`feedback`]: the incremental poller and webhook ingestion, the deduplicated durable log,
//!   the hub that fans it out to subscribers, their filters and resume cursors, and the
//!   questions the log answers without an upstream call (customer history, covered ListFeedback
//!   ranges).
//!
//! - [`alerts`]: alert rules over the log: matched responses become signed-JSON or Slack
//!   deliveries of the outbox.
//!
//! Beside the flow:
//!
//! - [`store`]: storage behind narrow async traits per concern (outbox, idempotency records,
//!   feedback log, cursors, the alert evaluator's state in [`store::alerts`]), every SQL statement
//!   and the schema; the embedded SQLite engine is [`store::sqlite`].
//! - [`config`]: typed settings from `CXGW_*` and an optional file, validated at start.
//! - [`app`]: what the services share: settings, store, drain, background workers.
//! - [`admin`]: the admin HTTP port (liveness, readiness, feedback counters, webhooks).
//! - [`segment`]: the Segment-compatible HTTP intake (track, identify, batch) on its own port,
//!   feeding the same write path as `EventService` and `CustomerService`.
//! - [`telemetry`]: logs, traces (OpenTelemetry, W3C context), metrics (`/metrics`, OTLP), redaction.
//! - [`reload`]: reloading the callers, TLS and event rules files on SIGHUP and on change;
//!   [`swapped`] holds a reloaded value that a reload swaps whole.
//! - [`rules`]: event rules (which events send which survey to whom: audience, sample, delay,
//!   throttle); [`domain::fatigue`] is the survey cool-down across campaigns.
//! - [`readiness`]: whether start-up work (outbox recovery) is done, for `/readyz` and health.
//! - [`backoff`]: how background loops back off from a failing store and rate-limit their logs.
//! - [`shutdown`]: the drain signal shared by every long-lived task.
//! - [`sandbox_mode`]: starting the built-in upstream emulator for `serve --sandbox`.
//!
//! Outside this crate, in the workspace:
//!
//! - `crates/sandbox` (`cx_sandbox`): the stateful emulator of both upstream APIs that every
//!   integration test, the benchmark and `serve --sandbox` run against.
//! - `crates/bench` (`cx-gateway-bench`): the benchmark against same-run baselines; it starts
//!   the `cx-gateway` binary as a child process and reaches this crate only through its public
//!   API.

pub mod admin;
pub mod alerts;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod config;
pub mod convert;
pub mod domain;
pub mod error;
pub mod feedback;
pub mod grpc;
pub mod readiness;
pub mod reload;
pub mod rules;
pub mod sandbox_mode;
pub mod segment;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod swapped;
pub mod telemetry;
pub mod tls;
pub mod upstream;

/// Code generated from the protobuf contract (`proto/cx/gateway/v1`, package `cx.gateway.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("cx.gateway.v1");
    include!(concat!(env!("OUT_DIR"), "/cx_gateway_message_roles.rs"));

    /// The encoded descriptor set of the contract, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/cx_gateway_descriptor.bin"));

    /// The encoded descriptor set of `google.rpc` error details, served by reflection so generic
    /// clients can decode the details of every error.
    pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(
        env!("OUT_DIR"),
        "/google_rpc_error_details_descriptor.bin"
    ));
}
