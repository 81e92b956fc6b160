//! The SRE's view: after a scenario that exercises every feature, `/metrics` passes
//! `promtool check metrics`, every metric the Grafana dashboard and the alert rules query
//! exists, and the alert rules pass `promtool check rules` and their unit tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

const DASHBOARD: &str = "loadtests/grafana/breakwater-dashboard.json";
const RULES: &str = "config/prometheus/breakwater-rules.yml";
const RULE_TESTS: &str = "config/prometheus/breakwater-rules.test.yml";

/// promtool is required in CI (Debian's `prometheus` package); locally a test skips.
fn promtool() -> bool {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("promtool is missing and CI=true (apt-get install prometheus)");
        }
        eprintln!("skipping: promtool not installed (apt-get install prometheus)");
    }
    found
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool_run(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `breakwater_*` names an expression refers to.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("breakwater_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(expr[start..end].to_string());
        i = end;
    }
    names
}

fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(repo(DASHBOARD)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    walk(&json, &mut out);
    out
}

fn rule_exprs() -> Vec<String> {
    std::fs::read_to_string(repo(RULES))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_string())
        .collect()
}

/// Series names on `/metrics`, with a histogram's `_bucket`, `_sum` and `_count`.
fn exposed(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn config(base: &MockAi, canary: &MockAi, tiny: &MockAi, dir: &Path, route: &str) -> String {
    let schema = dir.join("tiny-schema.json");
    std::fs::write(&schema, r#"{"type": "object"}"#).unwrap();
    let key = dir.join("audit.key");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    format!(
        "{server}instance = \"obs-{route}\"\n\
         [upstreams.ai]\nurl = \"{base}\"\nmax_concurrency = 64\nadaptive_concurrency = true\n\
         [upstreams.ai-v2]\nurl = \"{canary}\"\n\
         [upstreams.tiny]\nurl = \"{tiny}\"\nmax_concurrency = 1\n\n\
         [[routes]]\nname = \"{route}\"\npath_prefix = \"/v1/grading\"\nupstream = \"ai\"\ntimeout_ms = 2000\n\
         model_version_header = \"x-model-version\"\nreplayable = true\n\
         [routes.retry]\nmax_attempts = 2\nbudget_min_per_s = 100\n\
         [routes.breaker]\nconsecutive_failures = 5\nopen_ms = 3000\nopen_max_ms = 3000\nhalf_open_probes = 1\n\
         [[routes.fallback]]\nkind = \"static\"\nbody = '{{\"source\":\"static\"}}'\n\
         [[routes.variants]]\nname = \"v2\"\nupstream = \"ai-v2\"\nweight = 50\nsticky_header = \"x-student-id\"\n\
         [routes.canary]\nmin_requests = 3\nwindow_ms = 60000\n\n\
         [[routes]]\nname = \"tiny\"\npath_prefix = \"/v1/tiny\"\nupstream = \"tiny\"\ntimeout_ms = 2000\n\
         model_version_header = \"x-model-version\"\napproved_versions = [\"tiny-approved\"]\non_unapproved = \"flag\"\n\
         response_schema = \"{schema}\"\nrto_s = 3600\n\
         [[routes.fallback]]\nkind = \"static\"\nbody = '{{\"source\":\"static\"}}'\n\n\
         [dlq]\namqp_url = \"{amqp}\"\nspool_dir = \"{spool}\"\nresults_exchange = \"test.results.{route}\"\n\
         replay_rate_per_s = 200\n\n\
         [audit]\npath = \"{audit}\"\nhmac_key_file = \"{key}\"\n\
         publish_url = \"{amqp}\"\npublish_exchange = \"test.audit.{route}\"\n",
        server = server_section(),
        base = base.url(),
        canary = canary.url(),
        tiny = tiny.url(),
        amqp = rabbit::URL,
        spool = dir.join("spool").display(),
        audit = dir.join("audit/decisions.jsonl").display(),
        key = key.display(),
        schema = schema.display(),
    )
}

async fn graded(proxy: &TestProxy, student: usize) -> Reply {
    let req = http::Request::post(proxy.url("/v1/grading"))
        .header("x-student-id", format!("student-{student}"))
        .header("idempotency-key", uuid::Uuid::new_v4().to_string())
        .body(Full::new(Bytes::from_static(b"{\"essay\":1}")))
        .unwrap();
    proxy.send(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_scenario_metrics_pass_promtool_and_cover_the_dashboard_and_the_alerts() {
    if !promtool() || !rabbit::available().await {
        return;
    }
    let (base, canary, tiny) = (
        MockAi::start().await,
        MockAi::start().await,
        MockAi::start().await,
    );
    base.set_model_version("grader-7");
    canary.set_model_version("grader-8");
    let route = rabbit::unique_route("obs");
    let dir = tempfile::tempdir().unwrap();
    let text = config(&base, &canary, &tiny, dir.path(), &route);
    let proxy = TestProxy::start(&text).await;

    // A canary that fails is rolled back; its failed attempts are retried on the baseline.
    canary.set_error_rate(1.0, 500);
    for student in 0..80 {
        assert_eq!(graded(&proxy, student).await.status, 200);
    }
    // The bulkhead of one sheds a second request while the first hangs.
    tiny.hang(true);
    let hung = {
        let url = proxy.url("/v1/tiny");
        tokio::spawn(async move {
            let req = http::Request::get(url)
                .body(Full::new(Bytes::new()))
                .unwrap();
            http_client()
                .request(req)
                .await
                .map(|r| r.status().as_u16())
        })
    };
    assert!(
        poll_until(Duration::from_secs(10), || async { tiny.requests() >= 1 }).await,
        "the hung request reached the AI"
    );
    let shed = proxy.get("/v1/tiny").await;
    assert_eq!(shed.header("x-breakwater-reason"), Some("overloaded"));
    tiny.hang(false);
    let _ = hung.await;
    // The tiny AI reports a version nobody approved: flagged, counted, passed.
    assert_eq!(proxy.get("/v1/tiny").await.outcome(), "ai");

    // The AI goes down: fallbacks, the breaker opens, the DLQ takes the requests.
    base.set_error_rate(1.0, 503);
    for student in 0..20 {
        let r = graded(&proxy, 1000 + student).await;
        assert_eq!(r.outcome(), "fallback");
    }
    // A live reload while degraded.
    proxy.replace_config(&text.replace("timeout_ms = 2000", "timeout_ms = 2500"));
    assert!(
        poll_until(Duration::from_secs(10), || async {
            proxy
                .metrics()
                .await
                .contains("breakwater_config_reloads_total{result=\"ok\"}")
        })
        .await,
        "the reload was counted"
    );
    // Long enough in the open state for degraded seconds to be counted.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    base.set_error_rate(0.0, 200);
    assert!(
        poll_until(Duration::from_secs(60), || async {
            proxy.metrics().await.contains(&format!(
                "breakwater_replays_total{{route=\"{route}\",result=\"replayed\"}}"
            ))
        })
        .await,
        "the DLQ replayed once the AI recovered"
    );
    assert!(
        poll_until(Duration::from_secs(20), || async {
            proxy
                .metrics()
                .await
                .contains("breakwater_audit_published_total")
        })
        .await,
        "decision records were copied to RabbitMQ"
    );

    let metrics = proxy.metrics().await;
    let (ok, lint) = promtool_run(&["check", "metrics"], Some(&metrics));
    assert!(
        ok && lint.trim().is_empty(),
        "promtool check metrics: {lint}"
    );

    let have = exposed(&metrics);
    let mut missing = Vec::new();
    for (source, exprs) in [
        ("dashboard", dashboard_exprs()),
        ("alert rules", rule_exprs()),
    ] {
        assert!(!exprs.is_empty(), "no expressions found in the {source}");
        for expr in &exprs {
            for name in names_in(expr) {
                if !have.contains(&name) {
                    missing.push(format!("{source}: {name} (in `{expr}`)"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not on /metrics after the scenario:\n{}\n\n/metrics:\n{metrics}",
        missing.join("\n")
    );
    let (conn, ch) = rabbit::channel().await;
    rabbit::cleanup(&ch, &route).await;
    drop(conn);
    proxy.stop().await;
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    if !promtool() {
        return;
    }
    let (ok, text) = promtool_run(&["check", "rules", RULES], None);
    assert!(ok, "promtool check rules: {text}");
    let (ok, text) = promtool_run(&["test", "rules", RULE_TESTS], None);
    assert!(ok, "promtool test rules: {text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_dashboard_uses_the_rate_interval_and_an_instance_variable() {
    let exprs = dashboard_exprs();
    let fixed: Vec<_> = exprs
        .iter()
        .filter(|e| e.contains("[1m]") || e.contains("[5m]"))
        .collect();
    assert!(
        fixed.is_empty(),
        "fixed ranges instead of $__rate_interval: {fixed:?}"
    );
    let unscoped: Vec<_> = exprs
        .iter()
        .filter(|e| e.contains("breakwater_") && !e.starts_with("label_values"))
        .filter(|e| !e.contains("instance=~\"$instance\""))
        .collect();
    assert!(
        unscoped.is_empty(),
        "queries not scoped to $instance: {unscoped:?}"
    );
}
