//! Outermost layer: sees the final answer (AI, fallback or error), writes the SPEC
//! response headers, the metrics and (when enabled) the decision record. It is the only
//! place a `ProxyError` becomes a client response.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram};

use http::HeaderValue;
use http_body_util::BodyExt;

use super::audit_body::{AuditBody, Pending, CANCELLED_STATUS};
use super::breaker::SharedBreaker;
use crate::audit::{AuditHandle, Decision, Entry};
use bytes::Bytes;
use tower::{Layer, Service};

use crate::exchange::error::{error_response, ErrorKind, ErrorSource, ProxyError};
use crate::exchange::headers::{
    X_DLQ, X_FALLBACK, X_MODEL_VERSION, X_OUTCOME, X_REASON, X_REQUEST_ID,
};
use crate::exchange::{
    DlqOutcome, FallbackKind, ProxyBody, ProxyRequest, ProxyResponse, Reason, RequestMeta, Source,
};
use crate::telemetry;

/// What the decision log needs from the route: the log, the generation serving, and the
/// route's breaker (its state goes into each record).
#[derive(Clone, Debug)]
pub struct AuditCtx {
    pub handle: AuditHandle,
    pub config_gen: u64,
    pub breaker: Option<Arc<SharedBreaker>>,
}

/// The route's metric handles, resolved when the stack is built: recording is an atomic
/// operation, without a registry lookup or a label allocation per request.
pub struct RouteMetrics {
    route: Arc<str>,
    overhead: Histogram,
    /// By outcome: ai, fallback, error, cancelled.
    duration: [Histogram; 4],
    /// By outcome and status label, registered on first use.
    requests: [[OnceLock<Counter>; STATUS_LABELS.len()]; 4],
    /// By (upstream, variant) and by model version: a handful each, found by a scan.
    upstreams: Mutex<Vec<UpstreamHistogram>>,
    versions: Mutex<Vec<(String, Counter)>>,
}

type UpstreamHistogram = (Arc<str>, Option<Arc<str>>, Histogram);

/// Most distinct model versions one route keeps a cached counter for.
const MAX_CACHED_VERSIONS: usize = 64;

impl RouteMetrics {
    pub fn new(route: Arc<str>) -> Self {
        let duration = Outcome::ALL.map(|outcome| {
            metrics::histogram!(telemetry::REQUEST_DURATION, "route" => route.to_string(), "outcome" => outcome.as_str())
        });
        RouteMetrics {
            overhead: metrics::histogram!(telemetry::OVERHEAD, "route" => route.to_string()),
            duration,
            requests: Default::default(),
            upstreams: Mutex::new(Vec::new()),
            versions: Mutex::new(Vec::new()),
            route,
        }
    }

    fn request(
        &self,
        outcome: Outcome,
        status: u16,
        elapsed: Duration,
        overhead: Option<Duration>,
    ) {
        let s = status_index(status);
        let o = outcome.index();
        self.requests[o][s]
            .get_or_init(|| {
                metrics::counter!(telemetry::REQUESTS_TOTAL, "route" => self.route.to_string(), "outcome" => outcome.as_str(), "status" => STATUS_LABELS[s])
            })
            .increment(1);
        self.duration[o].record(elapsed.as_secs_f64());
        if let Some(overhead) = overhead {
            self.overhead.record(overhead.as_secs_f64());
        }
    }

    fn upstream(&self, upstream: &Arc<str>, variant: Option<&Arc<str>>, latency: Duration) {
        let Ok(mut cached) = self.upstreams.lock() else {
            return;
        };
        let found = cached
            .iter()
            .find(|(u, v, _)| u == upstream && v.as_ref() == variant)
            .map(|(_, _, h)| h.clone());
        let h = found.unwrap_or_else(|| {
            let h = metrics::histogram!(telemetry::UPSTREAM_DURATION, "route" => self.route.to_string(), "upstream" => upstream.to_string(), "variant" => variant.map(|v| v.to_string()).unwrap_or_default());
            cached.push((upstream.clone(), variant.cloned(), h.clone()));
            h
        });
        drop(cached);
        h.record(latency.as_secs_f64());
    }

