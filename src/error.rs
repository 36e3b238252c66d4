//! The gateway's one error type and its one mapping to `tonic::Status`.
//!
//! Domain code, upstream clients and the scheduler all return [`Error`]; only [`From<Error> for
//! tonic::Status`](#impl-From<Error>-for-Status) knows about gRPC. Every status the gateway sends
//! carries a `google.rpc.ErrorInfo` (reason in UPPER_SNAKE_CASE, domain [`ERROR_DOMAIN`]), plus a
//! `BadRequest` with field violations for bad input and a `RetryInfo` when coming back later helps.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tonic_types::{ErrorDetails, StatusExt};

use crate::upstream::failure::FailureClass;

pub use self::reason::Reason;

/// `ErrorInfo.domain` of every error the gateway produces.
pub const ERROR_DOMAIN: &str = "cx-gateway";

/// Trailer with which gRPC runtimes (grpc-go, grpc-java, grpc-core, grpc-js) let a server steer
/// the retries of a service config's retry policy (gRFC A6); they do not read `RetryInfo`.
pub const RETRY_PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// The longest `RetryInfo` delay a client runtime is asked to wait out by itself. A runtime
/// sleeps a pushback without looking at the call's deadline, so a longer wait would turn the
/// refusal into a late DEADLINE_EXCEEDED without details; beyond this the pushback says "do not
/// retry" and the application, which sees RetryInfo, decides.
pub const MAX_TRANSPARENT_RETRY_DELAY: Duration = Duration::from_secs(5);

/// The small set of outcomes the gateway distinguishes; each maps to exactly one gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Cancelled,
    Unauthenticated,
    PermissionDenied,
    Aborted,
    Unimplemented,
    Internal,
}

/// Gives an enum the stable names it is known by outside the process (on the wire, in the
/// store): `ALL`, `as_str`, `parse`, and serde as those names. `$what` names the kind in the
/// error for an unknown name.
macro_rules! stable_names {
    ($type:ident, $what:literal, { $($variant:ident = $text:literal,)* }) => {
        impl $type {
            /// Every value, in the order of its table.
            pub const ALL: &[$type] = &[$($type::$variant,)*];

            /// The stable name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($type::$variant => $text,)*
                }
            }

            /// The value a stable name names; `None` for a name this build does not know.
            pub fn parse(text: &str) -> Option<$type> {
                match text {
                    $($text => Some($type::$variant),)*
                    _ => None,
                }
            }
        }

        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(
                &self,
                serializer: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(
                deserializer: D,
            ) -> std::result::Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                $type::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!(concat!("unknown ", $what, " `{}`"), text))
                })
            }
        }
    };
}

// The names of the gRPC codes the gateway's codes map to: how failed deliveries store them (a
// name survives a renumbering; see the outbox).
stable_names!(ErrorCode, "error code", {
    InvalidArgument = "INVALID_ARGUMENT",
    NotFound = "NOT_FOUND",
    AlreadyExists = "ALREADY_EXISTS",
    FailedPrecondition = "FAILED_PRECONDITION",
    OutOfRange = "OUT_OF_RANGE",
    ResourceExhausted = "RESOURCE_EXHAUSTED",
    Unavailable = "UNAVAILABLE",
    DeadlineExceeded = "DEADLINE_EXCEEDED",
    Cancelled = "CANCELLED",
    Unauthenticated = "UNAUTHENTICATED",
    PermissionDenied = "PERMISSION_DENIED",
    Aborted = "ABORTED",
    Unimplemented = "UNIMPLEMENTED",
    Internal = "INTERNAL",
});

// After `stable_names!`, which it uses.
mod reason;

impl ErrorCode {
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::AlreadyExists => tonic::Code::AlreadyExists,
            ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorCode::OutOfRange => tonic::Code::OutOfRange,
            ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            ErrorCode::Cancelled => tonic::Code::Cancelled,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorCode::Aborted => tonic::Code::Aborted,
            ErrorCode::Unimplemented => tonic::Code::Unimplemented,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }
}

/// One field of a request that failed validation, named by its path in the request
/// (`customers[3].properties.plan`), as `google.rpc.BadRequest.FieldViolation` expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// The gateway's error. Messages are lowercase, without a trailing period, and never contain a
/// secret: they are sent to callers and written to logs as they are.
#[derive(Debug, Clone)]
pub struct Error(Box<ErrorInner>);

