//! Retainly: auth per endpoint family, every documented limit with its error shape, and state.

use cx_sandbox::{Api, DEFAULT_RETAINLY_KEY, DEFAULT_RETAINLY_SECRET};
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::support::TestSandbox;

/// Expected `detail` entries: `(loc, type)`.
type Expected = Vec<(Value, &'static str)>;

/// The `detail` entries of a 422, as `(loc, type)` pairs.
fn details(body: &Value) -> Vec<(Value, String)> {
    body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("no detail in {body}"))
        .iter()
        .map(|entry| {
            assert!(entry["msg"].as_str().is_some_and(|msg| !msg.is_empty()));
            (
                entry["loc"].clone(),
                entry["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn both_header_pairs_authenticate() {
    let sandbox = TestSandbox::start().await;
    let body = json!({"customers": [{"id": 1, "name": "a"}]});
    for (key_header, secret_header) in [("key", "secret"), ("api-key", "api-secret")] {
        let response = sandbox
            .request(Method::POST, "/customers")
            .header(key_header, DEFAULT_RETAINLY_KEY)
            .header(secret_header, DEFAULT_RETAINLY_SECRET)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.json::<Value>().await.unwrap(), json!("ok"));
    }
    let event = sandbox
        .request(Method::POST, "/events")
        .header("api-key", DEFAULT_RETAINLY_KEY)
        .header("api-secret", DEFAULT_RETAINLY_SECRET)
        .json(&json!({"customer_id": 1, "event": "signed_up"}))
        .send()
        .await
        .unwrap();
    assert_eq!(event.status(), 200);
    assert!(event.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn auth_failures_differ_by_endpoint_family() {
    let sandbox = TestSandbox::start().await;
    for (method, path, body) in [
        (
            Method::POST,
            "/customers",
            json!({"customers": [{"id": 1}]}),
        ),
        (Method::DELETE, "/customers", json!({"customers_ids": [1]})),
        (Method::POST, "/arrays", json!({"records": []})),
        (Method::DELETE, "/arrays", json!({"records": []})),
    ] {
        for attempt in [
            sandbox.request(method.clone(), path),
            sandbox
                .request(method.clone(), path)
                .header("key", DEFAULT_RETAINLY_KEY)
                .header("secret", "wrong"),
            sandbox
                .request(method.clone(), path)
                .header("key", DEFAULT_RETAINLY_KEY),
        ] {
            let response = attempt.json(&body).send().await.unwrap();
            assert_eq!(response.status(), 403, "{method} {path}");
            assert_eq!(
                response.json::<Value>().await.unwrap(),
                json!({"message": "forbidden"})
            );
        }
    }
    let event = json!({"customer_id": 1, "event": "x"});
    let missing = sandbox
        .request(Method::POST, "/events")
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 422);
    let body: Value = missing.json().await.unwrap();
    assert!(
        body["errors"]["key"]
            .as_array()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(
        body["errors"]["secret"]
            .as_array()
            .is_some_and(|m| !m.is_empty())
    );
    let wrong = sandbox
        .request(Method::POST, "/events")
        .header("key", "nope")
        .header("secret", "nope")
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 422);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(
        body,
        json!({"errors": {"key": ["The key or secret is invalid."]}})
    );
    assert!(sandbox.handle.retainly_customers().is_empty());
    assert!(sandbox.handle.retainly_events().is_empty());
    assert_eq!(sandbox.handle.status_count(Api::Retainly, 403), 12);
}

#[tokio::test]
async fn customers_merge_fields_and_1_is_the_same_as_one_string() {
    let sandbox = TestSandbox::start().await;
    let (status, _) = sandbox
        .retainly_send(
            Method::POST,
            "/customers",
            &json!({"customers": [
                {"id": 1, "customer_field_string": "value", "customer_field_boolean": true,
                 "customer_field_number": 1, "customer_field_date_time": "2022-02-25T21:00:00.000Z",
                 "customer_field_date": "2022-02-25",
                 "customer_field_array_with_linears": ["one", "two", "three"]},
                {"id": 2, "customer_field_array_with_objects": [
                    {"object_field_string": "value",
                     "object_field_array_with_nested_array": [{"nested_array_object_field_boolean": true}]}
                ]}
            ]}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = sandbox
        .retainly_send(
            Method::POST,
            "/customers",
            &json!({"customers": [{"id": "1", "customer_field_string": "changed", "plan": "pro"}]}),
        )
        .await;
    assert_eq!(status, 200);
    let one = sandbox.handle.retainly_customer(&json!(1)).unwrap();
    assert_eq!(one.id, json!(1));
    assert_eq!(one.fields["customer_field_string"], "changed");
    assert_eq!(one.fields["customer_field_boolean"], true);
    assert_eq!(one.fields["plan"], "pro");
    assert_eq!(
        one.fields["customer_field_array_with_linears"],
        json!(["one", "two", "three"])
    );
    assert_eq!(sandbox.handle.retainly_customers().len(), 2);

    let (status, body) = sandbox
        .retainly_send(
            Method::DELETE,
            "/customers",
            &json!({"customers_ids": ["2", 404, "never"]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!("ok"));
    assert!(sandbox.handle.retainly_customer(&json!(2)).is_none());
    assert_eq!(sandbox.handle.retainly_customers().len(), 1);
}

#[tokio::test]
async fn customer_limits_answer_422_detail_with_precise_loc() {
    let sandbox = TestSandbox::start().await;
    let too_many: Vec<Value> = (0..10_001).map(|id| json!({"id": id})).collect();
    let wide: Map<String, Value> = (0..501).map(|n| (format!("f{n}"), json!(n))).collect();
    let mut wide_customer = wide.clone();
    wide_customer.insert("id".to_owned(), json!(7));
    let arrays: Map<String, Value> = (0..16).map(|n| (format!("a{n}"), json!([n]))).collect();
    let mut array_customer = arrays.clone();
    array_customer.insert("id".to_owned(), json!(8));
    let cases: Vec<(Value, Vec<(Value, &str)>)> = vec![
        (
            json!({}),
            vec![(json!(["body", "customers"]), "value_error.missing")],
        ),
        (json!([]), vec![(json!(["body"]), "type_error.dict")]),
        (
            json!({"customers": {}}),
            vec![(json!(["body", "customers"]), "type_error.list")],
        ),
        (
            json!({"customers": []}),
            vec![(json!(["body", "customers"]), "value_error.list.min_items")],
        ),
        (
            json!({"customers": too_many}),
            vec![(json!(["body", "customers"]), "value_error.list.max_items")],
        ),
        (
            json!({"customers": [{"id": 1}, 5]}),
            vec![(json!(["body", "customers", 1]), "type_error.dict")],
        ),
        (
            json!({"customers": [{"id": 1}, {"name": "no id"}]}),
            vec![(json!(["body", "customers", 1, "id"]), "value_error.missing")],
        ),
        (
            json!({"customers": [{"id": 1.5}, {"id": ""}, {"id": true}]}),
            vec![
                (json!(["body", "customers", 0, "id"]), "type_error.id"),
                (json!(["body", "customers", 1, "id"]), "type_error.id"),
                (json!(["body", "customers", 2, "id"]), "type_error.id"),
            ],
        ),
        (
            json!({"customers": [wide_customer]}),
            vec![(
                json!(["body", "customers", 0]),
                "value_error.customer.max_fields",
            )],
        ),
        (
            json!({"customers": [array_customer]}),
            vec![(
                json!(["body", "customers", 0]),
                "value_error.customer.max_array_fields",
            )],
        ),
        (
            json!({"customers": [{"id": 1, "address": {"city": "Paris"}}]}),
            vec![(
                json!(["body", "customers", 0, "address"]),
                "type_error.associative_array",
            )],
        ),
        (
            json!({"customers": [{"id": 1, "orders": [{"lines": [{"tags": ["deep"]}]}]}]}),
            vec![(
                json!(["body", "customers", 0, "orders", 0, "lines", 0, "tags"]),
                "value_error.array.nesting",
            )],
        ),
        (
            json!({"customers": [{"id": 1, "orders": [{"meta": {"a": 1}}]}]}),
            vec![(
                json!(["body", "customers", 0, "orders", 0, "meta"]),
                "type_error.associative_array",
            )],
        ),
        (
            json!({"customers": [{"id": 1, "bio": "x".repeat(1001)}]}),
            vec![(
                json!(["body", "customers", 0, "bio"]),
                "value_error.any_str.max_length",
            )],
        ),
        (
            json!({"customers": [{"id": 1, "tags": ["ok", "y".repeat(1001)]}]}),
            vec![(
                json!(["body", "customers", 0, "tags", 1]),
                "value_error.any_str.max_length",
            )],
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = sandbox
            .retainly_send(Method::POST, "/customers", &body)
            .await;
        assert_eq!(status, 422, "{expected:?}");
        let got = details(&answer);
        let expected: Vec<(Value, String)> = expected
            .into_iter()
            .map(|(loc, kind)| (loc, kind.to_owned()))
            .collect();
        assert_eq!(got, expected);
    }
    // Exactly at the limits is fine.
    let mut at_limit: Map<String, Value> = (0..500)
        .map(|n| (format!("f{n}"), json!("é".repeat(1000))))
        .collect();
    at_limit.insert("id".to_owned(), json!("edge"));
    for n in 0..15 {
        at_limit.insert(format!("f{n}"), json!([{"nested": [1, 2]}]));
    }
    let ten_thousand: Vec<Value> = (0..10_000).map(|id| json!({"id": id})).collect();
    for body in [
        json!({"customers": [at_limit]}),
        json!({"customers": ten_thousand}),
    ] {
        let (status, _) = sandbox
            .retainly_send(Method::POST, "/customers", &body)
            .await;
        assert_eq!(status, 200);
    }
    // Nothing of a refused request was stored: only the accepted ones.
    assert_eq!(sandbox.handle.retainly_customers().len(), 10_001);

    // The limit counts the customer after the merge.
    let more_arrays: Map<String, Value> = (15..17).map(|n| (format!("f{n}"), json!([n]))).collect();
    let mut update = more_arrays;
    update.insert("id".to_owned(), json!("edge"));
    let (status, answer) = sandbox
        .retainly_send(Method::POST, "/customers", &json!({"customers": [update]}))
        .await;
    assert_eq!(status, 422);
    assert_eq!(
        details(&answer)[0].1,
        "value_error.customer.max_array_fields"
    );

    let malformed = sandbox
        .retainly(Method::POST, "/customers")
        .header("content-type", "application/json")
        .body("{\"customers\": [}")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 422);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["detail"][0]["type"], "value_error.jsondecode");
    assert_eq!(body["detail"][0]["loc"], json!(["body", 15]));
}

#[tokio::test]
async fn arrays_upsert_append_create_and_delete() {
    let sandbox = TestSandbox::start().await;
    let (status, body) = sandbox
        .retainly_send(
            Method::POST,
            "/arrays",
            &json!({"records": [
                {"customer_id": 1, "field": "purchases", "data": [
                    {"id": 1, "amount": 123, "products": [{"name": "apple"}, {"name": "banana"}]},
                    {"id": 2, "amount": 111, "products": [{"name": "apple"}]}
                ]},
                {"customer_id": 2, "field": "booking", "data": [{"booking_number": 123}, {"id": 2, "booking_number": 123}]}
            ]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!("ok"));
    // Both customers were created by the array call.
    assert!(sandbox.handle.retainly_customer(&json!("2")).is_some());
    let (status, _) = sandbox
        .retainly_send(
            Method::POST,
            "/arrays",
            &json!({"records": [{"customer_id": "1", "field": "purchases", "data": [
                {"id": "2", "amount": 999},
                {"amount": 5}
            ]}]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        sandbox
            .handle
            .retainly_array(&json!(1), "purchases")
            .unwrap(),
        vec![
            json!({"id": 1, "amount": 123, "products": [{"name": "apple"}, {"name": "banana"}]}),
            json!({"id": "2", "amount": 999}),
            json!({"amount": 5}),
        ]
    );

    let (status, _) = sandbox
        .retainly_send(
            Method::DELETE,
            "/arrays",
            &json!({"records": [
                {"customer_id": 1, "field": "purchases", "ids": [1, 2]},
                {"customer_id": 1, "field": "purchases", "ids": [2]},
                {"customer_id": 1, "field": "no_such_field", "ids": [1]},
                {"customer_id": 999, "field": "purchases", "ids": [1]}
            ]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        sandbox
            .handle
            .retainly_array(&json!(1), "purchases")
            .unwrap(),
        vec![json!({"amount": 5})]
    );
    assert_eq!(
        sandbox
            .handle
            .retainly_array(&json!(2), "booking")
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn array_validation_answers_422_detail() {
    let sandbox = TestSandbox::start().await;
    sandbox
        .retainly_send(
            Method::POST,
            "/customers",
            &json!({"customers": [{"id": 5, "plan": "pro"}]}),
        )
        .await;
    let cases: Vec<(Method, Value, Expected)> = vec![
        (
            Method::POST,
            json!({"records": []}),
            vec![(json!(["body", "records"]), "value_error.list.min_items")],
        ),
        (
            Method::POST,
            json!({"records": [{"field": "p", "data": []}]}),
            vec![(
                json!(["body", "records", 0, "customer_id"]),
                "value_error.missing",
            )],
        ),
        (
            Method::POST,
            json!({"records": [{"customer_id": 1, "data": []}]}),
            vec![(
                json!(["body", "records", 0, "field"]),
                "value_error.missing",
            )],
        ),
        (
            Method::POST,
            json!({"records": [{"customer_id": 1, "field": "p"}]}),
            vec![(json!(["body", "records", 0, "data"]), "value_error.missing")],
        ),
        (
            Method::POST,
            json!({"records": [{"customer_id": 1, "field": "p", "data": [{"ok": 1}, "scalar"]}]}),
            vec![(json!(["body", "records", 0, "data", 1]), "type_error.dict")],
        ),
        (
            Method::POST,
            json!({"records": [{"customer_id": 1, "field": "p", "data": [{"items": [{"deep": [1]}]}]}]}),
            vec![(
                json!(["body", "records", 0, "data", 0, "items", 0, "deep"]),
                "value_error.array.nesting",
            )],
        ),
        (
            Method::POST,
            json!({"records": [{"customer_id": 1, "field": "p", "data": [{"note": "z".repeat(1001)}]}]}),
            vec![(
                json!(["body", "records", 0, "data", 0, "note"]),
                "value_error.any_str.max_length",
            )],
        ),
        (
            Method::POST,
            json!({"records": [{"customer_id": 5, "field": "plan", "data": [{"a": 1}]}]}),
            vec![(
                json!(["body", "records", 0, "field"]),
                "type_error.array_field",
            )],
        ),
        (
            Method::DELETE,
            json!({"records": [{"customer_id": 1, "field": "p"}]}),
            vec![(json!(["body", "records", 0, "ids"]), "value_error.missing")],
        ),
        (
            Method::DELETE,
            json!({"records": [{"customer_id": 1, "field": "p", "ids": [1, {"x": 1}]}]}),
            vec![(json!(["body", "records", 0, "ids", 1]), "type_error.id")],
        ),
        (
            Method::DELETE,
            json!({"customers_ids": []}),
            vec![(json!(["body", "records"]), "value_error.missing")],
        ),
    ];
    for (method, body, expected) in cases {
        let (status, answer) = sandbox
            .retainly_send(method.clone(), "/arrays", &body)
            .await;
        assert_eq!(status, 422, "{method} {body}");
        let expected: Vec<(Value, String)> = expected
            .into_iter()
            .map(|(loc, kind)| (loc, kind.to_owned()))
            .collect();
        assert_eq!(details(&answer), expected);
    }
    for (body, loc, kind) in [
        (
            json!({"customers_ids": []}),
            json!(["body", "customers_ids"]),
            "value_error.list.min_items",
        ),
        (
            json!({"customers_ids": [1, null]}),
            json!(["body", "customers_ids", 1]),
            "type_error.id",
        ),
        (
            json!({"ids": [1]}),
            json!(["body", "customers_ids"]),
            "value_error.missing",
        ),
    ] {
        let (status, answer) = sandbox
            .retainly_send(Method::DELETE, "/customers", &body)
            .await;
        assert_eq!(status, 422);
        assert_eq!(details(&answer), vec![(loc, kind.to_owned())]);
    }
    // 16th array field through /arrays.
    let arrays: Map<String, Value> = (0..15).map(|n| (format!("a{n}"), json!([]))).collect();
    let mut customer = arrays;
    customer.insert("id".to_owned(), json!(77));
    sandbox
        .retainly_send(
            Method::POST,
            "/customers",
            &json!({"customers": [customer]}),
        )
        .await;
    let (status, answer) = sandbox
        .retainly_send(
            Method::POST,
            "/arrays",
            &json!({"records": [{"customer_id": 77, "field": "one_more", "data": [{"a": 1}]}]}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(
        details(&answer),
        vec![(
            json!(["body", "records", 0]),
            "value_error.customer.max_array_fields".to_owned()
        )]
    );
    assert!(sandbox.handle.retainly_customer(&json!(1)).is_none());
}

#[tokio::test]
async fn events_are_recorded_in_order() {
    let sandbox = TestSandbox::start().await;
    for (n, event) in ["signed_up", "purchased", "churned"].iter().enumerate() {
        let (status, body) = sandbox
            .retainly_send(
                Method::POST,
                "/events",
                &json!({"customer_id": n, "event": event, "data": {
                    "param1": "value1",
                    "nested_event_array_param": [{"nested_array_param1": "value1"}, {"nested_array_param1": "value2"}]
                }}),
            )
            .await;
        assert_eq!(status, 200);
        assert!(body.is_null(), "no body expected, got {body}");
    }
    let events = sandbox.handle.retainly_events();
    let names: Vec<&str> = events.iter().map(|event| event.event.as_str()).collect();
    assert_eq!(names, ["signed_up", "purchased", "churned"]);
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(
        events
            .windows(2)
            .all(|pair| pair[0].received_at <= pair[1].received_at)
    );
    assert_eq!(events[1].customer_id, json!(1));
    assert_eq!(events[0].data.as_ref().unwrap()["param1"], "value1");
    // Events do not create customers.
    assert!(sandbox.handle.retainly_customers().is_empty());
}

#[tokio::test]
async fn event_validation_uses_the_laravel_shape() {
    let sandbox = TestSandbox::start().await;
    let malformed = sandbox
        .retainly(Method::POST, "/events")
        .header("content-type", "application/json")
        .body("{\"event\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(
        malformed.json::<Value>().await.unwrap(),
        json!("Invalid JSON data in request body: Syntax error")
    );

    let wide: Map<String, Value> = (0..51).map(|n| (format!("p{n}"), json!(n))).collect();
    let fifty: Map<String, Value> = (0..50).map(|n| (format!("p{n}"), json!(n))).collect();
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({}), vec!["customer_id", "event"]),
        (
            json!({"customer_id": {"a": 1}, "event": "x"}),
            vec!["customer_id"],
        ),
        (json!({"customer_id": 1, "event": 5}), vec!["event"]),
        (
            json!({"customer_id": 1, "event": "e".repeat(51)}),
            vec!["event"],
        ),
        (
            json!({"customer_id": 1, "event": "x", "data": [1]}),
            vec!["data"],
        ),
        (
            json!({"customer_id": 1, "event": "x", "data": wide}),
            vec!["data"],
        ),
        (
            json!({"customer_id": 1, "event": "x", "data": {"nested": {"a": 1}}}),
            vec!["data.nested"],
        ),
        (
            json!({"customer_id": 1, "event": "x", "data": {"long": "l".repeat(1001)}}),
            vec!["data.long"],
        ),
        (
            json!({"customer_id": 1, "event": "x", "data": {"list": [{"deep": [{"deeper": [1]}]}]}}),
            vec!["data.list.0.deep.0.deeper"],
        ),
    ];
    for (body, fields) in cases {
        let (status, answer) = sandbox.retainly_send(Method::POST, "/events", &body).await;
        assert_eq!(status, 422, "{body}");
        let errors = answer["errors"].as_object().unwrap();
        let mut got: Vec<&str> = errors.keys().map(String::as_str).collect();
        got.sort();
        assert_eq!(got, fields, "{body}");
        for messages in errors.values() {
            assert!(
                messages
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|m| m.as_str().is_some_and(|m| m.starts_with("The ")))
            );
        }
    }
    assert!(sandbox.handle.retainly_events().is_empty());
    for body in [
        json!({"customer_id": "c-1", "event": "e".repeat(50), "data": fifty}),
        json!({"customer_id": 1, "event": "x"}),
    ] {
        let (status, _) = sandbox.retainly_send(Method::POST, "/events", &body).await;
        assert_eq!(status, 200);
    }
    assert_eq!(sandbox.handle.retainly_events().len(), 2);
}
