//! Traces, metrics and logs of the built binary, observed from outside: a child gateway exports
//! to an in-process OTLP collector (opentelemetry-proto's tonic services on 127.0.0.1:0), calls
//! an in-process sandbox that records the `traceparent` it receives, and writes JSON logs to a
//! pipe. The child process keeps the process-wide tracer and meter providers out of the other
//! tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic_types::StatusExt as _;

use cx_gateway::pb;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_gateway::pb::feedback_stream_client::FeedbackStreamClient;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Api, FaultConfig, Sandbox, SandboxConfig};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::child::ChildGateway;
use crate::support::{eventually, finished_delivery, seeded_transactional_campaign};

/// Everything the fake collector received.
#[derive(Clone, Default)]
pub(crate) struct Collector {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Collector {
    /// Serves OTLP/gRPC on an ephemeral loopback port for the rest of the test.
    pub(crate) async fn start() -> (Collector, String) {
        let collector = Collector::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        (collector, endpoint)
    }

    pub(crate) fn spans(&self) -> Vec<Span> {
        self.traces
            .lock()
            .unwrap()
            .iter()
            .flat_map(|request| &request.resource_spans)
            .flat_map(|resource| &resource.scope_spans)
            .flat_map(|scope| scope.spans.clone())
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<AnyValue> {
    find(&span.attributes, key)
}

fn find(attributes: &[KeyValue], key: &str) -> Option<AnyValue> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|value| value.value)
}

fn event_int(event: &Event, key: &str) -> Option<i64> {
    match find(&event.attributes, key)? {
        AnyValue::IntValue(value) => Some(value),
        _ => None,
    }
}

fn event_string(event: &Event, key: &str) -> Option<String> {
    match find(&event.attributes, key)? {
        AnyValue::StringValue(text) => Some(text),
        _ => None,
    }
}

fn string_attribute(span: &Span, key: &str) -> Option<String> {
    match attribute(span, key)? {
        AnyValue::StringValue(text) => Some(text),
        other => Some(format!("{other:?}")),
    }
}

fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    match attribute(span, key)? {
        AnyValue::IntValue(value) => Some(value),
        AnyValue::StringValue(text) => text.parse().ok(),
        _ => None,
    }
}

/// Whether `span` lies below `ancestor` in its trace.
fn descends_from(span: &Span, ancestor: &Span, by_id: &HashMap<Vec<u8>, &Span>) -> bool {
    let mut parent = span.parent_span_id.clone();
    while !parent.is_empty() {
        if parent == ancestor.span_id {
            return true;
        }
        match by_id.get(&parent) {
            Some(next) => parent = next.parent_span_id.clone(),
            None => return false,
        }
    }
    false
}

async fn start_sandbox(config: SandboxConfig) -> (Sandbox, EmbeddedSandbox) {
    let sandbox = Sandbox::new(config);
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    (sandbox, emulator)
}

