//! Upstream access: typed clients for Retently and Retainly behind one scheduler per account.
pub mod batching;
pub mod context;
pub mod de;
pub mod http;
pub mod retainly;
pub mod retently;
pub mod scheduler;

pub use context::{CallContext, Priority};
pub use retainly::RetainlyApi;
pub use retently::RetentlyApi;
pub use scheduler::SchedulerSettings;
