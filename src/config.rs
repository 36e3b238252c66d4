//! Typed configuration, read from a [`Source`] and validated once at start.
//!
//! Settings come from the environment (`CXGW_*`) and, when `CXGW_CONFIG_FILE` names one, from a
//! TOML file whose keys are the setting names lower-cased without the prefix
//! (`grpc_addr = "0.0.0.0:50051"`); the environment wins. Secrets (API keys) are read from the
//! environment or from the file named by their `*_FILE` variant, never from argv, and are held in
//! [`Secret`], whose `Debug` never shows them. Every error names the bad setting and never echoes
//! a secret value.
//!
//! Reading through a trait rather than `std::env` directly lets tests feed a map (linkerd's
//! pattern), so no test mutates the process environment.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;

use crate::auth::{CallerRegistry, CallersSource};
use crate::tls::{ClientAuth, TlsSettings};

/// Whether `name` may name something in an operator's file (a caller, an event rule, an alert
/// rule): 1 to 64 ASCII letters, digits, `-`, `_` or `.`, so it is safe in logs, metric labels
/// and keys.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Where settings come from.
pub trait Source {
    /// The raw value of a setting by its environment name (`CXGW_GRPC_ADDR`).
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvSource;

impl Source for EnvSource {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

/// A fixed map of settings, for tests and for the layered file source.
#[derive(Debug, Clone, Default)]
pub struct MapSource(pub HashMap<String, String>);

impl MapSource {
    pub fn new<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl Source for MapSource {
    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
}

/// The first source that has a setting wins.
struct Layered<'a> {
    layers: Vec<&'a dyn Source>,
}

impl Source for Layered<'_> {
    fn get(&self, key: &str) -> Option<String> {
        self.layers.iter().find_map(|layer| layer.get(key))
    }
}

/// A setting that failed validation; the message names it and never contains a secret value.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: &str, reason: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A secret value (API key, key secret). Its `Debug` and `Display` print a placeholder, so it can
/// sit inside structs that are logged without leaking.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Whether the gateway talks to the real upstreams or to the built-in emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamMode {
    /// `serve`: real upstreams; API keys are required.
    Real,
    /// `serve --sandbox`: the caller fills in the emulator's address and keys after start.
    Sandbox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing_subscriber::EnvFilter` directives.
    pub filter: String,
}

/// Transport limits of the gRPC server; each exists because tonic's default is unbounded or unsafe.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Largest encoded or decoded message; sized for a 10,000-customer Retainly batch.
    pub max_message_bytes: usize,
    /// HTTP/2 concurrent streams per connection (tonic's default is unlimited).
    pub max_concurrent_streams: u32,
    /// Locally-caused stream resets tolerated per connection before it is closed (tonic passes
    /// `None`, which disables h2's protection against reset floods).
    pub max_local_error_reset_streams: usize,
    /// Connections are told to go away after this age, so load spreads after a scale-out.
    pub max_connection_age: Duration,
    /// HTTP/2 PING interval that keeps idle streams alive through proxies and finds dead peers.
    pub http2_keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// Deadline applied to unary calls whose caller sent none, so no call can hang forever.
    pub default_deadline: Duration,
}

#[derive(Debug, Clone)]
pub struct RetentlyConfig {
    pub base_url: Url,
    pub api_key: Option<Secret>,
    pub requests_per_minute: u32,
    /// The window Retently counts `requests_per_minute` in: a minute, unless an emulator with a
    /// shortened window stands in for it (`CXGW_RETENTLY_RATE_WINDOW`).
    pub rate_window: Duration,
}

#[derive(Debug, Clone)]
pub struct RetainlyConfig {
    pub base_url: Url,
    pub api_key: Option<Secret>,
    pub api_secret: Option<Secret>,
    pub requests_per_minute: u32,
}

/// Settings of the built-in emulator (`cx-gateway sandbox` and `serve --sandbox`).
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// Listen address of `cx-gateway sandbox` (the embedded one binds an ephemeral loopback port).
    pub addr: SocketAddr,
    /// The emulated Retently rate limit; 0 lifts it.
    pub retently_requests_per_minute: u32,
    /// New survey responses simulated per second, if any.
    pub feedback_per_second: Option<f64>,
}

/// Event names mapped to the Retently transactional campaigns they trigger, ordered by event name.
pub type EventMappings = std::collections::BTreeMap<String, Vec<String>>;

/// The event rules: the file named by `CXGW_EVENT_RULES_FILE` (read and validated now; a bad
/// file stops the start) together with the environment mappings.
fn event_rules(
    s: &Reader<'_>,
    mappings: &EventMappings,
) -> Result<std::sync::Arc<crate::rules::EventRules>, ConfigError> {
    const KEY: &str = "CXGW_EVENT_RULES_FILE";
    let rules = match s.source.get(KEY) {
        None => crate::rules::EventRules::from_mappings(mappings.clone()),
        Some(path) if path.trim().is_empty() => {
            return Err(ConfigError::new(KEY, "must not be empty"));
        }
        Some(path) => {
            crate::rules::EventRules::load(Some(PathBuf::from(path.trim())), mappings.clone())
                .map_err(|reason| ConfigError::new(KEY, reason))?
        }
    };
    Ok(std::sync::Arc::new(rules))
}

/// `CXGW_SURVEY_COOLDOWN`: unset, empty, `off` or `0s` switch the guard off.
fn survey_cooldown(s: &Reader<'_>) -> Result<Option<Duration>, ConfigError> {
    const KEY: &str = "CXGW_SURVEY_COOLDOWN";
    match s.source.get(KEY).as_deref().map(str::trim) {
        None | Some("" | "off") => Ok(None),
        Some(_) => {
            let cooldown = s.duration(KEY, Duration::ZERO)?;
            if cooldown > crate::rules::MAX_COOLDOWN {
                return Err(ConfigError::new(KEY, "must be at most 365 days"));
            }
            Ok((!cooldown.is_zero()).then_some(cooldown))
        }
    }
}

/// Parses `event=campaign[,campaign...][;event=...]` (whitespace around parts ignored).
fn parse_event_mappings(raw: &str) -> Result<EventMappings, ConfigError> {
    const KEY: &str = "CXGW_EVENT_MAPPINGS";
    let mut mappings = EventMappings::new();
    for entry in raw.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((event, campaigns)) = entry.split_once('=') else {
            return Err(ConfigError::new(
                KEY,
                format!("`{entry}` is not event=campaign_id[,campaign_id...]"),
            ));
        };
        let event = event.trim();
        if event.is_empty() || event.chars().count() > 50 {
            return Err(ConfigError::new(
                KEY,
                format!("event name `{event}` must be 1 to 50 characters"),
            ));
        }
        let campaigns: Vec<String> = campaigns
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        if campaigns.is_empty() {
            return Err(ConfigError::new(
                KEY,
                format!("event `{event}` maps to no campaign"),
            ));
        }
        if mappings.insert(event.to_owned(), campaigns).is_some() {
            return Err(ConfigError::new(
                KEY,
                format!("event `{event}` is mapped twice"),
            ));
        }
    }
    Ok(mappings)
}

/// Durability and deduplication of writes.
#[derive(Debug, Clone)]
pub struct WriteSettings {
    /// How long an asynchronous write is retried before it is dead-lettered.
    pub retry_window: Duration,
    /// How long idempotency keys and event message ids are remembered.
    pub idempotency_window: Duration,
    /// First retry delay of a queued delivery; doubles per attempt (with full jitter) up to
    /// `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

/// Who may call, and how the gateway learns it.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The callers in force (`CXGW_CALLERS_FILE` or `CXGW_CALLERS`); `None` turns
    /// authentication off, which only `serve --sandbox` and a trusted mesh allow.
    pub callers: Option<CallerRegistry>,
    /// `CXGW_TRUSTED_MESH`: a service mesh in front authenticates callers, so `serve` may run
    /// without callers.
    pub trusted_mesh: bool,
    /// How often the callers file and the TLS files are checked for changes (SIGHUP reloads at
    /// once).
    pub reload_interval: Duration,
}

