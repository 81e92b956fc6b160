//! Sliding-window request statistics (count, failures, latency histogram) in time
//! buckets: what canary analysis and the inventory's per-version error rate and p99 read.

use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::window::{self, Window};

/// Latencies are recorded in microseconds, up to a minute, 2 significant digits.
const MAX_US: u64 = 60_000_000;

#[derive(Debug, Clone)]
struct Slot {
    requests: u64,
    failures: u64,
    hist: Histogram<u64>,
}

impl window::Bucket for Slot {
    fn clear(&mut self) {
        self.requests = 0;
        self.failures = 0;
        // Keeps the histogram's storage: recording never allocates.
        self.hist.reset();
    }
}

#[derive(Debug, Clone)]
pub struct WindowStats {
    window: Window<Slot>,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    pub requests: u64,
    pub failures: u64,
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[allow(clippy::expect_used)] // constant, valid bounds: this cannot fail
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 2).expect("valid histogram bounds")
}

impl WindowStats {
    pub fn new(window: Duration) -> Self {
        WindowStats {
            window: Window::new(window, || Slot {
                requests: 0,
                failures: 0,
                hist: histogram(),
            }),
        }
    }

    pub fn record(&mut self, now: Instant, latency: Duration, failed: bool) {
        let slot = self.window.current(now);
        slot.requests += 1;
        slot.failures += failed as u64;
        let us = (latency.as_micros() as u64).clamp(1, MAX_US);
        let _ = slot.hist.record(us);
    }

    pub fn summary(&self, now: Instant) -> Summary {
        let mut merged = histogram();
        let (mut requests, mut failures) = (0, 0);
        for s in self.window.live(now) {
            requests += s.requests;
            failures += s.failures;
            let _ = merged.add(&s.hist);
        }
        let pct =
            |q: f64| (!merged.is_empty()).then(|| merged.value_at_quantile(q) as f64 / 1000.0);
        Summary {
            requests,
            failures,
            error_rate: if requests == 0 {
                0.0
            } else {
                failures as f64 / requests as f64
            },
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
        }
    }

    /// Forgets everything (a promoted or re-enabled variant starts a fresh window).
    pub fn clear(&mut self) {
        self.window.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rates_and_percentiles_over_the_window() {
        let mut w = WindowStats::new(Duration::from_secs(10));
        let now = Instant::now();
        for i in 0..100u64 {
            w.record(now, Duration::from_millis(i + 1), i % 10 == 0);
        }
        let s = w.summary(now);
        assert_eq!(s.requests, 100);
        assert_eq!(s.failures, 10);
        assert!((s.error_rate - 0.1).abs() < 1e-9);
        let p99 = s.p99_ms.unwrap();
        assert!((98.0..=101.0).contains(&p99), "{p99}");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(w.summary(Instant::now()).requests, 0);
        assert_eq!(w.summary(Instant::now()).p99_ms, None);
    }
}
