//! Model-version governance: canary routing between model versions with automatic
//! rollback, and the live inventory of every AI component.
//!
//! Sits under the retry layer: `Split` picks the baseline or a variant for each attempt
//! (sticky by a header's consistent hash, else random), each branch has its own breaker,
//! and every answer feeds the variant's analysis window and the per-version inventory.
//! An attempt dropped at or after the route deadline is recorded there as a timeout, so a
//! hanging variant is rolled back and its hangs are in its p99. A route breaker forced open
//! by an operator stops the variants' share too.

pub mod window;

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hasher;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::breaker::BreakerState;
use crate::config::{CanaryConfig, VariantConfig};
use crate::events::EventSink;
use crate::exchange::error::ProxyError;
use crate::exchange::{ProxyRequest, ProxyResponse};
use crate::layers::breaker::{outcome_of, SharedBreaker};
use crate::telemetry;
use window::{Summary, WindowStats};

/// Analysis runs at most this often per variant: cheap enough on the request path.
const ANALYSIS_EVERY: Duration = Duration::from_millis(100);
const ANALYSIS_BATCH: u32 = 10;

#[derive(Debug, Clone, Serialize)]
pub struct Rollback {
    pub at: String,
    pub reason: String,
    pub summary: Summary,
    pub baseline: Summary,
}

#[derive(Debug)]
struct VariantInner {
    /// Percent of the route's traffic now.
    weight: f64,
    /// Set by the admin API: holds across reloads until the config changes the weight.
    admin_weight: Option<f64>,
    stats: WindowStats,
    last_analysis: Option<Instant>,
    since_analysis: u32,
    rollback: Option<Rollback>,
}

#[derive(Debug)]
pub struct VariantState {
    pub name: Arc<str>,
    pub config: VariantConfig,
    pub breaker: Option<Arc<SharedBreaker>>,
    inner: Mutex<VariantInner>,
}

impl VariantState {
    pub fn weight(&self) -> f64 {
        self.inner.lock().map(|i| i.weight).unwrap_or(0.0)
    }
}

/// The canary state of one route; carried across reloads per variant while the variant's
/// upstream is unchanged.
#[derive(Debug)]
pub struct CanaryRoute {
    pub route: String,
    pub variants: Vec<Arc<VariantState>>,
    pub config: Option<CanaryConfig>,
    baseline: Mutex<WindowStats>,
}

impl CanaryRoute {
    pub fn new(
        route: &str,
        variants: &[VariantConfig],
        config: Option<CanaryConfig>,
        prev: Option<&CanaryRoute>,
        breaker: impl Fn(&str) -> Option<Arc<SharedBreaker>>,
    ) -> Arc<Self> {
        let window = config
            .as_ref()
            .map(|c| c.window)
            .unwrap_or(Duration::from_secs(60));
        let variants = variants
            .iter()
            .map(|v| {
                let old = prev.and_then(|p| p.variants.iter().find(|o| o.config.name == v.name));
                let inner = match old.and_then(|o| o.inner.lock().ok()) {
                    Some(o)
                        if o.admin_weight.is_some()
                            && old.is_some_and(|old| {
                                old.config.weight == v.weight && old.config.upstream == v.upstream
                            }) =>
                    {
                        VariantInner {
                            weight: o.weight,
                            admin_weight: o.admin_weight,
                            stats: o.stats.clone(),
                            last_analysis: None,
                            since_analysis: 0,
                            rollback: o.rollback.clone(),
                        }
                    }
                    Some(o) if old.is_some_and(|old| old.config == *v) => VariantInner {
                        weight: o.weight,
                        admin_weight: None,
                        stats: o.stats.clone(),
                        last_analysis: None,
                        since_analysis: 0,
                        rollback: o.rollback.clone(),
                    },
                    _ => VariantInner {
                        weight: v.weight,
                        admin_weight: None,
                        stats: WindowStats::new(window),
                        last_analysis: None,
                        since_analysis: 0,
                        rollback: None,
                    },
                };
                Arc::new(VariantState {
                    name: Arc::from(v.name.as_str()),
                    config: v.clone(),
                    breaker: breaker(&v.name),
                    inner: Mutex::new(inner),
                })
            })
            .collect();
        Arc::new(CanaryRoute {
            route: route.to_string(),
            variants,
            config,
            baseline: Mutex::new(WindowStats::new(window)),
        })
    }

