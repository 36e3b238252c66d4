//! What every upstream operation is told about its caller.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, ErrorCode, Reason};

/// Scheduling class of a call. Interactive work is served first; background work still gets a
/// guaranteed share (see [`crate::upstream::SchedulerSettings::background_share`]) so it never
/// starves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Feedback sync, retries of queued outbox writes: may wait, must eventually run.
    Background,
    /// A caller is waiting on the other end: reads and synchronous writes.
    Interactive,
}

/// The caller's side of one upstream operation: how urgent, until when, and on whose behalf.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub priority: Priority,
    /// When the caller stops waiting. `None` means the scheduler's own limits apply (queue wait
    /// bound, per-attempt timeout, attempt count).
    pub deadline: Option<Instant>,
    /// Who asked (a service name). Not used for scheduling yet; it is the key a per-caller
    /// weighted fair queue will use inside each priority class.
    pub caller: Option<Arc<str>>,
}

impl CallContext {
    pub fn interactive(deadline: Option<Instant>) -> Self {
        Self {
            priority: Priority::Interactive,
            deadline,
            caller: None,
        }
    }

    pub fn background() -> Self {
        Self {
            priority: Priority::Background,
            deadline: None,
            caller: None,
        }
    }

    /// An interactive call that must finish within `timeout` from now.
    pub fn interactive_within(timeout: Duration) -> Self {
        Self::interactive(Some(Instant::now() + timeout))
    }

    pub fn with_caller(mut self, caller: impl Into<Arc<str>>) -> Self {
        self.caller = Some(caller.into());
        self
    }

    /// Time left before the deadline, `None` without a deadline.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.deadline
            .map(|deadline| deadline.saturating_duration_since(now))
    }
}

/// The caller's deadline passed while the operation was still waiting inside the gateway.
pub(crate) fn deadline_exceeded(upstream: &'static str) -> Error {
    Error::new(
        ErrorCode::DeadlineExceeded,
        Reason::DeadlineExceeded,
        format!("deadline passed while waiting for {upstream}"),
    )
    .with_metadata("upstream", upstream)
}
