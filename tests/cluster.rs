//! The fleet on a real three-node RabbitMQ cluster: the local kit of
//! `loadtests/rabbit-cluster.sh` (nodes bw1..bw3 on 5681-5683, their own data and cookie;
//! the machine's broker on 5672 is never touched). Skips with a message when RabbitMQ is not
//! installed, unless CI=true, where that fails the test.
//!
//! `BREAKWATER_TEST_ONE_NODE=1` gives the sidecars only the node that is killed (no failover):
//! the test must then fail, which shows it can.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use loadtests::cluster::{self, Cluster};
use support::*;

fn cluster_kit_available() -> bool {
    if cluster::available() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("rabbitmq-server is not installed and CI=true: the cluster test cannot run");
    }
    eprintln!("skipping: rabbitmq-server is not installed (the local cluster kit needs it)");
    false
}

/// Kills the child when the test ends, passed or failed.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const RATE: u64 = 100;

fn sidecar_config(
    ai: &MockAi,
    route: &str,
    instance: &str,
    dir: &std::path::Path,
    amqp_url: &str,
) -> String {
    let route_extra = "replayable = true\n[routes.breaker]\nconsecutive_failures = 1\nopen_ms = 600000\nopen_max_ms = 600000\n[[routes.fallback]]\nkind = \"static\"\nstatus = 202\nbody = '{\"status\":\"queued\"}'\n";
    let dlq = format!(
        "[dlq]\nspool_dir = \"{}\"\namqp_url = {amqp_url}\nreplay_rate_per_s = {RATE}\n",
        dir.join("spool").display()
    );
    simple_config(&ai.url(), route_extra, &dlq)
        .replace("name = \"ai\"", &format!("name = \"{route}\""))
        .replacen(
            "[server]\n",
            &format!("[server]\ninstance = \"{instance}\"\n"),
            1,
        )
}

