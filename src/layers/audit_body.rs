//! The response body seen by the decision log: digests what streams to the client and
//! hands the decision record over when the body ends (or the client goes away). In
//! `block` mode, when the log's channel is full, the last frame (or the end) is held back
//! until the record is handed over, for at most `[audit] block_timeout_ms`: backpressure
//! with a bound. A body dropped meanwhile hands its record on through the submission's
//! drop, so no record is ever lost uncounted. The request path never waits on the disk.
//! An upstream body that fails mid-way (the AI reset the connection) is recorded as
//! `outcome: error`, `reason: connect_error`, with the status that was sent.
//! A body cut off after it began (the client left mid-answer, or was dropped at
//! `server.response_write_timeout_ms`) is recorded as `cancelled`, status 499: the client
//! never had the whole answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::audit::{AuditHandle, Decision, DigestStream, Entry, Submission};
use crate::exchange::{BoxError, ProxyBody};

/// How a request whose client went away is recorded (nginx's "client closed request").
pub(crate) const CANCELLED: &str = "cancelled";
pub(crate) const CANCELLED_STATUS: u16 = 499;

/// A record waiting for its body to end.
pub struct Pending {
    pub record: Decision,
    pub input: Bytes,
    pub started: tokio::time::Instant,
}

/// A hand-over in progress, and what the body holds back until it is done: the last
/// frame, or (`None`) the end of the body.
type HandingOver = (Submission, Option<Frame<Bytes>>);

pin_project! {
    pub struct AuditBody {
        #[pin]
        inner: ProxyBody,
        handle: AuditHandle,
        digest: Option<DigestStream>,
        pending: Option<Pending>,
        handing_over: Option<HandingOver>,
        // A frame went out: a drop before the end cuts the answer short.
        started: bool,
    }

    impl PinnedDrop for AuditBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // The client went away before the end: record what was sent. (A hand-over in
            // progress passes its record on when `handing_over` drops.)
            if let Some(mut entry) = finish(this.pending, this.digest, this.handle) {
                if *this.started {
                    if let Entry::Decision(record) = &mut entry {
                        record.outcome = CANCELLED;
                        record.status = CANCELLED_STATUS;
                    }
                }
                this.handle.submit_now(entry);
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
            handing_over: None,
            started: false,
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

/// Polls the hand-over; when done, releases what it held back.
fn poll_handing_over(
    slot: &mut Option<HandingOver>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    let Some((sub, _)) = slot.as_mut() else {
        return Poll::Ready(None);
    };
    match Pin::new(sub).poll(cx) {
        Poll::Ready(()) => Poll::Ready(slot.take().and_then(|(_, held)| held).map(Ok)),
        Poll::Pending => Poll::Pending,
    }
}

impl Body for AuditBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if this.handing_over.is_some() {
            return poll_handing_over(this.handing_over, cx);
        }
        let (frame, ended) = match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.started = true;
                if let (Some(d), Some(data)) = (this.digest.as_mut(), frame.data_ref()) {
                    d.update(data);
                }
                let last = this.inner.is_end_stream();
                (Some(frame), last)
            }
            Poll::Ready(None) => (None, true),
            Poll::Ready(Some(Err(e))) => {
                // The AI cut the answer short: the client got the head and part of the
                // body, never a whole answer. Recorded as an error at once.
                if let Some(p) = this.pending.as_mut() {
                    p.record.outcome = "error";
                    p.record.reason = Some("connect_error".into());
                }
                if let Some(entry) = finish(this.pending, this.digest, this.handle) {
                    this.handle.submit_now(entry);
                }
                return Poll::Ready(Some(Err(e)));
            }
            Poll::Pending => return Poll::Pending,
        };
        if !ended {
            return Poll::Ready(frame.map(Ok));
        }
        // The end: hand the record over before the last frame goes out, so the server
        // cannot drop the body (it does once the last byte of a known length is written)
        // with the record still waiting.
        let Some(entry) = finish(this.pending, this.digest, this.handle) else {
            return Poll::Ready(frame.map(Ok));
        };
        let sub = this.handle.submit(entry);
        if sub.is_done() {
            return Poll::Ready(frame.map(Ok));
        }
        *this.handing_over = Some((sub, frame));
        poll_handing_over(this.handing_over, cx)
    }

    fn is_end_stream(&self) -> bool {
        // Not over until the record is handed over: hyper polls once more for it.
        self.pending.is_none() && self.handing_over.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
