//! A mock AI service with faults injected at run time: added latency (fixed or a
//! distribution), error rate, the next N failing, hang, connection reset (before answering,
//! or mid-response: headers and part of the body, then a TCP RST), outage (port closed)
//! and a reported model version that can change mid-run.
//!
//! In-process for tests (`MockAi::start().await.fail_next(5, 503)`), or as the `mock-ai`
//! binary controlled over HTTP on the same port (`POST /__mock/faults`).
//!
//! Default answer: 200 JSON `{"model":{"version":V},"method","path","items":[1,2,3],
//! "echo_len"}` with `x-model-version: V`. Paths: `/bytes/N` streams N bytes in 64 KiB
//! chunks, `/status/N` answers N, `/echo` echoes the body, `/headers` answers the request
//! headers, `/slow/MS` sleeps MS first, `[/PREFIX]/recommend/N` answers about N bytes of
//! recommendations that match `config/schemas/recommendations.json`.
//!
//! Replays (requests with `x-breakwater-replay: 1`, breakwater's replay marker) are timed:
//! `max_replays_per_s()` is the most seen in any 1 s window, the figure a fleet's shared
//! replay pace is held to.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Body = BoxBody<Bytes, std::io::Error>;
const LOG_CAP: usize = 10_000;

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: http::Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

/// Fault settings; also the JSON of `POST /__mock/faults` (absent fields unchanged).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    pub delay_ms: Option<u64>,
    /// Log-normal-ish latency: p50 and p99 in ms (overrides delay_ms).
    pub latency_dist: Option<LatencyDist>,
    pub error_rate: Option<f64>,
    pub error_status: Option<u16>,
    pub fail_next: Option<u32>,
    pub fail_next_status: Option<u16>,
    pub hang: Option<bool>,
    pub reset: Option<bool>,
    /// Answer 200 with headers and part of the body, then reset the connection.
    pub reset_mid_body: Option<bool>,
    pub model_version: Option<String>,
    /// Reported as `x-model-digest` on every answer when set (empty: not reported).
    pub model_digest: Option<String>,
    /// Close the port for this many seconds (connections refused), then reopen it.
    pub outage_s: Option<f64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LatencyDist {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Default)]
struct Settings {
    delay: Duration,
    dist: Option<LatencyDist>,
    error_rate: f64,
    error_status: u16,
    fail_next: u32,
    fail_next_status: u16,
    hang: bool,
    reset: bool,
    reset_mid_body: bool,
    model_version: String,
    model_digest: String,
}

struct State {
    settings: Mutex<Settings>,
    requests: AtomicU64,
    log: Mutex<VecDeque<Received>>,
    /// Every `Idempotency-Key` seen and how often (not capped like the log: replay checks
    /// in long scenarios count on it).
    keys: Mutex<HashMap<String, u32>>,
    /// When each replay arrived, since the mock started, in arrival order.
    replays: Mutex<Vec<Duration>>,
    started: std::time::Instant,
    /// Cancelled to drop every open connection (outage, shutdown).
    conns: Mutex<CancellationToken>,
}

/// A running mock AI service on 127.0.0.1.
pub struct MockAi {
    addr: SocketAddr,
    state: Arc<State>,
    tls: Option<Arc<rustls::ServerConfig>>,
    accept: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

impl MockAi {
    /// Starts on 127.0.0.1 with an OS-assigned port.
    pub async fn start() -> MockAi {
        Self::bind(
            "127.0.0.1:0"
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("mock AI cannot bind: {e}"))
    }

