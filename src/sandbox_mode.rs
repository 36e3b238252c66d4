//! The built-in upstream emulator as a neighbour of the gateway: `serve --sandbox` starts it on an
//! ephemeral loopback port and points both upstream clients at it; `cx-gateway sandbox` serves it
//! alone. Integration tests use the same functions, so they exercise what a user runs.

use std::net::SocketAddr;

use anyhow::Context as _;
use cx_sandbox::{Sandbox, SandboxConfig};
use reqwest::Url;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{Config, SandboxSettings, Secret};

/// An emulator running in this process.
pub struct EmbeddedSandbox {
    sandbox: Sandbox,
    addr: SocketAddr,
    base_url: Url,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl EmbeddedSandbox {
    /// Serves `sandbox` on `listener` until [`EmbeddedSandbox::stop`].
    pub fn spawn(sandbox: Sandbox, listener: TcpListener) -> std::io::Result<EmbeddedSandbox> {
        let addr = listener.local_addr()?;
        let base_url = Url::parse(&format!("http://{addr}/")).map_err(std::io::Error::other)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(sandbox.clone().serve(listener, async move {
            // A dropped sender also stops the emulator.
            let _ = stopped.await;
        }));
        Ok(EmbeddedSandbox {
            sandbox,
            addr,
            base_url,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of both emulated APIs (Retently under `/api/v2`, Retainly at the root).
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// In-process control and observation of the emulator.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "the sandbox stopped with an error"),
            Err(error) => tracing::warn!(%error, "the sandbox task failed"),
        }
    }
}

/// The emulator's configuration from the gateway's sandbox settings.
pub fn sandbox_config(settings: &SandboxSettings) -> SandboxConfig {
    SandboxConfig {
        retently_requests_per_minute: settings.retently_requests_per_minute,
        simulate_feedback_per_second: settings.feedback_per_second,
        ..SandboxConfig::default()
    }
}

/// Starts the emulator on an ephemeral loopback port.
pub async fn start_embedded(settings: &SandboxSettings) -> anyhow::Result<EmbeddedSandbox> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot bind a loopback port for the sandbox")?;
    Ok(EmbeddedSandbox::spawn(
        Sandbox::new(sandbox_config(settings)),
        listener,
    )?)
}

/// Points both upstreams at the emulator with its default credentials.
pub fn apply(config: &mut Config, emulator: &EmbeddedSandbox) -> anyhow::Result<()> {
    let defaults = SandboxConfig::default();
    let base_url = emulator.base_url();
    config.retently.base_url = base_url.clone();
    config.retently.api_key = defaults.retently_api_keys.first().map(Secret::new);
    config.retainly.base_url = base_url.clone();
    let (key, secret) = defaults
        .retainly_credentials
        .first()
        .context("the sandbox has no default retainly credentials")?;
    config.retainly.api_key = Some(Secret::new(key));
    config.retainly.api_secret = Some(Secret::new(secret));
    Ok(())
}

/// `cx-gateway sandbox`: the emulator alone until `shutdown`.
pub async fn serve_standalone(
    settings: &SandboxSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("cannot bind the sandbox address {}", settings.addr))?;
    tracing::info!(addr = %listener.local_addr()?, "sandbox serving");
    Sandbox::new(sandbox_config(settings))
        .serve(listener, shutdown)
        .await
        .context("the sandbox failed")
}
