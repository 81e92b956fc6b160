//! The admin listener: health, readiness, Prometheus metrics, the effective config, reload
//! and (from the resilience layers on) the operator levers. Mutating calls need the bearer
//! token from `server.admin_token_file` when one is configured.

pub mod readiness;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::reload::Reloader;
use crate::exchange::{full_body, ProxyBody};
use crate::proxy::Proxy;
use crate::server;

/// What the admin API reads and drives.
pub struct AdminState {
    pub proxy: Arc<Proxy>,
    pub reloader: Arc<Reloader>,
    pub metrics: PrometheusHandle,
    /// Listeners bound, draining: what `/readyz` reads besides the components.
    pub lifecycle: readiness::Lifecycle,
    /// Degraded while the decision log cannot write (503 only in `strict` readiness).
    pub audit: Option<crate::audit::AuditHandle>,
    pub dlq: Option<crate::dlq::DlqHandle>,
    /// Which RabbitMQ node each connection is on.
    pub amqp: crate::amqp::Connections,
}

/// Serves the admin API until `shutdown`, with its own connection cap
/// (`server.admin_max_connections`) so a scrape storm cannot take the process's sockets.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let server = &state.proxy.snapshot().config.server;
    let limit = server::ConnLimit::new("admin", server.admin_max_connections);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = server::accept(&listener, "admin") => accepted,
            _ = shutdown.cancelled() => return,
        };
        let Some((stream, permit)) = limit.admit(stream, true) else {
            continue;
        };
        let timeouts = server::Timeouts::of(&state.proxy.snapshot().config.server);
        let state = state.clone();
        let drain = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let handler = move |req| {
                let state = state.clone();
                async move { handle(&state, req, remote).await }
            };
            // Admin calls are short: nothing to drain past the process's own shutdown.
            let never = CancellationToken::new();
            server::serve_connection(stream, remote, timeouts, handler, drain, never).await;
        });
    }
}

