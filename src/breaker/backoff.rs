//! Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
//! Jitter"): spreads retries of many clients instead of synchronising them.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
        }
    }

    /// The cap for retry number `attempt` (1 = first retry): min(max, base * 2^(attempt-1)).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// A delay drawn uniformly from [0, ceiling(attempt)].
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self.ceiling(attempt).as_micros() as u64;
        if cap == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(rand::rng().random_range(0..=cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_to_the_cap_with_jitter_inside() {
        let b = Backoff::new(Duration::from_millis(25), Duration::from_millis(250));
        assert_eq!(b.ceiling(1), Duration::from_millis(25));
        assert_eq!(b.ceiling(2), Duration::from_millis(50));
        assert_eq!(b.ceiling(4), Duration::from_millis(200));
        assert_eq!(b.ceiling(5), Duration::from_millis(250));
        assert_eq!(b.ceiling(60), Duration::from_millis(250));
        let delays: Vec<_> = (0..200).map(|_| b.delay(3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(100)));
        // Full jitter: the draws spread over the range, not all at the cap.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(50)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(50)));
    }
}
