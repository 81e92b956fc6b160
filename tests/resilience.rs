//! Resilience layers through real sockets: a mock AI service that fails, hangs, slows down
//! and recovers on command, breakwater in front of it, a real HTTP client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::*;

const STATIC_FB: &str =
    "[[routes.fallback]]\nkind = \"static\"\nstatus = 200\nbody = '{\"source\":\"static\"}'\n";

fn breaker(extra: &str) -> String {
    format!("[routes.breaker]\n{extra}\n")
}

#[tokio::test]
async fn breaker_opens_after_consecutive_failures_and_then_spares_the_ai() {
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 503);
    let route = breaker("consecutive_failures = 3\nopen_ms = 60000") + STATIC_FB;
    // A route name of its own: metrics are process-wide and other tests run in parallel.
    let cfg = simple_config(&ai.url(), &route, "").replace("name = \"ai\"", "name = \"rec-open\"");
    let proxy = TestProxy::start(&cfg).await;
    for _ in 0..3 {
        let r = proxy.get("/v1/recommendations").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.outcome(), "fallback");
        assert_eq!(r.header("x-breakwater-reason"), Some("upstream_5xx"));
    }
    assert_eq!(ai.requests(), 3);
    for _ in 0..20 {
        let r = proxy.get("/v1/recommendations").await;
        assert_eq!(r.outcome(), "fallback");
        assert_eq!(r.header("x-breakwater-fallback"), Some("static"));
        assert_eq!(r.header("x-breakwater-reason"), Some("breaker_open"));
        assert_eq!(r.json()["source"], "static");
    }
    assert_eq!(
        ai.requests(),
        3,
        "the AI was called while the breaker was open"
    );
    let b = proxy.admin_get("/admin/breakers").await.unwrap().json();
    assert_eq!(b["routes"]["rec-open"]["breaker"]["state"], "open");
    let m = proxy.metrics().await;
    assert!(
        m.contains("breakwater_breaker_state{route=\"rec-open\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("breakwater_breaker_transitions_total{route=\"rec-open\",to=\"open\"} 1"),
        "{m}"
    );
    assert!(
        m.contains(
            "breakwater_fallbacks_total{route=\"rec-open\",kind=\"static\",reason=\"breaker_open\"} 20"
        ),
        "{m}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn half_open_probes_close_the_breaker_after_recovery() {
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 500);
    let route =
        breaker("consecutive_failures = 2\nopen_ms = 300\nopen_max_ms = 300\nhalf_open_probes = 2")
            + STATIC_FB;
    let cfg = simple_config(&ai.url(), &route, "").replace("name = \"ai\"", "name = \"rec-probe\"");
    let proxy = TestProxy::start(&cfg).await;
    for _ in 0..2 {
        proxy.get("/x").await;
    }
    assert_eq!(
        proxy.get("/x").await.header("x-breakwater-reason"),
        Some("breaker_open")
    );
    ai.recover();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = ai.requests();
    // Two probes succeed -> closed; everything after reaches the AI.
    for _ in 0..5 {
        let r = proxy.get("/x").await;
        assert_eq!(r.outcome(), "ai", "{:?}", r.headers);
    }
    assert_eq!(ai.requests() - before, 5);
    let b = proxy.admin_get("/admin/breakers").await.unwrap().json();
    assert_eq!(b["routes"]["rec-probe"]["breaker"]["state"], "closed");
    // Every change is counted, the clock-driven open -> half-open included.
    let m = proxy.metrics().await;
    for to in ["open", "half_open", "closed"] {
        let line =
            format!("breakwater_breaker_transitions_total{{route=\"rec-probe\",to=\"{to}\"}} 1");
        assert!(m.contains(&line), "missing {line} in\n{m}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn slow_calls_trip_the_breaker() {
    let ai = MockAi::start().await;
    ai.set_delay(Duration::from_millis(120));
    let route = breaker(
        "consecutive_failures = 0\nslow_call_ms = 50\nslow_call_rate = 0.5\nminimum_requests = 4\nwindow_ms = 10000\nopen_ms = 60000",
    ) + STATIC_FB;
    let proxy = TestProxy::start(&simple_config(&ai.url(), &route, "")).await;
    for _ in 0..4 {
        // Slow but successful: the client still gets the AI answer.
        assert_eq!(proxy.get("/x").await.outcome(), "ai");
    }
    let r = proxy.get("/x").await;
    assert_eq!(r.outcome(), "fallback");
    assert_eq!(r.header("x-breakwater-reason"), Some("breaker_open"));
    assert_eq!(ai.requests(), 4);
    proxy.stop().await;
}

#[tokio::test]
async fn client_errors_pass_through_and_never_trip_the_breaker() {
    let ai = MockAi::start().await;
    let route =
        breaker("consecutive_failures = 2\nminimum_requests = 2\nfailure_rate = 0.1") + STATIC_FB;
    let proxy = TestProxy::start(&simple_config(&ai.url(), &route, "")).await;
    for _ in 0..20 {
        let r = proxy.get("/status/422").await;
        assert_eq!(r.status, 422);
        assert_eq!(r.outcome(), "ai");
    }
    assert_eq!(ai.requests(), 20);
    let b = proxy.admin_get("/admin/breakers").await.unwrap().json();
    assert_eq!(b["routes"]["ai"]["breaker"]["state"], "closed");
    proxy.stop().await;
}

#[tokio::test]
async fn retries_stop_at_the_budget() {
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 503);
    let route = "[routes.retry]\nmax_attempts = 3\nbackoff_base_ms = 1\nbackoff_max_ms = 2\nbudget_ratio = 0.1\nbudget_min_per_s = 0\n";
    let proxy = TestProxy::start(&simple_config(&ai.url(), route, "")).await;
    for _ in 0..100 {
        let r = proxy.get("/x").await;
        assert_eq!(r.status, 502);
        assert_eq!(r.json()["error"]["code"], "upstream_5xx");
    }
    let calls = ai.requests();
    // Unbudgeted this would be 300 calls; the budget allows ~10% extra.
    assert!(
        (101..=115).contains(&calls),
        "the AI saw {calls} calls for 100 requests"
    );
    assert!(proxy
        .metrics()
        .await
        .contains("breakwater_retries_total{route=\"ai\"}"));
    proxy.stop().await;
}

#[tokio::test]
async fn non_idempotent_post_is_retried_only_with_an_idempotency_key() {
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 503);
    let route = "[routes.retry]\nmax_attempts = 3\nbackoff_base_ms = 1\nbackoff_max_ms = 2\nbudget_ratio = 1.0\n";
    let proxy = TestProxy::start(&simple_config(&ai.url(), route, "")).await;
    proxy.post("/v1/grading", "{}").await;
    assert_eq!(
        ai.requests(),
        1,
        "a sent POST without Idempotency-Key was retried"
    );

    let req = http::Request::post(proxy.url("/v1/grading"))
        .header("idempotency-key", "submission-77")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    proxy.send(req).await;
    assert_eq!(ai.requests(), 4);
    assert_eq!(ai.count_by_header("idempotency-key")["submission-77"], 3);
    // GET is idempotent: retried.
    proxy.get("/x").await;
    assert_eq!(ai.requests(), 7);
    proxy.stop().await;
}

