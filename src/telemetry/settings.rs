//! The standard OpenTelemetry environment variables, read through the configuration [`Source`]
//! so tests feed a map and nothing here touches the process environment.
//!
//! Only what the gateway uses is read; every other `OTEL_*` variable is ignored rather than
//! half-honoured. The exporters are built from these values explicitly, so the SDK's own
//! environment lookups never disagree with what was validated here.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::config::{ConfigError, Secret, Source};

/// How traces are sampled (`OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

/// One OTLP/gRPC destination (traces or metrics).
#[derive(Clone)]
pub struct OtlpTarget {
    /// `http://host:4317`; TLS to the collector is not built in (see the README).
    pub endpoint: String,
    /// `OTEL_EXPORTER_OTLP_*HEADERS`: often a collector token, so held as a secret.
    pub headers: Vec<(String, Secret)>,
    pub timeout: Duration,
}

impl fmt::Debug for OtlpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("OtlpTarget")
            .field("endpoint", &self.endpoint)
            .field("header_names", &names)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Trace and metric export settings.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES` (service.name there is overridden by `OTEL_SERVICE_NAME`).
    pub resource_attributes: BTreeMap<String, String>,
    /// `None`: no trace export (no endpoint, `OTEL_TRACES_EXPORTER=none` or the SDK disabled).
    pub traces: Option<OtlpTarget>,
    /// `None`: metrics are only served on the admin port's `/metrics`.
    pub metrics: Option<OtlpTarget>,
    pub sampler: SamplerSetting,
    pub metric_export_interval: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            resource_attributes: BTreeMap::new(),
            traces: None,
            metrics: None,
            sampler: SamplerSetting::ParentBasedAlwaysOn,
            metric_export_interval: Duration::from_secs(60),
        }
    }
}

pub const DEFAULT_SERVICE_NAME: &str = "cx-gateway";
/// The OTLP default (4317 is OTLP/gRPC's registered port).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

fn error(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

impl TelemetryConfig {
    pub fn from_source(source: &dyn Source) -> Result<TelemetryConfig, ConfigError> {
        let get = |key: &str| {
            source
                .get(key)
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
        };
        let mut resource_attributes = match get("OTEL_RESOURCE_ATTRIBUTES") {
            Some(raw) => parse_pairs("OTEL_RESOURCE_ATTRIBUTES", &raw)?,
            None => BTreeMap::new(),
        };
        let service_name = get("OTEL_SERVICE_NAME")
            .or_else(|| resource_attributes.remove("service.name"))
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
        resource_attributes.remove("service.name");

        let disabled = match get("OTEL_SDK_DISABLED").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(error(
                    "OTEL_SDK_DISABLED",
                    format!("expected true or false, got `{other}`"),
                ));
            }
        };
        if let Some(protocol) = get("OTEL_EXPORTER_OTLP_PROTOCOL")
            && protocol != "grpc"
        {
            return Err(error(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                format!("only `grpc` is supported, got `{protocol}`"),
            ));
        }
        let timeout = millis(&get, "OTEL_EXPORTER_OTLP_TIMEOUT", DEFAULT_TIMEOUT)?;
        let headers = match get("OTEL_EXPORTER_OTLP_HEADERS") {
            Some(raw) => secret_headers("OTEL_EXPORTER_OTLP_HEADERS", &raw)?,
            None => Vec::new(),
        };
        let base = get("OTEL_EXPORTER_OTLP_ENDPOINT");
        let target = |signal: &str| -> Result<Option<OtlpTarget>, ConfigError> {
            let exporter_key = format!("OTEL_{signal}_EXPORTER");
            match get(&exporter_key).as_deref() {
                None | Some("otlp") => {}
                Some("none") => return Ok(None),
                Some(other) => {
                    return Err(error(
                        &exporter_key,
                        format!("expected `otlp` or `none`, got `{other}`"),
                    ));
                }
            }
            let endpoint_key = format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT");
            let (key, endpoint) = match get(&endpoint_key) {
                Some(endpoint) => (endpoint_key, endpoint),
                None => match &base {
                    Some(endpoint) => ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), endpoint.clone()),
                    None => return Ok(None),
                },
            };
            let endpoint = check_endpoint(&key, &endpoint)?;
            let headers_key = format!("OTEL_EXPORTER_OTLP_{signal}_HEADERS");
            let headers = match get(&headers_key) {
                Some(raw) => secret_headers(&headers_key, &raw)?,
                None => headers.clone(),
            };
            let timeout = millis(
                &get,
                &format!("OTEL_EXPORTER_OTLP_{signal}_TIMEOUT"),
                timeout,
            )?;
            Ok(Some(OtlpTarget {
                endpoint,
                headers,
                timeout,
            }))
        };
        let traces = target("TRACES")?;
        let metrics = target("METRICS")?;
        let sampler = parse_sampler(get("OTEL_TRACES_SAMPLER"), get("OTEL_TRACES_SAMPLER_ARG"))?;
        let metric_export_interval =
            millis(&get, "OTEL_METRIC_EXPORT_INTERVAL", Duration::from_secs(60))?;
        if metric_export_interval.is_zero() {
            return Err(error("OTEL_METRIC_EXPORT_INTERVAL", "must be above 0"));
        }
        Ok(TelemetryConfig {
            service_name,
            resource_attributes,
            traces: traces.filter(|_| !disabled),
            metrics: metrics.filter(|_| !disabled),
            sampler,
            metric_export_interval,
        })
    }
}

/// A duration given in milliseconds, as every OTel timeout and interval variable is.
fn millis(
    get: &dyn Fn(&str) -> Option<String>,
    key: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match get(key) {
        None => Ok(default),
        Some(raw) => raw
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| error(key, format!("expected milliseconds, got `{raw}`"))),
    }
}

fn check_endpoint(key: &str, raw: &str) -> Result<String, ConfigError> {
    let url = reqwest::Url::parse(raw).map_err(|e| error(key, format!("`{raw}`: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        // Never echo the value: it holds a credential.
        return Err(error(
            key,
            "must not contain credentials; use the HEADERS variables",
        ));
    }
    match url.scheme() {
        "http" => Ok(raw.trim_end_matches('/').to_owned()),
        "https" => Err(error(
            key,
            "TLS to the collector is not built in; send to a local collector or agent over http",
        )),
        other => Err(error(
            key,
            format!("expected an http URL, got scheme `{other}`"),
        )),
    }
}

/// `key=value,key2=value2` with percent-encoded values (the W3C baggage format the spec uses).
fn parse_pairs(key: &str, raw: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut pairs = BTreeMap::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((name, value)) = entry.split_once('=') else {
            return Err(error(key, "expected key=value pairs separated by commas"));
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(error(key, "an entry has an empty key"));
        }
        pairs.insert(name.to_owned(), percent_decode(value.trim()));
    }
    Ok(pairs)
}

fn secret_headers(key: &str, raw: &str) -> Result<Vec<(String, Secret)>, ConfigError> {
    let mut headers = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        // The message never quotes the entry: header values are credentials.
        let Some((name, value)) = entry.split_once('=') else {
            return Err(error(key, "expected name=value pairs separated by commas"));
        };
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(error(
                key,
                "a header name is empty or not a valid grpc metadata key",
            ));
        }
        headers.push((name, Secret::new(percent_decode(value.trim()))));
    }
    Ok(headers)
}

fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_sampler(name: Option<String>, arg: Option<String>) -> Result<SamplerSetting, ConfigError> {
    const KEY: &str = "OTEL_TRACES_SAMPLER";
    let ratio = || -> Result<f64, ConfigError> {
        match &arg {
            None => Ok(1.0),
            Some(raw) => match raw.parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
                _ => Err(error(
                    "OTEL_TRACES_SAMPLER_ARG",
                    format!("expected a ratio from 0 to 1, got `{raw}`"),
                )),
            },
        }
    };
    Ok(match name.as_deref() {
        None | Some("parentbased_always_on") => SamplerSetting::ParentBasedAlwaysOn,
        Some("always_on") => SamplerSetting::AlwaysOn,
        Some("always_off") => SamplerSetting::AlwaysOff,
        Some("traceidratio") => SamplerSetting::TraceIdRatio(ratio()?),
        Some("parentbased_always_off") => SamplerSetting::ParentBasedAlwaysOff,
        Some("parentbased_traceidratio") => SamplerSetting::ParentBasedTraceIdRatio(ratio()?),
        Some(other) => {
            return Err(error(
                KEY,
                format!(
                    "`{other}` is not one of always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ),
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MapSource;

    fn load(pairs: &[(&str, &str)]) -> Result<TelemetryConfig, ConfigError> {
        TelemetryConfig::from_source(&MapSource::new(pairs.iter().copied()))
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        let config = load(&[("OTEL_SERVICE_NAME", "gw")]).unwrap();
        assert!(config.traces.is_none() && config.metrics.is_none());
        assert_eq!(config.service_name, "gw");
        assert_eq!(config.sampler, SamplerSetting::ParentBasedAlwaysOn);
    }

    #[test]
    fn signal_endpoints_override_the_base_and_exporters_can_be_switched_off() {
        let config = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317/"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ])
        .unwrap();
        let traces = config.traces.unwrap();
        assert_eq!(traces.endpoint, "http://traces:4317");
        assert_eq!(traces.timeout, Duration::from_millis(2500));
        assert!(config.metrics.is_none());
        assert_eq!(
            config.sampler,
            SamplerSetting::ParentBasedTraceIdRatio(0.25)
        );

        let config = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317/")]).unwrap();
        assert_eq!(config.metrics.unwrap().endpoint, "http://collector:4317");
        let config = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ])
        .unwrap();
        assert!(config.traces.is_none());
    }

    #[test]
    fn resource_attributes_are_decoded_and_service_name_wins() {
        let config = load(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.name=from-attrs, deployment.environment=prod%20eu,team=cx",
        )])
        .unwrap();
        assert_eq!(config.service_name, "from-attrs");
        assert_eq!(
            config.resource_attributes["deployment.environment"],
            "prod eu"
        );
        assert!(!config.resource_attributes.contains_key("service.name"));
    }

    #[test]
    fn header_values_never_reach_errors_or_debug_output() {
        let config = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer%20tok-canary",
            ),
        ])
        .unwrap();
        let traces = config.traces.clone().unwrap();
        assert_eq!(traces.headers[0].1.expose(), "Bearer tok-canary");
        assert!(!format!("{config:?}").contains("tok-canary"));
        let error = load(&[("OTEL_EXPORTER_OTLP_HEADERS", "tok-canary-no-equals")]).unwrap_err();
        assert!(!error.to_string().contains("tok-canary"), "{error}");
        let error = load(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://u:pw-canary@collector:4317",
        )])
        .unwrap_err();
        assert!(!error.to_string().contains("pw-canary"), "{error}");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (key, value) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
            ("OTEL_TRACES_EXPORTER", "jaeger"),
            ("OTEL_RESOURCE_ATTRIBUTES", "novalue"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "0"),
        ] {
            assert_eq!(load(&[(key, value)]).unwrap_err().key, key, "{value}");
        }
        let error = load(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ])
        .unwrap_err();
        assert_eq!(error.key, "OTEL_TRACES_SAMPLER_ARG");
    }
}