/// The feedback pipeline: sync, log retention and fan-out (`CXGW_FEEDBACK_*`).
#[derive(Debug, Clone)]
pub struct FeedbackConfig {
    /// Whether the poller runs (off: the log is fed by webhooks only).
    pub sync: bool,
    /// Pause between polls; an idle poll costs one upstream request.
    pub poll_interval: Duration,
    /// How far before the checkpoint each poll starts (timestamps tie, items appear late).
    pub overlap: Duration,
    /// How far back the first poll of an empty data directory starts.
    pub backfill: Duration,
    /// How often the recent window is read again to see changed responses; zero: never.
    pub rescan_interval: Duration,
    /// The window a rescan reads.
    pub rescan_window: Duration,
    /// Log entries older than this are deleted; zero keeps them whatever their age.
    pub retention: Duration,
    /// The oldest log entries beyond this count are deleted; zero: no count limit.
    pub retention_max_entries: u64,
    /// How often retention is enforced.
    pub retention_interval: Duration,
    /// Heartbeat interval of idle streams.
    pub heartbeat_interval: Duration,
    /// Streams served at once.
    pub max_subscribers: usize,
    /// Entries of the shared live buffer: how far a subscriber may fall behind before it
    /// continues from the log.
    pub subscriber_buffer: usize,
}

/// Ingestion of Retently webhook export calls on the admin port (`CXGW_WEBHOOK_*`); enabled by
/// setting the shared secret.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The shared secret callers put in `secret_header`; `None` disables the endpoint.
    pub secret: Option<Secret>,
    /// Lower-case name of the header carrying the shared secret.
    pub secret_header: String,
    /// When set, calls must carry a valid `X-Cx-Signature`.
    pub signing_secret: Option<Secret>,
    /// How far a signature's timestamp may be from the gateway's clock.
    pub tolerance: Duration,
    /// Largest accepted body.
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Directory of the embedded store; `None` in sandbox mode means a temporary directory.
    pub data_dir: Option<PathBuf>,
    /// Which engine holds the store (`CXGW_STORE`).
    pub store: StoreSelection,
    /// `CXGW_ALLOW_NEW_STORE` (or `serve --allow-new-store`): create a new, empty store where the
    /// marker shows one existed but its database file is missing, instead of refusing to start.
    pub allow_new_store: bool,
    pub log: LogConfig,
    /// How long after SIGTERM the gateway keeps serving while it already reports NOT_SERVING
    /// (health) and 503 (`/readyz`), so load balancers and endpoint lists stop sending calls
    /// before the listener closes. The drain (`shutdown_grace`) starts after it.
    pub drain_delay: Duration,
    pub shutdown_grace: Duration,
    pub reflection: bool,
    pub limits: ServerLimits,
    pub retently: RetentlyConfig,
    pub retainly: RetainlyConfig,
    pub sandbox: SandboxSettings,
    pub writes: WriteSettings,
    /// Which tracked events trigger which Retently surveys (like Segment's Retently destination).
    pub event_mappings: EventMappings,
    /// The event rules in force: `CXGW_EVENT_RULES_FILE` (reloaded while running) and
    /// `event_mappings` as unfiltered rules.
    pub event_rules: std::sync::Arc<crate::rules::EventRules>,
    /// `CXGW_SURVEY_COOLDOWN`: the survey cool-down across campaigns; `None` (the default) is
    /// off.
    pub survey_cooldown: Option<Duration>,
    /// `CXGW_SURVEY_COOLDOWN_BACKFILL`: seed the cool-down once from Retently's history of sent
    /// surveys (`GET /outbox`, background priority); only with a cool-down.
    pub survey_cooldown_backfill: bool,
    pub auth: AuthSettings,
    /// TLS on the gRPC port; `None` serves plaintext (for a mesh that encrypts, or local use).
    pub tls: Option<TlsSettings>,
    /// Trace and metric export from the standard `OTEL_*` variables.
    pub telemetry: crate::telemetry::TelemetryConfig,
    pub feedback: FeedbackConfig,
    pub webhook: WebhookConfig,
    /// The alert rules (`CXGW_ALERT_RULES_FILE`); `None`: no alerts.
    pub alert_rules: Option<crate::alerts::RuleSet>,
    /// The Segment-compatible HTTP intake (`CXGW_SEGMENT_LISTEN_ADDR`); `None` leaves it off.
    pub segment: Option<SegmentSettings>,
}

/// The Segment-compatible HTTP intake. Its write keys live on the callers' entries
/// (`segment_write_key_files`), so they share the callers' permissions, quotas and shares.
#[derive(Debug, Clone)]
pub struct SegmentSettings {
    pub listen_addr: SocketAddr,
}

