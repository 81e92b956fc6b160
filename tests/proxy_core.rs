//! Proxy core, black-box through real sockets: a real hyper client -> breakwater -> the
//! mock AI service.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;

#[tokio::test]
async fn proxies_get_and_post_with_bodies_and_returns_request_id() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;

    let r = proxy.get("/v1/recommendations?student=42").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.outcome(), "ai");
    assert!(r.header("x-request-id").is_some_and(|id| !id.is_empty()));
    assert_eq!(r.json()["path"], "/v1/recommendations");

    let body = r#"{"assignment":"essay-7","text":"..."}"#;
    let r = proxy.post("/echo", body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, Bytes::from(body));

    let req = http::Request::post(proxy.url("/v1/grading"))
        .header("x-request-id", "magento-trace-1")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let r = proxy.send(req).await;
    assert_eq!(r.header("x-request-id"), Some("magento-trace-1"));
    let seen = ai.received();
    let last = seen.last().unwrap();
    assert_eq!(last.headers["x-request-id"], "magento-trace-1");
    assert_eq!(last.method, "POST");
    assert_eq!(last.body, Bytes::from_static(b"{}"));
    proxy.stop().await;
}

#[tokio::test]
async fn streams_a_10_mib_response() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    let resp = http_client()
        .request(
            http::Request::get(proxy.url("/bytes/10485760"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-breakwater-outcome"], "ai");
    let mut body = resp.into_body();
    let (mut total, mut frames) = (0usize, 0usize);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len();
            frames += 1;
        }
    }
    assert_eq!(total, 10 * 1024 * 1024);
    // Streamed through in many frames, not buffered into one.
    assert!(frames > 10, "only {frames} frames");
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_body_gets_413_and_never_reaches_the_ai() {
    let ai = MockAi::start().await;
    let cfg = simple_config(&ai.url(), "", "").replace(
        "watch_config = true\n",
        "watch_config = true\nmax_body_bytes = 1024\n",
    );
    let proxy = TestProxy::start(&cfg).await;
    let r = proxy.post("/echo", vec![b'x'; 2048]).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "body_too_large");
    assert_eq!(r.outcome(), "error");

    // Without a content-length (chunked), the limit holds too.
    let chunks =
        futures_util::stream::iter((0..4).map(|_| {
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![b'y'; 512])))
        }));
    let req = http::Request::post(proxy.url("/echo"))
        .body(http_body_util::StreamBody::new(chunks))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::StreamBody<_>>();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);

    assert_eq!(ai.requests(), 0);
    // A body at the limit passes.
    assert_eq!(proxy.post("/echo", vec![b'x'; 1024]).await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn unknown_route_gets_404_json() {
    let ai = MockAi::start().await;
    let cfg =
        simple_config(&ai.url(), "", "").replace("path_prefix = \"/\"", "path_prefix = \"/v1/\"");
    let proxy = TestProxy::start(&cfg).await;
    let r = proxy.get("/admin/secret").await;
    assert_eq!(r.status, 404);
    let j = r.json();
    assert_eq!(j["error"]["code"], "no_route");
    assert_eq!(j["error"]["request_id"], r.header("x-request-id").unwrap());
    assert_eq!(r.outcome(), "error");
    assert_eq!(ai.requests(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn slow_upstream_gets_504_json_at_the_route_deadline() {
    let ai = MockAi::start().await;
    ai.set_delay(Duration::from_secs(3));
    let cfg = simple_config(&ai.url(), "", "").replace("timeout_ms = 2000", "timeout_ms = 200");
    let proxy = TestProxy::start(&cfg).await;
    let started = std::time::Instant::now();
    let r = proxy.get("/v1/recommendations").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "timeout");
    assert_eq!(r.outcome(), "error");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the deadline was not enforced"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn header_hygiene_both_ways() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    let req = http::Request::get(proxy.url("/headers"))
        .header("connection", "x-hop-secret")
        .header("x-hop-secret", "must-not-pass")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-custom", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = proxy.send(req).await;
    assert_eq!(r.status, 200);
    let seen = &ai.received().last().unwrap().headers.clone();
    assert!(!seen.contains_key("x-hop-secret"));
    assert!(!seen.contains_key("te"));
    assert!(!seen.contains_key("proxy-authorization"));
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], proxy.addr.ip().to_string());
    assert!(seen.contains_key("x-request-id"));
    // The upstream sees its own authority as Host, not the proxy's.
    assert_eq!(seen["host"], ai.addr().to_string());
    // Response side: the id comes back and no hop-by-hop header leaks.
    assert_eq!(r.header("x-request-id"), seen["x-request-id"].to_str().ok());
    assert!(r.header("keep-alive").is_none());
    proxy.stop().await;
}

#[tokio::test]
async fn h2c_client_is_served_on_the_same_port() {
    let ai = MockAi::start().await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let resp = h2
        .request(
            http::Request::get(proxy.url("/v1/recommendations"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-breakwater-outcome"], "ai");
    assert_eq!(ai.requests(), 1);
    // An h2c upstream (prior knowledge) works too.
    let cfg = simple_config(&ai.url(), "", "").replace(
        &format!("url = \"{}\"", ai.url()),
        &format!("url = \"{}\"\nhttp2 = true", ai.url()),
    );
    let proxy2 = TestProxy::start(&cfg).await;
    assert_eq!(proxy2.get("/x").await.status, 200);
    assert_eq!(ai.received().last().unwrap().version, http::Version::HTTP_2);
    proxy.stop().await;
    proxy2.stop().await;
}

struct TestPki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    TestPki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

#[tokio::test]
async fn tls_upstream_with_a_test_ca() {
    let pki = test_pki();
    let ai = MockAi::start_tls(pki.cert_pem.clone(), pki.key_pem.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{}", ai.addr().port());
    let cfg = simple_config(&url, "", "").replace(
        &format!("url = \"{url}\""),
        &format!("url = \"{url}\"\nca_file = \"{}\"", ca.display()),
    );
    let proxy = TestProxy::start(&cfg).await;
    let r = proxy.get("/v1/fraud").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(ai.requests(), 1);

    // Without the private CA the certificate is not trusted: 502, never a silent downgrade.
    let proxy2 = TestProxy::start(&simple_config(&url, "", "")).await;
    let r = proxy2.get("/v1/fraud").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "connect_error");
    assert_eq!(ai.requests(), 1);
    proxy.stop().await;
    proxy2.stop().await;
}

#[tokio::test]
async fn tls_on_the_data_plane() {
    let pki = test_pki();
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let cfg = simple_config(&ai.url(), "", "").replace(
        "watch_config = true\n",
        &format!(
            "watch_config = true\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let proxy = TestProxy::start(&cfg).await;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_all_versions()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Full<Bytes>>(https);
    let resp = client
        .request(
            http::Request::get(format!("https://localhost:{}/v1/x", proxy.addr.port()))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // ALPN picked h2.
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(
        ai.received().last().unwrap().headers["x-forwarded-proto"],
        "https"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn reload_by_rename_under_steady_traffic_loses_no_request() {
    let ai = MockAi::start().await;
    let cfg_a = simple_config(&ai.url(), "", "");
    let proxy = Arc::new(TestProxy::start(&cfg_a).await);
    let gen_before = proxy.admin_config().await["generation"].as_u64().unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (proxy, stop, ok, failed) = (proxy.clone(), stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            // Bounded: stops on the flag or after 20k requests.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = proxy.get("/v1/recommendations").await;
                if r.status == 200 && r.outcome() == "ai" {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Each version differs (timeout and an extra route), so each is a real reload.
        let text = simple_config(&ai.url(), "", "")
            .replace("timeout_ms = 2000", &format!("timeout_ms = {}", 2000 + i))
            + &format!("\n[[routes]]\nname = \"extra{i}\"\npath_prefix = \"/extra{i}\"\nupstream = \"ai\"\n");
        proxy.replace_config(&text);
    }
    // Wait for the watcher to pick up the last version.
    let mut generation = gen_before;
    for _ in 0..100 {
        let cfg = proxy.admin_config().await;
        generation = cfg["generation"].as_u64().unwrap();
        if cfg["config"]["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "extra5")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(generation > gen_before, "no reload happened");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert!(ok.load(Ordering::Relaxed) > 50);
    assert_eq!(proxy.get("/extra5/x").await.status, 200);
    Arc::try_unwrap(proxy).ok().unwrap().stop().await;
}

#[tokio::test]
async fn bad_reload_keeps_the_old_config_and_says_why() {
    let ai = MockAi::start().await;
    let good = simple_config(&ai.url(), "", "");
    let proxy = TestProxy::start(&good).await;
    let before = proxy.admin_config().await;

    // Two independent mistakes: both must be reported with their key paths.
    let bad = good
        .replace("upstream = \"ai\"", "upstream = \"nope\"")
        .replace("timeout_ms = 2000", "timeout_ms = 0");
    std::fs::write(&proxy.config_path, &bad).unwrap();
    let r = proxy.admin_post("/admin/reload", "", None).await;
    assert_eq!(r.status, 400);
    let errors = r.json()["error"]["errors"].as_array().unwrap().clone();
    let paths: Vec<&str> = errors.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&"routes[0].upstream"), "{paths:?}");
    assert!(paths.contains(&"routes[0].timeout_ms"), "{paths:?}");

    // Still serving on the old config.
    assert_eq!(proxy.get("/v1/recommendations").await.status, 200);
    let after = proxy.admin_config().await;
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(after["hash"], before["hash"]);
    assert!(proxy
        .metrics()
        .await
        .contains("breakwater_config_reloads_total{result=\"error\"}"));

    // Fixing the file and reloading works.
    std::fs::write(
        &proxy.config_path,
        good.replace("timeout_ms = 2000", "timeout_ms = 1500"),
    )
    .unwrap();
    let r = proxy.admin_post("/admin/reload", "", None).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["generation"].as_u64().unwrap() > before["generation"].as_u64().unwrap());
    proxy.stop().await;
}

#[tokio::test]
async fn admin_token_guards_mutating_calls_and_config_masks_secrets() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-0123456789\n").unwrap();
    let cfg = simple_config(&ai.url(), "", "")
        .replace(
            "watch_config = true\n",
            &format!(
                "watch_config = true\nadmin_token_file = \"{}\"\n",
                token_file.display()
            ),
        )
        .replace(
            &format!("url = \"{}\"", ai.url()),
            &format!(
                "url = \"{}\"\nheaders = {{ authorization = \"Bearer ai-api-key\" }}",
                ai.url()
            ),
        );
    let proxy = TestProxy::start(&cfg).await;
    assert_eq!(
        proxy.admin_post("/admin/reload", "", None).await.status,
        401
    );
    assert_eq!(
        proxy
            .admin_post("/admin/reload", "", Some("wrong-token-000000000"))
            .await
            .status,
        401
    );
    assert_eq!(
        proxy
            .admin_post("/admin/reload", "", Some("s3cret-token-0123456789"))
            .await
            .status,
        200
    );
    // Reads need no token; secrets never show.
    let cfg_json = proxy.admin_get("/admin/config").await.unwrap();
    assert_eq!(cfg_json.status, 200);
    let text = String::from_utf8_lossy(&cfg_json.body);
    assert!(!text.contains("ai-api-key"), "{text}");
    assert!(!text.contains("s3cret-token"), "{text}");
    // The upstream credential is injected on the way out.
    proxy.get("/x").await;
    assert_eq!(
        ai.received().last().unwrap().headers["authorization"],
        "Bearer ai-api-key"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let ai = MockAi::start().await;
    ai.set_model_version("rec-v8");
    // Its own route name: the metrics recorder is shared by every test in this binary.
    let config = simple_config(&ai.url(), "", "").replace("name = \"ai\"", "name = \"metrics\"");
    let proxy = TestProxy::start(&config).await;
    assert_eq!(proxy.admin_get("/healthz").await.unwrap().status, 200);
    assert_eq!(proxy.admin_get("/readyz").await.unwrap().status, 200);
    let r = proxy.get("/v1/recommendations").await;
    assert_eq!(r.header("x-breakwater-model-version"), Some("rec-v8"));
    proxy.get("/v1/recommendations").await;
    let m = proxy.metrics().await;
    assert!(
        m.contains("breakwater_requests_total{route=\"metrics\",outcome=\"ai\",status=\"200\"} 2"),
        "{m}"
    );
    // Every per-request series counts both requests (the handles are cached per route).
    for series in [
        "breakwater_request_duration_seconds_count{route=\"metrics\",outcome=\"ai\"}",
        "breakwater_overhead_seconds_count{route=\"metrics\"}",
        "breakwater_upstream_duration_seconds_count{route=\"metrics\",",
        "breakwater_model_version_duration_seconds_count{route=\"metrics\",model_version=\"rec-v8\"}",
        "breakwater_model_version_requests_total{route=\"metrics\",model_version=\"rec-v8\"}",
    ] {
        let line = m
            .lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("no {series} in {m}"));
        assert!(line.ends_with(" 2"), "{line}");
    }
    assert!(
        m.contains(
            "breakwater_model_version_requests_total{route=\"metrics\",model_version=\"rec-v8\"}"
        ),
        "{m}"
    );
    assert!(
        m.contains("breakwater_request_duration_seconds_bucket"),
        "{m}"
    );
    assert!(m.contains("breakwater_config_generation"), "{m}");
    proxy.stop().await;
}

#[tokio::test]
async fn model_version_from_a_json_pointer() {
    let ai = MockAi::start().await;
    ai.set_model_version("grader-2026.11");
    let cfg = simple_config(&ai.url(), "", "").replace(
        "model_version_header = \"x-model-version\"",
        "model_version_pointer = \"/model/version\"",
    );
    let proxy = TestProxy::start(&cfg).await;
    let r = proxy.post("/v1/grading", "{}").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-breakwater-model-version"),
        Some("grader-2026.11")
    );
    assert!(proxy
        .metrics()
        .await
        .contains("model_version=\"grader-2026.11\""));
    proxy.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let ai = MockAi::start().await;
    ai.set_delay(Duration::from_millis(400));
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    let url = proxy.url("/slow");
    let in_flight = tokio::spawn(async move {
        http_client()
            .get(url.parse().unwrap())
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = proxy.addr;
    let stopping = tokio::spawn(proxy.stop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // No new connections once draining started.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    stopping.await.unwrap();
}

/// A sidecar often gets one CPU. There the binary runs tokio's single-threaded scheduler
/// (cheaper per request); it must still serve concurrent clients, the admin API and a
/// graceful SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_cpu_the_binary_runs_single_threaded_and_serves_concurrent_clients() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bw = ProcessProxy::new(dir.path(), &simple_config(&ai.url(), "", ""));
    let log = dir.path().join("breakwater.log");
    let child = bw.spawn_on_one_cpu(&log).await;

    let mut clients = Vec::new();
    for c in 0..16 {
        let url = bw.url(&format!("/v1/recommendations?client={c}"));
        clients.push(tokio::spawn(async move {
            let client = http_client();
            let mut ok = 0;
            for _ in 0..25 {
                let resp = client.get(url.parse().unwrap()).await.unwrap();
                let ai_answered =
                    resp.status() == 200 && resp.headers()["x-breakwater-outcome"] == "ai";
                resp.into_body().collect().await.unwrap();
                ok += u32::from(ai_answered);
            }
            ok
        }));
    }
    let mut answered = 0;
    for c in clients {
        answered += c.await.unwrap();
    }
    assert_eq!(answered, 16 * 25);
    assert_eq!(ai.requests(), 16 * 25);
    let health = http_client()
        .get(
            format!("http://127.0.0.1:{}/healthz", bw.admin)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let pid = child.id();
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let mut child = child;
    assert!(child.wait().unwrap().success(), "SIGTERM ends it cleanly");
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("tokio runtime"))
        .unwrap_or_else(|| panic!("no runtime line in the log:\n{text}"));
    assert!(
        line.contains("current_thread") && line.contains("cpus=1"),
        "{line}"
    );
}
