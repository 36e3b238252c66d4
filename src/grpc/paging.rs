//! Page sizes and opaque page tokens, validated the same way by every list RPC.
//!
//! A token carries the position to continue after, the page size it was issued for, and a
//! fingerprint of the request's filters: a token reused with other filters or another page size
//! is refused (AIP-158) instead of returning a silently inconsistent page.
//!
//! Lists over data that grows while a caller pages (customers, feedback) pin the end of their
//! time range on the first page ([`pinned_page_request`]); the pinned instant travels in the
//! token, so every later page asks the upstream for the same range.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::{Error, Violations};

/// What a decoded token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagePosition {
    /// Where the next page starts (its meaning belongs to the list: a sequence, a page number).
    pub after: i64,
}

/// A size field (a page size, a window) where 0 means `default` and `max` is the most allowed;
/// a size out of range is recorded against `field` and answered with `default`, so checking
/// goes on with a usable value.
pub fn size_or_default<T>(
    violations: &mut Violations,
    field: &str,
    value: i32,
    default: T,
    max: T,
) -> T
where
    T: TryFrom<i32> + PartialOrd + std::fmt::Display + Copy,
{
    if value == 0 {
        return default;
    }
    match T::try_from(value) {
        Ok(size) if size <= max => size,
        _ => {
            violations.add(field, format!("must be between 0 and {max}"));
            default
        }
    }
}

/// Resolves `page_size` (0 means `default`) and decodes `page_token`, recording violations.
pub fn page_request(
    violations: &mut Violations,
    page_size: i32,
    page_token: &str,
    default: usize,
    max: usize,
    filters: &str,
) -> (usize, PagePosition) {
    let size = size_or_default(violations, "page_size", page_size, default, max);
    if page_token.is_empty() {
        return (size, PagePosition { after: 0 });
    }
    match checked(violations, page_token, size, filters) {
        Some((after, None)) => (size, PagePosition { after }),
        Some((_, Some(_))) => {
            violations.add("page_token", "is not a token this list issued");
            (size, PagePosition { after: 0 })
        }
        None => (size, PagePosition { after: 0 }),
    }
}

/// The default and the largest page size of the lists that take the common sizes.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// The page a list with the common sizes asks for, after its own checks (recorded in
/// `violations`); every violation found is answered at once.
pub fn checked_page(
    mut violations: Violations,
    page_size: i32,
    page_token: &str,
    filters: &str,
) -> Result<(usize, PagePosition), Error> {
    let page = page_request(
        &mut violations,
        page_size,
        page_token,
        DEFAULT_PAGE_SIZE,
        MAX_PAGE_SIZE,
        filters,
    );
    violations.into_result()?;
    Ok(page)
}

/// Like [`page_request`], for a list whose time range ends at an instant pinned by the first
/// page: returns the instant the token carries, or `now` on the first page.
pub fn pinned_page_request(
    violations: &mut Violations,
    page_size: i32,
    page_token: &str,
    (default, max): (usize, usize),
    filters: &str,
    now: i64,
) -> (usize, PagePosition, i64) {
    let (size, _) = page_request(violations, page_size, "", default, max, filters);
    if page_token.is_empty() {
        return (size, PagePosition { after: 0 }, now);
    }
    match checked(violations, page_token, size, filters) {
        Some((after, Some(pinned))) => (size, PagePosition { after }, pinned),
        Some((_, None)) => {
            violations.add("page_token", "is not a token this list issued");
            (size, PagePosition { after: 0 }, now)
        }
        None => (size, PagePosition { after: 0 }, now),
    }
}

/// The token for the page after `after` of a list pinned at `pinned`, or empty when there is
/// none.
pub fn next_pinned_page_token(
    after: Option<i64>,
    size: usize,
    filters: &str,
    pinned: i64,
) -> String {
    match after {
        None => String::new(),
        Some(after) => URL_SAFE_NO_PAD.encode(format!(
            "v1:{after}:{size}:{:016x}:{pinned}",
            filters_fingerprint(filters)
        )),
    }
}

/// Decodes a token and checks it against the request, recording a violation when it does not
/// fit; returns its position and pinned instant.
fn checked(
    violations: &mut Violations,
    page_token: &str,
    size: usize,
    filters: &str,
) -> Option<(i64, Option<i64>)> {
    match decode(page_token) {
        Some((after, token_size, fingerprint, pinned))
            if token_size == size && fingerprint == filters_fingerprint(filters) =>
        {
            Some((after, pinned))
        }
        Some(_) => {
            violations.add(
                "page_token",
                "was issued for other filters or another page_size",
            );
            None
        }
        None => {
            violations.add("page_token", "is not a token this list issued");
            None
        }
    }
}

