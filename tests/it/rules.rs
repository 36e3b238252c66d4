//! Event rules and the survey cool-down against the real server and the sandbox.

use std::path::Path;
use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;
use cx_sandbox::{Api, HoldSpec, Sandbox, SandboxConfig};
use prost_types::value::Kind;
use prost_types::{Struct, Value};

use crate::support::{TestGateway, eventually};

const DAY_SECONDS: i64 = 24 * 3600;

fn text(value: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    }
}

fn campaign(metric: &str) -> String {
    Sandbox::new(SandboxConfig::default())
        .handle()
        .transactional_campaign(metric)
        .unwrap_or_else(|| panic!("the default seed has a transactional {metric} campaign"))
}

fn event(email: &str, message_id: &str, props: &[(&str, Value)]) -> pb::Event {
    pb::Event {
        customer_id: format!("cust-{email}"),
        email: email.to_owned(),
        name: "order_completed".to_owned(),
        message_id: message_id.to_owned(),
        properties: Some(Struct {
            fields: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }),
        ..Default::default()
    }
}

async fn track(gateway: &TestGateway, event: pb::Event) -> Vec<pb::TriggeredSurvey> {
    EventServiceClient::new(gateway.channel.clone())
        .track_event(pb::TrackEventRequest {
            event: Some(event),
            options: None,
        })
        .await
        .unwrap()
        .into_inner()
        .triggered_surveys
}

fn decision(entry: &pb::TriggeredSurvey) -> pb::RuleDecision {
    pb::RuleDecision::try_from(entry.decision).unwrap()
}

fn outcome(entry: &pb::TriggeredSurvey) -> pb::RecipientOutcome {
    pb::RecipientOutcome::try_from(entry.outcome).unwrap()
}

/// Seconds from now until `entry`'s throttle lets the customer be surveyed again.
fn eligible_in(throttle: Option<&pb::Throttle>) -> i64 {
    let at = throttle
        .and_then(|t| t.eligible_at.as_ref())
        .expect("a throttle with eligible_at");
    at.seconds - chrono::Utc::now().timestamp()
}

