//! Scenario 7: scale-out. The same work on three set-ups in one run: one gateway on the embedded
//! store (the baseline), one replica on PostgreSQL, three replicas on one PostgreSQL database
//! and one emulator. For each: acknowledged asynchronous writes per second and their p99 (a
//! closed loop of TrackEvent calls spread over the replicas; each is acknowledged once its
//! outbox row is committed), then a crowd of concurrent single-recipient SendSurvey calls under
//! the real 150/min, with the upstream `/survey` calls and 429s it cost (the replicas share one
//! budget, and each batches its own callers).
//!
//! PostgreSQL is not started here: the scenario uses the cluster named by
//! `CXGW_BENCH_POSTGRES_URL` (or `CXGW_TEST_POSTGRES_URL`, which `scripts/postgres.sh` sets, so
//! `scripts/postgres.sh cx-gateway-bench --scenario scale-out` runs it on a throw-away cluster),
//! creates a fresh database per set-up, and is reported as not run without one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cx_sandbox::{Api, SandboxConfig};
use tonic::transport::Channel;

use super::unimplemented;
use crate::hist::Latencies;
use crate::load::{ClosedLoop, closed_loop, grpc_class};
use crate::process::{Binaries, connect_many};
use crate::report::{ScenarioReport, Status};
use crate::stage::Stage;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;
use cx_gateway::pb::{
    DeliveryMode, Event, Recipient, RecipientOutcome, SendSurveyRequest, TrackEventRequest,
    WriteOptions,
};

/// Where the PostgreSQL cluster is: the benchmark's own variable first, then the test cluster's.
const URL_VARIABLES: [&str; 2] = ["CXGW_BENCH_POSTGRES_URL", "CXGW_TEST_POSTGRES_URL"];
/// Connections per gateway process.
const CONNECTIONS_PER_REPLICA: usize = 8;

/// One set-up of the comparison.
struct Setup {
    name: &'static str,
    postgres: bool,
    replicas: usize,
}

const SETUPS: [Setup; 3] = [
    Setup {
        name: "embedded",
        postgres: false,
        replicas: 1,
    },
    Setup {
        name: "postgres x1",
        postgres: true,
        replicas: 1,
    },
    Setup {
        name: "postgres x3",
        postgres: true,
        replicas: 3,
    },
];

fn postgres_url() -> Option<String> {
    URL_VARIABLES
        .iter()
        .find_map(|key| std::env::var(key).ok().filter(|url| !url.trim().is_empty()))
}

