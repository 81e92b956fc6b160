//! Dead-letter queue against a real RabbitMQ on 127.0.0.1:5672 (started by .ci/run), a
//! real mock AI and breakwater in front of it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use support::rabbit::{self, available};
use support::*;

/// Tests here stop and start the broker: run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const STATIC_FB: &str =
    "[[routes.fallback]]\nkind = \"static\"\nstatus = 202\nbody = '{\"status\":\"queued\"}'\n";

/// A replayable route named `route`; the breaker trips on the first failure and stays
/// open (no replay) until the test resets it.
fn dlq_config(
    ai: &MockAi,
    route: &str,
    dir: &std::path::Path,
    amqp: bool,
    extra_dlq: &str,
) -> String {
    let route_extra = format!("replayable = true\n[routes.breaker]\nconsecutive_failures = 1\nopen_ms = 600000\nopen_max_ms = 600000\n{STATIC_FB}");
    let amqp_line = if amqp {
        format!("amqp_url = \"{}\"\n", rabbit::URL)
    } else {
        String::new()
    };
    let dlq = format!(
        "[dlq]\n{amqp_line}spool_dir = \"{}\"\nresults_exchange = \"test.results.{route}\"\nreplay_rate_per_s = 200\nmax_replay_attempts = 2\n{extra_dlq}\n",
        dir.join("spool").display()
    );
    simple_config(&ai.url(), &route_extra, &dlq)
        .replace("name = \"ai\"", &format!("name = \"{route}\""))
}

async fn post(proxy: &TestProxy, body: &str) -> Reply {
    let req = http::Request::post(proxy.url("/v1/grading"))
        .header("x-student-id", "s-42")
        .header("authorization", "Bearer magento-secret")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    proxy.send(req).await
}

#[tokio::test]
async fn failed_replayable_requests_reach_the_quorum_queue_with_body_and_headers() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let proxy = TestProxy::start(&dlq_config(&ai, &route, dir.path(), true, "")).await;
    let (conn, ch) = rabbit::channel().await;
    let mut bodies = HashSet::new();
    for i in 0..5 {
        let body = format!("{{\"essay\":{i}}}");
        let r = post(&proxy, &body).await;
        assert_eq!(r.status, 202);
        assert_eq!(r.outcome(), "fallback");
        assert!(
            matches!(
                r.header("x-breakwater-dlq"),
                Some("queued") | Some("spooled")
            ),
            "{:?}",
            r.headers
        );
        bodies.insert(body);
    }
    let queue = format!("breakwater.dlq.{route}");
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 5, Duration::from_secs(10)).await,
        5
    );
    let msgs = rabbit::drain(&ch, &queue).await;
    assert_eq!(msgs.len(), 5);
    for m in msgs {
        let env: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
        let body = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(env["body_b64"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert!(bodies.contains(&body), "{body}");
        assert_eq!(env["route"], route.as_str());
        assert_eq!(env["method"], "POST");
        assert_eq!(env["path"], "/v1/grading");
        let headers: HashMap<String, String> = serde_json::from_value(serde_json::Value::Object(
            env["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_str().unwrap().to_string(), p[1].clone()))
                .collect(),
        ))
        .unwrap();
        assert_eq!(headers["x-student-id"], "s-42");
        assert!(
            !headers.contains_key("authorization"),
            "a redacted header was stored"
        );
        assert_eq!(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string()),
            env["msg_id"].as_str().map(str::to_string)
        );
        assert_eq!(m.delivery.properties.delivery_mode(), &Some(2));
    }
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

#[tokio::test]
async fn replay_after_recovery_delivers_each_once_and_publishes_the_result() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 503);
    ai.set_model_version("grader-v3");
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let (conn, ch) = rabbit::channel().await;
    let results = rabbit::results_queue(&ch, &format!("test.results.{route}"), &route).await;
    let key = dir.path().join("audit.key");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    let audit = format!(
        "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\n",
        dir.path().join("audit/decisions.jsonl").display(),
        key.display()
    );
    let cfg = dlq_config(&ai, &route, dir.path(), true, "") + &audit;
    let proxy = TestProxy::start(&cfg).await;
    let mut request_ids = HashSet::new();
    for i in 0..10 {
        let r = post(&proxy, &format!("{{\"essay\":{i}}}")).await;
        assert!(r.header("x-breakwater-dlq").is_some());
        request_ids.insert(r.header("x-request-id").unwrap().to_string());
    }
    let queue = format!("breakwater.dlq.{route}");
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 10, Duration::from_secs(10)).await,
        10
    );
    let calls_while_down = ai.requests();
    // The AI recovers; the operator (or half-open probes) closes the breaker.
    ai.recover();
    assert_eq!(
        proxy
            .admin_post(
                &format!("/admin/routes/{route}/breaker"),
                r#"{"state":"auto"}"#,
                None
            )
            .await
            .status,
        200
    );
    assert_eq!(
        rabbit::wait_depth(&conn, &results, 10, Duration::from_secs(20)).await,
        10
    );
    let by_key = ai.count_by_header("idempotency-key");
    assert_eq!(by_key.len(), 10, "{by_key:?}");
    assert!(
        by_key.values().all(|n| *n == 1),
        "a message was replayed twice: {by_key:?}"
    );
    assert_eq!(ai.requests(), calls_while_down + 10);
    let got: HashSet<String> = rabbit::drain(&ch, &results)
        .await
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
            assert_eq!(v["status"], 200);
            assert_eq!(v["model_version"], "grader-v3");
            v["request_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(got, request_ids);
    assert_eq!(rabbit::depth(&conn, &queue).await, 0);
    proxy.stop().await;
    // Every replay is in the decision log, tied to the original request.
    let log = std::fs::read_to_string(dir.path().join("audit/decisions.jsonl")).unwrap();
    let replayed = log
        .lines()
        .filter(|l| l.contains("\"outcome\":\"replayed\""))
        .count();
    assert_eq!(replayed, 10);
    rabbit::cleanup(&ch, &route).await;
}

