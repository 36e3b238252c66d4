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
             permissions = [\"read\", \"surveys:send\", \"customers:write\", \"feedback:subscribe\"]\n"
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
        let grpc_addr = free_loopback_addr()?;
        let admin_addr = free_loopback_addr()?;
        let base_url = sandbox.base_url().to_string();
        let (caller, callers) = Caller::generate()?;
        let mut envs: Vec<(String, String)> = vec![
            ("CXGW_GRPC_ADDR".into(), grpc_addr.to_string()),
            ("CXGW_ADMIN_ADDR".into(), admin_addr.to_string()),
            (
                "CXGW_DATA_DIR".into(),
                dir.path().join("data").display().to_string(),
            ),
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
        let gateway = ChildServer::start(
            "gateway",
            &binaries.gateway,
            &["serve"],
            &envs,
            grpc_addr,
            &dir.path().join("gateway.log"),
        )
        .await?;
        Ok(Stage {
            sandbox,
            caller,
            gateway,
            gateway_spawned,
            dir,
        })
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
            dir,
            ..
        } = self;
        gateway.stop().await;
        sandbox.stop().await;
        drop(dir);
    }
}
