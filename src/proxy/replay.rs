//! The proxy side of DLQ replay: readiness from the route's breaker and kill switch, the
//! re-sent request (same method, path, headers and body, plus `Idempotency-Key` = the
//! message id and the upstream's configured credentials), and its decision record.

use std::borrow::Cow;
use std::sync::Arc;

use http_body_util::BodyExt;

use super::Proxy;
use crate::audit::{Decision, Entry};
use crate::breaker::{BreakerState, CallOutcome, FailureKind};
use crate::dlq::{
    DlqHandle, Envelope, ReplayAnswer, ReplayFailure, ReplayFuture, ReplayKind, ReplayTarget,
};
use crate::exchange::error::{ErrorKind, ProxyError};
use crate::exchange::{DlqOutcome, ProxyRequest, Reason};
use crate::layers::dlq::{DeadLetters, DlqFuture};

/// Longest a request waits for the spool's group fsync (and the broker's confirm).
const ENQUEUE_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// Hands failed replayable requests to the DLQ.
pub struct DlqSink {
    pub handle: DlqHandle,
    pub redact: Vec<String>,
}

impl DeadLetters for DlqSink {
    fn enqueue(&self, req: &ProxyRequest, reason: Reason) -> DlqFuture {
        let mut env = Envelope::new(
            &req.meta.route.name,
            &req.meta.request_id,
            reason.as_str(),
            req.http.method(),
            req.http.uri(),
            req.http.headers(),
            req.http.body(),
            &self.redact,
            None,
        );
        if let Some(t) = &req.meta.trace {
            env.trace_id = Some(t.trace_id.clone());
            env.span_id = Some(t.span_id.clone());
        }
        let handle = self.handle.clone();
        Box::pin(async move {
            // Bounded: a hung disk must not hold the client. Past the bound the message may
            // still land (a later replay then repeats it under the same id), but the client
            // is told the truth it can rely on: not known to be kept.
            let outcome = match tokio::time::timeout(ENQUEUE_BOUND, handle.enqueue(&env)).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    tracing::error!(route = %env.route, request_id = %env.request_id, "DLQ spool did not answer in time: reported as rejected");
                    metrics::counter!(crate::telemetry::DLQ_MESSAGES, "route" => env.route.clone(), "result" => "rejected").increment(1);
                    DlqOutcome::Rejected
                }
            };
            (outcome, env.msg_id)
        })
    }
}

/// Replays through the route's upstream. Holds the proxy weakly: the proxy owns the DLQ.
pub struct ProxyReplay {
    pub proxy: std::sync::Weak<Proxy>,
}

impl ReplayTarget for ProxyReplay {
    fn ready(&self, route: &str) -> bool {
        let Some(proxy) = self.proxy.upgrade() else {
            return false;
        };
        let snap = proxy.snapshot();
        let Some(state) = snap.route_state(route) else {
            return false;
        };
        // Half-open counts as ready: replays are then the breaker's probes, so recovery is
        // noticed even when no live traffic arrives.
        state.ai.enabled()
            && state.breaker.as_ref().is_none_or(|b| {
                !matches!(
                    b.state(tokio::time::Instant::now()),
                    BreakerState::Open | BreakerState::ForcedOpen
                )
            })
    }

    fn replay(&self, env: &Envelope, kind: ReplayKind) -> ReplayFuture {
        let proxy = self.proxy.upgrade();
        let env = env.clone();
        Box::pin(async move {
            let proxy = proxy.ok_or_else(|| not_tried("shutting down"))?;
            replay_once(&proxy, &env, kind).await
        })
    }

    fn recorded(&self, env: &Envelope, result: &Result<ReplayAnswer, ReplayFailure>) {
        let Some(proxy) = self.proxy.upgrade() else {
            return;
        };
        let Some(audit) = proxy.shared.audit() else {
            return;
        };
        let snap = proxy.snapshot();
        let body = env.body().unwrap_or_default();
        let (outcome, status, model_version, output, upstream, reason) = match result {
            Ok(a) => (
                "replayed",
                a.status,
                a.model_version.clone(),
                Some(audit.digester().digest(&a.body)),
                Some(Arc::from(a.upstream.as_str())),
                None,
            ),
            Err(f) => ("replay_failed", 0, None, None, None, Some(f.reason.clone())),
        };
        let unapproved = result.as_ref().is_ok_and(|a| a.unapproved);
        let record = Decision {
            upstream,
            model_version,
            config_gen: snap.generation,
            method: http::Method::from_bytes(env.method.as_bytes()).unwrap_or_default(),
            path: env.path.clone(),
            input_digest: Some(audit.digester().digest(&body)),
            output_digest: output,
            reason: reason.map(Cow::Owned),
            status,
            attempts: env.attempts + 1,
            dlq_msg_id: Some(env.msg_id.clone()),
            // The original request's trace: one id ties the request and its replay.
            trace_id: env.trace_id.clone(),
            unapproved,
            ..Decision::new(
                Arc::from(env.route.as_str()),
                Arc::from(env.request_id.as_str()),
                outcome,
            )
        };
        let entry = Entry::Decision(record);
        audit.submit_now(entry);
    }
}

