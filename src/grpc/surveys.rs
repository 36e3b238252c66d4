//! `cx.gateway.v1.SurveyService`: transactional survey sends, campaigns, templates, scores,
//! feedback and its tags and topics, the outbox of sent surveys, and campaign reports, over
//! [`crate::upstream::RetentlyApi`] (which owns batching, caching, retries and the budget).
//!
//! # Layout
//! - [`validation`]: request checks with exact field paths.
//! - [`convert`]: protobuf ⇄ Retently types for this service.
//! - [`history`]: `GetCustomerFeedbackHistory`, served from the feedback log.
//! - [`cursor`]: page tokens of the lists Retently pages itself (feedback, sent surveys).
//! - `delivery`: the outbox's delivery of a queued send, which checks Retently's history of
//!   sent surveys before sending again after a failure that may have been applied.

pub mod convert;
pub mod cursor;
pub mod history;
pub mod validation;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
// The caller's deadline and name: the name picks the fair share of the budget a call spends.
use crate::auth::interactive_context;
use crate::convert::{feedback_to_pb, timestamp_to_ms};
use crate::domain::writes;
use crate::domain::writes::surveys::check_campaign;
use crate::error::{Error, Violations};
use crate::feedback::{FeedbackLog, FeedbackQuery as LogQuery};
use crate::grpc::{paging, validate, write};
use crate::pb;
use crate::upstream::retently::{FeedbackQuery, OutboxQuery, PageRequest};

use self::validation::{ValidWrite, email_filter, id_filter, known};

/// `cx.gateway.v1.SurveyService`.
#[derive(Clone)]
pub struct SurveyApi {
    app: Arc<App>,
    /// The feedback log, which answers customer histories without upstream calls.
    log: FeedbackLog,
}

impl SurveyApi {
    pub fn new(app: Arc<App>, log: FeedbackLog) -> Self {
        Self { app, log }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One page of a list held whole in memory, ordered by `(name, id)` as `key` reads them:
/// `(items, next_page_token, total_size)`.
fn local_page<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> (&str, &str),
    size: usize,
    position: &paging::PagePosition,
    filters: &str,
) -> (Vec<T>, String, i64) {
    items.sort_by(|a, b| key(a).cmp(&key(b)));
    let total = items.len();
    let start = usize::try_from(position.after).unwrap_or(usize::MAX);
    let page: Vec<T> = items.into_iter().skip(start).take(size).collect();
    let next = start.saturating_add(page.len());
    let next_after = (next < total).then(|| i64::try_from(next).unwrap_or(i64::MAX));
    (
        page,
        paging::next_page_token(next_after, size, filters),
        i64::try_from(total).unwrap_or(i64::MAX),
    )
}

/// Whether an enum filter lets `value` through: unset or UNSPECIFIED (0) lets everything.
fn passes<E: Into<i32>>(filter: Option<E>, value: i32) -> bool {
    filter
        .map(Into::into)
        .is_none_or(|wanted| wanted == 0 || value == wanted)
}

/// Upstream sort of a time-ordered list: newest first unless asked otherwise.
fn sort(order: pb::TimeOrder, field: &str) -> String {
    match order {
        pb::TimeOrder::OldestFirst => field.to_owned(),
        pb::TimeOrder::Unspecified | pb::TimeOrder::NewestFirst => format!("-{field}"),
    }
}

#[tonic::async_trait]
impl pb::survey_service_server::SurveyService for SurveyApi {
    async fn send_survey(
        &self,
        request: Request<pb::SendSurveyRequest>,
    ) -> Result<Response<pb::SendSurveyResponse>, Status> {
        let ctx = interactive_context(&request);
        let owner = crate::auth::owner_of(&request);
        let request = request.into_inner();
        let ValidWrite { mode, key, facts } = validation::send_survey(&request)?;
        check_campaign(&self.app, &ctx, &request.campaign_id).await?;
        let written = writes::run(&self.app, owner, request, mode.into(), key, facts, ctx).await?;
        Ok(Response::new(written.response))
    }

