//! Metric names (SPEC "Metrics") as consts, described once, and the Prometheus recorder.
//!
//! Labels stay low-cardinality: route and upstream names from config, never raw paths.
//! Model versions come from upstreams, so their label values are capped.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "breakwater_requests_total";
pub const REQUEST_DURATION: &str = "breakwater_request_duration_seconds";
pub const UPSTREAM_DURATION: &str = "breakwater_upstream_duration_seconds";
pub const OVERHEAD: &str = "breakwater_overhead_seconds";
pub const BREAKER_STATE: &str = "breakwater_breaker_state";
pub const BREAKER_TRANSITIONS: &str = "breakwater_breaker_transitions_total";
pub const FALLBACKS_TOTAL: &str = "breakwater_fallbacks_total";
pub const RETRIES_TOTAL: &str = "breakwater_retries_total";
pub const SHED_TOTAL: &str = "breakwater_shed_total";
pub const CONCURRENCY_LIMIT: &str = "breakwater_concurrency_limit";
pub const DLQ_MESSAGES: &str = "breakwater_dlq_messages_total";
pub const DLQ_SPOOL_BYTES: &str = "breakwater_dlq_spool_bytes";
pub const REPLAYS_TOTAL: &str = "breakwater_replays_total";
pub const AUDIT_RECORDS: &str = "breakwater_audit_records_total";
pub const AUDIT_WRITE_ERRORS: &str = "breakwater_audit_write_errors_total";
pub const AUDIT_DROPPED: &str = "breakwater_audit_dropped_total";
pub const AUDIT_PUBLISHED: &str = "breakwater_audit_published_total";
pub const AUDIT_PUBLISH_DROPPED: &str = "breakwater_audit_publish_dropped_total";
pub const CONFIG_RELOADS: &str = "breakwater_config_reloads_total";
pub const CONFIG_GENERATION: &str = "breakwater_config_generation";
pub const CANARY_ROLLBACKS: &str = "breakwater_canary_rollbacks_total";
pub const MODEL_VERSION_REQUESTS: &str = "breakwater_model_version_requests_total";
pub const MODEL_VERSION_DURATION: &str = "breakwater_model_version_duration_seconds";
pub const MODEL_VERSION_ERRORS: &str = "breakwater_model_version_errors_total";
pub const DEGRADED_SECONDS: &str = "breakwater_degraded_seconds_total";
pub const DEGRADED_EPISODE_SECONDS: &str = "breakwater_degraded_episode_seconds";
pub const RTO_SECONDS: &str = "breakwater_rto_seconds";
pub const UNAPPROVED_VERSION_TOTAL: &str = "breakwater_unapproved_version_total";
pub const SCHEMA_VIOLATIONS_TOTAL: &str = "breakwater_schema_violations_total";
pub const SHADOW_REQUESTS_TOTAL: &str = "breakwater_shadow_requests_total";
pub const SHADOW_AGREEMENT_RATIO: &str = "breakwater_shadow_agreement_ratio";
pub const CONNECTIONS_OPEN: &str = "breakwater_connections_open";
pub const CONNECTIONS_REFUSED: &str = "breakwater_connections_refused_total";
pub const AMQP_CONNECTIONS: &str = "breakwater_amqp_connections_total";
pub const AMQP_CONNECTED_NODE: &str = "breakwater_amqp_connected_node";
pub const READY: &str = "breakwater_ready";
pub const DEGRADED_CONDITION: &str = "breakwater_degraded_condition";
pub const ADMIN_UNAUTHORIZED: &str = "breakwater_admin_unauthorized_total";
pub const UPSTREAM_TLS_ERRORS: &str = "breakwater_upstream_tls_errors_total";
pub const RESPONSE_BUFFER_BYTES: &str = "breakwater_response_buffer_bytes";
pub const RESPONSE_WRITE_TIMEOUTS: &str = "breakwater_response_write_timeouts_total";
pub const ACCESS_LOG_DROPPED: &str = "breakwater_access_log_dropped_total";