#[tokio::test]
async fn rabbitmq_stopped_during_a_burst_loses_nothing() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("fraud");
    let proxy = TestProxy::start(&dlq_config(&ai, &route, dir.path(), true, "")).await;
    // Make sure the publisher is connected first, then take the broker away.
    post(&proxy, "{\"warmup\":true}").await;
    let (conn, ch) = rabbit::channel().await;
    let queue = format!("breakwater.dlq.{route}");
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 1, Duration::from_secs(10)).await,
        1
    );
    drop((conn, ch));
    rabbit::rabbitmqctl(&["stop_app"]);
    let mut ids = HashSet::from(["warmup".to_string()]);
    let mut outcomes = HashMap::new();
    for i in 0..20 {
        let r = post(&proxy, &format!("{{\"payment\":{i}}}")).await;
        assert_eq!(r.status, 202, "the client must still get its fallback");
        *outcomes
            .entry(r.header("x-breakwater-dlq").unwrap_or("none").to_string())
            .or_insert(0) += 1;
        ids.insert(r.header("x-request-id").unwrap().to_string());
    }
    rabbit::rabbitmqctl(&["start_app"]);
    rabbit::rabbitmqctl(&["await_startup"]);
    assert_eq!(outcomes.get("spooled"), Some(&20), "{outcomes:?}");
    let (conn, ch) = rabbit::channel().await;
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 21, Duration::from_secs(30)).await,
        21
    );
    let got: HashSet<String> = rabbit::drain(&ch, &queue)
        .await
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.delivery.data).unwrap()["request_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.remove("warmup");
    assert!(
        ids.is_subset(&got),
        "lost: {:?}",
        ids.difference(&got).collect::<Vec<_>>()
    );
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

#[tokio::test]
async fn poison_messages_are_parked_after_the_configured_attempts() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 500);
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let proxy = TestProxy::start(&dlq_config(&ai, &route, dir.path(), true, "")).await;
    // Breaker forced closed: the worker replays, the AI keeps failing this message.
    assert_eq!(
        proxy
            .admin_post(
                &format!("/admin/routes/{route}/breaker"),
                r#"{"state":"forced_closed"}"#,
                None
            )
            .await
            .status,
        200
    );
    let r = post(&proxy, "{\"essay\":\"poison\"}").await;
    assert!(r.header("x-breakwater-dlq").is_some());
    let (conn, ch) = rabbit::channel().await;
    let parked = format!("breakwater.dlq.{route}.parked");
    let parked_depth = rabbit::wait_depth(&conn, &parked, 1, Duration::from_secs(20)).await;
    assert_eq!(
        parked_depth,
        1,
        "replays seen: {:?}, queue depth {}",
        ai.count_by_header("idempotency-key"),
        rabbit::depth(&conn, &format!("breakwater.dlq.{route}")).await
    );
    assert_eq!(
        rabbit::depth(&conn, &format!("breakwater.dlq.{route}")).await,
        0
    );
    let m = rabbit::drain(&ch, &parked).await.pop().unwrap();
    let reason = match m
        .delivery
        .properties
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .get("x-breakwater-park-reason")
    {
        Some(lapin::types::AMQPValue::LongString(s)) => {
            String::from_utf8_lossy(s.as_bytes()).to_string()
        }
        other => panic!("no park reason: {other:?}"),
    };
    assert!(
        reason.contains("500") && reason.contains("after 2 attempt"),
        "{reason}"
    );
    // One original call plus exactly max_replay_attempts replays.
    let replays: u64 = ai.count_by_header("idempotency-key").values().sum();
    assert_eq!(replays, 2);
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

