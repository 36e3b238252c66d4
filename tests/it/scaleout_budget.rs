//! One upstream budget for every replica: three gateway processes on one PostgreSQL database
//! and one emulator, which counts Retently requests in a sliding window and answers 429 beyond
//! its limit. The window is shortened on both sides (emulator and gateway) with the production
//! ratio kept (150 a minute is 2.5 a second: here 10 in 4 s) and the gateway's jitter margin of
//! 1 s, so the crowd spans several windows in seconds.
//!
//! Needs the test cluster of `scripts/postgres.sh` (`CXGW_TEST_POSTGRES_URL`); without it the
//! tests pass as skipped, unless `CXGW_TEST_REQUIRE_POSTGRES=1` (scripts/test.sh) requires it.

use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Api, FaultConfig, HoldSpec, Sandbox, SandboxConfig};
use tokio::net::TcpListener;

use crate::replicas::SharedDatabase;

const SURVEY_ROUTE: &str = "/api/v2/survey";
/// The production ratio (150 per minute) in a window short enough for a test.
const LIMIT: u32 = 10;
const WINDOW: Duration = Duration::from_secs(4);
const CROWD: usize = 1_000;

async fn emulator(config: SandboxConfig) -> (Sandbox, EmbeddedSandbox) {
    let sandbox = Sandbox::new(config);
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    (sandbox, emulator)
}

/// The settings of every replica: Retently's limit in the shortened window, and no feedback
/// poller (its reads would spend the budget the crowd is measured on).
fn replica_settings() -> Vec<(&'static str, String)> {
    vec![
        ("CXGW_RETENTLY_REQUESTS_PER_MINUTE", LIMIT.to_string()),
        (
            "CXGW_RETENTLY_RATE_WINDOW",
            format!("{}ms", WINDOW.as_millis()),
        ),
        ("CXGW_FEEDBACK_SYNC", "false".to_owned()),
        // The whole crowd in flight on one connection at once (see `crowd`).
        ("CXGW_MAX_CONCURRENT_STREAMS", CROWD.to_string()),
    ]
}

