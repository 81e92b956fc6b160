//! The access log (`[access_log]`, off by default): one JSON line per request with the
//! fields SREs grep for. Not the decision log: no chain, no digests, no fsync, and a line
//! may be dropped (and counted) rather than slow a request down.
//!
//! The request path only builds a small [`Line`] and `try_send`s it into a bounded
//! channel; a dedicated thread serialises and writes. A full channel drops the line and
//! counts it in `breakwater_access_log_dropped_total`. The line is sent when the response
//! body ends (so `bytes` is what the client was sent) or, when the client goes away first,
//! with status 499 and outcome `cancelled`, as nginx logs it. A file target is reopened
//! when it was moved or removed (logrotate without `copytruncate`).

use std::io::{self, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use serde::Serialize;

use crate::exchange::headers::{X_OUTCOME, X_REASON};
use crate::exchange::{BoxError, ProxyBody, RequestMeta};
use crate::telemetry;

/// How long the writer sleeps without lines before it checks a file target was moved.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub target: Target,
    /// Lines waiting for the writer; past it they are dropped and counted.
    pub buffer: usize,
}

enum Msg {
    Line(Box<Line>),
    /// Flush what is written and answer: shutdown waits for it.
    Flush(SyncSender<()>),
}

/// The handle the request path holds: cloning it is cloning a channel sender.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
}

/// One request, as it is logged.
pub struct Line {
    end: SystemTime,
    request_id: Arc<str>,
    route: Option<Arc<str>>,
    method: http::Method,
    path: String,
    status: u16,
    outcome: Option<HeaderValue>,
    reason: Option<HeaderValue>,
    upstream: Option<Arc<str>>,
    variant: Option<Arc<str>>,
    model_version: Option<String>,
    latency: Duration,
    upstream_latency: Option<Duration>,
    bytes: u64,
}

#[derive(Serialize)]
struct Json<'a> {
    time: String,
    request_id: &'a str,
    route: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    status: u16,
    outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<&'a str>,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_latency_ms: Option<f64>,
    bytes: u64,
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

fn header(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

impl Line {
    fn json(&self) -> Json<'_> {
        Json {
            time: humantime::format_rfc3339_millis(self.end).to_string(),
            request_id: &self.request_id,
            route: self.route.as_deref(),
            method: self.method.as_str(),
            path: &self.path,
            status: self.status,
            outcome: header(&self.outcome).unwrap_or("error"),
            reason: header(&self.reason),
            upstream: self.upstream.as_deref(),
            variant: self.variant.as_deref(),
            model_version: self.model_version.as_deref(),
            latency_ms: ms(self.latency),
            upstream_latency_ms: self.upstream_latency.map(ms),
            bytes: self.bytes,
        }
    }
}

impl AccessLog {
    /// Opens the target (a file is created 0600 if missing) and starts the writer thread.
    pub fn start(config: &AccessLogConfig) -> io::Result<AccessLog> {
        let out = Output::open(&config.target)?;
        let (tx, rx) = mpsc::sync_channel(config.buffer.max(1));
        std::thread::Builder::new()
            .name("breakwater-access-log".into())
            .spawn(move || run(rx, out))?;
        metrics::counter!(telemetry::ACCESS_LOG_DROPPED).increment(0);
        Ok(AccessLog { tx })
    }

    /// What a request needs to be logged, taken when it arrives.
    pub fn begin(&self, method: &http::Method, path: &str) -> Access {
        Access {
            log: self.clone(),
            started: Instant::now(),
            method: method.clone(),
            path: path.to_string(),
            request_id: None,
            meta: None,
            sent: false,
        }
    }