fn json_response(status: StatusCode, value: serde_json::Value) -> http::Response<ProxyBody> {
    let mut resp = http::Response::new(full_body(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    text: impl Into<Bytes>,
) -> http::Response<ProxyBody> {
    let mut resp = http::Response::new(full_body(text.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

fn error(status: StatusCode, message: &str) -> http::Response<ProxyBody> {
    json_response(
        status,
        json!({"error": {"code": status.as_u16(), "message": message}}),
    )
}

/// Constant-time comparison so the token cannot be guessed byte by byte from timings:
/// `subtle` compares the SHA-256 digests, so neither the matching prefix nor the token's
/// length shows in how long a refusal takes.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    let (given, expected) = (sha2::Sha256::digest(given), sha2::Sha256::digest(expected));
    given.as_slice().ct_eq(expected.as_slice()).into()
}

/// The admin endpoint a path names, as a bounded metric label: route and variant names
/// become `{name}` / `{variant}`, anything unknown is `other`.
fn endpoint_label(segments: &[&str]) -> &'static str {
    match segments {
        ["admin", "reload"] => "/admin/reload",
        ["admin", "routes", _, "breaker"] => "/admin/routes/{name}/breaker",
        ["admin", "routes", _, "ai"] => "/admin/routes/{name}/ai",
        ["admin", "routes", _, "variants", _] => "/admin/routes/{name}/variants/{variant}",
        ["admin", "dlq", "replay"] => "/admin/dlq/replay",
        ["admin", "dlq", "pause"] => "/admin/dlq/pause",
        ["admin", "dlq", "resume"] => "/admin/dlq/resume",
        ["admin", "dlq", "parked", "requeue"] => "/admin/dlq/parked/requeue",
        _ => "other",
    }
}

/// A refused mutating call: counted by endpoint and logged with who tried (the peer) and
/// whether a token came at all. The given token is never logged, nor is its fingerprint
/// (a guess shortened to 12 hex digits still helps no one, but is no one's business).
fn refuse(
    method: &Method,
    path: &str,
    segments: &[&str],
    peer: SocketAddr,
    headers: &http::HeaderMap,
) -> http::Response<ProxyBody> {
    let endpoint = endpoint_label(segments);
    metrics::counter!(crate::telemetry::ADMIN_UNAUTHORIZED, "path" => endpoint).increment(1);
    // The raw path is the client's text: cut it, so a 64 KiB URI is not a 64 KiB log line.
    let shown: String = path.chars().take(200).collect();
    tracing::warn!(
        %peer,
        method = %method,
        path = %shown,
        endpoint,
        token_given = headers.contains_key(http::header::AUTHORIZATION),
        "admin call refused: missing or wrong bearer token"
    );
    error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
}

/// Who made a mutating call, for the audit trail: the token's fingerprint, never the token.
pub fn actor_of(req_headers: &http::HeaderMap) -> String {
    use sha2::Digest;
    match bearer(req_headers) {
        Some(t) => format!("token:{}", &hex::encode(sha2::Sha256::digest(t))[..12]),
        None => "anonymous".to_string(),
    }
}

/// The token of `Authorization: Bearer <token>`. The scheme is case-insensitive and
/// followed by one or more spaces (RFC 9110 §11.1, §11.4).
fn bearer(headers: &http::HeaderMap) -> Option<&[u8]> {
    let v = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at_checked(b"bearer".len())?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.starts_with(b" ") {
        return None;
    }
    Some(rest.trim_ascii_start())
}

fn authorized(state: &AdminState, headers: &http::HeaderMap) -> bool {
    let snapshot = state.proxy.snapshot();
    match &snapshot.config.server.admin_token {
        None => true,
        Some(token) => {
            bearer(headers).is_some_and(|given| token_matches(given, token.0.as_bytes()))
        }
    }
}

async fn read_json(body: Incoming) -> Result<serde_json::Value, String> {
    let bytes = Limited::new(body, 64 * 1024)
        .collect()
        .await
        .map_err(|e| format!("cannot read the body: {e}"))?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("body is not JSON: {e}"))
}

async fn handle(
    state: &AdminState,
    req: http::Request<Incoming>,
    peer: SocketAddr,
) -> http::Response<ProxyBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mutating = method != Method::GET && method != Method::HEAD;
    if mutating && !authorized(state, req.headers()) {
        return refuse(&method, &path, &segments, peer, req.headers());
    }
    let actor = actor_of(req.headers());
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => text_response(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, ["readyz"]) => readyz(state),
        (&Method::GET, ["metrics"]) => {
            // The readiness gauges are as fresh as the scrape, probed or not.
            readiness_report(state).publish();
            text_response(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                state.metrics.render(),
            )
        }
        (&Method::GET, ["admin", "config"]) => {
            let snap = state.proxy.snapshot();
            json_response(
                StatusCode::OK,
                json!({
                    "generation": snap.generation,
                    "hash": snap.config.hash,
                    "loaded_at": humantime::format_rfc3339_seconds(snap.loaded_at).to_string(),
                    "path": state.reloader.path().display().to_string(),
                    "config": snap.config.masked_json(),
                    // Which node of `amqp_url` / `publish_url` each connection is on.
                    "amqp_connections": state.amqp.snapshot(),
                }),
            )
        }
        (&Method::POST, ["admin", "reload"]) => {
            let _ = read_json(req.into_body()).await;
            match state.reloader.reload(&format!("admin:{actor}"), true).await {
                Ok(outcome) => json_response(StatusCode::OK, json!(outcome)),
                Err(errors) => json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"error": {"code": "invalid_config", "message": "config rejected; the previous config keeps serving", "errors": errors.errors}}),
                ),
            }
        }
        (&Method::GET, ["admin", "breakers"]) => breakers(state),
        (&Method::GET, ["admin", "dlq"]) => match &state.dlq {
            Some(d) => json_response(StatusCode::OK, d.status().await),
            None => error(
                StatusCode::NOT_FOUND,
                "no DLQ configured (no replayable route)",
            ),
        },
        (&Method::POST, ["admin", "dlq", "parked", "requeue"]) => {
            requeue_parked(state, req.uri().query(), &actor).await
        }
        (&Method::POST, ["admin", "dlq", action]) => {
            let route = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("route=")))
                .map(str::to_string);
            dlq_action(state, action, route.as_deref(), &actor)
        }
        (&Method::GET, ["admin", "inventory"]) => {
            let table = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "format=table"));
            inventory(state, table)
        }
        (&Method::POST, ["admin", "routes", name, "variants", variant]) => {
            let body = match read_json(req.into_body()).await {
                Ok(b) => b,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            };
            set_variant_weight(state, name, variant, &body, &actor)
        }
        (&Method::POST, ["admin", "routes", name, "breaker"]) => {
            let body = match read_json(req.into_body()).await {
                Ok(b) => b,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            };
            set_breaker(state, name, &body, &actor)
        }
        (&Method::POST, ["admin", "routes", name, "ai"]) => {
            let body = match read_json(req.into_body()).await {
                Ok(b) => b,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            };
            set_ai(state, name, &body, &actor)
        }
        _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

