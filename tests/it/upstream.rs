//! The upstream layer (clients + scheduler) against the sandbox over real HTTP on 127.0.0.1.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cx_gateway::config::Secret;
use cx_gateway::error::{Error, ErrorCode};
use cx_gateway::upstream::retainly::{RetainlyClient, RetainlyCustomer, RetainlyEvent, RetainlyId};
use cx_gateway::upstream::retently::{
    CustomerInput, CustomerQuery, Metric, PageRequest, RetentlyClient, SurveyRequest, SurveyStatus,
    UpsertStatus,
};
use cx_gateway::upstream::scheduler::breaker::BreakerConfig;
use cx_gateway::upstream::scheduler::retry::BackoffPolicy;
use cx_gateway::upstream::{CallContext, RetainlyApi, RetentlyApi, SchedulerSettings};
use cx_sandbox::{Api, FaultConfig, Sandbox, SandboxConfig, SandboxHandle};
use reqwest::Url;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A sandbox serving on an ephemeral loopback port until dropped.
struct Upstream {
    handle: SandboxHandle,
    base: Url,
    _stop: oneshot::Sender<()>,
}

async fn sandbox(config: SandboxConfig) -> Upstream {
    let sandbox = Sandbox::new(config);
    let handle = sandbox.handle().clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(sandbox.serve(listener, async move {
        let _ = stopped.await;
    }));
    Upstream {
        handle,
        base,
        _stop: stop,
    }
}

/// Production settings with test-sized delays: retries come back within milliseconds.
fn settings(requests_per_minute: u32) -> SchedulerSettings {
    SchedulerSettings {
        backoff: BackoffPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
            max_attempts: 4,
        },
        ..SchedulerSettings::new(requests_per_minute)
    }
}

fn retently(upstream: &Upstream, settings: SchedulerSettings) -> RetentlyApi {
    RetentlyApi::new(
        upstream.base.clone(),
        &Secret::new(cx_sandbox::DEFAULT_RETENTLY_API_KEY),
        settings,
    )
    .unwrap()
}

fn retainly(upstream: &Upstream, settings: SchedulerSettings) -> RetainlyApi {
    let client = RetainlyClient::new(
        upstream.base.clone(),
        &Secret::new(cx_sandbox::DEFAULT_RETAINLY_KEY),
        &Secret::new(cx_sandbox::DEFAULT_RETAINLY_SECRET),
    )
    .unwrap();
    RetainlyApi::with_client(client, settings)
}

fn within(seconds: u64) -> CallContext {
    CallContext::interactive_within(Duration::from_secs(seconds))
}

/// Never a hang: every test call must come back well inside this bound.
async fn bounded<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .expect("an upstream call hung")
}

