//! cx-gateway: one gRPC door to the Retently and Retainly customer-experience APIs.
//!
//! Internal services call four protobuf services (`CustomerService`, `SurveyService`,
//! `EventService`, `FeedbackStream`, plus `DeliveryService` for asynchronous writes); the gateway
//! validates, schedules every upstream call under one shared budget, and translates to the
//! Retently and Retainly REST APIs.
//!
//! # Layout
//!
//! - [`auth`]: callers, their permissions and shares; the layer that authenticates each call.
//! - [`tls`]: TLS and mutual TLS on the gRPC port, with certificates that rotate in place.
//! - [`reload`]: reloading the callers and TLS files on SIGHUP and on change.
//! - [`app`]: what the services share: settings, store, drain, background workers.
//! - [`backoff`]: how background loops back off from a failing store and rate-limit their logs.
//! - [`readiness`]: whether start-up work (outbox recovery) is done, for `/readyz` and health.
//! - [`store`]: the embedded durable store (SQLite): outbox, idempotency, feedback log, cursors.
//! - [`domain`]: plain-Rust domain logic: the outbox of asynchronous writes, idempotency.
//! - [`feedback`]: the feedback pipeline: sync, webhook ingestion, durable log, fan-out.
//! - [`config`]: typed settings from `CXGW_*` and an optional file, validated at start.
//! - [`error`]: the one error type and its one mapping to `tonic::Status` with details.
//! - [`server`]: `run(listeners, config, shutdown)`: services, health, reflection, layers, drain.
//! - [`grpc`]: thin adapters per service and the tower layers of the gRPC stack.
//! - [`admin`]: the admin HTTP port (liveness, readiness, feedback counters, webhooks).
//! - [`shutdown`]: the drain signal shared by every long-lived task.
//! - [`sandbox_mode`]: starting the built-in upstream emulator for `serve --sandbox`.
//! - [`upstream`]: typed Retently and Retainly clients behind one scheduler per account
//!   (budget, priorities, batching, single-flight and caching, retries, circuit breaker).
//! - [`telemetry`]: logs, traces (OpenTelemetry, W3C context), metrics (`/metrics`, OTLP), redaction.
//! - [`pb`]: code generated from `proto/cx/gateway/v1`.

pub mod admin;
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
pub mod sandbox_mode;
pub mod server;
pub mod shutdown;
pub mod store;
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
