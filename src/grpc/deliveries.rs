//! `cx.gateway.v1.DeliveryService`.

use crate::pb;

/// `cx.gateway.v1.DeliveryService`.
#[derive(Debug, Clone, Default)]
pub struct DeliveryApi {}

impl DeliveryApi {
    pub fn new() -> Self {
        Self {}
    }
}

#[tonic::async_trait]
impl pb::delivery_service_server::DeliveryService for DeliveryApi {}
