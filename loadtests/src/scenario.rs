//! Scenarios: a load at a fixed rate for a bounded time while a timeline of faults is
//! applied (AI down, AI slow, RabbitMQ stopped, config rewritten, canary failing), then the
//! scenario's invariants are checked and a report is written.
//!
//! The mock AI runs in this process (so faults apply at the exact second); breakwater is a
//! child process with the decision log on, or several (`[fleet]`), optionally on the local
//! three-node RabbitMQ cluster, whose nodes the timeline can kill.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::bench::{free_port, wait_http_ok, Proc};
use crate::cluster::{self, Cluster};
use crate::driver::{self, LoadSpec};
use crate::mock::MockAi;
use crate::report::{self, Marker};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub duration_s: f64,
    /// The `[[routes]]` tables (and anything top-level after them, like `[dlq]`). `{id}`
    /// is replaced by a per-run suffix (queue names), `{spool}` by a temp directory.
    pub config: String,
    /// Start a second mock as upstream `canary` (model-v2) for `[[routes.variants]]`.
    #[serde(default)]
    pub with_canary_upstream: bool,
    #[serde(default)]
    pub needs_rabbitmq: bool,
    /// Several instances, on the local RabbitMQ cluster if asked.
    pub fleet: Option<Fleet>,
    /// After the load: how long to wait for replays and drains to finish.
    #[serde(default = "default_settle")]
    pub settle_s: f64,
    pub streams: Vec<Stream>,
    #[serde(default)]
    pub timeline: Vec<Step>,
    #[serde(default)]
    pub invariants: Invariants,
}

/// `[fleet]`: several breakwater processes side by side, as one per Magento pod.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// breakwater processes, each with its own spool, decision log, ports and instance
    /// name (`<scenario>-<n>`); every stream's rate and connections are split evenly.
    pub instances: usize,
    /// Start the local three-node cluster (`loadtests/rabbit-cluster.sh`) for the run:
    /// `{cluster_urls}` in `config` becomes its nodes (a TOML array), and every instance
    /// copies its decision log there (`[audit] publish_url`).
    #[serde(default)]
    pub cluster: bool,
    /// The cluster's watchdog stops it after this long, whatever happens to the run.
    #[serde(default = "default_cluster_ttl")]
    pub cluster_ttl_s: u64,
}

fn default_cluster_ttl() -> u64 {
    600
}

/// One kind of traffic, with its own rate and its own invariants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stream {
    pub name: String,
    pub rate: f64,
    #[serde(default = "default_connections")]
    pub connections: usize,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default)]
    pub body: String,
    /// The route (name in the scenario's config) this stream's requests take; lets the
    /// runner read breakwater's own figures for it from `/metrics`.
    pub route: Option<String>,
    /// p99 of this stream's fallback answers, ms, in breakwater's own time
    /// (`breakwater_request_duration_seconds{route,outcome="fallback"}`; needs `route`).
    /// The client-side figure, which on a 2-core machine also holds the driver's and the
    /// kernel's share, is reported beside it.
    pub fallback_p99_ms: Option<f64>,
    /// At least this many fallback answers (the fault really happened).
    pub min_fallbacks: Option<u64>,
    /// Every failure of this (replayable) stream was accepted by the DLQ.
    #[serde(default)]
    pub dlq_all_accepted: bool,
    /// Every DLQ'd request of this stream reached the AI again (by Idempotency-Key).
    #[serde(default)]
    pub replayed_after_recovery: bool,
    /// Every DLQ'd request of this stream has a result in `breakwater.results.<route>`,
    /// counted on the cluster (needs `route` and `[fleet] cluster`).
    #[serde(default)]
    pub results_published: bool,
}

fn default_connections() -> usize {
    32
}
fn default_path() -> String {
    "/v1/recommendations".into()
}
fn default_method() -> String {
    "GET".into()
}
fn default_settle() -> f64 {
    5.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub at_s: f64,
    /// ai_down | ai_up | ai_errors | ai_recover | ai_slow | broker_stop | broker_start |
    /// reload_every | canary_fail | kill_connected_node (kill -9 of the cluster node most
    /// instances publish to) | restart_killed_node
    pub action: String,
    pub delay_ms: Option<u64>,
    pub error_rate: Option<f64>,
    pub status: Option<u16>,
    /// For reload_every: period and end.
    pub every_s: Option<f64>,
    pub until_s: Option<f64>,
}

/// Invariants over all streams together.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invariants {
    /// Most 5xx responses allowed (usually 0: fallbacks answer).
    pub max_5xx: Option<u64>,
    /// Most transport errors (timeouts, resets) allowed.
    pub max_errors: Option<u64>,
    /// Most non-2xx responses allowed.
    pub max_non_2xx: Option<u64>,
    /// p99 of all answers, ms.
    pub p99_ms: Option<f64>,
    /// The config was reloaded at least this many times.
    pub min_reloads: Option<u64>,
    /// The canary was rolled back automatically.
    #[serde(default)]
    pub canary_rolled_back: bool,
    /// The route's `replay_rate_per_s`: the AI never sees more replays than this (+10%)
    /// in any 1 s window, across all instances.
    pub replay_pace_per_s: Option<f64>,
    /// `breakwater audit collect` of the cluster's `breakwater.audit` gets every record of
    /// every instance, with no gap, and `breakwater audit verify` accepts each instance's
    /// collected chain (needs `[fleet] cluster`).
    #[serde(default)]
    pub audit_collected: bool,
}

