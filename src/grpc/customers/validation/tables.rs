//! Each customer write's validator, as tables: a request, and the fields its violations name
//! (none for a valid request). The end-to-end tables in `tests/it` check the same rules through
//! the server; these name each rule beside the code that keeps it.

use super::*;

use crate::grpc::validate::violated_fields as fields;

fn customer(id: &str, email: &str) -> pb::Customer {
    pb::Customer {
        customer_id: id.to_owned(),
        email: email.to_owned(),
        ..Default::default()
    }
}

const BOTH: [pb::Destination; 2] = [pb::Destination::Retently, pb::Destination::Retainly];

fn options(mode: i32, key: &str) -> Option<pb::WriteOptions> {
    Some(pb::WriteOptions {
        mode,
        idempotency_key: key.to_owned(),
    })
}

#[test]
fn upsert_customers_table() {
    let upsert = |customers: Vec<pb::Customer>, destinations: &[pb::Destination]| {
        pb::UpsertCustomersRequest {
            customers,
            destinations: destinations.iter().map(|d| *d as i32).collect(),
            options: None,
        }
    };
    let long = "x".repeat(validate::MAX_STRING_CHARS + 1);
    let cases: Vec<(&str, pb::UpsertCustomersRequest, Vec<&str>)> = vec![
        (
            "valid",
            upsert(vec![customer("1", "a@example.com")], &BOTH),
            vec![],
        ),
        ("no customers", upsert(vec![], &BOTH), vec!["customers"]),
        (
            "no destinations",
            upsert(vec![customer("1", "a@example.com")], &[]),
            vec!["destinations"],
        ),
        (
            "unspecified destination",
            upsert(
                vec![customer("1", "a@example.com")],
                &[pb::Destination::Unspecified],
            ),
            vec!["destinations[0]"],
        ),
        (
            "repeated destination",
            upsert(
                vec![customer("1", "a@example.com")],
                &[pb::Destination::Retently, pb::Destination::Retently],
            ),
            vec!["destinations[1]"],
        ),
        (
            "Retently needs an email",
            upsert(vec![customer("1", "")], &[pb::Destination::Retently]),
            vec!["customers[0].email"],
        ),
        (
            "Retainly needs a customer id",
            upsert(
                vec![customer("", "a@example.com")],
                &[pb::Destination::Retainly],
            ),
            vec!["customers[0].customer_id"],
        ),
        (
            "a key for another destination is still checked",
            upsert(
                vec![customer("1", "not an email")],
                &[pb::Destination::Retainly],
            ),
            vec!["customers[0].email"],
        ),
        (
            "a repeated email, compared normalised",
            upsert(
                vec![
                    customer("1", "a@example.com"),
                    customer("2", " A@Example.com"),
                ],
                &[pb::Destination::Retently],
            ),
            vec!["customers[1].email"],
        ),
        (
            "a repeated customer id",
            upsert(
                vec![
                    customer("1", "a@example.com"),
                    customer("1", "b@example.com"),
                ],
                &[pb::Destination::Retainly],
            ),
            vec!["customers[1].customer_id"],
        ),
        (
            "names are bounded",
            upsert(
                vec![pb::Customer {
                    first_name: long.clone(),
                    company: long.clone(),
                    ..customer("1", "a@example.com")
                }],
                &BOTH,
            ),
            vec!["customers[0].first_name", "customers[0].company"],
        ),
        (
            "an unknown delivery mode",
            pb::UpsertCustomersRequest {
                options: options(99, ""),
                ..upsert(vec![customer("1", "a@example.com")], &BOTH)
            },
            vec!["options.mode"],
        ),
        (
            "an idempotency key with a space",
            pb::UpsertCustomersRequest {
                options: options(pb::DeliveryMode::Async as i32, "a key"),
                ..upsert(vec![customer("1", "a@example.com")], &BOTH)
            },
            vec!["options.idempotency_key"],
        ),
    ];
    for (case, request, expected) in cases {
        assert_eq!(fields(upsert_customers(&request)), expected, "{case}");
    }
}

