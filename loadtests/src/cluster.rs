//! A three-node RabbitMQ cluster on this machine for the fleet test and the
//! `broker-node-loss` scenario: a handle over `loadtests/rabbit-cluster.sh` that starts
//! the nodes with a TTL watchdog, stops them when dropped, and kills -9 the node a fleet
//! of breakwater instances is publishing to (as breakwater's admin API reports it).
//!
//! The kit never touches the machine's own broker on 5672: its nodes are `bw1..bw3@localhost`
//! on AMQP ports 5681-5683, with their own data directory and Erlang cookie.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// The number of nodes the kit starts.
pub const NODES: usize = 3;

/// A running local cluster; dropping it stops the nodes (by PID) and removes their data.
pub struct Cluster {
    dir: PathBuf,
    urls: Vec<String>,
    killed: Option<usize>,
    stopped: bool,
}

/// The kit's script, next to this crate's manifest.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rabbit-cluster.sh")
}

/// Whether this machine can run the kit (a RabbitMQ server installation).
pub fn available() -> bool {
    Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()
        || std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("rabbitmq-server").exists()))
        || Path::new("/usr/sbin/rabbitmq-server").exists()
}

impl Cluster {
    /// Starts the three nodes and joins them; the watchdog stops them after `ttl` even if
    /// this process dies. Takes ~20 s.
    pub async fn start(ttl: Duration) -> anyhow::Result<Cluster> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "breakwater-cluster-{}-{}",
            std::process::id(),
            stamp % 1_000_000_000
        ));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = Cluster {
            dir,
            urls: Vec::new(),
            killed: None,
            stopped: false,
        };
        let ttl_s = ttl.as_secs().max(1).to_string();
        cluster.run(&["start", "--ttl", &ttl_s]).await?;
        let env = cluster.run(&["env"]).await?;
        cluster.urls = env
            .lines()
            .find_map(|l| l.strip_prefix("BW_CLUSTER_URLS="))
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        if cluster.urls.len() != NODES {
            anyhow::bail!("rabbit-cluster.sh env printed {env:?}");
        }
        Ok(cluster)
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(script());
        cmd.args(args)
            .env("BW_CLUSTER_DIR", &self.dir)
            .env("BW_CLUSTER_STATE", self.dir.join("state"))
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// Runs the script; its stdout, or an error with its stderr.
    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::from(self.command(args))
            .output()
            .await
            .with_context(|| format!("cannot run {}", script().display()))?;
        if !out.status.success() {
            anyhow::bail!(
                "rabbit-cluster.sh {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The AMQP URLs of the nodes, node 1 first.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The URLs as a TOML array, for `amqp_url = ...` / `publish_url = ...`.
    pub fn urls_toml(&self) -> String {
        format!(
            "[{}]",
            self.urls
                .iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// Where the nodes keep their data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node (index 0..3) killed by `kill_connected_node`, until it is restarted.
    pub fn killed(&self) -> Option<usize> {
        self.killed
    }

    /// kill -9 of node `index` (0-based).
    pub async fn kill9(&mut self, index: usize) -> anyhow::Result<()> {
        self.run(&["kill9", &(index + 1).to_string()]).await?;
        self.killed = Some(index);
        Ok(())
    }

    /// Starts node `index` again and waits until it has rejoined the cluster.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.run(&["restart", &(index + 1).to_string()]).await?;
        if self.killed == Some(index) {
            self.killed = None;
        }
        Ok(())
    }

    /// The script's `status` output (which nodes run, the cluster's members).
    pub async fn status(&self) -> String {
        match self.run(&["status"]).await {
            Ok(s) => s,
            Err(e) => e.to_string(),
        }
    }

    /// kill -9 of the node most of the instances' DLQ publishers are connected to (each
    /// instance's `amqp_url` lists the nodes in the kit's order). Returns its index.
    pub async fn kill_connected_node(&mut self, admins: &[SocketAddr]) -> anyhow::Result<usize> {
        let nodes = publisher_nodes(admins).await;
        let node = busiest(&nodes)
            .with_context(|| format!("no instance reports a connected DLQ publisher: {nodes:?}"))?;
        self.kill9(node).await?;
        Ok(node)
    }

    /// Restarts the node `kill_connected_node` killed (no-op if none).
    pub async fn restart_killed_node(&mut self) -> anyhow::Result<()> {
        match self.killed {
            Some(n) => self.restart(n).await,
            None => Ok(()),
        }
    }

    /// Stops the nodes now (also done on drop).
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = self
            .command(&["stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if std::env::var_os("BW_CLUSTER_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The node index each instance's DLQ publisher is connected to (`GET /admin/dlq`,
/// `broker.publisher.node`); `None` for an instance not connected or not answering.
pub async fn publisher_nodes(admins: &[SocketAddr]) -> Vec<Option<usize>> {
    let mut out = Vec::new();
    for admin in admins {
        let node = admin_json(*admin, "/admin/dlq")
            .await
            .and_then(|st| st["broker"]["publisher"]["node"].as_u64())
            .map(|n| n as usize);
        out.push(node);
    }
    out
}

/// The most common connected node (the lowest index on a tie).
pub fn busiest(nodes: &[Option<usize>]) -> Option<usize> {
    let mut counts = [0usize; NODES];
    for n in nodes.iter().flatten() {
        if let Some(c) = counts.get_mut(*n) {
            *c += 1;
        }
    }
    let max = *counts.iter().max()?;
    (max > 0).then(|| counts.iter().position(|c| *c == max))?
}

async fn admin_json(admin: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::get(format!("http://{admin}{path}"))
        .body(http_body_util::Full::default())
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .ok()?
        .ok()?;
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .ok()?
        .to_bytes();
    serde_json::from_slice(&body).ok()
}

/// Ready messages in `queue` on the first node of `urls` that answers (`None`: no node
/// answered, or the queue does not exist).
pub async fn queue_depth(urls: &[String], queue: &str) -> Option<u32> {
    for url in urls {
        let Ok(Ok(conn)) = tokio::time::timeout(
            Duration::from_secs(5),
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
        )
        .await
        else {
            continue;
        };
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let depth = ch
            .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
            .await
            .map(|q| q.message_count())
            .ok();
        let _ = conn.close(200, "done".into()).await;
        return depth;
    }
    None
}

/// Takes every message now in `queue` (acked: destructive) on the first node of `urls`
/// that answers and returns the `request_id` header of each, in order (breakwater's replay
/// results carry the original request's id). `None`: no node answered.
pub async fn drain_request_ids(urls: &[String], queue: &str) -> Option<Vec<String>> {
    for url in urls {
        let Ok(Ok(conn)) = tokio::time::timeout(
            Duration::from_secs(5),
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
        )
        .await
        else {
            continue;
        };
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        let mut ids = Vec::new();
        while let Ok(Some(m)) = ch
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
        {
            let id = m
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get("request_id") {
                    Some(lapin::types::AMQPValue::LongString(s)) => Some(s.to_string()),
                    _ => None,
                })
                .unwrap_or_default();
            ids.push(id);
        }
        let _ = conn.close(200, "done".into()).await;
        return Some(ids);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_node_is_the_one_most_publishers_are_on() {
        assert_eq!(busiest(&[Some(0), Some(0), Some(1)]), Some(0));
        assert_eq!(busiest(&[None, Some(2), Some(2)]), Some(2));
        assert_eq!(busiest(&[Some(1), Some(2)]), Some(1));
        assert_eq!(busiest(&[None, None]), None);
        assert_eq!(busiest(&[Some(7)]), None);
    }
}
