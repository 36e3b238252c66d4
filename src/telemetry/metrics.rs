//! The gateway's metrics: one OpenTelemetry meter provider per process, read two ways — a pull
//! reader that the admin port's `/metrics` encodes as Prometheus text on every scrape, and, when
//! configured, a periodic OTLP exporter.
//!
//! Why the OpenTelemetry SDK and not `prometheus-client`: the gateway must export the same
//! series through OTLP and Prometheus; one instrumentation API with two readers keeps them
//! identical, where two libraries would need every measurement recorded twice. The SDK has no
//! maintained Prometheus exporter (`opentelemetry-prometheus` is frozen on an old `prometheus`
//! crate), so [`super::prometheus`] encodes the text format itself (about 150 lines, tested);
//! pulling on scrape needs the SDK's `ManualReader`, which 0.33 ships behind its
//! `experimental_metrics_custom_reader` feature (the reader itself is a stable part of the OTel
//! specification; the version is pinned).
//!
//! The provider is process-wide, like the `tracing` dispatcher: instrumented code anywhere in the
//! crate records through [`metrics()`] without a handle being threaded through every
//! constructor. Several gateways in one process (integration tests) therefore share series;
//! tests that assert exact values run the gateway in a child process.
//!
//! Every attribute value is bounded: RPC names come from the contract's descriptor, routes are
//! templates, codes are enumerations. No caller input becomes a label.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    AsyncInstrumentBuilder, Counter, Histogram, Meter, MeterProvider as _, ObservableCounter,
    ObservableGauge,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};

/// Latency buckets in seconds, from a cache hit (0.5 ms) to a long scheduler wait (2 min).
const LATENCY_BOUNDS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];
/// Batch sizes: single items to a full 10,000-customer Retainly call.
const SIZE_BOUNDS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 2500.0, 10000.0,
];

/// Values observed on collection (gauges, and counters kept elsewhere such as the scheduler's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Observed {
    /// Requests the upstream budget would grant right now.
    BudgetAvailable,
    /// Attempts waiting for budget, by priority.
    SchedulerQueueDepth,
    /// Scheduler decisions since start, by kind (granted, shed, retried, ...).
    SchedulerEvents,
    /// Outbox deliveries by state.
    OutboxDeliveries,
    /// Feedback pipeline events since start, by kind (polls, created, webhook rejections, ...).
    FeedbackEvents,
    /// Open FeedbackStream subscriptions.
    FeedbackSubscribers,
    /// 1 while this replica holds the feedback poller's lease.
    FeedbackPollerLeader,
    /// Seconds since the feedback sync's watermark (a fractional reading, see
    /// [`register_float_probe`]).
    FeedbackSyncLag,
    /// Seconds since the oldest outbox delivery not finished yet was accepted, 0 when none is
    /// waiting (a fractional reading).
    OutboxOldestPendingAge,
    /// 1 when the durable store answered a read just now, 0 when it failed or timed out.
    StoreAvailable,
    /// 1 while the store's health probe reaches it (always for the embedded store), 0 while the
    /// replica reports not serving for lack of it.
    StoreReachable,
}

/// One reading: the value and its attributes.
pub type Reading = (u64, Vec<KeyValue>);

/// One fractional reading (seconds): the value and its attributes.
pub type FloatReading = (f64, Vec<KeyValue>);

/// Reports the current readings of one source; returns `false` once the source is gone, which
/// unregisters the probe.
type Probe<T> = Box<dyn Fn(&mut Vec<(T, Vec<KeyValue>)>) -> bool + Send + Sync>;

struct Probes<T> {
    probes: Mutex<Vec<(Observed, Probe<T>)>>,
}

impl<T> Default for Probes<T> {
    fn default() -> Self {
        Probes {
            probes: Mutex::new(Vec::new()),
        }
    }
}

impl<T> Probes<T> {
    fn read(&self, kind: Observed) -> Vec<(T, Vec<KeyValue>)> {
        let mut readings = Vec::new();
        let mut probes = self.probes.lock().unwrap_or_else(PoisonError::into_inner);
        probes.retain(|(probe_kind, probe)| *probe_kind != kind || probe(&mut readings));
        readings
    }

    fn register(
        &self,
        kind: Observed,
        probe: impl Fn(&mut Vec<(T, Vec<KeyValue>)>) -> bool + Send + Sync + 'static,
    ) {
        self.probes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((kind, Box::new(probe)));
    }
}

