//! Configuration: TOML on disk -> raw serde types -> `validate()` -> runtime types.
//!
//! Only the runtime types (`Config` and friends) reach the request path. Loading never
//! stops at the first problem: every error is collected with its key path so
//! `breakwater check` and a failed reload can report them all at once.

pub mod raw;
pub mod reload;
mod tls;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

pub use raw::RawConfig;
pub use tls::{client_tls_config, server_tls_config};

/// One problem in a config file, with the key path it concerns (`routes[2].breaker.window_ms`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All the errors of one load attempt.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize)]
#[error("{} config error(s): {}", .errors.len(), .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct ConfigErrors {
    pub errors: Vec<ConfigError>,
}

/// The validated configuration. Cheap to share; built off the request path.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstreams: BTreeMap<String, Arc<UpstreamConfig>>,
    pub routes: Vec<Arc<RouteConfig>>,
    pub audit: Option<AuditConfig>,
    pub dlq: Option<DlqConfig>,
    pub access_log: Option<crate::access_log::AccessLogConfig>,
    pub tracing: Option<crate::otel::TracingConfig>,
    /// SHA-256 of the file bytes, hex: what `/admin/config` and the audit trail show.
    pub hash: String,
    /// The raw form, kept for `/admin/config` (secrets are masked when rendered).
    pub raw: RawConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: std::net::SocketAddr,
    pub admin_listen: std::net::SocketAddr,
    pub max_body_bytes: u64,
    pub max_response_buffer_bytes: u64,
    /// All responses together hold at most this many bytes read ahead of their clients;
    /// past it, answers stream at the client's pace.
    pub response_buffer_bytes: u64,
    /// A connection whose writes make no progress for this long is dropped.
    pub response_write_timeout: Duration,
    pub header_read_timeout: Duration,
    /// Between requests on a kept-alive HTTP/1 connection, or with no open h2 stream.
    pub idle_timeout: Duration,
    /// The whole request body must arrive within this after its head (else 408).
    pub body_read_timeout: Duration,
    /// A request head (HTTP/1) or header list (h2) larger than this is refused (431 /
    /// stream reset).
    pub max_header_bytes: usize,
    /// Open connections on the data plane / the admin listener; more are refused.
    /// Read at start (like the listen addresses).
    pub max_connections: usize,
    pub admin_max_connections: usize,
    pub shutdown_grace: Duration,
    /// What `/readyz` turns 503 for (hot-reloadable: read on every probe).
    pub readiness: ReadinessMode,
    pub admin_token: Option<AdminToken>,
    pub watch_config: bool,
    pub instance: String,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// `server.readiness`. As a sidecar, a 503 on `/readyz` takes the whole Magento pod out of
/// its Service, so by default a degraded condition (audit disk, full spool, broker down) is
/// reported in the body and stays 200; `strict` turns it 503 as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadinessMode {
    /// Ready once the listeners are bound and the config is loaded; 503 only while draining.
    #[default]
    Traffic,
    /// Any degraded condition is 503 too.
    Strict,
}

impl ReadinessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadinessMode::Traffic => "traffic",
            ReadinessMode::Strict => "strict",
        }
    }
}

/// The bearer token guarding mutating admin calls. Debug never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Base path prepended to the request path ("" when the url has none).
    pub base_path: String,
    pub connect_timeout: Duration,
    pub http2_prior_knowledge: bool,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub concurrency: Option<ConcurrencyConfig>,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// What the client depends on: a change here rebuilds the connection pool.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConcurrencyConfig {
    pub max: u32,
    pub min: u32,
    pub adaptive: bool,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Shared, so the metrics and the decision record take it without a copy.
    pub name: Arc<str>,
    pub path_prefix: String,
    pub host: Option<String>,
    pub methods: Option<Vec<http::Method>>,
    pub upstream: String,
    pub timeout: Duration,
    pub ai_enabled: bool,
    pub model_version_header: Option<http::HeaderName>,
    pub model_version_pointer: Option<String>,
    pub replayable: bool,
    pub retry: Option<RetryConfig>,
    pub breaker: Option<BreakerConfig>,
    pub fallback: Vec<FallbackConfig>,
    pub variants: Vec<VariantConfig>,
    pub canary: Option<CanaryConfig>,
    /// Orders load shedding and is shown in the inventory.
    pub criticality: Criticality,
    /// Longest tolerable time degraded before an `rto_exceeded` event.
    pub rto: Option<Duration>,
    /// `approved_versions`: only these model versions may answer.
    pub approval: Option<Arc<Approval>>,
    /// `response_schema`, compiled once per config generation.
    pub response_schema: Option<Arc<ResponseSchema>>,
    /// `shadow`: mirror a share of the answered requests to a candidate upstream.
    pub shadow: Option<Arc<ShadowConfig>>,
}

