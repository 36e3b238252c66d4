//! TrackEvent's validator, as a table: a request, and the fields its violations name (none for
//! a valid request).

use super::*;

use crate::grpc::validate::violated_fields as fields;

fn event(customer_id: &str, name: &str) -> pb::Event {
    pb::Event {
        customer_id: customer_id.to_owned(),
        name: name.to_owned(),
        ..Default::default()
    }
}

fn properties(fields: &[(&str, prost_types::value::Kind)]) -> Option<prost_types::Struct> {
    Some(prost_types::Struct {
        fields: fields
            .iter()
            .map(|(key, kind)| {
                (
                    (*key).to_owned(),
                    prost_types::Value {
                        kind: Some(kind.clone()),
                    },
                )
            })
            .collect(),
    })
}

#[test]
fn track_event_table() {
    use prost_types::value::Kind;
    let mut mappings = EventMappings::new();
    mappings.insert("signed_up".to_owned(), vec!["c1".to_owned()]);
    let track = |event: pb::Event| pb::TrackEventRequest {
        event: Some(event),
        options: None,
    };
    let with_key = |event: pb::Event, key: &str| pb::TrackEventRequest {
        event: Some(event),
        options: Some(pb::WriteOptions {
            mode: pb::DeliveryMode::Async as i32,
            idempotency_key: key.to_owned(),
        }),
    };
    let cases: Vec<(&str, pb::TrackEventRequest, Vec<&str>)> = vec![
        ("valid", track(event("u1", "opened_app")), vec![]),
        (
            "an event is required",
            pb::TrackEventRequest::default(),
            vec!["event"],
        ),
        (
            "a customer id is required",
            track(event("", "opened_app")),
            vec!["event.customer_id"],
        ),
        (
            "a name is required",
            track(event("u1", "")),
            vec!["event.name"],
        ),
        (
            "names are at most 50 characters",
            track(event("u1", &"n".repeat(MAX_EVENT_NAME + 1))),
            vec!["event.name"],
        ),
        (
            "an event that triggers surveys needs an email",
            track(event("u1", "signed_up")),
            vec!["event.email"],
        ),
        (
            "an event that triggers surveys, with an email",
            track(pb::Event {
                email: "a@example.com".to_owned(),
                ..event("u1", "signed_up")
            }),
            vec![],
        ),
        (
            "occurred_at is reserved for occur_time",
            track(pb::Event {
                properties: properties(&[(OCCURRED_AT, Kind::StringValue("now".to_owned()))]),
                ..event("u1", "opened_app")
            }),
            vec!["event.properties.occurred_at"],
        ),
        (
            "a time more than five minutes ahead",
            track(pb::Event {
                occur_time: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp() + 3_600,
                    nanos: 0,
                }),
                ..event("u1", "opened_app")
            }),
            vec!["event.occur_time"],
        ),
        (
            "a message id with a space",
            track(pb::Event {
                message_id: "m 1".to_owned(),
                ..event("u1", "opened_app")
            }),
            vec!["event.message_id"],
        ),
        (
            "the message id is the deduplication key",
            with_key(
                pb::Event {
                    message_id: "m-1".to_owned(),
                    ..event("u1", "opened_app")
                },
                "k-1",
            ),
            vec!["options.idempotency_key"],
        ),
        (
            "a key equal to the message id",
            with_key(
                pb::Event {
                    message_id: "m-1".to_owned(),
                    ..event("u1", "opened_app")
                },
                "m-1",
            ),
            vec![],
        ),
    ];
    for (case, request, expected) in cases {
        assert_eq!(
            fields(check_track_event(&mappings, &request)),
            expected,
            "{case}"
        );
    }
}
