//! Shadow tests of a candidate (a patched AI service, a new model version) on real
//! traffic: `shadow = { upstream, percent, compare_pointer }` sends that share of the
//! requests again, off the request path, to the candidate, and compares its answer with the
//! one the client got at `compare_pointer`.
//!
//! The client's answer is never delayed or changed: the request is sampled with one atomic
//! add, the mirror is spawned once the primary answered, and the primary's body is copied
//! as it streams to the client (a [`TeeBody`]), never held back. Mirrors in flight are
//! bounded by `max_in_flight`: past that a mirror is dropped and counted before it costs
//! anything. A request the AI did not answer is not mirrored (there is nothing to compare).
//!
//! Results per candidate model version (agreement, latency, errors) go to the inventory
//! (`GET /admin/inventory`, `shadow`) and to `breakwater_shadow_requests_total{route,result}`
//! and `breakwater_shadow_agreement_ratio{route}`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use pin_project_lite::pin_project;
use tokio::sync::{oneshot, Semaphore};
use tower::{Layer, Service};

use crate::config::{RouteConfig, ShadowConfig};
use crate::exchange::error::ProxyError;
use crate::exchange::{BoxError, ProxyBody, ProxyRequest, ProxyResponse, Source};
use crate::telemetry;
use crate::upstream::Upstream;

/// The header every mirrored request carries, so the candidate (and its logs) can tell a
/// shadow call from real traffic.
pub const X_SHADOW: &str = "x-breakwater-shadow";

/// Candidate versions remembered per route: a candidate inventing versions cannot grow
/// memory; later versions are counted under "other".
const VERSIONS_CAP: usize = 64;

/// What became of one mirrored request (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowResult {
    /// The candidate's answer matched the client's at `compare_pointer`.
    Agree,
    Disagree,
    /// The candidate failed: connect error, 5xx/429, unreadable body.
    Error,
    /// The candidate took longer than the shadow's `timeout_ms`.
    Timeout,
    /// The candidate answered but the client's answer could not be compared: it was larger
    /// than `max_response_buffer_bytes`, or its client left before it ended.
    Incomparable,
    /// Not sent: `max_in_flight` mirrors were already in flight.
    Dropped,
}

impl ShadowResult {
    pub const ALL: [ShadowResult; 6] = [
        ShadowResult::Agree,
        ShadowResult::Disagree,
        ShadowResult::Error,
        ShadowResult::Timeout,
        ShadowResult::Incomparable,
        ShadowResult::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ShadowResult::Agree => "agree",
            ShadowResult::Disagree => "disagree",
            ShadowResult::Error => "error",
            ShadowResult::Timeout => "timeout",
            ShadowResult::Incomparable => "incomparable",
            ShadowResult::Dropped => "dropped",
        }
    }
}

/// One route's shadow state, kept in `Shared` across reloads (by route and candidate).
#[derive(Debug)]
pub struct ShadowRoute {
    pub config: Arc<ShadowConfig>,
    /// Requests seen, for the sampler: a share of `percent` out of every 100 exactly.
    seen: Arc<AtomicU64>,
    permits: Arc<Semaphore>,
    stats: Arc<ShadowStats>,
}

impl ShadowRoute {
    /// A new state for `config`, or `previous` with its counts kept when only the
    /// candidate's settings other than the upstream changed.
    pub fn new(
        route: &Arc<str>,
        config: Arc<ShadowConfig>,
        previous: Option<&ShadowRoute>,
    ) -> ShadowRoute {
        let (seen, stats) = match previous {
            Some(p) if p.config.upstream == config.upstream => (p.seen.clone(), p.stats.clone()),
            _ => (
                Arc::new(AtomicU64::new(0)),
                Arc::new(ShadowStats::new(route)),
            ),
        };
        ShadowRoute {
            permits: Arc::new(Semaphore::new(config.max_in_flight as usize)),
            config,
            seen,
            stats,
        }
    }

    /// True for `percent` of every 100 calls, spread evenly (call n is picked when
    /// floor(n * percent / 100) steps up).
    fn sample(&self) -> bool {
        let p = self.config.percent;
        if p <= 0.0 {
            return false;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * p / 100.0).floor() > (n * p / 100.0).floor()
    }

    /// The inventory's `shadow` section.
    pub fn report(&self) -> serde_json::Value {
        let in_flight =
            (self.config.max_in_flight as usize).saturating_sub(self.permits.available_permits());
        let mut doc = self.stats.report();
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("upstream".into(), self.config.upstream.clone().into());
            obj.insert("percent".into(), self.config.percent.into());
            obj.insert(
                "compare_pointer".into(),
                self.config.compare_pointer.clone().into(),
            );
            obj.insert("max_in_flight".into(), self.config.max_in_flight.into());
            obj.insert("in_flight".into(), in_flight.into());
        }
        doc
    }
}

