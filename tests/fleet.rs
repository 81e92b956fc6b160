//! A fleet of sidecars on a RabbitMQ cluster: `amqp_url` as a list with failover to the
//! next node, replay paced for the whole fleet (single active consumer), and central
//! collection of the decision log copies. Against the real broker on 127.0.0.1:5672; a
//! "node" that dies is a TCP forwarder to it that the test kills (the shared broker itself
//! is never touched; the three-node cluster kit is in loadtests/).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::rabbit::{self, available};
use support::*;
use tokio_util::sync::CancellationToken;

const STATIC_FB: &str =
    "[[routes.fallback]]\nkind = \"static\"\nstatus = 202\nbody = '{\"status\":\"queued\"}'\n";

/// A RabbitMQ "node" for the tests: a TCP forwarder to the local broker on its own port.
/// `kill` closes every connection through it and stops listening, as a dead node does
/// (connections reset, new ones refused).
struct ForwardNode {
    port: u16,
    stop: CancellationToken,
}

impl ForwardNode {
    async fn start() -> ForwardNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                    _ = token.cancelled() => return,
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5672").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        // Both sockets are dropped: the client sees its connection go.
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        ForwardNode { port, stop }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn kill(&self) {
        self.stop.cancel();
    }
}

impl Drop for ForwardNode {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn route_config(ai: &MockAi, route: &str, dir: &std::path::Path, dlq: &str) -> String {
    let route_extra = format!("replayable = true\n[routes.breaker]\nconsecutive_failures = 1\nopen_ms = 600000\nopen_max_ms = 600000\n{STATIC_FB}");
    let dlq = format!(
        "[dlq]\nspool_dir = \"{}\"\nresults_exchange = \"test.results.{route}\"\n{dlq}\n",
        dir.join("spool").display()
    );
    simple_config(&ai.url(), &route_extra, &dlq)
        .replace("name = \"ai\"", &format!("name = \"{route}\""))
}

async fn post(proxy: &TestProxy, body: &str) -> Reply {
    let req = http::Request::post(proxy.url("/v1/grading"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    proxy.send(req).await
}

async fn dlq_status(proxy: &TestProxy) -> serde_json::Value {
    proxy.admin_get("/admin/dlq").await.unwrap().json()
}

#[tokio::test]
async fn dlq_publisher_and_replay_fail_over_to_the_next_node_and_lose_nothing() {
    if !available().await {
        return;
    }
    let node0 = ForwardNode::start().await;
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("fleet_failover");
    let (conn, ch) = rabbit::channel().await;
    let results = rabbit::results_queue(&ch, &format!("test.results.{route}"), &route).await;
    let dlq = format!(
        "amqp_url = [\"{}\", \"{}\"]\nreplay_rate_per_s = 200\n",
        node0.url(),
        rabbit::URL
    );
    let proxy = TestProxy::start(&route_config(&ai, &route, dir.path(), &dlq)).await;
    let queue = format!("breakwater.dlq.{route}");
    for i in 0..5 {
        let r = post(&proxy, &format!("{{\"essay\":{i}}}")).await;
        assert!(
            matches!(r.header("x-breakwater-dlq"), Some("queued" | "spooled")),
            "{:?}",
            r.headers
        );
    }
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 5, Duration::from_secs(20)).await,
        5
    );
    let st = dlq_status(&proxy).await;
    assert_eq!(st["broker"]["publisher"]["node"], 0, "{st}");
    assert_eq!(st["broker"]["nodes"].as_array().unwrap().len(), 2, "{st}");

    // Node 0 dies mid-stream: requests are still answered (the spool takes them), the
    // publisher moves to node 1 and every message reaches the queue.
    node0.kill();
    for i in 5..10 {
        let r = post(&proxy, &format!("{{\"essay\":{i}}}")).await;
        assert!(
            matches!(r.header("x-breakwater-dlq"), Some("queued" | "spooled")),
            "{:?}",
            r.headers
        );
    }
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 10, Duration::from_secs(60)).await,
        10
    );
    assert!(
        poll_until(Duration::from_secs(30), || async {
            dlq_status(&proxy).await["broker"]["publisher"]["node"] == 1
        })
        .await,
        "{}",
        dlq_status(&proxy).await
    );
    let cfg = proxy.admin_config().await;
    let shown = &cfg["amqp_connections"]["breakwater-dlq-publisher"];
    assert_eq!(shown["node"], 1, "{cfg}");
    assert_eq!(shown["url"], "amqp://guest:***@127.0.0.1:5672/%2f", "{cfg}");
    let listed = cfg["config"]["dlq"]["amqp_url"].as_array().unwrap().clone();
    assert!(
        listed.iter().all(|u| u.as_str().unwrap().contains(":***@")),
        "{listed:?}"
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics
            .contains("breakwater_amqp_connected_node{connection=\"breakwater-dlq-publisher\"} 1"),
        "{metrics}"
    );

    // The replay consumer moves off node 0 (dead) and replays everything.
    ai.outage(false).await;
    let r = proxy
        .admin_post(
            &format!("/admin/routes/{route}/breaker"),
            r#"{"state":"auto"}"#,
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        rabbit::wait_depth(&conn, &results, 10, Duration::from_secs(60)).await,
        10
    );
    assert_eq!(ai.count_by_header("idempotency-key").len(), 10);
    let st = dlq_status(&proxy).await;
    assert_eq!(
        st["routes"][route.as_str()]["replay_connection"]["node"],
        1,
        "{st}"
    );
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
    drop(conn);
}