pub async fn run(
    report: &mut ScenarioReport,
    binaries: &Binaries,
    quick: bool,
) -> anyhow::Result<()> {
    let Some(cluster) = postgres_url() else {
        report.status = Status::NotRun(
            "no PostgreSQL: set CXGW_BENCH_POSTGRES_URL, or run the benchmark through \
             scripts/postgres.sh (it starts a throw-away cluster)"
                .to_owned(),
        );
        return Ok(());
    };
    let secrets = tempfile::Builder::new()
        .prefix("cx-gateway-bench-pg-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let mut writes_per_second = Vec::new();
    for (index, setup) in SETUPS.iter().enumerate() {
        let mut settings: Vec<(&str, String)> = vec![
            // Deliveries go on during the measurement, as in production; the Retainly budget is
            // lifted so they never back up into the figures as a queue.
            ("CXGW_RETAINLY_REQUESTS_PER_MINUTE", "1000000".to_owned()),
            // The feedback poller's reads would spend the Retently budget the crowd measures.
            ("CXGW_FEEDBACK_SYNC", "false".to_owned()),
        ];
        if setup.postgres {
            let url = fresh_database(&cluster)
                .await
                .with_context(|| format!("{}: cannot create a database", setup.name))?;
            let file = secrets.path().join(format!("url-{index}"));
            std::fs::write(&file, url).context("cannot write the database url file")?;
            settings.push(("CXGW_STORE", "postgres".to_owned()));
            settings.push(("CXGW_POSTGRES_URL_FILE", file.display().to_string()));
        }
        let stage = Stage::start_replicas(
            binaries,
            SandboxConfig::default(),
            &settings,
            setup.replicas,
        )
        .await
        .with_context(|| format!("{}: cannot start the gateways", setup.name))?;
        let result = measure(report, &stage, setup, quick).await;
        stage.stop().await;
        match result? {
            Some(rate) => writes_per_second.push(rate),
            None => return Ok(()),
        }
    }
    if let [embedded, one, three] = writes_per_second[..] {
        report.compared(
            "acknowledged writes/s, postgres x3 (vs postgres x1)",
            three,
            one,
            "/s",
        );
        report.compared(
            "acknowledged writes/s, postgres x1 (vs embedded)",
            one,
            embedded,
            "/s",
        );
    }
    report.note(
        "every replica on PostgreSQL commits each acknowledged write to the one database \
         (synchronous_commit on); the three replicas and the database share the machine's cores",
    );
    Ok(())
}

/// A new, empty database on the cluster, as a URL (it carries the cluster's password).
async fn fresh_database(cluster: &str) -> anyhow::Result<String> {
    let (client, connection) = tokio_postgres::connect(cluster, tokio_postgres::NoTls)
        .await
        .context("cannot connect to the cluster")?;
    let connection = tokio::spawn(connection);
    let name = format!("cxgw_bench_{:016x}", rand::random::<u64>());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .context("CREATE DATABASE failed")?;
    drop(client);
    let _ = connection.await;
    let mut url = reqwest::Url::parse(cluster).context("the cluster url is not a URL")?;
    url.set_path(&name);
    Ok(url.to_string())
}

/// Measures one set-up; `None` when its RPCs are not served (the report says so).
async fn measure(
    report: &mut ScenarioReport,
    stage: &Stage,
    setup: &Setup,
    quick: bool,
) -> anyhow::Result<Option<f64>> {
    let mut channels: Vec<Channel> = Vec::new();
    for addr in stage.grpc_addrs() {
        channels.extend(connect_many(addr, CONNECTIONS_PER_REPLICA).await?);
    }
    let channels = Arc::new(channels);
    let name = setup.name;

    // Acknowledged asynchronous writes: each caller's calls go to one connection, the callers
    // spread evenly over the replicas' connections.
    let events: Arc<Vec<EventServiceClient<Channel>>> = Arc::new(
        channels
            .iter()
            .cloned()
            .map(EventServiceClient::new)
            .collect(),
    );
    let probe = events[0]
        .clone()
        .track_event(
            stage
                .caller
                .request(TrackEventRequest::default(), Some(Duration::from_secs(10))),
        )
        .await;
    if let Err(status) = &probe
        && let Some(reason) = unimplemented(status, "EventService.TrackEvent")
    {
        report.status = Status::NotRun(reason);
        return Ok(None);
    }
    let spec = ClosedLoop {
        callers: if quick { 16 } else { 64 },
        warmup: Duration::from_millis(if quick { 500 } else { 2_000 }),
        measure: Duration::from_secs(if quick { 2 } else { 10 }),
    };
    let sequence = Arc::new(AtomicU64::new(0));
    let caller = stage.caller.clone();
    let mut latencies = Latencies::new();
    let writes = closed_loop(spec, &mut latencies, {
        let events = Arc::clone(&events);
        move |index| {
            let mut client = events[index % events.len()].clone();
            let n = sequence.fetch_add(1, Ordering::Relaxed);
            let request = caller.request(
                TrackEventRequest {
                    event: Some(Event {
                        customer_id: format!("bench-{n}"),
                        name: "bench_scale_out".to_owned(),
                        message_id: format!("bench-scale-out-{n}"),
                        ..Event::default()
                    }),
                    options: Some(WriteOptions {
                        mode: DeliveryMode::Async as i32,
                        idempotency_key: String::new(),
                    }),
                },
                Some(Duration::from_secs(10)),
            );
            async move {
                client
                    .track_event(request)
                    .await
                    .map(|_| ())
                    .map_err(|status| grpc_class(&status))
            }
        }
    })
    .await;
    report.figure(
        format!("{name}: acknowledged async writes"),
        writes.rps,
        "/s",
    );
    report.figure(
        format!("{name}: write latency p99"),
        latencies.summary().p99_us / 1_000.0,
        "ms",
    );
    if writes.error_count() > 0 || writes.ok == 0 {
        report.note(format!(
            "{name}: {} writes answered in all, failures in the window: {:?}",
            writes.completed_total, writes.errors
        ));
    }

    // The survey crowd: every caller sends one single-recipient survey, all at once.
    let campaign_id = stage
        .handle()
        .transactional_campaign("NPS")
        .context("the sandbox seed has no transactional NPS campaign")?;
    stage.handle().reset_counters();
    let crowd = if quick { 100 } else { 1_000 };
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(crowd);
    for n in 0..crowd {
        let mut client = SurveyServiceClient::new(channels[n % channels.len()].clone());
        let request = stage.caller.request(
            SendSurveyRequest {
                campaign_id: campaign_id.clone(),
                recipients: vec![Recipient {
                    email: format!("bench-crowd-{n}@example.com"),
                    ..Recipient::default()
                }],
                ..SendSurveyRequest::default()
            },
            Some(Duration::from_secs(120)),
        );
        tasks.push(tokio::spawn(
            async move { client.send_survey(request).await },
        ));
    }
    let mut scheduled = 0u64;
    let mut failed = 0u64;
    for task in tasks {
        match task.await.context("a caller task panicked")? {
            Ok(response) => {
                scheduled += response
                    .get_ref()
                    .results
                    .iter()
                    .filter(|r| r.outcome == RecipientOutcome::Scheduled as i32)
                    .count() as u64;
            }
            Err(_) => failed += 1,
        }
    }
    let completion = started.elapsed();
    let handle = stage.handle();
    report.figure(
        format!("{name}: /survey calls for {crowd} single-recipient calls"),
        handle.requests_to(Api::Retently, "/api/v2/survey") as f64,
        "",
    );
    report.figure(
        format!("{name}: upstream 429s"),
        handle.status_count(Api::Retently, 429) as f64,
        "",
    );
    report.figure(
        format!("{name}: survey crowd completion"),
        completion.as_secs_f64(),
        "s",
    );
    if scheduled != crowd as u64 || failed > 0 {
        report.note(format!(
            "{name}: {scheduled} of {crowd} recipients scheduled, {failed} calls failed"
        ));
    }
    Ok(Some(writes.rps))
}
