//! `SurveyService.GetCustomerFeedbackHistory`: validation, opaque keyset page tokens and the
//! answer, served from the feedback log alone.
//!
//! Pages are keyset pages over `(create_time, feedback_id)`, newest first: a response arriving
//! while a caller pages lands before the first page or at its place in the order, and never
//! shifts a later page by one as an offset would.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::convert::timestamp_from_ms;
use crate::error::{Error, Violations};
use crate::feedback::history::{self, DEFAULT_TREND_WINDOW, MAX_TREND_WINDOW};
use crate::feedback::{CustomerKey, FeedbackLog};
use crate::grpc::paging::{filters_fingerprint, size_or_default};
use crate::grpc::validate;
use crate::pb;

use super::validation::email_filter;

const DEFAULT_PAGE_SIZE: usize = 20;
const MAX_PAGE_SIZE: usize = 1000;

/// A checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRequest {
    pub customer: CustomerKey,
    pub page_size: usize,
    pub trend_window: usize,
    /// The keyset position of the previous page's last response.
    pub after: Option<(i64, String)>,
}

/// What a page token is bound to: a token is valid only for the same customer, page size and
/// trend window.
fn fingerprint(customer: &CustomerKey, page_size: usize, trend_window: usize) -> u64 {
    let customer = match customer {
        // Emails match case-insensitively, so their tokens do too.
        CustomerKey::Email(email) => format!("email={}", email.to_lowercase()),
        CustomerKey::RetentlyId(id) => format!("customer={id}"),
    };
    filters_fingerprint(&format!(
        "history;{customer};size={page_size};window={trend_window}"
    ))
}

fn encode_token(fingerprint: u64, (time_ms, feedback_id): &(i64, String)) -> String {
    URL_SAFE_NO_PAD.encode(format!("h1:{fingerprint:016x}:{time_ms}:{feedback_id}"))
}

/// `Some(position)` for a well-formed token; the fingerprint is checked by the caller.
fn decode_token(token: &str) -> Option<(u64, (i64, String))> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
    // The id is last, so nothing it contains can shift the other parts.
    let mut parts = text.splitn(4, ':');
    if parts.next()? != "h1" {
        return None;
    }
    let fingerprint = u64::from_str_radix(parts.next()?, 16).ok()?;
    let time_ms = parts.next()?.parse().ok()?;
    let feedback_id = parts.next()?;
    (!feedback_id.is_empty()).then(|| (fingerprint, (time_ms, feedback_id.to_owned())))
}

/// Checks a request, recording every problem with its field path.
pub fn validate(request: &pb::GetCustomerFeedbackHistoryRequest) -> Result<HistoryRequest, Error> {
    let mut v = Violations::new();
    let customer = match (
        request.email.is_empty(),
        request.retently_customer_id.is_empty(),
    ) {
        (true, true) => {
            v.add("email", "either email or retently_customer_id is required");
            None
        }
        (false, false) => {
            v.add(
                "retently_customer_id",
                "must be empty when email is set (name the customer once)",
            );
            None
        }
        (false, true) => {
            email_filter(&mut v, "email", &request.email);
            Some(CustomerKey::Email(request.email.clone()))
        }
        (true, false) => validate::retently_id_filter(
            &mut v,
            "retently_customer_id",
            &request.retently_customer_id,
        )
        .then(|| CustomerKey::RetentlyId(request.retently_customer_id.clone())),
    };
    let page_size = size_or_default(
        &mut v,
        "page_size",
        request.page_size,
        DEFAULT_PAGE_SIZE,
        MAX_PAGE_SIZE,
    );
    let trend_window = size_or_default(
        &mut v,
        "trend_window",
        request.trend_window,
        DEFAULT_TREND_WINDOW,
        MAX_TREND_WINDOW,
    );
    let mut after = None;
    if !request.page_token.is_empty() {
        match decode_token(&request.page_token) {
            None => v.add("page_token", "is not a token this list issued"),
            Some((token_fingerprint, position)) => {
                if let Some(customer) = &customer
                    && token_fingerprint != fingerprint(customer, page_size, trend_window)
                {
                    v.add(
                        "page_token",
                        "was issued for another customer, page_size or trend_window",
                    );
                }
                after = Some(position);
            }
        }
    }
    v.into_result()?;
    let Some(customer) = customer else {
        return Err(Error::internal("no customer after validation"));
    };
    Ok(HistoryRequest {
        customer,
        page_size,
        trend_window,
        after,
    })
}

