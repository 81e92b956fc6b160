//! `GET /readyz`: "can take traffic" apart from "degraded". As a sidecar, a 503 here takes
//! the whole Magento pod out of its Service, so `server.readiness` decides what turns it
//! off: `traffic` (default) only an unbound listener or the shutdown drain; `strict` any
//! degraded condition too. Both modes name every degraded condition in the body and in
//! `breakwater_degraded_condition{condition}`.

use std::sync::atomic::{AtomicBool, Ordering};

use http::StatusCode;
use serde_json::json;

use crate::config::ReadinessMode;

/// A degraded condition: breakwater still answers (fallbacks, spool), but something an
/// operator should see is wrong. The label values are fixed (bounded cardinality).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// The decision log cannot write (disk full, I/O error) or lost records are not yet
    /// chained.
    AuditDisk,
    /// The DLQ spool rejects new messages (its disk failed or `spool_max_bytes` reached).
    SpoolFull,
    /// The DLQ publisher's last connection attempt reached no RabbitMQ node.
    DlqBroker,
    /// SIGTERM: the listener is closed and in-flight requests drain.
    Draining,
}

impl Condition {
    pub const ALL: [Condition; 4] = [
        Condition::AuditDisk,
        Condition::SpoolFull,
        Condition::DlqBroker,
        Condition::Draining,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Condition::AuditDisk => "audit_disk",
            Condition::SpoolFull => "spool_full",
            Condition::DlqBroker => "dlq_broker",
            Condition::Draining => "draining",
        }
    }
}

/// The lifecycle flags the process sets; the rest is read from the components.
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// Set once both listeners are bound and the first config is in force.
    pub listeners_ready: AtomicBool,
    /// Set when shutdown begins: not ready in either mode.
    pub draining: AtomicBool,
}

/// What a probe found.
#[derive(Debug)]
pub struct Report {
    pub mode: ReadinessMode,
    pub ready: bool,
    /// What keeps it not ready (empty when ready).
    pub problems: Vec<String>,
    pub degraded: Vec<(Condition, String)>,
}

impl Report {
    /// Evaluates readiness from the lifecycle flags and the degraded conditions found.
    pub fn evaluate(
        mode: ReadinessMode,
        lifecycle: &Lifecycle,
        degraded: Vec<(Condition, String)>,
    ) -> Report {
        let mut problems = Vec::new();
        if !lifecycle.listeners_ready.load(Ordering::Acquire) {
            problems.push("listeners not bound yet".to_string());
        }
        for (condition, detail) in &degraded {
            // Draining is not ready in both modes: the pod is leaving the Service.
            if *condition == Condition::Draining || mode == ReadinessMode::Strict {
                problems.push(detail.clone());
            }
        }
        Report {
            mode,
            ready: problems.is_empty(),
            problems,
            degraded,
        }
    }

    pub fn status(&self) -> StatusCode {
        if self.ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }

    pub fn body(&self) -> serde_json::Value {
        let degraded: Vec<serde_json::Value> = self
            .degraded
            .iter()
            .map(|(c, detail)| json!({"condition": c.label(), "detail": detail}))
            .collect();
        let mut body = json!({
            "ready": self.ready,
            "readiness": self.mode.as_str(),
            "degraded": degraded,
        });
        if !self.ready {
            body["problems"] = json!(self.problems);
        }
        body
    }

    /// `breakwater_ready` and one `breakwater_degraded_condition` series per condition, so
    /// an alert can tell "degraded" from "gone" whatever the mode.
    pub fn publish(&self) {
        metrics::gauge!(crate::telemetry::READY).set(if self.ready { 1.0 } else { 0.0 });
        for c in Condition::ALL {
            let on = self.degraded.iter().any(|(d, _)| *d == c);
            metrics::gauge!(crate::telemetry::DEGRADED_CONDITION, "condition" => c.label())
                .set(if on { 1.0 } else { 0.0 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifecycle(bound: bool) -> Lifecycle {
        let l = Lifecycle::default();
        l.listeners_ready.store(bound, Ordering::Release);
        l
    }

    #[test]
    fn traffic_mode_stays_ready_while_degraded_strict_does_not() {
        let spool = vec![(Condition::SpoolFull, "full".to_string())];
        let t = Report::evaluate(ReadinessMode::Traffic, &lifecycle(true), spool.clone());
        assert!(t.ready);
        assert_eq!(t.body()["degraded"][0]["condition"], "spool_full");
        let s = Report::evaluate(ReadinessMode::Strict, &lifecycle(true), spool);
        assert!(!s.ready);
        assert_eq!(s.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn draining_and_unbound_are_not_ready_in_either_mode() {
        for mode in [ReadinessMode::Traffic, ReadinessMode::Strict] {
            let d = vec![(Condition::Draining, "draining".to_string())];
            assert!(!Report::evaluate(mode, &lifecycle(true), d).ready);
            assert!(!Report::evaluate(mode, &lifecycle(false), Vec::new()).ready);
            assert!(Report::evaluate(mode, &lifecycle(true), Vec::new()).ready);
        }
    }
}
