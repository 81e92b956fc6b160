//! Hostile HTTP clients, black-box through real sockets in front of the real mock AI:
//! malformed and smuggling requests over raw TCP, HTTP/2 rapid reset and CONTINUATION
//! floods with Python's `h2` (the attackers' own library), an `h2load` flood, and many
//! hostile connections held open while normal clients keep being served. Every refusal is
//! a clear 4xx or a closed connection, and what was refused never reaches the AI (counted
//! at the mock).
//!
//! Sizes scale with environment variables for the on-demand run (`loadtests/hostile.sh`):
//! `BREAKWATER_HOSTILE_CONNS` (held connections, 100 here), `BREAKWATER_H2LOAD_REQUESTS`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// What a raw exchange got back: the bytes, and whether the server closed the connection
/// (within the time given) or left it open.
struct Raw {
    text: String,
    bytes: Vec<u8>,
    closed: bool,
}

impl Raw {
    fn status(&self) -> Option<u16> {
        self.text
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| self.text.strip_prefix("HTTP/1.0 "))
            .and_then(|t| t.get(..3))
            .and_then(|s| s.parse().ok())
    }

    /// How many responses came back (a smuggled request would add one).
    fn responses(&self) -> usize {
        self.text.matches("HTTP/1.1 ").count()
    }
}

/// Sends `request` on a fresh connection and reads until the server closes it or `wait`
/// passes with nothing more arriving.
async fn raw(addr: std::net::SocketAddr, request: &[u8], wait: Duration) -> Raw {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    // The server may close before it read all of a refused request: a failed write is
    // part of what is being tested, not a test failure.
    let _ = conn.write_all(request).await;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 65536];
    let closed = loop {
        match tokio::time::timeout(wait, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    Raw {
        text: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
        closed,
    }
}

const WAIT: Duration = Duration::from_secs(3);

/// A clear refusal: a 4xx (any connection state) or, with no answer at all, a close.
fn assert_refused(what: &str, r: &Raw) {
    match r.status() {
        Some(s) => assert!(
            (400..500).contains(&s),
            "{what}: got {s}, not a 4xx: {}",
            r.text
        ),
        None => assert!(r.closed, "{what}: no answer and still open: {:?}", r.text),
    }
}

#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_request_to_the_ai() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
    let body = format!("0\r\n\r\n{smuggled}");
    // CL.TE and TE.CL orders, and obfuscated Transfer-Encodings that a front proxy and
    // breakwater might read differently.
    // (head, status): chunked wins and the connection closes after the answer; an
    // obfuscated Transfer-Encoding is refused.
    let n = body.len();
    let heads = [
        (format!("POST /v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\nTransfer-Encoding: chunked\r\n\r\n"), 200),
        (format!("POST /v1/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: {n}\r\n\r\n"), 200),
        (format!("POST /v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n"), 400),
        (format!("POST /v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\nTransfer-Encoding : chunked\r\n\r\n"), 400),
        (format!("POST /v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\nTransfer-Encoding: xchunked\r\n\r\n"), 400),
        (format!("POST /v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\nTransfer-Encoding: gzip\r\n\r\n"), 400),
    ];
    for (head, status) in &heads {
        let r = raw(proxy.addr, format!("{head}{body}").as_bytes(), WAIT).await;
        assert_eq!(r.status(), Some(*status), "{head:?} -> {}", r.text);
        assert!(
            r.closed,
            "the connection stayed open after an ambiguous body: {head:?} -> {}",
            r.text
        );
        assert_eq!(r.responses(), 1, "{head:?}: {}", r.text);
        assert!(
            r.text.to_ascii_lowercase().contains("connection: close"),
            "{}",
            r.text
        );
    }
    let paths: Vec<String> = ai.received().into_iter().map(|r| r.path).collect();
    assert!(
        !paths.iter().any(|p| p == "/smuggled"),
        "a smuggled request reached the AI: {paths:?}"
    );
    assert_eq!(
        paths,
        ["/v1/x", "/v1/x"],
        "only the two chunked bodies are served"
    );
    proxy.stop().await;
}

