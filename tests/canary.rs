//! Canary routing, automatic rollback and the inventory, through real sockets with two
//! mock AI services (baseline model and new model version).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

fn canary_config(base: &MockAi, canary: &MockAi, weight: u32, route_extra: &str) -> String {
    format!(
        "{}\n[upstreams.rec]\nurl = \"{}\"\n[upstreams.rec-v8]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"recommendations\"\npath_prefix = \"/\"\nupstream = \"rec\"\ntimeout_ms = 2000\n\
         model_version_header = \"x-model-version\"\n{route_extra}\n\
         [[routes.variants]]\nname = \"v8\"\nupstream = \"rec-v8\"\nweight = {weight}\nsticky_header = \"x-student-id\"\n",
        server_section(),
        base.url(),
        canary.url()
    )
}

const STATIC_FB: &str =
    "[[routes.fallback]]\nkind = \"static\"\nstatus = 200\nbody = '{\"source\":\"static\"}'\n";

#[tokio::test]
async fn weights_hold_within_a_tolerance() {
    let (base, v8) = (MockAi::start().await, MockAi::start().await);
    let proxy = TestProxy::start(&canary_config(&base, &v8, 20, "")).await;
    for _ in 0..1500 {
        assert_eq!(proxy.get("/v1/recommendations").await.status, 200);
    }
    let share = v8.requests() as f64 / 1500.0;
    assert!(
        (0.16..=0.24).contains(&share),
        "variant got {share:.3} of traffic for weight 20%"
    );
    assert_eq!(base.requests() + v8.requests(), 1500);
    proxy.stop().await;
}

