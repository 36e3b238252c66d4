//! Timestamps as Retently writes them and as its `startDate`/`endDate` filters read them.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};

/// ISO 8601 in UTC with milliseconds and `Z`, as in every Retently example
/// (`2019-07-28T04:33:13.217Z`).
pub(crate) fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A `startDate`/`endDate` value: integer UNIX seconds or ISO 8601 (with a zone, or a bare date,
/// or a zone-less date-time read as UTC, the sandbox's local time).
pub(crate) fn parse_filter_date(raw: &str) -> Option<DateTime<Utc>> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    if raw.bytes().all(|b| b.is_ascii_digit()) || (raw.starts_with('-') && raw.len() > 1) {
        let seconds: i64 = raw.parse().ok()?;
        return Utc.timestamp_opt(seconds, 0).single();
    }
    parse_iso(raw)
}

/// ISO 8601 with a zone, a zone-less date-time (UTC) or a bare `YYYY-MM-DD` (UTC midnight).
pub(crate) fn parse_iso(raw: &str) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(raw) {
        return Some(at.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(raw, format) {
            return Some(naive.and_utc());
        }
    }
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|naive| naive.and_utc())
}

/// A customer property of type `date`: everything [`parse_iso`] reads plus the two slash forms
/// the help centre lists (`MM/DD/YYYY`, `YYYY/MM/DD`), all zone-less forms in UTC.
pub(crate) fn parse_property_date(raw: &str) -> Option<DateTime<Utc>> {
    let raw = raw.trim();
    parse_iso(raw).or_else(|| {
        ["%m/%d/%Y", "%Y/%m/%d"].iter().find_map(|format| {
            NaiveDate::parse_from_str(raw, format)
                .ok()
                .and_then(|date| date.and_hms_opt(0, 0, 0))
                .map(|naive| naive.and_utc())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_dates_accept_unix_seconds_and_iso() {
        let unix = parse_filter_date("1514764800").unwrap();
        assert_eq!(iso(unix), "2018-01-01T00:00:00.000Z");
        let zoned = parse_filter_date("2022-01-01T02:00:00+02:00").unwrap();
        assert_eq!(iso(zoned), "2022-01-01T00:00:00.000Z");
        let date = parse_filter_date("2022-01-01").unwrap();
        assert_eq!(iso(date), "2022-01-01T00:00:00.000Z");
        assert!(parse_filter_date("yesterday").is_none());
        assert!(parse_filter_date("").is_none());
        assert!(parse_filter_date("2022-13-01").is_none());
    }

    #[test]
    fn property_dates_accept_the_slash_forms() {
        assert_eq!(
            iso(parse_property_date("06/22/2019").unwrap()),
            "2019-06-22T00:00:00.000Z"
        );
        assert_eq!(
            iso(parse_property_date("2019/06/22").unwrap()),
            "2019-06-22T00:00:00.000Z"
        );
    }
}