fn survey(campaign_id: &str, email: String) -> pb::SendSurveyRequest {
    pb::SendSurveyRequest {
        campaign_id: campaign_id.to_owned(),
        recipients: vec![pb::Recipient {
            email,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A plain client session on the database, for inspecting the shared row and the statistics.
async fn inspect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    client
}

/// How often the replicas ran the grant statement: counted by PostgreSQL itself
/// (`track_functions`), read once every replica's session has ended and flushed its counts.
async fn acquire_calls(url: &str) -> i64 {
    let client = inspect(url).await;
    let sessions = || async {
        client
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sessions().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica sessions ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client
        .query_opt(
            "SELECT calls FROM pg_stat_user_functions WHERE funcname = 'cxgw_budget_acquire'",
            &[],
        )
        .await
        .unwrap()
        .map_or(0, |row| row.get(0))
}

/// What one run of the crowd cost upstream.
#[derive(Debug)]
struct CrowdRun {
    survey_calls: u64,
    rate_limited: u64,
    status_429: u64,
    acquire_calls: i64,
    elapsed: Duration,
}

/// Sends [`CROWD`] concurrent single-recipient surveys spread over `replicas` fresh replicas
/// on a fresh database and emulator, and counts what reached the emulator.
async fn crowd(replicas: usize, tag: &str) -> Option<CrowdRun> {
    let mut database = SharedDatabase::create().await?;
    // PostgreSQL counts the grant statement's calls for this database's sessions.
    let database_name = reqwest::Url::parse(&database.url).unwrap().path()[1..].to_owned();
    inspect(&database.url)
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {database_name} SET track_functions = 'pl'"
        ))
        .await
        .unwrap();
    let (sandbox, emulator) = emulator(SandboxConfig {
        retently_requests_per_minute: LIMIT,
        rate_limit_window: WINDOW,
        ..SandboxConfig::default()
    })
    .await;
    let campaign = sandbox
        .handle()
        .transactional_campaign("NPS")
        .expect("the default seed has a transactional NPS campaign");
    let gateways = database
        .start_replicas(replicas, &emulator, &replica_settings())
        .await;
    // The emulator holds every `/survey` call until the whole crowd is in the sender's hands,
    // so how the crowd is batched does not depend on how fast its calls arrive: the first
    // batch is on the wire, held; the next ones fill to 100 and go (or wait for the budget)
    // while the partial one waits for the first to be answered, so it holds every straggler.
    let handle = sandbox.handle();
    handle.hold(
        Api::Retently,
        HoldSpec {
            route: Some(SURVEY_ROUTE.to_owned()),
            ..HoldSpec::default()
        },
    );
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(CROWD);
    for n in 0..CROWD {
        let mut client = SurveyServiceClient::new(gateways[n % replicas].channel.clone());
        let mut request = tonic::Request::new(survey(&campaign, format!("{tag}-{n}@example.com")));
        request.set_timeout(Duration::from_secs(120));
        tasks.push(tokio::spawn(
            async move { client.send_survey(request).await },
        ));
    }
    let spool = inspect(&database.url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let claimed: i64 = spool
            .query_one(
                "SELECT count(*) FROM survey_spool WHERE epoch IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        // Every send is in the sender's hands and its first batch on the wire.
        if claimed == CROWD as i64 && handle.held(Api::Retently) >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the crowd reaches the sender ({claimed} claimed, {} calls held)",
            handle.held(Api::Retently)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle.release(Api::Retently);
    // Its session would keep the statistics below from being flushed.
    drop(spool);
    for task in tasks {
        let response = task
            .await
            .unwrap()
            .expect("every survey is sent")
            .into_inner();
        assert_eq!(
            response.results[0].outcome,
            pb::RecipientOutcome::Scheduled as i32,
            "{response:?}"
        );
    }
    let elapsed = started.elapsed();
    let scheduled: usize = handle
        .survey_sends()
        .iter()
        .map(|send| send.scheduled.len())
        .sum();
    assert_eq!(scheduled, CROWD, "every recipient was surveyed once");
    let requests: Vec<_> = handle
        .request_counts()
        .into_iter()
        .filter(|count| count.api == Api::Retently)
        .collect();
    let mut batch_sizes: Vec<usize> = handle
        .survey_sends()
        .iter()
        .map(|send| send.recipients.len())
        .collect();
    batch_sizes.sort_unstable();
    eprintln!("{tag}: retently requests {requests:?}; /survey batch sizes {batch_sizes:?}");
    let mut run = CrowdRun {
        survey_calls: handle.requests_to(Api::Retently, SURVEY_ROUTE),
        rate_limited: handle.rate_limited(Api::Retently),
        status_429: handle.status_count(Api::Retently, 429),
        acquire_calls: 0,
        elapsed,
    };
    for gateway in gateways {
        assert_eq!(gateway.terminate().code(), Some(0));
    }
    run.acquire_calls = acquire_calls(&database.url).await;
    emulator.stop().await;
    Some(run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_budget_three_replicas_share_one_budget_without_429s() {
    let Some(three) = crowd(3, "three").await else {
        return;
    };
    let Some(one) = crowd(1, "one").await else {
        return;
    };
    for (replicas, run) in [(3, &three), (1, &one)] {
        eprintln!(
            "scale-out budget: {CROWD} single-recipient surveys at {LIMIT} per {WINDOW:?} on \
             {replicas} replica(s): {} /survey calls, {} 429s, {} grant statements, {:.1} s",
            run.survey_calls,
            run.status_429,
            run.acquire_calls,
            run.elapsed.as_secs_f64()
        );
    }
    for run in [&three, &one] {
        assert_eq!(run.rate_limited, 0, "the emulator refused none: {run:?}");
        assert_eq!(run.status_429, 0, "{run:?}");
        // Each upstream call cost at least one grant; asks the budget refused come on top.
        assert!(run.acquire_calls >= run.survey_calls as i64, "{run:?}");
    }
    // The replicas hand their sends to one sender, so three replicas batch the crowd as one
    // does: within 1.1x of its `/survey` calls (each replica batching its own third would
    // need at least 12 where one replica needs 10 or 11).
    assert!(
        three.survey_calls * 10 <= one.survey_calls * 11,
        "three replicas made {} /survey calls, one replica {}",
        three.survey_calls,
        one.survey_calls
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_budget_a_429_seen_by_one_replica_pauses_the_others() {
    let Some(mut database) = SharedDatabase::create().await else {
        return;
    };
    let (sandbox, emulator) = emulator(SandboxConfig::default()).await;
    let handle = sandbox.handle().clone();
    let campaign = handle
        .transactional_campaign("NPS")
        .expect("the default seed has a transactional NPS campaign");
    // The first Retently request is refused with a Retry-After long enough that the others
    // are certainly asked to send while it holds.
    let retry_after = Duration::from_secs(4);
    handle.set_faults(
        Api::Retently,
        FaultConfig {
            burst_429: 1,
            burst_retry_after_secs: retry_after.as_secs(),
            ..FaultConfig::default()
        },
    );
    // Each replica sends its own surveys here, so a pause seen by one has to reach the others
    // through the shared budget (with shared survey batches, one replica would send them all).
    let settings = vec![
        ("CXGW_FEEDBACK_SYNC", "false".to_owned()),
        ("CXGW_POSTGRES_SHARED_SURVEY_BATCHES", "false".to_owned()),
    ];
    let gateways = database.start_replicas(3, &emulator, &settings).await;
    let send = |channel: tonic::transport::Channel, email: &str| {
        let mut request = tonic::Request::new(survey(&campaign, email.to_owned()));
        request.set_timeout(Duration::from_secs(60));
        async move {
            SurveyServiceClient::new(channel)
                .send_survey(request)
                .await
                .expect("the survey is sent after the pause")
                .into_inner()
        }
    };
    let first = tokio::spawn(send(gateways[0].channel.clone(), "first@example.com"));

    // The replica that got the 429 has shared it: the row holds the end of the pause.
    let client = inspect(&database.url).await;
    let blocked_until_us = {
        let client = &client;
        let read = || async move {
            client
                .query_opt(
                    "SELECT blocked_until_us FROM upstream_budget
                     WHERE account LIKE 'retently:%' AND blocked_until_us IS NOT NULL",
                    &[],
                )
                .await
                .unwrap()
                .map(|row| row.get::<_, i64>(0))
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(until) = read().await {
                break until;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the 429 reaches the shared row"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    assert_eq!(handle.status_count(Api::Retently, 429), 1);
    let asked_at_us = chrono::Utc::now().timestamp_micros();
    let others = tokio::join!(
        send(gateways[1].channel.clone(), "second@example.com"),
        send(gateways[2].channel.clone(), "third@example.com"),
    );
    let first = first.await.unwrap();
    for response in [&first, &others.0, &others.1] {
        assert_eq!(
            response.results[0].outcome,
            pb::RecipientOutcome::Scheduled as i32
        );
    }
    assert!(
        asked_at_us < blocked_until_us,
        "the other replicas were asked while the pause held"
    );
    // Every survey the emulator received came after the pause the first replica was told,
    // the other replicas' included, although they never saw a 429 themselves.
    let sends = handle.survey_sends();
    assert_eq!(sends.len(), 3, "{sends:?}");
    for send in &sends {
        assert!(
            send.received_at.timestamp_micros() >= blocked_until_us,
            "{:?} arrived {} µs before the pause ended",
            send.recipients,
            blocked_until_us - send.received_at.timestamp_micros()
        );
    }
    assert_eq!(handle.status_count(Api::Retently, 429), 1, "one 429 in all");
    for gateway in gateways {
        assert_eq!(gateway.terminate().code(), Some(0));
    }
    emulator.stop().await;
}