/// Distinct model-version label values kept before the rest are folded into "other".
const MAX_MODEL_VERSIONS: usize = 64;

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder once per process (tests start many proxies in one
/// process) and returns the handle `/metrics` renders from.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe();
            handle
        })
        .clone()
}

/// Histograms grow until drained: run upkeep now and then.
pub async fn upkeep(handle: PrometheusHandle, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = shutdown.cancelled() => return,
        }
    }
}

fn describe() {
    describe_counter!(
        ADMIN_UNAUTHORIZED,
        "Mutating admin calls refused for a missing or wrong bearer token, by endpoint \
         (a path template such as /admin/routes/{name}/breaker, or other)"
    );
    describe_counter!(
        UPSTREAM_TLS_ERRORS,
        "TLS handshakes with an upstream that failed, by upstream and kind \
         (untrusted|expired|wrong_host|client_cert_rejected|other)"
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Open client connections, by listener (data|admin)"
    );
    describe_gauge!(
        RESPONSE_BUFFER_BYTES,
        "Response bytes read ahead of slow clients, held in memory (at most server.response_buffer_bytes)"
    );
    describe_counter!(
        RESPONSE_WRITE_TIMEOUTS,
        "Connections dropped because the client accepted no bytes within server.response_write_timeout_ms"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused over max_connections / admin_max_connections, by listener"
    );
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by route, outcome (ai|fallback|error) and status"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time to the response head, by route and outcome"
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        Unit::Seconds,
        "AI upstream response time, by route, upstream and variant"
    );
    describe_histogram!(
        OVERHEAD,
        Unit::Seconds,
        "Time spent in breakwater itself (request time minus upstream time)"
    );
    describe_gauge!(
        BREAKER_STATE,
        "0 closed, 1 open, 2 half-open, 3 forced_open, 4 forced_closed"
    );
    describe_counter!(
        BREAKER_TRANSITIONS,
        "Circuit breaker state changes, by route and target state"
    );
    describe_counter!(
        FALLBACKS_TOTAL,
        "Fallback answers served, by route, kind and reason"
    );
    describe_counter!(RETRIES_TOTAL, "Retries sent to an AI upstream");
    describe_counter!(
        SHED_TOTAL,
        "Requests shed by the per-upstream concurrency limit"
    );
    describe_gauge!(CONCURRENCY_LIMIT, "Current concurrency limit per upstream");
    describe_counter!(DLQ_MESSAGES, "Dead-letter messages, by route and result");
    describe_gauge!(DLQ_SPOOL_BYTES, "Bytes held in the local DLQ spool");
    describe_counter!(REPLAYS_TOTAL, "DLQ replays, by route and result");
    describe_counter!(AUDIT_RECORDS, "Decision records written and fsync'd");
    describe_counter!(AUDIT_WRITE_ERRORS, "Decision log write errors");
    describe_counter!(
        AUDIT_DROPPED,
        "Decision records dropped under on_full = \"drop\""
    );
    describe_counter!(
        AMQP_CONNECTIONS,
        "RabbitMQ connection attempts, one per node tried, by component and result (ok, error)"
    );
    describe_gauge!(
        AMQP_CONNECTED_NODE,
        "Index in the configured amqp_url list of the node each RabbitMQ connection is on; -1 while not connected"
    );
    describe_counter!(
        AUDIT_PUBLISHED,
        "Decision log lines copied to RabbitMQ and confirmed"
    );
    describe_counter!(
        AUDIT_PUBLISH_DROPPED,
        "Decision log lines not copied to RabbitMQ because its buffer was full (the file has them)"
    );
    describe_counter!(CONFIG_RELOADS, "Config reload attempts, by result");
    describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access log lines dropped (its buffer was full, or the write failed)"
    );
    describe_gauge!(CONFIG_GENERATION, "Generation of the config in force");
    describe_gauge!(
        READY,
        "1 while /readyz answers 200, 0 while it answers 503 (see server.readiness)"
    );
    describe_gauge!(
        DEGRADED_CONDITION,
        "1 while a degraded condition holds, by condition (audit_disk|spool_full|dlq_broker|draining)"
    );
    describe_counter!(CANARY_ROLLBACKS, "Automatic and manual canary rollbacks");
    describe_counter!(
        MODEL_VERSION_REQUESTS,
        "AI answers, by route and the model version the AI reported"
    );
    describe_histogram!(
        MODEL_VERSION_DURATION,
        Unit::Seconds,
        "AI upstream latency by route and model version"
    );
    describe_counter!(
        MODEL_VERSION_ERRORS,
        "AI failures by route and model version requested (variant)"
    );
    describe_counter!(
        DEGRADED_SECONDS,
        "Seconds a route spent degraded (breaker open, AI disabled or answers unapproved)"
    );
    describe_gauge!(
        DEGRADED_EPISODE_SECONDS,
        Unit::Seconds,
        "How long the route's current degraded episode has lasted (0 while healthy)"
    );
    describe_gauge!(
        RTO_SECONDS,
        Unit::Seconds,
        "The route's rto_s: longest tolerable degraded episode"
    );
    describe_counter!(
        UNAPPROVED_VERSION_TOTAL,
        "AI answers from a model version outside the route's approved_versions"
    );
    describe_counter!(
        SCHEMA_VIOLATIONS_TOTAL,
        "AI answers that did not match the route's response_schema"
    );
    describe_counter!(
        SHADOW_REQUESTS_TOTAL,
        "Requests mirrored to a route's shadow candidate, by result (agree, disagree, error, timeout, incomparable, dropped)"
    );
    describe_gauge!(
        SHADOW_AGREEMENT_RATIO,
        "Share of compared shadow answers that agreed with the answer the client got"
    );
}

