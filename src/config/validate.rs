//! raw -> runtime: checks every key, loads referenced files (TLS material, static bodies,
//! keys) and collects every problem with its key path instead of stopping at the first.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::raw::*;
use super::*;
use crate::access_log::{AccessLogConfig, Target};
use crate::audit::checkpoint::Signer;
use crate::audit::writer::CheckpointSettings;

const MIB: u64 = 1024 * 1024;
/// Loopback: the admin API is not reachable from the network unless the config says so.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Read-ahead of all responses together: 32 answers of 1 MiB, a bounded share of RSS.
const DEFAULT_RESPONSE_BUFFER_BYTES: u64 = 32 * MIB;

struct Errors(Vec<ConfigError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Records an error unless `ok`; returns `ok` so checks read as guards.
    fn check(&mut self, ok: bool, path: impl Into<String>, message: impl Into<String>) -> bool {
        if !ok {
            self.add(path, message);
        }
        ok
    }
}

fn ms(v: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(v.unwrap_or(default))
}

fn positive_ms(e: &mut Errors, v: Option<u64>, default: u64, path: &str) -> Duration {
    let d = v.unwrap_or(default);
    e.check(d > 0, path, "must be greater than 0");
    Duration::from_millis(d)
}

fn ratio(e: &mut Errors, v: Option<f64>, path: &str, allow_zero: bool) {
    if let Some(r) = v {
        let ok = r.is_finite() && r <= 1.0 && if allow_zero { r >= 0.0 } else { r > 0.0 };
        e.check(
            ok,
            path,
            if allow_zero {
                "must be between 0 and 1"
            } else {
                "must be greater than 0 and at most 1"
            },
        );
    }
}

fn read_file(e: &mut Errors, file: &str, path: &str) -> Option<Vec<u8>> {
    match std::fs::read(file) {
        Ok(bytes) => Some(bytes),
        Err(err) => {
            e.add(path, format!("cannot read {file}: {err}"));
            None
        }
    }
}

pub(super) fn validate(raw: RawConfig, hash: String) -> Result<Config, ConfigErrors> {
    let mut e = Errors(Vec::new());

    let server = validate_server(&mut e, &raw.server);

    let mut upstreams = BTreeMap::new();
    for (name, up) in &raw.upstreams {
        if let Some(u) = validate_upstream(&mut e, name, up) {
            upstreams.insert(name.clone(), Arc::new(u));
        }
    }
    let upstream_names: HashSet<&str> = raw.upstreams.keys().map(String::as_str).collect();

    let mut routes = Vec::new();
    let mut names = HashSet::new();
    let mut matchers = HashSet::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let p = format!("routes[{i}]");
        if !names.insert(r.name.clone()) {
            e.add(
                format!("{p}.name"),
                format!("duplicate route name {:?}", r.name),
            );
        }
        let key = (
            r.host.clone().map(|h| h.to_ascii_lowercase()),
            r.path_prefix.clone(),
            r.methods.clone().map(|mut m| {
                m.sort();
                m
            }),
        );
        if !matchers.insert(key) {
            e.add(
                format!("{p}.path_prefix"),
                format!(
                    "another route already matches the same host, path_prefix {:?} and methods",
                    r.path_prefix
                ),
            );
        }
        if let Some(route) = validate_route(&mut e, &p, r, &upstream_names) {
            routes.push(Arc::new(route));
        }
    }
    if raw.routes.is_empty() {
        e.add("routes", "at least one [[routes]] entry is required");
    }

    let audit = raw
        .audit
        .as_ref()
        .filter(|a| a.enabled.unwrap_or(true))
        .and_then(|a| validate_audit(&mut e, a));
    // Replayable routes need a DLQ; without a [dlq] section the embedded default (a local
    // spool in var/spool, RabbitMQ only if BREAKWATER_AMQP_URL is set) is used.
    let any_replayable = raw.routes.iter().any(|r| r.replayable.unwrap_or(false));
    let access_log = raw
        .access_log
        .as_ref()
        .filter(|a| a.enabled.unwrap_or(true))
        .map(|a| validate_access_log(&mut e, a));
    let tracing = raw
        .tracing
        .as_ref()
        .filter(|t| t.enabled.unwrap_or(true))
        .map(|t| validate_tracing(&mut e, t));
    let dlq = match &raw.dlq {
        Some(d) => Some(validate_dlq(&mut e, d)),
        None if any_replayable => Some(validate_dlq(&mut e, &RawDlq::default())),
        None => None,
    };

    if !e.0.is_empty() {
        return Err(ConfigErrors { errors: e.0 });
    }
    Ok(Config {
        server: server.unwrap_or_else(unreachable_server),
        upstreams,
        routes,
        audit,
        dlq,
        access_log,
        tracing,
        hash,
        raw,
    })
}

// Only reached when validation reported no error, in which case the server config exists;
// a harmless default keeps the code free of panics should that invariant ever break.
/// Envoy's default (60 KiB) rounded up: room for large cookies and JWTs, far below what
/// hyper alone would buffer per connection (400 KiB).
const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;
const MAX_MAX_HEADER_BYTES: usize = 1024 * 1024;

fn unreachable_server() -> ServerConfig {
    ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        admin_listen: ([127, 0, 0, 1], 0).into(),
        max_body_bytes: MIB,
        max_response_buffer_bytes: 4 * MIB,
        response_buffer_bytes: DEFAULT_RESPONSE_BUFFER_BYTES,
        response_write_timeout: Duration::from_secs(30),
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        body_read_timeout: Duration::from_secs(10),
        max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        max_connections: 4096,
        admin_max_connections: 64,
        shutdown_grace: Duration::from_secs(15),
        readiness: ReadinessMode::Traffic,
        admin_token: None,
        watch_config: true,
        instance: "breakwater".into(),
        tls: None,
    }
}

