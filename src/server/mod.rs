//! Accept loop for the data plane: TCP (optionally TLS by rustls), then hyper-util's auto
//! builder serving HTTP/1.1 and h2c (or h2 by ALPN) on the same port.
//!
//! Each connection is watched by a `GracefulShutdown`, so shutdown stops accepting at once
//! and lets in-flight requests finish for up to the configured grace period.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;

/// Serves the data plane until `shutdown` fires, then drains for up to `grace`.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    // Connection tasks are owned here, so that those still open when the grace ends are
    // dropped (their requests then write `cancelled` records) while the decision log
    // still runs, not when the runtime is torn down after it.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let watcher = graceful.watcher();
        conns.spawn(async move {
            let snapshot = proxy.snapshot();
            let server = &snapshot.config.server;
            let header_timeout = server.header_read_timeout;
            match server.tls.clone() {
                None => {
                    serve_conn(
                        TokioIo::new(stream),
                        proxy.clone(),
                        remote,
                        false,
                        header_timeout,
                        watcher,
                    )
                    .await;
                }
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                    // A client that never finishes the handshake must not hold the socket.
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            serve_conn(
                                TokioIo::new(tls_stream),
                                proxy.clone(),
                                remote,
                                true,
                                header_timeout,
                                watcher,
                            )
                            .await;
                        }
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let grace = proxy.snapshot().config.server.shutdown_grace;
    let open = graceful.count();
    tracing::info!(
        open_connections = open,
        grace_ms = grace.as_millis() as u64,
        "draining"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing the remaining connections");
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn serve_conn<I>(
    io: TokioIo<I>,
    proxy: Arc<Proxy>,
    remote: SocketAddr,
    tls: bool,
    header_timeout: Duration,
    watcher: Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req, remote, tls).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .keep_alive_interval(Duration::from_secs(30));
    let conn = builder.serve_connection(io, svc);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}

/// Binds a listener with SO_REUSEADDR (tokio's default on Unix) for `addr`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