impl Config {
    /// Reads and validates every setting, including those of the file named by
    /// `CXGW_CONFIG_FILE` if any.
    pub fn load(source: &dyn Source, mode: UpstreamMode) -> Result<Config, ConfigError> {
        let file = match source.get("CXGW_CONFIG_FILE") {
            Some(path) => read_config_file(&path)?,
            None => MapSource::default(),
        };
        let layered = Layered {
            layers: vec![source, &file],
        };
        Self::from_source(&layered, mode)
    }

    fn from_source(source: &dyn Source, mode: UpstreamMode) -> Result<Config, ConfigError> {
        let s = Reader { source };
        let retently = RetentlyConfig {
            base_url: s.url("CXGW_RETENTLY_BASE_URL", "https://app.retently.com")?,
            api_key: s.secret("CXGW_RETENTLY_API_KEY")?,
            requests_per_minute: s.parse_in(
                "CXGW_RETENTLY_REQUESTS_PER_MINUTE",
                150,
                1..=100_000,
            )?,
            rate_window: s.duration_in(
                "CXGW_RETENTLY_RATE_WINDOW",
                Duration::from_secs(60),
                Duration::from_millis(100)..=Duration::from_secs(3600),
            )?,
        };
        let retainly = RetainlyConfig {
            base_url: s.url("CXGW_RETAINLY_BASE_URL", "https://track.retainly.app")?,
            api_key: s.secret("CXGW_RETAINLY_API_KEY")?,
            api_secret: s.secret("CXGW_RETAINLY_API_SECRET")?,
            requests_per_minute: s.parse_in(
                "CXGW_RETAINLY_REQUESTS_PER_MINUTE",
                1200,
                1..=1_000_000,
            )?,
        };
        if mode == UpstreamMode::Real {
            for (key, present) in [
                ("CXGW_RETENTLY_API_KEY", retently.api_key.is_some()),
                ("CXGW_RETAINLY_API_KEY", retainly.api_key.is_some()),
                ("CXGW_RETAINLY_API_SECRET", retainly.api_secret.is_some()),
            ] {
                if !present {
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "required by `serve` (set it or {key}_FILE, or run `serve --sandbox`)"
                        ),
                    ));
                }
            }
        }

        let auth = auth_settings(&s, mode)?;
        let tls = tls_settings(&s)?;

        let log_format = match s.string("CXGW_LOG_FORMAT", "text").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::new(
                    "CXGW_LOG_FORMAT",
                    format!("expected `text` or `json`, got `{other}`"),
                ));
            }
        };

        let data_dir = match (source.get("CXGW_DATA_DIR"), mode) {
            (Some(dir), _) if dir.trim().is_empty() => {
                return Err(ConfigError::new("CXGW_DATA_DIR", "must not be empty"));
            }
            (Some(dir), _) => Some(PathBuf::from(dir)),
            (None, UpstreamMode::Real) => Some(PathBuf::from("./data")),
            (None, UpstreamMode::Sandbox) => None,
        };

        let feedback_per_second = match source.get("CXGW_SANDBOX_FEEDBACK_PER_SECOND") {
            None => None,
            Some(raw) => match raw.parse::<f64>() {
                Ok(rate) if rate > 0.0 && rate <= 10_000.0 => Some(rate),
                Ok(0.0) => None,
                _ => {
                    return Err(ConfigError::new(
                        "CXGW_SANDBOX_FEEDBACK_PER_SECOND",
                        format!(
                            "expected a number of responses per second from 0 to 10000, got `{raw}`"
                        ),
                    ));
                }
            },
        };

        let feedback = FeedbackConfig {
            sync: s.boolean("CXGW_FEEDBACK_SYNC", true)?,
            poll_interval: s.duration_in(
                "CXGW_FEEDBACK_POLL_INTERVAL",
                Duration::from_secs(10),
                Duration::from_millis(10)..=Duration::from_secs(24 * 3600),
            )?,
            overlap: s.duration("CXGW_FEEDBACK_OVERLAP", Duration::from_secs(300))?,
            backfill: s.duration("CXGW_FEEDBACK_BACKFILL", Duration::from_secs(24 * 3600))?,
            rescan_interval: s.duration(
                "CXGW_FEEDBACK_RESCAN_INTERVAL",
                Duration::from_secs(15 * 60),
            )?,
            rescan_window: s.duration(
                "CXGW_FEEDBACK_RESCAN_WINDOW",
                Duration::from_secs(24 * 3600),
            )?,
            retention: s.duration(
                "CXGW_FEEDBACK_RETENTION",
                Duration::from_secs(30 * 24 * 3600),
            )?,
            retention_max_entries: s.parse("CXGW_FEEDBACK_RETENTION_MAX_ENTRIES", 0)?,
            retention_interval: s.duration_in(
                "CXGW_FEEDBACK_RETENTION_INTERVAL",
                Duration::from_secs(60),
                Duration::from_millis(10)..=Duration::from_secs(24 * 3600),
            )?,
            heartbeat_interval: s.duration_in(
                "CXGW_FEEDBACK_HEARTBEAT_INTERVAL",
                Duration::from_secs(15),
                Duration::from_millis(10)..=Duration::from_secs(3600),
            )?,
            max_subscribers: s.parse_in("CXGW_FEEDBACK_MAX_SUBSCRIBERS", 10_000, 1..=1_000_000)?,
            subscriber_buffer: s.parse_in(
                "CXGW_FEEDBACK_SUBSCRIBER_BUFFER",
                1024,
                1..=1_000_000,
            )?,
        };
        if !feedback.retention.is_zero()
            && feedback.rescan_window.max(feedback.overlap) >= feedback.retention
        {
            // A response forgotten by retention and then read again by a rescan would be
            // logged a second time as new.
            return Err(ConfigError::new(
                "CXGW_FEEDBACK_RETENTION",
                "must be longer than CXGW_FEEDBACK_RESCAN_WINDOW and CXGW_FEEDBACK_OVERLAP",
            ));
        }
        let webhook = WebhookConfig {
            secret: s.secret("CXGW_WEBHOOK_SECRET")?,
            secret_header: s
                .string("CXGW_WEBHOOK_SECRET_HEADER", "x-cx-webhook-secret")
                .trim()
                .to_ascii_lowercase(),
            signing_secret: s.secret("CXGW_WEBHOOK_SIGNING_SECRET")?,
            tolerance: s.duration("CXGW_WEBHOOK_TOLERANCE", Duration::from_secs(300))?,
            max_body_bytes: s.parse_in(
                "CXGW_WEBHOOK_MAX_BODY_BYTES",
                1024 * 1024,
                1024..=64 * 1024 * 1024,
            )?,
        };
        if axum::http::HeaderName::from_bytes(webhook.secret_header.as_bytes()).is_err() {
            return Err(ConfigError::new(
                "CXGW_WEBHOOK_SECRET_HEADER",
                "must be a valid HTTP header name",
            ));
        }
        if webhook.signing_secret.is_some() && webhook.secret.is_none() {
            return Err(ConfigError::new(
                "CXGW_WEBHOOK_SIGNING_SECRET",
                "needs CXGW_WEBHOOK_SECRET too (the signature adds to the shared secret)",
            ));
        }

        let base_backoff = s.duration_in(
            "CXGW_OUTBOX_BASE_BACKOFF",
            Duration::from_secs(1),
            Duration::from_millis(1)..=Duration::from_secs(3600),
        )?;
        let max_backoff = s.duration_in(
            "CXGW_OUTBOX_MAX_BACKOFF",
            Duration::from_secs(300),
            Duration::from_millis(1)..=Duration::from_secs(24 * 3600),
        )?;
        if max_backoff < base_backoff {
            return Err(ConfigError::new(
                "CXGW_OUTBOX_MAX_BACKOFF",
                "must not be below CXGW_OUTBOX_BASE_BACKOFF",
            ));
        }
        let alert_rules = match source.get("CXGW_ALERT_RULES_FILE") {
            None => None,
            Some(path) if path.trim().is_empty() => None,
            Some(path) => Some(
                crate::alerts::RuleSet::load(PathBuf::from(path))
                    .map_err(|reason| ConfigError::new("CXGW_ALERT_RULES_FILE", reason))?,
            ),
        };

        let event_mappings = parse_event_mappings(&s.string("CXGW_EVENT_MAPPINGS", ""))?;
        Ok(Config {
            grpc_addr: s.parse("CXGW_GRPC_ADDR", SocketAddr::from(([0, 0, 0, 0], 50051)))?,
            admin_addr: s.parse("CXGW_ADMIN_ADDR", SocketAddr::from(([0, 0, 0, 0], 8080)))?,
            data_dir,
            store: store_selection(&s)?,
            allow_new_store: s.boolean("CXGW_ALLOW_NEW_STORE", false)?,
            log: LogConfig {
                format: log_format,
                filter: s.string("CXGW_LOG", "info"),
            },
            drain_delay: s.duration("CXGW_DRAIN_DELAY", Duration::ZERO)?,
            shutdown_grace: s.duration("CXGW_SHUTDOWN_GRACE", Duration::from_secs(20))?,
            reflection: s.boolean("CXGW_REFLECTION", true)?,
            limits: ServerLimits {
                max_message_bytes: s.parse_in(
                    "CXGW_MAX_MESSAGE_BYTES",
                    16 * 1024 * 1024,
                    1024..=256 * 1024 * 1024,
                )?,
                max_concurrent_streams: s.parse_in(
                    "CXGW_MAX_CONCURRENT_STREAMS",
                    256,
                    1..=100_000,
                )?,
                max_local_error_reset_streams: 1024,
                max_connection_age: s
                    .duration("CXGW_MAX_CONNECTION_AGE", Duration::from_secs(30 * 60))?,
                http2_keepalive_interval: s
                    .duration("CXGW_HTTP2_KEEPALIVE_INTERVAL", Duration::from_secs(30))?,
                http2_keepalive_timeout: s
                    .duration("CXGW_HTTP2_KEEPALIVE_TIMEOUT", Duration::from_secs(10))?,
                default_deadline: s.duration("CXGW_DEFAULT_DEADLINE", Duration::from_secs(30))?,
            },
            retently,
            retainly,
            feedback,
            webhook,
            writes: WriteSettings {
                retry_window: s
                    .duration("CXGW_OUTBOX_RETRY_WINDOW", Duration::from_secs(4 * 3600))?,
                idempotency_window: s
                    .duration("CXGW_IDEMPOTENCY_WINDOW", Duration::from_secs(24 * 3600))?,
                base_backoff,
                max_backoff,
            },
            event_rules: event_rules(&s, &event_mappings)?,
            survey_cooldown: survey_cooldown(&s)?,
            survey_cooldown_backfill: s.boolean("CXGW_SURVEY_COOLDOWN_BACKFILL", false)?,
            alert_rules,
            event_mappings,
            telemetry: crate::telemetry::TelemetryConfig::from_source(source)?,
            sandbox: SandboxSettings {
                addr: s.parse("CXGW_SANDBOX_ADDR", SocketAddr::from(([0, 0, 0, 0], 8090)))?,
                retently_requests_per_minute: s.parse_in(
                    "CXGW_SANDBOX_RETENTLY_REQUESTS_PER_MINUTE",
                    150,
                    0..=10_000_000,
                )?,
                feedback_per_second,
            },
            auth,
            tls,
            segment: segment_settings(&s)?,
        })
    }
}

