//! Questions answered from the feedback log with no upstream request:
//! `SurveyService.GetCustomerFeedbackHistory`, and `SurveyService.ListFeedback` over a range the
//! log covers (compared with the same listing read from the upstream).
//!
//! The poller fills the log from the sandbox; then the sandbox holds every further Retently
//! request, so the poller stands still (its next request is held) and any request the answer
//! needed would show up as one more held request.

use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::feedback_stream_client::FeedbackStreamClient;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;
use cx_sandbox::{Api, SandboxConfig, SeedConfig};
use tonic::Streaming;
use tonic_types::StatusExt as _;

use crate::support::{TestGateway, eventually};

const PATIENCE: Duration = Duration::from_secs(30);

/// Two customers, so each answers several of the simulated surveys; no responses before the
/// test makes them, and no rate limit.
fn sandbox_config() -> SandboxConfig {
    SandboxConfig {
        retently_requests_per_minute: 0,
        seed: SeedConfig {
            customers: 2,
            feedback: 0,
            ..SeedConfig::default()
        },
        ..SandboxConfig::default()
    }
}

fn settings() -> Vec<(&'static str, String)> {
    vec![
        ("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "6000".to_owned()),
        ("CXGW_FEEDBACK_POLL_INTERVAL", "100ms".to_owned()),
        ("CXGW_FEEDBACK_RESCAN_INTERVAL", "0s".to_owned()),
        ("CXGW_FEEDBACK_HEARTBEAT_INTERVAL", "100ms".to_owned()),
    ]
}

/// The next `count` responses the stream announces.
async fn feedback_events(
    stream: &mut Streaming<pb::SubscribeResponse>,
    count: usize,
) -> Vec<pb::Feedback> {
    let mut found = Vec::with_capacity(count);
    tokio::time::timeout(PATIENCE, async {
        while found.len() < count {
            let message = stream
                .message()
                .await
                .expect("stream")
                .expect("open stream");
            if let Some(pb::subscribe_response::Payload::FeedbackEvent(event)) = message.payload {
                found.push(event.feedback.expect("feedback"));
            }
        }
    })
    .await
    .expect("the responses reached the log in time");
    found
}

fn total_requests(handle: &cx_sandbox::SandboxHandle) -> u64 {
    handle
        .request_counts()
        .iter()
        .map(|count| count.count)
        .sum()
}

fn key(feedback: &pb::Feedback) -> (i64, i32, String) {
    let time = feedback.create_time.unwrap();
    (time.seconds, time.nanos, feedback.feedback_id.clone())
}

/// Waits until a complete poll started after the newest of `logged` was created, so the log's
/// coverage includes every one of them. A poll that started just before a response was created
/// can still return it (and stream it) while vouching only for what came before its start; on a
/// slow machine that poll is often the last one before the test holds the poller.
async fn synced_past(channel: &tonic::transport::Channel, logged: &[pb::Feedback]) {
    let newest = logged.iter().map(key).max().expect("responses");
    let mut client = SurveyServiceClient::new(channel.clone());
    tokio::time::timeout(PATIENCE, async {
        loop {
            let answer = client
                .get_customer_feedback_history(pb::GetCustomerFeedbackHistoryRequest {
                    email: logged[0].email.clone(),
                    ..Default::default()
                })
                .await
                .expect("history")
                .into_inner();
            if let Some(synced) = answer.synced_until
                && (synced.seconds, synced.nanos) > (newest.0, newest.1)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a complete poll started after the newest response");
}

#[tokio::test]
async fn customer_history_comes_from_the_log_with_no_upstream_request() {
    let gateway = TestGateway::start_with(sandbox_config(), settings()).await;
    let handle = gateway.sandbox().handle().clone();
    let mut stream = FeedbackStreamClient::new(gateway.channel.clone())
        .subscribe(pb::SubscribeRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    let simulated = handle.simulate_feedback(12);
    assert_eq!(simulated.len(), 12);
    let logged = feedback_events(&mut stream, simulated.len()).await;
    synced_past(&gateway.channel, &logged).await;

    // The poller's next request waits in the sandbox: from here on, nothing reaches it.
    handle.hold_after(Api::Retently, 0);
    eventually("the poller's next request is held", PATIENCE, || {
        handle.held(Api::Retently) == 1
    })
    .await;
    let requests_before = total_requests(&handle);

    // The customer with the most responses, named by email in other letters.
    let email = {
        let mut emails: Vec<&str> = logged.iter().map(|f| f.email.as_str()).collect();
        emails.sort_unstable();
        let mut best = (0, "");
        for email in &emails {
            let count = emails.iter().filter(|e| *e == email).count();
            best = best.max((count, email));
        }
        best.1.to_owned()
    };
    let mut expected: Vec<pb::Feedback> = logged
        .iter()
        .filter(|feedback| feedback.email == email)
        .cloned()
        .collect();
    expected.sort_by_key(|feedback| std::cmp::Reverse(key(feedback)));
    assert!(expected.len() >= 6, "{} responses", expected.len());

    let mut client = SurveyServiceClient::new(gateway.channel.clone());
    let request = pb::GetCustomerFeedbackHistoryRequest {
        email: email.to_uppercase(),
        page_size: 4,
        trend_window: 4,
        ..Default::default()
    };
    let mut pages = Vec::new();
    let mut page_token = String::new();
    let first = loop {
        let page = client
            .get_customer_feedback_history(pb::GetCustomerFeedbackHistoryRequest {
                page_token: page_token.clone(),
                ..request.clone()
            })
            .await
            .expect("history")
            .into_inner();
        assert!(page.feedback.len() <= 4);
        assert_eq!(page.total_size, expected.len() as i64);
        page_token = page.next_page_token.clone();
        pages.push(page);
        if page_token.is_empty() {
            break pages[0].clone();
        }
    };
    let history: Vec<pb::Feedback> = pages.iter().flat_map(|p| p.feedback.clone()).collect();
    assert_eq!(
        history, expected,
        "all of the customer's responses, newest first"
    );
    assert_eq!(pages.len(), expected.len().div_ceil(4));

    // The same customer by Retently id: the same answer.
    let by_id = client
        .get_customer_feedback_history(pb::GetCustomerFeedbackHistoryRequest {
            retently_customer_id: expected[0].retently_customer_id.clone(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("history by id")
        .into_inner();
    assert_eq!(by_id.feedback, expected);

    // Summaries from the same responses.
    for summary in &first.summaries {
        let of_metric: Vec<&pb::Feedback> = expected
            .iter()
            .filter(|feedback| feedback.metric == summary.metric)
            .collect();
        let scores: Vec<f64> = of_metric.iter().filter_map(|f| f.score).collect();
        assert_eq!(summary.response_count, of_metric.len() as i64);
        assert_eq!(summary.scored_count, scores.len() as i64);
        assert_eq!(summary.latest_score, scores.first().copied());
        assert_eq!(
            summary.first_response_time,
            of_metric.last().unwrap().create_time
        );
        assert_eq!(
            summary.last_response_time,
            of_metric.first().unwrap().create_time
        );
        if !scores.is_empty() {
            let average = scores.iter().sum::<f64>() / scores.len() as f64;
            assert!((summary.average_score.unwrap() - average).abs() < 1e-9);
        }
        assert_eq!(summary.trend_window_size as usize, scores.len().min(4));
    }
    let answered: usize = first
        .summaries
        .iter()
        .map(|s| s.response_count as usize)
        .sum();
    assert_eq!(answered, expected.len());

    // The answer says how fresh the log is: it synced past every response it returned.
    let synced_until = first.synced_until.expect("synced_until");
    let newest = expected[0].create_time.unwrap();
    assert!((synced_until.seconds, synced_until.nanos) >= (newest.seconds, newest.nanos));
    assert!(first.covered_since.is_some());

    // Bad input is refused with field violations.
    let both = client
        .get_customer_feedback_history(pb::GetCustomerFeedbackHistoryRequest {
            email: email.clone(),
            retently_customer_id: expected[0].retently_customer_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(both.code(), tonic::Code::InvalidArgument);
    let violations = both.get_details_bad_request().expect("bad request");
    assert_eq!(violations.field_violations[0].field, "retently_customer_id");
    let forged = client
        .get_customer_feedback_history(pb::GetCustomerFeedbackHistoryRequest {
            email: email.clone(),
            page_token: "bm90LWEtdG9rZW4".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::InvalidArgument);
    let violations = forged.get_details_bad_request().expect("bad request");
    assert_eq!(violations.field_violations[0].field, "page_token");

    // Not one request reached the upstream for all of the above.
    assert_eq!(handle.held(Api::Retently), 1);
    assert_eq!(total_requests(&handle), requests_before);
    handle.release(Api::Retently);
    gateway.stop().await.unwrap();
}

/// Every page of one `ListFeedback` listing, and the sources that answered them.
async fn list_all(
    client: &mut SurveyServiceClient<tonic::transport::Channel>,
    request: pb::ListFeedbackRequest,
) -> (Vec<pb::Feedback>, i64, Vec<pb::FeedbackListSource>) {
    let mut items = Vec::new();
    let mut sources = Vec::new();
    let mut total = None;
    let mut page_token = String::new();
    loop {
        let page = client
            .list_feedback(pb::ListFeedbackRequest {
                page_token: page_token.clone(),
                ..request.clone()
            })
            .await
            .expect("list feedback")
            .into_inner();
        assert!(page.feedback.len() <= 3);
        assert_eq!(*total.get_or_insert(page.total_size), page.total_size);
        sources.push(page.source());
        items.extend(page.feedback);
        page_token = page.next_page_token;
        if page_token.is_empty() {
            return (items, total.unwrap_or_default(), sources);
        }
    }
}

#[tokio::test]
async fn list_feedback_is_served_from_the_log_when_it_covers_the_range_and_matches_the_upstream() {
    let gateway = TestGateway::start_with(sandbox_config(), settings()).await;
    let handle = gateway.sandbox().handle().clone();
    let mut stream = FeedbackStreamClient::new(gateway.channel.clone())
        .subscribe(pb::SubscribeRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    let simulated = handle.simulate_feedback(14);
    let logged = feedback_events(&mut stream, simulated.len()).await;
    synced_past(&gateway.channel, &logged).await;
    handle.hold_after(Api::Retently, 0);
    eventually("the poller's next request is held", PATIENCE, || {
        handle.held(Api::Retently) == 1
    })
    .await;
    let requests_before = total_requests(&handle);

    let mut client = SurveyServiceClient::new(gateway.channel.clone());
    // The log's coverage, as the history answer reports it.
    let coverage = client
        .get_customer_feedback_history(pb::GetCustomerFeedbackHistoryRequest {
            email: logged[0].email.clone(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    let covered_since = coverage.covered_since.expect("covered_since");
    let synced_until = coverage.synced_until.expect("synced_until");
    let far_future = prost_types::Timestamp {
        seconds: synced_until.seconds + 3600,
        nanos: 0,
    };
    let filters = [
        pb::ListFeedbackRequest::default(),
        pb::ListFeedbackRequest {
            order: pb::TimeOrder::OldestFirst as i32,
            ..Default::default()
        },
        pb::ListFeedbackRequest {
            campaign_id: logged[0].campaign_id.clone(),
            ..Default::default()
        },
        pb::ListFeedbackRequest {
            email: logged[1].email.clone(),
            order: pb::TimeOrder::OldestFirst as i32,
            ..Default::default()
        },
        pb::ListFeedbackRequest {
            retently_customer_id: logged[2].retently_customer_id.clone(),
            campaign_id: logged[2].campaign_id.clone(),
            ..Default::default()
        },
    ];
    let mut from_log = Vec::new();
    for filter in &filters {
        // A page read from the upstream would wait in the sandbox: fail instead of hanging.
        let (items, total, sources) = tokio::time::timeout(
            PATIENCE,
            list_all(
                &mut client,
                pb::ListFeedbackRequest {
                    page_size: 3,
                    start_time: Some(covered_since),
                    end_time: Some(synced_until),
                    ..filter.clone()
                },
            ),
        )
        .await
        .expect("the log answers without the upstream");
        assert!(
            sources.iter().all(|s| *s == pb::FeedbackListSource::Log),
            "{sources:?}"
        );
        assert_eq!(total, items.len() as i64);
        from_log.push(items);
    }
    assert_eq!(from_log[0].len(), logged.len(), "every response, once");
    // Not one request reached the upstream for the log's pages.
    assert_eq!(handle.held(Api::Retently), 1);
    assert_eq!(total_requests(&handle), requests_before);

    // A range reaching past the last complete poll goes upstream: its request reaches the
    // sandbox (held there beside the poller's) before the answer comes.
    let uncovered = pb::ListFeedbackRequest {
        page_size: 3,
        start_time: Some(covered_since),
        end_time: Some(far_future),
        ..Default::default()
    };
    let call = {
        let mut client = client.clone();
        let request = uncovered.clone();
        tokio::spawn(async move { client.list_feedback(request).await })
    };
    eventually("the upstream call reaches the sandbox", PATIENCE, || {
        handle.held(Api::Retently) == 2
    })
    .await;
    handle.release(Api::Retently);
    let first = call.await.unwrap().expect("upstream page").into_inner();
    assert_eq!(first.source(), pb::FeedbackListSource::Upstream);

    // The same filters over the upstream: the very same responses, order, totals and paging.
    for (filter, logged_items) in filters.iter().zip(&from_log) {
        let (items, total, sources) =
            list_all(&mut client, with_filter(uncovered.clone(), filter)).await;
        assert!(
            sources
                .iter()
                .all(|s| *s == pb::FeedbackListSource::Upstream),
            "{sources:?}"
        );
        assert_eq!(total, items.len() as i64);
        assert_eq!(&items, logged_items);
    }
    assert_eq!(first.feedback, from_log[0][..3]);
    gateway.stop().await.unwrap();
}

/// `request` with the filters and order of `filter`.
fn with_filter(
    request: pb::ListFeedbackRequest,
    filter: &pb::ListFeedbackRequest,
) -> pb::ListFeedbackRequest {
    pb::ListFeedbackRequest {
        campaign_id: filter.campaign_id.clone(),
        retently_customer_id: filter.retently_customer_id.clone(),
        email: filter.email.clone(),
        order: filter.order,
        ..request
    }
}