#[tokio::test]
async fn a_dead_first_node_is_skipped_and_counted() {
    if !available().await {
        return;
    }
    let dead = ForwardNode::start().await;
    dead.kill();
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("fleet_dead_first");
    let dlq = format!("amqp_url = [\"{}\", \"{}\"]\n", dead.url(), rabbit::URL);
    let proxy = TestProxy::start(&route_config(&ai, &route, dir.path(), &dlq)).await;
    let r = post(&proxy, "{}").await;
    assert!(
        matches!(r.header("x-breakwater-dlq"), Some("queued" | "spooled")),
        "{:?}",
        r.headers
    );
    let (conn, ch) = rabbit::channel().await;
    assert_eq!(
        rabbit::wait_depth(
            &conn,
            &format!("breakwater.dlq.{route}"),
            1,
            Duration::from_secs(30)
        )
        .await,
        1
    );
    assert_eq!(dlq_status(&proxy).await["broker"]["publisher"]["node"], 1);
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(
            "breakwater_amqp_connections_total{component=\"dlq_publisher\",result=\"error\"}"
        ),
        "{metrics}"
    );
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

#[test]
fn every_node_of_amqp_url_is_checked_with_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("b.toml");
    let text = format!(
        "{}\n[upstreams.ai]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"ai\"\nreplayable = true\n[dlq]\nspool_dir = \"{}\"\namqp_url = [\"amqp://a:5672/\", \"http://b:5672/\", \"amqp://a:5672/\"]\n[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\npublish_url = []\n",
        server_section(),
        dir.path().join("spool").display(),
        dir.path().join("audit/d.jsonl").display(),
        dir.path().join("k").display(),
    );
    std::fs::write(
        dir.path().join("k"),
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(breakwater_bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("dlq.amqp_url[1]: must start with amqp:// or amqps://"),
        "{err}"
    );
    assert!(
        err.contains("dlq.amqp_url[2]: names the same node twice"),
        "{err}"
    );
    assert!(
        err.contains("audit.publish_url: must name at least one node"),
        "{err}"
    );

    // A comma-separated $BREAKWATER_AMQP_URL is a list too, checked the same way.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "amqp_url = [\"amqp://a:5672/\", \"http://b:5672/\", \"amqp://a:5672/\"]\n",
            "",
        )
        .replace("publish_url = []\n", "");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(breakwater_bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .env("BREAKWATER_AMQP_URL", "amqp://a:5672/, ftp://b/")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "dlq.amqp_url[1]: must start with amqp:// or amqps:// (from $BREAKWATER_AMQP_URL)"
        ),
        "{err}"
    );
    let out = Command::new(breakwater_bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .env("BREAKWATER_AMQP_URL", "amqp://a:5672/,amqp://b:5672/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the child process when the test ends, passed or failed.
struct Reaped(Option<std::process::Child>);

impl Reaped {
    fn kill_9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill_9();
    }
}

async fn http(method: http::Method, url: String, body: &str) -> (u16, serde_json::Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = http_client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

async fn replayed(admin: u16, route: &str) -> u64 {
    let (_, st) = http(
        http::Method::GET,
        format!("http://127.0.0.1:{admin}/admin/dlq"),
        "",
    )
    .await;
    st["routes"][route]["replayed"].as_u64().unwrap_or(0)
}

/// The highest replay rate the AI saw over any window of at least `window` seconds.
fn max_rate(samples: &[(f64, u64)], window: f64) -> f64 {
    let mut max = 0.0f64;
    for (i, (t0, n0)) in samples.iter().enumerate() {
        if let Some((t1, n1)) = samples[i..].iter().find(|(t, _)| t - t0 >= window) {
            max = max.max((n1 - n0) as f64 / (t1 - t0));
        }
    }
    max
}

#[tokio::test]
async fn two_sidecars_on_one_route_replay_one_at_a_time_within_the_pace_and_take_over() {
    if !available().await {
        return;
    }
    const RATE: u64 = 20;
    const PER_SIDECAR: usize = 30;
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let route = rabbit::unique_route("fleet_sac");
    let (conn, ch) = rabbit::channel().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let dlq = format!(
        "amqp_url = \"{}\"\nreplay_rate_per_s = {RATE}\n",
        rabbit::URL
    );
    let procs: Vec<ProcessProxy> = dirs
        .iter()
        .map(|d| ProcessProxy::new(d.path(), &route_config(&ai, &route, d.path(), &dlq)))
        .collect();
    let mut children = Vec::new();
    for p in &procs {
        children.push(Reaped(Some(p.spawn().await)));
    }
    for p in &procs {
        for i in 0..PER_SIDECAR {
            let (status, _) = http(
                http::Method::POST,
                p.url("/v1/grading"),
                &format!("{{\"essay\":{i}}}"),
            )
            .await;
            assert_eq!(status, 202);
        }
    }
    let queue = format!("breakwater.dlq.{route}");
    let total = 2 * PER_SIDECAR;
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, total as u32, Duration::from_secs(30)).await,
        total as u32
    );

    // The AI is back; both sidecars' breakers close and both subscribe.
    ai.outage(false).await;
    let start = tokio::time::Instant::now();
    for p in &procs {
        let (status, _) = http(
            http::Method::POST,
            format!("http://127.0.0.1:{}/admin/routes/{route}/breaker", p.admin),
            r#"{"state":"auto"}"#,
        )
        .await;
        assert_eq!(status, 200);
    }
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let base = ai.requests();
    // Until a third of the messages are replayed: only one sidecar replays.
    let deadline = start + Duration::from_secs(60);
    let (mut a, mut b) = (0, 0);
    while a + b < total as u64 / 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replay stalled: {a} + {b}"
        );
        samples.push((start.elapsed().as_secs_f64(), ai.requests() - base));
        a = replayed(procs[0].admin, &route).await;
        b = replayed(procs[1].admin, &route).await;
        assert!(
            a == 0 || b == 0,
            "both sidecars replay at once: {a} and {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // kill -9 the active one: the other takes over and replays the rest, its unacked
    // deliveries included.
    let (active, standby) = if a > 0 { (0, 1) } else { (1, 0) };
    children[active].kill_9();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ai.idempotency_keys().len() < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every message was replayed: {} of {total}",
            ai.idempotency_keys().len()
        );
        samples.push((start.elapsed().as_secs_f64(), ai.requests() - base));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    samples.push((start.elapsed().as_secs_f64(), ai.requests() - base));
    assert!(replayed(procs[standby].admin, &route).await > 0);
    // The AI saw the route's pace, not twice it, across both sidecars (+10%; one request
    // of slack for the sampling).
    let seen = max_rate(&samples, 2.0);
    assert!(
        seen <= RATE as f64 * 1.1 + 0.5,
        "the AI saw {seen:.1} replays/s for a pace of {RATE}/s"
    );
    assert!(
        seen >= RATE as f64 * 0.5,
        "replay too slow to measure: {seen:.1}/s"
    );
    eprintln!("fleet replay: max {seen:.1}/s over 2 s windows, pace {RATE}/s");
    drop(children);
    rabbit::cleanup(&ch, &route).await;
}

