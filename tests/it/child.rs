//! The built binary as a child process, for tests that kill and restart the gateway.

// Shared by several test modules; not each uses every field.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use cx_gateway::sandbox_mode::EmbeddedSandbox;
use tonic::transport::{Channel, Endpoint};

pub struct ChildGateway {
    pub process: Child,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub channel: Channel,
    /// The log lines read so far (JSON, one per line).
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The thread reading stdout; it ends when the child closes its stdout.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ChildGateway {
    /// Starts `cx-gateway serve` against `sandbox` with `data_dir` and extra settings, and waits
    /// for its "gateway serving" log line (the signal that both ports are bound).
    pub async fn start(
        sandbox: &EmbeddedSandbox,
        data_dir: &Path,
        settings: &[(&str, String)],
    ) -> ChildGateway {
        Self::start_command(Self::command(sandbox, data_dir, settings)).await
    }

    /// The `cx-gateway serve` command [`ChildGateway::start`] runs, for tests that add arguments
    /// or expect the start to be refused.
    pub fn command(
        sandbox: &EmbeddedSandbox,
        data_dir: &Path,
        settings: &[(&str, String)],
    ) -> Command {
        let base = sandbox.base_url().to_string();
        let mut command = Command::new(env!("CARGO_BIN_EXE_cx-gateway"));
        command
            .arg("serve")
            .env_clear()
            .env("CXGW_GRPC_ADDR", "127.0.0.1:0")
            .env("CXGW_ADMIN_ADDR", "127.0.0.1:0")
            .env("CXGW_LOG_FORMAT", "json")
            .env("CXGW_DATA_DIR", data_dir)
            .env("CXGW_RETENTLY_BASE_URL", &base)
            .env("CXGW_RETAINLY_BASE_URL", &base)
            .env(
                "CXGW_RETENTLY_API_KEY",
                cx_sandbox::DEFAULT_RETENTLY_API_KEY,
            )
            .env("CXGW_RETAINLY_API_KEY", cx_sandbox::DEFAULT_RETAINLY_KEY)
            .env(
                "CXGW_RETAINLY_API_SECRET",
                cx_sandbox::DEFAULT_RETAINLY_SECRET,
            )
            // `serve` needs callers or a trusted mesh; these tests are about durability, not auth.
            .env("CXGW_TRUSTED_MESH", "true")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in settings {
            command.env(key, value);
        }
        command
    }

    /// Starts `command` (from [`ChildGateway::command`]) and waits until it serves.
    pub async fn start_command(mut command: Command) -> ChildGateway {
        let mut process = command.spawn().expect("the gateway binary starts");
        let stdout = process.stdout.take().expect("piped stdout");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<(SocketAddr, SocketAddr)>();
        let lines = std::sync::Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(tx) = addr_tx.take_if(|_| line.contains("gateway serving")) {
                    let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    let addr = |key: &str| parsed[key].as_str().and_then(|a| a.parse().ok());
                    if let (Some(grpc), Some(admin)) = (addr("grpc_addr"), addr("admin_addr")) {
                        let _ = tx.send((grpc, admin));
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
        let (grpc_addr, admin_addr) =
            tokio::time::timeout(std::time::Duration::from_secs(60), addr_rx)
                .await
                .expect("the gateway reports it is serving")
                .expect("the gateway's log names its address");
        let channel = Endpoint::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        ChildGateway {
            process,
            grpc_addr,
            admin_addr,
            channel,
            log,
            reader: Some(reader),
        }
    }

    /// SIGKILL: no drain, no flush, as in a crash or an OOM kill.
    pub fn kill(mut self) {
        self.process.kill().expect("the child can be killed");
        self.process.wait().expect("the child is reaped");
    }

    /// SIGTERM, then the exit status and every line the child wrote.
    pub fn terminate_with_log(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let log = std::sync::Arc::clone(&self.log);
        let reader = self.reader.take();
        let status = self.terminate();
        if let Some(reader) = reader {
            reader.join().expect("the log reader finishes");
        }
        let lines = log.lock().unwrap().clone();
        (status, lines)
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.send_sigterm();
        self.process.wait().expect("the child exits")
    }

    /// Sends SIGTERM and returns at once, so a test can watch the drain.
    pub fn send_sigterm(&self) {
        let pid = i32::try_from(self.process.id()).expect("pid fits");
        // The shell's `kill` keeps the tests free of a libc dependency.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }

    /// Waits for the child to exit (after [`ChildGateway::send_sigterm`]); the exit status and
    /// every line it wrote.
    pub fn wait_with_log(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let status = self.process.wait().expect("the child exits");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the log reader finishes");
        }
        let lines = self.log.lock().unwrap().clone();
        (status, lines)
    }
}

impl Drop for ChildGateway {
    /// A failing test must not leave a gateway running (it would also hold the test's output
    /// pipe open); after `kill` or `terminate` this finds the child already reaped.
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
