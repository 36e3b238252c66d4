//! cx-gateway: one gRPC door to the Retently and Retainly customer-experience APIs.
pub mod config;
pub mod error;
pub mod shutdown;
pub mod store;
pub mod telemetry;
