//! The access log an SRE greps: one JSON line per request, through real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

const STATIC_FB: &str =
    "[[routes.fallback]]\nkind = \"static\"\nbody = '{\"source\":\"static\"}'\n";

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

async fn wait_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    assert!(
        poll_until(Duration::from_secs(10), || async { lines(path).len() >= n }).await,
        "expected {n} lines in {}, have {:?}",
        path.display(),
        lines(path)
    );
    lines(path)
}

fn by_id<'a>(lines: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["request_id"] == id)
        .unwrap_or_else(|| panic!("no line for {id} in {lines:?}"))
}

async fn get_with_id(proxy: &TestProxy, path: &str, id: &str) -> Reply {
    let req = http::Request::get(proxy.url(path))
        .header("x-request-id", id)
        .body(Full::new(Bytes::new()))
        .unwrap();
    proxy.send(req).await
}

fn access_config(ai: &MockAi, log: &Path) -> String {
    simple_config(
        &ai.url(),
        &format!("[routes.breaker]\nconsecutive_failures = 0\n{STATIC_FB}"),
        &format!("[access_log]\npath = \"{}\"\n", log.display()),
    )
}

#[tokio::test]
async fn each_request_is_one_line_with_the_fields_sres_grep_for() {
    let ai = MockAi::start().await;
    ai.set_model_version("grader-7");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("logs/access.jsonl");
    let proxy = TestProxy::start(&access_config(&ai, &log)).await;

    let ok = get_with_id(&proxy, "/v1/grade?student=s-123&token=secret", "req-ok").await;
    assert_eq!(ok.status, 200);
    ai.set_error_rate(1.0, 503);
    let fb = get_with_id(&proxy, "/v1/grade", "req-fallback").await;
    assert_eq!(fb.outcome(), "fallback");
    ai.set_error_rate(0.0, 200);

    let got = wait_lines(&log, 2).await;
    let line = by_id(&got, "req-ok");
    assert_eq!(line["route"], "ai");
    assert_eq!(line["method"], "GET");
    assert_eq!(
        line["path"], "/v1/grade",
        "the query string never reaches the log"
    );
    assert!(!line.to_string().contains("secret"));
    assert_eq!(line["status"], 200);
    assert_eq!(line["outcome"], "ai");
    assert_eq!(line["upstream"], "ai");
    assert_eq!(line["model_version"], "grader-7");
    assert_eq!(
        line["bytes"],
        ok.body.len() as u64,
        "bytes sent to the client"
    );
    assert!(line["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(line["upstream_latency_ms"].as_f64().is_some());
    assert!(
        humantime::parse_rfc3339(line["time"].as_str().unwrap()).is_ok(),
        "time is RFC 3339: {line}"
    );

    let line = by_id(&got, "req-fallback");
    assert_eq!(line["outcome"], "fallback");
    assert_eq!(line["reason"], "upstream_5xx");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes"], fb.body.len() as u64);
    proxy.stop().await;
}

#[tokio::test]
async fn requests_without_a_route_and_clients_that_leave_are_logged_too() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.jsonl");
    let config = access_config(&ai, &log).replace("path_prefix = \"/\"", "path_prefix = \"/v1/\"");
    let proxy = TestProxy::start(&config).await;

    assert_eq!(get_with_id(&proxy, "/nowhere", "req-404").await.status, 404);

    // The client gives up while the AI hangs: nginx's 499.
    ai.hang(true);
    let url = proxy.url("/v1/slow");
    let client = tokio::spawn(async move {
        let req = http::Request::get(url)
            .header("x-request-id", "req-gone")
            .body(Full::new(Bytes::new()))
            .unwrap();
        http_client().request(req).await.map(|r| r.status())
    });
    assert!(poll_until(Duration::from_secs(10), || async { ai.requests() >= 1 }).await);
    client.abort();
    let got = wait_lines(&log, 2).await;
    ai.hang(false);

    let line = by_id(&got, "req-404");
    assert_eq!(line["status"], 404);
    assert_eq!(line["outcome"], "error");
    assert_eq!(line["route"], serde_json::Value::Null);
    assert_eq!(line["path"], "/nowhere");
    let line = by_id(&got, "req-gone");
    assert_eq!(line["status"], 499);
    assert_eq!(line["outcome"], "cancelled");
    assert_eq!(line["route"], "ai");
    assert_eq!(line["bytes"], 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_rotated_file_is_reopened_and_no_line_is_lost() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.jsonl");
    let proxy = TestProxy::start(&access_config(&ai, &log)).await;
    for i in 0..20 {
        get_with_id(&proxy, "/a", &format!("before-{i}")).await;
    }
    wait_lines(&log, 20).await;
    // logrotate without copytruncate: move the file away, then keep serving.
    let rotated = dir.path().join("access.jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    for i in 0..20 {
        get_with_id(&proxy, "/a", &format!("after-{i}")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = wait_lines(&log, 1).await;
    assert!(
        fresh
            .iter()
            .all(|l| l["request_id"].as_str().unwrap().starts_with("after-")),
        "the new file starts after the rotation: {fresh:?}"
    );
    assert!(
        poll_until(Duration::from_secs(10), || async {
            lines(&rotated).len() + lines(&log).len() >= 40
        })
        .await
    );
    let all: Vec<String> = lines(&rotated)
        .iter()
        .chain(lines(&log).iter())
        .map(|l| l["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        all.len(),
        40,
        "every request once across the two files: {all:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_reload_that_changes_the_access_log_is_refused() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.jsonl");
    let config = access_config(&ai, &log);
    let proxy = TestProxy::start(&config).await;
    proxy.replace_config(&config.replace("access.jsonl", "other.jsonl"));
    let r = proxy.admin_post("/admin/reload", "", None).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("access_log"));
    get_with_id(&proxy, "/a", "still-here").await;
    let got = wait_lines(&log, 1).await;
    by_id(&got, "still-here");
    proxy.stop().await;
}

/// `breakwater check` on a config with `extra` appended: it must refuse; its stderr.
fn check_refuses(extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, simple_config("http://127.0.0.1:9", "", extra)).unwrap();
    let out = Command::new(breakwater_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_access_log_settings_are_config_errors_with_their_key() {
    let err = check_refuses("[access_log]\npath = \"\"\nbuffer = 0\nformat = \"clf\"\n");
    assert!(err.contains("access_log"), "{err}");
    let err = check_refuses("[access_log]\npath = \"\"\nbuffer = 0\n");
    assert!(err.contains("access_log.path"), "{err}");
    assert!(err.contains("access_log.buffer"), "{err}");
}