pub struct RunArgs {
    pub proxy_bin: PathBuf,
    pub report_dir: PathBuf,
    /// Multiplies every duration and time in the scenario (CI smoke runs use < 1).
    pub time_scale: f64,
    pub rate_scale: f64,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// One breakwater process of the run: its own ports, directory (spool, decision log) and,
/// in a fleet, instance name.
#[derive(Debug, Clone)]
struct Instance {
    name: String,
    listen: u16,
    admin: SocketAddr,
    dir: PathBuf,
    cfg_path: PathBuf,
}

/// What every instance's config is made from.
#[derive(Clone)]
struct ConfigInputs {
    sc: Scenario,
    id: String,
    ai: SocketAddr,
    canary: Option<SocketAddr>,
    /// The cluster's nodes as a TOML array (`{cluster_urls}`; also the audit copies' target).
    cluster_urls: Option<String>,
    fleet: bool,
}

fn config_text(c: &ConfigInputs, inst: &Instance, reload_n: u64) -> String {
    let canary_upstream = c
        .canary
        .map(|a| format!("[upstreams.canary]\nurl = \"http://{a}\"\n"))
        .unwrap_or_default();
    let instance = if c.fleet {
        format!("instance = \"{}\"\n", inst.name)
    } else {
        String::new()
    };
    let publish = c
        .cluster_urls
        .as_ref()
        .map(|u| format!("publish_url = {u}\n"))
        .unwrap_or_default();
    let dir = &inst.dir;
    // reload_n changes a comment and an idle setting, so each rewrite is a real reload.
    format!(
        r#"# reload {reload_n}
[server]
{instance}listen = "127.0.0.1:{}"
admin_listen = "{}"
watch_config = true
idle_timeout_ms = {}

[upstreams.ai]
url = "http://{}"
pool_max_idle_per_host = 1024

[upstreams.rules]
url = "http://{}"
{canary_upstream}
[audit]
path = "{}/audit/decisions.jsonl"
hmac_key_file = "{}/audit.key"
{publish}
{}
"#,
        inst.listen,
        inst.admin,
        60_000 + reload_n,
        c.ai,
        c.ai,
        dir.display(),
        dir.display(),
        c.sc.config
            .replace("{id}", &c.id)
            .replace("{spool}", &dir.join("spool").display().to_string())
            .replace(
                "{cluster_urls}",
                c.cluster_urls
                    .as_deref()
                    .unwrap_or("\"no cluster: set [fleet] cluster = true\"")
            )
    )
}

/// Writes an instance's config, replacing the file by rename as Kubernetes does.
fn write_config(c: &ConfigInputs, inst: &Instance, reload_n: u64) -> std::io::Result<()> {
    let tmp = inst.dir.join("breakwater.toml.tmp");
    std::fs::write(&tmp, config_text(c, inst, reload_n))?;
    std::fs::rename(&tmp, &inst.cfg_path)
}

async fn admin_get(admin: SocketAddr, path: &str) -> Option<bytes::Bytes> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .request(
            http::Request::get(format!("http://{admin}{path}"))
                .body(http_body_util::Full::default())
                .ok()?,
        )
        .await
        .ok()?;
    Some(
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .ok()?
            .to_bytes(),
    )
}

async fn admin_json(admin: SocketAddr, path: &str) -> Option<serde_json::Value> {
    serde_json::from_slice(&admin_get(admin, path).await?).ok()
}

