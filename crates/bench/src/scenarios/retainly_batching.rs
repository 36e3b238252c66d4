//! Scenario 4: Retainly customer upserts batch. Many concurrent callers upsert customers to
//! Retainly only, first one customer per UpsertCustomers call (the worst case for batching: every
//! item is its own RPC), then ten per call. Retainly takes up to 10,000 customers per
//! `POST /customers`, so the gateway should make far fewer upstream calls than it receives
//! upserts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cx_sandbox::{Api, SandboxConfig};
use tonic::transport::Channel;

use super::{percent, unimplemented};
use crate::hist::Latencies;
use crate::process::{Binaries, connect_many};
use crate::report::{ScenarioReport, Status};
use crate::stage::Stage;
use cx_gateway::pb::customer_service_client::CustomerServiceClient;
use cx_gateway::pb::{Customer, Destination, UpsertCustomersRequest, WriteOutcome};

const CONNECTIONS: usize = 50;
const CALLERS: usize = 200;
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(
    report: &mut ScenarioReport,
    binaries: &Binaries,
    quick: bool,
) -> anyhow::Result<()> {
    let upserts = if quick { 10_000 } else { 100_000 };
    // One customer per call is the hardest case for batching; ten per call is a caller that
    // already groups a little. Each runs on a fresh emulator and gateway.
    for per_call in [1, 10] {
        let stage = Stage::start(binaries, SandboxConfig::default(), &[]).await?;
        let result = measure(report, &stage, upserts, per_call).await;
        stage.stop().await;
        result?;
        if report.status != Status::Ran {
            break;
        }
    }
    report.note(
        "the batcher keeps at most one partial batch per key in flight and fills the next one \
         meanwhile; a batch opened right after another was answered also waits (2 ms quiet \
         gap, 5 ms at most) for that batch's callers to come back, so closed-loop callers of \
         one item each are not split into two alternating halves",
    );
    Ok(())
}

#[derive(Default)]
struct CallerTally {
    samples: Vec<u64>,
    outcomes: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

async fn measure(
    report: &mut ScenarioReport,
    stage: &Stage,
    upserts: usize,
    per_call: usize,
) -> anyhow::Result<()> {
    let channels = connect_many(stage.grpc_addr(), CONNECTIONS).await?;
    let clients: Arc<Vec<CustomerServiceClient<Channel>>> = Arc::new(
        channels
            .into_iter()
            .map(CustomerServiceClient::new)
            .collect(),
    );

    // An empty request is invalid, so it tells whether the RPC exists without writing anything.
    let probe = clients[0]
        .clone()
        .upsert_customers(stage.caller.request(
            UpsertCustomersRequest {
                destinations: vec![Destination::Retainly as i32],
                ..UpsertCustomersRequest::default()
            },
            Some(Duration::from_secs(10)),
        ))
        .await;
    if let Err(status) = &probe
        && let Some(reason) = unimplemented(status, "CustomerService.UpsertCustomers")
    {
        report.status = Status::NotRun(reason);
        return Ok(());
    }
    stage.handle().reset_counters();

    let per_caller = upserts.div_ceil(CALLERS * per_call) * per_call;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(CALLERS);
    for caller in 0..CALLERS {
        let mut client = clients[caller % clients.len()].clone();
        let first = caller * per_caller;
        let last = ((caller + 1) * per_caller).min(upserts);
        let identity = stage.caller.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = CallerTally::default();
            for start in (first..last).step_by(per_call) {
                let customers = (start..(start + per_call).min(last))
                    .map(|n| Customer {
                        customer_id: format!("bench-{n}"),
                        email: format!("bench-{n}@example.com"),
                        first_name: "Bench".to_owned(),
                        last_name: format!("Customer {n}"),
                        ..Customer::default()
                    })
                    .collect();
                let sent = Instant::now();
                let answer = client
                    .upsert_customers(identity.request(
                        UpsertCustomersRequest {
                            customers,
                            destinations: vec![Destination::Retainly as i32],
                            options: None,
                        },
                        Some(CALL_TIMEOUT),
                    ))
                    .await;
                match answer {
                    Ok(response) => {
                        tally
                            .samples
                            .push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        for result in &response.get_ref().results {
                            for outcome in &result.outcomes {
                                let name = WriteOutcome::try_from(outcome.outcome).map_or_else(
                                    |_| "unknown value".to_owned(),
                                    |o| o.as_str_name().to_owned(),
                                );
                                *tally.outcomes.entry(name).or_default() += 1;
                            }
                        }
                    }
                    Err(status) => {
                        *tally
                            .errors
                            .entry(format!("{:?}", status.code()))
                            .or_default() += 1;
                    }
                }
            }
            tally
        }));
    }
    let mut latencies = Latencies::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for task in tasks {
        let tally = task.await.context("a caller task panicked")?;
        latencies.extend(tally.samples);
        for (name, count) in tally.outcomes {
            *outcomes.entry(name).or_default() += count;
        }
        for (name, count) in tally.errors {
            *errors.entry(name).or_default() += count;
        }
    }
    let elapsed = started.elapsed();

    let handle = stage.handle();
    let upstream_calls = handle.requests_to(Api::Retainly, "/customers");
    let stored = handle.retainly_customers().len();
    // Retainly does not say created or updated, so APPLIED is what a success looks like; the
    // other two are counted too in case a later upstream version says more.
    let applied: u64 = [
        WriteOutcome::Applied,
        WriteOutcome::Created,
        WriteOutcome::Updated,
    ]
    .iter()
    .filter_map(|outcome| outcomes.get(outcome.as_str_name()))
    .sum();
    let saved = 100.0 - percent(upstream_calls as f64, upserts as f64);
    let summary = latencies.summary();
    let p = format!("{per_call} per call: ");
    if per_call == 1 {
        report.figure("callers", CALLERS as f64, "");
        report.figure("upserts", upserts as f64, "");
    }
    report.figure(
        format!("{p}upstream POST /customers calls"),
        upstream_calls as f64,
        "",
    );
    report.figure(
        format!("{p}customers per upstream call"),
        if upstream_calls == 0 {
            0.0
        } else {
            upserts as f64 / upstream_calls as f64
        },
        "",
    );
    report.figure(format!("{p}fewer upstream calls than upserts"), saved, "%");
    report.figure(
        format!("{p}throughput"),
        applied as f64 / elapsed.as_secs_f64(),
        "items/s",
    );
    report.figure(format!("{p}elapsed"), elapsed.as_secs_f64(), "s");
    report.figure(
        format!("{p}call latency p50"),
        summary.p50_us / 1_000.0,
        "ms",
    );
    report.figure(
        format!("{p}call latency p99"),
        summary.p99_us / 1_000.0,
        "ms",
    );
    report.figure(format!("{p}customers stored upstream"), stored as f64, "");
    report.target(
        format!("{p}batching"),
        ">= 99% fewer upstream calls than upserts",
        format!("{saved:.2}% fewer ({upstream_calls} calls)"),
        saved >= 99.0,
    );
    report.target(
        format!("{p}every upsert applied"),
        "100%",
        format!("{:.2}%", percent(applied as f64, upserts as f64)),
        applied as usize == upserts,
    );
    if !outcomes.is_empty() {
        report.note(format!("{p}outcomes: {outcomes:?}"));
    }
    if !errors.is_empty() {
        report.note(format!("{p}failed calls: {errors:?}"));
    }
    report.note(format!(
        "{p}upstream 429s: {}",
        handle.status_count(Api::Retainly, 429)
    ));
    Ok(())
}
