//! Scenario 6: fan-out. Many FeedbackStream subscribers, new responses at a steady rate for a
//! while: delivery latency from the moment an item entered the gateway's log (its `log_time`)
//! to each subscriber, the share delivered, and the gateway's resident memory per idle stream.
//! Then the same with a tenth of the subscribers stalled (they never read), which must neither
//! slow the healthy ones nor let the gateway's memory grow without bound.
//!
//! Two runs, each on a fresh gateway process so memory figures do not inherit each other's
//! allocations. Subscribers share connections (200 streams on each, under the gateway's default
//! limit of 256 concurrent streams per connection). Stalled subscribers get connections of their
//! own with HTTP/2's default 64 KiB stream window, as a stuck client would have: once the window
//! is full, whatever the gateway keeps for them is the gateway's memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;
use cx_sandbox::{SandboxConfig, SeedConfig};
use tokio::sync::{Semaphore, watch};
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use super::percent;
use super::raw_rpc::mib;
use crate::hist::{Latencies, Summary};
use crate::process::{Binaries, connect, connect_with, cpu_time, rss_bytes};
use crate::report::{ScenarioReport, Status};
use crate::stage::{Caller, Stage};
use cx_gateway::pb::feedback_stream_client::FeedbackStreamClient;
use cx_gateway::pb::subscribe_request::Start;
use cx_gateway::pb::subscribe_response::Payload;
use cx_gateway::pb::{FeedbackEventKind, StreamPosition, SubscribeRequest};

const STREAMS_PER_CONNECTION: usize = 200;
const STALLED_PER_CONNECTION: usize = 100;
/// HTTP/2's initial window (RFC 9113): what a client that never reads still accepts.
const STALLED_STREAM_WINDOW: u32 = 65_535;
const STALLED_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Streams opened before the memory baseline is read, so one-time allocations of the first
/// subscriptions (hub, tasks, codec buffers) are not charged to every stream.
const WARM_STREAMS: usize = 10;
const ITEMS_PER_SECOND: u64 = 10;
/// Subscriptions being opened at once.
const OPENING_AT_ONCE: usize = 500;
/// A stalled subscriber may cost the gateway at most about one stream window of data.
const STALLED_BOUND_BYTES: u64 = 64 * 1024;
/// How long idle streams may settle before their memory is read.
const SETTLE: Duration = Duration::from_secs(2);
const OPEN_TIMEOUT: Duration = Duration::from_secs(180);

/// What one run measured.
#[derive(Debug, Default)]
struct RunFigures {
    healthy: usize,
    stalled: usize,
    opened: usize,
    open_failures: BTreeMap<String, u64>,
    items: u64,
    delivered: u64,
    latency: Summary,
    rss_before: u64,
    rss_idle: u64,
    rss_peak: u64,
    rss_end: u64,
    healthy_errors: BTreeMap<String, u64>,
    stalled_ends: BTreeMap<String, u64>,
    /// From the first item published to the end of delivery.
    delivery_wall: Duration,
    gateway_cpu: Duration,
    generator_cpu: Duration,
}

impl RunFigures {
    fn expected(&self) -> u64 {
        self.items * self.healthy as u64
    }

    fn idle_bytes_per_stream(&self) -> f64 {
        let streams = self.opened.saturating_sub(WARM_STREAMS).max(1);
        self.rss_idle.saturating_sub(self.rss_before) as f64 / streams as f64
    }

    fn growth(&self) -> u64 {
        self.rss_peak.saturating_sub(self.rss_before)
    }
}

