//! Shadow tests of a candidate through real sockets: a real hyper client, breakwater, the
//! primary mock AI and a candidate (a second mock, or a small hyper server that disagrees
//! on a known share of inputs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;

/// A config with `route` on `/` to the primary and a shadow to `candidate_url`.
/// Route names differ per test: the tests share one process and so one metrics registry.
fn shadow_config(
    route: &str,
    primary_url: &str,
    candidate_url: &str,
    route_extra: &str,
    shadow: &str,
) -> String {
    format!(
        "{}\n[upstreams.ai]\nurl = \"{primary_url}\"\n[upstreams.cand]\nurl = \"{candidate_url}\"\n\n\
         [[routes]]\nname = \"plain\"\npath_prefix = \"/plain\"\nupstream = \"ai\"\ntimeout_ms = 2000\n\n\
         [[routes]]\nname = \"{route}\"\npath_prefix = \"/\"\nupstream = \"ai\"\ntimeout_ms = 2000\n\
         model_version_header = \"x-model-version\"\n{route_extra}\nshadow = {shadow}\n",
        server_section()
    )
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn shadow_metric(text: &str, route: &str, result: &str) -> f64 {
    metric(
        text,
        &format!("breakwater_shadow_requests_total{{route=\"{route}\",result=\"{result}\"}} "),
    )
}

fn ratio_metric(text: &str, route: &str) -> f64 {
    metric(
        text,
        &format!("breakwater_shadow_agreement_ratio{{route=\"{route}\"}} "),
    )
}

async fn inventory_shadow(proxy: &TestProxy, route: &str) -> serde_json::Value {
    let inv = proxy.admin_get("/admin/inventory").await.unwrap().json();
    inv["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == route)
        .unwrap()["shadow"]
        .clone()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[tokio::test]
async fn a_share_of_requests_reaches_the_candidate_and_the_client_sees_only_the_primary() {
    let primary = MockAi::start().await;
    primary.set_model_version("rec-v7");
    let candidate = MockAi::start().await;
    candidate.set_model_version("rec-v9");
    // The version pointer makes breakwater buffer the answer: the whole-body path.
    let proxy = TestProxy::start(&shadow_config(
        "shadow-share",
        &primary.url(),
        &candidate.url(),
        "model_version_pointer = \"/model/version\"",
        "{ upstream = \"cand\", percent = 10, compare_pointer = \"/items\" }",
    ))
    .await;

    for i in 0..1000 {
        let r = proxy.get(&format!("/v1/recommendations/{i}")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.outcome(), "ai");
        assert_eq!(r.header("x-model-version"), Some("rec-v7"), "request {i}");
        assert_eq!(r.json()["model"]["version"], "rec-v7", "request {i}");
        assert_eq!(r.header("x-breakwater-model-version"), Some("rec-v7"));
    }
    assert!(
        poll_until(Duration::from_secs(10), || async {
            candidate.requests() >= 100
        })
        .await,
        "the candidate got {} mirrors",
        candidate.requests()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(candidate.requests(), 100, "10% of 1,000, exactly");
    assert_eq!(
        primary.requests(),
        1000,
        "the primary got every request once"
    );
    let mirrored = candidate.received();
    assert!(mirrored.iter().all(|r| r
        .headers
        .get("x-breakwater-shadow")
        .is_some_and(|v| v == "1")));
    assert!(primary
        .received()
        .iter()
        .all(|r| r.headers.get("x-breakwater-shadow").is_none()));
    // Spread over the run, not the first hundred.
    let paths: Vec<u32> = mirrored
        .iter()
        .map(|r| r.path.rsplit('/').next().unwrap().parse().unwrap())
        .collect();
    assert!(paths.iter().any(|&i| i >= 900), "{paths:?}");
    assert!(
        paths.iter().filter(|&&i| i < 100).count() <= 11,
        "{paths:?}"
    );

    assert!(
        poll_until(Duration::from_secs(5), || async {
            shadow_metric(&proxy.metrics().await, "shadow-share", "agree") == 100.0
        })
        .await
    );
    let m = proxy.metrics().await;
    assert_eq!(shadow_metric(&m, "shadow-share", "disagree"), 0.0, "{m}");
    assert_eq!(shadow_metric(&m, "shadow-share", "dropped"), 0.0);
    assert_eq!(ratio_metric(&m, "shadow-share"), 1.0);
    let shadow = inventory_shadow(&proxy, "shadow-share").await;
    assert_eq!(shadow["upstream"], "cand");
    assert_eq!(shadow["compared"], 100);
    let v9 = &shadow["versions"][0];
    assert_eq!(v9["model_version"], "rec-v9", "{shadow:#}");
    assert_eq!(v9["requests"], 100);
    assert_eq!(v9["agree"], 100);
    assert!(v9["p99_ms"].as_f64().unwrap() > 0.0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_hanging_candidate_never_slows_the_client_and_excess_mirrors_are_dropped() {
    let primary = MockAi::start().await;
    let candidate = MockAi::start().await;
    candidate.hang(true);
    let proxy = TestProxy::start(&shadow_config(
        "shadow-hang",
        &primary.url(),
        &candidate.url(),
        "",
        "{ upstream = \"cand\", percent = 100, compare_pointer = \"/items\", max_in_flight = 4, timeout_ms = 20000 }",
    ))
    .await;

    // Alternate a route without a shadow and the shadowed one, so both see the same machine.
    let (mut plain, mut shadowed) = (Vec::new(), Vec::new());
    for i in 0..300 {
        let t = Instant::now();
        assert_eq!(proxy.get(&format!("/plain/{i}")).await.outcome(), "ai");
        plain.push(t.elapsed());
        let t = Instant::now();
        let r = proxy.get(&format!("/v1/x/{i}")).await;
        shadowed.push(t.elapsed());
        assert_eq!(r.status, 200);
        assert_eq!(r.outcome(), "ai");
    }
    let (base, with) = (p99(plain), p99(shadowed.clone()));
    let worst = shadowed.iter().max().copied().unwrap();
    // The candidate holds each mirror for 20 s: any wait on it would show as seconds.
    assert!(
        with <= base * 3 + Duration::from_millis(50),
        "client p99 {with:?} with a hanging shadow vs {base:?} without"
    );
    assert!(
        worst < Duration::from_secs(2),
        "slowest client answer {worst:?}"
    );

    let m = proxy.metrics().await;
    assert_eq!(
        shadow_metric(&m, "shadow-hang", "dropped"),
        296.0,
        "all but max_in_flight: {m}"
    );
    let shadow = inventory_shadow(&proxy, "shadow-hang").await;
    assert_eq!(shadow["in_flight"], 4, "{shadow:#}");
    assert_eq!(shadow["dropped"], 296);
    assert!(candidate.requests() <= 4, "{}", candidate.requests());
    proxy.stop().await;
}

/// A candidate that gets every fourth input wrong: `?n=N` answers `{"items":[N]}`, except
/// `[N+1]` when N is a multiple of 4.
async fn disagreeing_candidate() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let n: u64 = req
                        .uri()
                        .query()
                        .unwrap()
                        .strip_prefix("n=")
                        .unwrap()
                        .parse()
                        .unwrap();
                    let item = if n % 4 == 0 { n + 1 } else { n };
                    let body =
                        format!("{{\"items\":[{item}],\"model\":{{\"version\":\"cand-v9\"}}}}");
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("content-type", "application/json")
                            .header("x-model-version", "cand-v9")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), task)
}

#[tokio::test]
async fn the_agreement_ratio_matches_a_candidate_that_disagrees_on_a_quarter_of_inputs() {
    let primary = MockAi::start().await;
    let (candidate, _task) = disagreeing_candidate().await;
    // No pointer, no schema: the answer streams to the client and is copied on the way.
    let proxy = TestProxy::start(&shadow_config(
        "shadow-ratio",
        &primary.url(),
        &candidate,
        "",
        "{ upstream = \"cand\", percent = 100, compare_pointer = \"/items\" }",
    ))
    .await;
    for n in 0..400u64 {
        // The mock echoes the body on /echo: the primary's answer is the right one.
        let r = proxy
            .post(&format!("/echo?n={n}"), format!("{{\"items\":[{n}]}}"))
            .await;
        assert_eq!(r.outcome(), "ai");
        assert_eq!(
            r.json()["items"][0],
            n,
            "the client got the primary's answer"
        );
    }
    assert!(
        poll_until(Duration::from_secs(10), || async {
            let m = proxy.metrics().await;
            shadow_metric(&m, "shadow-ratio", "agree")
                + shadow_metric(&m, "shadow-ratio", "disagree")
                == 400.0
        })
        .await,
        "{}",
        proxy
            .metrics()
            .await
            .lines()
            .filter(|l| l.contains("shadow"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let m = proxy.metrics().await;
    assert_eq!(shadow_metric(&m, "shadow-ratio", "agree"), 300.0);
    assert_eq!(shadow_metric(&m, "shadow-ratio", "disagree"), 100.0);
    assert_eq!(ratio_metric(&m, "shadow-ratio"), 0.75);
    let shadow = inventory_shadow(&proxy, "shadow-ratio").await;
    assert_eq!(shadow["agreement_ratio"], 0.75);
    let v = &shadow["versions"][0];
    assert_eq!(v["model_version"], "cand-v9", "{shadow:#}");
    assert_eq!(
        (v["agree"].as_u64(), v["disagree"].as_u64()),
        (Some(300), Some(100))
    );
    proxy.stop().await;
}
