//! What a sandbox starts with: credentials, limits, seed sizes, the webhook and the background
//! feedback rate.

use std::time::Duration;

/// The configuration of one emulator instance.
#[derive(Clone)]
pub struct SandboxConfig {
    /// Accepted Retently API keys (any of the documented auth forms may carry them).
    pub retently_api_keys: Vec<String>,
    /// Accepted Retainly `(key, secret)` pairs.
    pub retainly_credentials: Vec<(String, String)>,
    /// Retently requests allowed per API key in any sliding window of `rate_limit_window`;
    /// 0 switches the limit off (benchmarks lift it).
    pub retently_requests_per_minute: u32,
    /// Retainly requests allowed per key in any sliding window; upstream documents no limit, so
    /// the default is 0 (off). Tests switch it on to exercise a client's handling of 429.
    pub retainly_requests_per_minute: u32,
    /// Length of the sliding window of both rate limits. Upstream's is one minute; tests shorten it
    /// so that a window can pass without a minute of waiting.
    pub rate_limit_window: Duration,
    /// How much data exists at start.
    pub seed: SeedConfig,
    /// Where new feedback is pushed, if anywhere.
    pub webhook: Option<WebhookConfig>,
    /// Background arrival rate of new survey responses; `None` switches it off.
    pub simulate_feedback_per_second: Option<f64>,
    /// How an unsubscribe or resubscribe batch holding addresses that were never customers is
    /// answered. The upstream docs report (uncertain) that such a batch may fail as a whole;
    /// [`UnknownEmails::FailBatch`] answers it with a 404 and changes nothing, the default
    /// reports each unknown address as `failed`/`not_found` and applies the rest.
    pub unknown_subscription_emails: UnknownEmails,
}

/// See [`SandboxConfig::unknown_subscription_emails`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnknownEmails {
    #[default]
    PerItem,
    FailBatch,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            retently_api_keys: vec![DEFAULT_RETENTLY_API_KEY.to_owned()],
            retainly_credentials: vec![(
                DEFAULT_RETAINLY_KEY.to_owned(),
                DEFAULT_RETAINLY_SECRET.to_owned(),
            )],
            retently_requests_per_minute: 150,
            retainly_requests_per_minute: 0,
            rate_limit_window: Duration::from_secs(60),
            seed: SeedConfig::default(),
            webhook: None,
            simulate_feedback_per_second: None,
            unknown_subscription_emails: UnknownEmails::PerItem,
        }
    }
}

/// Written by hand: keys and secrets are counted, never printed.
impl std::fmt::Debug for SandboxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxConfig")
            .field("retently_api_keys", &self.retently_api_keys.len())
            .field("retainly_credentials", &self.retainly_credentials.len())
            .field(
                "retently_requests_per_minute",
                &self.retently_requests_per_minute,
            )
            .field(
                "retainly_requests_per_minute",
                &self.retainly_requests_per_minute,
            )
            .field("rate_limit_window", &self.rate_limit_window)
            .field("seed", &self.seed)
            .field("webhook", &self.webhook)
            .field(
                "simulate_feedback_per_second",
                &self.simulate_feedback_per_second,
            )
            .field(
                "unknown_subscription_emails",
                &self.unknown_subscription_emails,
            )
            .finish()
    }
}

/// The Retently API key of a default sandbox.
pub const DEFAULT_RETENTLY_API_KEY: &str = "sandbox-retently-key";
/// The Retainly key of a default sandbox.
pub const DEFAULT_RETAINLY_KEY: &str = "sandbox-retainly-key";
/// The Retainly secret of a default sandbox.
pub const DEFAULT_RETAINLY_SECRET: &str = "sandbox-retainly-secret";

/// Sizes of the generated data set and the seed of every random choice.
#[derive(Debug, Clone)]
pub struct SeedConfig {
    /// Retently campaigns. The first seven follow a fixed pattern (one active transactional
    /// campaign per metric, two regular ones, one inactive transactional one), see the README.
    pub campaigns: usize,
    /// Retently survey templates.
    pub templates: usize,
    /// Retently companies.
    pub companies: usize,
    /// Retently customers.
    pub customers: usize,
    /// Retently survey responses, spread over the past 90 days.
    pub feedback: usize,
    /// Seed of the random generators: the same seed gives the same ids, names and scores.
    pub rng_seed: u64,
}

impl Default for SeedConfig {
    fn default() -> Self {
        SeedConfig {
            campaigns: 7,
            templates: 3,
            companies: 10,
            customers: 200,
            feedback: 500,
            rng_seed: 0x5eed_cafe,
        }
    }
}

impl SeedConfig {
    /// No data at all except what the tests create (campaigns and templates are still needed to
    /// send surveys, so callers usually keep those).
    pub fn empty() -> Self {
        SeedConfig {
            campaigns: 0,
            templates: 0,
            companies: 0,
            customers: 0,
            feedback: 0,
            ..SeedConfig::default()
        }
    }
}

/// Retently's campaign "webhook export": a POST of a JSON body to a URL for each new response.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Target URL (`http://` or `https://`).
    pub url: String,
    /// Custom headers sent with every delivery, as a user configures them in Retently.
    pub headers: Vec<(String, String)>,
    /// Sandbox extension: when set, every delivery carries `X-Cx-Signature`.
    pub signing_secret: Option<String>,
    /// The user-editable body template; `None` sends the default body
    /// `{"event":"feedback.created","feedback":{...}}`. String values of the exact form
    /// `"{{path.to.field}}"` are replaced by that field of the default body.
    pub body_template: Option<serde_json::Value>,
}

impl WebhookConfig {
    /// A webhook to `url` with the default body, no headers and no signature.
    pub fn new(url: impl Into<String>) -> Self {
        WebhookConfig {
            url: url.into(),
            headers: Vec::new(),
            signing_secret: None,
            body_template: None,
        }
    }
}

/// Written by hand so that the signing secret and header values (which often hold tokens) never
/// reach a log line through `{:?}`.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("headers", &header_names)
            .field("signed", &self.signing_secret.is_some())
            .field("body_template", &self.body_template.is_some())
            .finish()
    }
}
