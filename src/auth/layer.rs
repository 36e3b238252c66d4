//! The tower layer that authenticates every call and checks its permission before any handler
//! runs.
//!
//! A call proves who it is with `authorization: Bearer <token>` metadata or, on a mutual-TLS
//! connection, with a client certificate whose CN or SAN the callers file maps to a caller. A
//! token, when sent, decides alone (a wrong token is refused even on a known certificate, so a
//! misconfigured client finds out). Health and reflection stay open. The caller is put in the
//! request extensions as [`AuthenticatedCaller`] and named on the span of the call, so every log
//! line of the call carries it; the token never appears anywhere.

use std::sync::Arc;

use tonic::codegen::http::{self, Request};
use tonic::transport::server::TcpConnectInfo;
use tower::Layer;

use super::callers::{Caller, CallerRegistry, CallerTable};
use super::permissions::{Permission, is_open, required_permission};
use crate::domain::{Owner, Visibility};
use crate::error::{Error, ErrorCode, Reason};
use crate::grpc::deadline::Deadline;
use crate::grpc::layer::{EdgeFuture, EdgeLayer, EdgeService, Inner};
use crate::tls::TlsConnectInfo;
use crate::upstream::CallContext;

/// The caller of the current request, as established by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthenticatedCaller(pub Arc<Caller>);

impl AuthenticatedCaller {
    /// The caller of a tonic request, for `CallContext::with_caller`; `None` when authentication
    /// is off (sandbox, trusted mesh).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Arc<Caller>> {
        request
            .extensions()
            .get::<AuthenticatedCaller>()
            .map(|caller| &caller.0)
    }

    /// The caller's name, the key of its fair share in the upstream scheduler.
    pub fn name_of<T>(request: &tonic::Request<T>) -> Option<Arc<str>> {
        Self::of(request).map(|caller| Arc::clone(caller.name()))
    }
}

/// Whose idempotency keys and deliveries a call makes: its caller, or the one shared scope when
/// no callers are configured.
pub fn owner_of<T>(request: &tonic::Request<T>) -> Owner {
    match AuthenticatedCaller::name_of(request) {
        Some(name) => Owner::Caller(name),
        None => Owner::Anonymous,
    }
}

/// Which deliveries a call may see and requeue: all of them for a caller holding
/// `deliveries:admin` or when no callers are configured, its own otherwise.
pub fn visibility_of<T>(request: &tonic::Request<T>) -> Visibility {
    match AuthenticatedCaller::of(request) {
        None => Visibility::All,
        Some(caller) if caller.may(Permission::DeliveriesAdmin) => Visibility::All,
        Some(caller) => Visibility::Own(Owner::Caller(Arc::clone(caller.name()))),
    }
}

/// The upstream context of an interactive call: its deadline and its caller, so the scheduler
/// shares the budget fairly between callers.
pub fn interactive_context<T>(request: &tonic::Request<T>) -> CallContext {
    let context = CallContext::interactive(Deadline::of(request).map(|deadline| deadline.0));
    match AuthenticatedCaller::name_of(request) {
        Some(name) => context.with_caller(name),
        None => context,
    }
}

/// Authenticates against `registry`, or lets every call through when there is none (sandbox,
/// or a trusted mesh that authenticates callers before they reach the gateway).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    registry: Option<CallerRegistry>,
}

impl AuthLayer {
    pub fn new(registry: Option<CallerRegistry>) -> Self {
        Self { registry }
    }
}

impl EdgeLayer for AuthLayer {
    fn handle<S: Inner<B>, B>(&self, mut next: S, mut request: Request<B>) -> EdgeFuture<S::Error> {
        let path = request.uri().path().to_owned();
        if let Some(registry) = &self.registry
            && !is_open(&path)
        {
            let table = registry.current();
            let caller = match authorize(&table, &request, &path) {
                Ok(caller) => caller,
                Err(error) => {
                    tracing::info!(
                        rpc = %path,
                        peer = peer(&request).map(tracing::field::display),
                        reason = error.reason().as_str(),
                        cause = error.metadata().get("cause").map(String::as_str),
                        permission = error.metadata().get("permission").map(String::as_str),
                        caller = error.metadata().get("caller").map(String::as_str),
                        "call refused"
                    );
                    return Box::pin(async move { Ok(tonic::Status::from(error).into_http()) });
                }
            };
            // The call's span is the server span of the telemetry layer around this one.
            tracing::Span::current().record("caller", tracing::field::display(caller.name()));
            request.extensions_mut().insert(AuthenticatedCaller(caller));
            tracing::debug!("call authorized");
        }
        Box::pin(next.call(request))
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = EdgeService<Self, S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeService::new(self.clone(), inner)
    }
}

