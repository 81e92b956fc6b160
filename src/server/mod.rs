//! Accept loop for the data plane: TCP (optionally TLS by rustls), then hyper-util's auto
//! builder serving HTTP/1.1 and h2c (or h2 by ALPN) on the same port.
//!
//! Connections are capped by `server.max_connections` (the one over it is refused and
//! counted), and each is watched for the header-read and idle timeouts (`conn`). Shutdown
//! stops accepting at once, lets in-flight requests finish for up to the configured grace
//! period, then drops what is left.

mod conn;
mod limit;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proxy::Proxy;

pub(crate) use conn::{accept, serve_connection, Timeouts};
pub(crate) use limit::ConnLimit;

/// Serves the data plane until `shutdown` fires, then drains for up to `grace`.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    // Read once: like the listen address, the cap takes effect on restart.
    let limit = ConnLimit::new("data", proxy.snapshot().config.server.max_connections);
    let conns = TaskTracker::new();
    let drain = CancellationToken::new();
    let abort = CancellationToken::new();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = accept(&listener, "data") => accepted,
            _ = shutdown.cancelled() => break,
        };
        let plaintext = proxy.snapshot().config.server.tls.is_none();
        let Some((stream, permit)) = limit.admit(stream, plaintext) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (proxy, drain, abort) = (proxy.clone(), drain.clone(), abort.clone());
        conns.spawn(async move {
            let _permit = permit;
            serve_one(stream, remote, proxy, drain, abort).await;
        });
    }
    drop(listener);
    let grace = proxy.snapshot().config.server.shutdown_grace;
    tracing::info!(
        open_connections = conns.len(),
        grace_ms = grace.as_millis() as u64,
        "draining"
    );
    drain.cancel();
    conns.close();
    if tokio::time::timeout(grace, conns.wait()).await.is_err() {
        tracing::warn!("grace period over; closing the remaining connections");
        // Dropped now, while the decision log still runs: their requests are recorded
        // as cancelled before it flushes.
        abort.cancel();
        conns.wait().await;
    }
}

/// One data-plane connection: the TLS handshake if configured, then HTTP.
async fn serve_one(
    stream: TcpStream,
    remote: SocketAddr,
    proxy: Arc<Proxy>,
    drain: CancellationToken,
    abort: CancellationToken,
) {
    let snapshot = proxy.snapshot();
    let server = &snapshot.config.server;
    let timeouts = Timeouts::of(server);
    match server.tls.clone() {
        None => serve_http(stream, remote, false, timeouts, proxy, drain, abort).await,
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            // A client that never finishes the handshake must not hold the socket.
            match tokio::time::timeout(timeouts.header_read, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    serve_http(tls_stream, remote, true, timeouts, proxy, drain, abort).await
                }
                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve_http<I>(
    io: I,
    remote: SocketAddr,
    tls: bool,
    timeouts: Timeouts,
    proxy: Arc<Proxy>,
    drain: CancellationToken,
    abort: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handler = move |req| {
        let proxy = proxy.clone();
        async move { proxy.handle(req, remote, tls).await }
    };
    serve_connection(io, remote, timeouts, handler, drain, abort).await;
}

/// Binds a listener with SO_REUSEADDR (tokio's default on Unix) for `addr`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
