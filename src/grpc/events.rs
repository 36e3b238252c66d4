//! `cx.gateway.v1.EventService`: customer events to Retainly, and the Retently surveys that
//! configured event names trigger (the way Segment's Retently destination maps track events to
//! transactional campaigns).

use std::sync::Arc;

use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

use crate::app::App;
use crate::config::EventMappings;
use crate::convert::timestamp_to_ms;
use crate::domain::writes::events::{Event, OCCURRED_AT};
use crate::domain::writes::values::Destination;
use crate::domain::writes::{self, DeliveryFacts};
use crate::error::{Error, Violations};
use crate::grpc::convert::error_to_item;
use crate::grpc::{methods, paging, validate};
use crate::pb;

/// Retainly's event name limit.
const MAX_EVENT_NAME: usize = 50;
/// Retainly's limit on event data fields.
const MAX_DATA_FIELDS: usize = 50;
/// Events per TrackEvents message.
const MAX_EVENTS_PER_MESSAGE: usize = 1000;
/// Rejected events listed in a TrackEvents response (the counts stay exact).
const MAX_LISTED_REJECTIONS: usize = 1000;
/// How far in the future an event time may lie (clock skew between services).
const MAX_FUTURE_SECONDS: i64 = 300;

/// `cx.gateway.v1.EventService`.
#[derive(Clone)]
pub struct EventApi {
    app: Arc<App>,
}