/// Counts of one route's mirrors, per candidate model version.
#[derive(Debug)]
struct ShadowStats {
    counters: [metrics::Counter; 6],
    ratio: metrics::Gauge,
    inner: Mutex<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    agree: u64,
    disagree: u64,
    dropped: u64,
    versions: HashMap<String, VersionStats>,
}

#[derive(Debug)]
struct VersionStats {
    counts: [u64; 6],
    /// Candidate latency in µs of the answers it gave.
    latency: Option<hdrhistogram::Histogram<u64>>,
    first_seen: SystemTime,
    last_seen: SystemTime,
}

impl ShadowStats {
    fn new(route: &Arc<str>) -> ShadowStats {
        let counters = ShadowResult::ALL.map(|r| {
            let c = metrics::counter!(telemetry::SHADOW_REQUESTS_TOTAL, "route" => route.to_string(), "result" => r.as_str());
            c.absolute(0);
            c
        });
        ShadowStats {
            counters,
            ratio: metrics::gauge!(telemetry::SHADOW_AGREEMENT_RATIO, "route" => route.to_string()),
            inner: Mutex::new(StatsInner::default()),
        }
    }

    fn record(&self, result: ShadowResult, version: Option<&str>, latency: Option<Duration>) {
        self.counters[result as usize].increment(1);
        let Ok(mut s) = self.inner.lock() else {
            return;
        };
        match result {
            ShadowResult::Agree => s.agree += 1,
            ShadowResult::Disagree => s.disagree += 1,
            ShadowResult::Dropped => {
                s.dropped += 1;
                return;
            }
            _ => {}
        }
        if s.agree + s.disagree > 0 {
            self.ratio
                .set(s.agree as f64 / (s.agree + s.disagree) as f64);
        }
        let key = version.unwrap_or("unknown");
        let key = if s.versions.contains_key(key) || s.versions.len() < VERSIONS_CAP {
            key
        } else {
            "other"
        };
        let now = SystemTime::now();
        let v = s
            .versions
            .entry(key.to_string())
            .or_insert_with(|| VersionStats {
                counts: [0; 6],
                // 1 µs to 1 h at 3 significant digits; the bounds always fit.
                latency: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).ok(),
                first_seen: now,
                last_seen: now,
            });
        v.counts[result as usize] += 1;
        v.last_seen = now;
        if let (Some(h), Some(l)) = (v.latency.as_mut(), latency) {
            h.saturating_record((l.as_micros() as u64).max(1));
        }
    }

    fn report(&self) -> serde_json::Value {
        let Ok(s) = self.inner.lock() else {
            return serde_json::json!({});
        };
        let compared = s.agree + s.disagree;
        let mut versions: Vec<_> = s
            .versions
            .iter()
            .map(|(version, v)| {
                let q = |p: f64| {
                    v.latency
                        .as_ref()
                        .filter(|h| !h.is_empty())
                        .map(|h| h.value_at_quantile(p) as f64 / 1000.0)
                };
                let c = |r: ShadowResult| v.counts[r as usize];
                let compared = c(ShadowResult::Agree) + c(ShadowResult::Disagree);
                serde_json::json!({
                    "model_version": version,
                    "requests": v.counts.iter().sum::<u64>(),
                    "agree": c(ShadowResult::Agree),
                    "disagree": c(ShadowResult::Disagree),
                    "errors": c(ShadowResult::Error),
                    "timeouts": c(ShadowResult::Timeout),
                    "incomparable": c(ShadowResult::Incomparable),
                    "agreement_ratio": (compared > 0).then(|| c(ShadowResult::Agree) as f64 / compared as f64),
                    "p50_ms": q(0.5),
                    "p99_ms": q(0.99),
                    "first_seen": humantime::format_rfc3339_seconds(v.first_seen).to_string(),
                    "last_seen": humantime::format_rfc3339_seconds(v.last_seen).to_string(),
                })
            })
            .collect();
        versions.sort_by(|a, b| {
            a["model_version"]
                .as_str()
                .cmp(&b["model_version"].as_str())
        });
        serde_json::json!({
            "compared": compared,
            "agreement_ratio": (compared > 0).then(|| s.agree as f64 / compared as f64),
            "dropped": s.dropped,
            "versions": versions,
        })
    }
}

/// Everything a mirror needs, shared by the layer's clones.
#[derive(Debug)]
struct Mirror {
    state: Arc<ShadowRoute>,
    candidate: Upstream,
    route: Arc<RouteConfig>,
    /// The most of either answer held for the comparison.
    buffer_limit: u64,
}

#[derive(Clone, Debug)]
pub struct ShadowLayer {
    mirror: Arc<Mirror>,
}

