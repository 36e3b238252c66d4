//! The two log line formats. Both pass every line through the redaction guard and add the
//! OpenTelemetry trace and span ids of the span the event happened in, so a log line leads to
//! its trace:
//! - text (default): tracing-subscriber's full format, then ` trace_id=… span_id=…`;
//! - JSON: one object per line with `timestamp`, `level`, `target`, the event's fields
//!   (`message` included), `span` (the innermost span's name), `spans` (the fields of every
//!   enclosing span, outermost first, inner ones winning), `trace_id` and `span_id`.

use std::fmt;

use opentelemetry::trace::TraceContextExt as _;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::redact::scrub;

/// The ids of the OpenTelemetry span behind the innermost `tracing` span of the event, if the
/// OpenTelemetry layer is installed and the span context is valid.
fn trace_ids<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<(String, String)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let span = ctx.event_scope()?.next()?;
    let id = span.id();
    // The registry's extensions must not be held here: `get_otel_context` locks them.
    drop(span);
    let context = tracing::dispatcher::get_default(|dispatch| {
        tracing_opentelemetry::get_otel_context(&id, dispatch)
    })?;
    let otel_span = context.span();
    let span_context = otel_span.span_context();
    span_context.is_valid().then(|| {
        (
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    })
}

/// Human-readable lines.
pub struct TextFormat {
    inner: Format<Full>,
}

impl TextFormat {
    pub fn new(ansi: bool) -> Self {
        Self {
            inner: Format::default().with_target(true).with_ansi(ansi),
        }
    }
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Formatted into a buffer first: a secret split across the formatter's small writes
        // could not be recognised on the fly.
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.trim_end_matches('\n');
        writer.write_str(&scrub(body))?;
        if let Some((trace_id, span_id)) = trace_ids(ctx) {
            write!(writer, " trace_id={trace_id} span_id={span_id}")?;
        }
        writer.write_char('\n')
    }
}

/// One JSON object per line.
pub struct JsonFormat;

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut object = Map::new();
        object.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        object.insert("level".into(), meta.level().as_str().into());
        object.insert("target".into(), meta.target().into());
        let mut fields = Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        if let Some(scope) = ctx.event_scope() {
            let mut span_fields = Map::new();
            let mut innermost = None;
            for span in scope.from_root() {
                innermost = Some(span.name());
                let extensions = span.extensions();
                if let Some(formatted) = extensions.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(values)) =
                        serde_json::from_str::<Value>(formatted.as_str())
                {
                    for (key, value) in values {
                        span_fields.insert(key, scrub_json(value));
                    }
                }
            }
            if let Some(name) = innermost {
                object.insert("span".into(), name.into());
            }
            if !span_fields.is_empty() {
                object.insert("spans".into(), Value::Object(span_fields));
            }
        }
        if let Some((trace_id, span_id)) = trace_ids(ctx) {
            object.insert("trace_id".into(), trace_id.into());
            object.insert("span_id".into(), span_id.into());
        }
        // Event fields last, without overwriting the envelope keys above.
        for (key, value) in fields {
            object.entry(key).or_insert(value);
        }
        let line = serde_json::to_string(&Value::Object(object)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

fn scrub_json(value: Value) -> Value {
    match value {
        Value::String(text) => Value::String(scrub(&text).into_owned()),
        Value::Array(items) => Value::Array(items.into_iter().map(scrub_json).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, scrub_json(v))).collect())
        }
        other => other,
    }
}

/// Event fields as JSON values, strings scrubbed.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), scrub(value).into_owned().into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_str(field, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}
