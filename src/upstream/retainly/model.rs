//! Retainly request types. The API is write-only: nothing is read back but errors.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A customer id in the caller's system, sent as the JSON scalar it is. Batching treats `1` and
/// `"1"` as the same customer (the emulator does; upstream's rule is undocumented), so they never
/// share a batch and are applied in arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RetainlyId {
    Int(i64),
    Text(String),
}

impl fmt::Display for RetainlyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetainlyId::Int(id) => write!(f, "{id}"),
            RetainlyId::Text(id) => f.write_str(id),
        }
    }
}

impl From<i64> for RetainlyId {
    fn from(id: i64) -> Self {
        RetainlyId::Int(id)
    }
}

impl From<&str> for RetainlyId {
    fn from(id: &str) -> Self {
        RetainlyId::Text(id.to_owned())
    }
}

impl From<String> for RetainlyId {
    fn from(id: String) -> Self {
        RetainlyId::Text(id)
    }
}

/// A customer to create or update: its id and the fields to set (fields not sent are kept).
#[derive(Debug, Clone, PartialEq)]
pub struct RetainlyCustomer {
    pub id: RetainlyId,
    /// Field values: strings, numbers, booleans, date strings, or arrays (of scalars or of
    /// objects with one nested array level). Must not contain `id`.
    pub fields: Map<String, Value>,
}

impl Serialize for RetainlyCustomer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.fields.len() + 1))?;
        map.serialize_entry("id", &self.id)?;
        for (key, value) in &self.fields {
            if key != "id" {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

/// Items to add to (or update in) one array field of one customer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArrayRecord {
    pub customer_id: RetainlyId,
    pub field: String,
    /// Items with an `id` update the item with that id; items without one are appended.
    pub data: Vec<Map<String, Value>>,
}

/// A change to items of customers' array fields.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayChange {
    /// Adds or updates items (`POST /arrays`).
    Upsert(Vec<ArrayRecord>),
    /// Removes items; missing customers, fields or items are not an error (`DELETE /arrays`).
    Delete(Vec<ArrayDeletion>),
}

/// Items to remove from one array field of one customer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArrayDeletion {
    pub customer_id: RetainlyId,
    pub field: String,
    pub ids: Vec<Value>,
}

/// An event that starts every workflow whose entry node is `event`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetainlyEvent {
    pub customer_id: RetainlyId,
    /// At most 50 characters.
    pub event: String,
    /// Up to 50 fields exposed to the workflow; not stored on the customer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
}