/// Requests breakwater must refuse (4xx or close) without calling the AI.
const MALFORMED: &[(&str, &[u8])] = &[
    (
        "two different Content-Lengths",
        b"POST /v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ),
    (
        "chunk size not hex",
        b"POST /v1/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "negative chunk size",
        b"POST /v1/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk size overflowing u64",
        b"POST /v1/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk shorter than its size",
        b"POST /v1/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "NUL in a header value",
        b"GET /v1/x HTTP/1.1\r\nHost: t\r\nX-A: a\0b\r\n\r\n",
    ),
    (
        "NUL in a header name",
        b"GET /v1/x HTTP/1.1\r\nHost: t\r\nX\0A: b\r\n\r\n",
    ),
    (
        "bare CR in a header value",
        b"GET /v1/x HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n",
    ),
    (
        "bare CR ending a header line",
        b"GET /v1/x HTTP/1.1\r\nHost: t\rX-A: b\r\n\r\n",
    ),
    ("HTTP/0.9 request line", b"GET /v1/x\r\n\r\n"),
    ("HTTP/0.9 request line, no blank line", b"GET /v1/x\r\n"),
    ("unknown HTTP version", b"GET /v1/x HTTP/3.7\r\nHost: t\r\n\r\n"),
];

#[tokio::test]
async fn malformed_framing_and_header_bytes_get_a_4xx_and_never_reach_the_ai() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    let cases = MALFORMED;
    for (what, bytes) in cases {
        let r = raw(proxy.addr, bytes, WAIT).await;
        assert_refused(what, &r);
    }
    assert_eq!(
        ai.requests(),
        0,
        "a malformed request reached the AI: {:?}",
        ai.received()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_and_too_many_headers_get_431_within_max_header_bytes() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    // 100 KiB in one header: over the 64 KiB default (hyper alone would take 400 KiB).
    let big = format!(
        "GET /v1/x HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let r = raw(proxy.addr, big.as_bytes(), WAIT).await;
    assert_eq!(r.status(), Some(431), "{}", r.text.get(..200).unwrap_or(""));
    assert!(r.closed);
    // 10,000 headers (hyper takes at most 100).
    let mut many = String::from("GET /v1/x HTTP/1.1\r\nHost: t\r\n");
    for i in 0..10_000 {
        many.push_str(&format!("x-h-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(proxy.addr, many.as_bytes(), WAIT).await;
    assert_eq!(r.status(), Some(431), "{}", r.text);
    // 90 headers of 300 bytes (27 KiB): within both limits, served.
    let mut fine = String::from("GET /v1/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for i in 0..90 {
        fine.push_str(&format!("x-h-{i}: {}\r\n", "b".repeat(300)));
    }
    fine.push_str("\r\n");
    let r = raw(proxy.addr, fine.as_bytes(), WAIT).await;
    assert_eq!(r.status(), Some(200), "{}", r.text);
    assert_eq!(
        ai.requests(),
        1,
        "only the request within the limits reaches the AI"
    );
    proxy.stop().await;

    // The limit is a config key: 16 KiB refuses a 20 KiB header that 64 KiB took.
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "").replace(
        "watch_config = true\n",
        "watch_config = true\nmax_header_bytes = 16384\n",
    ))
    .await;
    let medium = format!(
        "GET /v1/x HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let r = raw(proxy.addr, medium.as_bytes(), WAIT).await;
    assert_eq!(r.status(), Some(431), "{}", r.text.get(..200).unwrap_or(""));
    assert_eq!(ai.requests(), 0);
    proxy.stop().await;
}

#[test]
fn max_header_bytes_out_of_range_is_a_config_error_with_its_key() {
    for bad in ["100", "8191", "1048577"] {
        let text = simple_config("http://127.0.0.1:1", "", "").replace(
            "watch_config = true\n",
            &format!("watch_config = true\nmax_header_bytes = {bad}\n"),
        );
        let err = breakwater::config::Config::from_toml(&text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.max_header_bytes"), "{bad}: {err}");
    }
    let ok = simple_config("http://127.0.0.1:1", "", "").replace(
        "watch_config = true\n",
        "watch_config = true\nmax_header_bytes = 8192\n",
    );
    assert!(breakwater::config::Config::from_toml(&ok).is_ok());
}

#[tokio::test]
async fn missing_or_duplicate_host_gets_400_as_rfc_9112_requires() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    for (what, bytes) in [
        ("no Host", &b"GET /v1/x HTTP/1.1\r\n\r\n"[..]),
        (
            "two Host headers",
            b"GET /v1/x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        ),
        (
            "two equal Host headers",
            b"GET /v1/x HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n",
        ),
        (
            "a Host that is no host",
            b"GET /v1/x HTTP/1.1\r\nHost: a b/c\r\n\r\n",
        ),
        (
            "a Host with userinfo",
            b"GET /v1/x HTTP/1.1\r\nHost: user@a.example\r\n\r\n",
        ),
    ] {
        let r = raw(proxy.addr, bytes, WAIT).await;
        assert_eq!(r.status(), Some(400), "{what}: {}", r.text);
        assert!(r.text.contains("bad_host"), "{what}: {}", r.text);
    }
    assert_eq!(ai.requests(), 0, "{:?}", ai.received());
    // HTTP/1.0 has no Host requirement.
    let r = raw(proxy.addr, b"GET /v1/x HTTP/1.0\r\n\r\n", WAIT).await;
    assert_eq!(r.status(), Some(200), "{}", r.text);
    assert_eq!(ai.requests(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn absolute_form_naming_another_host_cannot_reach_a_host_guarded_route() {
    let tenant_ai = MockAi::start().await;
    let public_ai = MockAi::start().await;
    let config = format!(
        "{}\n[upstreams.tenant]\nurl = \"{}\"\n[upstreams.public]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"tenant\"\npath_prefix = \"/v1/\"\nhost = \"uni.example\"\nupstream = \"tenant\"\n\n\
         [[routes]]\nname = \"public\"\npath_prefix = \"/v1/\"\nupstream = \"public\"\n",
        server_section(),
        tenant_ai.url(),
        public_ai.url()
    );
    let proxy = TestProxy::start(&config).await;
    // A front proxy that checks Host sees "public.example"; the target names the tenant.
    let r = raw(
        proxy.addr,
        b"GET http://uni.example/v1/grades HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(r.status(), Some(400), "{}", r.text);
    assert!(r.text.contains("bad_host"), "{}", r.text);
    let r = raw(
        proxy.addr,
        b"GET http://evil.example/v1/grades HTTP/1.1\r\nHost: uni.example\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(r.status(), Some(400), "{}", r.text);
    assert_eq!(tenant_ai.requests(), 0, "{:?}", tenant_ai.received());
    assert_eq!(public_ai.requests(), 0, "{:?}", public_ai.received());
    // Absolute form that agrees with Host is fine, and goes to the configured upstream,
    // never to the host the target names.
    let r = raw(
        proxy.addr,
        b"GET http://UNI.example:8080/v1/grades HTTP/1.1\r\nHost: uni.example\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(r.status(), Some(200), "{}", r.text);
    let got = tenant_ai.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/v1/grades");
    // Plain origin form with the tenant's Host still reaches the tenant; others the public.
    let r = raw(
        proxy.addr,
        b"GET /v1/grades HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(r.status(), Some(200), "{}", r.text);
    assert_eq!(public_ai.requests(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn nul_in_a_chunk_extension_is_never_forwarded() {
    // hyper 1.12 skips chunk extensions without looking at their bytes (it refuses only a
    // bare LF), so it takes a NUL there. breakwater reads the body whole and sends it on
    // with a Content-Length: the extension ends at breakwater and never reaches the AI.
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    let r = raw(
        proxy.addr,
        b"POST /v1/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=a\0b\r\nhello\r\n6;\0\0\0\r\n world\r\n0\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(r.status(), Some(200), "{}", r.text);
    let got = ai.received();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], b"hello world");
    assert_eq!(
        got[0].headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"11"[..])
    );
    assert!(!got[0].headers.contains_key("transfer-encoding"));
    assert!(got[0].headers.values().all(|v| !v.as_bytes().contains(&0)));
    proxy.stop().await;
}

/// Reads h2 frames (9-byte header + payload) from raw bytes: (type, payload).
fn h2_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        if bytes.len() < 9 + len {
            break;
        }
        out.push((bytes[3], bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    out
}

#[tokio::test]
async fn h2_preface_followed_by_garbage_gets_goaway_and_a_close() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(std::iter::repeat_n(0xde_u8, 200));
    let r = raw(proxy.addr, &bytes, WAIT).await;
    assert!(r.closed, "the connection stayed open after garbage");
    let frames = h2_frames(&r.bytes);
    let goaway = frames.iter().find(|(t, _)| *t == 0x7);
    let (_, payload) = goaway.unwrap_or_else(|| panic!("no GOAWAY in {frames:?}"));
    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
    assert_ne!(code, 0, "GOAWAY NO_ERROR for garbage");
    // And the preface with garbage after a valid SETTINGS frame.
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    bytes.extend(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = raw(proxy.addr, &bytes, WAIT).await;
    assert!(r.closed);
    assert!(h2_frames(&r.bytes).iter().any(|(t, _)| *t == 0x7));
    assert_eq!(ai.requests(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive_on_the_admin_api() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = "s3cr3t-token-0123456789";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "").replace(
        "watch_config = true\n",
        &format!(
            "watch_config = true\nadmin_token_file = \"{}\"\n",
            token_file.display()
        ),
    ))
    .await;
    let call = |auth: Option<String>| {
        let admin = proxy.admin;
        async move {
            let mut req = http::Request::post(format!("http://{admin}/admin/routes/ai/ai"))
                .header("content-type", "application/json");
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = http_client()
                .request(
                    req.body(Full::new(Bytes::from_static(b"{\"enabled\": true}")))
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = resp.status().as_u16();
            resp.into_body().collect().await.unwrap();
            status
        }
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        assert_eq!(
            call(Some(format!("{scheme} {token}"))).await,
            200,
            "scheme {scheme:?} refused"
        );
    }
    assert_eq!(call(Some(format!("bearer   {token}"))).await, 200);
    for refused in [
        None,
        Some(format!("bearer {token}x")),
        Some("bearer wrong-token-0123456789".into()),
        Some(format!("Basic {token}")),
        Some(format!("bearer{token}")),
        Some(format!("Bearers {token}")),
        Some("bearer".into()),
    ] {
        assert_eq!(call(refused.clone()).await, 401, "{refused:?} let in");
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------- h2 floods (Python h2)

/// Python 3 with the `h2` package: required in CI (CI=true), else the test skips.
fn python_h2() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import h2, hpack, hyperframe"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("python3 with the h2 package is missing and CI=true (pip install h2)");
        }
        eprintln!("skipping: python3 -c 'import h2' failed (pip install h2)");
    }
    ok
}

fn h2attack_script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("loadtests/h2attack.py")
}

/// Runs one attack of loadtests/h2attack.py; its JSON report.
async fn h2attack(args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new("python3")
        .arg(h2attack_script())
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("h2attack.py ran for a minute")
        .unwrap();
    assert!(
        out.status.success(),
        "h2attack.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Normal requests from one client (a kept-alive connection), one after another until
/// `stop`: (ok, total,
/// worst latency).
async fn normal_traffic(
    url: String,
    stop: tokio_util::sync::CancellationToken,
) -> (u64, u64, Duration) {
    let client = http_client();
    let (mut ok, mut total, mut worst) = (0, 0, Duration::ZERO);
    while !stop.is_cancelled() {
        let started = Instant::now();
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(
                http::Request::get(&url)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ),
        )
        .await;
        let good = match resp {
            Ok(Ok(r)) => {
                let status = r.status();
                r.into_body().collect().await.is_ok() && status == 200
            }
            _ => false,
        };
        worst = worst.max(started.elapsed());
        total += 1;
        ok += u64::from(good);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (ok, total, worst)
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

impl Reaped {
    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }
}

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn h2_rapid_reset_continuation_and_made_you_reset_floods_get_goaway_and_spare_other_clients()
{
    if !python_h2() {
        return;
    }
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pp = ProcessProxy::new(dir.path(), &simple_config(&ai.url(), "", ""));
    let child = Reaped(Some(pp.spawn().await));
    let pid = child.pid();
    let rss_before = rss_kib(pid);
    let stop = tokio_util::sync::CancellationToken::new();
    let normal = tokio::spawn(normal_traffic(pp.url("/v1/normal"), stop.clone()));
    let port = pp.port.to_string();
    let mut reports = Vec::new();
    for _ in 0..5 {
        let rr = h2attack(&["rapid-reset", "127.0.0.1", &port, "--streams", "20000"]).await;
        let cf = h2attack(&["continuation", "127.0.0.1", &port, "--frames", "20000"]).await;
        let my = h2attack(&["made-you-reset", "127.0.0.1", &port, "--streams", "20000"]).await;
        for r in [&rr, &cf, &my] {
            assert_eq!(
                r["closed"], true,
                "the attacker's connection stayed open: {r}"
            );
            // ENHANCE_YOUR_CALM (0xb); a GOAWAY lost to the reset that follows it still
            // leaves the connection closed, asserted above.
            if r["goaway"] == true {
                assert_eq!(r["goaway_error_code"], 11, "{r}");
            }
        }
        assert!(
            rr["streams_sent"].as_u64().unwrap() < 20_000,
            "rapid reset ran to its end without being stopped: {rr}"
        );
        assert!(
            cf["frames_sent"].as_u64().unwrap() < 20_000,
            "the CONTINUATION flood ran to its end: {cf}"
        );
        // breakwater resets at most 256 malformed streams per connection (hyper's default
        // would be 1024), then GOAWAY.
        assert!(
            my["streams_sent"].as_u64().unwrap() < 1024,
            "the server kept resetting streams past its limit: {my}"
        );
        reports.push(rr);
        reports.push(cf);
        reports.push(my);
    }
    stop.cancel();
    let (ok, total, worst) = normal.await.unwrap();
    let rss_after = rss_kib(pid);
    let rapid_at_ai = ai
        .received()
        .iter()
        .filter(|r| r.path == "/rapid-reset")
        .count();
    eprintln!(
        "h2 floods: {} attacks; normal requests {ok}/{total} ok, worst {worst:?}; \
         rapid-reset streams at the AI: {rapid_at_ai}; RSS {rss_before} -> {rss_after} KiB",
        reports.len()
    );
    for r in &reports {
        eprintln!("  {r}");
    }
    assert_eq!(ok, total, "normal clients lost requests during the floods");
    assert!(total > 0);
    // Streams reset before breakwater took them up never become AI calls; at most the
    // first few of each connection (before the reset limit) may have been taken up.
    assert!(
        rapid_at_ai <= 5 * 20,
        "{rapid_at_ai} reset streams reached the AI"
    );
    // Memory stays bounded: the header blocks are never buffered past the limits.
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    terminate(child_take(child));
}

fn child_take(mut r: Reaped) -> std::process::Child {
    r.0.take().unwrap()
}

/// h2load (nghttp2-client) floods h2c with many streams at once. Behind a bulkhead
/// (`max_concurrency`) with a static fallback, as an SRE would set a route up, the flood
/// beyond what the AI takes is shed to the fallback at once instead of queueing: every
/// request gets a 200, and normal clients keep being answered.
#[tokio::test]
async fn h2load_flood_is_answered_and_normal_clients_keep_working() {
    let has = std::process::Command::new("h2load")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("h2load is missing and CI=true (apt-get install nghttp2-client)");
        }
        eprintln!("skipping: h2load not installed (apt-get install nghttp2-client)");
        return;
    }
    let env = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let requests = env("BREAKWATER_H2LOAD_REQUESTS", 2_000);
    let clients = env("BREAKWATER_H2LOAD_CLIENTS", 10);
    let streams = env("BREAKWATER_H2LOAD_STREAMS", 10);
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = simple_config(
        &ai.url(),
        "[[routes.fallback]]\nkind = \"static\"\nbody = '{\"items\": []}'\n",
        "",
    )
    .replace("[upstreams.ai]\n", "[upstreams.ai]\nmax_concurrency = 64\n");
    let pp = ProcessProxy::new(dir.path(), &config);
    let child = Reaped(Some(pp.spawn().await));
    let pid = child.pid();
    let (rss_before, fds_before) = (rss_kib(pid), open_fds(pid));
    let stop = tokio_util::sync::CancellationToken::new();
    let normal = tokio::spawn(normal_traffic(pp.url("/v1/normal"), stop.clone()));
    let out = tokio::process::Command::new("h2load")
        .args(["-n", &requests.to_string(), "-t", "1"])
        .args(["-c", &clients.to_string(), "-m", &streams.to_string()])
        .args(["-T", "30", "-N", "30"])
        .arg(pp.url("/v1/flood"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), out)
        .await
        .expect("h2load ran for 5 minutes")
        .unwrap();
    stop.cancel();
    let (ok, total, worst) = normal.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("finished in")
                || l.starts_with("requests:")
                || l.starts_with("status codes:")
        })
        .collect();
    eprintln!(
        "h2load flood of {requests} ({clients} connections x {streams} streams): {summary:?}; normal requests {ok}/{total} ok, worst {worst:?}; \
         RSS {rss_before} -> {} KiB, fds {fds_before} -> {}",
        rss_kib(pid),
        open_fds(pid)
    );
    assert!(out.status.success(), "h2load failed: {text}");
    let done = format!(
        "requests: {requests} total, {requests} started, {requests} done, {requests} succeeded"
    );
    assert!(
        text.contains(&done),
        "h2load did not get every answer: {text}"
    );
    assert_eq!(ok, total, "normal clients lost requests during the flood");
    terminate(child_take(child));
}

// ---------------------------------------------------- many hostile connections held open

/// The hostile mixes one connection can hold open (each within the configured limits of
/// the test: header_read, body_read and idle timeouts of 60 s).
async fn hostile_connection(port: u16, kind: usize) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let bytes: Vec<u8> = match kind % 6 {
        // A head that never ends (slowloris).
        0 => b"GET /v1/held HTTP/1.1\r\nHost: t\r\nX-A: ".to_vec(),
        // A body that never comes.
        1 => b"POST /v1/held HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n0123456789"
            .to_vec(),
        // A chunked body stopped mid-chunk.
        2 => b"POST /v1/held HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nabc"
            .to_vec(),
        // The h2 preface and SETTINGS, then nothing.
        3 => b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec(),
        // An h2 header block left open by a CONTINUATION without END_HEADERS.
        4 => {
            let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
            // HEADERS, stream 1, END_STREAM only: :method GET, :scheme http, :path /,
            // :authority t.
            let block = [0x82, 0x86, 0x84, 0x41, 0x01, b't'];
            b.extend([0, 0, block.len() as u8, 0x1, 0x1, 0, 0, 0, 1]);
            b.extend(block);
            // CONTINUATION, stream 1, no END_HEADERS: x-a: b.
            let more = [0x40, 3, b'x', b'-', b'a', 1, b'b'];
            b.extend([0, 0, more.len() as u8, 0x9, 0x0, 0, 0, 0, 1]);
            b.extend(more);
            b
        }
        // Connected, silent.
        _ => Vec::new(),
    };
    c.write_all(&bytes).await.unwrap();
    c
}

/// Waits (up to 30 s) until breakwater's open descriptors satisfy `ok`.
async fn wait_fds(pid: u32, ok: impl Fn(usize) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(open_fds(pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn held_hostile_connections_leave_normal_requests_and_resources_intact() {
    let n: usize = std::env::var("BREAKWATER_HOSTILE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = simple_config(&ai.url(), "", "").replace(
        "watch_config = true\n",
        "watch_config = true\nheader_read_timeout_ms = 60000\nbody_read_timeout_ms = 60000\nidle_timeout_ms = 60000\n",
    );
    let pp = ProcessProxy::new(dir.path(), &config);
    let child = Reaped(Some(pp.spawn().await));
    let pid = child.pid();
    // Warm up (pool to the AI, allocator arenas), then take the baseline.
    let client = http_client();
    for _ in 0..20 {
        let r = client
            .request(
                http::Request::get(pp.url("/v1/warm"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        r.into_body().collect().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_cold, fds_base) = (rss_kib(pid), open_fds(pid));
    // A first round of the same connections, held and let go: the allocator keeps some of
    // what they took for the next ones, so the baseline a leak would grow from is the RSS
    // after it.
    let mut warm = Vec::with_capacity(n);
    for i in 0..n {
        warm.push(hostile_connection(pp.port, i).await);
    }
    wait_fds(pid, |fds| fds >= fds_base + n).await;
    drop(warm);
    wait_fds(pid, |fds| fds <= fds_base + 8).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_base = rss_kib(pid);
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        held.push(hostile_connection(pp.port, i).await);
    }
    // Every one of them is open at breakwater.
    wait_fds(pid, |fds| fds >= fds_base + n).await;
    let (rss_held, fds_held) = (rss_kib(pid), open_fds(pid));
    assert!(
        fds_held >= fds_base + n,
        "breakwater holds {fds_held} fds, not the {n} hostile connections over {fds_base}"
    );
    // Meanwhile, malformed requests keep coming on fresh connections.
    let stop_churn = tokio_util::sync::CancellationToken::new();
    let churn = {
        let stop = stop_churn.clone();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], pp.port).into();
        tokio::spawn(async move {
            let mut refused = 0u64;
            while !stop.is_cancelled() {
                for (what, bytes) in MALFORMED {
                    let r = raw(addr, bytes, WAIT).await;
                    assert_refused(what, &r);
                    refused += 1;
                }
            }
            refused
        })
    };
    // Normal requests while they are held: 4 clients, 50 requests each.
    let mut workers = Vec::new();
    for _ in 0..4 {
        let url = pp.url("/v1/normal");
        workers.push(tokio::spawn(async move {
            let client = http_client();
            let mut lat = Vec::new();
            let mut ok = 0u32;
            for _ in 0..50 {
                let started = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.request(
                        http::Request::get(&url)
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    ),
                )
                .await;
                if let Ok(Ok(r)) = r {
                    let status = r.status();
                    if r.into_body().collect().await.is_ok() && status == 200 {
                        ok += 1;
                    }
                }
                lat.push(started.elapsed());
            }
            (ok, lat)
        }));
    }
    let (mut ok, mut lat) = (0, Vec::new());
    for w in workers {
        let (o, l) = w.await.unwrap();
        ok += o;
        lat.extend(l);
    }
    stop_churn.cancel();
    let refused = churn.await.unwrap();
    lat.sort();
    let worst = *lat.last().unwrap();
    let p50 = lat[lat.len() / 2];
    // The hostile connections are still there after the normal traffic.
    let still_held = open_fds(pid);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    let back = loop {
        let (rss, fds) = (rss_kib(pid), open_fds(pid));
        if (fds <= fds_base + 8 && rss <= rss_base + 8 * 1024) || Instant::now() > deadline {
            break (rss, fds);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "held {n} hostile connections ({refused} malformed requests refused meanwhile): normal requests {ok}/{} ok, p50 {p50:?}, worst {worst:?}; \
         RSS {rss_cold} (cold) -> {rss_base} (after a first round) -> {rss_held} (held) -> {} KiB after; fds {fds_base} -> {fds_held} \
         (held; {still_held} after the normal traffic) -> {} after",
        lat.len(),
        back.0,
        back.1
    );
    assert_eq!(
        ok as usize,
        lat.len(),
        "normal requests failed while hostile connections were held"
    );
    assert!(
        still_held >= fds_base + n,
        "hostile connections were dropped during the test ({still_held} fds): the test held nothing"
    );
    assert!(
        back.1 <= fds_base + 8,
        "fds did not come back: {fds_base} -> {}",
        back.1
    );
    assert!(
        back.0 <= rss_base + 8 * 1024,
        "RSS did not come back near its baseline: {rss_base} -> {} KiB (a leak?)",
        back.0
    );
    terminate(child_take(child));
}
