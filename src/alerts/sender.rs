//! Puts queued alerts on the wire: the outbox's executor for [`ALERT_METHOD`] deliveries.
//!
//! Each attempt is an HTTP POST to the URL of the rule in force, with `Cx-Alert-Id` (the delivery
//! id, the same on every attempt, by which a receiver drops repeats) and, for signed JSON,
//! `Cx-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` (Stripe's webhook
//! scheme; signed afresh per attempt, so a receiver may reject old timestamps). Receiver answers
//! map to the outbox's failure classes like upstream answers do: 2xx is delivered; 408, 429 and
//! 5xx are retried with backoff (an alert is safe to repeat); other 4xx are dead-lettered.

use std::time::Duration;

use crate::alerts::metrics::{AlertOutcomeLabel, count};
use crate::alerts::payload::{ALERT_METHOD, AlertRecord};
use crate::alerts::rules::{Format, RuleSet};
use crate::domain::outbox::{Attempt, DeliveryAttempt, DeliveryError};
use crate::error::{Error, ErrorCode, Reason};
use crate::upstream::failure::FailureClass;

/// Longest wait for a receiver's answer; a receiver that takes longer is retried.
const RECEIVER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The header carrying the signature of signed-json alerts.
pub const SIGNATURE_HEADER: &str = "cx-signature";
/// The header carrying the alert's id (its delivery id).
pub const ALERT_ID_HEADER: &str = "cx-alert-id";

/// `t=<unix>,v1=<hex>`: HMAC-SHA256 with `secret` over `"<unix>.<body>"`.
pub fn signature(secret: &[u8], unix_seconds: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(unix_seconds.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_seconds},v1={hex}")
}

/// Sends alerts; cheap to clone.
#[derive(Debug, Clone)]
pub struct AlertSender {
    /// `None` when no rules file is configured: alerts queued before it was removed fail.
    rules: Option<RuleSet>,
    client: reqwest::Client,
}

fn failed(code: ErrorCode, reason: Reason, message: impl Into<String>) -> Attempt {
    Attempt::Failed {
        error: DeliveryError::from(&Error::new(code, reason, message)),
    }
}

impl AlertSender {
    pub fn new(rules: Option<RuleSet>) -> Result<AlertSender, Error> {
        // reqwest is built without a crypto provider; see `upstream::http`.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            // A redirect could take the alert (and its signature) elsewhere: reported, not followed.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(RECEIVER_TIMEOUT)
            .user_agent(concat!("cx-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| {
                Error::internal(format!(
                    "cannot build the alert http client: {}",
                    error.without_url()
                ))
            })?;
        Ok(AlertSender { rules, client })
    }

    /// One attempt of the alert queued as `request` under `delivery_id`.
    pub async fn deliver(&self, request: &[u8], delivery_id: &str) -> Attempt {
        let record: AlertRecord = match serde_json::from_slice(request) {
            Ok(record) => record,
            Err(error) => {
                return failed(
                    ErrorCode::Internal,
                    Reason::AlertUnreadable,
                    format!("the queued alert cannot be read: {error}"),
                );
            }
        };
        let rules = self.rules.as_ref().map(RuleSet::current);
        let Some(rule) = rules.as_ref().and_then(|rules| rules.get(&record.rule)) else {
            count(&record.rule, AlertOutcomeLabel::Failed);
            return failed(
                ErrorCode::FailedPrecondition,
                Reason::AlertRuleRemoved,
                format!(
                    "rule `{}` is no longer in the alert rules file (requeue once it is back)",
                    record.rule
                ),
            );
        };
        let (body, content_type) = match rule.format {
            Format::SignedJson => (record.json_body(delivery_id), "application/json"),
            Format::Slack => (record.slack_body(delivery_id), "application/json"),
        };
        let mut builder = self
            .client
            .post(rule.url.expose())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(ALERT_ID_HEADER, delivery_id);
        if let Some(secret) = &rule.secret {
            let now = chrono::Utc::now().timestamp();
            builder = builder.header(
                SIGNATURE_HEADER,
                signature(secret.expose().as_bytes(), now, &body),
            );
        }
        let attempt = match builder.body(body).send().await {
            Ok(response) if response.status().is_success() => {
                Attempt::Delivered { result: Vec::new() }
            }
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let class = FailureClass::of_status(status);
                let code = if class.may_pass() {
                    ErrorCode::Unavailable
                } else {
                    ErrorCode::FailedPrecondition
                };
                let mut error = Error::new(
                    code,
                    Reason::AlertReceiverFailed,
                    format!(
                        "the alert receiver of rule `{}` answered {status}",
                        rule.name
                    ),
                )
                .with_metadata("status", status.to_string())
                .with_failure_class(class);
                if let Some(delay) = retry_after {
                    error = error.with_retry_after(delay);
                }
                crate::domain::writes::attempt_failed(&error, true)
            }
            Err(error) => {
                // Before the request was written nothing can have been received; after, the
                // receiver may have it, which is harmless (it drops repeats by their id).
                let class = if error.is_connect() {
                    FailureClass::NotSent
                } else {
                    FailureClass::PossiblyApplied
                };
                let error = Error::new(
                    ErrorCode::Unavailable,
                    Reason::AlertReceiverUnreachable,
                    format!(
                        "the alert receiver of rule `{}` could not be reached: {}",
                        rule.name,
                        error.without_url()
                    ),
                )
                .with_failure_class(class);
                crate::domain::writes::attempt_failed(&error, true)
            }
        };
        count(
            &record.rule,
            match attempt {
                Attempt::Delivered { .. } => AlertOutcomeLabel::Sent,
                _ => AlertOutcomeLabel::Failed,
            },
        );
        attempt
    }
}

/// The outbox executor that sends alerts itself and hands every other delivery to the write
/// executor.
pub struct AlertAwareExecutor<E> {
    pub alerts: AlertSender,
    pub writes: E,
}

#[tonic::async_trait]
impl<E: crate::domain::outbox::Executor> crate::domain::outbox::Executor for AlertAwareExecutor<E> {
    async fn execute(&self, delivery: DeliveryAttempt<'_>) -> Attempt {
        // Alerts go to the rule's receiver, not to an upstream, so no caller's share applies.
        if delivery.method == ALERT_METHOD {
            self.alerts
                .deliver(delivery.request, delivery.delivery_id)
                .await
        } else {
            self.writes.execute(delivery).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of Stripe's documentation scheme, computed independently: HMAC-SHA256 of
    /// "1700000000.{}" with key "whsec".
    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        let header = signature(b"whsec", 1_700_000_000, b"{}");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"whsec");
        let expected = ring::hmac::sign(&key, b"1700000000.{}");
        let hex: String = expected
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(header, format!("t=1700000000,v1={hex}"));
        assert_ne!(signature(b"other", 1_700_000_000, b"{}"), header);
    }
}