fn fail(reason: String, retryable: bool) -> ReplayFailure {
    ReplayFailure {
        reason,
        retryable,
        attempted: true,
    }
}

fn not_tried(reason: &str) -> ReplayFailure {
    ReplayFailure {
        reason: reason.to_string(),
        retryable: true,
        attempted: false,
    }
}

/// Headers breakwater sets on a replay itself: the stored copies are dropped, never sent
/// next to the new values.
const REPLACED_HEADERS: [&str; 3] = ["idempotency-key", "x-request-id", "x-breakwater-replay"];

/// Why an operator's "replay now" cannot call the AI of `route` at all: the kill switch or
/// a breaker forced open (an automatic open period does not refuse it; see
/// [`ReplayKind::Operator`]). `None` when it can, or the route is unknown.
pub fn operator_replay_refused(proxy: &Proxy, route: &str) -> Option<String> {
    let snap = proxy.snapshot();
    let state = snap.route_state(route)?;
    if !state.ai.enabled() {
        return Some(format!(
            "route {route:?} has AI disabled (kill switch): nothing is replayed; enable it with POST /admin/routes/{route}/ai first"
        ));
    }
    let forced_open = state
        .breaker
        .as_ref()
        .is_some_and(|b| b.state(tokio::time::Instant::now()) == BreakerState::ForcedOpen);
    forced_open.then(|| {
        format!(
            "route {route:?} has its breaker forced_open: nothing is replayed; set it to auto or forced_closed with POST /admin/routes/{route}/breaker first"
        )
    })
}

