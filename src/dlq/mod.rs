//! Dead-letter queue: replayable requests the AI did not answer are spooled locally
//! (fsync'd), drained in order to RabbitMQ with publisher confirms, and replayed to the AI
//! once it has recovered, with the answer published back for Magento.
//!
//! Request path: `DlqHandle::enqueue` (bounded wait for the group fsync). Background:
//! the drainer (spool -> RabbitMQ, or straight to replay with no broker configured) and
//! one replay worker per route (RabbitMQ -> AI -> results exchange).

pub mod envelope;
mod lanes;
pub mod parked;
mod publisher;
pub mod rabbit;
mod results;
pub mod spool;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio_util::sync::CancellationToken;

pub use envelope::Envelope;
use rabbit::{Link, RabbitError};
use spool::{SpoolSettings, SpoolWriter};

use crate::exchange::DlqOutcome;
use crate::telemetry;

#[derive(Debug, Clone)]
pub struct DlqSettings {
    /// The RabbitMQ nodes; `None`: spool only.
    pub amqp_url: Option<crate::amqp::Endpoints>,
    /// Where each connection reports the node it is on (admin API).
    pub connections: crate::amqp::Connections,
    pub exchange: String,
    pub results_exchange: String,
    pub spool: SpoolSettings,
    pub replay_rate_per_s: u32,
    pub max_replay_attempts: u32,
    pub delivery_limit: u32,
    pub prefetch: u16,
    pub confirm_timeout: Duration,
    /// How long `enqueue` waits for the broker's confirm before answering `spooled`.
    pub queued_wait: Duration,
    pub routes: Vec<String>,
}

impl DlqSettings {
    fn topology(&self) -> rabbit::Topology {
        rabbit::Topology {
            exchange: self.exchange.clone(),
            results_exchange: self.results_exchange.clone(),
            delivery_limit: self.delivery_limit,
        }
    }
}

/// The AI answer to a replayed request.
#[derive(Debug, Clone)]
pub struct ReplayAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub model_version: Option<String>,
    pub upstream: String,
    /// Delivered although its model version is not approved (`on_unapproved = "flag"`).
    pub unapproved: bool,
}

#[derive(Debug, Clone)]
pub struct ReplayFailure {
    pub reason: String,
    /// False when another try cannot help (the AI said the request itself is bad).
    pub retryable: bool,
    /// False when the AI was not called at all (breaker said no): no attempt is counted.
    pub attempted: bool,
}

pub type ReplayFuture = Pin<Box<dyn Future<Output = Result<ReplayAnswer, ReplayFailure>> + Send>>;

/// Why a message is replayed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayKind {
    /// The route is ready (breaker not open, AI on, not paused).
    Scheduled,
    /// An operator asked (`POST /admin/dlq/replay`): an automatic open period of the
    /// breaker ends early so the replay can probe the AI. The kill switch and a breaker
    /// forced open still refuse it.
    Operator,
}

/// What the replay worker needs from the proxy: is the AI back, send the request, record.
pub trait ReplayTarget: Send + Sync + 'static {
    /// Breaker closed and AI enabled for the route.
    fn ready(&self, route: &str) -> bool;
    fn replay(&self, env: &Envelope, kind: ReplayKind) -> ReplayFuture;
    /// Writes the decision record of a replay (`replayed` or `replay_failed`).
    fn recorded(&self, env: &Envelope, result: &Result<ReplayAnswer, ReplayFailure>);
}

#[derive(Debug, Default)]
struct RouteCounters {
    paused: AtomicBool,
    triggered: AtomicBool,
    replayed: AtomicU64,
    failed: AtomicU64,
    parked: AtomicU64,
}

struct Inner {
    settings: DlqSettings,
    writer: SpoolWriter,
    routes: Mutex<HashMap<String, Arc<RouteCounters>>>,
    publisher_connected: AtomicBool,
    /// The last connection attempt found no node (set on failure, cleared on success;
    /// false before the first attempt, which waits for the first message).
    broker_unreachable: AtomicBool,
    publisher_blocked: AtomicBool,
    started: std::time::Instant,
    pacers: Mutex<HashMap<String, Pacer>>,
    parked: parked::ParkedStore,
    /// The connection `GET /admin/dlq` reads queue depths on, kept between calls.
    admin_link: tokio::sync::Mutex<AdminLink>,
}

