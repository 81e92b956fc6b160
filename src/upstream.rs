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
            // Before the generic arms: with TLS 1.3 an upstream that refuses our client
            // certificate says so only after the client considers the handshake done, so
            // hyper reports it as a failed request, yet the upstream processed nothing.
            Err(e) => match tls_failure(&e) {
                Some(kind) => Err(self.tls_error(kind, &e, e.is_connect())),
                None if e.is_connect() => Err(ErrorKind::Connect(error_chain(&e))),
                None => Err(ErrorKind::Transport {
                    message: error_chain(&e),
                    // hyper-util already retried requests canceled before they were written;
                    // anything else may have reached the upstream.
                    sent: true,
                }),
            },
        }
    }
}

impl Upstream {
    /// A failed TLS handshake: counted by kind, logged, and reported to the client with
    /// what went wrong in words (the JSON `error.message`), under `connect_error`. A
    /// certificate failure means the upstream processed nothing; another TLS error after
    /// the connection was up may have come after the request reached it.
    fn tls_error(
        &self,
        kind: TlsFailure,
        e: &dyn std::error::Error,
        connecting: bool,
    ) -> ErrorKind {
        metrics::counter!(
            crate::telemetry::UPSTREAM_TLS_ERRORS,
            "upstream" => self.name.to_string(),
            "kind" => kind.as_str()
        )
        .increment(1);
        let detail = error_chain(e);
        tracing::warn!(upstream = %self.name, kind = kind.as_str(), error = %detail, "TLS handshake with the upstream failed");
        let message = format!(
            "TLS with upstream {:?} failed: {} ({detail})",
            &*self.name,
            kind.explain()
        );
        if kind == TlsFailure::Other && !connecting {
            return ErrorKind::Transport {
                message,
                sent: true,
            };
        }
        ErrorKind::Connect(message)
    }
}

/// Why a TLS handshake with an upstream failed: the `kind` label of
/// `breakwater_upstream_tls_errors_total` (a fixed set, so the label stays bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsFailure {
    /// Its certificate does not chain to a trusted CA (webpki roots plus `ca_file`).
    Untrusted,
    /// Its certificate is outside its validity period (expired, or not valid yet).
    Expired,
    /// Its certificate does not name the host in the upstream's `url`.
    WrongHost,
    /// The upstream refused our client certificate (missing, untrusted or expired): mTLS.
    ClientCertRejected,
    /// Any other TLS failure (protocol versions, ciphers, a bad certificate encoding...).
    Other,
}

impl TlsFailure {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TlsFailure::Untrusted => "untrusted",
            TlsFailure::Expired => "expired",
            TlsFailure::WrongHost => "wrong_host",
            TlsFailure::ClientCertRejected => "client_cert_rejected",
            TlsFailure::Other => "other",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            TlsFailure::Untrusted => {
                "its certificate is not signed by a trusted CA (check the upstream's ca_file)"
            }
            TlsFailure::Expired => "its certificate has expired or is not valid yet",
            TlsFailure::WrongHost => "its certificate is not valid for the host in its url",
            TlsFailure::ClientCertRejected => {
                "it refused our client certificate (check client_cert_file / client_key_file)"
            }
            TlsFailure::Other => "TLS error",
        }
    }

    fn of(e: &rustls::Error) -> TlsFailure {
        use rustls::{AlertDescription as A, CertificateError as C};
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer | C::BadSignature => TlsFailure::Untrusted,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => TlsFailure::Expired,
                C::NotValidForName | C::NotValidForNameContext { .. } => TlsFailure::WrongHost,
                _ => TlsFailure::Other,
            },
            rustls::Error::AlertReceived(
                A::CertificateRequired
                | A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::UnsupportedCertificate
                | A::AccessDenied,
            ) => TlsFailure::ClientCertRejected,
            _ => TlsFailure::Other,
        }
    }
}

/// The rustls error somewhere in `e`'s source chain. rustls errors travel inside
/// `io::Error`s (sometimes one inside another), whose `source()` skips what they wrap,
/// hence the walk through `get_ref`.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let mut next = Some(e);
    // Bounded: an error chain is a handful of links.
    for _ in 0..32 {
        let Some(err) = next else {
            break;
        };
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(TlsFailure::of(t));
        }
        next = match err.downcast_ref::<std::io::Error>() {
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => err.source(),
            },
            None => err.source(),
        };
    }
    alert_in_text(&error_chain(e))
}

/// An h2 connection keeps only the text of the io error that ended it, so a TLS alert the
/// upstream sent after the handshake (TLS 1.3 refuses a client certificate then) is found
/// by rustls's wording: "received fatal alert: <AlertDescription>".
fn alert_in_text(chain: &str) -> Option<TlsFailure> {
    const CLIENT_CERT: &[&str] = &[
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "CertificateUnknown",
        "CertificateExpired",
        "CertificateRevoked",
        "UnsupportedCertificate",
        "AccessDenied",
    ];
    let (_, alert) = chain.split_once("received fatal alert: ")?;
    let name: String = alert
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    Some(if CLIENT_CERT.contains(&name.as_str()) {
        TlsFailure::ClientCertRejected
    } else {
        TlsFailure::Other
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Wrapper(#[source] Box<dyn std::error::Error + Send + Sync>);

    #[test]
    fn a_rustls_error_is_found_inside_nested_io_errors() {
        let rustls = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls);
        let outer = std::io::Error::other(inner);
        let e = Wrapper(Box::new(outer));
        assert_eq!(tls_failure(&e), Some(TlsFailure::Expired));
        let plain = Wrapper(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(tls_failure(&plain), None);
        // What an h2 connection leaves of the alert: its text only.
        let h2 = Wrapper(Box::new(std::io::Error::other(
            "connection error: received fatal alert: CertificateRequired",
        )));
        assert_eq!(tls_failure(&h2), Some(TlsFailure::ClientCertRejected));
        assert_eq!(
            alert_in_text("x: received fatal alert: ProtocolVersion"),
            Some(TlsFailure::Other)
        );
    }
}
