//! `cx.gateway.v1.DeliveryService`: the status of asynchronous writes and the dead-letter list.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::convert::timestamp_from_ms;
use crate::domain::Visibility;
use crate::domain::outbox::{DeliveryRecord, DeliveryState, RetrySelection};
use crate::error::{Error, ErrorCode, Reason, Violations};
use crate::grpc::convert::item_error;
use crate::grpc::validate::enum_filter;
use crate::grpc::{methods, paging};
use crate::pb;

const MAX_ID_CHARS: usize = 64;
const MAX_RETRY_IDS: usize = 1000;

/// `cx.gateway.v1.DeliveryService`.
#[derive(Clone)]
pub struct DeliveryApi {
    app: Arc<App>,
}

impl DeliveryApi {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    fn to_pb(&self, record: DeliveryRecord) -> pb::Delivery {
        let settings = self.app.outbox.settings();
        let retention = match record.state {
            DeliveryState::Delivered => Some(settings.delivered_retention),
            DeliveryState::DeadLettered => Some(settings.dead_letter_retention),
            _ => None,
        };
        // A finished delivery is kept for its retention, and never less than the idempotency
        // window, so a repeated call's delivery id still resolves.
        let expire_time = record
            .complete_ms
            .zip(retention)
            .map(|(complete, retention)| {
                let kept = retention.max(self.app.idempotency.window());
                timestamp_from_ms(complete.saturating_add(millis(kept)))
            });
        let result = record
            .result
            .as_deref()
            .and_then(|bytes| crate::domain::writes::delivery_result(&record.method, bytes));
        pb::Delivery {
            delivery_id: record.delivery_id,
            method: record.method,
            state: record.state as i32,
            destinations: record.destinations,
            item_count: i32::try_from(record.item_count).unwrap_or(i32::MAX),
            idempotency_key: record.idempotency_key.unwrap_or_default(),
            attempt_count: i32::try_from(record.attempt_count).unwrap_or(i32::MAX),
            replay_count: i32::try_from(record.replay_count).unwrap_or(i32::MAX),
            last_error: record.last_error.map(item_error),
            create_time: Some(timestamp_from_ms(record.create_ms)),
            update_time: Some(timestamp_from_ms(record.update_ms)),
            next_attempt_time: record.next_attempt_ms.map(timestamp_from_ms),
            complete_time: record.complete_ms.map(timestamp_from_ms),
            expire_time,
            result,
        }
    }
}

/// What every DeliveryService call starts from: the deliveries its caller may see, the
/// request, and no violations yet.
fn started<T>(request: Request<T>) -> (Visibility, T, Violations) {
    let visibility = crate::auth::visibility_of(&request);
    (visibility, request.into_inner(), Violations::new())
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn check_id(violations: &mut Violations, field: String, id: &str) {
    if id.is_empty() {
        violations.add(field, "is required");
    } else if id.chars().count() > MAX_ID_CHARS {
        violations.add(field, format!("must be at most {MAX_ID_CHARS} characters"));
    }
}

fn check_method(violations: &mut Violations, method: &str) {
    // Alerts are deliveries too, so their dead letters can be listed and requeued together.
    if !method.is_empty()
        && !methods::WRITES.contains(&method)
        && method != crate::alerts::ALERT_METHOD
    {
        violations.add(
            "method",
            "must be the full name of a write RPC, e.g. /cx.gateway.v1.CustomerService/UpsertCustomers, \
             or cx-gateway/Alert",
        );
    }
}

#[tonic::async_trait]
impl pb::delivery_service_server::DeliveryService for DeliveryApi {
    async fn get_delivery(
        &self,
        request: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::GetDeliveryResponse>, Status> {
        let (visibility, request, mut violations) = started(request);
        check_id(
            &mut violations,
            "delivery_id".to_owned(),
            &request.delivery_id,
        );
        violations.into_result()?;
        let record = self
            .app
            .outbox
            .get(&request.delivery_id, &visibility)
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::NotFound,
                    Reason::DeliveryNotFound,
                    "no delivery of this caller has this id (it may have expired)",
                )
            })?;
        Ok(Response::new(pb::GetDeliveryResponse {
            delivery: Some(self.to_pb(record)),
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let (visibility, request, mut violations) = started(request);
        check_method(&mut violations, &request.method);
        let destination = enum_filter::<pb::Destination>(
            &mut violations,
            "destination",
            request.destination,
            "is not a known destination",
        );
        let filters = format!("method={};destination={:?}", request.method, destination);
        let (size, position) =
            paging::checked_page(violations, request.page_size, &request.page_token, &filters)?;
        let method = (!request.method.is_empty()).then_some(request.method);
        let page = self
            .app
            .outbox
            .dead_letters(method, destination, &visibility, position.after, size)
            .await?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            deliveries: page.deliveries.into_iter().map(|d| self.to_pb(d)).collect(),
            next_page_token: paging::next_page_token(page.next_after, size, &filters),
            total_size: page.total,
        }))
    }

    async fn retry_dead_letters(
        &self,
        request: Request<pb::RetryDeadLettersRequest>,
    ) -> Result<Response<pb::RetryDeadLettersResponse>, Status> {
        let (visibility, request, mut violations) = started(request);
        let selection = match (request.delivery_ids.is_empty(), request.all) {
            (true, false) | (false, true) => {
                violations.add(
                    "delivery_ids",
                    "give either delivery_ids or all, exactly one of them",
                );
                None
            }
            (true, true) => {
                check_method(&mut violations, &request.method);
                Some(RetrySelection::All {
                    method: (!request.method.is_empty()).then_some(request.method),
                })
            }
            (false, false) => {
                if !request.method.is_empty() {
                    violations.add("method", "can only narrow `all`");
                }
                if request.delivery_ids.len() > MAX_RETRY_IDS {
                    violations.add("delivery_ids", format!("at most {MAX_RETRY_IDS} ids"));
                }
                let mut seen = std::collections::HashSet::new();
                for (index, id) in request.delivery_ids.iter().enumerate() {
                    check_id(&mut violations, format!("delivery_ids[{index}]"), id);
                    if !seen.insert(id) {
                        violations.add(format!("delivery_ids[{index}]"), "is repeated");
                    }
                }
                Some(RetrySelection::Ids(request.delivery_ids))
            }
        };
        violations.into_result()?;
        let Some(selection) = selection else {
            return Err(Error::internal("no selection after validation").into());
        };
        let results = self
            .app
            .outbox
            .retry_dead_letters(selection, &visibility)
            .await?;
        let requeued_count = results.iter().filter(|r| r.requeued).count();
        Ok(Response::new(pb::RetryDeadLettersResponse {
            requeued_count: i64::try_from(requeued_count).unwrap_or(i64::MAX),
            results: results
                .into_iter()
                .map(|r| pb::RetryDeadLetterResult {
                    delivery_id: r.delivery_id,
                    requeued: r.requeued,
                    error: r.error.map(item_error),
                })
                .collect(),
        }))
    }
}