fn breakers(state: &AdminState) -> http::Response<ProxyBody> {
    let snap = state.proxy.snapshot();
    let now = tokio::time::Instant::now();
    let mut routes = serde_json::Map::new();
    for route in &snap.config.routes {
        let Some(rs) = snap.route_state(&route.name) else {
            continue;
        };
        let breaker = rs.breaker.as_ref().and_then(|b| b.stats(now));
        routes.insert(
            route.name.to_string(),
            json!({
                "ai_enabled": rs.ai.enabled(),
                "ai_overridden": rs.ai.overridden(),
                "breaker": breaker,
            }),
        );
    }
    json_response(StatusCode::OK, json!({ "routes": routes }))
}

fn set_breaker(
    state: &AdminState,
    route: &str,
    body: &serde_json::Value,
    actor: &str,
) -> http::Response<ProxyBody> {
    use crate::breaker::Mode;
    let rs = match route_state(state, route) {
        Ok(rs) => rs,
        Err(resp) => return resp,
    };
    let Some(breaker) = &rs.breaker else {
        return error(
            StatusCode::CONFLICT,
            &format!("route {route:?} has no [routes.breaker]"),
        );
    };
    let mode = match body.get("state").and_then(|s| s.as_str()) {
        Some("forced_open") => Mode::ForcedOpen,
        Some("forced_closed") => Mode::ForcedClosed,
        Some("auto") => Mode::Auto,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "body must be {\"state\": \"forced_open\" | \"forced_closed\" | \"auto\"}",
            )
        }
    };
    breaker.set_mode(mode);
    let now = tokio::time::Instant::now();
    emit_admin(
        state,
        actor,
        json!({"action": "breaker_mode", "route": route, "state": breaker.state(now).as_str()}),
    );
    tracing::warn!(
        route,
        actor,
        state = breaker.state(now).as_str(),
        "breaker mode set through the admin API"
    );
    json_response(
        StatusCode::OK,
        json!({"route": route, "state": breaker.state(now).as_str()}),
    )
}

/// The route's live state, or the 404 an operator should see for a typo. (The admin path
/// is cold: returning the response itself keeps the callers short.)
#[allow(clippy::result_large_err)]
fn route_state(
    state: &AdminState,
    route: &str,
) -> Result<Arc<crate::proxy::RouteState>, http::Response<ProxyBody>> {
    state
        .proxy
        .snapshot()
        .route_state(route)
        .cloned()
        .ok_or_else(|| error(StatusCode::NOT_FOUND, &format!("no route named {route:?}")))
}

/// `POST /admin/dlq/parked/requeue?route=NAME`: the spool-only parked area back to the spool.
async fn requeue_parked(
    state: &AdminState,
    query: Option<&str>,
    actor: &str,
) -> http::Response<ProxyBody> {
    let Some(dlq) = &state.dlq else {
        return error(
            StatusCode::NOT_FOUND,
            "no DLQ configured (no replayable route)",
        );
    };
    let Some(route) = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("route=")))
    else {
        return error(StatusCode::BAD_REQUEST, "requeue needs ?route=NAME");
    };
    match dlq.requeue_parked(route).await {
        Ok(n) => {
            emit_admin(
                state,
                actor,
                json!({"action": "dlq_parked_requeue", "route": route, "count": n}),
            );
            json_response(StatusCode::OK, json!({"route": route, "requeued": n}))
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot requeue: {e}"),
        ),
    }
}

fn dlq_action(
    state: &AdminState,
    action: &str,
    route: Option<&str>,
    actor: &str,
) -> http::Response<ProxyBody> {
    let Some(dlq) = &state.dlq else {
        return error(
            StatusCode::NOT_FOUND,
            "no DLQ configured (no replayable route)",
        );
    };
    if let Some(r) = route {
        if !dlq.knows_route(r) {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no replayable route named {r:?}"),
            );
        }
    }
    match action {
        "pause" => dlq.pause(route, true),
        "resume" => dlq.pause(route, false),
        "replay" => match route {
            Some(r) => {
                // The operator's replay may cut an automatic open period short, never the
                // kill switch or a breaker another operator forced open.
                if let Some(why) = crate::proxy::replay::operator_replay_refused(&state.proxy, r) {
                    return error(StatusCode::CONFLICT, &why);
                }
                dlq.trigger(r)
            }
            None => return error(StatusCode::BAD_REQUEST, "replay needs ?route=NAME"),
        },
        _ => return error(StatusCode::NOT_FOUND, "DLQ actions: replay, pause, resume"),
    }
    tracing::warn!(action, route, actor, "DLQ action through the admin API");
    emit_admin(
        state,
        actor,
        json!({"action": format!("dlq_{action}"), "route": route}),
    );
    json_response(StatusCode::OK, json!({"action": action, "route": route}))
}