fn write_rules(path: &Path, text: &str) {
    // Written beside and renamed, so a poll never reads half a file.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

async fn gateway_with_rules(
    rules: &str,
    settings: Vec<(&'static str, String)>,
) -> (TestGateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    write_rules(&path, rules);
    let mut settings = settings;
    settings.push(("CXGW_EVENT_RULES_FILE", path.to_str().unwrap().to_owned()));
    let gateway = TestGateway::start_with(SandboxConfig::default(), settings).await;
    (gateway, dir)
}

#[tokio::test]
async fn rules_filter_sample_delay_and_throttle_each_event() {
    let (nps, csat, ces) = (campaign("NPS"), campaign("CSAT"), campaign("CES"));
    let rules = format!(
        r#"
[[rule]]
id = "us-orders"
events = ["order_completed"]
campaign = "{nps}"
delay_days = 3
audience = {{ all = [ {{ property = "country", eq = "US" }}, {{ any = [ {{ trait = "plan", in = ["pro"] }}, {{ property = "total", gte = 100 }} ] }} ] }}

[[rule]]
id = "never-sampled"
events = ["order_completed"]
campaign = "{csat}"
sample_percent = 0

[[rule]]
id = "monthly"
events = ["order_completed", "ticket_closed"]
campaign = "{ces}"
throttle_days = 30
"#
    );
    let (gateway, _dir) = gateway_with_rules(&rules, Vec::new()).await;

    let mut first = event("ann@example.com", "m-1", &[("country", text("US"))]);
    first.traits = Some(Struct {
        fields: [("plan".to_owned(), text("pro"))].into(),
    });
    let triggered = track(&gateway, first).await;
    let ids: Vec<&str> = triggered.iter().map(|t| t.rule_id.as_str()).collect();
    assert_eq!(ids, ["us-orders", "never-sampled", "monthly"]);
    assert_eq!(decision(&triggered[0]), pb::RuleDecision::Sent);
    assert_eq!(outcome(&triggered[0]), pb::RecipientOutcome::Scheduled);
    assert_eq!(decision(&triggered[1]), pb::RuleDecision::SampledOut);
    assert_eq!(outcome(&triggered[1]), pb::RecipientOutcome::Unspecified);
    assert_eq!(decision(&triggered[2]), pb::RuleDecision::Sent);

    // Another order of the same customer, from Germany, a day later in their life: the
    // audience filters the first rule out and the third rule's throttle holds it back.
    let triggered = track(
        &gateway,
        event("ann@example.com", "m-2", &[("country", text("DE"))]),
    )
    .await;
    assert_eq!(decision(&triggered[0]), pb::RuleDecision::FilteredOut);
    assert_eq!(decision(&triggered[1]), pb::RuleDecision::SampledOut);
    assert_eq!(decision(&triggered[2]), pb::RuleDecision::Throttled);
    assert_eq!(outcome(&triggered[2]), pb::RecipientOutcome::Throttled);
    let throttle = triggered[2].throttle.as_ref().unwrap();
    assert_eq!(throttle.source, pb::ThrottleSource::EventRule as i32);
    let remaining = eligible_in(Some(throttle));
    assert!(
        (30 * DAY_SECONDS - 120..=30 * DAY_SECONDS).contains(&remaining),
        "{remaining}"
    );

    // A US customer without the pro plan and with a small order: the any-of fails.
    let triggered = track(
        &gateway,
        event(
            "bo@example.com",
            "m-3",
            &[
                ("country", text("US")),
                (
                    "total",
                    Value {
                        kind: Some(Kind::NumberValue(20.0)),
                    },
                ),
            ],
        ),
    )
    .await;
    assert_eq!(decision(&triggered[0]), pb::RuleDecision::FilteredOut);
    assert_eq!(decision(&triggered[2]), pb::RuleDecision::Sent);

    // The sandbox saw exactly the sends the answers report, with the rule's delay.
    let sends = gateway.sandbox().handle().survey_sends();
    let mut seen: Vec<(String, u32, Vec<String>)> = sends
        .iter()
        .map(|s| (s.campaign_id.clone(), s.delay_days, s.recipients.clone()))
        .collect();
    seen.sort();
    let mut expected = vec![
        (nps.clone(), 3, vec!["ann@example.com".to_owned()]),
        (ces.clone(), 0, vec!["ann@example.com".to_owned()]),
        (ces.clone(), 0, vec!["bo@example.com".to_owned()]),
    ];
    expected.sort();
    assert_eq!(seen, expected);

    // The rules in force, with their source and version.
    let listed = EventServiceClient::new(gateway.channel.clone())
        .list_event_mappings(pb::ListEventMappingsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed.rules.iter().map(|r| r.rule_id.as_str()).collect();
    assert_eq!(ids, ["us-orders", "never-sampled", "monthly"]);
    assert!(
        listed
            .rules
            .iter()
            .all(|r| r.source == pb::RuleSource::File as i32)
    );
    assert_eq!(listed.rules[0].delay_days, Some(3));
    assert_eq!(listed.rules[2].throttle_days, Some(30));
    assert!(
        listed.rules[0]
            .audience
            .starts_with("all(property.country eq \"US\"")
    );
    assert_eq!(listed.rules_version.len(), 16);
    assert!(listed.rules_file.ends_with("rules.toml"));
    assert!(listed.rules_file_error.is_empty());
    assert_eq!(
        listed.mappings.len(),
        2,
        "order_completed and ticket_closed"
    );

    // Every decision is counted by rule.
    let metrics = reqwest::get(format!("http://{}/metrics", gateway.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"cxgw_rules_decisions_total{decision="filtered_out",rule="us-orders"} 2"#,
        r#"cxgw_rules_decisions_total{decision="sampled_out",rule="never-sampled"} 3"#,
        r#"cxgw_rules_decisions_total{decision="throttled",rule="monthly"} 1"#,
        r#"cxgw_rules_decisions_total{decision="sent",rule="monthly"} 2"#,
        r#"cxgw_rules_decisions_total{decision="matched",rule="monthly"} 3"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn one_customer_triggering_three_campaigns_is_surveyed_once_and_the_guard_survives_a_restart()
{
    let (nps, csat, ces) = (campaign("NPS"), campaign("CSAT"), campaign("CES"));
    let rules = format!(
        r#"
[[rule]]
id = "orders"
events = ["order_completed"]
campaign = "{nps}"

[[rule]]
id = "tickets"
events = ["order_completed"]
campaign = "{csat}"

[[rule]]
id = "renewals"
events = ["order_completed"]
campaign = "{ces}"
"#
    );
    let data_dir = tempfile::tempdir().unwrap();
    let settings = vec![
        ("CXGW_SURVEY_COOLDOWN", "14d".to_owned()),
        (
            "CXGW_DATA_DIR",
            data_dir.path().to_str().unwrap().to_owned(),
        ),
    ];
    let (gateway, rules_dir) = gateway_with_rules(&rules, settings.clone()).await;
    let triggered = track(&gateway, event("Cy@Example.com", "m-1", &[])).await;
    assert_eq!(decision(&triggered[0]), pb::RuleDecision::Sent);
    assert_eq!(outcome(&triggered[0]), pb::RecipientOutcome::Scheduled);
    for held in &triggered[1..] {
        assert_eq!(decision(held), pb::RuleDecision::Throttled);
        assert_eq!(outcome(held), pb::RecipientOutcome::Throttled);
        let throttle = held.throttle.as_ref().unwrap();
        assert_eq!(throttle.source, pb::ThrottleSource::SurveyCooldown as i32);
        let remaining = eligible_in(Some(throttle));
        assert!(
            (14 * DAY_SECONDS - 120..=14 * DAY_SECONDS).contains(&remaining),
            "{remaining}"
        );
    }
    let sends = gateway.sandbox().handle().survey_sends();
    let recipients: Vec<&String> = sends.iter().flat_map(|s| &s.recipients).collect();
    assert_eq!(recipients, ["cy@example.com"]);
    assert_eq!(sends[0].campaign_id, nps);
    gateway.stop().await.unwrap();

    // A new gateway on the same data directory: a direct SendSurvey to the same customer (the
    // email in other letters) is still held back, with no upstream call.
    let mut settings = settings;
    settings.push((
        "CXGW_EVENT_RULES_FILE",
        rules_dir
            .path()
            .join("rules.toml")
            .to_str()
            .unwrap()
            .to_owned(),
    ));
    let gateway = TestGateway::start_with(SandboxConfig::default(), settings).await;
    let response = SurveyServiceClient::new(gateway.channel.clone())
        .send_survey(pb::SendSurveyRequest {
            campaign_id: csat.clone(),
            recipients: vec![
                pb::Recipient {
                    email: "cy@example.COM".to_owned(),
                    ..Default::default()
                },
                pb::Recipient {
                    email: "dee@example.com".to_owned(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.results[0].outcome,
        pb::RecipientOutcome::Throttled as i32
    );
    let throttle = response.results[0].throttle.as_ref().unwrap();
    assert_eq!(throttle.source, pb::ThrottleSource::SurveyCooldown as i32);
    assert_eq!(
        response.results[1].outcome,
        pb::RecipientOutcome::Scheduled as i32
    );
    assert!(response.results[1].throttle.is_none());
    let sends = gateway.sandbox().handle().survey_sends();
    let recipients: Vec<&String> = sends.iter().flat_map(|s| &s.recipients).collect();
    assert_eq!(recipients, ["dee@example.com"]);

    // A request may shorten the cool-down: with 0 the guard is off for that send.
    let response = SurveyServiceClient::new(gateway.channel.clone())
        .send_survey(pb::SendSurveyRequest {
            campaign_id: csat,
            recipients: vec![pb::Recipient {
                email: "cy@example.com".to_owned(),
                ..Default::default()
            }],
            survey_cooldown: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.results[0].outcome,
        pb::RecipientOutcome::Scheduled as i32
    );
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn two_concurrent_sends_to_one_new_customer_survey_them_once() {
    let (nps, csat) = (campaign("NPS"), campaign("CSAT"));
    let gateway = TestGateway::start_with(
        SandboxConfig::default(),
        vec![("CXGW_SURVEY_COOLDOWN", "7d".to_owned())],
    )
    .await;
    let sandbox = gateway.sandbox().handle();
    // The first send's upstream call is held in the sandbox, so the second arrives while the
    // first is certainly in flight.
    sandbox.hold(
        Api::Retently,
        HoldSpec {
            route: Some("/api/v2/survey".to_owned()),
            ..HoldSpec::default()
        },
    );
    let send = |channel: tonic::transport::Channel, campaign_id: String| async move {
        SurveyServiceClient::new(channel)
            .send_survey(pb::SendSurveyRequest {
                campaign_id,
                recipients: vec![pb::Recipient {
                    email: "new@example.com".to_owned(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    };
    let first = tokio::spawn(send(gateway.channel.clone(), nps));
    eventually("the first send is held", Duration::from_secs(30), || {
        sandbox.held(Api::Retently) == 1
    })
    .await;
    let other_caller = gateway.connect(None).await.unwrap();
    let second = send(other_caller, csat).await;
    assert_eq!(
        second.results[0].outcome,
        pb::RecipientOutcome::Throttled as i32
    );
    assert_eq!(
        second.results[0].throttle.as_ref().unwrap().source,
        pb::ThrottleSource::SurveyCooldown as i32
    );
    assert_eq!(
        sandbox.held(Api::Retently),
        1,
        "no upstream call for the second send"
    );
    sandbox.release(Api::Retently);
    let first = first.await.unwrap();
    assert_eq!(
        first.results[0].outcome,
        pb::RecipientOutcome::Scheduled as i32
    );
    let recipients: Vec<String> = sandbox
        .survey_sends()
        .into_iter()
        .flat_map(|s| s.recipients)
        .collect();
    assert_eq!(recipients, ["new@example.com"]);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_send_that_certainly_failed_releases_the_customer_for_the_next_rule() {
    let nps = campaign("NPS");
    let rules = format!(
        r#"
[[rule]]
id = "gone"
events = ["order_completed"]
campaign = "campaign-deleted-upstream"

[[rule]]
id = "orders"
events = ["order_completed"]
campaign = "{nps}"
"#
    );
    let (gateway, _dir) =
        gateway_with_rules(&rules, vec![("CXGW_SURVEY_COOLDOWN", "14d".to_owned())]).await;
    let triggered = track(&gateway, event("eve@example.com", "m-1", &[])).await;
    assert_eq!(decision(&triggered[0]), pb::RuleDecision::Sent);
    assert_eq!(outcome(&triggered[0]), pb::RecipientOutcome::Failed);
    // Retently refused the first (no survey), so the cool-down does not hold the second back.
    assert_eq!(decision(&triggered[1]), pb::RuleDecision::Sent);
    assert_eq!(outcome(&triggered[1]), pb::RecipientOutcome::Scheduled);
    let recipients: Vec<String> = gateway
        .sandbox()
        .handle()
        .survey_sends()
        .into_iter()
        .flat_map(|s| s.recipients)
        .collect();
    assert_eq!(recipients, ["eve@example.com"]);
    gateway.stop().await.unwrap();
}

async fn listed(gateway: &TestGateway) -> pb::ListEventMappingsResponse {
    EventServiceClient::new(gateway.channel.clone())
        .list_event_mappings(pb::ListEventMappingsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn sighup() {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sighup_reloads_a_good_rules_file_and_refuses_a_bad_one_keeping_the_old_rules() {
    let (nps, csat) = (campaign("NPS"), campaign("CSAT"));
    let rule = |id: &str, campaign: &str| {
        format!(
            "[[rule]]\nid = \"{id}\"\nevents = [\"order_completed\"]\ncampaign = \"{campaign}\"\n"
        )
    };
    // Polling is slowed right down, so only the signal reloads within the test.
    let (gateway, dir) = gateway_with_rules(
        &rule("first", &nps),
        vec![("CXGW_RELOAD_INTERVAL", "1h".to_owned())],
    )
    .await;
    let path = dir.path().join("rules.toml");
    let before = listed(&gateway).await;
    assert_eq!(before.rules[0].rule_id, "first");

    write_rules(&path, &rule("second", &csat));
    sighup();
    let mut after = listed(&gateway).await;
    let waited = tokio::time::Instant::now();
    while after.rules_version == before.rules_version {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "no reload after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = listed(&gateway).await;
    }
    assert_eq!(after.rules[0].rule_id, "second");
    let triggered = track(&gateway, event("fay@example.com", "m-1", &[])).await;
    assert_eq!(triggered[0].rule_id, "second");
    assert_eq!(triggered[0].campaign_id, csat);

    // A file that fails validation (a rule without a campaign) is refused; "second" stays.
    write_rules(
        &path,
        "[[rule]]\nid = \"third\"\nevents = [\"order_completed\"]\n",
    );
    sighup();
    let mut refused = listed(&gateway).await;
    let waited = tokio::time::Instant::now();
    while refused.rules_file_error.is_empty() {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "no refusal after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        refused = listed(&gateway).await;
    }
    assert!(
        refused.rules_file_error.contains("campaign"),
        "{}",
        refused.rules_file_error
    );
    assert_eq!(refused.rules_version, after.rules_version);
    assert_eq!(refused.rules[0].rule_id, "second");
    let triggered = track(&gateway, event("gus@example.com", "m-2", &[])).await;
    assert_eq!(triggered[0].rule_id, "second");
    assert_eq!(decision(&triggered[0]), pb::RuleDecision::Sent);
    let metrics = reqwest::get(format!("http://{}/metrics", gateway.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"cxgw_rules_reloads_total{outcome="refused"} 1"#),
        "{metrics}"
    );
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn an_async_event_decides_its_rules_at_delivery_and_reports_them_in_the_result() {
    let (nps, csat) = (campaign("NPS"), campaign("CSAT"));
    let rules = format!(
        "[[rule]]\nid = \"a\"\nevents = [\"order_completed\"]\ncampaign = \"{nps}\"\n\n\
         [[rule]]\nid = \"b\"\nevents = [\"order_completed\"]\ncampaign = \"{csat}\"\n"
    );
    let (gateway, _dir) =
        gateway_with_rules(&rules, vec![("CXGW_SURVEY_COOLDOWN", "7d".to_owned())]).await;
    let response = EventServiceClient::new(gateway.channel.clone())
        .track_event(pb::TrackEventRequest {
            event: Some(event("hal@example.com", "m-async", &[])),
            options: Some(pb::WriteOptions {
                mode: pb::DeliveryMode::Async as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.triggered_surveys.is_empty(), "decided at delivery");
    let delivery = crate::support::finished_delivery(&gateway.channel, &response.delivery_id).await;
    let Some(pb::delivery::Result::TrackEvent(result)) = delivery.result else {
        panic!("a TrackEvent result: {delivery:?}");
    };
    let decisions: Vec<pb::RuleDecision> = result.triggered_surveys.iter().map(decision).collect();
    assert_eq!(
        decisions,
        [pb::RuleDecision::Sent, pb::RuleDecision::Throttled]
    );
    let recipients: Vec<String> = gateway
        .sandbox()
        .handle()
        .survey_sends()
        .into_iter()
        .flat_map(|s| s.recipients)
        .collect();
    assert_eq!(recipients, ["hal@example.com"]);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn the_backfill_seeds_the_cooldown_from_the_retently_history() {
    let data_dir = tempfile::tempdir().unwrap();
    let gateway = TestGateway::start_with(
        SandboxConfig::default(),
        vec![
            ("CXGW_SURVEY_COOLDOWN", "365d".to_owned()),
            ("CXGW_SURVEY_COOLDOWN_BACKFILL", "true".to_owned()),
            (
                "CXGW_DATA_DIR",
                data_dir.path().to_str().unwrap().to_owned(),
            ),
        ],
    )
    .await;
    // The most recent survey the seeded account sent, to whom and when.
    let (email, sent) = gateway
        .sandbox()
        .handle()
        .outbox()
        .iter()
        .filter_map(|survey| {
            let email = survey["email"].as_str()?.to_lowercase();
            let sent = chrono::DateTime::parse_from_rfc3339(survey["sentDate"].as_str()?).ok()?;
            Some((email, sent.timestamp()))
        })
        .max_by_key(|(_, sent)| *sent)
        .expect("the seed has sent surveys");
    assert!(
        sent > chrono::Utc::now().timestamp() - 300 * DAY_SECONDS,
        "a recent survey"
    );
    // Watch the record through a second handle on the same store until the backfill wrote it.
    let store = cx_gateway::store::Store::open(data_dir.path()).unwrap();
    let waited = tokio::time::Instant::now();
    while store
        .fatigue()
        .last_surveyed("", &email)
        .await
        .unwrap()
        .is_none()
    {
        assert!(waited.elapsed() < Duration::from_secs(60), "no backfill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = SurveyServiceClient::new(gateway.channel.clone())
        .send_survey(pb::SendSurveyRequest {
            campaign_id: campaign("NPS"),
            recipients: vec![pb::Recipient {
                email: email.clone(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.results[0].outcome,
        pb::RecipientOutcome::Throttled as i32
    );
    let eligible = response.results[0]
        .throttle
        .as_ref()
        .unwrap()
        .eligible_at
        .unwrap();
    assert_eq!(eligible.seconds, sent + 365 * DAY_SECONDS);
    assert!(gateway.sandbox().handle().survey_sends().is_empty());
    gateway.stop().await.unwrap();
}