fn segment_settings(s: &Reader<'_>) -> Result<Option<SegmentSettings>, ConfigError> {
    const KEY: &str = "CXGW_SEGMENT_LISTEN_ADDR";
    match s.source.get(KEY) {
        None => Ok(None),
        Some(text) if text.trim().is_empty() => Ok(None),
        Some(text) => text
            .trim()
            .parse()
            .map(|listen_addr| Some(SegmentSettings { listen_addr }))
            .map_err(|error| ConfigError::new(KEY, format!("`{text}` is not an address: {error}"))),
    }
}

/// The callers, and whether running without them is allowed in this mode.
fn auth_settings(s: &Reader<'_>, mode: UpstreamMode) -> Result<AuthSettings, ConfigError> {
    const FILE: &str = "CXGW_CALLERS_FILE";
    const INLINE: &str = "CXGW_CALLERS";
    const MESH: &str = "CXGW_TRUSTED_MESH";
    let source = match (s.source.get(INLINE), s.source.get(FILE)) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                INLINE,
                format!("set either {INLINE} or {FILE}, not both"),
            ));
        }
        (Some(text), None) => Some(CallersSource::Inline(Secret::new(text))),
        (None, Some(path)) if path.trim().is_empty() => {
            return Err(ConfigError::new(FILE, "must not be empty"));
        }
        (None, Some(path)) => Some(CallersSource::File(PathBuf::from(path))),
        (None, None) => None,
    };
    let callers = match source {
        Some(source) => {
            let setting = source.setting();
            Some(CallerRegistry::load(source).map_err(|reason| ConfigError::new(setting, reason))?)
        }
        None => None,
    };
    let trusted_mesh = s.boolean(MESH, false)?;
    if callers.is_none() && !trusted_mesh && mode == UpstreamMode::Real {
        return Err(ConfigError::new(
            FILE,
            format!(
                "`serve` needs to know its callers: set {FILE} (or {INLINE}) to a callers file, \
                 or {MESH}=true if a service mesh in front of the gateway authenticates every \
                 caller, or run `serve --sandbox` to try the gateway locally"
            ),
        ));
    }
    Ok(AuthSettings {
        callers,
        trusted_mesh,
        reload_interval: s.duration("CXGW_RELOAD_INTERVAL", Duration::from_secs(10))?,
    })
}

