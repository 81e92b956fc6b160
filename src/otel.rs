//! W3C trace context and OpenTelemetry spans (`[tracing]`), exported over OTLP/HTTP.
//!
//! A request that carries `traceparent` continues its trace when the caller sampled it; a
//! request without one starts a trace with probability `sampling_ratio`. Only then are
//! spans made: one per request (kind server: route, outcome, reason, variant, model
//! version, status) and one per AI attempt (kind client), whose context is what the
//! upstream receives in `traceparent` / `tracestate`. A request that is not sampled costs a
//! header lookup: its trace context (if any) passes through untouched. The trace id goes
//! into the decision record and the dead letter; a replay is a new trace that links to the
//! original request's span.
//!
//! Spans are batched by the SDK's span processor on its own thread and exported with
//! breakwater's own hyper client on the tokio runtime: a slow collector costs a full
//! queue (spans dropped by the SDK), never a request.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Link, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;

/// The most of a collector's answer read back (it is only checked for its status).
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// OTLP/HTTP traces endpoint, e.g. `http://otel-collector:4318/v1/traces`.
    pub endpoint: String,
    /// Share of requests without a sampled `traceparent` that start a trace, 0..=1.
    pub sampling_ratio: f64,
    pub service_name: String,
    pub export_timeout: Duration,
    /// Spans waiting for export; beyond it the SDK drops them.
    pub max_queue: usize,
    pub export_interval: Duration,
}

/// The process's tracer; absent when `[tracing]` is not configured.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    ratio: f64,
    propagator: TraceContextPropagator,
}

/// A request's trace: its ids always (for the records), its spans when sampled.
#[derive(Debug)]
pub struct RequestTrace {
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// The request's own span when it is recorded, else the caller's span.
    pub span_id: String,
    /// The context holding the request's server span, when sampled.
    recording: Option<(Context, SdkTracer)>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("ratio", &self.ratio)
            .finish()
    }
}

