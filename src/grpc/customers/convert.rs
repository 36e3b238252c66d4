//! CustomerService messages ⇄ the upstream clients' types, field by field as the contract's
//! comments map them.

use serde_json::{Map, Number, Value};

use crate::convert::{property_from_retently, timestamp_from_rfc3339};
use crate::error::Error;
use crate::grpc::convert::{
    date_text, error_to_item, instant_text, json_value, property_to_retently,
};
use crate::pb;
use crate::upstream::retainly::{ArrayDeletion, ArrayRecord, RetainlyCustomer, RetainlyId};
use crate::upstream::retently::{self, CustomerInput, UpsertStatus};

/// Empty strings are "not set" in proto3, and the contract promises an upsert never clears a
/// stored value by omission: they are left out of the upstream request.
fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

// ---- requests to Retently ----

/// The Retently subscriber of a validated customer, keyed by its normalised `email`.
pub fn retently_customer(customer: &pb::Customer, email: String) -> CustomerInput {
    CustomerInput {
        email,
        first_name: non_empty(&customer.first_name),
        last_name: non_empty(&customer.last_name),
        company: non_empty(&customer.company),
        // Output only in the contract: never sent.
        job_title: None,
        tags: (!customer.tags.is_empty()).then(|| customer.tags.clone()),
        properties: customer
            .properties
            .iter()
            .filter_map(property_to_retently)
            .collect(),
    }
}

// ---- requests to Retainly ----

/// The Retainly customer of a validated customer: `id` plus the standard fields that are set and
/// one top-level field per property.
pub fn retainly_customer(customer: &pb::Customer, email: Option<String>) -> RetainlyCustomer {
    let mut fields = Map::new();
    if let Some(email) = email {
        fields.insert("email".to_owned(), Value::String(email));
    }
    for (key, value) in [
        ("first_name", &customer.first_name),
        ("last_name", &customer.last_name),
        ("company", &customer.company),
    ] {
        if let Some(value) = non_empty(value) {
            fields.insert(key.to_owned(), Value::String(value));
        }
    }
    if !customer.tags.is_empty() {
        fields.insert(
            "tags".to_owned(),
            Value::Array(customer.tags.iter().cloned().map(Value::String).collect()),
        );
    }
    for property in &customer.properties {
        if let Some(value) = property.value.as_ref().and_then(retainly_value) {
            fields.insert(property.name.clone(), value);
        }
    }
    RetainlyCustomer {
        id: RetainlyId::Text(customer.customer_id.clone()),
        fields,
    }
}

/// A property value as the plain JSON Retainly stores.
fn retainly_value(value: &pb::PropertyValue) -> Option<Value> {
    use pb::property_value::Kind;
    Some(match value.kind.as_ref()? {
        Kind::StringValue(text) => Value::String(text.clone()),
        Kind::NumberValue(number) => Value::Number(Number::from_f64(*number)?),
        Kind::IntegerValue(number) => Value::Number(Number::from(*number)),
        Kind::BoolValue(flag) => Value::Bool(*flag),
        Kind::DateValue(date) => Value::String(date_text(date)),
        Kind::TimestampValue(timestamp) => Value::String(instant_text(timestamp)?),
        Kind::StringListValue(list) => {
            Value::Array(list.values.iter().cloned().map(Value::String).collect())
        }
    })
}

/// `{customer_id, field, data}`; an item's id goes first as `id`, beside its fields.
pub fn array_record(record: &pb::CustomerArrayItems) -> ArrayRecord {
    ArrayRecord {
        customer_id: RetainlyId::Text(record.customer_id.clone()),
        field: record.field.clone(),
        data: record
            .items
            .iter()
            .map(|item| {
                let mut object = Map::new();
                if !item.item_id.is_empty() {
                    object.insert("id".to_owned(), Value::String(item.item_id.clone()));
                }
                if let Some(fields) = &item.fields {
                    for (key, value) in &fields.fields {
                        object.insert(key.clone(), json_value(value));
                    }
                }
                object
            })
            .collect(),
    }
}

/// `{customer_id, field, ids}` with the ids as JSON strings.
pub fn array_deletion(record: &pb::CustomerArrayItemIds) -> ArrayDeletion {
    ArrayDeletion {
        customer_id: RetainlyId::Text(record.customer_id.clone()),
        field: record.field.clone(),
        ids: record.item_ids.iter().cloned().map(Value::String).collect(),
    }
}

// ---- responses ----

/// A Retently customer as the contract reports it; `customer_id` stays empty (Retently does not
/// store the caller's id).
pub fn customer(customer: &retently::Customer) -> pb::Customer {
    pb::Customer {
        customer_id: String::new(),
        email: customer.email.clone(),
        first_name: customer.first_name.clone().unwrap_or_default(),
        last_name: customer.last_name.clone().unwrap_or_default(),
        company: customer.company_name.clone().unwrap_or_default(),
        tags: customer.tags.clone(),
        properties: customer
            .properties
            .iter()
            .map(property_from_retently)
            .collect(),
        retently_id: customer.id.clone(),
        company_id: customer.company_id.clone().unwrap_or_default(),
        job_title: customer.job_title.clone().unwrap_or_default(),
        create_time: timestamp_from_rfc3339(customer.created_date.as_deref()),
        update_time: timestamp_from_rfc3339(customer.updated_date.as_deref()),
    }
}

pub fn company(company: &retently::Company) -> pb::Company {
    let metrics = company.cx_metrics.as_ref().map(|m| pb::CompanyMetrics {
        nps: m.nps,
        csat: m.csat,
        ces: m.ces,
        star: m.star,
    });
    pb::Company {
        company_id: company.id.clone(),
        domain: company.domain.clone().unwrap_or_default(),
        name: company.company_name.clone().unwrap_or_default(),
        industry: company.industry_name.clone().unwrap_or_default(),
        tags: company.tags.clone(),
        metrics,
        contacts_count: company.contacts_count.unwrap_or(0),
        create_time: timestamp_from_rfc3339(company.created_date.as_deref()),
    }
}