/// The instruments every part of the gateway records into.
pub struct Metrics {
    provider: SdkMeterProvider,
    reader: SharedReader,
    probes: Arc<Probes<u64>>,
    float_probes: Arc<Probes<f64>>,
    /// `rpc.server.call.duration`: one per finished call (streams: when the stream ends).
    pub rpc_duration: Histogram<f64>,
    /// `rpc.server.calls`: finished calls by method and status code.
    pub rpc_calls: Counter<u64>,
    /// `cxgw.upstream.requests`: HTTP attempts by upstream, route template and status.
    pub upstream_requests: Counter<u64>,
    /// `cxgw.upstream.request.duration`: HTTP attempt latency.
    pub upstream_duration: Histogram<f64>,
    /// `cxgw.scheduler.wait`: how long an attempt waited for the budget.
    pub scheduler_wait: Histogram<f64>,
    /// `cxgw.upstream.batch.size`: items per coalesced upstream call.
    pub batch_size: Histogram<u64>,
    /// `cxgw.outbox.enqueued`: writes accepted into the outbox.
    pub outbox_enqueued: Counter<u64>,
    /// `cxgw.outbox.attempts`: delivery attempts by method and outcome.
    pub outbox_attempts: Counter<u64>,
    /// `cxgw.store.health_checks`: health probes of a networked store by outcome (ok, failed).
    pub store_health_checks: Counter<u64>,
    /// `cxgw.feedback.sync.polls`: feedback polls by kind and outcome.
    pub feedback_polls: Counter<u64>,
    /// `cxgw.feedback.sync.items`: items the feedback sync read, by what became of them.
    pub feedback_items: Counter<u64>,
    /// `cxgw.feedback.subscriber.overflows`: subscribers that fell behind the live buffer.
    pub subscriber_overflows: Counter<u64>,
    /// `cxgw.feedback.subscriber.catch_ups`: catch-ups from the log completed, by cause.
    pub subscriber_catch_ups: Counter<u64>,
    /// `cxgw.alerts`: alerts by rule and outcome (matched, rate_limited, sent, failed).
    pub alerts: Counter<u64>,
    /// `cxgw.alerts.rules.reloads`: reloads of the alert rules file by outcome.
    pub alert_rule_reloads: Counter<u64>,
    /// `cxgw.segment.requests`: Segment intake requests by endpoint and answer status.
    pub segment_requests: Counter<u64>,
    /// `cxgw.segment.messages`: messages of accepted Segment requests by type and what became
    /// of them (queued, duplicate, not forwarded).
    pub segment_messages: Counter<u64>,
    _observed: Vec<ObservedInstrument>,
}

#[allow(dead_code)] // Held only to keep the callbacks registered.
enum ObservedInstrument {
    Gauge(ObservableGauge<u64>),
    FloatGauge(ObservableGauge<f64>),
    Counter(ObservableCounter<u64>),
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, created on first use with only the Prometheus reader unless
/// [`super::init`] installed them with an OTLP exporter first.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::build(None::<SharedReader>, Resource::builder_empty().build()))
}

/// Installs the process's metrics with an extra (OTLP) reader. Returns `false` if metrics were
/// already in use, in which case the extra reader is not attached.
pub(crate) fn install<R: MetricReader>(extra: Option<R>, resource: Resource) -> bool {
    let mut installed = false;
    METRICS.get_or_init(|| {
        installed = true;
        Metrics::build(extra, resource)
    });
    installed
}

/// Registers a probe read whenever `kind` is collected.
pub fn register_probe(
    kind: Observed,
    probe: impl Fn(&mut Vec<Reading>) -> bool + Send + Sync + 'static,
) {
    metrics().probes.register(kind, probe);
}

/// Registers a probe of fractional readings (a gauge in seconds) read whenever `kind` is
/// collected.
pub fn register_float_probe(
    kind: Observed,
    probe: impl Fn(&mut Vec<FloatReading>) -> bool + Send + Sync + 'static,
) {
    metrics().float_probes.register(kind, probe);
}