impl EventApi {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

/// An event that passed validation, with what its delivery needs.
struct CheckedEvent {
    event: pb::Event,
    /// `message_id`, or the idempotency key when the message id is empty.
    dedup_key: Option<String>,
    campaigns: Vec<String>,
}

/// Validates one event; `prefix` is its field path (`event` or `events[3]`). `mappings` are the
/// configured event-to-campaign mappings, which decide whether an email is required.
fn check_event(
    mappings: &EventMappings,
    v: &mut Violations,
    prefix: &str,
    event: Option<&pb::Event>,
    options_key: Option<&str>,
) -> Option<CheckedEvent> {
    let Some(event) = event else {
        v.add(prefix, "is required");
        return None;
    };
    validate::customer_id(v, format!("{prefix}.customer_id"), &event.customer_id);
    crate::grpc::rules::check_traits(v, prefix, event);
    let name_ok = validate::required(v, format!("{prefix}.name"), &event.name, MAX_EVENT_NAME)
        && validate::printable(v, format!("{prefix}.name"), &event.name);
    let campaigns = if name_ok {
        mappings.get(&event.name).cloned().unwrap_or_default()
    } else {
        Vec::new()
    };
    let email = if event.email.is_empty() {
        if !campaigns.is_empty() {
            v.add(
                format!("{prefix}.email"),
                format!(
                    "is required because event `{}` triggers surveys in {} campaign(s)",
                    event.name,
                    campaigns.len()
                ),
            );
        }
        None
    } else {
        validate::email(v, format!("{prefix}.email"), &event.email)
    };

    let fields = event.properties.as_ref().map(|p| &p.fields);
    let limit = if event.occur_time.is_some() {
        MAX_DATA_FIELDS - 1
    } else {
        MAX_DATA_FIELDS
    };
    if let Some(fields) = fields {
        if fields.len() > limit {
            v.add(
                format!("{prefix}.properties"),
                format!("at most {limit} fields (Retainly allows {MAX_DATA_FIELDS}, one is taken by occur_time when set)"),
            );
        }
        for (key, value) in fields {
            if !validate::data_key(v, &format!("{prefix}.properties"), key) {
                continue;
            }
            let field = format!("{prefix}.properties.{key}");
            if key == OCCURRED_AT {
                v.add(field, "is reserved for occur_time");
                continue;
            }
            validate::retainly_value(v, &field, value, 0, false);
        }
    }
    if let Some(seconds) = validate::timestamp(
        v,
        &format!("{prefix}.occur_time"),
        event.occur_time.as_ref(),
    ) {
        let latest = chrono::Utc::now().timestamp() + MAX_FUTURE_SECONDS;
        v.check(
            seconds <= latest,
            format!("{prefix}.occur_time"),
            "must not be more than 5 minutes in the future",
        );
    }
    let message_id = &event.message_id;
    if !message_id.is_empty() {
        let printable = message_id.bytes().all(|b| (0x21..=0x7e).contains(&b));
        v.check(
            message_id.len() <= validate::MAX_KEY_CHARS && printable,
            format!("{prefix}.message_id"),
            "must be at most 128 characters of printable ASCII without spaces",
        );
    }
    let dedup_key = match (message_id.is_empty(), options_key) {
        (false, Some(key)) if key != message_id => {
            v.add(
                "options.idempotency_key",
                "must equal event.message_id when both are set (the message id is the deduplication key)",
            );
            None
        }
        (false, _) => Some(message_id.clone()),
        (true, key) => key.map(str::to_owned),
    };
    let mut event = event.clone();
    if let Some(email) = email {
        event.email = email;
    }
    Some(CheckedEvent {
        event,
        dedup_key,
        campaigns,
    })
}

/// Validates a `TrackEvent` request exactly as the RPC does (write options, then the event) and
/// returns the event as it would be queued (email normalised). Public so that the fuzz targets
/// reach the validation without a running gateway.
pub fn check_track_event(
    mappings: &EventMappings,
    request: &pb::TrackEventRequest,
) -> Result<pb::Event, Error> {
    let mut v = Violations::new();
    let (_mode, options_key) = validate::write_options(&mut v, request.options.as_ref());
    let checked = check_event(
        mappings,
        &mut v,
        "event",
        request.event.as_ref(),
        options_key.as_deref(),
    );
    v.into_result()?;
    checked
        .map(|checked| checked.event)
        .ok_or_else(|| Error::internal("no event after validation"))
}

/// What the outbox records about an event that passed [`check_track_event`] (the Segment intake
/// queues events itself, after validating a whole batch).
pub(crate) fn event_facts(mappings: &EventMappings, event: pb::Event) -> DeliveryFacts {
    let campaigns = mappings.get(&event.name).cloned().unwrap_or_default();
    facts(&CheckedEvent {
        event,
        dedup_key: None,
        campaigns,
    })
}

fn facts(checked: &CheckedEvent) -> DeliveryFacts {
    let mut destinations = vec![Destination::Retainly];
    if !checked.campaigns.is_empty() {
        destinations.push(Destination::Retently);
    }
    DeliveryFacts {
        destinations,
        item_count: 1,
        // Events of one customer reach Retainly in the order they were accepted.
        ordering_keys: vec![format!("retainly:{}", checked.event.customer_id)],
    }
}

#[tonic::async_trait]
impl pb::event_service_server::EventService for EventApi {
    async fn track_event(
        &self,
        request: Request<pb::TrackEventRequest>,
    ) -> Result<Response<pb::TrackEventResponse>, Status> {
        // The deadline and the caller, whose fair share of the budget the call spends.
        let ctx = crate::auth::interactive_context(&request);
        let owner = crate::auth::owner_of(&request);
        let request = request.into_inner();
        let validation = crate::telemetry::validation_span();
        let mut v = Violations::new();
        let (mode, checked) = validation.in_scope(|| {
            let (mode, options_key) = validate::write_options(&mut v, request.options.as_ref());
            let checked = check_event(
                &self.app.config.event_rules.current().mappings(),
                &mut v,
                "event",
                request.event.as_ref(),
                options_key.as_deref(),
            );
            (mode, checked)
        });
        crate::telemetry::record_violations(&validation, &v);
        drop(validation);
        v.into_result()?;
        let Some(checked) = checked else {
            return Err(Error::internal("no event after validation").into());
        };
        let facts = facts(&checked);
        let request = pb::TrackEventRequest {
            event: Some(checked.event),
            options: None,
        };
        let written = writes::run(
            &self.app,
            owner,
            request,
            mode.into(),
            checked.dedup_key,
            facts,
            ctx,
        )
        .await?;
        let mut response = written.response;
        response.duplicate = written.repeated;
        Ok(Response::new(response))
    }

