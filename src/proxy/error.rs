//! Failures inside the stack and the one place they become client responses.
//!
//! Each error knows whether it is retryable, whether the request reached the upstream,
//! which `x-breakwater-reason` it maps to and which status the client sees when no
//! fallback is left (502/503/504 with the SPEC JSON body; never a bare 500).

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};

use super::types::{full_body, DlqOutcome, ProxyBody, Reason};

#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// The request never left breakwater: always safe to retry.
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    /// The connection failed; `sent` says whether the request may have reached the upstream.
    #[error("upstream connection failed: {message}")]
    Transport { message: String, sent: bool },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// 5xx or 429 from the AI service.
    #[error("the upstream answered {status}")]
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
    },
    #[error("the circuit breaker is open")]
    BreakerOpen { retry_in: Duration },
    #[error("AI is disabled for this route (kill switch)")]
    AiDisabled,
    #[error("over the concurrency limit: request shed")]
    Overloaded,
    #[error("internal error: {0}")]
    Internal(String),
}

/// A failure plus what the decision log should know about it.
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub upstream: Option<Arc<str>>,
    pub variant: Option<Arc<str>>,
    pub upstream_latency: Option<Duration>,
    /// The model version the failing AI reported, when it said (post-patch signal).
    pub model_version: Option<String>,
    pub dlq: Option<(DlqOutcome, String)>,
}

impl From<ErrorKind> for ProxyError {
    fn from(kind: ErrorKind) -> Self {
        ProxyError {
            kind,
            upstream: None,
            variant: None,
            upstream_latency: None,
            model_version: None,
            dlq: None,
        }
    }
}

impl ProxyError {
    pub fn with_upstream(mut self, upstream: &Arc<str>) -> Self {
        self.upstream = Some(upstream.clone());
        self
    }

    pub fn reason(&self) -> Reason {
        match &self.kind {
            ErrorKind::Connect(_) => Reason::ConnectError,
            ErrorKind::Transport { .. } => Reason::ConnectError,
            ErrorKind::Timeout(_) => Reason::Timeout,
            ErrorKind::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                Reason::Overloaded
            }
            ErrorKind::Status { .. } => Reason::Upstream5xx,
            ErrorKind::BreakerOpen { .. } => Reason::BreakerOpen,
            ErrorKind::AiDisabled => Reason::AiDisabled,
            ErrorKind::Overloaded => Reason::Overloaded,
            ErrorKind::Internal(_) => Reason::Upstream5xx,
        }
    }

    /// True when the upstream may have received (and acted on) the request.
    pub fn was_sent(&self) -> bool {
        match &self.kind {
            ErrorKind::Connect(_)
            | ErrorKind::BreakerOpen { .. }
            | ErrorKind::AiDisabled
            | ErrorKind::Overloaded => false,
            ErrorKind::Transport { sent, .. } => *sent,
            ErrorKind::Timeout(_) | ErrorKind::Status { .. } | ErrorKind::Internal(_) => true,
        }
    }

    /// Failures that another attempt might fix. A breaker or kill switch saying no is final
    /// for this request.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connect(_)
                | ErrorKind::Transport { .. }
                | ErrorKind::Timeout(_)
                | ErrorKind::Status { .. }
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match &self.kind {
            ErrorKind::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The status the client sees when no fallback answered.
    pub fn client_status(&self) -> StatusCode {
        match &self.kind {
            ErrorKind::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::BreakerOpen { .. } | ErrorKind::AiDisabled | ErrorKind::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The machine-readable `error.code` for the JSON body.
    pub fn code(&self) -> &'static str {
        self.reason().as_str()
    }
}

/// The SPEC error body: `{"error": {"code", "message", "request_id"}}`.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> http::Response<ProxyBody> {
    let body = serde_json::json!({
        "error": { "code": code, "message": message, "request_id": request_id }
    });
    let mut resp = http::Response::new(full_body(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl ProxyError {
    /// The shared classification every layer uses (breaker, bulkhead, canary analysis).
    /// `None` for refusals that never reached the AI.
    pub fn call_outcome(&self) -> Option<crate::breaker::CallOutcome> {
        use crate::breaker::{CallOutcome, FailureKind};
        match &self.kind {
            ErrorKind::Connect(_) | ErrorKind::Transport { .. } => {
                Some(CallOutcome::Failure(FailureKind::ConnectError))
            }
            ErrorKind::Timeout(_) => Some(CallOutcome::Failure(FailureKind::Timeout)),
            ErrorKind::Status { status, .. } => {
                Some(crate::breaker::classify_status(status.as_u16()))
            }
            ErrorKind::Internal(_) => Some(CallOutcome::Failure(FailureKind::Upstream5xx)),
            ErrorKind::BreakerOpen { .. } | ErrorKind::AiDisabled | ErrorKind::Overloaded => None,
        }
    }
}