#[tokio::test]
async fn fallback_chain_is_tried_in_order() {
    let ai = MockAi::start().await;
    let rules = MockAi::start().await;
    let route = "[[routes.fallback]]\nkind = \"cache\"\nttl_s = 60\n[[routes.fallback]]\nkind = \"upstream\"\nupstream = \"rules\"\ntimeout_ms = 500\n"
        .to_string()
        + STATIC_FB;
    let extra = format!("[upstreams.rules]\nurl = \"{}\"\n", rules.url());
    // The upstreams table must come before [[routes]]: put it in the header part.
    let cfg =
        simple_config(&ai.url(), &route, "").replace("[[routes]]", &format!("{extra}\n[[routes]]"));
    let proxy = TestProxy::start(&cfg).await;

    // 1. AI down, nothing cached, rules engine up: the rules engine answers.
    ai.set_error_rate(1.0, 500);
    let r = proxy.get("/v1/pricing?sku=1").await;
    assert_eq!(r.header("x-breakwater-fallback"), Some("upstream"));
    assert_eq!(r.header("x-breakwater-reason"), Some("upstream_5xx"));
    assert_eq!(rules.requests(), 1);

    // 2. Rules engine down too: the static answer.
    rules.outage(true).await;
    let r = proxy.get("/v1/pricing?sku=1").await;
    assert_eq!(r.header("x-breakwater-fallback"), Some("static"));
    assert_eq!(r.json()["source"], "static");

    // 3. A good AI answer for sku=2 is cached and served when the AI fails again.
    ai.recover();
    ai.set_model_version("price-v3");
    let good = proxy.get("/v1/pricing?sku=2").await;
    assert_eq!(good.outcome(), "ai");
    ai.set_error_rate(1.0, 500);
    let r = proxy.get("/v1/pricing?sku=2").await;
    assert_eq!(r.header("x-breakwater-fallback"), Some("cache"));
    assert_eq!(r.body, good.body);
    // A different request is not served someone else's answer.
    let r = proxy.get("/v1/pricing?sku=3").await;
    assert_eq!(r.header("x-breakwater-fallback"), Some("static"));
    proxy.stop().await;
}

