//! Retently's campaign "webhook export": a POST to a configured URL for each new response.
//!
//! Deliveries are spawned tasks, so the request that created the feedback never waits for the
//! receiver; each one is counted as delivered (2xx) or failed. Signing is a sandbox extension
//! (Retently does not sign): `X-Cx-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::config::WebhookConfig;
use crate::state::Shared;

/// Receivers that take longer than this count as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The signature header of signed deliveries.
pub const SIGNATURE_HEADER: &str = "x-cx-signature";

pub(crate) fn client() -> Option<reqwest::Client> {
    // reqwest is built without a default TLS provider; installing ring is idempotent and
    // harmless if the process already chose one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match reqwest::Client::builder()
        .timeout(DELIVERY_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(client) => Some(client),
        Err(error) => {
            tracing::warn!(%error, "cannot build the webhook client, deliveries will fail");
            None
        }
    }
}

/// The body of one delivery: the default `{"event":"feedback.created","feedback":{…}}`, or the
/// configured template with `"{{path}}"` strings replaced by fields of the default body.
pub fn delivery_body(config: &WebhookConfig, feedback: &Value) -> Value {
    let default = json!({"event": "feedback.created", "feedback": feedback});
    match &config.body_template {
        None => default,
        Some(template) => render(template, &default),
    }
}

fn render(template: &Value, source: &Value) -> Value {
    match template {
        Value::String(text) => {
            let trimmed = text.trim();
            match trimmed
                .strip_prefix("{{")
                .and_then(|rest| rest.strip_suffix("}}"))
            {
                Some(path) => {
                    let pointer: String = path
                        .trim()
                        .split('.')
                        .filter(|segment| !segment.is_empty())
                        .map(|segment| format!("/{segment}"))
                        .collect();
                    source.pointer(&pointer).cloned().unwrap_or(Value::Null)
                }
                None => template.clone(),
            }
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|item| render(item, source)).collect())
        }
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, value)| (key.clone(), render(value, source)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `t=<unix>,v1=<hex>` over `"<unix>.<body>"`.
pub fn signature(secret: &str, unix_seconds: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(unix_seconds.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    format!("t={unix_seconds},v1={}", crate::ids::hex(tag.as_ref()))
}

/// Spawns one delivery per item if a webhook is configured.
pub(crate) fn deliver(shared: &Arc<Shared>, items: &[Value]) {
    let Some(config) = shared.control().webhook.clone() else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // Feedback simulated outside a runtime cannot be delivered; say so in the counters.
        shared.control().webhook_stats.failed += items.len() as u64;
        tracing::warn!(count = items.len(), "no runtime to deliver webhooks on");
        return;
    };
    for item in items {
        let body = delivery_body(&config, item);
        let shared = Arc::clone(shared);
        let config = config.clone();
        runtime.spawn(async move {
            let delivered = send(&shared, &config, &body).await;
            let mut control = shared.control();
            if delivered {
                control.webhook_stats.delivered += 1;
            } else {
                control.webhook_stats.failed += 1;
            }
        });
    }
}

async fn send(shared: &Shared, config: &WebhookConfig, body: &Value) -> bool {
    let Some(client) = &shared.webhook_client else {
        return false;
    };
    let Ok(bytes) = serde_json::to_vec(body) else {
        return false;
    };
    let mut request = client
        .post(&config.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    for (name, value) in &config.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    if let Some(secret) = &config.signing_secret {
        let now = chrono::Utc::now().timestamp();
        request = request.header(SIGNATURE_HEADER, signature(secret, now, &bytes));
    }
    match request.body(bytes).send().await {
        Ok(response) if response.status().is_success() => true,
        Ok(response) => {
            tracing::warn!(
                status = response.status().as_u16(),
                "webhook receiver refused a delivery"
            );
            false
        }
        Err(error) => {
            // The URL may carry a token in its query: log only what kind of failure it was.
            tracing::warn!(
                timeout = error.is_timeout(),
                connect = error.is_connect(),
                "webhook delivery failed"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Checked with ring's own verification over the documented message "<t>.<body>".
        let header = signature("secret", 1_700_000_000, b"{\"a\":1}");
        let hex = header.strip_prefix("t=1700000000,v1=").unwrap();
        assert_eq!(hex.len(), 64);
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"secret");
        assert!(ring::hmac::verify(&key, b"1700000000.{\"a\":1}", &bytes).is_ok());
    }

    #[test]
    fn templates_pick_fields_of_the_default_body() {
        let mut config = WebhookConfig::new("http://127.0.0.1:1/");
        config.body_template = Some(json!({
            "text": "{{ feedback.comment }}",
            "score": "{{feedback.score}}",
            "kind": "{{event}}",
            "missing": "{{feedback.nope}}",
            "fixed": "hello",
            "list": ["{{feedback.email}}"]
        }));
        let body = delivery_body(
            &config,
            &json!({"comment": "great", "score": 9, "email": "a@b.co"}),
        );
        assert_eq!(
            body,
            json!({"text": "great", "score": 9, "kind": "feedback.created", "missing": null,
                   "fixed": "hello", "list": ["a@b.co"]})
        );
    }
}
