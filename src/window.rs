//! One bucketed sliding time window, shared by the circuit breaker, the retry budget and the
//! canary analysis. Depends on nothing else in the crate.
//!
//! The window is cut into `BUCKETS` equal slices of time. Slot `i` holds the bucket whose
//! number `n` (slices since `origin`) has `n % BUCKETS == i`; a slot found holding an older
//! number is cleared in place and reused, so recording never allocates and old data ages
//! out without a timer.

use std::time::Duration;

use tokio::time::Instant;

/// Slices per window: one tenth of the window ages out at a time.
pub(crate) const BUCKETS: usize = 10;

/// What one slice of time counts. `clear` empties it in place, without allocating.
pub(crate) trait Bucket {
    fn clear(&mut self);
}

#[derive(Debug, Clone)]
struct Slot<B> {
    /// The bucket number held, or `EMPTY`.
    number: u64,
    bucket: B,
}

const EMPTY: u64 = u64::MAX;

#[derive(Debug, Clone)]
pub(crate) struct Window<B> {
    origin: Instant,
    bucket_len: Duration,
    slots: [Slot<B>; BUCKETS],
}

impl<B: Bucket> Window<B> {
    /// A window of `span` (each bucket at least 1 ms), buckets made by `make`.
    pub(crate) fn new(span: Duration, mut make: impl FnMut() -> B) -> Self {
        Window {
            origin: Instant::now(),
            bucket_len: (span / BUCKETS as u32).max(Duration::from_millis(1)),
            slots: std::array::from_fn(|_| Slot {
                number: EMPTY,
                bucket: make(),
            }),
        }
    }

    fn number(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.bucket_len.as_nanos()) as u64
    }

    /// The bucket `now` falls in, cleared first if its slot held an older slice.
    pub(crate) fn current(&mut self, now: Instant) -> &mut B {
        let n = self.number(now);
        let slot = &mut self.slots[(n % BUCKETS as u64) as usize];
        if slot.number != n {
            slot.number = n;
            slot.bucket.clear();
        }
        &mut slot.bucket
    }

    /// The buckets inside the window that ends at `now`.
    pub(crate) fn live(&self, now: Instant) -> impl Iterator<Item = &B> {
        let n = self.number(now);
        self.slots
            .iter()
            .filter(move |s| s.number != EMPTY && s.number <= n && s.number + (BUCKETS as u64) > n)
            .map(|s| &s.bucket)
    }

    /// Forgets everything recorded.
    pub(crate) fn clear(&mut self) {
        for s in &mut self.slots {
            s.number = EMPTY;
            s.bucket.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Default)]
    struct Count(u64);

    impl Bucket for Count {
        fn clear(&mut self) {
            self.0 = 0;
        }
    }

    fn total(w: &Window<Count>, now: Instant) -> u64 {
        w.live(now).map(|c| c.0).sum()
    }

    #[tokio::test(start_paused = true)]
    async fn counts_age_out_one_bucket_at_a_time() {
        let mut w = Window::new(Duration::from_secs(10), Count::default);
        for _ in 0..3 {
            w.current(Instant::now()).0 += 1;
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        w.current(Instant::now()).0 += 10;
        assert_eq!(total(&w, Instant::now()), 13);
        // The first bucket leaves the window 10 s after it began; the second stays.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(total(&w, Instant::now()), 10);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(total(&w, Instant::now()), 0);
        // A slot reused by a later slice starts from zero.
        w.current(Instant::now()).0 += 1;
        assert_eq!(total(&w, Instant::now()), 1);
        w.clear();
        assert_eq!(total(&w, Instant::now()), 0);
    }
}
