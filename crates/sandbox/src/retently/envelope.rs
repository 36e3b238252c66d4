//! Retently's `{message, code, data}` envelope, its errors, and the shared list parameters
//! (page, limit, sort, startDate, endDate).

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::time::parse_filter_date;

/// The documented default page size.
pub(crate) const DEFAULT_LIMIT: usize = 20;
/// The documented maximum page size; larger values are clamped.
pub(crate) const MAX_LIMIT: usize = 1000;

/// An error answered in the envelope with `data: null`.
#[derive(Debug)]
pub(crate) struct RetentlyError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl RetentlyError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        RetentlyError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// The documented 401 body.
    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "Please check your API Key to make sure it's valid.",
        )
    }

    pub(crate) fn too_many_requests(retry_after_secs: u64) -> Self {
        RetentlyError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "Too many requests.".to_owned(),
            retry_after: Some(retry_after_secs),
        }
    }
}

impl IntoResponse for RetentlyError {
    fn into_response(self) -> Response {
        let body = Envelope {
            message: self.message,
            code: self.status.as_u16(),
            data: Value::Null,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The envelope as a struct so that its keys keep the documented order (`message`, `code`,
/// `data`); serde_json's maps would sort them.
#[derive(Debug, Serialize)]
pub(crate) struct Envelope {
    pub message: String,
    pub code: u16,
    pub data: Value,
}

/// `{"message":"Success.","code":200,"data":…}`.
pub(crate) fn success(data: Value) -> Json<Envelope> {
    success_with("Success.", data)
}

pub(crate) fn success_with(message: &str, data: Value) -> Json<Envelope> {
    Json(Envelope {
        message: message.to_owned(),
        code: 200,
        data,
    })
}

/// The query string as a map (a repeated name keeps its last value).
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    pub(crate) fn from_uri(uri: &Uri) -> Result<Params, RetentlyError> {
        let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|_| RetentlyError::bad_request("The query string is malformed."))?;
        Ok(Params(pairs.0.into_iter().collect()))
    }

    /// A non-empty value of `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
    }

    fn positive(&self, name: &str, default: usize) -> Result<usize, RetentlyError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => match raw.parse::<usize>() {
                Ok(value) if value >= 1 => Ok(value),
                _ => Err(RetentlyError::bad_request(format!(
                    "The {name} must be an integer of at least 1."
                ))),
            },
        }
    }

    /// `startDate` and `endDate`, both inclusive.
    pub(crate) fn date_range(&self) -> Result<DateRange, RetentlyError> {
        let parse = |name: &str| -> Result<Option<DateTime<Utc>>, RetentlyError> {
            match self.get(name) {
                None => Ok(None),
                Some(raw) => parse_filter_date(raw).map(Some).ok_or_else(|| {
                    RetentlyError::bad_request(format!(
                        "The {name} must be an ISO 8601 date or a UNIX timestamp."
                    ))
                }),
            }
        };
        let range = DateRange {
            start: parse("startDate")?,
            end: parse("endDate")?,
        };
        if let (Some(start), Some(end)) = (range.start, range.end)
            && start > end
        {
            return Err(RetentlyError::bad_request(
                "The endDate must be a date after or equal to startDate.",
            ));
        }
        Ok(range)
    }

    /// `page`, `limit` and `sort` of a list endpoint. `sorts` are the accepted field names.
    ///
    /// Attribute filters (`attributes[]`, `match`) are refused rather than ignored: their
    /// operator vocabulary is unpublished, and silently returning unfiltered records would let a
    /// client's test pass for the wrong reason.
    pub(crate) fn paging(
        &self,
        default_sort: &str,
        sorts: &[&str],
    ) -> Result<Paging, RetentlyError> {
        if self.0.keys().any(|name| name.starts_with("attributes")) {
            return Err(RetentlyError::bad_request(
                "The sandbox does not emulate attributes filters.",
            ));
        }
        let page = self.positive("page", 1)?;
        let limit = self.positive("limit", DEFAULT_LIMIT)?.min(MAX_LIMIT);
        let sort = self.get("sort").unwrap_or(default_sort);
        let (descending, field) = match sort.strip_prefix('-') {
            Some(field) => (true, field),
            None => (false, sort.strip_prefix('+').unwrap_or(sort)),
        };
        if !sorts.contains(&field) {
            return Err(RetentlyError::bad_request(format!(
                "The sort field must be one of: {}.",
                sorts.join(", ")
            )));
        }
        Ok(Paging {
            page,
            limit,
            field: field.to_owned(),
            descending,
        })
    }
}

/// The primary sort value of a record: one variant per field kind, so dates and numbers sort by
/// value rather than by text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SortValue {
    Time(DateTime<Utc>),
    Int(i64),
    Text(String),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct DateRange {
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
}

