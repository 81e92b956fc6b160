//! Connection limits, black-box through real sockets: idle keep-alive and h2 connections
//! close after `idle_timeout_ms`, a head or a body that trickles in is cut off, and the
//! connection caps refuse (and count) the connection over the limit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

fn with_server_keys(ai: &MockAi, keys: &str) -> String {
    simple_config(&ai.url(), "", "").replace(
        "watch_config = true\n",
        &format!("watch_config = true\n{keys}\n"),
    )
}

/// Reads until the peer closes (read returns 0) or `limit` passes; returns what was read
/// and how long after `since` the close came (None: still open at `limit`).
async fn read_until_eof(
    stream: &mut TcpStream,
    since: Instant,
    limit: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (seen, Some(since.elapsed())),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return (seen, None),
        }
    }
}

#[tokio::test]
async fn idle_http1_keep_alive_connection_is_closed_after_idle_timeout() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&with_server_keys(
        &ai,
        "idle_timeout_ms = 400\nheader_read_timeout_ms = 10000",
    ))
    .await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"GET /v1/x HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let sent = Instant::now();
    let (seen, closed) = read_until_eof(&mut conn, sent, Duration::from_secs(4)).await;
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let closed = closed.expect("the idle keep-alive connection was still open after 4 s");
    assert!(
        closed >= Duration::from_millis(350),
        "closed too early, after {closed:?}: keep-alive must hold for idle_timeout"
    );
    assert!(closed < Duration::from_secs(2), "closed after {closed:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn partial_http1_head_is_cut_off_by_header_read_timeout_not_idle_timeout() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&with_server_keys(
        &ai,
        "idle_timeout_ms = 60000\nheader_read_timeout_ms = 300",
    ))
    .await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"GET /v1/x HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    let (_, closed) = read_until_eof(&mut conn, Instant::now(), Duration::from_secs(3)).await;
    let closed = closed.expect("a half-sent head held the connection for 3 s");
    assert!(closed < Duration::from_secs(2), "closed after {closed:?}");
    // A connection that stays silent after its first answer waits for idle_timeout, not
    // header_read_timeout (60 s here: still open after a second).
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"GET /v1/x HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let (seen, closed) = read_until_eof(&mut conn, Instant::now(), Duration::from_secs(1)).await;
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    assert_eq!(closed, None, "an idle keep-alive connection closed early");
    proxy.stop().await;
}

#[tokio::test]
async fn idle_h2_connection_is_closed_after_idle_timeout() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&with_server_keys(&ai, "idle_timeout_ms = 400")).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let driver = tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::get(format!("http://{}/v1/x", proxy.addr))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let idle = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(4), driver).await;
    assert!(
        ended.is_ok(),
        "the idle h2 connection was still open after 4 s"
    );
    assert!(
        idle.elapsed() >= Duration::from_millis(350),
        "h2 closed after {:?}, before idle_timeout",
        idle.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn h2_connection_that_sends_no_request_is_cut_off_by_header_read_timeout() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&with_server_keys(
        &ai,
        "idle_timeout_ms = 60000\nheader_read_timeout_ms = 300",
    ))
    .await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    // The h2c preface, then silence: no SETTINGS, no HEADERS.
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let (_, closed) = read_until_eof(&mut conn, Instant::now(), Duration::from_secs(3)).await;
    let closed = closed.expect("a silent h2 connection was still open after 3 s");
    assert!(closed < Duration::from_secs(2), "closed after {closed:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn trickled_body_gets_408_within_the_body_read_timeout() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&with_server_keys(&ai, "body_read_timeout_ms = 300")).await;
    let conn = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut rd, mut wr) = conn.into_split();
    wr.write_all(b"POST /v1/x HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if wr.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(3), rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            other => panic!("no response to the trickled body: {other:?}"),
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "408 after {:?}",
        started.elapsed()
    );
    assert_eq!(ai.requests(), 0, "a cut-off body reached the AI");
    trickle.abort();
    proxy.stop().await;
}

/// One metric sample from a Prometheus text page, e.g. `name{listener="data"}`.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

