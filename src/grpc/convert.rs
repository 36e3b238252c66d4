//! Conversions shared by the adapters.

use crate::domain::outbox::DeliveryError;
use crate::pb;

pub fn timestamp_from_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        // The remainder of a division by 1000 fits in i32.
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn timestamp_to_ms(timestamp: &prost_types::Timestamp) -> i64 {
    timestamp
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(timestamp.nanos / 1_000_000))
}

pub fn item_error(error: DeliveryError) -> pb::ItemError {
    pb::ItemError {
        code: error.code,
        reason: error.reason,
        message: error.message,
        metadata: error.metadata,
    }
}