fn validate_server(e: &mut Errors, s: &RawServer) -> Option<ServerConfig> {
    let listen = s
        .listen
        .parse()
        .map_err(|err| {
            e.add(
                "server.listen",
                format!("not a socket address ({err}): {:?}", s.listen),
            )
        })
        .ok();
    let admin_listen_text = s.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
    let admin_listen = admin_listen_text
        .parse()
        .map_err(|err| {
            e.add(
                "server.admin_listen",
                format!("not a socket address ({err}): {admin_listen_text:?}"),
            )
        })
        .ok();
    let max_body_bytes = s.max_body_bytes.unwrap_or(MIB);
    e.check(
        max_body_bytes > 0,
        "server.max_body_bytes",
        "must be greater than 0",
    );
    // A failed replayable request is kept whole in one spool record.
    e.check(
        max_body_bytes <= crate::dlq::envelope::MAX_SPOOLED_BODY,
        "server.max_body_bytes",
        format!(
            "must be at most {} (the largest body a DLQ spool record holds)",
            crate::dlq::envelope::MAX_SPOOLED_BODY
        ),
    );
    let max_response_buffer_bytes = s.max_response_buffer_bytes.unwrap_or(4 * MIB);
    let response_buffer_bytes = s
        .response_buffer_bytes
        .unwrap_or(DEFAULT_RESPONSE_BUFFER_BYTES);
    let response_write_timeout = positive_ms(
        e,
        s.response_write_timeout_ms,
        30_000,
        "server.response_write_timeout_ms",
    );
    let header_read_timeout = positive_ms(
        e,
        s.header_read_timeout_ms,
        10_000,
        "server.header_read_timeout_ms",
    );
    let idle_timeout = positive_ms(e, s.idle_timeout_ms, 60_000, "server.idle_timeout_ms");
    let body_read_timeout = positive_ms(
        e,
        s.body_read_timeout_ms,
        10_000,
        "server.body_read_timeout_ms",
    );
    let max_header_bytes = s.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
    e.check(
        (MIN_MAX_HEADER_BYTES..=MAX_MAX_HEADER_BYTES).contains(&max_header_bytes),
        "server.max_header_bytes",
        format!("must be between {MIN_MAX_HEADER_BYTES} and {MAX_MAX_HEADER_BYTES}"),
    );
    let max_connections = s.max_connections.unwrap_or(4096);
    e.check(
        max_connections >= 1,
        "server.max_connections",
        "must be at least 1",
    );
    let admin_max_connections = s.admin_max_connections.unwrap_or(64);
    e.check(
        admin_max_connections >= 1,
        "server.admin_max_connections",
        "must be at least 1",
    );
    let shutdown_grace = ms(s.shutdown_grace_ms, 15_000);
    let readiness = match s.readiness.as_deref().unwrap_or("traffic") {
        "traffic" => ReadinessMode::Traffic,
        "strict" => ReadinessMode::Strict,
        other => {
            e.add(
                "server.readiness",
                format!("expected \"traffic\" or \"strict\", got {other:?}"),
            );
            ReadinessMode::Traffic
        }
    };
    let admin_token = s.admin_token_file.as_ref().and_then(|f| {
        let bytes = read_file(e, f, "server.admin_token_file")?;
        let token = String::from_utf8_lossy(&bytes).trim().to_string();
        e.check(
            token.len() >= 16,
            "server.admin_token_file",
            "token must be at least 16 characters",
        )
        .then_some(AdminToken(token))
    });
    let tls = s.tls.as_ref().and_then(|t| {
        server_tls_config(Path::new(&t.cert_file), Path::new(&t.key_file))
            .map_err(|err| e.add("server.tls", err))
            .ok()
    });
    let instance = s.instance.clone().unwrap_or_else(default_instance);
    Some(ServerConfig {
        listen: listen?,
        admin_listen: admin_listen?,
        max_body_bytes,
        max_response_buffer_bytes,
        response_buffer_bytes,
        response_write_timeout,
        header_read_timeout,
        idle_timeout,
        body_read_timeout,
        max_header_bytes,
        max_connections,
        admin_max_connections,
        shutdown_grace,
        readiness,
        admin_token,
        watch_config: s.watch_config.unwrap_or(true),
        instance,
        tls,
    })
}

fn default_instance() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "breakwater".to_string())
}

fn validate_upstream(e: &mut Errors, name: &str, u: &RawUpstream) -> Option<UpstreamConfig> {
    let p = format!("upstreams.{name}");
    e.check(
        valid_name(name),
        &p,
        "name may use only a-z, A-Z, 0-9, '-' and '_'",
    );
    let uri = match http::Uri::from_str(&u.url) {
        Ok(uri) => uri,
        Err(err) => {
            e.add(
                format!("{p}.url"),
                format!("not a URL ({err}): {:?}", u.url),
            );
            return None;
        }
    };
    let scheme = uri.scheme().cloned();
    let ok_scheme = matches!(
        scheme.as_ref().map(|s| s.as_str()),
        Some("http") | Some("https")
    );
    e.check(
        ok_scheme,
        format!("{p}.url"),
        "scheme must be http or https",
    );
    let authority = uri.authority().cloned();
    e.check(
        authority.is_some(),
        format!("{p}.url"),
        "must include a host",
    );
    e.check(
        uri.query().is_none(),
        format!("{p}.url"),
        "must not have a query string",
    );
    let base_path = uri.path().trim_end_matches('/').to_string();
    let is_https = scheme.as_ref().map(|s| s.as_str()) == Some("https");

    let has_tls_files =
        u.ca_file.is_some() || u.client_cert_file.is_some() || u.client_key_file.is_some();
    if has_tls_files && !is_https {
        e.add(
            format!("{p}.url"),
            "ca_file / client_cert_file / client_key_file need an https:// url",
        );
    }
    if u.client_cert_file.is_some() != u.client_key_file.is_some() {
        e.add(
            format!("{p}.client_cert_file"),
            "client_cert_file and client_key_file go together (mTLS)",
        );
    }
    let tls = if is_https {
        let client_auth = u
            .client_cert_file
            .as_deref()
            .zip(u.client_key_file.as_deref());
        client_tls_config(
            u.ca_file.as_deref().map(Path::new),
            client_auth.map(|(c, k)| (Path::new(c), Path::new(k))),
        )
        .map_err(|err| e.add(format!("{p}.tls"), err))
        .ok()
    } else {
        None
    };

    let concurrency = match u.max_concurrency {
        Some(max) => {
            e.check(
                max > 0,
                format!("{p}.max_concurrency"),
                "must be greater than 0",
            );
            let min = u.min_concurrency.unwrap_or(1);
            e.check(
                min >= 1 && min <= max,
                format!("{p}.min_concurrency"),
                "must be between 1 and max_concurrency",
            );
            Some(ConcurrencyConfig {
                max,
                min,
                adaptive: u.adaptive_concurrency.unwrap_or(false),
            })
        }
        None => {
            e.check(
                u.adaptive_concurrency.is_none() && u.min_concurrency.is_none(),
                format!("{p}.max_concurrency"),
                "adaptive_concurrency and min_concurrency need max_concurrency",
            );
            None
        }
    };

    let mut headers = Vec::new();
    for (k, v) in &u.headers {
        let path = format!("{p}.headers.{k}");
        let Some(text) = header_text(e, v, &path) else {
            continue;
        };
        match (
            http::HeaderName::from_str(k),
            http::HeaderValue::from_str(&text),
        ) {
            (Ok(n), Ok(mut v)) => {
                v.set_sensitive(true);
                headers.push((n, v))
            }
            _ => e.add(path, "not a valid HTTP header name and value"),
        }
    }
    let connect_timeout = positive_ms(
        e,
        u.connect_timeout_ms,
        250,
        &format!("{p}.connect_timeout_ms"),
    );
    // A credential rotated in its file or variable must reach the pool's requests too; the
    // fingerprint keeps only a digest of the values.
    let secrets = hex::encode(Sha256::digest(
        headers
            .iter()
            .flat_map(|(_, v)| [v.as_bytes(), b"\n"])
            .flatten()
            .copied()
            .collect::<Vec<u8>>(),
    ));
    let fingerprint = serde_json::to_string(&(
        u,
        file_stamp(&u.ca_file),
        file_stamp(&u.client_cert_file),
        secrets,
    ))
    .unwrap_or_default();
    Some(UpstreamConfig {
        name: name.to_string(),
        scheme: scheme?,
        authority: authority?,
        base_path,
        connect_timeout,
        http2_prior_knowledge: u.http2.unwrap_or(false) && !is_https,
        pool_idle_timeout: ms(u.pool_idle_timeout_ms, 90_000),
        pool_max_idle_per_host: u.pool_max_idle_per_host.unwrap_or(256),
        tls,
        concurrency,
        headers,
        fingerprint,
    })
}

