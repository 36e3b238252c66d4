//! The machine and the versions a report was measured with: figures mean little without them.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores this process may run on.
    pub cores: usize,
    pub memory_bytes: Option<u64>,
    pub cpu_model: String,
    pub kernel: String,
    pub crate_version: &'static str,
    pub rustc: &'static str,
    /// `release` or `debug`: a debug build's figures are only a smoke test.
    pub profile: &'static str,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|meminfo| {
                meminfo.lines().find_map(|line| {
                    let rest = line.strip_prefix("MemTotal:")?;
                    let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
                    Some(kib * 1024)
                })
            });
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|release| format!("Linux {}", release.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_owned());
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            cpu_model,
            kernel,
            crate_version: env!("CARGO_PKG_VERSION"),
            rustc: env!("CXGW_RUSTC_VERSION"),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        }
    }

    /// Two lines for the head of the table.
    pub fn describe(&self) -> String {
        let memory = self.memory_bytes.map_or_else(
            || "unknown".to_owned(),
            |bytes| format!("{:.1} GiB", gib(bytes)),
        );
        format!(
            "machine: {} cores, {memory} memory, {}, {}\nversions: cx-gateway {} ({} build), {}",
            self.cores, self.cpu_model, self.kernel, self.crate_version, self.profile, self.rustc
        )
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0 * 1024.0)
}

/// The 1-minute load average: more runnable tasks than cores means every figure of the run shared
/// the CPU with someone else.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