    fn model_version(&self, version: &str) {
        let Ok(mut cached) = self.versions.lock() else {
            return;
        };
        if let Some((_, c)) = cached.iter().find(|(v, _)| v == version) {
            c.increment(1);
            return;
        }
        let c = metrics::counter!(telemetry::MODEL_VERSION_REQUESTS, "route" => self.route.to_string(), "model_version" => telemetry::model_version_label(version));
        c.increment(1);
        if cached.len() < MAX_CACHED_VERSIONS {
            cached.push((version.to_string(), c));
        }
    }
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.route)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct ObserveLayer {
    audit: Option<AuditCtx>,
    metrics: Arc<RouteMetrics>,
}

impl ObserveLayer {
    pub fn new(audit: Option<AuditCtx>, metrics: Arc<RouteMetrics>) -> Self {
        ObserveLayer { audit, metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            audit: self.audit.clone(),
            metrics: self.metrics.clone(),
            not_ready: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    audit: Option<AuditCtx>,
    metrics: Arc<RouteMetrics>,
    /// An error the inner service reported from `poll_ready`: the next call answers it
    /// as the JSON error instead of calling a service that is not ready.
    not_ready: Option<Arc<ProxyError>>,
}

impl<S> Service<ProxyRequest> for Observe<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ProxyBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => {
                self.not_ready = None;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(Arc::new(e));
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let exchange = Exchange::begin(&req, self.audit.as_ref(), self.metrics.clone());
        if let Some(e) = self.not_ready.take() {
            let e = ProxyError::from(ErrorKind::Internal(format!("route stack not ready: {e}")));
            return Box::pin(std::future::ready(Ok(exchange.finish(Err(e)))));
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            Ok(exchange.finish(result))
        })
    }
}

/// One request from the moment it enters the route's stack. Turns the stack's result
/// into the client response; when its future is dropped first (the client reset the h2
/// stream or disconnected, or the shutdown grace ended), its `Drop` still writes the
/// decision record: outcome `cancelled`, status 499 as nginx logs it.
struct Exchange {
    meta: Arc<RequestMeta>,
    audit: Option<AuditStart>,
    metrics: Arc<RouteMetrics>,
    finished: bool,
}

/// What the decision record needs from the request itself.
struct AuditStart {
    ctx: AuditCtx,
    input: Bytes,
    method: http::Method,
    path: String,
}

/// How a request ended, for headers, metrics and the record.
struct Ending {
    outcome: Outcome,
    fallback: Option<FallbackKind>,
    reason: Option<Reason>,
}

impl Exchange {
    fn begin(req: &ProxyRequest, audit: Option<&AuditCtx>, metrics: Arc<RouteMetrics>) -> Self {
        let audit = audit.map(|ctx| AuditStart {
            ctx: ctx.clone(),
            input: req.http.body().clone(),
            method: req.http.method().clone(),
            path: req.http.uri().path().to_string(),
        });
        Exchange {
            meta: req.meta.clone(),
            audit,
            metrics,
            finished: false,
        }
    }

