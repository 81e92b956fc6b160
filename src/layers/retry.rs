//! Retries with a budget. A retry happens only when another attempt is safe (the request
//! never reached the AI, or the method is idempotent, or the client sent an
//! `Idempotency-Key`), the budget allows it (so a failing AI never sees a retry storm),
//! and the backoff (or the AI's `Retry-After`) plus the attempt itself still fit before the
//! route's deadline: after the backoff, at least `attempt_timeout_ms` (or `MIN_ATTEMPT`
//! without it) must be left, so a retry never starts only to be cut by the deadline.
//!
//! Sits under the deadline layer and above the breaker: every attempt is judged by the
//! breaker, and an open breaker ends the retries at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::breaker::{Backoff, RetryBudget};
use crate::config::RetryConfig;
use crate::exchange::error::ProxyError;
use crate::exchange::{ProxyRequest, ProxyResponse};
use crate::telemetry;

/// The least time a retry needs before the deadline when `attempt_timeout_ms` is unset:
/// with less left, an AI call can hardly connect and answer, and would only add load.
const MIN_ATTEMPT: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub struct RetryPolicy {
    pub config: RetryConfig,
    pub budget: Arc<RetryBudget>,
    backoff: Backoff,
}

impl RetryPolicy {
    pub fn new(config: RetryConfig, budget: Arc<RetryBudget>) -> Arc<Self> {
        let backoff = Backoff::new(config.backoff_base, config.backoff_max);
        Arc::new(RetryPolicy {
            config,
            budget,
            backoff,
        })
    }
}

/// RFC 9110 §9.2.2 idempotent methods.
fn idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::TRACE
    )
}

#[derive(Clone, Debug)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
}

