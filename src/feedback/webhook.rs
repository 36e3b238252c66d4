//! Ingestion of Retently's campaign "webhook export" calls (`POST /webhooks/retently` on the
//! admin port; the HTTP side lives in `crate::admin`).
//!
//! Retently lets each campaign POST a user-defined JSON template to a URL with custom headers,
//! and documents neither a default body nor a signature. The gateway therefore asks for:
//!
//! - a shared secret in a custom header (`x-cx-webhook-secret` unless configured otherwise),
//!   compared in constant time; calls without it, or with another value, are refused (401);
//! - optionally, when a signing secret is configured, `X-Cx-Signature: t=<unix seconds>,
//!   v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` with `t` within the tolerance of the gateway's
//!   clock; unsigned, forged and stale calls are refused (401). Several `v1` values may be sent
//!   (secret rotation); one matching is enough;
//! - a body whose feedback object is the same object `GET /api/v2/feedback` lists, under a
//!   `feedback` key: `{"event": "feedback.created", "feedback": { ...every field... }}`. A bare
//!   feedback object, a `feedback` array, or an array of either are read too; a call with an
//!   `event` but no `feedback` (opt-outs, bounces) is accepted and ignored. Anything else is
//!   malformed (400). A template that leaves fields out makes the poller's full version look
//!   like a change (an UPDATED event), so configure every field.
//!
//! A valid call's responses reach the log (and subscribers) before the call is answered;
//! responses already known are left to the poller, which alone reports changes. Rejections are
//! counted by reason and logged without the body or any header value.
//!
//! Each call is a root span `feedback.webhook` with counts only (items received, new,
//! duplicates) and its outcome: never a response's content, a header value or the secret.

use std::sync::Arc;
use std::time::Duration;

use ring::hmac;
use serde_json::Value;
use tracing::Instrument as _;

use super::clock::Clock;
use super::convert::feedback_from_json;
use super::ingest::Ingest;
use super::log::{Observed, Origin};
use super::stats::FeedbackStats;
use crate::config::Secret;
use crate::error::Error;

/// The default header carrying the shared secret.
pub const DEFAULT_SECRET_HEADER: &str = "x-cx-webhook-secret";

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-cx-signature";

/// Responses accepted in one call at most (Retently sends one per call).
const MAX_ITEMS: usize = 1000;

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub secret: Secret,
    /// Lower-case name of the header carrying `secret`.
    pub secret_header: String,
    pub signing_secret: Option<Secret>,
    /// How far a signature's timestamp may be from the gateway's clock.
    pub tolerance: Duration,
    pub max_body_bytes: usize,
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No shared secret, or a wrong one.
    Unauthenticated,
    /// Signing is required and the signature is missing, unreadable or wrong.
    BadSignature,
    /// The signature's timestamp is outside the tolerance.
    Stale,
    /// The body is not one of the accepted shapes, or a response in it lacks an id or date.
    Malformed,
    TooLarge,
}

impl Rejection {
    /// The HTTP status the caller gets.
    pub fn status(self) -> u16 {
        match self {
            Rejection::Unauthenticated | Rejection::BadSignature | Rejection::Stale => 401,
            Rejection::Malformed => 400,
            Rejection::TooLarge => 413,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Rejection::Unauthenticated => "unauthenticated",
            Rejection::BadSignature => "bad_signature",
            Rejection::Stale => "stale_signature",
            Rejection::Malformed => "malformed_body",
            Rejection::TooLarge => "body_too_large",
        }
    }
}

/// What a valid call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Receipt {
    /// Responses in the call.
    pub received: usize,
    /// Responses the log did not know.
    pub created: u64,
}

#[derive(Debug)]
pub enum ReceiveError {
    Rejected(Rejection),
    /// The call was valid but could not be stored; the sender should retry.
    Failed(Error),
}

pub struct WebhookReceiver {
    settings: WebhookSettings,
    /// Random per process: comparing HMACs of the two secrets under it compares them in
    /// constant time (the time does not depend on where they differ, nor on their lengths).
    compare_key: hmac::Key,
    expected_secret_tag: hmac::Tag,
    signing_key: Option<hmac::Key>,
    ingest: Ingest,
    clock: Clock,
    stats: Arc<FeedbackStats>,
}

impl std::fmt::Debug for WebhookReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookReceiver")
            .field("secret_header", &self.settings.secret_header)
            .field("signed", &self.signing_key.is_some())
            .finish()
    }
}

impl WebhookReceiver {
    pub fn new(
        settings: WebhookSettings,
        ingest: Ingest,
        clock: Clock,
        stats: Arc<FeedbackStats>,
    ) -> Result<WebhookReceiver, Error> {
        let compare_key = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .map_err(|_| Error::internal("cannot draw a random key for webhook checks"))?;
        let expected_secret_tag = hmac::sign(&compare_key, settings.secret.expose().as_bytes());
        let signing_key = settings
            .signing_secret
            .as_ref()
            .map(|secret| hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes()));
        Ok(WebhookReceiver {
            settings,
            compare_key,
            expected_secret_tag,
            signing_key,
            ingest,
            clock,
            stats,
        })
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    /// Checks, reads and stores one call. `secret` and `signature` are the raw header values.
    pub async fn receive(
        &self,
        secret: Option<&[u8]>,
        signature: Option<&[u8]>,
        body: &[u8],
    ) -> Result<Receipt, ReceiveError> {
        let span = call_span();
        self.receive_in(secret, signature, body, &span)
            .instrument(span.clone())
            .await
    }