    /// Starts with TLS (PEM certificate chain and key).
    pub async fn start_tls(cert_pem: String, key_pem: String) -> MockAi {
        let tls = tls_config(&cert_pem, &key_pem).unwrap_or_else(|e| panic!("mock AI TLS: {e}"));
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), Some(tls))
            .await
            .unwrap_or_else(|e| panic!("mock AI cannot bind: {e}"))
    }

    /// Starts on a given address (the `mock-ai` binary).
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<MockAi> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            settings: Mutex::new(Settings {
                error_status: 500,
                fail_next_status: 503,
                model_version: "v1".into(),
                ..Settings::default()
            }),
            requests: AtomicU64::new(0),
            log: Mutex::new(VecDeque::new()),
            keys: Mutex::new(HashMap::new()),
            replays: Mutex::new(Vec::new()),
            started: std::time::Instant::now(),
            conns: Mutex::new(CancellationToken::new()),
        });
        let mock = MockAi {
            addr,
            state,
            tls,
            accept: Mutex::new(None),
        };
        mock.spawn_accept(listener);
        Ok(mock)
    }

    fn spawn_accept(&self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            self.state.clone(),
            self.tls.clone(),
            stop.clone(),
        ));
        if let Ok(mut a) = self.accept.lock() {
            *a = Some((stop, task));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn with(&self, f: impl FnOnce(&mut Settings)) {
        if let Ok(mut s) = self.state.settings.lock() {
            f(&mut s);
        }
    }

    pub fn set_delay(&self, d: Duration) {
        self.with(|s| s.delay = d);
    }

    pub fn set_latency_dist(&self, p50: Duration, p99: Duration) {
        self.with(|s| {
            s.dist = Some(LatencyDist {
                p50_ms: p50.as_secs_f64() * 1000.0,
                p99_ms: p99.as_secs_f64() * 1000.0,
            })
        });
    }

    /// Every request fails with `status` with this probability.
    pub fn set_error_rate(&self, rate: f64, status: u16) {
        self.with(|s| {
            s.error_rate = rate;
            s.error_status = status;
        });
    }

    /// The next `n` requests fail with `status`.
    pub fn fail_next(&self, n: u32, status: u16) {
        self.with(|s| {
            s.fail_next = n;
            s.fail_next_status = status;
        });
    }

    /// Accept requests but never answer.
    pub fn hang(&self, on: bool) {
        self.with(|s| s.hang = on);
    }

    /// Close each connection without answering.
    pub fn reset_connections(&self, on: bool) {
        self.with(|s| s.reset = on);
    }

    /// Answer 200 with the headers (a `content-length` of the whole answer) and part of
    /// the body, then drop the connection: with a TCP RST for connections accepted while
    /// this is on (zero linger), with a FIN for ones already open.
    pub fn reset_mid_body(&self, on: bool) {
        self.with(|s| s.reset_mid_body = on);
    }

    pub fn set_model_version(&self, v: &str) {
        self.with(|s| s.model_version = v.to_string());
    }

    /// Reports `x-model-digest: D` on every answer ("" stops it).
    pub fn set_model_digest(&self, d: &str) {
        self.with(|s| s.model_digest = d.to_string());
    }

    /// Clears every fault (the model version stays).
    pub fn recover(&self) {
        self.with(|s| {
            s.delay = Duration::ZERO;
            s.dist = None;
            s.error_rate = 0.0;
            s.fail_next = 0;
            s.hang = false;
            s.reset = false;
            s.reset_mid_body = false;
        });
    }

    /// `true`: close the port and drop open connections (connections refused).
    /// `false`: listen again on the same port.
    pub async fn outage(&self, on: bool) {
        if on {
            let running = self.accept.lock().ok().and_then(|mut a| a.take());
            if let Some((stop, task)) = running {
                stop.cancel();
                let _ = task.await;
            }
            self.drop_connections();
        } else {
            let running = self.accept.lock().map(|a| a.is_some()).unwrap_or(true);
            if running {
                return;
            }
            for _ in 0..100 {
                match TcpListener::bind(self.addr).await {
                    Ok(listener) => {
                        self.spawn_accept(listener);
                        return;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    }

    fn drop_connections(&self) {
        if let Ok(mut c) = self.state.conns.lock() {
            c.cancel();
            *c = CancellationToken::new();
        }
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state
            .log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// How many requests carried each value of `header`.
    pub fn count_by_header(&self, header: &str) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for r in self.received() {
            if let Some(v) = r.headers.get(header).and_then(|v| v.to_str().ok()) {
                *out.entry(v.to_string()).or_insert(0) += 1;
            }
        }
        out
    }

    /// How many times each `Idempotency-Key` reached the mock.
    pub fn idempotency_keys(&self) -> HashMap<String, u32> {
        self.state
            .keys
            .lock()
            .map(|k| k.clone())
            .unwrap_or_default()
    }

    /// How many distinct `Idempotency-Key`s reached the mock.
    pub fn distinct_keys(&self) -> usize {
        self.state.keys.lock().map(|k| k.len()).unwrap_or(0)
    }

    /// Requests that carried breakwater's replay marker (`x-breakwater-replay: 1`).
    pub fn replays(&self) -> u64 {
        self.state
            .replays
            .lock()
            .map(|r| r.len() as u64)
            .unwrap_or(0)
    }

    /// The most replays seen in any 1 s window (sliding, not aligned to whole seconds).
    pub fn max_replays_per_s(&self) -> u64 {
        self.state
            .replays
            .lock()
            .map(|r| max_in_window(&r, Duration::from_secs(1)))
            .unwrap_or(0)
    }

    pub fn apply(&self, f: &Faults) {
        apply_faults(&self.state, f);
    }

    pub async fn shutdown(self) {
        self.outage(true).await;
    }
}

impl Drop for MockAi {
    fn drop(&mut self) {
        if let Ok(mut a) = self.accept.lock() {
            if let Some((stop, _)) = a.take() {
                stop.cancel();
            }
        }
        self.drop_connections();
    }
}

/// The most of `times` (ascending) that fall in any half-open window `[t, t + window)`.
pub fn max_in_window(times: &[Duration], window: Duration) -> u64 {
    let mut max = 0;
    let mut start = 0;
    for (end, t) in times.iter().enumerate() {
        while times[start] + window <= *t {
            start += 1;
        }
        max = max.max(end + 1 - start);
    }
    max as u64
}

fn apply_faults(state: &State, f: &Faults) {
    let Ok(mut s) = state.settings.lock() else {
        return;
    };
    if let Some(d) = f.delay_ms {
        s.delay = Duration::from_millis(d);
    }
    if f.latency_dist.is_some() {
        s.dist = f.latency_dist;
    }
    if let Some(r) = f.error_rate {
        s.error_rate = r;
    }
    if let Some(st) = f.error_status {
        s.error_status = st;
    }
    if let Some(n) = f.fail_next {
        s.fail_next = n;
    }
    if let Some(st) = f.fail_next_status {
        s.fail_next_status = st;
    }
    if let Some(h) = f.hang {
        s.hang = h;
    }
    if let Some(r) = f.reset {
        s.reset = r;
    }
    if let Some(r) = f.reset_mid_body {
        s.reset_mid_body = r;
    }
    if let Some(v) = &f.model_version {
        s.model_version = v.clone();
    }
    if let Some(d) = &f.model_digest {
        s.model_digest = d.clone();
    }
}

pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
            _ = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        if state.settings.lock().is_ok_and(|s| s.reset_mid_body) {
            // Closing a zero-linger socket sends RST, not FIN.
            let _ = stream.set_zero_linger();
        }
        let state = state.clone();
        let tls = tls.clone();
        let conns = state.conns.lock().map(|c| c.clone()).unwrap_or_default();
        tokio::spawn(async move {
            match tls {
                None => serve(TokioIo::new(stream), state, conns).await,
                Some(cfg) => {
                    if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await {
                        serve(TokioIo::new(s), state, conns).await
                    }
                }
            }
        });
    }
}

async fn serve<I>(io: TokioIo<I>, state: Arc<State>, conns: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let state = state.clone();
        async move { handle(state, req).await }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(io, svc);
    tokio::select! {
        _ = conn => {}
        _ = conns.cancelled() => {}
    }
}

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> http::Response<Body> {
    let mut resp = http::Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

/// A draw from a log-normal distribution with the given p50 and p99.
fn sample_latency(d: LatencyDist) -> Duration {
    let mu = d.p50_ms.max(0.001).ln();
    let sigma = ((d.p99_ms.max(d.p50_ms) / d.p50_ms.max(0.001)).ln() / 2.326).max(0.0);
    // Box-Muller for a standard normal.
    let mut rng = rand::rng();
    let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    Duration::from_secs_f64((mu + sigma * z).exp() / 1000.0)
}

async fn handle(
    state: Arc<State>,
    req: http::Request<Incoming>,
) -> Result<http::Response<Body>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();

    // Control endpoints are not counted as AI traffic.
    if let Some(ctl) = path.strip_prefix("/__mock/") {
        return Ok(control(&state, ctl, &body));
    }

    state.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(key) = parts
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
    {
        if let Ok(mut keys) = state.keys.lock() {
            *keys.entry(key.to_string()).or_insert(0) += 1;
        }
    }
    if parts
        .headers
        .get("x-breakwater-replay")
        .is_some_and(|v| v.as_bytes() == b"1")
    {
        if let Ok(mut replays) = state.replays.lock() {
            replays.push(state.started.elapsed());
        }
    }
    if let Ok(mut log) = state.log.lock() {
        if log.len() >= LOG_CAP {
            log.pop_front();
        }
        log.push_back(Received {
            method: parts.method.clone(),
            path: path.clone(),
            query: parts.uri.query().map(str::to_string),
            headers: parts.headers.clone(),
            body: body.clone(),
            version: parts.version,
        });
    }

    let (delay, fail, hang, reset, mid_body, version, digest) = {
        let Ok(mut s) = state.settings.lock() else {
            return Ok(full(500, "text/plain", "mock state poisoned"));
        };
        let delay = match s.dist {
            Some(d) => sample_latency(d),
            None => s.delay,
        };
        let fail = if s.fail_next > 0 {
            s.fail_next -= 1;
            Some(s.fail_next_status)
        } else if s.error_rate > 0.0 && rand::rng().random::<f64>() < s.error_rate {
            Some(s.error_status)
        } else {
            None
        };
        (
            delay,
            fail,
            s.hang,
            s.reset,
            s.reset_mid_body,
            s.model_version.clone(),
            s.model_digest.clone(),
        )
    };
    if reset {
        // An error from the service makes hyper close the connection without answering.
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected reset",
        ));
    }
    if mid_body {
        return Ok(cut_short(&version));
    }
    if hang {
        std::future::pending::<()>().await;
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut resp = if let Some(status) = fail {
        full(
            status,
            "application/json",
            format!("{{\"error\":\"injected\",\"status\":{status}}}"),
        )
    } else {
        route(&parts, &path, body, &version).await
    };
    if let Ok(v) = http::HeaderValue::from_str(&version) {
        resp.headers_mut().insert("x-model-version", v);
    }
    if !digest.is_empty() {
        if let Ok(v) = http::HeaderValue::from_str(&digest) {
            resp.headers_mut().insert("x-model-digest", v);
        }
    }
    Ok(resp)
}

/// 200 with `content-length: 4096` and the first 100 bytes; then the body fails, which
/// makes hyper drop the connection mid-response.
fn cut_short(version: &str) -> http::Response<Body> {
    // The pause lets hyper flush the head and the first bytes before the failure.
    let frames = futures_util::stream::unfold(0u8, |step| async move {
        match step {
            0 => Some((Ok(http_body::Frame::data(Bytes::from(vec![b' '; 100]))), 1)),
            1 => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected mid-response reset",
                    )),
                    2,
                ))
            }
            _ => None,
        }
    });
    let mut resp = http::Response::new(BodyExt::boxed(StreamBody::new(frames)));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from_static("4096"),
    );
    if let Ok(v) = http::HeaderValue::from_str(version) {
        h.insert("x-model-version", v);
    }
    resp
}

