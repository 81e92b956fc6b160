//! Load driver: open-loop constant rate (latency measured from each request's intended send
//! time, so a stall is charged to every request it delayed: no coordinated omission, as in
//! wrk2) or closed-loop max throughput, over many HTTP/1.1 keep-alive connections.
//!
//! Each connection owns an even share of the schedule (request k goes at start + k/rate).
//! Results: an HDR histogram overall and per second, status codes and the
//! `x-breakwater-*` headers per second, and transport errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What to send and how.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub path: String,
    pub method: http::Method,
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
    /// Requests per second; `None` = closed loop, as fast as each connection can go.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub connections: usize,
    /// A request slower than this counts as a timeout error.
    pub timeout: Duration,
}

impl LoadSpec {
    pub fn get(target: SocketAddr, path: &str) -> Self {
        LoadSpec {
            target,
            path: path.to_string(),
            method: http::Method::GET,
            body: Bytes::new(),
            headers: Vec::new(),
            rate: None,
            duration: Duration::from_secs(5),
            connections: 64,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Counters for one second (or the whole run).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub status: BTreeMap<u16, u64>,
    /// `x-breakwater-outcome` values (ai, fallback, error; "none" when absent).
    pub outcome: BTreeMap<String, u64>,
    pub fallback: BTreeMap<String, u64>,
    pub reason: BTreeMap<String, u64>,
    pub dlq: BTreeMap<String, u64>,
}

impl Counts {
    fn merge(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.errors += o.errors;
        for (k, v) in &o.status {
            *self.status.entry(*k).or_default() += v;
        }
        for (mine, theirs) in [
            (&mut self.outcome, &o.outcome),
            (&mut self.fallback, &o.fallback),
            (&mut self.reason, &o.reason),
            (&mut self.dlq, &o.dlq),
        ] {
            for (k, v) in theirs {
                *mine.entry(k.clone()).or_default() += v;
            }
        }
    }

    pub fn count_5xx(&self) -> u64 {
        self.status
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum()
    }
}

/// One second of the run.
#[derive(Debug, Clone)]
pub struct Second {
    pub counts: Counts,
    pub latency: Histogram<u64>,
}

#[derive(Debug, Clone)]
pub struct LoadResult {
    pub elapsed: Duration,
    pub counts: Counts,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    /// Latency by `x-breakwater-outcome` (ai, fallback, error, none).
    pub by_outcome: BTreeMap<String, Histogram<u64>>,
    pub seconds: Vec<Second>,
}

impl LoadResult {
    /// Adds another run over the same period (several streams of one scenario).
    pub fn merge(&mut self, other: &LoadResult) -> anyhow::Result<()> {
        self.counts.merge(&other.counts);
        self.latency.add(&other.latency)?;
        for (k, h) in &other.by_outcome {
            self.by_outcome
                .entry(k.clone())
                .or_insert_with(histogram)
                .add(h)?;
        }
        for (i, s) in other.seconds.iter().enumerate() {
            if self.seconds.len() <= i {
                self.seconds.push(Second {
                    counts: Counts::default(),
                    latency: per_second_histogram(),
                });
            }
            self.seconds[i].counts.merge(&s.counts);
            self.seconds[i].latency.add(&s.latency)?;
        }
        Ok(())
    }

    pub fn throughput(&self) -> f64 {
        (self.counts.requests - self.counts.errors) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Latency quantile in milliseconds for one outcome, if any such response came.
    pub fn outcome_ms(&self, outcome: &str, q: f64) -> Option<f64> {
        let h = self.by_outcome.get(outcome)?;
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    }
}

#[allow(clippy::expect_used)] // constant, valid bounds
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

fn per_second_histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)] // constant, valid bounds
    Histogram::new_with_bounds(1, 120_000_000, 2).expect("valid histogram bounds")
}

struct ConnResult {
    counts: Counts,
    latency: Histogram<u64>,
    by_outcome: BTreeMap<String, Histogram<u64>>,
    seconds: Vec<Second>,
}

/// Runs the load and returns when the duration is over and in-flight requests are done
/// (or timed out). Bounded: at most `rate * duration` requests in open loop.
pub async fn run(spec: LoadSpec) -> anyhow::Result<LoadResult> {
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(spec.connections);
    for k in 0..spec.connections {
        let spec = spec.clone();
        tasks.push(tokio::spawn(
            async move { connection(spec, k, start).await },
        ));
    }
    let mut counts = Counts::default();
    let mut latency = histogram();
    let mut by_outcome: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    let mut seconds: Vec<Second> = Vec::new();
    for t in tasks {
        let r = t.await?;
        counts.merge(&r.counts);
        latency.add(&r.latency)?;
        for (k, h) in &r.by_outcome {
            by_outcome
                .entry(k.clone())
                .or_insert_with(histogram)
                .add(h)?;
        }
        for (i, s) in r.seconds.into_iter().enumerate() {
            if seconds.len() <= i {
                seconds.push(Second {
                    counts: Counts::default(),
                    latency: per_second_histogram(),
                });
            }
            seconds[i].counts.merge(&s.counts);
            seconds[i].latency.add(&s.latency)?;
        }
    }
    Ok(LoadResult {
        elapsed: spec.duration,
        counts,
        latency,
        by_outcome,
        seconds,
    })
}

