//! The wall clock of the feedback pipeline (log times, retention cutoffs, heartbeats' server
//! time, the poller's watermark).
//!
//! Production reads the system clock. Tests use [`Clock::following_tokio`], a wall clock that
//! advances with tokio's clock, so heartbeats and retention can be driven by a paused clock
//! (`tokio::time::pause` / `advance`) instead of sleeping.

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    System,
    FollowingTokio {
        start_ms: i64,
        start: tokio::time::Instant,
    },
}

impl Clock {
    pub fn system() -> Clock {
        Clock { kind: Kind::System }
    }

    /// Starts at the current system time and then moves only as tokio's clock moves.
    pub fn following_tokio() -> Clock {
        Clock {
            kind: Kind::FollowingTokio {
                start_ms: Utc::now().timestamp_millis(),
                start: tokio::time::Instant::now(),
            },
        }
    }

    /// UNIX time in milliseconds.
    pub fn now_ms(&self) -> i64 {
        match self.kind {
            Kind::System => Utc::now().timestamp_millis(),
            Kind::FollowingTokio { start_ms, start } => {
                let elapsed = i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX);
                start_ms.saturating_add(elapsed)
            }
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.now_ms()).unwrap_or_else(Utc::now)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}
