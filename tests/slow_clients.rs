//! Slow readers, through real sockets against breakwater as a process (its own metrics
//! registry and RSS): a client that stops reading a large answer is dropped at
//! `response_write_timeout_ms` and its request is recorded as cancelled; the bytes read
//! ahead for slow clients stay within `response_buffer_bytes`; upstream connections are
//! released once the AI's answer has arrived; normal requests keep succeeding meanwhile.
//! (slowloris and slow bodies at scale: `loadtests/slow-clients.sh`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use support::*;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const MIB: usize = 1024 * 1024;
/// Larger than what the kernel buffers for a client that reads nothing (tcp_wmem: 4 MiB).
const ANSWER: usize = 8 * MIB;

/// The proxy process, killed if the test fails before it ends it.
struct Reaped(Option<std::process::Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One route to the mock on `/`, the decision log on, `server_keys` under `[server]`,
/// released upstream connections closed (not pooled) so that they can be counted.
fn config(ai: &MockAi, dir: &Path, server_keys: &str) -> String {
    let key_file = dir.join("audit.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let cfg = simple_config(
        &ai.url(),
        "",
        &format!(
            "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\nfsync_interval_ms = 5\n",
            dir.join("decisions.jsonl").display(),
            key_file.display()
        ),
    )
    .replace(
        "watch_config = true\n",
        &format!("watch_config = false\n{server_keys}\n"),
    );
    cfg.replace(
        &format!("url = \"{}\"\n", ai.url()),
        &format!("url = \"{}\"\npool_max_idle_per_host = 0\n", ai.url()),
    )
}

async fn start(ai: &MockAi, dir: &Path, server_keys: &str) -> (ProcessProxy, Reaped) {
    let proxy = ProcessProxy::new(dir, &config(ai, dir, server_keys));
    let child = proxy.spawn().await;
    (proxy, Reaped(Some(child)))
}

/// A client that asks for `bytes` of answer and then reads nothing: its receive buffer is
/// kept small, so the proxy's writes soon stop making progress.
async fn slow_reader(addr: SocketAddr, bytes: usize, request_id: &str) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let req = format!(
        "GET /bytes/{bytes} HTTP/1.1\r\nhost: breakwater\r\nx-request-id: {request_id}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

fn decisions(dir: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(dir.join("decisions.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r.get("request_id").is_some())
        .collect()
}

/// One metric sample from a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

async fn metrics(admin: u16) -> String {
    let resp = http_client()
        .request(
            http::Request::get(format!("http://127.0.0.1:{admin}/metrics"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// Established TCP connections to `port` on 127.0.0.1, from /proc/net/tcp (the proxy's
/// side of its upstream connections to the mock).
fn established_to(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let want = format!("0100007F:{port:04X}");
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == want && f[3] == "01"
        })
        .count()
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Normal requests on fresh connections while the slow readers hang: all must be 200.
async fn normal_requests(proxy: &ProcessProxy, n: usize) {
    let client = http_client();
    for i in 0..n {
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(
                http::Request::get(proxy.url(&format!("/v1/normal?i={i}")))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ),
        )
        .await
        .expect("a normal request hung behind the slow readers")
        .unwrap();
        assert_eq!(resp.status(), 200, "normal request {i}");
        resp.into_body().collect().await.unwrap();
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_at_the_write_timeout_and_recorded_cancelled() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, _child) = start(&ai, dir.path(), "response_write_timeout_ms = 500").await;
    let addr: SocketAddr = ([127, 0, 0, 1], proxy.port).into();
    let mut stalled = slow_reader(addr, 8 * MIB, "stalled-1").await;

    // Dropped: the write timeout is counted and the request recorded as cancelled.
    eventually(
        "the write timeout to be counted",
        Duration::from_secs(15),
        async || {
            sample(
                &metrics(proxy.admin).await,
                "breakwater_response_write_timeouts_total",
            )
            .unwrap_or(0.0)
                >= 1.0
        },
    )
    .await;
    eventually("the decision record", Duration::from_secs(10), async || {
        decisions(dir.path())
            .iter()
            .any(|r| r["request_id"] == "stalled-1")
    })
    .await;
    let records = decisions(dir.path());
    let record = records
        .iter()
        .find(|r| r["request_id"] == "stalled-1")
        .unwrap();
    assert_eq!(record["outcome"], "cancelled", "{record}");
    assert_eq!(record["status"], 499, "{record}");

    // The socket was closed: reading now drains what the kernel holds, then ends, far
    // short of the 8 MiB answer.
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled connection was still open");
    assert!(got < 8 * MIB, "the whole answer arrived ({got} bytes)");

    // A client that reads keeps its whole answer.
    let resp = http_client()
        .request(
            http::Request::get(proxy.url(&format!("/bytes/{}", 2 * MIB)))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 2 * MIB);
}

#[tokio::test]
async fn slow_readers_stay_within_the_response_buffer_budget_and_release_the_ai() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Answers of 8 MiB, each read ahead whole if the budget allows; the kernel's socket
    // buffers take up to 4 MiB of each, the rest is in breakwater's memory. Room for
    // three; the write timeout is out of the way.
    let budget = 24 * MIB;
    let (proxy, _child) = start(
        &ai,
        dir.path(),
        &format!(
            "response_buffer_bytes = {budget}\nmax_response_buffer_bytes = {ANSWER}\nresponse_write_timeout_ms = 120000"
        ),
    )
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], proxy.port).into();
    let mut readers = Vec::new();
    for i in 0..3 {
        readers.push(slow_reader(addr, ANSWER, &format!("ahead-{i}")).await);
    }
    // Three answers fit the budget: read ahead whole, the AI's connections released while
    // the clients still read nothing.
    eventually(
        "the upstream connections of answers read ahead to be released",
        Duration::from_secs(15),
        async || ai.requests() >= 3 && established_to(ai.addr().port()) == 0,
    )
    .await;
    let page = metrics(proxy.admin).await;
    let held = sample(&page, "breakwater_response_buffer_bytes").unwrap();
    assert!(held > 0.0, "nothing is read ahead for the stalled readers");

    // Twelve more than the budget holds: the gauge never passes the budget, and normal
    // requests keep succeeding.
    for i in 3..15 {
        readers.push(slow_reader(addr, ANSWER, &format!("ahead-{i}")).await);
    }
    eventually(
        "all 15 requests to reach the AI",
        Duration::from_secs(15),
        async || ai.requests() >= 15,
    )
    .await;
    for _ in 0..20 {
        let held = sample(
            &metrics(proxy.admin).await,
            "breakwater_response_buffer_bytes",
        )
        .unwrap();
        assert!(
            held <= budget as f64,
            "{held} bytes read ahead, budget {budget}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    normal_requests(&proxy, 20).await;
    // The readers over the budget stream at their own pace, holding their AI connection.
    assert!(established_to(ai.addr().port()) >= 1);

    // Every answer is whole and correct once its client reads.
    for (i, r) in readers.iter_mut().enumerate() {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let head_and_body = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
                if all.ends_with(b"\r\n0\r\n\r\n") {
                    break;
                }
            }
        })
        .await;
        assert!(
            head_and_body.is_ok(),
            "reader {i} never got its whole answer"
        );
        let text = String::from_utf8_lossy(&all[..all.len().min(64)]);
        assert!(text.starts_with("HTTP/1.1 200"), "reader {i}: {text}");
        let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        // The body is chunked: hex sizes and CRLFs around 'x' bytes.
        let xs = all[head_end..].iter().filter(|b| **b == b'x').count();
        assert_eq!(xs, ANSWER, "reader {i} got {xs} bytes of body");
    }
    eventually(
        "the budget to be released",
        Duration::from_secs(10),
        async || {
            sample(
                &metrics(proxy.admin).await,
                "breakwater_response_buffer_bytes",
            ) == Some(0.0)
        },
    )
    .await;
}
