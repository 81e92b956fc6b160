//! `server.readiness`: in `traffic` mode (the default) a degraded condition is reported by
//! `/readyz` and `breakwater_degraded_condition` but stays 200, so a sidecar's trouble does
//! not take the Magento pod out of its Service; in `strict` mode it is 503. Draining at
//! shutdown is 503 in both. One test per mode and condition, through real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

#[derive(Clone, Copy, Debug)]
enum Mode {
    Traffic,
    Strict,
}

impl Mode {
    /// The `[server]` line; `Traffic` also stands for "key absent" (it is the default).
    fn with(self, cfg: &str) -> String {
        let line = match self {
            Mode::Traffic => "",
            Mode::Strict => "readiness = \"strict\"\n",
        };
        cfg.replacen(
            "watch_config = true\n",
            &format!("watch_config = true\n{line}"),
            1,
        )
    }

    fn expected_status(self) -> u16 {
        match self {
            Mode::Traffic => 200,
            Mode::Strict => 503,
        }
    }
}

fn gauge(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

fn conditions(reply: &Reply) -> Vec<String> {
    reply.json()["degraded"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["condition"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The gauges are process-wide and every probe or scrape sets them: tests that read them
/// run one at a time, so another test's healthy proxy cannot zero them in between.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Polls `/readyz` until it names `condition`, then checks the status and the gauges the
/// mode promises.
async fn assert_degraded(proxy: &TestProxy, mode: Mode, condition: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (seen, r) = loop {
        let r = proxy.admin_get("/readyz").await.unwrap();
        if conditions(&r).iter().any(|c| c == condition) {
            break (true, r);
        }
        if tokio::time::Instant::now() > deadline {
            break (false, r);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert!(seen, "{mode:?}: /readyz never named {condition}: {body}");
    assert_eq!(
        r.status,
        mode.expected_status(),
        "{mode:?}/{condition}: {body}"
    );
    assert_eq!(r.json()["ready"], r.status == 200, "{body}");
    let m = proxy.metrics().await;
    let series = format!("breakwater_degraded_condition{{condition=\"{condition}\"}}");
    assert_eq!(gauge(&m, &series), Some(1.0), "{series} in:\n{m}");
    let ready = if r.status == 200 { 1.0 } else { 0.0 };
    assert_eq!(gauge(&m, "breakwater_ready"), Some(ready), "{m}");
}

async fn healthy_is_ready(mode: Mode) {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&mode.with(&simple_config(&ai.url(), "", ""))).await;
    let r = proxy.admin_get("/readyz").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["readiness"], format!("{mode:?}").to_lowercase());
    assert!(conditions(&r).is_empty(), "{:?}", r.body);
    let m = proxy.metrics().await;
    assert_eq!(gauge(&m, "breakwater_ready"), Some(1.0), "{m}");
    for c in ["audit_disk", "spool_full", "dlq_broker", "draining"] {
        let series = format!("breakwater_degraded_condition{{condition=\"{c}\"}}");
        assert_eq!(gauge(&m, &series), Some(0.0), "{series} in:\n{m}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn traffic_mode_healthy_is_ready_with_every_condition_at_zero() {
    let _serial = SERIAL.lock().await;
    healthy_is_ready(Mode::Traffic).await;
}

#[tokio::test]
async fn strict_mode_healthy_is_ready_with_every_condition_at_zero() {
    let _serial = SERIAL.lock().await;
    healthy_is_ready(Mode::Strict).await;
}

/// /dev/full: every decision-log write fails with ENOSPC, as a full disk does.
async fn audit_disk(mode: Mode) {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), KEY).unwrap();
    let audit = format!(
        "[audit]\npath = \"/dev/full\"\nhmac_key_file = \"{}\"\n",
        dir.path().join("key").display()
    );
    let proxy = TestProxy::start(&mode.with(&simple_config(&ai.url(), "", &audit))).await;
    assert_eq!(proxy.get("/v1/x").await.status, 200);
    assert_degraded(&proxy, mode, "audit_disk").await;
    // Either way the client is still answered.
    assert_eq!(proxy.get("/v1/x").await.status, 200);
}

#[tokio::test]
async fn traffic_mode_a_failing_audit_disk_is_degraded_but_ready() {
    let _serial = SERIAL.lock().await;
    audit_disk(Mode::Traffic).await;
}

#[tokio::test]
async fn strict_mode_a_failing_audit_disk_is_not_ready() {
    let _serial = SERIAL.lock().await;
    audit_disk(Mode::Strict).await;
}

/// A replayable route whose AI is down: every request is a DLQ message.
fn replayable(ai: &MockAi, dlq: &str) -> String {
    let route = "replayable = true\n[routes.breaker]\nconsecutive_failures = 1\nopen_ms = 600000\nopen_max_ms = 600000\n[[routes.fallback]]\nkind = \"static\"\nstatus = 202\nbody = '{\"status\":\"queued\"}'\n";
    simple_config(&ai.url(), route, dlq)
}

/// `spool_max_bytes` reached: three ~267 KB messages fit in 1 MiB, the rest are rejected.
async fn spool_full(mode: Mode) {
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let dlq = format!(
        "[dlq]\nspool_dir = \"{}\"\nspool_max_bytes = 1048576\n",
        dir.path().join("spool").display()
    );
    let cfg = replayable(&ai, &dlq).replacen(
        "watch_config = true\n",
        "watch_config = true\nmax_body_bytes = 400000\n",
        1,
    );
    let proxy = TestProxy::start(&mode.with(&cfg)).await;
    let big = format!("{{\"essay\":\"{}\"}}", "x".repeat(200_000));
    let mut last = String::new();
    for _ in 0..6 {
        let r = proxy.post("/v1/grading", big.clone()).await;
        assert_eq!(r.status, 202, "the client still gets the fallback");
        last = r.header("x-breakwater-dlq").unwrap_or("").to_string();
    }
    assert_eq!(last, "rejected");
    assert_degraded(&proxy, mode, "spool_full").await;
}

#[tokio::test]
async fn traffic_mode_a_full_spool_is_degraded_but_ready() {
    let _serial = SERIAL.lock().await;
    spool_full(Mode::Traffic).await;
}

#[tokio::test]
async fn strict_mode_a_full_spool_is_not_ready() {
    let _serial = SERIAL.lock().await;
    spool_full(Mode::Strict).await;
}

/// Nothing listens on port 1: the publisher's connection attempt fails at once.
async fn dlq_broker(mode: Mode) {
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let dlq = format!(
        "[dlq]\namqp_url = \"amqp://guest:guest@127.0.0.1:1/%2f\"\nspool_dir = \"{}\"\n",
        dir.path().join("spool").display()
    );
    let proxy = TestProxy::start(&mode.with(&replayable(&ai, &dlq))).await;
    let r = proxy.post("/v1/grading", "{\"essay\":\"x\"}").await;
    assert_eq!(r.status, 202);
    assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));
    assert_degraded(&proxy, mode, "dlq_broker").await;
}

#[tokio::test]
async fn traffic_mode_an_unreachable_broker_is_degraded_but_ready() {
    let _serial = SERIAL.lock().await;
    dlq_broker(Mode::Traffic).await;
}

#[tokio::test]
async fn strict_mode_an_unreachable_broker_is_not_ready() {
    let _serial = SERIAL.lock().await;
    dlq_broker(Mode::Strict).await;
}

/// SIGTERM with a slow request in flight: while it drains, `/readyz` is 503 in both modes
/// (the pod is leaving its Service) and names `draining`; the request still completes.
async fn draining(mode: Mode) {
    let ai = MockAi::start().await;
    ai.set_delay(Duration::from_millis(1500));
    let cfg = mode.with(&simple_config(&ai.url(), "", "")).replacen(
        "watch_config = true\n",
        "watch_config = true\nshutdown_grace_ms = 10000\n",
        1,
    );
    let proxy = TestProxy::start(&cfg).await;
    let url = proxy.url("/v1/slow");
    let in_flight = tokio::spawn(async move {
        let req = http::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap();
        http_client()
            .request(req)
            .await
            .map(|r| r.status().as_u16())
    });
    assert!(
        poll_until(Duration::from_secs(5), || async { ai.requests() > 0 }).await,
        "the slow request never reached the AI"
    );
    proxy.begin_stop();
    let r = proxy.admin_get("/readyz").await.unwrap();
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(r.status, 503, "{mode:?}: {body}");
    assert!(conditions(&r).iter().any(|c| c == "draining"), "{body}");
    let m = proxy.metrics().await;
    assert_eq!(
        gauge(&m, "breakwater_degraded_condition{condition=\"draining\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(gauge(&m, "breakwater_ready"), Some(0.0), "{m}");
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "the drain cut the request"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn traffic_mode_draining_is_not_ready() {
    let _serial = SERIAL.lock().await;
    draining(Mode::Traffic).await;
}

#[tokio::test]
async fn strict_mode_draining_is_not_ready() {
    let _serial = SERIAL.lock().await;
    draining(Mode::Strict).await;
}

#[tokio::test]
async fn an_unknown_readiness_mode_is_a_config_error_with_its_key_path() {
    let cfg = simple_config("http://127.0.0.1:9", "", "").replacen(
        "watch_config = true\n",
        "watch_config = true\nreadiness = \"lenient\"\n",
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakwater.toml");
    std::fs::write(&path, cfg).unwrap();
    let err = breakwater::config::Config::load(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server.readiness") && err.contains("lenient"),
        "{err}"
    );
}
