//! Failures inside the stack and the one place they become client responses.
//!
//! Each error knows whose fault it is (pingora's `ErrorSource`), whether it is retryable,
//! whether the request reached the upstream, which `x-breakwater-reason` it maps to and
//! which status the client sees when no fallback is left (502/503/504 with the SPEC JSON
//! body, 500 with it for breakwater's own faults; never a bare 500).

use std::time::Duration;

use http::{HeaderValue, StatusCode};

use super::{full_body, ProxyBody, Reason};

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
    /// The AI answered from a model version outside the route's `approved_versions`
    /// (`on_unapproved = "fallback"`).
    #[error("the answer came from model version {version}, which is not approved")]
    Unapproved { version: String },
    /// The AI's answer does not match the route's `response_schema`.
    #[error("the answer does not match the response schema: {0}")]
    InvalidResponse(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Whose fault a failure is. Only the upstream's faults count against an AI's breaker,
/// canary or concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The AI service: refused, reset, slow, 5xx, 429.
    Upstream,
    /// A breakwater policy said no on purpose: breaker open, kill switch, load shed.
    Policy,
    /// breakwater itself failed (a bug or a resource it lacks).
    Internal,
}

impl ErrorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Upstream => "upstream",
            ErrorSource::Policy => "policy",
            ErrorSource::Internal => "internal",
        }
    }
}

/// A failure inside the stack. What the decision log needs about the request (upstream,
/// variant, model version, latency, DLQ outcome) is in the request's `Facts`, not here.
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct ProxyError {
    pub kind: ErrorKind,
}

impl From<ErrorKind> for ProxyError {
    fn from(kind: ErrorKind) -> Self {
        ProxyError { kind }
    }
}

impl ProxyError {
    pub fn source(&self) -> ErrorSource {
        match &self.kind {
            ErrorKind::Connect(_)
            | ErrorKind::Transport { .. }
            | ErrorKind::Timeout(_)
            | ErrorKind::Status { .. }
            | ErrorKind::Unapproved { .. }
            | ErrorKind::InvalidResponse(_) => ErrorSource::Upstream,
            ErrorKind::BreakerOpen { .. } | ErrorKind::AiDisabled | ErrorKind::Overloaded => {
                ErrorSource::Policy
            }
            ErrorKind::Internal(_) => ErrorSource::Internal,
        }
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
            ErrorKind::Unapproved { .. } => Reason::UnapprovedVersion,
            ErrorKind::InvalidResponse(_) => Reason::InvalidResponse,
            ErrorKind::Internal(_) => Reason::Internal,
        }
    }

    /// True when the upstream may have received (and acted on) the request.
    pub fn was_sent(&self) -> bool {
        match &self.kind {
            ErrorKind::Connect(_)
            | ErrorKind::BreakerOpen { .. }
            | ErrorKind::AiDisabled
            | ErrorKind::Overloaded
            | ErrorKind::Internal(_) => false,
            ErrorKind::Transport { sent, .. } => *sent,
            ErrorKind::Timeout(_)
            | ErrorKind::Status { .. }
            | ErrorKind::Unapproved { .. }
            | ErrorKind::InvalidResponse(_) => true,
        }
    }

    /// Failures that another attempt might fix. A breaker or kill switch saying no is final
    /// for this request; so is an unapproved or invalid answer (the same AI would give it
    /// again).
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
            ErrorKind::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
    /// `None` for what says nothing about the AI's health: policy refusals that never
    /// reached it, and breakwater's own faults.
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
            ErrorKind::Unapproved { .. } => Some(CallOutcome::Failure(FailureKind::Unapproved)),
            ErrorKind::InvalidResponse(_) => {
                Some(CallOutcome::Failure(FailureKind::InvalidResponse))
            }
            ErrorKind::Internal(_)
            | ErrorKind::BreakerOpen { .. }
            | ErrorKind::AiDisabled
            | ErrorKind::Overloaded => None,
        }
    }
}
