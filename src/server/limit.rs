//! Connection caps for the data plane and the admin listener: a semaphore around accept
//! (as mini-redis bounds its listener), a gauge of open connections and a counted, clear
//! refusal of the connection over the cap.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::exchange::{full_body, ProxyBody};
use crate::telemetry;

/// Refusals answered at once; past this, an over-cap connection is closed unanswered, so
/// a flood cannot make refusing cost more than the cap saves.
const REFUSALS_IN_FLIGHT: usize = 64;
/// A refused client gets this long to send its request head and read the 503.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

pub(crate) struct ConnLimit {
    listener: &'static str,
    max: usize,
    permits: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    refused: AtomicU64,
    open: metrics::Gauge,
    refused_total: metrics::Counter,
}

/// A slot taken by one open connection; frees it (and the gauge) when dropped.
pub(crate) struct ConnPermit {
    _permit: OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

impl ConnLimit {
    /// `listener` is the metric label: "data" or "admin".
    pub(crate) fn new(listener: &'static str, max: usize) -> ConnLimit {
        ConnLimit {
            listener,
            max,
            permits: Arc::new(Semaphore::new(max)),
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT)),
            refused: AtomicU64::new(0),
            open: metrics::gauge!(telemetry::CONNECTIONS_OPEN, "listener" => listener),
            refused_total: metrics::counter!(telemetry::CONNECTIONS_REFUSED, "listener" => listener),
        }
    }

    /// Takes a slot for `stream`, or refuses it: a 503 with a JSON body and
    /// `connection: close` on plain HTTP, a plain close over TLS (a handshake only to say
    /// no would spend the CPU the cap protects).
    pub(crate) fn admit(
        &self,
        stream: TcpStream,
        plaintext: bool,
    ) -> Option<(TcpStream, ConnPermit)> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                self.open.increment(1.0);
                Some((
                    stream,
                    ConnPermit {
                        _permit: permit,
                        open: self.open.clone(),
                    },
                ))
            }
            Err(_) => {
                self.refused_total.increment(1);
                let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                // Logged at 1, 2, 4, 8, ... so a flood does not flood the log too.
                if n.is_power_of_two() {
                    tracing::warn!(
                        listener = self.listener,
                        max_connections = self.max,
                        refused_so_far = n,
                        "connection limit reached; refusing connections"
                    );
                }
                if plaintext {
                    if let Ok(slot) = self.refusals.clone().try_acquire_owned() {
                        tokio::spawn(refuse(stream, self.listener, self.max, slot));
                    }
                }
                None
            }
        }
    }
}

/// Answers every request of a refused connection with 503 and closes it.
async fn refuse(
    stream: TcpStream,
    listener: &'static str,
    max: usize,
    _slot: OwnedSemaphorePermit,
) {
    let svc = service_fn(
        move |req: http::Request<hyper::body::Incoming>| async move {
            Ok::<_, Infallible>(refusal(&req, listener, max))
        },
    );
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_TIME)
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(REFUSAL_TIME, conn).await;
}

fn refusal<B>(req: &http::Request<B>, listener: &str, max: usize) -> http::Response<ProxyBody> {
    let request_id = crate::exchange::headers::request_id(req.headers());
    let key = if listener == "admin" {
        "server.admin_max_connections"
    } else {
        "server.max_connections"
    };
    let body = serde_json::json!({"error": {
        "code": "too_many_connections",
        "message": format!("breakwater has {max} connections open ({key}); retry shortly"),
        "request_id": request_id,
    }});
    let mut resp = http::Response::new(full_body(body.to_string()));
    *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    h.insert(
        "x-breakwater-outcome",
        http::HeaderValue::from_static("error"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&request_id) {
        h.insert("x-request-id", v);
    }
    // h2 forbids connection-specific headers; there the connection ends with the timeout.
    if req.version() < http::Version::HTTP_2 {
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    resp
}