fn order_completed(customer: &str, email: &str) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event: Some(pb::Event {
            customer_id: customer.to_owned(),
            email: email.to_owned(),
            name: "order_completed".to_owned(),
            ..Default::default()
        }),
        options: None,
    }
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rpc_is_one_trace_from_the_caller_to_the_upstream() {
    let (collector, endpoint) = Collector::start().await;
    let (sandbox, emulator) = start_sandbox(SandboxConfig::default()).await;
    let data = tempfile::tempdir().unwrap();
    let campaign = seeded_transactional_campaign();
    let gateway = ChildGateway::start(
        &emulator,
        data.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_SERVICE_NAME", "cx-gateway-it".to_owned()),
            ("CXGW_LOG", "info,cx_gateway=debug".to_owned()),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=test".to_owned(),
            ),
            ("CXGW_EVENT_MAPPINGS", format!("order_completed={campaign}")),
        ],
    )
    .await;
    let mut events = EventServiceClient::new(gateway.channel.clone());

    // A caller inside a trace: its traceparent travels in the gRPC metadata.
    let mut request = tonic::Request::new(order_completed("trace-1", "buyer@example.com"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")
            .parse()
            .unwrap(),
    );
    let response = events.track_event(request).await.unwrap().into_inner();
    assert_eq!(response.triggered_surveys.len(), 1);
    // A caller without a trace, and one whose call fails validation.
    events
        .list_event_mappings(pb::ListEventMappingsRequest::default())
        .await
        .unwrap();
    let invalid = events
        .track_event(order_completed("", ""))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);

    // SIGTERM: `server::run` returns only after the spans were flushed.
    let grpc_port = gateway.grpc_addr.port();
    let (status, lines) = gateway.terminate_with_log();
    assert!(status.success());
    let spans = collector.spans();
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    let servers: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(servers.len(), 3, "one server span per RPC: {servers:#?}");
    let mut traces: Vec<Vec<u8>> = servers.iter().map(|s| s.trace_id.clone()).collect();
    traces.dedup();
    assert_eq!(traces.len(), 3, "each RPC is its own trace");

    // The caller's span is the parent of the server span.
    let server = servers
        .iter()
        .find(|s| hex(&s.trace_id) == CALLER_TRACE)
        .expect("the caller's trace continues in the gateway");
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN);
    assert_eq!(server.name, "cx.gateway.v1.EventService/TrackEvent");
    // The event rule's decisions are events of a span of this trace.
    let decisions: Vec<(String, String)> = spans
        .iter()
        .filter(|s| s.trace_id == server.trace_id)
        .flat_map(|s| &s.events)
        .filter(|e| e.name == "event_rule.decision")
        .map(|e| {
            (
                event_string(e, "event_rule.id").unwrap(),
                event_string(e, "event_rule.decision").unwrap(),
            )
        })
        .collect();
    let rule = format!("env:order_completed:{campaign}");
    assert_eq!(
        decisions,
        [
            (rule.clone(), "matched".to_owned()),
            (rule, "sent".to_owned())
        ]
    );
    for (key, value) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "cx.gateway.v1.EventService"),
        ("rpc.method", "TrackEvent"),
        ("server.address", "127.0.0.1"),
    ] {
        assert_eq!(
            string_attribute(server, key).as_deref(),
            Some(value),
            "{key}"
        );
    }
    assert_eq!(int_attribute(server, "rpc.grpc.status_code"), Some(0));
    assert_eq!(
        int_attribute(server, "server.port"),
        Some(i64::from(grpc_port))
    );

    // Every other span of that trace lies below the server span; both upstream calls are there
    // as client spans with the HTTP attributes.
    let in_trace: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == server.trace_id && s.span_id != server.span_id)
        .collect();
    for span in &in_trace {
        assert!(
            descends_from(span, server, &by_id),
            "{} is not below the server span",
            span.name
        );
    }
    let clients: Vec<&&Span> = in_trace
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    let templates: Vec<String> = clients
        .iter()
        .filter_map(|s| string_attribute(s, "url.template"))
        .collect();
    assert!(templates.iter().any(|t| t == "/events"), "{templates:?}");
    assert!(
        templates.iter().any(|t| t.ends_with("/survey")),
        "{templates:?}"
    );
    for client in &clients {
        assert_eq!(
            string_attribute(client, "http.request.method").as_deref(),
            Some("POST")
        );
        let status = int_attribute(client, "http.response.status_code").unwrap();
        assert!((200..300).contains(&status), "{status}");
    }
    let names: Vec<&str> = in_trace.iter().map(|s| s.name.as_str()).collect();
    for expected in ["validate", "scheduler.wait", "upstream.batch"] {
        assert!(names.contains(&expected), "no {expected} span in {names:?}");
    }
    let batch = in_trace
        .iter()
        .find(|s| s.name == "upstream.batch")
        .unwrap();
    assert_eq!(int_attribute(batch, "batch.size"), Some(1));

    // The upstream received the context of the attempt that called it.
    let seen = sandbox.handle().traceparents();
    for client in &clients {
        let expected = format!("00-{CALLER_TRACE}-{}-01", hex(&client.span_id));
        assert!(
            seen.iter().any(|s| s.traceparent == expected),
            "the sandbox did not receive {expected}: {seen:?}"
        );
    }
    assert!(
        seen.iter()
            .any(|s| s.api == Api::Retainly && s.route == "/events")
    );

    // Log lines written inside the call carry its trace and span ids and the call's fields.
    let inside: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["trace_id"] == CALLER_TRACE)
        .collect();
    assert!(
        !inside.is_empty(),
        "no log line carries the caller's trace id"
    );
    for line in &inside {
        let span_id = line["span_id"].as_str().unwrap();
        assert!(by_id.keys().any(|id| hex(id) == span_id), "{line}");
        assert_eq!(line["spans"]["rpc.method"], "TrackEvent", "{line}");
    }

    // The invalid call is a trace of its own with the status code and no upstream span.
    let failed = servers
        .iter()
        .find(|s| int_attribute(s, "rpc.grpc.status_code") == Some(3))
        .expect("the invalid call has a server span with INVALID_ARGUMENT");
    assert!(
        !spans
            .iter()
            .any(|s| s.trace_id == failed.trace_id && s.kind == SpanKind::Client as i32)
    );

    // The resource names the service as configured.
    let resource = collector.traces.lock().unwrap()[0].resource_spans[0]
        .resource
        .clone()
        .unwrap();
    let service = resource
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value);
    assert_eq!(
        service,
        Some(AnyValue::StringValue("cx-gateway-it".to_owned()))
    );
    emulator.stop().await;
}