#[tokio::test]
async fn sticky_keys_stay_on_one_variant() {
    let (base, v8) = (MockAi::start().await, MockAi::start().await);
    base.set_model_version("rec-v7");
    v8.set_model_version("rec-v8");
    let proxy = TestProxy::start(&canary_config(&base, &v8, 50, "")).await;
    let mut seen: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for student in 0..40 {
        for _ in 0..5 {
            let req = http::Request::get(proxy.url("/v1/recommendations"))
                .header("x-student-id", format!("student-{student}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = proxy.send(req).await;
            let version = r.header("x-breakwater-model-version").unwrap().to_string();
            seen.entry(format!("student-{student}"))
                .or_default()
                .insert(version);
        }
    }
    assert!(
        seen.values().all(|versions| versions.len() == 1),
        "a student switched versions: {seen:?}"
    );
    let on_v8 = seen.values().filter(|v| v.contains("rec-v8")).count();
    assert!(
        (8..=32).contains(&on_v8),
        "{on_v8} of 40 students on the canary at weight 50"
    );
    proxy.stop().await;
}

async fn inventory(proxy: &TestProxy) -> serde_json::Value {
    proxy.admin_get("/admin/inventory").await.unwrap().json()
}

#[tokio::test]
async fn failing_variant_is_rolled_back_and_clients_see_no_errors() {
    let (base, v8) = (MockAi::start().await, MockAi::start().await);
    v8.set_error_rate(1.0, 503);
    let extra = format!(
        "{STATIC_FB}[routes.canary]\nauto_rollback = true\nmax_error_rate = 0.1\nmax_p99_ms = 1000\nmin_requests = 20\nwindow_ms = 5000\n"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("key"),
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    let audit = format!(
        "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\n",
        dir.path().join("decisions.jsonl").display(),
        dir.path().join("key").display()
    );
    let proxy = TestProxy::start(&(canary_config(&base, &v8, 30, &extra) + &audit)).await;
    for _ in 0..400 {
        let r = proxy.get("/v1/recommendations").await;
        assert_eq!(r.status, 200, "a client saw an error");
        assert!(matches!(r.outcome(), "ai" | "fallback"));
    }
    let inv = inventory(&proxy).await;
    let variant = &inv["routes"][0]["variants"][0];
    assert_eq!(variant["weight"], 0.0, "{inv:#}");
    assert!(
        variant["rollback"]["reason"]
            .as_str()
            .unwrap()
            .contains("error rate"),
        "{inv:#}"
    );
    // Rolled back within one window: the variant saw only about min_requests calls.
    let at_rollback = v8.requests();
    assert!(
        at_rollback < 80,
        "the failing variant got {at_rollback} requests"
    );
    for _ in 0..100 {
        assert_eq!(proxy.get("/v1/recommendations").await.outcome(), "ai");
    }
    assert_eq!(
        v8.requests(),
        at_rollback,
        "traffic still reached the rolled-back variant"
    );
    // The registry is per process: other tests of this file roll back a "v8" too.
    let m = proxy.metrics().await;
    let rollbacks: u64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "breakwater_canary_rollbacks_total{route=\"recommendations\",variant=\"v8\"} ",
            )
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(rollbacks >= 1, "{m}");
    let hash = proxy.admin_get("/admin/config").await.unwrap().json()["hash"]
        .as_str()
        .unwrap()
        .to_string();
    proxy.stop().await;
    // The rollback is in the decision log with the figures that triggered it, and every
    // answer the variant gave is recorded with its variant name.
    let log = std::fs::read_to_string(dir.path().join("decisions.jsonl")).unwrap();
    let event: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["event"] == "canary_rollback")
        .expect("no canary_rollback event");
    assert_eq!(event["detail"]["variant"], "v8");
    // With the config hash in force (issue 15's change trail).
    assert_eq!(event["config_hash_before"], hash.as_str(), "{event}");
    assert_eq!(event["config_hash_after"], hash.as_str(), "{event}");
    assert!(
        event["detail"]["rollback"]["summary"]["requests"]
            .as_u64()
            .unwrap()
            >= 20
    );
    assert!(log.contains("\"variant\":\"v8\""));
}

#[tokio::test]
async fn variant_slower_than_max_p99_is_rolled_back() {
    let (base, v8) = (MockAi::start().await, MockAi::start().await);
    v8.set_delay(Duration::from_millis(150));
    let extra = "[routes.canary]\nmax_error_rate = 0.5\nmax_p99_ms = 80\nmin_requests = 10\nwindow_ms = 10000\n";
    let proxy = TestProxy::start(&canary_config(&base, &v8, 50, extra)).await;
    for _ in 0..120 {
        assert_eq!(proxy.get("/v1/recommendations").await.status, 200);
    }
    let inv = inventory(&proxy).await;
    let variant = &inv["routes"][0]["variants"][0];
    assert_eq!(variant["weight"], 0.0, "{inv:#}");
    assert!(
        variant["rollback"]["reason"]
            .as_str()
            .unwrap()
            .contains("p99"),
        "{inv:#}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn manual_promote_and_rollback_survive_a_reload() {
    let (base, v8) = (MockAi::start().await, MockAi::start().await);
    let cfg = canary_config(&base, &v8, 10, "");
    let proxy = TestProxy::start(&cfg).await;
    let r = proxy
        .admin_post(
            "/admin/routes/recommendations/variants/v8",
            r#"{"weight": 100}"#,
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    for _ in 0..50 {
        proxy.get("/x").await;
    }
    assert_eq!(v8.requests(), 50);
    // An unrelated reload keeps the admin's weight.
    std::fs::write(
        &proxy.config_path,
        cfg.replace("timeout_ms = 2000", "timeout_ms = 1900"),
    )
    .unwrap();
    assert_eq!(
        proxy.admin_post("/admin/reload", "", None).await.status,
        200
    );
    proxy.get("/x").await;
    assert_eq!(v8.requests(), 51);

    assert_eq!(
        proxy
            .admin_post(
                "/admin/routes/recommendations/variants/v8",
                r#"{"weight": 0}"#,
                None
            )
            .await
            .status,
        200
    );
    for _ in 0..50 {
        proxy.get("/x").await;
    }
    assert_eq!(v8.requests(), 51);
    assert_eq!(
        proxy
            .admin_post(
                "/admin/routes/recommendations/variants/nope",
                r#"{"weight": 5}"#,
                None
            )
            .await
            .status,
        404
    );
    assert_eq!(
        proxy
            .admin_post(
                "/admin/routes/recommendations/variants/v8",
                r#"{"weight": 101}"#,
                None
            )
            .await
            .status,
        400
    );

    // A config that changes the weight itself wins over the admin's.
    std::fs::write(
        &proxy.config_path,
        cfg.replace("weight = 10", "weight = 100"),
    )
    .unwrap();
    assert_eq!(
        proxy.admin_post("/admin/reload", "", None).await.status,
        200
    );
    proxy.get("/x").await;
    assert_eq!(v8.requests(), 52);
    proxy.stop().await;
}

#[tokio::test]
async fn inventory_lists_model_versions_including_a_change_mid_run() {
    let (base, v8) = (MockAi::start().await, MockAi::start().await);
    base.set_model_version("rec-v7");
    let proxy = TestProxy::start(&canary_config(&base, &v8, 0, "")).await;
    for _ in 0..10 {
        proxy.get("/x").await;
    }
    base.set_model_version("rec-v7.1-hotfix");
    for _ in 0..15 {
        proxy.get("/x").await;
    }
    let inv = inventory(&proxy).await;
    let versions = inv["routes"][0]["model_versions"].as_array().unwrap();
    let by_name: HashMap<&str, &serde_json::Value> = versions
        .iter()
        .map(|v| (v["model_version"].as_str().unwrap(), v))
        .collect();
    assert_eq!(by_name["rec-v7"]["requests"], 10, "{inv:#}");
    assert_eq!(by_name["rec-v7.1-hotfix"]["requests"], 15, "{inv:#}");
    assert_eq!(by_name["rec-v7"]["upstream"], "rec");
    assert!(
        by_name["rec-v7"]["first_seen"].as_str().unwrap()
            <= by_name["rec-v7.1-hotfix"]["first_seen"].as_str().unwrap()
    );
    assert_eq!(inv["routes"][0]["variants"][0]["name"], "v8");
    let table = proxy
        .admin_get("/admin/inventory?format=table")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&table.body);
    assert!(
        text.contains("rec-v7.1-hotfix") && text.contains("recommendations"),
        "{text}"
    );
    assert!(proxy.metrics().await.contains("breakwater_model_version_duration_seconds_bucket{route=\"recommendations\",model_version=\"rec-v7.1-hotfix\""));
    proxy.stop().await;
}

/// The value of one Prometheus sample line, or `None` when the series is missing.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn hanging_variant_is_rolled_back_within_one_window() {
    let (base, v8) = (MockAi::start().await, MockAi::start().await);
    base.set_model_version("rec-v7");
    v8.set_model_version("rec-v8-hang");
    let extra = format!(
        "{STATIC_FB}[routes.canary]\nauto_rollback = true\nmax_error_rate = 0.2\nmin_requests = 10\nwindow_ms = 10000\n"
    );
    let cfg =
        canary_config(&base, &v8, 50, &extra).replace("timeout_ms = 2000", "timeout_ms = 150");
    let proxy = TestProxy::start(&cfg).await;
    // Healthy first: the variant's model version becomes known to the inventory.
    for _ in 0..20 {
        assert_eq!(proxy.get("/x").await.outcome(), "ai");
    }
    v8.hang(true);
    let hung_from = v8.requests();
    let started = std::time::Instant::now();
    // Eight clients at once; each hung call ends at the route deadline with the fallback.
    for _ in 0..10 {
        let batch = futures_util::future::join_all((0..8).map(|_| proxy.get("/x"))).await;
        assert!(
            batch.iter().all(|r| r.status == 200),
            "a client saw an error"
        );
    }
    let inv = inventory(&proxy).await;
    let variant = &inv["routes"][0]["variants"][0];
    assert_eq!(
        variant["weight"], 0.0,
        "a variant that hangs past timeout_ms was not rolled back: {inv:#}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not within one window"
    );
    let rollback = &variant["rollback"];
    assert!(
        rollback["reason"].as_str().unwrap().contains("error rate"),
        "{inv:#}"
    );
    // The hangs are in the variant's p99, not left out of it.
    assert!(
        rollback["summary"]["p99_ms"].as_f64().unwrap() >= 140.0,
        "{inv:#}"
    );
    let hung_calls = v8.requests() - hung_from;
    assert!(
        hung_calls < 40,
        "the hanging variant got {hung_calls} calls"
    );
    // The inventory's per-version error rate and the per-version metrics count them too.
    let versions = inv["routes"][0]["model_versions"].as_array().unwrap();
    let v8_stats = versions
        .iter()
        .find(|v| v["model_version"] == "rec-v8-hang")
        .unwrap_or_else(|| panic!("{inv:#}"));
    assert_eq!(
        v8_stats["failures"].as_u64().unwrap(),
        hung_calls,
        "{inv:#}"
    );
    assert!(
        v8_stats["window"]["error_rate"].as_f64().unwrap() > 0.2,
        "{inv:#}"
    );
    let m = proxy.metrics().await;
    let errors = sample(
        &m,
        "breakwater_model_version_errors_total{route=\"recommendations\",model_version=\"rec-v8-hang\"}",
    );
    assert_eq!(errors, Some(hung_calls as f64), "{m}");
    // Rolled back: no more traffic reaches the variant.
    for _ in 0..30 {
        assert_eq!(proxy.get("/x").await.outcome(), "ai");
    }
    assert_eq!(v8.requests() - hung_from, hung_calls);
    proxy.stop().await;
}

#[tokio::test]
async fn forced_open_route_breaker_stops_the_canary_share_too() {
    let (base, v8) = (MockAi::start().await, MockAi::start().await);
    let extra = format!("{STATIC_FB}[routes.breaker]\nconsecutive_failures = 5\n");
    let proxy = TestProxy::start(&canary_config(&base, &v8, 50, &extra)).await;
    let forced = proxy
        .admin_post(
            "/admin/routes/recommendations/breaker",
            r#"{"state":"forced_open"}"#,
            None,
        )
        .await;
    assert_eq!(forced.status, 200);
    let mut reasons = Vec::new();
    for _ in 0..40 {
        let r = proxy.get("/x").await;
        assert_eq!(r.status, 200);
        reasons.push(r.header("x-breakwater-reason").map(str::to_string));
    }
    assert_eq!(
        v8.requests(),
        0,
        "the canary variant was called while the route breaker was forced open"
    );
    assert_eq!(base.requests(), 0);
    assert!(
        reasons.iter().all(|r| r.as_deref() == Some("breaker_open")),
        "{reasons:?}"
    );
    // Back to auto: both the baseline and the variant get their shares again.
    let auto = proxy
        .admin_post(
            "/admin/routes/recommendations/breaker",
            r#"{"state":"auto"}"#,
            None,
        )
        .await;
    assert_eq!(auto.status, 200);
    for _ in 0..40 {
        assert_eq!(proxy.get("/x").await.outcome(), "ai");
    }
    assert!(v8.requests() > 0 && base.requests() > 0);
    proxy.stop().await;
}
