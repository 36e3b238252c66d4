//! `cx.gateway.v1.FeedbackStream`, written by hand around a codec for pre-encoded messages.
//!
//! The generated server would take `SubscribeResponse` values and encode them per subscriber;
//! the log already holds every event's encoded `SubscribeResponse`, so this service sends those
//! bytes as they are ([`PreEncodedCodec`]): one encoding per event however many subscribers
//! receive it. Service name, method path and wire format are the contract's, so generated
//! clients cannot tell the difference.
//!
//! The adapter validates the request into a [`Filter`] and a [`Start`], honours the caller's own
//! deadline (`grpc-timeout`) and maps errors to statuses; everything else is the hub's.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt as _};
use prost::Message as _;
use prost::bytes::{BufMut as _, Bytes};
use tonic::Status;
use tonic::codec::{
    BufferSettings, Codec, CompressionEncoding, DecodeBuf, Decoder, EnabledCompressionEncodings,
    EncodeBuf, Encoder,
};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService};

use crate::convert::timestamp_to_ms;
use crate::error::{Error, Violations};
use crate::feedback::cursor::Cursor;
use crate::feedback::filter::Filter;
use crate::feedback::{Hub, Start};
use crate::grpc::validate::enum_filter;
use crate::pb;

/// Most campaign ids in one filter, and their longest length (contract).
const MAX_CAMPAIGN_IDS: usize = 100;
const MAX_CAMPAIGN_ID_LEN: usize = 64;
const MAX_CURSOR_LEN: usize = 256;
/// How far ahead of this gateway's clock a `start_time` may lie: the log holds nothing from
/// before 1970 nor from the future, so only clock skew between services is tolerated; a start
/// further ahead is a caller's mistake (seconds sent as milliseconds), not a wish to wait.
const MAX_START_TIME_AHEAD_SECONDS: i64 = 300;

/// `cx.gateway.v1.FeedbackStream`.
#[derive(Debug, Clone)]
pub struct FeedbackApi {
    hub: Arc<Hub>,
    accept_compression: EnabledCompressionEncodings,
    max_decoding_message_size: Option<usize>,
    max_encoding_message_size: Option<usize>,
}

impl NamedService for FeedbackApi {
    const NAME: &'static str = "cx.gateway.v1.FeedbackStream";
}

const SUBSCRIBE_PATH: &str = "/cx.gateway.v1.FeedbackStream/Subscribe";

impl FeedbackApi {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            accept_compression: EnabledCompressionEncodings::default(),
            max_decoding_message_size: None,
            max_encoding_message_size: None,
        }
    }

    #[must_use]
    pub fn accept_compressed(mut self, encoding: CompressionEncoding) -> Self {
        self.accept_compression.enable(encoding);
        self
    }

    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }

    #[must_use]
    pub fn max_encoding_message_size(mut self, limit: usize) -> Self {
        self.max_encoding_message_size = Some(limit);
        self
    }
}

