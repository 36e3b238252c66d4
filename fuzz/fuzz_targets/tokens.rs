//! Cursors and page tokens, which callers hand back to the gateway: FeedbackStream cursors,
//! list page tokens (plain and pinned to an instant), the sent-survey and feedback list cursors,
//! and FeedbackStream subscription requests.
//!
//! Input: `kind | page_size (4 bytes) | filters 0x00 token`. Odd kinds take the token as it
//! is; even kinds base64url-encode it first, so the fuzzer explores the decoded layout
//! directly instead of having to find valid base64.
//!
//! Checked besides "no panic": sizes stay within their bounds whatever a token says, and a
//! token the gateway issues for the next page is accepted and leads there.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cx_gateway::error::Violations;
use cx_gateway::feedback::cursor::Cursor;
use cx_gateway::grpc::surveys::cursor as list_cursor;
use cx_gateway::grpc::{feedback, paging};
use cx_gateway::pb;
use cx_gateway::upstream::retently::MAX_PAGE_SIZE;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// 2024-01-01 in UNIX milliseconds.
const NOW_MS: i64 = 1_704_067_200_000;
const DEFAULT_SIZE: usize = 20;
const MAX_SIZE: usize = 1000;

fuzz_target!(|data: &[u8]| {
    let [kind, s0, s1, s2, s3, rest @ ..] = data else {
        return;
    };
    let page_size = i32::from_be_bytes([*s0, *s1, *s2, *s3]);
    let (filters, raw) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (&rest[..0], rest),
    };
    let filters = String::from_utf8_lossy(filters);
    let token = if kind % 2 == 0 {
        URL_SAFE_NO_PAD.encode(raw)
    } else {
        String::from_utf8_lossy(raw).into_owned()
    };
    match (kind / 2) % 5 {
        0 => stream_cursor(&token),
        1 => page(page_size, &token, &filters),
        2 => pinned_page(page_size, &token, &filters),
        3 => list(page_size, &token, &filters),
        4 => {
            if let Ok(request) = pb::SubscribeRequest::decode(raw) {
                let _ = std::hint::black_box(feedback::validate(request));
            }
        }
        _ => unreachable!(),
    }
});

fn stream_cursor(token: &str) {
    if let Ok(cursor) = Cursor::decode(token) {
        assert!(cursor.sequence >= 0, "a cursor before the start of the log");
        assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
    }
}

fn page(page_size: i32, token: &str, filters: &str) {
    let mut v = Violations::new();
    let (size, position) =
        paging::page_request(&mut v, page_size, token, DEFAULT_SIZE, MAX_SIZE, filters);
    assert!(
        (1..=MAX_SIZE).contains(&size),
        "page size {size} out of bounds"
    );
    if v.is_empty() {
        let next = paging::next_page_token(Some(position.after), size, filters);
        let mut v = Violations::new();
        let (again, reread) =
            paging::page_request(&mut v, page_size, &next, DEFAULT_SIZE, MAX_SIZE, filters);
        assert!(v.is_empty(), "an issued page token was refused");
        assert_eq!((again, reread), (size, position));
    }
}

fn pinned_page(page_size: i32, token: &str, filters: &str) {
    let mut v = Violations::new();
    let (size, position, pinned) = paging::pinned_page_request(
        &mut v,
        page_size,
        token,
        (DEFAULT_SIZE, MAX_SIZE),
        filters,
        NOW_MS,
    );
    assert!(
        (1..=MAX_SIZE).contains(&size),
        "page size {size} out of bounds"
    );
    if v.is_empty() {
        let next = paging::next_pinned_page_token(Some(position.after), size, filters, pinned);
        let mut v = Violations::new();
        let again = paging::pinned_page_request(
            &mut v,
            page_size,
            &next,
            (DEFAULT_SIZE, MAX_SIZE),
            filters,
            NOW_MS,
        );
        assert!(v.is_empty(), "an issued pinned token was refused");
        assert_eq!(again, (size, position, pinned));
    }
}

fn list(page_size: i32, token: &str, filters: &str) {
    let mut v = Violations::new();
    let cursor = list_cursor::resolve(&mut v, page_size, token, filters, None, NOW_MS);
    assert!(cursor.page >= 1, "page {} before the first", cursor.page);
    assert!(
        (1..=MAX_PAGE_SIZE).contains(&cursor.size),
        "page size {} out of bounds",
        cursor.size
    );
    let _ = std::hint::black_box(cursor.inclusive_end_ms());
    if v.is_empty() {
        let next = list_cursor::next_token(cursor, true, filters, NOW_MS);
        let mut v = Violations::new();
        let again = list_cursor::resolve(&mut v, page_size, &next, filters, None, NOW_MS);
        assert!(v.is_empty(), "an issued list token was refused");
        assert_eq!(again.page, cursor.page.saturating_add(1));
        assert_eq!((again.size, again.end_ms), (cursor.size, cursor.end_ms));
    }
}
