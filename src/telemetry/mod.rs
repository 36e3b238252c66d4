//! Logs, traces and metrics.
//!
//! - Logs: human-readable by default, JSON when configured, filtered by `CXGW_LOG`; every line
//!   carries the trace and span ids of the span it was written in ([`logfmt`]).
//! - Traces: `tracing` spans exported through `tracing-opentelemetry` and OTLP/gRPC when an
//!   endpoint is configured through the standard `OTEL_*` variables ([`settings`]); W3C trace
//!   context in from callers and out to the upstreams ([`propagation`]); one server span per
//!   RPC from a tower layer ([`grpc`]).
//! - Metrics: OpenTelemetry instruments read by `/metrics` on the admin port and, when
//!   configured, pushed through OTLP ([`metrics`], [`prometheus`]).
//! - Redaction: every log line and exported span passes one guard ([`redact`]).
//!
//! Everything here is process-wide (like `tracing`'s global dispatcher), so [`init`] runs once,
//! in `main`. In-process tests that never call it still get metrics (Prometheus only) and no
//! trace export; the telemetry tests run the binary in a child process.

pub mod grpc;
pub mod logfmt;
pub mod metrics;
pub mod prometheus;
pub mod propagation;
pub mod redact;
pub mod settings;

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use anyhow::Context as _;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, Temporality};
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use self::metrics::metrics;
pub use self::settings::TelemetryConfig;
use self::settings::{OtlpTarget, SamplerSetting};
use crate::config::{Config, LogFormat};

/// The tracer provider [`init`] installed, flushed by [`flush`].
static TRACER_PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);
/// Whether spans go to a collector; without, the caller's trace context is not even parsed.
static TRACES_EXPORTED: AtomicBool = AtomicBool::new(false);

/// Whether [`init`] installed a trace exporter.
pub fn traces_exported() -> bool {
    TRACES_EXPORTED.load(Ordering::Relaxed)
}

/// Installs the global subscriber (logs, and spans to OTLP when configured) and the metrics
/// pipeline. Fails if a setting cannot be used, naming it. Must run inside the tokio runtime:
/// the OTLP channels are created here.
pub fn init(config: &Config) -> anyhow::Result<()> {
    register_secrets(config);
    let telemetry = &config.telemetry;
    let resource = resource(telemetry);

    let metric_reader = match &telemetry.metrics {
        Some(target) => {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(&target.endpoint)
                .with_timeout(target.timeout)
                .with_metadata(metadata(target)?)
                .with_temporality(Temporality::Cumulative)
                .build()
                .context("cannot build the otlp metric exporter")?;
            Some(
                PeriodicReader::builder(exporter)
                    .with_interval(telemetry.metric_export_interval)
                    .build(),
            )
        }
        None => None,
    };
    let metrics_to_otlp = metric_reader.is_some();
    let metrics_installed = metrics::install(metric_reader, resource.clone());

    let tracer_provider = match &telemetry.traces {
        Some(target) => Some(tracer_provider(target, telemetry.sampler, resource)?),
        None => None,
    };

    let filter = EnvFilter::try_new(&config.log.filter)
        .map_err(|error| anyhow::anyhow!("invalid setting CXGW_LOG: {error}"))?;
    let slot = logfmt::DispatchSlot::default();
    // Colour codes only where a person reads a terminal, never in collected logs.
    let ansi = std::io::stdout().is_terminal();
    let fmt_layer = match config.log.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            // Span fields are formatted by the layer, the line by the event format: both follow.
            .with_ansi(ansi)
            .event_format(logfmt::LineFormat::text(ansi, slot.clone()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(logfmt::LineFormat::json(slot.clone()))
            .with_filter(filter)
            .boxed(),
    };
    // Spans reach the trace whatever CXGW_LOG says: the log filter is for lines, and a
    // `CXGW_LOG=warn` must not cut traces. Only the gateway's own spans are traced (not those
    // of hyper, h2 or reqwest).
    let otel_layer = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("cx-gateway"))
            .with_threads(false)
            .with_location(false)
            .with_filter(
                Targets::new()
                    .with_target("cx_gateway", Level::INFO)
                    .with_target("cx_sandbox", Level::ERROR),
            )
    });
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(fmt_layer)
            .with(otel_layer),
    );
    slot.set(&dispatch);
    dispatch.try_init()?;

    if !metrics_installed {
        tracing::warn!("metrics were in use before telemetry started; otlp metric export is off");
    }
    if let Some(target) = &telemetry.traces {
        tracing::info!(endpoint = %target.endpoint, service = %telemetry.service_name, "exporting traces");
    }
    if metrics_to_otlp && metrics_installed {
        tracing::info!(interval = ?telemetry.metric_export_interval, "exporting metrics");
    }
    TRACES_EXPORTED.store(tracer_provider.is_some(), Ordering::Relaxed);
    *TRACER_PROVIDER
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = tracer_provider;
    Ok(())
}

