//! Raw serde types: exactly what the TOML file says, nothing validated yet.
//!
//! Every struct denies unknown fields so a typo is an error with its key path, never a
//! silently ignored setting. `validate` turns these into the runtime types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    pub audit: Option<RawAudit>,
    pub dlq: Option<RawDlq>,
    pub access_log: Option<RawAccessLog>,
    pub tracing: Option<RawTracing>,
}

/// `[tracing]`: OpenTelemetry spans exported over OTLP/HTTP; absent means off.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub enabled: Option<bool>,
    pub otlp_endpoint: Option<String>,
    pub sampling_ratio: Option<f64>,
    pub service_name: Option<String>,
    pub export_timeout_ms: Option<u64>,
    pub export_interval_ms: Option<u64>,
    pub max_queue: Option<usize>,
}

/// `[access_log]`: one JSON line per request; absent means off.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    pub enabled: Option<bool>,
    /// `"stderr"` (or `"-"`), or a file path.
    pub path: Option<String>,
    pub buffer: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: String,
    /// Default `127.0.0.1:9901`: the admin API is reachable from this host only.
    pub admin_listen: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub max_response_buffer_bytes: Option<u64>,
    pub response_buffer_bytes: Option<u64>,
    pub response_write_timeout_ms: Option<u64>,
    pub header_read_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub body_read_timeout_ms: Option<u64>,
    pub max_header_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub admin_max_connections: Option<usize>,
    pub shutdown_grace_ms: Option<u64>,
    /// `traffic` (default) or `strict`: whether a degraded condition turns `/readyz` 503.
    pub readiness: Option<String>,
    pub admin_token_file: Option<String>,
    pub watch_config: Option<bool>,
    pub instance: Option<String>,
    pub tls: Option<RawServerTls>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTls {
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: String,
    pub connect_timeout_ms: Option<u64>,
    pub ca_file: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
    /// Speak HTTP/2 with prior knowledge over plain TCP (h2c). https negotiates by ALPN.
    pub http2: Option<bool>,
    pub pool_idle_timeout_ms: Option<u64>,
    pub pool_max_idle_per_host: Option<usize>,
    /// Bulkhead: most requests in flight to this upstream; more are shed to the fallback.
    pub max_concurrency: Option<u32>,
    /// Let the limit adapt (AIMD) between `min_concurrency` and `max_concurrency`.
    pub adaptive_concurrency: Option<bool>,
    pub min_concurrency: Option<u32>,
    /// Headers added to every request to this upstream (credentials live here, never in
    /// a DLQ message). Values are masked in `/admin/config`.
    #[serde(default)]
    pub headers: BTreeMap<String, RawHeaderValue>,
}

/// An upstream header value: the text itself, or where to read it, so that a credential
/// can come from a mounted Secret instead of the config file (a ConfigMap).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RawHeaderValue {
    Plain(String),
    /// `{ file = "/run/secrets/ai-token" }`: the file's text, surrounding whitespace trimmed.
    File {
        file: String,
    },
    /// `{ env = "AI_TOKEN" }`: an environment variable of the breakwater process.
    Env {
        env: String,
    },
}

// By hand rather than `untagged`, so that a typo says which keys are expected instead of
// "did not match any variant".
impl<'de> Deserialize<'de> for RawHeaderValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawHeaderValue;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, { file = \"PATH\" } or { env = \"VARIABLE\" }")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawHeaderValue::Plain(v.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                use serde::de::Error;
                let Some(key) = map.next_key::<String>()? else {
                    return Err(A::Error::custom("expected one key: file or env"));
                };
                let value: String = map.next_value()?;
                let parsed = match key.as_str() {
                    "file" => RawHeaderValue::File { file: value },
                    "env" => RawHeaderValue::Env { env: value },
                    other => return Err(A::Error::unknown_field(other, &["file", "env"])),
                };
                if map.next_key::<String>()?.is_some() {
                    return Err(A::Error::custom("expected one key: file or env, not both"));
                }
                Ok(parsed)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub path_prefix: String,
    pub host: Option<String>,
    pub methods: Option<Vec<String>>,
    pub upstream: String,
    pub timeout_ms: Option<u64>,
    pub ai_enabled: Option<bool>,
    pub model_version_header: Option<String>,
    pub model_version_pointer: Option<String>,
    pub replayable: Option<bool>,
    pub retry: Option<RawRetry>,
    pub breaker: Option<RawBreaker>,
    #[serde(default)]
    pub fallback: Vec<RawFallback>,
    #[serde(default)]
    pub variants: Vec<RawVariant>,
    pub canary: Option<RawCanary>,
    /// high | medium | low (default medium).
    pub criticality: Option<String>,
    pub rto_s: Option<u64>,
    pub approved_versions: Option<Vec<RawApproved>>,
    /// fallback | flag (default fallback).
    pub on_unapproved: Option<String>,
    pub model_digest_header: Option<String>,
    pub model_digest_pointer: Option<String>,
    pub response_schema: Option<String>,
    pub shadow: Option<RawShadow>,
}