async fn connect(target: SocketAddr) -> Option<http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(target).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(sender)
}

fn header_str(resp: &http::response::Parts, name: &str) -> String {
    resp.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string()
}

async fn connection(spec: LoadSpec, k: usize, start: Instant) -> ConnResult {
    let mut out = ConnResult {
        counts: Counts::default(),
        latency: histogram(),
        by_outcome: BTreeMap::new(),
        seconds: Vec::new(),
    };
    let end = start + spec.duration;
    let interval = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.connections as f64 / r.max(0.001)));
    let offset = spec
        .rate
        .map(|r| Duration::from_secs_f64(k as f64 / r.max(0.001)))
        .unwrap_or_default();
    let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
    let mut n: u32 = 0;
    // When the previous response on this connection came back.
    let mut idle_since = start;
    tokio::time::sleep_until(start).await;
    loop {
        let intended = match interval {
            Some(iv) => start + offset + iv * n,
            None => Instant::now(),
        };
        if intended >= end {
            break;
        }
        n += 1;
        if interval.is_some() {
            tokio::time::sleep_until(intended).await;
        }
        // Coordinated omission: if this connection was still busy at the intended time,
        // the wait is the server's fault and counts. If it was idle, any lateness is the
        // timer's (tokio has 1 ms granularity) and is not charged to the server.
        let base = if idle_since <= intended {
            Instant::now()
        } else {
            intended
        };
        let second = intended.saturating_duration_since(start).as_secs() as usize;
        while out.seconds.len() <= second {
            out.seconds.push(Second {
                counts: Counts::default(),
                latency: per_second_histogram(),
            });
        }
        let result = tokio::time::timeout(spec.timeout, send_one(&spec, &mut sender)).await;
        idle_since = Instant::now();
        let latency = idle_since - base;
        let sec = &mut out.seconds[second];
        out.counts.requests += 1;
        sec.counts.requests += 1;
        match result {
            Ok(Some(parts)) => {
                let us = (latency.as_micros() as u64).max(1);
                let _ = out.latency.record(us);
                let _ = sec.latency.record(us);
                let _ = out
                    .by_outcome
                    .entry(header_str(&parts, "x-breakwater-outcome"))
                    .or_insert_with(histogram)
                    .record(us);
                for c in [&mut out.counts, &mut sec.counts] {
                    *c.status.entry(parts.status.as_u16()).or_default() += 1;
                    *c.outcome
                        .entry(header_str(&parts, "x-breakwater-outcome"))
                        .or_default() += 1;
                    if parts.headers.contains_key("x-breakwater-fallback") {
                        *c.fallback
                            .entry(header_str(&parts, "x-breakwater-fallback"))
                            .or_default() += 1;
                    }
                    if parts.headers.contains_key("x-breakwater-reason") {
                        *c.reason
                            .entry(header_str(&parts, "x-breakwater-reason"))
                            .or_default() += 1;
                    }
                    if parts.headers.contains_key("x-breakwater-dlq") {
                        *c.dlq
                            .entry(header_str(&parts, "x-breakwater-dlq"))
                            .or_default() += 1;
                    }
                }
            }
            _ => {
                out.counts.errors += 1;
                sec.counts.errors += 1;
                sender = None;
            }
        }
    }
    out
}

async fn send_one(
    spec: &LoadSpec,
    sender: &mut Option<http1::SendRequest<Full<Bytes>>>,
) -> Option<http::response::Parts> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = connect(spec.target).await;
    }
    let s = sender.as_mut()?;
    s.ready().await.ok()?;
    let mut req = http::Request::builder()
        .method(spec.method.clone())
        .uri(spec.path.as_str())
        .header(http::header::HOST, spec.target.to_string());
    for (k, v) in &spec.headers {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(spec.body.clone())).ok()?;
    let resp = s.send_request(req).await.ok()?;
    let (parts, body) = resp.into_parts();
    // Read the whole body: the latency is to the last byte, as a client sees it.
    body.collect().await.ok()?;
    Some(parts)
}
