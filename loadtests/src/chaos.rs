//! Chaos runs with checked invariants (issue 14): `kill9` (breakwater killed with SIGKILL
//! in a loop during a DLQ burst, restarted on the same spool), `broker` (an own RabbitMQ
//! node, never the shared one, restarted under load) and `soak` (a steady run that watches
//! RSS and open file descriptors). Each returns a report whose `ok` says whether every
//! invariant held; `loadtests chaos NAME` prints it and exits 1 when one did not.
//!
//! Traffic goes to 127.0.0.1 only, bounded in count and time. Every child process is
//! started with `kill_on_drop`, so a failed run leaves no breakwater behind; the RabbitMQ
//! node is stopped by its PID on every path out of `broker`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::mock::MockAi;

/// The shared broker of this machine (publishing to it is fine; stopping it is not).
pub const SHARED_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn short_id() -> String {
    let mut rng = rand::rng();
    (0..8)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

/// What the breakwater child runs with.
#[derive(Debug, Clone)]
struct Proc {
    bin: PathBuf,
    config: PathBuf,
    port: u16,
    admin: u16,
    log: PathBuf,
}

impl Proc {
    /// Starts breakwater and waits until the data port accepts connections.
    async fn spawn(&self) -> anyhow::Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = tokio::process::Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(child);
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "breakwater exited at start ({status}); see {}",
                    self.log.display()
                );
            }
            anyhow::ensure!(Instant::now() < deadline, "breakwater did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin))
    }
}

/// SIGTERM (the graceful path), then wait at most 30 s, then SIGKILL.
async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        signal(pid, "TERM");
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status();
}

/// A replayable route on `/v1/grading` whose AI is down: the breaker opens on the first
/// failure and stays open, the static fallback answers 202, the DLQ keeps the request.
fn dlq_config(p: &Proc, ai: &str, route: &str, spool: &Path, amqp: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"

[upstreams.ai]
url = "{ai}"
connect_timeout_ms = 100

[[routes]]
name = "{route}"
path_prefix = "/v1/grading"
upstream = "ai"
timeout_ms = 2000
replayable = true
[routes.breaker]
consecutive_failures = 1
open_ms = 600000
open_max_ms = 600000
[[routes.fallback]]
kind = "static"
status = 202
body = '{{"status":"queued"}}'

[dlq]
amqp_url = "{amqp}"
spool_dir = "{spool}"
"#,
        port = p.port,
        admin = p.admin,
        spool = spool.display(),
    )
}

/// What the queues of one route hold, by request id: the message ids seen and how many
/// deliveries.
#[derive(Debug, Default)]
struct Seen {
    by_request: HashMap<String, (HashSet<String>, u64)>,
    deliveries: u64,
    /// Messages whose AMQP `message_id` differs from the body's `msg_id`.
    id_mismatch: u64,
    unreadable: u64,
}

impl Seen {
    /// Takes every message now in the route's queue and its parked queue (a replay that
    /// failed may have parked it: still kept, not lost). A consumer with a large prefetch
    /// (one `basic_get` per message is too slow for tens of thousands), cancelled once the
    /// queue has been quiet for a moment. Each message is acked after it is counted: one
    /// still in flight when the channel closes goes back to the queue (with `no_ack` it
    /// would be gone, and counted as lost).
    async fn drain(&mut self, conn: &Connection, route: &str) {
        for queue in [
            format!("breakwater.dlq.{route}"),
            format!("breakwater.dlq.{route}.parked"),
        ] {
            // A fresh channel: a consume on a missing queue closes the channel it runs on.
            let Ok(ch) = conn.create_channel().await else {
                return;
            };
            let _ = ch
                .basic_qos(2000, lapin::options::BasicQosOptions::default())
                .await;
            let Ok(mut consumer) = ch
                .basic_consume(
                    queue.as_str().into(),
                    "chaos-collector".into(),
                    lapin::options::BasicConsumeOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await
            else {
                continue;
            };
            use futures_util::StreamExt as _;
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
            {
                self.take(
                    &d.data,
                    d.properties.message_id().as_ref().map(|s| s.to_string()),
                );
                if d.ack(lapin::options::BasicAckOptions::default())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = ch.close(200, "done".into()).await;
        }
    }

    fn take(&mut self, data: &[u8], prop: Option<String>) {
        self.deliveries += 1;
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
            self.unreadable += 1;
            return;
        };
        let (Some(rid), Some(mid)) = (v["request_id"].as_str(), v["msg_id"].as_str()) else {
            self.unreadable += 1;
            return;
        };
        if prop.as_deref() != Some(mid) {
            self.id_mismatch += 1;
        }
        let e = self.by_request.entry(rid.to_string()).or_default();
        e.0.insert(mid.to_string());
        e.1 += 1;
    }

    fn missing<'a>(&self, acked: &'a HashSet<String>) -> Vec<&'a String> {
        acked
            .iter()
            .filter(|id| !self.by_request.contains_key(*id))
            .collect()
    }
}

