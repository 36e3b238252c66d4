//! Domain logic in plain Rust: nothing here knows protobuf or HTTP.
//!
//! - [`outbox`]: the durable queue of asynchronous writes and its delivery worker.
//! - [`idempotency`]: remembered responses for idempotency keys and event message ids.

pub mod idempotency;
pub mod outbox;

#[cfg(test)]
mod store_fault_tests;
#[cfg(test)]
mod tests;
