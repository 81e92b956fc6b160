//! The dead-letter message (SPEC "Dead-letter messages"): everything needed to send the
//! original request again, minus what must not be stored: hop-by-hop headers, client
//! credentials (always, whatever `redact_headers` says), the headers in `redact_headers`,
//! and upstream credentials (added by the replay worker from config).

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub msg_id: String,
    pub route: String,
    pub request_id: String,
    pub created_at: String,
    pub reason: String,
    pub attempts: u32,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body_b64: String,
    pub model_version_requested: Option<String>,
    /// The W3C trace of the request that was dead-lettered, and its span: a replay links
    /// to it. Absent when the request had no trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
}

/// Headers that say something about this hop or this proxy, never worth replaying.
const NOT_STORED: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "content-length",
    "host",
];

/// Room in a spool record for everything but the body: the envelope's fields and the
/// request headers (hyper caps those far below this, even JSON-escaped).
const ENVELOPE_OVERHEAD: u64 = 1 << 20;

/// The largest request body whose dead letter fits one spool record: the body is stored
/// base64-encoded (4 bytes per 3). `server.max_body_bytes` may not exceed it.
pub const MAX_SPOOLED_BODY: u64 = (super::spool::MAX_PAYLOAD as u64 - ENVELOPE_OVERHEAD) / 4 * 3;

/// Client credentials: never stored in a dead letter. `redact_headers` adds to these; an
/// empty list must not put a user's session into the spool and RabbitMQ.
pub const CREDENTIAL_HEADERS: &[&str] = &["authorization", "cookie", "proxy-authorization"];

fn stored(name: &str, redact: &[String]) -> bool {
    !NOT_STORED.contains(&name)
        && !CREDENTIAL_HEADERS.contains(&name)
        && !redact.iter().any(|r| r.eq_ignore_ascii_case(name))
}

impl Envelope {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        route: &str,
        request_id: &str,
        reason: &str,
        method: &http::Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
        body: &Bytes,
        redact: &[String],
        model_version_requested: Option<String>,
    ) -> Envelope {
        let headers = headers
            .iter()
            .filter(|(name, _)| stored(name.as_str(), redact))
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        Envelope {
            msg_id: uuid::Uuid::now_v7().to_string(),
            route: route.to_string(),
            request_id: request_id.to_string(),
            created_at: crate::audit::rfc3339(std::time::SystemTime::now()),
            reason: reason.to_string(),
            attempts: 0,
            method: method.as_str().to_string(),
            path: uri.path().to_string(),
            query: uri.query().map(str::to_string),
            headers,
            body_b64: base64::engine::general_purpose::STANDARD.encode(body),
            model_version_requested,
            trace_id: None,
            span_id: None,
        }
    }

    pub fn body(&self) -> Result<Bytes, base64::DecodeError> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.body_b64)
            .map(Bytes::from)
    }

    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_and_hop_headers_are_not_stored_and_the_body_round_trips() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer secret".parse().unwrap());
        h.insert("cookie", "s=1".parse().unwrap());
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.insert("x-student-id", "42".parse().unwrap());
        let uri: http::Uri = "/v1/grading?course=7".parse().unwrap();
        let body = Bytes::from_static(b"{\"essay\":\"...\"}");
        let e = Envelope::new(
            "grading",
            "r1",
            "timeout",
            &http::Method::POST,
            &uri,
            &h,
            &body,
            &["authorization".into(), "cookie".into()],
            None,
        );
        assert_eq!(
            e.headers,
            vec![("x-student-id".to_string(), "42".to_string())]
        );
        assert_eq!(e.body().unwrap(), body);
        assert_eq!(e.path_and_query(), "/v1/grading?course=7");
        assert_eq!(e.msg_id.len(), 36);
    }

    #[test]
    fn credentials_are_dropped_even_with_an_empty_redact_list() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer secret".parse().unwrap());
        h.insert("cookie", "s=1".parse().unwrap());
        h.insert("proxy-authorization", "Basic x".parse().unwrap());
        h.insert("x-api-key", "k".parse().unwrap());
        h.insert("x-student-id", "42".parse().unwrap());
        let uri: http::Uri = "/v1/grading".parse().unwrap();
        let e = Envelope::new(
            "grading",
            "r1",
            "timeout",
            &http::Method::POST,
            &uri,
            &h,
            &Bytes::new(),
            &["X-Api-Key".into()],
            None,
        );
        assert_eq!(
            e.headers,
            vec![("x-student-id".to_string(), "42".to_string())]
        );
    }
}
