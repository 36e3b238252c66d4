//! W3C trace context (`traceparent`, `tracestate`) in and out: extracted from incoming gRPC
//! metadata so a caller's trace continues in the gateway, injected into every upstream HTTP
//! request so the upstream (and the sandbox) can join it.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
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

/// The W3C `traceparent` of `span` when traces are exported and it belongs to one: kept with
/// work that runs later (an outbox delivery), which then links back to it.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !super::traces_exported() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// The span a stored `traceparent` names, if it is a valid one.
pub fn parse_traceparent(traceparent: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_stored_traceparent_names_its_span() {
        let parsed =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            parsed.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parsed.span_id().to_string(), "00f067aa0ba902b7");
        assert!(parse_traceparent("00-0-0-01").is_none());
        assert!(parse_traceparent("").is_none());
        // Not exported in unit tests: nothing to store.
        assert!(traceparent(&tracing::info_span!("enqueue")).is_none());
    }

    #[test]
    fn nothing_is_injected_outside_a_trace() {
        let mut headers = HeaderMap::new();
        inject_current(&mut headers);
        assert!(headers.get("traceparent").is_none());
    }
}
