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
    // Stops the decision log's RabbitMQ copies once the log is flushed at shutdown.
    let audit_publish_stop = CancellationToken::new();
    let config_publishes = config.audit.as_ref().is_some_and(|a| a.publish.is_some());
    let audit_block_timeout = config
        .audit
        .as_ref()
        .map(|a| a.block_timeout)
        .unwrap_or_default();
    let audit = match &config.audit {
        Some(a) => {
            let publish = a.publish.clone().map(|p| {
                AuditPublisher::start(
                    p,
                    config.server.instance.clone(),
                    audit_publish_stop.clone(),
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
                instance: config.server.instance.clone(),
                publish,
            })
            .map_err(|e| AppError::Start {
                what: "the decision log",
                message: e.to_string(),
            })?;
            shared.set_audit(handle.clone());
            shared.set_events(Arc::new(handle.clone()));
            Some(handle)
        }
        None => None,
    };
    let dlq_cfg = config.dlq.clone();
    let redact = config
        .audit
        .as_ref()
        .map(|a| a.redact_headers.clone())
        .unwrap_or_else(|| {
            vec![
                "authorization".into(),
                "cookie".into(),
                "proxy-authorization".into(),
            ]
        });
    let replayable: Vec<String> = config
        .routes
        .iter()
        .filter(|r| r.replayable)
        .map(|r| r.name.to_string())
        .collect();
    // The DLQ needs the proxy (to replay) and the proxy's stacks need the DLQ: the sink is
    // attached before the first snapshot, the replay target holds the proxy weakly.
    let dlq_shutdown = CancellationToken::new();
    let replay_target = Arc::new(LateReplay::default());
    let dlq = match &dlq_cfg {
        Some(d) => {
            let (handle, tasks) = crate::dlq::start(
                crate::dlq::DlqSettings {
                    amqp_url: d.amqp_url.clone(),
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
                    routes: replayable.clone(),
                    redact_headers: redact.clone(),
                },
                replay_target.clone(),
                dlq_shutdown.clone(),
            )
            .map_err(|e| AppError::Start {
                what: "the DLQ spool",
                message: e.to_string(),
            })?;
            shared.set_dlq(Arc::new(crate::proxy::replay::DlqSink {
                handle: handle.clone(),
                redact: redact.clone(),
            }));
            Some((handle, tasks))
        }
        None => None,
    };
    let proxy = Proxy::with_shared(config, shared)?;
    replay_target.set(Arc::new(crate::proxy::replay::ProxyReplay {
        proxy: Arc::downgrade(&proxy),
    }));
    metrics::gauge!(telemetry::CONFIG_GENERATION).set(1.0);

    let installer: Installer = {
        let proxy = proxy.clone();
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
                if old
                    .config
                    .audit
                    .as_ref()
                    .map(|a| (&a.path, &a.key_id, &a.publish))
                    != config
                        .audit
                        .as_ref()
                        .map(|a| (&a.path, &a.key_id, &a.publish))
                {
                    tracing::warn!("[audit] path, key or publish changes take effect on restart");
                }
                reload::refuse_restart_only(&old.config, &config)?;
                let snapshot = proxy.install(config)?;
                if let Some(events) = proxy.shared.events() {
                    events.emit(
                        "config_reload",
                        serde_json::json!({
                            "trigger": trigger,
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
    };
    let reloader = Reloader::new(config_path, hash, 1, installer);

    // Background tasks stop on `background`, after the data plane has drained.
    let background = CancellationToken::new();
    let tracker = TaskTracker::new();
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

    let admin_state = Arc::new(AdminState {
        proxy: proxy.clone(),
        reloader: reloader.clone(),
        metrics,
        listeners_ready: false.into(),
        audit: audit.clone(),
        dlq: dlq.as_ref().map(|(h, _)| h.clone()),
    });
    let data_addr = listeners.data.local_addr().ok();
    let admin_addr = listeners.admin.local_addr().ok();
    tracker.spawn(admin::serve(
        listeners.admin,
        admin_state.clone(),
        background.clone(),
    ));
    let data = tokio::spawn(server::serve(
        listeners.data,
        proxy.clone(),
        shutdown.clone(),
    ));
    admin_state.listeners_ready.store(true, Ordering::Release);
    tracing::info!(data = ?data_addr, admin = ?admin_addr, "breakwater serving");

    shutdown.cancelled().await;
    admin_state.listeners_ready.store(false, Ordering::Release);
    tracing::info!("shutdown requested: no new connections; draining in-flight requests");
    let grace_ends = tokio::time::Instant::now() + proxy.snapshot().config.server.shutdown_grace;
    let _ = data.await;
    if let Some(audit) = &audit {
        // Every answered request's record is on disk before the process exits, within
        // what is left of the grace (at least `block_timeout_ms`): a dead disk must not
        // hold the shutdown.
        let left = grace_ends.saturating_duration_since(tokio::time::Instant::now());
        audit.close(left.max(audit_block_timeout)).await;
    }
    if config_publishes {
        // The last copies get a moment to reach the broker; any left are in the file.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    audit_publish_stop.cancel();
    dlq_shutdown.cancel();
    if let Some((_, tasks)) = dlq {
        for t in tasks {
            let _ = t.await;
        }
    }
    background.cancel();
    tracker.close();
    tracker.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Breakers move from open to half-open by the clock, not by an event: refresh their
/// gauges every second, and count the seconds each route spends degraded.
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
            if breaker_down || !state.ai.enabled() {
                metrics::counter!(telemetry::DEGRADED_SECONDS, "route" => name.clone())
                    .increment(1);
            }
        }
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

    fn replay(&self, env: &crate::dlq::Envelope) -> crate::dlq::ReplayFuture {
        match self.inner.get() {
            Some(t) => t.replay(env),
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
