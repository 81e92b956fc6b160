//! Compliance controls through real sockets: approved model versions, response
//! validation, RTO tracking and criticality-ordered load shedding.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

const STATIC_FB: &str =
    "[[routes.fallback]]\nkind = \"static\"\nstatus = 200\nbody = '{\"source\":\"static\"}'\n";

/// An `[audit]` section writing to `dir/decisions.jsonl`.
fn audit_section(dir: &Path) -> String {
    std::fs::write(
        dir.join("key"),
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    format!(
        "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\n",
        dir.join("decisions.jsonl").display(),
        dir.join("key").display()
    )
}

fn log_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("decisions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A config with one route named `route` on `/` to `upstream_url`.
fn route_config(route: &str, upstream_url: &str, route_extra: &str, extra: &str) -> String {
    format!(
        "{}\n[upstreams.ai]\nurl = \"{upstream_url}\"\n\n[[routes]]\nname = \"{route}\"\npath_prefix = \"/\"\nupstream = \"ai\"\ntimeout_ms = 2000\nmodel_version_header = \"x-model-version\"\n{route_extra}\n{extra}",
        server_section()
    )
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn an_unapproved_version_is_answered_by_the_fallback_with_one_event_per_new_version() {
    let ai = MockAi::start().await;
    ai.set_model_version("rec-v7");
    let dir = tempfile::tempdir().unwrap();
    let route_extra = format!("approved_versions = [\"rec-v7\"]\n{STATIC_FB}");
    let proxy = TestProxy::start(&route_config(
        "appr-fallback",
        &ai.url(),
        &route_extra,
        &audit_section(dir.path()),
    ))
    .await;
    let r = proxy.get("/v1/x").await;
    assert_eq!(r.outcome(), "ai");
    assert_eq!(r.header("x-breakwater-model-version"), Some("rec-v7"));

    // A patch swaps the model without a conformity assessment.
    ai.set_model_version("rec-v9");
    for _ in 0..5 {
        let r = proxy.get("/v1/x").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.outcome(), "fallback");
        assert_eq!(r.header("x-breakwater-reason"), Some("unapproved_version"));
        assert_eq!(
            r.json()["source"],
            "static",
            "the AI's answer leaked through"
        );
    }
    ai.set_model_version("rec-v10");
    proxy.get("/v1/x").await;
    ai.set_model_version("rec-v7");
    assert_eq!(proxy.get("/v1/x").await.outcome(), "ai");

    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "breakwater_unapproved_version_total{route=\"appr-fallback\",model_version=\"rec-v9\"} "
        ),
        5.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "breakwater_unapproved_version_total{route=\"appr-fallback\",model_version=\"rec-v10\"} "
        ),
        1.0
    );
    proxy.stop().await;
    let lines = log_lines(dir.path());
    let events: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "unapproved_version")
        .collect();
    assert_eq!(events.len(), 2, "one event per new version: {events:#?}");
    assert_eq!(events[0]["detail"]["model_version"], "rec-v9");
    assert_eq!(events[0]["detail"]["on_unapproved"], "fallback");
    assert_eq!(events[1]["detail"]["model_version"], "rec-v10");
    let replaced: Vec<_> = lines
        .iter()
        .filter(|l| l["reason"] == "unapproved_version")
        .collect();
    assert_eq!(replaced.len(), 6);
    assert!(replaced.iter().all(|l| l["outcome"] == "fallback"));
    assert_eq!(replaced[0]["model_version"], "rec-v9");
}