/// A shadow test of a candidate (a patched service, a new model version): a share of the
/// requests the AI answered is sent again, off the request path, to `upstream`; its answer
/// is compared with the one the client got and then discarded.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    pub upstream: String,
    /// Share of the AI-answered requests mirrored, 0-100 (fractions allowed).
    pub percent: f64,
    /// JSON pointer to the part of the answer compared; `None`: the whole answer.
    pub compare_pointer: Option<String>,
    /// Mirrored requests in flight at once; past that a mirror is dropped and counted.
    pub max_in_flight: u32,
    /// How long the candidate may take before the mirror counts as `timeout`.
    pub timeout: Duration,
}

/// How much a route matters; under overload the less critical routes are shed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Criticality {
    Low,
    Medium,
    High,
}

impl Criticality {
    pub fn as_str(self) -> &'static str {
        match self {
            Criticality::Low => "low",
            Criticality::Medium => "medium",
            Criticality::High => "high",
        }
    }

    /// The share of an upstream's concurrency limit a route of this criticality may fill
    /// when a more critical route calls the same upstream: the rest is headroom for it.
    pub fn limit_share(self) -> f64 {
        match self {
            Criticality::Low => 0.5,
            Criticality::Medium => 0.8,
            Criticality::High => 1.0,
        }
    }
}

/// What an answer from a model version outside `approved_versions` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnapproved {
    /// Discarded; the fallback chain answers with reason `unapproved_version`.
    Fallback,
    /// Passes, marked `"unapproved": true` in the decision record.
    Flag,
}

impl OnUnapproved {
    pub fn as_str(self) -> &'static str {
        match self {
            OnUnapproved::Fallback => "fallback",
            OnUnapproved::Flag => "flag",
        }
    }
}

/// The model versions cleared for a route, each optionally pinned to an artifact digest.
#[derive(Debug, Clone)]
pub struct Approval {
    /// version -> the digest it must report, if pinned.
    pub versions: std::collections::HashMap<String, Option<String>>,
    pub on_unapproved: OnUnapproved,
    pub digest_header: http::HeaderName,
    /// JSON pointer to the digest in the answer, read when the header is absent.
    pub digest_pointer: Option<String>,
}

impl Approval {
    /// True when `version` (with the `digest` the AI reported) is cleared. An answer that
    /// reports no version is not.
    pub fn approves(&self, version: Option<&str>, digest: Option<&str>) -> bool {
        match version.and_then(|v| self.versions.get(v)) {
            None => false,
            Some(None) => true,
            Some(Some(pinned)) => digest == Some(pinned.as_str()),
        }
    }
}

/// A compiled `response_schema`.
pub struct ResponseSchema {
    /// The file it was read from, for messages.
    pub file: String,
    /// Validates answers parsed onto a simd-json tape (`crate::json_tape`).
    pub validator: jsonschema::Validator<crate::json_tape::Tape>,
}

impl fmt::Debug for ResponseSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseSchema")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub budget_ratio: f64,
    pub budget_min_per_s: u32,
    /// Per-attempt timeout, within the route's deadline; `None`: an attempt may use all of it.
    pub attempt_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: Option<f64>,
    pub slow_call: Option<Duration>,
    pub slow_call_rate: Option<f64>,
    pub window: Duration,
    pub minimum_requests: u32,
    pub open: Duration,
    pub open_max: Duration,
    pub half_open_probes: u32,
}

