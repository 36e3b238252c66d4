//! Starts the real gateway on `127.0.0.1:0` against an in-process sandbox, the way
//! `serve --sandbox` does, and hands tests a channel plus the sandbox's observation handle.

// Helpers here serve every test module; not each uses all of them.
#![allow(dead_code)]

use std::net::SocketAddr;

use cx_gateway::config::{Config, MapSource, UpstreamMode};
use cx_gateway::sandbox_mode::{self, EmbeddedSandbox};
use cx_gateway::server::{self, Listeners};
use cx_sandbox::{Sandbox, SandboxConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How to start a test gateway: the emulator's configuration, extra `CXGW_*` settings, and the
/// TLS the test's own channel uses (`None` for plaintext).
#[derive(Default)]
pub struct Options {
    pub sandbox: SandboxConfig,
    pub settings: Vec<(&'static str, String)>,
    pub client_tls: Option<ClientTlsConfig>,
}

pub struct TestGateway {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The Segment intake's address, when the settings turn it on.
    pub segment_addr: Option<SocketAddr>,
    pub channel: Channel,
    pub sandbox: EmbeddedSandbox,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with(SandboxConfig::default(), Vec::new()).await
    }

    /// Starts with a custom sandbox and extra `CXGW_*` settings.
    pub async fn start_with(
        sandbox_config: SandboxConfig,
        settings: Vec<(&'static str, String)>,
    ) -> TestGateway {
        Self::start_with_options(Options {
            sandbox: sandbox_config,
            settings,
            client_tls: None,
        })
        .await
    }

    pub async fn start_with_options(options: Options) -> TestGateway {
        let Options {
            sandbox: sandbox_config,
            settings,
            client_tls,
        } = options;
        let sandbox = EmbeddedSandbox::spawn(
            Sandbox::new(sandbox_config),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        )
        .unwrap();
        let mut config = Config::load(&MapSource::new(settings), UpstreamMode::Sandbox).unwrap();
        sandbox_mode::apply(&mut config, &sandbox).unwrap();
        let listeners = Listeners {
            grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            segment: match &config.segment {
                Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
                None => None,
            },
        };
        let segment_addr = listeners.segment.as_ref().map(|l| l.local_addr().unwrap());
        let grpc_addr = listeners.grpc.local_addr().unwrap();
        let admin_addr = listeners.admin.local_addr().unwrap();
        let (shutdown, shutdown_signal) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listeners, config, async move {
            let _ = shutdown_signal.await;
        }));
        let channel = connect(grpc_addr, client_tls).await.unwrap();
        TestGateway {
            grpc_addr,
            admin_addr,
            segment_addr,
            channel,
            sandbox,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// A new connection to the gateway (plaintext, or TLS with `tls`).
    pub async fn connect(
        &self,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Channel, tonic::transport::Error> {
        connect(self.grpc_addr, tls).await
    }

    pub fn sandbox(&self) -> &Sandbox {
        self.sandbox.sandbox()
    }

    /// Starts the drain without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Drains and returns what `server::run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        let result = self.task.take().unwrap().await.unwrap();
        self.sandbox.stop().await;
        result
    }
}

/// Waits until `condition` holds, checking after each short pause, for effects that happen in
/// another component (the sandbox) and announce themselves through no signal; panics after
/// `limit` so a broken test fails instead of hanging.
pub async fn eventually(
    what: &str,
    limit: std::time::Duration,
    mut condition: impl FnMut() -> bool,
) {
    let start = tokio::time::Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The id of the seeded sandbox's active transactional NPS campaign (seeds are deterministic, so
/// every sandbox started with the default seed has the same one).
pub fn seeded_transactional_campaign() -> String {
    Sandbox::new(SandboxConfig::default())
        .handle()
        .transactional_campaign("NPS")
        .expect("the default seed has a transactional NPS campaign")
}

/// Connects to `addr`; with TLS the server's certificate is checked for `localhost`, the name
/// test certificates are issued for.
pub async fn connect(
    addr: SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        None => {
            Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await
        }
        Some(tls) => {
            Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(tls.domain_name("localhost"))?
                .connect()
                .await
        }
    }
}

/// Waits until an asynchronous write is DELIVERED or DEAD_LETTERED. Integration tests see the
/// gateway only through gRPC, and GetDelivery is the one view of progress it offers, so this polls
/// it with a short pause, bounded by a total timeout (unit tests of the outbox wait on its outcome
/// signal instead). Generous: a delivery that meets an open circuit breaker waits out its backoff.
pub async fn finished_delivery(channel: &Channel, delivery_id: &str) -> cx_gateway::pb::Delivery {
    use cx_gateway::pb;
    let mut deliveries = pb::delivery_service_client::DeliveryServiceClient::new(channel.clone());
    let poll = async {
        loop {
            let delivery = deliveries
                .get_delivery(pb::GetDeliveryRequest {
                    delivery_id: delivery_id.to_owned(),
                })
                .await
                .unwrap()
                .into_inner()
                .delivery
                .unwrap();
            let state = pb::DeliveryState::try_from(delivery.state).unwrap();
            if matches!(
                state,
                pb::DeliveryState::Delivered | pb::DeliveryState::DeadLettered
            ) {
                return delivery;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), poll)
        .await
        .expect("the delivery finished within 60 s")
}
