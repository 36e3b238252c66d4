//! The ingest task: the log's one appender.
//!
//! The poller and the webhook receiver hand it observations; it compares them with the log and
//! appends new and changed responses in one store transaction (together with the poller's
//! checkpoint, so a crash can never keep one without the other), then publishes the new entries
//! to the hub and answers each caller. Being the only appender is what lets the hub receive
//! entries in commit order; running as its own task means a caller that goes away (a webhook
//! sender hanging up) cannot leave a committed entry unpublished.
//!
//! Requests that queue up while a transaction commits are merged into the next one, so a burst
//! of webhook calls costs one commit, not one each. The poller's requests carry the fence of its
//! lease and commit on their own: when the lease was lost, only the poller's write is refused.
//!
//! Other replicas sharing the store append too; the hub publishes their entries before this
//! one's (see [`Hub::publish`]).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::clock::Clock;
use super::hub::Hub;
use super::log::{self, AppendCounts, Observed, Origin};
use super::stats::FeedbackStats;
use crate::backoff::{LOG_EVERY, LogLimit};
use crate::error::{Error, ErrorCode, Reason};
use crate::shutdown::Drain;
use crate::store::Store;
use crate::store::leases::{Fence, UnderLease};

/// Requests waiting for the ingest task; beyond this, callers wait (backpressure on the poller
/// and on webhook senders rather than memory).
const QUEUE: usize = 256;

/// Requests merged into one transaction at most.
const MAX_GROUP: usize = 64;

/// A named sync position written in the same transaction as the observations.
pub use crate::store::Checkpoint;

struct Request {
    origin: Origin,
    observations: Vec<Observed>,
    checkpoint: Option<Checkpoint>,
    /// The poller's lease, checked in the append's transaction.
    fence: Option<Fence>,
    reply: oneshot::Sender<Result<UnderLease<AppendCounts>, Error>>,
}

/// A handle to the ingest task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ingest {
    requests: mpsc::Sender<Request>,
}

fn stopped() -> Error {
    Error::new(
        ErrorCode::Unavailable,
        Reason::FeedbackIngestStopped,
        "the feedback log no longer accepts observations (the gateway is shutting down)",
    )
}

impl Ingest {
    /// The handle and the task to spawn. The task ends when draining starts (after the
    /// requests already queued) or when every handle is dropped.
    pub fn new(
        store: Store,
        hub: Arc<Hub>,
        clock: Clock,
        stats: Arc<FeedbackStats>,
        drain: Drain,
    ) -> (Ingest, impl Future<Output = ()> + Send + 'static) {
        let (requests, queue) = mpsc::channel(QUEUE);
        let task = run(queue, store, hub, clock, stats, drain);
        (Ingest { requests }, task)
    }

    /// Compares `observations` with the log, appends what is new or changed and returns once
    /// that is durable and published.
    pub async fn submit(
        &self,
        origin: Origin,
        observations: Vec<Observed>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<AppendCounts, Error> {
        match self.send(origin, observations, checkpoint, None).await? {
            UnderLease::Done(counts) => Ok(counts),
            // Only a write under a fence can find its lease lost.
            UnderLease::LeaseLost => Err(stopped()),
        }
    }

    /// [`Ingest::submit`] under the poller's lease: appends nothing and leaves the checkpoint
    /// alone when another replica holds the lease now ([`UnderLease::LeaseLost`]).
    pub async fn submit_fenced(
        &self,
        origin: Origin,
        observations: Vec<Observed>,
        checkpoint: Option<Checkpoint>,
        fence: Fence,
    ) -> Result<UnderLease<AppendCounts>, Error> {
        self.send(origin, observations, checkpoint, Some(fence))
            .await
    }

    async fn send(
        &self,
        origin: Origin,
        observations: Vec<Observed>,
        checkpoint: Option<Checkpoint>,
        fence: Option<Fence>,
    ) -> Result<UnderLease<AppendCounts>, Error> {
        let (reply, answer) = oneshot::channel();
        let mut observations = observations;
        if let Some(traceparent) =
            crate::telemetry::propagation::traceparent(&tracing::Span::current())
        {
            for observed in &mut observations {
                observed.traceparent = Some(traceparent.clone());
            }
        }
        self.requests
            .send(Request {
                origin,
                observations,
                checkpoint,
                fence,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(
    mut queue: mpsc::Receiver<Request>,
    store: Store,
    hub: Arc<Hub>,
    clock: Clock,
    stats: Arc<FeedbackStats>,
    drain: Drain,
) {
    // Appends fail together on a full store (every webhook call and poll at once): one line per
    // interval says so, with the count of the others.
    let failure_log = LogLimit::new(LOG_EVERY);
    // A fenced request met while merging, which commits on its own next.
    let mut carried: Option<Request> = None;
    loop {
        let first = match carried.take() {
            Some(request) => request,
            None => tokio::select! {
                biased;
                request = queue.recv() => match request {
                    Some(request) => request,
                    None => return,
                },
                () = drain.clone().signaled() => {
                    // Finish what was already handed over, then refuse the rest.
                    queue.close();
                    match queue.recv().await {
                        Some(request) => request,
                        None => return,
                    }
                }
            },
        };
        let mut group = vec![first];
        while group[0].fence.is_none() && group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(request) if request.fence.is_some() => {
                    carried = Some(request);
                    break;
                }
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        process(&store, &hub, &clock, &stats, &failure_log, group).await;
    }
}

async fn process(
    store: &Store,
    hub: &Hub,
    clock: &Clock,
    stats: &FeedbackStats,
    failure_log: &LogLimit,
    mut group: Vec<Request>,
) {
    let batches: Vec<(Origin, Vec<Observed>)> = group
        .iter_mut()
        .map(|request| (request.origin, std::mem::take(&mut request.observations)))
        .collect();
    let checkpoints: Vec<Checkpoint> = group
        .iter()
        .filter_map(|request| request.checkpoint.clone())
        .collect();
    let now_ms = clock.now_ms();
    // A fenced request always forms a group of its own (see `run`).
    let fence = group.first().and_then(|request| request.fence.clone());
    let outcome = match &fence {
        None => store
            .feedback_log()
            .append(now_ms, batches, checkpoints, log::encode_entry)
            .await
            .map(UnderLease::Done),
        Some(fence) => {
            store
                .feedback_log()
                .append_fenced(fence, now_ms, batches, checkpoints, log::encode_entry)
                .await
        }
    };
    match outcome {
        Ok(UnderLease::LeaseLost) => {
            for request in group {
                let _ = request.reply.send(Ok(UnderLease::LeaseLost));
            }
        }
        Ok(UnderLease::Done(log::Appended { entries, counts })) => {
            if !entries.is_empty() {
                tracing::debug!(
                    appended = entries.len(),
                    head = entries.last().map_or(0, |entry| entry.sequence),
                    "feedback log appended"
                );
            }
            hub.publish(entries).await;
            for (request, counts) in group.into_iter().zip(counts) {
                FeedbackStats::add(&stats.created, counts.created);
                FeedbackStats::add(&stats.updated, counts.updated);
                FeedbackStats::add(&stats.unchanged, counts.unchanged);
                FeedbackStats::add(&stats.ignored, counts.ignored);
                let _ = request.reply.send(Ok(UnderLease::Done(counts)));
            }
        }
        Err(error) => {
            if let Some(suppressed) = failure_log.admit() {
                tracing::error!(
                    %error,
                    requests = group.len(),
                    suppressed,
                    "cannot append to the feedback log"
                );
            }
            let error = Error::from(error);
            for request in group {
                let _ = request.reply.send(Err(error.clone()));
            }
        }
    }
}
