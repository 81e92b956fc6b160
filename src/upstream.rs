//! Upstream client: one pooled keep-alive client per upstream (hyper-util legacy client
//! over rustls), HTTP/1.1 and HTTP/2 (ALPN for https, prior knowledge for h2c).
//!
//! Pools survive a config reload unless the upstream's own settings changed, so a reload
//! never costs a burst of new connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{client_tls_config, UpstreamConfig};
use crate::exchange::error::ErrorKind;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The most one upstream HTTP/1 connection reads ahead (and the largest answer head: AI
/// answers carry a few headers; nginx reads client heads in 8 KiB buffers).
const UPSTREAM_READ_BUFFER: usize = 32 * 1024;

/// A named upstream with its connection pool.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub config: Arc<UpstreamConfig>,
    client: HttpsClient,
    /// "scheme://authority/base" ready to have the request's path and query appended.
    prefix: String,
}

impl Upstream {
    pub fn new(config: Arc<UpstreamConfig>) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = match &config.tls {
            Some(tls) => tls.clone(),
            None => client_tls_config(None, None)?,
        };
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http();
        let connector = if config.http2_prior_knowledge {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.enable_all_versions().wrap_connector(http)
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .http2_only(config.http2_prior_knowledge)
            // hyper reads an answer in pieces as large as its buffer (some 400 KiB by
            // default), each then held until the client takes it: a smaller buffer keeps
            // a streamed answer's memory small. Answer heads must fit in it.
            .http1_max_buf_size(UPSTREAM_READ_BUFFER)
            .build(connector);
        let prefix = format!(
            "{}://{}{}",
            config.scheme, config.authority, config.base_path
        );
        Ok(Upstream {
            name: Arc::from(config.name.as_str()),
            config,
            client,
            prefix,
        })
    }

    /// Sends one request and returns the response head with a streaming body. No deadline
    /// here: the caller's timeout layer owns the route's total deadline.
    pub async fn send(
        &self,
        req: &http::Request<Bytes>,
    ) -> Result<(http::Response<Incoming>, Duration), ErrorKind> {
        let path = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let uri: http::Uri = format!("{}{}", self.prefix, path)
            .parse()
            .map_err(|e| ErrorKind::Internal(format!("cannot build upstream uri: {e}")))?;
        let mut builder = http::Request::builder()
            .method(req.method().clone())
            .uri(uri);
        if let Some(headers) = builder.headers_mut() {
            headers.clone_from(req.headers());
            for (name, value) in &self.config.headers {
                headers.insert(name.clone(), value.clone());
            }
        }
        let out = builder
            .body(Full::new(req.body().clone()))
            .map_err(|e| ErrorKind::Internal(format!("cannot build upstream request: {e}")))?;
        let started = Instant::now();
        match self.client.request(out).await {
            Ok(resp) => Ok((resp, started.elapsed())),
            Err(e) if e.is_connect() => Err(ErrorKind::Connect(error_chain(&e))),
            Err(e) => Err(ErrorKind::Transport {
                message: error_chain(&e),
                // hyper-util already retried requests canceled before they were written;
                // anything else may have reached the upstream.
                sent: true,
            }),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}
