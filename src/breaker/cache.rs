//! Last good AI answer per request digest, for the `cache` fallback. Bounded by entries
//! and bytes (LRU eviction) and by age (TTL on read).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use lru::LruCache;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct CachedResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub stored_at: Instant,
}

impl CachedResponse {
    fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        (self.body.len() + headers + 64) as u64
    }
}

#[derive(Debug)]
pub struct ResponseCache {
    ttl: Duration,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    lru: LruCache<[u8; 32], CachedResponse>,
    bytes: u64,
}

impl ResponseCache {
    pub fn new(max_entries: usize, max_bytes: u64, ttl: Duration) -> Self {
        ResponseCache {
            ttl,
            max_bytes,
            inner: Mutex::new(Inner {
                lru: LruCache::new(
                    NonZeroUsize::new(max_entries.max(1)).unwrap_or(NonZeroUsize::MIN),
                ),
                bytes: 0,
            }),
        }
    }

    pub fn get(&self, key: &[u8; 32], now: Instant) -> Option<CachedResponse> {
        let mut inner = self.inner.lock().ok()?;
        let fresh = inner
            .lru
            .get(key)
            .map(|v| now.saturating_duration_since(v.stored_at) < self.ttl)?;
        if fresh {
            return inner.lru.get(key).cloned();
        }
        if let Some(old) = inner.lru.pop(key) {
            inner.bytes -= old.weight();
        }
        None
    }

    pub fn put(&self, key: [u8; 32], mut value: CachedResponse, now: Instant) {
        value.stored_at = now;
        let weight = value.weight();
        if weight > self.max_bytes {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if let Some(old) = inner.lru.pop(&key) {
            inner.bytes -= old.weight();
        }
        while inner.bytes + weight > self.max_bytes {
            match inner.lru.pop_lru() {
                Some((_, old)) => inner.bytes -= old.weight(),
                None => break,
            }
        }
        if let Some((_, evicted)) = inner.lru.push(key, value) {
            inner.bytes -= evicted.weight();
        }
        inner.bytes += weight;
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.lru.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().map(|i| i.bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &'static str) -> CachedResponse {
        CachedResponse {
            status: 200,
            headers: http::HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
            stored_at: Instant::now(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expires_after_ttl() {
        let c = ResponseCache::new(10, 1 << 20, Duration::from_secs(60));
        c.put([1; 32], entry("a"), Instant::now());
        assert!(c.get(&[1; 32], Instant::now()).is_some());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(c.get(&[1; 32], Instant::now()).is_none());
        assert_eq!(c.bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn evicts_least_recently_used_by_entries_and_bytes() {
        let c = ResponseCache::new(2, 1 << 20, Duration::from_secs(60));
        let now = Instant::now();
        c.put([1; 32], entry("a"), now);
        c.put([2; 32], entry("b"), now);
        c.get(&[1; 32], now);
        c.put([3; 32], entry("c"), now);
        assert!(c.get(&[2; 32], now).is_none(), "the LRU entry survived");
        assert!(c.get(&[1; 32], now).is_some());

        let c = ResponseCache::new(100, 200, Duration::from_secs(60));
        for i in 0..10u8 {
            c.put(
                [i; 32],
                entry("0123456789012345678901234567890123456789"),
                now,
            );
        }
        assert!(c.bytes() <= 200);
        assert!(c.len() < 10);
        assert!(
            c.get(&[9; 32], now).is_some(),
            "the newest entry was evicted"
        );
    }
}