/// The text of an upstream header value: inline, from a file or from the environment.
fn header_text(e: &mut Errors, v: &RawHeaderValue, path: &str) -> Option<String> {
    match v {
        RawHeaderValue::Plain(text) => Some(text.clone()),
        RawHeaderValue::File { file } => {
            let bytes = read_file(e, file, path)?;
            match String::from_utf8(bytes) {
                // Secret files often end with a newline (`echo`, `kubectl create secret`).
                Ok(text) => Some(text.trim().to_string()),
                Err(_) => {
                    e.add(path, format!("{file} is not UTF-8 text"));
                    None
                }
            }
        }
        RawHeaderValue::Env { env } => match std::env::var(env) {
            Ok(text) if !text.is_empty() => Some(text),
            _ => {
                e.add(
                    path,
                    format!("environment variable {env} is not set (or empty)"),
                );
                None
            }
        },
    }
}

/// A cert rotated in place must rebuild the client even when the config text is unchanged.
fn file_stamp(file: &Option<String>) -> Option<(u64, Option<std::time::SystemTime>)> {
    let meta = std::fs::metadata(file.as_ref()?).ok()?;
    Some((meta.len(), meta.modified().ok()))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn validate_route(
    e: &mut Errors,
    p: &str,
    r: &RawRoute,
    upstreams: &HashSet<&str>,
) -> Option<RouteConfig> {
    let before = e.0.len();
    e.check(
        valid_name(&r.name),
        format!("{p}.name"),
        "must be 1-64 characters of a-z, A-Z, 0-9, '-' and '_' (it becomes a metric label and a queue name)",
    );
    e.check(
        r.path_prefix.starts_with('/'),
        format!("{p}.path_prefix"),
        "must start with '/'",
    );
    e.check(
        upstreams.contains(r.upstream.as_str()),
        format!("{p}.upstream"),
        format!("no [upstreams.{}] defined", r.upstream),
    );
    let methods = r.methods.as_ref().map(|ms| {
        ms.iter()
            .enumerate()
            .filter_map(|(j, m)| {
                http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| {
                        e.add(
                            format!("{p}.methods[{j}]"),
                            format!("not an HTTP method: {m:?}"),
                        )
                    })
                    .ok()
            })
            .collect::<Vec<_>>()
    });
    let timeout = positive_ms(e, r.timeout_ms, 1000, &format!("{p}.timeout_ms"));
    let model_version_header = r.model_version_header.as_ref().and_then(|h| {
        http::HeaderName::from_str(h)
            .map_err(|_| {
                e.add(
                    format!("{p}.model_version_header"),
                    "not a valid header name",
                )
            })
            .ok()
    });
    if let Some(ptr) = &r.model_version_pointer {
        e.check(
            ptr.starts_with('/'),
            format!("{p}.model_version_pointer"),
            "a JSON pointer must start with '/' (RFC 6901), e.g. \"/model/version\"",
        );
    }

    let retry = r.retry.as_ref().map(|rt| {
        let rp = format!("{p}.retry");
        let max_attempts = rt.max_attempts.unwrap_or(2);
        e.check(
            (1..=10).contains(&max_attempts),
            format!("{rp}.max_attempts"),
            "must be between 1 and 10 (attempts include the first try)",
        );
        let backoff_base = ms(rt.backoff_base_ms, 25);
        let backoff_max = ms(rt.backoff_max_ms, 250);
        e.check(
            backoff_base <= backoff_max,
            format!("{rp}.backoff_base_ms"),
            "must not exceed backoff_max_ms",
        );
        ratio(e, rt.budget_ratio, &format!("{rp}.budget_ratio"), true);
        let attempt_timeout = rt.attempt_timeout_ms.map(Duration::from_millis);
        if let Some(t) = attempt_timeout {
            e.check(
                !t.is_zero() && t <= timeout,
                format!("{rp}.attempt_timeout_ms"),
                "must be greater than 0 and at most the route's timeout_ms",
            );
        }
        RetryConfig {
            max_attempts,
            backoff_base,
            backoff_max,
            budget_ratio: rt.budget_ratio.unwrap_or(0.2),
            budget_min_per_s: rt.budget_min_per_s.unwrap_or(1),
            attempt_timeout,
        }
    });

    let breaker = r.breaker.as_ref().map(|b| {
        let bp = format!("{p}.breaker");
        ratio(e, b.failure_rate, &format!("{bp}.failure_rate"), false);
        ratio(e, b.slow_call_rate, &format!("{bp}.slow_call_rate"), false);
        e.check(
            b.slow_call_rate.is_none() || b.slow_call_ms.is_some(),
            format!("{bp}.slow_call_rate"),
            "needs slow_call_ms",
        );
        let window = positive_ms(e, b.window_ms, 10_000, &format!("{bp}.window_ms"));
        let open = positive_ms(e, b.open_ms, 5_000, &format!("{bp}.open_ms"));
        let open_max = ms(b.open_max_ms, 60_000.max(b.open_ms.unwrap_or(5_000)));
        e.check(
            open <= open_max,
            format!("{bp}.open_max_ms"),
            "must be at least open_ms",
        );
        let half_open_probes = b.half_open_probes.unwrap_or(3);
        e.check(
            half_open_probes >= 1,
            format!("{bp}.half_open_probes"),
            "must be at least 1",
        );
        BreakerConfig {
            consecutive_failures: b.consecutive_failures.unwrap_or(5),
            failure_rate: b.failure_rate.or(Some(0.5)),
            slow_call: b.slow_call_ms.map(Duration::from_millis),
            slow_call_rate: b.slow_call_rate.or(b.slow_call_ms.map(|_| 0.8)),
            window,
            minimum_requests: b.minimum_requests.unwrap_or(20),
            open,
            open_max,
            half_open_probes,
        }
    });

    let mut fallback = Vec::new();
    for (j, f) in r.fallback.iter().enumerate() {
        if let Some(fb) = validate_fallback(e, &format!("{p}.fallback[{j}]"), f, upstreams, r) {
            fallback.push(fb);
        }
    }

    let mut variants = Vec::new();
    let mut variant_names = HashSet::new();
    let mut total_weight = 0.0;
    for (j, v) in r.variants.iter().enumerate() {
        let vp = format!("{p}.variants[{j}]");
        e.check(
            valid_name(&v.name),
            format!("{vp}.name"),
            "must be 1-64 characters of a-z, A-Z, 0-9, '-' and '_'",
        );
        e.check(
            variant_names.insert(v.name.clone()),
            format!("{vp}.name"),
            format!("duplicate variant {:?}", v.name),
        );
        e.check(
            upstreams.contains(v.upstream.as_str()),
            format!("{vp}.upstream"),
            format!("no [upstreams.{}] defined", v.upstream),
        );
        e.check(
            v.weight.is_finite() && (0.0..=100.0).contains(&v.weight),
            format!("{vp}.weight"),
            "must be a percentage between 0 and 100",
        );
        total_weight += v.weight;
        let sticky_header = v.sticky_header.as_ref().and_then(|h| {
            http::HeaderName::from_str(h)
                .map_err(|_| e.add(format!("{vp}.sticky_header"), "not a valid header name"))
                .ok()
        });
        variants.push(VariantConfig {
            name: v.name.clone(),
            upstream: v.upstream.clone(),
            weight: v.weight,
            sticky_header,
        });
    }
    e.check(
        total_weight <= 100.0 + 1e-9,
        format!("{p}.variants"),
        format!("weights add up to {total_weight}, more than 100 percent"),
    );
    let canary = r.canary.as_ref().map(|c| {
        let cp = format!("{p}.canary");
        ratio(e, c.max_error_rate, &format!("{cp}.max_error_rate"), true);
        e.check(
            !variants.is_empty(),
            &cp,
            "needs at least one [[routes.variants]]",
        );
        CanaryConfig {
            auto_rollback: c.auto_rollback.unwrap_or(true),
            max_error_rate: c.max_error_rate.unwrap_or(0.05),
            max_p99: c.max_p99_ms.map(Duration::from_millis),
            min_requests: c.min_requests.unwrap_or(50),
            window: positive_ms(e, c.window_ms, 60_000, &format!("{cp}.window_ms")),
        }
    });

    let criticality = match r.criticality.as_deref() {
        None | Some("medium") => Criticality::Medium,
        Some("high") => Criticality::High,
        Some("low") => Criticality::Low,
        Some(other) => {
            e.add(
                format!("{p}.criticality"),
                format!("must be high, medium or low, not {other:?}"),
            );
            Criticality::Medium
        }
    };
    let rto = r.rto_s.map(Duration::from_secs);
    e.check(
        rto.is_none_or(|d| !d.is_zero()),
        format!("{p}.rto_s"),
        "must be greater than 0",
    );
    let approval = validate_approval(e, p, r, model_version_header.is_some());
    let response_schema = r
        .response_schema
        .as_ref()
        .and_then(|file| compile_schema(e, file, &format!("{p}.response_schema")));
    let shadow = r
        .shadow
        .as_ref()
        .map(|s| validate_shadow(e, &format!("{p}.shadow"), s, upstreams, timeout));

    if e.0.len() != before {
        return None;
    }
    Some(RouteConfig {
        name: Arc::from(r.name.as_str()),
        path_prefix: r.path_prefix.clone(),
        host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
        methods,
        upstream: r.upstream.clone(),
        timeout,
        ai_enabled: r.ai_enabled.unwrap_or(true),
        model_version_header,
        model_version_pointer: r.model_version_pointer.clone(),
        replayable: r.replayable.unwrap_or(false),
        retry,
        breaker,
        fallback,
        variants,
        canary,
        criticality,
        rto,
        approval: approval.map(Arc::new),
        response_schema: response_schema.map(Arc::new),
        shadow: shadow.map(Arc::new),
    })
}

