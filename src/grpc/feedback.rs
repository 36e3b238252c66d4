//! `cx.gateway.v1.FeedbackStream`.

use crate::pb;
use crate::shutdown::Drain;

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
