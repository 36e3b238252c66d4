//! `run(listeners, config, shutdown)`: builds every service, serves gRPC and the admin port, and
//! drains gracefully.
//!
//! Shutdown order: the `shutdown` future resolves → health turns NOT_SERVING and `/readyz` 503
//! while everything keeps serving for the drain delay (`CXGW_DRAIN_DELAY`), so load balancers
//! move away before anything closes → the drain signal tells streams to finish, the listeners to
//! stop accepting, the outbox to claim nothing more and the upstream lanes to send no more
//! background work → in-flight unary calls and outbox deliveries complete within the grace
//! period (`CXGW_SHUTDOWN_GRACE`) → return. A delivery refused by the lanes goes back to pending;
//! whatever is still running when the grace period ends is cut.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::alerts::evaluator::Evaluator;
use crate::alerts::sender::{AlertAwareExecutor, AlertSender};
use crate::app::App;
use crate::auth::AuthLayer;
use crate::config::Config;
use crate::domain::writes::WriteExecutor;
use crate::feedback::{Clock, Feedback, FeedbackSettings, FeedbackSource};
use crate::grpc;
use crate::grpc::deadline::DeadlineLayer;
use crate::pb;
use crate::reload::{self, Reloadable};
use crate::shutdown;
use crate::telemetry;
use crate::telemetry::grpc::TelemetryLayer;
use crate::tls::{self, ReloadingTls};

/// Time after the grace period for the background workers to record what they were doing when
/// it ended (the outbox worker stops at the end of the grace by itself).
const BACKGROUND_STOP_MARGIN: Duration = Duration::from_secs(1);

/// The sockets the gateway serves on, bound by the caller so tests can use `127.0.0.1:0`.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
    /// The Segment intake's port, when `CXGW_SEGMENT_LISTEN_ADDR` turns it on.
    pub segment: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("cannot bind the grpc address {}", config.grpc_addr))?;
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot bind the admin address {}", config.admin_addr))?;
        let segment = match &config.segment {
            Some(segment) => Some(TcpListener::bind(segment.listen_addr).await.with_context(
                || {
                    format!(
                        "cannot bind the segment intake address {}",
                        segment.listen_addr
                    )
                },
            )?),
            None => None,
        };
        Ok(Listeners {
            grpc,
            admin,
            segment,
        })
    }
}

/// The health "service" liveness and startup probes ask for: SERVING for as long as the process
/// answers, unlike the overall status (""), which readiness probes ask for and which is
/// NOT_SERVING while start-up recovery keeps failing or draining runs. A gateway waiting for room
/// on a full volume is alive and must not be restarted in a loop; it is only not ready. (The
/// Kubernetes documentation suggests this very name for telling the probes apart.)
pub const LIVENESS_SERVICE: &str = "liveness";

/// How often idempotency records past their window are deleted.
const IDEMPOTENCY_PURGE_EVERY: Duration = Duration::from_secs(600);

/// The fully qualified names of the gateway's own services, as health and reflection report them.
pub const SERVICE_NAMES: [&str; 5] = [
    <pb::customer_service_server::CustomerServiceServer<grpc::CustomerApi> as NamedService>::NAME,
    <pb::survey_service_server::SurveyServiceServer<grpc::SurveyApi> as NamedService>::NAME,
    <pb::event_service_server::EventServiceServer<grpc::EventApi> as NamedService>::NAME,
    <grpc::FeedbackApi as NamedService>::NAME,
    <pb::delivery_service_server::DeliveryServiceServer<grpc::DeliveryApi> as NamedService>::NAME,
];

/// The message limits and compression of a unary service: requests and responses up to `$max`
/// bytes, gzip either way. A macro because the generated servers share no trait for these
/// settings.
macro_rules! with_message_settings {
    ($server:expr, $max:expr) => {
        $server
            .max_decoding_message_size($max)
            .max_encoding_message_size($max)
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
    };
}

pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let grpc_addr = listeners.grpc.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let (drain_trigger, drain) = shutdown::channel();
    // Flips first, at the signal: readiness and health say "go away" while all still serves.
    let (stopping_trigger, stopping) = shutdown::channel();
    let shutdown_grace = config.shutdown_grace;
    let drain_delay = config.drain_delay;
    let app = Arc::new(App::open(config, drain.clone()).await?);
    let config = Arc::clone(&app.config);
    telemetry::register_store_probes(&app);
    // Asynchronous writes are delivered from the outbox by one worker, replaying each through
    // the same code as a synchronous call.
    // Alerts are deliveries of the outbox too, put on the wire by their own sender.
    app.spawn_background(app.outbox.clone().run_worker(
        Arc::new(AlertAwareExecutor {
            alerts: AlertSender::new(app.config.alert_rules.clone())?,
            writes: WriteExecutor {
                app: Arc::clone(&app),
            },
        }),
        drain.clone(),
        app.readiness.clone(),
    ));
    app.spawn_background(
        app.idempotency
            .clone()
            .run_purge(IDEMPOTENCY_PURGE_EVERY, drain.clone()),
    );
    // A networked store that stops answering makes the replica not ready until it answers
    // again; claims resume at once when it does.
    if let Some(probe) = app.store.health_probe() {
        let outbox = app.outbox.clone();
        app.spawn_background(crate::store::health::watch(
            Arc::clone(probe),
            crate::store::health::HealthSettings::default(),
            app.readiness.clone(),
            drain.clone(),
            move || outbox.notify(),
        ));
    }
    // Replicas sharing a database send their surveys through one of them (see `spool`).
    if let Some(spool) = app.retently.survey_spool() {
        app.spawn_background(crate::upstream::retently::spool::run_sender(
            Arc::clone(spool),
            app.retently.clone(),
            drain.clone(),
        ));
    }
    if let (Some(cooldown), true) = (config.survey_cooldown, config.survey_cooldown_backfill) {
        app.spawn_background(crate::domain::fatigue::backfill(Arc::clone(&app), cooldown));
    }

    let callers = config.auth.callers.clone();
    if let Some(listener) = listeners.segment {
        // Keys are read now, so a broken key file stops the start rather than the first request.
        let keys =
            crate::segment::keys::WriteKeys::load(callers.clone(), config.auth.reload_interval)
                .map_err(|reason| anyhow::anyhow!("cannot start the segment intake: {reason}"))?;
        tracing::info!(
            addr = %listener.local_addr()?,
            write_keys = keys.len(),
            authenticated = keys.authenticates(),
            "segment intake serving"
        );
        if keys.authenticates() && keys.is_empty() {
            tracing::warn!(
                "the segment intake is on but no caller has segment_write_key_files, so every request is refused"
            );
        }
        let intake = Arc::new(crate::segment::Intake::new(Arc::clone(&app), keys));
        app.spawn_background(crate::segment::serve(listener, intake, drain.clone()));
    }
    match &callers {
        Some(registry) => tracing::info!(
            callers = registry.current().len(),
            setting = registry.source().setting(),
            "authenticating callers"
        ),
        None if config.auth.trusted_mesh => tracing::warn!(
            "authentication is off: CXGW_TRUSTED_MESH=true says the mesh in front authenticates \
             every caller; every call that reaches this port is accepted"
        ),
        None => tracing::warn!(
            "authentication is off: no callers configured (CXGW_CALLERS_FILE or CXGW_CALLERS), so \
             every call is accepted; fine for trying the sandbox, never for real traffic"
        ),
    }
    let tls = match config.tls.clone() {
        Some(settings) => Some(Arc::new(
            ReloadingTls::load(settings).context("cannot set up tls on the grpc port")?,
        )),
        None => None,
    };
    reload::spawn(
        Reloadable {
            callers: callers.clone(),
            tls: tls.clone(),
            rules: Some(Arc::clone(&config.event_rules)),
            alert_rules: config.alert_rules.clone(),
        },
        config.auth.reload_interval,
        drain.clone(),
    );
    // The feedback pipeline: the log, its one appender, retention and the Retently poller.
    let (feedback, workers) = Feedback::open(
        app.store.clone(),
        FeedbackSettings::from_config(&config.feedback, &config.webhook),
        Some(Arc::new(app.retently.clone()) as Arc<dyn FeedbackSource>),
        Clock::system(),
        drain.clone(),
    )
    .await
    .context("cannot open the feedback log")?;
    let feedback = Arc::new(feedback);
    feedback.register_metrics();
    if let Some(rules) = config.alert_rules.clone() {
        let evaluator = Evaluator {
            log: feedback.log().clone(),
            hub: Arc::clone(feedback.hub()),
            rules: rules.clone(),
            store: Arc::clone(app.store.alerts()),
            outbox: app.outbox.clone(),
            keep_keys: (!config.feedback.retention.is_zero()).then_some(config.feedback.retention),
            drain: drain.clone(),
        };
        // Before the feedback workers start, so the first responses they log are evaluated.
        let from = evaluator
            .start_position()
            .await
            .context("cannot read the alert checkpoint")?;
        let current = rules.current();
        for rule in current.iter() {
            crate::alerts::metrics::register_rule(&rule.name);
        }
        tracing::info!(
            rules = current.len(),
            file = %rules.path().display(),
            after_sequence = from,
            "alert rules in force"
        );
        app.spawn_background(evaluator.run());
    }
    for worker in workers {
        app.spawn_background(worker);
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    // Health answers SERVING only once the outbox recovered what was in flight at the last stop,
    // and only while the store answers. The first recovery attempt is awaited, so a healthy
    // store is SERVING from the first answer on; one whose recovery keeps failing stays
    // NOT_SERVING (and `/readyz` 503) until a retry succeeds.
    app.readiness.first_attempt().await;
    let ready = app.readiness.is_ready();
    // The overall status ("") is what Kubernetes probes ask for by default.
    for name in SERVICE_NAMES.into_iter().chain([""]) {
        health.set_service_status(name, serving_status(ready)).await;
    }
    health
        .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    // Follows readiness (a retried recovery that succeeds, a store lost and back); stopped
    // before the drain sets NOT_SERVING, so it can never overwrite that.
    let follow_health = {
        let health = health.clone();
        let readiness = app.readiness.clone();
        tokio::spawn(async move {
            let mut ready = ready;
            loop {
                ready = readiness.changed_from(ready).await;
                for name in SERVICE_NAMES.into_iter().chain([""]) {
                    health.set_service_status(name, serving_status(ready)).await;
                }
            }
        })
    };

    let limits = &config.limits;
    let max_message = limits.max_message_bytes;
    let mut router = Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
        .max_connection_age(limits.max_connection_age)
        // A connection past its age gets this long to finish what it has in flight.
        .max_connection_age_grace(config.shutdown_grace)
        .layer(
            tower::ServiceBuilder::new()
                // The server span and RPC metrics; outermost, so it sees every final status
                // (refused calls included).
                .layer(TelemetryLayer::new(grpc_addr))
                // Who is calling and may they call this RPC; names the caller on the call's span.
                .layer(AuthLayer::new(callers))
                // Every call gets a deadline, and an expired one is DEADLINE_EXCEEDED.
                .layer(DeadlineLayer::new(limits.default_deadline)),
        )
        .add_service(health_service)
        .add_service(with_message_settings!(
            pb::customer_service_server::CustomerServiceServer::new(grpc::CustomerApi::new(
                Arc::clone(&app),
            )),
            max_message
        ))
        .add_service(with_message_settings!(
            pb::survey_service_server::SurveyServiceServer::new(grpc::SurveyApi::new(
                Arc::clone(&app),
                feedback.log().clone(),
            )),
            max_message
        ))
        .add_service(with_message_settings!(
            pb::event_service_server::EventServiceServer::new(grpc::EventApi::new(Arc::clone(
                &app,
            ))),
            max_message
        ))
        .add_service(
            // Responses are not compressed: each event is encoded once and the same bytes go to
            // every subscriber, while compression would redo the work per subscriber and keep
            // two more buffers for the life of every stream.
            grpc::FeedbackApi::new(Arc::clone(feedback.hub()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message)
                .accept_compressed(CompressionEncoding::Gzip),
        )
        .add_service(with_message_settings!(
            pb::delivery_service_server::DeliveryServiceServer::new(grpc::DeliveryApi::new(
                Arc::clone(&app),
            )),
            max_message
        ));
    if config.reflection {
        // Both versions: grpcurl 1.8.6 and many other tools still speak only v1alpha.
        router = router
            .add_service(
                reflection()
                    .build_v1()
                    .context("cannot build reflection v1")?,
            )
            .add_service(
                reflection()
                    .build_v1alpha()
                    .context("cannot build reflection v1alpha")?,
            );
    }

    type ServeFuture =
        std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let grpc_server: ServeFuture = match tls.clone() {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            tls::incoming(listeners.grpc, tls, drain.clone()),
            drain.clone().signaled(),
        )),
        None => Box::pin(router.serve_with_incoming_shutdown(
            TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
            drain.clone().signaled(),
        )),
    };
    let admin_router = crate::admin::router(stopping.clone(), app.readiness.clone())
        .merge(crate::admin::feedback_routes(&feedback));
    let admin_server = axum::serve(listeners.admin, admin_router)
        .with_graceful_shutdown(drain.clone().signaled())
        .into_future();

    tracing::info!(
        %grpc_addr,
        %admin_addr,
        tls = tls.is_some(),
        mutual_tls = config.tls.as_ref().is_some_and(|tls| tls.client_ca_file.is_some()),
        "gateway serving"
    );
    let mut grpc_server = std::pin::pin!(grpc_server);
    let mut admin_server = std::pin::pin!(admin_server);
    tokio::select! {
        () = shutdown => {}
        result = &mut grpc_server => {
            return result.context("the grpc server stopped unexpectedly");
        }
        result = &mut admin_server => {
            result.context("the admin server stopped unexpectedly")?;
            anyhow::bail!("the admin server stopped unexpectedly");
        }
    }

    tracing::info!(
        delay = %humantime::format_duration(drain_delay),
        "stopping: reporting not serving, still serving until the drain"
    );
    stopping_trigger.start();
    // A start-up recovery that succeeds or a store that returns from now on must not report
    // SERVING again.
    follow_health.abort();
    let _ = follow_health.await;
    for name in SERVICE_NAMES.into_iter().chain([""]) {
        health
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    // The listeners keep accepting (and the outbox keeps delivering) during the delay.
    tokio::select! {
        () = tokio::time::sleep(drain_delay) => {}
        result = &mut grpc_server => {
            return result.context("the grpc server stopped unexpectedly");
        }
        result = &mut admin_server => {
            result.context("the admin server stopped unexpectedly")?;
            anyhow::bail!("the admin server stopped unexpectedly");
        }
    }

    tracing::info!(grace = %humantime::format_duration(shutdown_grace), "draining");
    let drain_deadline = tokio::time::Instant::now() + shutdown_grace;
    drain_trigger.start();
    // Nothing new leaves for the upstreams on the outbox's behalf: a delivery still waiting for
    // the budget comes back refused (and pending), so only requests already sent are waited for.
    app.retently.close_background();
    app.retainly.close_background();
    let drained = tokio::time::timeout_at(drain_deadline, async {
        let (grpc_result, admin_result) = tokio::join!(grpc_server, admin_server);
        grpc_result.context("the grpc server failed while draining")?;
        admin_result.context("the admin server failed while draining")
    })
    .await;
    match drained {
        Ok(result) => {
            result?;
            tracing::info!("connections drained");
        }
        Err(_elapsed) => tracing::warn!(
            grace = %humantime::format_duration(shutdown_grace),
            "grace period elapsed, closing the remaining connections"
        ),
    }
    // Workers saw the drain signal at the same moment. The outbox worker waits for its started
    // deliveries until the grace ends and then stops by itself; the others only finish the step
    // they are in (everything they do is durable and resumes at the next start).
    let remaining = drain_deadline.saturating_duration_since(tokio::time::Instant::now());
    app.stop_background(remaining + BACKGROUND_STOP_MARGIN)
        .await;
    tracing::info!("drained");
    // Last, so the spans and metrics of the drain itself are delivered too.
    telemetry::flush().await;
    Ok(())
}

fn serving_status(ready: bool) -> tonic_health::ServingStatus {
    if ready {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    }
}

/// Reflection over the gateway's contract, the `google.rpc` error details and the health service.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(pb::ERROR_DETAILS_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Waits for SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this is called, not when
/// the future is first polled: the server logs "gateway serving" before it polls it, and a SIGTERM
/// in between would otherwise end the process with no drain. Call it inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let interrupt = received(interrupt, |error| {
            tracing::error!(%error, "cannot listen for SIGINT");
        });
        let terminate = received(terminate, |error| {
            tracing::error!(%error, "cannot listen for SIGTERM, only SIGINT will stop the gateway");
        });
        tokio::select! {
            () = interrupt => tracing::info!("received SIGINT"),
            () = terminate => tracing::info!("received SIGTERM"),
        }
    }
}

/// Resolves when `signal` arrives; never when it cannot be listened for (after `failed` logged
/// why), so the other signal still stops the gateway.
async fn received(
    signal: std::io::Result<tokio::signal::unix::Signal>,
    failed: impl FnOnce(std::io::Error),
) {
    match signal {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(error) => {
            failed(error);
            std::future::pending::<()>().await;
        }
    }
}