    fn send(&self, line: Line) {
        match self.tx.try_send(Msg::Line(Box::new(line))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!(telemetry::ACCESS_LOG_DROPPED).increment(1);
            }
        }
    }

    /// Writes and flushes what is queued, waiting at most `within` (shutdown).
    pub fn flush(&self, within: Duration) {
        let (tx, rx) = mpsc::sync_channel(1);
        let deadline = Instant::now() + within;
        let mut msg = Msg::Flush(tx);
        // The channel may be full: retry until the deadline rather than block.
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// One request on its way through; logs itself once, however the request ends.
pub struct Access {
    log: AccessLog,
    started: Instant,
    method: http::Method,
    path: String,
    /// Until the request is routed (its meta then holds the id).
    request_id: Option<String>,
    meta: Option<Arc<RequestMeta>>,
    sent: bool,
}

impl Access {
    /// A request answered before routing (404, 400, 413) is logged under this id.
    pub fn request_id(&mut self, id: &str) {
        self.request_id = Some(id.to_string());
    }

    /// The routed request's facts (upstream, variant, model version) come from its meta.
    pub fn routed(&mut self, meta: &Arc<RequestMeta>) {
        self.meta = Some(meta.clone());
    }

    fn line(
        &mut self,
        status: u16,
        outcome: Option<HeaderValue>,
        reason: Option<HeaderValue>,
        bytes: u64,
    ) -> Line {
        let (route, upstream, variant, model_version, upstream_latency) = match &self.meta {
            Some(meta) => {
                let f = meta.facts();
                (
                    Some(meta.route.name.clone()),
                    f.upstream.clone(),
                    f.variant.clone(),
                    f.model_version.clone(),
                    f.upstream_latency,
                )
            }
            None => (None, None, None, None, None),
        };
        Line {
            end: SystemTime::now(),
            request_id: match (&self.meta, self.request_id.take()) {
                (Some(m), _) => m.request_id.clone(),
                (None, Some(id)) => Arc::from(id),
                (None, None) => Arc::from(""),
            },
            route,
            method: self.method.clone(),
            path: std::mem::take(&mut self.path),
            status,
            outcome,
            reason,
            upstream,
            variant,
            model_version,
            latency: self.started.elapsed(),
            upstream_latency,
            bytes,
        }
    }

    /// Wraps the response body: the line is written when it ends, or when it is dropped.
    pub fn respond(mut self, resp: http::Response<ProxyBody>) -> http::Response<ProxyBody> {
        self.sent = true;
        let status = resp.status().as_u16();
        let outcome = resp.headers().get(&X_OUTCOME).cloned();
        let reason = resp.headers().get(&X_REASON).cloned();
        let pending = Pending {
            access: self,
            status,
            outcome,
            reason,
        };
        resp.map(|inner| {
            BodyDone {
                inner,
                pending: Some(pending),
                bytes: 0,
                started: false,
            }
            .boxed()
        })
    }
}

impl Drop for Access {
    /// The request future was dropped before an answer: the client went away.
    fn drop(&mut self) {
        if !self.sent {
            self.sent = true;
            let line = self.line(499, Some(HeaderValue::from_static("cancelled")), None, 0);
            self.log.send(line);
        }
    }
}

struct Pending {
    access: Access,
    status: u16,
    outcome: Option<HeaderValue>,
    reason: Option<HeaderValue>,
}

impl Pending {
    fn done(mut self, bytes: u64, cut_short: bool) {
        let line = if cut_short {
            self.access.line(
                499,
                Some(HeaderValue::from_static("cancelled")),
                self.reason.clone(),
                bytes,
            )
        } else {
            self.access.line(
                self.status,
                self.outcome.clone(),
                self.reason.clone(),
                bytes,
            )
        };
        self.access.log.send(line);
    }
}

pin_project! {
    struct BodyDone {
        #[pin]
        inner: ProxyBody,
        pending: Option<Pending>,
        bytes: u64,
        // A frame went out: a drop before the end cuts the answer short.
        started: bool,
    }

    impl PinnedDrop for BodyDone {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(p) = this.pending.take() {
                let cut_short = *this.started && !this.inner.is_end_stream();
                p.done(*this.bytes, cut_short);
            }
        }
    }
}

