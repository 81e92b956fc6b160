//! The data plane: route a request, buffer its body, run the route's tower stack.
//!
//! `build_stack` is the ONE place where the layer order is written. Everything a request
//! needs is reached through one `Snapshot`, loaded once per request, so a reload never
//! changes the rules under a request in flight.

pub mod forward;
pub mod readahead;
pub mod replay;
pub mod router;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

use crate::audit::AuditHandle;
use crate::breaker::{
    BreakerSettings, ConcurrencyLimiter, LimitSettings, ResponseCache, RetryBudget,
};
use crate::canary::{CanaryRoute, Inventory, Split};
use crate::config::{
    BreakerConfig, ConcurrencyConfig, Config, ConfigError, ConfigErrors, FallbackConfig,
    RetryConfig, RouteConfig,
};
use crate::events::EventSink;
use crate::exchange::error::error_response;
use crate::exchange::headers::{self, IDEMPOTENCY_KEY, X_OUTCOME, X_REQUEST_ID};
use crate::exchange::{ProxyBody, ProxyRequest, RequestMeta};
use crate::fallback::Fallback;
use crate::layers::breaker::{BreakerLayer, SharedBreaker};
use crate::layers::comply::{ComplyLayer, SeenVersions, UnapprovedFlag};
use crate::layers::dlq::{DeadLetters, DlqLayer};
use crate::layers::fallback::FallbackLayer;
use crate::layers::kill::{AiSwitch, KillSwitchLayer};
use crate::layers::limit::LimitLayer;
use crate::layers::observe::{AuditCtx, ObserveLayer, RouteMetrics};
use crate::layers::retry::{RetryLayer, RetryPolicy};
use crate::layers::shadow::{ShadowLayer, ShadowRoute};
use crate::layers::timeout::{AttemptTimeoutLayer, DeadlineLayer};
use crate::upstream::Upstream;
use forward::{Forward, ReadAheadLimits};
use readahead::ResponseBudget;
use router::Router;

/// A route's whole stack, type-erased. Cloned per request (cheap: Arcs inside).
pub type RouteService = BoxCloneSyncService<ProxyRequest, http::Response<ProxyBody>, Infallible>;

/// Everything one config generation needs to serve requests.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub generation: u64,
    pub loaded_at: SystemTime,
    router: Router,
    routes: HashMap<String, RouteService>,
    pub states: HashMap<String, Arc<RouteState>>,
}

impl Snapshot {
    pub fn route_state(&self, name: &str) -> Option<&Arc<RouteState>> {
        self.states.get(name)
    }
}

/// Per-route state that survives a reload while the settings it depends on are unchanged:
/// breaker, retry budget, answer cache, kill-switch override.
#[derive(Debug)]
pub struct RouteState {
    pub breaker: Option<Arc<SharedBreaker>>,
    pub ai: Arc<AiSwitch>,
    pub canary: Arc<CanaryRoute>,
    /// The last answer was refused as unapproved: the route counts as degraded.
    pub unapproved: Arc<UnapprovedFlag>,
    /// The current degraded episode, for `rto_s`.
    pub episode: Arc<crate::rto::Episode>,
    budget: Option<(RetryConfig, Arc<RetryBudget>)>,
    cache: Option<(CacheKey, Arc<ResponseCache>)>,
}

/// The settings a route's answer cache is kept across reloads for: TTL, entries, bytes and
/// the headers it varies on.
type CacheKey = (Duration, usize, u64, Vec<http::HeaderName>);

/// State that outlives a config generation: connection pools, bulkheads and route state.
#[derive(Default)]
pub struct Shared {
    pub inventory: Arc<Inventory>,
    events: Mutex<Option<Arc<dyn EventSink>>>,
    audit: Mutex<Option<AuditHandle>>,
    dlq: Mutex<Option<Arc<dyn DeadLetters>>>,
    upstreams: Mutex<HashMap<String, Upstream>>,
    limiters: Mutex<HashMap<String, (ConcurrencyConfig, Arc<ConcurrencyLimiter>)>>,
    routes: Mutex<HashMap<String, Arc<RouteState>>>,
    /// Response bytes read ahead of slow clients, all routes and generations together.
    response_budget: OnceLock<Arc<ResponseBudget>>,
    /// `[access_log]`, once started: read once at start like the decision log.
    access_log: OnceLock<crate::access_log::AccessLog>,
    /// `[tracing]`, once started.
    tracing: OnceLock<Arc<crate::otel::Tracing>>,
    /// Unapproved model versions already reported (one event per new version).
    seen_versions: Arc<SeenVersions>,
    /// Each route's shadow test: its counts survive a reload that keeps the candidate.
    shadows: Mutex<HashMap<Arc<str>, Arc<ShadowRoute>>>,
}

