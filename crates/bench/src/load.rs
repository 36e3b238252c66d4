//! Load generation: closed-loop (a fixed number of callers, each sending its next request when the
//! previous one answers) and open-loop (requests at a fixed rate whatever the server does).
//!
//! Open-loop latency is measured from each request's *intended* send time, not from when it was
//! actually sent: a server that stalls for 100 ms then delays every request scheduled in those
//! 100 ms, and measuring from the actual send would hide exactly that (coordinated omission). The
//! schedule runs on its own OS thread with `std::thread::sleep`, whose wake-ups are precise to
//! tens of microseconds, rather than on the runtime's millisecond timer wheel; how late the
//! generator itself was is reported separately (`send_lag`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::hist::{Latencies, Summary};

/// A request outcome: `Err` carries a short error class (a gRPC code name, an HTTP status).
pub type Outcome = Result<(), String>;

/// What one load run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadResult {
    /// Requests answered successfully within the measurement window.
    pub ok: u64,
    /// Failed requests within the window, by error class.
    pub errors: BTreeMap<String, u64>,
    /// Length of the measurement window.
    pub window_s: f64,
    /// Successful requests per second in the window.
    pub rps: f64,
    /// Latency of the successful requests (open-loop: from the intended send time).
    pub latency: Summary,
    /// Open-loop only: how late the generator sent requests compared with the schedule.
    pub send_lag: Option<Summary>,
    /// Open-loop only: requests not sent because too many were outstanding.
    pub not_sent: u64,
    /// Every request completed, warm-up included (for CPU per request).
    pub completed_total: u64,
}

impl LoadResult {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Folds another run of the same target into this one (interleaved rounds).
    pub fn merge(results: &[LoadResult], latencies: &Latencies, lag: Option<&Latencies>) -> Self {
        let mut merged = LoadResult::default();
        for result in results {
            merged.ok += result.ok;
            merged.window_s += result.window_s;
            merged.not_sent += result.not_sent;
            merged.completed_total += result.completed_total;
            for (class, count) in &result.errors {
                *merged.errors.entry(class.clone()).or_default() += count;
            }
        }
        merged.rps = if merged.window_s > 0.0 {
            merged.ok as f64 / merged.window_s
        } else {
            0.0
        };
        merged.latency = latencies.summary();
        merged.send_lag = lag.map(Latencies::summary);
        merged
    }
}

/// A closed-loop run: `callers` tasks, each with its next request as soon as the last answered.
#[derive(Debug, Clone, Copy)]
pub struct ClosedLoop {
    pub callers: usize,
    /// Runs before measuring, to open connections and warm caches and allocators.
    pub warmup: Duration,
    pub measure: Duration,
}

/// Runs `call(caller_index)` in a closed loop and adds the latencies to `latencies`.
pub async fn closed_loop<F, Fut>(spec: ClosedLoop, latencies: &mut Latencies, call: F) -> LoadResult
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.measure;
    let mut tasks = Vec::with_capacity(spec.callers);
    for caller in 0..spec.callers {
        let call = Arc::clone(&call);
        tasks.push(tokio::spawn(async move {
            let mut samples: Vec<u64> = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut completed = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let outcome = call(caller).await;
                let done = Instant::now();
                completed += 1;
                // Only requests that both started and finished inside the window count, so the
                // rate is not inflated by work begun during the warm-up.
                if sent < measure_from || done > end {
                    continue;
                }
                match outcome {
                    Ok(()) => samples.push(nanos(done - sent)),
                    Err(class) => *errors.entry(class).or_default() += 1,
                }
            }
            (samples, errors, completed)
        }));
    }
    let mut result = LoadResult {
        window_s: spec.measure.as_secs_f64(),
        ..LoadResult::default()
    };
    for task in tasks {
        match task.await {
            Ok((samples, errors, completed)) => {
                result.ok += samples.len() as u64;
                result.completed_total += completed;
                latencies.extend(samples);
                for (class, count) in errors {
                    *result.errors.entry(class).or_default() += count;
                }
            }
            Err(_) => {
                *result
                    .errors
                    .entry("caller task panicked".into())
                    .or_default() += 1
            }
        }
    }
    result.rps = result.ok as f64 / result.window_s;
    result
}

/// An open-loop run at a fixed rate.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoop {
    pub rate_per_s: f64,
    pub warmup: Duration,
    pub measure: Duration,
    /// Requests outstanding at once before the generator stops sending (and counts `not_sent`):
    /// bounds memory if the target stops answering.
    pub max_outstanding: usize,
}

/// Samples of an open-loop run: (from intended send time, how late the send was), nanoseconds.
type OpenSamples = Arc<Mutex<(Vec<u64>, Vec<u64>, BTreeMap<String, u64>)>>;