fn peer<B>(request: &http::Request<B>) -> Option<std::net::SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TlsConnectInfo>()
        .and_then(TlsConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
        })
}

fn unauthenticated(cause: &'static str, message: &str) -> Error {
    Error::new(
        ErrorCode::Unauthenticated,
        Reason::CallerUnauthenticated,
        message,
    )
    .with_metadata("cause", cause)
}

/// Who is calling, and whether they may call `path`.
fn authorize<B>(
    table: &CallerTable,
    request: &http::Request<B>,
    path: &str,
) -> Result<Arc<Caller>, Error> {
    let caller = authenticate(table, request)?;
    match required_permission(path) {
        Some(permission) if !caller.may(permission) => Err(Error::new(
            ErrorCode::PermissionDenied,
            Reason::PermissionDenied,
            format!(
                "caller {} lacks the permission {permission} that {path} needs",
                caller.name()
            ),
        )
        .with_metadata("permission", permission.as_str())
        .with_metadata("caller", &**caller.name())),
        // Paths outside the contract reach the router, which answers UNIMPLEMENTED: every RPC it
        // serves is in the permission table (a unit test holds the table to the contract).
        _ => Ok(caller),
    }
}

fn authenticate<B>(table: &CallerTable, request: &http::Request<B>) -> Result<Arc<Caller>, Error> {
    let mut values = request
        .headers()
        .get_all(http::header::AUTHORIZATION)
        .iter();
    match (values.next(), values.next()) {
        (Some(_), Some(_)) => Err(unauthenticated(
            "malformed",
            "send one authorization metadata entry, not several",
        )),
        (Some(value), None) => {
            let token = bearer_token(value).ok_or_else(|| {
                unauthenticated(
                    "malformed",
                    "the authorization metadata must be `Bearer <token>`",
                )
            })?;
            table
                .by_token(token)
                .cloned()
                .ok_or_else(|| unauthenticated("unknown_token", "the bearer token is not valid"))
        }
        (None, _) => {
            let names = request
                .extensions()
                .get::<TlsConnectInfo>()
                .and_then(TlsConnectInfo::client_names);
            match names {
                Some(names) => table
                    .by_subject(names.iter().map(String::as_str))
                    .cloned()
                    .ok_or_else(|| {
                        unauthenticated(
                            "unknown_certificate",
                            "the client certificate does not identify a caller and no bearer token was sent",
                        )
                    }),
                None => Err(unauthenticated(
                    "missing",
                    "missing `authorization: Bearer <token>` metadata",
                )),
            }
        }
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, as RFC 6750 allows).
fn bearer_token(value: &http::HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tonic_types::StatusExt as _;

    use tower::Service;

    use super::*;
    use crate::auth::callers::{CallersSource, token_digest};
    use crate::config::Secret;

    fn registry() -> CallerRegistry {
        let hex = |token: &str| -> String {
            token_digest(token)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let text = format!(
            "[[caller]]\nname = \"reader\"\ntoken_sha256 = \"{}\"\npermissions = [\"read\"]\n\
             [[caller]]\nname = \"mesh-peer\"\nclient_subjects = [\"peer.svc\"]\npermissions = [\"surveys:send\"]\n",
            hex("reader-token")
        );
        CallerRegistry::load(CallersSource::Inline(Secret::new(text))).unwrap()
    }

    /// A service that records the caller it was handed.
    fn recorder(
        calls: Arc<AtomicUsize>,
    ) -> impl Inner<(), Error = std::convert::Infallible> + Clone {
        tower::service_fn(move |request: http::Request<()>| {
            let calls = Arc::clone(&calls);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let name = request
                    .extensions()
                    .get::<AuthenticatedCaller>()
                    .map(|caller| caller.0.name().to_string())
                    .unwrap_or_default();
                let mut response = http::Response::new(tonic::body::Body::empty());
                response
                    .headers_mut()
                    .insert("x-caller", name.parse().unwrap());
                Ok(response)
            }
        })
    }

    fn request(path: &str, authorization: Option<&str>) -> http::Request<()> {
        let mut request = http::Request::builder().uri(path).body(()).unwrap();
        if let Some(value) = authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value.parse().unwrap());
        }
        request
    }

    async fn call(
        layer: &AuthLayer,
        request: http::Request<()>,
    ) -> (http::Response<tonic::body::Body>, usize) {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut service = layer.layer(recorder(Arc::clone(&calls)));
        let response = service.call(request).await.unwrap();
        (response, calls.load(Ordering::SeqCst))
    }

    fn status_of(response: http::Response<tonic::body::Body>) -> Option<tonic::Status> {
        tonic::Status::from_header_map(response.headers())
    }

    const LIST: &str = "/cx.gateway.v1.CustomerService/ListCustomers";
    const SEND: &str = "/cx.gateway.v1.SurveyService/SendSurvey";

    /// Calls through `layer`, which must answer `code` without running the service; returns
    /// the status and its ErrorInfo.
    async fn refused(
        layer: &AuthLayer,
        request: http::Request<()>,
        code: tonic::Code,
    ) -> (tonic::Status, tonic_types::ErrorInfo) {
        let (response, calls) = call(layer, request).await;
        let status = status_of(response).unwrap();
        assert_eq!(status.code(), code);
        assert_eq!(calls, 0);
        let info = status.get_error_details().error_info().cloned().unwrap();
        (status, info)
    }

    #[tokio::test]
    async fn outcomes() {
        let layer = AuthLayer::new(Some(registry()));

        let (_, info) = refused(&layer, request(LIST, None), tonic::Code::Unauthenticated).await;
        assert_eq!(info.reason, "CALLER_UNAUTHENTICATED");
        assert_eq!(info.metadata["cause"], "missing");

        for bad in [
            "Bearer nope",
            "Basic cmVhZGVyLXRva2Vu",
            "Bearer ",
            "reader-token",
        ] {
            let (status, _) = refused(
                &layer,
                request(LIST, Some(bad)),
                tonic::Code::Unauthenticated,
            )
            .await;
            assert!(!status.message().contains("nope"), "{bad}");
        }

        let (status, info) = refused(
            &layer,
            request(SEND, Some("Bearer reader-token")),
            tonic::Code::PermissionDenied,
        )
        .await;
        assert_eq!(info.reason, "PERMISSION_DENIED");
        assert_eq!(info.metadata["permission"], "surveys:send");
        assert!(!status.message().contains("reader-token"));

        let (response, calls) = call(&layer, request(LIST, Some("bearer reader-token"))).await;
        assert_eq!(calls, 1);
        assert_eq!(response.headers()["x-caller"], "reader");
    }

    #[tokio::test]
    async fn health_and_reflection_stay_open_and_no_registry_means_open() {
        let layer = AuthLayer::new(Some(registry()));
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            let (response, calls) = call(&layer, request(path, None)).await;
            assert_eq!(calls, 1, "{path}");
            assert!(status_of(response).is_none());
        }
        let (_, calls) = call(&AuthLayer::new(None), request(SEND, None)).await;
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn a_client_certificate_identifies_its_caller_unless_a_token_is_sent() {
        let layer = AuthLayer::new(Some(registry()));
        let with_cert = |names: &[&str], authorization: Option<&str>| {
            let mut request = request(SEND, authorization);
            request.extensions_mut().insert(TlsConnectInfo::new(
                None,
                Some(names.iter().map(|name| (*name).to_owned()).collect()),
            ));
            request
        };
        let (response, calls) = call(&layer, with_cert(&["peer.svc"], None)).await;
        assert_eq!(calls, 1);
        assert_eq!(response.headers()["x-caller"], "mesh-peer");

        let (response, _) = call(&layer, with_cert(&["other.svc"], None)).await;
        let status = status_of(response).unwrap();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            status.get_error_details().error_info().unwrap().metadata["cause"],
            "unknown_certificate"
        );

        // A token decides alone: the reader may not send surveys, whatever the certificate says.
        let (response, calls) = call(
            &layer,
            with_cert(&["peer.svc"], Some("Bearer reader-token")),
        )
        .await;
        assert_eq!(calls, 0);
        assert_eq!(
            status_of(response).unwrap().code(),
            tonic::Code::PermissionDenied
        );
    }
}