    async fn receive_in(
        &self,
        secret: Option<&[u8]>,
        signature: Option<&[u8]>,
        body: &[u8],
        span: &tracing::Span,
    ) -> Result<Receipt, ReceiveError> {
        let observations = self
            .check(secret, signature, body)
            .map_err(|rejection| self.refuse(rejection, span))?;
        let received = observations.len();
        span.record("feedback.items.received", received);
        let counts = self
            .ingest
            .submit(Origin::Webhook, observations, None)
            .await
            .map_err(|error| {
                FeedbackStats::add(&self.stats.webhook_failed, 1);
                span.record("outcome", "failed");
                span.record("error.type", error.reason().as_str());
                span.record("otel.status_code", "ERROR");
                tracing::warn!(%error, "cannot store a webhook call, the sender should retry");
                ReceiveError::Failed(error)
            })?;
        FeedbackStats::add(&self.stats.webhook_accepted, 1);
        span.record("feedback.items.new", counts.created);
        span.record(
            "feedback.items.duplicates",
            counts.unchanged + counts.ignored,
        );
        span.record("outcome", "accepted");
        Ok(Receipt {
            received,
            created: counts.created,
        })
    }

    /// Counts and logs a rejection made before the call reached [`WebhookReceiver::receive`]
    /// (a body over the limit), in a span of its own (without the body or header values).
    pub fn reject(&self, rejection: Rejection) -> ReceiveError {
        let span = call_span();
        let _entered = span.enter();
        self.refuse(rejection, &span)
    }

    /// Counts and logs a rejection (without the body or header values).
    fn refuse(&self, rejection: Rejection, span: &tracing::Span) -> ReceiveError {
        span.record("outcome", rejection.reason());
        let counter = match rejection {
            Rejection::Unauthenticated => &self.stats.webhook_rejected_unauthenticated,
            Rejection::BadSignature => &self.stats.webhook_rejected_signature,
            Rejection::Stale => &self.stats.webhook_rejected_stale,
            Rejection::Malformed => &self.stats.webhook_rejected_malformed,
            Rejection::TooLarge => &self.stats.webhook_rejected_too_large,
        };
        FeedbackStats::add(counter, 1);
        tracing::warn!(
            reason = rejection.reason(),
            status = rejection.status(),
            "webhook call rejected"
        );
        ReceiveError::Rejected(rejection)
    }

    fn check(
        &self,
        secret: Option<&[u8]>,
        signature: Option<&[u8]>,
        body: &[u8],
    ) -> Result<Vec<Observed>, Rejection> {
        let secret = secret.ok_or(Rejection::Unauthenticated)?;
        hmac::verify(
            &self.compare_key,
            secret.trim_ascii(),
            self.expected_secret_tag.as_ref(),
        )
        .map_err(|_| Rejection::Unauthenticated)?;
        if let Some(key) = &self.signing_key {
            let now = self.clock.now_ms().div_euclid(1000);
            verify_signature(key, signature, body, now, self.settings.tolerance)?;
        }
        if body.len() > self.settings.max_body_bytes {
            return Err(Rejection::TooLarge);
        }
        read_body(body)
    }
}

/// Reads the responses of an authenticated call body (see the module comment for the accepted
/// shapes), as the receiver does before storing them. Public so that the fuzz targets reach it
/// without a store.
pub fn read_body(body: &[u8]) -> Result<Vec<Observed>, Rejection> {
    feedback_items(body)?
        .into_iter()
        .map(|item| {
            feedback_from_json(item)
                .map(|feedback| Observed::new(&feedback))
                .map_err(|_| Rejection::Malformed)
        })
        .collect()
}

/// The span of one webhook call: a root (the sender is outside every trace of the gateway) that
/// holds only counts and a fixed outcome.
fn call_span() -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "feedback.webhook",
        otel.kind = "server",
        feedback.items.received = tracing::field::Empty,
        feedback.items.new = tracing::field::Empty,
        feedback.items.duplicates = tracing::field::Empty,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// Verifies `t=<unix>,v1=<hex>[,v1=<hex>...]` over `"<t>.<body>"`: `header` is the raw
