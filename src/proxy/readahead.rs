//! The AI's answer on its way to the client: read off the upstream connection as fast as
//! the AI sends it, into memory bounded by ONE budget shared by every response
//! (`server.response_buffer_bytes`), so the pooled connection to the AI is released when
//! the answer has arrived, not when a slow client has finished reading it.
//!
//! Each byte read ahead holds a charge on the budget until the server has written it to
//! the socket (the charge rides in the `Bytes` handed to hyper and returns when hyper drops
//! them). A response that finds the budget spent, or that passes
//! `server.max_response_buffer_bytes` of its own, streams the rest at the client's pace,
//! with at most `STREAM_WINDOW` bytes handed to the server and not yet written: its
//! upstream connection is held meanwhile, but its memory stays small (hyper's own write
//! queue would take some 400 KiB per connection). `breakwater_response_buffer_bytes`
//! shows the bytes charged.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::exchange::{BoxError, ProxyBody};
use crate::telemetry;

/// Bytes of a streamed answer handed to the server and not yet written to the socket.
const STREAM_WINDOW: u64 = 32 * 1024;

/// The bytes all responses may hold read ahead of their clients.
#[derive(Debug)]
pub struct ResponseBudget {
    limit: AtomicU64,
    used: AtomicU64,
    gauge: metrics::Gauge,
}

impl ResponseBudget {
    pub fn new(limit: u64) -> Arc<ResponseBudget> {
        Arc::new(ResponseBudget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
            gauge: metrics::gauge!(telemetry::RESPONSE_BUFFER_BYTES),
        })
    }

    /// A reload may change the limit; charges already taken stay until released.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes charged now.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `n` bytes, or `None` when that would pass the limit.
    pub fn try_charge(self: &Arc<Self>, n: u64) -> Option<Charge> {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.checked_add(n).filter(|next| *next <= limit)?;
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        self.gauge.increment(n as f64);
        Some(Charge {
            budget: self.clone(),
            n,
        })
    }
}

/// Bytes charged on the budget; returned when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<ResponseBudget>,
    n: u64,
}

