//! The HTTP plumbing both clients share: building the `reqwest` client, sending one attempt,
//! classifying its failure once, and turning upstream answers into the gateway's [`Error`].
//!
//! Classification, by what the upstream can have done ([`FailureClass`], carried inside the
//! error): 429, 408, 503 and failures before the request was written (connect, DNS, TLS) surely
//! did not act; timeouts and resets after the request was written, 500, 502 and 504 may have;
//! 401/403 refuse the gateway's credentials; any other 4xx cannot pass. Mapping follows AIP-193: 400/422 →
//! `INVALID_ARGUMENT` with the upstream's field messages as violations; 401/403 → the gateway's
//! own credential problem (`FAILED_PRECONDITION`, never the caller's fault); 404 → `NOT_FOUND`;
//! 429 → `RESOURCE_EXHAUSTED` with `RetryInfo`; 5xx, connect errors and timeouts →
//! `UNAVAILABLE`. Every error carries `upstream` and `status` metadata and the route template
//! (never a URL: query strings can hold emails).

use std::fmt;
use std::time::Duration;

use opentelemetry::KeyValue;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument as _;

use crate::error::{Error, ErrorCode, FieldViolation, Reason};
use crate::upstream::scheduler::{AttemptError, FailureClass};

/// Largest response body read; a list of 1,000 feedback items is a few MB.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Connection set-up must not eat a whole attempt's time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Without `Retry-After`, a 429 or 5xx tells callers to come back after this long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One upstream operation as logs and errors name it: method and route template.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub template: &'static str,
    /// What a 404 means here ("customer", "template").
    pub resource: &'static str,
}

impl Route {
    pub const fn new(method: &'static str, template: &'static str, resource: &'static str) -> Self {
        Self {
            method,
            template,
            resource,
        }
    }

    fn http_method(&self) -> Method {
        Method::from_bytes(self.method.as_bytes()).unwrap_or(Method::GET)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.template)
    }
}

/// An answer with a 2xx status.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

/// What an upstream's own error body says, in the shape the mapping needs.
#[derive(Debug, Default)]
pub struct Rejection {
    /// Field violations parsed from the body (400/422).
    pub violations: Vec<FieldViolation>,
    /// The upstream's top-level message, if any.
    pub message: Option<String>,
    /// The body says the credentials were refused even though the status is not 401/403
    /// (Retainly answers 422 on `/events` for a bad key).
    pub credentials: bool,
}

/// Parses an upstream's error body; each upstream has its own.
pub type RejectionParser = fn(StatusCode, &[u8]) -> Rejection;