/// The admin connection and the connector that (re)opens it.
struct AdminLink {
    connector: Option<crate::amqp::Connector>,
    open: Option<(lapin::Connection, lapin::Channel)>,
}

/// The request side and the admin side of the DLQ. Cheap to clone.
#[derive(Clone)]
pub struct DlqHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DlqHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DlqHandle")
    }
}

impl DlqHandle {
    fn counters(&self, route: &str) -> Arc<RouteCounters> {
        let mut routes = match self.inner.routes.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        routes.entry(route.to_string()).or_default().clone()
    }

    /// Why the spool rejects new messages, while it does (readiness: degraded).
    pub fn spool_rejecting(&self) -> Option<String> {
        self.inner.writer.state.rejecting()
    }

    /// Why the broker counts as unreachable, while it does (readiness: degraded). Spool-only
    /// mode (no `amqp_url`) never is.
    pub fn broker_unreachable(&self) -> Option<String> {
        (self.inner.settings.amqp_url.is_some()
            && self.inner.broker_unreachable.load(Ordering::Relaxed))
        .then(|| "RabbitMQ is unreachable: DLQ messages stay in the local spool".to_string())
    }

    /// Spools the message; returns once it is fsync'd (`spooled`), or confirmed by
    /// RabbitMQ within `queued_wait` (`queued`), or could not be kept (`rejected`).
    pub async fn enqueue(&self, env: &Envelope) -> DlqOutcome {
        let payload = match serde_json::to_vec(env) {
            Ok(p) => Bytes::from(p),
            Err(_) => return self.count(&env.route, DlqOutcome::Rejected),
        };
        let msg_id = uuid::Uuid::parse_str(&env.msg_id)
            .map(|u| *u.as_bytes())
            .unwrap_or([0; 16]);
        let mut confirmed = self.inner.writer.state.confirmed.subscribe();
        let pos = match self.inner.writer.append(msg_id, payload).await {
            Ok(pos) => pos,
            Err(e) => {
                tracing::error!(route = %env.route, request_id = %env.request_id, error = %e, "DLQ message rejected");
                return self.count(&env.route, DlqOutcome::Rejected);
            }
        };
        if self.inner.settings.amqp_url.is_some()
            && self.inner.publisher_connected.load(Ordering::Relaxed)
        {
            let wait = confirmed.wait_for(|c| *c >= pos);
            if let Ok(Ok(_)) = tokio::time::timeout(self.inner.settings.queued_wait, wait).await {
                return self.count(&env.route, DlqOutcome::Queued);
            }
        }
        self.count(&env.route, DlqOutcome::Spooled)
    }

    /// Puts the locally parked messages of `route` back into the spool with a fresh attempt
    /// count (`POST /admin/dlq/parked/requeue?route=NAME`). Returns how many.
    pub async fn requeue_parked(&self, route: &str) -> Result<usize, spool::SpoolError> {
        let store = &self.inner.parked;
        let (entries, taken) = store.take(route)?;
        for entry in &entries {
            let mut env = entry.envelope.clone();
            env.attempts = 0;
            let payload = serde_json::to_vec(&env).map_err(std::io::Error::other)?;
            let msg_id = uuid::Uuid::parse_str(&env.msg_id)
                .map(|u| *u.as_bytes())
                .unwrap_or([0; 16]);
            // A failure leaves the taken file in place: a retry requeues it (again, for
            // the ones already back: same message id, so at most a repeated replay).
            self.inner
                .writer
                .append(msg_id, Bytes::from(payload))
                .await?;
        }
        if let Some(taken) = taken {
            store.done(&taken)?;
        }
        tracing::warn!(route, count = entries.len(), "parked DLQ messages requeued");
        Ok(entries.len())
    }

