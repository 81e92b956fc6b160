//! The bottom of the request path: the request, response and error types that travel
//! through the per-route tower stack, and the per-request [`Facts`] that the layers fill in.
//! Layers, fallback, canary and dlq use these without importing `proxy`.
//!
//! The request body is buffered (bounded by `max_body_bytes`) before the stack runs, so a
//! request can be retried, sent to a fallback upstream and queued for replay. Response
//! bodies stream unless a layer needs to read them (model version pointer, cache).

pub mod error;
pub mod headers;

use std::sync::{Arc, Mutex, MutexGuard};
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
    /// The W3C trace the request belongs to (its spans when sampled).
    pub trace: Option<crate::otel::RequestTrace>,
    /// What the layers learned about this request: the one place the decision record,
    /// the metrics and the headers read from, whether the request ends in an answer, an
    /// error or a dropped future.
    facts: Mutex<Facts>,
}

/// What happened to a request, filled in by the layers as it goes (never held across an
/// await). The upstream, variant, model version and latency are those of the last attempt.
#[derive(Default)]
pub struct Facts {
    pub attempts: u32,
    /// The AI upstream that answered, or was tried last.
    pub upstream: Option<Arc<str>>,
    pub variant: Option<Arc<str>>,
    /// The model version the AI reported (also on a 5xx: the post-patch trail).
    pub model_version: Option<String>,
    pub upstream_latency: Option<Duration>,
    /// Why the AI did not answer, once a layer saw the failure (kept for a request whose
    /// client goes away while a fallback or the DLQ is still working on it).
    pub failure: Option<Reason>,
    /// The answer passed although its model version is not approved
    /// (`on_unapproved = "flag"`): marked in the decision record.
    pub unapproved: bool,
    pub dlq: DlqState,
    /// Work to run once an in-flight DLQ hand-off ends (the record of a cancelled request
    /// that waits for its DLQ outcome).
    after_dlq: Option<AfterDlq>,
}

/// Called with the DLQ outcome once the hand-off ends.
pub type AfterDlq = Box<dyn FnOnce(Option<(DlqOutcome, Arc<str>)>) + Send>;

impl std::fmt::Debug for Facts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Facts")
            .field("attempts", &self.attempts)
            .field("upstream", &self.upstream)
            .field("variant", &self.variant)
            .field("model_version", &self.model_version)
            .field("upstream_latency", &self.upstream_latency)
            .field("dlq", &self.dlq)
            .finish()
    }
}

/// Where a replayable request's dead letter stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DlqState {
    #[default]
    None,
    /// Handed to the spool; the outcome is not known yet.
    InFlight,
    Done(DlqOutcome, Arc<str>),
}

impl DlqState {
    pub fn outcome(&self) -> Option<(DlqOutcome, Arc<str>)> {
        match self {
            DlqState::Done(o, id) => Some((*o, id.clone())),
            _ => None,
        }
    }
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
            trace: None,
            facts: Mutex::new(Facts::default()),
        }
    }

    /// The request's facts. A poisoned lock still holds valid facts (every write is a
    /// plain field store), so it is used as is.
    pub fn facts(&self) -> MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one call to an AI upstream (the first try or a retry) and forgets what the
    /// previous attempt reported.
    pub fn attempt_started(&self, upstream: &Arc<str>, variant: Option<&Arc<str>>) -> u32 {
        let mut f = self.facts();
        f.attempts += 1;
        f.upstream = Some(upstream.clone());
        f.variant = variant.cloned();
        f.model_version = None;
        f.upstream_latency = None;
        f.unapproved = false;
        f.attempts
    }

    /// What the upstream of the current attempt said, answer or failure.
    pub fn attempt_answered(&self, latency: Duration, model_version: Option<String>) {
        let mut f = self.facts();
        f.upstream_latency = Some(latency);
        f.model_version = model_version;
    }

    /// A request refused before any AI call names what refused it (a variant's breaker,
    /// an upstream's bulkhead).
    pub fn refused_by(&self, upstream: Option<&Arc<str>>, variant: Option<&Arc<str>>) {
        let mut f = self.facts();
        if let Some(u) = upstream {
            f.upstream = Some(u.clone());
        }
        if let Some(v) = variant {
            f.variant = Some(v.clone());
        }
    }

    pub fn dlq_started(&self) {
        self.facts().dlq = DlqState::InFlight;
    }

    /// Records the DLQ outcome and runs what waited for it.
    pub fn dlq_finished(&self, outcome: DlqOutcome, msg_id: Arc<str>) {
        let after = {
            let mut f = self.facts();
            f.dlq = DlqState::Done(outcome, msg_id.clone());
            f.after_dlq.take()
        };
        if let Some(after) = after {
            after(Some((outcome, msg_id)));
        }
    }

    /// Runs `f` once the DLQ hand-off in flight ends, or now (with the outcome known so
    /// far) when none is in flight.
    pub fn after_dlq(&self, f: AfterDlq) {
        let now = {
            let mut facts = self.facts();
            match &facts.dlq {
                DlqState::InFlight => {
                    facts.after_dlq = Some(f);
                    return;
                }
                state => (state.outcome(), f),
            }
        };
        (now.1)(now.0)
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
    /// The answer came from a model version outside `approved_versions`.
    UnapprovedVersion,
    /// The answer did not match `response_schema`.
    InvalidResponse,
    /// breakwater's own fault, never blamed on the AI.
    Internal,
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
            Reason::UnapprovedVersion => "unapproved_version",
            Reason::InvalidResponse => "invalid_response",
            Reason::Internal => "internal",
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

/// A response inside the stack. Who served it and how is in the request's [`Facts`].
#[derive(Debug)]
pub struct ProxyResponse {
    pub http: http::Response<ProxyBody>,
    pub source: Source,
    /// The whole body when a layer needed to read it (model version pointer, answer
    /// cache); `http`'s body then replays these same bytes.
    pub body_bytes: Option<Bytes>,
}

impl ProxyResponse {
    pub fn ai(http: http::Response<ProxyBody>) -> Self {
        ProxyResponse {
            http,
            source: Source::Ai,
            body_bytes: None,
        }
    }
}

/// For layer tests: the body as bytes.
#[cfg(test)]
pub async fn body_bytes(body: ProxyBody) -> Result<Bytes, BoxError> {
    Ok(body.collect().await?.to_bytes())
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
