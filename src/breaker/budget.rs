//! Retry budget (as in Finagle and linkerd): retries may add at most `ratio` of the
//! requests seen over the last window, plus a small per-second floor so a quiet route can
//! still retry. A failing AI service therefore sees at most (1 + ratio) times its normal
//! load, never a retry storm.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

const BUCKETS: usize = 10;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_s: u32,
    bucket_len: Duration,
    window: Duration,
    inner: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// Slot i holds bucket number n (n % BUCKETS == i): (n, requests, retries).
    buckets: [(u64, u64, u64); BUCKETS],
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_s: u32, window: Duration) -> Self {
        let window = window.max(Duration::from_millis(BUCKETS as u64));
        RetryBudget {
            ratio: ratio.clamp(0.0, 1000.0),
            min_per_s,
            bucket_len: window / BUCKETS as u32,
            window,
            inner: Mutex::new(Window {
                buckets: [(u64::MAX, 0, 0); BUCKETS],
            }),
        }
    }

    /// Runs `f` on the current bucket with the window's totals (requests, retries).
    fn with<T>(
        &self,
        now: Instant,
        f: impl FnOnce(&mut (u64, u64, u64), u64, u64) -> T,
    ) -> Option<T> {
        let mut w = self.inner.lock().ok()?;
        let current = bucket_number(now, self.bucket_len);
        let (mut requests, mut retries) = (0, 0);
        for b in w.buckets.iter() {
            if b.0 != u64::MAX && b.0 + (BUCKETS as u64) > current && b.0 <= current {
                requests += b.1;
                retries += b.2;
            }
        }
        let slot = &mut w.buckets[(current % BUCKETS as u64) as usize];
        if slot.0 != current {
            *slot = (current, 0, 0);
        }
        Some(f(slot, requests, retries))
    }

    /// Counts one original request.
    pub fn deposit(&self, now: Instant) {
        self.with(now, |b, _, _| b.1 += 1);
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let floor = self.min_per_s as f64 * self.window.as_secs_f64();
        let ratio = self.ratio;
        self.with(now, |b, deposits, withdrawals| {
            let allowed = floor + ratio * deposits as f64;
            if (withdrawals as f64) + 1.0 <= allowed {
                b.2 += 1;
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }
}

/// Number of the `bucket`-long slice of time `now` falls in, from a process-wide origin.
fn bucket_number(now: Instant, bucket: Duration) -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let origin = Instant::from_std(*ORIGIN.get_or_init(std::time::Instant::now));
    (now.saturating_duration_since(origin).as_nanos() / bucket.as_nanos().max(1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_stay_within_the_ratio() {
        let budget = RetryBudget::new(0.2, 0, Duration::from_secs(10));
        let now = Instant::now();
        let mut retries = 0;
        for _ in 0..100 {
            budget.deposit(now);
            if budget.try_withdraw(now) {
                retries += 1;
            }
        }
        assert_eq!(retries, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn floor_allows_retries_at_low_traffic_and_old_requests_expire() {
        let budget = RetryBudget::new(0.0, 1, Duration::from_secs(10));
        let now = Instant::now();
        let granted = (0..50).filter(|_| budget.try_withdraw(now)).count();
        assert_eq!(granted, 10, "1/s over a 10 s window");

        let budget = RetryBudget::new(0.5, 0, Duration::from_secs(10));
        for _ in 0..10 {
            budget.deposit(now);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            !budget.try_withdraw(Instant::now()),
            "deposits older than the window still counted"
        );
    }
}