impl Tracing {
    /// Builds the exporter and the batch processor; needs to run inside the tokio runtime
    /// (the exporter's HTTP calls are spawned on it).
    pub fn start(config: &TracingConfig, instance: &str) -> Result<Tracing, String> {
        let client = ExportClient::new(config.export_timeout)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue)
            .with_scheduled_delay(config.export_interval)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attributes([
                KeyValue::new("service.instance.id", instance.to_string()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("breakwater");
        Ok(Tracing {
            provider,
            tracer,
            ratio: config.sampling_ratio,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// Whether a request without a sampled parent starts a trace (`sampling_ratio` is
    /// validated to 0..=1).
    fn sample(&self) -> bool {
        self.ratio >= 1.0 || (self.ratio > 0.0 && rand::random_bool(self.ratio))
    }

    /// Exports what is queued, within `within` (blocking: run it off the runtime).
    pub fn shutdown(&self, within: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(within) {
            tracing::warn!(error = %e, "spans may be lost: the OTLP export did not finish");
        }
    }

    /// The trace of an incoming request, or `None` when it has no trace context and is
    /// not sampled.
    pub fn begin(
        &self,
        headers: &HeaderMap,
        method: &http::Method,
        path: &str,
        route: &str,
    ) -> Option<RequestTrace> {
        let has_parent = headers.contains_key("traceparent");
        let parent = if has_parent {
            self.propagator.extract(&HeaderExtractor(headers))
        } else {
            Context::new()
        };
        let remote = parent.span().span_context().clone();
        if remote.is_valid() && !remote.is_sampled() {
            // The caller decided: pass its context through, record its ids.
            return Some(RequestTrace::untraced(&remote));
        }
        if !remote.is_valid() && !self.sample() {
            return None;
        }
        let span = self
            .tracer
            .span_builder(format!("{method} {route}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
                KeyValue::new("breakwater.route", route.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        Some(RequestTrace::recorded(parent.with_span(span), &self.tracer))
    }

    /// A replay's trace: a new trace, linked to the request that was dead-lettered.
    pub fn replay(
        &self,
        route: &str,
        request_id: &str,
        original: Option<(&str, &str)>,
    ) -> Option<RequestTrace> {
        let link = original.and_then(|(t, s)| {
            let trace_id = opentelemetry::trace::TraceId::from_hex(t).ok()?;
            let span_id = opentelemetry::trace::SpanId::from_hex(s).ok()?;
            Some(Link::with_context(SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )))
        });
        // A dead letter of a traced request is always traced: the link is the point.
        if link.is_none() && !self.sample() {
            return None;
        }
        let span = self
            .tracer
            .span_builder(format!("replay {route}"))
            .with_kind(SpanKind::Client)
            .with_links(link.into_iter().collect())
            .with_attributes([
                KeyValue::new("breakwater.route", route.to_string()),
                KeyValue::new("breakwater.request_id", request_id.to_string()),
                KeyValue::new("breakwater.replay", true),
            ])
            .start_with_context(&self.tracer, &Context::new());
        Some(RequestTrace::recorded(
            Context::new().with_span(span),
            &self.tracer,
        ))
    }
}

/// Writes the context of `cx`'s span into `headers` (`traceparent`, `tracestate`),
/// replacing what was there.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// The ids of a `traceparent` header, without the tracer: for the records when tracing is
/// off. `None` when the header is missing or malformed.
pub fn incoming(headers: &HeaderMap) -> Option<RequestTrace> {
    if !headers.contains_key("traceparent") {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| RequestTrace::untraced(&sc))
}

/// One AI attempt's client span; ended with the attempt's result.
pub struct AttemptSpan {
    cx: Context,
}

impl RequestTrace {
    fn untraced(sc: &SpanContext) -> RequestTrace {
        RequestTrace {
            trace_id: sc.trace_id().to_string(),
            span_id: sc.span_id().to_string(),
            recording: None,
        }
    }

    fn recorded(cx: Context, tracer: &SdkTracer) -> RequestTrace {
        let sc = cx.span().span_context().clone();
        RequestTrace {
            trace_id: sc.trace_id().to_string(),
            span_id: sc.span_id().to_string(),
            recording: Some((cx, tracer.clone())),
        }
    }

    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// The context to propagate when no attempt span is open (a replay's own span).
    pub fn context(&self) -> Option<&Context> {
        self.recording.as_ref().map(|(cx, _)| cx)
    }

    /// Opens the span of one call to an AI upstream, a child of the request's span.
    pub fn attempt(
        &self,
        upstream: &str,
        variant: Option<&str>,
        attempt: u32,
    ) -> Option<AttemptSpan> {
        let (cx, tracer) = self.recording.as_ref()?;
        let mut attrs = vec![
            KeyValue::new("breakwater.upstream", upstream.to_string()),
            KeyValue::new("breakwater.attempt", i64::from(attempt)),
        ];
        if let Some(v) = variant {
            attrs.push(KeyValue::new("breakwater.variant", v.to_string()));
        }
        let span = tracer
            .span_builder(format!("attempt {upstream}"))
            .with_kind(SpanKind::Client)
            .with_attributes(attrs)
            .start_with_context(tracer, cx);
        Some(AttemptSpan {
            cx: cx.with_span(span),
        })
    }

    /// Ends the request's span with what the client got.
    pub fn end(&self, end: SpanEnd<'_>) {
        let Some((cx, _)) = &self.recording else {
            return;
        };
        let span = cx.span();
        let mut attrs = vec![
            KeyValue::new("http.response.status_code", i64::from(end.status)),
            KeyValue::new("breakwater.outcome", end.outcome.to_string()),
        ];
        for (k, v) in [
            ("breakwater.reason", end.reason),
            ("breakwater.variant", end.variant),
            ("breakwater.model_version", end.model_version),
            ("breakwater.upstream", end.upstream),
            ("breakwater.request_id", Some(end.request_id)),
        ] {
            if let Some(v) = v {
                attrs.push(KeyValue::new(k, v.to_string()));
            }
        }
        span.set_attributes(attrs);
        if end.status >= 500 || matches!(end.outcome, "error" | "replay_failed") {
            span.set_status(Status::error(end.reason.unwrap_or("error").to_string()));
        }
        span.end();
    }
}

/// What the request's span ends with.
pub struct SpanEnd<'a> {
    pub status: u16,
    pub outcome: &'a str,
    pub reason: Option<&'a str>,
    pub variant: Option<&'a str>,
    pub model_version: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub request_id: &'a str,
}

impl AttemptSpan {
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// The AI answered with `status` (an error status is still an answer).
    pub fn answered(self, status: u16, model_version: Option<&str>) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(v) = model_version {
            span.set_attribute(KeyValue::new("breakwater.model_version", v.to_string()));
        }
        if status >= 500 || status == 429 {
            span.set_status(Status::error(format!("the AI answered {status}")));
        }
        span.end();
    }

    /// No answer: connect error, reset, timeout or cancellation.
    pub fn failed(self, why: &str) {
        let span = self.cx.span();
        span.set_status(Status::error(why.to_string()));
        span.end();
    }
}

impl Drop for AttemptSpan {
    /// An attempt cut off by the deadline or a gone client ends here (ending twice is a
    /// no-op for the SDK).
    fn drop(&mut self) {
        let span = self.cx.span();
        if span.is_recording() {
            span.set_status(Status::error("cancelled"));
            span.end();
        }
    }
}

/// The exporter's HTTP client: breakwater's hyper client, driven on the tokio runtime
/// (the SDK's batch processor calls it from its own thread).
#[derive(Debug, Clone)]
struct ExportClient {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl ExportClient {
    fn new(timeout: Duration) -> Result<ExportClient, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| format!("tracing needs the tokio runtime: {e}"))?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        Ok(ExportClient {
            client,
            runtime,
            timeout,
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let call = async move {
            let (parts, body) = request.into_parts();
            let sent = tokio::time::timeout(
                timeout,
                client.request(http::Request::from_parts(parts, Full::new(body))),
            )
            .await
            .map_err(|_| HttpError::from("the OTLP collector did not answer in time"))?
            .map_err(|e| HttpError::from(e.to_string()))?;
            let (parts, body) = sent.into_parts();
            let body = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| HttpError::from(e.to_string()))?
                .to_bytes();
            Ok::<_, HttpError>(http::Response::from_parts(parts, body))
        };
        self.runtime
            .spawn(call)
            .await
            .map_err(|e| HttpError::from(e.to_string()))?
    }
}
