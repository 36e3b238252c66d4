//! The `cx-gateway` command: parses the command line, reads the configuration, binds, and hands
//! over to `server::run`. Nothing else lives here, so tests can run the same server in process.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cx_gateway::config::{Config, EnvSource, UpstreamMode};
use cx_gateway::server::{self, Listeners};
use cx_gateway::{sandbox_mode, telemetry};

/// jemalloc instead of glibc malloc. A burst of slow FeedbackStream readers makes the gateway
/// allocate hundreds of MiB of HTTP/2 send buffers from many worker threads; glibc kept almost
/// all of it after they left (193 MiB taken from the system, 7 MiB in use: freed chunks stranded
/// in per-thread arenas, returned only by an explicit `malloc_trim`). jemalloc purges unused
/// pages by time (`dirty_decay_ms`, 10 s by default), and its background threads do it even
/// when the gateway is otherwise idle. Set in the binary, so the library stays allocator-neutral;
/// tune it with `_RJEM_MALLOC_CONF` (its symbols are prefixed on Linux).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// gRPC gateway to the Retently and Retainly customer-experience APIs.
///
/// Settings come from CXGW_* environment variables and an optional TOML file named by
/// CXGW_CONFIG_FILE; see the README for the list.
#[derive(Debug, Parser)]
#[command(name = "cx-gateway", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gRPC API (and the admin HTTP port) against the real upstreams.
    Serve {
        /// Start the built-in upstream emulator in process and point the gateway at it: no
        /// account, no network, a temporary data directory unless CXGW_DATA_DIR is set.
        #[arg(long)]
        sandbox: bool,
        /// Create a new, empty store when the data directory's marker shows a store existed but
        /// its database file is missing (by default the gateway refuses to start, so a lost
        /// file is noticed); same as CXGW_ALLOW_NEW_STORE=true.
        #[arg(long)]
        allow_new_store: bool,
    },
    /// Serve only the upstream emulator (Retently under /api/v2, Retainly at the root, admin
    /// under /_sandbox) on CXGW_SANDBOX_ADDR.
    Sandbox,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cx-gateway: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole context chain on one line.
            eprintln!("cx-gateway: {error:#}");
            tracing::error!(error = format!("{error:#}"), "exiting");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            sandbox,
            allow_new_store,
        } => {
            let mode = if sandbox {
                UpstreamMode::Sandbox
            } else {
                UpstreamMode::Real
            };
            let mut config = Config::load(&EnvSource, mode)?;
            config.allow_new_store |= allow_new_store;
            telemetry::init(&config)?;
            if !sandbox {
                let listeners = Listeners::bind(&config).await?;
                return server::run(listeners, config, server::shutdown_signal()).await;
            }
            let emulator = sandbox_mode::start_embedded(&config.sandbox)
                .await
                .context("cannot start the embedded sandbox")?;
            sandbox_mode::apply(&mut config, &emulator)?;
            tracing::warn!(
                sandbox = %emulator.base_url(),
                "serving against the built-in sandbox: no real upstream is called"
            );
            let listeners = Listeners::bind(&config).await?;
            let result = server::run(listeners, config, server::shutdown_signal()).await;
            emulator.stop().await;
            result
        }
        Command::Sandbox => {
            let config = Config::load(&EnvSource, UpstreamMode::Sandbox)?;
            telemetry::init(&config)?;
            sandbox_mode::serve_standalone(&config.sandbox, server::shutdown_signal()).await
        }
    }
}
