//! One classification of a call's outcome, shared by the breaker, the bulkhead and the
//! canary analysis.

/// Why a call counts as a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    ConnectError,
    Timeout,
    Upstream5xx,
    TooManyRequests,
    /// A healthy answer from a model version that may not answer: a failure for the
    /// canary (a variant serving it is rolled back), not for the breaker or the bulkhead.
    Unapproved,
    /// An answer that does not match `response_schema`: a failure for the breaker and the
    /// canary, not for the adaptive concurrency limit (it says nothing about capacity).
    InvalidResponse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Success,
    /// 4xx from the AI service: the client's fault, never held against the AI.
    ClientError,
    Failure(FailureKind),
}

impl CallOutcome {
    pub fn is_failure(self) -> bool {
        matches!(self, CallOutcome::Failure(_))
    }

    /// How the call counts for a circuit breaker: `None` when it says nothing about the
    /// AI's health (an unapproved version answers fine, it just may not answer).
    pub fn for_breaker(self) -> Option<CallOutcome> {
        match self {
            CallOutcome::Failure(FailureKind::Unapproved) => None,
            other => Some(other),
        }
    }

    /// How the call counts for the adaptive concurrency limit: `None` for answers that
    /// arrived in time but were refused on their content.
    pub fn for_limit(self) -> Option<CallOutcome> {
        match self {
            CallOutcome::Failure(FailureKind::Unapproved | FailureKind::InvalidResponse) => None,
            other => Some(other),
        }
    }
}

/// 2xx/3xx success, 429 too-many-requests, other 4xx client error, 5xx failure.
pub fn classify_status(status: u16) -> CallOutcome {
    match status {
        429 => CallOutcome::Failure(FailureKind::TooManyRequests),
        400..=499 => CallOutcome::ClientError,
        500..=599 => CallOutcome::Failure(FailureKind::Upstream5xx),
        _ => CallOutcome::Success,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(classify_status(200), CallOutcome::Success);
        assert_eq!(classify_status(304), CallOutcome::Success);
        assert_eq!(classify_status(404), CallOutcome::ClientError);
        assert_eq!(
            classify_status(429),
            CallOutcome::Failure(FailureKind::TooManyRequests)
        );
        assert_eq!(
            classify_status(503),
            CallOutcome::Failure(FailureKind::Upstream5xx)
        );
    }
}
