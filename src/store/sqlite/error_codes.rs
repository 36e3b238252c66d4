//! Migration `0019`: failed deliveries store the gateway's own error code by its stable name.
//!
//! Before it, `outbox.last_error` held the `tonic::Code` number of the failure (`"code": 14`),
//! a number of the transport's choosing. Now it holds the name of the gateway's
//! [`ErrorCode`](crate::error::ErrorCode) (`"code": "UNAVAILABLE"`), which the gateway owns
//! and which survives a change of transport. The migration rewrites the rows written before.

/// `(name, sql)` for the schema's list. Numbers the gateway never produced (OK, UNKNOWN,
/// DATA_LOSS) become `INTERNAL`, so every stored error reads back.
pub const MIGRATION: (&str, &str) = (
    "0019_outbox_error_code_names",
    "UPDATE outbox SET last_error = json_set(last_error, '$.code',
        CASE json_extract(last_error, '$.code')
            WHEN 1 THEN 'CANCELLED'
            WHEN 3 THEN 'INVALID_ARGUMENT'
            WHEN 4 THEN 'DEADLINE_EXCEEDED'
            WHEN 5 THEN 'NOT_FOUND'
            WHEN 6 THEN 'ALREADY_EXISTS'
            WHEN 7 THEN 'PERMISSION_DENIED'
            WHEN 8 THEN 'RESOURCE_EXHAUSTED'
            WHEN 9 THEN 'FAILED_PRECONDITION'
            WHEN 10 THEN 'ABORTED'
            WHEN 11 THEN 'OUT_OF_RANGE'
            WHEN 12 THEN 'UNIMPLEMENTED'
            WHEN 13 THEN 'INTERNAL'
            WHEN 14 THEN 'UNAVAILABLE'
            WHEN 16 THEN 'UNAUTHENTICATED'
            ELSE 'INTERNAL'
        END)
    WHERE last_error IS NOT NULL
        AND json_valid(last_error)
        AND json_type(last_error, '$.code') = 'integer';",
);

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use crate::domain::outbox::DeliveryError;
    use crate::error::{ErrorCode, Reason};

    /// A data directory holding dead letters written with `tonic::Code` numbers reads back,
    /// after the upgrade, with the gateway's codes; every number a build ever stored maps to
    /// the code of the same name.
    #[test]
    fn stored_grpc_code_numbers_become_the_gateways_codes() {
        let mut connection = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut connection).unwrap();
        // Rewind to just before this migration, with rows in the old format.
        connection
            .execute(
                "DELETE FROM schema_migrations WHERE name = ?1",
                [super::MIGRATION.0],
            )
            .unwrap();
        let numbered = [
            (1, ErrorCode::Cancelled),
            (3, ErrorCode::InvalidArgument),
            (4, ErrorCode::DeadlineExceeded),
            (5, ErrorCode::NotFound),
            (6, ErrorCode::AlreadyExists),
            (7, ErrorCode::PermissionDenied),
            (8, ErrorCode::ResourceExhausted),
            (9, ErrorCode::FailedPrecondition),
            (10, ErrorCode::Aborted),
            (11, ErrorCode::OutOfRange),
            (12, ErrorCode::Unimplemented),
            (13, ErrorCode::Internal),
            (14, ErrorCode::Unavailable),
            (16, ErrorCode::Unauthenticated),
        ];
        assert_eq!(numbered.len(), ErrorCode::ALL.len());
        for (number, code) in numbered {
            assert_eq!(code.grpc_code() as i32, number, "{code:?}");
            let reason = Reason::UpstreamUnavailable.as_str();
            let old = format!(
                r#"{{"code":{number},"reason":"{reason}","message":"down","metadata":{{"upstream":"retently"}}}}"#
            );
            connection
                .execute(
                    "INSERT INTO outbox (delivery_id, method, request, destinations, item_count,
                        replay_safe, state, create_ms, update_ms, next_attempt_ms, expire_ms,
                        last_error)
                    VALUES (?1, 'TrackEvent', x'03', '2', 1, 0, 5, 5, 5, 5, 9, ?2)",
                    (format!("dlv_{number}"), old),
                )
                .unwrap();
        }

        super::super::schema::migrate(&mut connection).unwrap();

        for (number, code) in numbered {
            let text: String = connection
                .query_row(
                    "SELECT last_error FROM outbox WHERE delivery_id = ?1",
                    [format!("dlv_{number}")],
                    |row| row.get(0),
                )
                .unwrap();
            let error: DeliveryError = serde_json::from_str(&text).unwrap();
            assert_eq!(error.code, code, "{text}");
            assert_eq!(error.reason, Reason::UpstreamUnavailable);
            assert_eq!(error.message, "down");
            assert_eq!(error.metadata["upstream"], "retently");
        }
    }
}
