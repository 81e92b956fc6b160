//! Fallback chain: when the AI did not answer (breaker open, timeout, 5xx, connect error,
//! kill switch, shed), the route's non-AI answers are tried in order. Good AI answers are
//! remembered for the `cache` step on the way out.
//!
//! Sits just under the observe layer: everything below it can fail, nothing above it does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use crate::breaker::ResponseCache;
use crate::exchange::error::ProxyError;
use crate::exchange::{ProxyRequest, ProxyResponse, Source};
use crate::fallback::{to_cached, Fallback};

#[derive(Clone, Debug)]
pub struct FallbackLayer {
    chain: Arc<[Fallback]>,
    /// The cache to fill with good AI answers (when the chain has a cache step).
    cache: Option<Arc<ResponseCache>>,
}

impl FallbackLayer {
    pub fn new(chain: Vec<Fallback>) -> Self {
        let cache = chain.iter().find_map(|f| match f {
            Fallback::Cache(c) => Some(c.clone()),
            _ => None,
        });
        FallbackLayer {
            chain: chain.into(),
            cache,
        }
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = FallbackService<S>;
    fn layer(&self, inner: S) -> FallbackService<S> {
        FallbackService {
            inner,
            chain: self.chain.clone(),
            cache: self.cache.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct FallbackService<S> {
    inner: S,
    chain: Arc<[Fallback]>,
    cache: Option<Arc<ResponseCache>>,
}

impl<S> Service<ProxyRequest> for FallbackService<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        if self.chain.is_empty() {
            return Box::pin(self.inner.call(req));
        }
        let chain = self.chain.clone();
        let cache = self.cache.clone();
        let fut = self.inner.call(req.clone());
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    if let (Some(cache), Some(body)) = (&cache, &resp.body_bytes) {
                        if resp.source == Source::Ai && resp.http.status().is_success() {
                            let (parts, b) = resp.http.into_parts();
                            cache.put(
                                cache.key(&req.http),
                                to_cached(&parts, body.clone()),
                                tokio::time::Instant::now(),
                            );
                            let http = http::Response::from_parts(parts, b);
                            return Ok(ProxyResponse { http, ..resp });
                        }
                    }
                    Ok(resp)
                }
                Err(err) => {
                    req.meta.facts().failure = Some(err.reason());
                    for step in chain.iter() {
                        if let Some(http) = step.answer(&req).await {
                            return Ok(ProxyResponse {
                                http,
                                source: Source::Fallback {
                                    kind: step.kind(),
                                    reason: err.reason(),
                                },
                                body_bytes: None,
                            });
                        }
                    }
                    Err(err)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::error::ErrorKind;
    use crate::exchange::{full_body, test_request, FallbackKind, Reason};
    use std::time::Duration;
    use tower::ServiceExt;

    fn static_fb(body: &'static str) -> Fallback {
        Fallback::Static {
            status: http::StatusCode::OK,
            body: bytes::Bytes::from_static(body.as_bytes()),
            content_type: http::HeaderValue::from_static("application/json"),
        }
    }

    fn ai_ok(body: &'static str) -> ProxyResponse {
        let mut r = ProxyResponse::ai(http::Response::new(full_body(body)));
        r.body_bytes = Some(bytes::Bytes::from_static(body.as_bytes()));
        r
    }

    #[tokio::test]
    async fn cache_answers_before_static_once_filled() {
        let cache = Arc::new(ResponseCache::new(100, 1 << 20, Duration::from_secs(60)));
        let layer = FallbackLayer::new(vec![Fallback::Cache(cache), static_fb("static")]);
        let fail = std::sync::atomic::AtomicBool::new(false);
        let fail = Arc::new(fail);
        let f2 = fail.clone();
        let svc = layer.layer(tower::service_fn(move |_req: ProxyRequest| {
            let failing = f2.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                if failing {
                    Err(ProxyError::from(ErrorKind::Timeout(Duration::from_millis(
                        1,
                    ))))
                } else {
                    Ok(ai_ok("fresh"))
                }
            }
        }));
        let req = test_request(Duration::from_secs(1));
        // Cache miss: static answers.
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = svc.clone().oneshot(req.clone()).await.unwrap();
        assert_eq!(
            r.source,
            Source::Fallback {
                kind: FallbackKind::Static,
                reason: Reason::Timeout
            }
        );
        // A good answer fills the cache; the next failure is answered from it.
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        svc.clone().oneshot(req.clone()).await.unwrap();
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(
            r.source,
            Source::Fallback {
                kind: FallbackKind::Cache,
                reason: Reason::Timeout
            }
        );
        let body = crate::exchange::body_bytes(r.http.into_body())
            .await
            .unwrap();
        assert_eq!(&body[..], b"fresh");
    }

    #[tokio::test]
    async fn without_fallbacks_the_error_passes_through() {
        let svc = FallbackLayer::new(vec![]).layer(tower::service_fn(|_req: ProxyRequest| async {
            Err::<ProxyResponse, _>(ProxyError::from(ErrorKind::BreakerOpen {
                retry_in: Duration::from_secs(1),
            }))
        }));
        let err = svc
            .oneshot(test_request(Duration::from_secs(1)))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Reason::BreakerOpen);
    }
}