const AUDIT_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// A sidecar named `instance` whose decision log is copied to `exchange`.
fn audit_sidecar_config(
    ai: &MockAi,
    dir: &std::path::Path,
    instance: &str,
    exchange: &str,
) -> String {
    let key = dir.join("audit.key");
    std::fs::write(&key, AUDIT_KEY).unwrap();
    let audit = format!(
        "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\npublish_url = [\"amqp://guest:guest@127.0.0.1:1/%2f\", \"{}\"]\npublish_exchange = \"{exchange}\"\n",
        dir.join("decisions.jsonl").display(),
        key.display(),
        rabbit::URL
    );
    simple_config(&ai.url(), "", &audit).replacen(
        "[server]\n",
        &format!("[server]\ninstance = \"{instance}\"\n"),
        1,
    )
}

/// `breakwater audit collect` as a child process, its stdout and stderr in files.
fn spawn_collector(
    out: &std::path::Path,
    logs: &std::path::Path,
    extra: &[&str],
    exchange: &str,
    queue: &str,
) -> Reaped {
    let child = Command::new(breakwater_bin())
        .args(["audit", "collect", "--amqp"])
        .arg(format!(
            "amqp://guest:guest@127.0.0.1:1/%2f,{}",
            rabbit::URL
        ))
        .arg("--out")
        .arg(out)
        .args(["--exchange", exchange, "--queue", queue])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(logs.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(logs.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    Reaped(Some(child))
}

fn wait_exit(child: &mut Reaped, within: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + within;
    let c = child.0.as_mut().unwrap();
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn queue_exists(conn: &lapin::Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let ok = ch
        .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await
        .is_ok();
    let _ = ch.close(200, "done".into()).await;
    ok
}

/// An instance's collected chain: rotated files (named by time) first, then the live file.
fn collected_text(dir: &std::path::Path) -> String {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "jsonl"));
    files.sort_by_key(|p| (p.ends_with("decisions.jsonl"), p.clone()));
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect()
}

fn verify(dir: &std::path::Path) -> (bool, String) {
    let out = Command::new(breakwater_bin())
        .args(["audit", "verify"])
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

async fn publish_copy(ch: &lapin::Channel, exchange: &str, app_id: &str, line: &[u8]) {
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_app_id(app_id.into());
    ch.basic_publish(
        exchange.into(),
        "audit.record".into(),
        lapin::options::BasicPublishOptions::default(),
        line,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test]
async fn audit_collect_files_each_instance_verifiably_and_reports_duplicates_and_gaps() {
    if !available().await {
        return;
    }
    let uniq = rabbit::unique_route("collect");
    let exchange = format!("test.audit.{uniq}");
    let queue = format!("test.audit.collect.{uniq}");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("collected");
    let (conn, ch) = rabbit::channel().await;
    ch.confirm_select(Default::default()).await.unwrap();

    // The collector runs first (it declares its queue), until SIGTERM.
    // Small files: the collected chain spans rotated files, as the writer's does.
    let mut collector = spawn_collector(
        &out,
        &work.path().join("run1"),
        &["--rotate-bytes", "4096"],
        &exchange,
        &queue,
    );
    assert!(
        poll_until(Duration::from_secs(30), || queue_exists(&conn, &queue)).await,
        "the collector did not declare its queue"
    );
    let ai = MockAi::start().await;
    let mut sidecar_dirs = Vec::new();
    let mut proxies = Vec::new();
    for name in ["edge-a", "edge-b"] {
        let dir = tempfile::tempdir().unwrap();
        let proxy = TestProxy::start(&audit_sidecar_config(&ai, dir.path(), name, &exchange)).await;
        for i in 0..15 {
            let r = proxy
                .post("/v1/grading", format!("{{\"essay\":{i}}}"))
                .await;
            assert_eq!(r.status, 200);
        }
        proxies.push(proxy);
        sidecar_dirs.push((name, dir));
    }
    // Each instance's collected file is its sidecar's own file, byte for byte. (Compared
    // while the sidecars run: at shutdown a sidecar gives its last copies only a moment.)
    for (name, dir) in &sidecar_dirs {
        let own = || std::fs::read_to_string(dir.path().join("decisions.jsonl")).unwrap();
        let same = poll_until(Duration::from_secs(30), || async {
            own().lines().count() >= 15 && collected_text(&out.join(name)) == own()
        })
        .await;
        assert!(
            same,
            "{name}: collected copy differs from the sidecar's file"
        );
        let files = std::fs::read_dir(out.join(name)).unwrap().count();
        assert!(files >= 2, "{name}: no rotation ({files} file)");
        let (ok, report) = verify(&out.join(name));
        assert!(ok, "{name}: {report}");
    }
    for p in proxies {
        p.stop().await;
    }
    // Copies sent at shutdown are taken by this run too, not left for the next one.
    for _ in 0..3 {
        assert_eq!(
            rabbit::wait_depth_at_most(&conn, &queue, 0, Duration::from_secs(20)).await,
            0
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // SIGTERM: a clean stop.
    Command::new("kill")
        .arg(collector.0.as_ref().unwrap().id().to_string())
        .status()
        .unwrap();
    assert_eq!(wait_exit(&mut collector, Duration::from_secs(20)), Some(0));
    let summary = std::fs::read_to_string(work.path().join("run1.out")).unwrap();
    assert!(summary.contains("ok: "), "{summary}");

    // A second run, with crafted copies: instance edge-c gets seq 1, 2, 4, 5 (3 is lost),
    // seq 2 twice, and one message that is no record; edge-a gets a line the first run
    // already wrote (a republish after a reconnect).
    let a_lines: Vec<String> =
        std::fs::read_to_string(sidecar_dirs[0].1.path().join("decisions.jsonl"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
    let mut collector = spawn_collector(
        &out,
        &work.path().join("run2"),
        &["--max-messages", "7", "--idle-exit-s", "60"],
        &exchange,
        &queue,
    );
    for i in [0, 1, 3, 4, 1] {
        publish_copy(&ch, &exchange, "edge-c", a_lines[i].as_bytes()).await;
    }
    publish_copy(&ch, &exchange, "edge-c", b"{\"not\":\"a record\"}").await;
    publish_copy(&ch, &exchange, "edge-a", a_lines[2].as_bytes()).await;
    let code = wait_exit(&mut collector, Duration::from_secs(60));
    let summary = std::fs::read_to_string(work.path().join("run2.out")).unwrap();
    let log = std::fs::read_to_string(work.path().join("run2.err")).unwrap();
    assert_eq!(code, Some(2), "{summary}\n{log}");
    assert!(
        summary.contains("edge-c: 4 written (seq 1..5), 1 duplicate(s) dropped, 1 gap(s) (1 record(s) missing), 0 conflict(s)"),
        "{summary}"
    );
    assert!(
        summary.contains("edge-a: 0 written (seq -..-), 1 duplicate(s) dropped, 0 gap(s)"),
        "{summary}"
    );
    assert!(
        summary.contains("INCOMPLETE: 7 message(s), 2 instance(s), 1 rejected"),
        "{summary}"
    );
    assert!(log.contains("GAP"), "{log}");
    let gaps = std::fs::read_to_string(out.join("edge-c/gaps.jsonl")).unwrap();
    let gap: serde_json::Value = serde_json::from_str(gaps.lines().next().unwrap()).unwrap();
    assert_eq!(
        (
            gap["after_seq"].as_u64(),
            gap["next_seq"].as_u64(),
            gap["missing"].as_u64()
        ),
        (Some(2), Some(4), Some(1))
    );
    let rejected = std::fs::read_to_string(out.join("_rejected/rejected.jsonl")).unwrap();
    assert_eq!(rejected.lines().count(), 1, "{rejected}");
    // The gap is in the file for verify to see, not papered over.
    let (ok, report) = verify(&out.join("edge-c"));
    assert!(!ok && report.contains("Missing at seq Some(4)"), "{report}");
    let (ok, report) = verify(&out.join("edge-a"));
    assert!(ok, "{report}");
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}

#[tokio::test]
async fn a_route_queue_declared_without_single_active_consumer_is_used_as_it_is() {
    if !available().await {
        return;
    }
    let route = rabbit::unique_route("fleet_oldq");
    let queue = format!("breakwater.dlq.{route}");
    let (conn, ch) = rabbit::channel().await;
    // As an older breakwater declared it: quorum, nothing else.
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let results = rabbit::results_queue(&ch, &format!("test.results.{route}"), &route).await;
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let dlq = format!("amqp_url = \"{}\"\n", rabbit::URL);
    let proxy = TestProxy::start(&route_config(&ai, &route, dir.path(), &dlq)).await;
    for i in 0..3 {
        let r = post(&proxy, &format!("{{\"essay\":{i}}}")).await;
        assert!(matches!(
            r.header("x-breakwater-dlq"),
            Some("queued" | "spooled")
        ));
    }
    // The declare is refused (PRECONDITION_FAILED, logged); publishing and replay go on
    // with the queue as it is.
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 3, Duration::from_secs(20)).await,
        3
    );
    ai.outage(false).await;
    let r = proxy
        .admin_post(
            &format!("/admin/routes/{route}/breaker"),
            r#"{"state":"auto"}"#,
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        rabbit::wait_depth(&conn, &results, 3, Duration::from_secs(30)).await,
        3
    );
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

#[tokio::test]
async fn audit_copies_fail_over_to_the_next_node_and_the_collected_chain_stays_intact() {
    if !available().await {
        return;
    }
    let uniq = rabbit::unique_route("collect_failover");
    let exchange = format!("test.audit.{uniq}");
    let queue = format!("test.audit.collect.{uniq}");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("collected");
    let (conn, ch) = rabbit::channel().await;
    let mut collector = spawn_collector(&out, &work.path().join("run"), &[], &exchange, &queue);
    assert!(poll_until(Duration::from_secs(30), || queue_exists(&conn, &queue)).await);
    let node0 = ForwardNode::start().await;
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = audit_sidecar_config(&ai, dir.path(), "edge-f", &exchange)
        .replace("amqp://guest:guest@127.0.0.1:1/%2f", &node0.url());
    let proxy = TestProxy::start(&cfg).await;
    let own = || std::fs::read_to_string(dir.path().join("decisions.jsonl")).unwrap();
    let collected_all = |n: usize| {
        let out = out.clone();
        async move {
            let mine = own();
            mine.lines().count() >= n && collected_text(&out.join("edge-f")) == mine
        }
    };
    for i in 0..10 {
        proxy
            .post("/v1/grading", format!("{{\"essay\":{i}}}"))
            .await;
    }
    assert!(poll_until(Duration::from_secs(30), || collected_all(10)).await);
    let cfg = proxy.admin_config().await;
    assert_eq!(
        cfg["amqp_connections"]["breakwater-audit-edge-f"]["node"], 0,
        "{cfg}"
    );

    node0.kill();
    for i in 10..20 {
        proxy
            .post("/v1/grading", format!("{{\"essay\":{i}}}"))
            .await;
    }
    assert!(
        poll_until(Duration::from_secs(60), || collected_all(20)).await,
        "the copies did not move to node 1"
    );
    let cfg = proxy.admin_config().await;
    assert_eq!(
        cfg["amqp_connections"]["breakwater-audit-edge-f"]["node"], 1,
        "{cfg}"
    );
    let (ok, report) = verify(&out.join("edge-f"));
    assert!(ok, "{report}");
    proxy.stop().await;
    Command::new("kill")
        .arg(collector.0.as_ref().unwrap().id().to_string())
        .status()
        .unwrap();
    assert_eq!(wait_exit(&mut collector, Duration::from_secs(20)), Some(0));
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}