/// `shadow = { upstream, percent, compare_pointer, max_in_flight, timeout_ms }`.
fn validate_shadow(
    e: &mut Errors,
    p: &str,
    s: &super::raw::RawShadow,
    upstreams: &HashSet<&str>,
    route_timeout: Duration,
) -> ShadowConfig {
    e.check(
        upstreams.contains(s.upstream.as_str()),
        format!("{p}.upstream"),
        format!("no [upstreams.{}] defined", s.upstream),
    );
    e.check(
        s.percent.is_finite() && (0.0..=100.0).contains(&s.percent),
        format!("{p}.percent"),
        "must be a percentage between 0 and 100",
    );
    if let Some(ptr) = &s.compare_pointer {
        e.check(
            ptr.is_empty() || ptr.starts_with('/'),
            format!("{p}.compare_pointer"),
            "a JSON pointer must start with '/' (RFC 6901), e.g. \"/items\"; \"\" compares the whole answer",
        );
    }
    let max_in_flight = s.max_in_flight.unwrap_or(32);
    e.check(
        (1..=10_000).contains(&max_in_flight),
        format!("{p}.max_in_flight"),
        "must be between 1 and 10000",
    );
    let timeout = s.timeout_ms.map_or(route_timeout, Duration::from_millis);
    e.check(
        !timeout.is_zero(),
        format!("{p}.timeout_ms"),
        "must be greater than 0",
    );
    ShadowConfig {
        upstream: s.upstream.clone(),
        percent: s.percent,
        compare_pointer: s.compare_pointer.clone().filter(|p| !p.is_empty()),
        max_in_flight,
        timeout,
    }
}