#[test]
fn delete_customers_table() {
    let delete = |customers: Vec<pb::Customer>, destinations: &[pb::Destination]| {
        pb::DeleteCustomersRequest {
            customers: customers
                .into_iter()
                .map(|c| pb::CustomerRef {
                    email: c.email,
                    customer_id: c.customer_id,
                })
                .collect(),
            destinations: destinations.iter().map(|d| *d as i32).collect(),
            options: None,
        }
    };
    let cases: Vec<(&str, pb::DeleteCustomersRequest, Vec<&str>)> = vec![
        (
            "valid",
            delete(vec![customer("1", "a@example.com")], &BOTH),
            vec![],
        ),
        ("no customers", delete(vec![], &BOTH), vec!["customers"]),
        (
            "no destinations",
            delete(vec![customer("1", "a@example.com")], &[]),
            vec!["destinations"],
        ),
        (
            "each destination's key is required",
            delete(vec![customer("", "")], &BOTH),
            vec!["customers[0].email", "customers[0].customer_id"],
        ),
        (
            "a repeated key",
            delete(
                vec![
                    customer("1", "a@example.com"),
                    customer("1", "b@example.com"),
                ],
                &BOTH,
            ),
            vec!["customers[1].customer_id"],
        ),
    ];
    for (case, request, expected) in cases {
        assert_eq!(fields(delete_customers(&request)), expected, "{case}");
    }
}

#[test]
fn subscription_change_table() {
    let emails = |list: &[&str]| list.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>();
    let long = "x".repeat(validate::MAX_STRING_CHARS + 1);
    let cases: Vec<(&str, Vec<String>, &str, Vec<&str>)> = vec![
        ("valid", emails(&["a@example.com"]), "", vec![]),
        ("no addresses", emails(&[]), "", vec!["emails"]),
        ("not an address", emails(&["nope"]), "", vec!["emails[0]"]),
        (
            "a repeated address, compared normalised",
            emails(&["a@example.com", "A@EXAMPLE.COM"]),
            "",
            vec!["emails[1]"],
        ),
        (
            "the note is bounded",
            emails(&["a@example.com"]),
            &long,
            vec!["message"],
        ),
    ];
    for (case, emails, message, expected) in cases {
        assert_eq!(
            fields(subscription_change(&emails, message, None)),
            expected,
            "{case}"
        );
    }
}

#[test]
fn array_item_tables() {
    let upsert = |customer_id: &str, field: &str, items: Vec<pb::ArrayItem>| {
        pb::UpsertCustomerArrayItemsRequest {
            records: vec![pb::CustomerArrayItems {
                customer_id: customer_id.to_owned(),
                field: field.to_owned(),
                items,
            }],
            options: None,
        }
    };
    let item = |id: &str| pb::ArrayItem {
        item_id: id.to_owned(),
        fields: None,
    };
    let cases: Vec<(&str, pb::UpsertCustomerArrayItemsRequest, Vec<&str>)> = vec![
        ("valid", upsert("c-1", "orders", vec![item("o-1")]), vec![]),
        (
            "no records",
            pb::UpsertCustomerArrayItemsRequest::default(),
            vec!["records"],
        ),
        (
            "a customer id is required",
            upsert("", "orders", vec![item("o-1")]),
            vec!["records[0].customer_id"],
        ),
        (
            "a standard field is not an array",
            upsert("c-1", "email", vec![item("o-1")]),
            vec!["records[0].field"],
        ),
        (
            "fields are snake_case names",
            upsert("c-1", "Orders", vec![item("o-1")]),
            vec!["records[0].field"],
        ),
        (
            "no items",
            upsert("c-1", "orders", vec![]),
            vec!["records[0].items"],
        ),
        (
            "a repeated item id",
            upsert("c-1", "orders", vec![item("o-1"), item("o-1")]),
            vec!["records[0].items[1].item_id"],
        ),
    ];
    for (case, request, expected) in cases {
        assert_eq!(fields(upsert_array_items(&request)), expected, "{case}");
    }

    let delete =
        |customer_id: &str, field: &str, ids: &[&str]| pb::DeleteCustomerArrayItemsRequest {
            records: vec![pb::CustomerArrayItemIds {
                customer_id: customer_id.to_owned(),
                field: field.to_owned(),
                item_ids: ids.iter().map(|id| (*id).to_owned()).collect(),
            }],
            options: None,
        };
    let cases: Vec<(&str, pb::DeleteCustomerArrayItemsRequest, Vec<&str>)> = vec![
        ("valid", delete("c-1", "orders", &["o-1"]), vec![]),
        (
            "no item ids",
            delete("c-1", "orders", &[]),
            vec!["records[0].item_ids"],
        ),
        (
            "an empty item id",
            delete("c-1", "orders", &["o-1", ""]),
            vec!["records[0].item_ids[1]"],
        ),
        (
            "the customer and the field are checked together",
            delete("", "id", &["o-1"]),
            vec!["records[0].customer_id", "records[0].field"],
        ),
    ];
    for (case, request, expected) in cases {
        assert_eq!(fields(delete_array_items(&request)), expected, "{case}");
    }
}
