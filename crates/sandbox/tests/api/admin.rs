//! The admin API mirrors the in-process handle.

use cx_sandbox::{Api, SandboxConfig};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::TestSandbox;

async fn admin_get(sandbox: &TestSandbox, path: &str) -> Value {
    let response = sandbox.request(Method::GET, path).send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

#[tokio::test]
async fn stats_count_requests_per_route_template_and_status() {
    let sandbox = TestSandbox::start().await;
    let customer = sandbox.handle.retently_customers()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sandbox
        .retently_get(&format!("/api/v2/customers/{customer}"))
        .await;
    sandbox
        .retently_get("/api/v2/customers/ffffffffffffffffffffffff")
        .await;
    sandbox
        .retainly_send(
            Method::POST,
            "/events",
            &json!({"customer_id": 1, "event": "x"}),
        )
        .await;
    let stats = admin_get(&sandbox, "/_sandbox/stats").await;
    let requests = stats["requests"].as_array().unwrap();
    assert!(requests.contains(
        &json!({"api": "retently", "route": "/api/v2/customers/{id}", "status": 200, "count": 1})
    ));
    assert!(requests.contains(
        &json!({"api": "retently", "route": "/api/v2/customers/{id}", "status": 404, "count": 1})
    ));
    assert!(
        requests
            .contains(&json!({"api": "retainly", "route": "/events", "status": 200, "count": 1}))
    );
    assert_eq!(stats["rateLimited"], json!({"retently": 0, "retainly": 0}));
    assert_eq!(stats["webhook"], json!({"delivered": 0, "failed": 0}));
    assert_eq!(stats["faults"]["retently"]["errors"], 0);
    // Admin calls are not counted.
    assert_eq!(sandbox.handle.request_counts().len(), 3);

    let reset = sandbox
        .request(Method::POST, "/_sandbox/stats/reset")
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 204);
    let stats = admin_get(&sandbox, "/_sandbox/stats").await;
    assert_eq!(stats["requests"], json!([]));
    // Data survives a counter reset.
    assert_eq!(sandbox.handle.retainly_events().len(), 1);
}

#[tokio::test]
async fn recorded_state_is_observable_over_http() {
    let sandbox = TestSandbox::start().await;
    let campaign = sandbox.handle.transactional_campaign("CES").unwrap();
    sandbox
        .retently_send(
            Method::POST,
            "/api/v2/survey",
            &json!({"campaign": campaign, "delay": 2, "subscribers": [{"email": "obs@example.com"}]}),
        )
        .await;
    sandbox
        .retainly_send(
            Method::POST,
            "/customers",
            &json!({"customers": [{"id": 42, "plan": "pro"}]}),
        )
        .await;
    sandbox
        .retainly_send(
            Method::POST,
            "/events",
            &json!({"customer_id": 42, "event": "upgraded"}),
        )
        .await;

    let sends = admin_get(&sandbox, "/_sandbox/retently/surveys").await;
    assert_eq!(sends["sends"][0]["campaignId"], campaign.as_str());
    assert_eq!(sends["sends"][0]["delayDays"], 2);
    assert_eq!(sends["sends"][0]["recipients"], json!(["obs@example.com"]));
    let customers = admin_get(
        &sandbox,
        "/_sandbox/retently/customers?email=OBS@example.com",
    )
    .await;
    assert_eq!(customers["customers"][0]["email"], "obs@example.com");
    let missing = sandbox
        .request(
            Method::GET,
            "/_sandbox/retently/customers?email=nobody@example.com",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let all = admin_get(&sandbox, "/_sandbox/retently/customers").await;
    assert_eq!(all["customers"].as_array().unwrap().len(), 201);
    let feedback = admin_get(&sandbox, "/_sandbox/retently/feedback").await;
    assert_eq!(feedback["feedback"].as_array().unwrap().len(), 500);
    let outbox = admin_get(&sandbox, "/_sandbox/retently/outbox").await;
    assert!(
        outbox["surveys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["email"] == "obs@example.com")
    );
    let campaigns = admin_get(&sandbox, "/_sandbox/retently/campaigns").await;
    assert_eq!(campaigns["campaigns"].as_array().unwrap().len(), 7);

    let customer = admin_get(&sandbox, "/_sandbox/retainly/customers/42").await;
    assert_eq!(customer["id"], 42);
    assert_eq!(customer["fields"], json!({"plan": "pro"}));
    let listed = admin_get(&sandbox, "/_sandbox/retainly/customers").await;
    assert_eq!(listed["customers"].as_array().unwrap().len(), 1);
    let events = admin_get(&sandbox, "/_sandbox/retainly/events").await;
    assert_eq!(events["events"][0]["event"], "upgraded");
    assert_eq!(events["events"][0]["customerId"], 42);
    assert_eq!(events["events"][0]["seq"], 1);
}

#[tokio::test]
async fn rate_limit_and_simulation_over_http() {
    let sandbox = TestSandbox::start_with(SandboxConfig::default()).await;
    let put = sandbox
        .request(Method::PUT, "/_sandbox/rate-limit/retently")
        .json(&json!({"requestsPerWindow": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(sandbox.handle.rate_limit(Api::Retently), 1);
    assert_eq!(sandbox.retently_get("/api/v2/ping").await.0, 200);
    assert_eq!(sandbox.retently_get("/api/v2/ping").await.0, 429);
    let current = admin_get(&sandbox, "/_sandbox/rate-limit/retently").await;
    assert_eq!(current, json!({"requestsPerWindow": 1}));

    let simulated: Value = sandbox
        .request(Method::POST, "/_sandbox/feedback/simulate")
        .json(&json!({"count": 4}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = simulated["feedback"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(sandbox.handle.feedback().len(), 504);
    for item in items {
        assert!(item["score"].is_i64());
        assert_eq!(item["isSubmitted"], true);
    }
    let too_many = sandbox
        .request(Method::POST, "/_sandbox/feedback/simulate")
        .json(&json!({"count": 1_000_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(too_many.status(), 400);
}

#[tokio::test]
async fn traceparents_of_requests_are_recorded_by_route() {
    let sandbox = TestSandbox::start().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = sandbox
        .retently(Method::GET, "/api/v2/campaigns")
        .header("traceparent", traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // A request without one is not recorded.
    sandbox.retently_get("/api/v2/templates").await;
    let seen = sandbox.handle.traceparents();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].api, Api::Retently);
    assert_eq!(seen[0].route, "/api/v2/campaigns");
    assert_eq!(
        admin_get(&sandbox, "/_sandbox/traceparents").await,
        json!({"traceparents": [
            {"api": "retently", "route": "/api/v2/campaigns", "traceparent": traceparent}
        ]})
    );
    sandbox.handle.reset_counters();
    assert!(sandbox.handle.traceparents().is_empty());
}
