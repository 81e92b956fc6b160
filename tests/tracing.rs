//! W3C trace context and OTLP export, checked by an in-process OTLP/HTTP receiver that
//! decodes the protobuf breakwater sends, and by what the mock AI receives.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP traces receiver: every exported span, with its resource's service name.
struct Collector {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
        let store = spans.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let store = store.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            for rs in export.resource_spans {
                                let service = rs
                                    .resource
                                    .iter()
                                    .flat_map(|r| r.attributes.iter())
                                    .find(|kv| kv.key == "service.name")
                                    .and_then(|kv| kv.value.as_ref())
                                    .and_then(|v| match &v.value {
                                        Some(Value::StringValue(s)) => Some(s.clone()),
                                        _ => None,
                                    })
                                    .unwrap_or_default();
                                for ss in rs.scope_spans {
                                    for span in ss.spans {
                                        store.lock().unwrap().push((service.clone(), span));
                                    }
                                }
                            }
                            let answer = ExportTraceServiceResponse::default().encode_to_vec();
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::from(answer)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector {
            addr,
            spans,
            _task: task,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    async fn wait(&self, n: usize) -> Vec<Span> {
        assert!(
            poll_until(Duration::from_secs(15), || async {
                self.spans.lock().unwrap().len() >= n
            })
            .await,
            "expected {n} spans, got {:?}",
            self.spans()
        );
        self.spans()
    }
}

/// Polls a synchronous check until it finds something.
async fn eventually<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            Some(Value::IntValue(i)) => Some(i.to_string()),
            Some(Value::BoolValue(b)) => Some(b.to_string()),
            _ => None,
        })
}

fn traced_config(
    ai: &MockAi,
    collector: &Collector,
    ratio: f64,
    dir: &std::path::Path,
    route_extra: &str,
) -> String {
    let key = dir.join("audit.key");
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    simple_config(
        &ai.url(),
        route_extra,
        &format!(
            "[tracing]\notlp_endpoint = \"http://{}/v1/traces\"\nsampling_ratio = {ratio}\n\
             service_name = \"breakwater-test\"\nexport_interval_ms = 50\n\
             [audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\nfsync_interval_ms = 5\n",
            collector.addr,
            dir.join("decisions.jsonl").display(),
            key.display()
        ),
    )
}