/// Every secret of the configuration is known to the redaction guard before anything is logged.
fn register_secrets(config: &Config) {
    let secrets = [
        config.retently.api_key.as_ref(),
        config.retainly.api_key.as_ref(),
        config.retainly.api_secret.as_ref(),
        config.webhook.secret.as_ref(),
        config.webhook.signing_secret.as_ref(),
    ];
    for secret in secrets.into_iter().flatten() {
        redact::register_secret(secret);
    }
    for target in [&config.telemetry.traces, &config.telemetry.metrics]
        .into_iter()
        .flatten()
    {
        for (_, value) in &target.headers {
            redact::register_secret(value);
        }
    }
}

fn resource(telemetry: &TelemetryConfig) -> Resource {
    Resource::builder_empty()
        .with_service_name(telemetry.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attributes(
            telemetry
                .resource_attributes
                .iter()
                .map(|(key, value)| KeyValue::new(key.clone(), value.clone())),
        )
        .build()
}

fn metadata(target: &OtlpTarget) -> anyhow::Result<tonic::metadata::MetadataMap> {
    let mut map = tonic::metadata::MetadataMap::new();
    for (name, value) in &target.headers {
        let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
            .map_err(|_| anyhow::anyhow!("invalid otlp header name `{name}`"))?;
        // The value is a credential: the error names the header, never the value.
        let mut value = tonic::metadata::MetadataValue::try_from(value.expose())
            .map_err(|_| anyhow::anyhow!("the value of otlp header `{name}` is not valid"))?;
        value.set_sensitive(true);
        map.insert(key, value);
    }
    Ok(map)
}

fn tracer_provider(
    target: &OtlpTarget,
    sampler: SamplerSetting,
    resource: Resource,
) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&target.endpoint)
        .with_timeout(target.timeout)
        .with_metadata(metadata(target)?)
        .build()
        .context("cannot build the otlp span exporter")?;
    let sampler = match sampler {
        SamplerSetting::AlwaysOn => Sampler::AlwaysOn,
        SamplerSetting::AlwaysOff => Sampler::AlwaysOff,
        SamplerSetting::TraceIdRatio(ratio) => Sampler::TraceIdRatioBased(ratio),
        SamplerSetting::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        SamplerSetting::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        SamplerSetting::ParentBasedTraceIdRatio(ratio) => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        }
    };
    Ok(SdkTracerProvider::builder()
        .with_span_processor(redact::RedactingProcessor::new(
            BatchSpanProcessor::builder(exporter).build(),
        ))
        .with_sampler(sampler)
        .with_resource(resource)
        .build())
}

/// A span around a request's validation; [`record_violations`] says how it ended.
pub fn validation_span() -> tracing::Span {
    tracing::info_span!("validate", violations = tracing::field::Empty)
}

/// Records on a validation span how many field violations were found.
pub fn record_violations(span: &tracing::Span, violations: &crate::error::Violations) {
    span.record("violations", violations.len());
}

/// How long a metrics probe may wait for the store: a stuck store must not hold a scrape forever.
const STORE_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reports, until the app is dropped, the outbox's queued deliveries and dead letters, the age of
/// its oldest unfinished delivery, and whether the store answers at all.
pub fn register_store_probes(app: &std::sync::Arc<crate::app::App>) {
    let store = StoreProbe {
        app: std::sync::Arc::downgrade(app),
        runtime: tokio::runtime::Handle::current(),
    };
    register_outbox_depth_probe(store.clone());
    register_outbox_age_probe(store.clone());
    register_store_available_probe(store);
    register_store_reachable_probe(app);
}

/// What a metrics probe reads the store through: the app while it lives, and the runtime that
/// runs the read.
#[derive(Clone)]
struct StoreProbe {
    app: std::sync::Weak<crate::app::App>,
    runtime: tokio::runtime::Handle,
}

impl StoreProbe {
    /// The answer of `read`, bounded by [`STORE_PROBE_TIMEOUT`]; `None` once the app is dropped
    /// (the probe then unregisters). Probes run on the metrics reader's own thread or a blocking
    /// thread, never on an async worker, so waiting here blocks no task.
    fn read<T, Read>(
        &self,
        read: impl FnOnce(std::sync::Arc<crate::app::App>) -> Read,
    ) -> Option<Result<Result<T, crate::error::Error>, tokio::time::error::Elapsed>>
    where
        Read: std::future::Future<Output = Result<T, crate::error::Error>>,
    {
        let app = self.app.upgrade()?;
        // The timer is made inside `block_on`: only there is the runtime's clock in reach.
        Some(
            self.runtime
                .block_on(async { tokio::time::timeout(STORE_PROBE_TIMEOUT, read(app)).await }),
        )
    }
}