    async fn list_campaigns(
        &self,
        request: Request<pb::ListCampaignsRequest>,
    ) -> Result<Response<pb::ListCampaignsResponse>, Status> {
        let ctx = interactive_context(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        let metric: Option<pb::Metric> = known(&mut v, "metric", request.metric);
        let kind: Option<pb::CampaignType> = known(&mut v, "type", request.r#type);
        let filters = format!(
            "campaigns;metric={};type={};active={:?}",
            request.metric, request.r#type, request.active
        );
        let (size, position) =
            paging::checked_page(v, request.page_size, &request.page_token, &filters)?;
        let campaigns = self.app.retently.campaigns(&ctx).await?;
        let matching = campaigns
            .iter()
            .map(convert::campaign)
            .filter(|c| passes(metric, c.metric) && passes(kind, c.r#type))
            .filter(|c| request.active.is_none_or(|active| c.active == active))
            .collect();
        let (campaigns, next_page_token, total_size) = local_page(
            matching,
            |c: &pb::Campaign| (c.name.as_str(), c.campaign_id.as_str()),
            size,
            &position,
            &filters,
        );
        Ok(Response::new(pb::ListCampaignsResponse {
            campaigns,
            next_page_token,
            total_size,
        }))
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        let ctx = interactive_context(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        let metric: Option<pb::Metric> = known(&mut v, "metric", request.metric);
        let channel: Option<pb::Channel> = known(&mut v, "channel", request.channel);
        let filters = format!(
            "templates;metric={};channel={}",
            request.metric, request.channel
        );
        let (size, position) =
            paging::checked_page(v, request.page_size, &request.page_token, &filters)?;
        let templates = self.app.retently.templates(&ctx).await?;
        let matching = templates
            .iter()
            .map(convert::template)
            .filter(|t| passes(metric, t.metric) && passes(channel, t.channel))
            .collect();
        let (templates, next_page_token, total_size) = local_page(
            matching,
            |t: &pb::Template| (t.name.as_str(), t.template_id.as_str()),
            size,
            &position,
            &filters,
        );
        Ok(Response::new(pb::ListTemplatesResponse {
            templates,
            next_page_token,
            total_size,
        }))
    }

    async fn get_template(
        &self,
        request: Request<pb::GetTemplateRequest>,
    ) -> Result<Response<pb::GetTemplateResponse>, Status> {
        let ctx = interactive_context(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        validate::retently_path_id(&mut v, "template_id", &request.template_id);
        v.into_result()?;
        let template = self
            .app
            .retently
            .template(&ctx, &request.template_id)
            .await?;
        Ok(Response::new(pb::GetTemplateResponse {
            template: Some(convert::template(&template)),
        }))
    }

    async fn get_score(
        &self,
        request: Request<pb::GetScoreRequest>,
    ) -> Result<Response<pb::GetScoreResponse>, Status> {
        let ctx = interactive_context(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        let metric = pb::Metric::try_from(request.metric).ok();
        let upstream_metric = metric.and_then(convert::metric);
        v.check(
            upstream_metric.is_some(),
            "metric",
            "must be NPS, CSAT, CES or STAR",
        );
        v.into_result()?;
        let (Some(metric), Some(upstream_metric)) = (metric, upstream_metric) else {
            return Err(Error::internal("no metric after validation").into());
        };
        let score = self.app.retently.score(&ctx, upstream_metric).await?;
        Ok(Response::new(convert::score(&score, metric)))
    }

    async fn list_feedback(
        &self,
        request: Request<pb::ListFeedbackRequest>,
    ) -> Result<Response<pb::ListFeedbackResponse>, Status> {
        let ctx = interactive_context(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        id_filter(&mut v, "campaign_id", &request.campaign_id);
        id_filter(
            &mut v,
            "retently_customer_id",
            &request.retently_customer_id,
        );
        email_filter(&mut v, "email", &request.email);
        let TimedPage {
            start,
            order,
            filters,
            now,
            cursor,
        } = timed_page(
            v,
            format!(
                "feedback;campaign={:?};customer={:?};email={:?}",
                request.campaign_id, request.retently_customer_id, request.email,
            ),
            TimedList {
                start_time: request.start_time.as_ref(),
                end_time: request.end_time.as_ref(),
                order: request.order,
                page_size: request.page_size,
                page_token: &request.page_token,
            },
        )?;
        let order = order.unwrap_or_default();
        if let Some(start_ms) = start
            && let Some(covered) = self.log.covered_range().await?
            && covered.contains(start_ms, cursor.end_ms)
        {
            let offset = u64::from(cursor.page.saturating_sub(1)) * u64::from(cursor.size);
            let page = self
                .log
                .query(LogQuery {
                    campaign_id: non_empty(request.campaign_id),
                    retently_customer_id: non_empty(request.retently_customer_id),
                    email: non_empty(request.email),
                    created_from_ms: Some(start_ms),
                    created_before_ms: Some(cursor.end_ms),
                    newest_first: order != pb::TimeOrder::OldestFirst,
                    after: None,
                    offset: usize::try_from(offset).unwrap_or(usize::MAX),
                    limit: cursor.size as usize,
                })
                .await?;
            let shown = offset.saturating_add(page.items.len() as u64);
            let more = shown < u64::try_from(page.total).unwrap_or(0);
            return Ok(Response::new(pb::ListFeedbackResponse {
                feedback: page.items,
                next_page_token: cursor::next_token(cursor, more, &filters, now),
                total_size: page.total,
                source: pb::FeedbackListSource::Log as i32,
            }));
        }
        let query = FeedbackQuery {
            email: non_empty(request.email),
            customer_id: non_empty(request.retently_customer_id),
            campaign_id: non_empty(request.campaign_id),
            start_date: start.and_then(convert::instant),
            end_date: convert::instant(cursor.inclusive_end_ms()),
            page: PageRequest {
                page: Some(cursor.page),
                limit: Some(cursor.size),
                sort: Some(sort(order, "createdDate")),
            },
        };
        let page = self.app.retently.list_feedback(&ctx, query).await?;
        Ok(Response::new(pb::ListFeedbackResponse {
            feedback: page.items.iter().map(feedback_to_pb).collect(),
            next_page_token: cursor::next_token(cursor, page.has_more(), &filters, now),
            total_size: total_size(page.total, &cursor, page.items.len()),
            source: pb::FeedbackListSource::Upstream as i32,
        }))
    }

    async fn get_feedback(
        &self,
        request: Request<pb::GetFeedbackRequest>,
    ) -> Result<Response<pb::GetFeedbackResponse>, Status> {
        let ctx = interactive_context(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        validate::retently_path_id(&mut v, "feedback_id", &request.feedback_id);
        v.into_result()?;
        let feedback = self
            .app
            .retently
            .get_feedback(&ctx, &request.feedback_id)
            .await?;
        Ok(Response::new(pb::GetFeedbackResponse {
            feedback: Some(feedback_to_pb(&feedback)),
        }))
    }

    async fn get_customer_feedback_history(
        &self,
        request: Request<pb::GetCustomerFeedbackHistoryRequest>,
    ) -> Result<Response<pb::GetCustomerFeedbackHistoryResponse>, Status> {
        let request = history::validate(request.get_ref())?;
        Ok(Response::new(history::answer(&self.log, request).await?))
    }

    async fn set_feedback_tags(
        &self,
        request: Request<pb::SetFeedbackTagsRequest>,
    ) -> Result<Response<pb::SetFeedbackTagsResponse>, Status> {
        write::serve(&self.app, request, validation::set_feedback_tags).await
    }

    async fn set_feedback_topics(
        &self,
        request: Request<pb::SetFeedbackTopicsRequest>,
    ) -> Result<Response<pb::SetFeedbackTopicsResponse>, Status> {
        write::serve(&self.app, request, validation::set_feedback_topics).await
    }

    async fn list_sent_surveys(
        &self,
        request: Request<pb::ListSentSurveysRequest>,
    ) -> Result<Response<pb::ListSentSurveysResponse>, Status> {
        let ctx = interactive_context(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        id_filter(&mut v, "campaign_id", &request.campaign_id);
        email_filter(&mut v, "email", &request.email);
        let channel = match pb::Channel::try_from(request.channel) {
            Ok(pb::Channel::Other) | Err(_) => {
                v.add(
                    "channel",
                    "must be EMAIL, LINK, IN_APP or INTERCOM, or unset",
                );
                None
            }
            Ok(channel) => convert::channel_filter(channel),
        };
        let sent_by = match pb::SentBy::try_from(request.sent_by) {
            Ok(pb::SentBy::Other) | Err(_) => {
                v.add(
                    "sent_by",
                    "must be CAMPAIGN, REMINDER, MANUAL, TEST or IMPORTED, or unset",
                );
                None
            }
            Ok(sent_by) => convert::sent_by_filter(sent_by),
        };
        let TimedPage {
            start,
            order,
            filters,
            now,
            cursor,
        } = timed_page(
            v,
            format!(
                "sent_surveys;campaign={:?};email={:?};channel={};sent_by={}",
                request.campaign_id, request.email, request.channel, request.sent_by,
            ),
            TimedList {
                start_time: request.start_time.as_ref(),
                end_time: request.end_time.as_ref(),
                order: request.order,
                page_size: request.page_size,
                page_token: &request.page_token,
            },
        )?;
        let query = OutboxQuery {
            email: non_empty(request.email),
            campaign_id: non_empty(request.campaign_id),
            channel: channel.map(str::to_owned),
            sent_by: sent_by.map(str::to_owned),
            start_date: start.and_then(convert::instant),
            end_date: convert::instant(cursor.inclusive_end_ms()),
            page: PageRequest {
                page: Some(cursor.page),
                limit: Some(cursor.size),
                sort: Some(sort(order.unwrap_or_default(), "surveyCreatedDate")),
            },
        };
        let page = self.app.retently.outbox(&ctx, query).await?;
        Ok(Response::new(pb::ListSentSurveysResponse {
            sent_surveys: page.items.iter().map(convert::sent_survey).collect(),
            next_page_token: cursor::next_token(cursor, page.has_more(), &filters, now),
            total_size: total_size(page.total, &cursor, page.items.len()),
        }))
    }

    async fn list_reports(
        &self,
        request: Request<pb::ListReportsRequest>,
    ) -> Result<Response<pb::ListReportsResponse>, Status> {
        let ctx = interactive_context(&request);
        let request = request.into_inner();
        let mut v = Violations::new();
        if !request.campaign_id.is_empty() {
            validate::retently_path_id(&mut v, "campaign_id", &request.campaign_id);
        }
        let filters = format!("reports;campaign={:?}", request.campaign_id);
        let (size, position) =
            paging::checked_page(v, request.page_size, &request.page_token, &filters)?;
        let campaign_id = (!request.campaign_id.is_empty()).then_some(request.campaign_id.as_str());
        let reports = self.app.retently.reports(&ctx, campaign_id).await?;
        let reports = reports.iter().map(convert::report).collect();
        let (reports, next_page_token, total_size) = local_page(
            reports,
            |r: &pb::CampaignReport| (r.name.as_str(), r.campaign_id.as_str()),
            size,
            &position,
            &filters,
        );
        Ok(Response::new(pb::ListReportsResponse {
            reports,
            next_page_token,
            total_size,
        }))
    }
}

/// A valid `[start_time, end_time)` range in UNIX milliseconds, the upstream's precision; an
/// instant between two milliseconds is rounded up, which keeps both bounds exact.
fn time_range(
    v: &mut Violations,
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> (Option<i64>, Option<i64>) {
    let mut millis = |field: &str, value: Option<&prost_types::Timestamp>| {
        validate::timestamp(v, field, value)?;
        let value = value?;
        let partial = value.nanos % 1_000_000 != 0;
        Some(timestamp_to_ms(value) + i64::from(partial))
    };
    let start = millis("start_time", start);
    let end = millis("end_time", end);
    if let (Some(start), Some(end)) = (start, end)
        && start >= end
    {
        v.add("end_time", "must be after start_time");
    }
    (start, end)
}

/// The paging fields of a time-ordered list (ListFeedback, ListSentSurveys).
struct TimedList<'a> {
    start_time: Option<&'a prost_types::Timestamp>,
    end_time: Option<&'a prost_types::Timestamp>,
    order: i32,
    page_size: i32,
    page_token: &'a str,
}

/// A time-ordered list's checked window and page.
struct TimedPage {
    start: Option<i64>,
    order: Option<pb::TimeOrder>,
    /// What the page token is bound to: the list's own filters, then the window and order.
    filters: String,
    now: i64,
    cursor: cursor::Cursor,
}

/// Checks a time-ordered list's window and order (after the list's own checks, recorded in
/// `v`) and resolves its page under `filters` plus the window and order; every violation
/// found is answered at once.
fn timed_page(mut v: Violations, filters: String, list: TimedList<'_>) -> Result<TimedPage, Error> {
    let (start, end) = time_range(&mut v, list.start_time, list.end_time);
    let order: Option<pb::TimeOrder> = known(&mut v, "order", list.order);
    let filters = format!(
        "{filters};start={:?};end={:?};order={}",
        list.start_time.map(timestamp_to_ms),
        list.end_time.map(timestamp_to_ms),
        list.order,
    );
    let now = now_ms();
    let cursor = cursor::resolve(&mut v, list.page_size, list.page_token, &filters, end, now);
    v.into_result()?;
    Ok(TimedPage {
        start,
        order,
        filters,
        now,
        cursor,
    })
}

/// An optional filter: `None` when the caller left it empty.
fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

/// The upstream's `total`, or, when it gives none, what the pages read so far show.
fn total_size(total: Option<u64>, cursor: &cursor::Cursor, on_page: usize) -> i64 {
    match total {
        Some(total) => i64::try_from(total).unwrap_or(i64::MAX),
        None => {
            let before = i64::from(cursor.page.saturating_sub(1)) * i64::from(cursor.size);
            before.saturating_add(i64::try_from(on_page).unwrap_or(i64::MAX))
        }
    }
}
