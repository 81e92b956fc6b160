//! Total deadline: the route's `timeout_ms`, fixed when the request arrived, covers every
//! attempt and backoff below it. Sits inside the fallback layer so a timeout still gets a
//! fallback answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use crate::proxy::error::{ErrorKind, ProxyError};
use crate::proxy::types::{ProxyRequest, ProxyResponse};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::types::test_request;
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
}
