//! The Retainly workspace's state: customers with scalar and array fields, and the event log.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

/// The identity of a customer or array item id. Upstream does not say whether `1` and `"1"` are
/// the same customer; the sandbox treats them as the same (integers are compared by their decimal
/// text), since an id is "the customer's unique id in your system" whatever JSON type carries it.
pub(crate) fn id_key(id: &Value) -> Option<String> {
    match id {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) if number.is_i64() || number.is_u64() => Some(number.to_string()),
        _ => None,
    }
}

/// One customer of the workspace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetainlyCustomer {
    /// The id as first received (number or string).
    pub id: Value,
    /// Every field except `id`; array fields hold arrays of item objects.
    pub fields: Map<String, Value>,
    #[serde(rename = "createdAt")]
    pub created_at: DateTime<Utc>,
    #[serde(rename = "updatedAt")]
    pub updated_at: DateTime<Utc>,
}

impl RetainlyCustomer {
    /// How many fields hold arrays (limit 15).
    pub fn array_field_count(&self) -> usize {
        self.fields
            .values()
            .filter(|value| value.is_array())
            .count()
    }
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetainlyEvent {
    /// Position in arrival order, from 1.
    pub seq: u64,
    #[serde(rename = "customerId")]
    pub customer_id: Value,
    pub event: String,
    /// `None` when the request had no `data`.
    pub data: Option<Value>,
    #[serde(rename = "receivedAt")]
    pub received_at: DateTime<Utc>,
}

/// Everything the workspace holds. All configured credentials address this one workspace.
#[derive(Debug, Default)]
pub(crate) struct RetainlyStore {
    /// Keyed by [`id_key`].
    pub customers: HashMap<String, RetainlyCustomer>,
    pub events: Vec<RetainlyEvent>,
}