fn set_variant_weight(
    state: &AdminState,
    route: &str,
    variant: &str,
    body: &serde_json::Value,
    actor: &str,
) -> http::Response<ProxyBody> {
    let rs = match route_state(state, route) {
        Ok(rs) => rs,
        Err(resp) => return resp,
    };
    let Some(weight) = body.get("weight").and_then(|w| w.as_f64()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be {\"weight\": N} (percent)",
        );
    };
    match rs.canary.set_weight(variant, weight) {
        Ok(old) => {
            tracing::warn!(
                route,
                variant,
                old,
                weight,
                actor,
                "canary weight set through the admin API"
            );
            emit_admin(
                state,
                actor,
                json!({"action": "variant_weight", "route": route, "variant": variant, "from": old, "to": weight}),
            );
            json_response(
                StatusCode::OK,
                json!({"route": route, "variant": variant, "weight": weight, "previous_weight": old}),
            )
        }
        Err(e) if e.starts_with("no variant") => error(StatusCode::NOT_FOUND, &e),
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

/// Records an admin change in the audit trail, with the config hash it applied to.
fn emit_admin(state: &AdminState, actor: &str, mut detail: serde_json::Value) {
    if let Some(events) = state.proxy.shared.events() {
        let hash = state.proxy.snapshot().config.hash.clone();
        if let Some(obj) = detail.as_object_mut() {
            obj.insert("config_hash_before".into(), json!(hash));
            obj.insert("config_hash_after".into(), json!(hash));
        }
        events.emit("admin_change", detail, Some(actor));
    }
}

fn inventory(state: &AdminState, table: bool) -> http::Response<ProxyBody> {
    let snap = state.proxy.snapshot();
    let now = tokio::time::Instant::now();
    let mut routes = Vec::new();
    for route in &snap.config.routes {
        let Some(rs) = snap.route_state(&route.name) else {
            continue;
        };
        routes.push(json!({
            "route": &*route.name,
            "path_prefix": route.path_prefix,
            "upstream": route.upstream,
            "ai_enabled": rs.ai.enabled(),
            "replayable": route.replayable,
            "criticality": route.criticality.as_str(),
            "rto_s": route.rto.map(|d| d.as_secs()),
            "degraded_for_s": rs.episode.degraded_for(now).map(|d| d.as_secs()),
            "breaker_state": rs.breaker.as_ref().map(|b| b.state(now).as_str()),
            "baseline_window": rs.canary.baseline_summary(now),
            "variants": rs.canary.variant_report(now),
            "model_versions": state.proxy.shared.inventory.versions(&route.name),
            "shadow": route.shadow.as_ref().and_then(|_| state.proxy.shared.shadow(&route.name)).map(|s| s.report()),
        }));
    }
    let doc = json!({
        "instance": snap.config.server.instance,
        "config_generation": snap.generation,
        "config_hash": snap.config.hash,
        "config_loaded_at": humantime::format_rfc3339_seconds(snap.loaded_at).to_string(),
        "routes": routes,
    });
    if !table {
        return json_response(StatusCode::OK, doc);
    }
    text_response(
        StatusCode::OK,
        "text/plain; charset=utf-8",
        inventory_table(&doc),
    )
}

/// The inventory as a terminal table: one line per model version, variant rows marked.
fn inventory_table(doc: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "config generation {} ({}), loaded {}",
        doc["config_generation"],
        doc["config_hash"]
            .as_str()
            .unwrap_or("")
            .get(..12)
            .unwrap_or(""),
        doc["config_loaded_at"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        out,
        "{:<16} {:<14} {:<10} {:<8} {:<18} {:>8} {:>8} {:>9} {:<20} {:<20}",
        "ROUTE",
        "UPSTREAM",
        "VARIANT",
        "WEIGHT",
        "MODEL VERSION",
        "REQS",
        "ERR%",
        "P99 MS",
        "FIRST SEEN",
        "LAST SEEN"
    );
    for r in doc["routes"].as_array().into_iter().flatten() {
        let route = r["route"].as_str().unwrap_or("");
        let breaker = r["breaker_state"].as_str().unwrap_or("-");
        let ai = if r["ai_enabled"].as_bool().unwrap_or(true) {
            ""
        } else {
            " AI-OFF"
        };
        let _ = writeln!(out, "{route} (breaker {breaker}{ai})");
        for v in r["variants"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "{:<16} {:<14} {:<10} {:<8} {:<18} {:>8} {:>8} {:>9}{}",
                "",
                v["upstream"].as_str().unwrap_or(""),
                v["name"].as_str().unwrap_or(""),
                format!("{}%", v["weight"]),
                "",
                v["window"]["requests"],
                format!(
                    "{:.2}",
                    v["window"]["error_rate"].as_f64().unwrap_or(0.0) * 100.0
                ),
                v["window"]["p99_ms"]
                    .as_f64()
                    .map(|p| format!("{p:.1}"))
                    .unwrap_or_else(|| "-".into()),
                if v["rollback"].is_null() {
                    ""
                } else {
                    "  ROLLED BACK"
                }
            );
        }
        for m in r["model_versions"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "{:<16} {:<14} {:<10} {:<8} {:<18} {:>8} {:>8} {:>9} {:<20} {:<20}",
                "",
                m["upstream"].as_str().unwrap_or(""),
                m["variant"].as_str().unwrap_or("-"),
                "",
                m["model_version"].as_str().unwrap_or(""),
                m["requests"],
                format!(
                    "{:.2}",
                    m["window"]["error_rate"].as_f64().unwrap_or(0.0) * 100.0
                ),
                m["window"]["p99_ms"]
                    .as_f64()
                    .map(|p| format!("{p:.1}"))
                    .unwrap_or_else(|| "-".into()),
                m["first_seen"].as_str().unwrap_or(""),
                m["last_seen"].as_str().unwrap_or("")
            );
        }
    }
    out
}