impl Metrics {
    fn build<R: MetricReader>(extra: Option<R>, resource: Resource) -> Metrics {
        let reader = SharedReader(Arc::new(
            ManualReader::builder()
                .with_temporality(Temporality::Cumulative)
                .build(),
        ));
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader.clone());
        if let Some(extra) = extra {
            builder = builder.with_reader(extra);
        }
        let provider = builder.build();
        let meter = provider.meter("cx-gateway");
        let probes = Arc::new(Probes::default());
        let float_probes = Arc::new(Probes::default());
        let observed = observed_instruments(&meter, &probes, &float_probes);
        Metrics {
            rpc_duration: meter
                .f64_histogram("rpc.server.call.duration")
                .with_unit("s")
                .with_description("Duration of gRPC calls handled by the gateway")
                .with_boundaries(LATENCY_BOUNDS.to_vec())
                .build(),
            rpc_calls: meter
                .u64_counter("rpc.server.calls")
                .with_description("gRPC calls handled by the gateway")
                .build(),
            upstream_requests: meter
                .u64_counter("cxgw.upstream.requests")
                .with_description("HTTP requests sent to an upstream API, by route and status")
                .build(),
            upstream_duration: meter
                .f64_histogram("cxgw.upstream.request.duration")
                .with_unit("s")
                .with_description("Duration of HTTP requests to an upstream API")
                .with_boundaries(LATENCY_BOUNDS.to_vec())
                .build(),
            scheduler_wait: meter
                .f64_histogram("cxgw.scheduler.wait")
                .with_unit("s")
                .with_description("Time an upstream attempt waited for the request budget")
                .with_boundaries(LATENCY_BOUNDS.to_vec())
                .build(),
            batch_size: meter
                .u64_histogram("cxgw.upstream.batch.size")
                .with_description("Items coalesced into one upstream request")
                .with_boundaries(SIZE_BOUNDS.to_vec())
                .build(),
            alerts: meter
                .u64_counter("cxgw.alerts")
                .with_description(
                    "Alerts by rule and outcome: matched (a response matched the rule), \
                     rate_limited (dropped by the rule's rate limit), sent (a receiver accepted \
                     it), failed (an attempt failed; retried or dead-lettered)",
                )
                .build(),
            alert_rule_reloads: meter
                .u64_counter("cxgw.alerts.rules.reloads")
                .with_description(
                    "Reloads of the alert rules file by outcome: replaced, rejected (the file \
                     was refused and the rules in force stay)",
                )
                .build(),
            outbox_enqueued: meter
                .u64_counter("cxgw.outbox.enqueued")
                .with_description("Asynchronous writes accepted into the durable outbox")
                .build(),
            outbox_attempts: meter
                .u64_counter("cxgw.outbox.attempts")
                .with_description(
                    "Outbox delivery attempts by method and outcome: delivered, retry (a \
                     transient failure: tried again, or dead-lettered once the retry window is \
                     over), failed (a permanent failure, dead-lettered)",
                )
                .build(),
            store_health_checks: meter
                .u64_counter("cxgw.store.health_checks")
                .with_description(
                    "Health probes of a networked store (PostgreSQL) by outcome: ok or failed \
                     (no answer, or none within the probe's timeout)",
                )
                .build(),
            feedback_polls: meter
                .u64_counter("cxgw.feedback.sync.polls")
                .with_description(
                    "Feedback sync polls by kind (incremental, rescan) and outcome (ok, failed, \
                     interrupted)",
                )
                .build(),
            feedback_items: meter
                .u64_counter("cxgw.feedback.sync.items")
                .with_description(
                    "Feedback items read by the sync polls, by outcome: new (appended to the \
                     log), updated, unchanged, malformed (skipped)",
                )
                .build(),
            subscriber_overflows: meter
                .u64_counter("cxgw.feedback.subscriber.overflows")
                .with_description(
                    "Times a FeedbackStream subscriber fell behind the live buffer and switched \
                     to catching up from the log (nothing is lost, delivery is slower)",
                )
                .build(),
            subscriber_catch_ups: meter
                .u64_counter("cxgw.feedback.subscriber.catch_ups")
                .with_description(
                    "Catch-ups from the feedback log completed (the subscriber is back on the \
                     live buffer), by cause: overflow, replay (a start position in the past)",
                )
                .build(),
            segment_requests: meter
                .u64_counter("cxgw.segment.requests")
                .with_description(
                    "Segment intake requests by endpoint (track, identify, batch) and answer status",
                )
                .build(),
            segment_messages: meter
                .u64_counter("cxgw.segment.messages")
                .with_description(
                    "Messages of accepted Segment requests by type and outcome: queued, duplicate \
                     (a messageId seen before) or acknowledged (nothing to forward)",
                )
                .build(),
            provider,
            reader,
            probes,
            float_probes,
            _observed: observed,
        }
    }

    /// The gateway's meter, for parts that keep their own instruments beside their code.
    pub fn meter(&self) -> Meter {
        self.provider.meter("cx-gateway")
    }

    /// Collects every series now (running the probes) for the Prometheus endpoint.
    pub fn collect(&self) -> Result<ResourceMetrics, String> {
        let mut collected = ResourceMetrics::default();
        self.reader
            .0
            .collect(&mut collected)
            .map_err(|error| format!("cannot collect metrics: {error}"))?;
        Ok(collected)
    }

    /// The Prometheus text exposition of every series.
    pub fn prometheus_text(&self) -> Result<String, String> {
        Ok(super::prometheus::encode(&self.collect()?))
    }

    /// Pushes what the OTLP reader holds; blocking, so called off the async threads.
    pub(crate) fn flush(&self) -> OTelSdkResult {
        self.provider.force_flush()
    }
}

