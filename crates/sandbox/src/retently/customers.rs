//! Customers: list, get, create-or-update by email, delete, unsubscribe and resubscribe.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::Uri;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::envelope::{
    Envelope, Params, RetentlyError, SortValue, object_list, optional_string, parse_body, success,
    success_with,
};
use super::model::{Company, Customer, Property, normalize_email, snake_case};
use crate::config::UnknownEmails;
use crate::ids::is_object_id;
use crate::state::{Shared, World};
use crate::time::{iso, parse_property_date};

/// Most subscribers accepted by one `POST /customers`. Upstream documents no cap for the current
/// endpoint (the legacy one had "100 by default"); the sandbox takes the list endpoints' 1,000.
pub(crate) const MAX_UPSERT: usize = 1000;

const SORTS: &[&str] = &[
    "createdDate",
    "updatedDate",
    "email",
    "firstName",
    "lastName",
];

pub(crate) async fn list(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Json<Envelope>, RetentlyError> {
    let params = Params::from_uri(&uri)?;
    let paging = params.paging("-createdDate", SORTS)?;
    let range = params.date_range()?;
    let email = params.get("email").map(normalize_email);
    let world = shared.world();
    let customers: Vec<&Customer> = world
        .retently
        .customers
        .values()
        .filter(|customer| email.as_ref().is_none_or(|email| &customer.email == email))
        .filter(|customer| range.contains(customer.created))
        .collect();
    let data = paging.page(
        "subscribers",
        customers,
        |customer| sort_key(customer, &paging.field),
        |customer| customer.to_json(),
    );
    Ok(success(data))
}

/// Ties (same date) fall back to the id so that pages never overlap.
fn sort_key(customer: &Customer, field: &str) -> (SortValue, String) {
    let primary = match field {
        "updatedDate" => SortValue::Time(customer.updated),
        "email" => SortValue::Text(customer.email.clone()),
        "firstName" => SortValue::Text(customer.first_name.clone().unwrap_or_default()),
        "lastName" => SortValue::Text(customer.last_name.clone().unwrap_or_default()),
        _ => SortValue::Time(customer.created),
    };
    (primary, customer.id.clone())
}

pub(crate) async fn get(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Envelope>, RetentlyError> {
    if !is_object_id(&id) {
        return Err(RetentlyError::bad_request("The customer id is invalid."));
    }
    let world = shared.world();
    let customer = world
        .retently
        .customers
        .get(&id)
        .ok_or_else(|| RetentlyError::not_found("Customer not found."))?;
    // The documented single-customer body reuses the list shape.
    Ok(success(json!({"subscribers": [customer.to_json()]})))
}

pub(crate) async fn upsert(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Envelope>, RetentlyError> {
    let body = parse_body(&body)?;
    let items = object_list(&body, "subscribers")?;
    if items.is_empty() || items.len() > MAX_UPSERT {
        return Err(RetentlyError::bad_request(format!(
            "The subscribers must contain between 1 and {MAX_UPSERT} items."
        )));
    }
    let mut world = shared.world();
    let inputs = items
        .iter()
        .enumerate()
        .map(|(index, item)| CustomerInput::parse(item, &format!("subscribers.{index}."), &world))
        .collect::<Result<Vec<_>, _>>()?;
    let now = Utc::now();
    let mut data = Map::new();
    for input in &inputs {
        let (status, id) = upsert_customer(&mut world, input, now);
        data.insert(
            input.email_as_sent.clone(),
            json!({"status": status, "id": id}),
        );
    }
    Ok(success_with(
        "Subscribers was successfully added",
        Value::Object(data),
    ))
}

/// One subscriber of a `POST /customers` or `POST /survey` body, validated.
#[derive(Debug, Clone)]
pub(crate) struct CustomerInput {
    /// The key of the per-email result: the address exactly as sent.
    pub email_as_sent: String,
    pub email: String,
    first_name: Option<String>,
    last_name: Option<String>,
    company: Option<String>,
    job_title: Option<String>,
    tags: Option<Vec<String>>,
    properties: Vec<PropertyInput>,
}

#[derive(Debug, Clone)]
struct PropertyInput {
    name: String,
    /// `None`: remove the property (value `null`).
    property: Option<Property>,
}

impl CustomerInput {
    /// Validates one subscriber; `path` prefixes field names in messages (`subscribers.3.`).
    pub(crate) fn parse(
        item: &Map<String, Value>,
        path: &str,
        world: &World,
    ) -> Result<CustomerInput, RetentlyError> {
        let email_as_sent = match item.get("email") {
            None | Some(Value::Null) => {
                return Err(RetentlyError::bad_request(format!(
                    "The {path}email field is required."
                )));
            }
            Some(Value::String(email)) => email.clone(),
            Some(_) => {
                return Err(RetentlyError::bad_request(format!(
                    "The {path}email must be a string."
                )));
            }
        };
        let email = normalize_email(&email_as_sent);
        if email.is_empty() {
            return Err(RetentlyError::bad_request(format!(
                "The {path}email field is required."
            )));
        }
        if !is_email(&email) {
            return Err(RetentlyError::bad_request(format!(
                "The {path}email must be a valid email address."
            )));
        }
        let tags = match item.get("tags") {
            None | Some(Value::Null) => None,
            Some(Value::Array(tags)) => Some(
                tags.iter()
                    .enumerate()
                    .map(|(index, tag)| match tag {
                        Value::String(tag) => Ok(tag.trim().to_owned()),
                        _ => Err(RetentlyError::bad_request(format!(
                            "The {path}tags.{index} must be a string."
                        ))),
                    })
                    .filter(|tag| tag.as_ref().map_or(true, |tag| !tag.is_empty()))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            // Segment sends tags as one comma-separated string.
            Some(Value::String(tags)) => Some(
                tags.split(',')
                    .map(str::trim)
                    .filter(|tag| !tag.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            Some(_) => {
                return Err(RetentlyError::bad_request(format!(
                    "The {path}tags must be an array of strings."
                )));
            }
        };
        let existing = world.retently.customer_by_email(&email);
        let properties = match item.get("properties") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(properties)) => properties
                .iter()
                .enumerate()
                .map(|(index, property)| {
                    PropertyInput::parse(property, &format!("{path}properties.{index}."), existing)
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => {
                return Err(RetentlyError::bad_request(format!(
                    "The {path}properties must be an array."
                )));
            }
        };
        Ok(CustomerInput {
            email_as_sent,
            email,
            first_name: optional_string(item, &["firstName", "first_name"], path)?,
            last_name: optional_string(item, &["lastName", "last_name"], path)?,
            company: optional_string(item, &["company", "companyName", "company_name"], path)?,
            job_title: optional_string(item, &["jobTitle", "job_title"], path)?,
            tags,
            properties,
        })
    }
}

impl PropertyInput {
    fn parse(
        raw: &Value,
        path: &str,
        existing: Option<&Customer>,
    ) -> Result<PropertyInput, RetentlyError> {
        let object = raw.as_object().ok_or_else(|| {
            RetentlyError::bad_request(format!(
                "The {} must be an object.",
                path.trim_end_matches('.')
            ))
        })?;
        let label = optional_string(object, &["label"], path)?
            .filter(|label| !label.is_empty())
            .ok_or_else(|| {
                RetentlyError::bad_request(format!("The {path}label field is required."))
            })?;
        let name = snake_case(&label);
        if name.is_empty() {
            return Err(RetentlyError::bad_request(format!(
                "The {path}label must contain a letter or a digit."
            )));
        }
        let requested_kind = optional_string(object, &["type"], path)?;
        let kind = match requested_kind.as_deref().map(str::to_ascii_lowercase) {
            // A type left out keeps the existing property's type; a new property is text.
            None => existing
                .and_then(|customer| customer.properties.iter().find(|p| p.name == name))
                .map(|property| property.kind.clone())
                .unwrap_or_else(|| "text".to_owned()),
            // Requests say `string`, responses say `text`.
            Some(kind) if kind == "string" || kind == "text" => "text".to_owned(),
            Some(kind) if ["date", "integer", "boolean", "collection"].contains(&kind.as_str()) => {
                kind
            }
            Some(_) => {
                return Err(RetentlyError::bad_request(format!(
                    "The {path}type must be one of: string, date, integer, boolean, collection."
                )));
            }
        };
        let text = match object.get("value") {
            None => {
                return Err(RetentlyError::bad_request(format!(
                    "The {path}value field is required."
                )));
            }
            Some(Value::Null) => {
                return Ok(PropertyInput {
                    name,
                    property: None,
                });
            }
            Some(Value::String(text)) => text.trim().to_owned(),
            Some(Value::Number(number)) => number.to_string(),
            Some(Value::Bool(flag)) => flag.to_string(),
            Some(Value::Array(items)) if kind == "collection" => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text.trim().to_owned(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            Some(_) => {
                return Err(RetentlyError::bad_request(format!(
                    "The {path}value must be a string, a number or a boolean."
                )));
            }
        };
        let value = normalize_value(&kind, &text).ok_or_else(|| {
            RetentlyError::bad_request(format!("The {path}value is not a valid {kind}."))
        })?;
        Ok(PropertyInput {
            name: name.clone(),
            property: Some(Property {
                label,
                name,
                kind,
                value,
            }),
        })
    }
}

/// The stored text of a property value, per the help centre's parsing rules.
fn normalize_value(kind: &str, text: &str) -> Option<String> {
    match kind {
        "integer" => text.parse::<i64>().ok().map(|value| value.to_string()),
        "boolean" => match text.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "y" => Some("true".to_owned()),
            "false" | "0" | "no" | "n" => Some("false".to_owned()),
            _ => None,
        },
        "date" => parse_property_date(text).map(iso),
        "collection" => Some(
            text.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => Some(text.to_owned()),
    }
}

fn is_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && !email.chars().any(char::is_whitespace)
}

/// Creates or updates the customer of `input.email`; returns `("created" | "updated", id)`.
/// Fields sent replace stored ones (tags as a whole set); fields not sent are kept; properties
/// merge by name.
pub(crate) fn upsert_customer(
    world: &mut World,
    input: &CustomerInput,
    now: DateTime<Utc>,
) -> (&'static str, String) {
    let company = input
        .company
        .as_ref()
        .map(|name| company_for(world, name, &input.email, now));
    let existing_id = world.retently.by_email.get(&input.email).cloned();
    let (status, id) = match existing_id {
        Some(id) => ("updated", id),
        None => {
            let id = world.ids.next();
            let customer = Customer {
                id: id.clone(),
                email: input.email.clone(),
                first_name: None,
                last_name: None,
                company_name: None,
                company_id: None,
                job_title: None,
                country: None,
                state: None,
                city: None,
                tags: Vec::new(),
                properties: Vec::new(),
                created: now,
                updated: now,
                unsubscribed: false,
                unsubscribe_message: None,
            };
            world
                .retently
                .by_email
                .insert(input.email.clone(), id.clone());
            world.retently.customers.insert(id.clone(), customer);
            ("created", id)
        }
    };
    if let Some(customer) = world.retently.customers.get_mut(&id) {
        if let Some(first) = &input.first_name {
            customer.first_name = Some(first.clone()).filter(|name| !name.is_empty());
        }
        if let Some(last) = &input.last_name {
            customer.last_name = Some(last.clone()).filter(|name| !name.is_empty());
        }
        if let Some(company) = company {
            match company {
                Some((name, company_id)) => {
                    customer.company_name = Some(name);
                    customer.company_id = Some(company_id);
                }
                None => {
                    customer.company_name = None;
                    customer.company_id = None;
                }
            }
        }
        if let Some(title) = &input.job_title {
            customer.job_title = Some(title.clone()).filter(|title| !title.is_empty());
        }
        if let Some(tags) = &input.tags {
            let mut tags = tags.clone();
            tags.dedup();
            customer.tags = tags;
        }
        for property in &input.properties {
            let position = customer
                .properties
                .iter()
                .position(|stored| stored.name == property.name);
            match (&property.property, position) {
                (Some(new), Some(index)) => customer.properties[index] = new.clone(),
                (Some(new), None) => customer.properties.push(new.clone()),
                (None, Some(index)) => {
                    customer.properties.remove(index);
                }
                (None, None) => {}
            }
        }
        customer.updated = now;
    }
    (status, id)
}

/// The company a customer's `company` names: found by name (case-insensitively) or created with
/// the email's domain. An empty name clears the link (`None`).
fn company_for(
    world: &mut World,
    name: &str,
    email: &str,
    now: DateTime<Utc>,
) -> Option<(String, String)> {
    if name.is_empty() {
        return None;
    }
    if let Some(company) = world
        .retently
        .companies
        .iter()
        .find(|company| company.name.eq_ignore_ascii_case(name))
    {
        return Some((company.name.clone(), company.id.clone()));
    }
    let domain = email
        .split_once('@')
        .map(|(_, domain)| domain)
        .unwrap_or("");
    let company = Company {
        id: world.ids.next(),
        domain: domain.to_owned(),
        name: name.to_owned(),
        industry: None,
        tags: Vec::new(),
        created: now,
    };
    let found = (company.name.clone(), company.id.clone());
    world.retently.companies.push(company);
    Some(found)
}

/// `DELETE /customers` with `{"subscribers":[{"email":…}]}` (an `id` instead of an email is
/// accepted too). Per-item results keyed by what was sent.
pub(crate) async fn delete(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Envelope>, RetentlyError> {
    let body = parse_body(&body)?;
    let items = object_list(&body, "subscribers")?;
    if items.is_empty() {
        return Err(RetentlyError::bad_request(
            "The subscribers must contain at least 1 item.",
        ));
    }
    let targets = items
        .iter()
        .enumerate()
        .map(|(index, item)| target(item, &format!("subscribers.{index}.")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut world = shared.world();
    let mut data = Map::new();
    for (key, by_email) in targets {
        let id = if by_email {
            world.retently.by_email.get(&normalize_email(&key)).cloned()
        } else {
            Some(key.clone()).filter(|id| world.retently.customers.contains_key(id))
        };
        let result = match id.and_then(|id| world.retently.customers.remove(&id)) {
            Some(customer) => {
                world.retently.by_email.remove(&customer.email);
                json!({"status": "deleted", "id": customer.id})
            }
            None => json!({"status": "failed", "reason": "not_found"}),
        };
        data.insert(key, result);
    }
    Ok(success(Value::Object(data)))
}

/// `(email or id, is_email)` of one item of a delete/unsubscribe body.
fn target(item: &Map<String, Value>, path: &str) -> Result<(String, bool), RetentlyError> {
    if let Some(email) = optional_string(item, &["email"], path)?
        && !email.is_empty()
    {
        return Ok((email, true));
    }
    if let Some(id) = optional_string(item, &["id"], path)?
        && !id.is_empty()
    {
        return Ok((id, false));
    }
    Err(RetentlyError::bad_request(format!(
        "The {path}email field is required."
    )))
}

pub(crate) async fn unsubscribe(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Envelope>, RetentlyError> {
    set_subscription(&shared, &body, true)
}

pub(crate) async fn resubscribe(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Envelope>, RetentlyError> {
    set_subscription(&shared, &body, false)
}

/// Unknown addresses are reported per item (`failed`/`not_found`), so a client can tell exactly
/// which ones were never customers; or, as the docs say the upstream may do, the whole batch
/// fails with a 404 and nothing changes (see `SandboxConfig::unknown_subscription_emails`).
fn set_subscription(
    shared: &Shared,
    body: &Bytes,
    unsubscribe: bool,
) -> Result<Json<Envelope>, RetentlyError> {
    let body = parse_body(body)?;
    let message = optional_string(&body, &["message"], "")?;
    let items = object_list(&body, "subscribers")?;
    if items.is_empty() {
        return Err(RetentlyError::bad_request(
            "The subscribers must contain at least 1 item.",
        ));
    }
    let targets = items
        .iter()
        .enumerate()
        .map(|(index, item)| target(item, &format!("subscribers.{index}.")))
        .collect::<Result<Vec<_>, _>>()?;
    let now = Utc::now();
    let mut world = shared.world();
    if shared.unknown_subscription_emails == UnknownEmails::FailBatch {
        let all_known = targets.iter().all(|(key, by_email)| {
            if *by_email {
                world.retently.by_email.contains_key(&normalize_email(key))
            } else {
                world.retently.customers.contains_key(key)
            }
        });
        if !all_known {
            return Err(RetentlyError::not_found("Customer not found."));
        }
    }
    let mut data = Map::new();
    for (key, by_email) in targets {
        let id = if by_email {
            world.retently.by_email.get(&normalize_email(&key)).cloned()
        } else {
            Some(key.clone())
        };
        let result = match id.and_then(|id| world.retently.customers.get_mut(&id)) {
            Some(customer) => {
                customer.unsubscribed = unsubscribe;
                customer.unsubscribe_message = if unsubscribe { message.clone() } else { None };
                customer.updated = now;
                let status = if unsubscribe {
                    "unsubscribed"
                } else {
                    "resubscribed"
                };
                json!({"status": status, "id": customer.id})
            }
            None => json!({"status": "failed", "reason": "not_found"}),
        };
        data.insert(key, result);
    }
    Ok(success(Value::Object(data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_values_follow_the_help_centre_rules() {
        assert_eq!(normalize_value("integer", "42").as_deref(), Some("42"));
        assert_eq!(normalize_value("integer", "4.2"), None);
        assert_eq!(normalize_value("boolean", "Yes").as_deref(), Some("true"));
        assert_eq!(normalize_value("boolean", "n").as_deref(), Some("false"));
        assert_eq!(normalize_value("boolean", "maybe"), None);
        assert_eq!(
            normalize_value("collection", " a, b ,,c").as_deref(),
            Some("a,b,c")
        );
        assert_eq!(
            normalize_value("date", "2019-06-22").as_deref(),
            Some("2019-06-22T00:00:00.000Z")
        );
        assert_eq!(normalize_value("date", "soon"), None);
    }

    #[test]
    fn emails_are_checked_loosely() {
        assert!(is_email("a@b.co"));
        assert!(!is_email("a@b"));
        assert!(!is_email("@b.co"));
        assert!(!is_email("a b@c.co"));
        assert!(!is_email("a@@b.co"));
    }
}
