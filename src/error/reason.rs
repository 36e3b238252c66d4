//! Every `ErrorInfo.reason` the gateway sends, as one enum.
//!
//! Callers branch on these strings, so each is part of the contract: the table below is the only
//! place they are spelled, and a test pins every one. Inside the gateway, decisions match on
//! [`Reason`] (or on the [`FailureClass`](crate::upstream::failure::FailureClass) an error
//! carries), never on the text.

use std::fmt;

/// Declares [`Reason`] with the wire string of each variant.
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $text:literal,)*) => {
        /// Why a call or an item failed, as `google.rpc.ErrorInfo.reason` carries it (and
        /// failed deliveries store it).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        stable_names!(Reason, "error reason", { $($variant = $text,)* });
    };
}

reasons! {
    // The caller and its call.
    /// The call carried no valid credentials.
    CallerUnauthenticated = "CALLER_UNAUTHENTICATED",
    /// The caller lacks the permission the RPC needs.
    PermissionDenied = "PERMISSION_DENIED",
    /// The caller used up its share of the upstream budget.
    CallerQuotaExceeded = "CALLER_QUOTA_EXCEEDED",
    /// The request's fields break the contract (with `BadRequest` violations).
    InvalidFields = "INVALID_FIELDS",
    /// The request bytes are not a message of the method's type.
    MalformedRequest = "MALFORMED_REQUEST",
    /// The caller's deadline passed.
    DeadlineExceeded = "DEADLINE_EXCEEDED",
    /// The idempotency key was used before with a different request.
    IdempotencyKeyReused = "IDEMPOTENCY_KEY_REUSED",
    /// The RPC (or the queued method) is not served by this build.
    NotImplemented = "NOT_IMPLEMENTED",
    /// A bug or broken invariant inside the gateway.
    Internal = "INTERNAL",

    // The gateway itself.
    /// The gateway is draining and takes no new upstream work.
    GatewayDraining = "GATEWAY_DRAINING",
    /// The gateway is shutting down and closes streams.
    ServerShuttingDown = "SERVER_SHUTTING_DOWN",
    /// The durable store cannot be used right now.
    StoreUnavailable = "STORE_UNAVAILABLE",

    // Surveys and feedback.
    /// No Retently campaign has the given id.
    CampaignNotFound = "CAMPAIGN_NOT_FOUND",
    /// The campaign list could not be read in time to check a campaign id.
    CampaignCheckTimeout = "CAMPAIGN_CHECK_TIMEOUT",
    /// The recipient opted out of surveys.
    RecipientUnsubscribed = "RECIPIENT_UNSUBSCRIBED",
    /// Retently's outbox history is too long to check what an earlier attempt sent.
    SurveyHistoryTooLong = "SURVEY_HISTORY_TOO_LONG",
    /// The survey cool-down record cannot be read, so no survey is sent (the guard fails
    /// closed, retryably).
    SurveyCooldownUnavailable = "SURVEY_COOLDOWN_UNAVAILABLE",
    /// A resume cursor points before what the feedback log still holds.
    CursorExpired = "CURSOR_EXPIRED",
    /// The feedback stream has as many subscribers as it admits.
    TooManySubscribers = "TOO_MANY_SUBSCRIBERS",
    /// Feedback ingestion stopped (the log cannot be written).
    FeedbackIngestStopped = "FEEDBACK_INGEST_STOPPED",

    // Asynchronous deliveries.
    /// No delivery with this id is visible to the caller.
    DeliveryNotFound = "DELIVERY_NOT_FOUND",
    /// The delivery is not in the dead letters, so it cannot be requeued.
    DeliveryNotDeadLettered = "DELIVERY_NOT_DEAD_LETTERED",
    /// The upstream may have applied the write; it was not sent again.
    DeliveryInDoubt = "DELIVERY_IN_DOUBT",
    /// Some items of a delivered write failed transiently and are attempted again.
    PartialDelivery = "PARTIAL_DELIVERY",

    // The upstream budget and breaker, before any request leaves.
    /// The upstream budget has no room before the call's deadline.
    UpstreamBudgetExhausted = "UPSTREAM_BUDGET_EXHAUSTED",
    /// The circuit breaker is open after repeated upstream failures.
    UpstreamCircuitOpen = "UPSTREAM_CIRCUIT_OPEN",
    /// No API key is configured for the upstream.
    UpstreamCredentialsMissing = "UPSTREAM_CREDENTIALS_MISSING",

    // What an upstream call came to.
    /// The upstream refused the gateway's credentials (401/403).
    UpstreamCredentialsRejected = "UPSTREAM_CREDENTIALS_REJECTED",
    /// The upstream answered that the gateway's credentials are invalid.
    UpstreamCredentialsInvalid = "UPSTREAM_CREDENTIALS_INVALID",
    /// The upstream refused the input (400/422).
    UpstreamInvalidArgument = "UPSTREAM_INVALID_ARGUMENT",
    /// The upstream refused one item of a batch.
    UpstreamItemRejected = "UPSTREAM_ITEM_REJECTED",
    /// The upstream has no such object (404).
    UpstreamNotFound = "UPSTREAM_NOT_FOUND",
    /// The upstream answered 409.
    UpstreamConflict = "UPSTREAM_CONFLICT",
    /// The upstream rate-limited the gateway (429, 408).
    UpstreamRateLimited = "UPSTREAM_RATE_LIMITED",
    /// The upstream failed (5xx).
    UpstreamUnavailable = "UPSTREAM_UNAVAILABLE",
    /// The upstream answered a status the gateway does not expect.
    UpstreamUnexpectedStatus = "UPSTREAM_UNEXPECTED_STATUS",
    /// The upstream's answer cannot be read.
    UpstreamMalformedResponse = "UPSTREAM_MALFORMED_RESPONSE",
    /// No connection to the upstream could be made; nothing was sent.
    UpstreamUnreachable = "UPSTREAM_UNREACHABLE",
    /// The upstream did not answer in time after the request left.
    UpstreamTimeout = "UPSTREAM_TIMEOUT",
    /// The connection failed after the request left.
    UpstreamConnectionFailed = "UPSTREAM_CONNECTION_FAILED",
    /// The replica sending a spooled survey stopped before it answered; it may have been sent.
    SurveySenderLost = "SURVEY_SENDER_LOST",

    // Alert deliveries.
    /// A queued alert cannot be read back.
    AlertUnreadable = "ALERT_UNREADABLE",
    /// The alert's rule is no longer in the alert rules file.
    AlertRuleRemoved = "ALERT_RULE_REMOVED",
    /// The alert receiver answered with a failure status.
    AlertReceiverFailed = "ALERT_RECEIVER_FAILED",
    /// The alert receiver could not be reached or did not answer.
    AlertReceiverUnreachable = "ALERT_RECEIVER_UNREACHABLE",
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire strings are the contract: callers match on them, and failed deliveries store
    /// them. Changing one is a breaking change, so this list changes only by adding.
    #[test]
    fn every_reason_keeps_its_wire_string() {
        use Reason as R;
        let expected = [
            (R::CallerUnauthenticated, "CALLER_UNAUTHENTICATED"),
            (R::PermissionDenied, "PERMISSION_DENIED"),
            (R::CallerQuotaExceeded, "CALLER_QUOTA_EXCEEDED"),
            (R::InvalidFields, "INVALID_FIELDS"),
            (R::MalformedRequest, "MALFORMED_REQUEST"),
            (R::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            (R::IdempotencyKeyReused, "IDEMPOTENCY_KEY_REUSED"),
            (R::NotImplemented, "NOT_IMPLEMENTED"),
            (R::Internal, "INTERNAL"),
            (R::GatewayDraining, "GATEWAY_DRAINING"),
            (R::ServerShuttingDown, "SERVER_SHUTTING_DOWN"),
            (R::StoreUnavailable, "STORE_UNAVAILABLE"),
            (R::CampaignNotFound, "CAMPAIGN_NOT_FOUND"),
            (R::CampaignCheckTimeout, "CAMPAIGN_CHECK_TIMEOUT"),
            (R::RecipientUnsubscribed, "RECIPIENT_UNSUBSCRIBED"),
            (R::SurveyHistoryTooLong, "SURVEY_HISTORY_TOO_LONG"),
            (R::SurveyCooldownUnavailable, "SURVEY_COOLDOWN_UNAVAILABLE"),
            (R::CursorExpired, "CURSOR_EXPIRED"),
            (R::TooManySubscribers, "TOO_MANY_SUBSCRIBERS"),
            (R::FeedbackIngestStopped, "FEEDBACK_INGEST_STOPPED"),
            (R::DeliveryNotFound, "DELIVERY_NOT_FOUND"),
            (R::DeliveryNotDeadLettered, "DELIVERY_NOT_DEAD_LETTERED"),
            (R::DeliveryInDoubt, "DELIVERY_IN_DOUBT"),
            (R::PartialDelivery, "PARTIAL_DELIVERY"),
            (R::UpstreamBudgetExhausted, "UPSTREAM_BUDGET_EXHAUSTED"),
            (R::UpstreamCircuitOpen, "UPSTREAM_CIRCUIT_OPEN"),
            (
                R::UpstreamCredentialsMissing,
                "UPSTREAM_CREDENTIALS_MISSING",
            ),
            (
                R::UpstreamCredentialsRejected,
                "UPSTREAM_CREDENTIALS_REJECTED",
            ),
            (
                R::UpstreamCredentialsInvalid,
                "UPSTREAM_CREDENTIALS_INVALID",
            ),
            (R::UpstreamInvalidArgument, "UPSTREAM_INVALID_ARGUMENT"),
            (R::UpstreamItemRejected, "UPSTREAM_ITEM_REJECTED"),
            (R::UpstreamNotFound, "UPSTREAM_NOT_FOUND"),
            (R::UpstreamConflict, "UPSTREAM_CONFLICT"),
            (R::UpstreamRateLimited, "UPSTREAM_RATE_LIMITED"),
            (R::UpstreamUnavailable, "UPSTREAM_UNAVAILABLE"),
            (R::UpstreamUnexpectedStatus, "UPSTREAM_UNEXPECTED_STATUS"),
            (R::UpstreamMalformedResponse, "UPSTREAM_MALFORMED_RESPONSE"),
            (R::UpstreamUnreachable, "UPSTREAM_UNREACHABLE"),
            (R::UpstreamTimeout, "UPSTREAM_TIMEOUT"),
            (R::UpstreamConnectionFailed, "UPSTREAM_CONNECTION_FAILED"),
            (R::SurveySenderLost, "SURVEY_SENDER_LOST"),
            (R::AlertUnreadable, "ALERT_UNREADABLE"),
            (R::AlertRuleRemoved, "ALERT_RULE_REMOVED"),
            (R::AlertReceiverFailed, "ALERT_RECEIVER_FAILED"),
            (R::AlertReceiverUnreachable, "ALERT_RECEIVER_UNREACHABLE"),
        ];
        assert_eq!(
            expected.len(),
            Reason::ALL.len(),
            "a reason without a pinned string"
        );
        for (reason, text) in expected {
            assert_eq!(reason.as_str(), text);
            assert_eq!(Reason::parse(text), Some(reason), "{text}");
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<Reason>(&json).unwrap(), reason);
        }
        assert_eq!(Reason::parse("UPSTREAM_SOMETHING_ELSE"), None);
    }
}