pub async fn run(
    report: &mut ScenarioReport,
    binaries: &Binaries,
    quick: bool,
) -> anyhow::Result<()> {
    let (subscribers, duration) = if quick {
        (1_000, Duration::from_secs(10))
    } else {
        (10_000, Duration::from_secs(60))
    };
    let stalled = subscribers / 10;
    let Some(unstalled_run) = one_run(binaries, subscribers, 0, duration).await? else {
        report.status = Status::NotRun(
            "FeedbackStream.Subscribe answers UNIMPLEMENTED in this build".to_owned(),
        );
        return Ok(());
    };
    describe(report, "", &unstalled_run);
    let Some(stalled_run) = one_run(binaries, subscribers - stalled, stalled, duration).await?
    else {
        bail!("Subscribe disappeared between the two runs");
    };
    describe(report, "stalled run: ", &stalled_run);

    let per_stream = unstalled_run.idle_bytes_per_stream();
    report.figure(
        "resident memory per idle stream",
        per_stream / 1024.0,
        "KiB",
    );
    report.compared(
        "healthy p99 with 10% stalled (vs none stalled)",
        stalled_run.latency.p99_us / 1_000.0,
        unstalled_run.latency.p99_us / 1_000.0,
        "ms",
    );
    report.compared(
        "peak RSS growth with 10% stalled (vs none stalled)",
        mib(stalled_run.growth()),
        mib(unstalled_run.growth()),
        "MiB",
    );
    report.target(
        "delivered",
        "100%",
        format!(
            "{:.3}%",
            percent(
                unstalled_run.delivered as f64,
                unstalled_run.expected() as f64
            )
        ),
        unstalled_run.expected() > 0 && unstalled_run.delivered == unstalled_run.expected(),
    );
    report.target(
        "delivered to healthy subscribers with 10% stalled",
        "100%",
        format!(
            "{:.3}%",
            percent(stalled_run.delivered as f64, stalled_run.expected() as f64)
        ),
        stalled_run.expected() > 0 && stalled_run.delivered == stalled_run.expected(),
    );
    report.target(
        "memory per idle stream",
        "<= 8 KiB",
        format!("{:.2} KiB", per_stream / 1024.0),
        per_stream <= 8.0 * 1024.0,
    );
    let p99_ratio =
        stalled_run.latency.p99_us / unstalled_run.latency.p99_us.max(f64::MIN_POSITIVE);
    report.target(
        "healthy p99 with 10% stalled",
        "within 10% of the unstalled run",
        format!("{:.2} x", p99_ratio),
        p99_ratio <= 1.10,
    );
    let extra = stalled_run.growth().saturating_sub(unstalled_run.growth());
    let bound = STALLED_BOUND_BYTES * stalled as u64;
    report.target(
        "memory bounded with 10% stalled",
        format!(
            "extra peak growth <= {} KiB per stalled subscriber",
            STALLED_BOUND_BYTES / 1024
        ),
        format!(
            "{:.1} KiB per stalled subscriber ({:.1} MiB in all)",
            extra as f64 / 1024.0 / stalled.max(1) as f64,
            mib(extra)
        ),
        extra <= bound,
    );
    report.note(format!(
        "{ITEMS_PER_SECOND} new responses per second for {} s; latency from the item's log_time \
         to its arrival at each subscriber (same machine clock)",
        duration.as_secs()
    ));
    Ok(())
}

fn describe(report: &mut ScenarioReport, prefix: &str, run: &RunFigures) {
    report.figure(
        format!("{prefix}healthy subscribers"),
        run.healthy as f64,
        "",
    );
    if run.stalled > 0 {
        report.figure(
            format!("{prefix}stalled subscribers"),
            run.stalled as f64,
            "",
        );
    }
    report.figure(format!("{prefix}items published"), run.items as f64, "");
    report.figure(
        format!("{prefix}deliveries expected"),
        run.expected() as f64,
        "",
    );
    report.figure(
        format!("{prefix}deliveries received"),
        run.delivered as f64,
        "",
    );
    report.figure(
        format!("{prefix}delivery latency p50"),
        run.latency.p50_us / 1_000.0,
        "ms",
    );
    report.figure(
        format!("{prefix}delivery latency p99"),
        run.latency.p99_us / 1_000.0,
        "ms",
    );
    report.figure(
        format!("{prefix}delivery latency p99.9"),
        run.latency.p999_us / 1_000.0,
        "ms",
    );
    report.figure(
        format!("{prefix}delivery latency max"),
        run.latency.max_us / 1_000.0,
        "ms",
    );
    report.figure(
        format!("{prefix}gateway RSS before streams"),
        mib(run.rss_before),
        "MiB",
    );
    report.figure(
        format!("{prefix}gateway RSS with idle streams"),
        mib(run.rss_idle),
        "MiB",
    );
    report.figure(
        format!("{prefix}gateway RSS peak"),
        mib(run.rss_peak),
        "MiB",
    );
    report.figure(
        format!("{prefix}gateway RSS at the end"),
        mib(run.rss_end),
        "MiB",
    );
    let wall = run.delivery_wall.as_secs_f64().max(f64::MIN_POSITIVE);
    report.figure(
        format!("{prefix}gateway CPU while delivering"),
        run.gateway_cpu.as_secs_f64() / wall,
        "cores",
    );
    report.figure(
        format!("{prefix}gateway CPU per delivery"),
        run.gateway_cpu.as_secs_f64() * 1e6 / run.delivered.max(1) as f64,
        "us",
    );
    report.figure(
        format!("{prefix}bench process CPU while delivering"),
        run.generator_cpu.as_secs_f64() / wall,
        "cores",
    );
    if !run.open_failures.is_empty() {
        report.note(format!(
            "{prefix}subscriptions that failed to open: {:?}",
            run.open_failures
        ));
    }
    if !run.healthy_errors.is_empty() {
        report.note(format!(
            "{prefix}healthy streams that ended early: {:?}",
            run.healthy_errors
        ));
    }
    if !run.stalled_ends.is_empty() {
        report.note(format!(
            "{prefix}stalled streams when finally read: {:?}",
            run.stalled_ends
        ));
    }
}

