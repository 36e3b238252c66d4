//! The one tower service behind every layer of the gRPC edge (telemetry, authentication,
//! deadline): each layer says only what it does with a call, in [`EdgeLayer::handle`], and
//! [`EdgeService`] does the tower plumbing once (readiness, handing the ready service over).

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http::{self, Request};
use tower::Service;

/// What every layer of the edge answers with: the response of a gRPC call.
pub type GrpcResponse = http::Response<tonic::body::Body>;

/// The future a layer answers with, boxed because each layer's handling is its own async block.
pub type EdgeFuture<E> = Pin<Box<dyn Future<Output = Result<GrpcResponse, E>> + Send>>;

/// The service a layer of the edge wraps (the router, or the next layer in), for requests with
/// bodies of type `B`.
pub trait Inner<B>:
    Service<Request<B>, Response = GrpcResponse, Future: Send + 'static> + Send + 'static
{
}

impl<S, B> Inner<B> for S where
    S: Service<Request<B>, Response = GrpcResponse, Future: Send + 'static> + Send + 'static
{
}

/// One layer of the edge: what it does with a call before (and around) the service it wraps.
pub trait EdgeLayer: Clone + Send + 'static {
    /// Handles `request`; `next` is the wrapped service, already ready and owned by this call.
    fn handle<S: Inner<B>, B>(&self, next: S, request: Request<B>) -> EdgeFuture<S::Error>;
}

/// The tower service of an [`EdgeLayer`] wrapped around `inner`.
#[derive(Debug, Clone)]
pub struct EdgeService<L, S> {
    layer: L,
    inner: S,
}

impl<L, S> EdgeService<L, S> {
    pub fn new(layer: L, inner: S) -> Self {
        EdgeService { layer, inner }
    }
}

impl<L: EdgeLayer, S: Inner<B> + Clone, B> Service<Request<B>> for EdgeService<L, S> {
    type Response = GrpcResponse;
    type Error = S::Error;
    type Future = EdgeFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The service that was polled ready is the one that must be called; a clone stays for
        // the next call, which polls it ready first.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        self.layer.handle(inner, request)
    }
}