#[tokio::test]
async fn spool_only_mode_keeps_messages_reports_a_corrupt_record_and_replays_the_rest() {
    let _serial = SERIAL.lock().await;
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let cfg = dlq_config(&ai, &route, dir.path(), false, "");
    let proxy = TestProxy::start(&cfg).await;
    for i in 0..3 {
        let r = post(
            &proxy,
            &format!("{{\"essay\":\"{i}{i}{i}{i}{i}{i}{i}{i}\"}}"),
        )
        .await;
        assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));
    }
    proxy.stop().await;
    // Corrupt the second record's payload.
    let spool = dir.path().join("spool");
    let seg = first_segment(&spool);
    let mut data = std::fs::read(&seg).unwrap();
    // Record: magic(4) len(4) msg_id(16) crc(4) header crc(4) payload.
    let first_len = u32::from_le_bytes(data[4..8].try_into().unwrap()) as usize;
    let second_payload = 32 + first_len + 32 + 10;
    data[second_payload] ^= 0x55;
    std::fs::write(&seg, &data).unwrap();
    let out = std::process::Command::new(breakwater_bin())
        .args(["spool", "inspect"])
        .arg(&spool)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("2 pending") && text.contains("1 corrupt"),
        "{text}"
    );
    assert!(text.contains(&route), "{text}");

    // Restart with the AI back: the two good messages are replayed from the spool.
    ai.outage(false).await;
    let dir_path = dir.path().to_path_buf();
    let config_path = dir_path.join("restart.toml");
    std::fs::write(&config_path, &cfg).unwrap();
    let proxy = TestProxy::start_at(tempfile::tempdir().unwrap(), config_path).await;
    for _ in 0..200 {
        if ai.count_by_header("idempotency-key").len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let by_key = ai.count_by_header("idempotency-key");
    assert_eq!(by_key.len(), 2, "{by_key:?}");
    assert!(proxy.metrics().await.contains("result=\"corrupt\""));
    proxy.stop().await;
}

#[tokio::test]
async fn a_full_spool_rejects_new_messages_cleanly() {
    let _serial = SERIAL.lock().await;
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let cfg = dlq_config(
        &ai,
        &route,
        dir.path(),
        false,
        "spool_max_bytes = 1048576\n",
    )
    .replace(
        "watch_config = true\n",
        "watch_config = true\nmax_body_bytes = 400000\n",
    );
    let proxy = TestProxy::start(&cfg).await;
    let big = format!("{{\"essay\":\"{}\"}}", "x".repeat(200_000));
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        let r = post(&proxy, &big).await;
        assert_eq!(r.status, 202, "the client still gets the fallback");
        outcomes.push(r.header("x-breakwater-dlq").unwrap().to_string());
    }
    // ~267 KB per message (base64 + envelope): three fit in 1 MiB.
    assert_eq!(
        &outcomes[..3],
        &["spooled", "spooled", "spooled"],
        "{outcomes:?}"
    );
    assert!(
        outcomes[3..].iter().all(|o| o == "rejected"),
        "{outcomes:?}"
    );
    let m = proxy.metrics().await;
    assert!(
        m.contains(&format!(
            "breakwater_dlq_messages_total{{route=\"{route}\",result=\"rejected\"}} 3"
        )),
        "{m}"
    );
    // What was accepted is still there.
    let report = breakwater::cli::spool_inspect(&dir.path().join("spool")).unwrap();
    assert_eq!(report.pending, 3);
    proxy.stop().await;
}

