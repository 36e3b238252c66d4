//! The server side of every RPC: one `tracing` span per call (continuing the caller's W3C
//! trace), and the call counter and latency histogram, labelled with the gRPC status code.
//!
//! The status is read where gRPC puts it: in the response headers for a trailers-only answer
//! (every error tonic returns before sending a message), otherwise in the trailers at the end of
//! the body. So the span and the measurement end when the last byte of the answer is produced —
//! for a server stream, when the stream ends; a stream the client abandons counts as
//! `CANCELLED`.
//!
//! Labels stay bounded: method names come from the served descriptors; any other path is
//! recorded as `_OTHER`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use http_body::Frame;
use opentelemetry::KeyValue;
use prost::Message as _;
use tokio::time::Instant;
use tonic::codegen::http::{self, HeaderMap, Request};
use tonic::codegen::{Body, Bytes};
use tower::Layer;
use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::metrics::{metrics, seconds};
use super::propagation;
use crate::grpc::layer::{EdgeFuture, EdgeLayer, EdgeService, Inner};

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
type MethodNames = HashMap<&'static str, (&'static str, &'static str)>;

/// Builds the table once per process from the contract's descriptors plus health and
/// reflection. Leaking is deliberate: a fixed, small set of names lives as long as the process
/// and is then shared by every span and label without allocation.
fn method_names() -> &'static MethodNames {
    static NAMES: OnceLock<MethodNames> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut names = MethodNames::new();
        for set in [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    let full = match file.package() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    let full: &'static str = Box::leak(full.into_boxed_str());
                    for method in &service.method {
                        let path = format!("/{full}/{}", method.name());
                        let method: &'static str = Box::leak(method.name().to_owned().into());
                        names.insert(Box::leak(path.into_boxed_str()), (full, method));
                    }
                }
            }
        }
        names
    })
}

const OTHER: &str = "_OTHER";
/// Kubernetes probes call these every few seconds: counted, but not traced.
const UNTRACED_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Adds the server span and the RPC metrics; outermost layer, so it sees the final status.
#[derive(Debug, Clone)]
pub struct TelemetryLayer {
    address: &'static str,
    port: u16,
}

impl TelemetryLayer {
    pub fn new(local: std::net::SocketAddr) -> Self {
        // Built now rather than on the first call: decoding the descriptors takes milliseconds,
        // and the first call's deadline timers are already running (tonic's included).
        method_names();
        Self {
            address: Box::leak(local.ip().to_string().into_boxed_str()),
            port: local.port(),
        }
    }
}

impl EdgeLayer for TelemetryLayer {
    fn handle<S: Inner<B>, B>(&self, mut next: S, request: Request<B>) -> EdgeFuture<S::Error> {
        let (service, method) = method_names()
            .get(request.uri().path())
            .copied()
            .unwrap_or((OTHER, OTHER));
        let span = if UNTRACED_SERVICES.contains(&service) {
            tracing::Span::none()
        } else {
            // The name the caller used (`:authority`) says more than the listen address, which
            // is 0.0.0.0 in a pod.
            let authority = request.uri().authority();
            let address = authority.map_or(self.address, |authority| authority.host());
            let port = authority
                .and_then(|authority| authority.port_u16())
                .unwrap_or(self.port);
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = %format_args!("{service}/{method}"),
                otel.kind = "server",
                otel.status_code = Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = Empty,
                server.address = address,
                server.port = port,
                caller = Empty,
            );
            if super::traces_exported() {
                let parent = propagation::extract(request.headers());
                // Only fails when the span is disabled, which leaves nothing to continue.
                let _ = span.set_parent(parent);
            }
            span
        };
        let call = Call {
            span: span.clone(),
            started: Instant::now(),
            service,
            method,
            finished: false,
        };
        // Entered while the inner layers run their synchronous part too (authentication names
        // the caller on this span there).
        let response = span.in_scope(|| next.call(request)).instrument(span);
        Box::pin(async move {
            let response = response.await?;
            let mut call = call;
            if let Some(code) = grpc_status(response.headers()) {
                call.finish(code);
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(ObservedBody {
                    inner: body,
                    call: Some(call),
                }),
            ))
        })
    }
}

impl<S> Layer<S> for TelemetryLayer {
    type Service = EdgeService<Self, S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeService::new(self.clone(), inner)
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()
}

/// One call in progress; recorded exactly once, at the latest when dropped.
struct Call {
    span: tracing::Span,
    started: Instant,
    service: &'static str,
    method: &'static str,
    finished: bool,
}

impl Call {
    fn finish(&mut self, code: i32) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.span.record("rpc.grpc.status_code", code);
        if is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        let attributes = [
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", self.service),
            KeyValue::new("rpc.method", self.method),
            KeyValue::new("rpc.grpc.status_code", i64::from(code)),
        ];
        let metrics = metrics();
        metrics.rpc_calls.add(1, &attributes);
        metrics
            .rpc_duration
            .record(seconds(self.started.elapsed()), &attributes);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The client went away before the answer ended.
        self.finish(tonic::Code::Cancelled as i32);
    }
}

