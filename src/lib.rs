//! cx-gateway: one gRPC door to the Retently and Retainly customer-experience APIs.
pub mod config;
pub mod error;
