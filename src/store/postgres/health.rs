//! The health probe of the PostgreSQL engine: `SELECT 1` on a connection of its own.
//!
//! Not a pooled connection: under load every pooled connection can be busy for a while, and a
//! probe waiting for one would call a busy database unreachable. The probe's connection is
//! opened again whenever it broke, so a database that returns is seen at the next probe.

use std::time::Duration;

use tokio::sync::Mutex;

use super::{CONNECT_TIMEOUT, PostgresStore, query_error};
use crate::store::{HealthProbe, StoreError};

/// How long `SELECT 1` may take on an open connection; within the watcher's own timeout, so a
/// connection that hangs is dropped here rather than kept for the next probe.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How the probe reaches the database, and its open connection (if any).
pub(crate) struct ProbeConnection {
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl ProbeConnection {
    pub(crate) fn new(
        config: tokio_postgres::Config,
        tls: tokio_postgres_rustls::MakeRustlsConnect,
    ) -> ProbeConnection {
        ProbeConnection {
            config,
            tls,
            client: Mutex::new(None),
        }
    }

    async fn check(&self) -> Result<(), StoreError> {
        let mut client = self.client.lock().await;
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            *client = None;
            let connecting = self.config.connect(self.tls.clone());
            let (connected, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .map_err(|_elapsed| {
                    StoreError::unavailable("postgres: health probe failed: connect timed out")
                })?
                .map_err(query_error("health probe"))?;
            // The connection's own task ends when the socket closes; the client then reports
            // closed and the next probe connects anew.
            tokio::spawn(async move {
                let _ = connection.await;
            });
            *client = Some(connected);
        }
        let Some(connected) = client.as_ref() else {
            return Err(StoreError::unavailable(
                "postgres: health probe failed: no connection",
            ));
        };
        let answered =
            tokio::time::timeout(ANSWER_TIMEOUT, connected.simple_query("SELECT 1")).await;
        match answered {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => {
                *client = None;
                Err(query_error("health probe")(error))
            }
            // A connection that stopped answering is not asked again: its path may be dead
            // while a new one would get through.
            Err(_elapsed) => {
                *client = None;
                Err(StoreError::unavailable(
                    "postgres: health probe failed: no answer in time",
                ))
            }
        }
    }
}

#[async_trait::async_trait]
impl HealthProbe for PostgresStore {
    async fn check(&self) -> Result<(), StoreError> {
        self.probe.check().await
    }
}