/// `shadow = { upstream, percent, compare_pointer, max_in_flight, timeout_ms }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawShadow {
    pub upstream: String,
    pub percent: f64,
    pub compare_pointer: Option<String>,
    pub max_in_flight: Option<u32>,
    pub timeout_ms: Option<u64>,
}

/// One entry of `approved_versions`: a version string, or a version pinned to the
/// artifact digest the AI reports.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawApproved {
    Version(String),
    Pinned(RawPinned),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPinned {
    pub version: String,
    pub digest: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub max_attempts: Option<u32>,
    pub backoff_base_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub budget_ratio: Option<f64>,
    pub budget_min_per_s: Option<u32>,
    /// Cut one attempt after this long so a hung call can still be retried in time.
    pub attempt_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub consecutive_failures: Option<u32>,
    pub failure_rate: Option<f64>,
    pub slow_call_ms: Option<u64>,
    pub slow_call_rate: Option<f64>,
    pub window_ms: Option<u64>,
    pub minimum_requests: Option<u32>,
    pub open_ms: Option<u64>,
    pub open_max_ms: Option<u64>,
    pub half_open_probes: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    pub kind: String,
    // cache
    pub ttl_s: Option<u64>,
    pub max_entries: Option<usize>,
    pub max_bytes: Option<u64>,
    pub vary_headers: Option<Vec<String>>,
    // upstream
    pub upstream: Option<String>,
    pub timeout_ms: Option<u64>,
    // static
    pub status: Option<u16>,
    pub body: Option<String>,
    pub body_file: Option<String>,
    pub content_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawVariant {
    pub name: String,
    pub upstream: String,
    pub weight: f64,
    pub sticky_header: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCanary {
    pub auto_rollback: Option<bool>,
    pub max_error_rate: Option<f64>,
    pub max_p99_ms: Option<u64>,
    pub min_requests: Option<u64>,
    pub window_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub enabled: Option<bool>,
    pub path: String,
    pub hmac_key_file: String,
    #[serde(default)]
    pub redact_headers: Vec<String>,
    pub rotate_bytes: Option<u64>,
    pub retention_days: Option<u32>,
    pub on_full: Option<String>,
    pub block_timeout_ms: Option<u64>,
    pub channel_capacity: Option<usize>,
    pub fsync_interval_ms: Option<u64>,
    pub fsync_max_records: Option<usize>,
    pub publish_url: Option<UrlList>,
    pub publish_exchange: Option<String>,
    pub publish_buffer: Option<usize>,
    pub signing_key_file: Option<String>,
    pub checkpoint_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDlq {
    pub amqp_url: Option<UrlList>,
    pub exchange: Option<String>,
    pub spool_dir: Option<String>,
    pub spool_max_bytes: Option<u64>,
    pub segment_bytes: Option<u64>,
    pub fsync_interval_ms: Option<u64>,
    pub replay_rate_per_s: Option<u32>,
    pub max_replay_attempts: Option<u32>,
    pub delivery_limit: Option<u32>,
    pub prefetch: Option<u16>,
    pub confirm_timeout_ms: Option<u64>,
    pub queued_wait_ms: Option<u64>,
    pub results_exchange: Option<String>,
}

/// `amqp_url` / `publish_url`: one node, or the nodes of a cluster (tried in order, the
/// next one on loss).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged, expecting = "a URL or a list of URLs")]
pub enum UrlList {
    One(String),
    Many(Vec<String>),
}
