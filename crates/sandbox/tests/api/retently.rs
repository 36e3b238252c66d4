//! Retently: auth, envelopes, pagination, filters, validation and state.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use cx_sandbox::{Api, DEFAULT_RETENTLY_API_KEY, SandboxConfig, SeedConfig, UnknownEmails};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::TestSandbox;

const UNAUTHORIZED: &str = "Please check your API Key to make sure it's valid.";

fn config_with(seed: SeedConfig) -> SandboxConfig {
    SandboxConfig {
        seed,
        retently_requests_per_minute: 0,
        ..SandboxConfig::default()
    }
}

async fn unlimited() -> TestSandbox {
    TestSandbox::start_with(config_with(SeedConfig::default())).await
}

fn date(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

#[tokio::test]
async fn every_documented_auth_form_is_accepted() {
    let sandbox = unlimited().await;
    let key = DEFAULT_RETENTLY_API_KEY;
    let forms = [
        sandbox
            .request(Method::GET, "/api/v2/ping")
            .header("Authorization", format!("api_key={key}")),
        sandbox.request(Method::GET, &format!("/api/v2/ping?api_key={key}")),
        sandbox
            .request(Method::GET, "/api/v2/ping")
            .header("Authorization", format!("Bearer {key}")),
        sandbox
            .request(Method::GET, "/api/v2/ping")
            .header("X-Api-Key", key),
        // A wrong form next to a right one still authenticates.
        sandbox
            .request(Method::GET, "/api/v2/ping")
            .header("Authorization", "api_key=wrong")
            .header("X-Api-Key", key),
    ];
    for form in forms {
        let response = form.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], 200);
        assert_eq!(body["message"], "Success.");
    }
    assert_eq!(
        sandbox
            .handle
            .request_count(Api::Retently, "/api/v2/ping", 200),
        5
    );
}

#[tokio::test]
async fn missing_or_wrong_keys_get_the_documented_401() {
    let sandbox = unlimited().await;
    let attempts = [
        sandbox.request(Method::GET, "/api/v2/customers"),
        sandbox
            .request(Method::GET, "/api/v2/customers")
            .header("Authorization", "api_key=nope"),
        // The key without the `api_key=` prefix is not one of the forms.
        sandbox
            .request(Method::GET, "/api/v2/customers")
            .header("Authorization", DEFAULT_RETENTLY_API_KEY),
        sandbox.request(Method::GET, "/api/v2/customers?api_key=nope"),
        sandbox
            .request(Method::GET, "/api/v2/customers")
            .header("Authorization", "Bearer nope"),
        sandbox
            .request(Method::GET, "/api/v2/customers")
            .header("X-Api-Key", "nope"),
    ];
    for attempt in attempts {
        let response = attempt.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!({"message": UNAUTHORIZED, "code": 401, "data": null})
        );
    }
    assert_eq!(
        sandbox
            .handle
            .request_count(Api::Retently, "/api/v2/customers", 401),
        6
    );
}

#[tokio::test]
async fn legacy_nps_aliases_serve_the_same_resources() {
    let sandbox = unlimited().await;
    for (current, legacy, records) in [
        ("/api/v2/customers", "/api/v2/nps/customers", "subscribers"),
        (
            "/api/v2/feedback",
            "/api/v2/nps/customers/response",
            "responses",
        ),
        ("/api/v2/outbox", "/api/v2/nps/outbox", "surveys"),
    ] {
        let (status, a) = sandbox.retently_get(current).await;
        assert_eq!(status, 200);
        let (status, b) = sandbox.retently_get(legacy).await;
        assert_eq!(status, 200, "{legacy}");
        assert_eq!(a["data"][records], b["data"][records], "{legacy}");
        assert_eq!(a["data"]["total"], b["data"]["total"]);
    }
    for (current, legacy) in [
        ("/api/v2/campaigns", "/api/v2/nps/campaigns"),
        ("/api/v2/templates", "/api/v2/nps/templates"),
        ("/api/v2/nps/score", "/api/v2/nps/score"),
    ] {
        let (_, a) = sandbox.retently_get(current).await;
        let (status, b) = sandbox.retently_get(legacy).await;
        assert_eq!(status, 200);
        assert_eq!(a, b);
    }
    let (_, current) = sandbox.retently_get("/api/v2/nps/score").await;
    let (_, by_metric) = sandbox.retently_get("/api/v2/NPS/score").await;
    assert_eq!(current, by_metric);
    // Each alias is counted under its own route template.
    assert_eq!(
        sandbox
            .handle
            .request_count(Api::Retently, "/api/v2/nps/customers/response", 200),
        1
    );
}