/// TLS is on when a certificate is configured; its files are read (and checked) at start.
fn tls_settings(s: &Reader<'_>) -> Result<Option<TlsSettings>, ConfigError> {
    let path = |key: &str| -> Result<Option<PathBuf>, ConfigError> {
        match s.source.get(key) {
            Some(path) if path.trim().is_empty() => Err(ConfigError::new(key, "must not be empty")),
            Some(path) => Ok(Some(PathBuf::from(path))),
            None => Ok(None),
        }
    };
    let cert = path("CXGW_TLS_CERT_FILE")?;
    let key = path("CXGW_TLS_KEY_FILE")?;
    let client_ca = path("CXGW_TLS_CLIENT_CA_FILE")?;
    let client_auth = match s.string("CXGW_TLS_CLIENT_AUTH", "required").trim() {
        "required" => ClientAuth::Required,
        "optional" => ClientAuth::Optional,
        other => {
            return Err(ConfigError::new(
                "CXGW_TLS_CLIENT_AUTH",
                format!("expected `required` or `optional`, got `{other}`"),
            ));
        }
    };
    let handshake_timeout = s.duration("CXGW_TLS_HANDSHAKE_TIMEOUT", Duration::from_secs(10))?;
    match (cert, key) {
        (Some(cert_file), Some(key_file)) => Ok(Some(TlsSettings {
            cert_file,
            key_file,
            client_ca_file: client_ca,
            client_auth,
            handshake_timeout,
        })),
        (None, None) if client_ca.is_some() => Err(ConfigError::new(
            "CXGW_TLS_CLIENT_CA_FILE",
            "mutual TLS needs CXGW_TLS_CERT_FILE and CXGW_TLS_KEY_FILE too",
        )),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::new(
            "CXGW_TLS_KEY_FILE",
            "required when CXGW_TLS_CERT_FILE is set",
        )),
        (None, Some(_)) => Err(ConfigError::new(
            "CXGW_TLS_CERT_FILE",
            "required when CXGW_TLS_KEY_FILE is set",
        )),
    }
}

/// Reads the TOML file into environment-style keys (see [`parse_config_file`]).
/// Which engine holds the store.
#[derive(Debug, Clone)]
pub enum StoreSelection {
    /// `CXGW_STORE=embedded` (the default): SQLite in the data directory.
    Embedded,
    /// `CXGW_STORE=postgres`: the PostgreSQL database of `CXGW_POSTGRES_URL` (or the file named
    /// by `CXGW_POSTGRES_URL_FILE`), a secret like the API keys.
    Postgres(crate::store::postgres::PostgresSettings),
}

fn store_selection(s: &Reader<'_>) -> Result<StoreSelection, ConfigError> {
    const URL: &str = "CXGW_POSTGRES_URL";
    match s.string("CXGW_STORE", "embedded").as_str() {
        "embedded" => {
            for key in [
                URL,
                "CXGW_POSTGRES_URL_FILE",
                "CXGW_POSTGRES_POOL_SIZE",
                "CXGW_POSTGRES_CA_FILE",
                "CXGW_POSTGRES_CLAIM_LEASE",
                "CXGW_POSTGRES_POLLER_LEASE",
                "CXGW_POSTGRES_SHARED_SURVEY_BATCHES",
            ] {
                if s.source.get(key).is_some() {
                    return Err(ConfigError::new(
                        key,
                        "applies only with CXGW_STORE=postgres",
                    ));
                }
            }
            Ok(StoreSelection::Embedded)
        }
        "postgres" => {
            let url = s.secret(URL)?.ok_or_else(|| {
                ConfigError::new(
                    URL,
                    format!("required by CXGW_STORE=postgres (or {URL}_FILE)"),
                )
            })?;
            let mut settings = crate::store::postgres::PostgresSettings::new(url);
            settings.pool_size =
                s.parse_in("CXGW_POSTGRES_POOL_SIZE", settings.pool_size, 1..=100)?;
            settings.ca_file = s.source.get("CXGW_POSTGRES_CA_FILE").map(PathBuf::from);
            settings.claim_lease = s.duration_in(
                "CXGW_POSTGRES_CLAIM_LEASE",
                settings.claim_lease,
                Duration::from_secs(3)..=Duration::from_secs(3600),
            )?;
            settings.poller_lease = s.duration_in(
                "CXGW_POSTGRES_POLLER_LEASE",
                settings.poller_lease,
                Duration::from_secs(1)..=Duration::from_secs(60),
            )?;
            settings.shared_survey_batches = s.boolean(
                "CXGW_POSTGRES_SHARED_SURVEY_BATCHES",
                settings.shared_survey_batches,
            )?;
            Ok(StoreSelection::Postgres(settings))
        }
        other => Err(ConfigError::new(
            "CXGW_STORE",
            format!("expected `embedded` or `postgres`, got `{other}`"),
        )),
    }
}

fn read_config_file(path: &str) -> Result<MapSource, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::new("CXGW_CONFIG_FILE", format!("cannot read `{path}`: {error}"))
    })?;
    parse_config_file(&text, path)
}

