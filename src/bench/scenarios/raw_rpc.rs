//! Scenario 1: what one RPC costs in the gateway. A cache-served read (ListCampaigns) at
//! saturation from 50 connections with 1,000 requests in flight, against the bare tonic server's
//! health `Check` under the same load. The gateway's own health `Check` is measured too: it has
//! the gateway's whole tower stack but no handler work, which separates stack cost from handler
//! cost. Targets run in interleaved rounds so drift on a shared machine hits both alike.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cx_sandbox::SandboxConfig;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{request, unimplemented};
use crate::bench::hist::Latencies;
use crate::bench::load::{ClosedLoop, LoadResult, closed_loop, grpc_class};
use crate::bench::process::{ChildServer, connect_many, cpu_time, free_loopback_addr};
use crate::bench::report::ScenarioReport;
use crate::bench::stage::{Caller, Stage};
use crate::pb::ListCampaignsRequest;
use crate::pb::survey_service_client::SurveyServiceClient;

const CONNECTIONS: usize = 50;
const IN_FLIGHT: usize = 1_000;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What is measured in each round.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Bare,
    GatewayList,
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

pub async fn run(report: &mut ScenarioReport, quick: bool) -> anyhow::Result<()> {
    let (rounds, warmup, measure) = if quick {
        (1, Duration::from_millis(500), Duration::from_secs(2))
    } else {
        (2, Duration::from_secs(1), Duration::from_secs(5))
    };
    let stage = Stage::start(SandboxConfig::default(), &[]).await?;
    let bare_dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let bare_addr = free_loopback_addr()?;
    let bare_addr_text = bare_addr.to_string();
    let bare = ChildServer::start(
        "bare tonic server",
        &["bench", "--serve-bare", &bare_addr_text],
        &[],
        bare_addr,
        &bare_dir.path().join("bare.log"),
    )
    .await?;

    let result = measure_all(report, &stage, &bare, rounds, warmup, measure).await;
    report.note(format!(
        "resident memory after the run: gateway {:.1} MiB, bare server {:.1} MiB",
        mib(stage.gateway.rss_bytes().unwrap_or(0)),
        mib(bare.rss_bytes().unwrap_or(0)),
    ));
    bare.stop().await;
    stage.stop().await;
    result
}

async fn measure_all(
    report: &mut ScenarioReport,
    stage: &Stage,
    bare: &ChildServer,
    rounds: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<()> {
    let gateway_channels = connect_many(stage.grpc_addr(), CONNECTIONS).await?;
    let bare_channels = connect_many(bare.addr(), CONNECTIONS).await?;

    // One call first: it says whether the RPC exists, and fills the gateway's campaign cache so
    // the measured calls are the cache-served ones this scenario is about.
    let probe = SurveyServiceClient::new(gateway_channels[0].clone())
        .list_campaigns(
            stage
                .caller
                .request(ListCampaignsRequest::default(), Some(CALL_TIMEOUT)),
        )
        .await;
    let list_missing = match &probe {
        Ok(_) => None,
        Err(status) => match unimplemented(status, "SurveyService.ListCampaigns") {
            Some(reason) => Some(reason),
            None => anyhow::bail!("ListCampaigns failed before the load: {status}"),
        },
    };

    let mut targets = vec![Target::Bare, Target::GatewayHealth];
    if list_missing.is_none() {
        targets.insert(1, Target::GatewayList);
    }
    let mut bare_totals = Totals::new();
    let mut list_totals = Totals::new();
    let mut health_totals = Totals::new();
    let spec = ClosedLoop {
        callers: IN_FLIGHT,
        warmup,
        measure,
    };
    for _ in 0..rounds {
        for target in &targets {
            let totals = match target {
                Target::Bare => &mut bare_totals,
                Target::GatewayList => &mut list_totals,
                Target::GatewayHealth => &mut health_totals,
            };
            let pid = match target {
                Target::Bare => bare.pid(),
                Target::GatewayList | Target::GatewayHealth => stage.gateway.pid(),
            };
            let cpu_before = cpu_time(pid)?;
            let result = match target {
                Target::Bare => health_load(spec, &bare_channels, &mut totals.latencies).await,
                Target::GatewayHealth => {
                    health_load(spec, &gateway_channels, &mut totals.latencies).await
                }
                Target::GatewayList => {
                    list_load(
                        spec,
                        &gateway_channels,
                        &stage.caller,
                        &mut totals.latencies,
                    )
                    .await
                }
            };
            totals.cpu += cpu_time(pid)?.saturating_sub(cpu_before);
            totals.rounds.push(result);
        }
    }

    let bare_result = bare_totals.merged();
    let health_result = health_totals.merged();
    report.figure("connections", CONNECTIONS as f64, "");
    report.figure("requests in flight", IN_FLIGHT as f64, "");
    report.figure(
        "measured seconds per target",
        (rounds as f64) * measure.as_secs_f64(),
        "s",
    );
    if list_missing.is_none() {
        let list_result = list_totals.merged();
        compare(report, "ListCampaigns", &list_result, &bare_result);
        report.compared(
            "ListCampaigns server CPU per request",
            list_totals.cpu_per_request_us(),
            bare_totals.cpu_per_request_us(),
            "us",
        );
        let share = list_result.rps / bare_result.rps.max(f64::MIN_POSITIVE);
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
    }
    compare(report, "gateway health Check", &health_result, &bare_result);
    report.compared(
        "gateway health Check server CPU per request",
        health_totals.cpu_per_request_us(),
        bare_totals.cpu_per_request_us(),
        "us",
    );
    errors_note(report, "gateway health Check", &health_result);
    errors_note(report, "bare health Check", &bare_result);
    report.note("baseline: tonic health Check on a bare tonic server (child process, same binary)");
    if let Some(reason) = list_missing {
        report.status = crate::bench::report::Status::NotRun(format!(
            "{reason}; the baseline and the gateway's own health Check were measured"
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