/// `builder` with its description and the callback that reports what the probes of `kind` read
/// at collection.
fn observing<'a, I, M: Send + Sync + 'static>(
    builder: AsyncInstrumentBuilder<'a, I, M>,
    description: &'static str,
    probes: &Arc<Probes<M>>,
    kind: Observed,
) -> AsyncInstrumentBuilder<'a, I, M> {
    let probes = Arc::clone(probes);
    builder
        .with_description(description)
        .with_callback(move |observer| {
            for (value, attributes) in probes.read(kind) {
                observer.observe(value, &attributes);
            }
        })
}

fn observed_instruments(
    meter: &Meter,
    probes: &Arc<Probes<u64>>,
    float_probes: &Arc<Probes<f64>>,
) -> Vec<ObservedInstrument> {
    let gauge = |name: &'static str, description: &'static str, kind: Observed| {
        let builder = meter.u64_observable_gauge(name);
        ObservedInstrument::Gauge(observing(builder, description, probes, kind).build())
    };
    let counter = |name: &'static str, description: &'static str, kind: Observed| {
        let builder = meter.u64_observable_counter(name);
        ObservedInstrument::Counter(observing(builder, description, probes, kind).build())
    };
    let seconds_gauge = |name: &'static str, description: &'static str, kind: Observed| {
        let builder = meter.f64_observable_gauge(name).with_unit("s");
        ObservedInstrument::FloatGauge(observing(builder, description, float_probes, kind).build())
    };
    vec![
        gauge(
            "cxgw.scheduler.budget.available",
            "Requests the upstream budget would grant now",
            Observed::BudgetAvailable,
        ),
        gauge(
            "cxgw.scheduler.queue.depth",
            "Upstream attempts waiting for the budget",
            Observed::SchedulerQueueDepth,
        ),
        counter(
            "cxgw.scheduler.events",
            "Scheduler decisions: granted, shed, retried, circuit rejections, upstream 429s",
            Observed::SchedulerEvents,
        ),
        gauge(
            "cxgw.outbox.deliveries",
            "Outbox deliveries by state, dead letters included",
            Observed::OutboxDeliveries,
        ),
        counter(
            "cxgw.feedback.events",
            "Feedback sync, log, webhook and fan-out events by kind",
            Observed::FeedbackEvents,
        ),
        gauge(
            "cxgw.feedback.subscribers",
            "Open FeedbackStream subscriptions",
            Observed::FeedbackSubscribers,
        ),
        gauge(
            "cxgw.feedback.poller.leader",
            "1 while this replica holds the feedback poller's lease and polls Retently (one \
             replica in all when several share a database), 0 otherwise",
            Observed::FeedbackPollerLeader,
        ),
        seconds_gauge(
            "cxgw.outbox.oldest_pending.age",
            "Seconds since the oldest outbox delivery that is not finished yet was accepted (0 \
             when none is waiting): how far behind asynchronous delivery runs",
            Observed::OutboxOldestPendingAge,
        ),
        gauge(
            "cxgw.store.available",
            "1 when the durable store answered a read at this collection, 0 when it failed or \
             took longer than 2 s",
            Observed::StoreAvailable,
        ),
        gauge(
            "cxgw.store.reachable",
            "1 while the store's health probe reaches it (always for the embedded store), 0 \
             while the replica reports not serving because its database cannot be reached",
            Observed::StoreReachable,
        ),
        process_start_time(meter),
        seconds_gauge(
            "cxgw.feedback.sync.lag",
            "Seconds since the start of the last complete feedback poll: every response Retently \
             recorded before then is in the log. Alert on this one: it grows when polls fail or \
             stall, and stays low when simply no feedback arrives",
            Observed::FeedbackSyncLag,
        ),
    ]
}

/// `cxgw.process.start_time` (seconds since the epoch): a gateway that restarts shows as a change
/// of this value, which a restart between two scrapes would otherwise hide from counters' rates.
fn process_start_time(meter: &Meter) -> ObservedInstrument {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64());
    ObservedInstrument::FloatGauge(
        meter
            .f64_observable_gauge("cxgw.process.start_time")
            .with_unit("s")
            .with_description("Start time of the gateway process in seconds since the epoch")
            .with_callback(move |observer| observer.observe(started, &[]))
            .build(),
    )
}

/// The pull reader, shared between the provider (which registers its pipeline) and the
/// `/metrics` handler (which collects through it).
#[derive(Clone, Debug)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// Seconds as the histograms record them.
pub fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}
