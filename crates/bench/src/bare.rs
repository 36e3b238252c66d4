//! The bare tonic server of scenario 1: a default tonic server (only TCP_NODELAY set, as the
//! gateway does) with two services and no layers: the health service, whose `Check` is the
//! cheapest unary RPC tonic can serve, and a `SurveyService` whose `ListCampaigns` answers with
//! a fixed response: the exact message the gateway returned for the same request in the same
//! run. Both servers then put the same bytes on the wire and the load generator decodes the same
//! message, so the difference is what the gateway does between tonic and the wire. It runs as a
//! child process of the benchmark, like the gateway, so both compete with the load generator for
//! the same cores in the same way.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use prost::Message as _;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use cx_gateway::pb;
use cx_gateway::pb::survey_service_server::{SurveyService, SurveyServiceServer};

/// Serves until SIGTERM or SIGINT. `campaigns` is a file holding an encoded
/// `ListCampaignsResponse`: what `ListCampaigns` answers.
pub async fn serve(addr: SocketAddr, campaigns: Option<&Path>) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let campaigns = match campaigns {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            pb::ListCampaignsResponse::decode(bytes.as_slice())
                .with_context(|| format!("{} is not a ListCampaignsResponse", path.display()))?
        }
        None => pb::ListCampaignsResponse::default(),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind {addr}"))?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(SurveyServiceServer::new(FixedCampaigns { campaigns }))
        .serve_with_incoming_shutdown(incoming, cx_gateway::server::shutdown_signal())
        .await
        .context("the bare server failed")
}

/// `ListCampaigns` as the thinnest tonic handler can serve it: a clone of a prepared message.
/// The other methods are tonic's default `UNIMPLEMENTED`.
struct FixedCampaigns {
    campaigns: pb::ListCampaignsResponse,
}

#[tonic::async_trait]
impl SurveyService for FixedCampaigns {
    async fn list_campaigns(
        &self,
        _request: Request<pb::ListCampaignsRequest>,
    ) -> Result<Response<pb::ListCampaignsResponse>, Status> {
        Ok(Response::new(self.campaigns.clone()))
    }
}