#[tokio::test]
async fn under_flag_an_unapproved_answer_passes_marked_in_the_decision_record() {
    let ai = MockAi::start().await;
    ai.set_model_version("rec-v9");
    let dir = tempfile::tempdir().unwrap();
    let route_extra =
        format!("approved_versions = [\"rec-v7\"]\non_unapproved = \"flag\"\n{STATIC_FB}");
    let proxy = TestProxy::start(&route_config(
        "appr-flag",
        &ai.url(),
        &route_extra,
        &audit_section(dir.path()),
    ))
    .await;
    for _ in 0..3 {
        let r = proxy.get("/v1/x").await;
        assert_eq!(r.outcome(), "ai");
        assert_eq!(r.json()["model"]["version"], "rec-v9");
    }
    ai.set_model_version("rec-v7");
    assert_eq!(proxy.get("/v1/x").await.outcome(), "ai");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "breakwater_unapproved_version_total{route=\"appr-flag\",model_version=\"rec-v9\"} "
        ),
        3.0,
        "{m}"
    );
    proxy.stop().await;
    let lines = log_lines(dir.path());
    let decisions: Vec<_> = lines
        .iter()
        .filter(|l| l["route"] == "appr-flag" && l.get("event").is_none())
        .collect();
    assert_eq!(decisions.len(), 4);
    for d in &decisions[..3] {
        assert_eq!(d["unapproved"], true, "{d}");
        assert_eq!(d["outcome"], "ai");
    }
    assert!(
        decisions[3].get("unapproved").is_none(),
        "an approved answer keeps its bytes: {}",
        decisions[3]
    );
    let events: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "unapproved_version")
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["detail"]["on_unapproved"], "flag");
}

#[tokio::test]
async fn a_model_swapped_under_an_approved_version_string_is_caught_by_its_digest() {
    let ai = MockAi::start().await;
    ai.set_model_version("rec-v7");
    ai.set_model_digest("sha256:aaaa");
    let route_extra = format!(
        "approved_versions = [{{ version = \"rec-v7\", digest = \"sha256:aaaa\" }}, \"rec-v8\"]\n{STATIC_FB}"
    );
    let proxy = TestProxy::start(&route_config("appr-digest", &ai.url(), &route_extra, "")).await;
    assert_eq!(proxy.get("/v1/x").await.outcome(), "ai");
    ai.set_model_digest("sha256:bbbb");
    let r = proxy.get("/v1/x").await;
    assert_eq!(r.outcome(), "fallback");
    assert_eq!(r.header("x-breakwater-reason"), Some("unapproved_version"));
    // A pinned version that reports no digest is not approved either.
    ai.set_model_digest("");
    assert_eq!(proxy.get("/v1/x").await.outcome(), "fallback");
    // An unpinned version needs no digest.
    ai.set_model_version("rec-v8");
    assert_eq!(proxy.get("/v1/x").await.outcome(), "ai");
    proxy.stop().await;
}

#[tokio::test]
async fn a_canary_serving_an_unapproved_version_is_rolled_back() {
    let (base, v9) = (MockAi::start().await, MockAi::start().await);
    base.set_model_version("rec-v7");
    v9.set_model_version("rec-v9");
    let config = format!(
        "{}\n[upstreams.rec]\nurl = \"{}\"\n[upstreams.rec-v9]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"appr-canary\"\npath_prefix = \"/\"\nupstream = \"rec\"\ntimeout_ms = 2000\n\
         model_version_header = \"x-model-version\"\napproved_versions = [\"rec-v7\"]\n{STATIC_FB}\
         [[routes.variants]]\nname = \"v9\"\nupstream = \"rec-v9\"\nweight = 50\n\
         [routes.canary]\nauto_rollback = true\nmax_error_rate = 0.1\nmin_requests = 10\nwindow_ms = 5000\n",
        server_section(),
        base.url(),
        v9.url()
    );
    let proxy = TestProxy::start(&config).await;
    for _ in 0..200 {
        let r = proxy.get("/v1/x").await;
        assert_eq!(r.status, 200);
        if r.outcome() == "ai" {
            assert_eq!(r.header("x-breakwater-model-version"), Some("rec-v7"));
        }
    }
    let inv = proxy.admin_get("/admin/inventory").await.unwrap().json();
    assert_eq!(inv["routes"][0]["variants"][0]["weight"], 0.0, "{inv:#}");
    let at_rollback = v9.requests();
    for _ in 0..20 {
        assert_eq!(proxy.get("/v1/x").await.outcome(), "ai");
    }
    assert_eq!(v9.requests(), at_rollback);
    proxy.stop().await;
}

