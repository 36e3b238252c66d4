//! Scenario 5: the feedback sync reads what already exists. The emulator starts with a large seed
//! of survey responses (spread over 90 days) under the real 150/min limit; the gateway starts
//! with a backfill window that covers them all. Measured: the upstream requests and the time
//! until every response is in the gateway's log (seen by a subscriber from the earliest
//! position), then what an idle poll costs once the log is up to date.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::bail;
use cx_sandbox::{Api, SandboxConfig, SeedConfig};

use super::unimplemented;
use crate::process::{Binaries, connect};
use crate::report::{ScenarioReport, Status};
use crate::stage::Stage;
use cx_gateway::pb::feedback_stream_client::FeedbackStreamClient;
use cx_gateway::pb::subscribe_request::Start;
use cx_gateway::pb::subscribe_response::Payload;
use cx_gateway::pb::{FeedbackEventKind, StreamPosition, SubscribeRequest};

const FEEDBACK_ROUTE: &str = "/api/v2/feedback";
/// Responses per upstream page (Retently's maximum `limit`).
const PAGE: usize = 1_000;
/// Reconnects allowed while reading the log (the contract says resuming is always correct).
const MAX_RESUMES: usize = 5;

pub async fn run(
    report: &mut ScenarioReport,
    binaries: &Binaries,
    quick: bool,
) -> anyhow::Result<()> {
    let (seeded, poll, idle_polls, timeout) = if quick {
        (
            5_000,
            Duration::from_secs(1),
            3u32,
            Duration::from_secs(120),
        )
    } else {
        (
            80_000,
            Duration::from_secs(2),
            5u32,
            Duration::from_secs(420),
        )
    };
    let sandbox = SandboxConfig {
        seed: SeedConfig {
            feedback: seeded,
            ..SeedConfig::default()
        },
        ..SandboxConfig::default()
    };
    let settings = [
        // The seed spans 90 days; the default backfill (24 h) would skip most of it.
        ("CXGW_FEEDBACK_BACKFILL", "2400h".to_owned()),
        (
            "CXGW_FEEDBACK_POLL_INTERVAL",
            humantime::format_duration(poll).to_string(),
        ),
    ];
    let stage = Stage::start(binaries, sandbox, &settings).await?;
    let result = measure(report, &stage, seeded, poll, idle_polls, timeout).await;
    stage.stop().await;
    result
}

async fn measure(
    report: &mut ScenarioReport,
    stage: &Stage,
    seeded: usize,
    poll: Duration,
    idle_polls: u32,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut client = FeedbackStreamClient::new(connect(stage.grpc_addr()).await?);
    let mut seen: HashSet<String> = HashSet::with_capacity(seeded);
    let mut cursor: Option<String> = None;
    let mut resumes = 0usize;
    let deadline = Instant::now() + timeout;
    'read: while seen.len() < seeded {
        let start = match cursor.clone() {
            Some(cursor) => Start::Cursor(cursor),
            None => Start::Position(StreamPosition::Earliest as i32),
        };
        let subscribed = client
            .subscribe(stage.caller.request(
                SubscribeRequest {
                    filter: None,
                    start: Some(start),
                },
                None,
            ))
            .await;
        let mut stream = match subscribed {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if let Some(reason) = unimplemented(&status, "FeedbackStream.Subscribe") {
                    report.status = Status::NotRun(reason);
                    return Ok(());
                }
                bail!("Subscribe failed: {status}");
            }
        };
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let message = match tokio::time::timeout(remaining, stream.message()).await {
                Ok(message) => message,
                Err(_) => break 'read,
            };
            match message {
                Ok(Some(response)) => match response.payload {
                    Some(Payload::FeedbackEvent(event)) => {
                        if event.kind == FeedbackEventKind::Created as i32
                            && let Some(feedback) = event.feedback
                        {
                            seen.insert(feedback.feedback_id);
                        }
                        cursor = Some(event.cursor);
                        if seen.len() >= seeded {
                            break 'read;
                        }
                    }
                    Some(Payload::Heartbeat(heartbeat)) => cursor = Some(heartbeat.cursor),
                    None => {}
                },
                Ok(None) | Err(_) if resumes < MAX_RESUMES => {
                    resumes += 1;
                    continue 'read;
                }
                Ok(None) => bail!("the stream ended before every response was in the log"),
                Err(status) => bail!("the stream failed: {status}"),
            }
        }
    }
    let synced_after = stage.gateway_spawned.elapsed();
    let handle = stage.handle();
    let sync_requests = handle.requests_to(Api::Retently, FEEDBACK_ROUTE);
    let upstream_429 = handle.status_count(Api::Retently, 429);
    let pages = seeded.div_ceil(PAGE);

    report.figure("responses seeded upstream", seeded as f64, "");
    report.figure("responses in the log", seen.len() as f64, "");
    report.compared(
        "upstream feedback requests (vs pages)",
        sync_requests as f64,
        pages as f64,
        "",
    );
    report.figure(
        "time until all are in the log",
        synced_after.as_secs_f64(),
        "s",
    );
    report.figure(
        "responses per second",
        seen.len() as f64 / synced_after.as_secs_f64().max(f64::MIN_POSITIVE),
        "items/s",
    );
    report.figure("upstream 429s", upstream_429 as f64, "");
    report.target(
        "complete",
        "every seeded response in the log",
        format!("{} of {seeded}", seen.len()),
        seen.len() >= seeded,
    );
    if seen.len() < seeded {
        report.note(format!(
            "timed out after {:.0} s waiting for the log",
            timeout.as_secs_f64()
        ));
        return Ok(());
    }

    // Idle: nothing new upstream, so each poll should be one request that finds nothing.
    let before = handle.requests_to(Api::Retently, FEEDBACK_ROUTE);
    let window = poll * idle_polls;
    tokio::time::sleep(window).await;
    let idle_requests = handle
        .requests_to(Api::Retently, FEEDBACK_ROUTE)
        .saturating_sub(before);
    let per_poll =
        f64::from(u32::try_from(idle_requests).unwrap_or(u32::MAX)) / f64::from(idle_polls);
    report.figure(
        format!("idle requests in {idle_polls} poll intervals"),
        idle_requests as f64,
        "",
    );
    report.figure("requests per idle poll", per_poll, "");
    // A window of k intervals holds k or k + 1 polls depending on where it starts, so one
    // request per poll shows as at most k + 1 requests; two per poll would be 2k.
    report.target(
        "idle poll",
        "one request per poll",
        format!("{idle_requests} requests in {idle_polls} intervals"),
        idle_requests > 0 && idle_requests <= u64::from(idle_polls) + 1,
    );
    report.note(format!(
        "poll interval {} (CXGW_FEEDBACK_POLL_INTERVAL), backfill 100 days, real 150/min limit; \
         time counted from the gateway's start",
        humantime::format_duration(poll)
    ));
    if resumes > 0 {
        report.note(format!(
            "the subscriber resumed from its cursor {resumes} times"
        ));
    }
    Ok(())
}