#[tokio::test]
async fn kill_9_mid_burst_then_restart_delivers_every_acknowledged_message() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("fraud");
    let bw = ProcessProxy::new(dir.path(), &dlq_config(&ai, &route, dir.path(), true, ""));
    let mut child = bw.spawn().await;
    let url = bw.url("/v1/grading");
    let acked = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
    let mut burst = Vec::new();
    for w in 0..4 {
        let (url, acked) = (url.clone(), acked.clone());
        burst.push(tokio::spawn(async move {
            let client = http_client();
            for i in 0..500 {
                let req = http::Request::post(url.as_str())
                    .body(Full::new(Bytes::from(format!("{{\"w\":{w},\"i\":{i}}}"))))
                    .unwrap();
                let Ok(resp) = client.request(req).await else {
                    break;
                };
                let dlq = resp
                    .headers()
                    .get("x-breakwater-dlq")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if dlq == "queued" || dlq == "spooled" {
                    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
                    acked.lock().unwrap().insert(id);
                }
            }
        }));
    }
    // Kill once a good share is acknowledged (a loaded machine is slow to get there), but
    // mid-burst: 2,000 requests are far from done.
    let started = std::time::Instant::now();
    while acked.lock().unwrap().len() < 100 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for b in burst {
        b.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "only {} requests were acknowledged before the kill",
        acked.len()
    );

    let child = bw.spawn().await;
    let (conn, ch) = rabbit::channel().await;
    let queue = format!("breakwater.dlq.{route}");
    let mut seen: HashMap<String, HashSet<String>> = HashMap::new();
    for _ in 0..300 {
        // When every acknowledged request was spooled before the kill, the queue is only
        // declared once the restarted drainer connects: consuming before that would close
        // the test's channel with NOT_FOUND.
        if !rabbit::exists(&conn, &queue).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for m in rabbit::drain(&ch, &queue).await {
            let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
            seen.entry(v["request_id"].as_str().unwrap().to_string())
                .or_default()
                .insert(v["msg_id"].as_str().unwrap().to_string());
        }
        if acked.iter().all(|id| seen.contains_key(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn;
    terminate(child);
    let missing: Vec<_> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged message(s) lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    // At-least-once: a duplicate is only ever the same message (same id) again.
    assert!(
        seen.values().all(|ids| ids.len() == 1),
        "a request was queued under two message ids"
    );
    rabbit::cleanup(&ch, &route).await;
}

// ---- spool helper (issue 13, items 8, 11, 13) ----

/// An `[audit]` section with `redact_headers` left out.
fn audit_section(dir: &std::path::Path) -> String {
    let key = dir.join("audit.key");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    format!(
        "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\n",
        dir.join("audit/decisions.jsonl").display(),
        key.display()
    )
}

const CREDENTIALS: [(&str, &str); 3] = [
    ("authorization", "Bearer cred-authz-7f3a"),
    ("cookie", "PHPSESSID=cred-cookie-91b2"),
    ("proxy-authorization", "Basic cred-proxy-55c0"),
];

async fn post_with_credentials(proxy: &TestProxy, body: &str) -> Reply {
    let mut req = http::Request::post(proxy.url("/v1/grading")).header("x-student-id", "s-42");
    for (k, v) in CREDENTIALS {
        req = req.header(k, v);
    }
    proxy
        .send(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
}

fn spool_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in walk(dir) {
        all.extend(std::fs::read(e).unwrap());
    }
    all
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn leaked(bytes: &[u8]) -> Vec<&'static str> {
    let text = String::from_utf8_lossy(bytes);
    CREDENTIALS
        .iter()
        .filter(|(_, v)| text.contains(v.split_once(['=', ' ']).unwrap().1))
        .map(|(k, _)| *k)
        .collect()
}

#[tokio::test]
async fn credentials_never_reach_the_spool_or_rabbitmq_with_audit_redaction_left_empty() {
    let _serial = SERIAL.lock().await;
    let ai = MockAi::start().await;
    ai.outage(true).await;
    // Spool only: the message stays on disk, where we read its raw bytes.
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let cfg = dlq_config(&ai, &route, dir.path(), false, "") + &audit_section(dir.path());
    let proxy = TestProxy::start(&cfg).await;
    let r = post_with_credentials(&proxy, "{\"essay\":\"spooled\"}").await;
    assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));
    proxy.stop().await;
    let raw = spool_bytes(&dir.path().join("spool"));
    assert!(
        String::from_utf8_lossy(&raw).contains("s-42"),
        "the message is not in the spool"
    );
    assert_eq!(leaked(&raw), Vec::<&str>::new(), "credentials in the spool");

    if !available().await {
        return;
    }
    // With a broker: the message as RabbitMQ holds it.
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let cfg = dlq_config(&ai, &route, dir.path(), true, "") + &audit_section(dir.path());
    let proxy = TestProxy::start(&cfg).await;
    let r = post_with_credentials(&proxy, "{\"essay\":\"queued\"}").await;
    assert!(r.header("x-breakwater-dlq").is_some());
    let (conn, ch) = rabbit::channel().await;
    let queue = format!("breakwater.dlq.{route}");
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 1, Duration::from_secs(10)).await,
        1
    );
    let msgs = rabbit::drain(&ch, &queue).await;
    assert_eq!(msgs.len(), 1);
    let data = &msgs[0].delivery.data;
    assert!(String::from_utf8_lossy(data).contains("s-42"));
    assert_eq!(leaked(data), Vec::<&str>::new(), "credentials in RabbitMQ");
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

#[test]
fn a_body_limit_larger_than_a_spool_record_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let check = |max: u64| {
        let cfg = simple_config("http://127.0.0.1:9", "replayable = true\n", "").replace(
            "watch_config = true\n",
            &format!("watch_config = true\nmax_body_bytes = {max}\n"),
        );
        let path = dir.path().join("bw.toml");
        std::fs::write(&path, cfg).unwrap();
        let out = std::process::Command::new(breakwater_bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = check(100 << 20);
    assert!(!ok && text.contains("server.max_body_bytes"), "{text}");
    let (ok, text) = check(breakwater::cli::MAX_SPOOLED_BODY);
    assert!(ok, "{text}");
}

/// Two replayable routes in spool-only mode, each with its own AI: `a` on /a, `b` on /b.
fn two_routes_config(a: &MockAi, b: &MockAi, dir: &std::path::Path, attempts: u32) -> String {
    let route = |name: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"ai_{name}\"\ntimeout_ms = 2000\nreplayable = true\n[routes.breaker]\nconsecutive_failures = 1\nopen_ms = 600000\nopen_max_ms = 600000\n{STATIC_FB}\n"
        )
    };
    format!(
        "{}\n[upstreams.ai_a]\nurl = \"{}\"\n[upstreams.ai_b]\nurl = \"{}\"\n\n{}{}[dlq]\nspool_dir = \"{}\"\nreplay_rate_per_s = 200\nmax_replay_attempts = {attempts}\n",
        server_section(),
        a.url(),
        b.url(),
        route("a"),
        route("b"),
        dir.join("spool").display()
    )
}