async fn route(
    parts: &http::request::Parts,
    path: &str,
    body: Bytes,
    version: &str,
) -> http::Response<Body> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["bytes", n] => {
            let total: usize = n.parse().unwrap_or(0);
            const CHUNK: usize = 64 * 1024;
            let chunk = Bytes::from(vec![b'x'; CHUNK]);
            let frames = futures_util::stream::iter((0..total.div_ceil(CHUNK)).map(move |i| {
                let len = CHUNK.min(total - i * CHUNK);
                Ok::<_, std::io::Error>(http_body::Frame::data(chunk.slice(..len)))
            }));
            let mut resp = http::Response::new(BodyExt::boxed(StreamBody::new(frames)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            resp
        }
        ["status", code] => {
            let code: u16 = code.parse().unwrap_or(500);
            full(code, "application/json", format!("{{\"status\":{code}}}"))
        }
        ["echo"] => {
            let ct = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_string();
            full(200, &ct, body)
        }
        ["headers"] => {
            let map: HashMap<String, String> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            full(
                200,
                "application/json",
                serde_json::to_vec(&map).unwrap_or_default(),
            )
        }
        // `/recommend/N` (also under a prefix, `/checked/recommend/N`): a recommendations
        // answer of about N bytes that matches config/schemas/recommendations.json.
        [.., "recommend", n] => full(
            200,
            "application/json",
            recommendations(version, n.parse().unwrap_or(2048)),
        ),
        ["slow", ms] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            default_answer(parts, path, &body, version)
        }
        _ => default_answer(parts, path, &body, version),
    }
}

