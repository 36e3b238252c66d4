//! The fault suite: the gateway against an upstream that fails the way real ones do (5xx, 429,
//! latency, dropped connections) and a process that is killed or stopped mid-delivery. Each
//! scenario ends with a ledger of every write the gateway acknowledged: delivered (once), in
//! doubt only when the upstream may really have applied it, or refused before it was
//! acknowledged. Interleavings are made by construction (the emulator's hold gate and its
//! in-progress count), never by racing a timer.
//!
//! # Layout
//! - `ledger`: acknowledged writes, what the emulator recorded, and the accounting of both.
//! - `unavailable`: 503 and 429 storms are ridden out, nothing is dead-lettered.
//! - `possibly_applied`: 500, 504 and dropped connections leave exactly their attempts in doubt.
//! - `survey_history`: survey sends in doubt are resolved from Retently's sent-survey history.
//! - `sigkill`: SIGKILL while deliveries are on the wire, then a restart.
//! - `sigterm`: SIGTERM under 1.5 s upstream latency with 64 deliveries on the wire.

#[path = "../it/child.rs"]
mod child;
#[path = "../it/support.rs"]
mod support;

mod ledger;
mod possibly_applied;
mod sigkill;
mod sigterm;
mod survey_history;
mod unavailable;
