//! Last good AI answer per request digest, for the `cache` fallback. Bounded by entries
//! and bytes (LRU eviction) and by age (TTL on read).
//!
//! The digest covers the method, path and query, the `vary` headers (by default the
//! credentials and the variants' sticky headers: one user's answer is never served to
//! another) and the body. It is an HMAC under a key drawn when the cache is made, so the
//! cache holds no credential, nor anything that can be matched against a guessed one
//! outside this process.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use lru::LruCache;
use sha2::Sha256;
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

pub struct ResponseCache {
    ttl: Duration,
    max_bytes: u64,
    /// Request headers whose values are part of the key, in config order.
    vary: Vec<http::HeaderName>,
    /// Keyed with a random key per cache (see the module docs).
    mac: Hmac<Sha256>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("ttl", &self.ttl)
            .field("max_bytes", &self.max_bytes)
            .field("vary", &self.vary)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Inner {
    lru: LruCache<[u8; 32], CachedResponse>,
    bytes: u64,
}

impl ResponseCache {
    /// A cache keyed on no request header: use [`ResponseCache::vary_on`] for any answer
    /// that may depend on who asks.
    pub fn new(max_entries: usize, max_bytes: u64, ttl: Duration) -> Self {
        // A key of SHA-256's block size: HMAC's infallible constructor.
        let key: [u8; 64] = rand::random();
        ResponseCache {
            ttl,
            max_bytes,
            vary: Vec::new(),
            mac: <Hmac<Sha256> as KeyInit>::new(&key.into()),
            inner: Mutex::new(Inner {
                lru: LruCache::new(
                    NonZeroUsize::new(max_entries.max(1)).unwrap_or(NonZeroUsize::MIN),
                ),
                bytes: 0,
            }),
        }
    }

    /// Keys the cache on these request headers as well (absent and empty differ).
    pub fn vary_on(mut self, headers: Vec<http::HeaderName>) -> Self {
        self.vary = headers;
        self
    }

    /// The key of `req`: every part length-prefixed, so that no two requests share
    /// one by shifting bytes between parts.
    pub fn key(&self, req: &http::Request<Bytes>) -> [u8; 32] {
        let mut mac = self.mac.clone();
        let mut part = |bytes: &[u8]| {
            mac.update(&(bytes.len() as u64).to_le_bytes());
            mac.update(bytes);
        };
        part(req.method().as_str().as_bytes());
        part(
            req.uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .as_bytes(),
        );
        for name in &self.vary {
            let values = req.headers().get_all(name);
            part(name.as_str().as_bytes());
            part(&(values.iter().count() as u64).to_le_bytes());
            for v in values {
                part(v.as_bytes());
            }
        }
        part(req.body());
        mac.finalize().into_bytes().into()
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

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.lru.len()).unwrap_or(0)
    }

    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.inner.lock().map(|i| i.bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)], body: &'static str) -> http::Request<Bytes> {
        let mut b = http::Request::post("/v1/grade?x=1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Bytes::from_static(body.as_bytes())).unwrap()
    }

    #[test]
    fn keys_differ_by_vary_header_value_and_presence_only() {
        let vary = vec![
            http::HeaderName::from_static("authorization"),
            http::HeaderName::from_static("cookie"),
        ];
        let c = ResponseCache::new(10, 1 << 20, Duration::from_secs(60)).vary_on(vary.clone());
        let a = c.key(&request(&[("authorization", "A"), ("cookie", "s=1")], "{}"));
        assert_eq!(
            a,
            c.key(&request(
                &[("authorization", "A"), ("cookie", "s=1"), ("x-other", "z")],
                "{}"
            )),
            "a header outside `vary` changed the key"
        );
        let others = [
            c.key(&request(&[("authorization", "B"), ("cookie", "s=1")], "{}")),
            c.key(&request(&[("authorization", "A"), ("cookie", "s=2")], "{}")),
            c.key(&request(&[("authorization", "A")], "{}")),
            c.key(&request(&[("authorization", "A"), ("cookie", "")], "{}")),
            c.key(&request(
                &[("authorization", "A"), ("cookie", "s=1")],
                "{ }",
            )),
            // Bytes moved between parts.
            c.key(&request(&[("authorization", "As"), ("cookie", "=1")], "{}")),
        ];
        for (i, k) in others.iter().enumerate() {
            assert_ne!(&a, k, "case {i} shares user A's key");
        }
        // Keyed: another cache (another key) gives another digest for the same request.
        let d = ResponseCache::new(10, 1 << 20, Duration::from_secs(60)).vary_on(vary);
        assert_ne!(
            a,
            d.key(&request(&[("authorization", "A"), ("cookie", "s=1")], "{}"))
        );
    }

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