fn transactional_campaign(upstream: &Upstream) -> String {
    upstream
        .handle
        .transactional_campaign("NPS")
        .expect("the seed has a transactional NPS campaign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_survey_sends_become_about_ten_calls() {
    let upstream = sandbox(SandboxConfig::default()).await;
    let api = retently(&upstream, settings(150));
    let campaign = transactional_campaign(&upstream);
    // All callers start together, as concurrent RPCs would.
    let start = Arc::new(tokio::sync::Barrier::new(1001));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let api = api.clone();
        let campaign = campaign.clone();
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let email = format!("Person.{i}@Example.com");
            let outcome = api
                .send_survey(
                    &within(30),
                    SurveyRequest {
                        campaign_id: campaign,
                        delay_days: None,
                        recipient: CustomerInput::new(email.clone()),
                    },
                )
                .await;
            (email, outcome)
        }));
    }
    start.wait().await;
    let mut survey_ids = HashSet::new();
    for task in tasks {
        let (email, outcome) = bounded(task).await.unwrap();
        let outcome = outcome.unwrap_or_else(|error| panic!("{email}: {error}"));
        assert_eq!(
            outcome.email, email,
            "each caller gets its own recipient's outcome"
        );
        assert_eq!(outcome.status, SurveyStatus::Scheduled);
        assert!(survey_ids.insert(outcome.survey_id.expect("a survey id")));
    }
    let calls = upstream.handle.requests_to(Api::Retently, "/api/v2/survey");
    eprintln!("1000 concurrent survey sends reached the sandbox as {calls} /survey calls");
    assert!(calls <= 12, "{calls} /survey calls");
    assert_eq!(upstream.handle.rate_limited(Api::Retently), 0);
    assert_eq!(upstream.handle.status_count(Api::Retently, 429), 0);
    let sends = upstream.handle.survey_sends();
    assert!(sends.iter().all(|send| send.recipients.len() <= 100));
    let scheduled: usize = sends.iter().map(|send| send.scheduled.len()).sum();
    assert_eq!(scheduled, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_twice_in_one_burst_gets_two_correct_answers() {
    let upstream = sandbox(SandboxConfig::default()).await;
    let api = retently(&upstream, settings(150));
    let campaign = transactional_campaign(&upstream);
    let ctx = within(30);
    let send = |email: &str| {
        api.send_survey(
            &ctx,
            SurveyRequest {
                campaign_id: campaign.clone(),
                delay_days: None,
                recipient: CustomerInput::new(email),
            },
        )
    };
    let (first, second, other) = tokio::join!(
        send("twice@example.com"),
        send(" TWICE@example.com"),
        send("once@example.com")
    );
    let (first, second, other) = (first.unwrap(), second.unwrap(), other.unwrap());
    assert_eq!(first.email, "twice@example.com");
    assert_eq!(second.email, " TWICE@example.com");
    assert_eq!(other.status, SurveyStatus::Scheduled);
    // Never in one upstream call: each got the answer to its own request, in arrival order.
    let sends = upstream.handle.survey_sends();
    assert!(sends.iter().all(|send| {
        send.recipients
            .iter()
            .filter(|r| *r == "twice@example.com")
            .count()
            <= 1
    }));
    let calls_with_twice = sends
        .iter()
        .filter(|send| send.recipients.iter().any(|r| r == "twice@example.com"))
        .count();
    assert_eq!(calls_with_twice, 2);
    assert_eq!(first.status, SurveyStatus::Scheduled);
    assert!(matches!(
        second.status,
        SurveyStatus::Scheduled | SurveyStatus::Throttled
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_times_the_budget_is_shed_with_retry_info_and_never_rate_limited() {
    let upstream = sandbox(SandboxConfig {
        retently_requests_per_minute: 30,
        ..SandboxConfig::default()
    })
    .await;
    let api = retently(&upstream, settings(30));
    let mut tasks = Vec::new();
    for page in 1..=90u32 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let query = CustomerQuery {
                page: PageRequest {
                    page: Some(page),
                    limit: Some(5),
                    sort: None,
                },
                ..CustomerQuery::default()
            };
            api.list_customers(&within(2), query).await
        }));
    }
    let mut ok = 0;
    let mut shed = 0;
    for task in tasks {
        match bounded(task).await.unwrap() {
            Ok(_) => ok += 1,
            Err(error) => {
                assert_eq!(error.code(), ErrorCode::ResourceExhausted, "{error}");
                assert_eq!(error.reason().as_str(), "UPSTREAM_BUDGET_EXHAUSTED");
                let retry = error.retry_after().expect("RetryInfo");
                assert!(
                    retry >= Duration::from_secs(1) && retry <= Duration::from_secs(62),
                    "{retry:?}"
                );
                assert_eq!(error.metadata()["upstream"], "retently");
                shed += 1;
            }
        }
    }
    eprintln!(
        "3x budget: {ok} served, {shed} shed, sandbox 429s: {}",
        upstream.handle.rate_limited(Api::Retently)
    );
    assert_eq!(ok, 30);
    assert_eq!(shed, 60);
    assert_eq!(upstream.handle.rate_limited(Api::Retently), 0);
    assert_eq!(upstream.handle.status_count(Api::Retently, 429), 0);
    assert_eq!(
        upstream
            .handle
            .requests_to(Api::Retently, "/api/v2/customers"),
        30
    );
    assert_eq!(api.counters().shed, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_window_refills_the_budget() {
    // The window is configurable on both sides, so a test can watch it pass without a minute.
    let upstream = sandbox(SandboxConfig {
        retently_requests_per_minute: 5,
        rate_limit_window: Duration::from_secs(2),
        ..SandboxConfig::default()
    })
    .await;
    let api = retently(
        &upstream,
        SchedulerSettings {
            window: Duration::from_secs(2),
            jitter_margin: Duration::from_millis(200),
            ..settings(5)
        },
    );
    let mut tasks = Vec::new();
    for metric in 0..15 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            api.get_customer(&within(10), &format!("{metric:024x}"))
                .await
        }));
    }
    for task in tasks {
        let error = bounded(task).await.unwrap().expect_err("no such customer");
        assert_eq!(error.code(), ErrorCode::NotFound, "{error}");
    }
    assert_eq!(upstream.handle.status_count(Api::Retently, 404), 15);
    assert_eq!(upstream.handle.rate_limited(Api::Retently), 0);
}