#[tokio::test]
async fn pagination_of_an_empty_list() {
    let sandbox = TestSandbox::start_with(config_with(SeedConfig::empty())).await;
    let (status, body) = sandbox.retently_get("/api/v2/customers").await;
    assert_eq!(status, 200);
    assert_eq!(
        body["data"],
        json!({"subscribers": [], "page": 1, "pages": 0, "limit": 20, "sort": "-createdDate", "total": 0})
    );
    let (_, body) = sandbox.retently_get("/api/v2/feedback?page=3").await;
    assert_eq!(body["data"]["responses"], json!([]));
    assert_eq!(body["data"]["pages"], 0);
    assert_eq!(body["data"]["page"], 3);
}

#[tokio::test]
async fn pagination_last_partial_page_and_no_overlap() {
    let sandbox = TestSandbox::start_with(config_with(SeedConfig {
        customers: 45,
        ..SeedConfig::default()
    }))
    .await;
    let mut seen = HashSet::new();
    let mut previous: Option<DateTime<Utc>> = None;
    for page in 1..=3 {
        let (status, body) = sandbox
            .retently_get(&format!("/api/v2/customers?page={page}"))
            .await;
        assert_eq!(status, 200);
        let data = &body["data"];
        assert_eq!(data["total"], 45);
        assert_eq!(data["pages"], 3);
        assert_eq!(data["limit"], 20);
        assert_eq!(data["page"], page);
        let items = data["subscribers"].as_array().unwrap();
        assert_eq!(items.len(), if page == 3 { 5 } else { 20 });
        for item in items {
            assert!(seen.insert(item["id"].as_str().unwrap().to_owned()));
            // The default sort is newest first.
            let created = date(&item["createdDate"]);
            assert!(previous.is_none_or(|previous| previous >= created));
            previous = Some(created);
        }
    }
    assert_eq!(seen.len(), 45);
    let (_, beyond) = sandbox.retently_get("/api/v2/customers?page=4").await;
    assert_eq!(beyond["data"]["subscribers"], json!([]));
    assert_eq!(beyond["data"]["pages"], 3);

    let (_, ascending) = sandbox
        .retently_get("/api/v2/customers?sort=createdDate&limit=45")
        .await;
    assert_eq!(ascending["data"]["sort"], "createdDate");
    let dates: Vec<DateTime<Utc>> = ascending["data"]["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| date(&item["createdDate"]))
        .collect();
    assert!(dates.windows(2).all(|pair| pair[0] <= pair[1]));
}

#[tokio::test]
async fn limit_above_1000_is_clamped_and_bad_paging_is_refused() {
    let sandbox = TestSandbox::start_with(config_with(SeedConfig {
        feedback: 1200,
        ..SeedConfig::default()
    }))
    .await;
    let (status, body) = sandbox.retently_get("/api/v2/feedback?limit=5000").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["limit"], 1000);
    assert_eq!(body["data"]["responses"].as_array().unwrap().len(), 1000);
    assert_eq!(body["data"]["total"], 1200);
    assert_eq!(body["data"]["pages"], 2);
    let (_, body) = sandbox
        .retently_get("/api/v2/feedback?limit=5000&page=2")
        .await;
    assert_eq!(body["data"]["responses"].as_array().unwrap().len(), 200);

    for query in [
        "page=0",
        "page=abc",
        "limit=0",
        "limit=-5",
        "sort=-bogus",
        "attributes[0][name]=plan&attributes[0][value]=pro",
    ] {
        let (status, body) = sandbox
            .retently_get(&format!("/api/v2/customers?{query}"))
            .await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(body["code"], 400);
        assert!(body["data"].is_null());
        assert!(body["message"].as_str().unwrap().starts_with("The "));
    }
}

