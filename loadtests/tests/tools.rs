//! The load-test tools themselves, through real sockets: the mock's faults (in-process and
//! over its HTTP control API), the open-loop driver, the reports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use loadtests::driver::{self, LoadSpec};
use loadtests::mock::MockAi;

#[tokio::test]
async fn mock_faults_apply_in_process_and_over_http() {
    let ai = MockAi::start().await;
    ai.fail_next(2, 503);
    let mut spec = LoadSpec::get(ai.addr(), "/v1/x");
    spec.rate = Some(200.0);
    spec.duration = Duration::from_millis(100);
    spec.connections = 2;
    let r = driver::run(spec.clone()).await.unwrap();
    assert_eq!(r.counts.status.get(&503), Some(&2));
    assert_eq!(
        r.counts.status.get(&200).copied().unwrap_or(0),
        r.counts.requests - 2
    );

    // The same through the control API, as an SRE would during a run.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let faults = r#"{"error_rate": 1.0, "error_status": 500, "model_version": "m-9"}"#;
    let resp = client
        .request(
            http::Request::post(format!("{}/__mock/faults", ai.url()))
                .body(faults.into())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = driver::run(spec.clone()).await.unwrap();
    assert_eq!(r.counts.status.get(&500).copied(), Some(r.counts.requests));
    assert_eq!(ai.received().last().unwrap().path, "/v1/x");

    ai.recover();
    ai.outage(true).await;
    assert!(
        tokio::net::TcpStream::connect(ai.addr()).await.is_err(),
        "the port stayed open in an outage"
    );
    ai.outage(false).await;
    let r = driver::run(spec).await.unwrap();
    assert_eq!(r.counts.errors, 0);
    assert!(r.counts.status.contains_key(&200));
}

#[tokio::test]
async fn open_loop_driver_keeps_its_schedule() {
    let ai = MockAi::start().await;
    let mut spec = LoadSpec::get(ai.addr(), "/v1/x");
    spec.rate = Some(1000.0);
    spec.duration = Duration::from_secs(1);
    spec.connections = 8;
    let r = driver::run(spec).await.unwrap();
    // 1000 intended sends in 1 s: an open loop sends them all, whatever the latency.
    assert_eq!(r.counts.requests, 1000);
    assert_eq!(ai.requests(), 1000);
    assert_eq!(r.seconds.len(), 1);
}

#[tokio::test]
async fn latency_is_charged_from_the_intended_send_time() {
    let ai = MockAi::start().await;
    ai.set_delay(Duration::from_millis(50));
    let mut spec = LoadSpec::get(ai.addr(), "/v1/x");
    // One connection, 100 req/s, 50 ms per answer: the schedule falls behind and the
    // waiting counts (no coordinated omission), so p99 grows well past 50 ms.
    spec.rate = Some(100.0);
    spec.duration = Duration::from_millis(500);
    spec.connections = 1;
    let r = driver::run(spec).await.unwrap();
    assert!(
        r.ms(0.99) > 150.0,
        "p99 {} ms hides the backlog",
        r.ms(0.99)
    );
}

#[tokio::test]
async fn reports_have_markdown_and_self_contained_charts() {
    let ai = MockAi::start().await;
    let mut spec = LoadSpec::get(ai.addr(), "/v1/x");
    spec.rate = Some(500.0);
    spec.duration = Duration::from_secs(2);
    spec.connections = 4;
    let r = driver::run(spec).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let markers = vec![loadtests::report::Marker {
        at_s: 1.0,
        label: "ai_down".into(),
    }];
    let md =
        loadtests::report::write(dir.path(), "t", "test run", "summary", &r, &markers).unwrap();
    assert!(md.contains("| 1 |") && md.contains("t=1.0s: ai_down"));
    let html = std::fs::read_to_string(dir.path().join("t.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 2);
    assert!(html.contains("ai_down") && html.contains("p99"));
}

#[tokio::test]
async fn load_command_drives_a_running_target_and_refuses_other_hosts() {
    let ai = MockAi::start().await;
    let bin = env!("CARGO_BIN_EXE_loadtests");
    let out = tokio::process::Command::new(bin)
        .args([
            "load",
            "--target",
            &ai.addr().to_string(),
            "--path",
            "/v1/x",
        ])
        .args(["--rate", "200", "--duration", "1", "--connections", "4"])
        .args(["--pid", &std::process::id().to_string()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table
        .lines()
        .find(|l| l.contains("/v1/x @ 200 req/s"))
        .unwrap_or_else(|| panic!("{table}"));
    // | name | req/s | p50 | p90 | p99 | p99.9 | errors | non-2xx | cpu |
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let rate: f64 = cells[2].parse().unwrap();
    assert!((150.0..=250.0).contains(&rate), "{row}");
    assert_eq!(cells[7], "0", "{row}");
    assert_ne!(cells[9], "-", "the CPU column is filled with --pid: {row}");
    assert!(ai.received().len() >= 150);

    let out = tokio::process::Command::new(bin)
        .args(["load", "--target", "192.0.2.1:80", "--duration", "1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback only"));
}

#[tokio::test]
async fn mock_counts_replays_per_second_over_sliding_windows_and_distinct_keys() {
    use loadtests::mock::max_in_window;
    let ms = Duration::from_millis;
    // A window is [t, t + 1 s): 0.9 s and 1.0 s are one second apart, so not together.
    assert_eq!(max_in_window(&[], ms(1000)), 0);
    assert_eq!(
        max_in_window(&[ms(0), ms(100), ms(900), ms(1000), ms(1050)], ms(1000)),
        4
    );
    assert_eq!(max_in_window(&[ms(0), ms(1000), ms(2000)], ms(1000)), 1);

    let ai = MockAi::start().await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let send = |key: String, replay: bool| {
        let mut req =
            http::Request::post(format!("{}/v1/grading", ai.url())).header("idempotency-key", key);
        if replay {
            req = req.header("x-breakwater-replay", "1");
        }
        client.request(req.body(http_body_util::Full::default()).unwrap())
    };
    // A burst of 25 replays (5 keys twice: a redelivery), then 10 more a second later and
    // 20 first attempts (no marker) that are not replays.
    let burst: Vec<_> = (0..25)
        .map(|i| send(format!("k{}", i % 20), true))
        .collect();
    for r in futures_util::future::join_all(burst).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    tokio::time::sleep(ms(1100)).await;
    for i in 20..30 {
        assert_eq!(send(format!("k{i}"), true).await.unwrap().status(), 200);
    }
    for i in 0..20 {
        assert_eq!(
            send(format!("first{i}"), false).await.unwrap().status(),
            200
        );
    }
    assert_eq!(ai.replays(), 35);
    assert_eq!(ai.max_replays_per_s(), 25);
    assert_eq!(ai.distinct_keys(), 50);

    // The same figures over the control API (the mock-ai binary).
    let resp = client
        .request(
            http::Request::get(format!("{}/__mock/stats", ai.url()))
                .body(http_body_util::Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(stats["replays"], 35, "{stats}");
    assert_eq!(stats["max_replays_per_s"], 25, "{stats}");
    assert_eq!(stats["distinct_idempotency_keys"], 50, "{stats}");
}