impl Shared {
    /// Where change events (canary rollbacks) go; set once the decision log runs.
    pub fn set_events(&self, sink: Arc<dyn EventSink>) {
        if let Ok(mut e) = self.events.lock() {
            *e = Some(sink);
        }
    }

    /// The decision log, once it runs; stacks built after this record every request.
    pub fn set_audit(&self, handle: AuditHandle) {
        if let Ok(mut a) = self.audit.lock() {
            *a = Some(handle);
        }
    }

    pub fn set_dlq(&self, sink: Arc<dyn DeadLetters>) {
        if let Ok(mut d) = self.dlq.lock() {
            *d = Some(sink);
        }
    }

    pub fn dlq(&self) -> Option<Arc<dyn DeadLetters>> {
        self.dlq.lock().ok().and_then(|d| d.clone())
    }

    /// Set once at start; later calls are ignored.
    pub fn set_access_log(&self, log: crate::access_log::AccessLog) {
        let _ = self.access_log.set(log);
    }

    pub fn access_log(&self) -> Option<&crate::access_log::AccessLog> {
        self.access_log.get()
    }

    /// Set once at start; later calls are ignored.
    pub fn set_tracing(&self, t: Arc<crate::otel::Tracing>) {
        let _ = self.tracing.set(t);
    }

    pub fn tracing(&self) -> Option<&Arc<crate::otel::Tracing>> {
        self.tracing.get()
    }

    pub fn audit(&self) -> Option<AuditHandle> {
        self.audit.lock().ok().and_then(|a| a.clone())
    }

    pub fn events(&self) -> Option<Arc<dyn EventSink>> {
        self.events.lock().ok().and_then(|e| e.clone())
    }

    /// The one response read-ahead budget, made on first use; a generation sets its limit.
    pub fn response_budget(&self) -> &Arc<ResponseBudget> {
        self.response_budget.get_or_init(|| ResponseBudget::new(0))
    }

    /// A route's shadow test, for the inventory.
    pub fn shadow(&self, route: &str) -> Option<Arc<ShadowRoute>> {
        self.shadows.lock().ok()?.get(route).cloned()
    }

    /// The shadow state for this generation's `shadow` settings of `route`: the same one
    /// while they are unchanged, a new one (keeping the counts while the candidate is the
    /// same) when they changed.
    fn shadow_for(
        &self,
        route: &RouteConfig,
        config: &Arc<crate::config::ShadowConfig>,
    ) -> Result<Arc<ShadowRoute>, String> {
        let mut shadows = self
            .shadows
            .lock()
            .map_err(|_| "shadow registry poisoned".to_string())?;
        let previous = shadows.get(&route.name);
        if let Some(p) = previous.filter(|p| *p.config == **config) {
            return Ok(p.clone());
        }
        let state = Arc::new(ShadowRoute::new(
            &route.name,
            config.clone(),
            previous.map(|p| &**p),
        ));
        shadows.insert(route.name.clone(), state.clone());
        Ok(state)
    }

    /// The pooled client of an upstream (the DLQ replay worker uses it too).
    pub fn upstream_client(
        &self,
        cfg: &Arc<crate::config::UpstreamConfig>,
    ) -> Result<Upstream, String> {
        self.upstream(cfg)
    }

    /// Reuses the pool of an upstream whose settings are unchanged.
    fn upstream(&self, cfg: &Arc<crate::config::UpstreamConfig>) -> Result<Upstream, String> {
        let mut pools = self
            .upstreams
            .lock()
            .map_err(|_| "upstream pool registry poisoned".to_string())?;
        if let Some(up) = pools.get(&cfg.name) {
            if up.config.fingerprint == cfg.fingerprint {
                return Ok(up.clone());
            }
        }
        let up = Upstream::new(cfg.clone())?;
        pools.insert(cfg.name.clone(), up.clone());
        Ok(up)
    }