async fn amqp_connect(url: &str, within: Duration) -> anyhow::Result<Connection> {
    let deadline = Instant::now() + within;
    loop {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(anyhow::anyhow!("RabbitMQ at {url} unreachable: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Drains the route's queues until every acknowledged request id was seen, or `within`.
async fn collect(
    url: &str,
    route: &str,
    acked: &HashSet<String>,
    within: Duration,
) -> anyhow::Result<Seen> {
    let conn = amqp_connect(url, Duration::from_secs(60)).await?;
    let mut seen = Seen::default();
    let deadline = Instant::now() + within;
    loop {
        seen.drain(&conn, route).await;
        if seen.missing(acked).is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(seen)
}

/// After the final stop: take what is left, then delete the route's queues.
async fn finish_queues(url: &str, route: &str, seen: &mut Seen) {
    let Ok(conn) = amqp_connect(url, Duration::from_secs(30)).await else {
        return;
    };
    seen.drain(&conn, route).await;
    if let Ok(ch) = conn.create_channel().await {
        for q in [
            format!("breakwater.dlq.{route}"),
            format!("breakwater.dlq.{route}.parked"),
            format!("breakwater.results.{route}"),
        ] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Client-side tally of a DLQ burst.
#[derive(Debug, Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    errors: AtomicU64,
    queued: AtomicU64,
    spooled: AtomicU64,
    rejected: AtomicU64,
    other: AtomicU64,
    acked: Mutex<HashSet<String>>,
    /// Latency of answered requests, µs.
    latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
    status: Mutex<BTreeMap<u16, u64>>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency: Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 120_000_000, 3).ok()),
            ..Tally::default()
        }
    }

    fn acked(&self) -> HashSet<String> {
        self.acked.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(|h| h.value_at_quantile(q) as f64 / 1000.0))
            .unwrap_or(0.0)
    }

    fn max_ms(&self) -> f64 {
        self.latency
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(|h| h.max() as f64 / 1000.0))
            .unwrap_or(0.0)
    }
}

/// Sends one replayable request with its own request id and records the answer. Returns
/// false when it got no answer (connection refused or reset: breakwater is gone).
async fn send_one(client: &HttpClient, url: &str, id: &str, tally: &Tally) -> bool {
    tally.sent.fetch_add(1, Ordering::Relaxed);
    let Ok(req) = http::Request::post(url)
        .header("x-request-id", id)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{{\"essay\":\"{id}\"}}"))))
    else {
        return false;
    };
    let t0 = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = client.request(req).await?;
        let (parts, body) = resp.into_parts();
        let _ = body.collect().await;
        Ok::<_, hyper_util::client::legacy::Error>(parts)
    })
    .await;
    let parts = match resp {
        Ok(Ok(p)) => p,
        _ => {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            return false;
        }
    };
    let us = t0.elapsed().as_micros() as u64;
    if let Ok(mut h) = tally.latency.lock() {
        if let Some(h) = h.as_mut() {
            let _ = h.record(us.max(1));
        }
    }
    tally.answered.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut s) = tally.status.lock() {
        *s.entry(parts.status.as_u16()).or_insert(0) += 1;
    }
    let dlq = parts
        .headers
        .get("x-breakwater-dlq")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let counter = match dlq {
        "queued" => &tally.queued,
        "spooled" => &tally.spooled,
        "rejected" => &tally.rejected,
        _ => &tally.other,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if dlq == "queued" || dlq == "spooled" {
        // The id the answer carries is the one the DLQ message holds.
        let rid = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(id)
            .to_string();
        if let Ok(mut a) = tally.acked.lock() {
            a.insert(rid);
        }
    }
    true
}

