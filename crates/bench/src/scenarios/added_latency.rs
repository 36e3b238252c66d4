//! Scenario 2: what the gateway adds to an uncached read. Open-loop at a fixed rate, GetFeedback
//! through the gateway against the same `GET /api/v2/feedback/{id}` sent straight to the emulator
//! over HTTP (reqwest), in interleaved rounds of the same run. The emulator's rate limit and the
//! gateway's budget are lifted so neither queues; what remains is the gateway's own cost: gRPC,
//! validation, scheduling, the upstream client, JSON to protobuf.

use std::sync::Arc;
use std::time::Duration;

use cx_sandbox::{Api, DEFAULT_RETENTLY_API_KEY, SandboxConfig};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{request, unimplemented};
use crate::hist::Latencies;
use crate::load::{LoadResult, OpenLoop, grpc_class, open_loop};
use crate::process::{Binaries, connect_many, cpu_time};
use crate::report::{ScenarioReport, Status};
use crate::stage::Stage;
use cx_gateway::pb::GetFeedbackRequest;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections from the caller to the gateway: one internal service with a small pool.
const GATEWAY_CONNECTIONS: usize = 4;
/// Requests outstanding before the generator stops sending (bounds memory if a target stalls).
const MAX_OUTSTANDING: usize = 20_000;

struct Side {
    rounds: Vec<LoadResult>,
    latencies: Latencies,
    lag: Latencies,
}

impl Side {
    fn new() -> Side {
        Side {
            rounds: Vec::new(),
            latencies: Latencies::new(),
            lag: Latencies::new(),
        }
    }

    fn merged(&self) -> LoadResult {
        LoadResult::merge(&self.rounds, &self.latencies, Some(&self.lag))
    }
}

