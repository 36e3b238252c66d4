//! CustomerService messages ⇄ the write path's commands and outcomes and the Retently client's
//! types, field by field as the contract's comments map them.

use crate::convert::{json_value, property_from_retently, timestamp_from_rfc3339};
use crate::domain::writes::customers::{
    self as domain, ArrayItem, ArrayItemIds, ArrayItems, ArrayRecordResult, CustomerRef,
    CustomerWriteResult, DeleteArrayItems, DeleteCustomers, ResubscribeCustomers,
    UnsubscribeCustomers, UpsertArrayItems, UpsertCustomers, WriteOutcome,
};
use crate::domain::writes::values::Destination;
use crate::grpc::convert::{error_to_item, index};
use crate::pb;
use crate::upstream::retently;

// ---- requests to commands ----

/// A destination the write path knows; `None` for UNSPECIFIED.
pub fn destination(destination: pb::Destination) -> Option<Destination> {
    match destination {
        pb::Destination::Retently => Some(Destination::Retently),
        pb::Destination::Retainly => Some(Destination::Retainly),
        pb::Destination::Unspecified => None,
    }
}

/// The destinations of a validated request, in request order.
pub fn destinations(values: &[i32]) -> Vec<Destination> {
    values
        .iter()
        .filter_map(|value| pb::Destination::try_from(*value).ok())
        .filter_map(destination)
        .collect()
}

