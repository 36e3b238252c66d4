//! Honours the caller's deadline and gives every call one.
//!
//! tonic enforces `grpc-timeout` itself but reports an expired deadline as `CANCELLED`; the
//! contract promises `DEADLINE_EXCEEDED`. This layer sits inside tonic's own timer with the same
//! (or a shorter) deadline; tonic polls its inner future first, so this layer's answer wins. Calls
//! without a deadline get the configured default, so no call can hang forever. The deadline is
//! put in the request extensions as [`Deadline`] so handlers can size upstream timeouts from it.

use std::time::Duration;

use tokio::time::Instant;
use tonic::codegen::http::{self, Request};
use tower::Layer;

use crate::error::{Error, ErrorCode, Reason};
use crate::grpc::layer::{EdgeFuture, EdgeLayer, EdgeService, Inner};

/// The instant by which the caller wants an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// The deadline of a tonic request, set by [`DeadlineLayer`].
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Deadline> {
        request.extensions().get::<Deadline>().copied()
    }
}

/// How much earlier than tonic's own `grpc-timeout` timer this layer's fires: two timer ticks
/// cover the time between the two timers' start in any build.
const TONIC_TIMER_MARGIN: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    default: Duration,
}

impl DeadlineLayer {
    pub fn new(default: Duration) -> Self {
        Self { default }
    }
}

impl EdgeLayer for DeadlineLayer {
    fn handle<S: Inner<B>, B>(&self, mut next: S, mut request: Request<B>) -> EdgeFuture<S::Error> {
        let (timeout, deadline) = match parse_grpc_timeout(request.headers()) {
            // tonic started its own timer for this deadline a little earlier (the layers run
            // when the router first polls them), and timers fire by whole milliseconds: without
            // a margin, tonic's timer can fire one tick before this one and answer CANCELLED.
            Some(timeout) => (
                timeout,
                Instant::now() + timeout.saturating_sub(TONIC_TIMER_MARGIN),
            ),
            None => (self.default, Instant::now() + self.default),
        };
        request.extensions_mut().insert(Deadline(deadline));
        let response = next.call(request);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, response).await {
                Ok(response) => response,
                Err(_elapsed) => {
                    let error = Error::new(
                        ErrorCode::DeadlineExceeded,
                        Reason::DeadlineExceeded,
                        format!(
                            "the call did not finish within its deadline of {}",
                            humantime::format_duration(round_to_millis(timeout))
                        ),
                    );
                    Ok(tonic::Status::from(error).into_http())
                }
            }
        })
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = EdgeService<Self, S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeService::new(*self, inner)
    }
}

fn round_to_millis(duration: Duration) -> Duration {
    Duration::from_millis(duration.as_millis().try_into().unwrap_or(u64::MAX))
}

/// Parses `grpc-timeout` (`<1-8 digits><H|M|S|m|u|n>`); anything malformed counts as absent, as
/// the gRPC spec lets servers treat it.
pub(crate) fn parse_grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use tower::Service;

    use super::*;

    fn headers(value: &str) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        map.insert("grpc-timeout", value.parse().unwrap());
        map
    }

    #[test]
    fn parses_every_unit() {
        for (value, expected) in [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("4S", Duration::from_secs(4)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
        ] {
            assert_eq!(
                parse_grpc_timeout(&headers(value)),
                Some(expected),
                "{value}"
            );
        }
    }

    fn slow_service(delay: Duration) -> impl Inner<(), Error = std::convert::Infallible> + Clone {
        tower::service_fn(move |request: http::Request<()>| async move {
            assert!(request.extensions().get::<Deadline>().is_some());
            tokio::time::sleep(delay).await;
            Ok(http::Response::new(tonic::body::Body::empty()))
        })
    }

    fn grpc_status(response: &http::Response<tonic::body::Body>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_caller_deadline_is_deadline_exceeded() {
        let mut service = DeadlineLayer::new(Duration::from_secs(30))
            .layer(slow_service(Duration::from_secs(10)));
        let mut request = http::Request::new(());
        request
            .headers_mut()
            .insert("grpc-timeout", "100m".parse().unwrap());
        let started = Instant::now();
        let response = service.call(request).await.unwrap();
        assert_eq!(grpc_status(&response), Some("4"), "4 is DEADLINE_EXCEEDED");
        // Just before tonic's own timer for the same header.
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(100) - TONIC_TIMER_MARGIN
        );
    }

    #[tokio::test(start_paused = true)]
    async fn calls_without_a_deadline_get_the_default() {
        let mut service =
            DeadlineLayer::new(Duration::from_secs(2)).layer(slow_service(Duration::from_secs(10)));
        let response = service.call(http::Request::new(())).await.unwrap();
        assert_eq!(grpc_status(&response), Some("4"));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_within_their_deadline_pass_through() {
        let mut service =
            DeadlineLayer::new(Duration::from_secs(2)).layer(slow_service(Duration::from_secs(1)));
        let response = service.call(http::Request::new(())).await.unwrap();
        assert_eq!(grpc_status(&response), None);
    }

    #[test]
    fn malformed_values_count_as_absent() {
        for bad in ["", "S", "12", "123456789S", "1x", "-1S", "1.5S"] {
            let mut map = http::HeaderMap::new();
            if !bad.is_empty() {
                map.insert("grpc-timeout", bad.parse().unwrap());
            }
            assert_eq!(parse_grpc_timeout(&map), None, "{bad}");
        }
    }
}