/// The codes the RPC semantic conventions count as a server-side failure.
fn is_server_error(code: i32) -> bool {
    use tonic::Code;
    [
        Code::Unknown,
        Code::DeadlineExceeded,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
    ]
    .iter()
    .any(|c| *c as i32 == code)
}

/// The response body, watched for the trailers that carry the status.
struct ObservedBody {
    inner: tonic::body::Body,
    call: Option<Call>,
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.finish(code);
                }
            }
            Some(Err(status)) => self.finish(status.code() as i32),
            // Ended without trailers: not a valid gRPC answer.
            None => self.finish(tonic::Code::Unknown as i32),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl ObservedBody {
    fn finish(&mut self, code: i32) {
        if let Some(mut call) = self.call.take() {
            call.finish(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use tower::Service;

    use super::*;

    /// A body made of the given frames.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn trailers(code: &str) -> Frame<Bytes> {
        let mut map = HeaderMap::new();
        map.insert("grpc-status", code.parse().unwrap());
        Frame::trailers(map)
    }

    /// Answers every call with `headers` and a body of `frames`, through the telemetry layer.
    async fn call(
        path: &str,
        headers: &[(&'static str, &'static str)],
        frames: Vec<Frame<Bytes>>,
    ) -> http::Response<tonic::body::Body> {
        let headers = headers.to_vec();
        // Called once: the frames move into the one response.
        let frames = std::sync::Arc::new(std::sync::Mutex::new(Some(VecDeque::from(frames))));
        let inner = tower::service_fn(move |_request: http::Request<()>| {
            let frames = frames.lock().unwrap().take().unwrap_or_default();
            let mut response = http::Response::new(tonic::body::Body::new(Frames(frames)));
            for (name, value) in &headers {
                response.headers_mut().insert(*name, value.parse().unwrap());
            }
            async move { Ok::<_, Infallible>(response) }
        });
        let mut service = TelemetryLayer::new(([127, 0, 0, 1], 50051).into()).layer(inner);
        let request = http::Request::builder().uri(path).body(()).unwrap();
        service.call(request).await.unwrap()
    }

    async fn drain(body: &mut tonic::body::Body) {
        while std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
            .await
            .is_some()
        {}
    }

    fn calls(text: &str, method: &str, code: &str) -> Option<String> {
        text.lines()
            .find(|line| {
                line.starts_with("rpc_server_calls_total{")
                    && line.contains(&format!("rpc_grpc_status_code=\"{code}\""))
                    && line.contains(&format!("rpc_method=\"{method}\""))
            })
            .map(|line| line.rsplit(' ').next().unwrap_or_default().to_owned())
    }

    #[tokio::test]
    async fn the_status_comes_from_headers_trailers_or_an_abandoned_body() {
        // Trailers-only: the status is in the headers.
        call(
            "/cx.gateway.v1.EventService/TrackEvent",
            &[("grpc-status", "3")],
            vec![],
        )
        .await;
        // A stream that ends with NOT_FOUND in its trailers, counted when the body ends.
        let mut streamed = call(
            "/cx.gateway.v1.EventService/TrackEvents",
            &[],
            vec![Frame::data(Bytes::from_static(b"x")), trailers("5")],
        )
        .await;
        let before = metrics().prometheus_text().unwrap();
        assert_eq!(
            calls(&before, "TrackEvents", "5"),
            None,
            "counted before the end"
        );
        drain(streamed.body_mut()).await;
        // A stream the client leaves before its end.
        let abandoned = call(
            "/cx.gateway.v1.FeedbackStream/Subscribe",
            &[],
            vec![Frame::data(Bytes::from_static(b"x")), trailers("0")],
        )
        .await;
        drop(abandoned);
        // A path outside the contract is labelled _OTHER.
        call("/no.Such/Thing", &[("grpc-status", "12")], vec![]).await;

        let text = metrics().prometheus_text().unwrap();
        assert_eq!(
            calls(&text, "TrackEvent", "3").as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            calls(&text, "TrackEvents", "5").as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            calls(&text, "Subscribe", "1").as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(calls(&text, "Subscribe", "0"), None, "{text}");
        assert_eq!(calls(&text, "_OTHER", "12").as_deref(), Some("1"), "{text}");
    }

    #[test]
    fn every_contract_method_and_health_are_known() {
        let names = method_names();
        assert_eq!(
            names.get("/cx.gateway.v1.EventService/ListEventMappings"),
            Some(&("cx.gateway.v1.EventService", "ListEventMappings"))
        );
        assert_eq!(
            names.get("/grpc.health.v1.Health/Check"),
            Some(&("grpc.health.v1.Health", "Check"))
        );
        assert!(
            names
                .get("/cx.gateway.v1.EventService/NoSuchMethod")
                .is_none()
        );
        assert!(names.len() > 20, "{}", names.len());
    }
}