    /// One bulkhead per upstream, shared by every route that calls it.
    fn limiter(
        &self,
        name: &str,
        cfg: ConcurrencyConfig,
    ) -> Result<Arc<ConcurrencyLimiter>, String> {
        let mut limiters = self
            .limiters
            .lock()
            .map_err(|_| "limiter registry poisoned".to_string())?;
        if let Some((old, limiter)) = limiters.get(name) {
            if *old == cfg {
                return Ok(limiter.clone());
            }
        }
        let limiter = Arc::new(ConcurrencyLimiter::new(LimitSettings {
            initial: cfg.max,
            min: cfg.min,
            max: cfg.max,
            adaptive: cfg.adaptive,
        }));
        limiters.insert(name.to_string(), (cfg, limiter.clone()));
        Ok(limiter)
    }

    /// The route's state for a new generation, carrying over what is still valid.
    fn route_state(&self, route: &Arc<RouteConfig>) -> Arc<RouteState> {
        let prev = self
            .routes
            .lock()
            .ok()
            .and_then(|r| r.get(&*route.name).cloned());
        let prev = prev.as_deref();
        let breaker = route.breaker.as_ref().map(|b| {
            let settings = breaker_settings(b);
            match prev.and_then(|p| p.breaker.as_ref()) {
                Some(old) if old.settings == settings => old.clone(),
                _ => SharedBreaker::new(&route.name, None, settings),
            }
        });
        let budget = route
            .retry
            .as_ref()
            .map(|r| match prev.and_then(|p| p.budget.as_ref()) {
                Some((old, budget)) if old == r => (old.clone(), budget.clone()),
                _ => (
                    r.clone(),
                    Arc::new(RetryBudget::new(
                        r.budget_ratio,
                        r.budget_min_per_s,
                        Duration::from_secs(10),
                    )),
                ),
            });
        let cache = route.fallback.iter().find_map(|f| match f {
            FallbackConfig::Cache {
                ttl,
                max_entries,
                max_bytes,
                vary_headers,
            } => {
                let key = (*ttl, *max_entries, *max_bytes, vary_headers.clone());
                Some(match prev.and_then(|p| p.cache.as_ref()) {
                    Some((old, cache)) if *old == key => (key, cache.clone()),
                    _ => (
                        key,
                        Arc::new(
                            ResponseCache::new(*max_entries, *max_bytes, *ttl)
                                .vary_on(vary_headers.clone()),
                        ),
                    ),
                })
            }
            _ => None,
        });
        let ai = match prev {
            Some(p) => AiSwitch::carried_over(&p.ai, route.ai_enabled),
            None => AiSwitch::new(route.ai_enabled),
        };
        // Each variant gets a breaker of its own, with the route's settings.
        let variant_breaker = |variant: &str| {
            let settings = breaker_settings(route.breaker.as_ref()?);
            let old = prev
                .and_then(|p| p.canary.variants.iter().find(|v| &*v.name == variant))
                .and_then(|v| v.breaker.clone());
            Some(match old {
                Some(old) if old.settings == settings => old,
                _ => SharedBreaker::new(&route.name, Some(variant), settings),
            })
        };
        let canary = CanaryRoute::new(
            &route.name,
            &route.variants,
            route.canary.clone(),
            prev.map(|p| &*p.canary),
            variant_breaker,
        );
        let unapproved = prev.map(|p| p.unapproved.clone()).unwrap_or_default();
        let episode = prev.map(|p| p.episode.clone()).unwrap_or_default();
        Arc::new(RouteState {
            breaker,
            ai,
            canary,
            unapproved,
            episode,
            budget,
            cache,
        })
    }

    fn commit_route_states(&self, states: &HashMap<String, Arc<RouteState>>) {
        if let Ok(mut routes) = self.routes.lock() {
            *routes = states.clone();
        }
    }
}

fn breaker_settings(b: &BreakerConfig) -> BreakerSettings {
    BreakerSettings {
        consecutive_failures: b.consecutive_failures,
        failure_rate: b.failure_rate,
        slow_call: b.slow_call,
        slow_call_rate: b.slow_call_rate,
        window: b.window,
        minimum_requests: b.minimum_requests,
        open: b.open,
        open_max: b.open_max,
        half_open_probes: b.half_open_probes,
    }
}

/// The proxy: the current snapshot plus what survives reloads.
pub struct Proxy {
    snapshot: ArcSwap<Snapshot>,
    pub shared: Shared,
}

