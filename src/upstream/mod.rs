//! Upstream access: typed clients for Retently and Retainly behind one scheduler per account.
//!
//! Domain services use two handles built from the configuration, [`RetentlyApi`] and
//! [`RetainlyApi`]. They know nothing of protobuf: each operation is one async method taking a
//! [`CallContext`] (priority, deadline, caller) and plain Rust types, and returns
//! [`crate::error::Result`]. Behind every method the account's scheduler decides when the
//! request may go (budget, priorities), coalesces concurrent writes, shares identical reads,
//! caches slow-moving ones, retries what is safe to retry, and fails fast while the upstream is
//! down.
//!
//! ```no_run
//! # async fn demo(config: &cx_gateway::config::Config) -> cx_gateway::error::Result<()> {
//! use std::time::Duration;
//! use cx_gateway::upstream::retently::{CustomerInput, SurveyRequest};
//! use cx_gateway::upstream::{CallContext, RetentlyApi};
//!
//! use cx_gateway::upstream::scheduler::fair::EqualShares;
//!
//! // One replica on the embedded store: no shared budget.
//! let retently = RetentlyApi::from_config(&config.retently, std::sync::Arc::new(EqualShares), None)?;
//! let ctx = CallContext::interactive_within(Duration::from_secs(5)).with_caller("billing");
//! let outcome = retently
//!     .send_survey(&ctx, SurveyRequest {
//!         campaign_id: "5f1ec45b27b8313876290001".into(),
//!         delay_days: None,
//!         recipient: CustomerInput::new("ann@example.com"),
//!     })
//!     .await?;
//! println!("{:?}", outcome.status);
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`context`]: [`CallContext`] and [`Priority`].
//! - [`scheduler`]: the per-account lane (sliding-window budget, priority queues, retries with
//!   full jitter and a retry budget, circuit breaker), the batcher and the read cache.
//! - [`batching`]: driving a coalesced batch and splitting the upstream's answer per caller.
//! - [`failure`]: what a failed attempt can have done upstream, and the outbox's decision.
//! - [`http`]: the shared transport: one attempt, failure classification, error mapping.
//! - [`de`]: tolerant field decoders for the documented body variations.
//! - [`retently`]: `client` (HTTP per endpoint), `model` (records and requests), `error`
//!   (reading Retently's error bodies), and [`RetentlyApi`].
//! - [`retainly`]: the same for Retainly, and [`RetainlyApi`].
pub mod batching;
pub mod context;
pub mod de;
pub mod failure;
pub mod http;
pub mod retainly;
pub mod retently;
pub mod scheduler;

pub use context::{CallContext, Priority};
pub use retainly::RetainlyApi;
pub use retently::RetentlyApi;
pub use scheduler::SchedulerSettings;