/// The token for the page after `after`, or empty when there is none.
pub fn next_page_token(after: Option<i64>, size: usize, filters: &str) -> String {
    match after {
        None => String::new(),
        Some(after) => URL_SAFE_NO_PAD.encode(format!(
            "v1:{after}:{size}:{:016x}",
            filters_fingerprint(filters)
        )),
    }
}

fn decode(token: &str) -> Option<(i64, usize, u64, Option<i64>)> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.split(':');
    if parts.next()? != "v1" {
        return None;
    }
    let after = parts.next()?.parse().ok()?;
    let size = parts.next()?.parse().ok()?;
    let fingerprint = u64::from_str_radix(parts.next()?, 16).ok()?;
    let pinned = match parts.next() {
        None => None,
        Some(pinned) => Some(pinned.parse().ok()?),
    };
    parts
        .next()
        .is_none()
        .then_some((after, size, fingerprint, pinned))
}

/// FNV-1a: stable across builds and platforms (unlike `DefaultHasher`), and only needs to tell
/// different filter sets apart, not resist an adversary.
pub(crate) fn filters_fingerprint(filters: &str) -> u64 {
    filters.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_default_at_zero_and_refuse_what_is_out_of_range() {
        let refused: &[&str] = &["trend_window"];
        let cases: [(i32, u32, &[&str]); 5] = [
            (0, 20, &[]),
            (1, 1, &[]),
            (50, 50, &[]),
            (51, 20, refused),
            (-1, 20, refused),
        ];
        for (value, expected, fields) in cases {
            let mut violations = Violations::new();
            let size = size_or_default(&mut violations, "trend_window", value, 20, 50);
            assert_eq!(size, expected, "{value}");
            let violated = crate::grpc::validate::violated_fields(violations.into_result());
            assert_eq!(violated, fields, "{value}");
        }
    }

    #[test]
    fn tokens_round_trip_and_bind_size_and_filters() {
        let token = next_page_token(Some(42), 10, "method=a");
        let mut violations = Violations::new();
        let (size, position) = page_request(&mut violations, 10, &token, 100, 1000, "method=a");
        assert!(violations.is_empty());
        assert_eq!((size, position.after), (10, 42));

        for (page_size, filters) in [(20, "method=a"), (10, "method=b")] {
            let mut violations = Violations::new();
            page_request(&mut violations, page_size, &token, 100, 1000, filters);
            let error = violations.into_result().unwrap_err();
            assert_eq!(error.violations()[0].field, "page_token");
        }
    }

    #[test]
    fn pinned_tokens_carry_their_instant_and_are_not_plain_tokens() {
        let mut violations = Violations::new();
        let (size, position, pinned) =
            pinned_page_request(&mut violations, 0, "", (20, 1000), "f", 1_700_000_000);
        assert_eq!((size, position.after, pinned), (20, 0, 1_700_000_000));
        let token = next_pinned_page_token(Some(2), size, "f", pinned);
        let (_, position, pinned) =
            pinned_page_request(&mut violations, 0, &token, (20, 1000), "f", 1_800_000_000);
        assert!(violations.is_empty());
        assert_eq!((position.after, pinned), (2, 1_700_000_000));

        // Each kind of list refuses the other's tokens.
        let plain = next_page_token(Some(2), 20, "f");
        pinned_page_request(&mut violations, 0, &plain, (20, 1000), "f", 0);
        page_request(&mut violations, 0, &token, 20, 1000, "f");
        pinned_page_request(&mut violations, 0, &token, (20, 1000), "g", 0);
        let error = violations.into_result().unwrap_err();
        assert_eq!(error.violations().len(), 3);
        assert!(error.violations().iter().all(|v| v.field == "page_token"));
    }

    #[test]
    fn sizes_default_and_are_bounded() {
        let mut violations = Violations::new();
        assert_eq!(page_request(&mut violations, 0, "", 100, 1000, "").0, 100);
        page_request(&mut violations, 1001, "", 100, 1000, "");
        page_request(&mut violations, -1, "", 100, 1000, "");
        page_request(&mut violations, 5, "garbage!", 100, 1000, "");
        let error = violations.into_result().unwrap_err();
        let fields: Vec<&str> = error
            .violations()
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["page_size", "page_size", "page_token"]);
        assert!(next_page_token(None, 10, "").is_empty());
    }
}