impl Charge {
    /// Adds `n` bytes to this charge, or `false` when that would pass the limit.
    pub fn grow(&mut self, n: u64) -> bool {
        match self.budget.try_charge(n) {
            Some(mut more) => {
                self.n += std::mem::take(&mut more.n);
                true
            }
            None => false,
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.n > 0 {
            self.budget.used.fetch_sub(self.n, Ordering::AcqRel);
            self.budget.gauge.decrement(self.n as f64);
        }
    }
}

/// Bytes that keep their charge until the last reference (hyper's write queue) drops.
struct Charged {
    bytes: Bytes,
    _charge: Charge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// `bytes` carrying `charge` until the last clone is dropped.
pub fn charged(bytes: Bytes, charge: Charge) -> Bytes {
    Bytes::from_owner(Charged {
        bytes,
        _charge: charge,
    })
}

/// What the pump sends the client side.
enum Msg {
    Frame(Result<Frame<Bytes>, BoxError>),
    /// Out of budget: the rest of the upstream body, to be read at the client's pace.
    Rest(Incoming),
}

/// The client body for an upstream answer, read ahead within `budget`, at most
/// `per_response` bytes of it.
///
/// What has already arrived is taken at once, without a task: an answer that came whole
/// with its head (most answers) becomes one charged frame, with no pump task and no
/// channel. Only an answer still arriving gets a pump.
pub fn read_ahead(
    mut body: Incoming,
    budget: &Arc<ResponseBudget>,
    per_response: u64,
) -> ProxyBody {
    let hint = body.size_hint();
    if body.is_end_stream() {
        return body.map_err(BoxError::from).boxed();
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let mut rest = None;
    if per_response == 0 || budget.limit.load(Ordering::Relaxed) == 0 {
        rest = Some(body);
    } else {
        let mut taken = 0u64;
        let mut first: Option<Bytes> = None;
        loop {
            let Some(polled) = body.frame().now_or_never() else {
                // Still arriving: what came goes first, the pump reads the rest.
                if let Some(data) = first.take() {
                    let _ = tx.send(Msg::Frame(Ok(Frame::data(data))));
                }
                tokio::spawn(pump(body, budget.clone(), per_response, taken, tx));
                break;
            };
            let frame = match polled {
                Some(Ok(frame)) => frame,
                None => {
                    // Whole, and at most one data frame: a plain body.
                    return match first {
                        Some(data) if rx.is_empty() => crate::exchange::full_body(data),
                        other => {
                            if let Some(data) = other {
                                let _ = tx.send(Msg::Frame(Ok(Frame::data(data))));
                            }
                            drop(tx);
                            ReadAhead::new(rx, None, hint).boxed()
                        }
                    };
                }
                Some(Err(e)) => {
                    if let Some(data) = first.take() {
                        let _ = tx.send(Msg::Frame(Ok(Frame::data(data))));
                    }
                    let _ = tx.send(Msg::Frame(Err(e.into())));
                    break;
                }
            };
            let frame = match frame.into_data() {
                Ok(data) => {
                    let n = data.len() as u64;
                    let charge = (taken + n <= per_response)
                        .then(|| budget.try_charge(n))
                        .flatten();
                    let Some(charge) = charge else {
                        // Out of budget: this frame uncharged, then the rest streams.
                        if let Some(data) = first.take() {
                            let _ = tx.send(Msg::Frame(Ok(Frame::data(data))));
                        }
                        let _ = tx.send(Msg::Frame(Ok(Frame::data(data))));
                        rest = Some(body);
                        break;
                    };
                    taken += n;
                    Frame::data(charged(data, charge))
                }
                Err(frame) => frame,
            };
            // Hold one data frame back: if it is the whole answer it needs no channel.
            if let Some(data) = first.take() {
                let _ = tx.send(Msg::Frame(Ok(Frame::data(data))));
            }
            match frame.into_data() {
                Ok(data) => first = Some(data),
                Err(frame) => {
                    let _ = tx.send(Msg::Frame(Ok(frame)));
                }
            }
            // A body of known length that is complete says so: no poll for its end.
            if body.is_end_stream() {
                if let Some(data) = first.take() {
                    if rx.is_empty() {
                        return crate::exchange::full_body(data);
                    }
                    let _ = tx.send(Msg::Frame(Ok(Frame::data(data))));
                }
                drop(tx);
                return ReadAhead::new(rx, None, hint).boxed();
            }
        }
    }
    ReadAhead::new(rx, rest, hint).boxed()
}

/// Reads the upstream body into charged frames until it ends, the client side goes away,
/// or the budget says stop (then the rest is handed over). The channel holds only charged
/// bytes, so it is bounded by the budget.
async fn pump(
    mut body: Incoming,
    budget: Arc<ResponseBudget>,
    per_response: u64,
    mut taken: u64,
    tx: mpsc::UnboundedSender<Msg>,
) {
    loop {
        let frame = tokio::select! {
            // The client is gone: stop reading (the upstream connection closes).
            _ = tx.closed() => return,
            frame = body.frame() => frame,
        };
        let frame = match frame {
            None => return,
            Some(Err(e)) => {
                let _ = tx.send(Msg::Frame(Err(e.into())));
                return;
            }
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let n = data.len() as u64;
                let charge = (taken + n <= per_response)
                    .then(|| budget.try_charge(n))
                    .flatten();
                let Some(charge) = charge else {
                    // This frame is already read: it goes first, uncharged, then the rest
                    // streams.
                    let _ = tx.send(Msg::Frame(Ok(Frame::data(data))));
                    let _ = tx.send(Msg::Rest(body));
                    return;
                };
                taken += n;
                Frame::data(charged(data, charge))
            }
            Err(frame) => frame,
        };
        if tx.send(Msg::Frame(Ok(frame))).is_err() {
            return;
        }
    }
}

/// The client side: frames as the pump read them, then (if handed over) the rest.
struct ReadAhead {
    rx: mpsc::UnboundedReceiver<Msg>,
    rest: Option<Incoming>,
    window: Arc<Window>,
    hint: SizeHint,
    /// Bytes still to come of a known length: hyper stops polling (and drops the body)
    /// after the last byte, so the end must be known then (the decision record waits for it).
    left: Option<u64>,
    ended: bool,
}

impl ReadAhead {
    fn new(rx: mpsc::UnboundedReceiver<Msg>, rest: Option<Incoming>, hint: SizeHint) -> Self {
        ReadAhead {
            rx,
            rest,
            window: Arc::new(Window::default()),
            left: hint.exact(),
            hint,
            ended: false,
        }
    }

