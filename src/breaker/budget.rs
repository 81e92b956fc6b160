//! Retry budget (as in Finagle and linkerd): retries may add at most `ratio` of the
//! requests seen over the last window, plus a small per-second floor so a quiet route can
//! still retry. A failing AI service therefore sees at most (1 + ratio) times its normal
//! load, never a retry storm.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::window::{self, Window, BUCKETS};

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_s: u32,
    window: Duration,
    counts: Mutex<Window<Counts>>,
}

/// One slice of the window: original requests and retries granted.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u64,
    retries: u64,
}

impl window::Bucket for Counts {
    fn clear(&mut self) {
        *self = Counts::default();
    }
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_s: u32, window: Duration) -> Self {
        let window = window.max(Duration::from_millis(BUCKETS as u64));
        RetryBudget {
            ratio: ratio.clamp(0.0, 1000.0),
            min_per_s,
            window,
            counts: Mutex::new(Window::new(window, Counts::default)),
        }
    }

    /// Runs `f` on the current bucket with the window's totals (requests, retries).
    fn with<T>(&self, now: Instant, f: impl FnOnce(&mut Counts, u64, u64) -> T) -> Option<T> {
        let mut w = self.counts.lock().ok()?;
        let (requests, retries) = w
            .live(now)
            .fold((0, 0), |(q, r), c| (q + c.requests, r + c.retries));
        Some(f(w.current(now), requests, retries))
    }

    /// Counts one original request.
    pub fn deposit(&self, now: Instant) {
        self.with(now, |b, _, _| b.requests += 1);
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let floor = self.min_per_s as f64 * self.window.as_secs_f64();
        let ratio = self.ratio;
        self.with(now, |b, deposits, withdrawals| {
            let allowed = floor + ratio * deposits as f64;
            if (withdrawals as f64) + 1.0 <= allowed {
                b.retries += 1;
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }
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