impl Body for BodyDone {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                *this.started = true;
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                }
                // hyper stops at `is_end_stream` without polling for the end.
                if this.inner.is_end_stream() {
                    if let Some(p) = this.pending.take() {
                        p.done(*this.bytes, false);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    p.done(*this.bytes, false);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                // The upstream body failed mid-way: the client got part of an answer.
                if let Some(mut p) = this.pending.take() {
                    p.outcome = Some(HeaderValue::from_static("error"));
                    p.done(*this.bytes, false);
                }
            }
            Poll::Pending => {}
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

/// Where lines go: stderr, or a file reopened when it was moved away.
enum Output {
    Stderr(io::BufWriter<io::Stderr>),
    File {
        path: PathBuf,
        out: io::BufWriter<std::fs::File>,
        identity: Option<(u64, u64)>,
    },
}

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn identity(_meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

impl Output {
    fn open(target: &Target) -> io::Result<Output> {
        match target {
            Target::Stderr => Ok(Output::Stderr(io::BufWriter::new(io::stderr()))),
            Target::File(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    crate::private_fs::create_dir_all(dir)?;
                }
                let file = crate::private_fs::open(
                    std::fs::OpenOptions::new().create(true).append(true),
                    path,
                )?;
                let identity = file.metadata().ok().as_ref().and_then(identity);
                Ok(Output::File {
                    path: path.clone(),
                    out: io::BufWriter::with_capacity(64 * 1024, file),
                    identity,
                })
            }
        }
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Output::Stderr(w) => w,
            Output::File { out, .. } => out,
        }
    }

    /// logrotate moved the file (or someone removed it): write to a new one at the path.
    fn reopen_if_moved(&mut self) {
        let Output::File {
            path,
            identity: current,
            ..
        } = self
        else {
            return;
        };
        let now = std::fs::metadata(&*path).ok().as_ref().and_then(identity);
        if now.is_some() && now == *current {
            return;
        }
        let target = Target::File(path.clone());
        match Output::open(&target) {
            Ok(mut fresh) => {
                let _ = self.writer().flush();
                std::mem::swap(self, &mut fresh);
                tracing::info!(path = %fresh_path(self), "access log reopened (the file was moved or removed)");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot reopen the access log");
            }
        }
    }
}

fn fresh_path(o: &Output) -> String {
    match o {
        Output::File { path, .. } => path.display().to_string(),
        Output::Stderr(_) => "stderr".into(),
    }
}

fn run(rx: Receiver<Msg>, mut out: Output) {
    let mut buf = Vec::with_capacity(512);
    let mut checked = Instant::now();
    let mut failing = false;
    loop {
        let first = match rx.recv_timeout(REOPEN_CHECK) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                let _ = out.writer().flush();
                return;
            }
        };
        let mut next = first;
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => {
                    buf.clear();
                    if serde_json::to_writer(&mut buf, &line.json()).is_ok() {
                        buf.push(b'\n');
                        write(&mut out, &buf, &mut failing);
                    }
                }
                Msg::Flush(done) => {
                    let _ = out.writer().flush();
                    let _ = done.try_send(());
                }
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.writer().flush() {
            write_failed(&mut failing, &e);
        }
        if checked.elapsed() >= REOPEN_CHECK {
            checked = Instant::now();
            out.reopen_if_moved();
        }
    }
}

fn write(out: &mut Output, line: &[u8], failing: &mut bool) {
    match out.writer().write_all(line) {
        Ok(()) => {
            if *failing {
                *failing = false;
                tracing::info!("the access log writes again");
            }
        }
        Err(e) => {
            metrics::counter!(telemetry::ACCESS_LOG_DROPPED).increment(1);
            write_failed(failing, &e);
        }
    }
}

/// Logged once per episode, not once per line.
fn write_failed(failing: &mut bool, e: &io::Error) {
    if !*failing {
        *failing = true;
        tracing::warn!(error = %e, "the access log cannot write; lines are dropped and counted");
    }
}