    fn sent(&mut self, frame: &Result<Frame<Bytes>, BoxError>) {
        if let (Some(left), Ok(frame)) = (self.left.as_mut(), frame) {
            if let Some(data) = frame.data_ref() {
                *left = left.saturating_sub(data.len() as u64);
            }
        }
    }
}

impl Body for ReadAhead {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.rest.is_some() {
                if !self.window.open(cx) {
                    return Poll::Pending;
                }
                let window = self.window.clone();
                let Some(rest) = self.rest.as_mut() else {
                    return Poll::Ready(None);
                };
                let polled = Pin::new(rest).poll_frame(cx).map_err(BoxError::from);
                let polled = polled.map(|f| f.map(|f| f.map(|f| window.track(f))));
                match &polled {
                    Poll::Ready(None) => self.ended = true,
                    Poll::Ready(Some(frame)) => self.sent(frame),
                    Poll::Pending => {}
                }
                return polled;
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Msg::Frame(frame))) => {
                    self.sent(&frame);
                    return Poll::Ready(Some(frame));
                }
                Poll::Ready(Some(Msg::Rest(body))) => self.rest = Some(body),
                Poll::Ready(None) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.left == Some(0) || self.rest.as_ref().is_some_and(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// The bytes of one streamed answer the server holds unwritten.
#[derive(Default)]
struct Window {
    unwritten: AtomicU64,
    waker: AtomicWaker,
}

impl Window {
    /// Room for another frame; else the task is woken when written bytes are released.
    fn open(&self, cx: &mut Context<'_>) -> bool {
        if self.unwritten.load(Ordering::Acquire) < STREAM_WINDOW {
            return true;
        }
        self.waker.register(cx.waker());
        self.unwritten.load(Ordering::Acquire) < STREAM_WINDOW
    }

    fn track(self: &Arc<Self>, frame: Frame<Bytes>) -> Frame<Bytes> {
        match frame.into_data() {
            Ok(data) => {
                self.unwritten
                    .fetch_add(data.len() as u64, Ordering::AcqRel);
                Frame::data(Bytes::from_owner(Unwritten {
                    bytes: data,
                    window: self.clone(),
                }))
            }
            Err(frame) => frame,
        }
    }
}

/// Streamed bytes; dropped by the server once written.
struct Unwritten {
    bytes: Bytes,
    window: Arc<Window>,
}

impl AsRef<[u8]> for Unwritten {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Unwritten {
    fn drop(&mut self) {
        self.window
            .unwritten
            .fetch_sub(self.bytes.len() as u64, Ordering::AcqRel);
        self.window.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_stay_within_the_limit_and_return_when_dropped() {
        let budget = ResponseBudget::new(100);
        let a = budget.try_charge(60).unwrap();
        assert!(budget.try_charge(41).is_none(), "over the limit");
        let mut b = budget.try_charge(40).unwrap();
        assert_eq!(budget.used(), 100);
        assert!(!b.grow(1));
        drop(a);
        assert!(b.grow(60));
        assert_eq!(budget.used(), 100);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn charged_bytes_hold_their_charge_until_the_last_clone_drops() {
        let budget = ResponseBudget::new(10);
        let bytes = charged(
            Bytes::from_static(b"0123456789"),
            budget.try_charge(10).unwrap(),
        );
        let slice = bytes.slice(2..4);
        drop(bytes);
        assert_eq!(budget.used(), 10);
        assert_eq!(&slice[..], b"23");
        drop(slice);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_lower_limit_holds_back_new_charges_only() {
        let budget = ResponseBudget::new(100);
        let held = budget.try_charge(80).unwrap();
        budget.set_limit(50);
        assert!(budget.try_charge(1).is_none());
        drop(held);
        assert!(budget.try_charge(50).is_some());
    }
}