    async fn track_events(
        &self,
        request: Request<Streaming<pb::TrackEventsRequest>>,
    ) -> Result<Response<pb::TrackEventsResponse>, Status> {
        let owner = crate::auth::owner_of(&request);
        let mut stream = request.into_inner();
        let mut summary = pb::TrackEventsResponse::default();
        let mut index: i64 = 0;
        let mappings = self.app.config.event_rules.current().mappings();
        while let Some(message) = stream.next().await {
            let message = message?;
            if message.events.len() > MAX_EVENTS_PER_MESSAGE {
                let mut v = Violations::new();
                v.add(
                    "events",
                    format!("at most {MAX_EVENTS_PER_MESSAGE} events per message"),
                );
                v.into_result()?;
            }
            for event in message.events {
                let position = index;
                index += 1;
                let mut v = Violations::new();
                let checked = check_event(&mappings, &mut v, "event", Some(&event), None);
                let checked = match (v.into_result(), checked) {
                    (Ok(()), Some(checked)) => checked,
                    (Err(error), _) => {
                        reject(&mut summary, position, &event.message_id, &error);
                        continue;
                    }
                    (Ok(()), None) => continue,
                };
                let facts = facts(&checked);
                let encoded = pb::TrackEventRequest {
                    event: Some(checked.event),
                    options: None,
                }
                .encode_to_vec();
                // Every event is its own delivery (Retainly takes one event per call), queued
                // under TrackEvents and deduplicated together with TrackEvent.
                let written = writes::enqueue::<pb::TrackEventRequest>(
                    &self.app,
                    owner.clone(),
                    methods::TRACK_EVENTS,
                    methods::TRACK_EVENT,
                    encoded,
                    checked.dedup_key,
                    facts,
                )
                .await?;
                if written.repeated {
                    summary.duplicate_count += 1;
                } else {
                    summary.accepted_count += 1;
                }
            }
        }
        Ok(Response::new(summary))
    }

    async fn list_event_mappings(
        &self,
        request: Request<pb::ListEventMappingsRequest>,
    ) -> Result<Response<pb::ListEventMappingsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        validate::max_len(&mut violations, "event", &request.event, MAX_EVENT_NAME);
        let filters = format!("event={}", request.event);
        let (size, position) =
            paging::checked_page(violations, request.page_size, &request.page_token, &filters)?;
        let rules = self.app.config.event_rules.current();
        let mappings = rules.mappings();
        let matching: Vec<(&String, &Vec<String>)> = mappings
            .iter()
            .filter(|(event, _)| request.event.is_empty() || **event == request.event)
            .collect();
        let start = usize::try_from(position.after).unwrap_or(0);
        let page: Vec<pb::EventMapping> = matching
            .iter()
            .skip(start)
            .take(size)
            .map(|(event, campaigns)| pb::EventMapping {
                event: (*event).clone(),
                campaign_ids: (*campaigns).clone(),
            })
            .collect();
        let next = start + page.len();
        let next_after = (next < matching.len()).then(|| i64::try_from(next).unwrap_or(i64::MAX));
        Ok(Response::new(pb::ListEventMappingsResponse {
            mappings: page,
            next_page_token: paging::next_page_token(next_after, size, &filters),
            total_size: i64::try_from(matching.len()).unwrap_or(i64::MAX),
            rules: rules
                .rules
                .iter()
                .filter(|rule| request.event.is_empty() || rule.events.contains(&request.event))
                .map(crate::grpc::rules::rule_to_pb)
                .collect(),
            rules_version: rules.version.clone(),
            rules_loaded_at: Some(crate::convert::timestamp_from_ms(
                rules.loaded_at.timestamp_millis(),
            )),
            rules_file: self
                .app
                .config
                .event_rules
                .file()
                .map(|path| path.display().to_string())
                .unwrap_or_default(),
            rules_file_error: self.app.config.event_rules.refused().unwrap_or_default(),
        }))
    }
}

/// The event as the write path carries it.
impl From<pb::Event> for Event {
    fn from(event: pb::Event) -> Self {
        Event {
            customer_id: event.customer_id,
            email: event.email,
            name: event.name,
            properties: event.properties,
            occurred_at_ms: event.occur_time.as_ref().map(timestamp_to_ms),
            message_id: event.message_id,
            traits: event.traits,
        }
    }
}

/// A TrackEvent request's event; `None` when it has none (validation refuses that).
impl From<pb::TrackEventRequest> for Option<Event> {
    fn from(request: pb::TrackEventRequest) -> Self {
        request.event.map(Event::from)
    }
}

fn reject(summary: &mut pb::TrackEventsResponse, index: i64, message_id: &str, error: &Error) {
    summary.rejected_count += 1;
    if summary.rejected.len() < MAX_LISTED_REJECTIONS {
        let mut item = error_to_item(error);
        if let Some(first) = error.violations().first() {
            item.metadata
                .insert("field".to_owned(), first.field.clone());
        }
        summary.rejected.push(pb::RejectedEvent {
            index,
            message_id: message_id.to_owned(),
            error: Some(item),
        });
    }
}

#[cfg(test)]
mod validation_tables;
