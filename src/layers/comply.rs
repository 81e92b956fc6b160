//! Compliance checks on an AI answer, just above the upstream call: the model version
//! must be in `approved_versions` (optionally pinned to an artifact digest) and the body
//! must match `response_schema`. A refused answer becomes an error here, so the breaker,
//! the bulkhead and the canary above judge it (see `CallOutcome::for_breaker`) and the
//! fallback chain answers with reason `unapproved_version` or `invalid_response`.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tower::{Layer, Service};

use crate::config::{Approval, OnUnapproved, ResponseSchema, RouteConfig};
use crate::events::EventSink;
use crate::exchange::error::{ErrorKind, ProxyError};
use crate::exchange::{ProxyRequest, ProxyResponse, Source};
use crate::telemetry;

/// How many (route, version, digest) triples one process remembers for the "once per new
/// version" events; past that a hostile upstream inventing versions cannot grow memory,
/// and further new versions are still counted and refused, only without an event.
const SEEN_CAP: usize = 4096;

/// Route, model version, digest.
type Seen = (Arc<str>, String, Option<String>);

/// The unapproved versions already reported, per process (survives reloads).
#[derive(Debug, Default)]
pub struct SeenVersions {
    seen: Mutex<HashSet<Seen>>,
}

impl SeenVersions {
    /// True the first time this route reports this version (and digest).
    fn first(&self, route: &Arc<str>, version: &str, digest: Option<&str>) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        if seen.len() >= SEEN_CAP {
            return false;
        }
        seen.insert((
            route.clone(),
            version.to_string(),
            digest.map(str::to_string),
        ))
    }
}

/// Per-route flag: the last answer was refused as unapproved (the route counts as degraded
/// until an approved answer arrives).
#[derive(Debug, Default)]
pub struct UnapprovedFlag(AtomicBool);

impl UnapprovedFlag {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug)]
pub struct ComplyLayer {
    inner: Arc<Checks>,
}

#[derive(Debug)]
struct Checks {
    route: Arc<str>,
    approval: Option<Arc<Approval>>,
    schema: Option<Arc<ResponseSchema>>,
    seen: Arc<SeenVersions>,
    events: Option<Arc<dyn EventSink>>,
    unapproved: Arc<UnapprovedFlag>,
}

impl ComplyLayer {
    /// `None` when the route has nothing to check: no layer, no cost.
    pub fn for_route(
        route: &RouteConfig,
        seen: Arc<SeenVersions>,
        events: Option<Arc<dyn EventSink>>,
        unapproved: Arc<UnapprovedFlag>,
    ) -> Option<ComplyLayer> {
        if route.approval.is_none() && route.response_schema.is_none() {
            return None;
        }
        Some(ComplyLayer {
            inner: Arc::new(Checks {
                route: route.name.clone(),
                approval: route.approval.clone(),
                schema: route.response_schema.clone(),
                seen,
                events,
                unapproved,
            }),
        })
    }
}

impl<S> Layer<S> for ComplyLayer {
    type Service = Comply<S>;
    fn layer(&self, inner: S) -> Comply<S> {
        Comply {
            inner,
            checks: self.inner.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Comply<S> {
    inner: S,
    checks: Arc<Checks>,
}

impl<S> Service<ProxyRequest> for Comply<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let checks = self.checks.clone();
        let meta = req.meta.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if resp.source != Source::Ai {
                return Ok(resp);
            }
            if let Some(approval) = &checks.approval {
                let version = meta.facts().model_version.clone();
                checks.approval(approval, version, &resp, &meta)?;
            }
            if let Some(schema) = &checks.schema {
                checks.validate(schema, &resp)?;
            }
            Ok(resp)
        })
    }
}

impl Checks {
    fn approval(
        &self,
        approval: &Approval,
        version: Option<String>,
        resp: &ProxyResponse,
        meta: &crate::exchange::RequestMeta,
    ) -> Result<(), ProxyError> {
        let digest = digest_of(approval, resp.http.headers(), resp.body_bytes.as_deref());
        let digest = digest.as_deref();
        if approval.approves(version.as_deref(), digest) {
            self.unapproved.set(false);
            return Ok(());
        }
        let version = version.unwrap_or_else(|| "unknown".to_string());
        metrics::counter!(telemetry::UNAPPROVED_VERSION_TOTAL, "route" => self.route.to_string(), "model_version" => telemetry::model_version_label(&version)).increment(1);
        if self.seen.first(&self.route, &version, digest) {
            let (upstream, variant) = {
                let f = meta.facts();
                (f.upstream.clone(), f.variant.clone())
            };
            tracing::warn!(route = %self.route, model_version = %version, digest = ?digest, action = approval.on_unapproved.as_str(), "the AI answered from a model version that is not approved");
            if let Some(events) = &self.events {
                events.emit(
                    "unapproved_version",
                    serde_json::json!({
                        "route": &*self.route,
                        "model_version": version,
                        "digest": digest,
                        "upstream": upstream.as_deref(),
                        "variant": variant.as_deref(),
                        "on_unapproved": approval.on_unapproved.as_str(),
                    }),
                    None,
                );
            }
        }
        match approval.on_unapproved {
            OnUnapproved::Flag => {
                meta.facts().unapproved = true;
                Ok(())
            }
            OnUnapproved::Fallback => {
                self.unapproved.set(true);
                Err(ErrorKind::Unapproved { version }.into())
            }
        }
    }

    fn validate(&self, schema: &ResponseSchema, resp: &ProxyResponse) -> Result<(), ProxyError> {
        check_schema(&self.route, schema, resp.body_bytes.as_deref())
            .map_err(|why| ErrorKind::InvalidResponse(why).into())
    }
}