#[test]
fn approval_config_errors_name_their_key() {
    let base = |extra: &str| {
        format!(
            "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n[upstreams.a]\nurl=\"http://127.0.0.1:1\"\n\
             [[routes]]\nname=\"r\"\npath_prefix=\"/\"\nupstream=\"a\"\n{extra}"
        )
    };
    let err = |extra: &str| {
        breakwater::config::Config::from_toml(&base(extra))
            .unwrap_err()
            .to_string()
    };
    assert!(err("approved_versions = [\"v7\"]\n").contains("routes[0].approved_versions"));
    let e = err(
        "model_version_header = \"x-model-version\"\napproved_versions = [\"v7\"]\non_unapproved = \"drop\"\n",
    );
    assert!(e.contains("routes[0].on_unapproved"), "{e}");
    assert!(err("on_unapproved = \"flag\"\n").contains("routes[0].on_unapproved"));
    let e = err("model_version_header = \"x-model-version\"\napproved_versions = []\n");
    assert!(e.contains("at least one"), "{e}");
    breakwater::config::Config::from_toml(&base(
        "model_version_header = \"x-model-version\"\napproved_versions = [\"v7\", { version = \"v8\", digest = \"sha256:1\" }]\non_unapproved = \"flag\"\n",
    ))
    .unwrap();
}

const ANSWER_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["model", "items"],
  "additionalProperties": false,
  "properties": {
    "model": {"type": "object", "required": ["version"], "additionalProperties": false,
              "properties": {"version": {"type": "string"}}},
    "items": {"type": "array", "items": {"type": "object", "required": ["course"],
              "additionalProperties": false, "properties": {"course": {"type": "string"}}}}
  }
}"#;

/// A route whose AI echoes the request body (`POST /echo`), so each test writes the answer.
async fn schema_proxy(
    route: &str,
    ai: &MockAi,
    route_extra: &str,
) -> (TestProxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("answer.json");
    std::fs::write(&schema, ANSWER_SCHEMA).unwrap();
    let extra = format!(
        "response_schema = \"{}\"\n{route_extra}{STATIC_FB}",
        schema.display()
    );
    let proxy = TestProxy::start(&route_config(route, &ai.url(), &extra, "")).await;
    (proxy, dir)
}

async fn echo(proxy: &TestProxy, answer: &str) -> Reply {
    let req = http::Request::post(proxy.url("/echo"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            answer.to_string(),
        )))
        .unwrap();
    proxy.send(req).await
}