/// `{"model":{"version"},"items":[{"course","score","reason"}...]}` of about `bytes` bytes
/// (at most 50 items, the schema's limit).
pub fn recommendations(version: &str, bytes: usize) -> String {
    let mut out = format!(
        "{{\"model\":{{\"version\":{}}},\"items\":[",
        serde_json::Value::from(version)
    );
    let mut i = 0;
    while out.len() + 2 < bytes && i < 50 {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{{\"course\":\"CS-{:04}\",\"score\":0.{:02},\"reason\":\"chosen by students with a similar record\"}}",
            1000 + i,
            (97 - i) % 100
        ));
        i += 1;
    }
    out.push_str("]}");
    out
}

fn default_answer(
    parts: &http::request::Parts,
    path: &str,
    body: &Bytes,
    version: &str,
) -> http::Response<Body> {
    let answer = serde_json::json!({
        "model": {"version": version},
        "method": parts.method.as_str(),
        "path": path,
        "items": [1, 2, 3],
        "echo_len": body.len(),
    });
    full(200, "application/json", answer.to_string())
}

fn control(state: &State, what: &str, body: &Bytes) -> http::Response<Body> {
    match what {
        "faults" => match serde_json::from_slice::<Faults>(body) {
            Ok(f) => {
                apply_faults(state, &f);
                full(200, "application/json", "{\"ok\":true}")
            }
            Err(e) => full(
                400,
                "application/json",
                format!("{{\"error\":{}}}", serde_json::Value::String(e.to_string())),
            ),
        },
        "reset" => {
            if let Ok(mut s) = state.settings.lock() {
                s.delay = Duration::ZERO;
                s.dist = None;
                s.error_rate = 0.0;
                s.fail_next = 0;
                s.hang = false;
                s.reset = false;
                s.reset_mid_body = false;
            }
            full(200, "application/json", "{\"ok\":true}")
        }
        "stats" => {
            let version = state
                .settings
                .lock()
                .map(|s| s.model_version.clone())
                .unwrap_or_default();
            full(
                200,
                "application/json",
                serde_json::json!({
                    "requests": state.requests.load(Ordering::SeqCst),
                    "model_version": version,
                    "replays": state.replays.lock().map(|r| r.len()).unwrap_or(0),
                    "max_replays_per_s": state.replays.lock().map(|r| max_in_window(&r, Duration::from_secs(1))).unwrap_or(0),
                    "distinct_idempotency_keys": state.keys.lock().map(|k| k.len()).unwrap_or(0),
                })
                .to_string(),
            )
        }
        _ => full(
            404,
            "application/json",
            "{\"error\":\"unknown control endpoint\"}",
        ),
    }
}
