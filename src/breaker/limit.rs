//! Concurrency limit per upstream (bulkhead) with an optional adaptive limit: AIMD as in
//! Netflix concurrency-limits. Success below the latency target grows the limit by
//! 1/limit (about +1 per round trip of the whole window); a failure, a timeout or a
//! latency far above the observed baseline cuts it by 10%.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::classify::CallOutcome;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitSettings {
    pub initial: u32,
    pub min: u32,
    pub max: u32,
    pub adaptive: bool,
}

#[derive(Debug)]
pub struct ConcurrencyLimiter {
    settings: LimitSettings,
    in_flight: AtomicU32,
    /// The limit in force (integer part of `state.limit`).
    limit: AtomicU32,
    state: Mutex<Aimd>,
}

#[derive(Debug)]
struct Aimd {
    limit: f64,
    /// Exponentially weighted baseline of successful call latency.
    baseline: Option<Duration>,
}

impl ConcurrencyLimiter {
    pub fn new(settings: LimitSettings) -> Self {
        let min = settings.min.max(1);
        let max = settings.max.max(min);
        let initial = settings.initial.clamp(min, max);
        ConcurrencyLimiter {
            settings: LimitSettings {
                initial,
                min,
                max,
                adaptive: settings.adaptive,
            },
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(initial),
            state: Mutex::new(Aimd {
                limit: initial as f64,
                baseline: None,
            }),
        }
    }

    /// Never waits: over the limit the caller sheds the request.
    #[cfg(test)]
    pub fn try_acquire(self: &Arc<Self>) -> Option<LimitPermit> {
        self.try_acquire_share(1.0)
    }

    /// Like `try_acquire`, but only while fewer than `share` of the limit (at least one
    /// slot) are in flight: what is left is headroom for callers with a larger share.
    pub fn try_acquire_share(self: &Arc<Self>, share: f64) -> Option<LimitPermit> {
        let full = self.limit.load(Ordering::Relaxed);
        let limit = if share >= 1.0 {
            full
        } else {
            ((full as f64 * share).floor() as u32).clamp(1, full)
        };
        let mut current = self.in_flight.load(Ordering::Relaxed);
        loop {
            if current >= limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(LimitPermit {
                        limiter: self.clone(),
                    })
                }
                Err(now) => current = now,
            }
        }
    }

    #[cfg(test)]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    fn feed(&self, outcome: CallOutcome, latency: Duration) {
        if !self.settings.adaptive {
            return;
        }
        let Ok(mut s) = self.state.lock() else { return };
        let too_slow = s
            .baseline
            .is_some_and(|b| latency > b * 2 + Duration::from_millis(5));
        if outcome.is_failure() || too_slow {
            s.limit = (s.limit * 0.9).max(self.settings.min as f64);
        } else {
            s.limit = (s.limit + 1.0 / s.limit).min(self.settings.max as f64);
            s.baseline = Some(match s.baseline {
                None => latency,
                Some(b) => b.mul_f64(0.95) + latency.mul_f64(0.05),
            });
        }
        self.limit.store(s.limit as u32, Ordering::Relaxed);
    }
}

/// One slot in the bulkhead; freed on drop.
#[derive(Debug)]
pub struct LimitPermit {
    limiter: Arc<ConcurrencyLimiter>,
}

impl LimitPermit {
    /// Feeds the adaptive limit with how the call went, then frees the slot.
    pub fn record(self, outcome: CallOutcome, latency: Duration) {
        self.limiter.feed(outcome, latency);
    }
}

impl Drop for LimitPermit {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::FailureKind;

    fn limiter(adaptive: bool) -> Arc<ConcurrencyLimiter> {
        Arc::new(ConcurrencyLimiter::new(LimitSettings {
            initial: 4,
            min: 2,
            max: 8,
            adaptive,
        }))
    }

    #[test]
    fn a_smaller_share_is_shed_first_and_keeps_headroom_for_larger_ones() {
        let l = Arc::new(ConcurrencyLimiter::new(LimitSettings {
            initial: 10,
            min: 1,
            max: 10,
            adaptive: false,
        }));
        let low: Vec<_> = (0..5).map(|_| l.try_acquire_share(0.5).unwrap()).collect();
        assert!(l.try_acquire_share(0.5).is_none(), "low may use half");
        let medium: Vec<_> = (0..3).map(|_| l.try_acquire_share(0.8).unwrap()).collect();
        assert!(l.try_acquire_share(0.8).is_none());
        let high: Vec<_> = (0..2).map(|_| l.try_acquire_share(1.0).unwrap()).collect();
        assert!(l.try_acquire().is_none());
        drop((low, medium, high));
        // A tiny limit still lets every share through one at a time.
        let one = Arc::new(ConcurrencyLimiter::new(LimitSettings {
            initial: 1,
            min: 1,
            max: 1,
            adaptive: false,
        }));
        assert!(one.try_acquire_share(0.5).is_some());
    }

    #[test]
    fn sheds_over_the_limit_and_frees_on_drop() {
        let l = limiter(false);
        let permits: Vec<_> = (0..4).map(|_| l.try_acquire().unwrap()).collect();
        assert!(l.try_acquire().is_none());
        assert_eq!(l.in_flight(), 4);
        drop(permits);
        assert_eq!(l.in_flight(), 0);
        assert!(l.try_acquire().is_some());
    }

    #[test]
    fn adaptive_limit_shrinks_on_failures_and_grows_on_success() {
        let l = limiter(true);
        for _ in 0..20 {
            l.try_acquire().unwrap().record(
                CallOutcome::Failure(FailureKind::Timeout),
                Duration::from_millis(10),
            );
        }
        assert_eq!(l.limit(), 2, "clamped at min");
        for _ in 0..200 {
            l.try_acquire()
                .unwrap()
                .record(CallOutcome::Success, Duration::from_millis(10));
        }
        assert_eq!(l.limit(), 8, "grew back to max");
        // Latency far above the baseline counts as congestion.
        for _ in 0..5 {
            l.try_acquire()
                .unwrap()
                .record(CallOutcome::Success, Duration::from_millis(500));
        }
        assert!(l.limit() < 8);
    }
}