async fn set_breaker(proxy: &TestProxy, route: &str, state: &str) {
    let r = proxy
        .admin_post(
            &format!("/admin/routes/{route}/breaker"),
            &format!("{{\"state\":\"{state}\"}}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
}

async fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    f()
}

fn inspect_text(dir: &std::path::Path) -> String {
    let out = std::process::Command::new(breakwater_bin())
        .args(["spool", "inspect"])
        .arg(dir.join("spool"))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn replays(ai: &MockAi) -> u64 {
    ai.count_by_header("idempotency-key").values().sum()
}

#[tokio::test]
async fn spool_only_a_poison_message_of_one_route_blocks_no_other_and_is_parked_then_requeued() {
    let _serial = SERIAL.lock().await;
    let (ai_a, ai_b) = (MockAi::start().await, MockAi::start().await);
    ai_a.set_error_rate(1.0, 500);
    ai_b.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&two_routes_config(&ai_a, &ai_b, dir.path(), 3)).await;
    // a's message is first in the spool, b's behind it; both breakers are now open.
    let r = proxy.post("/a/grade", "{\"essay\":\"poison\"}").await;
    assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));
    let r = proxy.post("/b/grade", "{\"essay\":\"fine\"}").await;
    assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));

    // b recovers while a stays down (breaker open): b's message is replayed anyway.
    ai_b.outage(false).await;
    set_breaker(&proxy, "b", "forced_closed").await;
    assert!(
        wait_until(Duration::from_secs(5), || replays(&ai_b) >= 1).await,
        "route b's message was never replayed: held back by route a's"
    );
    assert_eq!(replays(&ai_a), 0, "a's breaker is open: no replay");

    // a's AI keeps failing: after max_replay_attempts the message is parked, and listed.
    set_breaker(&proxy, "a", "forced_closed").await;
    assert!(
        wait_until(Duration::from_secs(10), || inspect_text(dir.path())
            .contains("1 parked"))
        .await,
        "{}",
        inspect_text(dir.path())
    );
    assert_eq!(replays(&ai_a), 3);
    let text = inspect_text(dir.path());
    assert!(
        text.contains("PARKED") && text.contains("after 3 attempt"),
        "{text}"
    );
    assert!(text.contains(" a "), "{text}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(replays(&ai_a), 3, "a parked message is not replayed");

    // The operator fixes a and requeues: the message is replayed once more, and succeeds.
    ai_a.recover();
    let r = proxy
        .admin_post("/admin/dlq/parked/requeue?route=a", "", None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["requeued"], 1);
    assert!(
        wait_until(Duration::from_secs(5), || replays(&ai_a) >= 4).await,
        "the requeued message was not replayed"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(replays(&ai_a), 4);
    assert_eq!(replays(&ai_b), 1);
    proxy.stop().await;
    let text = inspect_text(dir.path());
    assert!(
        text.contains("0 parked") && text.contains("0 pending"),
        "{text}"
    );
}

#[tokio::test]
async fn spool_only_a_non_retryable_answer_parks_at_once() {
    let _serial = SERIAL.lock().await;
    let (ai_a, ai_b) = (MockAi::start().await, MockAi::start().await);
    ai_a.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&two_routes_config(&ai_a, &ai_b, dir.path(), 5)).await;
    let r = proxy.post("/a/grade", "{\"essay\":\"bad\"}").await;
    assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));
    ai_a.outage(false).await;
    ai_a.set_error_rate(1.0, 422);
    set_breaker(&proxy, "a", "forced_closed").await;
    assert!(
        wait_until(Duration::from_secs(5), || inspect_text(dir.path())
            .contains("1 parked"))
        .await,
        "{}",
        inspect_text(dir.path())
    );
    assert_eq!(replays(&ai_a), 1, "a 4xx answer is not retried");
    assert!(inspect_text(dir.path()).contains("422"));
    proxy.stop().await;
}

#[tokio::test]
async fn a_flipped_bit_in_a_spool_length_loses_that_record_only_and_inspect_says_where() {
    let _serial = SERIAL.lock().await;
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let cfg = dlq_config(&ai, &route, dir.path(), false, "");
    let proxy = TestProxy::start(&cfg).await;
    for i in 0..4 {
        let r = post(&proxy, &format!("{{\"essay\":{i}}}")).await;
        assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));
    }
    proxy.stop().await;
    let spool = dir.path().join("spool");
    let seg = first_segment(&spool);
    // Record: magic(4) len(4) msg_id(16) crc(4) header crc(4) payload.
    let mut data = std::fs::read(&seg).unwrap();
    let first_len = u32::from_le_bytes(data[4..8].try_into().unwrap()) as usize;
    data[32 + first_len + 4 + 1] ^= 0x10;
    std::fs::write(&seg, &data).unwrap();
    let text = inspect_text(dir.path());
    assert!(
        text.contains("3 pending")
            && text.contains("1 corrupt")
            && text.contains("CORRUPT at offset"),
        "{text}"
    );

    ai.outage(false).await;
    let config_path = dir.path().join("restart.toml");
    std::fs::write(&config_path, &cfg).unwrap();
    let proxy = TestProxy::start_at(tempfile::tempdir().unwrap(), config_path).await;
    assert!(
        wait_until(Duration::from_secs(5), || replays(&ai) >= 3).await,
        "replayed: {:?}",
        ai.count_by_header("idempotency-key")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(replays(&ai), 3);
    proxy.stop().await;
}