impl<B> Service<http::Request<B>> for FeedbackApi
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != SUBSCRIBE_PATH {
            return Box::pin(async move {
                Ok(
                    Status::unimplemented("unknown method of cx.gateway.v1.FeedbackStream")
                        .into_http(),
                )
            });
        }
        // The caller's own deadline, if it sent one (the server's default deadline is for unary
        // calls and must not cut long-lived streams).
        let deadline = crate::grpc::deadline::parse_grpc_timeout(request.headers())
            .map(|timeout| tokio::time::Instant::now() + timeout);
        let api = self.clone();
        Box::pin(async move {
            let mut grpc = Grpc::new(PreEncodedCodec)
                // Never compressed on the way out: see where the service is added (server.rs).
                .apply_compression_config(
                    api.accept_compression,
                    EnabledCompressionEncodings::default(),
                )
                .apply_max_message_size_config(
                    api.max_decoding_message_size,
                    api.max_encoding_message_size,
                );
            let method = Subscribe {
                hub: api.hub,
                deadline,
            };
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

struct Subscribe {
    hub: Arc<Hub>,
    deadline: Option<tokio::time::Instant>,
}

impl ServerStreamingService<pb::SubscribeRequest> for Subscribe {
    type Response = Bytes;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<tonic::Response<ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<pb::SubscribeRequest>) -> Self::Future {
        let hub = Arc::clone(&self.hub);
        let deadline = self.deadline;
        Box::pin(async move {
            let (filter, start) = validate(request.into_inner())?;
            let events = hub.subscribe(filter, start, deadline).await?;
            let stream: ResponseStream = Box::pin(events.map(|item| item.map_err(Status::from)));
            Ok(tonic::Response::new(stream))
        })
    }
}

/// Checks a request against the contract's limits and turns it into domain terms; every
/// problem is reported at once.
pub fn validate(request: pb::SubscribeRequest) -> Result<(Filter, Start), Error> {
    let mut violations = Violations::new();
    let filter = request.filter.unwrap_or_default();
    violations.check(
        filter.campaign_ids.len() <= MAX_CAMPAIGN_IDS,
        "filter.campaign_ids",
        "must hold at most 100 ids",
    );
    for (index, id) in filter.campaign_ids.iter().enumerate() {
        violations.check(
            !id.is_empty() && id.len() <= MAX_CAMPAIGN_ID_LEN,
            format!("filter.campaign_ids[{index}]"),
            "must be 1 to 64 characters",
        );
    }
    let metric = enum_filter::<pb::Metric>(
        &mut violations,
        "filter.metric",
        filter.metric,
        "is not a known metric",
    );
    for (index, category) in filter.score_categories.iter().enumerate() {
        violations.check(
            matches!(
                pb::ScoreCategory::try_from(*category),
                Ok(pb::ScoreCategory::Promoter
                    | pb::ScoreCategory::Passive
                    | pb::ScoreCategory::Detractor)
            ),
            format!("filter.score_categories[{index}]"),
            "must be PROMOTER, PASSIVE or DETRACTOR",
        );
    }
    let min_ok = violations.check(
        filter.min_score.is_none_or(f64::is_finite),
        "filter.min_score",
        "must be a finite number",
    );
    let max_ok = violations.check(
        filter.max_score.is_none_or(f64::is_finite),
        "filter.max_score",
        "must be a finite number",
    );
    if let (true, true, Some(min), Some(max)) = (min_ok, max_ok, filter.min_score, filter.max_score)
    {
        violations.check(
            min <= max,
            "filter.max_score",
            "must be greater than or equal to min_score",
        );
    }
    let start = match request.start {
        None => Start::Latest,
        Some(pb::subscribe_request::Start::Cursor(text)) => {
            if text.len() > MAX_CURSOR_LEN {
                violations.add("cursor", "must be at most 256 characters");
                Start::Latest
            } else {
                match Cursor::decode(&text) {
                    Ok(cursor) => Start::After(cursor),
                    Err(error) => {
                        violations.add("cursor", error.to_string());
                        Start::Latest
                    }
                }
            }
        }
        Some(pb::subscribe_request::Start::StartTime(time)) => {
            let latest = chrono::Utc::now().timestamp() + MAX_START_TIME_AHEAD_SECONDS;
            if (0..1_000_000_000).contains(&time.nanos) && (0..=latest).contains(&time.seconds) {
                Start::Time(timestamp_to_ms(&time))
            } else {
                violations.add(
                    "start_time",
                    "must be a valid instant from 1970 to at most 5 minutes from now",
                );
                Start::Latest
            }
        }
        Some(pb::subscribe_request::Start::Position(position)) => {
            match pb::StreamPosition::try_from(position) {
                Ok(pb::StreamPosition::Unspecified | pb::StreamPosition::Latest) => Start::Latest,
                Ok(pb::StreamPosition::Earliest) => Start::Earliest,
                Err(_) => {
                    violations.add("position", "is not a known stream position");
                    Start::Latest
                }
            }
        }
    };
    violations.into_result()?;
    Ok((
        Filter {
            campaign_ids: filter.campaign_ids,
            metric,
            score_categories: filter.score_categories,
            min_score: filter.min_score,
            max_score: filter.max_score,
            has_comment: filter.has_comment,
        },
        start,
    ))
}

/// Sends `Bytes` that already hold an encoded `SubscribeResponse`; reads `SubscribeRequest`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreEncodedCodec;

/// Initial size of a subscription's encode buffer (see [`PreEncodedEncoder::buffer_settings`]).
const ENCODE_BUFFER_BYTES: usize = 512;

impl Codec for PreEncodedCodec {
    type Encode = Bytes;
    type Decode = pb::SubscribeRequest;
    type Encoder = PreEncodedEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PreEncodedEncoder;

impl Encoder for PreEncodedEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        // tonic keeps one encode buffer per stream for the stream's whole life, allocated at
        // this size up front and kept after every flush. An idle subscriber should cost next to
        // nothing, so it starts small (a heartbeat or a typical event fits) and grows only while
        // a batch is written. Yield to the transport after 16 KiB rather than tonic's 32 KiB: a
        // subscriber catching up from the log holds less before HTTP/2 flow control applies.
        BufferSettings::new(ENCODE_BUFFER_BYTES, 16 * 1024)
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = pb::SubscribeRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        pb::SubscribeRequest::decode(src)
            .map(Some)
            .map_err(|error| crate::grpc::codec::malformed_request(&error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn fields(error: &Error) -> Vec<&str> {
        error
            .violations()
            .iter()
            .map(|violation| violation.field.as_str())
            .collect()
    }

    #[test]
    fn an_empty_request_is_latest_with_no_filter() {
        let (filter, start) = validate(pb::SubscribeRequest::default()).unwrap();
        assert_eq!(filter, Filter::default());
        assert_eq!(start, Start::Latest);
    }

    #[test]
    fn every_invalid_field_is_reported() {
        let request = pb::SubscribeRequest {
            filter: Some(pb::FeedbackFilter {
                campaign_ids: vec![String::new(), "x".repeat(65)],
                metric: 99,
                score_categories: vec![0, 7],
                min_score: Some(f64::NAN),
                max_score: Some(1.0),
                has_comment: None,
            }),
            start: Some(pb::subscribe_request::Start::Cursor("nope".into())),
        };
        let error = validate(request).unwrap_err();
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
        assert_eq!(
            fields(&error),
            vec![
                "filter.campaign_ids[0]",
                "filter.campaign_ids[1]",
                "filter.metric",
                "filter.score_categories[0]",
                "filter.score_categories[1]",
                "filter.min_score",
                "cursor",
            ]
        );
    }

    #[test]
    fn score_bounds_must_be_ordered() {
        let request = pb::SubscribeRequest {
            filter: Some(pb::FeedbackFilter {
                min_score: Some(5.0),
                max_score: Some(4.0),
                ..Default::default()
            }),
            start: Some(pb::subscribe_request::Start::Position(
                pb::StreamPosition::Earliest as i32,
            )),
        };
        assert_eq!(
            fields(&validate(request).unwrap_err()),
            vec!["filter.max_score"]
        );
    }

    #[test]
    fn start_positions_map_to_the_domain() {
        let start = |start| {
            validate(pb::SubscribeRequest {
                filter: None,
                start: Some(start),
            })
        };
        use pb::subscribe_request::Start as S;
        assert_eq!(
            start(S::Position(pb::StreamPosition::Earliest as i32))
                .unwrap()
                .1,
            Start::Earliest
        );
        assert_eq!(
            start(S::StartTime(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000_000
            }))
            .unwrap()
            .1,
            Start::Time(1_700_000_000_005)
        );
        let cursor = Cursor {
            epoch: 9,
            sequence: 4,
        };
        assert_eq!(
            start(S::Cursor(cursor.encode())).unwrap().1,
            Start::After(cursor)
        );
        assert!(start(S::Position(17)).is_err());
        let now = chrono::Utc::now().timestamp();
        for seconds in [-1, -62_135_596_800, now + 3_600, 1_700_000_000_000] {
            let error = start(S::StartTime(prost_types::Timestamp { seconds, nanos: 0 }))
                .expect_err("out of range");
            assert_eq!(fields(&error), ["start_time"], "{seconds}");
        }
        assert!(
            start(S::StartTime(prost_types::Timestamp {
                seconds: now + 60,
                nanos: 0
            }))
            .is_ok()
        );
        assert!(start(S::Cursor("a".repeat(257))).is_err());
    }
}