/// What one subscriber task reports.
#[derive(Default)]
struct SubscriberOutcome {
    latencies_us: Vec<u32>,
    open_error: Option<String>,
    error: Option<String>,
    stalled_end: Option<String>,
}

struct Shared {
    opening: Semaphore,
    opened: AtomicUsize,
    failed: AtomicUsize,
    delivered: AtomicU64,
}

/// One run on a fresh gateway; `None` when Subscribe is not served.
async fn one_run(
    binaries: &Binaries,
    healthy: usize,
    stalled: usize,
    duration: Duration,
) -> anyhow::Result<Option<RunFigures>> {
    let sandbox = SandboxConfig {
        retently_requests_per_minute: 0,
        // No history: every item in the log is one this run publishes.
        seed: SeedConfig {
            feedback: 0,
            ..SeedConfig::default()
        },
        ..SandboxConfig::default()
    };
    let total = healthy + stalled;
    let settings = [
        ("CXGW_FEEDBACK_POLL_INTERVAL", "1s".to_owned()),
        ("CXGW_FEEDBACK_MAX_SUBSCRIBERS", (total + 1_000).to_string()),
        ("CXGW_RETENTLY_REQUESTS_PER_MINUTE", "6000".to_owned()),
    ];
    let stage = Stage::start(binaries, sandbox, &settings).await?;
    let result = drive(&stage, healthy, stalled, duration).await;
    stage.stop().await;
    result
}

async fn drive(
    stage: &Stage,
    healthy: usize,
    stalled: usize,
    duration: Duration,
) -> anyhow::Result<Option<RunFigures>> {
    let addr = stage.grpc_addr();
    let pid = stage.gateway.pid();
    let probe = FeedbackStreamClient::new(connect(addr).await?)
        .subscribe(stage.caller.request(latest(), None))
        .await;
    match probe {
        Err(status) if status.code() == tonic::Code::Unimplemented => return Ok(None),
        Err(status) => bail!("Subscribe failed: {status}"),
        Ok(stream) => drop(stream),
    }

    let mut healthy_channels = Vec::new();
    for _ in 0..healthy.div_ceil(STREAMS_PER_CONNECTION) {
        healthy_channels.push(connect(addr).await?);
    }
    let mut stalled_channels = Vec::new();
    for _ in 0..stalled.div_ceil(STALLED_PER_CONNECTION) {
        stalled_channels.push(
            connect_with(addr, |endpoint| {
                endpoint
                    .initial_stream_window_size(STALLED_STREAM_WINDOW)
                    .initial_connection_window_size(STALLED_CONNECTION_WINDOW)
            })
            .await?,
        );
    }

    let shared = Arc::new(Shared {
        opening: Semaphore::new(OPENING_AT_ONCE),
        opened: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        delivered: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(healthy + stalled);
    let spawn = |channel: &Channel, is_stalled: bool| {
        tokio::spawn(subscriber(
            FeedbackStreamClient::new(channel.clone()),
            stage.caller.clone(),
            is_stalled,
            Arc::clone(&shared),
            stop_rx.clone(),
        ))
    };

    // A few streams first, then the memory baseline, then everyone else.
    let warm = WARM_STREAMS.min(healthy);
    for index in 0..warm {
        tasks.push(spawn(
            &healthy_channels[index / STREAMS_PER_CONNECTION],
            false,
        ));
    }
    wait_opened(&shared, warm).await?;
    let rss_before = rss_bytes(pid)?;
    for index in warm..healthy {
        tasks.push(spawn(
            &healthy_channels[index / STREAMS_PER_CONNECTION],
            false,
        ));
    }
    for index in 0..stalled {
        tasks.push(spawn(
            &stalled_channels[index / STALLED_PER_CONNECTION],
            true,
        ));
    }
    wait_opened(&shared, healthy + stalled).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_idle = rss_bytes(pid)?;

    // Peak memory while items flow.
    let (sampler_stop, mut sampler_stopped) = watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut peak = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Ok(rss) = rss_bytes(pid) {
                        peak = peak.max(rss);
                    }
                }
                _ = sampler_stopped.wait_for(|stop| *stop) => break,
            }
        }
        peak
    });

    let cpu_start = (cpu_time(pid)?, cpu_time(std::process::id())?);
    let delivery_start = Instant::now();
    let mut items = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1_000 / ITEMS_PER_SECOND));
    let publish_until = Instant::now() + duration;
    while Instant::now() < publish_until {
        tick.tick().await;
        items += stage.handle().simulate_feedback(1).len() as u64;
    }
    // Delivery ends when every healthy subscriber has every item, or a few poll intervals after
    // the last one was published.
    let expected = items * healthy as u64;
    let give_up = Instant::now() + Duration::from_secs(15);
    while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivery_wall = delivery_start.elapsed();
    let gateway_cpu = cpu_time(pid)?.saturating_sub(cpu_start.0);
    let generator_cpu = cpu_time(std::process::id())?.saturating_sub(cpu_start.1);
    let rss_end = rss_bytes(pid)?;
    let _ = sampler_stop.send(true);
    let rss_peak = sampler.await.unwrap_or(0).max(rss_end);

    let _ = stop_tx.send(true);
    let mut latencies = Latencies::new();
    let mut figures = RunFigures {
        healthy,
        stalled,
        items,
        rss_before,
        rss_idle,
        rss_peak,
        rss_end,
        delivery_wall,
        gateway_cpu,
        generator_cpu,
        ..RunFigures::default()
    };
    for task in tasks {
        let Ok(outcome) = task.await else {
            *figures
                .healthy_errors
                .entry("task panicked".into())
                .or_default() += 1;
            continue;
        };
        if let Some(error) = outcome.open_error {
            *figures.open_failures.entry(error).or_default() += 1;
            continue;
        }
        figures.opened += 1;
        figures.delivered += outcome.latencies_us.len() as u64;
        latencies.extend(outcome.latencies_us.iter().map(|&us| u64::from(us) * 1_000));
        if let Some(error) = outcome.error {
            *figures.healthy_errors.entry(error).or_default() += 1;
        }
        if let Some(end) = outcome.stalled_end {
            *figures.stalled_ends.entry(end).or_default() += 1;
        }
    }
    figures.latency = latencies.summary();
    Ok(Some(figures))
}

