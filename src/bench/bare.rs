//! The bare tonic server of scenario 1: the health service alone on a default tonic server (only
//! TCP_NODELAY set, as the gateway does), so its `Check` is the cheapest unary RPC tonic can
//! serve. It runs as a child process of the benchmark, like the gateway, so both compete with the
//! load generator for the same cores in the same way.

use std::net::SocketAddr;

use anyhow::Context as _;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

/// Serves until SIGTERM or SIGINT.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let (health, service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind {addr}"))?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .tcp_nodelay(true)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, crate::server::shutdown_signal())
        .await
        .context("the bare server failed")
}
