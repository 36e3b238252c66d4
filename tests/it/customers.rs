//! CustomerService against the real server and the in-process sandbox: what callers get back and
//! what the upstreams recorded, for reads and writes, SYNC and ASYNC, repeats and failures.

use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::customer_service_client::CustomerServiceClient;
use cx_gateway::pb::delivery_service_client::DeliveryServiceClient;
use cx_gateway::pb::property_value::Kind;
use cx_sandbox::{Api, FaultConfig, SandboxHandle};
use serde_json::{Value, json};
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::support::TestGateway;

const RETENTLY: i32 = pb::Destination::Retently as i32;
const RETAINLY: i32 = pb::Destination::Retainly as i32;
const CREATED: i32 = pb::WriteOutcome::Created as i32;
const UPDATED: i32 = pb::WriteOutcome::Updated as i32;
const APPLIED: i32 = pb::WriteOutcome::Applied as i32;
const FAILED: i32 = pb::WriteOutcome::Failed as i32;

fn client(gateway: &TestGateway) -> CustomerServiceClient<Channel> {
    CustomerServiceClient::new(gateway.channel.clone())
}

fn sandbox(gateway: &TestGateway) -> SandboxHandle {
    gateway.sandbox().handle().clone()
}

fn customer(customer_id: &str, email: &str) -> pb::Customer {
    pb::Customer {
        customer_id: customer_id.to_owned(),
        email: email.to_owned(),
        ..Default::default()
    }
}