#[tokio::test]
async fn with_no_fallback_left_the_client_gets_a_json_error() {
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let proxy = TestProxy::start(&simple_config(&ai.url(), "", "")).await;
    let r = proxy.get("/x").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.outcome(), "error");
    assert_eq!(r.json()["error"]["code"], "connect_error");
    assert_eq!(r.header("x-breakwater-reason"), Some("connect_error"));
    proxy.stop().await;
}

#[tokio::test]
async fn kill_switch_in_config_and_through_the_admin_api() {
    let ai = MockAi::start().await;
    let route = format!("ai_enabled = false\n{STATIC_FB}");
    let proxy = TestProxy::start(&simple_config(&ai.url(), &route, "")).await;
    let r = proxy.get("/x").await;
    assert_eq!(r.outcome(), "fallback");
    assert_eq!(r.header("x-breakwater-reason"), Some("ai_disabled"));
    assert_eq!(ai.requests(), 0);

    let r = proxy
        .admin_post("/admin/routes/ai/ai", r#"{"enabled": true}"#, None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(proxy.get("/x").await.outcome(), "ai");
    assert_eq!(ai.requests(), 1);

    assert_eq!(
        proxy
            .admin_post("/admin/routes/ai/ai", r#"{"enabled": false}"#, None)
            .await
            .status,
        200
    );
    assert_eq!(
        proxy.get("/x").await.header("x-breakwater-reason"),
        Some("ai_disabled")
    );
    assert_eq!(ai.requests(), 1);
    assert_eq!(
        proxy
            .admin_post("/admin/routes/nope/ai", r#"{"enabled": false}"#, None)
            .await
            .status,
        404
    );
    assert_eq!(
        proxy
            .admin_post("/admin/routes/ai/ai", r#"{"on": 1}"#, None)
            .await
            .status,
        400
    );
    proxy.stop().await;
}

#[tokio::test]
async fn forced_breaker_states_through_the_admin_api() {
    let ai = MockAi::start().await;
    let route = breaker("consecutive_failures = 2\nopen_ms = 60000") + STATIC_FB;
    let proxy = TestProxy::start(&simple_config(&ai.url(), &route, "")).await;

    assert_eq!(
        proxy
            .admin_post(
                "/admin/routes/ai/breaker",
                r#"{"state":"forced_open"}"#,
                None
            )
            .await
            .status,
        200
    );
    let r = proxy.get("/x").await;
    assert_eq!(r.header("x-breakwater-reason"), Some("breaker_open"));
    assert_eq!(ai.requests(), 0);

    // forced_closed: a failing AI keeps being called and never trips the breaker.
    ai.set_error_rate(1.0, 503);
    assert_eq!(
        proxy
            .admin_post(
                "/admin/routes/ai/breaker",
                r#"{"state":"forced_closed"}"#,
                None
            )
            .await
            .status,
        200
    );
    for _ in 0..5 {
        assert_eq!(
            proxy.get("/x").await.header("x-breakwater-reason"),
            Some("upstream_5xx")
        );
    }
    assert_eq!(ai.requests(), 5);

    // auto: the next failures trip it.
    assert_eq!(
        proxy
            .admin_post("/admin/routes/ai/breaker", r#"{"state":"auto"}"#, None)
            .await
            .status,
        200
    );
    for _ in 0..2 {
        proxy.get("/x").await;
    }
    assert_eq!(
        proxy.get("/x").await.header("x-breakwater-reason"),
        Some("breaker_open")
    );
    assert_eq!(ai.requests(), 7);
    assert_eq!(
        proxy
            .admin_post("/admin/routes/ai/breaker", r#"{"state":"sideways"}"#, None)
            .await
            .status,
        400
    );
    proxy.stop().await;
}

#[tokio::test]
async fn breaker_state_survives_a_reload_that_keeps_its_settings() {
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 503);
    let route = breaker("consecutive_failures = 2\nopen_ms = 60000") + STATIC_FB;
    let cfg = simple_config(&ai.url(), &route, "");
    let proxy = TestProxy::start(&cfg).await;
    for _ in 0..2 {
        proxy.get("/x").await;
    }
    assert_eq!(
        proxy.get("/x").await.header("x-breakwater-reason"),
        Some("breaker_open")
    );

    // An unrelated change: the breaker stays open.
    std::fs::write(
        &proxy.config_path,
        cfg.replace("timeout_ms = 2000", "timeout_ms = 1900"),
    )
    .unwrap();
    assert_eq!(
        proxy.admin_post("/admin/reload", "", None).await.status,
        200
    );
    assert_eq!(
        proxy.get("/x").await.header("x-breakwater-reason"),
        Some("breaker_open")
    );
    assert_eq!(ai.requests(), 2);

    // Changing the breaker's own settings starts it afresh (closed).
    ai.recover();
    std::fs::write(
        &proxy.config_path,
        cfg.replace("consecutive_failures = 2", "consecutive_failures = 4"),
    )
    .unwrap();
    assert_eq!(
        proxy.admin_post("/admin/reload", "", None).await.status,
        200
    );
    assert_eq!(proxy.get("/x").await.outcome(), "ai");
    proxy.stop().await;
}

#[tokio::test]
async fn bulkhead_sheds_to_the_fallback_when_full() {
    let ai = MockAi::start().await;
    ai.set_delay(Duration::from_millis(300));
    let route = STATIC_FB;
    let cfg = simple_config(&ai.url(), route, "").replace(
        &format!("url = \"{}\"", ai.url()),
        &format!("url = \"{}\"\nmax_concurrency = 2", ai.url()),
    );
    let proxy = std::sync::Arc::new(TestProxy::start(&cfg).await);
    let mut calls = Vec::new();
    for _ in 0..6 {
        let p = proxy.clone();
        calls.push(tokio::spawn(async move { p.get("/x").await }));
    }
    let mut shed = 0;
    let mut ai_answers = 0;
    for c in calls {
        let r = c.await.unwrap();
        match r.outcome() {
            "ai" => ai_answers += 1,
            "fallback" => {
                assert_eq!(r.header("x-breakwater-reason"), Some("overloaded"));
                shed += 1;
            }
            other => panic!("unexpected outcome {other}"),
        }
    }
    assert_eq!(ai_answers, 2);
    assert_eq!(shed, 4);
    assert!(ai.requests() <= 2);
}

/// The value of one Prometheus sample line, or `None` when the series is missing.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn adaptive_limit_shrinks_when_calls_time_out() {
    let ai = MockAi::start().await;
    // An upstream name of its own: the gauge is process-wide.
    let cfg = simple_config(&ai.url(), STATIC_FB, "")
        .replace("[upstreams.ai]", "[upstreams.aimd-timeouts]")
        .replace("upstream = \"ai\"", "upstream = \"aimd-timeouts\"")
        .replace("timeout_ms = 2000", "timeout_ms = 100")
        .replace(
            &format!("url = \"{}\"", ai.url()),
            &format!(
                "url = \"{}\"\nmax_concurrency = 8\nmin_concurrency = 1\nadaptive_concurrency = true",
                ai.url()
            ),
        );
    let proxy = TestProxy::start(&cfg).await;
    let series = "breakwater_concurrency_limit{upstream=\"aimd-timeouts\"}";
    for _ in 0..3 {
        assert_eq!(proxy.get("/x").await.outcome(), "ai");
    }
    assert_eq!(sample(&proxy.metrics().await, series), Some(8.0));
    ai.hang(true);
    for _ in 0..10 {
        let r = proxy.get("/x").await;
        assert_eq!(r.header("x-breakwater-reason"), Some("timeout"));
    }
    let limit = sample(&proxy.metrics().await, series).unwrap();
    // Each timeout cuts the limit by 10%: 8 * 0.9^10 is under 3.
    assert!(
        limit <= 3.0,
        "the adaptive limit is {limit} after 10 timeouts in a row"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_hung_first_attempt_is_cut_and_retried_within_the_deadline() {
    let ai = std::sync::Arc::new(MockAi::start().await);
    ai.hang(true);
    let route = "[routes.retry]\nmax_attempts = 2\nattempt_timeout_ms = 200\nbackoff_base_ms = 1\nbackoff_max_ms = 2\nbudget_ratio = 1.0\n";
    let cfg = simple_config(&ai.url(), route, "").replace("timeout_ms = 2000", "timeout_ms = 1000");
    let proxy = TestProxy::start(&cfg).await;
    // The first call hangs for good; every later one is answered.
    let mock = ai.clone();
    let healer = tokio::spawn(async move {
        while mock.requests() == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        mock.hang(false);
    });
    let started = std::time::Instant::now();
    let r = proxy.get("/x").await;
    let took = started.elapsed();
    healer.await.unwrap();
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.outcome(), "ai");
    assert_eq!(ai.requests(), 2);
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(1000),
        "answered after {took:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn no_retry_starts_without_an_attempt_timeout_left_before_the_deadline() {
    let ai = MockAi::start().await;
    ai.hang(true);
    // 300 ms deadline, 200 ms per attempt: after the first cut only ~100 ms are left, too
    // little for a second attempt, so the AI sees exactly one call.
    let route = "[routes.retry]\nmax_attempts = 3\nattempt_timeout_ms = 200\nbackoff_base_ms = 1\nbackoff_max_ms = 2\nbudget_ratio = 1.0\n";
    let cfg = simple_config(&ai.url(), route, "").replace("timeout_ms = 2000", "timeout_ms = 300");
    let proxy = TestProxy::start(&cfg).await;
    let started = std::time::Instant::now();
    let r = proxy.get("/x").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "timeout");
    assert!(started.elapsed() < Duration::from_millis(300) + Duration::from_millis(150));
    assert_eq!(ai.requests(), 1, "a retry started that could not finish");
    proxy.stop().await;
}

#[test]
fn attempt_timeout_must_fit_in_the_route_deadline() {
    let cfg = |attempt: u64| {
        simple_config(
            "http://127.0.0.1:1",
            &format!("[routes.retry]\nattempt_timeout_ms = {attempt}\n"),
            "",
        )
    };
    let ok = breakwater::config::Config::from_toml(&cfg(500)).unwrap();
    assert_eq!(
        ok.routes[0].retry.as_ref().unwrap().attempt_timeout,
        Some(Duration::from_millis(500))
    );
    for bad in [0, 2001] {
        let errors = breakwater::config::Config::from_toml(&cfg(bad)).unwrap_err();
        assert!(
            errors
                .errors
                .iter()
                .any(|e| e.path == "routes[0].retry.attempt_timeout_ms"),
            "{errors:?}"
        );
    }
}
