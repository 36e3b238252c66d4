//! Scenario 3: survey sends coalesce. Many concurrent callers each send one SendSurvey with a few
//! recipients to the same campaign, under the real 150 requests per minute (emulator and gateway
//! alike). Upstream `POST /survey` takes at most 100 recipients, so the ideal is
//! recipients / 100 calls, no 429, and a completion time near the budget's lower bound.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cx_sandbox::{Api, SandboxConfig};
use tonic::transport::Channel;

use super::{percent, unimplemented};
use crate::hist::Latencies;
use crate::process::{Binaries, connect_many};
use crate::report::ScenarioReport;
use crate::stage::Stage;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;
use cx_gateway::pb::{Recipient, RecipientOutcome, SendSurveyRequest};

const CONNECTIONS: usize = 50;
/// Recipients per upstream call, as Retently documents.
const PER_UPSTREAM_CALL: usize = 100;
/// The real Retently budget.
const REQUESTS_PER_MINUTE: usize = 150;
const RECIPIENTS_PER_CALLER: usize = 10;

pub async fn run(
    report: &mut ScenarioReport,
    binaries: &Binaries,
    quick: bool,
) -> anyhow::Result<()> {
    let callers = if quick { 100 } else { 1_000 };
    // Callers wait for the budget, so each may take as long as the whole run.
    let call_timeout = Duration::from_secs(if quick { 120 } else { 300 });
    let stage = Stage::start(binaries, SandboxConfig::default(), &[]).await?;
    let result = measure(report, &stage, callers, call_timeout).await;
    stage.stop().await;
    result
}

async fn measure(
    report: &mut ScenarioReport,
    stage: &Stage,
    callers: usize,
    call_timeout: Duration,
) -> anyhow::Result<()> {
    let campaign_id = stage
        .handle()
        .transactional_campaign("NPS")
        .context("the sandbox seed has no transactional NPS campaign")?;
    let channels = connect_many(stage.grpc_addr(), CONNECTIONS).await?;
    let clients: Arc<Vec<SurveyServiceClient<Channel>>> =
        Arc::new(channels.into_iter().map(SurveyServiceClient::new).collect());

    // An empty request is invalid, so it tells whether the RPC exists without sending anything.
    let probe = clients[0]
        .clone()
        .send_survey(stage.caller.request(
            SendSurveyRequest {
                campaign_id: campaign_id.clone(),
                ..SendSurveyRequest::default()
            },
            Some(Duration::from_secs(10)),
        ))
        .await;
    if let Err(status) = &probe
        && let Some(reason) = unimplemented(status, "SurveyService.SendSurvey")
    {
        report.status = crate::report::Status::NotRun(reason);
        return Ok(());
    }
    stage.handle().reset_counters();

    let recipients_total = callers * RECIPIENTS_PER_CALLER;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for caller in 0..callers {
        let mut client = clients[caller % clients.len()].clone();
        let campaign_id = campaign_id.clone();
        let caller_identity = stage.caller.clone();
        tasks.push(tokio::spawn(async move {
            let recipients = (0..RECIPIENTS_PER_CALLER)
                .map(|n| Recipient {
                    email: format!("bench-{caller}-{n}@example.com"),
                    first_name: "Bench".to_owned(),
                    ..Recipient::default()
                })
                .collect();
            let sent = Instant::now();
            let answer = client
                .send_survey(caller_identity.request(
                    SendSurveyRequest {
                        campaign_id,
                        recipients,
                        ..SendSurveyRequest::default()
                    },
                    Some(call_timeout),
                ))
                .await;
            (sent.elapsed(), answer)
        }));
    }
    let mut latencies = Latencies::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut call_errors: BTreeMap<String, u64> = BTreeMap::new();
    for task in tasks {
        let (elapsed, answer) = task.await.context("a caller task panicked")?;
        latencies.record(elapsed);
        match answer {
            Ok(response) => {
                for result in &response.get_ref().results {
                    let outcome = RecipientOutcome::try_from(result.outcome).map_or_else(
                        |_| "unknown value".to_owned(),
                        |o| o.as_str_name().to_owned(),
                    );
                    *outcomes.entry(outcome).or_default() += 1;
                }
            }
            Err(status) => {
                *call_errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1
            }
        }
    }
    let completion = started.elapsed();

    let handle = stage.handle();
    let upstream_calls = handle.requests_to(Api::Retently, "/api/v2/survey");
    let upstream_429 = handle.status_count(Api::Retently, 429);
    let sends = handle.survey_sends();
    let ideal_calls = recipients_total.div_ceil(PER_UPSTREAM_CALL);
    // The gateway's budget is a sliding-window log: a burst of up to 150 calls is allowed at
    // once, after that each further window of 60 s (plus a small safety margin) allows 150 more.
    let full_windows = ideal_calls.div_ceil(REQUESTS_PER_MINUTE).saturating_sub(1);
    let lower_bound = Duration::from_secs(60 * full_windows as u64);
    let scheduled = outcomes
        .get(RecipientOutcome::Scheduled.as_str_name())
        .copied()
        .unwrap_or(0);

    report.figure("callers", callers as f64, "");
    report.figure("recipients", recipients_total as f64, "");
    report.compared(
        "upstream /survey calls (vs ideal)",
        upstream_calls as f64,
        ideal_calls as f64,
        "",
    );
    report.figure(
        "recipients per upstream call",
        if upstream_calls == 0 {
            0.0
        } else {
            recipients_total as f64 / upstream_calls as f64
        },
        "",
    );
    report.figure("upstream 429s", upstream_429 as f64, "");
    report.figure("recipients scheduled", scheduled as f64, "");
    report.figure(
        "recipients accepted upstream",
        sends
            .iter()
            .map(|send| send.recipients.len())
            .sum::<usize>() as f64,
        "",
    );
    report.compared(
        "completion time (vs budget lower bound)",
        completion.as_secs_f64(),
        lower_bound.as_secs_f64(),
        "s",
    );
    let summary = latencies.summary();
    report.figure("caller latency p50", summary.p50_us / 1_000.0, "ms");
    report.figure("caller latency p99", summary.p99_us / 1_000.0, "ms");
    report.target(
        "coalescing",
        format!("upstream calls <= 110% of the ideal {ideal_calls}"),
        format!("{upstream_calls} calls"),
        (upstream_calls as f64) <= 1.1 * ideal_calls as f64,
    );
    report.target(
        "no 429",
        "0 upstream 429s",
        format!("{upstream_429}"),
        upstream_429 == 0,
    );
    report.target(
        "every recipient scheduled",
        "100%",
        format!("{:.2}%", percent(scheduled as f64, recipients_total as f64)),
        scheduled as usize == recipients_total,
    );
    if lower_bound.is_zero() {
        report.note(format!(
            "budget lower bound is 0 s: the {ideal_calls} ideal calls fit in one burst of the \
             {REQUESTS_PER_MINUTE}/min sliding window, so the completion time is upstream and \
             gateway work alone"
        ));
    }
    report.note(format!(
        "each caller sends one SendSurvey with {RECIPIENTS_PER_CALLER} recipients; all callers start at once"
    ));
    if !outcomes.is_empty() {
        report.note(format!("recipient outcomes: {outcomes:?}"));
    }
    if !call_errors.is_empty() {
        report.note(format!("failed calls: {call_errors:?}"));
    }
    Ok(())
}