#[tokio::test]
async fn schema_invalid_answers_are_replaced_by_the_fallback_and_counted() {
    let ai = MockAi::start().await;
    let (proxy, _dir) = schema_proxy("schema-basic", &ai, "").await;
    let valid = r#"{"model":{"version":"v1"},"items":[{"course":"INTRO-101"}]}"#;
    let r = echo(&proxy, valid).await;
    assert_eq!(r.outcome(), "ai");
    assert_eq!(
        &r.body[..],
        valid.as_bytes(),
        "a valid answer passes byte for byte"
    );

    let missing = r#"{"model":{"version":"v1"}}"#;
    let extra = r#"{"model":{"version":"v1"},"items":[{"course":"INTRO-101","email":"student@example.org"}]}"#;
    let extra_top = r#"{"model":{"version":"v1"},"items":[],"debug":{"prompt":"secret"}}"#;
    for bad in [missing, extra, extra_top, "not json"] {
        let r = echo(&proxy, bad).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.outcome(), "fallback", "{bad}");
        assert_eq!(r.header("x-breakwater-reason"), Some("invalid_response"));
        assert_eq!(r.json()["source"], "static");
        assert!(!String::from_utf8_lossy(&r.body).contains("student@"));
    }
    assert_eq!(echo(&proxy, valid).await.outcome(), "ai");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "breakwater_schema_violations_total{route=\"schema-basic\"} "
        ),
        4.0,
        "{m}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn schema_invalid_answers_count_against_the_breaker() {
    let ai = MockAi::start().await;
    let (proxy, _dir) = schema_proxy(
        "schema-breaker",
        &ai,
        "[routes.breaker]\nconsecutive_failures = 3\nopen_ms = 60000\n",
    )
    .await;
    let bad = r#"{"items":[]}"#;
    for _ in 0..3 {
        assert_eq!(
            echo(&proxy, bad).await.header("x-breakwater-reason"),
            Some("invalid_response")
        );
    }
    let before = ai.requests();
    let r = echo(&proxy, r#"{"model":{"version":"v1"},"items":[]}"#).await;
    assert_eq!(r.header("x-breakwater-reason"), Some("breaker_open"));
    assert_eq!(
        ai.requests(),
        before,
        "the open breaker still called the AI"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn without_a_fallback_an_invalid_answer_is_a_502_that_does_not_echo_the_answer() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("answer.json");
    std::fs::write(&schema, ANSWER_SCHEMA).unwrap();
    let extra = format!("response_schema = \"{}\"\n", schema.display());
    let proxy = TestProxy::start(&route_config("schema-nofb", &ai.url(), &extra, "")).await;
    let r = echo(
        &proxy,
        r#"{"model":{"version":"v1"},"items":[{"course":"X","ssn":"123-45-6789"}]}"#,
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "invalid_response");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("123-45"),
        "{:?}",
        r.body
    );
    proxy.stop().await;
}

#[test]
fn schema_config_errors_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |file: &Path| {
        format!(
            "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n[upstreams.a]\nurl=\"http://127.0.0.1:1\"\n\
             [[routes]]\nname=\"r\"\npath_prefix=\"/\"\nupstream=\"a\"\nresponse_schema=\"{}\"\n",
            file.display()
        )
    };
    let err = |file: &Path| {
        breakwater::config::Config::from_toml(&cfg(file))
            .unwrap_err()
            .to_string()
    };
    let e = err(&dir.path().join("missing.json"));
    assert!(
        e.contains("routes[0].response_schema") && e.contains("cannot read"),
        "{e}"
    );
    let not_json = dir.path().join("not.json");
    std::fs::write(&not_json, "{").unwrap();
    assert!(err(&not_json).contains("not JSON"));
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"type": 12}"#).unwrap();
    let e = err(&bad);
    assert!(
        e.contains("routes[0].response_schema") && e.contains("not a valid JSON Schema"),
        "{e}"
    );
    // Remote references are never fetched.
    let remote = dir.path().join("remote.json");
    std::fs::write(&remote, r#"{"$ref": "https://example.com/s.json"}"#).unwrap();
    assert!(err(&remote).contains("routes[0].response_schema"));
    let good = dir.path().join("good.json");
    std::fs::write(&good, ANSWER_SCHEMA).unwrap();
    breakwater::config::Config::from_toml(&cfg(&good)).unwrap();
}

#[tokio::test]
async fn the_example_schema_refuses_a_leaked_field() {
    let ai = MockAi::start().await;
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/schemas/recommendations.json");
    let extra = format!("response_schema = \"{}\"\n{STATIC_FB}", schema.display());
    let proxy = TestProxy::start(&route_config("schema-example", &ai.url(), &extra, "")).await;
    let good = r#"{"model":{"version":"rec-v7"},"items":[{"course":"INTRO-101","score":0.9,"reason":"similar"}]}"#;
    assert_eq!(echo(&proxy, good).await.outcome(), "ai");
    let leak = r#"{"model":{"version":"rec-v7"},"items":[{"course":"INTRO-101","student_email":"a@b.c"}]}"#;
    assert_eq!(
        echo(&proxy, leak).await.header("x-breakwater-reason"),
        Some("invalid_response")
    );
    proxy.stop().await;
}

