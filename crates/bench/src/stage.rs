//! One scenario's world: the upstream emulator in this process and a gateway child process
//! (`cx-gateway serve`) pointed at it. Each scenario builds a fresh one, so counters, caches and budgets start clean.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use cx_sandbox::{
    DEFAULT_RETAINLY_KEY, DEFAULT_RETAINLY_SECRET, DEFAULT_RETENTLY_API_KEY, Sandbox,
    SandboxConfig, SandboxHandle,
};
use tokio::net::TcpListener;
use tonic::metadata::{Ascii, MetadataValue};

use super::process::{Binaries, ChildServer, free_loopback_addr};
use cx_gateway::sandbox_mode::EmbeddedSandbox;

/// The benchmark's identity at the gateway: a random bearer token registered as the only caller,
/// so every measured call pays for authentication as in production.
#[derive(Clone)]
pub struct Caller {
    authorization: MetadataValue<Ascii>,
}

impl Caller {
    fn generate() -> anyhow::Result<(Caller, String)> {
        let token: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let digest: String = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let callers = format!(
            "[[caller]]\nname = \"bench\"\ntoken_sha256 = [\"{digest}\"]\n\
             permissions = [\"read\", \"surveys:send\", \"customers:write\", \"events:write\", \"feedback:subscribe\"]\n"
        );
        let authorization = MetadataValue::try_from(format!("Bearer {token}"))
            .context("the token is not a valid header value")?;
        Ok((Caller { authorization }, callers))
    }

    /// A request carrying the token, with a deadline when given (streams get none).
    pub fn request<T>(&self, message: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        request
    }
}

pub struct Stage {
    pub sandbox: EmbeddedSandbox,
    pub caller: Caller,
    pub gateway: ChildServer,
    /// Further replicas of the gateway beside `gateway`, on the same store and emulator
    /// (scale-out on PostgreSQL); empty for one gateway.
    pub replicas: Vec<ChildServer>,
    /// When the gateway process was started: its background work (feedback sync) begins then.
    pub gateway_spawned: std::time::Instant,
    /// Holds the gateway's data directory and log; removed on drop.
    dir: tempfile::TempDir,
}

impl Stage {
    /// Starts the emulator with `sandbox` and a gateway (`binaries.gateway`) with `settings`
    /// (`CXGW_*` pairs added to the ones that point it at the emulator).
    pub async fn start(
        binaries: &Binaries,
        sandbox: SandboxConfig,
        settings: &[(&str, String)],
    ) -> anyhow::Result<Stage> {
        Stage::start_replicas(binaries, sandbox, settings, 1).await
    }

    /// Like [`Stage::start`] with `count` gateway processes (at least one), each with its own
    /// ports and data directory and otherwise the same settings: replicas when `settings` put
    /// them on one shared store.
    pub async fn start_replicas(
        binaries: &Binaries,
        sandbox: SandboxConfig,
        settings: &[(&str, String)],
        count: usize,
    ) -> anyhow::Result<Stage> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("cannot bind a loopback port for the sandbox")?;
        // Seeding large data sets (80,000 responses) is CPU work: keep it off the runtime.
        let built = tokio::task::spawn_blocking(move || Sandbox::new(sandbox))
            .await
            .context("building the sandbox panicked")?;
        let sandbox = EmbeddedSandbox::spawn(built, listener)?;
        let dir = tempfile::Builder::new()
            .prefix("cx-gateway-bench-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let base_url = sandbox.base_url().to_string();
        let (caller, callers) = Caller::generate()?;
        let mut envs: Vec<(String, String)> = vec![
            ("CXGW_LOG".into(), "warn".into()),
            ("CXGW_CALLERS".into(), callers),
            ("CXGW_RETENTLY_BASE_URL".into(), base_url.clone()),
            (
                "CXGW_RETENTLY_API_KEY".into(),
                DEFAULT_RETENTLY_API_KEY.into(),
            ),
            ("CXGW_RETAINLY_BASE_URL".into(), base_url),
            ("CXGW_RETAINLY_API_KEY".into(), DEFAULT_RETAINLY_KEY.into()),
            (
                "CXGW_RETAINLY_API_SECRET".into(),
                DEFAULT_RETAINLY_SECRET.into(),
            ),
        ];
        for (key, value) in settings {
            envs.retain(|(k, _)| k != key);
            envs.push(((*key).to_owned(), value.clone()));
        }
        let gateway_spawned = std::time::Instant::now();
        let mut gateways = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            // The first gateway keeps the names a single-gateway stage always had.
            let suffix = if index == 0 {
                String::new()
            } else {
                format!("-{index}")
            };
            let grpc_addr = free_loopback_addr()?;
            let mut own = envs.clone();
            own.extend([
                ("CXGW_GRPC_ADDR".to_owned(), grpc_addr.to_string()),
                (
                    "CXGW_ADMIN_ADDR".to_owned(),
                    free_loopback_addr()?.to_string(),
                ),
                (
                    "CXGW_DATA_DIR".to_owned(),
                    dir.path()
                        .join(format!("data{suffix}"))
                        .display()
                        .to_string(),
                ),
            ]);
            gateways.push(
                ChildServer::start(
                    "gateway",
                    &binaries.gateway,
                    &["serve"],
                    &own,
                    grpc_addr,
                    &dir.path().join(format!("gateway{suffix}.log")),
                )
                .await?,
            );
        }
        let gateway = gateways.remove(0);
        Ok(Stage {
            sandbox,
            caller,
            gateway,
            replicas: gateways,
            gateway_spawned,
            dir,
        })
    }

    /// The gRPC address of every gateway process, the first one first.
    pub fn grpc_addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(&self.gateway)
            .chain(&self.replicas)
            .map(ChildServer::addr)
            .collect()
    }

    pub fn handle(&self) -> &SandboxHandle {
        self.sandbox.sandbox().handle()
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.gateway.addr()
    }

    /// Stops the gateway (drain), then the emulator.
    pub async fn stop(self) {
        let Stage {
            sandbox,
            gateway,
            replicas,
            dir,
            ..
        } = self;
        for replica in replicas {
            replica.stop().await;
        }
        gateway.stop().await;
        sandbox.stop().await;
        drop(dir);
    }
}