impl From<pb::Customer> for domain::Customer {
    fn from(customer: pb::Customer) -> Self {
        domain::Customer {
            customer_id: customer.customer_id,
            email: customer.email,
            first_name: customer.first_name,
            last_name: customer.last_name,
            company: customer.company,
            tags: customer.tags,
            properties: customer.properties.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::UpsertCustomersRequest> for UpsertCustomers {
    fn from(request: pb::UpsertCustomersRequest) -> Self {
        UpsertCustomers {
            destinations: destinations(&request.destinations),
            customers: request.customers.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::DeleteCustomersRequest> for DeleteCustomers {
    fn from(request: pb::DeleteCustomersRequest) -> Self {
        DeleteCustomers {
            destinations: destinations(&request.destinations),
            customers: request
                .customers
                .into_iter()
                .map(|c| CustomerRef {
                    customer_id: c.customer_id,
                    email: c.email,
                })
                .collect(),
        }
    }
}

impl From<pb::UnsubscribeCustomersRequest> for UnsubscribeCustomers {
    fn from(request: pb::UnsubscribeCustomersRequest) -> Self {
        UnsubscribeCustomers {
            emails: request.emails,
            message: request.message,
        }
    }
}

impl From<pb::ResubscribeCustomersRequest> for ResubscribeCustomers {
    fn from(request: pb::ResubscribeCustomersRequest) -> Self {
        ResubscribeCustomers {
            emails: request.emails,
        }
    }
}

impl From<pb::CustomerArrayItems> for ArrayItems {
    fn from(record: pb::CustomerArrayItems) -> Self {
        let items = record.items.into_iter().map(|item| ArrayItem {
            item_id: item.item_id,
            fields: item
                .fields
                .map(|fields| {
                    fields
                        .fields
                        .iter()
                        .map(|(key, value)| (key.clone(), json_value(value)))
                        .collect()
                })
                .unwrap_or_default(),
        });
        ArrayItems {
            customer_id: record.customer_id,
            field: record.field,
            items: items.collect(),
        }
    }
}

impl From<pb::UpsertCustomerArrayItemsRequest> for UpsertArrayItems {
    fn from(request: pb::UpsertCustomerArrayItemsRequest) -> Self {
        UpsertArrayItems {
            records: request.records.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::CustomerArrayItemIds> for ArrayItemIds {
    fn from(record: pb::CustomerArrayItemIds) -> Self {
        ArrayItemIds {
            customer_id: record.customer_id,
            field: record.field,
            item_ids: record.item_ids,
        }
    }
}

impl From<pb::DeleteCustomerArrayItemsRequest> for DeleteArrayItems {
    fn from(request: pb::DeleteCustomerArrayItemsRequest) -> Self {
        DeleteArrayItems {
            records: request.records.into_iter().map(Into::into).collect(),
        }
    }
}

// ---- outcomes to responses ----

fn destination_to_pb(destination: Destination) -> pb::Destination {
    match destination {
        Destination::Retently => pb::Destination::Retently,
        Destination::Retainly => pb::Destination::Retainly,
    }
}

fn write_outcome_to_pb(outcome: WriteOutcome) -> pb::WriteOutcome {
    match outcome {
        WriteOutcome::Applied => pb::WriteOutcome::Applied,
        WriteOutcome::Created => pb::WriteOutcome::Created,
        WriteOutcome::Updated => pb::WriteOutcome::Updated,
    }
}

fn outcome_to_pb(outcome: domain::DestinationOutcome) -> pb::DestinationOutcome {
    let destination = destination_to_pb(outcome.destination) as i32;
    match outcome.result {
        Ok(applied) => pb::DestinationOutcome {
            destination,
            outcome: write_outcome_to_pb(applied.outcome) as i32,
            retently_id: applied.retently_id,
            error: None,
        },
        Err(error) => pb::DestinationOutcome {
            destination,
            outcome: pb::WriteOutcome::Failed as i32,
            retently_id: String::new(),
            error: Some(error_to_item(&error)),
        },
    }
}

/// Each customer's outcomes, numbered in command order.
pub fn customer_results(results: Vec<CustomerWriteResult>) -> Vec<pb::CustomerWriteResult> {
    results
        .into_iter()
        .enumerate()
        .map(|(position, result)| pb::CustomerWriteResult {
            index: index(position),
            customer_id: result.customer_id,
            email: result.email,
            outcomes: result.outcomes.into_iter().map(outcome_to_pb).collect(),
        })
        .collect()
}

/// Each array record's outcome, numbered in command order.
pub fn record_results(results: Vec<ArrayRecordResult>) -> Vec<pb::ArrayRecordResult> {
    results
        .into_iter()
        .enumerate()
        .map(|(position, result)| {
            let (outcome, error) = match result.result {
                Ok(()) => (pb::WriteOutcome::Applied, None),
                Err(error) => (pb::WriteOutcome::Failed, Some(error_to_item(&error))),
            };
            pb::ArrayRecordResult {
                index: index(position),
                customer_id: result.customer_id,
                field: result.field,
                outcome: outcome as i32,
                error,
            }
        })
        .collect()
}

/// The responses made of per-item results: the results, and no delivery id (a delivered
/// write's is set by the write path).
macro_rules! results_response {
    ($($response:ty: $outcome:ty => $convert:ident,)*) => {$(
        impl From<$outcome> for $response {
            fn from(results: $outcome) -> Self {
                Self {
                    delivery_id: String::new(),
                    results: $convert(results),
                }
            }
        }
    )*};
}

results_response! {
    pb::UpsertCustomersResponse: Vec<CustomerWriteResult> => customer_results,
    pb::DeleteCustomersResponse: Vec<CustomerWriteResult> => customer_results,
    pb::UnsubscribeCustomersResponse: Vec<CustomerWriteResult> => customer_results,
    pb::ResubscribeCustomersResponse: Vec<CustomerWriteResult> => customer_results,
    pb::UpsertCustomerArrayItemsResponse: Vec<ArrayRecordResult> => record_results,
    pb::DeleteCustomerArrayItemsResponse: Vec<ArrayRecordResult> => record_results,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::writes::customers::{retainly_customer, retently_customer};
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
        let input = retently_customer(&sample().into(), "ann@example.com".to_owned());
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
        assert_eq!(
            retently_customer(&untagged.into(), "a@b.co".to_owned()).tags,
            None
        );
    }

    #[test]
    fn retainly_gets_plain_json_fields() {
        let customer = retainly_customer(&sample().into(), Some("ann@example.com".to_owned()));
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
