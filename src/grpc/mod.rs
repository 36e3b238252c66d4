//! Thin gRPC adapters, one per service of the contract: validate, convert protobuf to domain
//! types, call the domain, convert back, and map errors through [`crate::error`].
//!
//! RPCs that this build does not serve yet keep the generated default, which answers
//! `UNIMPLEMENTED`.

pub mod deadline;

use crate::pb;
use crate::shutdown::Drain;

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

/// `cx.gateway.v1.SurveyService`.
#[derive(Debug, Clone, Default)]
pub struct SurveyApi {}

impl SurveyApi {
    pub fn new() -> Self {
        Self {}
    }
}

#[tonic::async_trait]
impl pb::survey_service_server::SurveyService for SurveyApi {}

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

/// `cx.gateway.v1.FeedbackStream`.
#[derive(Debug, Clone)]
pub struct FeedbackApi {
    /// Streams end with a final cursor when draining starts.
    #[allow(dead_code)]
    drain: Drain,
}

impl FeedbackApi {
    pub fn new(drain: Drain) -> Self {
        Self { drain }
    }
}

#[tonic::async_trait]
impl pb::feedback_stream_server::FeedbackStream for FeedbackApi {}

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
