//! Request validation and conversion: the first byte picks an RPC, the rest is its protobuf
//! request as a caller would send it. A request that decodes goes through the RPC's validator and,
//! when valid, through the conversion to the upstream's domain types and JSON, as the RPC and the
//! outbox worker do.
//!
//! Checked besides "no panic": a refused request is a client error (never INTERNAL or UNKNOWN),
//! and a valid request survives the outbox's encode/decode round trip unchanged.
#![no_main]

use std::sync::LazyLock;

use cx_gateway::config::EventMappings;
use cx_gateway::domain::writes::surveys as survey_writes;
use cx_gateway::domain::writes::{customers as customer_writes, events as event_writes};
use cx_gateway::error::Error;
use cx_gateway::grpc::customers::validation as customers;
use cx_gateway::grpc::events;
use cx_gateway::grpc::surveys::validation as surveys;
use cx_gateway::pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Mapped events require an email (they trigger surveys); the seeds use these names.
static MAPPINGS: LazyLock<EventMappings> = LazyLock::new(|| {
    EventMappings::from([
        (
            "signup".to_owned(),
            vec!["5f1ec45b27b8313876290001".to_owned()],
        ),
        (
            "order.completed".to_owned(),
            vec![
                "5f1ec45b27b8313876290002".to_owned(),
                "5f1ec45b27b8313876290003".to_owned(),
            ],
        ),
    ])
});

/// A fixed instant (2024-01-01), so list validation is reproducible.
const NOW_SECS: i64 = 1_704_067_200;

fuzz_target!(|data: &[u8]| {
    let Some((&rpc, bytes)) = data.split_first() else {
        return;
    };
    match rpc % 16 {
        0 => write::<pb::UpsertCustomersRequest, _>(bytes, |request| {
            customers::upsert_customers(request)?;
            for customer in customer_writes::UpsertCustomers::from(request.clone()).customers {
                let email = customer.email.trim().to_ascii_lowercase();
                json(&customer_writes::retently_customer(
                    &customer,
                    email.clone(),
                ));
                let email = (!customer.email.is_empty()).then_some(email);
                json(&customer_writes::retainly_customer(&customer, email));
            }
            Ok(())
        }),
        1 => write::<pb::DeleteCustomersRequest, _>(bytes, |request| {
            customers::delete_customers(request).map(drop)
        }),
        2 => write::<pb::UnsubscribeCustomersRequest, _>(bytes, |request| {
            customers::subscription_change(
                &request.emails,
                &request.message,
                request.options.as_ref(),
            )
            .map(drop)
        }),
        3 => write::<pb::ResubscribeCustomersRequest, _>(bytes, |request| {
            customers::subscription_change(&request.emails, "", request.options.as_ref()).map(drop)
        }),
        4 => write::<pb::UpsertCustomerArrayItemsRequest, _>(bytes, |request| {
            customers::upsert_array_items(request)?;
            for record in customer_writes::UpsertArrayItems::from(request.clone()).records {
                json(&customer_writes::array_record(&record));
            }
            Ok(())
        }),
        5 => write::<pb::DeleteCustomerArrayItemsRequest, _>(bytes, |request| {
            customers::delete_array_items(request)?;
            for record in customer_writes::DeleteArrayItems::from(request.clone()).records {
                json(&customer_writes::array_deletion(&record));
            }
            Ok(())
        }),
        6 => write::<pb::SendSurveyRequest, _>(bytes, |request| {
            surveys::send_survey(request)?;
            for recipient in survey_writes::SendSurvey::from(request.clone()).recipients {
                json(&survey_writes::recipient(&recipient));
            }
            Ok(())
        }),
        7 => write::<pb::SetFeedbackTagsRequest, _>(bytes, |request| {
            surveys::set_feedback_tags(request)?;
            let command = survey_writes::SetFeedbackTags::from(request.clone());
            assert!(command.op.is_some(), "a valid tag change has a mode");
            Ok(())
        }),
        8 => write::<pb::SetFeedbackTopicsRequest, _>(bytes, |request| {
            surveys::set_feedback_topics(request)?;
            let command = survey_writes::SetFeedbackTopics::from(request.clone());
            assert!(command.op.is_some(), "a valid topic change has a mode");
            for topic in &command.topics {
                json(&survey_writes::topic(topic));
            }
            Ok(())
        }),
        9 => write::<pb::TrackEventRequest, _>(bytes, |request| {
            let event = events::check_track_event(&MAPPINGS, request)?;
            track(&event);
            Ok(())
        }),
        10 => {
            // TrackEvents checks each event on its own, without write options.
            let Ok(message) = pb::TrackEventsRequest::decode(bytes) else {
                return;
            };
            for event in message.events {
                let request = pb::TrackEventRequest {
                    event: Some(event),
                    options: None,
                };
                check(events::check_track_event(&MAPPINGS, &request).map(|event| track(&event)));
            }
        }
        11 => read::<pb::GetCustomerRequest, _>(bytes, |r| customers::get_customer(r).map(drop)),
        12 => read::<pb::ListCustomersRequest, _>(bytes, |r| {
            let list = customers::list_customers(r, NOW_SECS)?;
            // The RPC turns these into the upstream's dates; one it cannot represent would be
            // answered as a server fault.
            for instant in list.start.into_iter().chain([list.end]) {
                assert!(
                    chrono::DateTime::from_timestamp(instant, 0).is_some(),
                    "a valid list request names the instant {instant}"
                );
            }
            Ok(())
        }),
        13 => read::<pb::GetCompanyRequest, _>(bytes, |r| customers::get_company(r).map(drop)),
        14 => {
            read::<pb::ListCompaniesRequest, _>(bytes, |r| customers::list_companies(r).map(drop))
        }
        _ => {}
    }
});

/// A write RPC: validate and convert; a valid request must come back unchanged from the
/// encoding the outbox stores.
fn write<M, F>(bytes: &[u8], validate: F)
where
    M: Message + Default + PartialEq,
    F: Fn(&M) -> Result<(), Error>,
{
    let Ok(request) = M::decode(bytes) else {
        return;
    };
    let outcome = validate(&request);
    if outcome.is_ok() {
        let stored = request.encode_to_vec();
        let replayed = M::decode(stored.as_slice()).expect("a stored request decodes");
        assert!(replayed == request, "a stored request changed on decoding");
    }
    check(outcome);
}

/// A read RPC: validation only.
fn read<M, F>(bytes: &[u8], validate: F)
where
    M: Message + Default,
    F: Fn(&M) -> Result<(), Error>,
{
    if let Ok(request) = M::decode(bytes) {
        check(validate(&request));
    }
}

/// What a validated event becomes: the Retainly event and the survey recipient.
fn track(event: &pb::Event) {
    let event = event_writes::Event::from(event.clone());
    json(&event_writes::retainly_event(&event));
    json(&event_writes::recipient_from_event(&event));
}

/// A refusal is the caller's mistake, and its status (with details) can be built.
fn check(outcome: Result<(), Error>) {
    if let Err(error) = outcome {
        let status = tonic::Status::from(error);
        assert!(
            !matches!(status.code(), tonic::Code::Internal | tonic::Code::Unknown),
            "a request was refused as a server fault: {:?} {}",
            status.code(),
            status.message()
        );
    }
}

/// The JSON body sent upstream can be written.
fn json<T: serde::Serialize>(value: &T) {
    serde_json::to_vec(value).expect("an upstream body serializes");
}