// ---------------------------------------------------------------------------------------
// kill -9 in a loop
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Kill9Args {
    pub proxy_bin: PathBuf,
    pub loops: u32,
    /// Concurrent clients of the burst.
    pub clients: usize,
    /// SIGKILL after a random time in this range of each start (ms).
    pub kill_after_ms: (u64, u64),
    pub amqp_url: String,
    /// Spool, config and breakwater's log go here.
    pub work_dir: PathBuf,
    /// How long the last start may take to hand every message to RabbitMQ.
    pub drain_within: Duration,
}

#[derive(Debug, Serialize)]
pub struct Kill9Report {
    pub route: String,
    pub loops_run: u32,
    pub requests_sent: u64,
    pub answered: u64,
    pub acknowledged: usize,
    pub queued: u64,
    pub spooled: u64,
    pub rejected: u64,
    pub messages_checked: u64,
    pub distinct_requests_in_queue: usize,
    pub unacknowledged_but_delivered: usize,
    pub duplicate_deliveries: u64,
    /// Request ids found under two different message ids (must be none).
    pub split_ids: Vec<String>,
    /// Acknowledged request ids not in RabbitMQ (must be none).
    pub lost: Vec<String>,
    pub id_mismatch: u64,
    pub unreadable: u64,
    pub ok: bool,
}

/// breakwater is SIGKILLed `loops` times during a burst of replayable requests whose AI is
/// down, and restarted on the same spool each time. Then one last start drains the spool;
/// every request a client was told `queued`/`spooled` must be in the route's queue (or its
/// parked queue), each request id under one message id only.
pub async fn kill9(args: &Kill9Args) -> anyhow::Result<Kill9Report> {
    std::fs::create_dir_all(&args.work_dir)?;
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let route = format!("chaos_kill9_{}", short_id());
    let proc = Proc {
        bin: args.proxy_bin.clone(),
        config: args.work_dir.join("breakwater.toml"),
        port: free_port()?,
        admin: free_port()?,
        log: args.work_dir.join("breakwater.log"),
    };
    std::fs::write(
        &proc.config,
        dlq_config(
            &proc,
            &ai.url(),
            &route,
            &args.work_dir.join("spool"),
            &args.amqp_url,
        ),
    )?;
    let tally = Arc::new(Tally::new());
    let url = proc.url("/v1/grading");
    let mut loops_run = 0;
    for l in 0..args.loops {
        let mut child = proc.spawn().await?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut burst = Vec::new();
        for w in 0..args.clients {
            let (url, tally, stop) = (url.clone(), tally.clone(), stop.clone());
            burst.push(tokio::spawn(async move {
                let client = client();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("k{l}-w{w}-{i}");
                    i += 1;
                    if !send_one(&client, &url, &id, &tally).await {
                        break;
                    }
                }
            }));
        }
        let (lo, hi) = args.kill_after_ms;
        let after = rand::rng().random_range(lo..=hi.max(lo));
        tokio::time::sleep(Duration::from_millis(after)).await;
        child.start_kill()?;
        let _ = child.wait().await;
        stop.store(true, Ordering::Relaxed);
        for b in burst {
            let _ = b.await;
        }
        loops_run += 1;
        if (l + 1) % 10 == 0 {
            eprintln!(
                "kill9: {} loops, {} acknowledged so far",
                l + 1,
                tally.acked().len()
            );
        }
    }
    let acked = tally.acked();
    let mut last = proc.spawn().await?;
    let seen = collect(&args.amqp_url, &route, &acked, args.drain_within).await;
    terminate(&mut last).await;
    let mut seen = seen?;
    finish_queues(&args.amqp_url, &route, &mut seen).await;
    Ok(kill9_report(route, loops_run, &tally, &acked, &seen))
}

fn kill9_report(
    route: String,
    loops_run: u32,
    tally: &Tally,
    acked: &HashSet<String>,
    seen: &Seen,
) -> Kill9Report {
    let lost: Vec<String> = seen.missing(acked).into_iter().cloned().collect();
    let split_ids: Vec<String> = seen
        .by_request
        .iter()
        .filter(|(_, (ids, _))| ids.len() > 1)
        .map(|(r, _)| r.clone())
        .collect();
    let distinct = seen.by_request.len();
    let ok = lost.is_empty()
        && split_ids.is_empty()
        && seen.id_mismatch == 0
        && seen.unreadable == 0
        && !acked.is_empty();
    Kill9Report {
        route,
        loops_run,
        requests_sent: tally.sent.load(Ordering::Relaxed),
        answered: tally.answered.load(Ordering::Relaxed),
        acknowledged: acked.len(),
        queued: tally.queued.load(Ordering::Relaxed),
        spooled: tally.spooled.load(Ordering::Relaxed),
        rejected: tally.rejected.load(Ordering::Relaxed),
        messages_checked: seen.deliveries,
        distinct_requests_in_queue: distinct,
        unacknowledged_but_delivered: seen
            .by_request
            .keys()
            .filter(|k| !acked.contains(*k))
            .count(),
        duplicate_deliveries: seen.deliveries.saturating_sub(distinct as u64),
        split_ids,
        lost,
        id_mismatch: seen.id_mismatch,
        unreadable: seen.unreadable,
        ok,
    }
}