impl DateRange {
    pub(crate) fn contains(&self, at: DateTime<Utc>) -> bool {
        self.start.is_none_or(|start| at >= start) && self.end.is_none_or(|end| at <= end)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Paging {
    pub page: usize,
    pub limit: usize,
    pub field: String,
    pub descending: bool,
}

impl Paging {
    pub(crate) fn sort_text(&self) -> String {
        if self.descending {
            format!("-{}", self.field)
        } else {
            self.field.clone()
        }
    }

    /// Sorts `items` by `key` in the requested direction, cuts out the requested page and builds
    /// `data`: `{<records>: […], page, pages, limit, sort, total}`. Keys end with the record id,
    /// so they are unique and a reversed ascending order is the exact descending order: pages
    /// never overlap or skip.
    pub(crate) fn page<T, K: Ord>(
        &self,
        records: &str,
        mut items: Vec<T>,
        key: impl Fn(&T) -> K,
        render: impl Fn(&T) -> Value,
    ) -> Value {
        // One key per item rather than two per comparison.
        items.sort_by_cached_key(|item| key(item));
        if self.descending {
            items.reverse();
        }
        let total = items.len();
        let pages = total.div_ceil(self.limit);
        let start = (self.page - 1).saturating_mul(self.limit);
        let rendered: Vec<Value> = items
            .iter()
            .skip(start)
            .take(self.limit)
            .map(render)
            .collect();
        let mut data = Map::new();
        data.insert(records.to_owned(), Value::Array(rendered));
        data.insert("page".to_owned(), json!(self.page));
        data.insert("pages".to_owned(), json!(pages));
        data.insert("limit".to_owned(), json!(self.limit));
        data.insert("sort".to_owned(), json!(self.sort_text()));
        data.insert("total".to_owned(), json!(total));
        Value::Object(data)
    }
}

/// The JSON body, or a 400 naming the syntax error.
pub(crate) fn parse_body(body: &Bytes) -> Result<Map<String, Value>, RetentlyError> {
    let value: Value = serde_json::from_slice(body).map_err(|error| {
        RetentlyError::bad_request(format!("The request body is not valid JSON: {error}."))
    })?;
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(RetentlyError::bad_request(
            "The request body must be a JSON object.",
        )),
    }
}

/// A field that must be an array of objects.
pub(crate) fn object_list<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Vec<&'a Map<String, Value>>, RetentlyError> {
    let items = match body.get(field) {
        None | Some(Value::Null) => {
            return Err(RetentlyError::bad_request(format!(
                "The {field} field is required."
            )));
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(RetentlyError::bad_request(format!(
                "The {field} must be an array."
            )));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            item.as_object().ok_or_else(|| {
                RetentlyError::bad_request(format!("The {field}.{index} must be an object."))
            })
        })
        .collect()
}

/// An optional string field; `null` counts as absent, another type is a 400.
pub(crate) fn optional_string(
    object: &Map<String, Value>,
    names: &[&str],
    path: &str,
) -> Result<Option<String>, RetentlyError> {
    for name in names {
        match object.get(*name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(text)) => return Ok(Some(text.trim().to_owned())),
            Some(_) => {
                return Err(RetentlyError::bad_request(format!(
                    "The {path}{name} must be a string."
                )));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str) -> Params {
        Params::from_uri(&format!("/x?{query}").parse::<Uri>().unwrap()).unwrap()
    }

    #[test]
    fn paging_defaults_clamps_and_rejects() {
        let paging = params("").paging("-createdDate", &["createdDate"]).unwrap();
        assert_eq!((paging.page, paging.limit), (1, DEFAULT_LIMIT));
        assert_eq!(paging.sort_text(), "-createdDate");
        let paging = params("limit=5000&page=3&sort=createdDate")
            .paging("-createdDate", &["createdDate"])
            .unwrap();
        assert_eq!((paging.page, paging.limit), (3, MAX_LIMIT));
        assert!(!paging.descending);
        for bad in ["limit=0", "page=0", "page=x", "limit=-1", "sort=-nope"] {
            assert!(
                params(bad)
                    .paging("-createdDate", &["createdDate"])
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn pages_are_cut_and_counted() {
        let paging = params("limit=2&page=2&sort=x").paging("x", &["x"]).unwrap();
        let data = paging.page("items", vec![5, 1, 4, 2, 3], |n| *n, |n| json!(n));
        assert_eq!(data["items"], json!([3, 4]));
        assert_eq!(data["pages"], 3);
        assert_eq!(data["total"], 5);
        let empty = paging.page("items", Vec::<i32>::new(), |n| *n, |n| json!(n));
        assert_eq!(empty["pages"], 0);
        assert_eq!(empty["items"], json!([]));
    }
}
