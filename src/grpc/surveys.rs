//! `cx.gateway.v1.SurveyService`.

use crate::pb;

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
