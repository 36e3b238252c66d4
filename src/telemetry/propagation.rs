//! W3C trace context (`traceparent`, `tracestate`) in and out: extracted from incoming gRPC
//! metadata so a caller's trace continues in the gateway, injected into every upstream HTTP
//! request so the upstream (and the sandbox) can join it.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http::{HeaderMap, HeaderName, HeaderValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The caller's trace context, or an empty context when it sent none (or a malformed one).
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// Adds `traceparent` (and `tracestate`) for the current span, when it belongs to a trace.
pub fn inject_current(headers: &mut HeaderMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeadersMut(headers));
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt as _;

    #[test]
    fn a_valid_traceparent_is_extracted_and_a_bad_one_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        headers.insert("tracestate", HeaderValue::from_static("vendor=abc"));
        let context = extract(&headers);
        let span = context.span();
        let span_context = span.span_context();
        assert_eq!(
            span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(span_context.is_remote() && span_context.is_sampled());
        assert_eq!(span_context.trace_state().header(), "vendor=abc");

        headers.insert("traceparent", HeaderValue::from_static("00-zz-00-01"));
        assert!(!extract(&headers).span().span_context().is_valid());
    }

    #[test]
    fn nothing_is_injected_outside_a_trace() {
        let mut headers = HeaderMap::new();
        inject_current(&mut headers);
        assert!(headers.get("traceparent").is_none());
    }
}