async fn set_ai(proxy: &TestProxy, route: &str, on: bool) {
    let r = proxy
        .admin_post(
            &format!("/admin/routes/{route}/ai"),
            &format!("{{\"enabled\":{on}}}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
}

fn count_events(dir: &Path, event: &str) -> usize {
    std::fs::read_to_string(dir.join("decisions.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("\"event\":\"{event}\"")))
        .count()
}

#[tokio::test]
async fn an_rto_crossing_writes_exactly_one_event_per_episode() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let route_extra = format!("criticality = \"high\"\nrto_s = 1\n{STATIC_FB}");
    let proxy = TestProxy::start(&route_config(
        "rto-episodes",
        &ai.url(),
        &route_extra,
        &audit_section(dir.path()),
    ))
    .await;
    let inv = proxy.admin_get("/admin/inventory").await.unwrap().json();
    assert_eq!(inv["routes"][0]["criticality"], "high");
    assert_eq!(inv["routes"][0]["rto_s"], 1);
    assert!(inv["routes"][0]["degraded_for_s"].is_null());

    // Episode 1: the AI is switched off for well over the RTO.
    set_ai(&proxy, "rto-episodes", false).await;
    assert!(
        poll_until(Duration::from_secs(5), || async {
            count_events(dir.path(), "rto_exceeded") == 1
        })
        .await,
        "no rto_exceeded event"
    );
    let inv = proxy.admin_get("/admin/inventory").await.unwrap().json();
    assert!(inv["routes"][0]["degraded_for_s"].as_u64().unwrap() >= 1);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "breakwater_rto_seconds{route=\"rto-episodes\"} "),
        1.0
    );
    assert!(
        metric(
            &m,
            "breakwater_degraded_episode_seconds{route=\"rto-episodes\"} "
        ) >= 1.0
    );
    // Still the same episode: no second event.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(count_events(dir.path(), "rto_exceeded"), 1);

    // Recovery ends the episode; the next outage is a new one.
    set_ai(&proxy, "rto-episodes", true).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let inv = proxy.admin_get("/admin/inventory").await.unwrap().json();
    assert!(inv["routes"][0]["degraded_for_s"].is_null(), "{inv:#}");
    assert_eq!(count_events(dir.path(), "rto_exceeded"), 1);
    set_ai(&proxy, "rto-episodes", false).await;
    assert!(
        poll_until(Duration::from_secs(5), || async {
            count_events(dir.path(), "rto_exceeded") == 2
        })
        .await,
        "the second episode wrote no event"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.stop().await;
    let lines = log_lines(dir.path());
    let events: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "rto_exceeded")
        .collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["detail"]["route"], "rto-episodes");
    assert_eq!(events[0]["detail"]["criticality"], "high");
    assert_eq!(events[0]["detail"]["ai_enabled"], false);
    assert!(events[0]["detail"]["degraded_s"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn answers_refused_as_unapproved_count_as_degraded() {
    let ai = MockAi::start().await;
    ai.set_model_version("rec-v9");
    let route_extra = format!("approved_versions = [\"rec-v7\"]\nrto_s = 1\n{STATIC_FB}");
    let proxy =
        TestProxy::start(&route_config("rto-unapproved", &ai.url(), &route_extra, "")).await;
    assert_eq!(proxy.get("/v1/x").await.outcome(), "fallback");
    assert!(
        poll_until(Duration::from_secs(5), || async {
            let inv = proxy.admin_get("/admin/inventory").await.unwrap().json();
            inv["routes"][0]["degraded_for_s"]
                .as_u64()
                .is_some_and(|s| s >= 1)
        })
        .await
    );
    ai.set_model_version("rec-v7");
    assert_eq!(proxy.get("/v1/x").await.outcome(), "ai");
    assert!(
        poll_until(Duration::from_secs(3), || async {
            let inv = proxy.admin_get("/admin/inventory").await.unwrap().json();
            inv["routes"][0]["degraded_for_s"].is_null()
        })
        .await
    );
    proxy.stop().await;
}

#[tokio::test]
async fn under_overload_low_criticality_routes_are_shed_before_high_ones() {
    let ai = MockAi::start().await;
    ai.set_delay(Duration::from_millis(600));
    let config = format!(
        "{}\n[upstreams.ai]\nurl = \"{}\"\nmax_concurrency = 4\n\n\
         [[routes]]\nname = \"shed-low\"\npath_prefix = \"/low\"\nupstream = \"ai\"\ntimeout_ms = 3000\ncriticality = \"low\"\n{STATIC_FB}\n\
         [[routes]]\nname = \"shed-high\"\npath_prefix = \"/high\"\nupstream = \"ai\"\ntimeout_ms = 3000\ncriticality = \"high\"\n{STATIC_FB}",
        server_section(),
        ai.url()
    );
    let proxy = std::sync::Arc::new(TestProxy::start(&config).await);
    let send = |path: &'static str| {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let r = proxy.get(path).await;
            (
                r.outcome().to_string(),
                r.header("x-breakwater-reason").map(str::to_string),
            )
        })
    };
    // A burst on the low route first: it may fill only half of the bulkhead...
    let low: Vec<_> = (0..6).map(|_| send("/low")).collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // ...so the high route still finds room while the low calls are in flight.
    let high: Vec<_> = (0..2).map(|_| send("/high")).collect();
    let outcome = |results: Vec<(String, Option<String>)>| {
        let ai = results.iter().filter(|r| r.0 == "ai").count();
        let shed = results
            .iter()
            .filter(|r| r.1.as_deref() == Some("overloaded"))
            .count();
        (ai, shed)
    };
    let mut low_results = Vec::new();
    for h in low {
        low_results.push(h.await.unwrap());
    }
    let mut high_results = Vec::new();
    for h in high {
        high_results.push(h.await.unwrap());
    }
    assert_eq!(
        outcome(low_results),
        (2, 4),
        "low may use 50% of max_concurrency = 4"
    );
    assert_eq!(
        outcome(high_results),
        (2, 0),
        "high was shed while low held only its share"
    );
    let inv = proxy.admin_get("/admin/inventory").await.unwrap().json();
    assert_eq!(inv["routes"][0]["criticality"], "low");
    std::sync::Arc::try_unwrap(proxy).ok().unwrap().stop().await;
}