/// Answers a checked request from the log.
pub async fn answer(
    log: &FeedbackLog,
    request: HistoryRequest,
) -> Result<pb::GetCustomerFeedbackHistoryResponse, Error> {
    let token_fingerprint = fingerprint(&request.customer, request.page_size, request.trend_window);
    // Coverage first: a response appended between the two reads is then in the answer while
    // the answer claims no more than the coverage read before it.
    let covered = log.covered_range().await?;
    let responses = log.customer_responses(request.customer).await?;
    let summaries = history::summarize(&responses, request.trend_window);
    let start = match &request.after {
        None => 0,
        // Newest first: the page starts at the first response ordered after the position.
        Some(after) => responses.partition_point(|feedback| history::position(feedback) >= *after),
    };
    let page: Vec<pb::Feedback> = responses
        .iter()
        .skip(start)
        .take(request.page_size)
        .cloned()
        .collect();
    let more = start + page.len() < responses.len();
    let next_page_token = match page.last() {
        Some(last) if more => encode_token(token_fingerprint, &history::position(last)),
        _ => String::new(),
    };
    Ok(pb::GetCustomerFeedbackHistoryResponse {
        feedback: page,
        next_page_token,
        total_size: i64::try_from(responses.len()).unwrap_or(i64::MAX),
        summaries,
        synced_until: covered.map(|range| timestamp_from_ms(range.to_ms)),
        covered_since: covered.map(|range| timestamp_from_ms(range.from_ms)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(email: &str, customer: &str, token: &str) -> pb::GetCustomerFeedbackHistoryRequest {
        pb::GetCustomerFeedbackHistoryRequest {
            email: email.into(),
            retently_customer_id: customer.into(),
            page_token: token.into(),
            ..Default::default()
        }
    }

    fn fields(error: Error) -> Vec<String> {
        error.violations().iter().map(|v| v.field.clone()).collect()
    }

    #[test]
    fn exactly_one_customer_key_is_required() {
        assert_eq!(
            fields(validate(&request("", "", "")).unwrap_err()),
            ["email"]
        );
        assert_eq!(
            fields(
                validate(&request("a@example.com", "5f1e2d3c4b5a697887766554", "")).unwrap_err()
            ),
            ["retently_customer_id"]
        );
        assert_eq!(
            fields(validate(&request("", "not an id!", "")).unwrap_err()),
            ["retently_customer_id"]
        );
        let ok = validate(&request("A@Example.com", "", "")).unwrap();
        assert_eq!(ok.customer, CustomerKey::Email("A@Example.com".into()));
        assert_eq!((ok.page_size, ok.trend_window), (20, 5));
    }

    #[test]
    fn tokens_are_opaque_and_bound_to_the_request() {
        let customer = CustomerKey::Email("a@example.com".into());
        let token = encode_token(
            fingerprint(&customer, 20, 5),
            &(1_700_000_000_000, "f1".into()),
        );
        // The same customer in other letters keeps the token valid.
        let ok = validate(&request("A@EXAMPLE.COM", "", &token)).unwrap();
        assert_eq!(ok.after, Some((1_700_000_000_000, "f1".into())));
        for bad in [
            validate(&request("b@example.com", "", &token)),
            validate(&request("a@example.com", "", "garbage!")),
            validate(&request(
                "a@example.com",
                "",
                &URL_SAFE_NO_PAD.encode("h1:zz:1:f1"),
            )),
            validate(&pb::GetCustomerFeedbackHistoryRequest {
                page_size: 10,
                ..request("a@example.com", "", &token)
            }),
        ] {
            assert_eq!(fields(bad.unwrap_err()), ["page_token"]);
        }
    }

    #[test]
    fn sizes_are_bounded() {
        let error = validate(&pb::GetCustomerFeedbackHistoryRequest {
            page_size: 1001,
            trend_window: -1,
            ..request("a@example.com", "", "")
        })
        .unwrap_err();
        assert_eq!(fields(error), ["page_size", "trend_window"]);
    }
}