/// Replays `route`'s queue once the AI answers again: breaker back to auto.
async fn recover_and_replay(proxy: &TestProxy, ai: &MockAi, route: &str) {
    ai.recover();
    let r = proxy
        .admin_post(
            &format!("/admin/routes/{route}/breaker"),
            r#"{"state":"auto"}"#,
            None,
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_replay_carries_one_request_id_and_one_idempotency_key() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 503);
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let (conn, ch) = rabbit::channel().await;
    let results = rabbit::results_queue(&ch, &format!("test.results.{route}"), &route).await;
    let proxy = TestProxy::start(&dlq_config(&ai, &route, dir.path(), true, "")).await;
    let req = http::Request::post(proxy.url("/v1/grading"))
        .header("x-request-id", "client-rid-1")
        .header("idempotency-key", "client-key-1")
        .body(Full::new(Bytes::from_static(b"{\"essay\":1}")))
        .unwrap();
    let r = proxy.send(req).await;
    assert!(r.header("x-breakwater-dlq").is_some(), "{:?}", r.headers);
    let queue = format!("breakwater.dlq.{route}");
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 1, Duration::from_secs(10)).await,
        1
    );
    recover_and_replay(&proxy, &ai, &route).await;
    assert_eq!(
        rabbit::wait_depth(&conn, &results, 1, Duration::from_secs(20)).await,
        1
    );
    let replay = ai
        .received()
        .into_iter()
        .find(|r| r.headers.contains_key("x-breakwater-replay"))
        .expect("the replay reached the AI");
    let values = |name: &str| -> Vec<String> {
        replay
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(values("x-request-id").len(), 1, "{:?}", replay.headers);
    assert_eq!(values("idempotency-key").len(), 1, "{:?}", replay.headers);
    assert_eq!(values("x-breakwater-replay"), ["1"]);
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

#[tokio::test]
async fn a_message_redelivered_past_the_delivery_limit_is_parked_not_dropped() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let cfg = dlq_config(&ai, &route, dir.path(), true, "delivery_limit = 2\n");
    let proxy = TestProxy::start(&cfg).await;
    let r = post(&proxy, "{\"essay\":\"requeued\"}").await;
    assert!(r.header("x-breakwater-dlq").is_some());
    let (conn, ch) = rabbit::channel().await;
    let queue = format!("breakwater.dlq.{route}");
    let parked = format!("breakwater.dlq.{route}.parked");
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 1, Duration::from_secs(10)).await,
        1
    );
    // The replay consumer steps aside, so that only this test takes the message.
    let paused = proxy
        .admin_post(&format!("/admin/dlq/pause?route={route}"), "", None)
        .await;
    assert_eq!(paused.status, 200);
    // What the replay worker does when the breaker refuses or a result cannot be published:
    // take the message and requeue it, more often than the limit allows.
    // (The queue has a single active consumer, which `basic.get` cannot share: consume.)
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "test-requeue".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let mut requeued = 0;
    for _ in 0..200 {
        if requeued == 4 {
            break;
        }
        use futures_util::StreamExt;
        let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
        else {
            // Still unacked by a consumer that is stopping, or already dead-lettered.
            if rabbit::depth(&conn, &parked).await == 1 {
                break;
            }
            continue;
        };
        requeued += 1;
        delivery
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let _ = ch
        .basic_cancel("test-requeue".into(), Default::default())
        .await;
    assert_eq!(
        rabbit::wait_depth(&conn, &parked, 1, Duration::from_secs(10)).await,
        1,
        "the message left {queue} without reaching {parked}"
    );
    assert_eq!(rabbit::depth(&conn, &queue).await, 0);
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

/// This process's TCP connections to the broker right now (socket inodes), from /proc.
fn own_broker_sockets() -> HashSet<u64> {
    let ours: HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| {
                let link = std::fs::read_link(e.ok()?.path()).ok()?;
                let s = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
                s.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    let mut out = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let to_broker = f.get(2).is_some_and(|r| r.ends_with(":1628"));
            if let (true, Some(Ok(inode))) = (to_broker, f.get(9).map(|i| i.parse::<u64>())) {
                if ours.contains(&inode) {
                    out.insert(inode);
                }
            }
        }
    }
    out
}

/// Every broker connection this process had open while `during` ran, sampled from /proc.
async fn broker_sockets_seen<F: std::future::Future>(during: F) -> HashSet<u64> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut seen = HashSet::new();
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            seen.extend(own_broker_sockets());
        }
        seen
    });
    during.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap()
}

#[tokio::test]
async fn admin_dlq_reads_depths_without_a_new_connection_per_call() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let proxy = TestProxy::start(&dlq_config(&ai, &route, dir.path(), true, "")).await;
    let first = proxy.admin_get("/admin/dlq").await.unwrap();
    assert_eq!(first.status, 200);
    let before = own_broker_sockets();
    let seen = broker_sockets_seen(async {
        for _ in 0..30 {
            let r = proxy.admin_get("/admin/dlq").await.unwrap();
            assert_eq!(r.status, 200);
            assert!(r.json()["routes"][route.as_str()].is_object());
        }
    })
    .await;
    let new: Vec<_> = seen.difference(&before).collect();
    assert!(
        new.is_empty(),
        "30 calls of GET /admin/dlq opened {} broker connections",
        new.len()
    );
    proxy.stop().await;
    let (_conn, ch) = rabbit::channel().await;
    rabbit::cleanup(&ch, &route).await;
}

