//! Circuit breaker layer: asks the route's (or variant's) breaker for a permit before each
//! attempt and reports how the attempt went. When the breaker is open the AI is not called
//! at all and the request fails fast with `breaker_open`, for the fallback layer to answer.
//!
//! Sits inside the retry layer (each attempt is judged) and outside the bulkhead (a request
//! the bulkhead sheds says nothing about the AI's health).
//!
//! A streamed answer (its body not read whole by a layer below) is judged when its body
//! ends, not when its head arrives: an AI that cuts the connection mid-response fails the
//! call, as a buffered answer's cut body does in `forward`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::breaker::{BreakerSettings, BreakerState, CallOutcome, CircuitBreaker, Mode, Permit};
use crate::exchange::error::{ErrorKind, ProxyError};
use crate::exchange::{BoxError, ProxyBody, ProxyRequest, ProxyResponse};
use crate::telemetry;

/// A breaker shared by every request of a route (or variant), kept across reloads while its
/// settings are unchanged.
#[derive(Debug)]
pub struct SharedBreaker {
    pub route: String,
    pub variant: Option<String>,
    pub settings: BreakerSettings,
    machine: Mutex<CircuitBreaker>,
    /// The state last published, so every change is counted once, including the
    /// clock-driven open -> half-open (seen by the next call or the 1 s gauge refresh).
    last: std::sync::atomic::AtomicU8,
}

impl SharedBreaker {
    pub fn new(route: &str, variant: Option<&str>, settings: BreakerSettings) -> Arc<Self> {
        let b = Arc::new(SharedBreaker {
            route: route.to_string(),
            variant: variant.map(str::to_string),
            machine: Mutex::new(CircuitBreaker::new(settings.clone())),
            settings,
            last: std::sync::atomic::AtomicU8::new(BreakerState::Closed.metric_value()),
        });
        b.publish_state(Instant::now());
        b
    }

    fn with<T>(&self, f: impl FnOnce(&mut CircuitBreaker) -> T) -> Option<T> {
        // A poisoned lock means a panic elsewhere; the breaker then fails open (lets
        // traffic through) rather than taking the route down.
        self.machine.lock().ok().map(|mut m| f(&mut m))
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        self.with(|m| m.state(now)).unwrap_or(BreakerState::Closed)
    }

    pub fn stats(&self, now: Instant) -> Option<crate::breaker::BreakerStats> {
        self.with(|m| m.stats(now))
    }

    pub fn set_mode(&self, mode: Mode) {
        let now = Instant::now();
        self.with(|m| m.set_mode(mode, now));
        self.publish_state(now);
    }

    fn labels(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}", self.route, v),
            None => self.route.clone(),
        }
    }

    pub fn publish_state(&self, now: Instant) {
        let state = self.state(now);
        let before = self
            .last
            .swap(state.metric_value(), std::sync::atomic::Ordering::Relaxed);
        if before != state.metric_value() {
            self.count_transition(state);
        }
        metrics::gauge!(telemetry::BREAKER_STATE, "route" => self.labels())
            .set(state.metric_value() as f64);
    }

    fn count_transition(&self, to: BreakerState) {
        metrics::counter!(telemetry::BREAKER_TRANSITIONS, "route" => self.labels(), "to" => to.as_str()).increment(1);
        tracing::warn!(route = %self.route, variant = ?self.variant, to = to.as_str(), "circuit breaker changed state");
    }

    pub(crate) fn acquire(&self, now: Instant) -> Result<Option<Permit>, std::time::Duration> {
        match self.with(|m| m.try_acquire(now)) {
            Some(Ok(p)) => {
                if p.is_probe() {
                    // Half-open is reached by the clock: publish it with its first probe.
                    self.publish_state(now);
                }
                Ok(Some(p))
            }
            Some(Err(rejected)) => Err(rejected.retry_in),
            None => Ok(None),
        }
    }

    pub(crate) fn record(
        &self,
        permit: Permit,
        outcome: CallOutcome,
        latency: std::time::Duration,
        now: Instant,
    ) {
        if let Some(Some(_)) = self.with(|m| m.record(permit, outcome, latency, now)) {
            self.publish_state(now);
        }
    }

    fn release(&self, permit: Permit, now: Instant) {
        self.with(|m| m.release(permit, now));
    }

    /// Ends an automatic open period now (see `CircuitBreaker::end_open_period`).
    pub fn end_open_period(&self, now: Instant) {
        if let Some(Some(_)) = self.with(|m| m.end_open_period(now)) {
            self.publish_state(now);
        }
    }

    /// Asks for a permit for one call that must end by `deadline`; `Err(retry_in)` when the
    /// breaker refuses.
    pub fn guard(
        self: &Arc<Self>,
        now: Instant,
        deadline: Instant,
    ) -> Result<PermitGuard, std::time::Duration> {
        Ok(PermitGuard {
            breaker: self.clone(),
            permit: self.acquire(now)?,
            started: now,
            deadline,
        })
    }
}

