//! Several gateway processes on one PostgreSQL database and one emulator: the harness of the
//! scale-out tests.
//!
//! Needs the test cluster of `scripts/postgres.sh` (`CXGW_TEST_POSTGRES_URL`); without it a
//! test passes as skipped, unless `CXGW_TEST_REQUIRE_POSTGRES=1` (scripts/test.sh) requires it.

// Shared by several test modules; not each uses every item.
#![allow(dead_code)]

use std::path::PathBuf;

use cx_gateway::sandbox_mode::EmbeddedSandbox;

use crate::child::ChildGateway;

/// A new database on the test cluster, as a URL; `None` when no cluster is configured and none
/// is required.
pub async fn fresh_database_url() -> Option<String> {
    let url = match std::env::var("CXGW_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            assert!(
                std::env::var("CXGW_TEST_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "CXGW_TEST_REQUIRE_POSTGRES=1 but CXGW_TEST_POSTGRES_URL is not set: run the \
                 tests through scripts/postgres.sh (scripts/test.sh does)"
            );
            eprintln!("skipped: CXGW_TEST_POSTGRES_URL is not set (scripts/postgres.sh sets it)");
            return None;
        }
    };
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test cluster");
    tokio::spawn(connection);
    let name = format!("cxgw_it_{:016x}", rand::random::<u64>());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    let mut database = reqwest::Url::parse(&url).expect("the test cluster's url");
    database.set_path(&name);
    Some(database.to_string())
}

/// One fresh database, its URL in a secret file, and the settings every replica on it shares.
pub struct SharedDatabase {
    /// The database's URL (password included): tests assert it appears in no log line.
    pub url: String,
    /// Holds the URL file (`CXGW_POSTGRES_URL_FILE`) for as long as the replicas run.
    secrets: tempfile::TempDir,
    /// One data directory per started replica (the embedded store is not used, but `serve`
    /// still wants a directory for its own files).
    data_dirs: Vec<tempfile::TempDir>,
}

impl SharedDatabase {
    /// A fresh database on the test cluster; `None` when the test is skipped.
    pub async fn create() -> Option<SharedDatabase> {
        let url = fresh_database_url().await?;
        let secrets = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(secrets.path().join("postgres-url"), format!("{url}\n"))
            .expect("write the url file");
        Some(SharedDatabase {
            url,
            secrets,
            data_dirs: Vec::new(),
        })
    }

    pub fn url_file(&self) -> PathBuf {
        self.secrets.path().join("postgres-url")
    }

    /// The password of the database's URL, which must appear in no log line.
    pub fn password(&self) -> String {
        reqwest::Url::parse(&self.url)
            .expect("the test cluster's url")
            .password()
            .expect("the test cluster's url has a password")
            .to_owned()
    }

    /// The settings that put a replica on this database, followed by `extra`.
    pub fn settings<'a>(&self, extra: &[(&'a str, String)]) -> Vec<(&'a str, String)> {
        let mut settings = vec![
            ("CXGW_STORE", "postgres".to_owned()),
            (
                "CXGW_POSTGRES_URL_FILE",
                self.url_file().display().to_string(),
            ),
            ("CXGW_SHUTDOWN_GRACE", "2s".to_owned()),
        ];
        settings.extend(extra.iter().cloned());
        settings
    }

    /// Starts one more replica against `emulator` with the shared settings and `extra`.
    pub async fn start_replica(
        &mut self,
        emulator: &EmbeddedSandbox,
        extra: &[(&str, String)],
    ) -> ChildGateway {
        let data_dir = tempfile::tempdir().expect("a temporary directory");
        let settings = self.settings(extra);
        let replica = ChildGateway::start(emulator, data_dir.path(), &settings).await;
        self.data_dirs.push(data_dir);
        replica
    }

    /// Starts `count` replicas, one after the other (the first runs the migrations).
    pub async fn start_replicas(
        &mut self,
        count: usize,
        emulator: &EmbeddedSandbox,
        extra: &[(&str, String)],
    ) -> Vec<ChildGateway> {
        let mut replicas = Vec::with_capacity(count);
        for _ in 0..count {
            replicas.push(self.start_replica(emulator, extra).await);
        }
        replicas
    }
}
