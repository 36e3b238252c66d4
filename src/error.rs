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

/// `ErrorInfo.domain` of every error the gateway produces.
pub const ERROR_DOMAIN: &str = "cx-gateway";

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
    reason: &'static str,
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
    pub fn new(code: ErrorCode, reason: &'static str, message: impl Into<String>) -> Self {
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
        Self::new(ErrorCode::InvalidArgument, "INVALID_FIELDS", message).with_violations(violations)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, "INTERNAL", message)
    }

    pub fn unimplemented(what: &str) -> Self {
        Self::new(
            ErrorCode::Unimplemented,
            "NOT_IMPLEMENTED",
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

    pub fn reason(&self) -> &'static str {
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

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let error = *error.0;
        let mut details = ErrorDetails::new();
        details.set_error_info(error.reason, ERROR_DOMAIN, error.metadata);
        for violation in error.violations {
            details.add_bad_request_violation(violation.field, violation.description);
        }
        if let Some(delay) = error.retry_after {
            details.set_retry_info(Some(delay));
        }
        tonic::Status::with_error_details(error.code.grpc_code(), error.message, details)
    }
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
