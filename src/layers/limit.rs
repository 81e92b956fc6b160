//! Bulkhead per upstream: at most `max_concurrency` requests in flight (adaptive by AIMD
//! when enabled). Over the limit a request is shed at once with `overloaded`, so the
//! fallback answers instead of a queue building up in front of a struggling AI.
//!
//! Routes share an upstream's limit by criticality (`proxy::limit_share`): where a more
//! critical route calls the same upstream, a low route may fill at most half of the limit
//! and a medium one 80%, so under overload the low-criticality routes are shed first.
//!
//! A call dropped at or after the route deadline (the deadline layer above gave up on it)
//! still feeds the adaptive limit, as a timeout: a hanging AI must shrink the limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use tokio::time::Instant;

use super::breaker::outcome_of;
use crate::breaker::{CallOutcome, ConcurrencyLimiter, FailureKind, LimitPermit};
use crate::exchange::error::{ErrorKind, ProxyError};
use crate::exchange::{ProxyRequest, ProxyResponse};
use crate::telemetry;

#[derive(Clone, Debug)]
pub struct LimitLayer {
    limiter: Arc<ConcurrencyLimiter>,
    upstream: Arc<str>,
    share: f64,
}

impl LimitLayer {
    /// `share`: the part of the limit this route may fill (1.0: all of it).
    pub fn new(limiter: Arc<ConcurrencyLimiter>, upstream: Arc<str>, share: f64) -> Self {
        LimitLayer {
            limiter,
            upstream,
            share,
        }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;
    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            limiter: self.limiter.clone(),
            upstream: self.upstream.clone(),
            share: self.share,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Limit<S> {
    inner: S,
    limiter: Arc<ConcurrencyLimiter>,
    upstream: Arc<str>,
    share: f64,
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
        let Some(permit) = self.limiter.try_acquire_share(self.share) else {
            metrics::counter!(telemetry::SHED_TOTAL, "route" => req.meta.route.name.clone(), "upstream" => self.upstream.to_string()).increment(1);
            req.meta.refused_by(Some(&self.upstream), None);
            let e = ProxyError::from(ErrorKind::Overloaded);
            return Box::pin(std::future::ready(Err(e)));
        };
        let mut guard = LimitGuard {
            permit: Some(permit),
            started: Instant::now(),
            deadline: req.meta.deadline,
            limiter: self.limiter.clone(),
            upstream: self.upstream.clone(),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            if let Some(permit) = guard.permit.take() {
                if let Some(outcome) = outcome_of(&result).and_then(CallOutcome::for_limit) {
                    permit.record(outcome, guard.started.elapsed());
                }
            }
            guard.publish();
            result
        })
    }
}

/// Holds the bulkhead slot of one call. Dropped with the slot still held, the call was
/// abandoned: past the route deadline that is a timeout for the adaptive limit; before it
/// (the client went away) the slot is just freed.
struct LimitGuard {
    permit: Option<LimitPermit>,
    started: Instant,
    deadline: Instant,
    limiter: Arc<ConcurrencyLimiter>,
    upstream: Arc<str>,
}

impl LimitGuard {
    fn publish(&self) {
        metrics::gauge!(telemetry::CONCURRENCY_LIMIT, "upstream" => self.upstream.to_string())
            .set(self.limiter.limit() as f64);
    }
}

impl Drop for LimitGuard {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let now = Instant::now();
        if now >= self.deadline {
            permit.record(
                CallOutcome::Failure(FailureKind::Timeout),
                now - self.started,
            );
            self.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::LimitSettings;
    use crate::exchange::{full_body, test_request};
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
        let svc = LimitLayer::new(limiter.clone(), Arc::from("ai"), 1.0)
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

    #[tokio::test(start_paused = true)]
    async fn calls_dropped_at_the_route_deadline_shrink_the_adaptive_limit() {
        let limiter = Arc::new(ConcurrencyLimiter::new(LimitSettings {
            initial: 8,
            min: 1,
            max: 8,
            adaptive: true,
        }));
        let (mock, mut handle) = tower_test::mock::pair::<ProxyRequest, ProxyResponse>();
        // The deadline above drops the hanging call; nothing below ever answers.
        let svc = tower::ServiceBuilder::new()
            .layer(crate::layers::timeout::DeadlineLayer)
            .layer(LimitLayer::new(limiter.clone(), Arc::from("ai"), 1.0))
            .service(mock.map_err(|e| ProxyError::from(ErrorKind::Internal(e.to_string()))));
        handle.allow(100);
        for _ in 0..10 {
            let call = tokio::spawn(
                svc.clone()
                    .oneshot(test_request(Duration::from_millis(100))),
            );
            let (_req, _respond) = handle.next_request().await.unwrap();
            let err = call.await.unwrap().unwrap_err();
            assert!(matches!(err.kind, ErrorKind::Timeout(_)));
        }
        assert_eq!(limiter.in_flight(), 0);
        assert!(
            limiter.limit() <= 3,
            "limit {} after 10 timeouts",
            limiter.limit()
        );
        // A call the client abandons before the deadline frees its slot, judging nothing.
        let before = limiter.limit();
        let call = tokio::spawn(
            svc.clone()
                .oneshot(test_request(Duration::from_millis(100))),
        );
        let (_req, _respond) = handle.next_request().await.unwrap();
        call.abort();
        let _ = call.await;
        assert_eq!(limiter.in_flight(), 0);
        assert_eq!(limiter.limit(), before);
    }
}
