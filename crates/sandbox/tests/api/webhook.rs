//! Webhook deliveries to a tiny receiver, with and without the signature.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use cx_sandbox::{SandboxConfig, WebhookConfig};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::support::{TestSandbox, eventually};

struct Delivery {
    headers: HeaderMap,
    body: Bytes,
}

/// Receives deliveries on `127.0.0.1:0`, answering `status`, and hands each one to the test.
async fn receiver(status: StatusCode) -> (String, mpsc::UnboundedReceiver<Delivery>) {
    let (deliveries, received) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/hook",
            post(
                |State((deliveries, status)): State<(
                    mpsc::UnboundedSender<Delivery>,
                    StatusCode,
                )>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let _ = deliveries.send(Delivery { headers, body });
                    status
                },
            ),
        )
        .with_state((deliveries, status));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

async fn next(received: &mut mpsc::UnboundedReceiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), received.recv())
        .await
        .expect("a delivery within 5 s")
        .expect("the receiver is running")
}

#[tokio::test]
async fn new_feedback_is_posted_with_custom_headers_and_no_signature() {
    let (url, mut received) = receiver(StatusCode::OK).await;
    let mut webhook = WebhookConfig::new(url);
    webhook.headers = vec![("X-Token".to_owned(), "receiver-token".to_owned())];
    let sandbox = TestSandbox::start_with(SandboxConfig {
        webhook: Some(webhook),
        ..SandboxConfig::default()
    })
    .await;
    let created = sandbox.handle.simulate_feedback(2);
    assert_eq!(created.len(), 2);
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let delivery = next(&mut received).await;
        assert_eq!(delivery.headers["x-token"], "receiver-token");
        assert_eq!(delivery.headers["content-type"], "application/json");
        assert!(!delivery.headers.contains_key("x-cx-signature"));
        bodies.push(serde_json::from_slice::<Value>(&delivery.body).unwrap());
    }
    for item in &created {
        let body = bodies
            .iter()
            .find(|body| body["feedback"]["id"] == item["id"])
            .expect("a delivery per new response");
        assert_eq!(body["event"], "feedback.created");
        // The same object as `GET /feedback` lists.
        assert_eq!(body["feedback"], *item);
    }
    // The new responses are in the API too.
    let id = created[0]["id"].as_str().unwrap();
    let (status, single) = sandbox
        .retently_get(&format!("/api/v2/feedback/{id}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(single["data"], created[0]);
    let handle = sandbox.handle.clone();
    eventually("two deliveries counted", || {
        let handle = handle.clone();
        async move { handle.webhook_stats().delivered == 2 }
    })
    .await;
}

#[tokio::test]
async fn signed_deliveries_verify_with_hmac_sha256() {
    let (url, mut received) = receiver(StatusCode::NO_CONTENT).await;
    let sandbox = TestSandbox::start().await;
    // Configured at run time through the admin API.
    let put = sandbox
        .request(Method::PUT, "/_sandbox/webhook")
        .json(&json!({"url": url, "signingSecret": "whsec-test", "headers": {"X-Env": "test"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    let shown: Value = sandbox
        .request(Method::GET, "/_sandbox/webhook")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["webhook"]["signed"], true);
    assert!(!shown.to_string().contains("whsec-test"));

    let simulated: Value = sandbox
        .request(Method::POST, "/_sandbox/feedback/simulate")
        .json(&json!({"count": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let delivery = next(&mut received).await;
    assert_eq!(delivery.headers["x-env"], "test");
    let header = delivery.headers["x-cx-signature"].to_str().unwrap();
    let (t, v1) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
        .expect("t=<unix>,v1=<hex>");
    let unix: i64 = t.parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - unix).abs() < 300);
    let tag: Vec<u8> = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&v1[i..i + 2], 16).unwrap())
        .collect();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"whsec-test");
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(&delivery.body);
    assert!(ring::hmac::verify(&key, &message, &tag).is_ok());
    // A tampered body does not verify.
    message.push(b' ');
    assert!(ring::hmac::verify(&key, &message, &tag).is_err());
    let body: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(body["feedback"], simulated["feedback"][0]);

    let cleared = sandbox
        .request(Method::DELETE, "/_sandbox/webhook")
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 204);
    sandbox.handle.simulate_feedback(1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), received.recv())
            .await
            .is_err(),
        "no delivery once the webhook is removed"
    );
}

#[tokio::test]
async fn failed_deliveries_are_counted_and_templates_shape_the_body() {
    let (url, mut received) = receiver(StatusCode::INTERNAL_SERVER_ERROR).await;
    let mut webhook = WebhookConfig::new(url);
    webhook.body_template = Some(
        json!({"text": "{{feedback.comment}}", "score": "{{feedback.score}}", "source": "retently"}),
    );
    let sandbox = TestSandbox::start().await;
    sandbox.handle.set_webhook(Some(webhook));
    let created = sandbox.handle.simulate_feedback(1);
    let delivery = next(&mut received).await;
    let body: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(
        body,
        json!({"text": created[0]["comment"], "score": created[0]["score"], "source": "retently"})
    );
    let handle = sandbox.handle.clone();
    eventually("a failed delivery counted", || {
        let handle = handle.clone();
        async move { handle.webhook_stats().failed == 1 }
    })
    .await;

    // Nobody listening: also a failure, and the request path is not blocked by it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = format!("http://{}/hook", listener.local_addr().unwrap());
    drop(listener);
    sandbox.handle.set_webhook(Some(WebhookConfig::new(closed)));
    let simulated = sandbox
        .request(Method::POST, "/_sandbox/feedback/simulate")
        .json(&json!({"count": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(simulated.status(), 200);
    eventually("three more failures", || {
        let handle = handle.clone();
        async move { handle.webhook_stats().failed == 4 }
    })
    .await;
    assert_eq!(sandbox.handle.webhook_stats().delivered, 0);
}

#[tokio::test]
async fn background_simulation_delivers_a_stream_of_responses() {
    let (url, mut received) = receiver(StatusCode::OK).await;
    let sandbox = TestSandbox::start_with(SandboxConfig {
        simulate_feedback_per_second: Some(50.0),
        webhook: Some(WebhookConfig::new(url)),
        ..SandboxConfig::default()
    })
    .await;
    let before = 500;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..5 {
        let delivery = next(&mut received).await;
        let body: Value = serde_json::from_slice(&delivery.body).unwrap();
        assert!(ids.insert(body["feedback"]["id"].as_str().unwrap().to_owned()));
    }
    assert!(sandbox.handle.feedback().len() >= before + 5);
    sandbox.stop().await;
}