impl Proxy {
    /// Starts with state prepared by the caller (the decision log already attached, so the
    /// first generation records too).
    pub fn with_shared(config: Config, shared: Shared) -> Result<Arc<Proxy>, ConfigErrors> {
        let snapshot = build_snapshot(&shared, Arc::new(config), 1)?;
        Ok(Arc::new(Proxy {
            snapshot: ArcSwap::from_pointee(snapshot),
            shared,
        }))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Builds the next generation off the request path and swaps it in with one store.
    /// In-flight requests keep the snapshot they loaded.
    pub fn install(&self, config: Config) -> Result<Arc<Snapshot>, ConfigErrors> {
        let generation = self.snapshot.load().generation + 1;
        let snapshot = Arc::new(build_snapshot(&self.shared, Arc::new(config), generation)?);
        self.snapshot.store(snapshot.clone());
        Ok(snapshot)
    }

    /// The data-plane entry point for one request.
    pub async fn handle(
        &self,
        req: http::Request<Incoming>,
        remote: SocketAddr,
        tls: bool,
    ) -> http::Response<ProxyBody> {
        let Some(log) = self.shared.access_log() else {
            return self.dispatch(req, remote, tls, None).await;
        };
        // Dropped with this future when the client goes away: logged as cancelled.
        let mut access = log.begin(req.method(), req.uri().path());
        let resp = self.dispatch(req, remote, tls, Some(&mut access)).await;
        access.respond(resp)
    }

    async fn dispatch(
        &self,
        req: http::Request<Incoming>,
        remote: SocketAddr,
        tls: bool,
        mut access: Option<&mut crate::access_log::Access>,
    ) -> http::Response<ProxyBody> {
        let snapshot = self.snapshot.load_full();
        let request_id = headers::request_id(req.headers());
        if let Some(a) = access.as_deref_mut() {
            a.request_id(&request_id);
        }
        if let Err(why) = router::check_host(&req) {
            return finish_local(StatusCode::BAD_REQUEST, "bad_host", why, &request_id);
        }
        let host = router::request_host(&req);
        let Some(route) = snapshot
            .router
            .route(host.as_deref(), req.uri().path(), req.method())
        else {
            return finish_local(
                StatusCode::NOT_FOUND,
                "no_route",
                &format!("no route for {} {}", req.method(), req.uri().path()),
                &request_id,
            );
        };
        let Some(service) = snapshot.routes.get(&*route.name) else {
            return finish_local(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "route has no stack",
                &request_id,
            );
        };
        let max = snapshot.config.server.max_body_bytes;
        let (mut parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return too_large(max, &request_id);
        }
        // Buffered so the request can be retried, sent to a fallback upstream and queued
        // for replay; `max_body_bytes` bounds the memory this takes.
        // A client trickling its body must not hold a task and max_body_bytes of memory.
        let read_limit = snapshot.config.server.body_read_timeout;
        let collected =
            tokio::time::timeout(read_limit, Limited::new(body, max as usize).collect()).await;
        let Ok(collected) = collected else {
            return finish_local(
                StatusCode::REQUEST_TIMEOUT,
                "body_read_timeout",
                &format!(
                    "the request body did not arrive within body_read_timeout_ms ({} ms)",
                    read_limit.as_millis()
                ),
                &request_id,
            );
        };
        let body = match collected {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return too_large(max, &request_id)
            }
            Err(e) => {
                return finish_local(
                    StatusCode::BAD_REQUEST,
                    "bad_request_body",
                    &format!("could not read the request body: {e}"),
                    &request_id,
                )
            }
        };
        let idempotency_key = parts.headers.contains_key(&IDEMPOTENCY_KEY);
        // A header lookup unless the request is traced.
        let trace = match self.shared.tracing() {
            Some(t) => t.begin(&parts.headers, &parts.method, parts.uri.path(), &route.name),
            None => crate::otel::incoming(&parts.headers),
        };
        headers::prepare_upstream_headers(
            &mut parts.headers,
            remote.ip(),
            tls,
            host.as_deref(),
            &request_id,
        );
        // Only path and query travel on; the upstream's own scheme and authority are added
        // by the client.
        parts.uri = parts
            .uri
            .path_and_query()
            .map(|pq| http::Uri::from(pq.clone()))
            .unwrap_or_else(|| http::Uri::from_static("/"));
        parts.version = http::Version::HTTP_11;
        let mut meta = RequestMeta::new(request_id, route.clone(), idempotency_key);
        meta.trace = trace;
        let meta = Arc::new(meta);
        if let Some(a) = access {
            a.routed(&meta);
        }
        let req = ProxyRequest {
            http: http::Request::from_parts(parts, body),
            meta,
        };
        match service.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }
}