    /// Index of the variant for this request, or `None` for the baseline.
    pub fn choose(&self, headers: &http::HeaderMap) -> Option<usize> {
        if self.variants.is_empty() {
            return None;
        }
        let point = self
            .variants
            .iter()
            .find_map(|v| v.config.sticky_header.as_ref())
            .and_then(|h| headers.get(h))
            .map(|value| sticky_bucket(value.as_bytes()) as f64 / 100.0)
            .unwrap_or_else(|| rand::rng().random_range(0.0..100.0));
        let mut acc = 0.0;
        for (i, v) in self.variants.iter().enumerate() {
            acc += v.weight();
            if point < acc {
                return Some(i);
            }
        }
        None
    }

    pub fn set_weight(&self, variant: &str, weight: f64) -> Result<f64, String> {
        if !(weight.is_finite() && (0.0..=100.0).contains(&weight)) {
            return Err("weight must be a percentage between 0 and 100".into());
        }
        let v = self
            .variants
            .iter()
            .find(|v| &*v.name == variant)
            .ok_or_else(|| format!("no variant named {variant:?}"))?;
        let others: f64 = self
            .variants
            .iter()
            .filter(|o| o.name != v.name)
            .map(|o| o.weight())
            .sum();
        if others + weight > 100.0 + 1e-9 {
            return Err(format!(
                "weights would add up to {} percent",
                others + weight
            ));
        }
        let mut inner = v
            .inner
            .lock()
            .map_err(|_| "variant state poisoned".to_string())?;
        let old = inner.weight;
        inner.weight = weight;
        inner.admin_weight = Some(weight);
        if weight > 0.0 {
            inner.rollback = None;
            inner.stats.clear();
        }
        Ok(old)
    }

    fn record(
        &self,
        which: Option<usize>,
        latency: Duration,
        failed: bool,
        now: Instant,
        events: &Option<Arc<dyn EventSink>>,
    ) {
        let Some(i) = which else {
            if let Ok(mut b) = self.baseline.lock() {
                b.record(now, latency, failed);
            }
            return;
        };
        let Some(v) = self.variants.get(i) else {
            return;
        };
        let Some(cfg) = &self.config else {
            if let Ok(mut inner) = v.inner.lock() {
                inner.stats.record(now, latency, failed);
            }
            return;
        };
        let breach = {
            let Ok(mut inner) = v.inner.lock() else {
                return;
            };
            inner.stats.record(now, latency, failed);
            inner.since_analysis += 1;
            // Judge every ANALYSIS_BATCH answers or every ANALYSIS_EVERY, whichever comes
            // first: prompt at any rate, cheap at high rates.
            let due = inner.since_analysis >= ANALYSIS_BATCH
                || inner
                    .last_analysis
                    .is_none_or(|t| now - t >= ANALYSIS_EVERY);
            if inner.weight == 0.0 || !due {
                return;
            }
            inner.last_analysis = Some(now);
            inner.since_analysis = 0;
            let summary = inner.stats.summary(now);
            if summary.requests < cfg.min_requests {
                return;
            }
            let baseline = self.baseline.lock().map(|b| b.summary(now)).ok();
            let reason = breach_reason(cfg, &summary, baseline.as_ref());
            match reason {
                Some(reason) if cfg.auto_rollback => {
                    let rollback = Rollback {
                        at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                        reason,
                        summary,
                        baseline: baseline.unwrap_or(Summary {
                            requests: 0,
                            failures: 0,
                            error_rate: 0.0,
                            p50_ms: None,
                            p99_ms: None,
                        }),
                    };
                    inner.weight = 0.0;
                    inner.rollback = Some(rollback.clone());
                    rollback
                }
                _ => return,
            }
        };
        metrics::counter!(telemetry::CANARY_ROLLBACKS, "route" => self.route.clone(), "variant" => v.name.to_string()).increment(1);
        tracing::error!(route = %self.route, variant = %v.name, reason = %breach.reason, requests = breach.summary.requests, error_rate = breach.summary.error_rate, p99_ms = ?breach.summary.p99_ms, "canary rolled back automatically");
        if let Some(events) = events {
            events.emit(
                "canary_rollback",
                serde_json::json!({
                    "route": self.route,
                    "variant": &*v.name,
                    "upstream": v.config.upstream,
                    "rollback": breach,
                }),
                None,
            );
        }
    }