// ---------------------------------------------------------------------------------------
// RabbitMQ restarted under load (an own node)
// ---------------------------------------------------------------------------------------

/// An own RabbitMQ node in a temp dir on its own ports (AMQP `port`, distribution
/// `port + 20000`), no plugins: never the machine's shared broker.
pub struct OwnBroker {
    dir: PathBuf,
    port: u16,
    child: Option<tokio::process::Child>,
    log: PathBuf,
}

impl OwnBroker {
    pub fn new(dir: &Path, port: u16) -> anyhow::Result<OwnBroker> {
        anyhow::ensure!(port != 5672, "5672 is the shared broker: pick another port");
        for d in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::write(
            dir.join("rabbit.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )?;
        std::fs::write(dir.join("env.conf"), "")?;
        std::fs::write(dir.join("plugins"), "[].\n")?;
        Ok(OwnBroker {
            dir: dir.to_path_buf(),
            port,
            child: None,
            log: dir.join("rabbitmq-server.out"),
        })
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// The Erlang VM's PID (the server script's child), from its PID file.
    fn beam_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Starts the node and waits until it takes AMQP connections.
    pub async fn start(&mut self) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let _ = std::fs::remove_file(self.pid_file());
        let d = &self.dir;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = tokio::process::Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
            .env("HOME", d.join("home"))
            .env("RABBITMQ_NODENAME", format!("chaos{}@localhost", self.port))
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env(
                "RABBITMQ_DIST_PORT",
                (u32::from(self.port) + 20000).to_string(),
            )
            .env(
                "RABBITMQ_SERVER_START_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbit.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins"))
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting rabbitmq-server")?;
        self.child = Some(child);
        let conn = amqp_connect(&self.url(), Duration::from_secs(120)).await?;
        let _ = conn.close(200, "up".into()).await;
        Ok(t0.elapsed())
    }

    /// Sends `sig` to the Erlang VM by PID and waits until the node is gone.
    pub async fn stop(&mut self, sig: &str) -> anyhow::Result<()> {
        if let Some(pid) = self.beam_pid() {
            signal(pid, sig);
            let deadline = Instant::now() + Duration::from_secs(60);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if Path::new(&format!("/proc/{pid}")).exists() {
                signal(pid, "KILL");
            }
        }
        if let Some(mut child) = self.child.take() {
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        Ok(())
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Some(pid) = self.beam_pid() {
                signal(pid, "KILL");
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct BrokerArgs {
    pub proxy_bin: PathBuf,
    pub restarts: u32,
    /// Offered replayable requests per second (open loop, spread over `clients`).
    pub rate: f64,
    pub clients: usize,
    /// Load between two restarts, and how long the node stays down.
    pub up: Duration,
    pub down: Duration,
    pub amqp_port: u16,
    pub work_dir: PathBuf,
    pub drain_within: Duration,
}

#[derive(Debug, Serialize)]
pub struct BrokerReport {
    pub route: String,
    pub restarts: u32,
    pub broker_start_s: Vec<f64>,
    pub requests_sent: u64,
    pub answered: u64,
    pub unanswered: u64,
    pub status: BTreeMap<u16, u64>,
    pub queued: u64,
    pub spooled: u64,
    pub rejected: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub acknowledged: usize,
    /// Acknowledged after the last restart: they reach the queue only if breakwater
    /// reconnected.
    pub acknowledged_after_last_restart: usize,
    /// `queued` answers after the last restart: confirms from the new broker.
    pub queued_after_last_restart: u64,
    pub messages_checked: u64,
    pub distinct_requests_in_queue: usize,
    pub duplicate_deliveries: u64,
    pub split_ids: Vec<String>,
    pub lost: Vec<String>,
    pub ok: bool,
}

/// Replayable requests whose AI is down flow into an own RabbitMQ node, which is stopped
/// (alternately SIGKILL and SIGTERM, by PID) and started again `restarts` times. Every
/// request must be answered, every acknowledged one must reach the queue, and the ones
/// acknowledged after the last restart prove breakwater reconnected.
pub async fn broker(args: &BrokerArgs) -> anyhow::Result<BrokerReport> {
    std::fs::create_dir_all(&args.work_dir)?;
    let mut node = OwnBroker::new(&args.work_dir.join("rabbitmq"), args.amqp_port)?;
    let result = broker_run(args, &mut node).await;
    let _ = node.stop("TERM").await;
    result
}

async fn broker_run(args: &BrokerArgs, node: &mut OwnBroker) -> anyhow::Result<BrokerReport> {
    let mut starts = vec![node.start().await?.as_secs_f64()];
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let route = format!("chaos_broker_{}", short_id());
    let proc = Proc {
        bin: args.proxy_bin.clone(),
        config: args.work_dir.join("breakwater.toml"),
        port: free_port()?,
        admin: free_port()?,
        log: args.work_dir.join("breakwater.log"),
    };
    std::fs::write(
        &proc.config,
        dlq_config(
            &proc,
            &ai.url(),
            &route,
            &args.work_dir.join("spool"),
            &node.url(),
        ),
    )?;
    let mut bw = proc.spawn().await?;
    let tally = Arc::new(Tally::new());
    let after_last = Arc::new(Tally::new());
    let phase_last = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let mut load = Vec::new();
    let per_client = Duration::from_secs_f64(args.clients.max(1) as f64 / args.rate.max(1.0));
    for w in 0..args.clients {
        let url = proc.url("/v1/grading");
        let (tally, after_last, phase_last, stop) = (
            tally.clone(),
            after_last.clone(),
            phase_last.clone(),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            let client = client();
            let mut tick = tokio::time::interval(per_client);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let id = format!("b-w{w}-{i}");
                i += 1;
                let into = if phase_last.load(Ordering::Relaxed) {
                    &after_last
                } else {
                    &tally
                };
                send_one(&client, &url, &id, into).await;
            }
        }));
    }
    for r in 0..args.restarts {
        tokio::time::sleep(args.up).await;
        let sig = if r % 2 == 0 { "KILL" } else { "TERM" };
        node.stop(sig).await?;
        tokio::time::sleep(args.down).await;
        starts.push(node.start().await?.as_secs_f64());
        eprintln!(
            "broker: restart {} ({sig}) done, {} acknowledged so far",
            r + 1,
            tally.acked().len()
        );
    }
    phase_last.store(true, Ordering::Relaxed);
    tokio::time::sleep(args.up.max(Duration::from_secs(5))).await;
    stop.cancel();
    for l in load {
        let _ = l.await;
    }
    let acked_last = after_last.acked();
    let mut acked = tally.acked();
    acked.extend(acked_last.iter().cloned());
    // Collected while breakwater still runs: it must reconnect to hand the rest on.
    let seen = collect(&node.url(), &route, &acked, args.drain_within).await;
    terminate(&mut bw).await;
    let mut seen = seen?;
    finish_queues(&node.url(), &route, &mut seen).await;

    let lost: Vec<String> = seen.missing(&acked).into_iter().cloned().collect();
    let split_ids: Vec<String> = seen
        .by_request
        .iter()
        .filter(|(_, (ids, _))| ids.len() > 1)
        .map(|(r, _)| r.clone())
        .collect();
    let sum = |f: fn(&Tally) -> &AtomicU64| {
        f(&tally).load(Ordering::Relaxed) + f(&after_last).load(Ordering::Relaxed)
    };
    let mut status = tally.status.lock().map(|s| s.clone()).unwrap_or_default();
    for (k, v) in after_last
        .status
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default()
    {
        *status.entry(k).or_insert(0) += v;
    }
    let sent = sum(|t| &t.sent);
    let answered = sum(|t| &t.answered);
    let distinct = seen.by_request.len();
    let queued_after = after_last.queued.load(Ordering::Relaxed);
    let ok = lost.is_empty()
        && split_ids.is_empty()
        && sent == answered
        && status.keys().all(|s| *s == 202)
        && !acked_last.is_empty()
        && seen.id_mismatch == 0
        && seen.unreadable == 0;
    Ok(BrokerReport {
        route,
        restarts: args.restarts,
        broker_start_s: starts,
        requests_sent: sent,
        answered,
        unanswered: sent - answered,
        status,
        queued: sum(|t| &t.queued),
        spooled: sum(|t| &t.spooled),
        rejected: sum(|t| &t.rejected),
        p50_ms: tally.ms(0.5),
        p99_ms: tally.ms(0.99),
        max_ms: tally.max_ms().max(after_last.max_ms()),
        acknowledged: acked.len(),
        acknowledged_after_last_restart: acked_last.len(),
        queued_after_last_restart: queued_after,
        messages_checked: seen.deliveries,
        distinct_requests_in_queue: distinct,
        duplicate_deliveries: seen.deliveries.saturating_sub(distinct as u64),
        split_ids,
        lost,
        ok,
    })
}

// ---------------------------------------------------------------------------------------
// soak: RSS and open fds over a steady run
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct SoakArgs {
    pub proxy_bin: PathBuf,
    pub duration: Duration,
    /// Total offered rate; 80% to a healthy AI route, 20% to a replayable route whose AI
    /// fails 10% of requests (those go through the DLQ and are replayed).
    pub rate: f64,
    pub amqp_url: String,
    pub work_dir: PathBuf,
    pub sample_every: Duration,
    /// Samples before this are warm-up; the first after it is the baseline.
    pub warmup: Duration,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub rss_kib: u64,
    pub fds: u64,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub duration_s: f64,
    pub requests: u64,
    pub errors: u64,
    pub non_2xx: u64,
    pub dlq: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub start: Sample,
    pub end: Sample,
    pub max_rss_kib: u64,
    pub max_fds: u64,
    pub rss_growth_kib: i64,
    pub fd_growth: i64,
    pub replays_ok: u64,
    pub audit_verify: String,
    pub samples: Vec<Sample>,
    pub ok: bool,
}

/// Allowed RSS growth from the baseline to the end: 20% or 16 MiB, whichever is more.
pub fn rss_within_noise(start_kib: u64, end_kib: u64) -> bool {
    end_kib <= start_kib + (start_kib / 5).max(16 * 1024)
}

pub fn sample(pid: u32, t0: Instant) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample {
        t_s: t0.elapsed().as_secs_f64(),
        rss_kib,
        fds,
    })
}