#[derive(Clone, Debug)]
pub struct BreakerLayer {
    breaker: Arc<SharedBreaker>,
}

impl BreakerLayer {
    pub fn new(breaker: Arc<SharedBreaker>) -> Self {
        BreakerLayer { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;
    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Breaker<S> {
    inner: S,
    breaker: Arc<SharedBreaker>,
}

/// A breaker permit that cannot leak: the data path and the replay path both hold one.
/// `finish` reports how the call went; dropped unfinished (future cancelled, early return),
/// it counts as a timeout when past the deadline and otherwise just gives the (half-open
/// probe) slot back.
#[derive(Debug)]
pub struct PermitGuard {
    breaker: Arc<SharedBreaker>,
    permit: Option<Permit>,
    started: Instant,
    deadline: Instant,
}

impl PermitGuard {
    /// Reports the call: `Some(outcome)` is judged, `None` (says nothing about the AI's
    /// health) just releases the slot.
    pub fn finish(mut self, outcome: Option<CallOutcome>) {
        if let Some(permit) = self.permit.take() {
            let now = Instant::now();
            match outcome {
                Some(outcome) => self
                    .breaker
                    .record(permit, outcome, now - self.started, now),
                None => self.breaker.release(permit, now),
            }
        }
    }
}

impl Drop for PermitGuard {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let now = Instant::now();
            if now >= self.deadline {
                let outcome = CallOutcome::Failure(crate::breaker::FailureKind::Timeout);
                self.breaker
                    .record(permit, outcome, now - self.started, now);
            } else {
                self.breaker.release(permit, now);
            }
        }
    }
}

impl<S> Service<ProxyRequest> for Breaker<S>
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
        let guard = match self.breaker.guard(Instant::now(), req.meta.deadline) {
            Ok(g) => g,
            Err(retry_in) => {
                let variant = self.breaker.variant.as_deref().map(Arc::<str>::from);
                req.meta.refused_by(None, variant.as_ref());
                let e = ProxyError::from(ErrorKind::BreakerOpen { retry_in });
                return Box::pin(std::future::ready(Err(e)));
            }
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let outcome = outcome_of(&result).and_then(CallOutcome::for_breaker);
            match result {
                Ok(mut resp) if resp.body_bytes.is_none() && !resp.http.body().is_end_stream() => {
                    // Judged when the body ends: the permit travels with it.
                    let body = std::mem::replace(
                        resp.http.body_mut(),
                        crate::exchange::full_body(Bytes::new()),
                    );
                    *resp.http.body_mut() = BodyExt::boxed(JudgedBody {
                        inner: body,
                        guard: Some(guard),
                        outcome,
                    });
                    Ok(resp)
                }
                result => {
                    guard.finish(outcome);
                    result
                }
            }
        })
    }
}

pin_project! {
    /// A streamed answer's body holding its breaker permit. The end of the body reports the
    /// status's verdict; a body error (the AI cut the connection) reports a failure;
    /// dropped before either (the client went away), the permit guard decides (a timeout
    /// when past the deadline, else nothing).
    struct JudgedBody {
        #[pin]
        inner: ProxyBody,
        guard: Option<PermitGuard>,
        outcome: Option<CallOutcome>,
    }
}

