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

use super::audit_body::{AuditBody, Pending};
use super::breaker::SharedBreaker;
use crate::audit::{AuditHandle, Decision};
use tower::{Layer, Service};

use crate::proxy::error::{error_response, ProxyError};
use crate::proxy::headers::{
    X_DLQ, X_FALLBACK, X_MODEL_VERSION, X_OUTCOME, X_REASON, X_REQUEST_ID,
};
use crate::proxy::types::{ProxyBody, ProxyRequest, ProxyResponse, Source};
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
    /// By outcome: ai, fallback, error.
    duration: [Histogram; 3],
    /// By outcome and status label, registered on first use.
    requests: [[OnceLock<Counter>; STATUS_LABELS.len()]; 3],
    /// By (upstream, variant) and by model version: a handful each, found by a scan.
    upstreams: Mutex<Vec<UpstreamHistogram>>,
    versions: Mutex<Vec<(String, Counter)>>,
}

type UpstreamHistogram = (Arc<str>, Option<Arc<str>>, Histogram);

const OUTCOMES: [&str; 3] = ["ai", "fallback", "error"];

/// Most distinct model versions one route keeps a cached counter for.
const MAX_CACHED_VERSIONS: usize = 64;

impl RouteMetrics {
    pub fn new(route: Arc<str>) -> Self {
        let duration = OUTCOMES.map(|outcome| {
            metrics::histogram!(telemetry::REQUEST_DURATION, "route" => route.to_string(), "outcome" => outcome)
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

    fn request(&self, outcome: usize, status: u16, elapsed: Duration, overhead: Duration) {
        let s = status_index(status);
        self.requests[outcome][s]
            .get_or_init(|| {
                metrics::counter!(telemetry::REQUESTS_TOTAL, "route" => self.route.to_string(), "outcome" => OUTCOMES[outcome], "status" => STATUS_LABELS[s])
            })
            .increment(1);
        self.duration[outcome].record(elapsed.as_secs_f64());
        self.overhead.record(overhead.as_secs_f64());
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
        }
    }
}

#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    audit: Option<AuditCtx>,
    metrics: Arc<RouteMetrics>,
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

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every layer below is always ready: shedding happens in `call`, never by waiting.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let meta = req.meta.clone();
        let route_metrics = self.metrics.clone();
        let audit = self.audit.clone().map(|a| {
            let input = req.http.body().clone();
            let method = req.http.method().clone();
            let path = req.http.uri().path().to_string();
            (a, input, method, path)
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let elapsed = meta.received_at.elapsed();
            let route = &*meta.route.name;
            let mut facts = Facts::default();
            let (mut resp, outcome, upstream_latency) = match result {
                Ok(r) => {
                    facts.upstream = r.upstream.clone();
                    facts.variant = r.variant.clone();
                    facts.dlq = r.dlq.clone();
                    if let Source::Fallback { kind, reason } = r.source {
                        facts.fallback = Some(kind.as_str());
                        facts.reason = Some(reason.as_str());
                    }
                    let outcome = match r.source {
                        Source::Ai => "ai",
                        Source::Fallback { .. } => "fallback",
                    };
                    let mut http = r.http;
                    let h = http.headers_mut();
                    if let Source::Fallback { kind, reason } = r.source {
                        h.insert(&X_FALLBACK, HeaderValue::from_static(kind.as_str()));
                        h.insert(&X_REASON, HeaderValue::from_static(reason.as_str()));
                        metrics::counter!(telemetry::FALLBACKS_TOTAL, "route" => route.to_string(), "kind" => kind.as_str(), "reason" => reason.as_str()).increment(1);
                    }
                    if let Some((dlq, _)) = r.dlq {
                        h.insert(&X_DLQ, HeaderValue::from_static(dlq.as_str()));
                    }
                    if let Some(v) = &r.model_version {
                        if r.source == Source::Ai {
                            if let Ok(hv) = HeaderValue::from_str(v) {
                                h.insert(&X_MODEL_VERSION, hv);
                            }
                            route_metrics.model_version(v);
                        }
                    }
                    if let (Some(up), Some(lat)) = (&r.upstream, r.upstream_latency) {
                        route_metrics.upstream(up, r.variant.as_ref(), lat);
                    }
                    facts.model_version = r.model_version;
                    (http, outcome, r.upstream_latency)
                }
                Err(e) => {
                    facts.upstream = e.upstream.clone();
                    facts.variant = e.variant.clone();
                    facts.model_version = e.model_version.clone();
                    facts.reason = Some(e.reason().as_str());
                    facts.dlq = e.dlq.clone();
                    let mut http = error_response(
                        e.client_status(),
                        e.code(),
                        &e.to_string(),
                        &meta.request_id,
                    );
                    let h = http.headers_mut();
                    h.insert(&X_REASON, HeaderValue::from_static(e.reason().as_str()));
                    if let Some((dlq, _)) = e.dlq {
                        h.insert(&X_DLQ, HeaderValue::from_static(dlq.as_str()));
                    }
                    tracing::debug!(route, request_id = %meta.request_id, error = %e, "no answer for the client");
                    (http, "error", e.upstream_latency)
                }
            };
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&meta.request_id) {
                h.insert(&X_REQUEST_ID, v);
            }
            h.insert(&X_OUTCOME, HeaderValue::from_static(outcome));
            let status = resp.status().as_u16();
            let overhead = elapsed.saturating_sub(upstream_latency.unwrap_or_default());
            let outcome_index = match outcome {
                "ai" => 0,
                "fallback" => 1,
                _ => 2,
            };
            route_metrics.request(outcome_index, status, elapsed, overhead);
            if let Some((ctx, input, method, path)) = audit {
                let record = Decision {
                    event_id: uuid::Uuid::now_v7(),
                    ts_start: meta.received_wall,
                    ts_end: meta.received_wall,
                    route: meta.route.name.clone(),
                    upstream: facts.upstream,
                    variant: facts.variant,
                    model_version: facts.model_version,
                    config_gen: ctx.config_gen,
                    request_id: meta.request_id.clone(),
                    method,
                    path,
                    input_digest: None,
                    output_digest: None,
                    outcome,
                    fallback: facts.fallback,
                    reason: facts.reason.map(Cow::Borrowed),
                    status,
                    latency_us: 0,
                    upstream_latency_us: upstream_latency.map(|d| d.as_micros() as u64),
                    attempts: meta.attempts(),
                    breaker_state: ctx
                        .breaker
                        .as_ref()
                        .map(|b| b.state(tokio::time::Instant::now()).as_str()),
                    dlq: facts.dlq.as_ref().map(|d| d.0.as_str()),
                    dlq_msg_id: facts.dlq.map(|d| d.1),
                };
                let pending = Pending {
                    record,
                    input,
                    started: meta.received_at,
                };
                resp = resp.map(|body| AuditBody::new(body, ctx.handle.clone(), pending).boxed());
            }
            Ok(resp)
        })
    }
}

/// What the decision record needs to know about the answer.
#[derive(Default)]
struct Facts {
    upstream: Option<Arc<str>>,
    variant: Option<Arc<str>>,
    model_version: Option<String>,
    fallback: Option<&'static str>,
    reason: Option<&'static str>,
    dlq: Option<(crate::proxy::types::DlqOutcome, String)>,
}

/// Status labels: the common codes by name, the rest by class.
const STATUS_LABELS: [&str; 19] = [
    "200", "201", "204", "400", "401", "403", "404", "409", "413", "422", "429", "500", "502",
    "503", "504", "2xx", "3xx", "4xx", "5xx",
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
        500 => 11,
        502 => 12,
        503 => 13,
        504 => 14,
        s if s < 300 => 15,
        s if s < 400 => 16,
        s if s < 500 => 17,
        _ => 18,
    }
}
