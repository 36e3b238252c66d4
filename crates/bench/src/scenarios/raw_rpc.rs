//! Scenario 1: what one RPC costs in the gateway. A cache-served read (ListCampaigns) at
//! saturation from 50 connections with 1,000 requests in flight, against a bare tonic server
//! answering the same RPC with the same message (captured from the gateway in this run), so both
//! put the same bytes on the wire and the load generator does the same work for either. The
//! gateway's own health `Check` is measured against the bare server's too: it has the gateway's
//! whole tower stack but no handler work, which separates stack cost from handler cost. Targets
//! run in interleaved rounds so drift on a shared machine hits all of them alike.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cx_sandbox::SandboxConfig;
use prost::Message as _;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{request, unimplemented};
use crate::hist::Latencies;
use crate::load::{ClosedLoop, LoadResult, closed_loop, grpc_class};
use crate::process::{Binaries, ChildServer, connect_many, cpu_time, free_loopback_addr};
use crate::report::ScenarioReport;
use crate::stage::{Caller, Stage};
use cx_gateway::pb::ListCampaignsRequest;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;

const CONNECTIONS: usize = 50;
const IN_FLIGHT: usize = 1_000;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What is measured in each round.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    BareList,
    GatewayList,
    BareHealth,
    GatewayHealth,
}

struct Totals {
    rounds: Vec<LoadResult>,
    latencies: Latencies,
    /// CPU the serving process used during the runs.
    cpu: Duration,
}

impl Totals {
    fn new() -> Totals {
        Totals {
            rounds: Vec::new(),
            latencies: Latencies::new(),
            cpu: Duration::ZERO,
        }
    }

    /// Server CPU per completed request, in microseconds.
    fn cpu_per_request_us(&self) -> f64 {
        let completed: u64 = self.rounds.iter().map(|r| r.completed_total).sum();
        self.cpu.as_secs_f64() * 1e6 / completed.max(1) as f64
    }

    fn merged(&self) -> LoadResult {
        LoadResult::merge(&self.rounds, &self.latencies, None)
    }
}

pub async fn run(
    report: &mut ScenarioReport,
    binaries: &Binaries,
    quick: bool,
) -> anyhow::Result<()> {
    let (rounds, warmup, measure) = if quick {
        (1, Duration::from_millis(500), Duration::from_secs(2))
    } else {
        (2, Duration::from_secs(1), Duration::from_secs(5))
    };
    let stage = Stage::start(binaries, SandboxConfig::default(), &[]).await?;
    let result = with_bare_server(report, binaries, &stage, rounds, warmup, measure).await;
    stage.stop().await;
    result
}

