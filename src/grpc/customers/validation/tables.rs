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

/// A valid address, and the one customer of many cases.
const ANN: &str = "a@example.com";

fn one(id: &str, email: &str) -> Vec<pb::Customer> {
    vec![customer(id, email)]
}

/// A table's case: its name, the request, and the fields its violations name.
type Case<R> = (&'static str, R, Vec<&'static str>);

/// The rules every customer batch shares, as cases of a table whose requests `request` builds
/// from customers and destinations.
fn batch_cases<R>(request: impl Fn(Vec<pb::Customer>, &[pb::Destination]) -> R) -> Vec<Case<R>> {
    vec![
        ("valid", request(one("1", ANN), &BOTH), vec![]),
        ("no customers", request(vec![], &BOTH), vec!["customers"]),
        (
            "no destinations",
            request(one("1", ANN), &[]),
            vec!["destinations"],
        ),
    ]
}

#[test]
fn upsert_customers_table() {
    use pb::Destination::{Retainly, Retently, Unspecified};
    let upsert = |customers: Vec<pb::Customer>, destinations: &[pb::Destination]| {
        pb::UpsertCustomersRequest {
            customers,
            destinations: destinations.iter().map(|d| *d as i32).collect(),
            options: None,
        }
    };
    let long = "x".repeat(validate::MAX_STRING_CHARS + 1);
    let bounded = pb::Customer {
        first_name: long.clone(),
        company: long.clone(),
        ..customer("1", ANN)
    };
    let with_options = |mode, key| pb::UpsertCustomersRequest {
        options: options(mode, key),
        ..upsert(one("1", ANN), &BOTH)
    };
    let mut cases = batch_cases(upsert);
    cases.extend([
        (
            "unspecified destination",
            upsert(one("1", ANN), &[Unspecified]),
            vec!["destinations[0]"],
        ),
        (
            "repeated destination",
            upsert(one("1", ANN), &[Retently, Retently]),
            vec!["destinations[1]"],
        ),
        (
            "Retently needs an email",
            upsert(one("1", ""), &[Retently]),
            vec!["customers[0].email"],
        ),
        (
            "Retainly needs a customer id",
            upsert(one("", ANN), &[Retainly]),
            vec!["customers[0].customer_id"],
        ),
        (
            "a key for another destination is still checked",
            upsert(one("1", "not an email"), &[Retainly]),
            vec!["customers[0].email"],
        ),
        (
            "a repeated email, compared normalised",
            upsert(
                vec![customer("1", ANN), customer("2", " A@Example.com")],
                &[Retently],
            ),
            vec!["customers[1].email"],
        ),
        (
            "a repeated customer id",
            upsert(
                vec![customer("1", ANN), customer("1", "b@example.com")],
                &[Retainly],
            ),
            vec!["customers[1].customer_id"],
        ),
        (
            "names are bounded",
            upsert(vec![bounded], &BOTH),
            vec!["customers[0].first_name", "customers[0].company"],
        ),
        (
            "an unknown delivery mode",
            with_options(99, ""),
            vec!["options.mode"],
        ),
        (
            "an idempotency key with a space",
            with_options(pb::DeliveryMode::Async as i32, "a key"),
            vec!["options.idempotency_key"],
        ),
    ]);
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
    let mut cases = batch_cases(delete);
    cases.extend([
        (
            "each destination's key is required",
            delete(one("", ""), &BOTH),
            vec!["customers[0].email", "customers[0].customer_id"],
        ),
        (
            "a repeated key",
            delete(
                vec![customer("1", ANN), customer("1", "b@example.com")],
                &BOTH,
            ),
            vec!["customers[1].customer_id"],
        ),
    ]);
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