// ---- outcomes ----

pub fn applied(destination: pb::Destination, outcome: pb::WriteOutcome) -> pb::DestinationOutcome {
    pb::DestinationOutcome {
        destination: destination as i32,
        outcome: outcome as i32,
        retently_id: String::new(),
        error: None,
    }
}

pub fn failed(destination: pb::Destination, error: &Error) -> pb::DestinationOutcome {
    pb::DestinationOutcome {
        destination: destination as i32,
        outcome: pb::WriteOutcome::Failed as i32,
        retently_id: String::new(),
        error: Some(error_to_item(error)),
    }
}

/// What a Retently upsert did: `created`/`updated` as said, anything else only "applied".
pub fn upsert_outcome(status: &UpsertStatus) -> pb::WriteOutcome {
    match status {
        UpsertStatus::Created => pb::WriteOutcome::Created,
        UpsertStatus::Updated => pb::WriteOutcome::Updated,
        UpsertStatus::Other(_) => pb::WriteOutcome::Applied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::property_value::Kind;

    fn property(name: &str, kind: Kind) -> pb::Property {
        pb::Property {
            name: name.to_owned(),
            value: Some(pb::PropertyValue { kind: Some(kind) }),
            label: String::new(),
        }
    }

    fn sample() -> pb::Customer {
        pb::Customer {
            customer_id: "c-1".to_owned(),
            email: "Ann@Example.com".to_owned(),
            first_name: "Ann".to_owned(),
            company: "Acme".to_owned(),
            tags: vec!["vip".to_owned()],
            properties: vec![
                property("plan", Kind::StringValue("pro".to_owned())),
                property("ratio", Kind::NumberValue(0.1)),
                property("seats", Kind::IntegerValue(12)),
                property("trial", Kind::BoolValue(false)),
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
                        nanos: 5_000_000,
                    }),
                ),
                property(
                    "regions",
                    Kind::StringListValue(pb::StringList {
                        values: vec!["eu".to_owned(), "us".to_owned()],
                    }),
                ),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn retently_gets_typed_text_properties_and_no_empty_fields() {
        let input = retently_customer(&sample(), "ann@example.com".to_owned());
        assert_eq!(input.email, "ann@example.com");
        assert_eq!(input.last_name, None);
        assert_eq!(input.tags.as_deref(), Some(&["vip".to_owned()][..]));
        let body = serde_json::to_value(&input).unwrap();
        assert_eq!(
            body["properties"],
            serde_json::json!([
                {"label": "plan", "type": "string", "value": "pro"},
                {"label": "ratio", "type": "string", "value": "0.1"},
                {"label": "seats", "type": "integer", "value": "12"},
                {"label": "trial", "type": "boolean", "value": "false"},
                {"label": "renewal", "type": "date", "value": "2025-03-07"},
                {"label": "signed_up", "type": "date", "value": "2022-02-25T21:00:00.005Z"},
                {"label": "regions", "type": "collection", "value": "eu,us"},
            ])
        );
        assert!(body.get("lastName").is_none());
        let untagged = pb::Customer {
            tags: Vec::new(),
            ..sample()
        };
        assert_eq!(retently_customer(&untagged, "a@b.co".to_owned()).tags, None);
    }

    #[test]
    fn retainly_gets_plain_json_fields() {
        let customer = retainly_customer(&sample(), Some("ann@example.com".to_owned()));
        let body = serde_json::to_value(&customer).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "id": "c-1",
                "email": "ann@example.com",
                "first_name": "Ann",
                "company": "Acme",
                "tags": ["vip"],
                "plan": "pro",
                "ratio": 0.1,
                "seats": 12,
                "trial": false,
                "renewal": "2025-03-07",
                "signed_up": "2022-02-25T21:00:00.005Z",
                "regions": ["eu", "us"],
            })
        );
    }

    #[test]
    fn struct_numbers_that_are_whole_stay_integers() {
        use prost_types::value::Kind as V;
        let number = |n: f64| prost_types::Value {
            kind: Some(V::NumberValue(n)),
        };
        assert_eq!(json_value(&number(123.0)), serde_json::json!(123));
        assert_eq!(json_value(&number(1.5)), serde_json::json!(1.5));
        assert_eq!(json_value(&number(1e300)), serde_json::json!(1e300));
    }

    #[test]
    fn retently_properties_read_back_by_type() {
        let read = |kind: &str, value: &str| {
            property_from_retently(&retently::Property {
                label: Some("Label".to_owned()),
                name: Some("label".to_owned()),
                kind: Some(kind.to_owned()),
                value: Some(value.to_owned()),
            })
            .value
            .and_then(|v| v.kind)
            .unwrap()
        };
        assert_eq!(read("text", "x"), Kind::StringValue("x".to_owned()));
        assert_eq!(read("integer", "42"), Kind::IntegerValue(42));
        assert_eq!(read("integer", "4.2"), Kind::StringValue("4.2".to_owned()));
        assert_eq!(read("boolean", "true"), Kind::BoolValue(true));
        assert_eq!(
            read("date", "2019-06-22T00:00:00.000Z"),
            Kind::TimestampValue(prost_types::Timestamp {
                seconds: 1_561_161_600,
                nanos: 0
            })
        );
        assert_eq!(
            read("collection", "a, b"),
            Kind::StringListValue(pb::StringList {
                values: vec!["a".to_owned(), "b".to_owned()]
            })
        );
        assert_eq!(read("mystery", "m"), Kind::StringValue("m".to_owned()));
    }
}