/// Boxed so that `Result<T, Error>` stays one pointer wide on the happy path.
#[derive(Debug, Clone)]
struct ErrorInner {
    code: ErrorCode,
    reason: Reason,
    message: String,
    violations: Vec<FieldViolation>,
    retry_after: Option<Duration>,
    metadata: HashMap<String, String>,
    /// What the upstream can have done with the request, for errors of an upstream attempt;
    /// `None` for errors that never reached an upstream.
    failure_class: Option<FailureClass>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, reason: Reason, message: impl Into<String>) -> Self {
        Self(Box::new(ErrorInner {
            code,
            reason,
            message: message.into(),
            violations: Vec::new(),
            retry_after: None,
            metadata: HashMap::new(),
            failure_class: None,
        }))
    }

    /// Bad input: `INVALID_ARGUMENT` with one `BadRequest` violation per bad field.
    pub fn invalid_argument(violations: Vec<FieldViolation>) -> Self {
        let message = match violations.as_slice() {
            [only] => format!("invalid {}: {}", only.field, only.description),
            many => format!("{} invalid fields, see the BadRequest details", many.len()),
        };
        Self::new(ErrorCode::InvalidArgument, Reason::InvalidFields, message)
            .with_violations(violations)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, Reason::Internal, message)
    }

    pub fn unimplemented(what: &str) -> Self {
        Self::new(
            ErrorCode::Unimplemented,
            Reason::NotImplemented,
            format!("{what} is not implemented by this gateway"),
        )
    }

    /// Asks the caller to come back after `delay` (sent as `google.rpc.RetryInfo`).
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.0.retry_after = Some(delay);
        self
    }

    /// Adds an `ErrorInfo.metadata` entry (for example which upstream or which limit).
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.metadata.insert(key.into(), value.into());
        self
    }

    /// The same error under another code (the reason, message and details stay).
    pub fn with_code(mut self, code: ErrorCode) -> Self {
        self.0.code = code;
        self
    }

    /// Records what the upstream can have done with the failed request.
    pub fn with_failure_class(mut self, class: FailureClass) -> Self {
        self.0.failure_class = Some(class);
        self
    }

    pub fn with_violations(mut self, violations: Vec<FieldViolation>) -> Self {
        self.0.violations = violations;
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.0.code
    }

    pub fn reason(&self) -> Reason {
        self.0.reason
    }

    pub fn message(&self) -> &str {
        &self.0.message
    }

    pub fn violations(&self) -> &[FieldViolation] {
        &self.0.violations
    }

    pub fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.0.metadata
    }

    /// What the upstream can have done with the request; `None` if it never reached one.
    pub fn failure_class(&self) -> Option<FailureClass> {
        self.0.failure_class
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0.message, self.0.reason)
    }
}

impl std::error::Error for Error {}