    pub fn baseline_summary(&self, now: Instant) -> Option<Summary> {
        self.baseline.lock().ok().map(|b| b.summary(now))
    }

    pub fn variant_report(&self, now: Instant) -> Vec<serde_json::Value> {
        self.variants
            .iter()
            .map(|v| {
                let (weight, admin, summary, rollback) = match v.inner.lock() {
                    Ok(i) => (
                        i.weight,
                        i.admin_weight.is_some(),
                        Some(i.stats.summary(now)),
                        i.rollback.clone(),
                    ),
                    Err(_) => (0.0, false, None, None),
                };
                serde_json::json!({
                    "name": &*v.name,
                    "upstream": v.config.upstream,
                    "weight": weight,
                    "configured_weight": v.config.weight,
                    "weight_set_by_admin": admin,
                    "sticky_header": v.config.sticky_header.as_ref().map(|h| h.as_str()),
                    "breaker_state": v.breaker.as_ref().map(|b| b.state(now).as_str()),
                    "window": summary,
                    "rollback": rollback,
                })
            })
            .collect()
    }
}

/// The sticky point in [0, 10000) of a header value: SipHash-1-3 with keys (0, 0) over the
/// value's length (u64, little-endian) and its bytes, modulo 10000. Specified, so every
/// build and platform puts one student on the same version; and it is the very byte stream
/// std's `DefaultHasher` saw for `[u8]` on 64-bit little-endian targets, so upgrading
/// from builds that used it moves no student either.
pub fn sticky_bucket(value: &[u8]) -> u64 {
    let mut hasher = siphasher::sip::SipHasher13::new_with_keys(0, 0);
    hasher.write(&(value.len() as u64).to_le_bytes());
    hasher.write(value);
    hasher.finish() % 10_000
}

/// Why a variant's window breaches the canary thresholds. A variant is judged against the
/// baseline too: when both fail alike (a shared dependency is down), rolling the variant
/// back would not help, so only a variant worse than the baseline is rolled back.
fn breach_reason(cfg: &CanaryConfig, v: &Summary, baseline: Option<&Summary>) -> Option<String> {
    let base = baseline.filter(|b| b.requests >= cfg.min_requests);
    if v.error_rate > cfg.max_error_rate
        && base.is_none_or(|b| v.error_rate > b.error_rate + cfg.max_error_rate / 2.0)
    {
        return Some(format!(
            "error rate {:.3} over max_error_rate {:.3} ({} of {} requests)",
            v.error_rate, cfg.max_error_rate, v.failures, v.requests
        ));
    }
    if let (Some(max), Some(p99)) = (cfg.max_p99, v.p99_ms) {
        let max_ms = max.as_secs_f64() * 1000.0;
        if p99 > max_ms && base.and_then(|b| b.p99_ms).is_none_or(|bp| p99 > bp) {
            return Some(format!("p99 {p99:.1} ms over max_p99_ms {max_ms:.0}"));
        }
    }
    None
}

/// Every model version seen, per route: first and last seen, counts, and its window.
/// One lock, and no allocation once a version is known: it is updated on every AI call.
#[derive(Default)]
pub struct Inventory {
    inner: Mutex<InventoryInner>,
}

#[derive(Default)]
struct InventoryInner {
    routes: HashMap<String, RouteVersions>,
    /// Versions remembered over all routes.
    total: usize,
}

#[derive(Default)]
struct RouteVersions {
    /// The version each upstream reported last: failures carry no version, so they are
    /// counted against the version that upstream was serving.
    current: HashMap<String, String>,
    versions: HashMap<String, VersionStats>,
}