/// `approved_versions`, `on_unapproved` and `model_digest_header`.
fn validate_approval(
    e: &mut Errors,
    p: &str,
    r: &RawRoute,
    has_version_header: bool,
) -> Option<Approval> {
    let Some(list) = &r.approved_versions else {
        for (key, set) in [
            ("on_unapproved", r.on_unapproved.is_some()),
            ("model_digest_header", r.model_digest_header.is_some()),
            ("model_digest_pointer", r.model_digest_pointer.is_some()),
        ] {
            e.check(
                !set,
                format!("{p}.{key}"),
                "only means something with approved_versions",
            );
        }
        return None;
    };
    e.check(
        !list.is_empty(),
        format!("{p}.approved_versions"),
        "must list at least one version (remove the key to approve every version)",
    );
    e.check(
        has_version_header || r.model_version_pointer.is_some(),
        format!("{p}.approved_versions"),
        "needs model_version_header or model_version_pointer: how else is the version known",
    );
    let mut versions = std::collections::HashMap::new();
    for (j, entry) in list.iter().enumerate() {
        let (version, digest) = match entry {
            RawApproved::Version(v) => (v.clone(), None),
            RawApproved::Pinned(pin) => {
                e.check(
                    !pin.digest.is_empty(),
                    format!("{p}.approved_versions[{j}].digest"),
                    "must not be empty",
                );
                (pin.version.clone(), Some(pin.digest.clone()))
            }
        };
        e.check(
            !version.is_empty(),
            format!("{p}.approved_versions[{j}]"),
            "a version must not be empty",
        );
        if versions.insert(version.clone(), digest).is_some() {
            e.add(
                format!("{p}.approved_versions[{j}]"),
                format!("{version:?} is listed twice"),
            );
        }
    }
    let on_unapproved = match r.on_unapproved.as_deref() {
        None | Some("fallback") => OnUnapproved::Fallback,
        Some("flag") => OnUnapproved::Flag,
        Some(other) => {
            e.add(
                format!("{p}.on_unapproved"),
                format!("must be fallback or flag, not {other:?}"),
            );
            OnUnapproved::Fallback
        }
    };
    let digest_header = match &r.model_digest_header {
        None => http::HeaderName::from_static("x-model-digest"),
        Some(h) => match http::HeaderName::from_str(h) {
            Ok(h) => h,
            Err(_) => {
                e.add(
                    format!("{p}.model_digest_header"),
                    "not a valid header name",
                );
                http::HeaderName::from_static("x-model-digest")
            }
        },
    };
    if let Some(ptr) = &r.model_digest_pointer {
        e.check(
            ptr.starts_with('/'),
            format!("{p}.model_digest_pointer"),
            "a JSON pointer must start with '/' (RFC 6901), e.g. \"/model/digest\"",
        );
    }
    Some(Approval {
        versions,
        on_unapproved,
        digest_header,
        digest_pointer: r.model_digest_pointer.clone(),
    })
}

/// Reads and compiles a JSON Schema file. References are resolved only inside the file:
/// breakwater never fetches a schema from the network or elsewhere on disk.
fn compile_schema(e: &mut Errors, file: &str, path: &str) -> Option<ResponseSchema> {
    let bytes = read_file(e, file, path)?;
    let schema: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(err) => {
            e.add(path, format!("{file} is not JSON: {err}"));
            return None;
        }
    };
    match jsonschema::options_for::<crate::json_tape::Tape>().build(&schema) {
        Ok(validator) => Some(ResponseSchema {
            file: file.to_string(),
            validator,
        }),
        Err(err) => {
            e.add(path, format!("{file} is not a valid JSON Schema: {err}"));
            None
        }
    }
}

/// The headers a cached answer varies on: as configured, or by default the credentials
/// (so one user's answer never reaches another) and the variants' sticky headers (the
/// same key picks the same variant, and so the same answer). An invalid sticky header is
/// reported where the variant is validated.
fn cache_vary_headers(
    e: &mut Errors,
    p: &str,
    f: &RawFallback,
    route: &RawRoute,
) -> Vec<http::HeaderName> {
    let mut out: Vec<http::HeaderName> = Vec::new();
    let mut add = |h: http::HeaderName| {
        if !out.contains(&h) {
            out.push(h);
        }
    };
    match &f.vary_headers {
        Some(list) => {
            for (i, h) in list.iter().enumerate() {
                match http::HeaderName::from_str(h) {
                    Ok(h) => add(h),
                    Err(_) => e.add(format!("{p}.vary_headers[{i}]"), "not a valid header name"),
                }
            }
        }
        None => {
            add(http::header::AUTHORIZATION);
            add(http::header::COOKIE);
            for v in &route.variants {
                if let Some(h) = v
                    .sticky_header
                    .as_deref()
                    .and_then(|h| http::HeaderName::from_str(h).ok())
                {
                    add(h);
                }
            }
        }
    }
    out
}