fn property(name: &str, kind: Kind) -> pb::Property {
    pb::Property {
        name: name.to_owned(),
        value: Some(pb::PropertyValue { kind: Some(kind) }),
        label: String::new(),
    }
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

fn options(mode: pb::DeliveryMode, key: &str) -> Option<pb::WriteOptions> {
    Some(pb::WriteOptions {
        mode: mode as i32,
        idempotency_key: key.to_owned(),
    })
}

/// A customer with one property of every kind.
fn ann() -> pb::Customer {
    pb::Customer {
        first_name: "Ann".to_owned(),
        last_name: "Lee".to_owned(),
        company: "Lee Analytics".to_owned(),
        tags: strings(&["vip", "beta"]),
        properties: vec![
            property("plan", Kind::StringValue("pro".to_owned())),
            property("seats", Kind::IntegerValue(12)),
            property("trial", Kind::BoolValue(true)),
            property("ratio", Kind::NumberValue(0.25)),
            property(
                "renewal",
                Kind::DateValue(pb::Date {
                    year: 2025,
                    month: 3,
                    day: 7,
                }),
            ),
            property(
                "signed_up",
                Kind::TimestampValue(prost_types::Timestamp {
                    seconds: 1_645_822_800,
                    nanos: 0,
                }),
            ),
            property(
                "regions",
                Kind::StringListValue(pb::StringList {
                    values: strings(&["eu", "us"]),
                }),
            ),
        ],
        ..customer("c-ann", " Ann@Example.com ")
    }
}

/// The stored Retently property `name` as `(type, value)`.
fn stored_property(customer: &Value, name: &str) -> (String, String) {
    let property = customer["properties"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no property {name} in {customer}"));
    (
        property["type"].as_str().unwrap().to_owned(),
        property["value"].as_str().unwrap().to_owned(),
    )
}

fn property_kind(customer: &pb::Customer, name: &str) -> Kind {
    customer
        .properties
        .iter()
        .find(|p| p.name == name)
        .and_then(|p| p.value.clone())
        .and_then(|v| v.kind)
        .unwrap_or_else(|| panic!("no property {name}"))
}

fn error_reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

fn error_metadata(status: &tonic::Status, key: &str) -> String {
    status
        .get_error_details()
        .error_info()
        .and_then(|info| info.metadata.get(key).cloned())
        .unwrap_or_default()
}

/// Requests the sandbox answered on `route` with `status`.
fn count(sandbox: &SandboxHandle, api: Api, route: &str, status: u16) -> u64 {
    sandbox.request_count(api, route, status)
}

async fn finished(channel: &Channel, delivery_id: &str) -> pb::Delivery {
    crate::support::finished_delivery(channel, delivery_id).await
}

#[tokio::test]
async fn upserts_reach_both_destinations_with_typed_fields_in_one_call_each() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);

    let response = client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![ann(), customer("c-bob", "bob@example.org")],
            destinations: vec![RETENTLY, RETAINLY],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.delivery_id.is_empty());
    assert_eq!(response.results.len(), 2);
    let first = &response.results[0];
    assert_eq!(
        (
            first.index,
            first.customer_id.as_str(),
            first.email.as_str()
        ),
        (0, "c-ann", " Ann@Example.com ")
    );
    let outcomes: Vec<(i32, i32)> = first
        .outcomes
        .iter()
        .map(|o| (o.destination, o.outcome))
        .collect();
    assert_eq!(outcomes, [(RETENTLY, CREATED), (RETAINLY, APPLIED)]);
    let retently_id = first.outcomes[0].retently_id.clone();
    assert_eq!(retently_id.len(), 24);
    assert_eq!(response.results[1].outcomes[0].outcome, CREATED);

    // Retently: the normalised address, camelCase names, typed text properties.
    let stored = sandbox.retently_customer("ann@example.com").unwrap();
    assert_eq!(stored["id"], retently_id.as_str());
    assert_eq!(stored["firstName"], "Ann");
    assert_eq!(stored["lastName"], "Lee");
    assert_eq!(stored["companyName"], "Lee Analytics");
    assert_eq!(stored["tags"], json!(["vip", "beta"]));
    for (name, kind, value) in [
        ("plan", "text", "pro"),
        ("seats", "integer", "12"),
        ("trial", "boolean", "true"),
        ("ratio", "text", "0.25"),
        ("renewal", "date", "2025-03-07T00:00:00.000Z"),
        ("signed_up", "date", "2022-02-25T21:00:00.000Z"),
        ("regions", "collection", "eu,us"),
    ] {
        assert_eq!(
            stored_property(&stored, name),
            (kind.to_owned(), value.to_owned()),
            "{name}"
        );
    }
    // Retainly: the caller's id, standard fields by their snake_case names, properties as
    // top-level JSON values.
    let stored = sandbox.retainly_customer(&json!("c-ann")).unwrap();
    assert_eq!(stored.id, json!("c-ann"));
    assert_eq!(
        Value::Object(stored.fields),
        json!({
            "email": "ann@example.com",
            "first_name": "Ann",
            "last_name": "Lee",
            "company": "Lee Analytics",
            "tags": ["vip", "beta"],
            "plan": "pro",
            "seats": 12,
            "trial": true,
            "ratio": 0.25,
            "renewal": "2025-03-07",
            "signed_up": "2022-02-25T21:00:00.000Z",
            "regions": ["eu", "us"],
        })
    );
    // Both customers travelled in one call per upstream.
    assert_eq!(count(&sandbox, Api::Retently, "/api/v2/customers", 200), 1);
    assert_eq!(count(&sandbox, Api::Retainly, "/customers", 200), 1);

    // A second upsert updates; fields left empty are not sent, so nothing is cleared.
    let response = client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![pb::Customer {
                last_name: "Lee-Smith".to_owned(),
                ..customer("c-ann", "ann@example.com")
            }],
            destinations: vec![RETAINLY, RETENTLY],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let outcomes: Vec<(i32, i32)> = response.results[0]
        .outcomes
        .iter()
        .map(|o| (o.destination, o.outcome))
        .collect();
    assert_eq!(outcomes, [(RETAINLY, APPLIED), (RETENTLY, UPDATED)]);
    let stored = sandbox.retently_customer("ann@example.com").unwrap();
    assert_eq!(
        (stored["firstName"].as_str(), stored["lastName"].as_str()),
        (Some("Ann"), Some("Lee-Smith"))
    );
    assert_eq!(stored["tags"], json!(["vip", "beta"]));
    let stored = sandbox.retainly_customer(&json!("c-ann")).unwrap();
    assert_eq!(stored.fields["first_name"], "Ann");
    assert_eq!(stored.fields["last_name"], "Lee-Smith");
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn customers_are_read_by_email_or_id_with_typed_properties() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    let upserted = client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![ann()],
            destinations: vec![RETENTLY],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let retently_id = upserted.results[0].outcomes[0].retently_id.clone();

    let by_email = client
        .get_customer(pb::GetCustomerRequest {
            lookup: Some(pb::get_customer_request::Lookup::Email(
                "ANN@example.com".to_owned(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(by_email.retently_id, retently_id);
    assert_eq!(by_email.email, "ann@example.com");
    assert!(by_email.customer_id.is_empty());
    assert_eq!(
        (by_email.first_name.as_str(), by_email.company.as_str()),
        ("Ann", "Lee Analytics")
    );
    assert_eq!(by_email.company_id.len(), 24);
    assert_eq!(by_email.tags, strings(&["vip", "beta"]));
    assert!(by_email.create_time.is_some() && by_email.update_time.is_some());
    assert_eq!(
        property_kind(&by_email, "plan"),
        Kind::StringValue("pro".to_owned())
    );
    assert_eq!(property_kind(&by_email, "seats"), Kind::IntegerValue(12));
    assert_eq!(property_kind(&by_email, "trial"), Kind::BoolValue(true));
    assert_eq!(
        property_kind(&by_email, "ratio"),
        Kind::StringValue("0.25".to_owned())
    );
    assert_eq!(
        property_kind(&by_email, "signed_up"),
        Kind::TimestampValue(prost_types::Timestamp {
            seconds: 1_645_822_800,
            nanos: 0
        })
    );
    assert_eq!(
        property_kind(&by_email, "regions"),
        Kind::StringListValue(pb::StringList {
            values: strings(&["eu", "us"])
        })
    );

    let by_id = client
        .get_customer(pb::GetCustomerRequest {
            lookup: Some(pb::get_customer_request::Lookup::RetentlyId(
                retently_id.clone(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(by_id, by_email);
    assert_eq!(
        count(&sandbox, Api::Retently, "/api/v2/customers/{id}", 200),
        1
    );

    // Upstream 404 and an empty email lookup are both NOT_FOUND.
    let missing = client
        .get_customer(pb::GetCustomerRequest {
            lookup: Some(pb::get_customer_request::Lookup::RetentlyId(
                "0123456789abcdef01234567".to_owned(),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(error_reason(&missing), "UPSTREAM_NOT_FOUND");
    assert_eq!(error_metadata(&missing, "upstream"), "retently");
    assert_eq!(error_metadata(&missing, "status"), "404");
    assert_eq!(
        count(&sandbox, Api::Retently, "/api/v2/customers/{id}", 404),
        1
    );
    let missing = client
        .get_customer(pb::GetCustomerRequest {
            lookup: Some(pb::get_customer_request::Lookup::Email(
                "nobody@example.com".to_owned(),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(error_metadata(&missing, "upstream"), "retently");
    gateway.stop().await.unwrap();
}

fn create_seconds(customer: &pb::Customer) -> (i64, i32) {
    let time = customer.create_time.as_ref().unwrap();
    (time.seconds, time.nanos)
}

#[tokio::test]
async fn customer_pages_keep_their_range_while_customers_are_added() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let list = |page_token: String| pb::ListCustomersRequest {
        page_size: 80,
        page_token,
        ..Default::default()
    };
    let first = client
        .list_customers(list(String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.customers.len(), first.total_size), (80, 200));

    // A customer created while paging does not shift later pages.
    client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![customer("", "newcomer@example.com")],
            destinations: vec![RETENTLY],
            options: None,
        })
        .await
        .unwrap();
    let mut seen = first.customers.clone();
    let first_token = first.next_page_token.clone();
    let mut token = first.next_page_token;
    let mut pages = 1;
    while !token.is_empty() {
        let page = client
            .list_customers(list(token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_size, 200);
        seen.extend(page.customers);
        token = page.next_page_token;
        pages += 1;
    }
    assert_eq!((pages, seen.len()), (3, 200));
    let mut ids: Vec<&str> = seen.iter().map(|c| c.retently_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200);
    assert!(seen.iter().all(|c| c.email != "newcomer@example.com"));
    assert!(
        seen.windows(2)
            .all(|pair| create_seconds(&pair[0]) >= create_seconds(&pair[1])),
        "newest first"
    );

    // A new first page that ends after the newcomer's creation (an unset end is pinned to the
    // call's whole second, which may not have ended yet) sees it first; oldest-first starts at
    // the other end.
    let fresh_end = Some(prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 60,
        nanos: 0,
    });
    let fresh = client
        .list_customers(pb::ListCustomersRequest {
            end_time: fresh_end,
            ..list(String::new())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fresh.total_size, 201);
    assert_eq!(fresh.customers[0].email, "newcomer@example.com");
    let oldest = client
        .list_customers(pb::ListCustomersRequest {
            page_size: 1,
            order: pb::TimeOrder::OldestFirst as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        oldest.customers[0].retently_id,
        seen.last().unwrap().retently_id
    );

    // Filters: one address; a time range.
    let one = client
        .list_customers(pb::ListCustomersRequest {
            email: "Newcomer@Example.com".to_owned(),
            end_time: fresh_end,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.total_size, 1);
    assert!(one.next_page_token.is_empty());
    let middle = create_seconds(&seen[100]).0;
    let older = client
        .list_customers(pb::ListCustomersRequest {
            page_size: 1000,
            end_time: Some(prost_types::Timestamp {
                seconds: middle,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!older.customers.is_empty() && older.customers.len() < 200);
    assert!(
        older
            .customers
            .iter()
            .all(|c| create_seconds(c).0 <= middle)
    );

    // A token only continues the list it came from.
    let error = client
        .list_customers(pb::ListCustomersRequest {
            page_size: 80,
            page_token: first_token,
            email: "newcomer@example.com".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    let fields: Vec<String> = error
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["page_token"]);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn async_writes_are_delivered_in_order_per_customer() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    let named = |first_name: &str| pb::UpsertCustomersRequest {
        customers: vec![pb::Customer {
            first_name: first_name.to_owned(),
            ..customer("c-ord", "ordered@example.com")
        }],
        destinations: vec![RETENTLY, RETAINLY],
        options: options(pb::DeliveryMode::Async, ""),
    };
    let one = client
        .upsert_customers(named("One"))
        .await
        .unwrap()
        .into_inner();
    let two = client
        .upsert_customers(named("Two"))
        .await
        .unwrap()
        .into_inner();
    for acknowledged in [&one, &two] {
        assert!(acknowledged.delivery_id.starts_with("dlv_"));
        assert!(acknowledged.results.is_empty());
    }
    let first = finished(&gateway.channel, &one.delivery_id).await;
    let second = finished(&gateway.channel, &two.delivery_id).await;
    let result = |delivery: &pb::Delivery| match delivery.result.clone() {
        Some(pb::delivery::Result::UpsertCustomers(response)) => response,
        other => panic!("unexpected result {other:?}"),
    };
    assert_eq!(first.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(
        first.method,
        "/cx.gateway.v1.CustomerService/UpsertCustomers"
    );
    assert_eq!(first.destinations, [RETENTLY, RETAINLY]);
    assert_eq!(first.item_count, 1);
    // The first write reached Retently first: it created, the second updated.
    let first = result(&first);
    assert_eq!(first.delivery_id, one.delivery_id);
    assert_eq!(first.results[0].outcomes[0].outcome, CREATED);
    assert_eq!(first.results[0].outcomes[1].outcome, APPLIED);
    assert_eq!(result(&second).results[0].outcomes[0].outcome, UPDATED);
    assert_eq!(
        sandbox.retently_customer("ordered@example.com").unwrap()["firstName"],
        "Two"
    );
    assert_eq!(
        sandbox.retainly_customer(&json!("c-ord")).unwrap().fields["first_name"],
        "Two"
    );
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn repeats_with_an_idempotency_key_return_the_first_response_without_a_second_call() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    let upsert = |key: &str, first_name: &str| pb::UpsertCustomersRequest {
        customers: vec![pb::Customer {
            first_name: first_name.to_owned(),
            ..customer("c-idem", "idem@example.com")
        }],
        destinations: vec![RETENTLY, RETAINLY],
        options: options(pb::DeliveryMode::Sync, key),
    };
    let first = client
        .upsert_customers(upsert("key-1", "Ida"))
        .await
        .unwrap()
        .into_inner();
    let repeat = client
        .upsert_customers(upsert("key-1", "Ida"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(repeat, first);
    assert_eq!(repeat.results[0].outcomes[0].outcome, CREATED);
    assert_eq!(count(&sandbox, Api::Retently, "/api/v2/customers", 200), 1);
    assert_eq!(count(&sandbox, Api::Retainly, "/customers", 200), 1);

    let reused = client
        .upsert_customers(upsert("key-1", "Other"))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(error_reason(&reused), "IDEMPOTENCY_KEY_REUSED");

    // ASYNC: the repeat gets the same delivery, and the upstream sees one delete.
    let delete = pb::DeleteCustomersRequest {
        customers: vec![pb::CustomerRef {
            customer_id: "c-idem".to_owned(),
            email: "idem@example.com".to_owned(),
        }],
        destinations: vec![RETENTLY, RETAINLY],
        options: options(pb::DeliveryMode::Async, "key-2"),
    };
    let queued = client
        .delete_customers(delete.clone())
        .await
        .unwrap()
        .into_inner();
    let repeat = client.delete_customers(delete).await.unwrap().into_inner();
    assert_eq!(repeat.delivery_id, queued.delivery_id);
    let delivery = finished(&gateway.channel, &queued.delivery_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(delivery.idempotency_key, "key-2");
    // One POST before, one DELETE now, on the same route.
    assert_eq!(count(&sandbox, Api::Retently, "/api/v2/customers", 200), 2);
    assert_eq!(count(&sandbox, Api::Retainly, "/customers", 200), 2);
    assert!(sandbox.retently_customer("idem@example.com").is_none());
    assert!(sandbox.retainly_customer(&json!("c-idem")).is_none());
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn deletes_report_each_customer_at_each_destination() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    let upserted = client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![customer("c-del", "del@example.com")],
            destinations: vec![RETENTLY, RETAINLY],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let retently_id = upserted.results[0].outcomes[0].retently_id.clone();
    let response = client
        .delete_customers(pb::DeleteCustomersRequest {
            customers: vec![
                pb::CustomerRef {
                    customer_id: "c-del".to_owned(),
                    email: "Del@Example.com".to_owned(),
                },
                pb::CustomerRef {
                    customer_id: "c-ghost".to_owned(),
                    email: "ghost@example.com".to_owned(),
                },
            ],
            destinations: vec![RETENTLY, RETAINLY],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let deleted = &response.results[0];
    assert_eq!(deleted.email, "Del@Example.com");
    assert_eq!(
        (
            deleted.outcomes[0].outcome,
            deleted.outcomes[0].retently_id.as_str()
        ),
        (APPLIED, retently_id.as_str())
    );
    assert_eq!(deleted.outcomes[1].outcome, APPLIED);
    // Retently says the ghost was never there; Retainly does not mind.
    let ghost = &response.results[1];
    assert_eq!(ghost.outcomes[0].outcome, FAILED);
    let error = ghost.outcomes[0].error.as_ref().unwrap();
    assert_eq!(error.code, tonic::Code::NotFound as i32);
    assert_eq!(error.reason, "UPSTREAM_ITEM_REJECTED");
    assert_eq!(error.metadata["upstream"], "retently");
    assert_eq!(ghost.outcomes[1].outcome, APPLIED);
    assert!(sandbox.retently_customer("del@example.com").is_none());
    assert!(sandbox.retainly_customer(&json!("c-del")).is_none());
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn unsubscribe_and_resubscribe_change_the_retently_opt_out() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![customer("", "optout@example.com")],
            destinations: vec![RETENTLY],
            options: None,
        })
        .await
        .unwrap();
    let response = client
        .unsubscribe_customers(pb::UnsubscribeCustomersRequest {
            emails: strings(&["OptOut@example.com", "ghost@example.com"]),
            message: "asked by phone".to_owned(),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let outcomes: Vec<(i32, i32)> = response
        .results
        .iter()
        .map(|r| (r.outcomes[0].destination, r.outcomes[0].outcome))
        .collect();
    assert_eq!(outcomes, [(RETENTLY, APPLIED), (RETENTLY, FAILED)]);
    assert_eq!(response.results[0].email, "OptOut@example.com");
    assert_eq!(
        response.results[1].outcomes[0].error.as_ref().unwrap().code,
        tonic::Code::NotFound as i32
    );
    assert_eq!(
        sandbox.retently_customer("optout@example.com").unwrap()["unsubscribed"],
        true
    );

    let queued = client
        .resubscribe_customers(pb::ResubscribeCustomersRequest {
            emails: strings(&["optout@example.com"]),
            options: options(pb::DeliveryMode::Async, ""),
        })
        .await
        .unwrap()
        .into_inner();
    let delivery = finished(&gateway.channel, &queued.delivery_id).await;
    match delivery.result {
        Some(pb::delivery::Result::ResubscribeCustomers(result)) => {
            assert_eq!(result.results[0].outcomes[0].outcome, APPLIED);
        }
        other => panic!("unexpected result {other:?}"),
    }
    assert_eq!(
        sandbox.retently_customer("optout@example.com").unwrap()["unsubscribed"],
        false
    );
    assert_eq!(
        count(
            &sandbox,
            Api::Retently,
            "/api/v2/customers/unsubscribe",
            200
        ),
        1
    );
    assert_eq!(
        count(
            &sandbox,
            Api::Retently,
            "/api/v2/customers/resubscribe",
            200
        ),
        1
    );
    gateway.stop().await.unwrap();
}

fn fields(pairs: Value) -> Option<prost_types::Struct> {
    fn value(json: Value) -> prost_types::Value {
        use prost_types::value::Kind as V;
        let kind = match json {
            Value::Null => V::NullValue(0),
            Value::Bool(flag) => V::BoolValue(flag),
            Value::Number(number) => V::NumberValue(number.as_f64().unwrap()),
            Value::String(text) => V::StringValue(text),
            Value::Array(items) => V::ListValue(prost_types::ListValue {
                values: items.into_iter().map(value).collect(),
            }),
            Value::Object(object) => V::StructValue(prost_types::Struct {
                fields: object.into_iter().map(|(k, v)| (k, value(v))).collect(),
            }),
        };
        prost_types::Value { kind: Some(kind) }
    }
    match value(pairs).kind {
        Some(prost_types::value::Kind::StructValue(object)) => Some(object),
        _ => None,
    }
}

fn item(item_id: &str, pairs: Value) -> pb::ArrayItem {
    pb::ArrayItem {
        item_id: item_id.to_owned(),
        fields: fields(pairs),
    }
}

#[tokio::test]
async fn array_items_are_upserted_by_id_appended_and_deleted() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    let response = client
        .upsert_customer_array_items(pb::UpsertCustomerArrayItemsRequest {
            records: vec![
                pb::CustomerArrayItems {
                    customer_id: "c-arr".to_owned(),
                    field: "purchases".to_owned(),
                    items: vec![
                        item("p1", json!({"amount": 10, "products": [{"name": "apple"}]})),
                        item("", json!({"amount": 5.5})),
                    ],
                },
                pb::CustomerArrayItems {
                    customer_id: "c-arr".to_owned(),
                    field: "bookings".to_owned(),
                    items: vec![item("b1", json!({"nights": 2}))],
                },
            ],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let outcomes: Vec<(i32, &str, &str, i32)> = response
        .results
        .iter()
        .map(|r| (r.index, r.customer_id.as_str(), r.field.as_str(), r.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            (0, "c-arr", "purchases", APPLIED),
            (1, "c-arr", "bookings", APPLIED)
        ]
    );
    assert_eq!(
        sandbox
            .retainly_array(&json!("c-arr"), "purchases")
            .unwrap(),
        [
            json!({"id": "p1", "amount": 10, "products": [{"name": "apple"}]}),
            json!({"amount": 5.5})
        ]
    );
    assert_eq!(count(&sandbox, Api::Retainly, "/arrays", 200), 1);

    // The same id updates in place (ASYNC this time).
    let queued = client
        .upsert_customer_array_items(pb::UpsertCustomerArrayItemsRequest {
            records: vec![pb::CustomerArrayItems {
                customer_id: "c-arr".to_owned(),
                field: "purchases".to_owned(),
                items: vec![item("p1", json!({"amount": 12}))],
            }],
            options: options(pb::DeliveryMode::Async, ""),
        })
        .await
        .unwrap()
        .into_inner();
    let delivery = finished(&gateway.channel, &queued.delivery_id).await;
    assert_eq!(delivery.destinations, [RETAINLY]);
    assert!(matches!(
        delivery.result,
        Some(pb::delivery::Result::UpsertCustomerArrayItems(ref r)) if r.results[0].outcome == APPLIED
    ));
    let purchases = sandbox
        .retainly_array(&json!("c-arr"), "purchases")
        .unwrap();
    assert_eq!(purchases.len(), 2);
    assert_eq!(purchases[0], json!({"id": "p1", "amount": 12}));

    // Deleting by id; a missing customer or item is not an error.
    let response = client
        .delete_customer_array_items(pb::DeleteCustomerArrayItemsRequest {
            records: vec![
                pb::CustomerArrayItemIds {
                    customer_id: "c-arr".to_owned(),
                    field: "bookings".to_owned(),
                    item_ids: strings(&["b1", "b-missing"]),
                },
                pb::CustomerArrayItemIds {
                    customer_id: "c-nobody".to_owned(),
                    field: "bookings".to_owned(),
                    item_ids: strings(&["b1"]),
                },
            ],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.results.iter().all(|r| r.outcome == APPLIED));
    assert_eq!(
        sandbox.retainly_array(&json!("c-arr"), "bookings").unwrap(),
        Vec::<Value>::new()
    );
    assert_eq!(count(&sandbox, Api::Retainly, "/arrays", 200), 3);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_record_retainly_rejects_fails_alone() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    // `plan` holds a scalar, so it cannot take array items.
    client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![pb::Customer {
                properties: vec![property("plan", Kind::StringValue("pro".to_owned()))],
                ..customer("c-scalar", "")
            }],
            destinations: vec![RETAINLY],
            options: None,
        })
        .await
        .unwrap();
    let response = client
        .upsert_customer_array_items(pb::UpsertCustomerArrayItemsRequest {
            records: vec![
                pb::CustomerArrayItems {
                    customer_id: "c-scalar".to_owned(),
                    field: "plan".to_owned(),
                    items: vec![item("x", json!({"a": 1}))],
                },
                pb::CustomerArrayItems {
                    customer_id: "c-fine".to_owned(),
                    field: "purchases".to_owned(),
                    items: vec![item("p1", json!({"a": 1}))],
                },
            ],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results[0].outcome, FAILED);
    let error = response.results[0].error.as_ref().unwrap();
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
    assert_eq!(error.reason, "UPSTREAM_INVALID_ARGUMENT");
    assert_eq!(error.metadata["field"], "field");
    assert_eq!(error.metadata["upstream"], "retainly");
    assert_eq!(error.metadata["status"], "422");
    assert_eq!(response.results[1].outcome, APPLIED);
    assert_eq!(
        sandbox
            .retainly_array(&json!("c-fine"), "purchases")
            .unwrap()
            .len(),
        1
    );
    assert_eq!(count(&sandbox, Api::Retainly, "/arrays", 422), 1);
    assert_eq!(count(&sandbox, Api::Retainly, "/arrays", 200), 1);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn upstream_failures_become_per_destination_outcomes() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    sandbox.set_faults(
        Api::Retainly,
        FaultConfig {
            error_rate: 1.0,
            error_statuses: vec![503],
            ..Default::default()
        },
    );
    let response = client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![customer("c-down", "down@example.com")],
            destinations: vec![RETENTLY, RETAINLY],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let outcomes = &response.results[0].outcomes;
    assert_eq!(outcomes[0].outcome, CREATED);
    assert_eq!(outcomes[1].outcome, FAILED);
    let error = outcomes[1].error.as_ref().unwrap();
    assert_eq!(error.code, tonic::Code::Unavailable as i32);
    assert_eq!(error.metadata["upstream"], "retainly");
    assert_eq!(error.metadata["status"], "503");
    assert!(sandbox.fault_counts(Api::Retainly).errors >= 1);
    assert!(sandbox.retainly_customer(&json!("c-down")).is_none());

    // A customer Retainly refuses (500 fields after the merge with what it stores) fails alone;
    // its batch mate is applied.
    sandbox.clear_faults(Api::Retainly);
    let many = |prefix: &str| -> Vec<pb::Property> {
        (0..494)
            .map(|i| property(&format!("{prefix}{i}"), Kind::IntegerValue(i)))
            .collect()
    };
    let full = |properties| pb::UpsertCustomersRequest {
        customers: vec![pb::Customer {
            properties,
            ..customer("c-full", "")
        }],
        destinations: vec![RETAINLY],
        options: None,
    };
    let filled = client
        .upsert_customers(full(many("a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filled.results[0].outcomes[0].outcome, APPLIED);
    let response = client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![
                pb::Customer {
                    properties: many("b"),
                    ..customer("c-full", "")
                },
                customer("c-mate", ""),
            ],
            destinations: vec![RETAINLY],
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let refused = &response.results[0].outcomes[0];
    assert_eq!(refused.outcome, FAILED);
    let error = refused.error.as_ref().unwrap();
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
    assert_eq!(error.metadata["status"], "422");
    assert_eq!(response.results[1].outcomes[0].outcome, APPLIED);
    assert!(sandbox.retainly_customer(&json!("c-mate")).is_some());
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn an_async_write_is_retried_until_the_upstream_recovers() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    sandbox.set_faults(
        Api::Retainly,
        FaultConfig {
            error_rate: 1.0,
            ..Default::default()
        },
    );
    let queued = client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![customer("c-later", "later@example.com")],
            destinations: vec![RETENTLY, RETAINLY],
            options: options(pb::DeliveryMode::Async, ""),
        })
        .await
        .unwrap()
        .into_inner();
    // Wait for a failed attempt to be recorded, then let Retainly recover.
    let mut deliveries = DeliveryServiceClient::new(gateway.channel.clone());
    let failed_once = async {
        loop {
            let delivery = deliveries
                .get_delivery(pb::GetDeliveryRequest {
                    delivery_id: queued.delivery_id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .delivery
                .unwrap();
            if let Some(error) = delivery.last_error {
                return (delivery.state, error);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (state, error) = tokio::time::timeout(Duration::from_secs(60), failed_once)
        .await
        .unwrap();
    assert_ne!(state, pb::DeliveryState::Delivered as i32);
    assert_ne!(state, pb::DeliveryState::DeadLettered as i32);
    assert_eq!(error.reason, "PARTIAL_DELIVERY");
    sandbox.clear_faults(Api::Retainly);
    let delivery = finished(&gateway.channel, &queued.delivery_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::Delivered as i32);
    assert!(delivery.attempt_count >= 2);
    match delivery.result {
        Some(pb::delivery::Result::UpsertCustomers(result)) => {
            let outcomes: Vec<i32> = result.results[0]
                .outcomes
                .iter()
                .map(|o| o.outcome)
                .collect();
            // Replayed whole: Retently already had the customer from the first attempt.
            assert_eq!(outcomes, [UPDATED, APPLIED]);
        }
        other => panic!("unexpected result {other:?}"),
    }
    assert!(sandbox.retainly_customer(&json!("c-later")).is_some());
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn an_async_append_retainly_may_have_applied_is_dead_lettered_in_doubt() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    sandbox.set_faults(
        Api::Retainly,
        FaultConfig {
            error_rate: 1.0,
            error_statuses: vec![502],
            ..Default::default()
        },
    );
    // An item without an id is appended: sent twice, it would be stored twice.
    let queued = client
        .upsert_customer_array_items(pb::UpsertCustomerArrayItemsRequest {
            records: vec![pb::CustomerArrayItems {
                customer_id: "c-doubt".to_owned(),
                field: "purchases".to_owned(),
                items: vec![item("", json!({"amount": 1}))],
            }],
            options: options(pb::DeliveryMode::Async, ""),
        })
        .await
        .unwrap()
        .into_inner();
    let delivery = finished(&gateway.channel, &queued.delivery_id).await;
    assert_eq!(delivery.state, pb::DeliveryState::DeadLettered as i32);
    let error = delivery.last_error.unwrap();
    assert_eq!(error.reason, "DELIVERY_IN_DOUBT");
    assert_eq!(error.code, tonic::Code::Aborted as i32);
    assert_eq!(error.metadata["cause"], "UPSTREAM_UNAVAILABLE");
    assert_eq!(error.metadata["status"], "502");
    assert_eq!(error.metadata["upstream"], "retainly");
    // Sent once, never repeated.
    assert_eq!(count(&sandbox, Api::Retainly, "/arrays", 502), 1);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_passed_deadline_is_deadline_exceeded() {
    // The deadline comes from the gateway's default: a client-side timeout would make the tonic
    // client give up on its own (as CANCELLED) at the same instant.
    let gateway = TestGateway::start_with(
        cx_sandbox::SandboxConfig::default(),
        vec![("CXGW_DEFAULT_DEADLINE", "300ms".to_owned())],
    )
    .await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    sandbox.set_faults(
        Api::Retainly,
        FaultConfig {
            latency_ms: 3_000,
            ..Default::default()
        },
    );
    let error = client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: vec![customer("c-slow", "")],
            destinations: vec![RETAINLY],
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::DeadlineExceeded);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn companies_are_listed_page_by_page_and_read_by_id_or_domain() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    let mut companies = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_companies(pb::ListCompaniesRequest {
                page_size: 4,
                page_token: token,
                order: pb::TimeOrder::Unspecified as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_size, 10);
        companies.extend(page.companies);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(companies.len(), 10);
    assert_eq!(count(&sandbox, Api::Retently, "/api/v2/companies", 200), 3);
    let times: Vec<i64> = companies
        .iter()
        .map(|c| c.create_time.as_ref().unwrap().seconds)
        .collect();
    assert!(times.windows(2).all(|pair| pair[0] >= pair[1]));
    let oldest = client
        .list_companies(pb::ListCompaniesRequest {
            page_size: 1,
            page_token: String::new(),
            order: pb::TimeOrder::OldestFirst as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(oldest.companies[0], *companies.last().unwrap());

    let listed = &companies[0];
    assert_eq!(listed.company_id.len(), 24);
    assert!(!listed.domain.is_empty() && !listed.name.is_empty());
    let by_id = client
        .get_company(pb::GetCompanyRequest {
            lookup: Some(pb::get_company_request::Lookup::CompanyId(
                listed.company_id.clone(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .company
        .unwrap();
    assert_eq!(by_id, *listed);
    let by_domain = client
        .get_company(pb::GetCompanyRequest {
            lookup: Some(pb::get_company_request::Lookup::Domain(
                listed.domain.to_uppercase(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .company
        .unwrap();
    assert_eq!(by_domain, *listed);
    let missing = client
        .get_company(pb::GetCompanyRequest {
            lookup: Some(pb::get_company_request::Lookup::Domain(
                "no-such-company.example".to_owned(),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(error_metadata(&missing, "status"), "404");
    assert_eq!(
        count(&sandbox, Api::Retently, "/api/v2/companies/{key}", 200),
        2
    );
    gateway.stop().await.unwrap();
}

/// One malformed call of any CustomerService RPC.
enum Bad {
    Upsert(pb::UpsertCustomersRequest),
    Get(pb::GetCustomerRequest),
    List(pb::ListCustomersRequest),
    Delete(pb::DeleteCustomersRequest),
    Unsubscribe(pb::UnsubscribeCustomersRequest),
    Resubscribe(pb::ResubscribeCustomersRequest),
    UpsertItems(pb::UpsertCustomerArrayItemsRequest),
    DeleteItems(pb::DeleteCustomerArrayItemsRequest),
    ListCompanies(pb::ListCompaniesRequest),
    GetCompany(pb::GetCompanyRequest),
}

async fn send(client: &mut CustomerServiceClient<Channel>, call: Bad) -> tonic::Status {
    let result = match call {
        Bad::Upsert(r) => client.upsert_customers(r).await.map(drop),
        Bad::Get(r) => client.get_customer(r).await.map(drop),
        Bad::List(r) => client.list_customers(r).await.map(drop),
        Bad::Delete(r) => client.delete_customers(r).await.map(drop),
        Bad::Unsubscribe(r) => client.unsubscribe_customers(r).await.map(drop),
        Bad::Resubscribe(r) => client.resubscribe_customers(r).await.map(drop),
        Bad::UpsertItems(r) => client.upsert_customer_array_items(r).await.map(drop),
        Bad::DeleteItems(r) => client.delete_customer_array_items(r).await.map(drop),
        Bad::ListCompanies(r) => client.list_companies(r).await.map(drop),
        Bad::GetCompany(r) => client.get_company(r).await.map(drop),
    };
    result.expect_err("a malformed request is refused")
}

/// An upsert to both destinations of `customers`.
fn upsert(customers: Vec<pb::Customer>) -> Bad {
    Bad::Upsert(pb::UpsertCustomersRequest {
        customers,
        destinations: vec![RETENTLY, RETAINLY],
        options: None,
    })
}

/// A valid customer with `properties`.
fn with_properties(properties: Vec<pb::Property>) -> Bad {
    upsert(vec![pb::Customer {
        properties,
        ..customer("c-1", "a@example.com")
    }])
}

fn records(records: Vec<pb::CustomerArrayItems>) -> Bad {
    Bad::UpsertItems(pb::UpsertCustomerArrayItemsRequest {
        records,
        options: None,
    })
}

fn record(field: &str, items: Vec<pb::ArrayItem>) -> pb::CustomerArrayItems {
    pb::CustomerArrayItems {
        customer_id: "c-1".to_owned(),
        field: field.to_owned(),
        items,
    }
}

fn malformed_requests() -> Vec<(&'static str, Bad)> {
    let valid = || customer("c-1", "a@example.com");
    let long = "x".repeat(1001);
    let text = |s: &str| Kind::StringValue(s.to_owned());
    vec![
        ("customers", upsert(Vec::new())),
        (
            "customers",
            upsert(
                (0..10_001)
                    .map(|i| customer(&format!("c{i}"), &format!("c{i}@example.com")))
                    .collect(),
            ),
        ),
        (
            "destinations",
            Bad::Upsert(pb::UpsertCustomersRequest {
                customers: vec![valid()],
                destinations: Vec::new(),
                options: None,
            }),
        ),
        (
            "destinations[0]",
            Bad::Upsert(pb::UpsertCustomersRequest {
                customers: vec![valid()],
                destinations: vec![0],
                options: None,
            }),
        ),
        (
            "destinations[1]",
            Bad::Upsert(pb::UpsertCustomersRequest {
                customers: vec![valid()],
                destinations: vec![RETENTLY, RETENTLY],
                options: None,
            }),
        ),
        ("customers[0].email", upsert(vec![customer("c-1", "")])),
        (
            "customers[0].email",
            upsert(vec![customer("c-1", "not-an-address")]),
        ),
        (
            "customers[0].customer_id",
            upsert(vec![customer("", "a@example.com")]),
        ),
        (
            "customers[0].customer_id",
            upsert(vec![customer(&"c".repeat(129), "a@example.com")]),
        ),
        (
            "customers[1].email",
            upsert(vec![valid(), customer("c-2", "A@EXAMPLE.com")]),
        ),
        (
            "customers[1].customer_id",
            upsert(vec![valid(), customer("c-1", "b@example.com")]),
        ),
        (
            "customers[0].first_name",
            upsert(vec![pb::Customer {
                first_name: long.clone(),
                ..valid()
            }]),
        ),
        (
            "customers[0].tags",
            upsert(vec![pb::Customer {
                tags: (0..101).map(|i| format!("t{i}")).collect(),
                ..valid()
            }]),
        ),
        (
            "customers[0].tags[1]",
            upsert(vec![pb::Customer {
                tags: strings(&["ok", ""]),
                ..valid()
            }]),
        ),
        (
            "customers[0].properties[0].name",
            with_properties(vec![property("Plan", text("pro"))]),
        ),
        (
            "customers[0].properties[0].name",
            with_properties(vec![property("email", text("x@example.com"))]),
        ),
        (
            "customers[0].properties[1].name",
            with_properties(vec![
                property("plan", text("a")),
                property("plan", text("b")),
            ]),
        ),
        (
            "customers[0].properties[0].value",
            with_properties(vec![pb::Property {
                name: "plan".to_owned(),
                value: None,
                label: String::new(),
            }]),
        ),
        (
            "customers[0].properties[0].value.string_value",
            with_properties(vec![property("plan", text(&long))]),
        ),
        (
            "customers[0].properties[0].value.number_value",
            with_properties(vec![property("ratio", Kind::NumberValue(f64::NAN))]),
        ),
        (
            "customers[0].properties[0].value.integer_value",
            with_properties(vec![property("seats", Kind::IntegerValue(1 << 53))]),
        ),
        (
            "customers[0].properties[0].value.date_value",
            with_properties(vec![property(
                "renewal",
                Kind::DateValue(pb::Date {
                    year: 2025,
                    month: 2,
                    day: 30,
                }),
            )]),
        ),
        (
            "customers[0].properties[0].value.string_list_value.values[0]",
            with_properties(vec![property(
                "regions",
                Kind::StringListValue(pb::StringList {
                    values: strings(&["eu,us"]),
                }),
            )]),
        ),
        (
            "customers[0].properties",
            with_properties(
                (0..15)
                    .map(|i| {
                        property(
                            &format!("list{i}"),
                            Kind::StringListValue(pb::StringList::default()),
                        )
                    })
                    .collect(),
            ),
        ),
        (
            "customers[0].properties",
            with_properties(
                (0..495)
                    .map(|i| property(&format!("p{i}"), Kind::BoolValue(true)))
                    .collect(),
            ),
        ),
        (
            "options.idempotency_key",
            Bad::Upsert(pb::UpsertCustomersRequest {
                customers: vec![valid()],
                destinations: vec![RETENTLY],
                options: options(pb::DeliveryMode::Sync, "has space"),
            }),
        ),
        (
            "options.mode",
            Bad::Upsert(pb::UpsertCustomersRequest {
                customers: vec![valid()],
                destinations: vec![RETENTLY],
                options: Some(pb::WriteOptions {
                    mode: 7,
                    idempotency_key: String::new(),
                }),
            }),
        ),
        ("lookup", Bad::Get(pb::GetCustomerRequest { lookup: None })),
        (
            "email",
            Bad::Get(pb::GetCustomerRequest {
                lookup: Some(pb::get_customer_request::Lookup::Email(
                    "nobody@".to_owned(),
                )),
            }),
        ),
        (
            "retently_id",
            Bad::Get(pb::GetCustomerRequest {
                lookup: Some(pb::get_customer_request::Lookup::RetentlyId(
                    "..".to_owned(),
                )),
            }),
        ),
        (
            "page_size",
            Bad::List(pb::ListCustomersRequest {
                page_size: 1001,
                ..Default::default()
            }),
        ),
        (
            "page_token",
            Bad::List(pb::ListCustomersRequest {
                page_token: "not-a-token".to_owned(),
                ..Default::default()
            }),
        ),
        (
            "end_time",
            Bad::List(pb::ListCustomersRequest {
                start_time: Some(prost_types::Timestamp {
                    seconds: 2_000,
                    nanos: 0,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: 1_000,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        ),
        (
            "order",
            Bad::List(pb::ListCustomersRequest {
                order: 9,
                ..Default::default()
            }),
        ),
        (
            "customers[1].email",
            Bad::Delete(pb::DeleteCustomersRequest {
                customers: vec![
                    pb::CustomerRef {
                        customer_id: String::new(),
                        email: "a@example.com".to_owned(),
                    },
                    pb::CustomerRef {
                        customer_id: String::new(),
                        email: " a@example.com".to_owned(),
                    },
                ],
                destinations: vec![RETENTLY],
                options: None,
            }),
        ),
        (
            "customers[0].customer_id",
            Bad::Delete(pb::DeleteCustomersRequest {
                customers: vec![pb::CustomerRef {
                    customer_id: String::new(),
                    email: "a@example.com".to_owned(),
                }],
                destinations: vec![RETENTLY, RETAINLY],
                options: None,
            }),
        ),
        (
            "emails",
            Bad::Unsubscribe(pb::UnsubscribeCustomersRequest::default()),
        ),
        (
            "message",
            Bad::Unsubscribe(pb::UnsubscribeCustomersRequest {
                emails: strings(&["a@example.com"]),
                message: long.clone(),
                options: None,
            }),
        ),
        (
            "emails[0]",
            Bad::Resubscribe(pb::ResubscribeCustomersRequest {
                emails: strings(&["a@b"]),
                options: None,
            }),
        ),
        (
            "records[0].field",
            records(vec![record("Purchases", vec![item("p1", json!({}))])]),
        ),
        (
            "records[0].items",
            records(vec![record("purchases", Vec::new())]),
        ),
        (
            "records[0].items[0].fields.id",
            records(vec![record("purchases", vec![item("", json!({"id": 1}))])]),
        ),
        (
            "records[0].items[0].fields.address",
            records(vec![record(
                "purchases",
                vec![item("p1", json!({"address": {"city": "Paris"}}))],
            )]),
        ),
        (
            "records[0].items[0].fields.products[0].tags",
            records(vec![record(
                "purchases",
                vec![item("p1", json!({"products": [{"tags": ["too", "deep"]}]}))],
            )]),
        ),
        (
            "records[0].items[0].fields.note",
            records(vec![record(
                "purchases",
                vec![item("p1", json!({"note": long.clone()}))],
            )]),
        ),
        (
            "records[0].items[1].item_id",
            records(vec![record(
                "purchases",
                vec![item("p1", json!({})), item("p1", json!({}))],
            )]),
        ),
        (
            "records[1].field",
            records(vec![
                record("purchases", vec![item("p1", json!({}))]),
                record("purchases", vec![item("p2", json!({}))]),
            ]),
        ),
        (
            "records[0].item_ids",
            Bad::DeleteItems(pb::DeleteCustomerArrayItemsRequest {
                records: vec![pb::CustomerArrayItemIds {
                    customer_id: "c-1".to_owned(),
                    field: "purchases".to_owned(),
                    item_ids: Vec::new(),
                }],
                options: None,
            }),
        ),
        // Addresses that would look like another customer's.
        (
            "customers[0].email",
            upsert(vec![customer("c-1", "änn@example.com")]),
        ),
        (
            "customers[0].email",
            upsert(vec![customer("c-1", "ann\u{200B}@example.com")]),
        ),
        (
            "customers[0].email",
            upsert(vec![customer("c-1", "ann@exa\u{202E}mple.com")]),
        ),
        (
            "emails[1]",
            Bad::Unsubscribe(pb::UnsubscribeCustomersRequest {
                emails: strings(&["a@example.com", "a\u{FEFF}@example.com"]),
                ..Default::default()
            }),
        ),
        // Output-only fields are ignored, but not carried at any length.
        (
            "customers[0].job_title",
            upsert(vec![pb::Customer {
                job_title: long.clone(),
                ..valid()
            }]),
        ),
        (
            "customers[0].properties[0].label",
            with_properties(vec![pb::Property {
                label: long.clone(),
                ..property("plan", text("pro"))
            }]),
        ),
        // Keys of item fields, and of the objects in their lists.
        (
            "records[0].items[0].fields",
            records(vec![record("purchases", vec![item("p1", json!({"": 1}))])]),
        ),
        (
            "records[0].items[0].fields",
            records(vec![record(
                "purchases",
                vec![item("p1", json!({"a\u{0}b": 1}))],
            )]),
        ),
        (
            "records[0].items[0].fields",
            records(vec![record(
                "purchases",
                vec![item(
                    "p1",
                    Value::Object([("k".repeat(1200), json!(1))].into_iter().collect()),
                )],
            )]),
        ),
        (
            "records[0].items[0].fields.products[0]",
            records(vec![record(
                "purchases",
                vec![item("p1", json!({"products": [{"na\u{200B}me": "apple"}]}))],
            )]),
        ),
        // An array field must not take the customer id's name.
        (
            "records[0].field",
            records(vec![record("id", vec![item("p1", json!({"a": 1}))])]),
        ),
        // Ids that cannot be Retently ids: no upstream call is spent on them.
        (
            "retently_id",
            Bad::Get(pb::GetCustomerRequest {
                lookup: Some(pb::get_customer_request::Lookup::RetentlyId(
                    "../customers".to_owned(),
                )),
            }),
        ),
        (
            "company_id",
            Bad::GetCompany(pb::GetCompanyRequest {
                lookup: Some(pb::get_company_request::Lookup::CompanyId(
                    "5a9d%2f01".to_owned(),
                )),
            }),
        ),
        (
            "records[0].item_ids[1]",
            Bad::DeleteItems(pb::DeleteCustomerArrayItemsRequest {
                records: vec![pb::CustomerArrayItemIds {
                    customer_id: "c-1".to_owned(),
                    field: "purchases".to_owned(),
                    item_ids: strings(&["p1", ""]),
                }],
                options: None,
            }),
        ),
        (
            "page_size",
            Bad::ListCompanies(pb::ListCompaniesRequest {
                page_size: -1,
                ..Default::default()
            }),
        ),
        (
            "lookup",
            Bad::GetCompany(pb::GetCompanyRequest { lookup: None }),
        ),
        (
            "domain",
            Bad::GetCompany(pb::GetCompanyRequest {
                lookup: Some(pb::get_company_request::Lookup::Domain(
                    "acme..com".to_owned(),
                )),
            }),
        ),
    ]
}

/// Routes CustomerService may call; other parts of the gateway (a feedback poller) may use
/// others in the background, which says nothing about these requests.
const CUSTOMER_ROUTES: [&str; 8] = [
    "/api/v2/customers",
    "/api/v2/customers/{id}",
    "/api/v2/customers/unsubscribe",
    "/api/v2/customers/resubscribe",
    "/api/v2/companies",
    "/api/v2/companies/{key}",
    "/customers",
    "/arrays",
];

#[tokio::test]
async fn malformed_requests_name_the_field_and_reach_no_upstream() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    let cases = malformed_requests();
    assert!(cases.len() >= 20);
    for (expected, call) in cases {
        let status = send(&mut client, call).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{expected}");
        assert_eq!(error_reason(&status), "INVALID_FIELDS", "{expected}");
        let fields: Vec<String> = status
            .get_error_details()
            .bad_request()
            .unwrap_or_else(|| panic!("{expected}: no BadRequest"))
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect();
        assert_eq!(fields, [expected], "{}", status.message());
    }
    let touched: Vec<_> = sandbox
        .request_counts()
        .into_iter()
        .filter(|c| CUSTOMER_ROUTES.contains(&c.route.as_str()))
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
    gateway.stop().await.unwrap();
}

/// Retently as its docs say it may behave: an unsubscribe or resubscribe batch with an address
/// that was never a customer fails as a whole. Each address still gets its own result, the known
/// ones are applied, and the search for the unknown ones stays within a few calls.
#[tokio::test]
async fn unknown_emails_fail_alone_when_retently_refuses_the_whole_batch() {
    let gateway = TestGateway::start_with(
        cx_sandbox::SandboxConfig {
            unknown_subscription_emails: cx_sandbox::UnknownEmails::FailBatch,
            ..Default::default()
        },
        Vec::new(),
    )
    .await;
    let mut client = client(&gateway);
    let sandbox = sandbox(&gateway);
    let known: Vec<String> = (0..6).map(|i| format!("known{i}@example.com")).collect();
    client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers: known.iter().map(|email| customer("", email)).collect(),
            destinations: vec![RETENTLY],
            options: None,
        })
        .await
        .unwrap();
    let mut emails = known.clone();
    emails.insert(1, "ghost1@example.com".to_owned());
    emails.insert(5, "ghost2@example.com".to_owned());
    let expected: Vec<i32> = emails
        .iter()
        .map(|email| {
            if email.starts_with("ghost") {
                FAILED
            } else {
                APPLIED
            }
        })
        .collect();
    let outcomes = |results: &[pb::CustomerWriteResult]| -> Vec<i32> {
        results.iter().map(|r| r.outcomes[0].outcome).collect()
    };

    let unsubscribed = client
        .unsubscribe_customers(pb::UnsubscribeCustomersRequest {
            emails: emails.clone(),
            message: "asked by mail".to_owned(),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcomes(&unsubscribed.results), expected);
    for (result, email) in unsubscribed.results.iter().zip(&emails) {
        assert_eq!(&result.email, email);
        if email.starts_with("ghost") {
            let error = result.outcomes[0].error.as_ref().unwrap();
            assert_eq!(error.code, tonic::Code::NotFound as i32, "{email}");
        }
    }
    for email in &known {
        assert_eq!(
            sandbox.retently_customer(email).unwrap()["unsubscribed"],
            true,
            "{email}"
        );
    }
    let refused = count(
        &sandbox,
        Api::Retently,
        "/api/v2/customers/unsubscribe",
        404,
    );
    let applied = count(
        &sandbox,
        Api::Retently,
        "/api/v2/customers/unsubscribe",
        200,
    );
    assert!(
        refused >= 3 && refused + applied <= 12,
        "{refused} + {applied}"
    );

    let resubscribed = client
        .resubscribe_customers(pb::ResubscribeCustomersRequest {
            emails: emails.clone(),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcomes(&resubscribed.results), expected);
    for email in &known {
        assert_eq!(
            sandbox.retently_customer(email).unwrap()["unsubscribed"],
            false,
            "{email}"
        );
    }

    // A batch of nothing but unknown addresses: each fails, and the search stops after its
    // bounded number of calls instead of trying every address alone.
    let before = count(
        &sandbox,
        Api::Retently,
        "/api/v2/customers/unsubscribe",
        404,
    );
    let ghosts: Vec<String> = (0..64).map(|i| format!("ghost{i}@example.com")).collect();
    let refused = client
        .unsubscribe_customers(pb::UnsubscribeCustomersRequest {
            emails: ghosts,
            message: String::new(),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(outcomes(&refused.results).iter().all(|&o| o == FAILED));
    let calls = count(
        &sandbox,
        Api::Retently,
        "/api/v2/customers/unsubscribe",
        404,
    ) - before;
    assert_eq!(calls, 1 + 32);
    gateway.stop().await.unwrap();
}

/// 1,000 bad items: the status keeps to a trailer that every gRPC client accepts (C-core ones
/// refuse more than 16 KiB of metadata), lists the first violations and counts the rest.
#[tokio::test]
async fn a_thousand_bad_items_give_a_small_trailer_that_decodes() {
    let gateway = TestGateway::start().await;
    let mut client = client(&gateway);
    let customers: Vec<pb::Customer> = (0..1000)
        .map(|i| customer(&format!("c{i}"), &format!("not-an-address-{i}")))
        .collect();
    let status = client
        .upsert_customers(pb::UpsertCustomersRequest {
            customers,
            destinations: vec![RETENTLY, RETAINLY],
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // The trailer as it was on the wire: status, percent-encoded message and base64 details,
    // counted as HPACK counts a header (name, value and 32 bytes).
    let received = tonic::Status::with_details(
        status.code(),
        status.message().to_owned(),
        status.details().to_vec().into(),
    );
    let mut trailer = tonic::codegen::http::HeaderMap::new();
    received.add_header(&mut trailer).unwrap();
    let size: usize = trailer
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    assert!(size < 8 * 1024, "{size} bytes");
    let details = status.get_error_details();
    let violations = &details.bad_request().unwrap().field_violations;
    assert_eq!(violations.len(), 50);
    assert_eq!(violations[0].field, "customers[0].email");
    let info = details.error_info().unwrap();
    assert_eq!(info.reason, "INVALID_FIELDS");
    assert_eq!(info.metadata["violations"], "1000");
    assert_eq!(info.metadata["violations_omitted"], "950");
    assert!(status.message().starts_with("1000 invalid fields"));
    gateway.stop().await.unwrap();
}