/// Starts at zero the counters that alerts watch, for what `config` enables, so a first
/// failure is an increase Prometheus can see (`increase()` needs a sample before it) and a
/// dashboard shows 0 rather than "no data". Called for every generation: a reload that
/// adds a route or a variant registers its series too.
pub fn register_series(config: &crate::config::Config) {
    for result in ["ok", "error"] {
        metrics::counter!(CONFIG_RELOADS, "result" => result).increment(0);
    }
    metrics::counter!(RESPONSE_WRITE_TIMEOUTS).increment(0);
    if let Some(audit) = &config.audit {
        metrics::counter!(AUDIT_RECORDS).increment(0);
        metrics::counter!(AUDIT_WRITE_ERRORS).increment(0);
        metrics::counter!(AUDIT_DROPPED).increment(0);
        if audit.publish.is_some() {
            metrics::counter!(AUDIT_PUBLISHED).increment(0);
            metrics::counter!(AUDIT_PUBLISH_DROPPED).increment(0);
        }
    }
    for route in &config.routes {
        let name = route.name.to_string();
        metrics::counter!(DEGRADED_SECONDS, "route" => name.clone()).increment(0);
        metrics::gauge!(DEGRADED_EPISODE_SECONDS, "route" => name.clone()).increment(0.0);
        if let Some(rto) = route.rto {
            metrics::gauge!(RTO_SECONDS, "route" => name.clone()).set(rto.as_secs_f64());
        }
        if route.response_schema.is_some() {
            metrics::counter!(SCHEMA_VIOLATIONS_TOTAL, "route" => name.clone()).increment(0);
        }
        for v in &route.variants {
            metrics::counter!(CANARY_ROLLBACKS, "route" => name.clone(), "variant" => v.name.clone())
                .increment(0);
        }
        if route.replayable && config.dlq.is_some() {
            for result in ["rejected", "parked"] {
                metrics::counter!(DLQ_MESSAGES, "route" => name.clone(), "result" => result)
                    .increment(0);
            }
        }
    }
}

/// Caps the number of distinct model-version label values.
pub fn model_version_label(version: &str) -> String {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(|| Mutex::new(HashSet::new()));
    let Ok(mut seen) = seen.lock() else {
        return "other".to_string();
    };
    if seen.contains(version) {
        return version.to_string();
    }
    if seen.len() < MAX_MODEL_VERSIONS && version.len() <= 64 {
        seen.insert(version.to_string());
        return version.to_string();
    }
    "other".to_string()
}