fn validate_fallback(
    e: &mut Errors,
    p: &str,
    f: &RawFallback,
    upstreams: &HashSet<&str>,
    route: &RawRoute,
) -> Option<FallbackConfig> {
    // Keys that belong to another kind are a mistake worth reporting, not ignoring.
    let stray = |present: &[(&str, bool)], e: &mut Errors| {
        for (key, set) in present {
            if *set {
                e.add(
                    format!("{p}.{key}"),
                    format!("not a key of a {:?} fallback", f.kind),
                );
            }
        }
    };
    match f.kind.as_str() {
        "cache" => {
            stray(
                &[
                    ("upstream", f.upstream.is_some()),
                    ("timeout_ms", f.timeout_ms.is_some()),
                    ("status", f.status.is_some()),
                    ("body", f.body.is_some()),
                    ("body_file", f.body_file.is_some()),
                    ("content_type", f.content_type.is_some()),
                ],
                e,
            );
            let ttl_s = f.ttl_s.unwrap_or(600);
            e.check(ttl_s > 0, format!("{p}.ttl_s"), "must be greater than 0");
            Some(FallbackConfig::Cache {
                ttl: Duration::from_secs(ttl_s),
                max_entries: f.max_entries.unwrap_or(10_000),
                max_bytes: f.max_bytes.unwrap_or(64 * MIB),
                vary_headers: cache_vary_headers(e, p, f, route),
            })
        }
        "upstream" => {
            stray(
                &[
                    ("ttl_s", f.ttl_s.is_some()),
                    ("max_entries", f.max_entries.is_some()),
                    ("max_bytes", f.max_bytes.is_some()),
                    ("vary_headers", f.vary_headers.is_some()),
                    ("status", f.status.is_some()),
                    ("body", f.body.is_some()),
                    ("body_file", f.body_file.is_some()),
                    ("content_type", f.content_type.is_some()),
                ],
                e,
            );
            let Some(up) = &f.upstream else {
                e.add(
                    format!("{p}.upstream"),
                    "an upstream fallback needs `upstream`",
                );
                return None;
            };
            e.check(
                upstreams.contains(up.as_str()),
                format!("{p}.upstream"),
                format!("no [upstreams.{up}] defined"),
            );
            Some(FallbackConfig::Upstream {
                upstream: up.clone(),
                timeout: positive_ms(e, f.timeout_ms, 500, &format!("{p}.timeout_ms")),
            })
        }
        "static" => {
            stray(
                &[
                    ("ttl_s", f.ttl_s.is_some()),
                    ("max_entries", f.max_entries.is_some()),
                    ("max_bytes", f.max_bytes.is_some()),
                    ("vary_headers", f.vary_headers.is_some()),
                    ("upstream", f.upstream.is_some()),
                    ("timeout_ms", f.timeout_ms.is_some()),
                ],
                e,
            );
            let status = match http::StatusCode::from_u16(f.status.unwrap_or(200)) {
                Ok(s) => s,
                Err(_) => {
                    e.add(format!("{p}.status"), "not an HTTP status code");
                    return None;
                }
            };
            let body = match (&f.body, &f.body_file) {
                (Some(b), None) => Bytes::from(b.clone()),
                (None, Some(file)) => Bytes::from(read_file(e, file, &format!("{p}.body_file"))?),
                (None, None) => {
                    e.add(
                        p.to_string(),
                        "a static fallback needs `body` or `body_file`",
                    );
                    return None;
                }
                (Some(_), Some(_)) => {
                    e.add(p.to_string(), "give either `body` or `body_file`, not both");
                    return None;
                }
            };
            let content_type = http::HeaderValue::from_str(
                f.content_type.as_deref().unwrap_or("application/json"),
            )
            .map_err(|_| e.add(format!("{p}.content_type"), "not a valid header value"))
            .ok()?;
            Some(FallbackConfig::Static {
                status,
                body,
                content_type,
            })
        }
        other => {
            e.add(
                format!("{p}.kind"),
                format!("unknown fallback kind {other:?}: expected cache, upstream or static"),
            );
            None
        }
    }
}

fn validate_tracing(e: &mut Errors, t: &RawTracing) -> crate::otel::TracingConfig {
    let endpoint = t
        .otlp_endpoint
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:4318/v1/traces".to_string());
    match endpoint.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
        _ => e.add(
            "tracing.otlp_endpoint",
            format!("expected an http:// or https:// URL (the OTLP/HTTP traces endpoint, e.g. http://otel-collector:4318/v1/traces), got {endpoint:?}"),
        ),
    }
    let sampling_ratio = t.sampling_ratio.unwrap_or(0.01);
    e.check(
        (0.0..=1.0).contains(&sampling_ratio),
        "tracing.sampling_ratio",
        "must be between 0 and 1",
    );
    let service_name = t
        .service_name
        .clone()
        .unwrap_or_else(|| "breakwater".to_string());
    e.check(
        !service_name.trim().is_empty(),
        "tracing.service_name",
        "must not be empty",
    );
    let export_timeout_ms = t.export_timeout_ms.unwrap_or(10_000);
    e.check(
        (1..=300_000).contains(&export_timeout_ms),
        "tracing.export_timeout_ms",
        "must be between 1 and 300000",
    );
    let export_interval_ms = t.export_interval_ms.unwrap_or(5_000);
    e.check(
        (1..=300_000).contains(&export_interval_ms),
        "tracing.export_interval_ms",
        "must be between 1 and 300000",
    );
    let max_queue = t.max_queue.unwrap_or(2048);
    e.check(
        (1..=1_048_576).contains(&max_queue),
        "tracing.max_queue",
        "must be between 1 and 1048576",
    );
    crate::otel::TracingConfig {
        endpoint,
        sampling_ratio,
        service_name,
        export_timeout: Duration::from_millis(export_timeout_ms),
        export_interval: Duration::from_millis(export_interval_ms),
        max_queue,
    }
}

fn validate_access_log(e: &mut Errors, a: &RawAccessLog) -> AccessLogConfig {
    let target = match a.path.as_deref().map(str::trim) {
        None | Some("stderr") | Some("-") => Target::Stderr,
        Some("") => {
            e.add("access_log.path", "must be \"stderr\" or a file path");
            Target::Stderr
        }
        Some(path) => Target::File(PathBuf::from(path)),
    };
    let buffer = a.buffer.unwrap_or(65_536);
    e.check(
        (1..=16 * 1024 * 1024).contains(&buffer),
        "access_log.buffer",
        "must be between 1 and 16777216 lines",
    );
    AccessLogConfig { target, buffer }
}