fn soak_config(
    p: &Proc,
    ai: &str,
    grading_ai: &str,
    route: &str,
    dir: &Path,
    amqp: &str,
) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"

[upstreams.ai]
url = "{ai}"
[upstreams.grader]
url = "{grading_ai}"

[[routes]]
name = "recommendations"
path_prefix = "/v1/recommendations"
upstream = "ai"
timeout_ms = 2000
model_version_header = "x-model-version"
[[routes.fallback]]
kind = "static"
status = 200
body = '{{"items":[]}}'

[[routes]]
name = "{route}"
path_prefix = "/v1/grading"
upstream = "grader"
timeout_ms = 2000
replayable = true
model_version_header = "x-model-version"
[routes.breaker]
consecutive_failures = 1000
failure_rate = 0.9
minimum_requests = 1000
[[routes.fallback]]
kind = "static"
status = 202
body = '{{"status":"queued"}}'

[audit]
path = "{dir}/audit/decisions.jsonl"
hmac_key_file = "{dir}/audit.key"

[dlq]
amqp_url = "{amqp}"
spool_dir = "{dir}/spool"
replay_rate_per_s = 200
results_exchange = "chaos.results.{route}"
"#,
        port = p.port,
        admin = p.admin,
        dir = dir.display(),
    )
}