/// One replay through the route's upstream and breaker. The breaker permit is a guard:
/// an early return or a dropped future gives its (half-open probe) slot back. The kill
/// switch refuses every replay; an operator's replay ends an automatic open period first.
async fn replay_once(
    proxy: &Proxy,
    env: &Envelope,
    kind: ReplayKind,
) -> Result<ReplayAnswer, ReplayFailure> {
    if let Some(why) = operator_replay_refused(proxy, &env.route) {
        return Err(not_tried(&why));
    }
    let snap = proxy.snapshot();
    let route = snap
        .config
        .route(&env.route)
        .cloned()
        .ok_or_else(|| fail(format!("route {} no longer exists", env.route), false))?;
    let up_cfg = snap
        .config
        .upstreams
        .get(&route.upstream)
        .ok_or_else(|| fail("upstream missing".into(), true))?;
    let upstream = proxy
        .shared
        .upstream_client(up_cfg)
        .map_err(|e| fail(e, true))?;
    let req = rebuild_request(env)?;
    // Replays pass the route's breaker too: a still-failing AI opens it, which stops the
    // replay worker instead of burning the messages' attempts.
    let started = tokio::time::Instant::now();
    let guard = match snap.route_state(&env.route).and_then(|s| s.breaker.clone()) {
        Some(b) => {
            if kind == ReplayKind::Operator {
                b.end_open_period(started);
            }
            match b.guard(started, started + route.timeout) {
                Ok(g) => Some(g),
                Err(_) => return Err(not_tried("the route's breaker is open")),
            }
        }
        None => None,
    };
    // A replay is a trace of its own, linked to the dead-lettered request's span.
    let trace = proxy.shared.tracing().and_then(|t| {
        t.replay(
            &env.route,
            &env.request_id,
            env.trace_id.as_deref().zip(env.span_id.as_deref()),
        )
    });
    let mut req = req;
    if let Some(cx) = trace.as_ref().and_then(|t| t.context()) {
        crate::otel::inject(cx, req.headers_mut());
    }
    let end_span = |status: u16, reason: Option<&str>| {
        if let Some(t) = &trace {
            t.end(crate::otel::SpanEnd {
                status,
                outcome: if reason.is_none() {
                    "replayed"
                } else {
                    "replay_failed"
                },
                reason,
                variant: None,
                model_version: None,
                upstream: Some(&route.upstream),
                request_id: &env.request_id,
            });
        }
    };
    let limit = snap.config.server.max_response_buffer_bytes;
    let sent = tokio::time::timeout(route.timeout, fetch(&upstream, &req, limit)).await;
    let judge = |outcome: Option<CallOutcome>| {
        if let Some(g) = guard {
            g.finish(outcome);
        }
    };
    let (parts, body) = match sent {
        Err(_) => {
            judge(Some(CallOutcome::Failure(FailureKind::Timeout)));
            end_span(0, Some("timeout"));
            return Err(fail(format!("timed out after {:?}", route.timeout), true));
        }
        Ok(Err(Fetched::Failed(e))) => {
            let reason = e.to_string();
            judge(ProxyError::from(e).call_outcome());
            end_span(0, Some("connect_error"));
            return Err(fail(reason, true));
        }
        Ok(Err(Fetched::TooLarge(status))) => {
            // The AI answered; the answer is too big to carry. Its health is not in doubt.
            judge(Some(crate::breaker::classify_status(status)));
            end_span(status, Some("too_large"));
            return Err(fail(
                format!("the AI's answer ({status}) is larger than server.max_response_buffer_bytes = {limit}"),
                false,
            ));
        }
        Ok(Ok(r)) => r,
    };
    let status = parts.status.as_u16();
    judge(Some(crate::breaker::classify_status(status)));
    let failed = parts.status.is_server_error() || parts.status.is_client_error() || status == 429;
    end_span(status, failed.then_some("upstream_status"));
    if parts.status.is_server_error() || status == 429 {
        return Err(fail(format!("the AI answered {status}"), true));
    }
    if parts.status.is_client_error() {
        return Err(fail(
            format!("the AI rejected the request with {status}"),
            false,
        ));
    }
    let model_version = route
        .model_version_header
        .as_ref()
        .and_then(|h| parts.headers.get(h))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            let ptr = route.model_version_pointer.as_deref()?;
            super::forward::model_version_from_json(&body, ptr)
        });
    // A replayed answer reaches Magento too: the same compliance checks as the request
    // path. A refused answer is a retryable failure, so the message waits (and is parked
    // after max_replay_attempts) until an approved, valid answer comes.
    let mut unapproved = false;
    if let Some(approval) = &route.approval {
        let digest = crate::layers::comply::digest_of(approval, &parts.headers, Some(&body));
        if !approval.approves(model_version.as_deref(), digest.as_deref()) {
            crate::layers::comply::count_unapproved(&route.name, model_version.as_deref());
            if approval.on_unapproved == crate::config::OnUnapproved::Fallback {
                return Err(fail(
                    format!(
                        "the answer came from model version {}, which is not approved",
                        model_version.as_deref().unwrap_or("unknown")
                    ),
                    true,
                ));
            }
            unapproved = true;
        }
    }
    if let Some(schema) = &route.response_schema {
        if let Err(why) = crate::layers::comply::check_schema(&route.name, schema, Some(&body)) {
            return Err(fail(
                format!("the answer does not match the response schema: {why}"),
                true,
            ));
        }
    }
    Ok(ReplayAnswer {
        status,
        headers: parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body,
        model_version,
        upstream: route.upstream.clone(),
        unapproved,
    })
}

/// The stored request, with `Idempotency-Key` = the message id (the AI deduplicates on it)
/// and the original `x-request-id`, each exactly once.
pub(crate) fn rebuild_request(
    env: &Envelope,
) -> Result<http::Request<bytes::Bytes>, ReplayFailure> {
    let body = env
        .body()
        .map_err(|e| fail(format!("bad body: {e}"), false))?;
    let mut req = http::Request::builder()
        .method(env.method.as_str())
        .uri(env.path_and_query());
    for (k, v) in &env.headers {
        if !REPLACED_HEADERS.iter().any(|h| k.eq_ignore_ascii_case(h)) {
            req = req.header(k.as_str(), v.as_str());
        }
    }
    let mut req = req
        .header("idempotency-key", env.msg_id.as_str())
        .header("x-request-id", env.request_id.as_str())
        .header("x-breakwater-replay", "1")
        .body(body)
        .map_err(|e| fail(format!("cannot rebuild the request: {e}"), false))?;
    // A message edited in the spool or on the broker (or written by an older version) may
    // carry headers that frame the original hop: the client sets its own.
    crate::exchange::headers::strip_hop_by_hop(req.headers_mut());
    req.headers_mut().remove(http::header::CONTENT_LENGTH);
    req.headers_mut().remove(http::header::HOST);
    Ok(req)
}

enum Fetched {
    Failed(ErrorKind),
    /// The answer's status; its body was over the limit.
    TooLarge(u16),
}