#[derive(Debug, Clone)]
pub enum FallbackConfig {
    Cache {
        ttl: Duration,
        max_entries: usize,
        max_bytes: u64,
        /// Request headers the answer depends on (default: the credentials and the
        /// variants' sticky headers): part of the cache key.
        vary_headers: Vec<http::HeaderName>,
    },
    Upstream {
        upstream: String,
        timeout: Duration,
    },
    Static {
        status: http::StatusCode,
        body: Bytes,
        content_type: http::HeaderValue,
    },
}

impl FallbackConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            FallbackConfig::Cache { .. } => "cache",
            FallbackConfig::Upstream { .. } => "upstream",
            FallbackConfig::Static { .. } => "static",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct VariantConfig {
    pub name: String,
    pub upstream: String,
    /// Percent of the route's traffic, 0..=100.
    pub weight: f64,
    pub sticky_header: Option<http::HeaderName>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CanaryConfig {
    pub auto_rollback: bool,
    pub max_error_rate: f64,
    pub max_p99: Option<Duration>,
    pub min_requests: u64,
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub path: PathBuf,
    pub hmac_key: Vec<u8>,
    pub key_id: String,
    pub redact_headers: Vec<String>,
    pub rotate_bytes: u64,
    pub retention_days: u32,
    pub on_full_drop: bool,
    /// Under `block`: the longest a record waits for room before it is counted as lost.
    pub block_timeout: Duration,
    pub channel_capacity: usize,
    pub fsync_interval: Duration,
    pub fsync_max_records: usize,
    /// Copies of the written lines to a RabbitMQ exchange for central collection.
    pub publish: Option<AuditPublishConfig>,
    /// Signed checkpoints (`signing_key_file`, `checkpoint_interval_ms`).
    pub checkpoint: Option<crate::audit::writer::CheckpointSettings>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditPublishConfig {
    pub url: crate::amqp::Endpoints,
    pub exchange: String,
    /// Lines waiting for the broker; beyond it they are counted and dropped (the file
    /// keeps them).
    pub buffer: usize,
}

#[derive(Debug, Clone)]
pub struct DlqConfig {
    /// The RabbitMQ nodes, tried in order; `None`: spool only.
    pub amqp_url: Option<crate::amqp::Endpoints>,
    pub exchange: String,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub segment_bytes: u64,
    pub fsync_interval: Duration,
    pub replay_rate_per_s: u32,
    pub max_replay_attempts: u32,
    /// `x-delivery-limit` of each route's quorum queue; past it the broker dead-letters
    /// the message to the parked queue.
    pub delivery_limit: u32,
    pub prefetch: u16,
    pub confirm_timeout: Duration,
    pub queued_wait: Duration,
    pub results_exchange: String,
}

impl Config {
    /// Parse and validate TOML text. `origin` names the file in messages.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let raw = parse_raw(text)?;
        let hash = hex::encode(Sha256::digest(text.as_bytes()));
        validate::validate(raw, hash)
    }

    /// Read and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            errors: vec![ConfigError {
                path: path.display().to_string(),
                message: format!("cannot read config file: {e}"),
            }],
        })?;
        Config::from_toml(&text)
    }

    /// The routes `new` adds, removes or changes against this config, by name: what a
    /// `config_reload` event records. Compared on their raw form, never logged.
    pub fn routes_changed(&self, new: &Config) -> serde_json::Value {
        let map = |c: &Config| -> BTreeMap<String, serde_json::Value> {
            c.raw
                .routes
                .iter()
                .map(|r| {
                    let v = serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
                    (r.name.clone(), v)
                })
                .collect()
        };
        let (old, new) = (map(self), map(new));
        let added: Vec<&String> = new.keys().filter(|k| !old.contains_key(*k)).collect();
        let removed: Vec<&String> = old.keys().filter(|k| !new.contains_key(*k)).collect();
        let changed: Vec<&String> = new
            .iter()
            .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
            .map(|(k, _)| k)
            .collect();
        serde_json::json!({"added": added, "removed": removed, "changed": changed})
    }

    pub fn route(&self, name: &str) -> Option<&Arc<RouteConfig>> {
        self.routes.iter().find(|r| &*r.name == name)
    }

    /// The effective config as JSON with every secret masked.
    pub fn masked_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(&self.raw).unwrap_or(serde_json::Value::Null);
        if let Some(ups) = value.get_mut("upstreams").and_then(|u| u.as_object_mut()) {
            for up in ups.values_mut() {
                if let Some(headers) = up.get_mut("headers").and_then(|h| h.as_object_mut()) {
                    for v in headers.values_mut() {
                        // `{file}` and `{env}` name where the secret lives and stay visible;
                        // an inline value is the secret itself.
                        if v.is_string() {
                            *v = serde_json::Value::String("***".into());
                        }
                    }
                }
            }
        }
        for pointer in ["/dlq/amqp_url", "/audit/publish_url"] {
            match value.pointer_mut(pointer) {
                Some(serde_json::Value::String(s)) => *s = mask_url_password(s),
                Some(serde_json::Value::Array(urls)) => {
                    for url in urls {
                        if let serde_json::Value::String(s) = url {
                            *s = mask_url_password(s);
                        }
                    }
                }
                _ => {}
            }
        }
        value
    }
}