impl ShadowLayer {
    pub fn new(
        state: Arc<ShadowRoute>,
        candidate: Upstream,
        route: Arc<RouteConfig>,
        buffer_limit: u64,
    ) -> ShadowLayer {
        ShadowLayer {
            mirror: Arc::new(Mirror {
                state,
                candidate,
                route,
                buffer_limit,
            }),
        }
    }
}

impl<S> Layer<S> for ShadowLayer {
    type Service = Shadow<S>;
    fn layer(&self, inner: S) -> Shadow<S> {
        Shadow {
            inner,
            mirror: self.mirror.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Shadow<S> {
    inner: S,
    mirror: Arc<Mirror>,
}

impl<S> Service<ProxyRequest> for Shadow<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        // Unsampled requests cost one atomic add and nothing else.
        let copy = self.mirror.state.sample().then(|| mirrored(&req.http));
        let fut = self.inner.call(req);
        let Some(copy) = copy else {
            return Box::pin(fut);
        };
        let mirror = self.mirror.clone();
        Box::pin(async move {
            let mut resp = fut.await?;
            if resp.source != Source::Ai {
                return Ok(resp);
            }
            let Ok(permit) = mirror.state.permits.clone().try_acquire_owned() else {
                mirror.state.stats.record(ShadowResult::Dropped, None, None);
                return Ok(resp);
            };
            let status = resp.http.status();
            let primary = match &resp.body_bytes {
                Some(bytes) => Primary::Whole(bytes.clone()),
                None => {
                    let (tx, rx) = oneshot::channel();
                    let body = std::mem::replace(
                        resp.http.body_mut(),
                        crate::exchange::full_body(Bytes::new()),
                    );
                    *resp.http.body_mut() = TeeBody::new(body, mirror.buffer_limit, tx).boxed();
                    Primary::Streaming(rx)
                }
            };
            tokio::spawn(async move {
                let _permit = permit;
                mirror.run(copy, status, primary).await;
            });
            Ok(resp)
        })
    }
}

/// The request as the candidate gets it: the client's, marked as a shadow call.
fn mirrored(req: &http::Request<Bytes>) -> http::Request<Bytes> {
    let mut copy = http::Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    copy.headers_mut().insert(
        http::HeaderName::from_static(X_SHADOW),
        http::HeaderValue::from_static("1"),
    );
    copy
}

/// The answer the client got: whole already, or being copied as it streams.
enum Primary {
    Whole(Bytes),
    /// `None` when the answer was larger than the limit or did not end.
    Streaming(oneshot::Receiver<Option<Bytes>>),
}

/// What the candidate said.
struct Candidate {
    status: http::StatusCode,
    version: Option<String>,
    body: Bytes,
}

impl Mirror {
    async fn run(&self, req: http::Request<Bytes>, status: http::StatusCode, primary: Primary) {
        let timeout = self.state.config.timeout;
        let started = tokio::time::Instant::now();
        let answer = tokio::time::timeout(timeout, self.call(&req)).await;
        let latency = started.elapsed();
        let candidate = match answer {
            Err(_) => return self.state.stats.record(ShadowResult::Timeout, None, None),
            Ok(Err(version)) => {
                return self.state.stats.record(
                    ShadowResult::Error,
                    version.as_deref(),
                    Some(latency),
                )
            }
            Ok(Ok(c)) => c,
        };
        let version = candidate.version.as_deref();
        // The client's answer may still be streaming: wait for it as long again at most.
        let primary = match primary {
            Primary::Whole(bytes) => Some(bytes),
            Primary::Streaming(rx) => tokio::time::timeout(timeout, rx)
                .await
                .ok()
                .and_then(Result::ok)
                .flatten(),
        };
        let result = match primary {
            None => ShadowResult::Incomparable,
            Some(_) if candidate.status != status => ShadowResult::Disagree,
            Some(primary) => {
                let pointer = self.state.config.compare_pointer.as_deref();
                if agrees(&primary, &candidate.body, pointer) {
                    ShadowResult::Agree
                } else {
                    ShadowResult::Disagree
                }
            }
        };
        self.state.stats.record(result, version, Some(latency));
    }

    /// One call to the candidate; `Err` carries the version it reported, if any.
    async fn call(&self, req: &http::Request<Bytes>) -> Result<Candidate, Option<String>> {
        let (resp, _) = self.candidate.send(req).await.map_err(|_| None)?;
        let status = resp.status();
        let mut version = crate::proxy::forward::header_version(&self.route, resp.headers());
        if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            return Err(version);
        }
        let body = Limited::new(resp.into_body(), self.buffer_limit as usize)
            .collect()
            .await
            .map_err(|_| version.clone())?
            .to_bytes();
        if version.is_none() {
            if let Some(ptr) = &self.route.model_version_pointer {
                version = crate::proxy::forward::model_version_from_json(&body, ptr);
            }
        }
        Ok(Candidate {
            status,
            version,
            body,
        })
    }
}