fn set_ai(
    state: &AdminState,
    route: &str,
    body: &serde_json::Value,
    actor: &str,
) -> http::Response<ProxyBody> {
    let rs = match route_state(state, route) {
        Ok(rs) => rs,
        Err(resp) => return resp,
    };
    let Some(enabled) = body.get("enabled").and_then(|e| e.as_bool()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be {\"enabled\": true | false}",
        );
    };
    rs.ai.set(enabled);
    emit_admin(
        state,
        actor,
        json!({"action": "ai_enabled", "route": route, "enabled": enabled}),
    );
    tracing::warn!(
        route,
        actor,
        enabled,
        "AI kill switch set through the admin API"
    );
    json_response(
        StatusCode::OK,
        json!({"route": route, "ai_enabled": rs.ai.enabled()}),
    )
}

fn readyz(state: &AdminState) -> http::Response<ProxyBody> {
    let report = readiness_report(state);
    report.publish();
    json_response(report.status(), report.body())
}

/// Every degraded condition found now, judged by the mode in force (hot-reloadable).
fn readiness_report(state: &AdminState) -> readiness::Report {
    use readiness::Condition;
    let mut degraded = Vec::new();
    if state.lifecycle.draining.load(Ordering::Acquire) {
        degraded.push((
            Condition::Draining,
            "shutting down: draining in-flight requests".to_string(),
        ));
    }
    if state.audit.as_ref().is_some_and(|a| !a.is_healthy()) {
        degraded.push((
            Condition::AuditDisk,
            "the decision log cannot write (disk full or I/O error)".to_string(),
        ));
    }
    if let Some(dlq) = &state.dlq {
        if let Some(why) = dlq.spool_rejecting() {
            degraded.push((Condition::SpoolFull, why));
        }
        if let Some(why) = dlq.broker_unreachable() {
            degraded.push((Condition::DlqBroker, why));
        }
    }
    let mode = state.proxy.snapshot().config.server.readiness;
    readiness::Report::evaluate(mode, &state.lifecycle, degraded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!token_matches(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!token_matches(b"short", b"0123456789abcdef"));
        assert!(!token_matches(b"", b"0123456789abcdef"));
        assert!(!token_matches(b"0123456789abcdef0", b"0123456789abcdef"));
    }

    #[test]
    fn unauthorized_label_is_a_template_never_a_name() {
        let label = |p: &str| endpoint_label(&p.trim_matches('/').split('/').collect::<Vec<_>>());
        assert_eq!(
            label("/admin/routes/payments/breaker"),
            "/admin/routes/{name}/breaker"
        );
        assert_eq!(
            label("/admin/routes/x/variants/v9"),
            "/admin/routes/{name}/variants/{variant}"
        );
        assert_eq!(label("/admin/whatever/secret-guess"), "other");
    }
}