/// SHA-256 of the keys that are public because the repository ships them
/// (`config/audit.example.key`). Anyone holding them can recompute the digests in a decision
/// log, so they are fit for a local run only.
const EXAMPLE_HMAC_KEYS: &[&str] =
    &["e4bdc12b1a88e49a2c8d4f347f0148dc942bc0c9ac9d4b12041987e1e68f2d17"];

impl Config {
    /// True when the decision log is keyed with a key published in this repository.
    pub fn uses_example_key(&self) -> bool {
        self.audit.as_ref().is_some_and(|a| {
            let digest = hex::encode(Sha256::digest(&a.hmac_key));
            EXAMPLE_HMAC_KEYS.contains(&digest.as_str())
        })
    }

    /// Valid but unsafe settings, with their key paths: what `breakwater check` and the
    /// start-up log warn about.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let mut found = Vec::new();
        if self.uses_example_key() {
            found.push(ConfigError {
                path: "audit.hmac_key_file".into(),
                message: "this is the public example key shipped with breakwater: anyone can \
                          recompute the input digests of the decision log. Mount a key of your \
                          own (64 random hex characters: openssl rand -hex 32)"
                    .into(),
            });
        }
        let admin = self.server.admin_listen;
        if !admin.ip().is_loopback() && self.server.admin_token.is_none() {
            found.push(ConfigError {
                path: "server.admin_listen".into(),
                message: format!(
                    "the admin API listens on {admin}, beyond this host, and has no \
                     server.admin_token_file: anyone who can reach it can reload the config, \
                     open breakers, turn the AI off and replay the DLQ. Set a token, or \
                     listen on 127.0.0.1"
                ),
            });
        }
        found
    }
}

/// `amqp://user:secret@host/` -> `amqp://user:***@host/`.
pub fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    let creds = &rest[..at];
    match creds.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &creds[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// Parse TOML into the raw types, naming the key path of a type error or unknown key.
pub fn parse_raw(text: &str) -> Result<RawConfig, ConfigErrors> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigErrors {
        errors: vec![toml_error(&e, text)],
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = toml_error(e.inner(), text);
        ConfigErrors {
            errors: vec![ConfigError {
                path: if path.is_empty() || path == "." {
                    inner.path
                } else {
                    path
                },
                message: inner.message,
            }],
        }
    })
}

fn toml_error(e: &toml::de::Error, text: &str) -> ConfigError {
    // toml reports a byte span; turn it into a line number and keep its message, which
    // already names the offending key for unknown fields and type mismatches.
    let location = e
        .span()
        .map(|span| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}")
        })
        .unwrap_or_else(|| "file".to_string());
    ConfigError {
        path: location,
        message: e.message().trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_key_is_known_as_one() {
        let file = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/audit.example.key"
        ))
        .unwrap_or_default();
        let (key, _) = validate::parse_hmac_key(&file).unwrap_or_default();
        let digest = hex::encode(Sha256::digest(&key));
        assert!(EXAMPLE_HMAC_KEYS.contains(&digest.as_str()), "{digest}");
    }
}