/// Waits until `count` subscriptions have their first message (or failed to open).
async fn wait_opened(shared: &Shared, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + OPEN_TIMEOUT;
    loop {
        let done = shared.opened.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        if done >= count {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("only {done} of {count} subscriptions opened within {OPEN_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn latest() -> SubscribeRequest {
    SubscribeRequest {
        filter: None,
        start: Some(Start::Position(StreamPosition::Latest as i32)),
    }
}

async fn subscriber(
    mut client: FeedbackStreamClient<Channel>,
    caller: Caller,
    stalled: bool,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> SubscriberOutcome {
    let mut outcome = SubscriberOutcome::default();
    let opened = async {
        let _permit = shared.opening.acquire().await;
        let mut stream = client
            .subscribe(caller.request(latest(), None))
            .await?
            .into_inner();
        // The contract sends a Heartbeat at once: the stream is registered when it arrives.
        match stream.message().await? {
            Some(_) => Ok(stream),
            None => Err(tonic::Status::unavailable("ended before its first message")),
        }
    }
    .await;
    let mut stream = match opened {
        Ok(stream) => {
            shared.opened.fetch_add(1, Ordering::Relaxed);
            stream
        }
        Err(status) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            outcome.open_error = Some(status_class(&status));
            return outcome;
        }
    };

    if stalled {
        // Never reads until the run is over; then reads what is left to see how the gateway
        // treated it (buffered, or ended with SUBSCRIBER_TOO_SLOW).
        let _ = stop.wait_for(|stop| *stop).await;
        let mut buffered = 0u64;
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(Ok(Some(_))) => buffered += 1,
                Ok(Ok(None)) => break "ended".to_owned(),
                Ok(Err(status)) => break status_class(&status),
                Err(_) => break "still open".to_owned(),
            }
        };
        outcome.stalled_end = Some(if buffered > 0 {
            format!("{end} after more messages")
        } else {
            end
        });
        return outcome;
    }

    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            message = stream.message() => match message {
                Ok(Some(response)) => {
                    if let Some(Payload::FeedbackEvent(event)) = response.payload
                        && event.kind == FeedbackEventKind::Created as i32
                    {
                        let latency = event
                            .log_time
                            .and_then(|t| {
                                let logged = SystemTime::UNIX_EPOCH
                                    + Duration::new(
                                        u64::try_from(t.seconds).ok()?,
                                        u32::try_from(t.nanos).ok()?,
                                    );
                                SystemTime::now().duration_since(logged).ok()
                            })
                            .unwrap_or_default();
                        outcome
                            .latencies_us
                            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
                        shared.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(None) => {
                    outcome.error = Some("ended".to_owned());
                    break;
                }
                Err(status) => {
                    outcome.error = Some(status_class(&status));
                    break;
                }
            },
        }
    }
    outcome
}

/// A status as `CODE` or `CODE/REASON` when it carries an ErrorInfo.
fn status_class(status: &tonic::Status) -> String {
    match status.get_details_error_info() {
        Some(info) => format!("{:?}/{}", status.code(), info.reason),
        None => format!("{:?}", status.code()),
    }
}