async fn metrics_page(admin: u16) -> String {
    let resp = http_client()
        .request(
            http::Request::get(format!("http://127.0.0.1:{admin}/metrics"))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An HTTP/1.1 connection that stays open (keep-alive) between requests.
async fn open_h1(port: u16) -> H1 {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn get_status(send: &mut H1, path: &str) -> u16 {
    send.ready().await.unwrap();
    let resp = send
        .send_request(
            http::Request::get(path)
                .header("host", "t")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

/// The refused connection: a 503 with a JSON body, then closed.
async fn refused(port: u16, path: &str) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (seen, closed) = read_until_eof(&mut conn, Instant::now(), Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(
        closed.is_some(),
        "the refused connection stayed open: {text}"
    );
    text
}

async fn wait_for_gauge(admin: u16, series: &str, want: f64) {
    for _ in 0..100 {
        if sample(&metrics_page(admin).await, series).unwrap_or(0.0) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{series} never reached {want}");
}

#[tokio::test]
async fn data_plane_refuses_and_counts_the_connection_over_max_connections() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pp = ProcessProxy::new(
        dir.path(),
        &with_server_keys(&ai, "max_connections = 2\nidle_timeout_ms = 30000"),
    );
    let mut child = Reaped(Some(pp.spawn().await));
    // spawn() probed the port with connections of its own: let them go first. A probe
    // still in the accept backlog is taken a moment later, so the count must stay at 0.
    for _ in 0..2 {
        wait_for_gauge(
            pp.admin,
            "breakwater_connections_open{listener=\"data\"}",
            0.0,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut a = open_h1(pp.port).await;
    let mut b = open_h1(pp.port).await;
    assert_eq!(get_status(&mut a, "/v1/x").await, 200);
    assert_eq!(get_status(&mut b, "/v1/x").await, 200);
    let third = refused(pp.port, "/v1/x").await;
    assert!(
        third.starts_with("HTTP/1.1 503"),
        "the third connection was not refused: {third}"
    );
    assert!(third.contains("too_many_connections"), "{third}");
    assert!(
        third.to_ascii_lowercase().contains("connection: close"),
        "{third}"
    );
    // The first two keep working.
    assert_eq!(get_status(&mut a, "/v1/x").await, 200);
    assert_eq!(get_status(&mut b, "/v1/x").await, 200);
    let page = metrics_page(pp.admin).await;
    assert_eq!(
        sample(
            &page,
            "breakwater_connections_refused_total{listener=\"data\"}"
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "breakwater_connections_open{listener=\"data\"}"),
        Some(2.0)
    );
    // A closed connection frees its slot.
    drop(a);
    wait_for_gauge(
        pp.admin,
        "breakwater_connections_open{listener=\"data\"}",
        1.0,
    )
    .await;
    let mut c = open_h1(pp.port).await;
    assert_eq!(get_status(&mut c, "/v1/x").await, 200);
    assert_eq!(ai.requests(), 5);
    terminate(child.0.take().unwrap());
}

#[tokio::test]
async fn admin_listener_refuses_and_counts_the_connection_over_admin_max_connections() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pp = ProcessProxy::new(
        dir.path(),
        &with_server_keys(&ai, "admin_max_connections = 2\nidle_timeout_ms = 30000"),
    );
    let mut child = Reaped(Some(pp.spawn().await));
    wait_for_gauge(
        pp.admin,
        "breakwater_connections_open{listener=\"admin\"}",
        1.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut a = open_h1(pp.admin).await;
    let mut b = open_h1(pp.admin).await;
    assert_eq!(get_status(&mut a, "/healthz").await, 200);
    assert_eq!(get_status(&mut b, "/healthz").await, 200);
    let third = refused(pp.admin, "/healthz").await;
    assert!(
        third.starts_with("HTTP/1.1 503"),
        "the third admin connection was not refused: {third}"
    );
    assert!(third.contains("too_many_connections"), "{third}");
    assert_eq!(get_status(&mut a, "/healthz").await, 200);
    drop(b);
    // The freed slot serves /metrics, which counted the refusal.
    let mut page = String::new();
    for _ in 0..100 {
        page = metrics_page(pp.admin).await;
        if page.contains("breakwater_connections_refused_total") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // At least the third connection; a /metrics read that came before b's slot was free
    // is refused and counted too.
    assert!(
        sample(
            &page,
            "breakwater_connections_refused_total{listener=\"admin\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{page}"
    );
    terminate(child.0.take().unwrap());
}

/// The proxy process, killed if the test fails before it ends it: a leftover child would
/// hold the test runner's output pipe open.
struct Reaped(Option<std::process::Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