fn register_outbox_depth_probe(store: StoreProbe) {
    metrics::register_probe(metrics::Observed::OutboxDeliveries, move |readings| {
        match store.read(|app| async move { app.outbox.depth().await }) {
            None => return false,
            Some(Ok(Ok((queued, dead)))) => {
                for (state, count) in [("queued", queued), ("dead_letter", dead)] {
                    readings.push((
                        u64::try_from(count).unwrap_or(0),
                        vec![KeyValue::new("state", state)],
                    ));
                }
            }
            Some(Ok(Err(error))) => tracing::warn!(%error, "cannot read the outbox depth"),
            Some(Err(_elapsed)) => tracing::warn!("reading the outbox depth timed out"),
        }
        true
    });
}

fn register_outbox_age_probe(store: StoreProbe) {
    metrics::register_float_probe(metrics::Observed::OutboxOldestPendingAge, move |readings| {
        match store.read(|app| async move { app.outbox.oldest_pending_ms().await }) {
            None => return false,
            Some(Ok(Ok(oldest))) => {
                let now_ms = chrono::Utc::now().timestamp_millis();
                readings.push((pending_age_seconds(oldest, now_ms), Vec::new()));
            }
            Some(Ok(Err(error))) => {
                tracing::warn!(%error, "cannot read the oldest outbox delivery");
            }
            Some(Err(_elapsed)) => tracing::warn!("reading the oldest outbox delivery timed out"),
        }
        true
    });
}

/// The age of the oldest unfinished delivery, 0 when none is waiting (and never negative when
/// the clock stepped back since it was accepted).
fn pending_age_seconds(oldest_ms: Option<i64>, now_ms: i64) -> f64 {
    oldest_ms.map_or(0.0, |oldest| {
        // Millisecond differences fit an f64 exactly for any realistic age.
        #[allow(clippy::cast_precision_loss)]
        let age = now_ms.saturating_sub(oldest).max(0) as f64;
        age / 1000.0
    })
}

/// The health probe's view, kept by readiness: no store access at scrape time.
fn register_store_reachable_probe(app: &std::sync::Arc<crate::app::App>) {
    let app = std::sync::Arc::downgrade(app);
    metrics::register_probe(metrics::Observed::StoreReachable, move |readings| {
        let Some(app) = app.upgrade() else {
            return false;
        };
        readings.push((u64::from(app.readiness.store_reachable()), Vec::new()));
        true
    });
}

fn register_store_available_probe(store: StoreProbe) {
    metrics::register_probe(metrics::Observed::StoreAvailable, move |readings| {
        // A read of a real table through the outbox (not a bare `SELECT 1`, which SQLite answers
        // without touching the file), so a vanished, unreadable or locked-up database shows as 0
        // whatever engine the store runs on.
        let available = match store.read(|app| async move { app.outbox.depth().await }) {
            None => return false,
            Some(Ok(Ok(_))) => 1,
            Some(Ok(Err(error))) => {
                tracing::warn!(%error, "the store did not answer the availability probe");
                0
            }
            Some(Err(_elapsed)) => {
                tracing::warn!("the store availability probe timed out");
                0
            }
        };
        readings.push((available, Vec::new()));
        true
    });
}

/// Exports whatever spans and metrics are still buffered. `server::run` awaits it last, so a
/// stopped gateway has delivered its telemetry. A no-op when nothing is exported.
pub async fn flush() {
    let provider = TRACER_PROVIDER
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    // The SDK's flush blocks until the exporter answered (bounded by the OTLP timeout).
    let flushed = tokio::task::spawn_blocking(move || {
        let traces = provider.map(|provider| provider.force_flush());
        let metrics = metrics().flush();
        (traces, metrics)
    })
    .await;
    match flushed {
        Ok((traces, metrics)) => {
            if let Some(Err(error)) = traces {
                tracing::warn!(%error, "cannot flush traces");
            }
            if let Err(error) = metrics {
                tracing::warn!(%error, "cannot flush metrics");
            }
        }
        Err(error) => tracing::warn!(%error, "the telemetry flush task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::pending_age_seconds;

    #[test]
    fn pending_age_is_zero_without_a_waiting_delivery_and_never_negative() {
        assert_eq!(pending_age_seconds(None, 5_000), 0.0);
        assert_eq!(pending_age_seconds(Some(1_500), 5_000), 3.5);
        // The clock stepped back since the delivery was accepted.
        assert_eq!(pending_age_seconds(Some(9_000), 5_000), 0.0);
    }
}
