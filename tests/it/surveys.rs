//! SurveyService against the real server and the sandbox: what each RPC answers, and what the
//! sandbox recorded.

use std::collections::HashSet;

use cx_gateway::pb;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;
use cx_sandbox::{Api, FaultConfig, SandboxHandle};
use serde_json::Value;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::support::TestGateway;

const SURVEY_ROUTE: &str = "/api/v2/survey";

fn client(gateway: &TestGateway) -> SurveyServiceClient<Channel> {
    SurveyServiceClient::new(gateway.channel.clone())
}

fn handle(gateway: &TestGateway) -> SandboxHandle {
    gateway.sandbox().handle().clone()
}

fn recipient(email: &str) -> pb::Recipient {
    pb::Recipient {
        email: email.to_owned(),
        ..Default::default()
    }
}

fn options(mode: pb::DeliveryMode, key: &str) -> Option<pb::WriteOptions> {
    Some(pb::WriteOptions {
        mode: mode as i32,
        idempotency_key: key.to_owned(),
    })
}

fn outcomes(response: &pb::SendSurveyResponse) -> Vec<pb::RecipientOutcome> {
    response
        .results
        .iter()
        .map(|result| pb::RecipientOutcome::try_from(result.outcome).unwrap())
        .collect()
}

fn campaign(handle: &SandboxHandle, metric: &str) -> String {
    handle.transactional_campaign(metric).unwrap()
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_default()
}

async fn finished_delivery(gateway: &TestGateway, delivery_id: &str) -> pb::Delivery {
    crate::support::finished_delivery(&gateway.channel, delivery_id).await
}

// ---- SendSurvey ----

