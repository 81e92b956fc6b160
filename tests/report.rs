//! `breakwater audit report` on a real patch window: a canary that rolls back by itself,
//! then an outage of the main upstream (breaker open, fallbacks answer, the RTO is
//! crossed) and its recovery, all through real sockets; the report is made by the real
//! binary from the decision log alone and checked against what the client saw.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

const STATIC_FB: &str =
    "[[routes.fallback]]\nkind = \"static\"\nstatus = 200\nbody = '{\"source\":\"static\"}'\n";

/// What the client saw, counted from the response headers.
#[derive(Debug, Default)]
struct Seen {
    requests: u64,
    /// AI answers by `x-breakwater-model-version`.
    ai: BTreeMap<String, u64>,
    fallback: u64,
    /// Fallbacks by (`x-breakwater-fallback`, `x-breakwater-reason`).
    fallbacks: BTreeMap<(String, String), u64>,
    error: u64,
}

impl Seen {
    async fn get(&mut self, proxy: &TestProxy) {
        let r = proxy.get("/v1/recommendations").await;
        self.requests += 1;
        let header = |name: &str| r.header(name).unwrap_or("-").to_string();
        match r.outcome() {
            "ai" => {
                *self
                    .ai
                    .entry(header("x-breakwater-model-version"))
                    .or_default() += 1
            }
            "fallback" => {
                self.fallback += 1;
                *self
                    .fallbacks
                    .entry((
                        header("x-breakwater-fallback"),
                        header("x-breakwater-reason"),
                    ))
                    .or_default() += 1;
            }
            "error" => self.error += 1,
            other => panic!("no x-breakwater-outcome ({other:?}): {r:?}"),
        }
    }
}

fn count_events(log: &Path, event: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("\"event\":\"{event}\"")))
        .count()
}

