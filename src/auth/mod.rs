//! Who may call the gateway and what they may do.
//!
//! # Layout
//! - [`callers`]: the callers file (names, token digests, certificate subjects, permissions,
//!   weights, quotas) and the registry that swaps it whole on reload.
//! - [`permissions`]: the permission groups and the one table from RPC to permission.
//! - [`layer`]: the tower layer that authenticates each call and checks its permission.

pub mod callers;
pub mod layer;
pub mod permissions;

pub use callers::{Caller, CallerRegistry, CallerTable, CallersSource, Reloaded};
pub use layer::{AuthLayer, AuthenticatedCaller, interactive_context, owner_of, visibility_of};
pub use permissions::Permission;
