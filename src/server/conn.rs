//! One HTTP connection (HTTP/1.1 or h2, by hyper-util's auto builder) with the timeouts
//! hyper has no knob for: a per-connection activity tracker enforces the header-read
//! timeout (HTTP/1 and h2), the idle timeout (between requests, or no open h2 stream) and
//! the response write timeout (a client that accepts no byte for that long is dropped, so
//! a slow reader cannot hold its answer, and the memory under it, forever).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::exchange::ProxyBody;

/// hyper's smallest HTTP/1 read buffer (it panics below it; validation keeps the key above).
const MIN_HEAD_BUFFER: usize = 8192;
/// Streams one h2 connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Streams the client reset before breakwater took them up, kept at h2's own default of 20
/// (set here so an upgrade cannot loosen it): past it the connection gets GOAWAY
/// (ENHANCE_YOUR_CALM), the rapid-reset defence (CVE-2023-44487).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams breakwater had to reset for a client's protocol errors before it gives up on the
/// connection with GOAWAY (the "MadeYouReset" pattern, CVE-2025-8671).
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;

/// After an idle close is asked for (GOAWAY, or no keep-alive), the peer gets this long
/// before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// From the accept (or, on HTTP/1, the first byte after an idle spell) to a full head.
    pub(crate) header_read: Duration,
    /// With no request open.
    pub(crate) idle: Duration,
    /// The largest request head (HTTP/1) or header list (h2) read.
    pub(crate) max_header_bytes: usize,
    /// Writes to the client blocked (socket full) this long: the connection is dropped.
    pub(crate) write: Duration,
}

impl Timeouts {
    pub(crate) fn of(server: &ServerConfig) -> Timeouts {
        Timeouts {
            header_read: server.header_read_timeout,
            idle: server.idle_timeout,
            max_header_bytes: server.max_header_bytes,
            write: server.response_write_timeout,
        }
    }
}

