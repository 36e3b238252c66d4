//! `cx.gateway.v1.CustomerService`.

use crate::pb;

/// `cx.gateway.v1.CustomerService`.
#[derive(Debug, Clone, Default)]
pub struct CustomerApi {}

impl CustomerApi {
    pub fn new() -> Self {
        Self {}
    }
}

#[tonic::async_trait]
impl pb::customer_service_server::CustomerService for CustomerApi {}