/// Whether `error` is one a caller may see when the upstream misbehaves.
fn is_expected_failure(error: &Error) -> bool {
    matches!(
        error.code(),
        ErrorCode::Unavailable | ErrorCode::ResourceExhausted | ErrorCode::DeadlineExceeded
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_5xx_and_429_storms_every_call_is_answered_and_records_match() {
    let upstream = sandbox(SandboxConfig {
        retently_requests_per_minute: 0,
        ..SandboxConfig::default()
    })
    .await;
    let faults = FaultConfig {
        error_rate: 0.3,
        error_statuses: vec![500, 502, 503],
        burst_429: 3,
        burst_retry_after_secs: 1,
        ..FaultConfig::default()
    };
    upstream.handle.set_faults(Api::Retently, faults.clone());
    upstream.handle.set_faults(Api::Retainly, faults);
    // More attempts and a looser retry budget than production, so that most calls get through
    // and the comparison below covers many records.
    let chaos = || SchedulerSettings {
        backoff: BackoffPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
            max_attempts: 6,
        },
        retry_budget: cx_gateway::upstream::scheduler::retry::RetryBudgetConfig {
            ratio: 0.5,
            floor: 20,
            window: Duration::from_secs(10),
        },
        ..SchedulerSettings::new(100_000)
    };
    let api = retently(&upstream, chaos());
    let retainly_api = retainly(&upstream, chaos());
    let campaign = transactional_campaign(&upstream);

    let told_scheduled = Arc::new(Mutex::new(BTreeSet::new()));
    let told_upserted = Arc::new(Mutex::new(BTreeSet::new()));
    let told_retainly = Arc::new(Mutex::new(BTreeSet::new()));
    let mut tasks = Vec::new();
    for round in 0..10 {
        if round == 5 {
            // A second 429 burst in the middle of the traffic.
            for which in [Api::Retently, Api::Retainly] {
                let mut faults = upstream.handle.faults(which);
                faults.burst_429 = 3;
                upstream.handle.set_faults(which, faults);
            }
        }
        for i in 0..30 {
            let n = round * 100 + i;
            let surveys = api.clone();
            let campaign = campaign.clone();
            let told = Arc::clone(&told_scheduled);
            tasks.push(tokio::spawn(async move {
                let email = format!("chaos.survey.{n}@example.com");
                let result = surveys
                    .send_survey(
                        &within(20),
                        SurveyRequest {
                            campaign_id: campaign,
                            delay_days: None,
                            recipient: CustomerInput::new(email.clone()),
                        },
                    )
                    .await;
                match result {
                    Ok(outcome) => {
                        assert_eq!(outcome.status, SurveyStatus::Scheduled);
                        told.lock().unwrap().insert(email);
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            }));
            let upserts = api.clone();
            let told = Arc::clone(&told_upserted);
            tasks.push(tokio::spawn(async move {
                let email = format!("chaos.customer.{n}@example.com");
                let mut customer = CustomerInput::new(email.clone());
                customer.first_name = Some(format!("N{n}"));
                match upserts.upsert_customer(&within(20), customer).await {
                    Ok(upsert) => {
                        assert_eq!(upsert.status, UpsertStatus::Created);
                        told.lock().unwrap().insert(email);
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            }));
            let retainly_api = retainly_api.clone();
            let told = Arc::clone(&told_retainly);
            tasks.push(tokio::spawn(async move {
                let mut fields = Map::new();
                fields.insert("plan".to_owned(), json!("pro"));
                let customer = RetainlyCustomer {
                    id: RetainlyId::Int(n as i64),
                    fields,
                };
                match retainly_api.upsert_customer(&within(20), customer).await {
                    Ok(()) => {
                        told.lock().unwrap().insert(n as i64);
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            }));
        }
        for _ in 0..3 {
            let reads = api.clone();
            tasks.push(tokio::spawn(async move {
                reads.score(&within(20), Metric::Nps).await.map(drop)
            }));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut failures = 0;
    let total = tasks.len();
    for task in tasks {
        if let Err(error) = bounded(task).await.unwrap() {
            assert!(is_expected_failure(&error), "unexpected failure: {error:?}");
            assert!(error.metadata().contains_key("upstream"), "{error:?}");
            failures += 1;
        }
    }
    let told_scheduled = told_scheduled.lock().unwrap().clone();
    let told_upserted = told_upserted.lock().unwrap().clone();
    let told_retainly = told_retainly.lock().unwrap().clone();
    let forced = upstream.handle.fault_counts(Api::Retently);
    eprintln!(
        "chaos: {total} calls, {failures} failed with a retryable code; retently faults {forced:?}; \
         lane {:?}; {} surveys, {} retently and {} retainly upserts confirmed",
        api.counters(),
        told_scheduled.len(),
        told_upserted.len(),
        told_retainly.len()
    );
    assert!(forced.errors > 0 && forced.forced_429 > 0);
    assert!(!told_scheduled.is_empty() && !told_upserted.is_empty() && !told_retainly.is_empty());

    // The sandbox holds exactly what callers were told succeeded: injected faults apply nothing,
    // and no survey was repeated.
    let scheduled: BTreeSet<String> = upstream
        .handle
        .survey_sends()
        .into_iter()
        .flat_map(|send| send.scheduled)
        .filter(|email| email.starts_with("chaos.survey."))
        .collect();
    assert_eq!(scheduled, told_scheduled);
    let customers: BTreeSet<String> = upstream
        .handle
        .retently_customers()
        .into_iter()
        .filter_map(|customer| customer["email"].as_str().map(str::to_owned))
        .filter(|email| email.starts_with("chaos.customer."))
        .collect();
    assert_eq!(customers, told_upserted);
    let retainly_customers: BTreeSet<i64> = upstream
        .handle
        .retainly_customers()
        .into_iter()
        .filter_map(|customer| customer.id.as_i64())
        .collect();
    assert_eq!(retainly_customers, told_retainly);
}

fn assert_upstream_error(
    error: &Error,
    code: ErrorCode,
    reason: &str,
    upstream: &str,
    status: &str,
) {
    assert_eq!(error.code(), code, "{error:?}");
    assert_eq!(error.reason().as_str(), reason, "{error:?}");
    assert_eq!(error.metadata()["upstream"], upstream, "{error:?}");
    assert_eq!(error.metadata()["status"], status, "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_map_to_the_contract() {
    let upstream = sandbox(SandboxConfig::default()).await;
    let api = retently(&upstream, settings(1000));
    let retainly_api = retainly(&upstream, settings(1000));

    // 400: a regular (not transactional) campaign.
    let campaigns = api.campaigns(&within(10)).await.unwrap();
    let regular = campaigns
        .iter()
        .find(|c| !c.is_transactional())
        .expect("a regular campaign");
    let error = api
        .send_survey(
            &within(10),
            SurveyRequest {
                campaign_id: regular.id.clone(),
                delay_days: None,
                recipient: CustomerInput::new("someone@example.com"),
            },
        )
        .await
        .unwrap_err();
    assert_upstream_error(
        &error,
        ErrorCode::InvalidArgument,
        "UPSTREAM_INVALID_ARGUMENT",
        "retently",
        "400",
    );
    assert!(!error.violations().is_empty());

    // 400 naming one item of a coalesced batch: only that caller is refused.
    let ctx = within(10);
    let (bad, good) = tokio::join!(
        api.upsert_customer(&ctx, CustomerInput::new("not-an-address@")),
        api.upsert_customer(&ctx, CustomerInput::new("fine@example.com")),
    );
    let bad = bad.unwrap_err();
    assert_upstream_error(
        &bad,
        ErrorCode::InvalidArgument,
        "UPSTREAM_INVALID_ARGUMENT",
        "retently",
        "400",
    );
    assert_eq!(bad.violations()[0].field, "email", "{bad:?}");
    assert_eq!(good.unwrap().status, UpsertStatus::Created);

    // 404.
    let error = api
        .get_customer(&within(10), "0123456789abcdef01234567")
        .await
        .unwrap_err();
    assert_upstream_error(
        &error,
        ErrorCode::NotFound,
        "UPSTREAM_NOT_FOUND",
        "retently",
        "404",
    );
    assert_eq!(error.message(), "retently has no such customer");

    // 422 from Retainly, attributed to the one bad customer of a batch.
    let long = "x".repeat(1001);
    let mut bad_fields = Map::new();
    bad_fields.insert("bio".to_owned(), Value::String(long));
    let mut good_fields = Map::new();
    good_fields.insert("plan".to_owned(), json!("pro"));
    let (bad, good) = tokio::join!(
        retainly_api.upsert_customer(
            &ctx,
            RetainlyCustomer {
                id: RetainlyId::Int(7),
                fields: bad_fields
            }
        ),
        retainly_api.upsert_customer(
            &ctx,
            RetainlyCustomer {
                id: RetainlyId::from("c-8"),
                fields: good_fields
            }
        ),
    );
    let bad = bad.unwrap_err();
    assert_upstream_error(
        &bad,
        ErrorCode::InvalidArgument,
        "UPSTREAM_INVALID_ARGUMENT",
        "retainly",
        "422",
    );
    assert_eq!(bad.violations()[0].field, "bio", "{bad:?}");
    good.unwrap();
    assert!(upstream.handle.retainly_customer(&json!("c-8")).is_some());
    assert!(upstream.handle.retainly_customer(&json!(7)).is_none());

    // 422 on /events (Laravel shape).
    let mut data = Map::new();
    for i in 0..51 {
        data.insert(format!("f{i}"), json!(i));
    }
    let error = retainly_api
        .track_event(
            &within(10),
            RetainlyEvent {
                customer_id: RetainlyId::Int(1),
                event: "signup".into(),
                data: Some(data),
            },
        )
        .await
        .unwrap_err();
    assert_upstream_error(
        &error,
        ErrorCode::InvalidArgument,
        "UPSTREAM_INVALID_ARGUMENT",
        "retainly",
        "422",
    );
    assert!(!error.violations().is_empty());

    // 401 / 403 / 422-for-credentials: the gateway's own problem, never the caller's.
    let wrong = RetentlyApi::new(
        upstream.base.clone(),
        &Secret::new("wrong-key"),
        settings(1000),
    )
    .unwrap();
    let error = wrong.campaigns(&within(10)).await.unwrap_err();
    assert_upstream_error(
        &error,
        ErrorCode::FailedPrecondition,
        "UPSTREAM_CREDENTIALS_REJECTED",
        "retently",
        "401",
    );
    let wrong = RetainlyApi::with_client(
        RetainlyClient::new(upstream.base.clone(), &Secret::new("k"), &Secret::new("s")).unwrap(),
        settings(1000),
    );
    let error = wrong
        .upsert_customer(
            &within(10),
            RetainlyCustomer {
                id: RetainlyId::Int(1),
                fields: Map::new(),
            },
        )
        .await
        .unwrap_err();
    assert_upstream_error(
        &error,
        ErrorCode::FailedPrecondition,
        "UPSTREAM_CREDENTIALS_REJECTED",
        "retainly",
        "403",
    );
    let error = wrong
        .track_event(
            &within(10),
            RetainlyEvent {
                customer_id: RetainlyId::Int(1),
                event: "signup".into(),
                data: None,
            },
        )
        .await
        .unwrap_err();
    assert_upstream_error(
        &error,
        ErrorCode::FailedPrecondition,
        "UPSTREAM_CREDENTIALS_REJECTED",
        "retainly",
        "422",
    );

    // 429 with a Retry-After longer than the caller can wait.
    upstream.handle.set_faults(
        Api::Retently,
        FaultConfig {
            burst_429: 1,
            burst_retry_after_secs: 30,
            ..FaultConfig::default()
        },
    );
    let error = api
        .get_feedback(&within(2), "0123456789abcdef01234567")
        .await
        .unwrap_err();
    assert_upstream_error(
        &error,
        ErrorCode::ResourceExhausted,
        "UPSTREAM_RATE_LIMITED",
        "retently",
        "429",
    );
    assert_eq!(error.retry_after(), Some(Duration::from_secs(30)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_become_unavailable_then_the_circuit_opens() {
    let upstream = sandbox(SandboxConfig::default()).await;
    upstream.handle.set_faults(
        Api::Retently,
        FaultConfig {
            error_rate: 1.0,
            error_statuses: vec![503],
            ..FaultConfig::default()
        },
    );
    let api = retently(
        &upstream,
        SchedulerSettings {
            breaker: BreakerConfig {
                threshold: 4,
                open_for: Duration::from_secs(30),
                max_open_for: Duration::from_secs(60),
            },
            ..settings(1000)
        },
    );
    let error = api
        .template(&within(10), "0123456789abcdef01234567")
        .await
        .unwrap_err();
    assert_upstream_error(
        &error,
        ErrorCode::Unavailable,
        "UPSTREAM_UNAVAILABLE",
        "retently",
        "503",
    );
    assert!(error.retry_after().is_some());
    let attempts = upstream.handle.status_count(Api::Retently, 503);
    assert_eq!(attempts, 4, "the first attempt and three retries");
    let error = api
        .template(&within(10), "0123456789abcdef01234567")
        .await
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::Unavailable);
    assert_eq!(error.reason().as_str(), "UPSTREAM_CIRCUIT_OPEN");
    assert!(error.retry_after().unwrap() > Duration::from_secs(20));
    assert_eq!(
        upstream.handle.status_count(Api::Retently, 503),
        attempts,
        "failed fast"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_times_out_within_the_callers_deadline() {
    let upstream = sandbox(SandboxConfig::default()).await;
    upstream.handle.set_faults(
        Api::Retently,
        FaultConfig {
            latency_ms: 3000,
            ..FaultConfig::default()
        },
    );
    let api = retently(&upstream, settings(1000));
    let error = bounded(api.set_response_tags(
        &within(1),
        "0123456789abcdef01234567",
        vec!["late".to_owned()],
        cx_gateway::upstream::retently::LabelOp::Replace,
    ))
    .await
    .unwrap_err();
    // The caller's deadline cut the attempt: DEADLINE_EXCEEDED, saying which upstream was slow.
    assert_eq!(error.code(), ErrorCode::DeadlineExceeded, "{error:?}");
    assert_eq!(error.reason().as_str(), "UPSTREAM_TIMEOUT");
    assert_eq!(error.metadata()["status"], "timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_decode_every_envelope_and_are_cached() {
    let upstream = sandbox(SandboxConfig::default()).await;
    let api = retently(&upstream, settings(1000));
    let ctx = within(10);
    let campaigns = api.campaigns(&ctx).await.unwrap();
    assert_eq!(campaigns.len(), upstream.handle.campaigns().len());
    let templates = api.templates(&ctx).await.unwrap();
    assert_eq!(templates.len(), upstream.handle.templates().len());
    let template = api.template(&ctx, &templates[0].id).await.unwrap();
    assert_eq!(template.id, templates[0].id);
    let nps = api.score(&ctx, Metric::Nps).await.unwrap();
    assert!(nps.total_responses > 0 && (-100.0..=100.0).contains(&nps.score));
    let star = api.score(&ctx, Metric::Star).await.unwrap();
    assert!((0.0..=5.0).contains(&star.score));
    let reports = api.reports(&ctx, None).await.unwrap();
    assert_eq!(reports.len(), campaigns.len());
    let one = api.reports(&ctx, Some(&campaigns[0].id)).await.unwrap();
    assert_eq!(one[0].campaign_id, campaigns[0].id);
    // Served from cache: no second upstream call for any of them.
    for _ in 0..3 {
        api.campaigns(&ctx).await.unwrap();
        api.score(&ctx, Metric::Nps).await.unwrap();
        api.template(&ctx, &templates[0].id).await.unwrap();
    }
    assert_eq!(
        upstream
            .handle
            .requests_to(Api::Retently, "/api/v2/campaigns"),
        1
    );
    // `nps` is served by the sandbox's static legacy route, which wins over `{metric}`.
    assert_eq!(
        upstream
            .handle
            .requests_to(Api::Retently, "/api/v2/{metric}/score")
            + upstream
                .handle
                .requests_to(Api::Retently, "/api/v2/nps/score"),
        2
    );
    assert_eq!(
        upstream
            .handle
            .requests_to(Api::Retently, "/api/v2/templates/{id}"),
        1
    );

    let customers = api
        .list_customers(
            &ctx,
            CustomerQuery {
                page: PageRequest {
                    page: Some(2),
                    limit: Some(7),
                    sort: None,
                },
                ..CustomerQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (customers.page, customers.limit, customers.items.len()),
        (2, 7, 7)
    );
    assert!(customers.has_more());
    let customer = api
        .get_customer(&ctx, &customers.items[0].id)
        .await
        .unwrap();
    assert_eq!(customer, customers.items[0]);
    let by_email = api
        .list_customers(
            &ctx,
            CustomerQuery {
                email: Some(customer.email.to_uppercase()),
                ..CustomerQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(by_email.items.len(), 1);

    let feedback = api
        .list_feedback(
            &ctx,
            cx_gateway::upstream::retently::FeedbackQuery {
                start_date: Some(chrono::Utc::now() - chrono::Duration::days(30)),
                page: PageRequest {
                    page: None,
                    limit: Some(1000),
                    sort: Some("createdDate".into()),
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!feedback.items.is_empty());
    assert!(
        feedback
            .items
            .windows(2)
            .all(|w| w[0].created_date <= w[1].created_date)
    );
    let item = api.get_feedback(&ctx, &feedback.items[0].id).await.unwrap();
    assert_eq!(item.id, feedback.items[0].id);
    api.set_response_tags(
        &ctx,
        &item.id,
        vec!["vip".into()],
        cx_gateway::upstream::retently::LabelOp::Append,
    )
    .await
    .unwrap();
    let companies = api.list_companies(&ctx, Default::default()).await.unwrap();
    let company = api
        .company(&ctx, companies.items[0].domain.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(company.id, companies.items[0].id);
    let outbox = api.outbox(&ctx, Default::default()).await.unwrap();
    assert!(outbox.total.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_reads_share_one_upstream_call() {
    let upstream = sandbox(SandboxConfig::default()).await;
    upstream.handle.set_faults(
        Api::Retently,
        FaultConfig {
            latency_ms: 200,
            ..FaultConfig::default()
        },
    );
    let api = retently(&upstream, settings(1000));
    let query = CustomerQuery {
        page: PageRequest {
            page: Some(1),
            limit: Some(3),
            sort: None,
        },
        ..CustomerQuery::default()
    };
    let ctx = within(10);
    let results =
        futures_util::future::join_all((0..50).map(|_| api.list_customers(&ctx, query.clone())))
            .await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        upstream
            .handle
            .requests_to(Api::Retently, "/api/v2/customers"),
        1
    );
}

#[tokio::test(flavor = "current_thread")]
async fn credentials_never_appear_in_errors_debug_output_or_logs() {
    const KEY: &str = "canary-retently-key-5d41402a";
    const RETAINLY_KEY: &str = "canary-retainly-key-7b52009b";
    const RETAINLY_SECRET: &str = "canary-retainly-secret-a9993e36";
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = {
        let logs = Arc::clone(&logs);
        move || LogWriter(Arc::clone(&logs))
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(writer)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // The sandbox accepts the canaries, so they are really sent; then it refuses them.
    let upstream = sandbox(SandboxConfig {
        retently_api_keys: vec![KEY.to_owned()],
        retainly_credentials: vec![(RETAINLY_KEY.to_owned(), RETAINLY_SECRET.to_owned())],
        ..SandboxConfig::default()
    })
    .await;
    let client = RetentlyClient::new(upstream.base.clone(), &Secret::new(KEY)).unwrap();
    let api = RetentlyApi::with_client(client.clone(), settings(1000));
    let retainly_client = RetainlyClient::new(
        upstream.base.clone(),
        &Secret::new(RETAINLY_KEY),
        &Secret::new(RETAINLY_SECRET),
    )
    .unwrap();
    let retainly_api = RetainlyApi::with_client(retainly_client.clone(), settings(1000));
    api.campaigns(&within(10)).await.unwrap();
    retainly_api
        .track_event(
            &within(10),
            RetainlyEvent {
                customer_id: RetainlyId::Int(1),
                event: "signup".into(),
                data: None,
            },
        )
        .await
        .unwrap();

    let mut texts = vec![
        format!("{client:?}"),
        format!("{api:?}"),
        format!("{retainly_client:?}"),
        format!("{retainly_api:?}"),
    ];
    // Errors of every kind: refused credentials, not found, bad input, unreachable.
    let wrong = RetentlyApi::new(
        upstream.base.clone(),
        &Secret::new(format!("{KEY}-old")),
        settings(1000),
    )
    .unwrap();
    let mut errors = vec![
        wrong.campaigns(&within(10)).await.unwrap_err(),
        api.get_customer(&within(10), "0123456789abcdef01234567")
            .await
            .unwrap_err(),
        api.upsert_customer(&within(10), CustomerInput::new("bad@"))
            .await
            .unwrap_err(),
    ];
    let wrong_retainly = RetainlyApi::with_client(
        RetainlyClient::new(
            upstream.base.clone(),
            &Secret::new(RETAINLY_KEY),
            &Secret::new("nope"),
        )
        .unwrap(),
        settings(1000),
    );
    errors.push(
        wrong_retainly
            .track_event(
                &within(10),
                RetainlyEvent {
                    customer_id: RetainlyId::Int(1),
                    event: "signup".into(),
                    data: None,
                },
            )
            .await
            .unwrap_err(),
    );
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let unreachable = Url::parse(&format!("http://{}", closed.local_addr().unwrap())).unwrap();
    drop(closed);
    let offline = RetentlyApi::new(unreachable, &Secret::new(KEY), settings(1000)).unwrap();
    errors.push(offline.campaigns(&within(5)).await.unwrap_err());
    for error in &errors {
        texts.push(error.to_string());
        texts.push(format!("{error:?}"));
        texts.push(format!("{:?}", tonic::Status::from(error.clone())));
    }
    texts.push(String::from_utf8_lossy(&logs.lock().unwrap()).into_owned());
    assert!(
        texts
            .last()
            .is_some_and(|logs| logs.contains("upstream answered")),
        "logs were captured"
    );
    for text in &texts {
        for secret in [KEY, RETAINLY_KEY, RETAINLY_SECRET] {
            assert!(!text.contains(secret), "a credential leaked into: {text}");
        }
    }
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A fake Retently for the envelope variants the sandbox does not produce.
async fn fake_retently(router: axum::Router) -> (RetentlyApi, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    let api = RetentlyApi::new(base, &Secret::new("k"), settings(1000)).unwrap();
    (api, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_variations_decode_and_malformed_bodies_name_the_field() {
    use axum::Json;
    use axum::routing::get;
    let router = axum::Router::new()
        // Campaigns under `data.data`, templates under `data` only, numbers as strings, the
        // legacy `nps` key, page metadata at the top level, snake_case names.
        .route(
            "/api/v2/campaigns",
            get(|| async { Json(json!({"data": {"data": [{"id": "c1", "isActive": "true", "type": "transactional"}]}})) }),
        )
        .route(
            "/api/v2/templates",
            get(|| async { Json(json!({"message": "Success.", "data": [{"id": 5, "name": "T"}]})) }),
        )
        .route(
            "/api/v2/nps/score",
            get(|| async { Json(json!({"data": {"nps": "39", "promoters": 62, "promotersCount": "8", "totalResponses": 13}})) }),
        )
        .route(
            "/api/v2/customers",
            get(|| async {
                Json(json!({
                    "data": {"subscribers": [{"id": "a1", "email": "ann@example.com", "first_name": "Ann", "tags": "x, y", "properties": null}]},
                    "page": "1", "pages": 3, "limit": 1, "total": "3"
                }))
            }),
        )
        // Malformed: an object where an id belongs, carrying what could be PII.
        .route(
            "/api/v2/csat/score",
            get(|| async { Json(json!({"data": {"score": {"value": "ann@example.com"}}})) }),
        )
        .route("/api/v2/ces/score", get(|| async { "<html>ann@example.com</html>" }))
        .route(
            "/api/v2/companies",
            get(|| async { Json(json!({"data": {"companies": [{"id": "ok"}, {"id": {"email": "ann@example.com"}}]}})) }),
        );
    let (api, _stop) = fake_retently(router).await;
    let ctx = within(10);
    let campaigns = api.campaigns(&ctx).await.unwrap();
    assert!(campaigns[0].is_active && campaigns[0].is_transactional());
    assert_eq!(api.templates(&ctx).await.unwrap()[0].id, "5");
    let score = api.score(&ctx, Metric::Nps).await.unwrap();
    assert_eq!(
        (score.score, score.promoters_count, score.total_responses),
        (39.0, 8, 13)
    );
    let page = api
        .list_customers(&ctx, CustomerQuery::default())
        .await
        .unwrap();
    assert_eq!((page.page, page.pages, page.total), (1, Some(3), Some(3)));
    assert_eq!(page.items[0].first_name.as_deref(), Some("Ann"));
    assert_eq!(page.items[0].tags, ["x", "y"]);
    assert!(page.has_more());

    for error in [
        api.score(&ctx, Metric::Csat).await.unwrap_err(),
        api.score(&ctx, Metric::Ces).await.unwrap_err(),
        api.list_companies(&ctx, Default::default())
            .await
            .unwrap_err(),
    ] {
        assert_eq!(error.code(), ErrorCode::Internal, "{error:?}");
        assert_eq!(error.reason().as_str(), "UPSTREAM_MALFORMED_RESPONSE");
        assert!(
            !format!("{error:?}").contains("ann@example.com"),
            "{error:?}"
        );
    }
    let error = api.score(&ctx, Metric::Csat).await.unwrap_err();
    assert!(
        error.message().contains("data.score"),
        "{}",
        error.message()
    );
    let error = api
        .list_companies(&ctx, Default::default())
        .await
        .unwrap_err();
    assert!(
        error.message().contains("data.companies[1].id"),
        "{}",
        error.message()
    );
    let error = api.score(&ctx, Metric::Ces).await.unwrap_err();
    assert!(
        error.message().contains("not valid json"),
        "{}",
        error.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_fill_up_while_they_wait_for_budget() {
    let upstream = sandbox(SandboxConfig {
        retently_requests_per_minute: 0,
        ..SandboxConfig::default()
    })
    .await;
    let api = retently(
        &upstream,
        SchedulerSettings {
            window: Duration::from_secs(2),
            jitter_margin: Duration::ZERO,
            ..settings(3)
        },
    );
    // Spend the whole budget of the window.
    for _ in 0..3 {
        let error = api
            .get_customer(&within(10), "0123456789abcdef01234567")
            .await
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::NotFound);
    }
    let campaign = transactional_campaign(&upstream);
    let ctx = within(20);
    let recipients = (0..250)
        .map(|i| CustomerInput::new(format!("waiting.{i}@example.com")))
        .collect();
    let outcomes = bounded(api.send_surveys(&ctx, &campaign, None, recipients)).await;
    assert!(outcomes.iter().all(Result::is_ok));
    let mut sizes: Vec<usize> = upstream
        .handle
        .survey_sends()
        .iter()
        .map(|send| send.recipients.len())
        .collect();
    // The three batches go out together once the window frees, and the emulator records them
    // as they finish: their order is the machine's, their sizes are the batcher's.
    sizes.sort_unstable();
    assert_eq!(sizes, [50, 100, 100], "full batches once the budget frees");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_reported_not_followed() {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let followed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let router = axum::Router::new()
        .route(
            "/api/v2/campaigns",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/elsewhere")]) }),
        )
        .route(
            "/elsewhere",
            get({
                let followed = Arc::clone(&followed);
                move || async move {
                    followed.store(true, std::sync::atomic::Ordering::SeqCst);
                    "{}"
                }
            }),
        );
    let (api, _stop) = fake_retently(router).await;
    let error = api.campaigns(&within(10)).await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::Internal, "{error:?}");
    assert_eq!(error.reason().as_str(), "UPSTREAM_UNEXPECTED_STATUS");
    assert_eq!(error.metadata()["status"], "302");
    assert!(!followed.load(std::sync::atomic::Ordering::SeqCst));
}