#[tokio::test]
async fn a_low_route_alone_on_its_upstream_may_use_the_whole_limit() {
    let ai = MockAi::start().await;
    ai.set_delay(Duration::from_millis(400));
    let config = format!(
        "{}\n[upstreams.ai]\nurl = \"{}\"\nmax_concurrency = 2\n\n\
         [[routes]]\nname = \"shed-alone\"\npath_prefix = \"/\"\nupstream = \"ai\"\ntimeout_ms = 3000\ncriticality = \"low\"\n{STATIC_FB}",
        server_section(),
        ai.url()
    );
    let proxy = std::sync::Arc::new(TestProxy::start(&config).await);
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.get("/x").await.outcome().to_string() })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), "ai", "headroom was kept for no one");
    }
    std::sync::Arc::try_unwrap(proxy).ok().unwrap().stop().await;
}

fn spool_text(dir: &Path) -> String {
    let out = std::process::Command::new(breakwater_bin())
        .args(["spool", "inspect"])
        .arg(dir.join("spool"))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn a_dlq_replay_answered_by_an_unapproved_version_is_not_delivered() {
    let ai = MockAi::start().await;
    ai.set_model_version("grader-9");
    let dir = tempfile::tempdir().unwrap();
    let route_extra = format!("replayable = true\napproved_versions = [\"grader-7\"]\n{STATIC_FB}");
    let dlq = format!(
        "[dlq]\nspool_dir = \"{}\"\nreplay_rate_per_s = 200\nmax_replay_attempts = 3\n",
        dir.path().join("spool").display()
    );
    let proxy = TestProxy::start(&route_config("appr-replay", &ai.url(), &route_extra, &dlq)).await;
    let r = proxy.post("/v1/grade", "{\"essay\":1}").await;
    assert_eq!(r.header("x-breakwater-reason"), Some("unapproved_version"));
    assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));
    // Every replay meets the same unapproved model: the message is parked, not delivered.
    assert!(
        poll_until(Duration::from_secs(10), || async {
            spool_text(dir.path()).contains("1 parked")
        })
        .await,
        "{}",
        spool_text(dir.path())
    );
    let text = spool_text(dir.path());
    assert!(text.contains("not approved"), "{text}");
    // Once an approved model answers, the requeued message is delivered.
    ai.set_model_version("grader-7");
    let r = proxy
        .admin_post("/admin/dlq/parked/requeue?route=appr-replay", "", None)
        .await;
    assert_eq!(r.status, 200);
    assert!(
        poll_until(Duration::from_secs(10), || async {
            let t = spool_text(dir.path());
            t.contains("0 parked") && t.contains("0 pending")
        })
        .await,
        "{}",
        spool_text(dir.path())
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_digest_reported_in_the_body_is_read_by_its_pointer() {
    let ai = MockAi::start().await; // reports x-model-version: v1
    let route_extra = format!(
        "approved_versions = [{{ version = \"v1\", digest = \"sha256:aa\" }}]\nmodel_digest_pointer = \"/model/digest\"\n{STATIC_FB}"
    );
    let proxy = TestProxy::start(&route_config(
        "appr-digest-ptr",
        &ai.url(),
        &route_extra,
        "",
    ))
    .await;
    let r = echo(&proxy, r#"{"model":{"digest":"sha256:aa"}}"#).await;
    assert_eq!(r.outcome(), "ai");
    assert_eq!(&r.body[..], br#"{"model":{"digest":"sha256:aa"}}"#);
    let r = echo(&proxy, r#"{"model":{"digest":"sha256:bb"}}"#).await;
    assert_eq!(r.header("x-breakwater-reason"), Some("unapproved_version"));
    proxy.stop().await;
}

#[tokio::test]
async fn under_flag_a_replayed_unapproved_answer_is_delivered_and_marked() {
    let ai = MockAi::start().await;
    ai.set_model_version("grader-9");
    ai.fail_next(1, 503);
    let dir = tempfile::tempdir().unwrap();
    let route_extra = format!(
        "replayable = true\napproved_versions = [\"grader-7\"]\non_unapproved = \"flag\"\n{STATIC_FB}"
    );
    let extra = format!(
        "[dlq]\nspool_dir = \"{}\"\nreplay_rate_per_s = 200\nmax_replay_attempts = 3\n{}",
        dir.path().join("spool").display(),
        audit_section(dir.path())
    );
    let proxy = TestProxy::start(&route_config(
        "appr-replay-flag",
        &ai.url(),
        &route_extra,
        &extra,
    ))
    .await;
    let r = proxy.post("/v1/grade", "{\"essay\":1}").await;
    assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));
    assert!(
        poll_until(Duration::from_secs(10), || async {
            spool_text(dir.path()).contains("0 pending")
        })
        .await,
        "{}",
        spool_text(dir.path())
    );
    proxy.stop().await;
    let replayed: Vec<_> = log_lines(dir.path())
        .into_iter()
        .filter(|l| l["outcome"] == "replayed")
        .collect();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0]["unapproved"], true, "{}", replayed[0]);
    assert_eq!(replayed[0]["model_version"], "grader-9");
}
