//! Each fault mode, per API, through the in-process handle and the admin API.

use std::time::Duration;

use cx_sandbox::{Api, FaultConfig, FaultCounts, SandboxConfig, SlowBody};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::TestSandbox;

async fn unlimited() -> TestSandbox {
    TestSandbox::start_with(SandboxConfig {
        retently_requests_per_minute: 0,
        ..SandboxConfig::default()
    })
    .await
}

#[tokio::test]
async fn error_rate_answers_5xx_without_applying_the_request() {
    let sandbox = unlimited().await;
    sandbox.handle.set_faults(
        Api::Retently,
        FaultConfig {
            error_rate: 1.0,
            error_statuses: vec![503],
            ..FaultConfig::default()
        },
    );
    let (status, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/customers",
            &json!({"subscribers": [{"email": "lost@example.com"}]}),
        )
        .await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        json!({"message": "Service Unavailable", "code": 503, "data": null})
    );
    assert!(
        sandbox
            .handle
            .retently_customer("lost@example.com")
            .is_none()
    );
    // Faults come before auth: even a keyless request sees the outage.
    let keyless = sandbox
        .request(Method::GET, "/api/v2/ping")
        .send()
        .await
        .unwrap();
    assert_eq!(keyless.status(), 503);
    // Retainly has its own faults and is unaffected.
    let (status, _) = sandbox
        .retainly_send(
            Method::POST,
            "/events",
            &json!({"customer_id": 1, "event": "x"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(sandbox.handle.fault_counts(Api::Retently).errors, 2);
    assert_eq!(
        sandbox.handle.fault_counts(Api::Retainly),
        FaultCounts::default()
    );
    assert_eq!(
        sandbox
            .handle
            .request_count(Api::Retently, "/api/v2/customers", 503),
        1
    );

    sandbox.handle.clear_faults(Api::Retently);
    let (status, _) = sandbox.retently_get("/api/v2/ping").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn error_rates_are_reproducible_from_the_seed() {
    let faults = FaultConfig {
        error_rate: 0.5,
        error_statuses: vec![500, 502],
        ..FaultConfig::default()
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let sandbox = unlimited().await;
        sandbox.handle.set_faults(Api::Retainly, faults.clone());
        let mut statuses = Vec::new();
        for n in 0..40 {
            let (status, _) = sandbox
                .retainly_send(
                    Method::POST,
                    "/events",
                    &json!({"customer_id": n, "event": "x"}),
                )
                .await;
            statuses.push(status);
        }
        // Only successful events were recorded.
        let ok = statuses.iter().filter(|status| **status == 200).count();
        assert_eq!(sandbox.handle.retainly_events().len(), ok);
        assert!(statuses.iter().all(|s| [200, 500, 502].contains(s)));
        assert!(
            (5..=35).contains(&ok),
            "{ok} of 40 succeeded at a 50% error rate"
        );
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
}

#[tokio::test]
async fn latency_is_added_before_handling() {
    let sandbox = unlimited().await;
    sandbox.handle.set_faults(
        Api::Retently,
        FaultConfig {
            latency_ms: 30_000,
            ..FaultConfig::default()
        },
    );
    // The client gives up long before the added latency ends.
    let attempt = sandbox
        .retently(Method::GET, "/api/v2/ping")
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(attempt.unwrap_err().is_timeout());
    assert_eq!(sandbox.handle.fault_counts(Api::Retently).delayed, 1);
    // The other API is not slowed.
    let (status, _) = sandbox
        .retainly_send(
            Method::POST,
            "/events",
            &json!({"customer_id": 1, "event": "x"}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn forced_429_bursts_count_down() {
    let sandbox = unlimited().await;
    sandbox.handle.set_faults(
        Api::Retently,
        FaultConfig {
            burst_429: 3,
            burst_retry_after_secs: 7,
            ..FaultConfig::default()
        },
    );
    for _ in 0..3 {
        let response = sandbox
            .retently(Method::GET, "/api/v2/ping")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "7");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["message"], "Too many requests.");
    }
    let (status, _) = sandbox.retently_get("/api/v2/ping").await;
    assert_eq!(status, 200);
    assert_eq!(sandbox.handle.fault_counts(Api::Retently).forced_429, 3);
    assert_eq!(sandbox.handle.faults(Api::Retently).burst_429, 0);
    // Forced bursts are faults, not rate-limit rejections.
    assert_eq!(sandbox.handle.rate_limited(Api::Retently), 0);
    assert_eq!(sandbox.handle.status_count(Api::Retently, 429), 3);
}

#[tokio::test]
async fn dropped_connections_get_no_response() {
    let sandbox = unlimited().await;
    sandbox.handle.set_faults(
        Api::Retainly,
        FaultConfig {
            drop_rate: 1.0,
            ..FaultConfig::default()
        },
    );
    let body = json!({"customers": [{"id": "dropped-before"}]});
    let outcome = sandbox
        .retainly(Method::POST, "/customers")
        .json(&body)
        .send()
        .await;
    assert!(
        failed(outcome).await,
        "a dropped request must fail on the client"
    );
    assert!(
        sandbox
            .handle
            .retainly_customer(&json!("dropped-before"))
            .is_none()
    );

    // Dropped after handling: the effect is applied, the answer is lost.
    sandbox.handle.set_faults(
        Api::Retainly,
        FaultConfig {
            drop_rate: 1.0,
            drop_after_handling: true,
            ..FaultConfig::default()
        },
    );
    let body = json!({"customers": [{"id": "dropped-after"}]});
    let outcome = sandbox
        .retainly(Method::POST, "/customers")
        .json(&body)
        .send()
        .await;
    assert!(failed(outcome).await);
    assert!(
        sandbox
            .handle
            .retainly_customer(&json!("dropped-after"))
            .is_some()
    );

    assert_eq!(sandbox.handle.fault_counts(Api::Retainly).dropped, 2);
    assert_eq!(
        sandbox.handle.request_count(Api::Retainly, "/customers", 0),
        2
    );
    sandbox.handle.clear_faults(Api::Retainly);
    let (status, _) = sandbox
        .retainly_send(
            Method::POST,
            "/customers",
            &json!({"customers": [{"id": 3}]}),
        )
        .await;
    assert_eq!(status, 200);
}

/// Whether the exchange failed, either at the head or while reading the body.
async fn failed(outcome: reqwest::Result<reqwest::Response>) -> bool {
    match outcome {
        Err(_) => true,
        Ok(response) => response.bytes().await.is_err(),
    }
}

#[tokio::test]
async fn slow_bodies_arrive_complete_in_chunks() {
    let sandbox = unlimited().await;
    let (_, reference) = sandbox.retently_get("/api/v2/campaigns").await;
    sandbox.handle.set_faults(
        Api::Retently,
        FaultConfig {
            slow_body: Some(SlowBody {
                chunk_bytes: 64,
                chunk_delay_ms: 5,
            }),
            ..FaultConfig::default()
        },
    );
    let mut response = sandbox
        .retently(Method::GET, "/api/v2/campaigns")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let length: usize = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut body = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = response.chunk().await.unwrap() {
        chunks += 1;
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body.len(), length);
    // Reads may merge chunks that arrive together, but never into one for a body this long.
    assert!(
        length > 64 * 4 && chunks >= 2,
        "{chunks} chunks for {length} bytes"
    );
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), reference);
    assert_eq!(sandbox.handle.fault_counts(Api::Retently).slow_bodies, 1);

    // A client with a short read timeout gives up on a slow body.
    sandbox.handle.set_faults(
        Api::Retently,
        FaultConfig {
            slow_body: Some(SlowBody {
                chunk_bytes: 1,
                chunk_delay_ms: 10_000,
            }),
            ..FaultConfig::default()
        },
    );
    let response = sandbox
        .retently(Method::GET, "/api/v2/campaigns")
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap();
    assert!(response.bytes().await.unwrap_err().is_timeout());
}

#[tokio::test]
async fn faults_are_set_through_the_admin_api() {
    let sandbox = unlimited().await;
    let put = sandbox
        .request(Method::PUT, "/_sandbox/faults/retainly")
        .json(&json!({"errorRate": 1.0, "errorStatuses": [502]}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let (status, _) = sandbox
        .retainly_send(
            Method::POST,
            "/events",
            &json!({"customer_id": 1, "event": "x"}),
        )
        .await;
    assert_eq!(status, 502);
    let current: Value = sandbox
        .request(Method::GET, "/_sandbox/faults/retainly")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(current["errorRate"], 1.0);
    assert_eq!(current["errorStatuses"], json!([502]));

    for (path, body, status) in [
        ("/_sandbox/faults/retainly", json!({"errorRate": 2.0}), 400),
        (
            "/_sandbox/faults/retainly",
            json!({"errorStatuses": [404]}),
            400,
        ),
        ("/_sandbox/faults/retainly", json!({"typo": 1}), 400),
        ("/_sandbox/faults/elsewhere", json!({}), 404),
    ] {
        let response = sandbox
            .request(Method::PUT, path)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert!(answer["error"].as_str().is_some());
    }
    let deleted = sandbox
        .request(Method::DELETE, "/_sandbox/faults/retainly")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let (status, _) = sandbox
        .retainly_send(
            Method::POST,
            "/events",
            &json!({"customer_id": 1, "event": "x"}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_dropped_connection_carries_no_bytes_at_all() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let sandbox = unlimited().await;
    sandbox.handle.set_faults(
        Api::Retently,
        FaultConfig {
            drop_rate: 1.0,
            ..FaultConfig::default()
        },
    );
    let addr = sandbox.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /api/v2/ping HTTP/1.1\r\nhost: sandbox\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    stream.read_to_end(&mut received).await.unwrap();
    assert!(
        received.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&received)
    );
    // reqwest reports it as a request error, before any response head.
    let error = sandbox
        .retently(Method::GET, "/api/v2/ping")
        .send()
        .await
        .unwrap_err();
    assert!(error.is_request());
}

#[tokio::test]
async fn errors_after_handling_apply_the_request_first() {
    let sandbox = unlimited().await;
    sandbox.handle.set_faults(
        Api::Retently,
        FaultConfig {
            error_rate: 1.0,
            error_statuses: vec![500],
            error_after_handling: true,
            ..FaultConfig::default()
        },
    );
    let (status, _) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/customers",
            &json!({"subscribers": [{"email": "kept@example.com"}]}),
        )
        .await;
    assert_eq!(status, 500);
    assert!(
        sandbox
            .handle
            .retently_customer("kept@example.com")
            .is_some(),
        "the write was applied before the 500"
    );
}

#[tokio::test]
async fn the_hold_gate_holds_requests_unhandled_until_released() {
    let sandbox = std::sync::Arc::new(unlimited().await);
    sandbox.handle.hold_after(Api::Retainly, 1);
    let event = |n: u32| json!({"customer_id": n, "event": "held"});
    let (status, _) = sandbox
        .retainly_send(Method::POST, "/events", &event(1))
        .await;
    assert_eq!(status, 200, "the first request passes");
    let held = tokio::spawn({
        let sandbox = std::sync::Arc::clone(&sandbox);
        async move {
            sandbox
                .retainly_send(Method::POST, "/events", &event(2))
                .await
        }
    });
    while sandbox.handle.held(Api::Retainly) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        sandbox.handle.retainly_events().len(),
        1,
        "held, not handled"
    );
    assert_eq!(sandbox.handle.in_progress(Api::Retainly), 1);
    assert!(!held.is_finished());
    sandbox.handle.release(Api::Retainly);
    let (status, _) = held.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(sandbox.handle.retainly_events().len(), 2);
    assert_eq!(sandbox.handle.held(Api::Retainly), 1);
    assert_eq!(sandbox.handle.in_progress(Api::Retainly), 0);
}
