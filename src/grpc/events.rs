//! `cx.gateway.v1.EventService`.

use crate::pb;

/// `cx.gateway.v1.EventService`.
#[derive(Debug, Clone, Default)]
pub struct EventApi {}

impl EventApi {
    pub fn new() -> Self {
        Self {}
    }
}

#[tonic::async_trait]
impl pb::event_service_server::EventService for EventApi {}
