//! The response body seen by the decision log: digests what streams to the client and
//! writes the decision record when the body ends (or the client goes away). In `block`
//! mode the end of the body waits for room in the log's channel: backpressure, nothing
//! lost. The request path never waits on the disk itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::audit::{AuditHandle, Decision, DigestStream, Entry};
use crate::proxy::types::{BoxError, ProxyBody};

/// A record waiting for its body to end.
pub struct Pending {
    pub record: Decision,
    pub input: Bytes,
    pub started: tokio::time::Instant,
}

pin_project! {
    pub struct AuditBody {
        #[pin]
        inner: ProxyBody,
        handle: AuditHandle,
        digest: Option<DigestStream>,
        pending: Option<Pending>,
        // In a Mutex only to make the body `Sync` (hyper's boxed body needs it); never
        // contended: only this body polls it.
        submitting: Option<Mutex<Pin<Box<dyn Future<Output = ()> + Send>>>>,
    }

    impl PinnedDrop for AuditBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // The client went away before the end: record what was sent.
            if let Some(entry) = finish(this.pending, this.digest, this.handle) {
                if let Err(entry) = this.handle.try_submit(entry) {
                    let handle = this.handle.clone();
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        rt.spawn(async move { handle.submit(entry).await });
                    }
                }
            }
        }
    }
}

impl AuditBody {
    pub fn new(inner: ProxyBody, handle: AuditHandle, pending: Pending) -> Self {
        let digest = Some(handle.digester().stream());
        AuditBody {
            inner,
            handle,
            digest,
            pending: Some(pending),
            submitting: None,
        }
    }
}

fn finish(
    pending: &mut Option<Pending>,
    digest: &mut Option<DigestStream>,
    handle: &AuditHandle,
) -> Option<Entry> {
    let p = pending.take()?;
    let mut record = p.record;
    record.ts_end = std::time::SystemTime::now();
    record.latency_us = p.started.elapsed().as_micros() as u64;
    record.input_digest = Some(handle.digester().digest(&p.input));
    record.output_digest = digest.take().map(DigestStream::finish);
    Some(Entry::Decision(record))
}

impl Body for AuditBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(fut) = this.submitting.as_mut() {
            let Ok(fut) = fut.get_mut() else {
                return Poll::Ready(None);
            };
            return match fut.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    *this.submitting = None;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            };
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(data)) = (this.digest.as_mut(), frame.data_ref()) {
                    d.update(data);
                }
                // The last frame: hand the record over now, so the body reports its end
                // with this frame and hyper writes the response in one go.
                if this.inner.is_end_stream() {
                    if let Some(entry) = finish(this.pending, this.digest, this.handle) {
                        if let Err(entry) = this.handle.try_submit(entry) {
                            let handle = this.handle.clone();
                            *this.submitting =
                                Some(Mutex::new(Box::pin(
                                    async move { handle.submit(entry).await },
                                )));
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                let Some(entry) = finish(this.pending, this.digest, this.handle) else {
                    return Poll::Ready(None);
                };
                match this.handle.try_submit(entry) {
                    Ok(()) => Poll::Ready(None),
                    Err(entry) => {
                        let handle = this.handle.clone();
                        let mut fut: Pin<Box<dyn Future<Output = ()> + Send>> =
                            Box::pin(async move { handle.submit(entry).await });
                        match fut.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(None),
                            Poll::Pending => {
                                *this.submitting = Some(Mutex::new(fut));
                                Poll::Pending
                            }
                        }
                    }
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not over until the record is handed over: hyper polls once more for it.
        self.pending.is_none() && self.submitting.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