    fn count(&self, route: &str, outcome: DlqOutcome) -> DlqOutcome {
        metrics::counter!(telemetry::DLQ_MESSAGES, "route" => route.to_string(), "result" => outcome.as_str()).increment(1);
        outcome
    }

    pub fn pause(&self, route: Option<&str>, paused: bool) {
        let routes: Vec<String> = match route {
            Some(r) => vec![r.to_string()],
            None => self.inner.settings.routes.clone(),
        };
        for r in routes {
            self.counters(&r).paused.store(paused, Ordering::Relaxed);
        }
    }

    /// Replay now, even while paused or while the breaker has not closed yet: the replays
    /// probe the AI (see [`ReplayKind::Operator`]). The run ends when the queue is empty,
    /// or at the first replay the AI fails or the route refuses: the breaker's own schedule
    /// takes over from there, so one request spends one message's attempt, not all.
    pub fn trigger(&self, route: &str) {
        self.counters(route)
            .triggered
            .store(true, Ordering::Relaxed);
    }

    pub fn knows_route(&self, route: &str) -> bool {
        self.inner.settings.routes.iter().any(|r| r == route)
    }

    /// Queue and parked depths by passive declares on the admin connection, which is
    /// opened once and kept (only its channel is reopened: a passive declare of a missing
    /// queue closes it). Unknown depths are `None`.
    async fn queue_depths(&self) -> HashMap<String, (Option<u32>, Option<u32>)> {
        let mut guard = self.inner.admin_link.lock().await;
        let link = &mut *guard;
        let mut out = HashMap::new();
        let Some(connector) = link.connector.as_mut() else {
            return out;
        };
        if link
            .open
            .as_ref()
            .is_none_or(|(c, _)| !c.status().connected())
        {
            link.open = connector.connect(&[]).await.ok();
        }
        let Some((conn, ch)) = link.open.as_mut() else {
            return out;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        for r in &self.inner.settings.routes {
            let depth = |q: String| {
                let ch = ch.clone();
                async move {
                    ch.queue_declare(q.as_str().into(), passive, FieldTable::default())
                        .await
                        .ok()
                        .map(|q| q.message_count())
                }
            };
            let q = depth(rabbit::queue_name(r)).await;
            let p = depth(rabbit::parked_name(r)).await;
            out.insert(r.clone(), (q, p));
            if !ch.status().connected() {
                match conn.create_channel().await {
                    Ok(c) => *ch = c,
                    Err(_) => break,
                }
            }
        }
        out
    }

    /// For `GET /admin/dlq`.
    pub async fn status(&self) -> serde_json::Value {
        let state = &self.inner.writer.state;
        let oldest = state.oldest_ms.load(Ordering::Relaxed);
        let mut depths: HashMap<String, (Option<u32>, Option<u32>)> = HashMap::new();
        if self.inner.settings.amqp_url.is_some() {
            let probe = self.queue_depths();
            if let Ok(d) = tokio::time::timeout(Duration::from_secs(2), probe).await {
                depths = d;
            }
        }
        let connections = &self.inner.settings.connections;
        let uptime = self.inner.started.elapsed().as_secs_f64().max(1.0);
        let routes: serde_json::Map<String, serde_json::Value> = self
            .inner
            .settings
            .routes
            .iter()
            .map(|r| {
                let c = self.counters(r);
                let (depth, parked) = depths.get(r).copied().unwrap_or((None, None));
                (
                    r.clone(),
                    serde_json::json!({
                        "queue": rabbit::queue_name(r),
                        "queue_depth": depth,
                        "parked_depth": parked,
                        "paused": c.paused.load(Ordering::Relaxed),
                        "replayed": c.replayed.load(Ordering::Relaxed),
                        "replay_failed": c.failed.load(Ordering::Relaxed),
                        "parked": c.parked.load(Ordering::Relaxed),
                        "replay_rate_per_s_avg": c.replayed.load(Ordering::Relaxed) as f64 / uptime,
                        "replay_rate_limit_per_s": self.inner.settings.replay_rate_per_s,
                        "replay_connection": connections.get(&replay_connection_name(r)),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "broker": {
                "configured": self.inner.settings.amqp_url.is_some(),
                "connected": self.inner.publisher_connected.load(Ordering::Relaxed),
                "blocked": self.inner.publisher_blocked.load(Ordering::Relaxed),
                "nodes": self.inner.settings.amqp_url.as_ref().map(|e| (0..e.urls().len()).map(|i| e.masked(i)).collect::<Vec<_>>()),
                "publisher": connections.get(PUBLISHER_CONNECTION),
                "admin": connections.get(ADMIN_CONNECTION),
            },
            "spool": {
                "dir": state.dir.display().to_string(),
                "bytes": state.bytes(),
                "segments": state.segment_count(),
                "corrupt_records": state.corrupt.load(Ordering::Relaxed),
                "oldest_pending_age_s": if oldest == 0 { None } else { Some(spool::now_ms().saturating_sub(oldest) as f64 / 1000.0) },
            },
            "routes": routes,
        })
    }
}

/// Connection names (as `rabbitmqctl list_connections` shows them, and keys of
/// `amqp::Connections`).
const PUBLISHER_CONNECTION: &str = "breakwater-dlq-publisher";
const ADMIN_CONNECTION: &str = "breakwater-dlq-admin";

fn replay_connection_name(route: &str) -> String {
    format!("breakwater-replay-{route}")
}

/// Opens the spool and starts the drainer and the replay workers.
pub fn start(
    settings: DlqSettings,
    target: Arc<dyn ReplayTarget>,
    shutdown: CancellationToken,
) -> Result<(DlqHandle, Vec<tokio::task::JoinHandle<()>>), spool::SpoolError> {
    let (writer, recovery) = spool::open(settings.spool.clone())?;
    if recovery.records > 0 || recovery.corrupt > 0 {
        tracing::info!(
            records = recovery.records,
            corrupt = recovery.corrupt,
            truncated = recovery.truncated_bytes,
            "DLQ spool recovered"
        );
    }
    let inner = Arc::new(Inner {
        writer,
        routes: Mutex::new(HashMap::new()),
        publisher_connected: AtomicBool::new(false),
        broker_unreachable: AtomicBool::new(false),
        publisher_blocked: AtomicBool::new(false),
        started: std::time::Instant::now(),
        pacers: Mutex::new(HashMap::new()),
        parked: parked::ParkedStore::new(&settings.spool.dir),
        admin_link: tokio::sync::Mutex::new(AdminLink {
            connector: settings.amqp_url.clone().map(|e| {
                crate::amqp::Connector::new(
                    e,
                    "dlq_admin",
                    ADMIN_CONNECTION,
                    settings.connections.clone(),
                )
            }),
            open: None,
        }),
        settings,
    });
    let handle = DlqHandle {
        inner: inner.clone(),
    };
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(drain(
        handle.clone(),
        target.clone(),
        shutdown.clone(),
    )));
    if inner.settings.amqp_url.is_some() {
        for route in inner.settings.routes.clone() {
            tasks.push(tokio::spawn(replay_worker(
                handle.clone(),
                route,
                target.clone(),
                shutdown.clone(),
            )));
        }
    }
    Ok((handle, tasks))
}

async fn sleep_or_stop(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}

/// Spool -> RabbitMQ, in order, with a sliding window of confirms (see [`publisher`]); the
/// cursor moves only over confirmed records. With no broker configured, spool -> AI
/// directly once the route is ready.
async fn drain(handle: DlqHandle, target: Arc<dyn ReplayTarget>, shutdown: CancellationToken) {
    match handle.inner.settings.amqp_url.clone() {
        None => lanes::drain_locally(handle, target, shutdown).await,
        Some(endpoints) => publisher::run(handle.inner.clone(), endpoints, shutdown).await,
    }
}

/// The most a pacer catches up after a late wake-up or an idle spell.
const PACER_CATCH_UP: Duration = Duration::from_millis(50);

/// Paces replays to `rate` per second: a schedule, not a sleep per message (timers have
/// millisecond granularity, which would cap the rate near 1000/s). A late wake-up is made
/// up for, but never more than a twentieth of a second's worth: any one-second window holds
/// at most 5% over the pace, inside the fleet's +10% promise with room for timer jitter.
pub struct Pacer {
    interval: Duration,
    next: tokio::time::Instant,
}

impl Pacer {
    pub fn new(rate: u32) -> Self {
        Pacer {
            interval: Duration::from_secs_f64(1.0 / f64::from(rate.max(1))),
            next: tokio::time::Instant::now(),
        }
    }

    pub async fn wait(&mut self) {
        let now = tokio::time::Instant::now();
        let floor = now.checked_sub(PACER_CATCH_UP).unwrap_or(now);
        self.next = self.next.max(floor) + self.interval;
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
    }
}

#[allow(dead_code)]
fn delivery_count(props: &lapin::BasicProperties) -> u32 {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(n as u32),
            AMQPValue::LongInt(n) => Some(n as u32),
            AMQPValue::ShortInt(n) => Some(n as u32),
            AMQPValue::LongUInt(n) => Some(n),
            _ => None,
        })
        .unwrap_or(0)
}

/// RabbitMQ -> AI -> results exchange, for one route, on its own connection. Consumes only
/// while the route is ready (breaker closed, AI on) and not paused, at most
/// `replay_rate_per_s`, with manual acks and a bounded prefetch.
async fn replay_worker(
    handle: DlqHandle,
    route: String,
    target: Arc<dyn ReplayTarget>,
    shutdown: CancellationToken,
) {
    let Some(endpoints) = handle.inner.settings.amqp_url.clone() else {
        return;
    };
    let mut connector = crate::amqp::Connector::new(
        endpoints,
        "dlq_replay",
        replay_connection_name(&route),
        handle.inner.settings.connections.clone(),
    );
    let worker = Worker {
        inner: handle.inner.clone(),
        counters: handle.counters(&route),
        route,
        target,
        shutdown,
    };
    let mut attempt = 0u32;
    let mut pacer = Pacer::new(worker.inner.settings.replay_rate_per_s);
    loop {
        if worker.wait_until_wanted().await {
            return;
        }
        let (link, mut consumer) = match worker.open_consumer(&mut connector).await {
            Ok(c) => c,
            Err(e) => {
                attempt += 1;
                tracing::debug!(error = %e, route = %worker.route, "replay worker cannot consume from RabbitMQ");
                if sleep_or_stop(rabbit::reconnect_delay(attempt), &worker.shutdown).await {
                    return;
                }
                continue;
            }
        };
        attempt = 0;
        match worker.consume(&link, &mut consumer, &mut pacer).await {
            Step::Stop => return,
            Step::Reconnect => connector.lost(),
        }
    }
}

/// Why the consuming loop ended.
enum Step {
    /// Paused, not ready, or the link broke: close and wait for a reason to consume again.
    Reconnect,
    Stop,
}

/// One route's replay worker and what it reads.
struct Worker {
    inner: Arc<Inner>,
    counters: Arc<RouteCounters>,
    route: String,
    target: Arc<dyn ReplayTarget>,
    shutdown: CancellationToken,
}

impl Worker {
    fn wanted(&self) -> bool {
        self.counters.triggered.load(Ordering::Relaxed)
            || (!self.counters.paused.load(Ordering::Relaxed) && self.target.ready(&self.route))
    }