/// breakwater's own latency histogram for one route and outcome, from the Prometheus text:
/// (upper bound in seconds, cumulative count) per bucket, and the total count.
pub fn duration_buckets(metrics: &str, route: &str, outcome: &str) -> (Vec<(f64, u64)>, u64) {
    let want_route = format!("route=\"{route}\"");
    let want_outcome = format!("outcome=\"{outcome}\"");
    let mut buckets = Vec::new();
    let mut total = 0;
    for line in metrics.lines() {
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(labels) = name_labels
            .strip_prefix("breakwater_request_duration_seconds_")
            .and_then(|rest| rest.split_once('{'))
        else {
            continue;
        };
        if !labels.1.contains(&want_route) || !labels.1.contains(&want_outcome) {
            continue;
        }
        let Ok(n) = value.parse::<f64>() else {
            continue;
        };
        match labels.0 {
            "bucket" => {
                let le = labels
                    .1
                    .split("le=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .and_then(|v| v.parse::<f64>().ok());
                if let Some(le) = le {
                    buckets.push((le, n as u64));
                }
            }
            "count" => total = n as u64,
            _ => {}
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    (buckets, total)
}

/// Sum of a counter over every label set that carries `result="<result>"`.
pub fn counter_by_result(metrics: &str, name: &str, result: &str) -> u64 {
    let want = format!("result=\"{result}\"");
    metrics
        .lines()
        .filter_map(|l| {
            let (labels, value) = l.strip_prefix(name)?.strip_prefix('{')?.rsplit_once(' ')?;
            labels.contains(&want).then(|| value.parse::<f64>().ok())?
        })
        .map(|v| v as u64)
        .sum()
}

/// The DLQ as breakwater counts it: messages accepted (spooled or queued) and messages
/// published to RabbitMQ with a confirm.
async fn dlq_counts(admin: SocketAddr) -> Option<(u64, u64)> {
    let m = admin_get(admin, "/metrics").await?;
    let m = String::from_utf8_lossy(&m);
    let name = "breakwater_dlq_messages_total";
    Some((
        counter_by_result(&m, name, "queued") + counter_by_result(&m, name, "spooled"),
        counter_by_result(&m, name, "published"),
    ))
}

/// `dlq_counts` summed over the instances of a fleet (`None` when none answers).
async fn fleet_dlq_counts(admins: &[SocketAddr]) -> Option<(u64, u64)> {
    let mut sum = None;
    for a in admins {
        if let Some((acc, publ)) = dlq_counts(*a).await {
            let (sa, sp) = sum.unwrap_or((0, 0));
            sum = Some((sa + acc, sp + publ));
        }
    }
    sum
}

/// How fast the spool drained to RabbitMQ, from (seconds since the load started, accepted,
/// published) samples. None when nothing went through the DLQ.
pub fn drain_check(samples: &[(f64, u64, u64)], load_s: f64) -> Option<Check> {
    let &(_, accepted, published) = samples.last()?;
    if accepted == 0 {
        return None;
    }
    let during = samples
        .iter()
        .filter(|s| s.0 <= load_s)
        .map(|s| s.2)
        .max()
        .unwrap_or(0);
    let done_at = samples.iter().find(|s| s.2 >= accepted).map(|s| s.0);
    Some(Check {
        name: "every accepted DLQ message published to RabbitMQ (publisher confirms)".into(),
        ok: published >= accepted,
        detail: format!(
            "{accepted} accepted in {load_s:.1} s ({:.0}/s); {during} published during the load \
             ({:.0}/s); {}",
            accepted as f64 / load_s.max(1e-9),
            during as f64 / load_s.max(1e-9),
            match done_at {
                Some(at) => format!(
                    "all published {at:.1} s after the start (average {:.0}/s)",
                    accepted as f64 / at.max(1e-9)
                ),
                None => format!("{published} published by the end"),
            }
        ) + &backlog_figures(samples).unwrap_or_default(),
    })
}

/// The backlog (accepted, not yet published) at its peak and how it went after: when it was
/// back under 1% of the peak (the spool emptied, with the load still coming in or not) and
/// the spool-to-broker rate from the peak to then. `None` without a backlog worth the name.
pub fn backlog_figures(samples: &[(f64, u64, u64)]) -> Option<String> {
    let backlog = |s: &(f64, u64, u64)| s.1.saturating_sub(s.2);
    let peak_at = samples
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| backlog(s))
        .map(|(i, _)| i)?;
    let peak = &samples[peak_at];
    if backlog(peak) < 1000 {
        return None;
    }
    let limit = backlog(peak) / 100;
    let after = &samples[peak_at..];
    let emptied = after.iter().find(|s| backlog(s) <= limit);
    // The steady rate, without the broker's start-up: from 10% to 90% of the way down.
    let drained = |share: u64| {
        after
            .iter()
            .find(|s| backlog(s) <= backlog(peak) - backlog(peak) * share / 100)
    };
    let steady = match (drained(10), drained(90)) {
        (Some(a), Some(b)) if b.0 > a.0 => format!(
            ", {:.0}/s from 10% to 90% of the way down",
            (b.2 - a.2) as f64 / (b.0 - a.0)
        ),
        _ => String::new(),
    };
    Some(match emptied {
        Some(e) => format!(
            "; backlog peaked at {} at {:.1} s and was under {limit} {:.1} s later, at {:.1} s \
             (spool to broker {:.0}/s from the peak{steady}; {:.0}/s net of new arrivals)",
            backlog(peak),
            peak.0,
            e.0 - peak.0,
            e.0,
            (e.2 - peak.2) as f64 / (e.0 - peak.0).max(1e-9),
            (backlog(peak) - backlog(e)) as f64 / (e.0 - peak.0).max(1e-9),
        ),
        None => format!(
            "; backlog peaked at {} at {:.1} s and never got under {limit}",
            backlog(peak),
            peak.0
        ),
    })
}

/// The smallest bucket bound under which at least `q` of the observations fall.
pub fn bucket_quantile(buckets: &[(f64, u64)], total: u64, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let need = (q * total as f64).ceil() as u64;
    buckets.iter().find(|(_, n)| *n >= need).map(|(le, _)| *le)
}

fn rabbitmqctl(args: &[&str]) -> bool {
    std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The figures of a fleet run that the timeline's cluster actions produce.
#[derive(Default)]
struct FleetLog {
    notes: Vec<String>,
    checks: Vec<Check>,
}

fn node_names(nodes: &[Option<usize>]) -> String {
    nodes
        .iter()
        .map(|n| n.map_or("-".to_string(), |n| format!("bw{}", n + 1)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// kill -9 of the node the instances publish to, then how long until every instance's
/// publisher is on another node.
async fn kill_connected_node(
    cluster: &tokio::sync::Mutex<Cluster>,
    admins: &[SocketAddr],
    started: tokio::time::Instant,
    log: &std::sync::Mutex<FleetLog>,
) {
    let before = cluster::publisher_nodes(admins).await;
    let mut c = cluster.lock().await;
    let at = started.elapsed().as_secs_f64();
    // From the kill -9 on: the script returns once the node's process is gone.
    let t = tokio::time::Instant::now();
    let killed = c.kill_connected_node(admins).await;
    drop(c);
    let (name, detail, ok) = match killed {
        Err(e) => (
            "kill -9 of the node the fleet publishes to".to_string(),
            format!("{e:#}"),
            false,
        ),
        Ok(node) => {
            let mut after = Vec::new();
            let mut moved = false;
            while t.elapsed() < Duration::from_secs(30) {
                after = cluster::publisher_nodes(admins).await;
                if after.iter().all(|n| n.is_some_and(|n| n != node)) {
                    moved = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (
                format!(
                    "every DLQ publisher moved off bw{} after its kill -9",
                    node + 1
                ),
                format!(
                    "kill -9 of bw{} at {at:.1} s (publishers on {}); {}",
                    node + 1,
                    node_names(&before),
                    if moved {
                        format!(
                            "publishers on {} {:.1} s after the kill",
                            node_names(&after),
                            t.elapsed().as_secs_f64()
                        )
                    } else {
                        format!("30 s later still on {}", node_names(&after))
                    }
                ),
                moved,
            )
        }
    };
    if let Ok(mut l) = log.lock() {
        l.notes.push(detail.clone());
        l.checks.push(Check { name, ok, detail });
    }
}

async fn restart_killed_node(
    cluster: &tokio::sync::Mutex<Cluster>,
    started: tokio::time::Instant,
    log: &std::sync::Mutex<FleetLog>,
) {
    let mut c = cluster.lock().await;
    let node = c.killed();
    let t = tokio::time::Instant::now();
    let at = started.elapsed().as_secs_f64();
    let note = match c.restart_killed_node().await {
        Ok(()) => node.map_or("restart_killed_node: no node was killed".to_string(), |n| {
            format!(
                "bw{} restarted at {at:.1} s, rejoined {:.1} s later",
                n + 1,
                t.elapsed().as_secs_f64()
            )
        }),
        Err(e) => format!("restart of the killed node failed: {e:#}"),
    };
    if let Ok(mut l) = log.lock() {
        l.notes.push(note);
    }
}

/// The lines of an instance's decision log files (`decisions*.jsonl`) under `dir`.
fn decision_lines(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("decisions") && n.ends_with(".jsonl")
                })
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .map(|t| t.lines().count())
                .sum()
        })
        .unwrap_or(0)
}

fn audit_verify(proxy_bin: &Path, dir: &Path) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(proxy_bin)
        .args(["audit", "verify"])
        .arg(dir)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

pub async fn run(path: &Path, args: &RunArgs) -> anyhow::Result<(bool, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let sc: Scenario =
        toml::from_str(&text).with_context(|| format!("invalid scenario {}", path.display()))?;
    let t = |s: f64| s * args.time_scale;
    if let Some(st) = sc
        .streams
        .iter()
        .find(|s| (s.fallback_p99_ms.is_some() || s.results_published) && s.route.is_none())
    {
        anyhow::bail!(
            "invalid scenario {}: stream {:?} sets fallback_p99_ms or results_published without route",
            path.display(),
            st.name
        );
    }
    let fleet = sc.fleet.clone();
    let with_cluster = fleet.as_ref().is_some_and(|f| f.cluster);
    if (sc.invariants.audit_collected || sc.streams.iter().any(|s| s.results_published))
        && !with_cluster
    {
        anyhow::bail!(
            "invalid scenario {}: audit_collected and results_published need [fleet] cluster = true",
            path.display()
        );
    }
    if sc.needs_rabbitmq
        && tokio::net::TcpStream::connect("127.0.0.1:5672")
            .await
            .is_err()
    {
        anyhow::bail!("scenario {} needs RabbitMQ on 127.0.0.1:5672", sc.name);
    }
    let dir = std::env::temp_dir().join(format!(
        "breakwater-scenario-{}-{}",
        sc.name,
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let id = format!("{}", std::process::id());

    // The local three-node cluster, before anything that talks to it.
    let cluster = match &fleet {
        Some(f) if f.cluster => {
            if !cluster::available() {
                anyhow::bail!(
                    "scenario {} needs rabbitmq-server installed (the local cluster kit)",
                    sc.name
                );
            }
            let c = Cluster::start(Duration::from_secs(f.cluster_ttl_s))
                .await
                .context("cannot start the local RabbitMQ cluster (loadtests/rabbit-cluster.sh)")?;
            Some(Arc::new(tokio::sync::Mutex::new(c)))
        }
        _ => None,
    };
    let (cluster_urls, cluster_toml) = match &cluster {
        Some(c) => {
            let c = c.lock().await;
            (c.urls().to_vec(), Some(c.urls_toml()))
        }
        None => (Vec::new(), None),
    };

    let ai = Arc::new(MockAi::start().await);
    ai.set_model_version("model-v1");
    let canary = if sc.with_canary_upstream {
        let c = MockAi::start().await;
        c.set_model_version("model-v2");
        Some(Arc::new(c))
    } else {
        None
    };
    let n = fleet.as_ref().map_or(1, |f| f.instances.max(1));
    let mut instances = Vec::new();
    for i in 0..n {
        let name = if fleet.is_some() {
            format!("{}-{}", sc.name, i + 1)
        } else {
            "breakwater".to_string()
        };
        let idir = if fleet.is_some() {
            dir.join(&name)
        } else {
            dir.clone()
        };
        std::fs::create_dir_all(&idir)?;
        std::fs::write(
            idir.join("audit.key"),
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        )?;
        instances.push(Instance {
            cfg_path: idir.join("breakwater.toml"),
            name,
            listen: free_port()?,
            admin: ([127, 0, 0, 1], free_port()?).into(),
            dir: idir,
        });
    }
    let inputs = ConfigInputs {
        sc: sc.clone(),
        id: id.clone(),
        ai: ai.addr(),
        canary: canary.as_ref().map(|c| c.addr()),
        cluster_urls: cluster_toml.clone(),
        fleet: fleet.is_some(),
    };
    for inst in &instances {
        write_config(&inputs, inst, 0)?;
        let check = std::process::Command::new(&args.proxy_bin)
            .args(["check", "--config"])
            .arg(&inst.cfg_path)
            .output()?;
        if !check.status.success() {
            anyhow::bail!(
                "scenario config invalid:\n{}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
    let admins: Vec<SocketAddr> = instances.iter().map(|i| i.admin).collect();
    let admin_addr = admins[0];

    // The central audit collector runs before the sidecars publish: its queue must be bound
    // to `breakwater.audit` before the first copy arrives.
    let collected = dir.join("collected");
    let mut collector = None;
    if sc.invariants.audit_collected {
        let mut cmd = tokio::process::Command::new(&args.proxy_bin);
        cmd.args(["audit", "collect", "--amqp"])
            .arg(cluster_urls.join(","))
            .arg("--out")
            .arg(&collected)
            .args(["--idle-exit-s", "10"])
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(dir.join("collect.out"))?)
            .stderr(std::fs::File::create(dir.join("collect.err"))?)
            .kill_on_drop(true);
        collector = Some(
            cmd.spawn()
                .context("cannot start breakwater audit collect")?,
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while cluster::queue_depth(&cluster_urls, "breakwater.audit.collect")
            .await
            .is_none()
        {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("breakwater audit collect did not declare its queue within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let mut procs = Vec::new();
    for inst in &instances {
        procs.push(Proc::spawn(
            &inst.name,
            &args.proxy_bin,
            &["--config".into(), inst.cfg_path.display().to_string()],
            None,
            &[("RUST_LOG", "warn")],
        )?);
    }
    for a in &admins {
        wait_http_ok(*a, "/readyz", Duration::from_secs(30)).await?;
    }
    let gen_before = admin_json(admin_addr, "/admin/config")
        .await
        .and_then(|c| c["generation"].as_u64())
        .unwrap_or(0);

    // The timeline runs beside the load.
    let started = tokio::time::Instant::now();
    let fleet_log = Arc::new(std::sync::Mutex::new(FleetLog::default()));
    let mut markers = Vec::new();
    let mut steps = Vec::new();
    let mut cluster_steps = Vec::new();
    let instances = Arc::new(instances);
    for step in &sc.timeline {
        markers.push(Marker {
            at_s: t(step.at_s),
            label: step.action.clone(),
        });
        let step = step.clone();
        let ai = ai.clone();
        let canary = canary.clone();
        let time_scale = args.time_scale;
        let (inputs, instances) = (inputs.clone(), instances.clone());
        let (cluster, admins, fleet_log) = (cluster.clone(), admins.clone(), fleet_log.clone());
        let is_cluster_step = matches!(
            step.action.as_str(),
            "kill_connected_node" | "restart_killed_node"
        );
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(step.at_s * time_scale)).await;
            match step.action.as_str() {
                "ai_down" => ai.outage(true).await,
                "ai_up" => ai.outage(false).await,
                "ai_errors" => {
                    ai.set_error_rate(step.error_rate.unwrap_or(1.0), step.status.unwrap_or(503))
                }
                "ai_recover" => ai.recover(),
                "ai_slow" => ai.set_delay(Duration::from_millis(step.delay_ms.unwrap_or(500))),
                "broker_stop" => {
                    rabbitmqctl(&["stop_app"]);
                }
                "broker_start" => {
                    rabbitmqctl(&["start_app"]);
                }
                "kill_connected_node" | "restart_killed_node" => match &cluster {
                    None => eprintln!("warning: {} needs [fleet] cluster = true", step.action),
                    Some(c) if step.action == "kill_connected_node" => {
                        kill_connected_node(c, &admins, started, &fleet_log).await
                    }
                    Some(c) => restart_killed_node(c, started, &fleet_log).await,
                },
                "canary_fail" => {
                    if let Some(c) = &canary {
                        c.set_error_rate(
                            step.error_rate.unwrap_or(1.0),
                            step.status.unwrap_or(500),
                        );
                    }
                }
                "reload_every" => {
                    let every = Duration::from_secs_f64(step.every_s.unwrap_or(1.0) * time_scale);
                    let until = tokio::time::Instant::now()
                        + Duration::from_secs_f64(
                            (step.until_s.unwrap_or(0.0) - step.at_s).max(0.0) * time_scale,
                        );
                    let mut n = 0u64;
                    while tokio::time::Instant::now() < until {
                        n += 1;
                        for inst in instances.iter() {
                            let _ = write_config(&inputs, inst, n);
                        }
                        tokio::time::sleep(every).await;
                    }
                }
                other => eprintln!("warning: unknown timeline action {other:?}"),
            }
        });
        if is_cluster_step {
            cluster_steps.push(task);
        } else {
            steps.push(task);
        }
    }

    // With RabbitMQ in the scenario, how fast the spools drain to it: sampled from
    // breakwater's counters (summed over the instances) while the load runs and afterwards.
    let load_start = tokio::time::Instant::now();
    let drain_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = (sc.needs_rabbitmq || with_cluster).then(|| {
        let stop = drain_stop.clone();
        let admins = admins.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(f64, u64, u64)> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some((accepted, published)) = fleet_dlq_counts(&admins).await {
                    samples.push((load_start.elapsed().as_secs_f64(), accepted, published));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            samples
        })
    });
    // Each stream's rate and connections are split evenly across the instances.
    let mut runs = Vec::new();
    for st in &sc.streams {
        let mut per_instance = Vec::new();
        for inst in instances.iter() {
            let target: SocketAddr = ([127, 0, 0, 1], inst.listen).into();
            let mut spec = LoadSpec::get(target, &st.path);
            spec.method = st.method.parse().unwrap_or(http::Method::GET);
            spec.body = bytes::Bytes::from(st.body.clone());
            spec.rate = Some(st.rate * args.rate_scale / n as f64);
            spec.duration = Duration::from_secs_f64(t(sc.duration_s));
            spec.connections = (st.connections / n).max(1);
            spec.headers = vec![("content-type".into(), "application/json".into())];
            per_instance.push(tokio::spawn(driver::run(spec)));
        }
        runs.push(per_instance);
    }
    let mut results = Vec::new();
    for per_instance in runs {
        let mut merged: Option<driver::LoadResult> = None;
        for r in per_instance {
            let r = r.await??;
            match &mut merged {
                None => merged = Some(r),
                Some(m) => m.merge(&r)?,
            }
        }
        results.push(merged.context("a stream without an instance")?);
    }
    for s in steps {
        s.abort();
    }
    // A kill or restart in progress finishes (it records the failover figures).
    for s in cluster_steps {
        let _ = tokio::time::timeout(Duration::from_secs(150), s).await;
    }
    // Faults end with the run: the AI and the broker come back for the settle phase.
    ai.outage(false).await;
    ai.recover();
    if sc.timeline.iter().any(|s| s.action == "broker_stop") {
        rabbitmqctl(&["start_app"]);
    }
    let mut result = results[0].clone();
    for r in &results[1..] {
        result.merge(r)?;
    }

    let mut checks = Vec::new();
    let c = &result.counts;
    let inv = &sc.invariants;
    if let Some(max) = inv.max_5xx {
        let n = c.count_5xx();
        checks.push(Check {
            name: format!("5xx responses <= {max}"),
            ok: n <= max,
            detail: format!("{n}"),
        });
    }
    if let Some(max) = inv.max_errors {
        checks.push(Check {
            name: format!("transport errors <= {max}"),
            ok: c.errors <= max,
            detail: format!("{}", c.errors),
        });
    }
    if let Some(max) = inv.max_non_2xx {
        let n: u64 = c
            .status
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        checks.push(Check {
            name: format!("non-2xx responses <= {max}"),
            ok: n <= max,
            detail: format!("{n}"),
        });
    }
    if let Some(max) = inv.p99_ms {
        let p = result.ms(0.99);
        checks.push(Check {
            name: format!("p99 < {max} ms"),
            ok: p < max,
            detail: format!("{p:.3}"),
        });
    }
    let mut replay_expected = 0u64;
    let mut results_expected = Vec::new();
    for (st, r) in sc.streams.iter().zip(&results) {
        let rc = &r.counts;
        let accepted = rc.dlq.get("queued").copied().unwrap_or(0)
            + rc.dlq.get("spooled").copied().unwrap_or(0);
        let fallbacks = rc.outcome.get("fallback").copied().unwrap_or(0);
        if let Some(max) = st.fallback_p99_ms {
            let client = r.outcome_ms("fallback", 0.99).unwrap_or(f64::NAN);
            let metrics = admin_get(admin_addr, "/metrics").await.unwrap_or_default();
            let metrics = String::from_utf8_lossy(&metrics);
            let route = st.route.as_deref().unwrap_or_default().replace("{id}", &id);
            let (buckets, total) = duration_buckets(&metrics, &route, "fallback");
            let p = bucket_quantile(&buckets, total, 0.99).map(|s| s * 1000.0);
            checks.push(Check {
                name: format!("{}: fallback p99 <= {max} ms in breakwater", st.name),
                ok: p.is_some_and(|p| p <= max),
                detail: format!(
                    "p99 <= {} ms over {total} fallbacks (route {route:?}, request_duration_seconds \
                     bucket); client-side p99 {client:.3} ms",
                    p.map_or("?".to_string(), |p| format!("{p}")),
                ),
            });
        }
        if let Some(min) = st.min_fallbacks {
            checks.push(Check {
                name: format!("{}: fallback answers >= {min}", st.name),
                ok: fallbacks >= min,
                detail: format!("{fallbacks}"),
            });
        }
        if st.dlq_all_accepted {
            let rejected = rc.dlq.get("rejected").copied().unwrap_or(0);
            checks.push(Check {
                name: format!("{}: every replayable failure queued or spooled", st.name),
                ok: rejected == 0 && accepted == fallbacks && accepted > 0,
                detail: format!(
                    "{accepted} accepted of {fallbacks} fallbacks ({:?}), {rejected} rejected",
                    rc.dlq
                ),
            });
        }
        if st.replayed_after_recovery {
            replay_expected += accepted;
        }
        if st.results_published {
            let route = st.route.as_deref().unwrap_or_default().replace("{id}", &id);
            results_expected.push((st.name.clone(), route, accepted));
        }
    }
    let settle_deadline =
        tokio::time::Instant::now() + Duration::from_secs_f64(sc.settle_s.max(1.0));
    if sc.streams.iter().any(|s| s.replayed_after_recovery) {
        let mut replayed = 0u64;
        while tokio::time::Instant::now() < settle_deadline {
            replayed = ai.distinct_keys() as u64;
            if replayed >= replay_expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let dlq = admin_json(admin_addr, "/admin/dlq")
            .await
            .unwrap_or_default();
        checks.push(Check {
            name: "every DLQ'd request replayed to the AI after recovery".into(),
            ok: replayed >= replay_expected && replay_expected > 0,
            detail: format!(
                "{replayed} of {replay_expected} (distinct Idempotency-Keys at the AI, {} replays in all); DLQ: {}",
                ai.replays(),
                dlq["routes"]
            ),
        });
    }
    for (stream, route, expected) in results_expected {
        let queue = format!("breakwater.results.{route}");
        let mut depth = 0;
        loop {
            depth = cluster::queue_depth(&cluster_urls, &queue)
                .await
                .unwrap_or(depth);
            if u64::from(depth) >= expected || tokio::time::Instant::now() > settle_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Then by request id: a redelivered replay may have published a result twice.
        let ids = cluster::drain_request_ids(&cluster_urls, &queue)
            .await
            .unwrap_or_default();
        let distinct = ids
            .iter()
            .filter(|i| !i.is_empty())
            .collect::<std::collections::HashSet<_>>()
            .len() as u64;
        checks.push(Check {
            name: format!("{stream}: every result reached {queue}"),
            ok: distinct >= expected && expected > 0,
            detail: format!(
                "{depth} results in the queue (counted on the cluster), {distinct} distinct request ids, for {expected} DLQ'd requests"
            ),
        });
    }
    if let Some(pace) = inv.replay_pace_per_s {
        let busiest = ai.max_replays_per_s();
        let limit = pace * 1.1;
        checks.push(Check {
            name: format!(
                "the AI never saw more than {pace}/s (+10%) replays across the {n} instance(s)"
            ),
            ok: busiest as f64 <= limit && ai.replays() > 0,
            detail: format!(
                "busiest 1 s window (sliding): {busiest} replays, limit {limit:.0}; {} replays in all",
                ai.replays()
            ),
        });
    }
    if let Some(drain) = drain {
        // The spool may still be draining (a backlog after an outage): wait for it, within
        // the settle time.
        while tokio::time::Instant::now() < settle_deadline {
            match fleet_dlq_counts(&admins).await {
                Some((accepted, published)) if published < accepted => {}
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // One more sample after the replay wait, then the figures.
        drain_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut samples = drain.await.unwrap_or_default();
        if let Some((accepted, published)) = fleet_dlq_counts(&admins).await {
            samples.push((load_start.elapsed().as_secs_f64(), accepted, published));
        }
        if let Some(check) = drain_check(&samples, t(sc.duration_s)) {
            checks.push(check);
        }
    }
    if let Some(min) = inv.min_reloads {
        let gen_after = admin_json(admin_addr, "/admin/config")
            .await
            .and_then(|c| c["generation"].as_u64())
            .unwrap_or(0);
        let reloads = gen_after.saturating_sub(gen_before);
        checks.push(Check {
            name: format!("config reloaded >= {min} times"),
            ok: reloads >= min,
            detail: format!("{reloads} reloads"),
        });
    }
    if inv.canary_rolled_back {
        let inv_doc = admin_json(admin_addr, "/admin/inventory").await;
        let rolled = inv_doc.as_ref().and_then(|d| {
            d["routes"]
                .as_array()?
                .iter()
                .flat_map(|r| r["variants"].as_array().cloned().unwrap_or_default())
                .find_map(|v| v["rollback"].as_object().cloned())
        });
        checks.push(Check {
            name: "failing canary rolled back automatically".into(),
            ok: rolled.is_some(),
            detail: rolled
                .map(|r| r.get("reason").map(|v| v.to_string()).unwrap_or_default())
                .unwrap_or_else(|| "no rollback".into()),
        });
    }
    // A graceful stop flushes the decision log (and its copies); then its chain must verify.
    for proxy in &procs {
        if let Some(pid) = proxy.pid() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
    for proxy in &mut procs {
        let _ = tokio::time::timeout(Duration::from_secs(20), proxy.child.wait()).await;
    }
    for inst in instances.iter() {
        let (ok, detail) = audit_verify(&args.proxy_bin, &inst.dir.join("audit"))?;
        checks.push(Check {
            name: if fleet.is_some() {
                format!("decision log of {} verifies", inst.name)
            } else {
                "decision log verifies".into()
            },
            ok,
            detail,
        });
    }
    if let Some(mut child) = collector {
        // It exits 10 s after the last copy; gaps or conflicts make its status 2.
        let status = match tokio::time::timeout(Duration::from_secs(90), child.wait()).await {
            Ok(s) => s.ok().and_then(|s| s.code()),
            Err(_) => {
                let _ = child.kill().await;
                None
            }
        };
        let out = std::fs::read_to_string(dir.join("collect.out")).unwrap_or_default();
        for inst in instances.iter() {
            let mine = decision_lines(&inst.dir.join("audit"));
            let theirs = decision_lines(&collected.join(&inst.name));
            let (verified, report) = audit_verify(&args.proxy_bin, &collected.join(&inst.name))?;
            let summary = out
                .lines()
                .find(|l| l.starts_with(&format!("{}:", inst.name)))
                .unwrap_or("(no summary line)");
            checks.push(Check {
                name: format!(
                    "the audit collected from the cluster verifies for {}",
                    inst.name
                ),
                ok: status == Some(0) && verified && theirs == mine && mine > 0,
                detail: format!(
                    "{theirs} of {mine} records collected; collector exit {status:?}: {summary}; verify: {report}"
                ),
            });
        }
    }
    let fleet_log = match fleet_log.lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(_) => FleetLog::default(),
    };
    checks.extend(fleet_log.checks);
    if let Some(c) = &cluster {
        c.lock().await.stop();
    }
    if sc.needs_rabbitmq {
        // Leave no test queues behind.
        for name in sc
            .config
            .lines()
            .filter_map(|l| l.trim().strip_prefix("name = \""))
            .filter_map(|n| n.strip_suffix('"'))
        {
            let route = name.replace("{id}", &id);
            for q in [
                format!("breakwater.dlq.{route}"),
                format!("breakwater.dlq.{route}.parked"),
                format!("breakwater.results.{route}"),
            ] {
                rabbitmqctl(&["delete_queue", &q]);
            }
        }
    }

    let ok = checks.iter().all(|c| c.ok);
    let mut summary = format!(
        "{}\n\n{:.1} s; {}streams: {}\n\nrequests {}, transport errors {}, throughput {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms\n\noutcomes {:?}; fallbacks {:?}; reasons {:?}; dlq {:?}; status {:?}\n\n",
        sc.description.trim(),
        t(sc.duration_s),
        match &fleet {
            Some(f) => format!(
                "{} breakwater instances{}; ",
                n,
                if f.cluster { " on the local three-node RabbitMQ cluster" } else { "" }
            ),
            None => String::new(),
        },
        sc.streams.iter().map(|s| format!("{} {} {} at {} req/s", s.name, s.method, s.path, s.rate * args.rate_scale)).collect::<Vec<_>>().join("; "),
        c.requests,
        c.errors,
        result.throughput(),
        result.ms(0.5),
        result.ms(0.99),
        result.ms(0.999),
        c.outcome,
        c.fallback,
        c.reason,
        c.dlq,
        c.status
    );
    if !fleet_log.notes.is_empty() {
        summary.push_str("## Cluster\n\n");
        for note in &fleet_log.notes {
            summary.push_str(&format!("- {note}\n"));
        }
        summary.push('\n');
    }
    summary.push_str("## Invariants\n\n");
    for (st, r) in sc.streams.iter().zip(&results) {
        summary.push_str(&format!(
            "- stream {}: {} requests, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms\n",
            st.name,
            r.counts.requests,
            r.ms(0.5),
            r.ms(0.99),
            r.ms(0.999)
        ));
    }
    summary.push('\n');
    for check in &checks {
        summary.push_str(&format!(
            "- [{}] {}: {}\n",
            if check.ok { "x" } else { " " },
            check.name,
            check.detail
        ));
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let md = report::write(
        &args.report_dir,
        &format!("{stamp}-{}", sc.name),
        &format!("scenario {}: {}", sc.name, if ok { "PASS" } else { "FAIL" }),
        &summary,
        &result,
        &markers,
    )?;
    if ok || std::env::var_os("BW_SCENARIO_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok((ok, md))
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# TYPE breakwater_request_duration_seconds histogram
breakwater_request_duration_seconds_bucket{route="rec",outcome="fallback",le="0.0001"} 10
breakwater_request_duration_seconds_bucket{route="rec",outcome="fallback",le="0.00025"} 950
breakwater_request_duration_seconds_bucket{route="rec",outcome="fallback",le="0.0005"} 995
breakwater_request_duration_seconds_bucket{route="rec",outcome="fallback",le="0.001"} 999
breakwater_request_duration_seconds_bucket{route="rec",outcome="fallback",le="+Inf"} 1000
breakwater_request_duration_seconds_sum{route="rec",outcome="fallback"} 0.2
breakwater_request_duration_seconds_count{route="rec",outcome="fallback"} 1000
breakwater_request_duration_seconds_bucket{route="rec",outcome="ai",le="0.0001"} 0
breakwater_request_duration_seconds_count{route="rec",outcome="ai"} 7
breakwater_request_duration_seconds_count{route="recommend",outcome="fallback"} 3
"#;

    #[test]
    fn dlq_drain_figures_come_from_the_counters() {
        let m = "breakwater_dlq_messages_total{route=\"g\",result=\"spooled\"} 50\n\
                 breakwater_dlq_messages_total{route=\"g\",result=\"queued\"} 10\n\
                 breakwater_dlq_messages_total{route=\"h\",result=\"spooled\"} 5\n\
                 breakwater_dlq_messages_total{route=\"g\",result=\"published\"} 40\n";
        let name = "breakwater_dlq_messages_total";
        assert_eq!(counter_by_result(m, name, "spooled"), 55);
        assert_eq!(counter_by_result(m, name, "published"), 40);
        assert_eq!(counter_by_result(m, name, "rejected"), 0);

        let samples = [
            (1.0, 100, 50),
            (2.0, 200, 150),
            (3.0, 200, 190),
            (4.0, 200, 200),
        ];
        let c = drain_check(&samples, 2.0).unwrap();
        assert!(c.ok, "{}", c.detail);
        assert!(
            c.detail.contains("150 published during the load (75/s)"),
            "{}",
            c.detail
        );
        assert!(
            c.detail
                .contains("all published 4.0 s after the start (average 50/s)"),
            "{}",
            c.detail
        );
        assert!(
            backlog_figures(&samples).is_none(),
            "a backlog of 50 is none"
        );
        let outage = [
            (1.0, 3000, 2900),
            (2.0, 6000, 2900),
            (3.0, 9000, 2900),
            (4.0, 12000, 8000),
            (5.0, 15000, 14950),
        ];
        let b = backlog_figures(&outage).unwrap();
        assert!(
            b.contains("backlog peaked at 6100 at 3.0 s and was under 61 2.0 s later, at 5.0 s (spool to broker 6025/s from the peak, 6950/s from 10% to 90% of the way down; 3025/s net"),
            "{b}"
        );
        let short = drain_check(&samples[..3], 2.0).unwrap();
        assert!(!short.ok);
        assert!(drain_check(&[(1.0, 0, 0)], 2.0).is_none());
    }

    #[test]
    fn reads_one_route_and_outcome_from_the_prometheus_text() {
        let (buckets, total) = duration_buckets(METRICS, "rec", "fallback");
        assert_eq!(total, 1000);
        assert_eq!(buckets.len(), 5);
        assert_eq!(bucket_quantile(&buckets, total, 0.5), Some(0.00025));
        assert_eq!(bucket_quantile(&buckets, total, 0.99), Some(0.0005));
        assert_eq!(bucket_quantile(&buckets, total, 0.999), Some(0.001));
        assert_eq!(bucket_quantile(&buckets, total, 1.0), Some(f64::INFINITY));
        let (_, none) = duration_buckets(METRICS, "grading", "fallback");
        assert_eq!(bucket_quantile(&[], none, 0.99), None);
    }
}
