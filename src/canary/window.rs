//! Sliding-window request statistics (count, failures, latency histogram) in time
//! buckets: what canary analysis and the inventory's per-version error rate and p99 read.

use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

const BUCKETS: usize = 10;
/// Latencies are recorded in microseconds, up to a minute, 2 significant digits.
const MAX_US: u64 = 60_000_000;

#[derive(Debug, Clone)]
struct Slot {
    number: u64,
    requests: u64,
    failures: u64,
    hist: Histogram<u64>,
}

#[derive(Debug, Clone)]
pub struct WindowStats {
    origin: Instant,
    bucket_len: Duration,
    slots: Vec<Slot>,
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
        let bucket_len = (window / BUCKETS as u32).max(Duration::from_millis(1));
        WindowStats {
            origin: Instant::now(),
            bucket_len,
            slots: (0..BUCKETS)
                .map(|_| Slot {
                    number: u64::MAX,
                    requests: 0,
                    failures: 0,
                    hist: histogram(),
                })
                .collect(),
        }
    }

    fn number(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.bucket_len.as_nanos()) as u64
    }

    pub fn record(&mut self, now: Instant, latency: Duration, failed: bool) {
        let n = self.number(now);
        let slot = &mut self.slots[(n % BUCKETS as u64) as usize];
        if slot.number != n {
            slot.number = n;
            slot.requests = 0;
            slot.failures = 0;
            slot.hist.reset();
        }
        slot.requests += 1;
        slot.failures += failed as u64;
        let us = (latency.as_micros() as u64).clamp(1, MAX_US);
        let _ = slot.hist.record(us);
    }

    pub fn summary(&self, now: Instant) -> Summary {
        let n = self.number(now);
        let mut merged = histogram();
        let (mut requests, mut failures) = (0, 0);
        for s in &self.slots {
            if s.number != u64::MAX && s.number <= n && s.number + (BUCKETS as u64) > n {
                requests += s.requests;
                failures += s.failures;
                let _ = merged.add(&s.hist);
            }
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
        for s in &mut self.slots {
            s.number = u64::MAX;
            s.requests = 0;
            s.failures = 0;
            s.hist.reset();
        }
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