fn validate_audit(e: &mut Errors, a: &RawAudit) -> Option<AuditConfig> {
    let on_full_drop = match a.on_full.as_deref().unwrap_or("block") {
        "block" => false,
        "drop" => true,
        other => {
            e.add(
                "audit.on_full",
                format!("expected \"block\" or \"drop\", got {other:?}"),
            );
            false
        }
    };
    let rotate_bytes = a.rotate_bytes.unwrap_or(100 * MIB);
    e.check(
        rotate_bytes >= 4096,
        "audit.rotate_bytes",
        "must be at least 4096",
    );
    let retention_days = a.retention_days.unwrap_or(183);
    e.check(
        retention_days >= 1,
        "audit.retention_days",
        "must be at least 1",
    );
    let channel_capacity = a.channel_capacity.unwrap_or(65_536);
    e.check(
        channel_capacity >= 1,
        "audit.channel_capacity",
        "must be at least 1",
    );
    let key = read_file(e, &a.hmac_key_file, "audit.hmac_key_file")?;
    let (hmac_key, key_id) = parse_hmac_key(&key)
        .map_err(|m| e.add("audit.hmac_key_file", m))
        .ok()?;
    Some(AuditConfig {
        path: PathBuf::from(&a.path),
        hmac_key,
        key_id,
        redact_headers: a
            .redact_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        rotate_bytes,
        retention_days,
        on_full_drop,
        block_timeout: positive_ms(e, a.block_timeout_ms, 1000, "audit.block_timeout_ms"),
        channel_capacity,
        fsync_interval: positive_ms(e, a.fsync_interval_ms, 10, "audit.fsync_interval_ms"),
        fsync_max_records: a.fsync_max_records.unwrap_or(256).max(1),
        publish: validate_audit_publish(e, a),
        checkpoint: validate_checkpoint(e, a),
    })
}

/// Checkpoints every `checkpoint_interval_ms` (60 s by default) once a key is set.
fn validate_checkpoint(e: &mut Errors, a: &RawAudit) -> Option<CheckpointSettings> {
    let Some(file) = &a.signing_key_file else {
        e.check(
            a.checkpoint_interval_ms.is_none(),
            "audit.checkpoint_interval_ms",
            "needs audit.signing_key_file",
        );
        return None;
    };
    let interval = positive_ms(
        e,
        a.checkpoint_interval_ms,
        60_000,
        "audit.checkpoint_interval_ms",
    );
    let bytes = read_file(e, file, "audit.signing_key_file")?;
    let signer = Signer::from_file_bytes(&bytes)
        .map_err(|m| e.add("audit.signing_key_file", m))
        .ok()?;
    Some(CheckpointSettings {
        signer: Arc::new(signer),
        interval,
    })
}

fn validate_audit_publish(e: &mut Errors, a: &RawAudit) -> Option<AuditPublishConfig> {
    let url = a
        .publish_url
        .as_ref()
        .and_then(|u| amqp_endpoints(e, "audit.publish_url", u, ""));
    let configured = a
        .publish_url
        .as_ref()
        .is_some_and(|u| *u != UrlList::One(String::new()));
    if !configured && (a.publish_exchange.is_some() || a.publish_buffer.is_some()) {
        e.add(
            "audit.publish_url",
            "publish_exchange and publish_buffer need publish_url",
        );
    }
    let url = url?;
    let exchange = a
        .publish_exchange
        .clone()
        .unwrap_or_else(|| "breakwater.audit".into());
    e.check(
        !exchange.is_empty(),
        "audit.publish_exchange",
        "must not be empty",
    );
    let buffer = a.publish_buffer.unwrap_or(65_536);
    e.check(buffer >= 1, "audit.publish_buffer", "must be at least 1");
    Some(AuditPublishConfig {
        url,
        exchange,
        buffer,
    })
}

/// Key file: the key as hex (at least 32 bytes once decoded) on one line, optionally
/// preceded by `key_id:`. The key id defaults to the first 16 hex chars of SHA-256(key).
pub(crate) fn parse_hmac_key(file: &[u8]) -> Result<(Vec<u8>, String), String> {
    let text = std::str::from_utf8(file).map_err(|_| "key file must be text (hex)".to_string())?;
    let text = text.trim();
    let (id, hex_key) = match text.split_once(':') {
        Some((id, k)) => (Some(id.trim().to_string()), k.trim()),
        None => (None, text),
    };
    let key = hex::decode(hex_key).map_err(|_| "key must be hex encoded".to_string())?;
    if key.len() < 32 {
        return Err(format!(
            "key is {} bytes; at least 32 are required",
            key.len()
        ));
    }
    let id = id.unwrap_or_else(|| hex::encode(&Sha256::digest(&key)[..8]));
    Ok((key, id))
}

/// One URL or a list of them, each checked with its index in the key path
/// (`dlq.amqp_url[1]`). An empty string is "not configured"; an empty list is an error.
fn amqp_endpoints(
    e: &mut Errors,
    key: &str,
    urls: &UrlList,
    origin: &str,
) -> Option<crate::amqp::Endpoints> {
    let (list, indexed): (Vec<String>, bool) = match urls {
        UrlList::One(u) if u.is_empty() => return None,
        UrlList::One(u) => (vec![u.clone()], false),
        UrlList::Many(v) => (v.clone(), true),
    };
    if !e.check(
        !list.is_empty(),
        key,
        format!("must name at least one node{origin}"),
    ) {
        return None;
    }
    let mut ok = true;
    let mut seen = HashSet::new();
    for (i, url) in list.iter().enumerate() {
        let path = if indexed {
            format!("{key}[{i}]")
        } else {
            key.to_string()
        };
        let scheme = url.starts_with("amqp://") || url.starts_with("amqps://");
        ok &= e.check(
            scheme,
            path.clone(),
            format!("must start with amqp:// or amqps://{origin}"),
        );
        ok &= e.check(
            !scheme || seen.insert(url.as_str()),
            path,
            format!("names the same node twice{origin}"),
        );
    }
    if ok {
        crate::amqp::Endpoints::new(list)
    } else {
        None
    }
}