async fn scrape(gateway: &ChildGateway) -> String {
    let response = reqwest::get(format!("http://{}/metrics", gateway.admin_addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_email_reaches_spans_logs_or_metrics() {
    const RETENTLY_KEY: &str = "rk-canary-9f3a77e1c2";
    const RETAINLY_KEY: &str = "rn-canary-key-51d0aa";
    const RETAINLY_SECRET: &str = "rn-canary-secret-c83e";
    const EMAIL: &str = "canary.person@canary-mail.example";
    const COLLECTOR_TOKEN: &str = "otlp-canary-token-77aa";
    const CALLER_TOKEN: &str = "caller-canary-token-0b5e2d9a";
    const WRONG_TOKEN: &str = "caller-canary-wrong-4c1f";
    const HOOK_SECRET: &str = "whk-canary-secret-3e9d1f";
    const COMMENT: &str = "canary comment: the delivery was late";
    let digest = ring::digest::digest(&ring::digest::SHA256, CALLER_TOKEN.as_bytes());
    let digest: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let (collector, endpoint) = Collector::start().await;
    let (sandbox, emulator) = start_sandbox(SandboxConfig {
        retently_api_keys: vec![RETENTLY_KEY.to_owned()],
        retainly_credentials: vec![(RETAINLY_KEY.to_owned(), RETAINLY_SECRET.to_owned())],
        ..SandboxConfig::default()
    })
    .await;
    let data = tempfile::tempdir().unwrap();
    let campaign = seeded_transactional_campaign();
    let gateway = ChildGateway::start(
        &emulator,
        data.path(),
        &[
            ("CXGW_RETENTLY_API_KEY", RETENTLY_KEY.to_owned()),
            ("CXGW_RETAINLY_API_KEY", RETAINLY_KEY.to_owned()),
            ("CXGW_RETAINLY_API_SECRET", RETAINLY_SECRET.to_owned()),
            // Debug lines too: they name routes, statuses and retries.
            ("CXGW_LOG", "debug".to_owned()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                format!("authorization=Bearer%20{COLLECTOR_TOKEN}"),
            ),
            ("CXGW_EVENT_MAPPINGS", format!("order_completed={campaign}")),
            ("CXGW_TRUSTED_MESH", "false".to_owned()),
            (
                "CXGW_CALLERS",
                format!(
                    "[[caller]]\nname = \"canary-caller\"\ntoken_sha256 = \"{digest}\"\n\
                     permissions = [\"read\", \"events:write\", \"feedback:subscribe\"]\n"
                ),
            ),
            ("CXGW_WEBHOOK_SECRET", HOOK_SECRET.to_owned()),
        ],
    )
    .await;
    fn bearer(metadata: &mut tonic::metadata::MetadataMap, token: &str) {
        metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let mut events = EventServiceClient::with_interceptor(
        gateway.channel.clone(),
        |mut request: tonic::Request<()>| {
            bearer(request.metadata_mut(), CALLER_TOKEN);
            Ok(request)
        },
    );

    // A caller with a wrong token is refused (and logged as such).
    let mut refused = tonic::Request::new(pb::ListEventMappingsRequest::default());
    bearer(refused.metadata_mut(), WRONG_TOKEN);
    let status = EventServiceClient::new(gateway.channel.clone())
        .list_event_mappings(refused)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // Success through both upstreams, synchronously and through the outbox.
    events
        .track_event(order_completed("canary-1", EMAIL))
        .await
        .unwrap();
    let mut queued = order_completed("canary-2", EMAIL);
    queued.options = Some(pb::WriteOptions {
        mode: pb::DeliveryMode::Async as i32,
        idempotency_key: String::new(),
    });
    events.track_event(queued).await.unwrap();
    // The caller's own mistake: an email where it does not belong, and no customer.
    let mut bad = order_completed("", "");
    bad.event.as_mut().unwrap().name = EMAIL.to_owned();
    let _ = events.track_event(bad).await.unwrap_err();
    // Upstream failures: every Retainly call answers 500 for a while.
    sandbox.handle().set_faults(
        Api::Retainly,
        FaultConfig {
            error_rate: 1.0,
            ..FaultConfig::default()
        },
    );
    let _ = events.track_event(order_completed("canary-3", EMAIL)).await;
    sandbox
        .handle()
        .set_faults(Api::Retainly, FaultConfig::default());
    // The write really carried the email to the upstream: the test would prove nothing if the
    // scenario never handled it.
    assert!(
        sandbox
            .handle()
            .survey_sends()
            .iter()
            .any(|send| send.recipients.iter().any(|r| r == EMAIL)),
        "the scenario did not reach the upstream"
    );
    // A response with the email and a comment arrives by webhook and reaches a subscriber.
    let mut stream = FeedbackStreamClient::with_interceptor(
        gateway.channel.clone(),
        |mut request: tonic::Request<()>| {
            bearer(request.metadata_mut(), CALLER_TOKEN);
            Ok(request)
        },
    )
    .subscribe(pb::SubscribeRequest::default())
    .await
    .unwrap()
    .into_inner();
    let status = post_webhook(
        gateway.admin_addr,
        HOOK_SECRET,
        "0000000000000000000ca9a1",
        EMAIL,
        COMMENT,
    )
    .await;
    assert_eq!(status, 200);
    feedback_events(&mut stream, 1).await;
    drop(stream);
    // A forged webhook call is refused.
    let refused = post_webhook(
        gateway.admin_addr,
        WRONG_TOKEN,
        "0000000000000000000ca9a2",
        EMAIL,
        COMMENT,
    )
    .await;
    assert_eq!(refused, 401);
    let metrics_text = scrape(&gateway).await;
    let (status, lines) = gateway.terminate_with_log();
    assert!(status.success());

    // The caller is named on its calls' spans; its token is nowhere.
    let tracked: Vec<Span> = collector
        .spans()
        .into_iter()
        .filter(|s| s.kind == SpanKind::Server as i32 && s.name.ends_with("/TrackEvent"))
        .collect();
    assert!(!tracked.is_empty());
    for span in &tracked {
        assert_eq!(
            string_attribute(span, "caller").as_deref(),
            Some("canary-caller")
        );
    }
    assert!(lines.iter().any(|l| l.contains("call refused")));
    let spans = format!("{:?}", collector.traces.lock().unwrap());
    let otlp_metrics = format!("{:?}", collector.metrics.lock().unwrap());
    assert!(spans.contains("TrackEvent"), "no spans were exported");
    assert!(spans.contains("feedback.webhook") && spans.contains("feedback.batch"));
    assert!(
        otlp_metrics.contains("rpc.server.calls"),
        "no metrics were exported"
    );
    assert!(lines.len() > 10, "too few log lines: {}", lines.len());
    for canary in [
        RETENTLY_KEY,
        RETAINLY_KEY,
        RETAINLY_SECRET,
        EMAIL,
        "canary-mail.example",
        COLLECTOR_TOKEN,
        CALLER_TOKEN,
        WRONG_TOKEN,
        HOOK_SECRET,
        COMMENT,
        "delivery was late",
    ] {
        assert!(!spans.contains(canary), "{canary} in an exported span");
        assert!(
            !otlp_metrics.contains(canary),
            "{canary} in exported metrics"
        );
        assert!(!metrics_text.contains(canary), "{canary} in /metrics");
        for line in &lines {
            assert!(!line.contains(canary), "{canary} in a log line: {line}");
        }
    }
    emulator.stop().await;
}

/// The value of the sample `name{labels}` in a Prometheus exposition, labels given sorted.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let rendered: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let prefix = if rendered.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{}}} ", rendered.join(","))
    };
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rpcs_by_method_and_code_and_upstream_calls_by_route() {
    let (_sandbox, emulator) = start_sandbox(SandboxConfig::default()).await;
    let data = tempfile::tempdir().unwrap();
    let gateway = ChildGateway::start(&emulator, data.path(), &[]).await;
    let mut events = EventServiceClient::new(gateway.channel.clone());
    for _ in 0..3 {
        events
            .list_event_mappings(pb::ListEventMappingsRequest::default())
            .await
            .unwrap();
    }
    let invalid = events
        .list_event_mappings(pb::ListEventMappingsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    events
        .track_event(order_completed("metrics-1", ""))
        .await
        .unwrap();

    let text = scrape(&gateway).await;
    let rpc = |method: &'static str, code: &'static str| {
        [
            ("rpc_grpc_status_code", code),
            ("rpc_method", method),
            ("rpc_service", "cx.gateway.v1.EventService"),
            ("rpc_system", "grpc"),
        ]
    };
    assert!(text.contains("# TYPE rpc_server_calls counter"), "{text}");
    assert!(text.contains("# TYPE rpc_server_call_duration_seconds histogram"));
    assert_eq!(
        sample(
            &text,
            "rpc_server_calls_total",
            &rpc("ListEventMappings", "0")
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "rpc_server_calls_total",
            &rpc("ListEventMappings", "3")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "rpc_server_call_duration_seconds_count",
            &rpc("ListEventMappings", "0")
        ),
        Some(3.0)
    );
    let mut bucket = rpc("ListEventMappings", "0").to_vec();
    bucket.insert(0, ("le", "+Inf"));
    bucket.sort();
    assert_eq!(
        sample(&text, "rpc_server_call_duration_seconds_bucket", &bucket),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "rpc_server_calls_total", &rpc("TrackEvent", "0")),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "cxgw_upstream_requests_total",
            &[
                ("http_request_method", "POST"),
                ("http_response_status_code", "200"),
                ("upstream", "retainly"),
                ("url_template", "/events"),
            ]
        ),
        Some(1.0),
        "{text}"
    );
    // The scheduler's gauges are there for both upstreams.
    for upstream in ["retently", "retainly"] {
        assert!(
            sample(
                &text,
                "cxgw_scheduler_budget_available",
                &[("upstream", upstream)]
            )
            .is_some(),
            "{text}"
        );
    }
    assert_eq!(
        sample(&text, "cxgw_outbox_deliveries", &[("state", "dead_letter")]),
        Some(0.0)
    );
    // The series the alerting rules need: the store answers, nothing waits in the outbox, and the
    // process start time is a plausible epoch second (not 0, not in the future).
    assert_eq!(
        sample(&text, "cxgw_store_available", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "cxgw_outbox_oldest_pending_age_seconds", &[]),
        Some(0.0),
        "{text}"
    );
    let started = sample(&text, "cxgw_process_start_time_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started > now - 600.0 && started <= now,
        "start time {started}"
    );
    assert!(gateway.terminate().success());
    emulator.stop().await;
}

/// The next message of `stream`.
async fn next_message(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
) -> pb::subscribe_response::Payload {
    tokio::time::timeout(std::time::Duration::from_secs(30), stream.message())
        .await
        .expect("the gateway sent nothing in time")
        .expect("the stream failed")
        .expect("the stream ended")
        .payload
        .expect("a payload")
}

/// Reads `stream` until it delivered `count` feedback events.
async fn feedback_events(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
    count: usize,
) -> Vec<pb::FeedbackEvent> {
    let mut events = Vec::with_capacity(count);
    while events.len() < count {
        if let pb::subscribe_response::Payload::FeedbackEvent(event) = next_message(stream).await {
            events.push(event);
        }
    }
    events
}

/// Reads heartbeats until one reports a poll that started after `instant` as complete (and
/// with it, everything that poll recorded); no event may arrive meanwhile.
async fn synced_after(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
    instant: prost_types::Timestamp,
) {
    let key = |time: &prost_types::Timestamp| (time.seconds, time.nanos);
    loop {
        match next_message(stream).await {
            pb::subscribe_response::Payload::Heartbeat(heartbeat) => {
                if heartbeat
                    .sync_time
                    .is_some_and(|time| key(&time) > key(&instant))
                {
                    return;
                }
            }
            pb::subscribe_response::Payload::FeedbackEvent(event) => {
                panic!("unexpected event {}", event.sequence)
            }
        }
    }
}

async fn subscribe(
    channel: &tonic::transport::Channel,
    position: pb::StreamPosition,
) -> tonic::Streaming<pb::SubscribeResponse> {
    FeedbackStreamClient::new(channel.clone())
        .subscribe(pb::SubscribeRequest {
            filter: None,
            start: Some(pb::subscribe_request::Start::Position(position as i32)),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The `feedback.batch` events of a subscription's span: (items, source) in order.
fn batches(span: &Span) -> Vec<(i64, String)> {
    span.events
        .iter()
        .filter(|event| event.name == "feedback.batch")
        .map(|event| {
            (
                event_int(event, "feedback.items").unwrap(),
                event_string(event, "feedback.source").unwrap(),
            )
        })
        .collect()
}

const WEBHOOK_SECRET: &str = "telemetry-webhook-secret";

/// Posts one Retently webhook call with a single new response, as the sandbox's campaigns do.
async fn post_webhook(
    admin: std::net::SocketAddr,
    secret: &str,
    id: &str,
    email: &str,
    comment: &str,
) -> u16 {
    let body = serde_json::json!({
        "event": "feedback.created",
        "feedback": {
            "id": id,
            "createdDate": chrono::Utc::now().to_rfc3339(),
            "campaignId": "webhook-campaign",
            "metricsType": "NPS",
            "score": 9,
            "customerEmail": email,
            "comment": comment,
        }
    });
    reqwest::Client::new()
        .post(format!("http://{admin}/webhooks/retently"))
        .header("x-cx-webhook-secret", secret)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_polls_webhooks_and_subscriptions_are_traced() {
    let (collector, endpoint) = Collector::start().await;
    let (sandbox, emulator) = start_sandbox(SandboxConfig {
        retently_requests_per_minute: 0,
        ..SandboxConfig::default()
    })
    .await;
    let seeded = sandbox.handle().feedback().len();
    assert!(seeded > 100, "the default seed has responses: {seeded}");
    let data = tempfile::tempdir().unwrap();
    let gateway = ChildGateway::start(
        &emulator,
        data.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "6000".to_owned()),
            ("CXGW_FEEDBACK_POLL_INTERVAL", "100ms".to_owned()),
            ("CXGW_FEEDBACK_RESCAN_INTERVAL", "0s".to_owned()),
            ("CXGW_FEEDBACK_HEARTBEAT_INTERVAL", "100ms".to_owned()),
            // The seed spreads its responses over 90 days: the first poll reads them all.
            ("CXGW_FEEDBACK_BACKFILL", "100d".to_owned()),
            ("CXGW_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
        ],
    )
    .await;

    // A live subscriber from the start receives the first poll's responses, then 5 more.
    let mut live = subscribe(&gateway.channel, pb::StreamPosition::Latest).await;
    feedback_events(&mut live, seeded).await;
    sandbox.handle().simulate_feedback(5);
    let simulated = feedback_events(&mut live, 5).await;
    // Scraped once the poll that found them has completed (and recorded its metrics).
    let newest = simulated
        .iter()
        .filter_map(|event| event.feedback.as_ref()?.create_time)
        .max_by_key(|time| (time.seconds, time.nanos))
        .unwrap();
    synced_after(&mut live, newest).await;
    let metrics_text = scrape(&gateway).await;
    // A replay of the whole log catches up from it, then 3 arrive live.
    let mut replay = subscribe(&gateway.channel, pb::StreamPosition::Earliest).await;
    let replayed: Vec<i64> = feedback_events(&mut replay, seeded + 5)
        .await
        .iter()
        .map(|event| event.sequence)
        .collect();
    assert_eq!(replayed, (1..=(seeded + 5) as i64).collect::<Vec<_>>());
    sandbox.handle().simulate_feedback(3);
    feedback_events(&mut replay, 3).await;
    feedback_events(&mut live, 3).await;
    let total = seeded + 5 + 3;
    drop(live);
    drop(replay);
    // One response by webhook, with a comment and an email that must stay out of the span.
    let status = post_webhook(
        gateway.admin_addr,
        WEBHOOK_SECRET,
        "0000000000000000000f00d1",
        "webhook.person@example.com",
        "a free-text comment from the webhook",
    )
    .await;
    assert_eq!(status, 200);
    let (status, _lines) = gateway.terminate_with_log();
    assert!(status.success());

    let spans = collector.spans();
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();

    // Every poll is a root span; the first one found exactly the seeded responses, all new,
    // in one request; together the polls appended every response once.
    let mut polls: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "feedback.sync.poll")
        .collect();
    polls.sort_by_key(|s| s.start_time_unix_nano);
    assert!(polls.len() >= 3, "{} polls", polls.len());
    for poll in &polls {
        assert!(poll.parent_span_id.is_empty(), "a poll is a root span");
        assert_eq!(
            string_attribute(poll, "feedback.poll.kind").as_deref(),
            Some("incremental")
        );
    }
    let first = polls[0];
    assert_eq!(
        int_attribute(first, "feedback.items.found"),
        Some(seeded as i64)
    );
    assert_eq!(
        int_attribute(first, "feedback.items.new"),
        Some(seeded as i64)
    );
    assert_eq!(int_attribute(first, "feedback.poll.requests"), Some(1));
    assert_eq!(string_attribute(first, "outcome").as_deref(), Some("ok"));
    let appended: i64 = polls
        .iter()
        .filter_map(|poll| int_attribute(poll, "feedback.items.new"))
        .sum();
    assert_eq!(appended, (seeded + 5 + 3) as i64);
    // Later polls re-read the overlap window: what they find but do not append is unchanged.
    for poll in &polls {
        let count = |key| int_attribute(poll, key).unwrap_or(0);
        assert_eq!(
            count("feedback.items.found"),
            count("feedback.items.new")
                + count("feedback.items.updated")
                + count("feedback.items.unchanged")
                + count("feedback.items.malformed")
        );
    }
    // The poll's upstream request is its child, in its trace.
    let requests: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            s.kind == SpanKind::Client as i32
                && string_attribute(s, "url.template").as_deref() == Some("/api/v2/feedback")
        })
        .collect();
    assert!(!requests.is_empty());
    let first_request = requests
        .iter()
        .find(|s| s.trace_id == first.trace_id)
        .expect("the first poll's upstream request is in its trace");
    assert!(descends_from(first_request, first, &by_id));

    // One server span per subscription, covering the stream, with its deliveries as batch
    // events: they add up to what the subscriber received.
    let subscriptions: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "cx.gateway.v1.FeedbackStream/Subscribe")
        .collect();
    assert_eq!(subscriptions.len(), 2, "{subscriptions:#?}");
    let by_start = |start: &str| {
        *subscriptions
            .iter()
            .find(|s| string_attribute(s, "feedback.start").as_deref() == Some(start))
            .unwrap_or_else(|| panic!("no {start} subscription"))
    };
    for (span, catch_up) in [(by_start("latest"), 0), (by_start("earliest"), seeded + 5)] {
        let batches = batches(span);
        assert_eq!(
            int_attribute(span, "feedback.batches"),
            Some(batches.len() as i64)
        );
        let delivered: i64 = batches.iter().map(|(items, _)| items).sum();
        assert_eq!(delivered, total as i64, "{batches:?}");
        assert_eq!(
            int_attribute(span, "feedback.items.delivered"),
            Some(total as i64)
        );
        let from_log: i64 = batches
            .iter()
            .filter(|(_, source)| source == "catch_up")
            .map(|(items, _)| items)
            .sum();
        // The 3 last ones came after the replay had caught up, unless the subscriber had not
        // yet asked for more when they were logged.
        assert!(
            from_log >= catch_up as i64 && from_log <= total as i64,
            "{batches:?}"
        );
        assert!(
            batches.len() < total,
            "a batch event per message: {batches:?}"
        );
    }
    let replay = by_start("earliest");
    let names: Vec<&str> = replay.events.iter().map(|e| e.name.as_str()).collect();
    println!(
        "{} polls; live subscription batches {:?}; replay events {names:?}, batches {:?}",
        polls.len(),
        batches(by_start("latest")),
        batches(replay)
    );
    assert_eq!(names.first(), Some(&"feedback.catch_up"), "{names:?}");
    assert!(names.contains(&"feedback.caught_up"), "{names:?}");
    assert_eq!(
        event_string(&replay.events[0], "feedback.catch_up.cause").as_deref(),
        Some("replay")
    );
    assert!(
        !by_start("latest")
            .events
            .iter()
            .any(|e| e.name == "feedback.catch_up"),
        "the live subscriber never fell behind"
    );

    // The webhook call is a root span with counts only.
    let webhook = spans
        .iter()
        .find(|s| s.name == "feedback.webhook")
        .expect("a webhook span");
    assert!(webhook.parent_span_id.is_empty());
    assert_eq!(int_attribute(webhook, "feedback.items.received"), Some(1));
    assert_eq!(int_attribute(webhook, "feedback.items.new"), Some(1));
    assert_eq!(int_attribute(webhook, "feedback.items.duplicates"), Some(0));
    assert_eq!(
        string_attribute(webhook, "outcome").as_deref(),
        Some("accepted")
    );
    let exported = format!("{spans:?}");
    for secret in [WEBHOOK_SECRET, "webhook.person", "free-text comment"] {
        assert!(!exported.contains(secret), "{secret} in an exported span");
    }

    // `/metrics`, scraped while the live subscriber was open, after the polls that found the
    // seeded and the 5 simulated responses.
    assert_eq!(
        sample(&metrics_text, "cxgw_feedback_subscribers", &[]),
        Some(1.0)
    );
    let lag = sample(&metrics_text, "cxgw_feedback_sync_lag_seconds", &[]).expect("a sync lag");
    assert!((0.0..60.0).contains(&lag), "{lag}");
    let polls_ok = sample(
        &metrics_text,
        "cxgw_feedback_sync_polls_total",
        &[("kind", "incremental"), ("outcome", "ok")],
    )
    .unwrap();
    assert!(polls_ok >= 2.0, "{polls_ok}");
    assert_eq!(
        sample(
            &metrics_text,
            "cxgw_feedback_sync_items_total",
            &[("outcome", "new")]
        ),
        Some((seeded + 5) as f64)
    );
    assert_eq!(
        sample(
            &metrics_text,
            "cxgw_feedback_subscriber_overflows_total",
            &[]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &metrics_text,
            "cxgw_feedback_subscriber_catch_ups_total",
            &[("cause", "overflow")]
        ),
        Some(0.0)
    );
    for family in [
        "# TYPE cxgw_feedback_sync_lag_seconds gauge",
        "# TYPE cxgw_feedback_sync_polls counter",
        "# TYPE cxgw_feedback_sync_items counter",
        "# TYPE cxgw_feedback_subscriber_overflows counter",
        "# TYPE cxgw_feedback_subscriber_catch_ups counter",
    ] {
        assert!(
            metrics_text.contains(family),
            "no `{family}` in:\n{metrics_text}"
        );
    }
    emulator.stop().await;
}

const OPENER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const MATE_TRACE: &str = "b7ad6b7169203331b7ad6b7169203331";
const FIRST_TRACE: &str = "11111111111111111111111111111111";
const ASYNC_TRACE: &str = "a3ce929d0e0e47364bf92f3577b34da6";

fn traced<T>(message: T, trace: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    request
}

fn send_one(campaign: &str, email: &str) -> pb::SendSurveyRequest {
    pb::SendSurveyRequest {
        survey_cooldown: Default::default(),
        campaign_id: campaign.to_owned(),
        recipients: vec![pb::Recipient {
            email: email.to_owned(),
            ..Default::default()
        }],
        delay_days: None,
        options: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_queued_deliveries_link_to_the_calls_they_serve() {
    let (collector, endpoint) = Collector::start().await;
    let (sandbox, emulator) = start_sandbox(SandboxConfig::default()).await;
    let data = tempfile::tempdir().unwrap();
    let campaign = seeded_transactional_campaign();
    let gateway = ChildGateway::start(
        &emulator,
        data.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("CXGW_FEEDBACK_SYNC", "false".to_owned()),
            ("CXGW_EVENT_MAPPINGS", format!("order_completed={campaign}")),
        ],
    )
    .await;
    let handle = sandbox.handle().clone();

    // A first send is held by the upstream; while it is in flight, the next partial batch for
    // the same campaign waits for it, so two callers arriving meanwhile share one call.
    handle.set_faults(
        Api::Retently,
        FaultConfig {
            latency_ms: 3000,
            ..FaultConfig::default()
        },
    );
    let mut surveys = SurveyServiceClient::new(gateway.channel.clone());
    let first = tokio::spawn({
        let mut surveys = surveys.clone();
        let request = traced(send_one(&campaign, "first@example.com"), FIRST_TRACE);
        async move { surveys.send_survey(request).await }
    });
    // The sandbox records the traceparent as the request arrives, before the latency.
    eventually(
        "the first send reaching the upstream",
        std::time::Duration::from_secs(30),
        || {
            handle.traceparents().iter().any(|seen| {
                seen.route == "/api/v2/survey" && seen.traceparent.contains(FIRST_TRACE)
            })
        },
    )
    .await;
    handle.clear_faults(Api::Retently);
    let mut mate = surveys.clone();
    let (opener, joined) = tokio::join!(
        surveys.send_survey(traced(
            send_one(&campaign, "opener@example.com"),
            OPENER_TRACE
        )),
        mate.send_survey(traced(send_one(&campaign, "mate@example.com"), MATE_TRACE)),
    );
    opener.unwrap();
    joined.unwrap();
    first.await.unwrap().unwrap();
    let sizes: Vec<usize> = handle
        .survey_sends()
        .iter()
        .map(|send| send.recipients.len())
        .collect();
    assert_eq!(
        sizes,
        [1, 2],
        "the two later callers shared one upstream call"
    );

    // An ASYNC write, delivered later by the outbox worker.
    let mut events = EventServiceClient::new(gateway.channel.clone());
    let mut queued = order_completed("async-1", "async.buyer@example.com");
    queued.options = Some(pb::WriteOptions {
        mode: pb::DeliveryMode::Async as i32,
        idempotency_key: String::new(),
    });
    let accepted = events
        .track_event(traced(queued, ASYNC_TRACE))
        .await
        .unwrap()
        .into_inner();
    let delivery = finished_delivery(&gateway.channel, &accepted.delivery_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);

    let (status, _lines) = gateway.terminate_with_log();
    assert!(status.success());
    let spans = collector.spans();

    // The shared batch: in the trace of the caller that opened it, linked to both callers.
    let shared = spans
        .iter()
        .find(|s| s.name == "upstream.batch" && int_attribute(s, "batch.size") == Some(2))
        .expect("a batch span of two items");
    assert_eq!(int_attribute(shared, "batch.callers"), Some(2));
    let mut linked: Vec<String> = shared.links.iter().map(|l| hex(&l.trace_id)).collect();
    linked.sort();
    let mut expected = vec![OPENER_TRACE.to_owned(), MATE_TRACE.to_owned()];
    expected.sort();
    assert_eq!(linked, expected);
    assert!([OPENER_TRACE, MATE_TRACE].contains(&hex(&shared.trace_id).as_str()));
    // Each link names a span of that caller's trace that was exported.
    for link in &shared.links {
        assert!(
            spans
                .iter()
                .any(|s| s.span_id == link.span_id && s.trace_id == link.trace_id),
            "a link to a span that was not exported"
        );
    }
    // The first send's batch ran for its caller alone.
    let lone = spans
        .iter()
        .find(|s| s.name == "upstream.batch" && hex(&s.trace_id) == FIRST_TRACE)
        .expect("the first send's batch span");
    assert_eq!(int_attribute(lone, "batch.callers"), Some(1));
    assert_eq!(lone.links.len(), 1);

    // The delivery is a trace of its own, linked to the span that queued it in the caller's
    // trace.
    let delivery = spans
        .iter()
        .find(|s| s.name == "outbox.delivery")
        .expect("a delivery span");
    assert!(delivery.parent_span_id.is_empty());
    assert_ne!(hex(&delivery.trace_id), ASYNC_TRACE);
    assert_eq!(delivery.links.len(), 1);
    let link = &delivery.links[0];
    assert_eq!(hex(&link.trace_id), ASYNC_TRACE);
    let enqueue = spans
        .iter()
        .find(|s| s.span_id == link.span_id)
        .expect("the linked span was exported");
    assert_eq!(enqueue.name, "outbox.enqueue");
    // The delivery's own upstream call is below it.
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    assert!(spans.iter().any(|s| s.kind == SpanKind::Client as i32
        && s.trace_id == delivery.trace_id
        && descends_from(s, delivery, &by_id)));
    emulator.stop().await;
}

/// Sends bytes as they are and reads whatever comes back, so a test can put a message on the
/// wire that no generated client would produce.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;

struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_unary(
    channel: &tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("a malformed message is refused")
}

/// Bytes of an `UpsertCustomerArrayItemsRequest` whose item fields nest a `Struct` `depth` levels
/// deep (prost encodes any depth but decodes at most 100).
fn deeply_nested_items(depth: usize) -> Vec<u8> {
    use prost::Message as _;
    use prost_types::value::Kind;
    let mut value = prost_types::Value {
        kind: Some(Kind::StringValue("leaf".to_owned())),
    };
    for _ in 0..depth {
        value = prost_types::Value {
            kind: Some(Kind::StructValue(prost_types::Struct {
                fields: [("a".to_owned(), value)].into_iter().collect(),
            })),
        };
    }
    let Some(Kind::StructValue(fields)) = value.kind else {
        unreachable!()
    };
    pb::UpsertCustomerArrayItemsRequest {
        records: vec![pb::CustomerArrayItems {
            customer_id: "c-1".to_owned(),
            field: "purchases".to_owned(),
            items: vec![pb::ArrayItem {
                item_id: "p1".to_owned(),
                fields: Some(fields),
            }],
        }],
        options: None,
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_invalid_argument_and_counted_as_client_errors() {
    let (_sandbox, emulator) = start_sandbox(SandboxConfig::default()).await;
    let data = tempfile::tempdir().unwrap();
    let gateway = ChildGateway::start(&emulator, data.path(), &[]).await;

    // Random-looking bytes from a fixed generator (xorshift), so every run sends the same ones.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut garbage = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    let mut refused = Vec::new();
    let mut sent = 0;
    while refused.len() < 20 {
        sent += 1;
        assert!(sent < 1000, "random bytes kept decoding");
        let body = garbage(64);
        // Some random byte strings are valid messages; only those that are not count here.
        if <pb::TrackEventRequest as prost::Message>::decode(body.as_slice()).is_ok() {
            continue;
        }
        refused.push(
            raw_unary(
                &gateway.channel,
                "/cx.gateway.v1.EventService/TrackEvent",
                body,
            )
            .await,
        );
    }
    refused.push(
        raw_unary(
            &gateway.channel,
            "/cx.gateway.v1.CustomerService/UpsertCustomerArrayItems",
            deeply_nested_items(150),
        )
        .await,
    );
    for status in &refused {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let details = status.get_error_details();
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "MALFORMED_REQUEST");
        assert_eq!(info.domain, "cx-gateway");
    }
    // The hand-written FeedbackStream codec answers the same way.
    let mut grpc = tonic::client::Grpc::new(gateway.channel.clone());
    grpc.ready().await.unwrap();
    let stream = grpc
        .server_streaming(
            tonic::Request::new(vec![0xff; 16]),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/cx.gateway.v1.FeedbackStream/Subscribe",
            ),
            RawCodec,
        )
        .await
        .expect_err("a malformed subscription is refused");
    assert_eq!(stream.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        stream.get_error_details().error_info().unwrap().reason,
        "MALFORMED_REQUEST"
    );

    let text = scrape(&gateway).await;
    let calls = |service: &'static str, method: &'static str, code: &'static str| {
        sample(
            &text,
            "rpc_server_calls_total",
            &[
                ("rpc_grpc_status_code", code),
                ("rpc_method", method),
                ("rpc_service", service),
                ("rpc_system", "grpc"),
            ],
        )
    };
    assert_eq!(
        calls("cx.gateway.v1.EventService", "TrackEvent", "3"),
        Some(20.0),
        "{text}"
    );
    assert_eq!(
        calls("cx.gateway.v1.EventService", "TrackEvent", "13"),
        None
    );
    assert_eq!(
        calls(
            "cx.gateway.v1.CustomerService",
            "UpsertCustomerArrayItems",
            "3"
        ),
        Some(1.0)
    );
    assert!(gateway.terminate().success());
    emulator.stop().await;
}
