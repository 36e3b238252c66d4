//! Prometheus text exposition (format 0.0.4) of collected OpenTelemetry metrics, following the
//! OpenTelemetry → Prometheus compatibility rules: dots become underscores, the unit becomes a
//! suffix (`s` → `_seconds`), monotonic sums become counters with `_total`, histograms become
//! cumulative `_bucket{le=...}` series with `_sum` and `_count`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn encode(collected: &ResourceMetrics) -> String {
    let mut out = String::new();
    for scope in collected.scope_metrics() {
        for metric in scope.metrics() {
            encode_metric(&mut out, metric);
        }
    }
    out
}

fn encode_metric(out: &mut String, metric: &Metric) {
    let base = metric_name(metric.name(), metric.unit());
    match metric.data() {
        AggregatedMetrics::F64(data) => encode_data(out, &base, metric.description(), data),
        AggregatedMetrics::U64(data) => encode_data(out, &base, metric.description(), data),
        AggregatedMetrics::I64(data) => encode_data(out, &base, metric.description(), data),
    }
}

trait Number: Copy {
    fn text(self) -> String;
}

impl Number for f64 {
    fn text(self) -> String {
        float(self)
    }
}

impl Number for u64 {
    fn text(self) -> String {
        self.to_string()
    }
}

impl Number for i64 {
    fn text(self) -> String {
        self.to_string()
    }
}

fn encode_data<T: Number>(out: &mut String, base: &str, help: &str, data: &MetricData<T>) {
    match data {
        MetricData::Gauge(gauge) => {
            header(out, base, help, "gauge");
            for point in gauge.data_points() {
                sample(
                    out,
                    base,
                    &labels(point.attributes(), None),
                    &point.value().text(),
                );
            }
        }
        MetricData::Sum(sum) => {
            let (name, kind) = if sum.is_monotonic() {
                (format!("{base}_total"), "counter")
            } else {
                (base.to_owned(), "gauge")
            };
            header(out, base, help, kind);
            for point in sum.data_points() {
                sample(
                    out,
                    &name,
                    &labels(point.attributes(), None),
                    &point.value().text(),
                );
            }
        }
        MetricData::Histogram(histogram) => {
            header(out, base, help, "histogram");
            for point in histogram.data_points() {
                let mut cumulative = 0u64;
                let bounds: Vec<f64> = point.bounds().collect();
                for (index, count) in point.bucket_counts().enumerate() {
                    cumulative += count;
                    let le = bounds
                        .get(index)
                        .map_or_else(|| "+Inf".to_owned(), |b| float(*b));
                    let bucket = format!("{base}_bucket");
                    sample(
                        out,
                        &bucket,
                        &labels(point.attributes(), Some(&le)),
                        &cumulative.to_string(),
                    );
                }
                let plain = labels(point.attributes(), None);
                sample(out, &format!("{base}_sum"), &plain, &point.sum().text());
                sample(
                    out,
                    &format!("{base}_count"),
                    &plain,
                    &point.count().to_string(),
                );
            }
        }
        // Not produced: no instrument is configured with exponential aggregation.
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    if !help.is_empty() {
        let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    }
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: &str) {
    let _ = writeln!(out, "{name}{labels} {value}");
}

fn labels<'a>(attributes: impl Iterator<Item = &'a KeyValue>, le: Option<&str>) -> String {
    // Sorted, and names that collide after sanitising are joined with `;` as the spec says.
    let mut pairs: BTreeMap<String, String> = BTreeMap::new();
    for attribute in attributes {
        let key = sanitize(attribute.key.as_str(), false);
        let value = attribute.value.as_str().into_owned();
        pairs
            .entry(key)
            .and_modify(|existing| {
                existing.push(';');
                existing.push_str(&value);
            })
            .or_insert(value);
    }
    if let Some(le) = le {
        pairs.insert("le".to_owned(), le.to_owned());
    }
    if pairs.is_empty() {
        return String::new();
    }
    let body: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key}=\"{}\"", escape_label(value)))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn metric_name(name: &str, unit: &str) -> String {
    let mut name = sanitize(name, true);
    let suffix = match unit {
        "s" => "seconds",
        "ms" => "milliseconds",
        "By" => "bytes",
        _ => "",
    };
    if !suffix.is_empty() && !name.ends_with(suffix) {
        name.push('_');
        name.push_str(suffix);
    }
    name
}

/// Characters outside `[a-zA-Z0-9_]` (and `:` in metric names) become `_`; a leading digit gets
/// a `_` prefix.
fn sanitize(raw: &str, metric: bool) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || (metric && c == ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\n', "\\n")
}

fn float(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::reader::MetricReader as _;
    use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};
    use std::sync::Arc;

    #[derive(Clone, Debug)]
    struct Shared(Arc<ManualReader>);

    impl opentelemetry_sdk::metrics::reader::MetricReader for Shared {
        fn register_pipeline(&self, p: std::sync::Weak<opentelemetry_sdk::metrics::Pipeline>) {
            self.0.register_pipeline(p)
        }
        fn collect(&self, rm: &mut ResourceMetrics) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.collect(rm)
        }
        fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(
            &self,
            t: std::time::Duration,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.shutdown_with_timeout(t)
        }
        fn temporality(
            &self,
            kind: opentelemetry_sdk::metrics::InstrumentKind,
        ) -> opentelemetry_sdk::metrics::Temporality {
            self.0.temporality(kind)
        }
    }

    #[test]
    fn counters_histograms_and_gauges_follow_the_text_format() {
        let reader = Shared(Arc::new(ManualReader::builder().build()));
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        let meter = provider.meter("test");
        let counter = meter
            .u64_counter("rpc.server.calls")
            .with_description("calls")
            .build();
        counter.add(2, &[KeyValue::new("rpc.method", "Get\"x\"")]);
        let histogram = meter
            .f64_histogram("rpc.server.call.duration")
            .with_unit("s")
            .with_boundaries(vec![0.1, 1.0])
            .build();
        histogram.record(0.05, &[KeyValue::new("code", "0")]);
        histogram.record(0.5, &[KeyValue::new("code", "0")]);
        histogram.record(5.0, &[KeyValue::new("code", "0")]);
        let updown = meter.i64_up_down_counter("queue.depth").build();
        updown.add(-3, &[]);
        let mut collected = ResourceMetrics::default();
        reader.collect(&mut collected).unwrap();
        let text = encode(&collected);
        assert!(
            text.contains("# HELP rpc_server_calls calls\n# TYPE rpc_server_calls counter\n"),
            "{text}"
        );
        assert!(
            text.contains("rpc_server_calls_total{rpc_method=\"Get\\\"x\\\"\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE rpc_server_call_duration_seconds histogram\n"),
            "{text}"
        );
        for line in [
            "rpc_server_call_duration_seconds_bucket{code=\"0\",le=\"0.1\"} 1",
            "rpc_server_call_duration_seconds_bucket{code=\"0\",le=\"1\"} 2",
            "rpc_server_call_duration_seconds_bucket{code=\"0\",le=\"+Inf\"} 3",
            "rpc_server_call_duration_seconds_sum{code=\"0\"} 5.55",
            "rpc_server_call_duration_seconds_count{code=\"0\"} 3",
            "# TYPE queue_depth gauge",
            "queue_depth -3",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
    }
}
