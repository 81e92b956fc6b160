//! Process wiring: takes already-bound listeners and a shutdown token (so tests run a real
//! proxy on port 0), spawns the tracked background tasks and drains on shutdown.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::audit::{AuditPublisher, AuditSettings};
use crate::config::reload::{self, Installer, Reloader};
use crate::config::{Config, ConfigErrors};
use crate::proxy::{Proxy, Shared};
use crate::{server, telemetry};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid config: {0}")]
    Config(#[from] ConfigErrors),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start {what}: {message}")]
    Start { what: &'static str, message: String },
}

pub struct Listeners {
    pub data: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses the config names.
    pub async fn bind(config: &Config) -> Result<Listeners, AppError> {
        let data = server::bind(config.server.listen)
            .await
            .map_err(|source| AppError::Bind {
                what: "the data plane",
                addr: config.server.listen,
                source,
            })?;
        let admin = server::bind(config.server.admin_listen)
            .await
            .map_err(|source| AppError::Bind {
                what: "the admin API",
                addr: config.server.admin_listen,
                source,
            })?;
        Ok(Listeners { data, admin })
    }
}

/// Runs until `shutdown` is cancelled, then stops accepting, drains in-flight requests for
/// up to `server.shutdown_grace_ms` and stops the background tasks.
pub async fn run(
    config_path: PathBuf,
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let metrics = telemetry::install();
    let hash = config.hash.clone();
    let watch = config.server.watch_config;
    let shared = Shared::default();
    // Which RabbitMQ node each connection is on, for the admin API.
    let connections = crate::amqp::Connections::default();
    let audit = start_audit(&config, &shared, &connections)?;
    if let Some(a) = &config.access_log {
        let log = crate::access_log::AccessLog::start(a).map_err(|e| AppError::Start {
            what: "the access log",
            message: e.to_string(),
        })?;
        shared.set_access_log(log);
    }
    if let Some(t) = &config.tracing {
        let tracing =
            crate::otel::Tracing::start(t, &config.server.instance).map_err(|message| {
                AppError::Start {
                    what: "tracing",
                    message,
                }
            })?;
        shared.set_tracing(Arc::new(tracing));
    }
    // The DLQ needs the proxy (to replay) and the proxy's stacks need the DLQ: the sink is
    // attached before the first snapshot, the replay target holds the proxy weakly.
    let replay_target = Arc::new(LateReplay::default());
    let dlq = start_dlq(&config, &shared, replay_target.clone(), &connections)?;
    let proxy = build_proxy(config, shared, &replay_target)?;
    let reloader = Reloader::new(config_path, hash, 1, installer(proxy.clone()));
    // Background tasks stop on `background`, after the data plane has drained.
    let background = CancellationToken::new();
    let tracker = TaskTracker::new();
    spawn_background(&tracker, &proxy, &reloader, &metrics, watch, &background);
    let admin_state = Arc::new(AdminState {
        proxy: proxy.clone(),
        reloader,
        metrics,
        lifecycle: admin::readiness::Lifecycle::default(),
        audit: audit.as_ref().map(|a| a.handle.clone()),
        dlq: dlq.as_ref().map(|d| d.handle.clone()),
        amqp: connections,
    });
    let data = serve(listeners, &admin_state, &tracker, &background, &shutdown);
    shutdown.cancelled().await;
    stop(Stopping {
        proxy,
        admin_state,
        data,
        audit,
        dlq,
        background,
        tracker,
    })
    .await;
    Ok(())
}

/// The decision log and what its shutdown needs.
struct Audit {
    handle: crate::audit::AuditHandle,
    /// Stops the decision log's RabbitMQ copies once the log is flushed at shutdown.
    publish_stop: CancellationToken,
    publishes: bool,
    block_timeout: std::time::Duration,
}

/// Starts the decision log when the config has an `[audit]` section.
fn start_audit(
    config: &Config,
    shared: &Shared,
    connections: &crate::amqp::Connections,
) -> Result<Option<Audit>, AppError> {
    let Some(a) = &config.audit else {
        return Ok(None);
    };
    let publish_stop = CancellationToken::new();
    let instance = config.server.instance.clone();
    let publish = a.publish.clone().map(|p| {
        AuditPublisher::start(
            p,
            instance.clone(),
            connections.clone(),
            publish_stop.clone(),
        )
        .0
    });
    let (handle, _thread) = crate::audit::start(AuditSettings {
        path: a.path.clone(),
        hmac_key: a.hmac_key.clone(),
        key_id: a.key_id.clone(),
        rotate_bytes: a.rotate_bytes,
        retention_days: a.retention_days,
        on_full_drop: a.on_full_drop,
        channel_capacity: a.channel_capacity,
        fsync_interval: a.fsync_interval,
        fsync_max_records: a.fsync_max_records,
        block_timeout: a.block_timeout,
        instance,
        publish,
        checkpoint: a.checkpoint.clone(),
    })
    .map_err(|e| AppError::Start {
        what: "the decision log",
        message: e.to_string(),
    })?;
    shared.set_audit(handle.clone());
    shared.set_events(Arc::new(handle.clone()));
    Ok(Some(Audit {
        handle,
        publish_stop,
        publishes: a.publish.is_some(),
        block_timeout: a.block_timeout,
    }))
}

/// The DLQ and what its shutdown needs.
struct Dlq {
    handle: crate::dlq::DlqHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
}

/// Starts the spool and the replay workers when a route is replayable (the validator then
/// always provides a `[dlq]`), and attaches the sink the proxy's DLQ layer hands off to.
fn start_dlq(
    config: &Config,
    shared: &Shared,
    replay_target: Arc<LateReplay>,
    connections: &crate::amqp::Connections,
) -> Result<Option<Dlq>, AppError> {
    let Some(d) = &config.dlq else {
        return Ok(None);
    };
    // Client credentials are always dropped by the envelope; this list adds to them.
    let redact = config
        .audit
        .as_ref()
        .map(|a| a.redact_headers.clone())
        .unwrap_or_default();
    let routes = config
        .routes
        .iter()
        .filter(|r| r.replayable)
        .map(|r| r.name.to_string())
        .collect();
    let stop = CancellationToken::new();
    let (handle, tasks) = crate::dlq::start(
        dlq_settings(d, routes, connections),
        replay_target,
        stop.clone(),
    )
    .map_err(|e| AppError::Start {
        what: "the DLQ spool",
        message: e.to_string(),
    })?;
    shared.set_dlq(Arc::new(crate::proxy::replay::DlqSink {
        handle: handle.clone(),
        redact,
    }));
    Ok(Some(Dlq {
        handle,
        tasks,
        stop,
    }))
}

/// The DLQ's runtime settings from its validated config.
fn dlq_settings(
    d: &crate::config::DlqConfig,
    routes: Vec<String>,
    connections: &crate::amqp::Connections,
) -> crate::dlq::DlqSettings {
    crate::dlq::DlqSettings {
        amqp_url: d.amqp_url.clone(),
        connections: connections.clone(),
        exchange: d.exchange.clone(),
        results_exchange: d.results_exchange.clone(),
        spool: crate::dlq::spool::SpoolSettings {
            dir: d.spool_dir.clone(),
            max_bytes: d.spool_max_bytes,
            segment_bytes: d.segment_bytes,
            fsync_interval: d.fsync_interval,
        },
        replay_rate_per_s: d.replay_rate_per_s,
        max_replay_attempts: d.max_replay_attempts,
        delivery_limit: d.delivery_limit,
        prefetch: d.prefetch,
        confirm_timeout: d.confirm_timeout,
        queued_wait: d.queued_wait,
        routes,
    }
}

/// Builds the proxy's first generation and points the replay target at it.
fn build_proxy(
    config: Config,
    shared: Shared,
    replay_target: &LateReplay,
) -> Result<Arc<Proxy>, AppError> {
    telemetry::register_series(&config);
    let proxy = Proxy::with_shared(config, shared)?;
    replay_target.set(Arc::new(crate::proxy::replay::ProxyReplay {
        proxy: Arc::downgrade(&proxy),
    }));
    metrics::gauge!(telemetry::CONFIG_GENERATION).set(1.0);
    Ok(proxy)
}

/// What every reload trigger hands a validated config to: refuses restart-only changes,
/// installs the rest and records the reload in the decision log.
fn installer(proxy: Arc<Proxy>) -> Installer {
    Arc::new(move |config: Config, trigger: &str| {
        let proxy = proxy.clone();
        let trigger = trigger.to_string();
        Box::pin(async move {
            let old = proxy.snapshot();
            if old.config.server.listen != config.server.listen
                || old.config.server.admin_listen != config.server.admin_listen
            {
                tracing::warn!("listen addresses changed: they take effect on restart");
            }
            reload::refuse_restart_only(&old.config, &config)?;
            telemetry::register_series(&config);
            let routes_changed = old.config.routes_changed(&config);
            let snapshot = proxy.install(config)?;
            if let Some(events) = proxy.shared.events() {
                events.emit(
                    "config_reload",
                    serde_json::json!({
                        "trigger": trigger,
                        "routes_changed": routes_changed,
                        "config_gen": snapshot.generation,
                        "config_hash_before": old.config.hash,
                        "config_hash_after": snapshot.config.hash,
                    }),
                    trigger.strip_prefix("admin:"),
                );
            }
            Ok(snapshot.generation)
        })
    })
}

/// Telemetry upkeep, route gauges and the reload triggers (file watch, SIGHUP).
fn spawn_background(
    tracker: &TaskTracker,
    proxy: &Arc<Proxy>,
    reloader: &Arc<Reloader>,
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
    watch: bool,
    background: &CancellationToken,
) {
    tracker.spawn(telemetry::upkeep(metrics.clone(), background.clone()));
    tracker.spawn(route_gauges(proxy.clone(), background.clone()));
    if watch {
        match reload::watch_file(reloader.clone(), background.clone()) {
            Ok(task) => {
                tracker.spawn(async move {
                    let _ = task.await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /admin/reload")
            }
        }
    }
    match reload::on_sighup(reloader.clone(), background.clone()) {
        Ok(task) => {
            tracker.spawn(async move {
                let _ = task.await;
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot install the SIGHUP handler"),
    }
}

/// Starts the admin API (a background task) and the data plane (stops on `shutdown`), then
/// reports ready.
fn serve(
    listeners: Listeners,
    admin_state: &Arc<AdminState>,
    tracker: &TaskTracker,
    background: &CancellationToken,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let data_addr = listeners.data.local_addr().ok();
    let admin_addr = listeners.admin.local_addr().ok();
    tracker.spawn(admin::serve(
        listeners.admin,
        admin_state.clone(),
        background.clone(),
    ));
    let data = tokio::spawn(server::serve(
        listeners.data,
        admin_state.proxy.clone(),
        shutdown.clone(),
    ));
    admin_state
        .lifecycle
        .listeners_ready
        .store(true, Ordering::Release);
    tracing::info!(data = ?data_addr, admin = ?admin_addr, "breakwater serving");
    data
}

/// Everything the shutdown sequence stops, in order.
struct Stopping {
    proxy: Arc<Proxy>,
    admin_state: Arc<AdminState>,
    data: tokio::task::JoinHandle<()>,
    audit: Option<Audit>,
    dlq: Option<Dlq>,
    background: CancellationToken,
    tracker: TaskTracker,
}

/// Drains the data plane, flushes and closes the decision log within the grace, stops the
/// DLQ, then the background tasks.
async fn stop(s: Stopping) {
    s.admin_state
        .lifecycle
        .draining
        .store(true, Ordering::Release);
    tracing::info!("shutdown requested: no new connections; draining in-flight requests");
    let grace_ends = tokio::time::Instant::now() + s.proxy.snapshot().config.server.shutdown_grace;
    let _ = s.data.await;
    if let Some(audit) = &s.audit {
        close_audit(audit, grace_ends).await;
    }
    if let Some(t) = s.proxy.shared.tracing().cloned() {
        // The last spans go to the collector, within its export timeout at most.
        let within = s
            .proxy
            .snapshot()
            .config
            .tracing
            .as_ref()
            .map_or(std::time::Duration::from_secs(5), |c| c.export_timeout);
        let _ = tokio::task::spawn_blocking(move || t.shutdown(within)).await;
    }
    if let Some(log) = s.proxy.shared.access_log().cloned() {
        // The writer thread is fast; a dead disk must not hold the shutdown.
        let _ =
            tokio::task::spawn_blocking(move || log.flush(std::time::Duration::from_secs(1))).await;
    }
    if let Some(dlq) = s.dlq {
        dlq.stop.cancel();
        for t in dlq.tasks {
            let _ = t.await;
        }
    }
    s.background.cancel();
    s.tracker.close();
    s.tracker.wait().await;
    tracing::info!("stopped");
}

/// Every answered request's record is on disk before the process exits, within what is
/// left of the grace (at least `block_timeout_ms`): a dead disk must not hold the shutdown.
async fn close_audit(audit: &Audit, grace_ends: tokio::time::Instant) {
    let left = grace_ends.saturating_duration_since(tokio::time::Instant::now());
    audit.handle.close(left.max(audit.block_timeout)).await;
    if audit.publishes {
        // The last copies get a moment to reach the broker; any left are in the file.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    audit.publish_stop.cancel();
}

/// Breakers move from open to half-open by the clock, not by an event: refresh their
/// gauges every second, and count the seconds each route spends degraded (breaker open or
/// forced open, AI disabled, or its last answer refused as unapproved).
async fn route_gauges(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = tokio::time::Instant::now();
        let snapshot = proxy.snapshot();
        for (name, state) in &snapshot.states {
            let breaker_down = state.breaker.as_ref().is_some_and(|b| {
                b.publish_state(now);
                matches!(
                    b.state(now),
                    crate::breaker::BreakerState::Open | crate::breaker::BreakerState::ForcedOpen
                )
            });
            // Answers refused as unapproved leave the route on its fallbacks too.
            let degraded = breaker_down || !state.ai.enabled() || state.unapproved.get();
            if degraded {
                metrics::counter!(telemetry::DEGRADED_SECONDS, "route" => name.clone())
                    .increment(1);
            }
            let route = snapshot.config.route(name);
            track_rto(&proxy, name, route.map(|r| &**r), state, degraded, now);
        }
    }
}

/// One tick of a route's degraded episode: the gauge; a `route_degraded` event when it
/// starts and a `route_recovered` event when it ends (so degraded time is provable from the
/// chain alone, `audit report`); and exactly one `rto_exceeded` event and error log per
/// episode that outlasts `rto_s`.
fn track_rto(
    proxy: &Proxy,
    name: &str,
    route: Option<&crate::config::RouteConfig>,
    state: &crate::proxy::RouteState,
    degraded: bool,
    now: tokio::time::Instant,
) {
    use crate::rto::Step;
    let rto = route.and_then(|r| r.rto);
    let step = state.episode.observe(degraded, rto, now);
    let lasted = match step {
        Step::Healthy | Step::Started | Step::Recovered { .. } => 0.0,
        Step::Degraded(d) | Step::Exceeded(d) => d.as_secs_f64(),
    };
    metrics::gauge!(telemetry::DEGRADED_EPISODE_SECONDS, "route" => name.to_string()).set(lasted);
    let rto_s = rto.map(|r| r.as_secs());
    let criticality = route.map(|r| r.criticality.as_str()).unwrap_or("medium");
    // What the route looks like now: why it is degraded, under which config.
    let situation = |event: &str, degraded_s: Option<u64>| {
        if let Some(events) = proxy.shared.events() {
            let mut detail = serde_json::json!({
                "route": name,
                "criticality": criticality,
                "rto_s": rto_s,
                "breaker_state": state.breaker.as_ref().map(|b| b.state(now).as_str()),
                "ai_enabled": state.ai.enabled(),
                "unapproved": state.unapproved.get(),
                "config_hash": proxy.snapshot().config.hash,
            });
            if let (Some(d), Some(obj)) = (degraded_s, detail.as_object_mut()) {
                obj.insert("degraded_s".into(), d.into());
            }
            events.emit(event, detail, None);
        }
    };
    match step {
        Step::Started => {
            tracing::warn!(route = %name, ?rto_s, criticality, "route degraded");
            situation("route_degraded", None);
        }
        Step::Exceeded(d) => {
            let rto_s = rto_s.unwrap_or_default();
            tracing::error!(route = %name, degraded_s = d.as_secs(), rto_s, criticality, "route degraded for longer than its RTO");
            situation("rto_exceeded", Some(d.as_secs()));
        }
        Step::Recovered { lasted, exceeded } => {
            if exceeded {
                tracing::warn!(route = %name, degraded_s = lasted.as_secs(), "route recovered after exceeding its RTO");
            } else {
                tracing::info!(route = %name, degraded_s = lasted.as_secs(), "route recovered");
            }
            if let Some(events) = proxy.shared.events() {
                events.emit(
                    "route_recovered",
                    serde_json::json!({
                        "route": name,
                        "degraded_s": lasted.as_secs_f64(),
                        "rto_s": rto_s,
                        "exceeded": exceeded,
                    }),
                    None,
                );
            }
        }
        Step::Healthy | Step::Degraded(_) => {}
    }
}

/// The replay target, filled in once the proxy exists (the DLQ starts first so the
/// proxy's first generation can already spool).
#[derive(Default)]
struct LateReplay {
    inner: std::sync::OnceLock<Arc<dyn crate::dlq::ReplayTarget>>,
}

impl LateReplay {
    fn set(&self, target: Arc<dyn crate::dlq::ReplayTarget>) {
        let _ = self.inner.set(target);
    }
}

impl crate::dlq::ReplayTarget for LateReplay {
    fn ready(&self, route: &str) -> bool {
        self.inner.get().is_some_and(|t| t.ready(route))
    }

    fn replay(
        &self,
        env: &crate::dlq::Envelope,
        kind: crate::dlq::ReplayKind,
    ) -> crate::dlq::ReplayFuture {
        match self.inner.get() {
            Some(t) => t.replay(env, kind),
            None => Box::pin(async {
                Err(crate::dlq::ReplayFailure {
                    reason: "starting".into(),
                    retryable: true,
                    attempted: false,
                })
            }),
        }
    }

    fn recorded(
        &self,
        env: &crate::dlq::Envelope,
        result: &Result<crate::dlq::ReplayAnswer, crate::dlq::ReplayFailure>,
    ) {
        if let Some(t) = self.inner.get() {
            t.recorded(env, result);
        }
    }
}