    /// Waits until there is a reason to consume; true when shutting down instead.
    async fn wait_until_wanted(&self) -> bool {
        while !self.wanted() {
            if sleep_or_stop(Duration::from_millis(250), &self.shutdown).await {
                return true;
            }
        }
        false
    }

    async fn open_consumer(
        &self,
        connector: &mut crate::amqp::Connector,
    ) -> Result<(Link, lapin::Consumer), RabbitError> {
        let name = connector.name().to_string();
        let mut link = Link::connect(connector, &self.inner.settings.topology()).await?;
        link.declare_route(&self.route).await?;
        link.channel
            .basic_qos(self.inner.settings.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = link
            .channel
            .basic_consume(
                rabbit::queue_name(&self.route).as_str().into(),
                name.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((link, consumer))
    }

    /// Takes deliveries while the route is wanted; unacked messages go back to the queue
    /// when the connection closes.
    async fn consume(
        &self,
        link: &Link,
        consumer: &mut lapin::Consumer,
        pacer: &mut Pacer,
    ) -> Step {
        loop {
            if !self.wanted() {
                let _ = link.conn.close(200, "replay paused".into()).await;
                return Step::Reconnect;
            }
            let next = tokio::select! {
                n = tokio::time::timeout(Duration::from_millis(500), consumer.next()) => n,
                _ = self.shutdown.cancelled() => {
                    let _ = link.conn.close(200, "shutdown".into()).await;
                    return Step::Stop;
                }
            };
            let delivery = match next {
                Err(_) => {
                    // Queue empty for now: a trigger is satisfied.
                    self.counters.triggered.store(false, Ordering::Relaxed);
                    continue;
                }
                Ok(None) | Ok(Some(Err(_))) => return Step::Reconnect,
                Ok(Some(Ok(d))) => d,
            };
            pacer.wait().await;
            if let Some(step) = self.replay_delivery(link, delivery).await {
                return step;
            }
        }
    }

    /// Replays one delivery and settles it; `Some` ends the consuming loop.
    async fn replay_delivery(
        &self,
        link: &Link,
        delivery: lapin::message::Delivery,
    ) -> Option<Step> {
        let env: Envelope = match serde_json::from_slice(&delivery.data) {
            Ok(e) => e,
            Err(e) => {
                let reason = format!("unreadable message: {e}");
                let parked = park(
                    link,
                    &self.route,
                    &delivery.data,
                    "unknown",
                    &reason,
                    &self.inner,
                )
                .await;
                settle(&delivery, parked, false).await;
                return None;
            }
        };
        let kind = if self.counters.triggered.load(Ordering::Relaxed) {
            ReplayKind::Operator
        } else {
            ReplayKind::Scheduled
        };
        let result = self.target.replay(&env, kind).await;
        self.target.recorded(&env, &result);
        if kind == ReplayKind::Operator && end_operator_run(&result) {
            self.counters.triggered.store(false, Ordering::Relaxed);
        }
        match result {
            Ok(answer) => {
                if self.publish_result(link, &env, &answer).await {
                    self.counters.replayed.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(telemetry::REPLAYS_TOTAL, "route" => self.route.clone(), "result" => "replayed").increment(1);
                    settle(&delivery, true, true).await;
                    None
                } else {
                    // The AI answered but the result is not out yet: redeliver (the AI sees
                    // the same Idempotency-Key again; the delivery limit parks it at worst).
                    settle(&delivery, false, true).await;
                    Some(Step::Reconnect)
                }
            }
            Err(failure) if !failure.attempted => {
                // Not tried (the breaker is probing or open): back to the queue as is.
                settle(&delivery, false, true).await;
                sleep_or_stop(Duration::from_millis(250), &self.shutdown)
                    .await
                    .then_some(Step::Stop)
            }
            Err(failure) => {
                let handed_on = self
                    .hand_on_failure(link, env, &delivery.data, &failure)
                    .await;
                settle(&delivery, handed_on, true).await;
                // Do not spin on a message the AI keeps refusing.
                sleep_or_stop(Duration::from_millis(200), &self.shutdown)
                    .await
                    .then_some(Step::Stop)
            }
        }
    }

    /// Publishes the AI's answer to the results exchange; true once confirmed.
    async fn publish_result(&self, link: &Link, env: &Envelope, answer: &ReplayAnswer) -> bool {
        let replayed_at = crate::audit::rfc3339(std::time::SystemTime::now());
        let body = results::message(env, answer, &replayed_at);
        let mut headers = FieldTable::default();
        headers.insert(
            "request_id".into(),
            AMQPValue::LongString(env.request_id.as_str().into()),
        );
        let published = link
            .publish(
                link.results_exchange(),
                &rabbit::result_key(&self.route),
                body.to_string().as_bytes(),
                &env.msg_id,
                headers,
                self.inner.settings.confirm_timeout,
            )
            .await;
        if let Err(e) = &published {
            tracing::warn!(error = %e, route = %self.route, "cannot publish a replay result; requeueing");
        }
        published.is_ok()
    }

    /// A tried and failed replay: parked when another try cannot help or the attempts are
    /// used up, else republished with its attempt counted. True once the broker confirmed.
    async fn hand_on_failure(
        &self,
        link: &Link,
        mut env: Envelope,
        original: &[u8],
        failure: &ReplayFailure,
    ) -> bool {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::REPLAYS_TOTAL, "route" => self.route.clone(), "result" => "failed").increment(1);
        // The attempt count travels in the message itself (`attempts`), so only real tries
        // count, not redeliveries after a consumer stopped.
        let attempts = env.attempts + 1;
        env.attempts = attempts;
        let payload = serde_json::to_vec(&env).unwrap_or_else(|_| original.to_vec());
        if !failure.retryable || attempts >= self.inner.settings.max_replay_attempts {
            let reason = format!("{} (after {attempts} attempt(s))", failure.reason);
            let parked = park(
                link,
                &self.route,
                &payload,
                &env.msg_id,
                &reason,
                &self.inner,
            )
            .await;
            if parked {
                self.counters.parked.fetch_add(1, Ordering::Relaxed);
            }
            return parked;
        }
        link.publish(
            link.dlq_exchange(),
            &rabbit::replay_key(&self.route),
            &payload,
            &env.msg_id,
            FieldTable::default(),
            self.inner.settings.confirm_timeout,
        )
        .await
        .is_ok()
    }
}

/// Whether an operator's replay run ends after this result: when the route refused it (kill
/// switch, breaker forced open, probes taken) or the AI failed it. The message is kept
/// either way (requeued, republished with its attempt counted, or parked).
fn end_operator_run(result: &Result<ReplayAnswer, ReplayFailure>) -> bool {
    match result {
        Ok(_) => false,
        Err(f) => !f.attempted || f.retryable,
    }
}

/// Acks a delivery that was handed on (confirmed elsewhere). Otherwise requeues it, or
/// with `requeue` false rejects it, which the queue's dead-lettering sends to the parked
/// queue: a message is acked only once it is safe somewhere else.
async fn settle(delivery: &lapin::message::Delivery, handed_on: bool, requeue: bool) {
    let settled = if handed_on {
        delivery.ack(BasicAckOptions::default()).await
    } else {
        delivery
            .nack(BasicNackOptions {
                requeue,
                ..Default::default()
            })
            .await
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "cannot settle a DLQ delivery; the broker redelivers it");
    }
}

async fn park(
    link: &Link,
    route: &str,
    data: &[u8],
    msg_id: &str,
    reason: &str,
    inner: &Inner,
) -> bool {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-breakwater-park-reason".into(),
        AMQPValue::LongString(reason.into()),
    );
    let ok = link
        .publish(
            "",
            &rabbit::parked_name(route),
            data,
            msg_id,
            headers,
            inner.settings.confirm_timeout,
        )
        .await
        .is_ok();
    if ok {
        metrics::counter!(telemetry::DLQ_MESSAGES, "route" => route.to_string(), "result" => "parked").increment(1);
        tracing::error!(route, msg_id, reason, "DLQ message parked");
    }
    ok
}

#[cfg(test)]
mod pacer_tests {
    use super::*;

    /// After an idle spell, the replays let through in any one second stay within 5% of the
    /// pace (a fleet's takeover adds a second consumer's catch-up on top: +10% in all).
    #[tokio::test(start_paused = true)]
    async fn after_an_idle_spell_one_second_holds_at_most_five_percent_over_the_pace() {
        let mut pacer = Pacer::new(100);
        pacer.wait().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        let start = tokio::time::Instant::now();
        let mut in_first_second = 0;
        loop {
            pacer.wait().await;
            if start.elapsed() > Duration::from_secs(1) {
                break;
            }
            in_first_second += 1;
        }
        assert!(
            (100..=105).contains(&in_first_second),
            "{in_first_second} replays in the first second at a pace of 100/s"
        );
    }
}