/// Sends the request and reads at most `limit` bytes of the answer: a bigger answer is
/// refused without being buffered.
async fn fetch(
    upstream: &crate::upstream::Upstream,
    req: &http::Request<bytes::Bytes>,
    limit: u64,
) -> Result<(http::response::Parts, bytes::Bytes), Fetched> {
    let (resp, _) = upstream.send(req).await.map_err(Fetched::Failed)?;
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Fetched::TooLarge(status)),
        Err(e) => Err(Fetched::Failed(ErrorKind::Transport {
            message: e.to_string(),
            sent: true,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{CallOutcome, FailureKind};
    use crate::config::Config;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    /// One route `r` to `upstream`, whose breaker opens on one failure and admits one probe.
    fn proxy(upstream: &str, server_extra: &str) -> Arc<Proxy> {
        let text = format!(
            "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n{server_extra}\n\
             [upstreams.a]\nurl=\"{upstream}\"\n\
             [[routes]]\nname=\"r\"\npath_prefix=\"/\"\nupstream=\"a\"\ntimeout_ms=5000\nreplayable=true\n\
             [routes.breaker]\nconsecutive_failures=1\nopen_ms=1000\nopen_max_ms=1000\nhalf_open_probes=1\n"
        );
        Proxy::with_shared(Config::from_toml(&text).unwrap(), Default::default()).unwrap()
    }

    fn envelope() -> Envelope {
        serde_json::from_value(serde_json::json!({
            "msg_id": "m-1", "route": "r", "request_id": "rid-1",
            "created_at": "2026-01-01T00:00:00Z", "reason": "upstream_5xx", "attempts": 0,
            "method": "POST", "path": "/v1/grading", "query": null,
            "headers": [["content-type", "application/json"]],
            "body_b64": "e30=", "model_version_requested": null
        }))
        .unwrap()
    }

    /// Found by fuzz/envelope: stored `Connection`, `Transfer-Encoding`, `Content-Length`
    /// and `Host` headers were replayed as they were, framing the replay by the original
    /// hop (a `Content-Length` that does not match the stored body, a chunked encoding).
    #[test]
    fn a_replay_carries_no_stored_hop_or_framing_header() {
        let mut env = envelope();
        env.headers = [
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("content-length", "999"),
            ("host", "elsewhere.example"),
            ("te", "trailers"),
            ("x-keep", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let req = rebuild_request(&env).unwrap();
        for gone in [
            "connection",
            "x-hop",
            "transfer-encoding",
            "content-length",
            "host",
            "te",
        ] {
            assert!(
                !req.headers().contains_key(gone),
                "{gone}: {:?}",
                req.headers()
            );
        }
        assert_eq!(req.headers()["x-keep"], "1");
        assert_eq!(req.headers()["idempotency-key"], "m-1");
        assert_eq!(req.body().as_ref(), b"{}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_replay_future_gives_its_half_open_slot_back() {
        // Accepts connections (the kernel's backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = proxy(&format!("http://{}", silent.local_addr().unwrap()), "");
        let breaker = proxy
            .snapshot()
            .route_state("r")
            .unwrap()
            .breaker
            .clone()
            .unwrap();
        let now = Instant::now();
        let p = breaker.acquire(now).unwrap().unwrap();
        let failed = CallOutcome::Failure(FailureKind::ConnectError);
        breaker.record(p, failed, Duration::from_millis(1), now);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(breaker.state(Instant::now()), BreakerState::HalfOpen);

        let target = ProxyReplay {
            proxy: Arc::downgrade(&proxy),
        };
        let mut fut = target.replay(&envelope(), ReplayKind::Scheduled);
        let polled = tokio::time::timeout(Duration::from_millis(50), &mut fut).await;
        assert!(polled.is_err(), "the silent AI cannot have answered");
        drop(fut);

        assert!(
            breaker.acquire(Instant::now()).is_ok(),
            "the dropped replay kept the only half-open probe slot"
        );
    }

    #[tokio::test]
    async fn an_oversized_replay_answer_is_refused_without_reading_it_all() {
        // An AI that answers 200 with an endless chunked body, counting what it wrote.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let w = written.clone();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            sock.write_all(head.as_bytes()).await.unwrap();
            let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
            while sock.write_all(chunk.as_bytes()).await.is_ok() {
                w.fetch_add(0x10000, std::sync::atomic::Ordering::Relaxed);
                if w.load(std::sync::atomic::Ordering::Relaxed) > 256 << 20 {
                    break;
                }
            }
        });
        let proxy = proxy(
            &format!("http://{addr}"),
            "max_response_buffer_bytes = 1048576",
        );
        let target = ProxyReplay {
            proxy: Arc::downgrade(&proxy),
        };
        let failure = target
            .replay(&envelope(), ReplayKind::Scheduled)
            .await
            .unwrap_err();
        assert!(
            failure.reason.contains("max_response_buffer_bytes"),
            "{}",
            failure.reason
        );
        assert!(!failure.retryable);
        let sent = written.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sent < 16 << 20, "read {sent} bytes of the answer");
    }
}
