//! Upstream access: typed clients for Retently and Retainly behind one scheduler per account.
pub mod context;
pub mod scheduler;

pub use context::{CallContext, Priority};
pub use scheduler::SchedulerSettings;
