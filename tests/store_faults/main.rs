//! The store part of the fault suite: the real binary as a child process on a full volume, a
//! damaged store file and a missing one. Each scenario ends with the ledger: every acknowledged
//! write reached the sandbox exactly once (or, after a SIGKILL, is a `DELIVERY_IN_DOUBT` dead
//! letter because it was in flight), and every write the gateway refused never reached it.
//!
//! A full volume is made with `RLIMIT_FSIZE` on the child: writes past the limit fail (`EFBIG`),
//! as on a volume with no room left, deterministically and without privileges; raising the limit
//! with `prlimit` gives the volume room again. The sandbox answers Retainly with 429 bursts while
//! writes are acknowledged, so they stay queued in the store across the fault.

#[path = "../it/child.rs"]
mod child;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::delivery_service_client::DeliveryServiceClient;
use cx_gateway::pb::event_service_client::EventServiceClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Api, FaultConfig, Sandbox, SandboxConfig};
use tokio::net::TcpListener;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::child::ChildGateway;

fn settings() -> Vec<(&'static str, String)> {
    vec![
        // The test is about the store, not pacing: lift Retainly's budget.
        ("CXGW_RETAINLY_REQUESTS_PER_MINUTE", "1000000".to_owned()),
        ("CXGW_SHUTDOWN_GRACE", "2s".to_owned()),
        // The feedback poller would write to the store too; this suite counts outbox writes.
        ("CXGW_FEEDBACK_SYNC", "false".to_owned()),
    ]
}

async fn start_sandbox() -> (Sandbox, EmbeddedSandbox) {
    let sandbox = Sandbox::new(SandboxConfig::default());
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    (sandbox, emulator)
}

/// Every Retainly call answers 429 with `Retry-After: 1`: acknowledged writes stay queued.
fn hold_deliveries(sandbox: &Sandbox) {
    sandbox.handle().set_faults(
        Api::Retainly,
        FaultConfig {
            burst_429: u32::MAX,
            burst_retry_after_secs: 1,
            ..FaultConfig::default()
        },
    );
}

fn release_deliveries(sandbox: &Sandbox) {
    sandbox
        .handle()
        .set_faults(Api::Retainly, FaultConfig::default());
}

/// The `n`th event of a scenario. All go to one customer, so the outbox sends them one at a time
/// in order: at most one is in flight when the process stops, and only that one can be in doubt.
fn async_event(tag: &str, n: usize) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        event: Some(pb::Event {
            customer_id: format!("{tag}-customer"),
            name: event_name(tag, n),
            message_id: format!("{tag}-msg-{n}"),
            ..Default::default()
        }),
        options: Some(pb::WriteOptions {
            mode: pb::DeliveryMode::Async as i32,
            idempotency_key: String::new(),
        }),
    }
}

fn event_name(tag: &str, n: usize) -> String {
    format!("{tag}_{n}")
}

/// Acknowledges `count` asynchronous events; every one must be acknowledged.
async fn acknowledge(gateway: &ChildGateway, tag: &str, count: usize) -> HashSet<String> {
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let mut acknowledged = HashSet::new();
    for n in 0..count {
        let response = client.track_event(async_event(tag, n)).await.unwrap();
        assert!(response.into_inner().delivery_id.starts_with("dlv_"));
        acknowledged.insert(event_name(tag, n));
    }
    acknowledged
}

/// The names of the events the sandbox recorded, with how often each arrived.
fn recorded(sandbox: &Sandbox) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in sandbox.handle().retainly_events() {
        *counts.entry(event.event).or_insert(0) += 1;
    }
    counts
}

