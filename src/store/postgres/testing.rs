//! Test support: a fresh database per test on the cluster `scripts/postgres.sh` starts.
//!
//! Without `CXGW_TEST_POSTGRES_URL` the PostgreSQL tests pass as skipped (a plain `cargo test`
//! on a machine without PostgreSQL), unless `CXGW_TEST_REQUIRE_POSTGRES=1` (set by
//! `scripts/test.sh`) says the cluster must be there: then they fail.

use super::{PostgresSettings, PostgresStore};
use crate::config::Secret;

pub(crate) const URL_VARIABLE: &str = "CXGW_TEST_POSTGRES_URL";
pub(crate) const REQUIRE_VARIABLE: &str = "CXGW_TEST_REQUIRE_POSTGRES";

/// The test cluster's URL, `None` when there is none and none is required.
pub(crate) fn cluster_url() -> Option<String> {
    match std::env::var(URL_VARIABLE) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var(REQUIRE_VARIABLE).as_deref() != Ok("1"),
                "{REQUIRE_VARIABLE}=1 but {URL_VARIABLE} is not set: run the tests through \
                 scripts/postgres.sh (scripts/test.sh does)"
            );
            eprintln!("skipped: {URL_VARIABLE} is not set (scripts/postgres.sh sets it)");
            None
        }
    }
}

/// A client of the cluster's maintenance database, for test set-up and inspection.
pub(crate) async fn admin_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test cluster");
    tokio::spawn(connection);
    client
}

/// Settings for a new, empty database of its own on the test cluster.
pub(crate) async fn fresh_database() -> Option<PostgresSettings> {
    let url = cluster_url()?;
    let name = format!("cxgw_test_{:016x}", rand::random::<u64>());
    admin_client(&url)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    let mut database_url = reqwest::Url::parse(&url).expect("the test cluster's url");
    database_url.set_path(&name);
    Some(PostgresSettings::new(Secret::new(database_url.to_string())))
}

/// A migrated store on a fresh database.
pub(crate) async fn fresh_store() -> Option<PostgresStore> {
    let settings = fresh_database().await?;
    Some(
        PostgresStore::connect(&settings)
            .await
            .expect("connect to the test database"),
    )
}

/// Waits until `count` sessions of the database `settings` names wait for a lock: how a test
/// knows, by the server's own account, that an operation is blocked where it should be.
pub(crate) async fn wait_for_lock_waiters(settings: &PostgresSettings, count: i64) {
    let client = admin_client(settings.url.expose()).await;
    let waiting = async {
        loop {
            let waiters: i64 = client
                .query_one(
                    "SELECT COUNT(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .expect("read pg_stat_activity")
                .get(0);
            if waiters >= count {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), waiting)
        .await
        .expect("sessions waiting for a lock");
}