struct VersionStats {
    upstream: String,
    variant: Option<String>,
    first_seen: SystemTime,
    last_seen: SystemTime,
    requests: u64,
    failures: u64,
    window: WindowStats,
    duration: metrics::Histogram,
    errors: metrics::Counter,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionReport {
    pub model_version: String,
    pub upstream: String,
    pub variant: Option<String>,
    pub first_seen: String,
    pub last_seen: String,
    pub requests: u64,
    pub failures: u64,
    pub window: Summary,
}

/// Cap on distinct versions remembered per process (versions come from upstreams).
const MAX_VERSIONS: usize = 1024;

impl Inventory {
    pub fn record(
        &self,
        route: &str,
        upstream: &str,
        variant: Option<&str>,
        version: Option<&str>,
        latency: Duration,
        failed: bool,
    ) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let InventoryInner { routes, total } = &mut *inner;
        let rv = match routes.get_mut(route) {
            Some(rv) => rv,
            None => routes.entry(route.to_string()).or_default(),
        };
        let RouteVersions { current, versions } = rv;
        let version: &str = match version {
            Some(v) => {
                if current.get(upstream).map(String::as_str) != Some(v) {
                    current.insert(upstream.to_string(), v.to_string());
                }
                v
            }
            None => match current.get(upstream) {
                Some(v) => v,
                None => return,
            },
        };
        let stats = match versions.get_mut(version) {
            Some(stats) => stats,
            None if *total >= MAX_VERSIONS => {
                let label = telemetry::model_version_label(version);
                metrics::histogram!(telemetry::MODEL_VERSION_DURATION, "route" => route.to_string(), "model_version" => label.clone()).record(latency.as_secs_f64());
                if failed {
                    metrics::counter!(telemetry::MODEL_VERSION_ERRORS, "route" => route.to_string(), "model_version" => label).increment(1);
                }
                return;
            }
            None => {
                *total += 1;
                let label = telemetry::model_version_label(version);
                let now = SystemTime::now();
                versions
                    .entry(version.to_string())
                    .or_insert_with(|| VersionStats {
                        upstream: upstream.to_string(),
                        variant: variant.map(str::to_string),
                        first_seen: now,
                        last_seen: now,
                        requests: 0,
                        failures: 0,
                        window: WindowStats::new(Duration::from_secs(60)),
                        duration: metrics::histogram!(telemetry::MODEL_VERSION_DURATION, "route" => route.to_string(), "model_version" => label.clone()),
                        errors: metrics::counter!(telemetry::MODEL_VERSION_ERRORS, "route" => route.to_string(), "model_version" => label),
                    })
            }
        };
        stats.duration.record(latency.as_secs_f64());
        if failed {
            stats.errors.increment(1);
        }
        stats.last_seen = SystemTime::now();
        stats.requests += 1;
        stats.failures += failed as u64;
        stats.window.record(Instant::now(), latency, failed);
    }

    pub fn versions(&self, route: &str) -> Vec<VersionReport> {
        let now = Instant::now();
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        let Some(rv) = inner.routes.get(route) else {
            return Vec::new();
        };
        let mut out: Vec<VersionReport> = rv
            .versions
            .iter()
            .map(|(v, s)| VersionReport {
                model_version: v.clone(),
                upstream: s.upstream.clone(),
                variant: s.variant.clone(),
                first_seen: humantime::format_rfc3339_seconds(s.first_seen).to_string(),
                last_seen: humantime::format_rfc3339_seconds(s.last_seen).to_string(),
                requests: s.requests,
                failures: s.failures,
                window: s.window.summary(now),
            })
            .collect();
        out.sort_by(|a, b| {
            a.first_seen
                .cmp(&b.first_seen)
                .then(a.model_version.cmp(&b.model_version))
        });
        out
    }
}

/// Picks baseline or variant per attempt and measures the answer.
#[derive(Clone)]
pub struct Split<S> {
    canary: Arc<CanaryRoute>,
    /// The route's own breaker: forced open by an operator, it stops the variants too.
    route_breaker: Option<Arc<SharedBreaker>>,
    inventory: Arc<Inventory>,
    events: Option<Arc<dyn EventSink>>,
    baseline: S,
    baseline_upstream: Arc<str>,
    variants: Vec<S>,
}