/// Most field violations one status carries. A status travels in HTTP/2 trailers, and gRPC
/// C-core clients (Python, C++, Ruby, C#) refuse metadata over 16 KiB, reporting a
/// RESOURCE_EXHAUSTED without any details instead of the caller's mistakes; the first 50 are
/// plenty to fix a request, and the rest are counted.
pub const MAX_VIOLATIONS_SENT: usize = 50;
/// Longest field path and description sent, in bytes (a path into a deep Struct or a long
/// property name can be arbitrarily long).
const MAX_FIELD_BYTES: usize = 128;
const MAX_DESCRIPTION_BYTES: usize = 256;
/// Bytes of paths and descriptions sent in all: with the framing and base64 of
/// `grpc-status-details-bin` and the percent-encoded message this keeps the trailer under
/// 8 KiB, half of what C-core clients accept.
const MAX_VIOLATION_BYTES: usize = 4 * 1024;
/// Longest `grpc-message` sent, in bytes before percent-encoding.
const MAX_MESSAGE_BYTES: usize = 512;
/// `ErrorInfo.metadata` keys saying how many violations the request had and how many of them
/// the `BadRequest` leaves out.
pub const METADATA_VIOLATIONS: &str = "violations";
pub const METADATA_VIOLATIONS_OMITTED: &str = "violations_omitted";

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let ellipsis = '…';
    let mut end = max.saturating_sub(ellipsis.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push(ellipsis);
    text
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let mut error = *error.0;
        let total = error.violations.len();
        let mut sent = Vec::new();
        let mut bytes = 0;
        for violation in error.violations {
            let field = truncated(violation.field, MAX_FIELD_BYTES);
            let description = truncated(violation.description, MAX_DESCRIPTION_BYTES);
            bytes += field.len() + description.len();
            if sent.len() == MAX_VIOLATIONS_SENT || bytes > MAX_VIOLATION_BYTES {
                break;
            }
            sent.push((field, description));
        }
        let mut message = error.message;
        if sent.len() < total {
            let omitted = total - sent.len();
            error
                .metadata
                .insert(METADATA_VIOLATIONS.to_owned(), total.to_string());
            error
                .metadata
                .insert(METADATA_VIOLATIONS_OMITTED.to_owned(), omitted.to_string());
            message = format!(
                "{total} invalid fields; the BadRequest details list the first {} and leave out {omitted}",
                sent.len()
            );
        }
        let mut details = ErrorDetails::new();
        details.set_error_info(error.reason.as_str(), ERROR_DOMAIN, error.metadata);
        for (field, description) in sent {
            details.add_bad_request_violation(field, description);
        }
        if let Some(delay) = error.retry_after {
            details.set_retry_info(Some(delay));
        }
        let mut status = tonic::Status::with_error_details(
            error.code.grpc_code(),
            truncated(message, MAX_MESSAGE_BYTES),
            details,
        );
        if let Some(delay) = error.retry_after {
            status
                .metadata_mut()
                .insert(RETRY_PUSHBACK_HEADER, retry_pushback(delay));
        }
        status
    }
}

