//! The redaction guard: the one place every exported string passes through on its way out —
//! each log line (both formats) and each span's name, attributes and events before export.
//!
//! Two rules, applied to whole strings:
//! - any registered secret (API keys, key secrets, caller tokens, collector headers) is replaced
//!   by `[redacted]`. Secrets register themselves at start ([`register_secret`]), so a value
//!   that slipped into a message by mistake is still caught;
//! - anything shaped like an email address is replaced by `[email]`: emails are the customer
//!   identifiers of both upstreams and appear in requests, bodies and upstream error messages.
//!
//! Free-text comments are kept out by construction (no code records a body or a comment), and
//! metrics carry only bounded label values (method names, codes, route templates).

use std::borrow::Cow;
use std::sync::RwLock;

use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanProcessor};

use crate::config::Secret;

/// Shorter values are not registered: replacing every `ab` in every log line would destroy the
/// logs while protecting nothing (no real credential is that short).
const MIN_SECRET_LEN: usize = 6;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers a secret value so that it never appears in a log line or an exported span.
pub fn register_secret(secret: &Secret) {
    register_value(secret.expose());
}

pub(crate) fn register_value(value: &str) {
    if value.len() < MIN_SECRET_LEN {
        return;
    }
    let mut secrets = SECRETS.write().unwrap_or_else(|p| p.into_inner());
    if !secrets.iter().any(|known| known == value) {
        secrets.push(value.to_owned());
        // Longest first, so a secret that contains another is replaced whole.
        secrets.sort_by_key(|known| std::cmp::Reverse(known.len()));
    }
}

/// `text` with every registered secret and every email address replaced.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    {
        let secrets = SECRETS.read().unwrap_or_else(|p| p.into_inner());
        for secret in secrets.iter() {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), "[redacted]"));
            }
        }
    }
    if out.contains('@') {
        out = Cow::Owned(scrub_emails(&out));
    }
    out
}

fn is_local_char(c: char) -> bool {
    c.is_alphanumeric() || "._%+-!#$&'*/=?^`{|}~".contains(c)
}

fn is_domain_char(c: char) -> bool {
    c.is_alphanumeric() || c == '.' || c == '-'
}

/// Replaces `local@domain.tld` runs by `[email]`; an `@` without a dotted domain (a log field
/// such as `user@host`) is still replaced when it has a local part, to err on the safe side.
fn scrub_emails(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut emitted = 0;
    while i < chars.len() {
        if chars[i] == '@' {
            let mut start = i;
            while start > emitted && is_local_char(chars[start - 1]) {
                start -= 1;
            }
            let mut end = i + 1;
            while end < chars.len() && is_domain_char(chars[end]) {
                end += 1;
            }
            // A sentence's full stop after an address is not part of it.
            while end > i + 1 && matches!(chars[end - 1], '.' | '-') {
                end -= 1;
            }
            if start < i && end > i + 1 {
                out.extend(&chars[emitted..start]);
                out.push_str("[email]");
                emitted = end;
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out.extend(&chars[emitted..]);
    out
}

fn scrub_value(value: &mut Value) {
    match value {
        Value::String(text) => {
            if let Cow::Owned(clean) = scrub(text.as_str()) {
                *value = Value::from(clean);
            }
        }
        Value::Array(opentelemetry::Array::String(items)) => {
            for item in items.iter_mut() {
                if let Cow::Owned(clean) = scrub(item.as_str()) {
                    *item = clean.into();
                }
            }
        }
        _ => {}
    }
}

fn scrub_attributes(attributes: &mut [KeyValue]) {
    for attribute in attributes {
        scrub_value(&mut attribute.value);
    }
}

/// Scrubs every span before handing it to the exporting processor.
#[derive(Debug)]
pub struct RedactingProcessor<P> {
    inner: P,
}

impl<P> RedactingProcessor<P> {
    pub fn new(inner: P) -> Self {
        Self { inner }
    }
}

impl<P: SpanProcessor> SpanProcessor for RedactingProcessor<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, mut span: SpanData) {
        if let Cow::Owned(name) = scrub(&span.name) {
            span.name = name.into();
        }
        scrub_attributes(&mut span.attributes);
        for event in span.events.events.iter_mut() {
            if let Cow::Owned(name) = scrub(&event.name) {
                event.name = name.into();
            }
            scrub_attributes(&mut event.attributes);
        }
        if let opentelemetry::trace::Status::Error { description } = &mut span.status
            && let Cow::Owned(clean) = scrub(description)
        {
            *description = clean.into();
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_replaced_and_ordinary_text_is_kept() {
        assert_eq!(
            scrub("sent to ann.lee+x@example.co.uk and bob@corp.example."),
            "sent to [email] and [email]."
        );
        assert_eq!(scrub("no address here"), "no address here");
        assert!(matches!(scrub("plain"), Cow::Borrowed(_)));
        assert_eq!(scrub("a lone @ sign"), "a lone @ sign");
        assert_eq!(scrub("ünï@exämple.com!"), "[email]!");
    }

    #[test]
    fn registered_secrets_are_replaced_wherever_they_appear() {
        register_value("rk-redact-test-123456");
        register_value("short");
        assert_eq!(
            scrub("key=rk-redact-test-123456;other"),
            "key=[redacted];other"
        );
        assert_eq!(scrub("short stays"), "short stays");
    }
}