/// The spool's first segment that holds records.
fn first_segment(spool: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "seg") && std::fs::metadata(p).unwrap().len() > 0
        })
        .unwrap()
}

// ---- POST /admin/dlq/replay?route=NAME: "replay now" (fixes helper, defect 2) ----

/// The route's breaker state as `GET /admin/breakers` shows it.
async fn breaker_state(proxy: &TestProxy, route: &str) -> String {
    let r = proxy.admin_get("/admin/breakers").await.unwrap();
    r.json()["routes"][route]["breaker"]["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `n` failed requests of `route` waiting in its queue, the route's breaker open for ten
/// minutes (`dlq_config`), and the AI answering again: only an operator can replay now.
async fn queued_behind_an_open_breaker(
    n: u32,
) -> (
    MockAi,
    tempfile::TempDir,
    String,
    TestProxy,
    lapin::Connection,
    lapin::Channel,
) {
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 503);
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("grading");
    let (conn, ch) = rabbit::channel().await;
    rabbit::results_queue(&ch, &format!("test.results.{route}"), &route).await;
    let proxy = TestProxy::start(&dlq_config(&ai, &route, dir.path(), true, "")).await;
    for i in 0..n {
        let r = post(&proxy, &format!("{{\"essay\":{i}}}")).await;
        assert!(r.header("x-breakwater-dlq").is_some(), "{:?}", r.headers);
    }
    let queue = format!("breakwater.dlq.{route}");
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, n, Duration::from_secs(20)).await,
        n
    );
    assert_eq!(breaker_state(&proxy, &route).await, "open");
    (ai, dir, route, proxy, conn, ch)
}

async fn replay_now(proxy: &TestProxy, route: &str) -> Reply {
    proxy
        .admin_post(&format!("/admin/dlq/replay?route={route}"), "", None)
        .await
}

#[tokio::test]
async fn an_operator_replay_probes_the_ai_while_the_breaker_is_open() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let (ai, _dir, route, proxy, conn, ch) = queued_behind_an_open_breaker(3).await;
    ai.recover();
    let r = replay_now(&proxy, &route).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    // The breaker would stay open for ten minutes: the replay goes now, each message once.
    let results = format!("test.results.{route}");
    assert_eq!(
        rabbit::wait_depth(&conn, &results, 3, Duration::from_secs(30)).await,
        3,
        "replays seen by the AI: {:?}",
        ai.count_by_header("idempotency-key")
    );
    let by_key = ai.count_by_header("idempotency-key");
    assert_eq!(by_key.len(), 3, "{by_key:?}");
    assert!(by_key.values().all(|n| *n == 1), "{by_key:?}");
    assert_eq!(
        rabbit::depth(&conn, &format!("breakwater.dlq.{route}.parked")).await,
        0
    );
    // The replays were the breaker's probes: three successes closed it.
    assert_eq!(breaker_state(&proxy, &route).await, "closed");
    assert_eq!(proxy.get("/v1/grading").await.outcome(), "ai");
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

#[tokio::test]
async fn an_operator_replay_while_the_ai_still_fails_tries_once_and_keeps_the_message() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let (ai, _dir, route, proxy, conn, ch) = queued_behind_an_open_breaker(2).await;
    // The AI is still failing.
    let r = replay_now(&proxy, &route).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert!(
        wait_until(Duration::from_secs(20), || replays(&ai) >= 1).await,
        "the operator's replay never reached the AI"
    );
    // One probe failed: the breaker is open again and the replay run stops there instead
    // of spending every message's attempts (or spinning on the broker's delivery limit).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        replays(&ai),
        1,
        "{:?}",
        ai.count_by_header("idempotency-key")
    );
    assert_eq!(breaker_state(&proxy, &route).await, "open");
    // Nothing is lost or parked: both messages wait in the queue, the tried one with its
    // attempt counted.
    let queue = format!("breakwater.dlq.{route}");
    assert_eq!(
        rabbit::wait_depth(&conn, &queue, 2, Duration::from_secs(20)).await,
        2
    );
    assert_eq!(
        rabbit::depth(&conn, &format!("breakwater.dlq.{route}.parked")).await,
        0
    );
    let mut attempts: Vec<u64> = rabbit::drain(&ch, &queue)
        .await
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.delivery.data).unwrap()["attempts"]
                .as_u64()
                .unwrap()
        })
        .collect();
    attempts.sort();
    assert_eq!(attempts, [0, 1]);
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

