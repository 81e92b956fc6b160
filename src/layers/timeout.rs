//! Timeouts. `Deadline`: the route's `timeout_ms`, fixed when the request arrived, covers
//! every attempt and backoff below it; it sits inside the fallback layer so a timeout still
//! gets a fallback answer. `AttemptTimeout`: the innermost cut of one AI call, at
//! `[routes.retry] attempt_timeout_ms` or the route deadline, whichever comes first. It
//! sits under the breaker and the bulkhead, so every policy above sees a timeout as an
//! ordinary `Timeout` failure instead of a dropped future, and the retry layer can try again.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service};

use crate::exchange::error::{ErrorKind, ProxyError};
use crate::exchange::{ProxyRequest, ProxyResponse};

#[derive(Clone, Debug, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
}

impl<S> Service<ProxyRequest> for Deadline<S>
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
        let deadline = req.meta.deadline;
        let timeout = req.meta.route.timeout;
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(result) => result,
                Err(_) => Err(ErrorKind::Timeout(timeout).into()),
            }
        })
    }
}

/// Cuts one attempt at its own timeout or at the route deadline.
#[derive(Clone, Debug)]
pub struct AttemptTimeoutLayer {
    attempt_timeout: Option<Duration>,
}

impl AttemptTimeoutLayer {
    pub fn new(attempt_timeout: Option<Duration>) -> Self {
        AttemptTimeoutLayer { attempt_timeout }
    }
}

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;
    fn layer(&self, inner: S) -> AttemptTimeout<S> {
        AttemptTimeout {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AttemptTimeout<S> {
    inner: S,
    layer: AttemptTimeoutLayer,
}

impl<S> Service<ProxyRequest> for AttemptTimeout<S>
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
        let started = Instant::now();
        let route_deadline = req.meta.deadline;
        // The attempt's own limit, unless the route deadline comes first.
        let (deadline, limit) = match self.layer.attempt_timeout {
            Some(t) if started + t < route_deadline => (started + t, t),
            _ => (route_deadline, req.meta.route.timeout),
        };
        let meta = req.meta.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(result) => result,
                Err(_) => {
                    // The attempt's upstream and variant are in the facts already.
                    meta.facts().upstream_latency = Some(started.elapsed());
                    Err(ErrorKind::Timeout(limit).into())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::test_request;
    use std::time::Duration;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn times_out_at_the_route_deadline() {
        let (svc, mut handle) = tower_test::mock::pair::<ProxyRequest, ProxyResponse>();
        let svc = tower::ServiceBuilder::new()
            .layer(DeadlineLayer)
            .service(svc.map_err(|e| ProxyError::from(ErrorKind::Internal(e.to_string()))));
        let req = test_request(Duration::from_millis(800));
        let call = tokio::spawn(svc.oneshot(req));
        // The mock receives the request but never answers.
        let (_req, _send) = handle.next_request().await.unwrap();
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err.kind, ErrorKind::Timeout(d) if d == Duration::from_millis(800)));
        assert_eq!(err.client_status(), http::StatusCode::GATEWAY_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_is_cut_at_its_own_timeout_or_the_route_deadline() {
        for (attempt, route, cut) in [
            (Some(200), 800, 200),
            (Some(900), 800, 800),
            (None, 800, 800),
        ] {
            let (svc, mut handle) = tower_test::mock::pair::<ProxyRequest, ProxyResponse>();
            let layer = AttemptTimeoutLayer::new(attempt.map(Duration::from_millis));
            let svc =
                layer.layer(svc.map_err(|e| ProxyError::from(ErrorKind::Internal(e.to_string()))));
            let started = Instant::now();
            let req = test_request(Duration::from_millis(route));
            let meta = req.meta.clone();
            let call = tokio::spawn(svc.oneshot(req));
            let (_req, _send) = handle.next_request().await.unwrap();
            let err = call.await.unwrap().unwrap_err();
            assert_eq!(started.elapsed(), Duration::from_millis(cut));
            assert!(matches!(err.kind, ErrorKind::Timeout(d) if d == Duration::from_millis(cut)));
            assert_eq!(
                meta.facts().upstream_latency,
                Some(Duration::from_millis(cut))
            );
        }
    }
}