async fn with_bare_server(
    report: &mut ScenarioReport,
    binaries: &Binaries,
    stage: &Stage,
    rounds: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<()> {
    let gateway_channels = connect_many(stage.grpc_addr(), CONNECTIONS).await?;
    // One call first: it says whether the RPC exists, fills the gateway's campaign cache so the
    // measured calls are the cache-served ones this scenario is about, and gives the bare server
    // the message to answer with.
    let probe = SurveyServiceClient::new(gateway_channels[0].clone())
        .list_campaigns(
            stage
                .caller
                .request(ListCampaignsRequest::default(), Some(CALL_TIMEOUT)),
        )
        .await;
    let (list_missing, campaigns) = match probe {
        Ok(response) => (None, response.into_inner()),
        Err(status) => match unimplemented(&status, "SurveyService.ListCampaigns") {
            Some(reason) => (Some(reason), Default::default()),
            None => anyhow::bail!("ListCampaigns failed before the load: {status}"),
        },
    };

    let bare_dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let campaigns_file = bare_dir.path().join("campaigns.pb");
    std::fs::write(&campaigns_file, campaigns.encode_to_vec())
        .context("cannot write the bare server's response")?;
    let bare_addr = free_loopback_addr()?;
    let bare_addr_text = bare_addr.to_string();
    let campaigns_arg = campaigns_file.to_string_lossy().into_owned();
    let bare = ChildServer::start(
        "bare tonic server",
        &binaries.bench,
        &[
            "--serve-bare",
            &bare_addr_text,
            "--bare-campaigns",
            &campaigns_arg,
        ],
        &[],
        bare_addr,
        &bare_dir.path().join("bare.log"),
    )
    .await?;
    let result = measure_all(
        report,
        stage,
        &gateway_channels,
        &bare,
        list_missing,
        (rounds, warmup, measure),
    )
    .await;
    report.note(format!(
        "ListCampaigns response: {} bytes, {} campaigns, the same from both servers",
        campaigns.encoded_len(),
        campaigns.campaigns.len()
    ));
    report.note(format!(
        "resident memory after the run: gateway {:.1} MiB, bare server {:.1} MiB",
        mib(stage.gateway.rss_bytes().unwrap_or(0)),
        mib(bare.rss_bytes().unwrap_or(0)),
    ));
    bare.stop().await;
    result
}

async fn measure_all(
    report: &mut ScenarioReport,
    stage: &Stage,
    gateway_channels: &[Channel],
    bare: &ChildServer,
    list_missing: Option<String>,
    (rounds, warmup, measure): (usize, Duration, Duration),
) -> anyhow::Result<()> {
    let bare_channels = connect_many(bare.addr(), CONNECTIONS).await?;
    let mut targets = vec![Target::BareHealth, Target::GatewayHealth];
    if list_missing.is_none() {
        targets.splice(0..0, [Target::BareList, Target::GatewayList]);
    }
    let mut bare_list_totals = Totals::new();
    let mut list_totals = Totals::new();
    let mut bare_health_totals = Totals::new();
    let mut health_totals = Totals::new();
    let spec = ClosedLoop {
        callers: IN_FLIGHT,
        warmup,
        measure,
    };
    for _ in 0..rounds {
        for target in &targets {
            let (totals, pid, channels) = match target {
                Target::BareList => (&mut bare_list_totals, bare.pid(), &bare_channels[..]),
                Target::GatewayList => (&mut list_totals, stage.gateway.pid(), gateway_channels),
                Target::BareHealth => (&mut bare_health_totals, bare.pid(), &bare_channels[..]),
                Target::GatewayHealth => {
                    (&mut health_totals, stage.gateway.pid(), gateway_channels)
                }
            };
            let cpu_before = cpu_time(pid)?;
            let result = match target {
                Target::BareHealth | Target::GatewayHealth => {
                    health_load(spec, channels, &mut totals.latencies).await
                }
                Target::BareList | Target::GatewayList => {
                    list_load(spec, channels, &stage.caller, &mut totals.latencies).await
                }
            };
            totals.cpu += cpu_time(pid)?.saturating_sub(cpu_before);
            totals.rounds.push(result);
        }
    }

    report.figure("connections", CONNECTIONS as f64, "");
    report.figure("requests in flight", IN_FLIGHT as f64, "");
    report.figure(
        "measured seconds per target",
        (rounds as f64) * measure.as_secs_f64(),
        "s",
    );
    if list_missing.is_none() {
        let list_result = list_totals.merged();
        let bare_list_result = bare_list_totals.merged();
        compare(report, "ListCampaigns", &list_result, &bare_list_result);
        report.compared(
            "ListCampaigns server CPU per request",
            list_totals.cpu_per_request_us(),
            bare_list_totals.cpu_per_request_us(),
            "us",
        );
        let share = list_result.rps / bare_list_result.rps.max(f64::MIN_POSITIVE);
        report.target(
            "throughput",
            ">= 90% of the bare server",
            format!("{:.1}%", 100.0 * share),
            share >= 0.90,
        );
        let tail = list_result.latency.p99_us / list_result.latency.p90_us.max(f64::MIN_POSITIVE);
        report.target(
            "tail",
            "p99 <= 3 x p90",
            format!("p99 = {tail:.2} x p90"),
            tail <= 3.0,
        );
        errors_note(report, "ListCampaigns", &list_result);
        errors_note(report, "bare ListCampaigns", &bare_list_result);
    }
    let health_result = health_totals.merged();
    let bare_health_result = bare_health_totals.merged();
    compare(
        report,
        "gateway health Check",
        &health_result,
        &bare_health_result,
    );
    report.compared(
        "gateway health Check server CPU per request",
        health_totals.cpu_per_request_us(),
        bare_health_totals.cpu_per_request_us(),
        "us",
    );
    errors_note(report, "gateway health Check", &health_result);
    errors_note(report, "bare health Check", &bare_health_result);
    report.note(
        "baselines: the same RPC and the health Check on a bare tonic server (child process, the benchmark binary)",
    );
    if let Some(reason) = list_missing {
        report.status = crate::report::Status::NotRun(format!(
            "{reason}; the health Check of both servers was measured"
        ));
    }
    Ok(())
}

fn compare(report: &mut ScenarioReport, what: &str, result: &LoadResult, bare: &LoadResult) {
    report.compared(format!("{what} throughput"), result.rps, bare.rps, "rps");
    report.compared(
        format!("{what} p50"),
        result.latency.p50_us,
        bare.latency.p50_us,
        "us",
    );
    report.compared(
        format!("{what} p90"),
        result.latency.p90_us,
        bare.latency.p90_us,
        "us",
    );
    report.compared(
        format!("{what} p99"),
        result.latency.p99_us,
        bare.latency.p99_us,
        "us",
    );
    report.compared(
        format!("{what} p99.9"),
        result.latency.p999_us,
        bare.latency.p999_us,
        "us",
    );
}

fn errors_note(report: &mut ScenarioReport, what: &str, result: &LoadResult) {
    if result.error_count() > 0 {
        report.note(format!("{what} errors: {:?}", result.errors));
    }
}

async fn health_load(
    spec: ClosedLoop,
    channels: &[Channel],
    latencies: &mut Latencies,
) -> LoadResult {
    let clients: Arc<Vec<HealthClient<Channel>>> =
        Arc::new(channels.iter().cloned().map(HealthClient::new).collect());
    closed_loop(spec, latencies, move |caller| {
        let mut client = clients[caller % clients.len()].clone();
        async move {
            client
                .check(request(
                    HealthCheckRequest {
                        service: String::new(),
                    },
                    CALL_TIMEOUT,
                ))
                .await
                .map(drop)
                .map_err(|status| grpc_class(&status))
        }
    })
    .await
}

async fn list_load(
    spec: ClosedLoop,
    channels: &[Channel],
    caller: &Caller,
    latencies: &mut Latencies,
) -> LoadResult {
    let caller = caller.clone();
    let clients: Arc<Vec<SurveyServiceClient<Channel>>> = Arc::new(
        channels
            .iter()
            .cloned()
            .map(SurveyServiceClient::new)
            .collect(),
    );
    closed_loop(spec, latencies, move |index| {
        let mut client = clients[index % clients.len()].clone();
        let request = caller.request(ListCampaignsRequest::default(), Some(CALL_TIMEOUT));
        async move {
            client
                .list_campaigns(request)
                .await
                .map(drop)
                .map_err(|status| grpc_class(&status))
        }
    })
    .await
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
