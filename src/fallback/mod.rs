//! Non-AI answers, tried in the order the route lists them: the last good AI answer for
//! the same request (`cache`), a non-AI service such as a rules engine (`upstream`), and a
//! fixed answer (`static`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::breaker::{CachedResponse, ResponseCache};
use crate::exchange::headers::strip_hop_by_hop;
use crate::exchange::{full_body, BoxError, FallbackKind, ProxyBody, ProxyRequest};
use crate::upstream::Upstream;

/// One step of a route's fallback chain, ready to serve.
#[derive(Clone, Debug)]
pub enum Fallback {
    Cache(Arc<ResponseCache>),
    Upstream {
        upstream: Box<Upstream>,
        timeout: Duration,
    },
    Static {
        status: http::StatusCode,
        body: Bytes,
        content_type: HeaderValue,
    },
}

impl Fallback {
    pub fn kind(&self) -> FallbackKind {
        match self {
            Fallback::Cache(_) => FallbackKind::Cache,
            Fallback::Upstream { .. } => FallbackKind::Upstream,
            Fallback::Static { .. } => FallbackKind::Static,
        }
    }

    /// Tries to answer; `None` when this step has nothing (cache miss, rules engine down).
    /// The cache looks up by its own key (see `ResponseCache::key`: it varies on who asks).
    pub async fn answer(&self, req: &ProxyRequest) -> Option<http::Response<ProxyBody>> {
        match self {
            Fallback::Cache(cache) => {
                let hit = cache.get(&cache.key(&req.http), Instant::now())?;
                Some(cached_response(hit))
            }
            Fallback::Upstream { upstream, timeout } => {
                match tokio::time::timeout(*timeout, upstream.send(&req.http)).await {
                    Ok(Ok((resp, _))) if !resp.status().is_server_error() => {
                        let (mut parts, body) = resp.into_parts();
                        strip_hop_by_hop(&mut parts.headers);
                        Some(http::Response::from_parts(
                            parts,
                            body.map_err(BoxError::from).boxed(),
                        ))
                    }
                    Ok(Ok((resp, _))) => {
                        tracing::debug!(upstream = %upstream.name, status = %resp.status(), "fallback upstream failed");
                        None
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(upstream = %upstream.name, error = %e, "fallback upstream failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(upstream = %upstream.name, "fallback upstream timed out");
                        None
                    }
                }
            }
            Fallback::Static {
                status,
                body,
                content_type,
            } => {
                let mut resp = http::Response::new(full_body(body.clone()));
                *resp.status_mut() = *status;
                resp.headers_mut()
                    .insert(http::header::CONTENT_TYPE, content_type.clone());
                Some(resp)
            }
        }
    }
}

fn cached_response(hit: CachedResponse) -> http::Response<ProxyBody> {
    let mut resp = http::Response::new(full_body(hit.body));
    *resp.status_mut() = http::StatusCode::from_u16(hit.status).unwrap_or(http::StatusCode::OK);
    *resp.headers_mut() = hit.headers;
    resp
}

/// What the cache keeps of an AI answer: status, the headers a client needs, the body.
pub fn to_cached(resp: &http::response::Parts, body: Bytes) -> CachedResponse {
    let mut headers = resp.headers.clone();
    // Per-request headers must not be replayed to another request.
    for h in ["x-request-id", "date", "set-cookie", "content-length"] {
        headers.remove(h);
    }
    CachedResponse {
        status: resp.status.as_u16(),
        headers,
        body,
        stored_at: Instant::now(),
    }
}
