//! The Retently rate limit over HTTP (the window itself is unit-tested with a paused clock in
//! `src/rate_limit.rs`), and the optional Retainly one.

use cx_sandbox::{Api, DEFAULT_RETENTLY_API_KEY, SandboxConfig};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::TestSandbox;

#[tokio::test]
async fn excess_requests_get_429_with_retry_after_per_key() {
    let sandbox = TestSandbox::start_with(SandboxConfig {
        retently_api_keys: vec![DEFAULT_RETENTLY_API_KEY.to_owned(), "second-key".to_owned()],
        retently_requests_per_minute: 3,
        ..SandboxConfig::default()
    })
    .await;
    // Refused credentials do not use the budget.
    for _ in 0..5 {
        let response = sandbox
            .request(Method::GET, "/api/v2/ping")
            .header("Authorization", "api_key=wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    for _ in 0..3 {
        let (status, _) = sandbox.retently_get("/api/v2/campaigns").await;
        assert_eq!(status, 200);
    }
    let refused = sandbox
        .retently(Method::GET, "/api/v2/campaigns")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        refused.json::<Value>().await.unwrap(),
        json!({"message": "Too many requests.", "code": 429, "data": null})
    );
    // Every form of the same key shares one budget.
    let by_query = sandbox
        .request(
            Method::GET,
            &format!("/api/v2/ping?api_key={DEFAULT_RETENTLY_API_KEY}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 429);
    // Another key has its own budget.
    let other = sandbox
        .request(Method::GET, "/api/v2/ping")
        .header("X-Api-Key", "second-key")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);

    assert_eq!(sandbox.handle.rate_limited(Api::Retently), 2);
    assert_eq!(
        sandbox
            .handle
            .request_count(Api::Retently, "/api/v2/campaigns", 429),
        1
    );
    assert_eq!(
        sandbox
            .handle
            .request_count(Api::Retently, "/api/v2/campaigns", 200),
        3
    );
    assert_eq!(sandbox.handle.rate_limited(Api::Retainly), 0);

    // Lifting the limit takes effect at once; counters survive until reset.
    sandbox.handle.set_rate_limit(Api::Retently, 0);
    let (status, _) = sandbox.retently_get("/api/v2/campaigns").await;
    assert_eq!(status, 200);
    sandbox.handle.reset_counters();
    assert_eq!(sandbox.handle.rate_limited(Api::Retently), 0);
    assert!(sandbox.handle.request_counts().is_empty());
}

#[tokio::test]
async fn the_default_limit_is_150_per_minute() {
    let sandbox = TestSandbox::start().await;
    assert_eq!(sandbox.handle.rate_limit(Api::Retently), 150);
    let requests = (0..151).map(|_| sandbox.retently(Method::GET, "/api/v2/ping").send());
    let statuses: Vec<u16> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|response| response.unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|status| **status == 200).count(),
        150
    );
    assert_eq!(statuses.iter().filter(|status| **status == 429).count(), 1);
}

#[tokio::test]
async fn retainly_has_no_limit_by_default_and_its_own_when_set() {
    let sandbox = TestSandbox::start().await;
    assert_eq!(sandbox.handle.rate_limit(Api::Retainly), 0);
    sandbox.handle.set_rate_limit(Api::Retainly, 1);
    let body = json!({"customer_id": 1, "event": "x"});
    let (status, _) = sandbox.retainly_send(Method::POST, "/events", &body).await;
    assert_eq!(status, 200);
    let refused = sandbox
        .retainly(Method::POST, "/events")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(sandbox.handle.rate_limited(Api::Retainly), 1);
    // Retently is unaffected.
    let (status, _) = sandbox.retently_get("/api/v2/ping").await;
    assert_eq!(status, 200);
    assert_eq!(sandbox.handle.retainly_events().len(), 1);
}
