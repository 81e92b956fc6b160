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

/// The sink of one config generation: stamps the config hash in force on events that carry
/// none (a canary rollback is decided under the generation that built its stack).
pub struct InConfig {
    inner: std::sync::Arc<dyn EventSink>,
    hash: String,
}

impl InConfig {
    pub fn wrap(inner: std::sync::Arc<dyn EventSink>, hash: &str) -> std::sync::Arc<dyn EventSink> {
        std::sync::Arc::new(InConfig {
            inner,
            hash: hash.to_string(),
        })
    }
}

impl EventSink for InConfig {
    fn emit(&self, event: &str, mut detail: serde_json::Value, actor: Option<&str>) {
        if let Some(obj) = detail.as_object_mut() {
            for key in ["config_hash_before", "config_hash_after"] {
                obj.entry(key)
                    .or_insert_with(|| serde_json::Value::String(self.hash.clone()));
            }
        }
        self.inner.emit(event, detail, actor);
    }
}