/// The pushback for a `RetryInfo` delay: the delay in whole milliseconds (rounded up, so a
/// client never comes back early), or `-1` ("do not retry by yourself") beyond
/// [`MAX_TRANSPARENT_RETRY_DELAY`].
fn retry_pushback(delay: Duration) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    if delay > MAX_TRANSPARENT_RETRY_DELAY {
        return tonic::metadata::MetadataValue::from_static("-1");
    }
    let millis = delay.as_nanos().div_ceil(1_000_000);
    tonic::metadata::MetadataValue::from(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// Collects every violation of a request before answering, so a caller fixes all of them at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// Records a violation unless `ok` holds; returns `ok` so callers can skip dependent checks.
    pub fn check(&mut self, ok: bool, field: impl Into<String>, description: &str) -> bool {
        if !ok {
            self.add(field, description);
        }
        ok
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `Ok(())` when nothing was recorded, else an `INVALID_ARGUMENT` error carrying them all.
    pub fn into_result(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid_argument(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_error_info_bad_request_and_retry_info() {
        let error = Error::invalid_argument(vec![
            FieldViolation::new("customers[3].email", "must be an email address"),
            FieldViolation::new(
                "customers[4].properties.plan",
                "must be at most 1000 characters",
            ),
        ])
        .with_retry_after(Duration::from_secs(2));
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let details = status.get_error_details();
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "INVALID_FIELDS");
        assert_eq!(info.domain, ERROR_DOMAIN);
        let bad_request = details.bad_request().expect("bad request");
        assert_eq!(bad_request.field_violations.len(), 2);
        assert_eq!(bad_request.field_violations[0].field, "customers[3].email");
        let retry = details.retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(2)));
    }

    fn pushback(status: &tonic::Status) -> Option<&str> {
        status
            .metadata()
            .get(RETRY_PUSHBACK_HEADER)
            .map(|value| value.to_str().expect("ascii pushback"))
    }

    #[test]
    fn retry_info_is_mirrored_as_a_pushback_for_client_retry_policies() {
        let busy = |delay| {
            tonic::Status::from(
                Error::new(ErrorCode::Unavailable, Reason::UpstreamUnavailable, "down")
                    .with_retry_after(delay),
            )
        };
        assert_eq!(pushback(&busy(Duration::from_secs(1))), Some("1000"));
        assert_eq!(pushback(&busy(Duration::from_micros(1500))), Some("2"));
        assert_eq!(pushback(&busy(Duration::ZERO)), Some("0"));
        assert_eq!(pushback(&busy(MAX_TRANSPARENT_RETRY_DELAY)), Some("5000"));
        // Longer than a transparent retry should wait: the application decides from RetryInfo.
        assert_eq!(pushback(&busy(Duration::from_secs(53))), Some("-1"));
        let refused = tonic::Status::from(Error::new(
            ErrorCode::NotFound,
            Reason::DeliveryNotFound,
            "no such delivery",
        ));
        assert_eq!(pushback(&refused), None);
    }

    #[test]
    fn single_violation_is_named_in_the_message() {
        let status = tonic::Status::from(Error::invalid_argument(vec![FieldViolation::new(
            "page_size",
            "must be between 0 and 1000",
        )]));
        assert_eq!(
            status.message(),
            "invalid page_size: must be between 0 and 1000"
        );
    }

    /// The bytes the status takes in HTTP/2 trailers, counted as HPACK's table size does (name,
    /// value and 32 bytes per entry), which is what gRPC clients hold against their limit.
    fn trailer_bytes(status: &tonic::Status) -> usize {
        let mut headers = tonic::codegen::http::HeaderMap::new();
        status.add_header(&mut headers).expect("valid headers");
        headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum()
    }

    #[test]
    fn a_thousand_violations_fit_a_small_trailer_and_say_how_many_were_left_out() {
        // Long paths and long descriptions with multi-byte characters: the worst case for size.
        let violations: Vec<FieldViolation> = (0..1000)
            .map(|i| {
                FieldViolation::new(
                    format!("records[{i}].items[0].fields.{}", "ключ".repeat(200)),
                    format!("must be at most 1000 characters, not {}", "é".repeat(500)),
                )
            })
            .collect();
        let status = tonic::Status::from(Error::invalid_argument(violations));
        assert!(
            trailer_bytes(&status) < 8 * 1024,
            "{}",
            trailer_bytes(&status)
        );
        let details = status.get_error_details();
        let sent = &details.bad_request().expect("bad request").field_violations;
        assert!(!sent.is_empty() && sent.len() <= MAX_VIOLATIONS_SENT);
        assert!(sent[0].field.starts_with("records[0].items[0].fields."));
        assert!(sent[0].field.len() <= MAX_FIELD_BYTES && sent[0].field.ends_with('…'));
        assert!(sent[0].description.len() <= MAX_DESCRIPTION_BYTES);
        let info = details.error_info().expect("error info");
        assert_eq!(info.metadata[METADATA_VIOLATIONS], "1000");
        assert_eq!(
            info.metadata[METADATA_VIOLATIONS_OMITTED],
            (1000 - sent.len()).to_string()
        );
        assert!(
            status.message().starts_with("1000 invalid fields"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn short_violations_are_sent_up_to_fifty() {
        let violations: Vec<FieldViolation> = (0..1000)
            .map(|i| FieldViolation::new(format!("emails[{i}]"), "is required"))
            .collect();
        let status = tonic::Status::from(Error::invalid_argument(violations));
        let details = status.get_error_details();
        assert_eq!(details.bad_request().unwrap().field_violations.len(), 50);
        assert_eq!(
            details.error_info().unwrap().metadata[METADATA_VIOLATIONS_OMITTED],
            "950"
        );
        assert!(trailer_bytes(&status) < 8 * 1024);
    }

    #[test]
    fn a_few_violations_are_sent_whole() {
        let status = tonic::Status::from(Error::invalid_argument(vec![
            FieldViolation::new("a", "bad"),
            FieldViolation::new("b", "bad"),
        ]));
        let details = status.get_error_details();
        assert_eq!(details.bad_request().unwrap().field_violations.len(), 2);
        assert!(details.error_info().unwrap().metadata.is_empty());
        assert_eq!(
            status.message(),
            "2 invalid fields, see the BadRequest details"
        );
    }

    #[test]
    fn violations_collect_all_failures() {
        let mut violations = Violations::new();
        assert!(violations.check(true, "a", "fine"));
        assert!(!violations.check(false, "b", "bad"));
        violations.add("c", "also bad");
        let error = violations.into_result().expect_err("two violations");
        assert_eq!(error.violations().len(), 2);
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
}