/// The transport of one upstream account: base URL, default headers (credentials), client.
#[derive(Clone)]
pub struct Transport {
    client: reqwest::Client,
    base: Url,
    upstream: &'static str,
    parse_rejection: RejectionParser,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client's default headers hold the credentials: print neither.
        f.debug_struct("Transport")
            .field("upstream", &self.upstream)
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// `headers` are sent with every request; credential values must already be marked
    /// sensitive so that no debug output of the client shows them.
    pub fn new(
        upstream: &'static str,
        base: Url,
        headers: HeaderMap,
        parse_rejection: RejectionParser,
    ) -> Result<Self, Error> {
        // reqwest is built without a crypto provider (`rustls-no-provider`); installing ring
        // once per process is enough, and a second install attempt is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .default_headers(headers)
            // A redirect could carry the credentials to another host, and no documented
            // endpoint redirects: a 3xx is reported, not followed.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("cx-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| {
                let cause = error.without_url();
                Error::internal(format!("cannot build the {upstream} http client: {cause}"))
            })?;
        Ok(Self {
            client,
            base,
            upstream,
            parse_rejection,
        })
    }

    pub fn upstream(&self) -> &'static str {
        self.upstream
    }

    /// The URL of `segments` under the base URL, each segment percent-encoded.
    fn url(&self, segments: &[&str]) -> Result<Url, Error> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| {
                Error::internal(format!("{} base url cannot have a path", self.upstream))
            })?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// Sends one attempt and returns a 2xx answer, or the classified failure.
    ///
    /// Each attempt is a client span (`http.request.method`, `url.template`, the response
    /// status, the retry number) carrying the W3C trace context to the upstream, and one
    /// measurement of `cxgw.upstream.requests` and its latency. The URL itself is never
    /// recorded: its path and query can hold emails.
    pub async fn send(
        &self,
        route: Route,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Answer, AttemptError> {
        let retry = crate::upstream::scheduler::current_retry();
        let span = tracing::info_span!(
            "upstream.http",
            otel.name = %route,
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            upstream = self.upstream,
            http.request.method = route.method,
            url.template = route.template,
            url.scheme = self.base.scheme(),
            server.address = self.base.host_str().unwrap_or_default(),
            server.port = self.base.port_or_known_default().unwrap_or_default(),
            http.request.resend_count = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        if retry > 0 {
            span.record("http.request.resend_count", retry);
        }
        let mut trace_headers = HeaderMap::new();
        span.in_scope(|| crate::telemetry::propagation::inject_current(&mut trace_headers));
        let started = tokio::time::Instant::now();
        let request = self.url(segments).map(|url| {
            let mut request = self
                .client
                .request(route.http_method(), url)
                .timeout(timeout)
                .headers(trace_headers)
                .header(reqwest::header::ACCEPT, "application/json");
            if !query.is_empty() {
                request = request.query(query);
            }
            if let Some(body) = body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
            }
            request
        });
        let result = self
            .attempt(route, request, timeout)
            .instrument(span.clone())
            .await;
        let outcome = match &result {
            Ok(answer) => Ok(answer.status.as_u16()),
            Err(failure) => {
                let status = failure.error.metadata().get("status").map(String::as_str);
                match status.and_then(|status| status.parse::<u16>().ok()) {
                    Some(code) => Ok(code),
                    None => Err(status.unwrap_or("error").to_owned()),
                }
            }
        };
        let mut attributes = vec![
            KeyValue::new("upstream", self.upstream),
            KeyValue::new("http.request.method", route.method),
            KeyValue::new("url.template", route.template),
        ];
        match outcome {
            Ok(code) => {
                span.record("http.response.status_code", code);
                if code >= 400 {
                    span.record("error.type", code);
                    span.record("otel.status_code", "ERROR");
                }
                attributes.push(KeyValue::new("http.response.status_code", i64::from(code)));
            }
            Err(kind) => {
                span.record("error.type", kind.as_str());
                span.record("otel.status_code", "ERROR");
                attributes.push(KeyValue::new("error.type", kind));
            }
        }
        let metrics = crate::telemetry::metrics();
        metrics.upstream_requests.add(1, &attributes);
        metrics
            .upstream_duration
            .record(started.elapsed().as_secs_f64(), &attributes);
        result
    }

    /// Sends the request `send` built (or reports why it could not be built) and classifies the
    /// answer; `timeout` is the request's bound, named in a timeout failure.
    async fn attempt(
        &self,
        route: Route,
        request: Result<reqwest::RequestBuilder, Error>,
        timeout: Duration,
    ) -> Result<Answer, AttemptError> {
        let request = request.map_err(AttemptError::permanent)?;
        let started = tokio::time::Instant::now();
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => return Err(self.transport_failure(route, &error, timeout)),
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let body = match read_body(response).await {
            Ok(body) => body,
            Err(BodyError::TooLarge) => {
                return Err(AttemptError::permanent(self.malformed(
                    route,
                    status,
                    format!("body larger than {MAX_BODY_BYTES} bytes"),
                )));
            }
            Err(BodyError::Transport(error)) => {
                return Err(self.transport_failure(route, &error, timeout));
            }
        };
        tracing::debug!(
            upstream = self.upstream,
            method = route.method,
            route = route.template,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "upstream answered"
        );
        if status.is_success() {
            return Ok(Answer { status, body });
        }
        let rejection = if status.is_client_error() {
            (self.parse_rejection)(status, &body)
        } else {
            Rejection::default()
        };
        Err(self.status_failure(route, status, retry_after, rejection))
    }

    /// Maps a non-2xx answer to the error callers see and the class retries use.
    fn status_failure(
        &self,
        route: Route,
        status: StatusCode,
        retry_after: Option<Duration>,
        rejection: Rejection,
    ) -> AttemptError {
        let upstream = self.upstream;
        let code = status.as_u16();
        // Retainly answers 422 on `/events` for a bad key: still the gateway's credentials.
        let class = if rejection.credentials {
            FailureClass::CredentialsRejected
        } else {
            FailureClass::of_status(code)
        };
        let error = if class == FailureClass::CredentialsRejected {
            Error::new(
                ErrorCode::FailedPrecondition,
                Reason::UpstreamCredentialsRejected,
                format!(
                    "{upstream} rejected the gateway's credentials; the configured api key needs attention"
                ),
            )
        } else {
            match code {
                400 | 422 => {
                    let message = match (&rejection.message, rejection.violations.as_slice()) {
                        (_, [only]) => format!(
                            "{upstream} rejected the request: {}: {}",
                            display_field(&only.field),
                            only.description
                        ),
                        (Some(message), []) => {
                            format!("{upstream} rejected the request: {message}")
                        }
                        (_, []) => format!("{upstream} rejected the request"),
                        (_, many) => format!(
                            "{upstream} rejected {} fields of the request, see the BadRequest details",
                            many.len()
                        ),
                    };
                    Error::new(
                        ErrorCode::InvalidArgument,
                        Reason::UpstreamInvalidArgument,
                        message,
                    )
                    .with_violations(rejection.violations)
                }
                404 => Error::new(
                    ErrorCode::NotFound,
                    Reason::UpstreamNotFound,
                    format!("{upstream} has no such {}", route.resource),
                ),
                408 | 429 => Error::new(
                    ErrorCode::ResourceExhausted,
                    Reason::UpstreamRateLimited,
                    format!("{upstream} refused the request for now (http {code})"),
                )
                .with_retry_after(retry_after.unwrap_or(DEFAULT_RETRY_AFTER)),
                409 => Error::new(
                    ErrorCode::Aborted,
                    Reason::UpstreamConflict,
                    format!("{upstream} reported a conflict"),
                ),
                500..=599 => Error::new(
                    ErrorCode::Unavailable,
                    Reason::UpstreamUnavailable,
                    format!("{upstream} failed to handle the request (http {code})"),
                )
                .with_retry_after(retry_after.unwrap_or(DEFAULT_RETRY_AFTER)),
                _ => Error::new(
                    ErrorCode::Internal,
                    Reason::UpstreamUnexpectedStatus,
                    format!("{upstream} answered with an unexpected http status {code}"),
                ),
            }
        };
        if class.may_pass() {
            tracing::debug!(upstream, route = %route, status = code, "transient upstream failure");
        } else if code != 404 && code != 400 && code != 422 {
            tracing::warn!(upstream, route = %route, status = code, "upstream refused a request");
        }
        AttemptError {
            error: self
                .decorate(error, route, &code.to_string())
                .with_failure_class(class),
            class,
            retry_after,
        }
    }

    fn transport_failure(
        &self,
        route: Route,
        error: &reqwest::Error,
        timeout: Duration,
    ) -> AttemptError {
        let upstream = self.upstream;
        let cause = cause_chain(error);
        // A connect failure (refused, DNS, TLS handshake, connect timeout) is checked first: a
        // connect timeout is also a timeout, but nothing was sent. Once connected, hyper re-sends
        // by itself a request whose pooled connection closed before the request was written, so
        // any later transport failure came after the request left.
        let (class, reason, message, status) = if error.is_connect() {
            (
                FailureClass::NotSent,
                Reason::UpstreamUnreachable,
                format!("cannot connect to {upstream}: {cause}"),
                "connect_error",
            )
        } else if error.is_timeout() {
            (
                FailureClass::PossiblyApplied,
                Reason::UpstreamTimeout,
                format!(
                    "{upstream} did not answer within {} ms",
                    timeout.as_millis()
                ),
                "timeout",
            )
        } else {
            (
                FailureClass::PossiblyApplied,
                Reason::UpstreamConnectionFailed,
                format!("the connection to {upstream} failed: {cause}"),
                "connection_error",
            )
        };
        tracing::debug!(upstream, route = %route, reason = reason.as_str(), "upstream transport failure");
        let error = Error::new(ErrorCode::Unavailable, reason, message)
            .with_retry_after(DEFAULT_RETRY_AFTER);
        AttemptError {
            error: self
                .decorate(error, route, status)
                .with_failure_class(class),
            class,
            retry_after: None,
        }
    }

    fn decorate(&self, error: Error, route: Route, status: &str) -> Error {
        error
            .with_metadata("upstream", self.upstream)
            .with_metadata("status", status)
            .with_metadata("route", route.to_string())
    }

    /// The error for a 2xx answer whose body is not what the API documents.
    pub fn malformed(&self, route: Route, status: StatusCode, what: String) -> Error {
        tracing::warn!(upstream = self.upstream, route = %route, problem = %what, "malformed upstream answer");
        self.decorate(
            Error::new(
                ErrorCode::Internal,
                Reason::UpstreamMalformedResponse,
                format!(
                    "{} answered {route} with an unexpected body: {what}",
                    self.upstream
                ),
            ),
            route,
            &status.as_u16().to_string(),
        )
    }

    /// Parses a JSON body; failures name the position, never the content.
    pub fn json(&self, route: Route, answer: &Answer) -> Result<Value, Error> {
        if answer.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&answer.body)
            .map_err(|error| self.malformed(route, answer.status, describe_json_error(&error)))
    }

    /// Decodes `value` (found at `path` in the body) as `T`, naming the bad field on failure.
    pub fn decode<T: DeserializeOwned>(
        &self,
        route: Route,
        status: StatusCode,
        path: &str,
        value: Value,
    ) -> Result<T, Error> {
        serde_path_to_error::deserialize(value).map_err(|error| {
            let inner = describe_json_error(error.inner());
            let at = error.path().to_string();
            let field = match (path.is_empty(), at.as_str()) {
                (true, ".") => "body".to_owned(),
                (true, at) => at.to_owned(),
                (false, ".") => path.to_owned(),
                (false, at) if at.starts_with('[') => format!("{path}{at}"),
                (false, at) => format!("{path}.{at}"),
            };
            self.malformed(route, status, format!("{field}: {inner}"))
        })
    }
}

