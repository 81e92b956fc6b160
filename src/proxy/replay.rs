//! The proxy side of DLQ replay: readiness from the route's breaker and kill switch, the
//! re-sent request (same method, path, headers and body, plus `Idempotency-Key` = the
//! message id and the upstream's configured credentials), and its decision record.

use std::borrow::Cow;
use std::sync::Arc;

use http_body_util::BodyExt;

use super::types::{DlqOutcome, ProxyRequest, Reason};
use super::Proxy;
use crate::audit::{Decision, Entry};
use crate::breaker::BreakerState;
use crate::dlq::{DlqHandle, Envelope, ReplayAnswer, ReplayFailure, ReplayFuture, ReplayTarget};
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
        let env = Envelope::new(
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

    fn replay(&self, env: &Envelope) -> ReplayFuture {
        let proxy = self.proxy.upgrade();
        let env = env.clone();
        Box::pin(async move {
            let fail = |reason: String, retryable: bool| ReplayFailure {
                reason,
                retryable,
                attempted: true,
            };
            let not_tried = |reason: &str| ReplayFailure {
                reason: reason.to_string(),
                retryable: true,
                attempted: false,
            };
            let proxy = proxy.ok_or_else(|| not_tried("shutting down"))?;
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
            // Replays pass the route's breaker too: a still-failing AI opens it, which stops
            // the replay worker instead of burning the messages' attempts.
            let breaker = snap.route_state(&env.route).and_then(|s| s.breaker.clone());
            let started = tokio::time::Instant::now();
            let mut permit = match &breaker {
                Some(b) => match b.acquire(started) {
                    Ok(p) => p,
                    Err(_) => return Err(not_tried("the route's breaker is open")),
                },
                None => None,
            };
            let mut judge = |outcome: crate::breaker::CallOutcome| {
                if let (Some(b), Some(p)) = (&breaker, permit.take()) {
                    let now = tokio::time::Instant::now();
                    b.record(p, outcome, now - started, now);
                }
            };
            let body = env
                .body()
                .map_err(|e| fail(format!("bad body: {e}"), false))?;
            let mut req = http::Request::builder()
                .method(env.method.as_str())
                .uri(env.path_and_query());
            for (k, v) in &env.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let req = req
                .header("idempotency-key", env.msg_id.as_str())
                .header("x-request-id", env.request_id.as_str())
                .header("x-breakwater-replay", "1")
                .body(body)
                .map_err(|e| fail(format!("cannot rebuild the request: {e}"), false))?;
            let sent = tokio::time::timeout(route.timeout, async {
                let (resp, _) = upstream.send(&req).await?;
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.map(|c| c.to_bytes()).map_err(|e| {
                    super::error::ErrorKind::Transport {
                        message: e.to_string(),
                        sent: true,
                    }
                })?;
                Ok::<_, super::error::ErrorKind>((parts, body))
            })
            .await;
            use crate::breaker::{CallOutcome, FailureKind};
            let (parts, body) = match sent {
                Err(_) => {
                    judge(CallOutcome::Failure(FailureKind::Timeout));
                    return Err(fail(format!("timed out after {:?}", route.timeout), true));
                }
                Ok(Err(e)) => {
                    judge(CallOutcome::Failure(FailureKind::ConnectError));
                    return Err(fail(e.to_string(), true));
                }
                Ok(Ok(r)) => r,
            };
            let status = parts.status.as_u16();
            judge(crate::breaker::classify_status(status));
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
                .map(str::to_string);
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
            })
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