impl RetryLayer {
    pub fn new(policy: Arc<RetryPolicy>) -> Self {
        RetryLayer { policy }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
}

impl<S> Service<ProxyRequest> for Retry<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let policy = self.policy.clone();
        // The ready clone serves the first attempt; later attempts use fresh clones.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            policy.budget.deposit(Instant::now());
            let safe_after_send = idempotent(req.http.method()) || req.meta.idempotency_key;
            let mut attempt = 1u32;
            let mut result = inner.call(req.clone()).await;
            loop {
                let err = match result {
                    Ok(resp) => return Ok(resp),
                    Err(e) => e,
                };
                if attempt >= policy.config.max_attempts
                    || !err.is_retryable()
                    || (err.was_sent() && !safe_after_send)
                {
                    return Err(err);
                }
                let delay = policy
                    .backoff
                    .delay(attempt)
                    .max(err.retry_after().unwrap_or_default());
                let now = Instant::now();
                let needs = policy.config.attempt_timeout.unwrap_or(MIN_ATTEMPT);
                if now + delay + needs > req.meta.deadline {
                    return Err(err);
                }
                if !policy.budget.try_withdraw(now) {
                    tracing::debug!(route = %req.meta.route.name, "retry budget exhausted");
                    return Err(err);
                }
                metrics::counter!(telemetry::RETRIES_TOTAL, "route" => req.meta.route.name.clone())
                    .increment(1);
                tokio::time::sleep(delay).await;
                attempt += 1;
                let svc = inner.clone();
                result = svc.oneshot(req.clone()).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::error::ErrorKind;
    use crate::exchange::test_request;

    /// A budget floor of 1/s lets single requests retry; `ratio` governs bulk traffic.
    fn policy(max_attempts: u32, ratio: f64) -> Arc<RetryPolicy> {
        let floor = if ratio >= 1.0 { 1 } else { 0 };
        RetryPolicy::new(
            RetryConfig {
                max_attempts,
                backoff_base: Duration::from_millis(10),
                backoff_max: Duration::from_millis(20),
                budget_ratio: ratio,
                budget_min_per_s: floor,
                attempt_timeout: None,
            },
            Arc::new(RetryBudget::new(ratio, floor, Duration::from_secs(10))),
        )
    }

    fn failing(
        calls: Arc<std::sync::atomic::AtomicU32>,
        kind: fn() -> ErrorKind,
    ) -> impl Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError, Future = impl Send>
           + Clone
           + Send {
        tower::service_fn(move |_req: ProxyRequest| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let e = ProxyError::from(kind());
            async move { Err::<ProxyResponse, _>(e) }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn idempotent_get_is_retried_up_to_max_attempts() {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let svc =
            RetryLayer::new(policy(3, 1.0)).layer(failing(calls.clone(), || ErrorKind::Status {
                status: http::StatusCode::BAD_GATEWAY,
                retry_after: None,
            }));
        let r = svc.oneshot(test_request(Duration::from_secs(5))).await;
        assert!(r.is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn sent_post_without_idempotency_key_is_not_retried_but_unsent_is() {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let svc =
            RetryLayer::new(policy(3, 1.0)).layer(failing(calls.clone(), || ErrorKind::Status {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                retry_after: None,
            }));
        let mut req = test_request(Duration::from_secs(5));
        *req.http.method_mut() = http::Method::POST;
        assert!(svc.oneshot(req.clone()).await.is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);

        // A connect error means the POST never left: safe to retry.
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let svc = RetryLayer::new(policy(3, 1.0)).layer(failing(calls.clone(), || {
            ErrorKind::Connect("refused".into())
        }));
        assert!(svc.oneshot(req).await.is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_beyond_the_deadline_ends_retries() {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let svc =
            RetryLayer::new(policy(3, 1.0)).layer(failing(calls.clone(), || ErrorKind::Status {
                status: http::StatusCode::TOO_MANY_REQUESTS,
                retry_after: Some(Duration::from_secs(30)),
            }));
        assert!(svc
            .oneshot(test_request(Duration::from_secs(1)))
            .await
            .is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_retries_across_requests() {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let svc = RetryLayer::new(policy(3, 0.1)).layer(failing(calls.clone(), || {
            ErrorKind::Timeout(Duration::from_millis(5))
        }));
        for _ in 0..100 {
            let _ = svc
                .clone()
                .oneshot(test_request(Duration::from_secs(5)))
                .await;
        }
        let calls = calls.load(std::sync::atomic::Ordering::SeqCst);
        // 100 originals plus at most ~10% retries, far below the 300 unbudgeted attempts.
        assert!((100..=112).contains(&calls), "{calls} calls");
    }

    /// A service whose first call never answers and whose later calls answer at once.
    fn hangs_once(
        calls: Arc<std::sync::atomic::AtomicU32>,
    ) -> impl Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError, Future = impl Send>
           + Clone
           + Send {
        let svc = tower::service_fn(move |_req: ProxyRequest| {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n == 0 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, ProxyError>(ProxyResponse::ai(http::Response::new(
                    crate::exchange::full_body("ok"),
                )))
            }
        });
        tower::ServiceBuilder::new()
            .layer(crate::layers::timeout::AttemptTimeoutLayer::new(Some(
                Duration::from_millis(200),
            )))
            .service(svc)
    }

    fn with_attempt_timeout(max_attempts: u32) -> Arc<RetryPolicy> {
        let p = policy(max_attempts, 1.0);
        let mut config = p.config.clone();
        config.attempt_timeout = Some(Duration::from_millis(200));
        RetryPolicy::new(config, p.budget.clone())
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_attempt_is_cut_and_retried_within_the_deadline() {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let svc = RetryLayer::new(with_attempt_timeout(2)).layer(hangs_once(calls.clone()));
        let started = Instant::now();
        let r = svc.oneshot(test_request(Duration::from_secs(1))).await;
        assert!(r.is_ok());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(started.elapsed() < Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_starts_without_an_attempt_timeout_left() {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let svc = RetryLayer::new(with_attempt_timeout(3)).layer(hangs_once(calls.clone()));
        // 300 ms deadline: after the first cut at 200 ms, less than 200 ms are left.
        let started = Instant::now();
        let e = svc
            .oneshot(test_request(Duration::from_millis(300)))
            .await
            .unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Timeout(_)));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(started.elapsed(), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn without_attempt_timeout_a_retry_needs_a_minimum_before_the_deadline() {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let svc =
            RetryLayer::new(policy(3, 1.0)).layer(failing(calls.clone(), || ErrorKind::Status {
                status: http::StatusCode::BAD_GATEWAY,
                retry_after: None,
            }));
        // 5 ms deadline, less than MIN_ATTEMPT: only the first try.
        assert!(svc
            .oneshot(test_request(Duration::from_millis(5)))
            .await
            .is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
