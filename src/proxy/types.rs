//! The request and response types that travel through the per-route tower stack.
//!
//! The request body is buffered (bounded by `max_body_bytes`) before the stack runs, so a
//! request can be retried, sent to a fallback upstream and queued for replay. Response
//! bodies stream unless a layer needs to read them (model version pointer, cache).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use tokio::time::Instant;

use crate::config::RouteConfig;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response breakwater writes.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty_body() -> ProxyBody {
    full_body(Bytes::new())
}

/// What the stack knows about the request beyond its HTTP form. Shared by every attempt.
#[derive(Debug)]
pub struct RequestMeta {
    /// Shared, so the decision record takes it without a copy.
    pub request_id: Arc<str>,
    pub route: Arc<RouteConfig>,
    pub received_at: Instant,
    pub received_wall: SystemTime,
    /// Total deadline: `received_at + route.timeout`. Retries never outlive it.
    pub deadline: Instant,
    /// The client asked for at-most-once semantics to be relaxed by naming the request.
    pub idempotency_key: bool,
    attempts: AtomicU32,
}

impl RequestMeta {
    pub fn new(request_id: String, route: Arc<RouteConfig>, idempotency_key: bool) -> Self {
        let now = Instant::now();
        RequestMeta {
            request_id: Arc::from(request_id),
            deadline: now + route.timeout,
            route,
            received_at: now,
            received_wall: SystemTime::now(),
            idempotency_key,
            attempts: AtomicU32::new(0),
        }
    }

    /// Counts one call to an AI upstream (the first try or a retry).
    pub fn add_attempt(&self) -> u32 {
        self.attempts.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }
}

/// A request inside the stack. Cloning is cheap: the body is `Bytes`, the meta an `Arc`.
#[derive(Debug, Clone)]
pub struct ProxyRequest {
    pub http: http::Request<Bytes>,
    pub meta: Arc<RequestMeta>,
}

/// Who produced the answer the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Ai,
    Fallback { kind: FallbackKind, reason: Reason },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackKind {
    Cache,
    Upstream,
    Static,
}

impl FallbackKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackKind::Cache => "cache",
            FallbackKind::Upstream => "upstream",
            FallbackKind::Static => "static",
        }
    }
}

/// Why the AI did not answer (SPEC `x-breakwater-reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    BreakerOpen,
    Timeout,
    Upstream5xx,
    ConnectError,
    AiDisabled,
    Overloaded,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BreakerOpen => "breaker_open",
            Reason::Timeout => "timeout",
            Reason::Upstream5xx => "upstream_5xx",
            Reason::ConnectError => "connect_error",
            Reason::AiDisabled => "ai_disabled",
            Reason::Overloaded => "overloaded",
        }
    }
}

/// What happened to a replayable request that the AI did not answer (`x-breakwater-dlq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqOutcome {
    Queued,
    Spooled,
    Rejected,
}

impl DlqOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DlqOutcome::Queued => "queued",
            DlqOutcome::Spooled => "spooled",
            DlqOutcome::Rejected => "rejected",
        }
    }
}

/// A response inside the stack, with what the decision log and metrics need to know.
#[derive(Debug)]
pub struct ProxyResponse {
    pub http: http::Response<ProxyBody>,
    pub source: Source,
    /// The AI upstream that answered (or was tried last).
    pub upstream: Option<Arc<str>>,
    pub variant: Option<Arc<str>>,
    pub model_version: Option<String>,
    pub upstream_latency: Option<Duration>,
    pub dlq: Option<(DlqOutcome, String)>,
    /// The whole body when a layer needed to read it (model version pointer, answer
    /// cache); `http`'s body then replays these same bytes.
    pub body_bytes: Option<Bytes>,
}

impl ProxyResponse {
    pub fn ai(http: http::Response<ProxyBody>, upstream: Arc<str>) -> Self {
        ProxyResponse {
            http,
            source: Source::Ai,
            upstream: Some(upstream),
            variant: None,
            model_version: None,
            upstream_latency: None,
            dlq: None,
            body_bytes: None,
        }
    }
}

/// A GET request for a route named "test" with the given deadline, for layer unit tests.
#[cfg(test)]
pub fn test_request(timeout: Duration) -> ProxyRequest {
    let text = format!(
        "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n[upstreams.a]\nurl=\"http://127.0.0.1:1\"\n\
         [[routes]]\nname=\"test\"\npath_prefix=\"/\"\nupstream=\"a\"\ntimeout_ms={}\n",
        timeout.as_millis()
    );
    let cfg = crate::config::Config::from_toml(&text).unwrap();
    let route = cfg.routes[0].clone();
    ProxyRequest {
        http: http::Request::builder()
            .uri("/x")
            .body(Bytes::new())
            .unwrap(),
        meta: Arc::new(RequestMeta::new("req-1".into(), route, false)),
    }
}
