//! Requests whose clients go away mid-flight: h2 streams reset by the client and HTTP/1
//! connections closed before the answer, under concurrent load. Every request the proxy
//! accepted leaves exactly one decision record, and a replayable request whose AI call
//! already failed is still spooled after its client has gone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;
use tokio::io::AsyncWriteExt;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn audit_section(dir: &Path) -> String {
    let key_file = dir.join("audit.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    format!(
        "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\nfsync_interval_ms = 5\n",
        dir.join("decisions.jsonl").display(),
        key_file.display()
    )
}

fn decisions(dir: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(dir.join("decisions.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("request_id").is_some())
        .collect()
}

/// Waits until the log holds `n` decision records, then a little longer to catch extras.
async fn settled_decisions(dir: &Path, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..3000 {
        if decisions(dir).len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    decisions(dir)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Starts `n` HTTP/1 requests on their own connections; the returned sockets are still
/// waiting for their answers.
async fn h1_clients(addr: std::net::SocketAddr, n: usize, tag: &str) -> Vec<tokio::net::TcpStream> {
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /v1/score?i={i} HTTP/1.1\r\nhost: breakwater\r\nx-request-id: {tag}-{i}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        socks.push(s);
    }
    socks
}

/// Starts `n` requests as streams of one h2 connection; aborting a task resets its stream.
fn h2_clients(addr: std::net::SocketAddr, n: usize, tag: &str) -> Vec<tokio::task::JoinHandle<()>> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    (0..n)
        .map(|i| {
            let client = client.clone();
            let req = http::Request::get(format!("http://{addr}/v1/score?h2={i}"))
                .header("x-request-id", format!("{tag}-{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            tokio::spawn(async move {
                let _ = client.request(req).await;
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_disconnects_under_load_leave_one_record_per_request() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The leaving requests wait at the AI until their clients go, however long a loaded
    // machine takes to start all 160: no fixed delay for them to outlast, and a deadline
    // well beyond the setup.
    let config = simple_config(&ai.url(), "", &audit_section(dir.path()))
        .replace("timeout_ms = 2000", "timeout_ms = 60000");
    let proxy = TestProxy::start(&config).await;
    ai.hang(true);
    let h2 = h2_clients(proxy.addr, 60, "h2");
    let h1 = h1_clients(proxy.addr, 60, "h1").await;
    wait_until("the AI to receive the 120 leaving requests", || {
        ai.requests() >= 120
    })
    .await;
    ai.hang(false);
    ai.set_delay(Duration::from_millis(100));

    // Completed requests alongside the ones whose clients leave (those stay in flight).
    let done: Vec<_> = (0..40)
        .map(|i| {
            let url = proxy.url(&format!("/v1/score?ok={i}"));
            tokio::spawn(async move {
                let r = http_client()
                    .request(
                        http::Request::get(url)
                            .header("x-request-id", format!("ok-{i}"))
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                r.status().as_u16()
            })
        })
        .collect();
    for d in done {
        assert_eq!(d.await.unwrap(), 200);
    }
    assert_eq!(ai.requests(), 160);
    for task in &h2 {
        task.abort();
    }
    drop(h1);

    let records = settled_decisions(dir.path(), 160).await;
    assert_eq!(records.len(), 160, "one record per accepted request");
    let cancelled: Vec<_> = records
        .iter()
        .filter(|r| r["outcome"] == "cancelled")
        .collect();
    assert_eq!(
        cancelled.len(),
        120,
        "every reset or disconnected request is cancelled"
    );
    for r in &cancelled {
        assert_eq!(r["status"], 499);
        assert_eq!(r["upstream"], "ai", "the facts known so far are kept: {r}");
        assert_eq!(r["attempts"], 1);
        assert!(r["input_digest"].is_string());
        let id = r["request_id"].as_str().unwrap();
        assert!(id.starts_with("h1-") || id.starts_with("h2-"), "{id}");
    }
    assert_eq!(records.iter().filter(|r| r["outcome"] == "ai").count(), 40);
    // The metrics registry is per process, shared with the other tests of this file.
    let metrics = proxy.metrics().await;
    let cancelled_total: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "breakwater_requests_total{route=\"ai\",outcome=\"cancelled\",status=\"499\"} ",
            )
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        cancelled_total >= 120,
        "{cancelled_total} cancelled counted"
    );
    let verify = std::process::Command::new(breakwater_bin())
        .args(["audit", "verify"])
        .arg(dir.path().join("decisions.jsonl"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replayable_request_is_spooled_after_its_client_has_gone() {
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 503);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // A long group-fsync interval holds each hand-off open long enough for the clients to
    // leave while their dead letters are still being written.
    let extra = format!(
        "{}\n[dlq]\nspool_dir = \"{}\"\nfsync_interval_ms = 400\n",
        audit_section(dir.path()),
        spool.display()
    );
    let config = simple_config(&ai.url(), "replayable = true", &extra);
    let proxy = TestProxy::start(&config).await;
    // Keep the spool as it is: no local replay while the test looks at it.
    assert_eq!(
        proxy.admin_post("/admin/dlq/pause", "", None).await.status,
        200
    );

    let h1 = h1_clients(proxy.addr, 20, "gone").await;
    wait_until("the AI to fail all 20 requests", || ai.requests() >= 20).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    drop(h1);

    let records = settled_decisions(dir.path(), 20).await;
    assert_eq!(records.len(), 20);
    let mut ids = Vec::new();
    for r in &records {
        assert_eq!(r["outcome"], "cancelled", "{r}");
        assert_eq!(r["status"], 499);
        assert_eq!(r["reason"], "upstream_5xx", "{r}");
        assert_eq!(r["dlq"], "spooled", "the record names the dead letter: {r}");
        ids.push(r["dlq_msg_id"].as_str().unwrap().to_string());
    }
    let report = breakwater::cli::spool_inspect(&spool).unwrap();
    let listed = format!("{report:?}");
    assert!(
        ids.iter().all(|id| listed.contains(id.as_str())),
        "{listed}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_off_by_the_end_of_the_shutdown_grace_are_recorded() {
    let ai = MockAi::start().await;
    ai.set_delay(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let config = simple_config(&ai.url(), "", &audit_section(dir.path())).replacen(
        "[server]\n",
        "[server]\nshutdown_grace_ms = 300\n",
        1,
    );
    let proxy = TestProxy::start(&config).await;
    let h1 = h1_clients(proxy.addr, 10, "grace").await;
    wait_until("the AI to receive all 10 requests", || ai.requests() >= 10).await;
    let started = std::time::Instant::now();
    // `stop` returns once app::run has: the records must be on disk by then.
    proxy.stop().await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "shutdown waited for the AI"
    );
    let records = decisions(dir.path());
    assert_eq!(records.len(), 10, "{records:?}");
    assert!(records
        .iter()
        .all(|r| r["outcome"] == "cancelled" && r["status"] == 499));
    drop(h1);
}
