//! Change events for the audit trail (config reloads, admin changes, canary rollbacks).
//! Producers call `emit`; the decision log implements the sink. Never blocks the caller.

pub trait EventSink: Send + Sync {
    /// `event` is the SPEC event name; `detail` carries its figures; `actor` names who made
    /// an admin change (a token fingerprint, never the token).
    fn emit(&self, event: &str, detail: serde_json::Value, actor: Option<&str>);
}

impl std::fmt::Debug for dyn EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}
