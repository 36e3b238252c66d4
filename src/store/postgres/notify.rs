//! The `LISTEN` connection: a wake-up for readers that tail the shared feedback log.
//!
//! Appends `NOTIFY` a channel in their own transaction, so the notification is sent when (and
//! only if) they commit. Notifications are delivered only to a session that listens, so this
//! is a dedicated connection outside the pool (a pooled one goes back to other work), driven by
//! its own task that reads `Connection::poll_message`. It is a hint and may be lost: the
//! connection can break (it is then opened again, and the reader is woken once, since
//! appends made meanwhile were not announced), and behind PgBouncer in transaction mode
//! `LISTEN` does not work at all. Readers therefore also read the log every so often; the table
//! is the truth.

use std::future::poll_fn;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use super::PostgresStore;
use crate::backoff::FailureStreak;

/// Waits between attempts to open the listening connection again: from a second, doubling up
/// to half a minute (meanwhile the readers' own polling stands in for it).
const RECONNECT_FIRST: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// A counter that changes after every notification on `channel` (and once each time the
/// connection is opened again). The listening connection lives as long as a receiver does.
pub(super) fn listen(store: &PostgresStore, channel: &'static str) -> watch::Receiver<u64> {
    let (wake, wakeups) = watch::channel(0u64);
    let connect = std::sync::Arc::clone(&store.connect);
    tokio::spawn(async move {
        let mut failures = FailureStreak::new(RECONNECT_FIRST, RECONNECT_MAX);
        loop {
            let ended = tokio::select! {
                () = wake.closed() => return,
                ended = session(&connect.0, &connect.1, channel, &wake) => ended,
            };
            let delay = match ended {
                Ok(()) => {
                    failures.succeeded();
                    RECONNECT_FIRST
                }
                Err(error) => {
                    let failure = failures.failed();
                    if let Some(suppressed) = failure.log {
                        // The error is the client's or the server's, never the URL (see
                        // `query_failed`).
                        let error = super::query_failed("listen for log appends", &error);
                        tracing::warn!(
                            %error,
                            channel,
                            failures = failure.failures,
                            suppressed,
                            "the log's wake-up connection failed, opening it again"
                        );
                    }
                    failure.delay
                }
            };
            tokio::select! {
                () = wake.closed() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    });
    wakeups
}

/// One listening session: connects, listens, and forwards notifications until the connection
/// ends.
async fn session(
    config: &tokio_postgres::Config,
    tls: &tokio_postgres_rustls::MakeRustlsConnect,
    channel: &str,
    wake: &watch::Sender<u64>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls.clone()).await?;
    let bump = || wake.send_modify(|count| *count = count.wrapping_add(1));
    // The connection only makes progress while it is polled, the `LISTEN` below included.
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    let forward = {
        let wake = wake.clone();
        async move {
            let result = loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(_))) => {
                        wake.send_modify(|count| *count = count.wrapping_add(1));
                    }
                    // Notices (warnings from the server) mean nothing here.
                    Some(Ok(_)) => {}
                    Some(Err(error)) => break Err(error),
                    None => break Ok(()),
                }
            };
            let _ = ended_tx.send(result);
        }
    };
    let driver = tokio::spawn(forward);
    // `channel` is a constant of this crate, never input: quoting it is enough.
    let listening = client.batch_execute(&format!("LISTEN \"{channel}\"")).await;
    if let Err(error) = listening {
        driver.abort();
        return Err(error);
    }
    tracing::debug!(channel, "listening for log appends");
    // Whatever was appended while no connection listened was not announced.
    bump();
    let result = match ended.await {
        Ok(result) => result,
        // The driver task was cancelled (the runtime is shutting down).
        Err(_) => Ok(()),
    };
    drop(client);
    result
}