/// Dead letters whose reason is `DELIVERY_IN_DOUBT`, by customer id; any other dead letter fails.
async fn in_doubt(gateway: &ChildGateway) -> HashSet<String> {
    let mut deliveries = DeliveryServiceClient::new(gateway.channel.clone());
    let dead = deliveries
        .list_dead_letters(pb::ListDeadLettersRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ids = HashSet::new();
    for delivery in dead.deliveries {
        let error = delivery.last_error.as_ref().unwrap();
        assert_eq!(error.reason, "DELIVERY_IN_DOUBT", "{delivery:?}");
        ids.insert(delivery.delivery_id);
    }
    ids
}

/// Waits until every write of `acknowledged` arrived or is in doubt, then checks the ledger:
/// nothing arrived twice, nothing arrived that was not acknowledged, and every acknowledged write
/// arrived except at most the ones in doubt. Returns (delivered, in doubt).
async fn check_ledger(
    sandbox: &Sandbox,
    gateway: &ChildGateway,
    acknowledged: &HashSet<String>,
) -> (usize, usize) {
    check_ledger_after(sandbox, gateway, acknowledged, 0).await
}

/// [`check_ledger`] for a gateway whose store no longer lists `earlier_in_doubt` dead letters
/// of `acknowledged` (a store replaced by a new one).
async fn check_ledger_after(
    sandbox: &Sandbox,
    gateway: &ChildGateway,
    acknowledged: &HashSet<String>,
    earlier_in_doubt: usize,
) -> (usize, usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let arrived = recorded(sandbox);
        let doubtful = in_doubt(gateway).await.len() + earlier_in_doubt;
        let delivered = acknowledged
            .iter()
            .filter(|id| arrived.contains_key(*id))
            .count();
        if delivered + doubtful >= acknowledged.len() {
            let twice: Vec<_> = arrived.iter().filter(|(_, n)| **n > 1).collect();
            assert!(twice.is_empty(), "delivered twice: {twice:?}");
            let unexpected: Vec<_> = arrived
                .keys()
                .filter(|id| !acknowledged.contains(*id))
                .collect();
            assert!(unexpected.is_empty(), "never acknowledged: {unexpected:?}");
            assert!(
                doubtful <= 1,
                "{doubtful} in doubt, at most one was in flight"
            );
            return (delivered, doubtful);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} acknowledged writes delivered, {} in doubt",
            delivered,
            acknowledged.len(),
            doubtful
        );
        // The sandbox announces arrivals through no signal: look again shortly.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `command` expecting the gateway to refuse to start; returns what it wrote to stderr.
async fn refused_start(mut command: Command) -> String {
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let child = command.spawn().expect("the gateway binary starts");
    let pid = child.id();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let Ok(output) = output else {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
        panic!("the gateway started on a store it must refuse");
    };
    let output = output.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    stderr
}

fn database(data_dir: &Path) -> PathBuf {
    data_dir.join(cx_gateway::store::DATABASE_FILE)
}

/// Folds the write-ahead log into the database file, as a clean close does, so the file alone
/// holds the store.
fn checkpoint(path: &Path) {
    let connection = rusqlite::Connection::open(path).unwrap();
    connection
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
}

/// Moves the database and its -wal and -shm files into `aside`.
fn move_aside(data_dir: &Path, aside: &Path) {
    std::fs::create_dir_all(aside).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let name = format!("{}{suffix}", cx_gateway::store::DATABASE_FILE);
        let from = data_dir.join(&name);
        if from.exists() {
            std::fs::rename(&from, aside.join(&name)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_and_the_recover_recipe_keeps_every_acknowledged_write() {
    const WRITES: usize = 200;
    let (sandbox, emulator) = start_sandbox().await;
    hold_deliveries(&sandbox);
    let data_dir = tempfile::tempdir().unwrap();
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    let acknowledged = acknowledge(&gateway, "damaged", WRITES).await;
    assert_eq!(gateway.terminate().code(), Some(0));

    // Pages of an index overwritten with bytes no page can hold (the outbox rows themselves are
    // intact, as `.recover` rebuilds indexes from their tables).
    let path = database(data_dir.path());
    checkpoint(&path);
    let (page_size, root): (i64, i64) = {
        let connection = rusqlite::Connection::open(&path).unwrap();
        (
            connection
                .query_row("PRAGMA page_size", [], |row| row.get(0))
                .unwrap(),
            connection
                .query_row(
                    "SELECT rootpage FROM sqlite_schema WHERE name = 'outbox_by_state'",
                    [],
                    |row| row.get(0),
                )
                .unwrap(),
        )
    };
    {
        use std::io::{Seek as _, SeekFrom, Write as _};
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let page_size = u64::try_from(page_size).unwrap();
        file.seek(SeekFrom::Start(
            u64::try_from(root - 1).unwrap() * page_size,
        ))
        .unwrap();
        file.write_all(&vec![0xA5; usize::try_from(page_size).unwrap()])
            .unwrap();
        file.sync_all().unwrap();
    }

    let stderr = refused_start(ChildGateway::command(
        &emulator,
        data_dir.path(),
        &settings(),
    ))
    .await;
    assert!(stderr.contains("is damaged: quick_check found"), "{stderr}");
    let recover = format!("sqlite3 {} .recover", path.display());
    assert!(stderr.contains(&recover), "{stderr}");

    // The recipe the message names: `.recover`, or `.dump` with a sqlite3 built without the
    // page access `.recover` needs (Debian's, which CI has).
    assert!(stderr.contains(".dump in its place"), "{stderr}");
    let recovered = data_dir.path().join("gateway.recovered.db");
    let recipe = |command: &str| {
        let _ = std::fs::remove_file(&recovered);
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -o pipefail; sqlite3 '{}' {command} | sqlite3 -bail '{}'",
                path.display(),
                recovered.display()
            ))
            .stderr(Stdio::null())
            .status()
            .expect("sqlite3 is installed (scripts/test.sh installs it)")
            .success()
    };
    let used = if recipe(".recover") {
        ".recover"
    } else {
        assert!(recipe(".dump"), "neither .recover nor .dump worked");
        ".dump"
    };
    move_aside(data_dir.path(), &data_dir.path().join("damaged"));
    std::fs::rename(&recovered, &path).unwrap();

    release_deliveries(&sandbox);
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    let (delivered, doubtful) = check_ledger(&sandbox, &gateway, &acknowledged).await;
    eprintln!(
        "store faults, damaged: {WRITES} acknowledged, start refused, recovered with sqlite3 {used}, \
         {delivered} delivered, {doubtful} in doubt"
    );
    assert_eq!(gateway.terminate().code(), Some(0));
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_store_is_refused_and_only_an_explicit_flag_starts_empty() {
    const WRITES: usize = 100;
    let (sandbox, emulator) = start_sandbox().await;
    hold_deliveries(&sandbox);
    let data_dir = tempfile::tempdir().unwrap();
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    let acknowledged = acknowledge(&gateway, "missing", WRITES).await;
    assert_eq!(gateway.terminate().code(), Some(0));

    // The file goes missing (a volume mounted empty, a deletion by hand); a backup exists.
    let path = database(data_dir.path());
    checkpoint(&path);
    let backup = tempfile::tempdir().unwrap();
    move_aside(data_dir.path(), backup.path());
    let stderr = refused_start(ChildGateway::command(
        &emulator,
        data_dir.path(),
        &settings(),
    ))
    .await;
    assert!(stderr.contains("is missing"), "{stderr}");
    assert!(stderr.contains("--allow-new-store"), "{stderr}");
    assert!(!path.exists(), "a refused start creates no store");

    // Restored from the backup: every acknowledged write goes out.
    std::fs::rename(backup.path().join(cx_gateway::store::DATABASE_FILE), &path).unwrap();
    release_deliveries(&sandbox);
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    let (delivered, doubtful) = check_ledger(&sandbox, &gateway, &acknowledged).await;
    assert_eq!(gateway.terminate().code(), Some(0));

    // Gone for good, and the operator says so: the flag creates a new store, which then works.
    move_aside(data_dir.path(), &data_dir.path().join("lost"));
    let mut command = ChildGateway::command(&emulator, data_dir.path(), &settings());
    command.arg("--allow-new-store");
    let gateway = ChildGateway::start_command(command).await;
    let mut all = acknowledged.clone();
    all.extend(acknowledge(&gateway, "renewed", 10).await);
    check_ledger_after(&sandbox, &gateway, &all, doubtful).await;
    assert_eq!(gateway.terminate().code(), Some(0));
    // From then on it is this directory's store: a plain start opens it.
    let gateway = ChildGateway::start(&emulator, data_dir.path(), &settings()).await;
    assert_eq!(gateway.terminate().code(), Some(0));
    eprintln!(
        "store faults, missing: {WRITES} acknowledged, start refused, restored from a backup, \
         {delivered} delivered, {doubtful} in doubt; --allow-new-store started empty and delivered 10 more"
    );
    emulator.stop().await;
}

/// Sets the child's file size limit (`None`: unlimited).
fn set_file_size_limit(pid: u32, bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit reads `limit` and writes nothing (the old-limit pointer is null).
    let result = unsafe {
        libc::prlimit(
            libc::pid_t::try_from(pid).unwrap(),
            libc::RLIMIT_FSIZE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(result, 0, "{}", std::io::Error::last_os_error());
}

/// `serve` with writes past `bytes` failing in every file, as on a volume with no room left.
fn command_on_full_volume(emulator: &EmbeddedSandbox, data_dir: &Path, bytes: u64) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut command = ChildGateway::command(emulator, data_dir, &settings());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // A write past the limit then fails with EFBIG instead of killing the process.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

fn log_lines_with(gateway: &ChildGateway, message: &str) -> Vec<serde_json::Value> {
    gateway
        .log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"].as_str() == Some(message))
        .collect()
}

async fn readyz(gateway: &ChildGateway) -> reqwest::StatusCode {
    reqwest::get(format!("http://{}/readyz", gateway.admin_addr))
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_refuses_writes_cleanly_backs_off_and_keeps_the_gateway_unready_until_recovered()
 {
    const LIMIT: u64 = 1024 * 1024;
    let (sandbox, emulator) = start_sandbox().await;
    hold_deliveries(&sandbox);
    let data_dir = tempfile::tempdir().unwrap();
    let gateway =
        ChildGateway::start_command(command_on_full_volume(&emulator, data_dir.path(), LIMIT))
            .await;
    assert_eq!(readyz(&gateway).await, reqwest::StatusCode::OK);

    // Writes until the volume is full: each is acknowledged or refused before acknowledgement.
    let mut client = EventServiceClient::new(gateway.channel.clone());
    let mut acknowledged = HashSet::new();
    let mut refused = HashSet::new();
    for n in 0..20_000 {
        match client.track_event(async_event("full", n)).await {
            Ok(_) => {
                acknowledged.insert(event_name("full", n));
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                refused.insert(event_name("full", n));
                if refused.len() == 20 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused.len(), 20, "the volume never filled");
    assert!(!acknowledged.is_empty());

    // Deliveries come due (the 429s ask for a retry after 1 s) and cannot be claimed or their
    // outcomes recorded: the loops wait and say so once, they do not spin. The line is the signal;
    // what follows is a fixed window in which a spinning loop would log thousands of lines.
    let store_errors = |gateway: &ChildGateway| {
        log_lines_with(gateway, "cannot claim deliveries").len()
            + log_lines_with(gateway, "cannot record a delivery outcome, retrying").len()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while store_errors(&gateway) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no store failure logged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = store_errors(&gateway);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window = store_errors(&gateway) - first;
    assert!(window <= 2, "{window} store error lines in 3 s");

    // SIGKILL on the full volume, and a restart on it with even less room: the store opens (that
    // only reads), but the deliveries in flight at the kill cannot be recovered (that writes), so
    // the gateway serves and is not ready.
    gateway.kill();
    // Whether a delivery was in flight at this kill depends on timing (one whose 429 could not be
    // recorded is; one whose claim failed is not): make certain the oldest one was being sent.
    // The change goes to the end of the write-ahead log, where the dead process left it: closing
    // without the usual checkpoint keeps that log (and the full volume) as it was.
    let connection = rusqlite::Connection::open(database(data_dir.path())).unwrap();
    connection
        .set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
    connection
        .execute(
            "UPDATE outbox SET state = 2
             WHERE seq = (SELECT MIN(seq) FROM outbox WHERE state IN (1, 2, 3))",
            [],
        )
        .unwrap();
    drop(connection);
    let gateway = ChildGateway::start_command(command_on_full_volume(
        &emulator,
        data_dir.path(),
        64 * 1024,
    ))
    .await;
    let mut health = HealthClient::new(gateway.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first_status: HealthCheckResponse = watch.message().await.unwrap().unwrap();
    assert_eq!(first_status.status, ServingStatus::NotServing as i32);
    // Alive though not ready: liveness probes ask for "liveness", so the pod is not restarted.
    let liveness = health
        .check(HealthCheckRequest {
            service: cx_gateway::server::LIVENESS_SERVICE.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(liveness.status, ServingStatus::Serving as i32);
    assert_eq!(
        readyz(&gateway).await,
        reqwest::StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        log_lines_with(
            &gateway,
            "cannot recover in-flight deliveries, not ready until this succeeds"
        )
        .len(),
        1
    );

    // Room again: recovery is retried and succeeds, health turns SERVING, everything goes out.
    set_file_size_limit(gateway.process.id(), None);
    release_deliveries(&sandbox);
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::Serving as i32);
    assert_eq!(readyz(&gateway).await, reqwest::StatusCode::OK);
    let (delivered, doubtful) = check_ledger(&sandbox, &gateway, &acknowledged).await;
    let arrived = recorded(&sandbox);
    let delivered_refused: Vec<_> = refused
        .iter()
        .filter(|id| arrived.contains_key(*id))
        .collect();
    assert!(
        delivered_refused.is_empty(),
        "refused writes delivered: {delivered_refused:?}"
    );
    eprintln!(
        "store faults, full volume: {} acknowledged, {} refused (UNAVAILABLE), {window} store error \
         lines in a 3 s window, recovery at restart failed then retried until ready, {delivered} delivered, {doubtful} in doubt \
         (the one in flight at the SIGKILL), 0 refused writes delivered",
        acknowledged.len(),
        refused.len(),
    );
    assert_eq!(gateway.terminate().code(), Some(0));
    emulator.stop().await;
}