    /// The client response for the stack's result, with the SPEC headers, the metrics and
    /// (when the log is on) a body that writes the decision record when it ends.
    fn finish(mut self, result: Result<ProxyResponse, ProxyError>) -> http::Response<ProxyBody> {
        self.finished = true;
        let (mut resp, ending) = match result {
            Ok(r) => self.answer(r),
            Err(e) => self.error(&e),
        };
        let facts = Known::of(&self.meta);
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.meta.request_id) {
            h.insert(&X_REQUEST_ID, v);
        }
        h.insert(
            &X_OUTCOME,
            HeaderValue::from_static(ending.outcome.as_str()),
        );
        if let Some((dlq, _)) = &facts.dlq {
            h.insert(&X_DLQ, HeaderValue::from_static(dlq.as_str()));
        }
        if ending.outcome == Outcome::Ai {
            if let Some(v) = &facts.model_version {
                if let Ok(hv) = HeaderValue::from_str(v) {
                    h.insert(&X_MODEL_VERSION, hv);
                }
                self.metrics.model_version(v);
            }
        }
        if let (Some(up), Some(lat)) = (&facts.upstream, facts.upstream_latency) {
            self.metrics.upstream(up, facts.variant.as_ref(), lat);
        }
        let status = resp.status().as_u16();
        if let Some(t) = self.meta.trace.as_ref().filter(|t| t.is_recording()) {
            t.end(crate::otel::SpanEnd {
                status,
                outcome: ending.outcome.as_str(),
                reason: ending.reason.map(Reason::as_str),
                variant: facts.variant.as_deref(),
                model_version: facts.model_version.as_deref(),
                upstream: facts.upstream.as_deref(),
                request_id: &self.meta.request_id,
            });
        }
        let elapsed = self.meta.received_at.elapsed();
        let overhead = elapsed.saturating_sub(facts.upstream_latency.unwrap_or_default());
        self.metrics
            .request(ending.outcome, status, elapsed, Some(overhead));
        let Some(audit) = self.audit.take() else {
            return resp;
        };
        let record = audit.decision(&self.meta, facts, &ending, status);
        let pending = Pending {
            record,
            input: audit.input,
            started: self.meta.received_at,
        };
        let handle = audit.ctx.handle;
        resp.map(|body| AuditBody::new(body, handle, pending).boxed())
    }

    /// An answer from the AI or a fallback.
    fn answer(&self, r: ProxyResponse) -> (http::Response<ProxyBody>, Ending) {
        let mut http = r.http;
        match r.source {
            Source::Ai => (
                http,
                Ending {
                    outcome: Outcome::Ai,
                    fallback: None,
                    reason: None,
                },
            ),
            Source::Fallback { kind, reason } => {
                let h = http.headers_mut();
                h.insert(&X_FALLBACK, HeaderValue::from_static(kind.as_str()));
                h.insert(&X_REASON, HeaderValue::from_static(reason.as_str()));
                metrics::counter!(telemetry::FALLBACKS_TOTAL, "route" => self.meta.route.name.to_string(), "kind" => kind.as_str(), "reason" => reason.as_str()).increment(1);
                (
                    http,
                    Ending {
                        outcome: Outcome::Fallback,
                        fallback: Some(kind),
                        reason: Some(reason),
                    },
                )
            }
        }
    }

    /// No answer: the SPEC JSON error, the one place a `ProxyError` becomes a response.
    fn error(&self, e: &ProxyError) -> (http::Response<ProxyBody>, Ending) {
        let mut http = error_response(
            e.client_status(),
            e.code(),
            &e.to_string(),
            &self.meta.request_id,
        );
        http.headers_mut()
            .insert(&X_REASON, HeaderValue::from_static(e.reason().as_str()));
        match e.source() {
            ErrorSource::Internal => {
                tracing::error!(route = %self.meta.route.name, request_id = %self.meta.request_id, error = %e, "breakwater failed internally");
            }
            source => {
                tracing::debug!(route = %self.meta.route.name, request_id = %self.meta.request_id, error = %e, source = source.as_str(), "no answer for the client");
            }
        }
        (
            http,
            Ending {
                outcome: Outcome::Error,
                fallback: None,
                reason: Some(e.reason()),
            },
        )
    }

    /// The future was dropped before the stack answered.
    fn cancelled(&mut self) {
        let elapsed = self.meta.received_at.elapsed();
        self.metrics
            .request(Outcome::Cancelled, CANCELLED_STATUS, elapsed, None);
        tracing::debug!(route = %self.meta.route.name, request_id = %self.meta.request_id, "client went away before the answer");
        if let Some(t) = self.meta.trace.as_ref().filter(|t| t.is_recording()) {
            t.end(crate::otel::SpanEnd {
                status: CANCELLED_STATUS,
                outcome: Outcome::Cancelled.as_str(),
                reason: None,
                variant: None,
                model_version: None,
                upstream: None,
                request_id: &self.meta.request_id,
            });
        }
        let Some(audit) = self.audit.take() else {
            return;
        };
        let meta = self.meta.clone();
        // A dead letter still being spooled finishes on its own task: the record waits for
        // its outcome so that it names the message.
        self.meta.after_dlq(Box::new(move |_| {
            let facts = Known::of(&meta);
            let ending = Ending {
                outcome: Outcome::Cancelled,
                fallback: None,
                reason: facts.failure,
            };
            let mut record = audit.decision(&meta, facts, &ending, CANCELLED_STATUS);
            record.ts_end = std::time::SystemTime::now();
            record.latency_us = meta.received_at.elapsed().as_micros() as u64;
            record.input_digest = Some(audit.ctx.handle.digester().digest(&audit.input));
            audit.ctx.handle.submit_now(Entry::Decision(record));
        }));
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.finished {
            self.cancelled();
        }
    }
}

/// The request's facts, copied once when the request ends.
struct Known {
    upstream: Option<Arc<str>>,
    variant: Option<Arc<str>>,
    model_version: Option<String>,
    upstream_latency: Option<Duration>,
    attempts: u32,
    failure: Option<Reason>,
    unapproved: bool,
    dlq: Option<(DlqOutcome, Arc<str>)>,
}

