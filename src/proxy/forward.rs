//! The innermost service: one call to one upstream. Turns 5xx and 429 into errors so every
//! layer above sees failures the same way, and reads the model version the AI reports.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Incoming;

use crate::config::RouteConfig;
use crate::exchange::error::{ErrorKind, ProxyError};
use crate::exchange::headers::strip_hop_by_hop;
use crate::exchange::{full_body, BoxError, ProxyBody, ProxyRequest, ProxyResponse};
use crate::upstream::Upstream;

use super::readahead::{charged, read_ahead, Charge, ResponseBudget};

/// Calls `upstream` for a route. Cheap to clone (one `Arc`): cloning the pooled client per
/// request showed up in profiles.
#[derive(Clone, Debug)]
pub struct Forward {
    inner: Arc<ForwardInner>,
}

#[derive(Debug)]
struct ForwardInner {
    upstream: Upstream,
    route: Arc<RouteConfig>,
    variant: Option<Arc<str>>,
    /// Read the whole body (up to this many bytes) when a layer needs it.
    buffer_limit: Option<u64>,
    readahead: ReadAheadLimits,
}

/// How far an answer may be read ahead of its client (see `readahead`).
#[derive(Debug, Clone)]
pub struct ReadAheadLimits {
    pub budget: Arc<ResponseBudget>,
    /// `server.max_response_buffer_bytes`: the most one answer holds in memory.
    pub per_response: u64,
}

impl Forward {
    pub fn new(
        upstream: Upstream,
        route: Arc<RouteConfig>,
        variant: Option<Arc<str>>,
        buffer_limit: Option<u64>,
        readahead: ReadAheadLimits,
    ) -> Self {
        Forward {
            inner: Arc::new(ForwardInner {
                upstream,
                route,
                variant,
                buffer_limit,
                readahead,
            }),
        }
    }
}

impl tower::Service<ProxyRequest> for Forward {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let this = self.inner.clone();
        Box::pin(async move { this.forward(req).await })
    }
}

impl ForwardInner {
    async fn forward(self: Arc<Self>, req: ProxyRequest) -> Result<ProxyResponse, ProxyError> {
        let attempt = req
            .meta
            .attempt_started(&self.upstream.name, self.variant.as_ref());
        let Some(span) = req
            .meta
            .trace
            .as_ref()
            .and_then(|t| t.attempt(&self.upstream.name, self.variant.as_deref(), attempt))
        else {
            return self.attempt(&req, &req.http).await;
        };
        // The upstream sees this attempt's span as its parent.
        let mut traced = http::Request::new(req.http.body().clone());
        *traced.method_mut() = req.http.method().clone();
        *traced.uri_mut() = req.http.uri().clone();
        *traced.headers_mut() = req.http.headers().clone();
        crate::otel::inject(span.context(), traced.headers_mut());
        let result = self.attempt(&req, &traced).await;
        match &result {
            Ok(r) => {
                let version = req.meta.facts().model_version.clone();
                span.answered(r.http.status().as_u16(), version.as_deref());
            }
            Err(ProxyError {
                kind: ErrorKind::Status { status, .. },
            }) => {
                let version = req.meta.facts().model_version.clone();
                span.answered(status.as_u16(), version.as_deref());
            }
            Err(e) => span.failed(&e.to_string()),
        }
        result
    }

    async fn attempt(
        &self,
        req: &ProxyRequest,
        http: &http::Request<bytes::Bytes>,
    ) -> Result<ProxyResponse, ProxyError> {
        let (resp, latency) = self.upstream.send(http).await?;
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            req.meta
                .attempt_answered(latency, self.header_version(resp.headers()));
            return Err(ErrorKind::Status {
                status,
                retry_after,
            }
            .into());
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let mut model_version = self.header_version(&parts.headers);
        let (body, body_bytes) = match self.buffer_limit {
            Some(limit) => match collect_bounded(body, limit, &self.readahead.budget).await {
                Ok(Collected::Whole(bytes, charge)) => {
                    // The client's copy holds the charge until the server has written it.
                    (full_body(charged(bytes.clone(), charge)), Some(bytes))
                }
                Ok(Collected::TooBig(body)) => (body, None),
                Err(e) => {
                    req.meta.attempt_answered(latency, model_version);
                    return Err(ErrorKind::Transport {
                        message: format!("reading the upstream body failed: {e}"),
                        sent: true,
                    }
                    .into());
                }
            },
            None => (
                read_ahead(body, &self.readahead.budget, self.readahead.per_response),
                None,
            ),
        };
        if model_version.is_none() {
            if let (Some(ptr), Some(bytes)) = (&self.route.model_version_pointer, &body_bytes) {
                model_version = model_version_from_json(bytes, ptr);
            }
        }
        req.meta.attempt_answered(latency, model_version);
        let mut out = ProxyResponse::ai(http::Response::from_parts(parts, body));
        out.body_bytes = body_bytes;
        Ok(out)
    }

    fn header_version(&self, headers: &http::HeaderMap) -> Option<String> {
        header_version(&self.route, headers)
    }
}

/// The model version the AI reported in the route's `model_version_header`.
pub(crate) fn header_version(route: &RouteConfig, headers: &http::HeaderMap) -> Option<String> {
    route
        .model_version_header
        .as_ref()
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `Retry-After` as delta-seconds or an HTTP-date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v.trim()).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

pub(crate) fn model_version_from_json(body: &[u8], pointer: &str) -> Option<String> {
    let raw = crate::json_pointer::raw_at(body, pointer).ok()??;
    match serde_json::from_str::<serde_json::Value>(raw.get()).ok()? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub enum Collected {
    /// The whole body, charged on the response budget.
    Whole(Bytes, Charge),
    /// Over the limit, or over the budget: a body that replays what was read, then
    /// streams the rest.
    TooBig(ProxyBody),
}

/// Reads a body up to `limit` bytes without ever holding more than that in memory, nor
/// more than `budget` grants.
pub async fn collect_bounded(
    mut body: Incoming,
    limit: u64,
    budget: &Arc<ResponseBudget>,
) -> Result<Collected, hyper::Error> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0u64;
    let mut charge = budget.try_charge(0);
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            size += data.len() as u64;
            let n = data.len() as u64;
            chunks.push(data);
            let granted = match charge.as_mut() {
                Some(c) => c.grow(n),
                None => false,
            };
            if size > limit || !granted {
                let prefix = futures_util::stream::iter(
                    chunks
                        .into_iter()
                        .map(|b| Ok::<_, BoxError>(Frame::data(b))),
                );
                let rest = BodyStream::new(body.map_err(BoxError::from));
                return Ok(Collected::TooBig(BodyExt::boxed(StreamBody::new(
                    prefix.chain(rest),
                ))));
            }
        }
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = Vec::with_capacity(size as usize);
            for c in &chunks {
                all.extend_from_slice(c);
            }
            Bytes::from(all)
        }
    };
    match charge {
        Some(charge) => Ok(Collected::Whole(bytes, charge)),
        // Only when the limit is 0 and nothing arrived: an empty body holds nothing.
        None => Ok(Collected::TooBig(full_body(bytes))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn model_version_pointer() {
        let body = br#"{"model":{"version":"rec-v8"},"n":7}"#;
        assert_eq!(
            model_version_from_json(body, "/model/version").as_deref(),
            Some("rec-v8")
        );
        assert_eq!(model_version_from_json(body, "/n").as_deref(), Some("7"));
        assert_eq!(model_version_from_json(body, "/missing"), None);
        assert_eq!(model_version_from_json(b"not json", "/model"), None);
    }
}