/// Validates a whole answer against `schema`, counting a violation. `None`: the body was
/// too large to buffer (over max_response_buffer_bytes), so it cannot be checked and is
/// refused. Also used by DLQ replays, which never pass this layer.
pub(crate) fn check_schema(
    route: &str,
    schema: &ResponseSchema,
    body: Option<&[u8]>,
) -> Result<(), String> {
    let verdict = match body {
        None => Err("the answer is larger than max_response_buffer_bytes".to_string()),
        Some(bytes) => crate::json_tape::check(&schema.validator, bytes),
    };
    verdict.inspect_err(|why| {
        metrics::counter!(telemetry::SCHEMA_VIOLATIONS_TOTAL, "route" => route.to_string()).increment(1);
        tracing::debug!(route = %route, schema = %schema.file, %why, "the AI's answer does not match the response schema");
    })
}

/// The artifact digest the AI reported: `model_digest_header`, else `model_digest_pointer`
/// into the (buffered) answer.
pub(crate) fn digest_of(
    approval: &Approval,
    headers: &http::HeaderMap,
    body: Option<&[u8]>,
) -> Option<String> {
    if let Some(v) = headers
        .get(&approval.digest_header)
        .and_then(|v| v.to_str().ok())
    {
        return Some(v.to_string());
    }
    let (ptr, body) = (approval.digest_pointer.as_deref()?, body?);
    crate::proxy::forward::model_version_from_json(body, ptr)
}

/// Counts an unapproved answer outside the request path (DLQ replays).
pub(crate) fn count_unapproved(route: &str, version: Option<&str>) {
    let version = version.unwrap_or("unknown");
    metrics::counter!(telemetry::UNAPPROVED_VERSION_TOTAL, "route" => route.to_string(), "model_version" => telemetry::model_version_label(version)).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::{full_body, RequestMeta};
    use std::time::Duration;
    use tower::ServiceExt;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<(String, serde_json::Value)>>);

    impl EventSink for Recorded {
        fn emit(&self, event: &str, detail: serde_json::Value, _actor: Option<&str>) {
            self.0.lock().unwrap().push((event.to_string(), detail));
        }
    }

    fn route(extra: &str) -> Arc<RouteConfig> {
        let text = format!(
            "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n[upstreams.a]\nurl=\"http://127.0.0.1:1\"\n\
             [[routes]]\nname=\"test\"\npath_prefix=\"/\"\nupstream=\"a\"\nmodel_version_header=\"x-model-version\"\n{extra}"
        );
        crate::config::Config::from_toml(&text).unwrap().routes[0].clone()
    }

    /// One call through the layer; the mock AI reports `version` (as `Forward` would).
    async fn call(
        layer: &ComplyLayer,
        route: &Arc<RouteConfig>,
        version: &str,
    ) -> (Result<ProxyResponse, ProxyError>, Arc<RequestMeta>) {
        let (mock, mut handle) = tower_test::mock::pair::<ProxyRequest, ProxyResponse>();
        let svc =
            layer.layer(mock.map_err(|e| ProxyError::from(ErrorKind::Internal(e.to_string()))));
        handle.allow(1);
        let meta = Arc::new(RequestMeta::new("req-1".into(), route.clone(), false));
        meta.attempt_answered(Duration::from_millis(1), Some(version.to_string()));
        let req = ProxyRequest {
            http: http::Request::new(bytes::Bytes::new()),
            meta: meta.clone(),
        };
        let fut = tokio::spawn(svc.oneshot(req));
        let (_req, respond) = handle.next_request().await.unwrap();
        respond.send_response(ProxyResponse::ai(http::Response::new(full_body("{}"))));
        (fut.await.unwrap(), meta)
    }

    #[tokio::test]
    async fn unapproved_answers_fail_under_fallback_and_pass_marked_under_flag() {
        for (mode, refused) in [("fallback", true), ("flag", false)] {
            let route = route(&format!(
                "approved_versions = [\"v7\"]\non_unapproved = \"{mode}\"\n"
            ));
            let events = Arc::new(Recorded::default());
            let flag = Arc::new(UnapprovedFlag::default());
            let layer = ComplyLayer::for_route(
                &route,
                Arc::new(SeenVersions::default()),
                Some(events.clone()),
                flag.clone(),
            )
            .unwrap();
            let (ok, meta) = call(&layer, &route, "v7").await;
            assert!(ok.is_ok() && !meta.facts().unapproved);
            for _ in 0..2 {
                let (result, meta) = call(&layer, &route, "v9").await;
                match result {
                    Err(e) => {
                        assert!(refused, "{mode}: {e}");
                        assert!(matches!(e.kind, ErrorKind::Unapproved { .. }));
                        assert_eq!(e.reason().as_str(), "unapproved_version");
                        assert!(!e.is_retryable());
                        assert_eq!(
                            e.call_outcome()
                                .and_then(crate::breaker::CallOutcome::for_breaker),
                            None,
                            "the breaker does not judge an unapproved answer"
                        );
                        assert!(e.call_outcome().unwrap().is_failure(), "the canary does");
                    }
                    Ok(_) => {
                        assert!(!refused, "{mode}");
                        assert!(meta.facts().unapproved);
                    }
                }
            }
            assert_eq!(flag.get(), refused);
            let events = events.0.lock().unwrap();
            assert_eq!(events.len(), 1, "one event per new version");
            assert_eq!(events[0].0, "unapproved_version");
            assert_eq!(events[0].1["model_version"], "v9");
        }
    }

    #[test]
    fn no_checks_no_layer() {
        let route = route("");
        assert!(ComplyLayer::for_route(
            &route,
            Arc::new(SeenVersions::default()),
            None,
            Arc::new(UnapprovedFlag::default())
        )
        .is_none());
    }
}
