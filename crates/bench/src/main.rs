//! `cx-gateway-bench`: measures what the gateway exists for, each figure next to a baseline
//! taken in the same run, because absolute times on a shared machine drift.
//!
//! The benchmark starts the upstream emulator in its own process (so it can seed data and read
//! the emulator's counters directly) and the gateway as a child process (`cx-gateway serve`
//! pointed at the emulator), so the resident memory it reports is the gateway's alone. The
//! gateway binary is the one named by `--gateway` (or `CX_GATEWAY_BIN`), else `cx-gateway` next
//! to this binary. The load generator is its own: tonic clients over many HTTP/2 connections,
//! closed-loop (N in flight) and open-loop (a fixed rate, latency measured from the intended send
//! time so a slow server cannot hide its stalls by slowing the generator down).
//!
//! A scenario whose RPC the gateway does not serve (it answers `UNIMPLEMENTED`) is reported as
//! not run, with the reason, never estimated.
//!
//! # Layout
//!
//! - [`machine`]: the machine and versions printed with every report.
//! - [`process`]: child processes (the gateway, the bare tonic server) and their resident memory.
//! - [`stage`]: an emulator plus a gateway child, configured per scenario.
//! - [`load`]: closed-loop and open-loop load generation.
//! - [`hist`]: latency histograms and their summaries.
//! - [`report`]: the printed table and the JSON document.
//! - [`bare`]: the bare tonic server that scenario 1 compares against.
//! - [`scenarios`]: one module per scenario.

mod bare;
mod hist;
mod load;
mod machine;
mod process;
mod report;
mod scenarios;
mod stage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;

use clap::Parser;

use self::process::Binaries;
use self::report::{Report, ScenarioReport};
use self::scenarios::Scenario;

/// The same allocator as the gateway binary (see its `src/main.rs`), so the bare tonic server
/// this binary serves as raw-rpc's baseline differs from the gateway only in what it does.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Measure cx-gateway against same-run baselines on loopback (emulator in process, gateway as a
/// child process) and print a table; build with --release for real figures.
#[derive(Debug, Clone, Parser)]
#[command(name = "cx-gateway-bench", version)]
struct BenchArgs {
    /// A scaled-down run of every scenario (about a minute): a smoke test, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the JSON report (default: bench-results/bench-<UTC time>.json).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Run only this scenario (repeatable): raw-rpc, added-latency, survey-coalescing,
    /// retainly-batching, feedback-sync, fan-out, scale-out (needs PostgreSQL:
    /// CXGW_BENCH_POSTGRES_URL, or run through scripts/postgres.sh).
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// The gateway binary to measure (default: `cx-gateway` next to this binary).
    #[arg(long, value_name = "PATH", env = "CX_GATEWAY_BIN")]
    pub gateway: Option<PathBuf>,
    /// Internal: serve the bare tonic server on this address (the baseline of raw-rpc).
    #[arg(long, value_name = "ADDR", hide = true)]
    pub serve_bare: Option<std::net::SocketAddr>,
    /// Internal: the encoded `ListCampaignsResponse` the bare server answers with.
    #[arg(long, value_name = "PATH", hide = true, requires = "serve_bare")]
    pub bare_campaigns: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cx-gateway-bench: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole context chain on one line.
            eprintln!("cx-gateway-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the selected scenarios, prints the table and writes the JSON report.
async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.serve_bare {
        return bare::serve(addr, args.bare_campaigns.as_deref()).await;
    }
    let selected = select(&args.scenarios)?;
    let binaries = Binaries::locate(args.gateway)?;
    process::raise_fd_limit();
    let rustls_provider = rustls::crypto::ring::default_provider().install_default();
    // Already installed is fine: only one provider is ever used in this process.
    drop(rustls_provider);

    let machine = machine::Machine::read();
    let mode = if args.quick { "quick" } else { "full" };
    println!("cx-gateway-bench ({mode})");
    println!("{}", machine.describe());
    if cfg!(debug_assertions) && !args.quick {
        println!(
            "warning: this is a debug build; figures are not representative (build with `cargo build --release --workspace --bins`)"
        );
    }
    println!();

    let started = Instant::now();
    let mut reports: Vec<ScenarioReport> = Vec::new();
    for scenario in selected {
        println!("running {} ...", scenario.id());
        let scenario_started = Instant::now();
        let load_before = machine::load_average();
        let mut report = scenario.run(&binaries, args.quick).await;
        report.load_average = [load_before, machine::load_average()];
        let report = report.with_duration(scenario_started.elapsed());
        println!("{}", report.render());
        reports.push(report);
    }

    let report = Report::new(machine, mode, started.elapsed(), reports);
    println!("{}", report.render_summary());
    let path = match args.json {
        Some(path) => path,
        None => PathBuf::from("bench-results").join(format!(
            "bench-{}.json",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
        )),
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let json = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
    std::fs::write(&path, json).with_context(|| format!("cannot write {}", path.display()))?;
    println!("json report: {}", path.display());
    // Missed targets and scenarios that cannot run yet are findings, not failures of the
    // command; a scenario that broke is, so a smoke run in the test suite catches rot.
    let failed: Vec<&str> = report
        .scenarios
        .iter()
        .filter(|s| matches!(s.status, report::Status::Failed(_)))
        .map(|s| s.id)
        .collect();
    anyhow::ensure!(failed.is_empty(), "scenarios failed: {}", failed.join(", "));
    Ok(())
}

fn select(names: &[String]) -> anyhow::Result<Vec<Scenario>> {
    if names.is_empty() {
        return Ok(Scenario::ALL.to_vec());
    }
    let mut selected = Vec::new();
    for name in names {
        let scenario = Scenario::from_id(name).with_context(|| {
            let known: Vec<&str> = Scenario::ALL.iter().map(|s| s.id()).collect();
            format!("unknown scenario `{name}` (known: {})", known.join(", "))
        })?;
        if !selected.contains(&scenario) {
            selected.push(scenario);
        }
    }
    Ok(selected)
}