fn too_large(max: u64, request_id: &str) -> http::Response<ProxyBody> {
    finish_local(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &format!("request body exceeds max_body_bytes ({max} bytes)"),
        request_id,
    )
}

/// A response breakwater makes without consulting a route (404, 413, 400).
fn finish_local(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> http::Response<ProxyBody> {
    let mut resp = error_response(status, code, message, request_id);
    let h = resp.headers_mut();
    if let Ok(v) = http::HeaderValue::from_str(request_id) {
        h.insert(&X_REQUEST_ID, v);
    }
    h.insert(&X_OUTCOME, http::HeaderValue::from_static("error"));
    metrics::counter!(crate::telemetry::REQUESTS_TOTAL, "route" => "", "outcome" => "error", "status" => status.as_str().to_string()).increment(1);
    resp
}

fn build_snapshot(
    shared: &Shared,
    config: Arc<Config>,
    generation: u64,
) -> Result<Snapshot, ConfigErrors> {
    let mut routes = HashMap::new();
    let mut states = HashMap::new();
    let mut errors = Vec::new();
    for route in &config.routes {
        let state = shared.route_state(route);
        match build_stack(shared, &config, route, &state, generation) {
            Ok(svc) => {
                routes.insert(route.name.to_string(), svc);
                states.insert(route.name.to_string(), state);
            }
            Err(message) => errors.push(ConfigError {
                path: format!("routes.{}", route.name),
                message,
            }),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors { errors });
    }
    // Reloadable: a lower limit holds back new read-ahead until enough is released.
    shared
        .response_budget()
        .set_limit(config.server.response_buffer_bytes);
    shared.commit_route_states(&states);
    Ok(Snapshot {
        router: Router::new(&config.routes),
        config,
        generation,
        loaded_at: SystemTime::now(),
        routes,
        states,
    })
}

type Branch = BoxCloneSyncService<
    ProxyRequest,
    crate::exchange::ProxyResponse,
    crate::exchange::error::ProxyError,
>;

/// The part of `upstream`'s concurrency limit `route` may fill: all of it unless a more
/// critical route calls the same upstream, then `Criticality::limit_share` (low 50%,
/// medium 80%), the rest kept as headroom so the less critical route is shed first.
fn limit_share(config: &Config, route: &RouteConfig, upstream: &str) -> f64 {
    let calls = |r: &RouteConfig| {
        r.upstream == upstream || r.variants.iter().any(|v| v.upstream == upstream)
    };
    let more_critical = config
        .routes
        .iter()
        .any(|r| r.criticality > route.criticality && calls(r));
    if more_critical {
        route.criticality.limit_share()
    } else {
        1.0
    }
}

/// The layer order, outermost first. Read top to bottom as the path a request takes.
pub fn build_stack(
    shared: &Shared,
    config: &Config,
    route: &Arc<RouteConfig>,
    state: &RouteState,
    generation: u64,
) -> Result<RouteService, String> {
    let up_cfg = config
        .upstreams
        .get(&route.upstream)
        .ok_or_else(|| format!("unknown upstream {}", route.upstream))?;
    let upstream = shared.upstream(up_cfg)?;
    let needs_body = route.model_version_pointer.is_some()
        || state.cache.is_some()
        || route.response_schema.is_some()
        || route
            .approval
            .as_ref()
            .is_some_and(|a| a.digest_pointer.is_some());
    let buffer_limit = needs_body.then_some(config.server.max_response_buffer_bytes);

    let mut chain = Vec::new();
    for f in &route.fallback {
        chain.push(match f {
            FallbackConfig::Cache { .. } => match &state.cache {
                Some((_, cache)) => Fallback::Cache(cache.clone()),
                None => continue,
            },
            FallbackConfig::Upstream { upstream, timeout } => {
                let cfg = config
                    .upstreams
                    .get(upstream)
                    .ok_or_else(|| format!("unknown fallback upstream {upstream}"))?;
                Fallback::Upstream {
                    upstream: Box::new(shared.upstream(cfg)?),
                    timeout: *timeout,
                }
            }
            FallbackConfig::Static {
                status,
                body,
                content_type,
            } => Fallback::Static {
                status: *status,
                body: body.clone(),
                content_type: content_type.clone(),
            },
        });
    }
    // One branch per upstream the route can call: the baseline and each canary variant,
    // each with its own breaker, behind its upstream's bulkhead.
    let branch = |up_name: &str,
                  breaker: Option<Arc<SharedBreaker>>,
                  variant: Option<Arc<str>>|
     -> Result<Branch, String> {
        let cfg = config
            .upstreams
            .get(up_name)
            .ok_or_else(|| format!("unknown upstream {up_name}"))?;
        let upstream = shared.upstream(cfg)?;
        let limiter = cfg
            .concurrency
            .map(|c| shared.limiter(&cfg.name, c))
            .transpose()?;
        let svc = ServiceBuilder::new()
            // Fail fast while this AI is known to be down; judge every attempt.
            .option_layer(breaker.map(BreakerLayer::new))
            // Bulkhead per upstream: shed instead of queueing in front of a struggling AI.
            // Its share of the limit depends on the route's criticality: low-criticality
            // routes are shed first, keeping headroom for the critical ones.
            .option_layer(limiter.map(|l| {
                LimitLayer::new(
                    l,
                    upstream.name.clone(),
                    limit_share(config, route, up_name),
                )
            }))
            // Cuts this attempt at attempt_timeout_ms or the route deadline, so the breaker,
            // the bulkhead, the canary and the retry above all see the timeout as a failure.
            .layer(AttemptTimeoutLayer::new(
                route.retry.as_ref().and_then(|r| r.attempt_timeout),
            ))
            // Judges the answer's content (approved model version, response schema): a
            // refused answer is an error from here up, for the breaker, bulkhead and canary.
            .option_layer(ComplyLayer::for_route(
                route,
                shared.seen_versions.clone(),
                shared.events(),
                state.unapproved.clone(),
            ))
            // Innermost: one call to the AI upstream; 5xx/429 become errors here.
            .service(Forward::new(
                upstream,
                route.clone(),
                variant,
                buffer_limit,
                ReadAheadLimits {
                    budget: shared.response_budget().clone(),
                    per_response: config.server.max_response_buffer_bytes,
                },
            ));
        Ok(BoxCloneSyncService::new(svc))
    };
    let baseline = branch(&route.upstream, state.breaker.clone(), None)?;
    let variants = state
        .canary
        .variants
        .iter()
        .map(|v| branch(&v.config.upstream, v.breaker.clone(), Some(v.name.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let shadow = match &route.shadow {
        None => None,
        Some(cfg) => {
            let up = config
                .upstreams
                .get(&cfg.upstream)
                .ok_or_else(|| format!("unknown shadow upstream {}", cfg.upstream))?;
            Some(ShadowLayer::new(
                shared.shadow_for(route, cfg)?,
                shared.upstream(up)?,
                route.clone(),
                config.server.max_response_buffer_bytes,
            ))
        }
    };
    let split = Split::new(
        state.canary.clone(),
        state.breaker.clone(),
        shared.inventory.clone(),
        shared
            .events()
            .map(|e| crate::events::InConfig::wrap(e, &config.hash)),
        baseline,
        upstream.name.clone(),
        variants,
    );

    let svc =
        ServiceBuilder::new()
            // Outermost: sees the final answer whoever produced it, sets the SPEC headers,
            // metrics and the decision record; the only place errors become responses.
            .layer(ObserveLayer::new(
                shared.audit().map(|handle| AuditCtx {
                    handle,
                    config_gen: generation,
                    breaker: state.breaker.clone(),
                }),
                Arc::new(RouteMetrics::new(route.name.clone())),
            ))
            // Everything below can fail; from here up there is an answer (or the JSON error).
            .layer(FallbackLayer::new(chain))
            // Mirrors a share of the answered requests to the shadow candidate, off the
            // request path: below the fallback, so it sees only what the AI answered.
            .option_layer(shadow)
            // Replayable requests the AI did not answer are spooled for replay; sees the
            // failure before a fallback hides it, and covers the kill switch below too.
            .option_layer(
                route
                    .replayable
                    .then(|| shared.dlq())
                    .flatten()
                    .map(DlqLayer::new),
            )
            // The kill switch: AI off means no AI call at all, straight to the fallback.
            .layer(KillSwitchLayer::new(state.ai.clone()))
            // The route's total deadline, retries and backoff included.
            .layer(DeadlineLayer)
            // Budgeted, idempotency-aware retries; each attempt passes the breaker below.
            .option_layer(state.budget.as_ref().map(|(cfg, budget)| {
                RetryLayer::new(RetryPolicy::new(cfg.clone(), budget.clone()))
            }))
            // Baseline or canary variant for this attempt; each branch has its own
            // breaker and its upstream's bulkhead (see `branch` above).
            .service(split);
    Ok(BoxCloneSyncService::new(svc))
}
