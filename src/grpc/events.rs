//! `cx.gateway.v1.EventService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::error::Violations;
use crate::grpc::{paging, validate};
use crate::pb;

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

#[tonic::async_trait]
impl pb::event_service_server::EventService for EventApi {
    async fn list_event_mappings(
        &self,
        request: Request<pb::ListEventMappingsRequest>,
    ) -> Result<Response<pb::ListEventMappingsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        validate::max_len(&mut violations, "event", &request.event, 50);
        let filters = format!("event={}", request.event);
        let (size, position) = paging::page_request(
            &mut violations,
            request.page_size,
            &request.page_token,
            100,
            1000,
            &filters,
        );
        violations.into_result()?;
        let matching: Vec<(&String, &Vec<String>)> = self
            .app
            .config
            .event_mappings
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
        }))
    }
}