/// A field path for messages: `subscribers[3].email`; an empty path is the whole request.
fn display_field(field: &str) -> &str {
    if field.is_empty() { "request" } else { field }
}

enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > MAX_BODY_BYTES as u64)
    {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` as delay-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        // An absurd value (a day or more) is more likely a bug than a wish: cap it.
        return Some(Duration::from_secs(seconds.min(3600)));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = date.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(
        delta
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(3600)),
    )
}

/// The error's causes, without the URL (which may hold an email in its query).
fn cause_chain(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut causes = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !causes.contains(&text) {
            causes.push(text);
        }
        source = cause.source();
    }
    if causes.is_empty() {
        "unknown transport error".to_owned()
    } else {
        causes.join(": ")
    }
}

/// A serde_json error described without the offending value (it could be a customer's email or
/// comment): the kind of problem and what was expected.
pub fn describe_json_error(error: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax | Category::Eof => format!(
            "not valid json (line {} column {})",
            error.line(),
            error.column()
        ),
        Category::Io => "could not be read".to_owned(),
        Category::Data => sanitize_data_error(&error.to_string()),
    }
}

fn sanitize_data_error(message: &str) -> String {
    // serde appends " at line L column C" for errors with a position.
    let message = message.split(" at line ").next().unwrap_or(message);
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // "string \"ann@example.com\", expected u32" → "string, expected u32"
            let kind = rest.split([' ', ',']).next().unwrap_or("value");
            let expected = rest
                .rsplit_once(", expected ")
                .map(|(_, expected)| expected)
                .unwrap_or("something else");
            return format!("{prefix}{kind}, expected {expected}");
        }
    }
    if message.starts_with("missing field ")
        || message.starts_with("duplicate field ")
        || message.starts_with("invalid length ")
    {
        return message.to_owned();
    }
    if message.starts_with("unknown variant ") {
        return match message.split_once(", expected ") {
            Some((_, expected)) => format!("unknown variant, expected {expected}"),
            None => "unknown variant".to_owned(),
        };
    }
    "invalid data".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_never_echo_values() {
        let error = serde_json::from_str::<u32>("\"ann@example.com\"").unwrap_err();
        let text = describe_json_error(&error);
        assert_eq!(text, "invalid type: string, expected u32");
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Item {
            email: String,
        }
        let error = serde_json::from_str::<Item>("{}").unwrap_err();
        assert_eq!(describe_json_error(&error), "missing field `email`");
        let error = serde_json::from_str::<Item>("{\"email\": ").unwrap_err();
        assert!(describe_json_error(&error).starts_with("not valid json"));
        #[derive(Debug, serde::Deserialize)]
        enum Kind {
            A,
        }
        let error = serde_json::from_str::<Kind>("\"secret-value\"").unwrap_err();
        let text = describe_json_error(&error);
        assert!(!text.contains("secret-value"), "{text}");
        let _ = Kind::A;
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = chrono::Utc::now() + chrono::Duration::seconds(30);
        headers.insert(RETRY_AFTER, later.to_rfc2822().parse().unwrap());
        let delay = retry_after(&headers).unwrap();
        assert!(delay <= Duration::from_secs(30) && delay >= Duration::from_secs(28));
        headers.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }
}
