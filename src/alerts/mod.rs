//! Alert rules: act on a survey response within seconds of its arrival, without a subscriber of
//! one's own.
//!
//! ```text
//!  feedback log ──▶ evaluator ──(rules file)──▶ outbox ──▶ sender ──HTTP──▶ receiver
//!   (durable)      (own checkpoint,             (retries,    (signed JSON
//!                   alert keys)                 dead letters) or Slack)
//! ```
//!
//! The evaluator queues each alert as an outbox delivery in the same transaction that records
//! its key (rule, response, version) and moves its checkpoint, so a crash anywhere neither loses
//! nor doubles an alert; the outbox then gives alerts what it gives writes: retries with backoff,
//! dead letters in `DeliveryService` (owned by the gateway, so seen by `deliveries:admin`
//! callers), a span per attempt (linked to the span that ingested the response).
//!
//! # Layout
//!
//! - [`rules`]: the rules file, its validation, matching and reloading.
//! - [`evaluator`]: tails the log and queues alerts (its state: [`crate::store::AlertStore`]).
//! - [`payload`]: what is queued, and the signed-JSON and Slack bodies.
//! - [`sender`]: the outbox executor of alert deliveries, and the signature.
//! - [`metrics`]: per-rule counters.

pub mod evaluator;
pub mod metrics;
pub mod payload;
pub mod rules;
pub mod sender;

pub use self::payload::ALERT_METHOD;
pub use self::rules::RuleSet;