fn validate_dlq(e: &mut Errors, d: &RawDlq) -> DlqConfig {
    let amqp_url = match &d.amqp_url {
        Some(urls) => amqp_endpoints(e, "dlq.amqp_url", urls, ""),
        // A comma-separated list in the environment names the nodes of a cluster.
        None => std::env::var("BREAKWATER_AMQP_URL")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .and_then(|v| {
                let urls: Vec<String> = v.split(',').map(|u| u.trim().to_string()).collect();
                let list = match urls.len() {
                    1 => UrlList::One(urls.into_iter().next().unwrap_or_default()),
                    _ => UrlList::Many(urls),
                };
                amqp_endpoints(e, "dlq.amqp_url", &list, " (from $BREAKWATER_AMQP_URL)")
            }),
    };
    let spool_max_bytes = d.spool_max_bytes.unwrap_or(1024 * MIB);
    e.check(
        spool_max_bytes >= MIB,
        "dlq.spool_max_bytes",
        "must be at least 1 MiB",
    );
    let max_replay_attempts = d.max_replay_attempts.unwrap_or(5);
    e.check(
        max_replay_attempts >= 1,
        "dlq.max_replay_attempts",
        "must be at least 1",
    );
    let delivery_limit = d.delivery_limit.unwrap_or(100);
    e.check(
        delivery_limit >= 1,
        "dlq.delivery_limit",
        "must be at least 1",
    );
    let replay_rate_per_s = d.replay_rate_per_s.unwrap_or(50);
    e.check(
        replay_rate_per_s >= 1,
        "dlq.replay_rate_per_s",
        "must be at least 1",
    );
    DlqConfig {
        amqp_url,
        exchange: d
            .exchange
            .clone()
            .unwrap_or_else(|| "breakwater.dlq".into()),
        spool_dir: PathBuf::from(d.spool_dir.clone().unwrap_or_else(|| "var/spool".into())),
        spool_max_bytes,
        segment_bytes: d.segment_bytes.unwrap_or(16 * MIB).max(4096),
        fsync_interval: positive_ms(e, d.fsync_interval_ms, 2, "dlq.fsync_interval_ms"),
        replay_rate_per_s,
        max_replay_attempts,
        delivery_limit,
        prefetch: d.prefetch.unwrap_or(16).max(1),
        confirm_timeout: positive_ms(e, d.confirm_timeout_ms, 5_000, "dlq.confirm_timeout_ms"),
        queued_wait: ms(d.queued_wait_ms, 20),
        results_exchange: d
            .results_exchange
            .clone()
            .unwrap_or_else(|| "breakwater.results".into()),
    }
}

#[cfg(test)]
mod vary_tests {
    use super::*;

    fn cache_vary(fallback: &str, variants: &str) -> Result<Vec<String>, ConfigErrors> {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstreams.ai]\nurl = \"http://127.0.0.1:1\"\n[upstreams.v2]\nurl = \"http://127.0.0.1:2\"\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"ai\"\n\
             [[routes.fallback]]\nkind = \"cache\"\n{fallback}\n{variants}"
        );
        let cfg = Config::from_toml(&text)?;
        Ok(cfg.routes[0]
            .fallback
            .iter()
            .find_map(|f| match f {
                FallbackConfig::Cache { vary_headers, .. } => {
                    Some(vary_headers.iter().map(|h| h.to_string()).collect())
                }
                _ => None,
            })
            .unwrap_or_default())
    }

    #[test]
    fn the_cache_varies_on_credentials_and_sticky_headers_unless_told_otherwise() {
        let sticky = "[[routes.variants]]\nname = \"v2\"\nupstream = \"v2\"\nweight = 5\nsticky_header = \"X-Student-Id\"\n";
        assert_eq!(cache_vary("", "").unwrap(), ["authorization", "cookie"]);
        assert_eq!(
            cache_vary("", sticky).unwrap(),
            ["authorization", "cookie", "x-student-id"]
        );
        assert_eq!(
            cache_vary("vary_headers = [\"X-Tenant\"]", sticky).unwrap(),
            ["x-tenant"]
        );
        assert!(cache_vary("vary_headers = []", "").unwrap().is_empty());
        let err = cache_vary("vary_headers = [\"bad header\"]", "").unwrap_err();
        assert!(
            err.to_string()
                .contains("routes[0].fallback[0].vary_headers[0]"),
            "{err}"
        );
    }

    #[test]
    fn slow_client_bounds_have_safe_defaults_and_a_zero_write_timeout_is_an_error() {
        let with = |keys: &str| {
            Config::from_toml(&format!(
                "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n{keys}\n\
                 [upstreams.a]\nurl=\"http://127.0.0.1:1\"\n\
                 [[routes]]\nname=\"r\"\npath_prefix=\"/\"\nupstream=\"a\"\n"
            ))
        };
        let cfg = with("").unwrap();
        assert_eq!(cfg.server.response_buffer_bytes, 32 * MIB);
        assert_eq!(cfg.server.response_write_timeout, Duration::from_secs(30));
        let cfg = with("response_buffer_bytes = 0\nresponse_write_timeout_ms = 250").unwrap();
        assert_eq!(cfg.server.response_buffer_bytes, 0);
        assert_eq!(
            cfg.server.response_write_timeout,
            Duration::from_millis(250)
        );
        let err = with("response_write_timeout_ms = 0").unwrap_err();
        assert!(
            err.to_string().contains("server.response_write_timeout_ms"),
            "{err}"
        );
    }

    #[test]
    fn shadow_settings_have_defaults_and_every_error_names_its_key() {
        let with = |shadow: &str| {
            Config::from_toml(&format!(
                "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n\
                 [upstreams.a]\nurl=\"http://127.0.0.1:1\"\n[upstreams.cand]\nurl=\"http://127.0.0.1:2\"\n\
                 [[routes]]\nname=\"r\"\npath_prefix=\"/\"\nupstream=\"a\"\ntimeout_ms=700\nshadow = {shadow}\n"
            ))
        };
        let cfg =
            with("{ upstream = \"cand\", percent = 12.5, compare_pointer = \"/items\" }").unwrap();
        let s = cfg.routes[0].shadow.as_deref().unwrap();
        assert_eq!(s.upstream, "cand");
        assert_eq!(s.percent, 12.5);
        assert_eq!(s.compare_pointer.as_deref(), Some("/items"));
        assert_eq!(s.max_in_flight, 32);
        assert_eq!(s.timeout, Duration::from_millis(700), "the route's timeout");
        let cfg =
            with("{ upstream = \"cand\", percent = 1, compare_pointer = \"\", timeout_ms = 50 }")
                .unwrap();
        let s = cfg.routes[0].shadow.as_deref().unwrap();
        assert_eq!(s.compare_pointer, None, "\"\" compares the whole answer");
        assert_eq!(s.timeout, Duration::from_millis(50));

        let err = with(
            "{ upstream = \"nope\", percent = 120, compare_pointer = \"items\", max_in_flight = 0, timeout_ms = 0 }",
        )
        .unwrap_err()
        .to_string();
        for key in [
            "upstream",
            "percent",
            "compare_pointer",
            "max_in_flight",
            "timeout_ms",
        ] {
            assert!(
                err.contains(&format!("routes[0].shadow.{key}")),
                "{key}: {err}"
            );
        }
        let err = with("{ upstream = \"cand\", percent = 5, mirror = true }").unwrap_err();
        assert!(
            err.to_string().contains("mirror"),
            "unknown keys are errors: {err}"
        );
    }
}