/// Sends a request every 50 ms until `event` is in the log (or `within` passed).
async fn send_until(
    proxy: &TestProxy,
    seen: &mut Seen,
    log: &Path,
    event: &str,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if count_events(log, event) > 0 {
            return true;
        }
        seen.get(proxy).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn the_report_of_a_rollback_and_an_outage_matches_what_the_client_saw() {
    let (base, v8) = (MockAi::start().await, MockAi::start().await);
    base.set_model_version("rec-v7");
    v8.set_model_version("rec-v8");
    // Half the canary's answers fail: enough for a rollback, and (most likely) some of its
    // AI answers are seen first.
    v8.set_error_rate(0.5, 503);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("decisions.jsonl");
    std::fs::write(
        dir.path().join("key"),
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    let (signing_key, public_key) = keygen(&dir.path().join("keys"));
    // The breaker (the variant has one with the same settings) trips after 10 failures in a
    // row: the canary's analysis (min_requests 5) rolls it back before its breaker could
    // open. Once open it stays open 4 s: longer than the two gauge ticks that cross
    // rto_s = 1, so the outage is one episode.
    let config = format!(
        "{}\n[upstreams.rec]\nurl = \"{}\"\n[upstreams.rec-v8]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"recommendations\"\npath_prefix = \"/\"\nupstream = \"rec\"\ntimeout_ms = 2000\n\
         model_version_header = \"x-model-version\"\ncriticality = \"high\"\nrto_s = 1\n{STATIC_FB}\
         [routes.breaker]\nconsecutive_failures = 10\nopen_ms = 4000\nopen_max_ms = 4000\nhalf_open_probes = 1\n\
         [[routes.variants]]\nname = \"v8\"\nupstream = \"rec-v8\"\nweight = 30\n\
         [routes.canary]\nauto_rollback = true\nmax_error_rate = 0.1\nmin_requests = 5\nwindow_ms = 10000\n\
         [audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\nsigning_key_file = \"{}\"\n",
        server_section(),
        base.url(),
        v8.url(),
        log.display(),
        dir.path().join("key").display(),
        signing_key.display(),
    );
    let proxy = TestProxy::start(&config).await;
    let mut seen = Seen::default();

    // 1. The canary fails half its answers and is rolled back automatically. Requests
    // 20 ms apart: the analysis (at most every 100 ms) runs every few canary answers.
    for _ in 0..120 {
        seen.get(&proxy).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let inv = proxy.admin_get("/admin/inventory").await.unwrap().json();
    assert_eq!(inv["routes"][0]["variants"][0]["weight"], 0.0, "{inv:#}");

    // 2. The main upstream goes down: the breaker opens, fallbacks answer, and the route
    // stays degraded past its RTO.
    base.outage(true).await;
    assert!(
        send_until(
            &proxy,
            &mut seen,
            &log,
            "rto_exceeded",
            Duration::from_secs(8)
        )
        .await,
        "no rto_exceeded"
    );

    // 3. It comes back: the half-open probe closes the breaker and the episode ends.
    base.outage(false).await;
    assert!(
        send_until(
            &proxy,
            &mut seen,
            &log,
            "route_recovered",
            Duration::from_secs(10)
        )
        .await,
        "no route_recovered"
    );
    for _ in 0..20 {
        seen.get(&proxy).await;
    }
    // An operator's change, for the change trail.
    let r = proxy
        .admin_post(
            "/admin/routes/recommendations/variants/v8",
            r#"{"weight": 0}"#,
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    proxy.stop().await;
    assert_eq!(seen.error, 0, "{seen:?}");
    assert!(seen.fallback > 0, "{seen:?}");

    let out_dir = dir.path().join("report");
    let out = Command::new(breakwater_bin())
        .args(["audit", "report"])
        .arg(&log)
        .arg("--public-key")
        .arg(&public_key)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let paths: Vec<&str> = stdout.lines().collect();
    assert_eq!(paths.len(), 3, "{stdout}");
    for (line, name) in paths
        .iter()
        .zip(["report.md", "report.html", "report.json"])
    {
        assert_eq!(Path::new(line), out_dir.join(name));
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap())
            .unwrap();
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();

    // Traffic: exactly what the client saw.
    let routes = report["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 1, "{report:#}");
    let route = &routes[0];
    assert_eq!(route["route"], "recommendations");
    assert_eq!(route["requests"], seen.requests);
    assert_eq!(route["ai"], seen.ai.values().sum::<u64>());
    assert_eq!(route["fallback"], seen.fallback);
    assert_eq!(route["error"], 0);
    assert_eq!(route["cancelled"], 0);
    let fallbacks: BTreeMap<(String, String), u64> = route["fallbacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                (
                    f["kind"].as_str().unwrap().to_string(),
                    f["reason"].as_str().unwrap().to_string(),
                ),
                f["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(fallbacks, seen.fallbacks);
    for reason in ["upstream_5xx", "connect_error", "breaker_open"] {
        assert!(
            seen.fallbacks
                .contains_key(&("static".into(), reason.into())),
            "the scenario saw no {reason} fallback: {seen:?}"
        );
    }
    assert!(route["latency_p99_ms"].as_f64().unwrap() > 0.0);
    let versions = report["versions"].as_array().unwrap();
    for (version, variant) in [("rec-v7", serde_json::Value::Null), ("rec-v8", "v8".into())] {
        let ai: u64 = versions
            .iter()
            .filter(|v| v["model_version"] == version)
            .map(|v| {
                if v["ai"].as_u64().unwrap() > 0 {
                    assert_eq!(v["variant"], variant, "{v}");
                }
                v["ai"].as_u64().unwrap()
            })
            .sum();
        let saw = seen.ai.get(version).copied().unwrap_or(0);
        assert_eq!(ai, saw, "AI answers of {version}");
    }

    // One automatic rollback, with the figures that caused it.
    let rollbacks = report["rollbacks"].as_array().unwrap();
    assert_eq!(rollbacks.len(), 1, "{report:#}");
    assert_eq!(rollbacks[0]["variant"], "v8");
    assert_eq!(rollbacks[0]["route"], "recommendations");
    assert!(rollbacks[0]["summary"]["requests"].as_u64().unwrap() >= 5);
    assert!(rollbacks[0]["summary"]["error_rate"].as_f64().unwrap() > 0.1);

    // One degraded episode, past its RTO, closed.
    let episodes = report["episodes"].as_array().unwrap();
    assert_eq!(episodes.len(), 1, "{report:#}");
    let e = &episodes[0];
    assert_eq!(e["route"], "recommendations");
    assert_eq!(e["rto_s"], 1);
    assert_eq!(e["exceeded"], true);
    assert_eq!(e["open"], false);
    assert_eq!(e["cause"]["breaker_state"], "open");
    assert!(e["degraded_s"].as_f64().unwrap() >= 1.0, "{e}");
    let degraded = &report["degraded"][0];
    assert_eq!(degraded["episodes"], 1);
    assert_eq!(degraded["exceeded"], 1);

    // The operator's change with its actor and hashes.
    let changes = report["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{report:#}");
    assert_eq!(changes[0]["event"], "admin_change");
    assert_eq!(changes[0]["actor"], "anonymous");
    assert!(changes[0]["config_hash_after"].is_string());

    // The chain is intact and its clean shutdown checkpoint is signed.
    let v = &report["verify"];
    assert_eq!(v["chain_ok"], true, "{v:#}");
    assert!(v["problem"].is_null(), "{v:#}");
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert_eq!(v["records"], lines as u64);
    assert!(v["checkpoints"].as_u64().unwrap() >= 1, "{v:#}");
    assert_eq!(v["unanchored"], 0, "{v:#}");
    assert!(
        v["proved_from"].is_string() && v["proved_to"].is_string(),
        "{v:#}"
    );

    // The same figures in the human-readable files.
    for text in [&md, &html] {
        assert!(text.contains("recommendations"));
        assert!(text.contains("v8"));
        assert!(text.contains("Chain intact"));
    }
    assert!(md.contains("## Canary rollbacks"));
    assert!(html.contains("<svg") && !html.contains("<script"));
}

/// A log that is not there and a directory that cannot be made: exit 1, saying which.
#[test]
fn a_missing_log_or_an_unwritable_dir_fails_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let report = |log: &Path, out: &Path| {
        let out = Command::new(breakwater_bin())
            .args(["audit", "report"])
            .arg(log)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let missing = dir.path().join("nowhere.jsonl");
    let (code, err) = report(&missing, &dir.path().join("out"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("nowhere.jsonl not found"), "{err}");
    assert!(!dir.path().join("out").exists());

    let log = dir.path().join("decisions.jsonl");
    std::fs::write(&log, "").unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (code, err) = report(&log, &file.join("out"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot write the report into"), "{err}");
}