/// POST with our own request id (it travels with the DLQ message and comes back on the
/// replay): the status and the `x-breakwater-dlq` answer.
async fn post(url: String, request_id: String) -> (u16, String) {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .header("x-request-id", request_id.as_str())
        .body(Full::new(Bytes::from(format!(
            "{{\"essay\":\"{request_id}\"}}"
        ))))
        .unwrap();
    match http_client().request(req).await {
        Ok(resp) => (
            resp.status().as_u16(),
            resp.headers()
                .get("x-breakwater-dlq")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_fails_over_to_a_second_node_and_loses_nothing() {
    if !cluster_kit_available() {
        return;
    }
    let started = tokio::time::Instant::now();
    let mut cluster = Cluster::start(Duration::from_secs(240)).await.unwrap();
    eprintln!("cluster up in {:.1} s", started.elapsed().as_secs_f64());
    let one_node = std::env::var("BREAKWATER_TEST_ONE_NODE").is_ok_and(|v| v == "1");
    // Every sidecar lists the nodes in the kit's order, so all start on bw1.
    let amqp_url = if one_node {
        format!("[\"{}\"]", cluster.urls()[0])
    } else {
        cluster.urls_toml()
    };
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let route = rabbit_route();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let procs: Vec<ProcessProxy> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            ProcessProxy::new(
                d.path(),
                &sidecar_config(&ai, &route, &format!("sidecar-{i}"), d.path(), &amqp_url),
            )
        })
        .collect();
    let mut children = Vec::new();
    for (p, d) in procs.iter().zip(&dirs) {
        let mut cmd = std::process::Command::new(breakwater_bin());
        cmd.arg("--config")
            .arg(&p.config_path)
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(d.path().join("breakwater.log")).unwrap());
        children.push(Reaped(p.spawn_command(cmd).await));
    }
    let admins: Vec<SocketAddr> = procs
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p.admin)))
        .collect();
    // A burst of replayable requests across both sidecars while the AI is down (the
    // publishers connect with the first message to publish); the node they are on is
    // killed -9 a third of the way in.
    const REQUESTS: usize = 600;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = Vec::new();
    let mut killed_at = None;
    for i in 0..REQUESTS {
        tick.tick().await;
        if i == REQUESTS / 3 {
            let node = cluster.kill_connected_node(&admins).await.unwrap();
            assert_eq!(node, 0, "the publishers were not on bw1");
            killed_at = Some(tokio::time::Instant::now());
        }
        let url = procs[i % procs.len()].url("/v1/grading");
        let id = format!("req-{route}-{i}");
        sent.push((id.clone(), tokio::spawn(post(url, id))));
    }
    let mut acked = HashSet::new();
    let mut other = Vec::new();
    for (id, answer) in sent {
        match answer.await.unwrap() {
            (202, dlq) if dlq == "queued" || dlq == "spooled" => {
                acked.insert(id);
            }
            a => other.push((id, a)),
        }
    }
    assert!(
        other.is_empty(),
        "{} of {REQUESTS} requests were not answered 202 queued/spooled, e.g. {:?}",
        other.len(),
        &other[..other.len().min(5)]
    );

    // Publishing resumes on another node, while bw1 stays dead.
    let killed_at = killed_at.unwrap();
    let moved = poll_until(Duration::from_secs(30), || async {
        cluster::publisher_nodes(&admins)
            .await
            .iter()
            .all(|n| n.is_some_and(|n| n != 0))
    })
    .await;
    assert!(
        moved,
        "the DLQ publishers did not move off the killed node bw1 within 30 s: {:?}; {}",
        cluster::publisher_nodes(&admins).await,
        cluster.status().await
    );
    eprintln!(
        "publishers on {:?} {:.1} s after kill -9 of bw1",
        cluster::publisher_nodes(&admins).await,
        killed_at.elapsed().as_secs_f64()
    );

    // The AI recovers: every acknowledged request is replayed (once the breakers are back
    // to automatic), one sidecar at a time at the route's pace, and its result is published.
    ai.outage(false).await;
    for p in &procs {
        let req = http::Request::post(format!(
            "http://127.0.0.1:{}/admin/routes/{route}/breaker",
            p.admin
        ))
        .body(Full::new(Bytes::from_static(br#"{"state":"auto"}"#)))
        .unwrap();
        assert_eq!(http_client().request(req).await.unwrap().status(), 200);
    }
    let replayed_ids = || -> HashSet<String> {
        ai.received()
            .iter()
            .filter(|r| r.headers.get("x-breakwater-replay").is_some())
            .filter_map(|r| {
                r.headers
                    .get("x-request-id")?
                    .to_str()
                    .ok()
                    .map(str::to_string)
            })
            .collect()
    };
    let all_back = poll_until(Duration::from_secs(60), || async {
        ai.distinct_keys() >= acked.len() && acked.is_subset(&replayed_ids())
    })
    .await;
    let missing: Vec<_> = acked.difference(&replayed_ids()).cloned().collect();
    assert!(
        all_back,
        "{} of {} acknowledged requests never reached the AI again ({} distinct Idempotency-Keys), e.g. {:?}",
        missing.len(),
        acked.len(),
        ai.distinct_keys(),
        &missing[..missing.len().min(5)]
    );
    let results_queue = format!("breakwater.results.{route}");
    let live: Vec<String> = cluster.urls()[1..].to_vec();
    let results = std::cell::Cell::new(0u32);
    let got_results = poll_until(Duration::from_secs(30), || async {
        results.set(
            cluster::queue_depth(&live, &results_queue)
                .await
                .unwrap_or(0),
        );
        results.get() as usize >= acked.len()
    })
    .await;
    let results = results.get();
    assert!(
        got_results,
        "{results_queue} holds {results} results for {} acknowledged requests",
        acked.len()
    );
    // Each acknowledged request's own result, by its request id (a redelivered replay may
    // have published a second one).
    let result_ids: HashSet<String> = cluster::drain_request_ids(&live, &results_queue)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let without: Vec<_> = acked.difference(&result_ids).collect();
    assert!(
        without.is_empty(),
        "{} acknowledged requests have no result in {results_queue}, e.g. {:?}",
        without.len(),
        &without[..without.len().min(5)]
    );
    let busiest = ai.max_replays_per_s();
    assert!(
        busiest as f64 <= RATE as f64 * 1.1,
        "the AI saw {busiest} replays in one second across the fleet; the pace is {RATE}/s"
    );
    eprintln!(
        "{} acknowledged, {} distinct keys replayed, {results} results, busiest second {busiest} replays (pace {RATE}/s); test took {:.1} s",
        acked.len(),
        ai.distinct_keys(),
        started.elapsed().as_secs_f64()
    );
    drop(children);
    cluster.stop();
}

fn rabbit_route() -> String {
    format!(
        "cluster_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}