#[tokio::test]
async fn a_send_schedules_every_recipient_in_one_upstream_call() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let campaign_id = campaign(&handle, "NPS");
    let mut with_data = recipient(" Ann.Lee@Example.COM ");
    with_data.first_name = "Ann".to_owned();
    with_data.company = "Acme".to_owned();
    with_data.tags = vec!["vip".to_owned(), "beta".to_owned()];
    with_data.properties = vec![
        pb::Property {
            name: "plan".to_owned(),
            value: Some(pb::PropertyValue {
                kind: Some(pb::property_value::Kind::StringValue("pro".to_owned())),
            }),
            label: String::new(),
        },
        pb::Property {
            name: "seats".to_owned(),
            value: Some(pb::PropertyValue {
                kind: Some(pb::property_value::Kind::IntegerValue(12)),
            }),
            label: String::new(),
        },
    ];
    let response = client(&gateway)
        .send_survey(pb::SendSurveyRequest {
            survey_cooldown: Default::default(),
            campaign_id: campaign_id.clone(),
            recipients: vec![
                with_data,
                recipient("bob@example.com"),
                recipient("cy@example.org"),
            ],
            delay_days: Some(3),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.delivery_id.is_empty());
    assert_eq!(outcomes(&response), [pb::RecipientOutcome::Scheduled; 3]);
    let emails: Vec<&str> = response.results.iter().map(|r| r.email.as_str()).collect();
    assert_eq!(
        emails,
        [" Ann.Lee@Example.COM ", "bob@example.com", "cy@example.org"]
    );
    let indexes: Vec<i32> = response.results.iter().map(|r| r.index).collect();
    assert_eq!(indexes, [0, 1, 2]);
    assert!(response.results.iter().all(|r| r.error.is_none()));

    let sends = handle.survey_sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].campaign_id, campaign_id);
    assert_eq!(sends[0].delay_days, 3);
    assert_eq!(
        sends[0].recipients,
        ["ann.lee@example.com", "bob@example.com", "cy@example.org"]
    );
    assert_eq!(sends[0].scheduled.len(), 3);
    let ann = handle.retently_customer("ann.lee@example.com").unwrap();
    assert_eq!(text(&ann, "firstName"), "Ann");
    let tags: Vec<&str> = ann["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tags, ["vip", "beta"]);
    let properties = ann["properties"].as_array().unwrap();
    let seats = properties
        .iter()
        .find(|p| text(p, "name") == "seats")
        .unwrap();
    assert_eq!(text(seats, "type"), "integer");
    assert_eq!(text(seats, "value"), "12");
    assert_eq!(handle.requests_to(Api::Retently, SURVEY_ROUTE), 1);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_large_send_is_split_into_calls_of_at_most_a_hundred() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let campaign_id = campaign(&handle, "NPS");
    let emails: Vec<String> = (0..250).map(|i| format!("bulk{i}@example.com")).collect();
    let response = client(&gateway)
        .send_survey(pb::SendSurveyRequest {
            survey_cooldown: Default::default(),
            campaign_id,
            recipients: emails.iter().map(|email| recipient(email)).collect(),
            delay_days: None,
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results.len(), 250);
    for (index, result) in response.results.iter().enumerate() {
        assert_eq!(result.index, index as i32);
        assert_eq!(result.email, emails[index]);
        assert_eq!(result.outcome, pb::RecipientOutcome::Scheduled as i32);
    }
    let sends = handle.survey_sends();
    let sizes: Vec<usize> = sends.iter().map(|s| s.recipients.len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 250);
    assert!(sizes.iter().all(|size| *size <= 100), "{sizes:?}");
    assert_eq!(sends.len(), 3, "{sizes:?}");
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_recipient_surveyed_recently_is_throttled() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    // The seed's CSAT campaign throttles for 30 days.
    let campaign_id = campaign(&handle, "CSAT");
    let mut surveys = client(&gateway);
    let send = |recipients: Vec<pb::Recipient>| pb::SendSurveyRequest {
        survey_cooldown: Default::default(),
        campaign_id: campaign_id.clone(),
        recipients,
        delay_days: None,
        options: None,
    };
    let first = surveys
        .send_survey(send(vec![recipient("dora@example.com")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcomes(&first), [pb::RecipientOutcome::Scheduled]);
    let second = surveys
        .send_survey(send(vec![
            recipient("eli@example.com"),
            recipient("dora@example.com"),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        outcomes(&second),
        [
            pb::RecipientOutcome::Scheduled,
            pb::RecipientOutcome::Throttled
        ]
    );
    let sends = handle.survey_sends();
    assert_eq!(sends.len(), 2);
    // No delay asked: none sent, so the campaign's own setting applies.
    assert_eq!(sends[1].delay_days, 0);
    assert_eq!(sends[1].scheduled, ["eli@example.com"]);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_lost_answer_is_unknown_and_never_resent() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let campaign_id = campaign(&handle, "NPS");
    // The sandbox schedules the survey, then closes the connection without answering.
    handle.set_faults(
        Api::Retently,
        FaultConfig {
            drop_rate: 1.0,
            drop_after_handling: true,
            ..FaultConfig::default()
        },
    );
    let response = client(&gateway)
        .send_survey(pb::SendSurveyRequest {
            survey_cooldown: Default::default(),
            campaign_id,
            recipients: vec![recipient("hal@example.com")],
            delay_days: None,
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcomes(&response), [pb::RecipientOutcome::Unknown]);
    let error = response.results[0].error.as_ref().unwrap();
    assert_eq!(error.code, tonic::Code::Unavailable as i32);
    assert_eq!(error.reason, "UPSTREAM_CONNECTION_FAILED");
    // Applied once upstream, sent once: the gateway did not try again.
    assert_eq!(handle.requests_to(Api::Retently, SURVEY_ROUTE), 1);
    assert_eq!(handle.survey_sends().len(), 1);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn an_async_send_is_queued_then_delivered_with_its_results() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let campaign_id = campaign(&handle, "CES");
    let queued = client(&gateway)
        .send_survey(pb::SendSurveyRequest {
            survey_cooldown: Default::default(),
            campaign_id: campaign_id.clone(),
            recipients: vec![recipient("ivy@example.com"), recipient("jo@example.com")],
            delay_days: Some(0),
            options: options(pb::DeliveryMode::Async, ""),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(queued.delivery_id.starts_with("dlv_"), "{queued:?}");
    assert!(queued.results.is_empty());

    let delivery = finished_delivery(&gateway, &queued.delivery_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(delivery.method, "/cx.gateway.v1.SurveyService/SendSurvey");
    assert_eq!(delivery.item_count, 2);
    let Some(pb::delivery::Result::SendSurvey(result)) = delivery.result else {
        panic!("expected a SendSurvey result: {delivery:?}");
    };
    assert_eq!(result.delivery_id, queued.delivery_id);
    assert_eq!(outcomes(&result), [pb::RecipientOutcome::Scheduled; 2]);

    let sends = handle.survey_sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].campaign_id, campaign_id);
    assert_eq!(sends[0].recipients, ["ivy@example.com", "jo@example.com"]);
    gateway.stop().await.unwrap();
}

const CAMPAIGNS_ROUTE: &str = "/api/v2/campaigns";

#[tokio::test]
async fn a_send_to_an_unknown_campaign_is_not_found_without_a_survey_call() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let known = campaign(&handle, "NPS");
    let mut surveys = client(&gateway);
    let send = |campaign_id: &str, mode| pb::SendSurveyRequest {
        survey_cooldown: Default::default(),
        campaign_id: campaign_id.to_owned(),
        recipients: vec![recipient("kim@example.com")],
        delay_days: None,
        options: options(mode, ""),
    };
    // A known campaign: the list is read once and cached.
    surveys
        .send_survey(send(&known, pb::DeliveryMode::Sync))
        .await
        .unwrap();
    assert_eq!(handle.requests_to(Api::Retently, CAMPAIGNS_ROUTE), 1);
    assert_eq!(handle.requests_to(Api::Retently, SURVEY_ROUTE), 1);
    for (round, mode) in [pb::DeliveryMode::Sync, pb::DeliveryMode::Async]
        .into_iter()
        .enumerate()
    {
        let status = surveys
            .send_survey(send("0123456789abcdef01234567", mode))
            .await
            .expect_err("unknown campaign");
        assert_eq!(status.code(), tonic::Code::NotFound, "{mode:?}");
        let details = status.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(info.reason, "CAMPAIGN_NOT_FOUND");
        assert_eq!(info.metadata["campaign_id"], "0123456789abcdef01234567");
        // The cache missed it, so the list was read again, once.
        assert_eq!(
            handle.requests_to(Api::Retently, CAMPAIGNS_ROUTE),
            2 + round as u64
        );
    }
    // Nothing was sent, nor queued.
    assert_eq!(handle.requests_to(Api::Retently, SURVEY_ROUTE), 1);
    assert_eq!(handle.survey_sends().len(), 1);
    let dead = pb::delivery_service_client::DeliveryServiceClient::new(gateway.channel.clone())
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(dead.deliveries.is_empty(), "{dead:?}");
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn an_async_send_refused_up_front_is_retried_by_the_outbox() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let campaign_id = campaign(&handle, "STAR");
    // The campaign list is cached first, so the 429s below all meet the survey calls.
    client(&gateway)
        .list_campaigns(pb::ListCampaignsRequest::default())
        .await
        .unwrap();
    // More 429s than one delivery attempt retries: the attempt fails with nothing sent, and the
    // outbox tries the whole send again later.
    handle.set_faults(
        Api::Retently,
        FaultConfig {
            burst_429: 4,
            burst_retry_after_secs: 1,
            ..FaultConfig::default()
        },
    );
    let queued = client(&gateway)
        .send_survey(pb::SendSurveyRequest {
            survey_cooldown: Default::default(),
            campaign_id: campaign_id.clone(),
            recipients: vec![recipient("pia@example.com")],
            delay_days: None,
            options: options(pb::DeliveryMode::Async, ""),
        })
        .await
        .unwrap()
        .into_inner();
    let delivery = finished_delivery(&gateway, &queued.delivery_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    assert!(delivery.attempt_count >= 2, "{delivery:?}");
    let Some(pb::delivery::Result::SendSurvey(result)) = delivery.result else {
        panic!("expected a SendSurvey result: {delivery:?}");
    };
    assert_eq!(outcomes(&result), [pb::RecipientOutcome::Scheduled]);
    assert_eq!(handle.request_count(Api::Retently, SURVEY_ROUTE, 429), 4);
    assert_eq!(handle.request_count(Api::Retently, SURVEY_ROUTE, 200), 1);
    assert_eq!(handle.survey_sends().len(), 1);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_repeated_send_with_its_key_returns_the_first_answer_without_a_second_send() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let campaign_id = campaign(&handle, "NPS");
    let mut surveys = client(&gateway);
    let request = pb::SendSurveyRequest {
        survey_cooldown: Default::default(),
        campaign_id: campaign_id.clone(),
        recipients: vec![recipient("lou@example.com")],
        delay_days: None,
        options: options(pb::DeliveryMode::Sync, "send-lou-1"),
    };
    let first = surveys
        .send_survey(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = surveys
        .send_survey(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    assert_eq!(outcomes(&first), [pb::RecipientOutcome::Scheduled]);
    assert_eq!(handle.requests_to(Api::Retently, SURVEY_ROUTE), 1);
    assert_eq!(handle.survey_sends().len(), 1);

    // The same key with another request is refused.
    let mut other = request;
    other.recipients = vec![recipient("max@example.com")];
    let status = surveys.send_survey(other).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        status.get_error_details().error_info().unwrap().reason,
        "IDEMPOTENCY_KEY_REUSED"
    );
    assert_eq!(handle.requests_to(Api::Retently, SURVEY_ROUTE), 1);

    // ASYNC with a key: the repeat gets the same delivery id and nothing is queued twice.
    let queued_request = pb::SendSurveyRequest {
        survey_cooldown: Default::default(),
        campaign_id,
        recipients: vec![recipient("ned@example.com")],
        delay_days: None,
        options: options(pb::DeliveryMode::Async, "send-ned-1"),
    };
    let queued = surveys
        .send_survey(queued_request.clone())
        .await
        .unwrap()
        .into_inner();
    let delivery = finished_delivery(&gateway, &queued.delivery_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    let repeated = surveys
        .send_survey(queued_request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(repeated.delivery_id, queued.delivery_id);
    assert_eq!(handle.requests_to(Api::Retently, SURVEY_ROUTE), 2);
    gateway.stop().await.unwrap();
}

/// 1,000 callers each send one recipient at once: the scheduler coalesces them into calls of up
/// to 100 recipients, the sandbox never rate-limits, and each caller hears its own result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sends_share_about_ten_upstream_calls() {
    const CALLERS: usize = 1000;
    // The server allows 256 concurrent streams per connection: the callers spread over enough
    // connections that all of their calls are in flight at once, as from many services.
    const CONNECTIONS: usize = 8;
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let campaign_id = campaign(&handle, "NPS");
    // A round trip closer to a SaaS API's than a loopback emulator's: with answers in a
    // millisecond, how many calls a test machine's scheduling lets arrive in each round trip
    // varies (10 to 12 measured on two busy cores), while the property under test is that calls
    // in flight together share upstream requests.
    handle.set_faults(
        Api::Retently,
        FaultConfig {
            latency_ms: 50,
            ..FaultConfig::default()
        },
    );
    let mut channels = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.grpc_addr))
                .unwrap();
        channels.push(endpoint.connect().await.unwrap());
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CALLERS));
    let mut calls = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let mut surveys = SurveyServiceClient::new(channels[caller % CONNECTIONS].clone());
        let start = std::sync::Arc::clone(&start);
        let campaign_id = campaign_id.clone();
        calls.spawn(async move {
            let email = format!("caller{caller}@example.com");
            start.wait().await;
            let response = surveys
                .send_survey(pb::SendSurveyRequest {
                    survey_cooldown: Default::default(),
                    campaign_id,
                    recipients: vec![recipient(&email)],
                    delay_days: None,
                    options: None,
                })
                .await
                .unwrap()
                .into_inner();
            (email, response)
        });
    }
    let mut answered = HashSet::new();
    while let Some(joined) = calls.join_next().await {
        let (email, response) = joined.unwrap();
        assert_eq!(response.results.len(), 1);
        assert_eq!(response.results[0].email, email);
        assert_eq!(
            response.results[0].outcome,
            pb::RecipientOutcome::Scheduled as i32,
            "{email}: {response:?}"
        );
        answered.insert(email);
    }
    assert_eq!(answered.len(), CALLERS);

    let upstream_calls = handle.requests_to(Api::Retently, SURVEY_ROUTE);
    let sends = handle.survey_sends();
    let sizes: Vec<usize> = sends.iter().map(|s| s.recipients.len()).collect();
    println!(
        "{CALLERS} concurrent SendSurvey calls -> {upstream_calls} POST /survey requests \
         (recipients per request: {sizes:?})"
    );
    // Ten full calls, give or take a partial one that went out before the others arrived.
    assert!(upstream_calls <= 12, "{upstream_calls} upstream calls");
    assert_eq!(handle.rate_limited(Api::Retently), 0);
    assert_eq!(handle.status_count(Api::Retently, 429), 0);
    let recipients: usize = sends.iter().map(|s| s.recipients.len()).sum();
    assert_eq!(recipients, CALLERS);
    assert!(sends.iter().all(|s| s.recipients.len() <= 100));
    gateway.stop().await.unwrap();
}

// ---- campaigns, templates, scores, reports ----

#[tokio::test]
async fn campaigns_are_filtered_ordered_paged_and_read_once() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let mut surveys = client(&gateway);
    let all = surveys
        .list_campaigns(pb::ListCampaignsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.campaigns.len(), handle.campaigns().len());
    assert_eq!(all.total_size, handle.campaigns().len() as i64);
    let keys: Vec<(String, String)> = all
        .campaigns
        .iter()
        .map(|c| (c.name.clone(), c.campaign_id.clone()))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);

    let request = pb::ListCampaignsRequest {
        page_size: 2,
        r#type: pb::CampaignType::Transactional as i32,
        active: Some(true),
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut page = surveys
        .list_campaigns(request.clone())
        .await
        .unwrap()
        .into_inner();
    loop {
        assert!(page.campaigns.len() <= 2);
        seen.extend(page.campaigns.clone());
        if page.next_page_token.is_empty() {
            break;
        }
        page = surveys
            .list_campaigns(pb::ListCampaignsRequest {
                page_token: page.next_page_token.clone(),
                ..request.clone()
            })
            .await
            .unwrap()
            .into_inner();
    }
    let expected: HashSet<String> = handle
        .campaigns()
        .iter()
        .filter(|c| c["type"] == "transactional" && c["isActive"] == true)
        .map(|c| text(c, "id").to_owned())
        .collect();
    let got: HashSet<String> = seen.iter().map(|c| c.campaign_id.clone()).collect();
    assert_eq!(got, expected);
    assert!(seen.iter().all(|c| c.active
        && c.r#type == pb::CampaignType::Transactional as i32
        && c.metric != pb::Metric::Unspecified as i32
        && !c.template_id.is_empty()));

    let csat = surveys
        .list_campaigns(pb::ListCampaignsRequest {
            metric: pb::Metric::Csat as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!csat.campaigns.is_empty());
    assert!(
        csat.campaigns
            .iter()
            .all(|c| c.metric == pb::Metric::Csat as i32)
    );
    // Every list above came from one cached upstream read.
    assert_eq!(handle.requests_to(Api::Retently, "/api/v2/campaigns"), 1);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn templates_are_listed_and_read_one_by_one() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let mut surveys = client(&gateway);
    let listed = surveys
        .list_templates(pb::ListTemplatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.templates.len(), handle.templates().len());
    let nps = surveys
        .list_templates(pb::ListTemplatesRequest {
            metric: pb::Metric::Nps as i32,
            channel: pb::Channel::Email as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let expected = handle
        .templates()
        .iter()
        .filter(|t| t["metric"] == "NPS" && t["channel"] == "email")
        .count();
    assert_eq!(nps.templates.len(), expected);
    assert_eq!(handle.requests_to(Api::Retently, "/api/v2/templates"), 1);

    let first = &listed.templates[0];
    let read = surveys
        .get_template(pb::GetTemplateRequest {
            template_id: first.template_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .template
        .unwrap();
    assert_eq!(&read, first);
    let sandbox_template = handle
        .templates()
        .into_iter()
        .find(|t| text(t, "id") == first.template_id)
        .unwrap();
    assert_eq!(read.name, text(&sandbox_template, "name"));
    // Cached: a second read makes no upstream call.
    surveys
        .get_template(pb::GetTemplateRequest {
            template_id: first.template_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        handle.requests_to(Api::Retently, "/api/v2/templates/{id}"),
        1
    );

    let missing = surveys
        .get_template(pb::GetTemplateRequest {
            template_id: "0123456789abcdef01234567".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let info = missing.get_error_details().error_info().unwrap().clone();
    assert_eq!(info.metadata["upstream"], "retently");
    assert_eq!(info.metadata["status"], "404");
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn scores_match_the_responses_and_are_cached() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let mut surveys = client(&gateway);
    let nps = surveys
        .get_score(pb::GetScoreRequest {
            metric: pb::Metric::Nps as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nps.metric, pb::Metric::Nps as i32);
    let answers: Vec<i64> = handle
        .feedback()
        .iter()
        .filter(|f| f["metricsType"] == "NPS")
        .map(|f| f["score"].as_i64().unwrap())
        .collect();
    let promoters = answers.iter().filter(|s| **s >= 9).count() as i64;
    let detractors = answers.iter().filter(|s| **s <= 6).count() as i64;
    assert_eq!(nps.total_responses, answers.len() as i64);
    assert_eq!(nps.promoters_count, promoters);
    assert_eq!(nps.detractors_count, detractors);
    assert_eq!(
        nps.promoters_count + nps.passives_count + nps.detractors_count,
        nps.total_responses
    );
    assert_eq!(
        nps.score,
        nps.promoters_percent - nps.detractors_percent,
        "{nps:?}"
    );
    assert!(nps.fetch_time.is_some());

    let again = surveys
        .get_score(pb::GetScoreRequest {
            metric: pb::Metric::Nps as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, nps, "served from the cache, fetch time included");
    let star = surveys
        .get_score(pb::GetScoreRequest {
            metric: pb::Metric::Star as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(star.metric, pb::Metric::Star as i32);
    assert!((1.0..=5.0).contains(&star.score), "{star:?}");
    // `/api/v2/nps/score` is also the legacy path, which the sandbox counts as its own route.
    assert_eq!(handle.requests_to(Api::Retently, "/api/v2/nps/score"), 1);
    assert_eq!(
        handle.requests_to(Api::Retently, "/api/v2/{metric}/score"),
        1
    );
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn reports_cover_every_campaign_or_one() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let mut surveys = client(&gateway);
    let all = surveys
        .list_reports(pb::ListReportsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.total_size, handle.campaigns().len() as i64);
    let names: Vec<&str> = all.reports.iter().map(|r| r.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);

    let campaign_id = campaign(&handle, "NPS");
    let one = surveys
        .list_reports(pb::ListReportsRequest {
            campaign_id: campaign_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.reports.len(), 1);
    let report = &one.reports[0];
    assert_eq!(report.campaign_id, campaign_id);
    assert_eq!(report.metric, pb::Metric::Nps as i32);
    let sent = handle
        .outbox()
        .iter()
        .filter(|s| text(s, "campaignId") == campaign_id)
        .count() as i64;
    assert_eq!(report.delivery_stats.as_ref().unwrap().sent_count, sent);
    let latest = report.latest.as_ref().unwrap();
    let trend_total: i64 = report
        .trend
        .iter()
        .map(|p| p.score.as_ref().unwrap().total)
        .sum();
    assert_eq!(trend_total, latest.total);
    let days: Vec<(i32, i32, i32)> = report
        .trend
        .iter()
        .map(|p| {
            let d = p.day.as_ref().unwrap();
            (d.year, d.month, d.day)
        })
        .collect();
    let mut ordered = days.clone();
    ordered.sort();
    assert_eq!(days, ordered);

    let missing = surveys
        .list_reports(pb::ListReportsRequest {
            campaign_id: "0123456789abcdef01234567".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    gateway.stop().await.unwrap();
}

// ---- feedback ----

/// The sandbox's responses of a campaign, newest first (ties by id, as the upstream sorts).
fn sandbox_feedback_ids(handle: &SandboxHandle, campaign_id: &str) -> Vec<String> {
    let mut items: Vec<(String, String)> = handle
        .feedback()
        .iter()
        .filter(|f| text(f, "campaignId") == campaign_id)
        .map(|f| (text(f, "createdDate").to_owned(), text(f, "id").to_owned()))
        .collect();
    items.sort();
    items.reverse();
    items.into_iter().map(|(_, id)| id).collect()
}

#[tokio::test]
async fn feedback_pages_follow_the_upstream_with_a_pinned_end() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let mut surveys = client(&gateway);
    let campaign_id = campaign(&handle, "NPS");
    let expected = sandbox_feedback_ids(&handle, &campaign_id);
    assert!(expected.len() > 25, "the seed has enough responses");

    let request = pb::ListFeedbackRequest {
        page_size: 25,
        campaign_id: campaign_id.clone(),
        ..Default::default()
    };
    let first = surveys
        .list_feedback(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.total_size, expected.len() as i64);
    assert_eq!(first.feedback.len(), 25);
    // Responses arriving after the first page, some to this campaign, do not shift the later
    // pages.
    let mut arrived_here = 0;
    for _ in 0..50 {
        arrived_here += handle
            .simulate_feedback(20)
            .iter()
            .filter(|f| text(f, "campaignId") == campaign_id)
            .count();
        if arrived_here > 0 {
            break;
        }
    }
    assert!(arrived_here > 0);
    let mut seen: Vec<String> = first
        .feedback
        .iter()
        .map(|f| f.feedback_id.clone())
        .collect();
    let mut token = first.next_page_token.clone();
    let mut pages = 1;
    while !token.is_empty() {
        let page = surveys
            .list_feedback(pb::ListFeedbackRequest {
                page_token: token.clone(),
                // Ignored after the first page: the token fixes the size.
                page_size: 0,
                ..request.clone()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_size, expected.len() as i64);
        seen.extend(page.feedback.iter().map(|f| f.feedback_id.clone()));
        token = page.next_page_token;
        pages += 1;
    }
    assert_eq!(seen, expected);
    assert_eq!(pages, expected.len().div_ceil(25));
    assert_eq!(
        handle.requests_to(Api::Retently, "/api/v2/feedback"),
        pages as u64
    );

    // Converted fields match the upstream item, with the gateway's score category.
    let item = &first.feedback[0];
    let upstream = handle
        .feedback()
        .into_iter()
        .find(|f| text(f, "id") == item.feedback_id)
        .unwrap();
    assert_eq!(item.campaign_id, campaign_id);
    assert_eq!(item.email, text(&upstream, "email"));
    assert_eq!(item.metric, pb::Metric::Nps as i32);
    let score = upstream["score"].as_f64().unwrap();
    assert_eq!(item.score, Some(score));
    let category = if score >= 9.0 {
        pb::ScoreCategory::Promoter
    } else if score >= 7.0 {
        pb::ScoreCategory::Passive
    } else {
        pb::ScoreCategory::Detractor
    };
    assert_eq!(item.score_category, category as i32);
    assert_eq!(item.rating_category, text(&upstream, "ratingCategory"));
    assert!(item.create_time.is_some());
    assert!(item.submitted);

    // Oldest first, with a time range.
    let oldest = surveys
        .list_feedback(pb::ListFeedbackRequest {
            page_size: 1000,
            campaign_id: campaign_id.clone(),
            order: pb::TimeOrder::OldestFirst as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut now_expected = sandbox_feedback_ids(&handle, &campaign_id);
    now_expected.reverse();
    let oldest_ids: Vec<String> = oldest
        .feedback
        .iter()
        .map(|f| f.feedback_id.clone())
        .collect();
    assert_eq!(oldest_ids, now_expected);
    assert!(oldest.next_page_token.is_empty());

    // A token used with other filters is refused before any upstream call.
    let before = handle.requests_to(Api::Retently, "/api/v2/feedback");
    let status = surveys
        .list_feedback(pb::ListFeedbackRequest {
            page_token: first.next_page_token,
            email: "someone@example.com".to_owned(),
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        status
            .get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "page_token"
    );
    assert_eq!(
        handle.requests_to(Api::Retently, "/api/v2/feedback"),
        before
    );
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn one_response_is_read_and_its_tags_and_topics_are_set() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let mut surveys = client(&gateway);
    let upstream = handle.feedback().into_iter().next().unwrap();
    let feedback_id = text(&upstream, "id").to_owned();
    let read = surveys
        .get_feedback(pb::GetFeedbackRequest {
            feedback_id: feedback_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .feedback
        .unwrap();
    assert_eq!(read.feedback_id, feedback_id);
    assert_eq!(read.survey_id, text(&upstream, "surveyId"));
    assert_eq!(read.comment, text(&upstream, "comment"));
    let stored = |handle: &SandboxHandle, key: &str| -> Vec<Value> {
        handle
            .feedback()
            .into_iter()
            .find(|f| text(f, "id") == feedback_id)
            .unwrap()[key]
            .as_array()
            .unwrap()
            .clone()
    };

    // REPLACE, then APPEND.
    surveys
        .set_feedback_tags(pb::SetFeedbackTagsRequest {
            feedback_id: feedback_id.clone(),
            tags: vec!["pricing".to_owned()],
            mode: pb::UpdateMode::Replace as i32,
            options: None,
        })
        .await
        .unwrap();
    surveys
        .set_feedback_tags(pb::SetFeedbackTagsRequest {
            feedback_id: feedback_id.clone(),
            tags: vec!["onboarding".to_owned()],
            mode: pb::UpdateMode::Append as i32,
            options: None,
        })
        .await
        .unwrap();
    assert_eq!(
        stored(&handle, "feedbackTags"),
        [Value::from("pricing"), Value::from("onboarding")]
    );

    surveys
        .set_feedback_topics(pb::SetFeedbackTopicsRequest {
            feedback_id: feedback_id.clone(),
            topics: vec![
                pb::FeedbackTopic {
                    name: "Support".to_owned(),
                    sentiment: pb::Sentiment::Positive as i32,
                },
                pb::FeedbackTopic {
                    name: "Price".to_owned(),
                    sentiment: pb::Sentiment::Unspecified as i32,
                },
            ],
            mode: pb::UpdateMode::Replace as i32,
            options: None,
        })
        .await
        .unwrap();
    let topics = stored(&handle, "feedbackTopics");
    assert_eq!(
        topics,
        [
            serde_json::json!({"name": "Support", "sentiment": "positive"}),
            serde_json::json!({"name": "Price", "sentiment": "neutral"}),
        ]
    );
    // The gateway reads back what it wrote.
    let reread = surveys
        .get_feedback(pb::GetFeedbackRequest {
            feedback_id: feedback_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .feedback
        .unwrap();
    assert_eq!(reread.tags, ["pricing", "onboarding"]);
    assert_eq!(reread.topics[0].sentiment, pb::Sentiment::Positive as i32);
    assert_eq!(reread.topics[1].sentiment, pb::Sentiment::Neutral as i32);

    // ASYNC with a key: delivered once, a repeat answers with the same delivery.
    let request = pb::SetFeedbackTagsRequest {
        feedback_id: feedback_id.clone(),
        tags: vec![],
        mode: pb::UpdateMode::Replace as i32,
        options: options(pb::DeliveryMode::Async, "clear-tags-1"),
    };
    let queued = surveys
        .set_feedback_tags(request.clone())
        .await
        .unwrap()
        .into_inner();
    let delivery = finished_delivery(&gateway, &queued.delivery_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    assert!(stored(&handle, "feedbackTags").is_empty());
    let repeated = surveys
        .set_feedback_tags(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(repeated.delivery_id, queued.delivery_id);
    assert_eq!(
        handle.requests_to(Api::Retently, "/api/v2/response/tags"),
        3
    );

    // Topics, ASYNC with a key: appended once, however often the call is repeated.
    let request = pb::SetFeedbackTopicsRequest {
        feedback_id: feedback_id.clone(),
        topics: vec![pb::FeedbackTopic {
            name: "Delivery".to_owned(),
            sentiment: pb::Sentiment::Negative as i32,
        }],
        mode: pb::UpdateMode::Append as i32,
        options: options(pb::DeliveryMode::Async, "topic-delivery-1"),
    };
    let queued = surveys
        .set_feedback_topics(request.clone())
        .await
        .unwrap()
        .into_inner();
    let delivery = finished_delivery(&gateway, &queued.delivery_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    let repeated = surveys
        .set_feedback_topics(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(repeated.delivery_id, queued.delivery_id);
    let topics = stored(&handle, "feedbackTopics");
    assert_eq!(topics.len(), 3);
    assert_eq!(
        topics[2],
        serde_json::json!({"name": "Delivery", "sentiment": "negative"})
    );
    // SYNC with a key: the repeat is answered from the first call.
    let request = pb::SetFeedbackTopicsRequest {
        feedback_id: feedback_id.clone(),
        topics: vec![pb::FeedbackTopic {
            name: "Speed".to_owned(),
            sentiment: pb::Sentiment::Positive as i32,
        }],
        mode: pb::UpdateMode::Append as i32,
        options: options(pb::DeliveryMode::Sync, "topic-speed-1"),
    };
    surveys.set_feedback_topics(request.clone()).await.unwrap();
    surveys.set_feedback_topics(request).await.unwrap();
    assert_eq!(stored(&handle, "feedbackTopics").len(), 4);
    assert_eq!(
        handle.requests_to(Api::Retently, "/api/v2/response/topics"),
        3
    );

    // An unknown response: NOT_FOUND from the upstream.
    let missing = surveys
        .set_feedback_topics(pb::SetFeedbackTopicsRequest {
            feedback_id: "0123456789abcdef01234567".to_owned(),
            topics: vec![pb::FeedbackTopic {
                name: "x".to_owned(),
                sentiment: 0,
            }],
            mode: pb::UpdateMode::Append as i32,
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let missing = surveys
        .get_feedback(pb::GetFeedbackRequest {
            feedback_id: "0123456789abcdef01234567".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn sent_surveys_list_the_outbox_with_filters() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let mut surveys = client(&gateway);
    let campaign_id = campaign(&handle, "NPS");
    surveys
        .send_survey(pb::SendSurveyRequest {
            survey_cooldown: Default::default(),
            campaign_id: campaign_id.clone(),
            recipients: vec![recipient("olga@example.com")],
            delay_days: None,
            options: None,
        })
        .await
        .unwrap();
    let listed = surveys
        .list_sent_surveys(pb::ListSentSurveysRequest {
            email: "olga@example.com".to_owned(),
            campaign_id: campaign_id.clone(),
            channel: pb::Channel::Email as i32,
            sent_by: pb::SentBy::Unspecified as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_size, 1, "{listed:?}");
    let sent = &listed.sent_surveys[0];
    let upstream = handle
        .outbox()
        .into_iter()
        .find(|s| text(s, "email") == "olga@example.com")
        .unwrap();
    assert_eq!(sent.survey_id, text(&upstream, "surveyId"));
    assert_eq!(sent.campaign_id, campaign_id);
    assert_eq!(sent.campaign_name, text(&upstream, "campaign"));
    assert_eq!(sent.channel, pb::Channel::Email as i32);
    assert_eq!(sent.status, text(&upstream, "status"));
    assert!(sent.send_time.is_some());
    assert!(sent.progress.is_some());
    assert_eq!(
        sent.provider_message_id,
        text(&upstream, "mandrillMessageId")
    );

    // Paging through the whole outbox newest first matches the sandbox.
    let created: std::collections::HashMap<String, String> = handle
        .outbox()
        .iter()
        .map(|s| {
            (
                text(s, "surveyId").to_owned(),
                text(s, "surveyCreatedDate").to_owned(),
            )
        })
        .collect();
    let mut total_seen = 0;
    let mut token = String::new();
    let mut last_created: Option<String> = None;
    loop {
        let page = surveys
            .list_sent_surveys(pb::ListSentSurveysRequest {
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        total_seen += page.sent_surveys.len();
        for survey in &page.sent_surveys {
            let created = created[&survey.survey_id].clone();
            if let Some(previous) = &last_created {
                assert!(previous >= &created);
            }
            last_created = Some(created);
        }
        token = page.next_page_token;
        if token.is_empty() {
            assert_eq!(total_seen as i64, page.total_size);
            break;
        }
    }
    let reminders = surveys
        .list_sent_surveys(pb::ListSentSurveysRequest {
            sent_by: pb::SentBy::Reminder as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let expected = handle
        .outbox()
        .iter()
        .filter(|s| s["sentBy"] == "reminder")
        .count() as i64;
    assert_eq!(reminders.total_size, expected);
    gateway.stop().await.unwrap();
}

// ---- bad input ----

/// One malformed request of any SurveyService RPC.
enum Bad {
    Send(pb::SendSurveyRequest),
    Campaigns(pb::ListCampaignsRequest),
    Templates(pb::ListTemplatesRequest),
    Template(pb::GetTemplateRequest),
    Score(pb::GetScoreRequest),
    Feedback(pb::ListFeedbackRequest),
    OneFeedback(pb::GetFeedbackRequest),
    Tags(pb::SetFeedbackTagsRequest),
    Topics(pb::SetFeedbackTopicsRequest),
    Sent(pb::ListSentSurveysRequest),
    Reports(pb::ListReportsRequest),
}

async fn call(surveys: &mut SurveyServiceClient<Channel>, bad: Bad) -> tonic::Status {
    let result = match bad {
        Bad::Send(r) => surveys.send_survey(r).await.map(drop),
        Bad::Campaigns(r) => surveys.list_campaigns(r).await.map(drop),
        Bad::Templates(r) => surveys.list_templates(r).await.map(drop),
        Bad::Template(r) => surveys.get_template(r).await.map(drop),
        Bad::Score(r) => surveys.get_score(r).await.map(drop),
        Bad::Feedback(r) => surveys.list_feedback(r).await.map(drop),
        Bad::OneFeedback(r) => surveys.get_feedback(r).await.map(drop),
        Bad::Tags(r) => surveys.set_feedback_tags(r).await.map(drop),
        Bad::Topics(r) => surveys.set_feedback_topics(r).await.map(drop),
        Bad::Sent(r) => surveys.list_sent_surveys(r).await.map(drop),
        Bad::Reports(r) => surveys.list_reports(r).await.map(drop),
    };
    result.expect_err("a malformed request is refused")
}

fn ts(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos })
}

#[tokio::test]
async fn malformed_requests_are_refused_with_field_paths_and_never_reach_the_upstream() {
    let gateway = TestGateway::start().await;
    let handle = handle(&gateway);
    let mut surveys = client(&gateway);
    let campaign_id = "0123456789abcdef01234567".to_owned();
    let send = |recipients: Vec<pb::Recipient>| pb::SendSurveyRequest {
        survey_cooldown: Default::default(),
        campaign_id: campaign_id.clone(),
        recipients,
        delay_days: None,
        options: None,
    };
    let string_property = |name: &str, value: String| pb::Property {
        name: name.to_owned(),
        value: Some(pb::PropertyValue {
            kind: Some(pb::property_value::Kind::StringValue(value)),
        }),
        label: String::new(),
    };
    let tags = |tags: Vec<String>, mode: pb::UpdateMode| pb::SetFeedbackTagsRequest {
        feedback_id: "f1".to_owned(),
        tags,
        mode: mode as i32,
        options: None,
    };
    let cases: Vec<(&str, Bad, &str)> = vec![
        (
            "no campaign",
            Bad::Send(pb::SendSurveyRequest {
                campaign_id: String::new(),
                ..send(vec![recipient("a@example.com")])
            }),
            "campaign_id",
        ),
        ("no recipients", Bad::Send(send(vec![])), "recipients"),
        (
            "too many recipients",
            Bad::Send(send(
                (0..10_001)
                    .map(|i| recipient(&format!("r{i}@example.com")))
                    .collect(),
            )),
            "recipients",
        ),
        (
            "a bad email",
            Bad::Send(send(vec![
                recipient("a@example.com"),
                recipient("not-an-email"),
            ])),
            "recipients[1].email",
        ),
        (
            "a repeated email, differently spelled",
            Bad::Send(send(vec![
                recipient("a@example.com"),
                recipient("b@example.com"),
                recipient(" A@Example.com"),
            ])),
            "recipients[2].email",
        ),
        (
            "a long first name",
            Bad::Send(send(vec![pb::Recipient {
                first_name: "x".repeat(1001),
                ..recipient("a@example.com")
            }])),
            "recipients[0].first_name",
        ),
        (
            "an empty tag",
            Bad::Send(send(vec![pb::Recipient {
                tags: vec!["ok".to_owned(), String::new()],
                ..recipient("a@example.com")
            }])),
            "recipients[0].tags[1]",
        ),
        (
            "a property value too long",
            Bad::Send(send(vec![pb::Recipient {
                properties: vec![string_property("plan", "x".repeat(1001))],
                ..recipient("a@example.com")
            }])),
            "recipients[0].properties[0].value.string_value",
        ),
        (
            "a reserved property name",
            Bad::Send(send(vec![pb::Recipient {
                properties: vec![string_property("email", "x".to_owned())],
                ..recipient("a@example.com")
            }])),
            "recipients[0].properties[0].name",
        ),
        (
            "a negative delay",
            Bad::Send(pb::SendSurveyRequest {
                delay_days: Some(-1),
                ..send(vec![recipient("a@example.com")])
            }),
            "delay_days",
        ),
        (
            "a delay over a year",
            Bad::Send(pb::SendSurveyRequest {
                delay_days: Some(366),
                ..send(vec![recipient("a@example.com")])
            }),
            "delay_days",
        ),
        (
            "an idempotency key with a space",
            Bad::Send(pb::SendSurveyRequest {
                options: options(pb::DeliveryMode::Sync, "a key"),
                ..send(vec![recipient("a@example.com")])
            }),
            "options.idempotency_key",
        ),
        (
            "an unknown delivery mode",
            Bad::Send(pb::SendSurveyRequest {
                options: Some(pb::WriteOptions {
                    mode: 9,
                    idempotency_key: String::new(),
                }),
                ..send(vec![recipient("a@example.com")])
            }),
            "options.mode",
        ),
        (
            "a page too large",
            Bad::Campaigns(pb::ListCampaignsRequest {
                page_size: 1001,
                ..Default::default()
            }),
            "page_size",
        ),
        (
            "an unknown campaign type",
            Bad::Campaigns(pb::ListCampaignsRequest {
                r#type: 42,
                ..Default::default()
            }),
            "type",
        ),
        (
            "a forged campaigns page token",
            Bad::Campaigns(pb::ListCampaignsRequest {
                page_token: "forged".to_owned(),
                ..Default::default()
            }),
            "page_token",
        ),
        (
            "an unknown template channel",
            Bad::Templates(pb::ListTemplatesRequest {
                channel: 17,
                ..Default::default()
            }),
            "channel",
        ),
        (
            "no template id",
            Bad::Template(pb::GetTemplateRequest::default()),
            "template_id",
        ),
        (
            "a template id that walks up the path",
            Bad::Template(pb::GetTemplateRequest {
                template_id: "..".to_owned(),
            }),
            "template_id",
        ),
        (
            "no metric",
            Bad::Score(pb::GetScoreRequest::default()),
            "metric",
        ),
        (
            "an unknown metric",
            Bad::Score(pb::GetScoreRequest { metric: 8 }),
            "metric",
        ),
        (
            "a negative feedback page size",
            Bad::Feedback(pb::ListFeedbackRequest {
                page_size: -5,
                ..Default::default()
            }),
            "page_size",
        ),
        (
            "a time range ending before it starts",
            Bad::Feedback(pb::ListFeedbackRequest {
                start_time: ts(1_700_000_000, 0),
                end_time: ts(1_600_000_000, 0),
                ..Default::default()
            }),
            "end_time",
        ),
        (
            "an invalid start instant",
            Bad::Feedback(pb::ListFeedbackRequest {
                start_time: ts(1_700_000_000, -1),
                ..Default::default()
            }),
            "start_time",
        ),
        (
            "a long email filter",
            Bad::Feedback(pb::ListFeedbackRequest {
                email: format!("{}@example.com", "x".repeat(250)),
                ..Default::default()
            }),
            "email",
        ),
        (
            "an unknown order",
            Bad::Feedback(pb::ListFeedbackRequest {
                order: 3,
                ..Default::default()
            }),
            "order",
        ),
        (
            "a forged feedback page token",
            Bad::Feedback(pb::ListFeedbackRequest {
                page_token: "dTE6Mjox".to_owned(),
                ..Default::default()
            }),
            "page_token",
        ),
        (
            "a feedback id that names the list",
            Bad::OneFeedback(pb::GetFeedbackRequest {
                feedback_id: ".".to_owned(),
            }),
            "feedback_id",
        ),
        (
            "tags without a mode",
            Bad::Tags(tags(vec!["a".to_owned()], pb::UpdateMode::Unspecified)),
            "mode",
        ),
        (
            "nothing to append",
            Bad::Tags(tags(vec![], pb::UpdateMode::Append)),
            "tags",
        ),
        (
            "a repeated tag",
            Bad::Tags(tags(
                vec!["a".to_owned(), "b".to_owned(), "a".to_owned()],
                pb::UpdateMode::Replace,
            )),
            "tags[2]",
        ),
        (
            "too many tags",
            Bad::Tags(tags(
                (0..101).map(|i| format!("t{i}")).collect(),
                pb::UpdateMode::Replace,
            )),
            "tags",
        ),
        (
            "tags of no response",
            Bad::Tags(pb::SetFeedbackTagsRequest {
                feedback_id: String::new(),
                ..tags(vec!["a".to_owned()], pb::UpdateMode::Replace)
            }),
            "feedback_id",
        ),
        (
            "a topic without a name",
            Bad::Topics(pb::SetFeedbackTopicsRequest {
                feedback_id: "f1".to_owned(),
                topics: vec![pb::FeedbackTopic {
                    name: String::new(),
                    sentiment: 1,
                }],
                mode: pb::UpdateMode::Append as i32,
                options: None,
            }),
            "topics[0].name",
        ),
        (
            "an unknown sentiment",
            Bad::Topics(pb::SetFeedbackTopicsRequest {
                feedback_id: "f1".to_owned(),
                topics: vec![pb::FeedbackTopic {
                    name: "price".to_owned(),
                    sentiment: 7,
                }],
                mode: pb::UpdateMode::Append as i32,
                options: None,
            }),
            "topics[0].sentiment",
        ),
        (
            "the OTHER channel as a filter",
            Bad::Sent(pb::ListSentSurveysRequest {
                channel: pb::Channel::Other as i32,
                ..Default::default()
            }),
            "channel",
        ),
        (
            "the OTHER cause as a filter",
            Bad::Sent(pb::ListSentSurveysRequest {
                sent_by: pb::SentBy::Other as i32,
                ..Default::default()
            }),
            "sent_by",
        ),
        (
            "a long campaign filter",
            Bad::Sent(pb::ListSentSurveysRequest {
                campaign_id: "c".repeat(65),
                ..Default::default()
            }),
            "campaign_id",
        ),
        (
            "a template id that is not an id",
            Bad::Template(pb::GetTemplateRequest {
                template_id: "tmpl 1".to_owned(),
            }),
            "template_id",
        ),
        (
            "a feedback id with a slash",
            Bad::OneFeedback(pb::GetFeedbackRequest {
                feedback_id: "a/b".to_owned(),
            }),
            "feedback_id",
        ),
        (
            "a campaign filter with non-ASCII characters",
            Bad::Feedback(pb::ListFeedbackRequest {
                campaign_id: "сampaign".to_owned(),
                ..Default::default()
            }),
            "campaign_id",
        ),
        (
            "a send to a campaign id of the wrong shape",
            Bad::Send(pb::SendSurveyRequest {
                campaign_id: "5f1e?x=1".to_owned(),
                recipients: vec![recipient("ann@example.com")],
                ..Default::default()
            }),
            "campaign_id",
        ),
        (
            "a recipient address with a zero-width space",
            Bad::Send(pb::SendSurveyRequest {
                campaign_id: "5f1ec45y27b8313876299999".to_owned(),
                recipients: vec![recipient("ann\u{200B}@example.com")],
                ..Default::default()
            }),
            "recipients[0].email",
        ),
        (
            "a report campaign that walks up the path",
            Bad::Reports(pb::ListReportsRequest {
                campaign_id: "..".to_owned(),
                ..Default::default()
            }),
            "campaign_id",
        ),
    ];
    assert!(cases.len() >= 20);
    let before = handle.request_counts();
    for (name, bad, field) in cases {
        let status = call(&mut surveys, bad).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}");
        let details = status.get_error_details();
        assert_eq!(
            details.error_info().unwrap().reason,
            "INVALID_FIELDS",
            "{name}"
        );
        let fields: Vec<String> = details
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect();
        assert_eq!(fields, [field], "{name}");
    }
    assert_eq!(handle.request_counts(), before);
    assert!(before.is_empty(), "{before:?}");
    gateway.stop().await.unwrap();
}