#[tokio::test]
async fn date_filters_accept_unix_seconds_and_iso() {
    let sandbox = unlimited().await;
    let all = sandbox.handle.feedback();
    let mut dates: Vec<DateTime<Utc>> = all.iter().map(|item| date(&item["createdDate"])).collect();
    dates.sort();
    // A pivot at a whole second in the middle of the data.
    let pivot = DateTime::from_timestamp(dates[dates.len() / 2].timestamp(), 0).unwrap();
    let end = DateTime::from_timestamp(dates[dates.len() * 3 / 4].timestamp(), 0).unwrap();
    let expected = dates
        .iter()
        .filter(|at| **at >= pivot && **at <= end)
        .count();
    assert!(expected > 0);

    let unix = format!(
        "/api/v2/feedback?limit=1000&startDate={}&endDate={}",
        pivot.timestamp(),
        end.timestamp()
    );
    let iso = format!(
        "/api/v2/feedback?limit=1000&startDate={}&endDate={}",
        pivot.format("%Y-%m-%dT%H:%M:%SZ"),
        end.format("%Y-%m-%dT%H:%M:%SZ")
    );
    let (status, by_unix) = sandbox.retently_get(&unix).await;
    assert_eq!(status, 200);
    let (_, by_iso) = sandbox.retently_get(&iso).await;
    assert_eq!(by_unix["data"]["total"], expected);
    assert_eq!(by_unix["data"], by_iso["data"]);
    for item in by_unix["data"]["responses"].as_array().unwrap() {
        let at = date(&item["createdDate"]);
        assert!(at >= pivot && at <= end);
    }

    // The outbox filters on the send date, customers on the creation date.
    let (status, _) = sandbox
        .retently_get(&format!("/api/v2/outbox?startDate={}", pivot.timestamp()))
        .await;
    assert_eq!(status, 200);
    let (_, future) = sandbox
        .retently_get("/api/v2/customers?startDate=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(future["data"]["total"], 0);

    for bad in [
        "startDate=yesterday",
        "endDate=2022-13-45",
        "startDate=2024-01-02&endDate=2024-01-01",
    ] {
        let (status, body) = sandbox
            .retently_get(&format!("/api/v2/feedback?{bad}"))
            .await;
        assert_eq!(status, 400, "{bad}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("Date"), "{message}");
    }
}

#[tokio::test]
async fn customers_upsert_by_email_case_insensitively() {
    let sandbox = unlimited().await;
    let (status, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/customers",
            &json!({"subscribers": [{
                "email": "New.Person@Example.com",
                "first_name": "New",
                "lastName": "Person",
                "company": "Brand New Co",
                "tags": ["beta"],
                "properties": [
                    {"label": "Subscription name", "type": "string", "value": "Pro"},
                    {"label": "Seats Count", "type": "integer", "value": "12"},
                    {"label": "Is Partner", "type": "boolean", "value": "Yes"},
                    {"label": "Renewal", "type": "date", "value": "2025-06-01"}
                ]
            }]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["code"], 200);
    let created = &body["data"]["New.Person@Example.com"];
    assert_eq!(created["status"], "created");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 24);

    let (_, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/nps/customers",
            &json!({"subscribers": [{
                "email": "  new.person@example.COM ",
                "firstName": "Renamed",
                "properties": [{"label": "Seats count", "value": 15}]
            }]}),
        )
        .await;
    assert_eq!(
        body["data"]["  new.person@example.COM "]["status"],
        "updated"
    );
    assert_eq!(body["data"]["  new.person@example.COM "]["id"], id.as_str());

    let (status, listed) = sandbox
        .retently_get("/api/v2/customers?email=NEW.person@example.com")
        .await;
    assert_eq!(status, 200);
    assert_eq!(listed["data"]["total"], 1);
    let customer = &listed["data"]["subscribers"][0];
    assert_eq!(customer["email"], "new.person@example.com");
    assert_eq!(customer["firstName"], "Renamed");
    assert_eq!(customer["lastName"], "Person");
    assert_eq!(customer["companyName"], "Brand New Co");
    assert_eq!(customer["tags"], json!(["beta"]));
    let properties = customer["properties"].as_array().unwrap();
    let property = |name: &str| {
        properties
            .iter()
            .find(|property| property["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        property("subscription_name"),
        json!({"label": "Subscription name", "name": "subscription_name", "type": "text", "value": "Pro"})
    );
    // The type left out keeps the stored one; the value is re-read as that type.
    assert_eq!(property("seats_count")["type"], "integer");
    assert_eq!(property("seats_count")["value"], "15");
    assert_eq!(property("is_partner")["value"], "true");
    assert_eq!(property("renewal")["value"], "2025-06-01T00:00:00.000Z");

    let (status, single) = sandbox
        .retently_get(&format!("/api/v2/customers/{id}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(single["data"]["subscribers"][0], *customer);
    assert_eq!(
        sandbox
            .handle
            .retently_customer("NEW.PERSON@example.com")
            .unwrap(),
        *customer
    );

    // The company was created from the name and lists the customer.
    let company_id = customer["companyId"].as_str().unwrap();
    let (status, company) = sandbox
        .retently_get(&format!("/api/v2/companies/{company_id}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(company["data"]["companyName"], "Brand New Co");
    assert_eq!(company["data"]["contactsCount"], 1);
}

#[tokio::test]
async fn customer_validation_uses_the_documented_statuses() {
    let sandbox = unlimited().await;
    let malformed = sandbox
        .retently(Method::POST, "/api/v2/customers")
        .header("content-type", "application/json")
        .body("{\"subscribers\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("not valid JSON"));
    assert!(body["data"].is_null());

    let cases = [
        (json!({}), "The subscribers field is required."),
        (
            json!({"subscribers": "a@b.co"}),
            "The subscribers must be an array.",
        ),
        (
            json!({"subscribers": []}),
            "The subscribers must contain between 1 and 1000 items.",
        ),
        (
            json!({"subscribers": [{"email": "a@b.co"}, {"firstName": "No email"}]}),
            "The subscribers.1.email field is required.",
        ),
        (
            json!({"subscribers": [{"email": "not-an-email"}]}),
            "The subscribers.0.email must be a valid email address.",
        ),
        (
            json!({"subscribers": [{"email": 42}]}),
            "The subscribers.0.email must be a string.",
        ),
        (
            json!({"subscribers": [{"email": "a@b.co", "firstName": 5}]}),
            "The subscribers.0.firstName must be a string.",
        ),
        (
            json!({"subscribers": [{"email": "a@b.co", "tags": [1]}]}),
            "The subscribers.0.tags.0 must be a string.",
        ),
        (
            json!({"subscribers": [{"email": "a@b.co", "properties": [{"label": "Seats", "type": "integer", "value": "many"}]}]}),
            "The subscribers.0.properties.0.value is not a valid integer.",
        ),
        (
            json!({"subscribers": [{"email": "a@b.co", "properties": [{"label": "X", "type": "money", "value": "1"}]}]}),
            "The subscribers.0.properties.0.type must be one of: string, date, integer, boolean, collection.",
        ),
    ];
    for (body, message) in cases {
        let (status, answer) = sandbox
            .retently_send(Method::POST, "/api/v2/customers", &body)
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            answer,
            json!({"message": message, "code": 400, "data": null})
        );
    }
    // Nothing of a refused batch was applied.
    assert!(sandbox.handle.retently_customer("a@b.co").is_none());

    let (status, body) = sandbox.retently_get("/api/v2/customers/nothex").await;
    assert_eq!((status, body["code"].clone()), (400, json!(400)));
    let (status, body) = sandbox
        .retently_get("/api/v2/customers/aaaaaaaaaaaaaaaaaaaaaaaa")
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["message"], "Customer not found.");
}

#[tokio::test]
async fn delete_unsubscribe_and_resubscribe() {
    let sandbox = unlimited().await;
    let email = "leaving@example.com";
    sandbox
        .retently_send(
            Method::POST,
            "/api/v2/customers",
            &json!({"subscribers": [{"email": email}]}),
        )
        .await;
    let (status, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/customers/unsubscribe",
            &json!({"message": "too many emails", "subscribers": [{"email": email}, {"email": "ghost@example.com"}]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"][email]["status"], "unsubscribed");
    assert_eq!(
        body["data"]["ghost@example.com"],
        json!({"status": "failed", "reason": "not_found"})
    );
    assert_eq!(
        sandbox.handle.retently_customer(email).unwrap()["unsubscribed"],
        true
    );

    // An unsubscribed customer is not surveyed.
    let campaign = sandbox.handle.transactional_campaign("NPS").unwrap();
    let (_, sent) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/survey",
            &json!({"campaign": campaign, "subscribers": [{"email": email}]}),
        )
        .await;
    assert_eq!(sent["data"][email]["status"], "unsubscribed");

    let (_, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/customers/resubscribe",
            &json!({"subscribers": [{"email": email}]}),
        )
        .await;
    assert_eq!(body["data"][email]["status"], "resubscribed");
    assert_eq!(
        sandbox.handle.retently_customer(email).unwrap()["unsubscribed"],
        false
    );

    let (status, body) = sandbox
        .retently_send(
            Method::DELETE,
            "/api/v2/customers",
            &json!({"subscribers": [{"email": email}, {"email": "ghost@example.com"}]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"][email]["status"], "deleted");
    assert_eq!(body["data"]["ghost@example.com"]["status"], "failed");
    assert!(sandbox.handle.retently_customer(email).is_none());
}

#[tokio::test]
async fn a_batch_with_an_unknown_address_can_fail_whole_as_the_docs_warn() {
    let sandbox = TestSandbox::start_with(SandboxConfig {
        unknown_subscription_emails: UnknownEmails::FailBatch,
        ..config_with(SeedConfig::default())
    })
    .await;
    let email = "staying@example.com";
    sandbox
        .retently_send(
            Method::POST,
            "/api/v2/customers",
            &json!({"subscribers": [{"email": email}]}),
        )
        .await;
    for route in [
        "/api/v2/customers/unsubscribe",
        "/api/v2/customers/resubscribe",
    ] {
        let (status, body) = sandbox
            .retently_send(
                Method::POST,
                route,
                &json!({"subscribers": [{"email": email}, {"email": "ghost@example.com"}]}),
            )
            .await;
        assert_eq!(status, 404, "{route}");
        assert_eq!(body["data"], Value::Null);
        // Nothing changed, not even for the known address.
        assert_eq!(
            sandbox.handle.retently_customer(email).unwrap()["unsubscribed"],
            false
        );
    }
    let (status, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/customers/unsubscribe",
            &json!({"subscribers": [{"email": email}]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"][email]["status"], "unsubscribed");
}

#[tokio::test]
async fn transactional_surveys_are_scheduled_recorded_and_throttled() {
    let sandbox = unlimited().await;
    let nps = sandbox.handle.transactional_campaign("NPS").unwrap();
    let (status, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/survey",
            &json!({"campaign": nps, "delay": 7, "subscribers": [
                {"email": "ann@example.com", "firstName": "Ann"},
                {"email": "Bob@Example.com"},
                {"email": "ann@example.com", "lastName": "Again"}
            ]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["message"], "Success.");
    let ann = &body["data"]["ann@example.com"];
    assert_eq!(ann["status"], "scheduled");
    assert_eq!(ann["surveyId"].as_str().unwrap().len(), 24);
    let scheduled = date(&ann["scheduledDate"]);
    let in_days = (scheduled - Utc::now()).num_hours();
    assert!((7 * 24 - 1..=7 * 24).contains(&in_days), "{in_days}");
    assert_eq!(body["data"]["Bob@Example.com"]["status"], "scheduled");
    // The customer was upserted with the merged data of both entries.
    let customer = sandbox.handle.retently_customer("ann@example.com").unwrap();
    assert_eq!(
        (customer["firstName"].clone(), customer["lastName"].clone()),
        (json!("Ann"), json!("Again"))
    );

    let sends = sandbox.handle.survey_sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].campaign_id, nps);
    assert_eq!(sends[0].delay_days, 7);
    assert_eq!(
        sends[0].recipients,
        vec!["ann@example.com", "bob@example.com"]
    );

    let (_, outbox) = sandbox
        .retently_get(&format!(
            "/api/v2/outbox?email=ann@example.com&campaignId={nps}"
        ))
        .await;
    assert_eq!(outbox["data"]["total"], 1);
    let survey = &outbox["data"]["surveys"][0];
    assert_eq!(survey["surveyId"], ann["surveyId"]);
    assert_eq!(survey["status"], "SCHEDULED");
    assert_eq!(survey["sentBy"], "campaign");

    // No throttle on this campaign: a second send schedules again.
    let (_, again) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/survey",
            &json!({"campaign": nps, "subscribers": [{"email": "ann@example.com"}]}),
        )
        .await;
    assert_eq!(again["data"]["ann@example.com"]["status"], "scheduled");

    // CSAT has a 30-day throttle: the second send within it is skipped and reported.
    let csat = sandbox.handle.transactional_campaign("CSAT").unwrap();
    let body = json!({"campaign": csat, "subscribers": [{"email": "carol@example.com"}]});
    let (_, first) = sandbox
        .retently_send(Method::POST, "/api/v2/survey", &body)
        .await;
    assert_eq!(first["data"]["carol@example.com"]["status"], "scheduled");
    let (status, second) = sandbox
        .retently_send(Method::POST, "/api/v2/survey", &body)
        .await;
    assert_eq!(status, 200);
    let throttled = &second["data"]["carol@example.com"];
    assert_eq!(throttled["status"], "throttled");
    assert_eq!(throttled["throttleDays"], 30);
    assert!(throttled.get("surveyId").is_none());
    // The deprecated endpoint ignores campaign options, so the throttle does not apply there.
    let (status, deprecated) = sandbox
        .retently_send(Method::POST, "/api/v2/nps/customers/survey", &body)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        deprecated["data"]["carol@example.com"]["status"],
        "scheduled"
    );
}

#[tokio::test]
async fn survey_validation() {
    let sandbox = unlimited().await;
    let nps = sandbox.handle.transactional_campaign("NPS").unwrap();
    let campaigns = sandbox.handle.campaigns();
    let regular = campaigns
        .iter()
        .find(|campaign| campaign["type"] == "regular")
        .unwrap()["id"]
        .clone();
    let paused = campaigns
        .iter()
        .find(|campaign| campaign["isActive"] == false)
        .unwrap()["id"]
        .clone();
    let one = json!([{"email": "x@example.com"}]);
    let many: Vec<Value> = (0..101)
        .map(|n| json!({"email": format!("p{n}@example.com")}))
        .collect();
    let hundred: Vec<Value> = many[..100].to_vec();
    let cases = [
        (
            json!({"subscribers": one}),
            400,
            "The campaign field is required.",
        ),
        (
            json!({"campaign": 5, "subscribers": one}),
            400,
            "The campaign must be a string.",
        ),
        (
            json!({"campaign": nps}),
            400,
            "The subscribers field is required.",
        ),
        (
            json!({"campaign": nps, "subscribers": []}),
            400,
            "The subscribers must contain between 1 and 100 items.",
        ),
        (
            json!({"campaign": nps, "subscribers": many}),
            400,
            "The subscribers must contain between 1 and 100 items.",
        ),
        (
            json!({"campaign": nps, "subscribers": [{"name": "x"}]}),
            400,
            "The subscribers.0.email field is required.",
        ),
        (
            json!({"campaign": nps, "delay": -1, "subscribers": one}),
            400,
            "The delay must be an integer number of days between 0 and 365.",
        ),
        (
            json!({"campaign": nps, "delay": "soon", "subscribers": one}),
            400,
            "The delay must be an integer number of days between 0 and 365.",
        ),
        (
            json!({"campaign": "aaaaaaaaaaaaaaaaaaaaaaaa", "subscribers": one}),
            404,
            "Campaign not found.",
        ),
        (
            json!({"campaign": regular, "subscribers": one}),
            400,
            "The campaign is not a transactional campaign.",
        ),
        (
            json!({"campaign": paused, "subscribers": one}),
            400,
            "The campaign is not active.",
        ),
    ];
    for (body, status, message) in cases {
        let (got, answer) = sandbox
            .retently_send(Method::POST, "/api/v2/survey", &body)
            .await;
        assert_eq!(got, status, "{message}");
        assert_eq!(
            answer,
            json!({"message": message, "code": status, "data": null})
        );
    }
    assert!(sandbox.handle.survey_sends().is_empty());
    let (status, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/survey",
            &json!({"campaign": nps, "subscribers": hundred}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_object().unwrap().len(), 100);
}

#[tokio::test]
async fn feedback_items_carry_every_documented_field_and_filter() {
    let sandbox = unlimited().await;
    let (status, body) = sandbox.retently_get("/api/v2/feedback?limit=1").await;
    assert_eq!(status, 200);
    let item = &body["data"]["responses"][0];
    for field in [
        "id",
        "surveyId",
        "customerId",
        "email",
        "firstName",
        "lastName",
        "companyName",
        "companyId",
        "jobTitle",
        "country",
        "state",
        "city",
        "tags",
        "customProps",
        "campaignId",
        "campaignName",
        "createdDate",
        "score",
        "comment",
        "checkbox",
        "additionalQuestions",
        "feedbackTopics",
        "feedbackTags",
        "feedbackTagsNew",
        "notes",
        "status",
        "assigned",
        "ratingCategory",
        "resolved",
        "channel",
        "metricsType",
        "isBogus",
        "isSubmitted",
    ] {
        assert!(item.get(field).is_some(), "feedback lacks {field}");
    }
    let id = item["id"].as_str().unwrap();
    let (status, single) = sandbox
        .retently_get(&format!("/api/v2/feedback/{id}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(single["data"], *item);

    let all = sandbox.handle.feedback();
    let email = item["email"].as_str().unwrap();
    let customer_id = item["customerId"].as_str().unwrap();
    let campaign_id = item["campaignId"].as_str().unwrap();
    for (query, expected) in [
        (
            format!("email={email}"),
            all.iter().filter(|f| f["email"] == email).count(),
        ),
        (
            format!("customerId={customer_id}"),
            all.iter()
                .filter(|f| f["customerId"] == customer_id)
                .count(),
        ),
        (
            format!("campaignId={campaign_id}"),
            all.iter()
                .filter(|f| f["campaignId"] == campaign_id)
                .count(),
        ),
    ] {
        let (_, body) = sandbox
            .retently_get(&format!("/api/v2/feedback?limit=1000&{query}"))
            .await;
        assert_eq!(body["data"]["total"], expected, "{query}");
        assert!(expected >= 1);
    }
    // A campaign id in the feedback path lists that campaign's responses.
    let (status, by_campaign) = sandbox
        .retently_get(&format!("/api/v2/feedback/{campaign_id}?limit=1000"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        by_campaign["data"]["total"],
        all.iter()
            .filter(|f| f["campaignId"] == campaign_id)
            .count()
    );
    let (status, _) = sandbox
        .retently_get("/api/v2/feedback/bbbbbbbbbbbbbbbbbbbbbbbb")
        .await;
    assert_eq!(status, 404);
    let (status, _) = sandbox.retently_get("/api/v2/feedback/xyz").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn tags_and_topics_replace_or_append() {
    let sandbox = unlimited().await;
    let id = sandbox.handle.feedback()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/response/tags",
            &json!({"id": id, "tags": ["a", "b"]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["feedbackTags"], json!(["a", "b"]));
    let (_, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/nps/customers/response/tags",
            &json!({"id": id, "tags": ["b", "c"], "op": "append"}),
        )
        .await;
    assert_eq!(body["data"]["feedbackTags"], json!(["a", "b", "c"]));
    let (_, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/response/tags",
            &json!({"id": id, "tags": ["z"], "op": ""}),
        )
        .await;
    assert_eq!(body["data"]["feedbackTags"], json!(["z"]));

    let (_, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/response/topics",
            &json!({"id": id, "topics": [{"name": "Pricing"}]}),
        )
        .await;
    assert_eq!(
        body["data"]["feedbackTopics"],
        json!([{"name": "Pricing", "sentiment": "neutral"}])
    );
    let (_, body) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/response/topics",
            &json!({"id": id, "op": "append", "topics": [{"name": "Speed", "sentiment": "positive"}, {"name": "pricing", "sentiment": "negative"}]}),
        )
        .await;
    assert_eq!(
        body["data"]["feedbackTopics"],
        json!([{"name": "Pricing", "sentiment": "negative"}, {"name": "Speed", "sentiment": "positive"}])
    );
    let (_, single) = sandbox
        .retently_get(&format!("/api/v2/feedback/{id}"))
        .await;
    assert_eq!(single["data"]["feedbackTags"], json!(["z"]));
    assert_eq!(
        single["data"]["feedbackTopics"].as_array().unwrap().len(),
        2
    );

    for (body, status) in [
        (json!({"tags": ["a"]}), 400),
        (json!({"id": id}), 400),
        (json!({"id": id, "tags": "a"}), 400),
        (json!({"id": id, "tags": ["a"], "op": "merge"}), 400),
        (
            json!({"id": "cccccccccccccccccccccccc", "tags": ["a"]}),
            404,
        ),
    ] {
        let (got, _) = sandbox
            .retently_send(Method::POST, "/api/v2/response/tags", &body)
            .await;
        assert_eq!(got, status, "{body}");
    }
    let (status, answer) = sandbox
        .retently_send(
            Method::POST,
            "/api/v2/response/topics",
            &json!({"id": id, "topics": [{"name": "X", "sentiment": "angry"}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        answer["message"],
        "The topics.0.sentiment must be one of: positive, neutral, negative."
    );
}

#[tokio::test]
async fn scores_are_computed_from_stored_feedback() {
    let sandbox = unlimited().await;
    let all = sandbox.handle.feedback();
    for metric in ["nps", "csat", "ces", "star"] {
        let scores: Vec<i64> = all
            .iter()
            .filter(|item| item["metricsType"] == metric.to_uppercase())
            .map(|item| item["score"].as_i64().unwrap())
            .collect();
        let (status, body) = sandbox
            .retently_get(&format!("/api/v2/{metric}/score"))
            .await;
        assert_eq!(status, 200);
        let data = &body["data"];
        assert_eq!(data["metricsType"], metric.to_uppercase());
        assert_eq!(data["totalResponses"], scores.len());
        assert_eq!(data["scoreSum"], scores.iter().sum::<i64>());
        let total = scores.len() as f64;
        let share = |n: usize| (n as f64 * 100.0 / total).round() as i64;
        let (positive, negative) = match metric {
            "nps" => (9, 6),
            "ces" => (5, 3),
            _ => (4, 2),
        };
        let promoters = scores.iter().filter(|s| **s >= positive).count();
        let detractors = scores.iter().filter(|s| **s <= negative).count();
        assert_eq!(data["promotersCount"], promoters);
        assert_eq!(data["detractorsCount"], detractors);
        assert_eq!(data["passivesCount"], scores.len() - promoters - detractors);
        assert_eq!(data["promoters"], share(promoters));
        match metric {
            "nps" => {
                assert_eq!(data["score"], share(promoters) - share(detractors));
                assert_eq!(data["nps"], data["score"]);
            }
            "star" => {
                let mean = scores.iter().sum::<i64>() as f64 / total;
                assert_eq!(
                    data["score"].as_f64().unwrap(),
                    (mean * 10.0).round() / 10.0
                );
                assert!(data.get("nps").is_none());
            }
            _ => assert_eq!(data["score"], share(promoters)),
        }
    }
    let (status, body) = sandbox.retently_get("/api/v2/mood/score").await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], 404);
}

#[tokio::test]
async fn campaigns_templates_companies_reports_outbox() {
    let sandbox = unlimited().await;
    let (status, body) = sandbox.retently_get("/api/v2/campaigns").await;
    assert_eq!(status, 200);
    let campaigns = body["campaigns"].as_array().unwrap();
    assert_eq!(body["data"], body["campaigns"]);
    assert_eq!(body["code"], 200);
    // The default seed has an active transactional campaign of every metric.
    for metric in ["NPS", "CSAT", "CES", "STAR"] {
        assert!(campaigns.iter().any(|campaign| campaign["metric"] == metric
            && campaign["type"] == "transactional"
            && campaign["isActive"] == true));
    }
    for field in [
        "id",
        "name",
        "isActive",
        "templateId",
        "metric",
        "type",
        "channel",
    ] {
        assert!(campaigns[0].get(field).is_some());
    }

    let (_, templates) = sandbox.retently_get("/api/v2/templates").await;
    assert_eq!(templates["data"], templates["templates"]);
    let template = &templates["templates"][0];
    let (status, one) = sandbox
        .retently_get(&format!(
            "/api/v2/templates/{}",
            template["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(one["data"], *template);
    let (status, _) = sandbox
        .retently_get("/api/v2/templates/dddddddddddddddddddddddd")
        .await;
    assert_eq!(status, 404);

    let (_, companies) = sandbox
        .retently_get("/api/v2/companies?sort=companyName&limit=3")
        .await;
    let data = &companies["data"];
    assert_eq!(data["total"], 10);
    assert_eq!(data["pages"], 4);
    let names: Vec<&str> = data["companies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|company| company["companyName"].as_str().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_by_key(|name| name.to_lowercase());
    assert_eq!(names, sorted);
    let company = &data["companies"][0];
    for key in ["NPS", "CSAT", "CES", "STAR"] {
        assert!(company["cxMetrics"].get(key).is_some());
    }
    let domain = company["domain"].as_str().unwrap().to_uppercase();
    let (status, by_domain) = sandbox
        .retently_get(&format!("/api/v2/companies/{domain}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(by_domain["data"]["id"], company["id"]);
    let (status, _) = sandbox
        .retently_get("/api/v2/companies/nowhere.example")
        .await;
    assert_eq!(status, 404);

    let (status, reports) = sandbox.retently_get("/api/v2/reports").await;
    assert_eq!(status, 200);
    assert_eq!(reports["data"].as_array().unwrap().len(), campaigns.len());
    let campaign_id = campaigns[0]["id"].as_str().unwrap();
    let (_, one) = sandbox
        .retently_get(&format!(
            "/api/v2/reports/{campaign_id}?startDate=2000-01-01"
        ))
        .await;
    let report = &one["data"][0];
    assert_eq!(report["campaignId"], campaign_id);
    let responses = sandbox
        .handle
        .feedback()
        .iter()
        .filter(|item| item["campaignId"] == campaign_id)
        .count();
    assert_eq!(report["last"]["total"], responses);
    assert!(report["deliveryStats"]["responded"].as_u64().unwrap() >= responses as u64);
    let trend_total: u64 = report["trend"]
        .as_array()
        .unwrap()
        .iter()
        .map(|point| point["total"].as_u64().unwrap())
        .sum();
    assert_eq!(trend_total, responses as u64);
    let (status, _) = sandbox
        .retently_get("/api/v2/reports/eeeeeeeeeeeeeeeeeeeeeeee")
        .await;
    assert_eq!(status, 404);

    let (_, outbox) = sandbox.retently_get("/api/v2/outbox?limit=1000").await;
    let surveys = outbox["data"]["surveys"].as_array().unwrap();
    assert_eq!(outbox["data"]["sort"], "-surveyCreatedDate");
    let in_app = surveys
        .iter()
        .filter(|survey| survey["channel"] == "in-app")
        .count();
    let (_, filtered) = sandbox
        .retently_get("/api/v2/outbox?limit=1000&channel=inapp")
        .await;
    assert_eq!(filtered["data"]["total"], in_app);
    let (_, by_sender) = sandbox.retently_get("/api/v2/outbox?sentBy=manual").await;
    assert_eq!(by_sender["data"]["total"], 0);
    for bad in ["channel=fax", "sentBy=robot", "sort=-nope"] {
        let (status, _) = sandbox.retently_get(&format!("/api/v2/outbox?{bad}")).await;
        assert_eq!(status, 400, "{bad}");
    }
}

#[tokio::test]
async fn unknown_routes_answer_in_the_envelope() {
    let sandbox = unlimited().await;
    let (status, body) = sandbox.retently_get("/api/v2/trends").await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"message": "Not found.", "code": 404, "data": null})
    );
}

#[tokio::test]
async fn the_same_seed_gives_the_same_data() {
    let a = TestSandbox::start_with(config_with(SeedConfig::default())).await;
    let b = TestSandbox::start_with(config_with(SeedConfig::default())).await;
    let ids = |sandbox: &TestSandbox| -> Vec<Value> {
        sandbox
            .handle
            .feedback()
            .iter()
            .map(|item| json!([item["id"], item["score"], item["email"]]))
            .collect()
    };
    assert_eq!(ids(&a), ids(&b));
    let c = TestSandbox::start_with(config_with(SeedConfig {
        rng_seed: 99,
        ..SeedConfig::default()
    }))
    .await;
    assert_ne!(ids(&a), ids(&c));
    assert_eq!(a.handle.feedback().len(), 500);
    assert_eq!(a.handle.retently_customers().len(), 200);
    a.stop().await;
}
