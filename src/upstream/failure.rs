//! What an upstream can have done with a request whose call failed, and the one decision the
//! outbox takes from it.
//!
//! [`FailureClass`] is set where an HTTP outcome is classified ([`crate::upstream::http`]) and
//! travels inside the [`Error`] to whoever decides. [`delivery_decision`] is that decision for a
//! queued write: retry it (within the outbox's retry window), give up on it, or call it in doubt
//! because the upstream may have applied it and sending it again could apply it twice.

use crate::error::{Error, ErrorCode};

/// How an upstream attempt failed, by what the upstream can have done with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// 429 or 408: the upstream declined the request up front, without acting on it. The lane
    /// also slows down for everyone (`Retry-After`).
    Refused,
    /// 503: the upstream is unavailable and did not act on the request.
    Unavailable,
    /// Connection refused, DNS or TLS failure, anything before the request was written: the
    /// request never reached the upstream.
    NotSent,
    /// The request was written and no clear answer came back: a timeout or a reset after the
    /// request left, or a 500, 502 or 504 (the upstream, or a proxy in front of it, may have
    /// acted before failing).
    PossiblyApplied,
    /// 401/403: the upstream refused the gateway's own credentials without acting; an operator
    /// fixing the key lets the work through.
    CredentialsRejected,
    /// Any other 4xx, or an answer the gateway cannot read: repeating cannot help.
    Permanent,
}

impl FailureClass {
    /// The class of a non-2xx HTTP status.
    pub fn of_status(status: u16) -> FailureClass {
        match status {
            408 | 429 => FailureClass::Refused,
            401 | 403 => FailureClass::CredentialsRejected,
            503 => FailureClass::Unavailable,
            500..=599 => FailureClass::PossiblyApplied,
            _ => FailureClass::Permanent,
        }
    }

    /// Whether the upstream surely did not act, so sending the request again cannot duplicate it.
    pub fn surely_not_applied(self) -> bool {
        !matches!(self, FailureClass::PossiblyApplied)
    }

    /// Whether the same request may succeed if sent again later, without anyone changing it.
    pub fn may_pass(self) -> bool {
        matches!(
            self,
            FailureClass::Refused
                | FailureClass::Unavailable
                | FailureClass::NotSent
                | FailureClass::PossiblyApplied
        )
    }
}

/// What the outbox does with a queued write after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryDecision {
    /// Not applied (or harmless to repeat) and may pass: attempt again within the retry window.
    Retry,
    /// May have been applied and must not be sent twice: resolve the doubt, or park it for an
    /// operator as in doubt.
    InDoubt,
    /// Cannot succeed as it is: dead-letter it with its error.
    Failed,
}

/// The one place that decides what a failed attempt of a queued write means. `replay_safe`
/// says whether sending the write twice is harmless (upserts, deletes) or not (events, survey
/// sends).
///
/// Errors without a class never reached an upstream (the gateway's budget, circuit breaker,
/// a drain, or its own checks refused them), so they are decided by their code alone.
pub fn delivery_decision(error: &Error, replay_safe: bool) -> DeliveryDecision {
    match error.failure_class() {
        Some(FailureClass::PossiblyApplied) if replay_safe => DeliveryDecision::Retry,
        Some(FailureClass::PossiblyApplied) => DeliveryDecision::InDoubt,
        Some(
            FailureClass::Refused
            | FailureClass::Unavailable
            | FailureClass::NotSent
            | FailureClass::CredentialsRejected,
        ) => DeliveryDecision::Retry,
        Some(FailureClass::Permanent) => DeliveryDecision::Failed,
        None => match error.code() {
            ErrorCode::Unavailable
            | ErrorCode::ResourceExhausted
            | ErrorCode::DeadlineExceeded
            | ErrorCode::Aborted
            | ErrorCode::Cancelled => DeliveryDecision::Retry,
            _ => DeliveryDecision::Failed,
        },
    }
}

/// An error of a failed upstream attempt of `class`, for tests that decide on the class.
#[cfg(test)]
pub(crate) fn upstream_failure(class: FailureClass) -> Error {
    Error::new(
        ErrorCode::Unavailable,
        crate::error::Reason::UpstreamUnavailable,
        "failed",
    )
    .with_failure_class(class)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;

    fn upstream(class: FailureClass) -> Error {
        upstream_failure(class)
    }

    /// Every case of the classification, from the HTTP outcome to the outbox's decision, for a
    /// write that must not be sent twice and for one that may.
    #[test]
    fn every_failure_is_decided_by_what_the_upstream_can_have_done() {
        use DeliveryDecision::{Failed, InDoubt, Retry};
        use FailureClass::*;
        let classes: [(&[u16], FailureClass, DeliveryDecision, DeliveryDecision); 5] = [
            // (statuses, class, unsafe write, replay-safe write)
            (&[429, 408], Refused, Retry, Retry),
            (&[503], Unavailable, Retry, Retry),
            (&[500, 502, 504, 599], PossiblyApplied, InDoubt, Retry),
            (&[401, 403], CredentialsRejected, Retry, Retry),
            (&[400, 404, 409, 422], Permanent, Failed, Failed),
        ];
        for (statuses, class, unsafe_write, safe_write) in classes {
            for &status in statuses {
                assert_eq!(FailureClass::of_status(status), class, "http {status}");
                let error = upstream(class);
                let decisions = (
                    delivery_decision(&error, false),
                    delivery_decision(&error, true),
                );
                assert_eq!(decisions, (unsafe_write, safe_write), "http {status}");
            }
        }
        // Transport failures are classified by the transport (see `http::transport_class`).
        for (class, unsafe_write) in [(NotSent, Retry), (PossiblyApplied, InDoubt)] {
            assert_eq!(delivery_decision(&upstream(class), false), unsafe_write);
            assert_eq!(delivery_decision(&upstream(class), true), Retry);
        }
        // Refusals inside the gateway never reached an upstream.
        for (code, decision) in [
            (ErrorCode::ResourceExhausted, Retry),
            (ErrorCode::Unavailable, Retry),
            (ErrorCode::DeadlineExceeded, Retry),
            (ErrorCode::Aborted, Retry),
            (ErrorCode::Cancelled, Retry),
            (ErrorCode::InvalidArgument, Failed),
            (ErrorCode::NotFound, Failed),
            (ErrorCode::FailedPrecondition, Failed),
            (ErrorCode::Internal, Failed),
        ] {
            let error = Error::new(code, Reason::Internal, "refused");
            assert_eq!(delivery_decision(&error, false), decision, "{code:?}");
            assert_eq!(delivery_decision(&error, true), decision, "{code:?}");
        }
    }

    #[test]
    fn only_possibly_applied_failures_may_have_acted() {
        use FailureClass::*;
        for class in [
            Refused,
            Unavailable,
            NotSent,
            CredentialsRejected,
            Permanent,
        ] {
            assert!(class.surely_not_applied(), "{class:?}");
        }
        assert!(!PossiblyApplied.surely_not_applied());
        assert!(!Permanent.may_pass() && !CredentialsRejected.may_pass());
    }
}