impl Body for JudgedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let verdict = match &polled {
            Poll::Ready(None) => Some(*this.outcome),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => Some(*this.outcome),
            Poll::Ready(Some(Err(_))) => Some(Some(CallOutcome::Failure(
                crate::breaker::FailureKind::ConnectError,
            ))),
            _ => None,
        };
        if let Some(outcome) = verdict {
            if let Some(guard) = this.guard.take() {
                guard.finish(outcome);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How an attempt counts for a breaker; `None` when it says nothing about the AI's health
/// (shed locally, or stopped by another guard).
pub fn outcome_of(result: &Result<ProxyResponse, ProxyError>) -> Option<CallOutcome> {
    match result {
        Ok(resp) => Some(crate::breaker::classify_status(resp.http.status().as_u16())),
        Err(e) => e.call_outcome(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::error::ErrorKind;
    use crate::exchange::{full_body, test_request};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;
    use tower::ServiceExt;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 2,
            failure_rate: None,
            open: Duration::from_secs(30),
            open_max: Duration::from_secs(30),
            half_open_probes: 1,
            ..BreakerSettings::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn open_breaker_fails_fast_without_calling_inner() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let svc = BreakerLayer::new(SharedBreaker::new("t", None, settings())).layer(
            tower::service_fn(move |_r: ProxyRequest| {
                c.fetch_add(1, Ordering::SeqCst);
                async {
                    Err::<ProxyResponse, _>(ProxyError::from(ErrorKind::Connect("refused".into())))
                }
            }),
        );
        for _ in 0..2 {
            let e = svc
                .clone()
                .oneshot(test_request(Duration::from_secs(1)))
                .await
                .unwrap_err();
            assert!(matches!(e.kind, ErrorKind::Connect(_)));
        }
        let e = svc
            .clone()
            .oneshot(test_request(Duration::from_secs(1)))
            .await
            .unwrap_err();
        assert!(matches!(e.kind, ErrorKind::BreakerOpen { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn client_errors_and_local_refusals_do_not_count() {
        let breaker = SharedBreaker::new("t", None, settings());
        let status = Arc::new(AtomicU32::new(404));
        let s = status.clone();
        let svc =
            BreakerLayer::new(breaker.clone()).layer(tower::service_fn(move |_r: ProxyRequest| {
                let code = s.load(Ordering::SeqCst);
                async move {
                    if code == 0 {
                        return Err(ProxyError::from(ErrorKind::Overloaded));
                    }
                    let mut http = http::Response::new(full_body("x"));
                    *http.status_mut() = http::StatusCode::from_u16(code as u16).unwrap();
                    Ok(ProxyResponse::ai(http))
                }
            }));
        for _ in 0..5 {
            svc.clone()
                .oneshot(test_request(Duration::from_secs(1)))
                .await
                .unwrap();
        }
        status.store(0, Ordering::SeqCst);
        for _ in 0..5 {
            let _ = svc
                .clone()
                .oneshot(test_request(Duration::from_secs(1)))
                .await;
        }
        assert_eq!(breaker.state(Instant::now()), BreakerState::Closed);
    }

    /// A streamed body: one frame, then either the end or an error.
    fn streamed(fail: bool) -> ProxyBody {
        let frames = futures_util::stream::iter([
            Ok(Frame::data(Bytes::from_static(b"part"))),
            if fail {
                Err(BoxError::from("connection reset"))
            } else {
                Ok(Frame::data(Bytes::from_static(b"rest")))
            },
        ]);
        BodyExt::boxed(http_body_util::StreamBody::new(frames))
    }

    async fn call_and_read(breaker: &Arc<SharedBreaker>, fail: bool) -> bool {
        let svc = BreakerLayer::new(breaker.clone()).layer(tower::service_fn(
            move |_r: ProxyRequest| async move {
                Ok::<_, ProxyError>(ProxyResponse::ai(http::Response::new(streamed(fail))))
            },
        ));
        let resp = svc
            .oneshot(test_request(Duration::from_secs(1)))
            .await
            .unwrap();
        resp.http.into_body().collect().await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_cut_short_is_a_failure_and_one_read_to_the_end_a_success() {
        let breaker = SharedBreaker::new("t", None, settings());
        assert!(!call_and_read(&breaker, true).await);
        let s = breaker.stats(Instant::now()).unwrap();
        assert_eq!(s.consecutive_failures, 1, "{s:?}");
        assert!(call_and_read(&breaker, false).await);
        assert_eq!(
            breaker.stats(Instant::now()).unwrap().consecutive_failures,
            0
        );
        assert!(!call_and_read(&breaker, true).await);
        assert!(!call_and_read(&breaker, true).await);
        assert_eq!(breaker.state(Instant::now()), BreakerState::Open);
    }
}