fn records(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("decisions.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("event").is_none())
        .collect()
}

async fn record_for(dir: &std::path::Path, request_id: &str) -> serde_json::Value {
    eventually(Duration::from_secs(10), || {
        records(dir)
            .into_iter()
            .find(|r| r["request_id"] == request_id && r["outcome"] != "replayed")
    })
    .await
    .unwrap_or_else(|| panic!("no record for {request_id}: {:?}", records(dir)))
}

async fn get(proxy: &TestProxy, id: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = http::Request::get(proxy.url("/v1/grade")).header("x-request-id", id);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    proxy.send(req.body(Full::new(Bytes::new())).unwrap()).await
}

/// (trace id, span id, flags) of a traceparent header.
fn parse_traceparent(v: &str) -> (String, String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {v}");
    assert_eq!(parts[0], "00");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test]
async fn a_sampled_trace_continues_through_every_attempt_and_into_the_record() {
    let (ai, collector) = (MockAi::start().await, Collector::start().await);
    ai.set_model_version("grader-7");
    ai.fail_next(1, 503);
    let dir = tempfile::tempdir().unwrap();
    let retry = "[routes.retry]\nmax_attempts = 2\nbackoff_base_ms = 1\nbudget_min_per_s = 100\n";
    let proxy = TestProxy::start(&traced_config(&ai, &collector, 0.0, dir.path(), retry)).await;

    let tp = format!("00-{TRACE}-{PARENT}-01");
    let r = get(
        &proxy,
        "traced-1",
        &[("traceparent", &tp), ("tracestate", "magento=1")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.outcome(), "ai");

    // Each attempt reached the AI as a child of its own span, in the caller's trace.
    let seen = ai.received();
    assert_eq!(seen.len(), 2, "one failed attempt, one retry");
    let attempts: Vec<(String, String, String)> = seen
        .iter()
        .map(|r| parse_traceparent(r.headers["traceparent"].to_str().unwrap()))
        .collect();
    for (i, (trace, span, flags)) in attempts.iter().enumerate() {
        assert_eq!(trace, TRACE, "attempt {i} stays in the caller's trace");
        assert_ne!(span, PARENT, "attempt {i} has its own span");
        assert_eq!(flags, "01");
        assert_eq!(seen[i].headers["tracestate"], "magento=1");
    }
    assert_ne!(attempts[0].1, attempts[1].1);

    let spans = collector.wait(3).await;
    let server = spans
        .iter()
        .find(|s| s.kind == 2)
        .unwrap_or_else(|| panic!("no server span: {spans:?}"));
    assert_eq!(hex::encode(&server.trace_id), TRACE);
    assert_eq!(hex::encode(&server.parent_span_id), PARENT);
    assert_eq!(server.name, "GET ai");
    assert_eq!(attr(server, "breakwater.route").as_deref(), Some("ai"));
    assert_eq!(attr(server, "breakwater.outcome").as_deref(), Some("ai"));
    assert_eq!(
        attr(server, "breakwater.model_version").as_deref(),
        Some("grader-7")
    );
    assert_eq!(
        attr(server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(server, "breakwater.request_id").as_deref(),
        Some("traced-1")
    );
    let mut clients: Vec<&Span> = spans.iter().filter(|s| s.kind == 3).collect();
    clients.sort_by_key(|s| attr(s, "breakwater.attempt"));
    assert_eq!(clients.len(), 2, "{spans:?}");
    for (span, (_, sent, _)) in clients.iter().zip(&attempts) {
        assert_eq!(
            span.parent_span_id, server.span_id,
            "attempts are children of the request"
        );
        assert_eq!(
            &hex::encode(&span.span_id),
            sent,
            "the AI saw this attempt's span"
        );
    }
    assert_eq!(
        attr(clients[0], "http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(
        clients[0].status.as_ref().map(|s| s.code),
        Some(2),
        "error status"
    );
    assert_eq!(
        attr(clients[1], "breakwater.model_version").as_deref(),
        Some("grader-7")
    );

    let record = record_for(dir.path(), "traced-1").await;
    assert_eq!(record["trace_id"], TRACE);
    proxy.stop().await;
}

#[tokio::test]
async fn an_unsampled_request_passes_its_context_through_and_exports_nothing() {
    let (ai, collector) = (MockAi::start().await, Collector::start().await);
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&traced_config(&ai, &collector, 0.0, dir.path(), "")).await;

    let tp = format!("00-{TRACE}-{PARENT}-00");
    assert_eq!(
        get(&proxy, "not-sampled", &[("traceparent", &tp)])
            .await
            .status,
        200
    );
    assert_eq!(get(&proxy, "no-header", &[]).await.status, 200);
    let seen = ai.received();
    assert_eq!(
        seen[0].headers["traceparent"],
        tp.as_str(),
        "passed through untouched"
    );
    assert!(
        !seen[1].headers.contains_key("traceparent"),
        "no trace made up"
    );

    assert_eq!(
        record_for(dir.path(), "not-sampled").await["trace_id"],
        TRACE
    );
    let untraced = record_for(dir.path(), "no-header").await;
    assert!(untraced.get("trace_id").is_none(), "{untraced}");
    // The exporter runs every 50 ms: nothing was sent in ten times that.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(collector.spans().is_empty(), "{:?}", collector.spans());
    proxy.stop().await;
}

#[tokio::test]
async fn a_sampling_ratio_of_one_starts_a_trace_for_requests_without_one() {
    let (ai, collector) = (MockAi::start().await, Collector::start().await);
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&traced_config(&ai, &collector, 1.0, dir.path(), "")).await;
    assert_eq!(get(&proxy, "root-1", &[]).await.status, 200);
    let seen = ai.received();
    let (trace, span, flags) = parse_traceparent(seen[0].headers["traceparent"].to_str().unwrap());
    assert_eq!(flags, "01");
    let spans = collector.wait(2).await;
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    assert!(server.parent_span_id.is_empty(), "a root span");
    assert_eq!(hex::encode(&server.trace_id), trace);
    let client = spans.iter().find(|s| s.kind == 3).unwrap();
    assert_eq!(hex::encode(&client.span_id), span);
    assert_eq!(
        record_for(dir.path(), "root-1").await["trace_id"],
        trace.as_str()
    );
    assert_eq!(
        collector.spans.lock().unwrap()[0].0,
        "breakwater-test",
        "the service name"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_replay_is_a_new_trace_that_links_to_the_dead_lettered_request() {
    let (ai, collector) = (MockAi::start().await, Collector::start().await);
    let dir = tempfile::tempdir().unwrap();
    let route_extra = "replayable = true\n[routes.breaker]\nconsecutive_failures = 1\nopen_ms = 300\nopen_max_ms = 300\nhalf_open_probes = 1\n\
         [[routes.fallback]]\nkind = \"static\"\nbody = '{\"source\":\"static\"}'\n";
    let config = traced_config(&ai, &collector, 0.0, dir.path(), route_extra)
        + &format!(
            "[dlq]\nspool_dir = \"{}\"\nreplay_rate_per_s = 50\n",
            dir.path().join("spool").display()
        );
    let proxy = TestProxy::start(&config).await;
    ai.set_error_rate(1.0, 503);
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let req = http::Request::post(proxy.url("/v1/grade"))
        .header("x-request-id", "dead-1")
        .header("traceparent", &tp)
        .header("idempotency-key", "k-1")
        .body(Full::new(Bytes::from_static(b"{\"essay\":1}")))
        .unwrap();
    let r = proxy.send(req).await;
    assert_eq!(r.outcome(), "fallback");
    assert!(
        matches!(r.header("x-breakwater-dlq"), Some("spooled" | "queued")),
        "{:?}",
        r.headers
    );
    let first = record_for(dir.path(), "dead-1").await;
    assert_eq!(first["trace_id"], TRACE);
    let server = collector
        .wait(1)
        .await
        .into_iter()
        .find(|s| s.kind == 2)
        .unwrap();
    ai.set_error_rate(0.0, 200);

    // The replay reaches the AI in a trace of its own.
    let replayed = eventually(Duration::from_secs(20), || {
        ai.received()
            .into_iter()
            .find(|r| r.headers.contains_key("x-breakwater-replay"))
    })
    .await
    .expect("the request was replayed");
    let (trace, span, _) = parse_traceparent(replayed.headers["traceparent"].to_str().unwrap());
    assert_ne!(
        trace, TRACE,
        "a replay hours later is not part of the caller's request"
    );
    let replay_span = eventually(Duration::from_secs(15), || {
        collector
            .spans()
            .into_iter()
            .find(|s| s.name.starts_with("replay "))
    })
    .await
    .unwrap_or_else(|| panic!("no replay span: {:?}", collector.spans()));
    assert_eq!(hex::encode(&replay_span.span_id), span);
    assert_eq!(replay_span.links.len(), 1, "{replay_span:?}");
    assert_eq!(hex::encode(&replay_span.links[0].trace_id), TRACE);
    assert_eq!(
        replay_span.links[0].span_id, server.span_id,
        "linked to the request's span"
    );
    assert_eq!(
        attr(&replay_span, "breakwater.outcome").as_deref(),
        Some("replayed")
    );

    // The replay's decision record carries the original trace id.
    let replay_record = eventually(Duration::from_secs(10), || {
        records(dir.path())
            .into_iter()
            .find(|r| r["request_id"] == "dead-1" && r["outcome"] == "replayed")
    })
    .await
    .expect("a replay record");
    assert_eq!(replay_record["trace_id"], TRACE);
    proxy.stop().await;
}

#[test]
fn bad_tracing_settings_are_config_errors_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        simple_config(
            "http://127.0.0.1:9",
            "",
            "[tracing]\notlp_endpoint = \"grpc://collector\"\nsampling_ratio = 1.5\nmax_queue = 0\n",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(breakwater_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "tracing.otlp_endpoint",
        "tracing.sampling_ratio",
        "tracing.max_queue",
    ] {
        assert!(err.contains(key), "missing {key} in {err}");
    }
}