/// Runs `call(request_index)` at `spec.rate_per_s`; adds latencies from the intended send time
/// to `latencies` and the generator's lateness to `lag`.
pub async fn open_loop<F, Fut>(
    spec: OpenLoop,
    latencies: &mut Latencies,
    lag: &mut Latencies,
    call: F,
) -> LoadResult
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let call = Arc::new(call);
    let runtime = tokio::runtime::Handle::current();
    let samples: OpenSamples = Arc::new(Mutex::new((Vec::new(), Vec::new(), BTreeMap::new())));
    let outstanding = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    // Every request task holds a sender; the channel closes when the scheduler and all of them
    // are done, which is the signal that the run is complete.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    let period = Duration::from_secs_f64(1.0 / spec.rate_per_s.max(0.001));
    let total = ((spec.warmup + spec.measure).as_secs_f64() * spec.rate_per_s).ceil() as usize;

    let scheduler = {
        let samples = Arc::clone(&samples);
        let outstanding = Arc::clone(&outstanding);
        let completed = Arc::clone(&completed);
        std::thread::Builder::new()
            .name("bench-open-loop".into())
            .spawn(move || {
                let start = Instant::now();
                let measure_from = start + spec.warmup;
                let mut not_sent = 0u64;
                for index in 0..total {
                    let intended = start + period.mul_f64(index as f64);
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    let measured = intended >= measure_from;
                    if outstanding.load(Ordering::Relaxed) >= spec.max_outstanding {
                        if measured {
                            not_sent += 1;
                        }
                        continue;
                    }
                    outstanding.fetch_add(1, Ordering::Relaxed);
                    let call = Arc::clone(&call);
                    let samples = Arc::clone(&samples);
                    let outstanding = Arc::clone(&outstanding);
                    let completed = Arc::clone(&completed);
                    let done_tx = done_tx.clone();
                    runtime.spawn(async move {
                        let sent = Instant::now();
                        let outcome = call(index).await;
                        let done = Instant::now();
                        outstanding.fetch_sub(1, Ordering::Relaxed);
                        completed.fetch_add(1, Ordering::Relaxed);
                        if measured && let Ok(mut samples) = samples.lock() {
                            match outcome {
                                Ok(()) => {
                                    samples.0.push(nanos(done - intended));
                                    samples
                                        .1
                                        .push(nanos(sent.saturating_duration_since(intended)));
                                }
                                Err(class) => *samples.2.entry(class).or_default() += 1,
                            }
                        }
                        drop(done_tx);
                    });
                }
                // The last clone goes with the scheduler; the channel closes when every request
                // task has finished too.
                drop(done_tx);
                not_sent
            })
    };
    let not_sent = match scheduler {
        // The scheduler thread sleeps between sends; wait for it off the runtime.
        Ok(thread) => tokio::task::spawn_blocking(move || thread.join())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0),
        Err(error) => {
            tracing::warn!(%error, "cannot start the open-loop scheduler thread");
            0
        }
    };
    // Waits for the last requests; each has its own timeout, so this ends.
    while done_rx.recv().await.is_some() {}

    let (ok_samples, lag_samples, errors) = match samples.lock() {
        Ok(mut guard) => std::mem::take(&mut *guard),
        Err(_) => Default::default(),
    };
    let mut result = LoadResult {
        ok: ok_samples.len() as u64,
        errors,
        window_s: spec.measure.as_secs_f64(),
        not_sent,
        completed_total: completed.load(Ordering::Relaxed),
        ..LoadResult::default()
    };
    result.rps = result.ok as f64 / result.window_s;
    latencies.extend(ok_samples);
    lag.extend(lag_samples);
    result
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A gRPC status as an error class.
pub fn grpc_class(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closed_loop_counts_only_the_window() {
        let mut latencies = Latencies::new();
        let result = closed_loop(
            ClosedLoop {
                callers: 4,
                warmup: Duration::from_millis(20),
                measure: Duration::from_millis(100),
            },
            &mut latencies,
            |caller| async move {
                tokio::task::yield_now().await;
                if caller == 0 {
                    Err("Unavailable".to_owned())
                } else {
                    Ok(())
                }
            },
        )
        .await;
        assert!(result.ok > 0);
        assert_eq!(latencies.count(), result.ok);
        assert!(result.errors.get("Unavailable").copied().unwrap_or(0) > 0);
        assert_eq!(result.errors.len(), 1);
    }

    #[tokio::test]
    async fn open_loop_sends_at_the_rate_and_waits_for_every_request() {
        let mut latencies = Latencies::new();
        let mut lag = Latencies::new();
        let result = open_loop(
            OpenLoop {
                rate_per_s: 1_000.0,
                warmup: Duration::ZERO,
                measure: Duration::from_millis(200),
                max_outstanding: 1_000,
            },
            &mut latencies,
            &mut lag,
            |_| async { Ok(()) },
        )
        .await;
        // Exactly the scheduled number of requests, whatever the machine's speed.
        assert_eq!(result.ok, 200);
        assert_eq!(result.not_sent, 0);
        assert_eq!(lag.count(), 200);
    }
}