pub async fn run(
    report: &mut ScenarioReport,
    binaries: &Binaries,
    quick: bool,
) -> anyhow::Result<()> {
    let (rate, rounds, warmup, measure) = if quick {
        (500.0, 1, Duration::from_millis(500), Duration::from_secs(3))
    } else {
        (2_000.0, 2, Duration::from_secs(1), Duration::from_secs(8))
    };
    let sandbox = SandboxConfig {
        retently_requests_per_minute: 0,
        ..SandboxConfig::default()
    };
    // The largest budget the gateway accepts; the gateway sends at most
    // rounds * (warmup + measure) * rate requests, well under it in any minute.
    let stage = Stage::start(
        binaries,
        sandbox,
        &[("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "100000".to_owned())],
    )
    .await?;
    let result = compare(report, &stage, rate, rounds, warmup, measure).await;
    stage.stop().await;
    result
}

async fn compare(
    report: &mut ScenarioReport,
    stage: &Stage,
    rate: f64,
    rounds: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<()> {
    let ids: Arc<Vec<String>> = Arc::new(
        stage
            .handle()
            .feedback()
            .iter()
            .filter_map(|item| item.get("id")?.as_str().map(str::to_owned))
            .take(500)
            .collect(),
    );
    anyhow::ensure!(!ids.is_empty(), "the sandbox has no feedback to read");
    let channels = connect_many(stage.grpc_addr(), GATEWAY_CONNECTIONS).await?;
    let clients: Arc<Vec<SurveyServiceClient<Channel>>> = Arc::new(
        channels
            .iter()
            .cloned()
            .map(SurveyServiceClient::new)
            .collect(),
    );

    let probe = clients[0]
        .clone()
        .get_feedback(stage.caller.request(
            GetFeedbackRequest {
                feedback_id: ids[0].clone(),
            },
            Some(CALL_TIMEOUT),
        ))
        .await;
    let gateway_missing = match &probe {
        Ok(_) => None,
        Err(status) => match unimplemented(status, "SurveyService.GetFeedback") {
            Some(reason) => Some(reason),
            None => anyhow::bail!("GetFeedback failed before the load: {status}"),
        },
    };

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(CALL_TIMEOUT)
        .build()?;
    let base = stage.sandbox.base_url().clone();
    let spec = OpenLoop {
        rate_per_s: rate,
        warmup,
        measure,
        max_outstanding: MAX_OUTSTANDING,
    };
    let mut direct = Side::new();
    let mut gateway = Side::new();
    let mut gateway_cpu = Duration::ZERO;
    // The gRPC hop alone: the gateway's health Check at the same rate, which splits the added
    // latency into what any gRPC call costs here and what the upstream path adds on top.
    let mut hop = Side::new();
    let mut hop_cpu = Duration::ZERO;
    let health: Arc<Vec<HealthClient<Channel>>> =
        Arc::new(channels.iter().cloned().map(HealthClient::new).collect());
    for _ in 0..rounds {
        let result = {
            let (http, base, ids) = (http.clone(), base.clone(), Arc::clone(&ids));
            open_loop(spec, &mut direct.latencies, &mut direct.lag, move |index| {
                let http = http.clone();
                let url = base.join(&format!("api/v2/feedback/{}", ids[index % ids.len()]));
                async move {
                    let url = url.map_err(|_| "bad url".to_owned())?;
                    let response = http
                        .get(url)
                        .header(
                            "authorization",
                            format!("api_key={DEFAULT_RETENTLY_API_KEY}"),
                        )
                        .send()
                        .await
                        .map_err(|error| transport_class(&error))?;
                    let status = response.status();
                    // The body is read in full, as the gateway must read it.
                    response
                        .bytes()
                        .await
                        .map_err(|error| transport_class(&error))?;
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(format!("http {}", status.as_u16()))
                    }
                }
            })
            .await
        };
        direct.rounds.push(result);
        let cpu_before = cpu_time(stage.gateway.pid())?;
        let result = {
            let health = Arc::clone(&health);
            open_loop(spec, &mut hop.latencies, &mut hop.lag, move |index| {
                let mut client = health[index % health.len()].clone();
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
        };
        hop_cpu += cpu_time(stage.gateway.pid())?.saturating_sub(cpu_before);
        hop.rounds.push(result);
        if gateway_missing.is_some() {
            continue;
        }
        let cpu_before = cpu_time(stage.gateway.pid())?;
        let result = {
            let (clients, ids) = (Arc::clone(&clients), Arc::clone(&ids));
            let caller = stage.caller.clone();
            open_loop(
                spec,
                &mut gateway.latencies,
                &mut gateway.lag,
                move |index| {
                    let mut client = clients[index % clients.len()].clone();
                    let feedback_id = ids[index % ids.len()].clone();
                    let request =
                        caller.request(GetFeedbackRequest { feedback_id }, Some(CALL_TIMEOUT));
                    async move {
                        client
                            .get_feedback(request)
                            .await
                            .map(drop)
                            .map_err(|status| grpc_class(&status))
                    }
                },
            )
            .await
        };
        gateway_cpu += cpu_time(stage.gateway.pid())?.saturating_sub(cpu_before);
        gateway.rounds.push(result);
    }

    let direct = direct.merged();
    let hop = hop.merged();
    report.figure("rate", rate, "rps");
    report.figure(
        "measured seconds per side",
        rounds as f64 * measure.as_secs_f64(),
        "s",
    );
    if gateway_missing.is_none() {
        let gateway = gateway.merged();
        for (name, value, baseline) in [
            ("p50", gateway.latency.p50_us, direct.latency.p50_us),
            ("p90", gateway.latency.p90_us, direct.latency.p90_us),
            ("p99", gateway.latency.p99_us, direct.latency.p99_us),
            ("p99.9", gateway.latency.p999_us, direct.latency.p999_us),
        ] {
            report.compared(
                format!("end-to-end {name} (vs direct HTTP)"),
                value,
                baseline,
                "us",
            );
        }
        let added_p50 = gateway.latency.p50_us - direct.latency.p50_us;
        let added_p99 = gateway.latency.p99_us - direct.latency.p99_us;
        report.figure("added p50", added_p50, "us");
        report.figure("added p99", added_p99, "us");
        report.figure(
            "of which the gRPC hop (health Check) p50",
            hop.latency.p50_us,
            "us",
        );
        report.figure(
            "of which the gRPC hop (health Check) p99",
            hop.latency.p99_us,
            "us",
        );
        report.figure(
            "gateway CPU per health Check at this rate",
            hop_cpu.as_secs_f64() * 1e6 / hop.completed_total.max(1) as f64,
            "us",
        );
        report.target(
            "added p50",
            "<= 200 us",
            format!("{added_p50:.0} us"),
            added_p50 <= 200.0,
        );
        report.target(
            "added p99",
            "<= 1000 us",
            format!("{added_p99:.0} us"),
            added_p99 <= 1_000.0,
        );
        report.figure("gateway requests answered", gateway.ok as f64, "");
        report.figure(
            "gateway CPU per request",
            gateway_cpu.as_secs_f64() * 1e6 / gateway.completed_total.max(1) as f64,
            "us",
        );
        if gateway.error_count() + gateway.not_sent > 0 {
            report.note(format!(
                "gateway errors: {:?}, not sent (too many outstanding): {}",
                gateway.errors, gateway.not_sent
            ));
        }
        if let Some(lag) = gateway.send_lag {
            report.note(format!(
                "generator send lag on the gateway side: p50 {:.0} us, p99 {:.0} us",
                lag.p50_us, lag.p99_us
            ));
        }
    } else {
        for (name, value) in [
            ("direct HTTP p50", direct.latency.p50_us),
            ("direct HTTP p90", direct.latency.p90_us),
            ("direct HTTP p99", direct.latency.p99_us),
            ("direct HTTP p99.9", direct.latency.p999_us),
        ] {
            report.figure(name, value, "us");
        }
    }
    report.figure("direct requests answered", direct.ok as f64, "");
    if direct.error_count() + direct.not_sent > 0 {
        report.note(format!(
            "direct errors: {:?}, not sent (too many outstanding): {}",
            direct.errors, direct.not_sent
        ));
    }
    if let Some(lag) = direct.send_lag {
        report.note(format!(
            "generator send lag on the direct side: p50 {:.0} us, p99 {:.0} us",
            lag.p50_us, lag.p99_us
        ));
    }
    report.note(format!(
        "latency from the intended send time; upstream 429s: {}",
        stage.handle().rate_limited(Api::Retently)
    ));
    if let Some(reason) = gateway_missing {
        report.status = Status::NotRun(format!("{reason}; the direct HTTP baseline was measured"));
    }
    Ok(())
}

fn transport_class(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".to_owned()
    } else if error.is_connect() {
        "connect".to_owned()
    } else {
        "transport".to_owned()
    }
}