impl Known {
    fn of(meta: &RequestMeta) -> Known {
        let f = meta.facts();
        Known {
            upstream: f.upstream.clone(),
            variant: f.variant.clone(),
            model_version: f.model_version.clone(),
            upstream_latency: f.upstream_latency,
            attempts: f.attempts,
            failure: f.failure,
            unapproved: f.unapproved,
            dlq: f.dlq.outcome(),
        }
    }
}

impl AuditStart {
    /// The decision record, without what only the body's end knows (end time, latency,
    /// digests).
    fn decision(&self, meta: &RequestMeta, facts: Known, ending: &Ending, status: u16) -> Decision {
        Decision {
            event_id: uuid::Uuid::now_v7(),
            ts_start: meta.received_wall,
            ts_end: meta.received_wall,
            route: meta.route.name.clone(),
            upstream: facts.upstream,
            variant: facts.variant,
            model_version: facts.model_version,
            config_gen: self.ctx.config_gen,
            request_id: meta.request_id.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            input_digest: None,
            output_digest: None,
            outcome: ending.outcome.as_str(),
            fallback: ending.fallback.map(FallbackKind::as_str),
            reason: ending.reason.map(|r| Cow::Borrowed(r.as_str())),
            status,
            latency_us: 0,
            upstream_latency_us: facts.upstream_latency.map(|d| d.as_micros() as u64),
            attempts: facts.attempts,
            breaker_state: self
                .ctx
                .breaker
                .as_ref()
                .map(|b| b.state(tokio::time::Instant::now()).as_str()),
            dlq: facts.dlq.as_ref().map(|d| d.0.as_str()),
            dlq_msg_id: facts.dlq.map(|d| d.1.to_string()),
            trace_id: meta.trace.as_ref().map(|t| t.trace_id.clone()),
            // Only an answer that reached the client is marked.
            unapproved: facts.unapproved && ending.outcome == Outcome::Ai,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ai,
    Fallback,
    Error,
    /// The client went away before the answer.
    Cancelled,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Ai,
        Outcome::Fallback,
        Outcome::Error,
        Outcome::Cancelled,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ai => "ai",
            Outcome::Fallback => "fallback",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Status labels: the common codes by name, the rest by class.
const STATUS_LABELS: [&str; 20] = [
    "200", "201", "204", "400", "401", "403", "404", "409", "413", "422", "429", "499", "500",
    "502", "503", "504", "2xx", "3xx", "4xx", "5xx",
];

fn status_index(status: u16) -> usize {
    match status {
        200 => 0,
        201 => 1,
        204 => 2,
        400 => 3,
        401 => 4,
        403 => 5,
        404 => 6,
        409 => 7,
        413 => 8,
        422 => 9,
        429 => 10,
        499 => 11,
        500 => 12,
        502 => 13,
        503 => 14,
        504 => 15,
        s if s < 300 => 16,
        s if s < 400 => 17,
        s if s < 500 => 18,
        _ => 19,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{BreakerSettings, BreakerState};
    use crate::exchange::test_request;
    use crate::layers::breaker::BreakerLayer;
    use tower::ServiceExt;

    /// breakwater's own faults are reported as what they are and never trip the AI's
    /// breaker, however many there are.
    #[tokio::test(start_paused = true)]
    async fn internal_errors_are_internal_and_never_trip_the_breaker() {
        let breaker = SharedBreaker::new(
            "t",
            None,
            BreakerSettings {
                consecutive_failures: 2,
                failure_rate: None,
                ..BreakerSettings::default()
            },
        );
        let svc = tower::ServiceBuilder::new()
            .layer(ObserveLayer::new(
                None,
                Arc::new(RouteMetrics::new(Arc::from("t"))),
            ))
            .layer(BreakerLayer::new(breaker.clone()))
            .service(tower::service_fn(|_r: ProxyRequest| async {
                Err::<ProxyResponse, _>(ProxyError::from(ErrorKind::Internal(
                    "cannot build upstream request".into(),
                )))
            }));
        for _ in 0..10 {
            let resp = svc
                .clone()
                .oneshot(test_request(Duration::from_secs(1)))
                .await
                .unwrap();
            assert_eq!(resp.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(resp.headers()[&X_REASON], "internal");
            assert_eq!(resp.headers()[&X_OUTCOME], "error");
            let body = crate::exchange::body_bytes(resp.into_body()).await.unwrap();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["error"]["code"], "internal");
        }
        assert_eq!(
            breaker.state(tokio::time::Instant::now()),
            BreakerState::Closed
        );
    }
}