/// Parses the text of a configuration file into environment-style keys (`grpc_addr` →
/// `CXGW_GRPC_ADDR`); `path` only names the file in errors. Public so that the fuzz targets reach
/// it without a file.
pub fn parse_config_file(text: &str, path: &str) -> Result<MapSource, ConfigError> {
    const KEY: &str = "CXGW_CONFIG_FILE";
    let table: toml::Table = text.parse().map_err(|error: toml::de::Error| {
        ConfigError::new(KEY, format!("`{path}`: {}", error.message()))
    })?;
    let mut map = HashMap::new();
    for (name, value) in table {
        let key = format!("CXGW_{}", name.to_ascii_uppercase());
        let value = match value {
            toml::Value::String(text) => text,
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            toml::Value::Boolean(flag) => flag.to_string(),
            _ => {
                return Err(ConfigError::new(
                    KEY,
                    format!("`{name}` in `{path}` must be a string, number or boolean"),
                ));
            }
        };
        map.insert(key, value);
    }
    Ok(MapSource(map))
}

/// Typed accessors that turn every failure into a `ConfigError` naming the setting.
struct Reader<'a> {
    source: &'a dyn Source,
}

impl Reader<'_> {
    fn string(&self, key: &str, default: &str) -> String {
        self.source.get(key).unwrap_or_else(|| default.to_owned())
    }

    fn parse<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        match self.source.get(key) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|error| ConfigError::new(key, format!("`{raw}`: {error}"))),
        }
    }

    fn parse_in<T>(
        &self,
        key: &str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
        T::Err: fmt::Display,
    {
        let value = self.parse(key, default)?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError::new(
                key,
                format!("{value} is outside {}..={}", range.start(), range.end()),
            ))
        }
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.source.get(key).as_deref().map(str::trim) {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(ConfigError::new(
                key,
                format!("expected true or false, got `{other}`"),
            )),
        }
    }

    fn duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.source.get(key) {
            None => Ok(default),
            Some(raw) => humantime::parse_duration(raw.trim()).map_err(|error| {
                ConfigError::new(
                    key,
                    format!("`{raw}` is not a duration like 30s or 5m: {error}"),
                )
            }),
        }
    }

    fn duration_in(
        &self,
        key: &str,
        default: Duration,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Result<Duration, ConfigError> {
        let value = self.duration(key, default)?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError::new(
                key,
                format!(
                    "{} is outside {}..={}",
                    humantime::format_duration(value),
                    humantime::format_duration(*range.start()),
                    humantime::format_duration(*range.end())
                ),
            ))
        }
    }

    fn url(&self, key: &str, default: &str) -> Result<Url, ConfigError> {
        let raw = self.string(key, default);
        let url =
            Url::parse(&raw).map_err(|error| ConfigError::new(key, format!("`{raw}`: {error}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::new(key, "must be an http or https URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            // Credentials in a URL end up in logs and traces; they belong in the key settings.
            return Err(ConfigError::new(key, "must not contain credentials"));
        }
        Ok(url)
    }

    /// A secret from `KEY` or from the file named by `KEY_FILE` (trailing newline trimmed).
    fn secret(&self, key: &str) -> Result<Option<Secret>, ConfigError> {
        let file_key = format!("{key}_FILE");
        let value = match (self.source.get(key), self.source.get(&file_key)) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    key,
                    format!("set either {key} or {file_key}, not both"),
                ));
            }
            (Some(value), None) => value,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|error| {
                    ConfigError::new(&file_key, format!("cannot read `{path}`: {error}"))
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            (None, None) => return Ok(None),
        };
        if value.trim().is_empty() {
            return Err(ConfigError::new(key, "must not be empty"));
        }
        Ok(Some(Secret(value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CXGW_STORE` picks the engine; the PostgreSQL URL comes from the variable or its file,
    /// stays out of the configuration's debug output, and is refused where it would be ignored.
    #[test]
    fn the_store_is_chosen_by_cxgw_store() {
        let with = |extra: &[(&'static str, &str)]| {
            let mut pairs: Vec<(&str, String)> =
                keys().into_iter().map(|(k, v)| (k, v.to_owned())).collect();
            pairs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
            Config::load(&MapSource::new(pairs), UpstreamMode::Real)
        };
        assert!(matches!(with(&[]).unwrap().store, StoreSelection::Embedded));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("postgres-url");
        std::fs::write(&file, "postgres://gw:pg-canary-pw@db:5432/gw\n").unwrap();
        let config = with(&[
            ("CXGW_STORE", "postgres"),
            ("CXGW_POSTGRES_URL_FILE", file.to_str().unwrap()),
            ("CXGW_POSTGRES_POOL_SIZE", "4"),
        ])
        .unwrap();
        let StoreSelection::Postgres(settings) = &config.store else {
            panic!("postgres was asked for");
        };
        assert_eq!(
            settings.url.expose(),
            "postgres://gw:pg-canary-pw@db:5432/gw"
        );
        assert_eq!(settings.pool_size, 4);
        assert!(!format!("{config:?}").contains("pg-canary-pw"));

        let error = with(&[("CXGW_STORE", "postgres")]).unwrap_err();
        assert_eq!(error.key, "CXGW_POSTGRES_URL");
        let error = with(&[("CXGW_POSTGRES_URL", "postgres://db/gw")]).unwrap_err();
        assert_eq!(error.key, "CXGW_POSTGRES_URL");
        let error = with(&[("CXGW_STORE", "redis")]).unwrap_err();
        assert_eq!(error.key, "CXGW_STORE");
        let error = with(&[
            ("CXGW_STORE", "postgres"),
            ("CXGW_POSTGRES_URL", "postgres://db/gw"),
            ("CXGW_POSTGRES_CLAIM_LEASE", "1s"),
        ])
        .unwrap_err();
        assert_eq!(error.key, "CXGW_POSTGRES_CLAIM_LEASE");
        let error = with(&[
            ("CXGW_STORE", "postgres"),
            ("CXGW_POSTGRES_URL", "postgres://db/gw"),
            ("CXGW_POSTGRES_POLLER_LEASE", "500ms"),
        ])
        .unwrap_err();
        assert_eq!(error.key, "CXGW_POSTGRES_POLLER_LEASE");
        let error = with(&[("CXGW_POSTGRES_POLLER_LEASE", "3s")]).unwrap_err();
        assert_eq!(error.key, "CXGW_POSTGRES_POLLER_LEASE");
    }

    /// Loads the settings `base` with `extra` added (a later pair of a key wins).
    fn load(
        base: &[(&'static str, &'static str)],
        extra: &[(&str, &str)],
    ) -> Result<Config, ConfigError> {
        let pairs = base.iter().chain(extra).copied();
        Config::load(&MapSource::new(pairs), UpstreamMode::Real)
    }

    fn keys() -> Vec<(&'static str, &'static str)> {
        vec![
            ("CXGW_TRUSTED_MESH", "true"),
            ("CXGW_RETENTLY_API_KEY", "rk-canary-123"),
            ("CXGW_RETAINLY_API_KEY", "key-canary"),
            ("CXGW_RETAINLY_API_SECRET", "secret-canary"),
        ]
    }

    #[test]
    fn the_segment_intake_is_off_unless_given_an_address() {
        let config = load(&keys(), &[]).unwrap();
        assert!(config.segment.is_none());
        let mut settings = keys();
        settings.push(("CXGW_SEGMENT_LISTEN_ADDR", "127.0.0.1:8088"));
        let config = Config::load(&MapSource::new(settings), UpstreamMode::Real).unwrap();
        assert_eq!(config.segment.unwrap().listen_addr.port(), 8088);
        let mut settings = keys();
        settings.push(("CXGW_SEGMENT_LISTEN_ADDR", "port 8088"));
        let error = Config::load(&MapSource::new(settings), UpstreamMode::Real).unwrap_err();
        assert!(
            error.to_string().contains("CXGW_SEGMENT_LISTEN_ADDR"),
            "{error}"
        );
    }

    #[test]
    fn defaults_apply_when_only_keys_are_set() {
        let config = load(&keys(), &[]).unwrap();
        assert_eq!(config.grpc_addr.port(), 50051);
        assert_eq!(config.admin_addr.port(), 8080);
        assert_eq!(config.retently.requests_per_minute, 150);
        assert_eq!(
            config.retently.base_url.as_str(),
            "https://app.retently.com/"
        );
        assert_eq!(config.shutdown_grace, Duration::from_secs(20));
        assert_eq!(config.drain_delay, Duration::ZERO);
        assert_eq!(config.data_dir, Some(PathBuf::from("./data")));
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn real_mode_requires_keys_and_names_the_missing_one() {
        let error = Config::load(&MapSource::default(), UpstreamMode::Real).unwrap_err();
        assert_eq!(error.key, "CXGW_RETENTLY_API_KEY");
        let sandbox = Config::load(&MapSource::default(), UpstreamMode::Sandbox).unwrap();
        assert!(sandbox.retently.api_key.is_none());
        assert!(sandbox.data_dir.is_none());
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (key, value) in [
            ("CXGW_GRPC_ADDR", "not-an-address"),
            ("CXGW_SHUTDOWN_GRACE", "soon"),
            ("CXGW_DRAIN_DELAY", "a while"),
            ("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "0"),
            ("CXGW_REFLECTION", "maybe"),
            ("CXGW_LOG_FORMAT", "xml"),
            ("CXGW_RETENTLY_BASE_URL", "ftp://example.com"),
            ("CXGW_MAX_CONCURRENT_STREAMS", "-1"),
        ] {
            let error = load(&keys(), &[(key, value)]).unwrap_err();
            assert_eq!(error.key, key, "{value}");
        }
    }

    #[test]
    fn the_drain_delay_is_read_from_the_environment_and_the_file() {
        let config = load(&keys(), &[("CXGW_DRAIN_DELAY", "5s")]).unwrap();
        assert_eq!(config.drain_delay, Duration::from_secs(5));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, "drain_delay = \"1500ms\"\n").unwrap();
        let config = load(&keys(), &[("CXGW_CONFIG_FILE", file.to_str().unwrap())]).unwrap();
        assert_eq!(config.drain_delay, Duration::from_millis(1500));
    }

    #[test]
    fn secrets_are_never_printed() {
        let config = load(&keys(), &[]).unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("rk-canary-123"));
        assert!(!printed.contains("secret-canary"));
        assert_eq!(config.retently.api_key.unwrap().expose(), "rk-canary-123");
    }

    #[test]
    fn credentials_in_urls_are_refused_without_echoing_them() {
        let url = "https://user:hunter2@app.retently.com";
        let error = load(&keys(), &[("CXGW_RETENTLY_BASE_URL", url)]).unwrap_err();
        assert_eq!(error.key, "CXGW_RETENTLY_BASE_URL");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn file_settings_apply_and_environment_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            "grpc_addr = \"127.0.0.1:6000\"\nshutdown_grace = \"3s\"\nretently_requests_per_minute = 90\n",
        )
        .unwrap();
        let key_file = dir.path().join("retently.key");
        std::fs::write(&key_file, "from-file\n").unwrap();
        let source = MapSource::new([
            ("CXGW_CONFIG_FILE", file.to_str().unwrap()),
            ("CXGW_SHUTDOWN_GRACE", "7s"),
            ("CXGW_RETENTLY_API_KEY_FILE", key_file.to_str().unwrap()),
            ("CXGW_RETAINLY_API_KEY", "k"),
            ("CXGW_RETAINLY_API_SECRET", "s"),
            ("CXGW_TRUSTED_MESH", "true"),
        ]);
        let config = Config::load(&source, UpstreamMode::Real).unwrap();
        assert_eq!(config.grpc_addr.port(), 6000);
        assert_eq!(config.shutdown_grace, Duration::from_secs(7));
        assert_eq!(config.retently.requests_per_minute, 90);
        assert_eq!(config.retently.api_key.unwrap().expose(), "from-file");
    }

    #[test]
    fn event_mappings_parse_and_reject_malformed_entries() {
        let mappings = " order_completed = c1, c2 ; signup=c3;";
        let config = load(&keys(), &[("CXGW_EVENT_MAPPINGS", mappings)]).unwrap();
        assert_eq!(
            config.event_mappings.get("order_completed").unwrap(),
            &["c1".to_owned(), "c2".to_owned()]
        );
        assert_eq!(config.event_mappings.len(), 2);
        for bad in ["no_equals", "e=", "=c1", "a=c1;a=c2"] {
            let error = load(&keys(), &[("CXGW_EVENT_MAPPINGS", bad)]).unwrap_err();
            assert_eq!(error.key, "CXGW_EVENT_MAPPINGS", "{bad}");
        }
    }

    #[test]
    fn a_secret_and_its_file_variant_together_are_refused() {
        let error = load(&keys(), &[("CXGW_RETENTLY_API_KEY_FILE", "/nonexistent")]).unwrap_err();
        assert_eq!(error.key, "CXGW_RETENTLY_API_KEY");
    }

    fn without_mesh() -> Vec<(&'static str, &'static str)> {
        keys()
            .into_iter()
            .filter(|(key, _)| *key != "CXGW_TRUSTED_MESH")
            .collect()
    }

    #[test]
    fn serve_without_callers_refuses_unless_behind_a_trusted_mesh() {
        let error = Config::load(&MapSource::new(without_mesh()), UpstreamMode::Real).unwrap_err();
        assert_eq!(error.key, "CXGW_CALLERS_FILE");
        for named in [
            "CXGW_CALLERS_FILE",
            "CXGW_CALLERS",
            "CXGW_TRUSTED_MESH",
            "--sandbox",
        ] {
            assert!(
                error.to_string().contains(named),
                "{error} should name {named}"
            );
        }
        let config = load(&keys(), &[]).unwrap();
        assert!(config.auth.callers.is_none());
        assert!(config.auth.trusted_mesh);
        let sandbox = Config::load(&MapSource::default(), UpstreamMode::Sandbox).unwrap();
        assert!(sandbox.auth.callers.is_none());
    }

    #[test]
    fn callers_load_from_a_file_or_inline_and_errors_name_the_setting() {
        let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let text = format!(
            "[[caller]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\npermissions = [\"read\"]\n"
        );
        let config = load(&without_mesh(), &[("CXGW_CALLERS", &text)]).unwrap();
        let callers = config.auth.callers.clone().unwrap().current();
        assert!(callers.by_token("test").is_some());
        assert!(!format!("{:?}", config.auth.callers).contains(digest));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("callers.toml");
        std::fs::write(&file, text.replace("read", "rread")).unwrap();
        let error = load(
            &without_mesh(),
            &[("CXGW_CALLERS_FILE", file.to_str().unwrap())],
        )
        .unwrap_err();
        assert_eq!(error.key, "CXGW_CALLERS_FILE");
        assert!(
            error.reason.contains("unknown permission `rread`"),
            "{error}"
        );

        let error = load(
            &without_mesh(),
            &[
                ("CXGW_CALLERS_FILE", "/nonexistent/callers.toml"),
                ("CXGW_CALLERS", &text),
            ],
        )
        .unwrap_err();
        assert_eq!(error.key, "CXGW_CALLERS");
    }

    #[test]
    fn tls_settings_come_in_pairs() {
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut pairs = keys();
            pairs.extend_from_slice(extra);
            Config::load(&MapSource::new(pairs), UpstreamMode::Real)
        };
        assert!(with(&[]).unwrap().tls.is_none());
        let tls = with(&[
            ("CXGW_TLS_CERT_FILE", "/c.pem"),
            ("CXGW_TLS_KEY_FILE", "/k.pem"),
        ])
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(tls.client_auth, ClientAuth::Required);
        assert!(tls.client_ca_file.is_none());
        assert_eq!(
            with(&[("CXGW_TLS_CERT_FILE", "/c.pem")]).unwrap_err().key,
            "CXGW_TLS_KEY_FILE"
        );
        assert_eq!(
            with(&[("CXGW_TLS_CLIENT_CA_FILE", "/ca.pem")])
                .unwrap_err()
                .key,
            "CXGW_TLS_CLIENT_CA_FILE"
        );
        assert_eq!(
            with(&[
                ("CXGW_TLS_CERT_FILE", "/c.pem"),
                ("CXGW_TLS_KEY_FILE", "/k.pem"),
                ("CXGW_TLS_CLIENT_AUTH", "sometimes")
            ])
            .unwrap_err()
            .key,
            "CXGW_TLS_CLIENT_AUTH"
        );
    }

    #[test]
    fn feedback_and_webhook_settings_have_defaults_and_are_checked() {
        let config = load(&keys(), &[]).unwrap();
        assert!(config.feedback.sync);
        assert_eq!(config.feedback.poll_interval, Duration::from_secs(10));
        assert_eq!(config.feedback.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(
            config.feedback.retention,
            Duration::from_secs(30 * 24 * 3600)
        );
        assert!(config.webhook.secret.is_none());
        assert_eq!(config.webhook.secret_header, "x-cx-webhook-secret");

        let config = load(
            &keys(),
            &[
                ("CXGW_WEBHOOK_SECRET", "hook-canary"),
                ("CXGW_WEBHOOK_SECRET_HEADER", "X-Hook-Token"),
            ],
        )
        .unwrap();
        assert_eq!(config.webhook.secret_header, "x-hook-token");
        assert!(!format!("{config:?}").contains("hook-canary"));

        for (settings, key) in [
            (
                vec![("CXGW_WEBHOOK_SIGNING_SECRET", "s")],
                "CXGW_WEBHOOK_SIGNING_SECRET",
            ),
            (
                vec![
                    ("CXGW_WEBHOOK_SECRET", "s"),
                    ("CXGW_WEBHOOK_SECRET_HEADER", "bad header"),
                ],
                "CXGW_WEBHOOK_SECRET_HEADER",
            ),
            (
                vec![("CXGW_FEEDBACK_RETENTION", "12h")],
                "CXGW_FEEDBACK_RETENTION",
            ),
            (
                vec![("CXGW_FEEDBACK_POLL_INTERVAL", "1ms")],
                "CXGW_FEEDBACK_POLL_INTERVAL",
            ),
            (
                vec![("CXGW_FEEDBACK_MAX_SUBSCRIBERS", "0")],
                "CXGW_FEEDBACK_MAX_SUBSCRIBERS",
            ),
        ] {
            let mut pairs = keys();
            pairs.extend(settings);
            let error = Config::load(&MapSource::new(pairs), UpstreamMode::Real).unwrap_err();
            assert_eq!(error.key, key);
        }
        // No age limit lifts the check against the rescan window.
        assert!(load(&keys(), &[("CXGW_FEEDBACK_RETENTION", "0s")]).is_ok());
    }
}