/// Waits for the next connection; an accept error (EMFILE and friends) backs off briefly
/// instead of spinning.
pub(crate) async fn accept(listener: &TcpListener, what: &'static str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Serves one connection until the peer leaves, a timeout closes it, `drain` asks for a
/// graceful close (in-flight requests finish) or `abort` drops it.
pub(crate) async fn serve_connection<I, F, Fut>(
    io: I,
    remote: SocketAddr,
    timeouts: Timeouts,
    handler: F,
    drain: CancellationToken,
    abort: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(http::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = http::Response<ProxyBody>> + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(TrackedIo {
        inner: io,
        activity: activity.clone(),
    });
    let svc = {
        let activity = activity.clone();
        service_fn(move |req: http::Request<Incoming>| {
            let guard = RequestGuard::start(&activity, req.version() == http::Version::HTTP_2);
            let response = handler(req);
            async move {
                let resp = response.await;
                Ok::<_, Infallible>(resp.map(|inner| TrackedBody {
                    inner,
                    _guard: guard,
                }))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's own timer runs while a kept-alive connection waits for its next request,
        // so it would cut idle connections at header_read_timeout: the tracker owns both.
        .header_read_timeout(None)
        // A head that does not fit is refused with 431 (hyper's default would hold 400 KiB).
        .max_buf_size(timeouts.max_header_bytes.max(MIN_HEAD_BUFFER))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS)
        // Also bounds a CONTINUATION flood (CVE-2024-27316): h2 takes at most
        // 1.25 x this / max_frame_size (at least 5) frames for one header block, then GOAWAY.
        .max_header_list_size(u32::try_from(timeouts.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30));
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut draining = false;
    let mut closing: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if closing.is_some_and(|at| at <= now) {
            tracing::debug!(%remote, "peer did not close in time; dropping the connection");
            return;
        }
        if let Some(at) = activity.write_deadline(timeouts) {
            if at <= now {
                // Dropping the connection drops the response body: its decision record is
                // written as cancelled.
                tracing::debug!(%remote, "the client accepted no bytes within response_write_timeout; dropping");
                metrics::counter!(crate::telemetry::RESPONSE_WRITE_TIMEOUTS).increment(1);
                return;
            }
        }
        let wake = match activity.next(timeouts) {
            Next::Head(at) if at <= now => {
                tracing::debug!(%remote, "no request head within header_read_timeout; closing");
                return;
            }
            Next::Idle(at) if at <= now && !activity.is_h2() => {
                // HTTP/1 with no request open: nothing to finish, and hyper's graceful
                // shutdown of an idle keep-alive connection lingers for seconds.
                tracing::debug!(%remote, "idle for idle_timeout; closing");
                return;
            }
            Next::Idle(at) if at <= now => {
                if closing.is_none() {
                    tracing::debug!(%remote, "idle for idle_timeout; closing");
                    if !draining {
                        conn.as_mut().graceful_shutdown();
                    }
                    closing = Some(now + CLOSE_GRACE);
                }
                continue;
            }
            Next::Head(at) | Next::Idle(at) => at,
            // Busy: the route deadline and body_read_timeout bound a request; look again
            // once it could have gone idle.
            Next::Busy => now + timeouts.idle,
        };
        let wake = closing.map_or(wake, |c| c.min(wake));
        let wake = activity
            .write_deadline(timeouts)
            .map_or(wake, |w| w.min(wake));
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = drain.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = abort.cancelled() => return,
            _ = activity.idle.notified() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

enum Next {
    /// A request is open.
    Busy,
    /// Waiting for a request head that must be complete by then.
    Head(Instant),
    /// No request open; close at this instant.
    Idle(Instant),
}

/// What one connection is doing, updated by its reads, its writes and its requests. `idle`
/// wakes the watch loop when the last request ends or a write blocks, since the new
/// deadline may come before the one it sleeps towards.
struct Activity {
    state: Mutex<ActivityState>,
    idle: tokio::sync::Notify,
}

struct ActivityState {
    open: usize,
    reading_head: bool,
    /// h2 reads bytes while idle (pings, window updates): only HTTP/1 bytes start a head.
    h2: bool,
    since: Instant,
    /// Since when the socket has refused every write (None: the last write went through).
    write_blocked: Option<Instant>,
}

impl Activity {
    fn new() -> Activity {
        // A new connection owes its first request head.
        Activity {
            state: Mutex::new(ActivityState {
                open: 0,
                reading_head: true,
                h2: false,
                since: Instant::now(),
                write_blocked: None,
            }),
            idle: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, ActivityState> {
        // Plain counters: a panic elsewhere cannot leave them half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_read(&self) {
        let mut s = self.state();
        if s.open == 0 && !s.reading_head && !s.h2 {
            s.reading_head = true;
            s.since = Instant::now();
        }
    }

    /// A write found the socket full (`true`) or went through (`false`).
    fn on_write(&self, blocked: bool) {
        let mut s = self.state();
        match (blocked, s.write_blocked.is_some()) {
            (true, false) => {
                s.write_blocked = Some(Instant::now());
                drop(s);
                self.idle.notify_one();
            }
            (false, true) => s.write_blocked = None,
            _ => {}
        }
    }

    fn write_deadline(&self, t: Timeouts) -> Option<Instant> {
        self.state().write_blocked.map(|since| since + t.write)
    }

    fn is_h2(&self) -> bool {
        self.state().h2
    }

    fn next(&self, t: Timeouts) -> Next {
        let s = self.state();
        if s.open > 0 {
            Next::Busy
        } else if s.reading_head {
            Next::Head(s.since + t.header_read)
        } else {
            Next::Idle(s.since + t.idle)
        }
    }
}

/// One open request; dropped when its response body is done (or its future is dropped).
struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    fn start(activity: &Arc<Activity>, h2: bool) -> RequestGuard {
        let mut s = activity.state();
        s.open += 1;
        s.reading_head = false;
        s.h2 |= h2;
        drop(s);
        RequestGuard(activity.clone())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.open = s.open.saturating_sub(1);
        if s.open == 0 {
            s.since = Instant::now();
            drop(s);
            self.0.idle.notify_one();
        }
    }
}

pin_project! {
    /// The response body, holding its request open until hyper is done with it.
    struct TrackedBody {
        #[pin]
        inner: ProxyBody,
        _guard: RequestGuard,
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's byte stream, telling the tracker when bytes arrive and whether writes
/// go through.
struct TrackedIo<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I> TrackedIo<I> {
    fn written(&self, polled: &Poll<std::io::Result<usize>>) {
        match polled {
            Poll::Pending => self.activity.on_write(true),
            Poll::Ready(Ok(n)) if *n > 0 => self.activity.on_write(false),
            _ => {}
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for TrackedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TrackedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.written(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.written(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        // A TLS stream flushes its records here; the socket may refuse them too.
        if polled.is_pending() {
            self.activity.on_write(true);
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