async fn metrics_text(admin: SocketAddr) -> String {
    let Ok(req) =
        http::Request::get(format!("http://{admin}/metrics")).body(Full::new(Bytes::new()))
    else {
        return String::new();
    };
    match client().request(req).await {
        Ok(r) => r
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// A steady run with the decision log and the DLQ (through RabbitMQ, replayed) on.
/// Samples breakwater's RSS and open fds; the first sample after the warm-up is the
/// baseline, the last one the end.
pub async fn soak(args: &SoakArgs) -> anyhow::Result<SoakReport> {
    std::fs::create_dir_all(&args.work_dir)?;
    let dir = &args.work_dir;
    std::fs::write(
        dir.join("audit.key"),
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )?;
    let ai = MockAi::start().await;
    let grader = MockAi::start().await;
    grader.set_error_rate(0.1, 503);
    let route = format!("chaos_soak_{}", short_id());
    let proc = Proc {
        bin: args.proxy_bin.clone(),
        config: dir.join("breakwater.toml"),
        port: free_port()?,
        admin: free_port()?,
        log: dir.join("breakwater.log"),
    };
    std::fs::write(
        &proc.config,
        soak_config(&proc, &ai.url(), &grader.url(), &route, dir, &args.amqp_url),
    )?;
    let mut bw = proc.spawn().await?;
    let pid = bw.id().context("breakwater has no pid")?;
    let target = SocketAddr::from(([127, 0, 0, 1], proc.port));

    let mut rec = crate::driver::LoadSpec::get(target, "/v1/recommendations");
    rec.rate = Some(args.rate * 0.8);
    rec.duration = args.duration;
    rec.connections = 16;
    let mut grading = crate::driver::LoadSpec::get(target, "/v1/grading");
    grading.method = http::Method::POST;
    grading.body = Bytes::from_static(b"{\"essay\":\"soak\"}");
    grading.headers = vec![("content-type".into(), "application/json".into())];
    grading.rate = Some(args.rate * 0.2);
    grading.duration = args.duration;
    grading.connections = 4;

    let t0 = Instant::now();
    let stop = CancellationToken::new();
    let sampler = {
        let (stop, every) = (stop.clone(), args.sample_every);
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => break,
                }
                if let Some(s) = sample(pid, t0) {
                    out.push(s);
                }
            }
            if let Some(s) = sample(pid, t0) {
                out.push(s);
            }
            out
        })
    };
    let (a, b) = tokio::join!(crate::driver::run(rec), crate::driver::run(grading));
    stop.cancel();
    let samples = sampler.await.unwrap_or_default();
    let mut all = a?;
    all.merge(&b?)?;
    let metrics = metrics_text(proc.admin_addr()).await;
    let replays_ok =
        crate::scenario::counter_by_result(&metrics, "breakwater_replays_total", "replayed");
    terminate(&mut bw).await;
    let verify = std::process::Command::new(&args.proxy_bin)
        .args(["audit", "verify"])
        .arg(dir.join("audit"))
        .output()?;
    let audit_verify = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout).trim(),
        String::from_utf8_lossy(&verify.stderr).trim()
    );
    let mut seen = Seen::default();
    finish_queues(&args.amqp_url, &route, &mut seen).await;

    let base = samples
        .iter()
        .find(|s| s.t_s >= args.warmup.as_secs_f64())
        .or(samples.first())
        .copied()
        .context("no RSS sample")?;
    let end = samples.last().copied().context("no RSS sample")?;
    let non_2xx = all
        .counts
        .status
        .iter()
        .filter(|(s, _)| !(200..300).contains(*s))
        .map(|(_, n)| n)
        .sum();
    let ok = verify.status.success()
        && all.counts.errors == 0
        && non_2xx == 0
        && rss_within_noise(base.rss_kib, end.rss_kib)
        && end.fds <= base.fds + 8;
    Ok(SoakReport {
        duration_s: all.elapsed.as_secs_f64(),
        requests: all.counts.requests,
        errors: all.counts.errors,
        non_2xx,
        dlq: all.counts.dlq.clone(),
        p50_ms: all.ms(0.5),
        p99_ms: all.ms(0.99),
        start: base,
        end,
        max_rss_kib: samples.iter().map(|s| s.rss_kib).max().unwrap_or(0),
        max_fds: samples.iter().map(|s| s.fds).max().unwrap_or(0),
        rss_growth_kib: end.rss_kib as i64 - base.rss_kib as i64,
        fd_growth: end.fds as i64 - base.fds as i64,
        replays_ok,
        audit_verify,
        samples,
        ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_noise_bound() {
        assert!(rss_within_noise(40_000, 40_000 + 16 * 1024));
        assert!(!rss_within_noise(40_000, 40_000 + 16 * 1024 + 1));
        assert!(rss_within_noise(200_000, 240_000));
        assert!(!rss_within_noise(200_000, 240_001));
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id(), Instant::now()).unwrap();
        assert!(s.rss_kib > 0 && s.fds >= 3, "{s:?}");
    }

    #[test]
    fn the_shared_broker_port_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(OwnBroker::new(dir.path(), 5672).is_err());
    }
}