impl<S> Split<S> {
    pub fn new(
        canary: Arc<CanaryRoute>,
        route_breaker: Option<Arc<SharedBreaker>>,
        inventory: Arc<Inventory>,
        events: Option<Arc<dyn EventSink>>,
        baseline: S,
        baseline_upstream: Arc<str>,
        variants: Vec<S>,
    ) -> Self {
        Split {
            canary,
            route_breaker,
            inventory,
            events,
            baseline,
            baseline_upstream,
            variants,
        }
    }
}

impl<S> Service<ProxyRequest> for Split<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, ProxyError>> + Send>>;

    /// Which branch serves a request is known only in `call`, so readiness is asked there,
    /// of the clone that serves it (`oneshot`), as tower's `Steer` does for its services.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let now = Instant::now();
        let which = self.pick(&req, now);
        let (svc, upstream) = match which {
            Some(i) => (
                self.variants[i].clone(),
                Arc::<str>::from(self.canary.variants[i].config.upstream.as_str()),
            ),
            None => (self.baseline.clone(), self.baseline_upstream.clone()),
        };
        let mut guard = AttemptGuard {
            canary: self.canary.clone(),
            inventory: self.inventory.clone(),
            events: self.events.clone(),
            which,
            upstream,
            started: now,
            deadline: req.meta.deadline,
            armed: true,
        };
        Box::pin(async move {
            let meta = req.meta.clone();
            let result = svc.oneshot(req).await;
            guard.armed = false;
            if let Some(outcome) = outcome_of(&result) {
                let (version, variant) = {
                    let f = meta.facts();
                    (f.model_version.clone(), f.variant.clone())
                };
                guard.record(outcome.is_failure(), variant.as_deref(), version.as_deref());
            }
            result
        })
    }
}

impl<S> Split<S> {
    /// The variant for this attempt, or `None` for the baseline. A variant whose own
    /// breaker is open hands its share back to the baseline; a route breaker forced open
    /// sends everything to the baseline, whose breaker then refuses it.
    fn pick(&self, req: &ProxyRequest, now: Instant) -> Option<usize> {
        let blocked = |b: &SharedBreaker, forced_only: bool| match b.state(now) {
            BreakerState::ForcedOpen => true,
            BreakerState::Open => !forced_only,
            _ => false,
        };
        if self
            .route_breaker
            .as_deref()
            .is_some_and(|b| blocked(b, true))
        {
            return None;
        }
        self.canary.choose(req.http.headers()).filter(|&i| {
            self.canary.variants[i]
                .breaker
                .as_deref()
                .is_none_or(|b| !blocked(b, false))
        })
    }
}

/// Measures one attempt for the canary window and the inventory, also when its future is
/// dropped: at or after the route deadline that is a timeout (the deadline layer above gave
/// up on it); before it, the client went away and nothing is judged.
struct AttemptGuard {
    canary: Arc<CanaryRoute>,
    inventory: Arc<Inventory>,
    events: Option<Arc<dyn EventSink>>,
    which: Option<usize>,
    upstream: Arc<str>,
    started: Instant,
    deadline: Instant,
    armed: bool,
}

impl AttemptGuard {
    fn record(&self, failed: bool, variant: Option<&str>, version: Option<&str>) {
        let now = Instant::now();
        let latency = now - self.started;
        self.canary
            .record(self.which, latency, failed, now, &self.events);
        self.inventory.record(
            &self.canary.route,
            &self.upstream,
            variant,
            version,
            latency,
            failed,
        );
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        if !self.armed || Instant::now() < self.deadline {
            return;
        }
        let variant = self
            .which
            .and_then(|i| self.canary.variants.get(i))
            .map(|v| v.name.clone());
        self.record(true, variant.as_deref(), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_buckets_are_pinned() {
        // SipHash-1-3, keys (0, 0), over u64-LE length || bytes. These are also the points
        // std's DefaultHasher gave on x86_64 builds before, so no student moved.
        assert_eq!(sticky_bucket(b"student-42"), 7759);
        assert_eq!(sticky_bucket(b"x"), 2476);
        let mut h = siphasher::sip::SipHasher13::new_with_keys(0, 0);
        h.write(&10u64.to_le_bytes());
        h.write(b"student-42");
        assert_eq!(h.finish(), 17_209_197_738_127_787_759);
    }
}
