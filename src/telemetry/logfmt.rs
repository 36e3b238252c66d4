//! The two log line formats. Both pass every line through the redaction guard and add the
//! OpenTelemetry trace and span ids of the span the event happened in, so a log line leads to
//! its trace:
//! - text (default): tracing-subscriber's full format, then ` trace_id=… span_id=…`;
//! - JSON: one object per line with `timestamp`, `level`, `target`, the event's fields
//!   (`message` included), `span` (the innermost span's name), `spans` (the fields of every
//!   enclosing span, outermost first, inner ones winning), `trace_id` and `span_id`.

use std::fmt;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::TraceContextExt as _;
use serde_json::{Map, Value};
use tracing::dispatcher::WeakDispatch;
use tracing::field::{Field, Visit};
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::redact::scrub;

/// The dispatcher the formatters belong to, set once it is built. The formatters cannot ask
/// `tracing` for it: while an event is being dispatched, `tracing` hands out no dispatcher (its
/// re-entrancy guard), and the OpenTelemetry context of a span is found through it.
#[derive(Clone, Default)]
pub struct DispatchSlot(Arc<OnceLock<WeakDispatch>>);

impl DispatchSlot {
    /// Points the formatters at `dispatch`; later calls are ignored.
    pub fn set(&self, dispatch: &Dispatch) {
        let _ = self.0.set(dispatch.downgrade());
    }
}

/// The ids of the OpenTelemetry span behind the innermost `tracing` span of the event, if the
/// OpenTelemetry layer is installed and the span context is valid.
fn trace_ids<S, N>(ctx: &FmtContext<'_, S, N>, slot: &DispatchSlot) -> Option<(String, String)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let span = ctx.event_scope()?.next()?;
    let id = span.id();
    // The registry's extensions must not be held here: `get_otel_context` locks them.
    drop(span);
    let dispatch = slot.0.get()?.upgrade()?;
    let context = tracing_opentelemetry::get_otel_context(&id, &dispatch)?;
    let otel_span = context.span();
    let span_context = otel_span.span_context();
    span_context.is_valid().then(|| {
        (
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    })
}

/// Which of the two line formats a [`LineFormat`] writes.
enum Style {
    /// Human-readable lines: tracing-subscriber's full format.
    Text(Format<Full>),
    /// One JSON object per line.
    Json,
}

/// The event format of the log layer: text or JSON, scrubbed, with the trace ids.
pub struct LineFormat {
    style: Style,
    dispatch: DispatchSlot,
}

impl LineFormat {
    pub fn text(ansi: bool, dispatch: DispatchSlot) -> Self {
        Self {
            style: Style::Text(Format::default().with_target(true).with_ansi(ansi)),
            dispatch,
        }
    }

    pub fn json(dispatch: DispatchSlot) -> Self {
        Self {
            style: Style::Json,
            dispatch,
        }
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
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
        let trace = trace_ids(ctx, &self.dispatch);
        match &self.style {
            Style::Text(inner) => {
                // Formatted into a buffer first: a secret split across the formatter's small
                // writes could not be recognised on the fly.
                let mut line = String::new();
                inner.format_event(ctx, Writer::new(&mut line), event)?;
                let body = line.trim_end_matches('\n');
                writer.write_str(&scrub(body))?;
                if let Some((trace_id, span_id)) = trace {
                    write!(writer, " trace_id={trace_id} span_id={span_id}")?;
                }
                writer.write_char('\n')
            }
            Style::Json => {
                let object = json_object(ctx, event, trace);
                let line = serde_json::to_string(&Value::Object(object)).map_err(|_| fmt::Error)?;
                writeln!(writer, "{line}")
            }
        }
    }
}

/// The JSON line's object: envelope keys first, then the event's own fields.
fn json_object<S, N>(
    ctx: &FmtContext<'_, S, N>,
    event: &Event<'_>,
    trace: Option<(String, String)>,
) -> Map<String, Value>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
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
                && let Ok(Value::Object(values)) = serde_json::from_str::<Value>(formatted.as_str())
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
    if let Some((trace_id, span_id)) = trace {
        object.insert("trace_id".into(), trace_id.into());
        object.insert("span_id".into(), span_id.into());
    }
    // Event fields last, without overwriting the envelope keys above.
    for (key, value) in fields {
        object.entry(key).or_insert(value);
    }
    object
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

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::JsonFields;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// The subscriber under the log layer: the registry with OpenTelemetry, as in production.
    type Traced = tracing_subscriber::layer::Layered<
        tracing_opentelemetry::OpenTelemetryLayer<
            tracing_subscriber::Registry,
            opentelemetry_sdk::trace::SdkTracer,
        >,
        tracing_subscriber::Registry,
    >;

    /// Logs one line inside a traced span and one outside through the layer `log_layer` builds
    /// (from the dispatch slot and the buffer to write to); returns the lines and the span's
    /// trace id.
    fn scenario<L>(log_layer: impl FnOnce(DispatchSlot, Buffer) -> L) -> (Vec<String>, String)
    where
        L: tracing_subscriber::Layer<Traced> + Send + Sync + 'static,
    {
        let buffer = Buffer::default();
        let slot = DispatchSlot::default();
        let tracer = SdkTracerProvider::builder().build().tracer("test");
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(tracer))
            .with(log_layer(slot.clone(), buffer.clone()));
        let dispatch = tracing::Dispatch::new(subscriber);
        slot.set(&dispatch);
        let trace_id = tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!("grpc.server", rpc.method = "TrackEvent");
            let trace_id = span.context().span().span_context().trace_id().to_string();
            span.in_scope(|| {
                tracing::info!(recipient = "ann@example.com", count = 2, "sent");
            });
            tracing::info!("outside");
            trace_id
        });
        (buffer.lines(), trace_id)
    }

    #[test]
    fn json_lines_carry_trace_ids_span_fields_and_no_email() {
        let (lines, trace_id) = scenario(|slot, buffer| {
            tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(LineFormat::json(slot))
                .with_writer(buffer)
        });
        let lines: Vec<Value> = lines
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let inside = &lines[0];
        assert_eq!(inside["message"], "sent");
        assert_eq!(inside["recipient"], "[email]");
        assert_eq!(inside["count"], 2);
        assert_eq!(inside["level"], "INFO");
        assert_eq!(inside["span"], "grpc.server");
        assert_eq!(inside["spans"]["rpc.method"], "TrackEvent");
        assert_eq!(inside["trace_id"], trace_id.as_str());
        assert_eq!(inside["span_id"].as_str().unwrap().len(), 16);
        let outside = &lines[1];
        assert_eq!(outside["message"], "outside");
        assert!(outside.get("trace_id").is_none() && outside.get("span").is_none());
    }

    #[test]
    fn text_lines_end_with_trace_ids_inside_a_span() {
        let (lines, trace_id) = scenario(|slot, buffer| {
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .event_format(LineFormat::text(false, slot))
                .with_writer(buffer)
        });
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].contains("grpc.server{rpc.method=\"TrackEvent\"}"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("recipient=\"[email]\""), "{}", lines[0]);
        assert!(
            lines[0].contains(&format!(" trace_id={trace_id} span_id=")),
            "{}",
            lines[0]
        );
        assert!(!lines[1].contains("trace_id"), "{}", lines[1]);
    }
}
