//! Page tokens of the lists that Retently pages itself (feedback, sent surveys).
//!
//! A token names the upstream page to read next, the page size fixed by the first call, the end
//! of the time range (the caller's, or the instant of the first call, pinned so that records
//! created later do not shift later pages), when it was issued (tokens last 24 hours), and a
//! fingerprint of the filters: a token used with other filters is refused rather than answered
//! with a page of another list.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::Violations;
use crate::grpc::paging::{filters_fingerprint, size_or_default};
use crate::upstream::retently::MAX_PAGE_SIZE;

/// How long a token may be used, as the contract promises.
const TOKEN_LIFETIME_SECS: i64 = 24 * 60 * 60;
/// Retently's default page size, which the contract adopts.
const DEFAULT_PAGE_SIZE: u32 = 20;

/// Where a list call reads: upstream page `page` (1-based) of `size` records, created before
/// `end_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub page: u32,
    pub size: u32,
    /// End of the time range (exclusive) in UNIX milliseconds.
    pub end_ms: i64,
}

impl Cursor {
    /// The upstream's inclusive `endDate` for this exclusive end: one millisecond earlier, at
    /// the precision of the upstream's timestamps.
    pub fn inclusive_end_ms(&self) -> i64 {
        self.end_ms.saturating_sub(1)
    }
}

/// Resolves a list request's page: the first page (size from `page_size`, end from `end_ms` or
/// pinned to `now_ms`, keeping what exists at that instant), or the page a token names. Problems
/// are recorded in `v`.
pub fn resolve(
    v: &mut Violations,
    page_size: i32,
    page_token: &str,
    filters: &str,
    end_ms: Option<i64>,
    now_ms: i64,
) -> Cursor {
    let size = size_or_default(v, "page_size", page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
    let first = Cursor {
        page: 1,
        size,
        end_ms: end_ms.unwrap_or(now_ms.saturating_add(1)),
    };
    if page_token.is_empty() {
        return first;
    }
    let Some(token) = decode(page_token) else {
        v.add("page_token", "is not a token this list issued");
        return first;
    };
    if token.fingerprint != filters_fingerprint(filters) {
        v.add("page_token", "was issued for other filters");
        return first;
    }
    // Saturating: a token carries any number a caller put there.
    if now_ms.div_euclid(1000).saturating_sub(token.issued_secs) > TOKEN_LIFETIME_SECS {
        v.add(
            "page_token",
            "has expired (tokens last 24 hours); start again from the first page",
        );
        return first;
    }
    // The first call fixed the size: later calls follow the token, whatever `page_size` says.
    token.cursor
}

/// The token for the page after `cursor`, or empty when `more` is false.
pub fn next_token(cursor: Cursor, more: bool, filters: &str, now_ms: i64) -> String {
    if !more {
        return String::new();
    }
    URL_SAFE_NO_PAD.encode(format!(
        "u1:{}:{}:{}:{}:{:016x}",
        cursor.page.saturating_add(1),
        cursor.size,
        cursor.end_ms,
        now_ms.div_euclid(1000),
        filters_fingerprint(filters)
    ))
}

struct Token {
    cursor: Cursor,
    issued_secs: i64,
    fingerprint: u64,
}

fn decode(token: &str) -> Option<Token> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.split(':');
    if parts.next()? != "u1" {
        return None;
    }
    let page: u32 = parts.next()?.parse().ok()?;
    let size: u32 = parts.next()?.parse().ok()?;
    let end_ms = parts.next()?.parse().ok()?;
    let issued_secs = parts.next()?.parse().ok()?;
    let fingerprint = u64::from_str_radix(parts.next()?, 16).ok()?;
    let valid = parts.next().is_none() && page >= 1 && (1..=MAX_PAGE_SIZE).contains(&size);
    valid.then_some(Token {
        cursor: Cursor { page, size, end_ms },
        issued_secs,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_700_000_000_500;

    #[test]
    fn the_first_page_pins_the_end_and_tokens_carry_it_with_the_size() {
        let mut v = Violations::new();
        let first = resolve(&mut v, 0, "", "f", None, NOW_MS);
        assert_eq!(
            first,
            Cursor {
                page: 1,
                size: 20,
                end_ms: NOW_MS + 1
            }
        );
        assert_eq!(first.inclusive_end_ms(), NOW_MS);
        let token = next_token(first, true, "f", NOW_MS);
        // A later call with another page_size still reads the token's size and end.
        let second = resolve(&mut v, 500, &token, "f", None, NOW_MS + 60_000);
        assert!(v.is_empty());
        assert_eq!(
            second,
            Cursor {
                page: 2,
                size: 20,
                end_ms: NOW_MS + 1
            }
        );
        assert!(next_token(second, false, "f", NOW_MS).is_empty());
    }

    #[test]
    fn a_given_end_is_kept() {
        let mut v = Violations::new();
        let first = resolve(&mut v, 5, "", "f", Some(1_600_000_000_000), NOW_MS);
        assert_eq!(first.end_ms, 1_600_000_000_000);
        assert_eq!(first.size, 5);
    }

    #[test]
    fn foreign_expired_and_malformed_tokens_are_refused() {
        let token = next_token(
            Cursor {
                page: 1,
                size: 10,
                end_ms: 5,
            },
            true,
            "f",
            NOW_MS,
        );
        let day_later = NOW_MS + (TOKEN_LIFETIME_SECS + 1) * 1000;
        for (page_size, token, filters, now) in [
            (0, token.as_str(), "g", NOW_MS),
            (0, token.as_str(), "f", day_later),
            (0, "bm90IGEgdG9rZW4", "f", NOW_MS),
            (0, "%%%", "f", NOW_MS),
            (1001, "", "f", NOW_MS),
            (-1, "", "f", NOW_MS),
        ] {
            let mut v = Violations::new();
            resolve(&mut v, page_size, token, filters, None, now);
            assert!(!v.is_empty(), "{token} {filters} {now}");
        }
    }

    #[test]
    fn a_token_issued_at_the_start_of_time_has_expired() {
        // Found by the `tokens` fuzz target: the age of this token overflowed.
        let fingerprint = filters_fingerprint("f");
        let token = URL_SAFE_NO_PAD.encode(format!("u1:2:20:0:{}:{fingerprint:016x}", i64::MIN));
        let mut v = Violations::new();
        let cursor = resolve(&mut v, 0, &token, "f", None, NOW_MS);
        assert_eq!(cursor.page, 1);
        assert_eq!(v.len(), 1);
    }
}
