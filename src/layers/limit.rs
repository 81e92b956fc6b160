//! Bulkhead per upstream: at most `max_concurrency` requests in flight (adaptive by AIMD
//! when enabled). Over the limit a request is shed at once with `overloaded`, so the
//! fallback answers instead of a queue building up in front of a struggling AI.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::breaker::outcome_of;
use crate::breaker::ConcurrencyLimiter;
use crate::proxy::error::{ErrorKind, ProxyError};
use crate::proxy::types::{ProxyRequest, ProxyResponse};
use crate::telemetry;

#[derive(Clone, Debug)]
pub struct LimitLayer {
    limiter: Arc<ConcurrencyLimiter>,
    upstream: Arc<str>,
}

impl LimitLayer {
    pub fn new(limiter: Arc<ConcurrencyLimiter>, upstream: Arc<str>) -> Self {
        LimitLayer { limiter, upstream }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;
    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            limiter: self.limiter.clone(),
            upstream: self.upstream.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Limit<S> {
    inner: S,
    limiter: Arc<ConcurrencyLimiter>,
    upstream: Arc<str>,
}

impl<S> Service<ProxyRequest> for Limit<S>
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
        let Some(permit) = self.limiter.try_acquire() else {
            metrics::counter!(telemetry::SHED_TOTAL, "route" => req.meta.route.name.clone(), "upstream" => self.upstream.to_string()).increment(1);
            req.meta.refused_by(Some(&self.upstream), None);
            let e = ProxyError::from(ErrorKind::Overloaded);
            return Box::pin(std::future::ready(Err(e)));
        };
        let started = tokio::time::Instant::now();
        let fut = self.inner.call(req);
        let limiter = self.limiter.clone();
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let result = fut.await;
            if let Some(outcome) = outcome_of(&result) {
                permit.record(outcome, started.elapsed());
            }
            metrics::gauge!(telemetry::CONCURRENCY_LIMIT, "upstream" => upstream.to_string())
                .set(limiter.limit() as f64);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::LimitSettings;
    use crate::proxy::types::{full_body, test_request};
    use std::time::Duration;
    use tower::ServiceExt;

    #[tokio::test]
    async fn over_the_limit_is_shed_and_a_finished_call_frees_its_slot() {
        let limiter = Arc::new(ConcurrencyLimiter::new(LimitSettings {
            initial: 1,
            min: 1,
            max: 1,
            adaptive: false,
        }));
        let (mock, mut handle) = tower_test::mock::pair::<ProxyRequest, ProxyResponse>();
        let svc = LimitLayer::new(limiter.clone(), Arc::from("ai"))
            .layer(mock.map_err(|e| ProxyError::from(ErrorKind::Internal(e.to_string()))));
        handle.allow(10);
        let first = tokio::spawn(svc.clone().oneshot(test_request(Duration::from_secs(5))));
        let (_req, respond) = handle.next_request().await.unwrap();
        // The one slot is taken: the next request is shed at once, never queued.
        let shed = svc
            .clone()
            .oneshot(test_request(Duration::from_secs(5)))
            .await
            .unwrap_err();
        assert!(matches!(shed.kind, ErrorKind::Overloaded));
        respond.send_response(ProxyResponse::ai(http::Response::new(full_body("ok"))));
        first.await.unwrap().unwrap();
        assert_eq!(limiter.in_flight(), 0);
        let next = tokio::spawn(svc.oneshot(test_request(Duration::from_secs(5))));
        let (_req, respond) = handle.next_request().await.unwrap();
        respond.send_response(ProxyResponse::ai(http::Response::new(full_body("ok"))));
        next.await.unwrap().unwrap();
    }
}
