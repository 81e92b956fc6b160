//! Dead-letter hand-off: a replayable request that the AI did not answer (whatever the
//! reason: timeout, 5xx, breaker open, kill switch, shed) is written to the DLQ spool
//! before the client hears back, so it can be replayed once the AI has recovered. The
//! outcome goes into the request's facts, where the observe layer reads it for
//! `x-breakwater-dlq` and the decision record.
//!
//! The hand-off runs as a task of its own: a client that goes away while the spool is
//! syncing (an h2 reset, a disconnect, the end of the shutdown grace) drops only its wait,
//! never the dead letter.
//!
//! Sits inside the fallback layer (it sees the failure before a fallback hides it) and
//! outside the kill switch (a disabled AI still owes these requests an answer).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use crate::exchange::error::ProxyError;
use crate::exchange::{DlqOutcome, ProxyRequest, ProxyResponse, Reason};

pub type DlqFuture = Pin<Box<dyn Future<Output = (DlqOutcome, String)> + Send>>;

/// Where failed replayable requests go. The implementation bounds its own wait (group
/// fsync) and answers `rejected` when it cannot keep the message.
pub trait DeadLetters: Send + Sync {
    fn enqueue(&self, req: &ProxyRequest, reason: Reason) -> DlqFuture;
}

impl std::fmt::Debug for dyn DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeadLetters")
    }
}

#[derive(Clone, Debug)]
pub struct DlqLayer {
    sink: Arc<dyn DeadLetters>,
}

impl DlqLayer {
    pub fn new(sink: Arc<dyn DeadLetters>) -> Self {
        DlqLayer { sink }
    }
}

impl<S> Layer<S> for DlqLayer {
    type Service = Dlq<S>;
    fn layer(&self, inner: S) -> Dlq<S> {
        Dlq {
            inner,
            sink: self.sink.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Dlq<S> {
    inner: S,
    sink: Arc<dyn DeadLetters>,
}

impl<S> Service<ProxyRequest> for Dlq<S>
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
        let sink = self.sink.clone();
        let fut = self.inner.call(req.clone());
        Box::pin(async move {
            let e = match fut.await {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            let meta = req.meta.clone();
            {
                let mut facts = meta.facts();
                facts.failure = Some(e.reason());
            }
            meta.dlq_started();
            let enqueue = sink.enqueue(&req, e.reason());
            let task = tokio::spawn(async move {
                let (outcome, msg_id) = enqueue.await;
                meta.dlq_finished(outcome, Arc::from(msg_id));
            });
            if let Err(join) = task.await {
                // Only a runtime shutting down cancels it; the spool may still have it.
                tracing::warn!(request_id = %req.meta.request_id, error = %join, "DLQ hand-off did not finish");
            }
            Err(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::error::ErrorKind;
    use crate::exchange::{test_request, DlqState};
    use std::sync::Mutex;
    use std::time::Duration;
    use tower::ServiceExt;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, Reason)>>);
    impl DeadLetters for Recorder {
        fn enqueue(&self, req: &ProxyRequest, reason: Reason) -> DlqFuture {
            self.0
                .lock()
                .unwrap()
                .push((req.meta.request_id.to_string(), reason));
            Box::pin(async { (DlqOutcome::Spooled, "msg-1".to_string()) })
        }
    }

    #[tokio::test]
    async fn failures_are_handed_over_and_successes_are_not() {
        let rec = Arc::new(Recorder::default());
        let failing =
            DlqLayer::new(rec.clone()).layer(tower::service_fn(|_r: ProxyRequest| async {
                Err::<ProxyResponse, _>(ProxyError::from(ErrorKind::AiDisabled))
            }));
        let req = test_request(Duration::from_secs(1));
        let meta = req.meta.clone();
        failing.oneshot(req).await.unwrap_err();
        assert_eq!(
            meta.facts().dlq,
            DlqState::Done(DlqOutcome::Spooled, Arc::from("msg-1"))
        );
        assert_eq!(
            rec.0.lock().unwrap().as_slice(),
            &[("req-1".to_string(), Reason::AiDisabled)]
        );
    }
}