/// signature header, `key` the signing secret's HMAC-SHA256 key. Public so that the fuzz targets
/// reach it without a store.
pub fn verify_signature(
    key: &hmac::Key,
    header: Option<&[u8]>,
    body: &[u8],
    now_unix: i64,
    tolerance: Duration,
) -> Result<(), Rejection> {
    let header = header
        .and_then(|raw| std::str::from_utf8(raw).ok())
        .ok_or(Rejection::BadSignature)?;
    let mut timestamp: Option<i64> = None;
    let mut candidates: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let Some((name, value)) = part.trim().split_once('=') else {
            return Err(Rejection::BadSignature);
        };
        match name.trim() {
            "t" => timestamp = Some(value.trim().parse().map_err(|_| Rejection::BadSignature)?),
            "v1" => candidates.push(decode_hex(value.trim()).ok_or(Rejection::BadSignature)?),
            // Unknown schemes are skipped, as signature formats of this style specify.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(Rejection::BadSignature)?;
    if candidates.is_empty() {
        return Err(Rejection::BadSignature);
    }
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now_unix.abs_diff(timestamp) > tolerance.unsigned_abs() {
        return Err(Rejection::Stale);
    }
    let mut signed = Vec::with_capacity(body.len() + 24);
    signed.extend_from_slice(timestamp.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    if candidates
        .iter()
        .any(|candidate| hmac::verify(key, &signed, candidate).is_ok())
    {
        Ok(())
    } else {
        Err(Rejection::BadSignature)
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The feedback objects of a call body (see the module comment for the accepted shapes).
fn feedback_items(body: &[u8]) -> Result<Vec<Value>, Rejection> {
    let value: Value = serde_json::from_slice(body).map_err(|_| Rejection::Malformed)?;
    let mut items = Vec::new();
    match value {
        Value::Array(envelopes) => {
            for envelope in envelopes {
                collect(envelope, &mut items)?;
            }
        }
        other => collect(other, &mut items)?,
    }
    if items.len() > MAX_ITEMS {
        return Err(Rejection::Malformed);
    }
    Ok(items)
}

fn collect(value: Value, items: &mut Vec<Value>) -> Result<(), Rejection> {
    let Value::Object(mut fields) = value else {
        return Err(Rejection::Malformed);
    };
    match fields.remove("feedback") {
        Some(Value::Object(feedback)) => items.push(Value::Object(feedback)),
        Some(Value::Array(list)) => {
            for feedback in list {
                if !feedback.is_object() {
                    return Err(Rejection::Malformed);
                }
                items.push(feedback);
            }
        }
        Some(_) => return Err(Rejection::Malformed),
        None if fields.contains_key("id") && fields.contains_key("createdDate") => {
            items.push(Value::Object(fields));
        }
        // Another event of the campaign export (an opt-out, a bounce): nothing to log.
        None if fields.contains_key("event") => {}
        None => return Err(Rejection::Malformed),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sign(secret: &str, t: i64, body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let mut signed = t.to_string().into_bytes();
        signed.push(b'.');
        signed.extend_from_slice(body);
        let tag = hmac::sign(&key, &signed);
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("t={t},v1={hex}")
    }

    #[test]
    fn signatures_are_checked_for_key_body_and_age() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"whsec");
        let body = br#"{"a":1}"#;
        let tolerance = Duration::from_secs(300);
        let now = 1_700_000_000;
        let good = sign("whsec", now - 10, body);
        assert_eq!(
            verify_signature(&key, Some(good.as_bytes()), body, now, tolerance),
            Ok(())
        );
        let rotated = format!("{good},v1={}", "00".repeat(32));
        assert_eq!(
            verify_signature(&key, Some(rotated.as_bytes()), body, now, tolerance),
            Ok(())
        );
        let forged = sign("other", now, body);
        assert_eq!(
            verify_signature(&key, Some(forged.as_bytes()), body, now, tolerance),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            verify_signature(&key, Some(good.as_bytes()), br#"{"a":2}"#, now, tolerance),
            Err(Rejection::BadSignature)
        );
        let stale = sign("whsec", now - 301, body);
        assert_eq!(
            verify_signature(&key, Some(stale.as_bytes()), body, now, tolerance),
            Err(Rejection::Stale)
        );
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz", "garbage"] {
            assert_eq!(
                verify_signature(&key, Some(bad.as_bytes()), body, now, tolerance),
                Err(Rejection::BadSignature),
                "{bad}"
            );
        }
        assert_eq!(
            verify_signature(&key, None, body, now, tolerance),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn bodies_of_every_documented_shape_are_read() {
        let item = json!({"id": "f1", "createdDate": "2024-01-01T00:00:00Z"});
        let shapes = [
            json!({"event": "feedback.created", "feedback": item}),
            item.clone(),
            json!({"feedback": [item, item]}),
            json!([{"event": "feedback.created", "feedback": item}, item]),
        ];
        let counts: Vec<usize> = shapes
            .iter()
            .map(|shape| feedback_items(shape.to_string().as_bytes()).unwrap().len())
            .collect();
        assert_eq!(counts, vec![1, 1, 2, 2]);
        assert_eq!(
            feedback_items(br#"{"event":"contact.unsubscribed","email":"a@b.c"}"#).unwrap(),
            Vec::<Value>::new()
        );
        for bad in [
            &b"not json"[..],
            b"42",
            br#"{"hello":"world"}"#,
            br#"{"feedback":"f1"}"#,
            br#"{"feedback":[1]}"#,
        ] {
            assert_eq!(feedback_items(bad), Err(Rejection::Malformed));
        }
    }

    #[test]
    fn hex_decoding_is_strict() {
        assert_eq!(decode_hex("00ff"), Some(vec![0, 255]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("é0"), None);
    }
}