#[tokio::test]
async fn an_operator_replay_is_refused_under_the_kill_switch_or_a_forced_open_breaker() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    let (ai, _dir, route, proxy, conn, ch) = queued_behind_an_open_breaker(1).await;
    ai.recover();
    let queue = format!("breakwater.dlq.{route}");
    // Kill switch: no AI call, whoever asks.
    let off = proxy
        .admin_post(
            &format!("/admin/routes/{route}/ai"),
            r#"{"enabled":false}"#,
            None,
        )
        .await;
    assert_eq!(off.status, 200);
    let r = replay_now(&proxy, &route).await;
    assert_eq!(r.status, 409, "{:?}", r.json());
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("kill switch"), "{message}");
    // A breaker an operator forced open stays shut to replays too.
    let on = proxy
        .admin_post(
            &format!("/admin/routes/{route}/ai"),
            r#"{"enabled":true}"#,
            None,
        )
        .await;
    assert_eq!(on.status, 200);
    set_breaker(&proxy, &route, "forced_open").await;
    let r = replay_now(&proxy, &route).await;
    assert_eq!(r.status, 409, "{:?}", r.json());
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("forced_open"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        replays(&ai),
        0,
        "the AI was called against the operator's switch"
    );
    assert_eq!(rabbit::depth(&conn, &queue).await, 1);
    // The message was kept: once the breaker is back to auto it is replayed.
    set_breaker(&proxy, &route, "auto").await;
    assert_eq!(
        rabbit::wait_depth(
            &conn,
            &format!("test.results.{route}"),
            1,
            Duration::from_secs(30)
        )
        .await,
        1
    );
    assert_eq!(replays(&ai), 1);
    proxy.stop().await;
    rabbit::cleanup(&ch, &route).await;
}

// ---- the drainer's sliding confirm window (issue 16) ----

/// The request ids a spool has not handed on yet, in spool order (`None` when a segment went
/// while it was being read: the drainer deletes them once handed on).
fn spooled_request_ids(spool: &std::path::Path) -> Option<Vec<String>> {
    let report = breakwater::cli::spool_inspect(spool).ok()?;
    Some(
        report
            .segments
            .iter()
            .flat_map(|s| s.records.iter())
            .filter(|r| !r.handed_on)
            .map(|r| r.request_id.clone().unwrap())
            .collect(),
    )
}

/// A backlog spooled while the broker was away drains with many publishes in flight; the
/// connection is cut in the middle of it. Every message arrives, in spool order (counting
/// each message where it first arrives), and a message that arrives twice does so under its
/// own message id.
#[tokio::test]
async fn a_spooled_backlog_drains_in_order_and_a_connection_cut_mid_drain_loses_nothing() {
    let _serial = SERIAL.lock().await;
    if !available().await {
        return;
    }
    const N: usize = 3000;
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let link = rabbit::BrokerLink::start().await;
    link.down();
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("backlog");
    let config = dlq_config(&ai, &route, dir.path(), true, "").replace(rabbit::URL, &link.url());
    let proxy = std::sync::Arc::new(TestProxy::start(&config).await);
    let mut senders = Vec::new();
    for w in 0..16 {
        let proxy = proxy.clone();
        senders.push(tokio::spawn(async move {
            for i in (w..N).step_by(16) {
                let r = post(&proxy, &format!("{{\"answer\":{i}}}")).await;
                assert_eq!(r.status, 202);
                assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let spool = dir.path().join("spool");
    let order = spooled_request_ids(&spool).unwrap();
    assert_eq!(
        order.len(),
        N,
        "every request spooled while the broker was away"
    );

    link.up();
    let (conn, ch) = rabbit::channel().await;
    let queue = format!("breakwater.dlq.{route}");
    let at_cut = rabbit::wait_depth(&conn, &queue, (N / 4) as u32, Duration::from_secs(60)).await;
    link.cut();
    assert!(
        (N / 4..N).contains(&(at_cut as usize)),
        "the cut came with {at_cut} of {N} messages in the queue: not mid-drain"
    );

    let mut arrived: Vec<(String, String)> = Vec::new();
    let mut seen = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < N && std::time::Instant::now() < deadline {
        if !rabbit::exists(&conn, &queue).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for m in rabbit::drain(&ch, &queue).await {
            let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
            let id = v["request_id"].as_str().unwrap().to_string();
            seen.insert(id.clone());
            arrived.push((id, v["msg_id"].as_str().unwrap().to_string()));
        }
    }
    let missing: Vec<_> = order.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} spooled message(s) lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let mut firsts = Vec::new();
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    for (id, msg_id) in &arrived {
        let msg_ids = ids.entry(id.clone()).or_default();
        if msg_ids.is_empty() {
            firsts.push(id.clone());
        }
        msg_ids.insert(msg_id.clone());
    }
    let out_of_order = firsts.iter().zip(&order).position(|(a, b)| a != b);
    assert_eq!(out_of_order, None, "messages arrived out of spool order");
    assert!(
        ids.values().all(|m| m.len() == 1),
        "a message arrived again under another message id"
    );
    // The cursor moved over all of it: nothing left to hand on.
    assert!(
        wait_until(Duration::from_secs(10), || spooled_request_ids(&spool)
            .is_some_and(|ids| ids.is_empty()))
        .await,
        "the spool still holds messages after the drain"
    );
    std::sync::Arc::try_unwrap(proxy).ok().unwrap().stop().await;
    rabbit::cleanup(&ch, &route).await;
}
