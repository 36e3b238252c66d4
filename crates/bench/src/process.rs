//! Child processes of the benchmark: the gateway (`cx-gateway serve`) and the bare tonic server
//! (`cx-gateway-bench --serve-bare`, this binary). Both binaries come from the same workspace
//! build, so both are built with the same profile, allocator and runtime configuration. Children
//! are separate processes so their resident memory can be read alone from `/proc/<pid>/status`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long a child may take from spawn to answering its health check.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to drain after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// File descriptors wanted: 10,000 subscriber streams share connections, but the emulator, the
/// direct HTTP baseline and a few hundred gRPC connections still need thousands.
const WANTED_FDS: u64 = 65_536;

/// Raises the soft RLIMIT_NOFILE towards the hard limit; children inherit it.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and pass by valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let wanted = WANTED_FDS.min(limit.rlim_max);
    if limit.rlim_cur >= wanted {
        return;
    }
    limit.rlim_cur = wanted;
    // SAFETY: setrlimit reads the struct we own; failure only leaves the old limit in place.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        tracing::warn!(wanted, "cannot raise the open file limit");
    }
}

/// The programs a run starts as child processes.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The gateway, started as `cx-gateway serve` by every scenario.
    pub gateway: PathBuf,
    /// This benchmark, started as `cx-gateway-bench --serve-bare` for the raw-rpc baseline.
    pub bench: PathBuf,
}

impl Binaries {
    /// The gateway named by `gateway`, or else `cx-gateway` next to this binary (where cargo puts
    /// both binaries of one workspace build).
    pub fn locate(gateway: Option<PathBuf>) -> anyhow::Result<Binaries> {
        let bench = std::env::current_exe().context("cannot find the running executable")?;
        let gateway = match gateway {
            Some(path) => path,
            None => bench
                .parent()
                .context("the running executable has no parent directory")?
                .join("cx-gateway"),
        };
        anyhow::ensure!(
            gateway.is_file(),
            "no gateway binary at {} (build it with `cargo build --workspace --bins`, or name it \
             with --gateway or CX_GATEWAY_BIN)",
            gateway.display()
        );
        Ok(Binaries { gateway, bench })
    }
}

/// A loopback address that was free a moment ago. The child binds it itself; on a loopback
/// interface nobody else races for ephemeral ports within milliseconds in practice, and a clash
/// shows up as a failed start, not as wrong figures.
pub fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("cannot bind an ephemeral loopback port")?;
    Ok(listener.local_addr()?)
}

/// A server running in a child process.
pub struct ChildServer {
    name: &'static str,
    child: Child,
    pid: u32,
    addr: SocketAddr,
    log: PathBuf,
}

impl ChildServer {
    /// Starts `program args` with `envs` (and no inherited `CXGW_*` setting), logging to `log`,
    /// and waits until its gRPC health check at `addr` answers SERVING.
    pub async fn start(
        name: &'static str,
        program: &Path,
        args: &[&str],
        envs: &[(String, String)],
        addr: SocketAddr,
        log: &Path,
    ) -> anyhow::Result<ChildServer> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        // Settings of the user's shell must not leak into a measured configuration.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CXGW_") {
                command.env_remove(key);
            }
        }
        command.envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = command
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        let pid = child.id().context("the child exited at once")?;
        let mut server = ChildServer {
            name,
            child,
            pid,
            addr,
            log: log.to_path_buf(),
        };
        server.wait_ready().await?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resident memory of the child now.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the {} exited during start ({status}): {}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(channel) = connect(self.addr).await {
                let mut health = HealthClient::new(channel);
                let answer = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if answer.is_ok_and(|r| r.get_ref().status == ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the {} did not become ready within {:?}: {}",
                    self.name,
                    READY_TIMEOUT,
                    self.log_tail()
                );
            }
            // Polling is the only readiness signal a child process offers over gRPC.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the child's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        let tail: Vec<&str> = lines.into_iter().rev().collect();
        if tail.is_empty() {
            "(no output)".to_owned()
        } else {
            tail.join(" | ")
        }
    }

    /// SIGTERM, a bounded wait for the drain, then SIGKILL.
    pub async fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(child = self.name, "child did not drain in time, killing it");
            let _ = self.child.kill().await;
        }
    }
}

/// `VmRSS` of a process.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("VmRSS:")?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
        .context("no VmRSS line")
}

/// CPU time (user + system) a process has used so far. Per-request CPU is steadier than
/// throughput on a shared machine: other load slows a server down but does not make its work
/// more expensive.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces; count after it.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed stat line")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks = |index: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(index)
            .context("short stat line")?
            .parse::<u64>()?)
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second)
        .ok()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Ok(Duration::from_secs_f64(total as f64 / per_second as f64))
}

/// One HTTP/2 connection (tonic opens exactly one per `connect`).
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    connect_with(addr, |endpoint| endpoint).await
}

/// One HTTP/2 connection with extra endpoint settings.
pub async fn connect_with(
    addr: SocketAddr,
    configure: impl FnOnce(Endpoint) -> Endpoint,
) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    Ok(configure(endpoint).connect().await?)
}

/// `count` separate connections.
pub async fn connect_many(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        channels.push(connect(addr).await?);
    }
    Ok(channels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_named_explicitly_is_the_one_started() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = dir.path().join("my-gateway");
        std::fs::write(&gateway, b"").unwrap();
        let binaries = Binaries::locate(Some(gateway.clone())).unwrap();
        assert_eq!(binaries.gateway, gateway);
        assert_eq!(binaries.bench, std::env::current_exe().unwrap());
    }

    #[test]
    fn a_missing_gateway_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("cx-gateway");
        let error = Binaries::locate(Some(missing.clone())).unwrap_err();
        assert!(
            error.to_string().contains(&missing.display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn by_default_the_gateway_is_looked_for_next_to_this_binary() {
        let beside = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .join("cx-gateway");
        match Binaries::locate(None) {
            Ok(binaries) => assert_eq!(binaries.gateway, beside),
            Err(error) => assert!(
                error.to_string().contains(&beside.display().to_string()),
                "{error}"
            ),
        }
    }
}