pub use crate::json_pointer::agree_at as agrees;

pin_project! {
    /// The client's body, copied (up to a limit) as it streams; the copy goes to the
    /// mirror when the body ends. The client's frames pass at once, unchanged.
    pub struct TeeBody {
        #[pin]
        inner: ProxyBody,
        copy: BytesMut,
        limit: u64,
        over: bool,
        tx: Option<oneshot::Sender<Option<Bytes>>>,
    }
}

impl TeeBody {
    pub fn new(inner: ProxyBody, limit: u64, tx: oneshot::Sender<Option<Bytes>>) -> TeeBody {
        TeeBody {
            inner,
            copy: BytesMut::new(),
            limit,
            over: false,
            tx: Some(tx),
        }
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !*this.over {
                        if (this.copy.len() + data.len()) as u64 > *this.limit {
                            *this.over = true;
                            *this.copy = BytesMut::new();
                        } else {
                            this.copy.extend_from_slice(data);
                        }
                    }
                }
                // hyper stops polling a body that says it is over: hand the copy on now.
                if this.inner.is_end_stream() {
                    send_copy(this.tx, this.copy, *this.over);
                }
            }
            Poll::Ready(None) => send_copy(this.tx, this.copy, *this.over),
            // A body that failed never reached the client whole: nothing to compare.
            Poll::Ready(Some(Err(_))) => {
                this.tx.take();
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

fn send_copy(tx: &mut Option<oneshot::Sender<Option<Bytes>>>, copy: &mut BytesMut, over: bool) {
    if let Some(tx) = tx.take() {
        let bytes = (!over).then(|| std::mem::take(copy).freeze());
        let _ = tx.send(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(percent: f64) -> ShadowRoute {
        ShadowRoute::new(
            &Arc::from("r"),
            Arc::new(ShadowConfig {
                upstream: "cand".into(),
                percent,
                compare_pointer: None,
                max_in_flight: 2,
                timeout: Duration::from_secs(1),
            }),
            None,
        )
    }

    #[test]
    fn the_sampler_picks_exactly_the_share() {
        for (percent, of_1000) in [(10.0, 100), (0.0, 0), (100.0, 1000), (2.5, 25), (33.0, 330)] {
            let s = state(percent);
            let picked = (0..1000).filter(|_| s.sample()).count();
            assert_eq!(picked, of_1000, "{percent}%");
        }
    }

    #[test]
    fn answers_agree_as_json_values_at_the_pointer() {
        let a = br#"{"items":[1,2],"model":"v1","took_ms":3}"#;
        let b = br#"{ "took_ms": 9, "model": "v2", "items": [1, 2] }"#;
        assert!(agrees(a, b, Some("/items")));
        assert!(!agrees(a, b, None));
        assert!(!agrees(a, br#"{"items":[2,1]}"#, Some("/items")));
        assert!(!agrees(a, br#"{"other":1}"#, Some("/items")));
        assert!(agrees(b"plain", b"plain", None));
        assert!(!agrees(b"plain", b"plain", Some("/items")));
    }

    #[test]
    fn counts_go_to_the_candidate_version_and_the_ratio() {
        let s = state(10.0);
        for _ in 0..3 {
            s.stats.record(
                ShadowResult::Agree,
                Some("v9"),
                Some(Duration::from_millis(5)),
            );
        }
        s.stats.record(
            ShadowResult::Disagree,
            Some("v9"),
            Some(Duration::from_millis(7)),
        );
        s.stats.record(ShadowResult::Timeout, None, None);
        s.stats.record(ShadowResult::Dropped, None, None);
        let doc = s.report();
        assert_eq!(doc["agreement_ratio"], 0.75);
        assert_eq!(doc["dropped"], 1);
        let versions = doc["versions"].as_array().unwrap();
        assert_eq!(versions.len(), 2);
        assert_eq!(versions[0]["model_version"], "unknown");
        assert_eq!(versions[0]["timeouts"], 1);
        assert_eq!(versions[1]["model_version"], "v9");
        assert_eq!(versions[1]["requests"], 4);
        assert!((versions[1]["p99_ms"].as_f64().unwrap() - 7.0).abs() < 0.1);
    }

    #[tokio::test]
    async fn the_tee_passes_every_frame_and_hands_over_the_copy() {
        let (tx, rx) = oneshot::channel();
        let body = TeeBody::new(crate::exchange::full_body("hello"), 100, tx);
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        assert_eq!(rx.await.unwrap().as_deref(), Some(&b"hello"[..]));

        let (tx, rx) = oneshot::channel();
        let body = TeeBody::new(crate::exchange::full_body("too long"), 3, tx);
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"too long", "the client still gets all of it");
        assert_eq!(
            rx.await.unwrap(),
            None,
            "over the limit: nothing to compare"
        );
    }
}
